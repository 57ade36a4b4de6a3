"""Loading and cleaning: raw rows (WritingPrompts schema or ready-made pairs) -> `Response`s / `Pair`s.

First step of the data flow (DESIGN.md): rows come from jsonl/json/parquet files, a
`datasets.save_to_disk` directory, a hub dataset name, or the bundled synthetic generator; every
row is validated, cleaned (`data.cleaning`), and turned into records with content-derived ids.

Bad input never crashes a run and is never dropped silently: each skipped row is counted under a
reason in a `LoadReport` (printed and saved); with `strict=True` the first bad row raises a
`DataError` naming its line (jsonl) or 1-based row and the reason instead.

Cleaning, `cleaning="authors"` (scripts_dataset_cleaner/0_data_prep_scoring.py:21-30,
1_data_prep_filtering.py:57-79, 2_data_prep_to_preference.py:51):
- the title loses its first `^\\[.*?\\]` (a bracket group at the very start, any length) and is then
  stripped; a title without one is kept as is; prompt = title + "\\n" + post text, even when empty;
- responses containing moderator boilerplate are dropped, nothing else.
`cleaning="engine"`:
- the title loses every leading bracket tag (`[WP]`, `[Writing Prompt]`, stacked `[WP] [EU]`: all
  meta-data of the subreddit, not part of the prompt); prompt = title + "\\n" + post text, or just the
  title when the post text is empty;
- responses containing moderator boilerplate, `[deleted]`/`[removed]` and empty texts are dropped.
Both: dropped responses are counted per reason in `LoadReport.response_counts`; a response repeated
verbatim under the same prompt is kept once (ids are content hashes: DESIGN.md, "Identities"), which
the authors' lists do not do; the token-length limit needs the tokenizer and is applied later
(`tokenize.filter_long_responses`).
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.records import Pair, Response, make_pair_id, make_prompt_id, make_response_id
from engine.fileio import atomic_write

WP_REQUIRED = ("post_title", "post_text", "comment_texts", "comment_scores")
PAIR_REQUIRED = ("chosen", "rejected")

# Published cleaning: responses containing any of these are moderator/bot boilerplate.
BOILERPLATE_MARKERS = ("**Welcome to the Prompt!**", "this submission has been removed", "**Off-Topic Discussion**")
DELETED_TEXTS = frozenset({"[deleted]", "[removed]"})
_AUTHORS_TAG_RE = re.compile(r"^\[.*?\]")  # scripts_dataset_cleaner/0_data_prep_scoring.py:23
_LEADING_TAGS_RE = re.compile(r"^\s*(?:\[[^\]\n]*\]\s*)+")

# Row-level reasons (the whole row is skipped).
BAD_ROW_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "not_a_mapping",
    "missing_field",
    "non_string_text",
    "not_a_list",
    "length_mismatch",
    "non_numeric_score",
    "nan_score",
    "identical_pair",
    "empty_prompt",
)


# Where a row came from, as users count: "line 3" (physical 1-based line of a jsonl file, blank lines
# included, so an editor's go-to-line finds it), or a 1-based record number for other sources.
RowRef = int | str


def row_label(where: RowRef) -> str:
    return f"row {where}" if isinstance(where, int) else where


class DataError(ValueError):
    """Bad input in strict mode (or an unreadable source); the message names the row and the reason."""


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class LoadReport:
    """What happened to every input row: kept, or skipped under a reason."""

    source: str = ""
    rows_seen: int = 0
    rows_kept: int = 0
    responses_kept: int = 0
    pairs_kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # bad rows per reason
    response_counts: dict[str, int] = field(default_factory=dict)  # dropped responses per reason
    examples: dict[str, str] = field(default_factory=dict)  # first occurrence of each reason, for the report

    def bad(self, reason: str, where: RowRef, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, f"{row_label(where)}: {detail}")

    def drop_response(self, reason: str, n: int = 1) -> None:
        if n:
            self.response_counts[reason] = self.response_counts.get(reason, 0) + n

    @property
    def rows_skipped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_seen": self.rows_seen,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "responses_kept": self.responses_kept,
            "pairs_kept": self.pairs_kept,
            "counts": dict(sorted(self.counts.items())),
            "response_counts": dict(sorted(self.response_counts.items())),
            "examples": dict(sorted(self.examples.items())),
        }

    def summary(self) -> str:
        kept = (
            f"{self.responses_kept} responses"
            if self.responses_kept or not self.pairs_kept
            else f"{self.pairs_kept} pairs"
        )
        lines = [
            f"data {self.source}: {self.rows_seen} rows read, {self.rows_kept} kept ({kept}), "
            f"{self.rows_skipped} skipped"
        ]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  skipped row  {reason:<20} {n:>8}   e.g. {self.examples.get(reason, '')[:120]}")
        for reason, n in sorted(self.response_counts.items()):
            lines.append(f"  dropped resp {reason:<20} {n:>8}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2))


# ------------------------------------------------------------------------------------ raw rows


def _iter_jsonl(path: Path) -> Iterator[tuple[RowRef, Any]]:
    """("line N", parsed row or _BadRow) per non-empty line; decoded per line, so one bad line costs one row."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _BadRow("invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line)")
            else:
                try:
                    yield where, json.loads(text)
                except json.JSONDecodeError as e:
                    # colno counts characters from 1, as editors show columns.
                    yield where, _BadRow("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}")


