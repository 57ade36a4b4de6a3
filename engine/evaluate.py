"""Sampling, quality and diversity evaluation, reports and the quality-vs-diversity plot.

The last step of a run: the trainer calls `evaluate_model` in-process on the trained model (written
to `runs/<name>/eval/`), and the CLI wraps the same function for any saved model, hub name or named
architecture. Each prompt gets `n_samples` samples drawn with the published settings (temperature
1.0, top-p 0.95, top-k 50, repetition penalty 1.1); the group of samples is scored with the
functions of `engine.metrics` (semantic and style diversity through the deviation pipeline's
embedders, n-gram diversity, compression ratio, homogenization; `eval.metrics_compat` chooses the
engine's definitions or the authors' values), plus quality from a reward model
and, on the bundled synthetic data, from the generator's ground truth. `--human` scores the human
responses of the same prompts instead of samples, the reference diversity of human writing.

    python -m engine.evaluate --model runs/ddpo/final --prompts synthetic [--n 4] [--out dir]
    python -m engine.evaluate --human --prompts data.jsonl --out runs/human/eval
    python -m engine.evaluate compare runs/dpo runs/ddpo runs/human --out reports/ [--baseline dpo]

Outputs of one evaluation: `generations.jsonl` (one line per sample, with its per-sample scores) and
`metrics.json` ({"summary": averages over prompts, "per_prompt": [...], "settings": {...}}; NaN is
written as null). `compare` writes `comparison.md` and `quality_vs_diversity.png`; its statistics
(mean +- sample std over seeds, paired bootstrap intervals against `--baseline`) and its plot come from
`engine.compare`, the implementation the method experiment reports with too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import metrics as M
from engine.config import CLEANINGS, METRICS_COMPATS, MODEL_DTYPES
from engine.fileio import atomic_write

# Columns of the comparison table, in order; those a run lacks are shown as "-".
REPORT_KEYS = (
    "quality",
    "quality_true",
    "quality_reward",
    *M.DIVERSITY_KEYS,
    "theme_entropy_overall",
    "style_entropy_overall",
    "length_words_mean",
    "truncated_share",
)
# Higher is more diverse for every key here except these two, where higher is more repetitive.
LOWER_IS_MORE_DIVERSE = ("compression_ratio", "homogenization")
HUMAN_SELECTIONS = ("top", "random")


@dataclass
class EvalResult:
    """What one evaluation produced: averages, per-prompt metrics, every sample, and the settings used."""

    summary: dict
    per_prompt: list[dict]
    generations: list[dict]
    settings: dict
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"summary": self.summary, "per_prompt": self.per_prompt, "settings": self.settings}


# ------------------------------------------------------------------------------------------ sampling


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.extend(source if isinstance(source, (list, tuple)) else [source])
    return sorted(set(int(i) for i in ids))


def sampling_kwargs(cfg, tokenizer, model=None) -> dict:
    """Every keyword `model.generate` receives: the sampling settings of `cfg` plus pad/eos ids.

    One dict, so that what reaches `generate` is exactly what is recorded in metrics.json.
    """
    kwargs = {
        "do_sample": True,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "top_k": int(cfg.top_k),
        "repetition_penalty": float(cfg.repetition_penalty),
        "max_new_tokens": int(cfg.max_new_tokens),
        "num_return_sequences": int(cfg.n_samples),
        "pad_token_id": tokenizer.pad_token_id,
    }
    eos = _eos_ids(model, tokenizer)
    if eos:
        kwargs["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return kwargs


def generation_inputs(tokenizer, prompts: Sequence[str]) -> list[str]:
    """The text each prompt is given to the model as: the chat template with a generation prompt.

    A tokenizer without a chat template (a base model) gets the prompt text followed by a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    return [p + "\n" for p in prompts]


