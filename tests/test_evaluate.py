"""engine.evaluate: settings reaching generate, per-prompt scoring, reward model, human split, reports, CLI."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import evaluate as E
from engine import metrics as M
from engine.data.records import Response, make_prompt_id, make_response_id


@dataclass
class Cfg:
    """The EvalConfig fields evaluate reads (the real class is used by the CLI test)."""

    n_samples: int = 3
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_new_tokens: int = 6
    num_prompts: int = 4
    batch_size: int = 2
    seed: int = 0
    semantic_model: str = ""
    style_model: str = ""
    reward_model: str | None = None


class BagOfWords:
    """A deterministic test embedder: counts of hashed lowercase words, L2-normalised."""

    id = "test:bow"

    def encode(self, texts):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 16] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


@pytest.fixture(scope="module")
def tokenizer():
    from engine.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


PROMPTS = ["A dragon guards a library.", "The moon files a complaint about the night shift, again."]


# -------------------------------------------------------------------------------------------- sampling


def test_sampler_settings_reach_generate(tiny_lm, tokenizer, monkeypatch):
    seen = []
    original = tiny_lm.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(tiny_lm, "generate", spy)
    cfg = Cfg(n_samples=3, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3, max_new_tokens=5, batch_size=2)
    tokenizer.padding_side = "right"
    state = torch.random.get_rng_state()
    samples = E.sample(tiny_lm, tokenizer, PROMPTS, cfg, show_progress=False)

    assert len(seen) == 1  # two prompts, batch_size 2: one call
    kw = seen[0]
    assert kw["do_sample"] is True
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (0.7, 0.9, 20)
    assert (kw["repetition_penalty"], kw["max_new_tokens"], kw["num_return_sequences"]) == (1.3, 5, 3)
    assert kw["pad_token_id"] == tokenizer.pad_token_id and kw["eos_token_id"] == tokenizer.eos_token_id
    # Left padding: the shorter prompt's mask starts with zeros, every row ends with a real token.
    mask = kw["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]
    # The chat template with a generation prompt is what the model sees.
    first = tokenizer.decode(kw["input_ids"][1])
    assert first.startswith("<|bos|><|user|>") and first.endswith("<|assistant|>\n")

    assert [len(g) for g in samples] == [3, 3]
    for g in samples:
        for s in g:
            assert set(s) == {"text", "n_tokens", "truncated"}
            assert 0 <= s["n_tokens"] <= 5 and s["truncated"] == (s["n_tokens"] == 5)
    assert tokenizer.padding_side == "right"  # restored for the trainer
    assert torch.equal(torch.random.get_rng_state(), state)  # the trainer's RNG did not move

    again = E.sample(tiny_lm, tokenizer, PROMPTS, cfg, show_progress=False)
    assert again == samples  # seeded


def test_sampler_batches_prompts(tiny_lm, tokenizer, monkeypatch):
    calls = []
    original = tiny_lm.generate
    monkeypatch.setattr(tiny_lm, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw))
    samples = E.sample(
        tiny_lm, tokenizer, PROMPTS + ["A third one."], Cfg(n_samples=2, batch_size=2), show_progress=False
    )
    assert calls == [2, 1] and [len(g) for g in samples] == [2, 2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampler_on_cuda_keeps_cuda_rng(tiny_lm, tokenizer):
    import copy

    model = copy.deepcopy(tiny_lm).cuda()
    state = torch.cuda.get_rng_state()
    samples = E.sample(model, tokenizer, PROMPTS, Cfg(n_samples=2), show_progress=False)
    assert [len(g) for g in samples] == [2, 2]
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert samples == E.sample(model, tokenizer, PROMPTS, Cfg(n_samples=2), show_progress=False)


def test_published_defaults_from_evalconfig(tokenizer):
    from engine.config import EvalConfig

    kw = E.sampling_kwargs(EvalConfig(), tokenizer)
    assert kw["temperature"] == 1.0 and kw["top_p"] == 0.95 and kw["top_k"] == 50
    assert kw["repetition_penalty"] == 1.1 and kw["num_return_sequences"] == 4 and kw["do_sample"] is True


# -------------------------------------------------------------------------------------------- scoring


def test_score_samples_per_prompt_values():
    samples = [
        [{"text": "the cat sat"}, {"text": "the cat sat"}],  # identical: no diversity, fully homogeneous
        [{"text": "a b c"}, {"text": "a b d"}],
        [{"text": "lonely sample"}],  # one sample: homogenization undefined (NaN)
    ]
    res = E.score_samples(
        ["p0", "p1", "p2"], samples, semantic_embedder=BagOfWords(), style_embedder=None, show_progress=False
    )
    p0, p1, p2 = res.per_prompt
    assert p0["semantic_diversity"] == pytest.approx(0.0, abs=1e-6)
    assert p0["homogenization"] == pytest.approx(1.0)
    assert p1["ngram_diversity"] == pytest.approx(4 / 6 + 4 / 5 + 1 + 1)
    assert p1["homogenization"] == pytest.approx(2 / 3)
    assert p1["semantic_diversity"] > 0
    assert math.isnan(p2["homogenization"]) and p2["semantic_diversity"] == 0.0
    assert "style_diversity" not in p0  # no style embedder: metric left out
    # Averages skip the undefined value.
    assert res.summary["homogenization"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert res.summary["n_prompts"] == 3 and res.summary["n_samples_total"] == 5
    assert p0["prompt_id"] == make_prompt_id("p0")
    assert [g["sample_index"] for g in res.generations] == [0, 1, 0, 1, 0]


def test_synthetic_quality_and_shares():
    from engine.data.synthetic import STYLES, THEMES, generate_rows

    rows = generate_rows(3, seed=5)
    samples = [[{"text": t} for t in r["comment_texts"][:4]] for r in rows]
    res = E.score_samples([r["post_title"] for r in rows], samples, synthetic=True, show_progress=False)
    for row, pp in zip(rows, res.per_prompt):
        truth = row["truth"][:4]
        assert pp["quality_true"] == pytest.approx(np.mean([t["quality"] for t in truth]), abs=1e-6)
        assert pp["quality"] == pp["quality_true"]
        for theme in THEMES:
            assert pp["theme_share"][theme] == pytest.approx(sum(t["theme"] == theme for t in truth) / len(truth))
        assert 0.0 <= pp["theme_entropy"] <= 1.0 and 0.0 <= pp["style_entropy"] <= 1.0
    all_truth = [t for r in rows for t in r["truth"][:4]]
    for style in STYLES:
        assert res.summary["style_share"][style] == pytest.approx(
            sum(t["style"] == style for t in all_truth) / len(all_truth)
        )
    assert res.summary["theme_entropy_overall"] == pytest.approx(
        M.normalized_entropy([t["theme"] for t in all_truth], len(THEMES))
    )
    assert {g["theme"] for g in res.generations} <= set(THEMES) | {None}


def test_evaluate_model_writes_outputs(tiny_lm, tokenizer, tmp_path):
    res = E.evaluate_model(
        tiny_lm,
        tokenizer,
        PROMPTS,
        Cfg(n_samples=2),
        out_dir=tmp_path / "eval",
        synthetic=True,
        embedders={"semantic": BagOfWords(), "style": BagOfWords()},
        show_progress=False,
        model_name="tiny",
    )
    lines = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {json.loads(x)["prompt"] for x in lines} == set(PROMPTS)
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # strict JSON: no NaN
    assert set(doc) == {"summary", "per_prompt", "settings"}
    assert len(doc["per_prompt"]) == 2
    for key in (
        "semantic_diversity",
        "style_diversity",
        "ngram_diversity",
        "compression_ratio",
        "quality",
        "length_words_mean",
        "length_tokens_mean",
        "truncated_share",
        "theme_share",
    ):
        assert key in doc["summary"], key
    assert doc["settings"]["source"] == "model" and doc["settings"]["model"] == "tiny"
    assert doc["settings"]["generate_kwargs"]["num_return_sequences"] == 2
    assert doc["settings"]["semantic_model"] == "test:bow"
    assert res.files["metrics"] == tmp_path / "eval" / "metrics.json"


def test_metrics_json_writes_nan_as_null(tmp_path):
    res = E.score_samples(["p"], [[{"text": "only"}]], out_dir=tmp_path, show_progress=False)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["per_prompt"][0]["homogenization"] is None
    assert math.isnan(res.per_prompt[0]["homogenization"])


# ---------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_dir(tokenizer, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_scorer_matches_unbatched_forward(reward_dir):
    scorer = E.RewardScorer(str(reward_dir), batch_size=2)
    prompts = ["Write about rain.", "Write about rain.", "A dragon story"]
    responses = ["It rained.", "The rain fell on the quiet town for a very long time.", "Fire."]
    scores = scorer.score(prompts, responses)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # One sequence at a time (no padding) must give the same score as the padded batch.
    tok = scorer.tokenizer
    for p, r, s in zip(prompts, responses, scores):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        assert "<|assistant|>" in text  # scored through the reward tokenizer's chat template
        enc = tok([text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ref = scorer.model(**enc).logits[0, 0].item()
        assert s == pytest.approx(ref, abs=1e-5)
    assert len(set(np.round(scores, 6))) > 1
    with pytest.raises(ValueError, match="one prompt per response"):
        scorer.score(prompts, responses[:2])


def test_reward_model_from_config(reward_dir):
    samples = [[{"text": "It rained."}, {"text": "Fire and wings."}]]
    res = E.score_samples(["p"], samples, reward_scorer=E.RewardScorer(str(reward_dir)), show_progress=False)
    per_sample = [g["quality_reward"] for g in res.generations]
    assert res.per_prompt[0]["quality_reward"] == pytest.approx(np.mean(per_sample))
    assert res.summary["quality"] == res.summary["quality_reward"]  # not synthetic: quality is the reward
    assert res.settings["reward_model"] == str(reward_dir)
    _, scorer = E._embedders_and_reward(
        Cfg(reward_model=str(reward_dir)), "cpu", {"semantic": None, "style": None}, None
    )
    assert isinstance(scorer, E.RewardScorer)


# ----------------------------------------------------------------------------------------- human split


def _responses(prompt, scored_texts):
    pid = make_prompt_id(prompt)
    return [Response(pid, make_response_id(pid, t), prompt, t, s) for t, s in scored_texts]


def test_human_selection_and_evaluation(tmp_path):
    g = _responses("Write about the sea.", [("low", 1), ("high", 9), ("mid one", 5), ("mid two", 5), ("zero", 0)])
    top = E.select_human_samples(g, 3, how="top")
    assert top[0].text == "high" and {r.text for r in top[1:]} == {"mid one", "mid two"}
    rnd = E.select_human_samples(g, 3, how="random", seed=7)
    assert len(rnd) == 3 and rnd == E.select_human_samples(list(reversed(g)), 3, how="random", seed=7)
    with pytest.raises(ValueError, match="human selection"):
        E.select_human_samples(g, 2, how="best")

    g2 = _responses("Write about a robot.", [("beep boop", 3)])
    res = E.evaluate_human(
        [g, g2],
        Cfg(n_samples=2),
        out_dir=tmp_path,
        embedders={"semantic": BagOfWords(), "style": None},
        device="cpu",
        show_progress=False,
    )
    assert res.settings["source"] == "human" and res.settings["human_selection"] == "top"
    assert [len([x for x in res.generations if x["prompt_id"] == p["prompt_id"]]) for p in res.per_prompt] == [2, 1]
    assert res.generations[0]["text"] == "high" and res.generations[0]["score"] == 9.0
    assert (tmp_path / "metrics.json").is_file()


# -------------------------------------------------------------------------------------------- compare


def _write_metrics(path: Path, quality, sem, source="model", extra=None):
    path.mkdir(parents=True, exist_ok=True)
    summary = {
        "quality": quality,
        "semantic_diversity": sem,
        "ngram_diversity": 3.0,
        "compression_ratio": 2.0,
        "homogenization": 0.3,
        "n_prompts": 8,
    }
    summary.update(extra or {})
    (path / "metrics.json").write_text(
        json.dumps({"summary": summary, "per_prompt": [], "settings": {"source": source}})
    )


def test_compare_writes_table_and_plot(tmp_path):
    _write_metrics(tmp_path / "runs" / "dpo" / "eval", 0.6, 0.20)
    _write_metrics(tmp_path / "runs" / "ddpo" / "eval" / "seed-0", 0.55, 0.30)
    _write_metrics(tmp_path / "runs" / "ddpo" / "eval" / "seed-1", 0.65, 0.34)
    _write_metrics(tmp_path / "human_eval", 0.5, 0.40, source="human")
    _write_metrics(tmp_path / "noquality" / "eval", None, 0.1)
    out = tmp_path / "report"
    files = E.main(
        [
            "compare",
            str(tmp_path / "runs" / "dpo"),
            str(tmp_path / "runs" / "ddpo"),
            str(tmp_path / "human_eval" / "metrics.json"),
            str(tmp_path / "noquality"),
            "--out",
            str(out),
        ]
    )
    md = (out / "comparison.md").read_text()
    assert files["markdown"] == out / "comparison.md"
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | source | seeds | prompts | quality |")
    assert "| dpo | model | 1 | 8 | 0.6000 |" in md
    # two seeds: mean +- sample std (ddof 1) of (0.55, 0.65) = 0.6 +- 0.0707, the experiment's definition too
    assert "| ddpo | model | 2 | 8 | 0.6000 +- 0.0707 | 0.3200 +- 0.0283 |" in md
    assert "| human_eval | human |" in md
    assert "Not in the plot (no quality or no semantic diversity): noquality." in md
    png = (out / "quality_vs_diversity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _write_per_prompt(path: Path, rows: list[dict]):
    path.mkdir(parents=True, exist_ok=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("quality", "semantic_diversity")}
    (path / "metrics.json").write_text(json.dumps({"summary": summary, "per_prompt": rows, "settings": {}}))


def test_compare_baseline_paired_differences(tmp_path):
    # Two seeds x 40 prompts; "new" = "base" + 0.05 semantic diversity on every prompt, quality unchanged,
    # and all of its samples on theme a (base: half a, half b): pooled theme entropy 1 -> 0.
    rng = np.random.default_rng(0)
    for seed in ("seed0", "seed1"):
        for i in range(40):
            q, sem = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.6)
            base = {
                "prompt_id": f"{seed}-{i}",
                "quality": q,
                "semantic_diversity": sem,
                "theme_share": {"a": 0.5, "b": 0.5, "none": 0.0},
            }
            new = {**base, "semantic_diversity": sem + 0.05, "theme_share": {"a": 1.0, "b": 0.0, "none": 0.0}}
            for name, row in (("base", base), ("new", new)):
                rows_path = tmp_path / name / "eval" / seed
                existing = (
                    json.loads((rows_path / "metrics.json").read_text())["per_prompt"]
                    if (rows_path / "metrics.json").is_file()
                    else []
                )
                _write_per_prompt(rows_path, existing + [row])
    # An extra prompt only the new run has is left out of the pairing and counted.
    extra = json.loads((tmp_path / "new" / "eval" / "seed1" / "metrics.json").read_text())["per_prompt"]
    _write_per_prompt(tmp_path / "new" / "eval" / "seed1", extra + [{**extra[0], "prompt_id": "only-new"}])
    out = tmp_path / "report"
    E.main(
        [
            "compare",
            str(tmp_path / "base"),
            str(tmp_path / "new"),
            "--out",
            str(out),
            "--baseline",
            "base",
            "--n-boot",
            "300",
        ]
    )
    md = (out / "comparison.md").read_text()
    assert "## Paired differences from base" in md
    row = next(line for line in md.splitlines() if line.startswith("| new | 40+40 (1 unpaired)"))
    assert "+0.0500 [95% CI +0.0500, +0.0500] *" in row  # the same shift on every prompt: no spread
    assert "+0.0000 [95% CI" in row  # quality
    runs = [E.summarize_run(tmp_path / n) for n in ("base", "new")]
    d = E.paired_differences(runs[1], runs[0], n_boot=200)
    assert d["intervals"]["theme_entropy_overall"].estimate == pytest.approx(-1.0)
    assert d["intervals"]["theme_entropy_overall"].verdict() == "a loss"
    with pytest.raises(ValueError, match="--baseline 'nope' is not one of"):
        E.compare_runs([tmp_path / "base"], out, baseline="nope")


def test_compare_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json for run"):
        E.compare_runs([tmp_path / "missing"], tmp_path)
    _write_metrics(tmp_path / "a", 0.1, 0.1)
    with pytest.raises(ValueError, match="one label per run"):
        E.compare_runs([tmp_path / "a"], tmp_path, labels=["x", "y"])
    assert E.run_label(tmp_path / "runs" / "x" / "eval" / "metrics.json") == "x"


def test_default_out_dir(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    assert E.default_out_dir(str(tmp_path / "run" / "final"), False) == tmp_path / "run" / "eval"
    assert E.default_out_dir("org/model", False) == Path("eval") / "org__model"
    assert E.default_out_dir(None, True) == Path("eval") / "human"


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_samples_a_named_model_on_synthetic_prompts(tmp_path):
    out = tmp_path / "eval"
    res = E.main(
        [
            "--model",
            "llama-tiny",
            "--prompts",
            "synthetic",
            "--n",
            "2",
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--semantic-model",
            "",
            "--style-model",
            "",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["summary"]["n_prompts"] == 3 and doc["summary"]["n_samples_total"] == 6
    assert doc["settings"]["synthetic"] is True and doc["settings"]["model"] == "llama-tiny"
    assert doc["settings"]["generate_kwargs"] == {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "max_new_tokens": 4,
        "num_return_sequences": 2,
    }
    assert "quality_true" in doc["summary"] and "semantic_diversity" not in doc["summary"]
    assert len((out / "generations.jsonl").read_text().splitlines()) == 6
    # The evaluated prompts are held out from training: the val split of the same data and seed.
    from engine.data.loading import load_responses
    from engine.data.pairs import split_by_prompt

    _, val = split_by_prompt(load_responses("synthetic")[0], 0.1, 0)
    assert {p["prompt_id"] for p in res.per_prompt} <= {r.prompt_id for r in val}


def test_cli_human_reference_with_builtin_embedders(tmp_path):
    out = tmp_path / "human"
    res = E.main(
        [
            "--human",
            "--prompts",
            "synthetic",
            "--num-prompts",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    s = res.summary
    assert res.settings["source"] == "human" and s["n_prompts"] == 2 and s["n_samples_total"] == 8
    assert 0.0 < s["semantic_diversity"] < 2.0 and 0.0 < s["style_diversity"] < 2.0
    assert res.settings["semantic_model"] and res.settings["style_model"]
    # Ground truth of the synthetic generator: the top-4 human responses' recorded quality.
    for pp in res.per_prompt:
        gens = [g for g in res.generations if g["prompt_id"] == pp["prompt_id"]]
        assert pp["quality_true"] == pytest.approx(np.mean([g["quality_true"] for g in gens]))
    assert (out / "metrics.json").is_file()