def _columns_to_rows(data: dict) -> list[dict]:
    keys = list(data)
    n = len(data[keys[0]]) if keys else 0
    return [{k: data[k][i] for k in keys} for i in range(n)]


def _iter_json(path: Path) -> Iterator[tuple[RowRef, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot parse the JSON file ({e}); for one row per line use a .jsonl file") from None
    if isinstance(data, dict):
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif data and all(isinstance(v, list) for v in data.values()):
            data = _columns_to_rows(data)
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _iter_parquet(path: Path) -> Iterator[tuple[RowRef, Any]]:
    import pyarrow.parquet as pq

    rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=4096) for row in batch.to_pylist())
    yield from enumerate(rows, start=1)


def _iter_dataset(ds) -> Iterator[tuple[RowRef, Any]]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from enumerate(ds, start=1)


def iter_rows(
    source: str, *, synthetic_prompts: int = 240, synthetic_seed: int = 0, synthetic_lengths: str = "short"
) -> Iterator[tuple[RowRef, Any]]:
    """(where, row) from any supported source (see RowRef); unreadable lines come as `_BadRow` values."""
    if source == "synthetic":
        from engine.data.synthetic import generate_rows

        yield from enumerate(generate_rows(synthetic_prompts, synthetic_seed, lengths=synthetic_lengths), start=1)
        return
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        files = sorted(p for ext in ("*.jsonl", "*.parquet", "*.json") for p in path.glob(ext))
        if any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            yield from _iter_dataset(load_from_disk(str(path)))
            return
        if not files:
            raise DataError(f"{path} is a directory without a datasets.save_to_disk layout or jsonl/json/parquet files")
        for f in files:
            for where, row in iter_rows(str(f)):
                yield f"{f.name} {row_label(where)}", row
        return
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix == ".parquet":
            yield from _iter_parquet(path)
        else:
            raise DataError(
                f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or a datasets directory"
            )
        return
    if "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
        from datasets import load_dataset

        try:
            ds = load_dataset(source, split="train")
        except Exception as e:  # offline machines, missing datasets: say what to do instead
            raise DataError(
                f"{source!r} is no local file or directory, and loading it as a hub dataset failed "
                f"({type(e).__name__}: {e}); without hub access save it with "
                "datasets.save_to_disk or export jsonl/parquet elsewhere and pass the path, or use data.source "
                "synthetic"
            ) from None
        yield from _iter_dataset(ds)
        return
    raise DataError(
        f"data source {source!r} is neither an existing file/directory, a hub name (owner/name), nor 'synthetic'"
    )


