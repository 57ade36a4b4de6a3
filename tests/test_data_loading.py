"""engine.data.loading: every source format, the published cleaning, and bad rows counted per reason."""

import json
import math

import pytest

from engine.data.loading import DataError, load_any, load_pairs, load_responses, make_prompt
from engine.data.records import make_prompt_id, make_response_id


def wp(
    title="[WP] A dragon learns to knit", text="", texts=("one story", "two story"), scores=(3, 9), times=None, **extra
):
    row = {
        "post_title": title,
        "post_text": text,
        "post_scores": 10,
        "comment_texts": list(texts),
        "comment_scores": list(scores),
        "comment_times": list(times) if times is not None else [1] * len(texts),
    }
    row.update(extra)
    return row


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


# One bad row of every kind (and the reason it must be counted under).
BAD_ROWS = {
    "missing_field": {k: v for k, v in wp().items() if k != "comment_scores"},
    "length_mismatch": wp(texts=("a", "b", "c"), scores=(1, 2), times=(1, 2, 3)),
    "non_numeric_score": wp(scores=(1, "many")),
    "nan_score": wp(scores=(1, float("nan"))),
    "non_string_text": wp(texts=("fine", 42)),
    "not_a_list": wp() | {"comment_texts": "just one string"},
    "not_a_mapping": ["a", "list", "row"],
}


def test_bad_rows_of_every_kind_are_counted_and_reported(tmp_path):
    good = [wp(title=f"[WP] prompt {i}") for i in range(3)]
    rows = good[:1] + list(BAD_ROWS.values()) + good[1:]
    raw = [
        b"{not json",
        b'{"post_title": "\xff\xfe bad bytes"}',
        b'{"post_title": "[WP] x", "post_text": "",'
        b' "comment_texts": ["\\ud800 lone surrogate", "b"], "comment_scores": [1, 2]}',
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows, raw)
    responses, report = load_responses(path)
    expected = {reason: 1 for reason in BAD_ROWS} | {"invalid_json": 1, "invalid_utf8": 2}
    assert report.counts == expected
    assert report.rows_seen == len(rows) + len(raw)
    assert report.rows_kept == 3 and report.rows_skipped == sum(expected.values())
    assert len(responses) == 6
    # Every reason is in the printed summary and the saved report, with an example row index.
    text = report.summary()
    for reason in expected:
        assert reason in text
    report.save(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["counts"] == expected
    assert saved["examples"]["nan_score"].startswith("line 5:")  # 1-based line of the file


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_strict_mode_names_row_and_reason(tmp_path, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [wp(), wp(title="[WP] other"), BAD_ROWS[reason]])
    with pytest.raises(DataError, match=rf"line 3 is bad \({reason}\)"):
        load_responses(path, strict=True)


def test_strict_mode_on_undecodable_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [wp()], [b'{"a": "\xff"}'])
    with pytest.raises(DataError, match=r"line 2 is bad \(invalid_utf8\)"):
        load_responses(path, strict=True)


def test_published_cleaning():
    assert make_prompt("[WP] A dragon learns to knit", "") == "A dragon learns to knit"
    assert make_prompt("[ EU ]  Title", "Body text") == "Title\nBody text"
    assert make_prompt("No tag [here]", " ") == "No tag [here]"
    rows = [
        (
            0,
            wp(
                texts=(
                    "**Welcome to the Prompt!** rules...",
                    "[deleted]",
                    "[removed]",
                    "   ",
                    "Mods: this submission has been removed",
                    "**Off-Topic Discussion** here",
                    "a real story",
                    "a real story",
                    "another story",
                ),
                scores=(1, 2, 3, 4, 5, 6, 7, 8, 9),
            ),
        )
    ]
    from engine.data.loading import responses_from_rows

    responses, report = responses_from_rows(rows)
    assert [r.text for r in responses] == ["a real story", "another story"]
    assert [r.score for r in responses] == [7.0, 9.0]
    assert report.response_counts == {
        "moderator_response": 3,
        "deleted_response": 2,
        "empty_response": 1,
        "duplicate_response": 1,
    }
    pid = make_prompt_id("A dragon learns to knit")
    assert responses[0].prompt_id == pid and responses[0].response_id == make_response_id(pid, "a real story")