def sample(model, tokenizer, prompts: Sequence[str], cfg, *, show_progress: bool = True) -> list[list[dict]]:
    """`cfg.n_samples` samples per prompt: [[{"text", "n_tokens", "truncated"}, ...] per prompt].

    Prompts go `cfg.batch_size` at a time through one left-padded `generate` call each, with
    `num_return_sequences` = n (HF returns a prompt's samples next to each other). Sampling is seeded
    with `cfg.seed` inside a forked RNG, so evaluating does not move the trainer's random state.
    `n_tokens` counts generated tokens up to the first end-of-sequence; `truncated` means none came
    before `max_new_tokens`.
    """
    import torch
    from tqdm.auto import tqdm

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before evaluating"
            )
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = sampling_kwargs(cfg, tokenizer, model)
    stop_ids = set(_eos_ids(model, tokenizer)) | {tokenizer.pad_token_id}
    device = next(model.parameters()).device
    n = int(cfg.n_samples)
    step = int(cfg.batch_size)
    texts = generation_inputs(tokenizer, prompts)
    out: list[list[dict]] = []
    old_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # generation continues from the last column, so pads go on the left
    model.eval()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(int(cfg.seed))
            batches = range(0, len(texts), step)
            for start in tqdm(batches, desc="sampling", unit="batch", disable=not show_progress):
                # The template already holds the special tokens it needs (e.g. bos).
                enc = tokenizer(
                    texts[start : start + step], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                enc.pop("token_type_ids", None)  # BERT-style tokenizers add it; causal LMs reject it
                seqs = model.generate(**enc, **kwargs)
                gen = seqs[:, enc["input_ids"].shape[1] :].tolist()
                if len(gen) != n * enc["input_ids"].shape[0]:
                    raise RuntimeError(
                        f"generate returned {len(gen)} sequences for {enc['input_ids'].shape[0]} prompts x {n} samples"
                    )
                for p in range(enc["input_ids"].shape[0]):
                    group = []
                    for ids in gen[p * n : (p + 1) * n]:
                        end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
                        kept = ids if end is None else ids[:end]
                        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                        group.append({"text": text, "n_tokens": len(kept), "truncated": end is None})
                    out.append(group)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ quality


class RewardScorer:
    """Quality from any HF sequence-classification model: one score per (prompt, response).

    The pair is rendered with the reward tokenizer's chat template (user = prompt, assistant =
    response) when it has one, else encoded as a text pair. Score: the logit when the head has one
    label (a reward model), else the softmax probability of the last label (the positive class).
    max_length None: the tokenizer's model_max_length (a reward model trained here records its training
    length there, so texts are cut where training cut them), 1024 when the tokenizer states none.
    """

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 8, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        stated = getattr(self.tokenizer, "model_max_length", None)
        # Tokenizers without a limit report a huge sentinel (int(1e30)).
        self.max_length = max_length or (int(stated) if stated and stated < 1_000_000 else 1024)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"reward tokenizer at {self.path} has no pad or eos token; add a pad token to it")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path).to(device).eval()
        if self.model.config.pad_token_id is None:
            # Sequence classifiers pool the last non-pad token; they need to know the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]):
        tok = self.tokenizer
        common = dict(return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        if getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
            return tok(texts, add_special_tokens=False, **common)
        return tok(list(prompts), list(responses), **common)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses; pass one prompt per response")
        out = []
        with torch.inference_mode():
            starts = range(0, len(responses), self.batch_size)
            for s in tqdm(starts, desc="reward", unit="batch", disable=not show_progress):
                enc = self._encode(prompts[s : s + self.batch_size], responses[s : s + self.batch_size]).to(self.device)
                logits = self.model(**enc).logits.float()
                if logits.shape[-1] == 1:
                    out.append(logits[:, 0])
                else:
                    out.append(torch.softmax(logits, dim=-1)[:, -1])
        return torch.cat(out).cpu().numpy().astype(np.float64) if out else np.zeros(0)


def _auto_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_embedder(name: str | None, device: str, batch_size: int = 64, trust_remote_code: bool = False):
    if not name:
        return None
    from engine.deviation import get_embedder

    return get_embedder(name, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------------ scoring


def _is_synthetic_meta(prompt_meta) -> bool:
    # The synthetic loader marks its records; a record carrying ground-truth labels is synthetic too.
    for meta in prompt_meta or ():
        if isinstance(meta, dict) and (meta.get("synthetic") or {"theme", "style", "quality"} <= set(meta)):
            return True
    return False


def score_samples(
    prompts: Sequence[str],
    samples: Sequence[Sequence[dict]],
    *,
    prompt_ids: Sequence[str] | None = None,
    synthetic: bool = False,
    semantic_embedder=None,
    style_embedder=None,
    reward_scorer: RewardScorer | None = None,
    settings: dict | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    metrics_compat: str = "engine",
) -> EvalResult:
    """Score groups of samples (from a model or from people) and write the outputs.

    samples[i] holds prompt i's samples as dicts with at least "text" (model samples also carry
    "n_tokens"/"truncated", human ones "response_id"/"score"). Embedders are the objects of
    `engine.deviation.get_embedder`; a missing one leaves its metric out. Quality: `quality_reward`
    (reward model) and, when `synthetic`, `quality_true` (the generator's ground truth) plus theme/style
    shares and entropies; `quality` is the ground truth on synthetic data, else the reward.
    metrics_compat: the definitions of the diversity metrics (`engine.metrics`, eval.metrics_compat).
    """
    from engine.data.records import make_prompt_id

    if len(prompts) != len(samples):
        raise ValueError(f"got {len(prompts)} prompts but {len(samples)} sample groups; pass one group per prompt")
    if prompt_ids is None:
        prompt_ids = [make_prompt_id(p) for p in prompts]
    groups = [[s["text"] for s in group] for group in samples]
    flat = [t for g in groups for t in g]
    bounds = np.cumsum([0] + [len(g) for g in groups])

    # Embed every sample at once (full batches), then slice per prompt.
    embedded = {}
    for key, embedder in (("semantic_diversity", semantic_embedder), ("style_diversity", style_embedder)):
        if embedder is not None:
            emb = np.asarray(embedder.encode(flat)) if flat else np.zeros((0, 1), dtype=np.float32)
            if emb.shape[0] != len(flat):
                raise RuntimeError(f"embedder {embedder.id} returned {emb.shape[0]} rows for {len(flat)} texts")
            embedded[key] = emb

    reward = None
    if reward_scorer is not None:
        owners = [prompts[i] for i, g in enumerate(groups) for _ in g]
        reward = reward_scorer.score(owners, flat, show_progress=show_progress)

    truths = None
    if synthetic:
        from engine.data.synthetic import STYLES, THEMES, classify

        truths = [classify(t) for t in flat]

    per_prompt, generations = [], []
    for i, (prompt, pid, group) in enumerate(zip(prompts, prompt_ids, samples)):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        texts = groups[i]
        row = {"prompt_id": pid, "prompt": prompt}
        row.update(M.text_metrics(texts, compat=metrics_compat))
        for key, emb in embedded.items():
            row[key] = M.embedding_diversity(emb[lo:hi], compat=metrics_compat)
        if any("n_tokens" in s for s in group):
            row["length_tokens_mean"] = float(np.mean([s.get("n_tokens", 0) for s in group])) if group else 0.0
            row["truncated_share"] = float(np.mean([bool(s.get("truncated")) for s in group])) if group else 0.0
        if reward is not None:
            row["quality_reward"] = float(np.mean(reward[lo:hi])) if hi > lo else float("nan")
        if truths is not None:
            t = truths[lo:hi]
            row["quality_true"] = float(np.mean([x.quality for x in t])) if t else float("nan")
            row["theme_share"] = M.label_shares([x.theme for x in t], THEMES)
            row["style_share"] = M.label_shares([x.style for x in t], STYLES)
            row["theme_entropy"] = M.normalized_entropy([x.theme for x in t], len(THEMES))
            row["style_entropy"] = M.normalized_entropy([x.style for x in t], len(STYLES))
        if "quality_true" in row or "quality_reward" in row:
            row["quality"] = row["quality_true"] if "quality_true" in row else row["quality_reward"]
        per_prompt.append(row)
        for j, s in enumerate(group):
            gen = {"prompt_id": pid, "prompt": prompt, "sample_index": j}
            gen.update(s)
            if reward is not None:
                gen["quality_reward"] = float(reward[lo + j])
            if truths is not None:
                x = truths[lo + j]
                gen.update(theme=x.theme, style=x.style, quality_true=x.quality)
            generations.append(gen)

    summary = M.mean_over_prompts(per_prompt)
    summary["n_prompts"] = len(per_prompt)
    summary["n_samples_total"] = len(flat)
    if truths is not None:
        # Over all samples: does the model cover every theme/style across prompts, not just within one?
        summary["theme_share"] = M.label_shares([x.theme for x in truths], THEMES)
        summary["style_share"] = M.label_shares([x.style for x in truths], STYLES)
        summary["theme_entropy_overall"] = M.normalized_entropy([x.theme for x in truths], len(THEMES))
        summary["style_entropy_overall"] = M.normalized_entropy([x.style for x in truths], len(STYLES))

    settings = dict(settings or {})
    settings.update(
        synthetic=bool(synthetic),
        semantic_model=getattr(semantic_embedder, "id", None),
        style_model=getattr(style_embedder, "id", None),
        reward_model=getattr(reward_scorer, "path", None),
        metrics_compat=metrics_compat,
    )
    result = EvalResult(summary=summary, per_prompt=per_prompt, generations=generations, settings=settings)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def _jsonable(x):
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_outputs(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write generations.jsonl and metrics.json under out_dir (created if needed)."""
    out = Path(out_dir)
    gen_path, met_path = out / "generations.jsonl", out / "metrics.json"
    atomic_write(gen_path, "".join(json.dumps(_jsonable(g), ensure_ascii=False) + "\n" for g in result.generations))
    atomic_write(met_path, json.dumps(_jsonable(result.to_dict()), indent=2, ensure_ascii=False))
    result.out_dir = out
    result.files = {"generations": gen_path, "metrics": met_path}
    return result.files


def _embedders_and_reward(cfg, device: str, embedders: dict | None, reward_scorer):
    """The embedders and reward scorer named by cfg, unless the caller passed its own."""
    embedders = dict(embedders) if embedders is not None else {}
    if "semantic" not in embedders:
        embedders["semantic"] = _load_embedder(
            getattr(cfg, "semantic_model", None), device, trust_remote_code=getattr(cfg, "trust_remote_code", False)
        )
    if "style" not in embedders:
        embedders["style"] = _load_embedder(
            getattr(cfg, "style_model", None), device, trust_remote_code=getattr(cfg, "trust_remote_code", False)
        )
    if reward_scorer is None and getattr(cfg, "reward_model", None):
        reward_scorer = RewardScorer(cfg.reward_model, device=device)
    return embedders, reward_scorer


def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[str],
    cfg,
    *,
    out_dir: str | Path | None = None,
    prompt_meta: Sequence[dict] | None = None,
    prompt_ids: Sequence[str] | None = None,
    synthetic: bool | None = None,
    embedders: dict | None = None,
    reward_scorer: RewardScorer | None = None,
    model_name: str | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Sample `cfg.n_samples` responses per prompt from an in-memory model and score them.

    cfg is an `engine.config.EvalConfig` (read by attribute). `synthetic` None means: detect from
    prompt_meta (records of the bundled generator). `embedders` ({"semantic": e, "style": e}, a None
    value drops that metric) and `reward_scorer` override what cfg names, e.g. to reuse loaded models.
    """
    device = next(model.parameters()).device.type  # embedders and reward model go where the model is
    if synthetic is None:
        synthetic = _is_synthetic_meta(prompt_meta)
    samples = sample(model, tokenizer, prompts, cfg, show_progress=show_progress)
    kwargs = sampling_kwargs(cfg, tokenizer, model)
    settings = {
        "source": "model",
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "n_samples": int(cfg.n_samples),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "generate_kwargs": {k: v for k, v in kwargs.items() if k not in ("pad_token_id", "eos_token_id")},
    }
    return _score_with(
        cfg,
        device,
        embedders,
        reward_scorer,
        prompts,
        samples,
        prompt_ids=prompt_ids,
        synthetic=synthetic,
        settings=settings,
        out_dir=out_dir,
        show_progress=show_progress,
    )


def _score_with(cfg, device, embedders, reward_scorer, prompts, samples, **kwargs) -> EvalResult:
    """score_samples with the embedders and reward model an EvalConfig names (built unless passed in)."""
    embedders, reward_scorer = _embedders_and_reward(cfg, device, embedders, reward_scorer)
    return score_samples(
        prompts,
        samples,
        semantic_embedder=embedders.get("semantic"),
        style_embedder=embedders.get("style"),
        reward_scorer=reward_scorer,
        metrics_compat=getattr(cfg, "metrics_compat", "engine"),
        **kwargs,
    )


def select_human_samples(responses: Sequence, n: int, *, how: str = "top", seed: int = 0) -> list:
    """Up to n human responses of one prompt.

    top: the n highest-scored (ties broken by response_id), the responses preference data calls
    "chosen", i.e. the writing a tuned model is pushed towards. random: n drawn without replacement
    with `seed` (the same draw for the same prompt whatever the file order).
    """
    if how not in HUMAN_SELECTIONS:
        raise ValueError(f"human selection must be one of {HUMAN_SELECTIONS}, got {how!r}")
    ordered = sorted(responses, key=lambda r: r.response_id)
    if how == "top":
        return sorted(ordered, key=lambda r: -float(r.score))[:n]
    import random

    key = ordered[0].prompt_id if ordered else ""
    rng = random.Random(f"{seed}:{key}")
    return rng.sample(ordered, min(n, len(ordered)))


def evaluate_human(
    groups: Sequence[Sequence],
    cfg,
    *,
    out_dir: str | Path | None = None,
    how: str = "top",
    synthetic: bool | None = None,
    embedders: dict | None = None,
    reward_scorer: RewardScorer | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> EvalResult:
    """Score the human responses of each prompt group (lists of `Response`) like model samples."""
    device = _auto_device(device)
    chosen = [select_human_samples(g, int(cfg.n_samples), how=how, seed=int(cfg.seed)) for g in groups]
    chosen = [c for c in chosen if c]
    if synthetic is None:
        synthetic = _is_synthetic_meta([r.meta for c in chosen for r in c])
    samples = [[{"text": r.text, "response_id": r.response_id, "score": float(r.score)} for r in c] for c in chosen]
    settings = {
        "source": "human",
        "model": "human",
        "n_samples": int(cfg.n_samples),
        "human_selection": how,
        "seed": int(cfg.seed),
    }
    return _score_with(
        cfg,
        device,
        embedders,
        reward_scorer,
        [c[0].prompt for c in chosen],
        samples,
        prompt_ids=[c[0].prompt_id for c in chosen],
        synthetic=synthetic,
        settings=settings,
        out_dir=out_dir,
        show_progress=show_progress,
    )


SPLITS = ("val", "train", "all")


def load_prompt_groups(
    source: str,
    num_prompts: int,
    *,
    split: str = "val",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    strict: bool = False,
    cleaning: str = "engine",
) -> list[list]:
    """Responses of the first `num_prompts` prompts of one split of a data source, grouped by prompt.

    split: "val" = the prompts training held out (engine.data.pairs.split_by_prompt with the same
    val_fraction, seed and data.cleaning as the data config), "train" = the others, "all" = every prompt. Within the
    split, prompts are ordered by prompt_id (a content hash), so the choice does not depend on file
    order and is a reproducible pseudo-random subset rather than the oldest posts.
    """
    from engine.data.loading import load_responses
    from engine.data.pairs import split_by_prompt

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    responses, _report = load_responses(source, strict=strict, cleaning=cleaning)
    if split != "all":
        train, val = split_by_prompt(responses, val_fraction, split_seed)
        responses = val if split == "val" else train
    by_prompt: dict[str, list] = {}
    for r in responses:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    if not by_prompt:
        raise ValueError(
            f"no usable responses in the {split!r} split of {source!r} (val_fraction={val_fraction}); check the "
            "data report, or pass --split all / a larger --val-fraction"
        )
    return [by_prompt[k] for k in sorted(by_prompt)[:num_prompts]]


# ------------------------------------------------------------------------------------------- compare


def find_metrics_files(path: str | Path) -> list[Path]:
    """The metrics.json files of one run: a file itself, <dir>/metrics.json, <dir>/eval/metrics.json, or
    one per seed in <dir>/eval/*/metrics.json (or <dir>/*/metrics.json)."""
    p = Path(path)
    if p.is_file():
        return [p]
    for candidate in (p / "metrics.json", p / "eval" / "metrics.json"):
        if candidate.is_file():
            return [candidate]
    seeds = sorted((p / "eval").glob("*/metrics.json")) or sorted(p.glob("*/metrics.json"))
    if seeds:
        return seeds
    raise FileNotFoundError(
        f"no metrics.json for run {str(path)!r}: looked for the file itself, metrics.json, eval/metrics.json and "
        "eval/*/metrics.json; run `python -m engine.evaluate --model ... --out <run>/eval` first"
    )


def run_label(path: str | Path) -> str:
    """A run's name from its path: runs/ddpo, runs/ddpo/eval and runs/ddpo/eval/metrics.json are all "ddpo"."""
    p = Path(path)
    if p.suffix == ".json":
        p = p.parent
    if p.name == "eval":
        p = p.parent
    return p.resolve().name if p.name in ("", ".") else p.name


def summarize_run(path: str | Path, label: str | None = None) -> dict:
    """A run's evaluations over its seeds: {"label", "source", "seeds", "mean", "std", "files", "seed_names",
    "per_prompt"}. mean/std: `engine.compare.seed_stats` (sample std, ddof 1) of every report metric;
    per_prompt: each seed's per-prompt rows, which paired differences resample."""
    from engine.compare import seed_stats

    files = find_metrics_files(path)
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            doc = json.load(fh)
        if "summary" not in doc:
            raise ValueError(f"{f} has no 'summary' section; is it a metrics.json written by engine.evaluate?")
        docs.append(doc)
    mean, std = {}, {}
    for k in list(REPORT_KEYS) + ["n_prompts"]:
        m, s, n = seed_stats([d["summary"].get(k) for d in docs if isinstance(d["summary"].get(k), (int, float))])
        if n:
            mean[k], std[k] = m, s
    sources = sorted({d.get("settings", {}).get("source", "model") for d in docs})
    return {
        "label": label or run_label(path),
        "source": "/".join(sources),
        "seeds": len(docs),
        "mean": mean,
        "std": std,
        "files": [str(f) for f in files],
        "seed_names": [_seed_name(f, path) for f in files],
        "per_prompt": [d.get("per_prompt") or [] for d in docs],
    }


def _seed_name(metrics_file: Path, run_path: str | Path) -> str:
    """The seed directory of a per-seed metrics.json (runs/x/eval/seed1/metrics.json -> seed1); "" for a single run."""
    parent = Path(metrics_file).parent
    return "" if parent.name == "eval" or parent == Path(run_path) else parent.name


def metric_layout(per_prompt_sets: Sequence[Sequence[dict]]):
    """The `engine.compare.MetricLayout` of the report metrics every given per-prompt row has."""
    from engine.compare import MetricLayout

    rows = [r for rows in per_prompt_sets for r in rows]
    pooled = ("theme_entropy_overall", "style_entropy_overall")
    scalars = tuple(
        k
        for k in REPORT_KEYS
        if k not in pooled
        and rows
        and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    )
    shares = []
    for name in ("theme", "style"):
        dicts = [r.get(f"{name}_share") for r in rows]
        if rows and all(isinstance(d, dict) for d in dicts):
            shares.append((name, tuple(k for k in dicts[0] if k != M.NONE_LABEL)))
    return MetricLayout(scalars, tuple(shares))


def paired_differences(run: dict, baseline: dict, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """run - baseline for every report metric both have, with a paired hierarchical bootstrap interval.

    Seeds pair by seed directory name when both runs have the same names, else by position; prompts
    pair by prompt_id within a seed (prompts only one run has are left out and counted). Returns
    {"intervals": {metric: engine.compare.Interval}, "prompts": paired prompts per seed, "unpaired": n}.
    """
    from engine.compare import hierarchical_bootstrap

    a_sets, b_sets = run["per_prompt"], baseline["per_prompt"]
    if sorted(run["seed_names"]) == sorted(baseline["seed_names"]) and len(set(run["seed_names"])) == len(a_sets):
        order = [baseline["seed_names"].index(n) for n in run["seed_names"]]
        b_sets = [b_sets[i] for i in order]
    elif len(a_sets) != len(b_sets):
        raise ValueError(
            f"cannot pair the seeds of {run['label']} ({len(a_sets)}) with those of {baseline['label']} "
            f"({len(b_sets)}); compare runs evaluated on the same seeds (same seed directory names)"
        )
    pairs, unpaired = [], 0
    for a_rows, b_rows in zip(a_sets, b_sets):
        a_by, b_by = {r["prompt_id"]: r for r in a_rows}, {r["prompt_id"]: r for r in b_rows}
        common = sorted(set(a_by) & set(b_by))
        unpaired += len(a_by) + len(b_by) - 2 * len(common)
        if common:
            pairs.append(([a_by[k] for k in common], [b_by[k] for k in common]))
    if not pairs:
        raise ValueError(
            f"{run['label']} and {baseline['label']} share no evaluated prompt (per-prompt rows with one prompt_id); "
            "evaluate both on the same prompts"
        )
    layout = metric_layout([rows for pair in pairs for rows in pair])
    names = [k for k in layout.metric_names if k in REPORT_KEYS]
    width = len(layout.columns)
    feats = [np.concatenate([layout.features(a), layout.features(b)], axis=1) for a, b in pairs]
    feats = [f[np.isfinite(f).all(axis=1)] for f in feats]

    def statistic(means):
        new, base = layout.metrics(means[..., :width]), layout.metrics(means[..., width:])
        return np.stack([(new[k] - base[k]).mean(axis=-1) for k in names], axis=-1)

    boot = hierarchical_bootstrap([f for f in feats if len(f)], statistic, n_boot=n_boot, seed=seed)
    return {
        "intervals": {k: boot.interval(i, level) for i, k in enumerate(names)},
        "prompts": [len(f) for f in feats],
        "unpaired": unpaired,
    }


def comparison_markdown(
    runs: Sequence[dict], differences: dict[str, dict] | None = None, baseline: str | None = None
) -> str:
    """A markdown table of every report metric per run (columns no run has are left out) and, with a
    baseline, a table of each run's paired difference from it with its bootstrap interval."""
    from engine.compare import fmt_mean_std

    keys = [k for k in REPORT_KEYS if any(k in r["mean"] for r in runs)]
    lines = [
        "# Quality and diversity per run",
        "",
        "Averages over prompts of each prompt's samples. Higher is more diverse for every diversity column except "
        + " and ".join(LOWER_IS_MORE_DIVERSE)
        + " (higher = more repetitive). With several seeds: mean +- sample std (ddof 1) over seeds.",
        "",
        "| run | source | seeds | prompts | " + " | ".join(keys) + " |",
        "|" + "---|" * (4 + len(keys)),
    ]
    for r in runs:
        prompts = f"{r['mean']['n_prompts']:.0f}" if "n_prompts" in r["mean"] else "-"
        cells = [r["label"], r["source"], str(r["seeds"]), prompts]
        cells += [fmt_mean_std(r["mean"][k], r["std"][k]) if k in r["mean"] else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [r["label"] for r in runs if not {"quality", "semantic_diversity"} <= set(r["mean"])]
    if missing:
        lines += ["", "Not in the plot (no quality or no semantic diversity): " + ", ".join(missing) + "."]
    if differences:
        dkeys = [k for k in keys if any(k in d["intervals"] for d in differences.values())]
        level = next(iter(next(iter(differences.values()))["intervals"].values())).level
        lines += [
            "",
            f"## Paired differences from {baseline}",
            "",
            f"run - {baseline}, with a {100 * level:.0f}% paired hierarchical bootstrap interval (seeds, then prompts "
            "within a seed, resampled together for both runs; `engine.compare`). * = the interval excludes 0.",
            "",
            "| run | paired prompts | " + " | ".join(dkeys) + " |",
            "|" + "---|" * (2 + len(dkeys)),
        ]
        for label, d in differences.items():
            unpaired = f" ({d['unpaired']} unpaired)" if d["unpaired"] else ""
            cells = [label, "+".join(map(str, d["prompts"])) + unpaired]
            for k in dkeys:
                iv = d["intervals"].get(k)
                cells.append("-" if iv is None else iv.fmt() + (" *" if iv.lo > 0 or iv.hi < 0 else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_quality_vs_diversity(runs: Sequence[dict], path: str | Path) -> Path:
    """Semantic (and style, when measured) diversity against quality, one point per run with seed-std bars
    (`engine.compare.plot_frontier`, the plot the method experiment draws for its trajectories)."""
    from engine.compare import Curve, plot_frontier

    panels = [
        (k, k.replace("_", " ")) for k in ("semantic_diversity", "style_diversity") if any(k in r["mean"] for r in runs)
    ] or [("semantic_diversity", "semantic diversity")]
    curves = [
        Curve(
            r["label"],
            [r["mean"].get("quality", float("nan"))],
            {k: [r["mean"][k]] for k, _ in panels if k in r["mean"]},
            x_std=[r["std"].get("quality", float("nan"))],
            y_std={k: [r["std"][k]] for k, _ in panels if k in r["std"]},
            reference="human" in r["source"],
        )
        for r in runs
    ]
    return plot_frontier(curves, panels, path, title="Diversity vs quality (mean +- std over seeds)")


def compare_runs(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    *,
    baseline: str | None = None,
    n_boot: int = 2000,
) -> dict[str, Path]:
    """Write comparison.md and quality_vs_diversity.png for the given runs into out_dir; with `baseline`
    (a run's label), also each other run's paired difference from it."""
    if not paths:
        raise ValueError("compare needs at least one run directory or metrics.json path")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} runs; give one label per run or none")
    runs = [summarize_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    differences = None
    if baseline is not None:
        by_label = {r["label"]: r for r in runs}
        if baseline not in by_label:
            raise ValueError(f"--baseline {baseline!r} is not one of the runs' labels {sorted(by_label)}")
        differences = {
            r["label"]: paired_differences(r, by_label[baseline], n_boot=n_boot) for r in runs if r["label"] != baseline
        }
    out = Path(out_dir)
    md = out / "comparison.md"
    atomic_write(md, comparison_markdown(runs, differences, baseline))
    png = plot_quality_vs_diversity(runs, out / "quality_vs_diversity.png")
    return {"markdown": md, "plot": png}


# ----------------------------------------------------------------------------------------------- CLI

# CLI flag -> EvalConfig field; a flag left unset keeps the config's default.
_CFG_FLAGS = {
    "n": "n_samples",
    "num_prompts": "num_prompts",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "batch_size": "batch_size",
    "seed": "seed",
    "semantic_model": "semantic_model",
    "style_model": "style_model",
    "reward_model": "reward_model",
    "trust_remote_code": "trust_remote_code",
    "metrics_compat": "metrics_compat",
}


def _config_spelling(argv: Sequence[str]) -> list[str]:
    """Accept the training config's spelling of the sampling/scoring flags too: --eval.reward_model DIR
    is --reward-model DIR (every EvalConfig field that has a flag here)."""
    aliases = {f"--eval.{field_}": "--" + flag.replace("_", "-") for flag, field_ in _CFG_FLAGS.items()}
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(aliases[key] + eq + value if key in aliases else arg)
    return out


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description="Sample from a model (or take human responses) and report quality and diversity. "
        "`python -m engine.evaluate compare RUN [RUN ...]` compares finished evaluations.",
    )
    p.add_argument("--model", help="save_pretrained directory, hub name, or named architecture (e.g. llama-tiny)")
    p.add_argument(
        "--prompts", default="synthetic", help="data source for prompts (any engine.data source or 'synthetic')"
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="val",
        help="which prompts: those training held out (val, default), the training ones, or all",
    )
    p.add_argument("--val-fraction", type=float, help="held-out fraction used by training (default: data config's)")
    p.add_argument("--split-seed", type=int, help="split seed used by training (default: data config's data.seed)")
    p.add_argument(
        "--cleaning",
        choices=CLEANINGS,
        help="data.cleaning used by training: it decides the prompt texts, hence the split (default: engine)",
    )
    p.add_argument("--human", action="store_true", help="score the prompts' human responses instead of sampling")
    p.add_argument(
        "--human-selection",
        choices=HUMAN_SELECTIONS,
        default="top",
        help="which human responses: the n highest-scored (top) or n at random (seeded)",
    )
    p.add_argument("--out", help="output directory (default: <run>/eval for runs/<run>/final, else eval/<name>)")
    p.add_argument("--n", type=int, help="samples per prompt (default 4)")
    p.add_argument("--num-prompts", type=int, help="prompts evaluated (default 32)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--batch-size", type=int, help="prompts per generate call")
    p.add_argument("--seed", type=int)
    p.add_argument("--semantic-model", help="embedder for semantic diversity ('' drops the metric)")
    p.add_argument("--style-model", help="embedder for style diversity ('' drops the metric)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="let the embedders run their own code (jinaai/jina-embeddings-v3 needs it)",
    )
    p.add_argument("--reward-model", help="HF sequence-classification model scoring quality")
    p.add_argument(
        "--metrics-compat",
        choices=METRICS_COMPATS,
        help="definitions of the text diversity metrics: engine (default) or authors (the values of the "
        "authors' evaluation code, to set beside the paper's figures; see engine.metrics)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--strict", action="store_true", help="fail on the first bad data row instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate compare",
        description="Markdown table and quality-vs-diversity plot across evaluated runs.",
    )
    p.add_argument("runs", nargs="+", help="run directories (with eval/metrics.json) or metrics.json files")
    p.add_argument("--out", default=".", help="where comparison.md and quality_vs_diversity.png go")
    p.add_argument("--labels", nargs="+", help="names of the runs in the table and plot (default: directory names)")
    p.add_argument("--baseline", help="label of the run every other run is compared with (paired bootstrap intervals)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates for --baseline (default 2000)")
    return p


def default_out_dir(model: str | None, human: bool) -> Path:
    if human or not model:
        return Path("eval") / "human"
    p = Path(model)
    if p.is_dir():
        # runs/<name>/final -> runs/<name>/eval, as DESIGN.md lays out a run directory.
        return p.parent / "eval" if p.name == "final" else p / "eval"
    return Path("eval") / model.replace("/", "__")


def _print_summary(result: EvalResult) -> None:
    for k, v in result.summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.2f}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        print(f"{k:>24}: {v}")
    for name, path in result.files.items():
        print(f"{name:>24}: {path}")


def main(argv: Sequence[str] | None = None) -> EvalResult | dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        args = _compare_parser().parse_args(argv[1:])
        files = compare_runs(args.runs, args.out, labels=args.labels, baseline=args.baseline, n_boot=args.n_boot)
        for name, path in files.items():
            print(f"{name}: {path}")
        return files

    parser = _eval_parser()
    args = parser.parse_args(_config_spelling(argv))
    if not args.human and not args.model:
        parser.error("--model is required unless --human is given")
    if not args.human:
        from engine.config import ConfigError, ModelConfig
        from engine.model import check_model

        try:  # before any prompt loading or sampling: a path that is not there is named as such, not as a hub id
            check_model(ModelConfig(name=args.model), field="--model")
        except ConfigError as e:
            parser.error(str(e))
    from engine.config import DataConfig, EvalConfig

    data_defaults = DataConfig()
    overrides = {field_: getattr(args, flag) for flag, field_ in _CFG_FLAGS.items() if getattr(args, flag) is not None}
    cfg = EvalConfig(**overrides)
    device = _auto_device(args.device)
    out_dir = Path(args.out) if args.out else default_out_dir(args.model, args.human)
    groups = load_prompt_groups(
        args.prompts,
        cfg.num_prompts,
        split=args.split,
        val_fraction=data_defaults.val_fraction if args.val_fraction is None else args.val_fraction,
        split_seed=data_defaults.seed if args.split_seed is None else args.split_seed,
        strict=args.strict,
        cleaning=args.cleaning or data_defaults.cleaning,
    )
    synthetic = True if args.prompts == "synthetic" else None
    if args.human:
        result = evaluate_human(
            groups,
            cfg,
            out_dir=out_dir,
            how=args.human_selection,
            synthetic=synthetic,
            device=device,
            show_progress=not args.no_progress,
        )
    else:
        from engine.model import load_pretrained

        model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=device)
        result = evaluate_model(
            model,
            tokenizer,
            [g[0].prompt for g in groups],
            cfg,
            out_dir=out_dir,
            prompt_meta=[g[0].meta for g in groups],
            prompt_ids=[g[0].prompt_id for g in groups],
            synthetic=synthetic,
            model_name=args.model,
            show_progress=not args.no_progress,
        )
    _print_summary(result)
    return result


if __name__ == "__main__":
    main()