# ---------------------------------------------------------------------------------- validation


def _check_text(value: Any, what: str, *, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise _BadRow("non_string_text", f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # Lone surrogates survive JSON "\\ud800" escapes and pandas; they cannot be tokenised or saved.
        raise _BadRow("invalid_utf8", f"{what} is not valid UTF-8 ({e.reason} at {e.start})") from None
    return value


def _check_score(value: Any, what: str) -> float:
    # numbers.Real also admits numpy scalars (pandas/parquet); bools are not upvote counts.
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise _BadRow("non_numeric_score", f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _BadRow("nan_score", f"{what} is {value}")
    return value


def clean_title(title: str, cleaning: str = "engine") -> str:
    """The title without its bracket tag(s); see the module docstring for the two cleanings."""
    if cleaning == "authors":
        found = _AUTHORS_TAG_RE.match(title)
        return title[found.end() :].strip() if found else title
    return _LEADING_TAGS_RE.sub("", title, count=1).strip()


def make_prompt(title: str, text: str, cleaning: str = "engine") -> str:
    if cleaning == "authors":
        return f"{clean_title(title, cleaning)}\n{text or ''}"
    title, text = clean_title(title, cleaning), (text or "").strip()
    return f"{title}\n{text}" if text else title


def response_drop_reason(text: str, cleaning: str = "engine") -> str | None:
    """Why a response is dropped by the cleaning, or None to keep it."""
    if any(m in text for m in BOILERPLATE_MARKERS):
        return "moderator_response"
    if cleaning == "authors":
        return None
    stripped = text.strip()
    if not stripped:
        return "empty_response"
    if stripped in DELETED_TEXTS:
        return "deleted_response"
    return None


def _wp_row(row: Any, cleaning: str) -> tuple[str, list[str], list[float], list[dict]]:
    """Validate one WritingPrompts-schema row: (prompt, texts, scores, metas) or raise _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow("not_a_mapping", f"row must be a mapping of fields, got {type(row).__name__}")
    missing = [k for k in WP_REQUIRED if k not in row]
    if missing:
        raise _BadRow("missing_field", f"missing field(s) {missing}")
    title = _check_text(row["post_title"], "post_title")
    text = _check_text(row["post_text"], "post_text", allow_none=True)
    texts, scores = row["comment_texts"], row["comment_scores"]
    times = row.get("comment_times")
    truth = row.get("truth")
    for name, v in (("comment_texts", texts), ("comment_scores", scores)):
        if not isinstance(v, (list, tuple)):
            raise _BadRow("not_a_list", f"{name} must be a list, got {type(v).__name__}")
    if len(texts) != len(scores):
        raise _BadRow("length_mismatch", f"{len(texts)} comment_texts but {len(scores)} comment_scores")
    if times is not None and (not isinstance(times, (list, tuple)) or len(times) != len(texts)):
        got = len(times) if isinstance(times, (list, tuple)) else type(times).__name__
        raise _BadRow("length_mismatch", f"{len(texts)} comment_texts but comment_times is {got}")
    texts = [_check_text(t, f"comment_texts[{i}]") for i, t in enumerate(texts)]
    scores = [_check_score(s, f"comment_scores[{i}]") for i, s in enumerate(scores)]
    metas: list[dict] = [{} for _ in texts]
    if isinstance(truth, (list, tuple)) and len(truth) == len(texts):
        metas = [dict(t) if isinstance(t, dict) else {} for t in truth]
    if times is not None:
        for m, t in zip(metas, times):
            m.setdefault("time", t)
    prompt = make_prompt(title, text, cleaning)
    if not prompt.strip():
        raise _BadRow("empty_prompt", "post_title is empty after cleaning")
    return prompt, texts, scores, metas


def _message_content(messages: Any, role: str, what: str) -> str:
    """Content of the last message with `role` in a TRL conversational list."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise _BadRow("non_string_text", f"{what} must be a string or a list of {{role, content}} messages")
    for m in reversed(messages):
        if m.get("role") == role:
            return _check_text(m.get("content"), f"{what} {role} content")
    raise _BadRow("missing_field", f"{what} has no {role!r} message")


def _pair_row(row: Any) -> Pair:
    """Validate one pair-form row (plain strings or TRL conversational lists) into a Pair."""
    if not isinstance(row, dict):
        raise _BadRow("not_a_mapping", f"row must be a mapping of fields, got {type(row).__name__}")
    missing = [k for k in PAIR_REQUIRED if k not in row]
    if "prompt" not in row and not isinstance(row.get("chosen"), (list, tuple)):
        missing.append("prompt")  # only conversational rows may carry the prompt inside chosen
    if missing:
        raise _BadRow("missing_field", f"missing field(s) {missing}")
    sides = {}
    for side in ("chosen", "rejected"):
        v = row[side]
        sides[side] = _check_text(v, side) if isinstance(v, str) else _message_content(v, "assistant", side)
    p = row.get("prompt")
    if p is None:
        prompt = _message_content(row["chosen"], "user", "chosen")
    elif isinstance(p, str):
        prompt = _check_text(p, "prompt")
    else:
        prompt = _message_content(p, "user", "prompt")
    prompt = prompt.strip()
    if not prompt:
        raise _BadRow("empty_prompt", "prompt is empty")
    if sides["chosen"] == sides["rejected"]:
        raise _BadRow("identical_pair", "chosen and rejected are the same text")
    # Pair data without upvotes: chosen 1, rejected 0 keeps "chosen has the higher score" true.
    sc = _check_score(row["score_chosen"], "score_chosen") if row.get("score_chosen") is not None else 1.0
    sr = _check_score(row["score_rejected"], "score_rejected") if row.get("score_rejected") is not None else 0.0
    pid = make_prompt_id(prompt)
    cid, rid = make_response_id(pid, sides["chosen"]), make_response_id(pid, sides["rejected"])
    return Pair(
        pair_id=make_pair_id(cid, rid),
        prompt_id=pid,
        prompt=prompt,
        chosen=sides["chosen"],
        rejected=sides["rejected"],
        chosen_id=cid,
        rejected_id=rid,
        chosen_score=sc,
        rejected_score=sr,
    )


def _fail_or_count(report: LoadReport, strict: bool, where: RowRef, bad: _BadRow, strict_off: str) -> None:
    if strict:
        raise DataError(
            f"{report.source}: {row_label(where)} is bad ({bad.reason}): {bad.detail}; fix the row, or {strict_off} "
            f"to skip and count bad rows"
        )
    report.bad(bad.reason, where, bad.detail)


# How a training run turns strict mode off; CLIs with their own switch pass theirs.
STRICT_OFF = "run with --data.strict false"


def _parsed_rows(rows, parse, report: LoadReport, strict: bool, strict_off: str):
    """(where, parse(row)) for each row that parses; a bad row raises under strict, else is counted in
    `report` by its reason and skipped."""
    for where, row in rows:
        report.rows_seen += 1
        try:
            if isinstance(row, _BadRow):
                raise row
            parsed = parse(row)
        except _BadRow as bad:
            _fail_or_count(report, strict, where, bad, strict_off)
            continue
        report.rows_kept += 1
        yield where, parsed


def responses_from_rows(
    rows, *, strict: bool = False, source: str = "<rows>", cleaning: str = "engine", strict_off: str = STRICT_OFF
) -> tuple[list[Response], LoadReport]:
    """Validate and clean (where, row) pairs of the WritingPrompts schema into responses."""
    if cleaning not in ("authors", "engine"):
        raise ValueError(f"cleaning must be 'authors' or 'engine', got {cleaning!r}")
    report = LoadReport(source=source)
    out: list[Response] = []
    seen: set[str] = set()
    parse = lambda row: _wp_row(row, cleaning)
    for where, (prompt, texts, scores, metas) in _parsed_rows(rows, parse, report, strict, strict_off):
        pid = make_prompt_id(prompt)
        for j, (text, score, meta) in enumerate(zip(texts, scores, metas)):
            reason = response_drop_reason(text, cleaning)
            if reason:
                report.drop_response(reason)
                continue
            rid = make_response_id(pid, text)
            if rid in seen:
                report.drop_response("duplicate_response")
                continue
            seen.add(rid)
            out.append(
                Response(
                    prompt_id=pid,
                    response_id=rid,
                    prompt=prompt,
                    text=text,
                    score=score,
                    meta={"row": where, "index": j, **meta},
                )
            )
    report.responses_kept = len(out)
    return out, report


def pairs_from_rows(
    rows, *, strict: bool = False, source: str = "<rows>", strict_off: str = STRICT_OFF
) -> tuple[list[Pair], LoadReport]:
    """Validate (where, row) pairs of ready-made pair data into Pairs (duplicates kept once)."""
    report = LoadReport(source=source)
    out: list[Pair] = []
    seen: set[str] = set()
    for _, pair in _parsed_rows(rows, _pair_row, report, strict, strict_off):
        if pair.pair_id in seen:
            report.drop_response("duplicate_pair")
            continue
        seen.add(pair.pair_id)
        out.append(pair)
    report.pairs_kept = len(out)
    return out, report


def load_responses(
    source: str, *, strict: bool = False, cleaning: str = "engine", strict_off: str = STRICT_OFF, **synthetic
):
    """(responses, LoadReport) from a WritingPrompts-schema source ("synthetic" = bundled generator;
    `synthetic`: its settings as iter_rows takes them)."""
    rows = iter_rows(source, **synthetic)
    return responses_from_rows(rows, strict=strict, source=source, cleaning=cleaning, strict_off=strict_off)


def load_pairs(source: str, *, strict: bool = False):
    """(pairs, LoadReport) from ready-made pair data (`prompt`, `chosen`, `rejected`, optional scores)."""
    return pairs_from_rows(iter_rows(source), strict=strict, source=source)


@dataclass
class LoadedData:
    """What `load_any` found: `kind` is "responses" (WP schema) or "pairs"; the other list is empty."""

    kind: str
    responses: list[Response]
    pairs: list[Pair]
    report: LoadReport


def detect_schema(row: Any) -> str | None:
    if isinstance(row, dict):
        if "comment_texts" in row or "comment_scores" in row:
            return "responses"
        if "chosen" in row or "rejected" in row:
            return "pairs"
    return None


def load_any(source: str, *, strict: bool = False, cleaning: str = "engine", **synthetic) -> LoadedData:
    """Load a source of either schema, detected from its first row that has either schema's fields
    (`synthetic`: the bundled generator's settings as iter_rows takes them)."""
    rows = iter_rows(source, **synthetic)
    head: list = []  # rows read while detecting: only the unreadable ones before the first good row
    kind = None
    for item in rows:
        head.append(item)
        if (kind := detect_schema(item[1])) is not None:
            break
    if kind is None:
        raise DataError(
            f"{source}: no row has the WritingPrompts fields ({', '.join(WP_REQUIRED)}) or the pair fields "
            f"(prompt, {', '.join(PAIR_REQUIRED)}); check the file or the column names"
        )
    everything = itertools.chain(head, rows)
    if kind == "responses":
        responses, report = responses_from_rows(everything, strict=strict, source=source, cleaning=cleaning)
        return LoadedData("responses", responses, [], report)
    pairs, report = pairs_from_rows(everything, strict=strict, source=source)
    return LoadedData("pairs", [], pairs, report)