def test_synthetic_source_keeps_truth_in_meta():
    responses, report = load_responses("synthetic", synthetic_prompts=5, synthetic_seed=3)
    assert report.rows_seen == 5 and report.rows_skipped == 0 and responses
    assert {"theme", "style", "quality"} <= set(responses[0].meta)
    assert not responses[0].prompt.startswith("[WP]")


def test_all_file_formats_agree(tmp_path):
    rows = [wp(title=f"[WP] prompt {i}", texts=(f"a{i}", f"b{i}"), scores=(i, i + 1)) for i in range(4)]
    ref, _ = load_responses(write_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pandas as pd
    from datasets import Dataset

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for src in ("d.json", "d.parquet", "ds"):
        got, report = load_responses(str(tmp_path / src))
        assert [r.response_id for r in got] == [r.response_id for r in ref], src
        assert [r.score for r in got] == [r.score for r in ref], src
        assert report.rows_skipped == 0


def test_unreadable_sources_fail_with_advice(tmp_path):
    with pytest.raises(DataError, match="neither an existing file"):
        load_responses(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        load_responses(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="save_to_disk"):
        load_responses("nobody/no-such-dataset-offline")


def test_pair_form_plain_and_conversational(tmp_path):
    rows = [
        {
            "prompt": "Write about rain",
            "chosen": "Rain fell.",
            "rejected": "It was wet.",
            "score_chosen": 8,
            "score_rejected": 2,
        },
        {
            "prompt": [{"role": "user", "content": "Write about snow"}],
            "chosen": [{"role": "assistant", "content": "Snow fell."}],
            "rejected": [{"role": "assistant", "content": "Cold."}],
        },
        {
            "chosen": [{"role": "user", "content": "Write about fog"}, {"role": "assistant", "content": "Fog rolled."}],
            "rejected": [{"role": "user", "content": "Write about fog"}, {"role": "assistant", "content": "Grey."}],
        },
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "x", "rejected": 3},
        {"prompt": "p", "chosen": "x", "rejected": "y", "score_chosen": float("inf")},
        {"chosen": "no prompt", "rejected": "at all"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, report = load_pairs(path)
    assert [p.prompt for p in pairs] == ["Write about rain", "Write about snow", "Write about fog"]
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("Rain fell.", "It was wet."),
        ("Snow fell.", "Cold."),
        ("Fog rolled.", "Grey."),
    ]
    assert (pairs[0].chosen_score, pairs[0].rejected_score) == (8.0, 2.0)
    assert (pairs[1].chosen_score, pairs[1].rejected_score) == (1.0, 0.0)
    assert report.counts == {"identical_pair": 1, "non_string_text": 1, "nan_score": 1, "missing_field": 1}
    loaded = load_any(path)
    assert loaded.kind == "pairs" and [p.pair_id for p in loaded.pairs] == [p.pair_id for p in pairs]
    assert load_any(write_jsonl(tmp_path / "w.jsonl", [wp()])).kind == "responses"


def test_nan_checks_cover_numpy_scores():
    import numpy as np

    from engine.data.loading import responses_from_rows

    _, report = responses_from_rows([(0, wp(scores=(np.float64(1.0), np.float64(math.nan))))])
    assert report.counts == {"nan_score": 1}


def test_load_any_detects_schema_after_bad_leading_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [], [b"{broken", b"[1, 2]"])
    with open(path, "a") as f:
        f.write(json.dumps(wp()) + "\n")
    loaded = load_any(path)
    assert loaded.kind == "responses" and len(loaded.responses) == 2
    assert loaded.report.counts == {"invalid_json": 1, "not_a_mapping": 1} and loaded.report.rows_seen == 3
    with pytest.raises(DataError, match="no row has"):
        load_any(write_jsonl(tmp_path / "e.jsonl", [{"foo": 1}]))
