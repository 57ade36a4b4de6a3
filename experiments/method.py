"""The method experiment: does deviation weighting keep a preference-tuned model diverse at equal quality?

`make experiment` (= `python -m experiments.method`) trains, from one shared SFT checkpoint, DPO, DDPO,
ORPO, DORPO and DivPO on the bundled synthetic WritingPrompts data (known theme, style and quality per
response, upvotes biased towards a popular theme and style), plus two controls that separate "weighted
differently" from "weighted less": DPO and ORPO with the learning rate multiplied by the mean chosen
weight the DDPO/DORPO runs measured. Every run is evaluated at several checkpoints on the same held-out
prompts, and DDPO vs DPO, DORPO vs ORPO (and the controls) are compared at matched quality along that
quality-diversity frontier, with paired bootstrap intervals (`engine.compare`) and a power estimate
made before the comparison runs. What runs is experiments/method.yaml; the training recipe
every run shares is configs/experiment.yaml.

Flow: one driver process and a pool of `workers` single-thread processes.

    phase 0  SFT training                 ||  deviation-embedding warm-up, human reference evaluations
    phase 1  pilot, per seed: the SFT evaluation and DPO (trained, evaluated at every checkpoint)
             -> power estimate from the SFT/DPO variance, written to <out>/power.json before phase 2
    phase 2  per seed: [DDPO -> DPO-lrw], [DORPO -> ORPO-lrw], [ORPO], [DivPO]; best-vs-worst runs
    report   experiments.method_report -> EXPERIMENTS.md and its plots; <out>/results.json

    python -m experiments.method [--quick] [--out runs/experiment] [--doc EXPERIMENTS.md] [--workers 2]
    python -m experiments.method --report-only --out runs/experiment     # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml

from engine.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DESIGN = Path(__file__).resolve().parent / "method.yaml"
SFT, HUMAN = "SFT", "human"
# Objectives whose loss logs the deviation weights (weights/mean), which the lr controls read.
WEIGHTED_OBJECTIVES = ("ddpo", "dorpo")
# The per-prompt values results.json keeps for the statistics (the rest stay in each eval's metrics.json).
PER_PROMPT_KEYS = (
    "prompt_id",
    "quality",
    "semantic_diversity",
    "style_diversity",
    "ngram_diversity",
    "compression_ratio",
    "homogenization",
    "length_words_mean",
    "theme_share",
    "style_share",
)


class DesignError(ValueError):
    """experiments/method.yaml is wrong; the message names the key, its value and the fix."""


# ------------------------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Method:
    name: str
    pairing: str
    overrides: dict
    lr_times_mean_weight_of: str | None = None


@dataclass(frozen=True)
class Design:
    """experiments/method.yaml, validated (with its `quick:` section applied under --quick)."""

    path: str
    recipe: str
    seeds: list[int]
    pairings: dict[str, dict]
    sft: dict
    methods: dict[str, Method]
    checkpoints: int
    comparisons: list[tuple[str, str]]
    bvw_pairing: str
    bvw_methods: list[str]
    bvw_seeds: list[int]
    bvw_comparisons: list[tuple[str, str]]
    statistics: dict
    workers: int
    recipe_overrides: dict = field(default_factory=dict)
    quick: bool = False

    @property
    def pilot(self) -> str:
        return self.statistics["pilot"]

    def to_dict(self) -> dict:
        return asdict(self)


_TOP_KEYS = {
    "recipe",
    "seeds",
    "pairings",
    "sft",
    "methods",
    "checkpoints",
    "comparisons",
    "best_vs_worst",
    "statistics",
    "workers",
    "quick",
    "recipe_overrides",
}
_STAT_DEFAULTS = {
    "n_boot": 2000,
    "level": 0.95,
    "power": 0.8,
    "target_detectable": 0.015,
    "primary_metric": "semantic_diversity",
    "pilot": "DPO",
    "matched_quality_fraction": 0.75,
    "design_basis": None,
}
_BASIS_KEYS = {"source", "within", "between"}


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, one level deep for dict values (quick's sft/statistics add to the full ones)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_design(path: str | Path = DESIGN, *, quick: bool = False) -> Design:
    path = Path(path)
    if not path.is_file():
        raise DesignError(f"design file {path} does not exist; pass --design experiments/method.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise DesignError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
    if quick:
        if not isinstance(raw.get("quick"), dict):
            raise DesignError(f"{path} has no quick: section; add one (as in experiments/method.yaml) or drop --quick")
        q = dict(raw["quick"])
        bvw_quick = q.pop("best_vs_worst", {})
        raw = _merge(raw, q)
        raw["best_vs_worst"] = {**raw.get("best_vs_worst", {}), **bvw_quick}
    for key in ("recipe", "seeds", "pairings", "methods", "checkpoints", "comparisons"):
        if key not in raw:
            raise DesignError(f"{path}: missing key {key!r}")
    seeds = raw["seeds"]
    distinct_ints = isinstance(seeds, list) and all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)
    if not (seeds and distinct_ints):
        raise DesignError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    pairings = raw["pairings"]
    if not isinstance(pairings, dict) or not all(isinstance(v, dict) for v in pairings.values()):
        raise DesignError(f"{path}: pairings must map a name to engine overrides, e.g. published: {{data.pairs: gap}}")
    methods: dict[str, Method] = {}
    for name, spec in (raw["methods"] or {}).items():
        extra = set(spec) - {"pairing", "overrides", "lr_times_mean_weight_of"}
        if extra:
            raise DesignError(f"{path}: method {name} has unknown key(s) {sorted(extra)}")
        if spec.get("pairing") not in pairings:
            raise DesignError(
                f"{path}: method {name} has pairing {spec.get('pairing')!r}; choose one of {sorted(pairings)}"
            )
        methods[name] = Method(
            name, spec["pairing"], dict(spec.get("overrides") or {}), spec.get("lr_times_mean_weight_of")
        )
    for m in methods.values():
        src = m.lr_times_mean_weight_of
        if src is None:
            continue
        if src not in methods or methods[src].overrides.get("loss.objective") not in WEIGHTED_OBJECTIVES:
            raise DesignError(
                f"{path}: method {m.name} takes its lr from {src!r}, which must be a method with loss.objective "
                f"{' or '.join(WEIGHTED_OBJECTIVES)} (only those log deviation weights)"
            )
        if methods[src].lr_times_mean_weight_of:
            raise DesignError(
                f"{path}: {m.name} -> {src} -> {methods[src].lr_times_mean_weight_of}: lr chains of "
                "more than one step are not supported; take the lr from a weighted method directly"
            )
    stats = {**_STAT_DEFAULTS, **(raw.get("statistics") or {})}
    if set(stats) - set(_STAT_DEFAULTS):
        raise DesignError(f"{path}: unknown statistics key(s) {sorted(set(stats) - set(_STAT_DEFAULTS))}")
    if stats["pilot"] not in methods or methods[stats["pilot"]].lr_times_mean_weight_of:
        raise DesignError(f"{path}: statistics.pilot must be a method without an lr dependency, got {stats['pilot']!r}")
    if not (isinstance(stats["n_boot"], int) and stats["n_boot"] >= 100):
        raise DesignError(f"{path}: statistics.n_boot must be an integer >= 100, got {stats['n_boot']!r}")
    if not 0 < stats["matched_quality_fraction"] <= 1:
        raise DesignError(
            f"{path}: statistics.matched_quality_fraction must be in (0, 1], got {stats['matched_quality_fraction']!r}"
        )
    basis = stats["design_basis"]
    if basis is not None and not (
        isinstance(basis, dict)
        and set(basis) == _BASIS_KEYS
        and isinstance(basis["source"], str)
        and all(isinstance(basis[k], (int, float)) and basis[k] >= 0 for k in ("within", "between"))
        and basis["within"] > 0
    ):
        raise DesignError(
            f"{path}: statistics.design_basis must be {{source: <text>, within: <variance > 0>, between: "
            f"<variance >= 0>}} (the variance components the design was chosen from), got {basis!r}"
        )
    if not (0.5 < stats["level"] < 1 and 0.5 <= stats["power"] < 1):
        raise DesignError(
            f"{path}: statistics.level and .power must be in (0.5, 1), got {stats['level']}, {stats['power']}"
        )

    def pairs_of(key, items):
        bad = [c for c in items if not (isinstance(c, list) and len(c) == 2 and all(x in methods for x in c))]
        if bad:
            raise DesignError(f"{path}: {key} entries must be [new, baseline] method names from methods:, got {bad}")
        return [tuple(c) for c in items]

    bvw = raw.get("best_vs_worst") or {}
    bvw_methods = list(bvw.get("methods") or [])
    if any(m not in methods for m in bvw_methods):
        raise DesignError(f"{path}: best_vs_worst.methods must be names from methods:, got {bvw_methods}")
    if bvw_methods and bvw.get("pairing") not in pairings:
        raise DesignError(
            f"{path}: best_vs_worst.pairing must be one of {sorted(pairings)}, got {bvw.get('pairing')!r}"
        )
    bvw_seeds = list(bvw.get("seeds") or [])
    if any(s not in seeds for s in bvw_seeds):
        raise DesignError(f"{path}: best_vs_worst.seeds {bvw_seeds} must be among seeds {seeds}")
    bvw_comparisons = pairs_of("best_vs_worst.comparisons", bvw.get("comparisons") or [])
    if any(m not in bvw_methods for c in bvw_comparisons for m in c):
        raise DesignError(f"{path}: best_vs_worst.comparisons may only name best_vs_worst.methods {bvw_methods}")
    if any(methods[m].lr_times_mean_weight_of for m in bvw_methods):
        raise DesignError(
            f"{path}: best_vs_worst.methods cannot include lr controls (their weight source runs elsewhere)"
        )
    checkpoints, workers = raw["checkpoints"], raw.get("workers", 1)
    if not (isinstance(checkpoints, int) and checkpoints >= 1):
        raise DesignError(f"{path}: checkpoints must be an integer >= 1, got {checkpoints!r}")
    if not (isinstance(workers, int) and workers >= 1):
        raise DesignError(f"{path}: workers must be an integer >= 1, got {workers!r}")
    recipe = Path(raw["recipe"])
    recipe = recipe if recipe.is_absolute() else ROOT / recipe
    return Design(
        path=str(path),
        recipe=str(recipe),
        seeds=list(seeds),
        pairings=pairings,
        sft=dict(raw.get("sft") or {}),
        methods=methods,
        checkpoints=checkpoints,
        comparisons=pairs_of("comparisons", raw["comparisons"]),
        bvw_pairing=bvw.get("pairing", ""),
        bvw_methods=bvw_methods,
        bvw_seeds=bvw_seeds,
        bvw_comparisons=bvw_comparisons,
        statistics=stats,
        workers=workers,
        recipe_overrides=dict(raw.get("recipe_overrides") or {}),
        quick=quick,
    )


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def make_config(recipe: str | Path, *overrides: dict):
    """The validated engine Config of one run: the recipe file, then each override dict in order."""
    from engine.config import load_config

    merged: dict = {}
    for o in overrides:
        merged.update(o)
    argv = ["--config", str(recipe)]
    for k, v in merged.items():
        argv += [f"--{k}", _fmt_value(v)]
    return load_config(argv)


# --------------------------------------------------------------------------------- one job's context


@dataclass(frozen=True)
class Context:
    """What every job needs, picklable for the worker processes."""

    design: Design
    out: str
    sft_dir: str = ""

    @property
    def common(self) -> dict:
        # Caches live under <out> so a fresh output directory is a fresh, honestly timed run.
        return {
            **self.design.recipe_overrides,
            "data.cache_dir": str(Path(self.out) / "cache" / "data"),
            "deviation.cache_dir": str(Path(self.out) / "cache" / "embeddings"),
        }

    def base_config(self, seed: int = 0):
        return make_config(self.design.recipe, self.common, {"data.seed": seed, "eval.seed": seed})

    def run_name(self, method: str, pairing: str) -> str:
        # Runs on a method's own pairing live in <out>/<method>; on another pairing, <out>/<method>@<pairing>.
        return method if pairing == self.design.methods[method].pairing else f"{method}@{pairing}"

    def method_config(
        self, method: str, seed: int, *, pairing: str | None = None, lr: float | None = None, final_only: bool = False
    ):
        d = self.design
        m = d.methods[method]
        pairing = pairing or m.pairing
        run = self.run_name(method, pairing)
        base = self.base_config(seed)
        steps = base.optim.max_steps
        if steps is None or (not final_only and steps % d.checkpoints):
            raise DesignError(
                f"optim.max_steps ({steps}) of {d.recipe} must be set and a multiple of checkpoints ({d.checkpoints})"
            )
        if base.parallel.zero_stage != 0:
            raise DesignError(f"{d.recipe}: checkpoints are read as ZeRO-0 module states; set parallel.zero_stage 0")
        return make_config(
            d.recipe,
            self.common,
            d.pairings[pairing],
            m.overrides,
            {
                "data.seed": seed,
                "eval.seed": seed,
                "model.name": self.sft_dir,
                "logging.output_dir": str(Path(self.out) / run.lower()),
                "logging.run_name": f"seed{seed}",
                # One reference cache per (pairing, seed): every dpo/ddpo run on the same pairs shares it.
                "ref_cache.dir": str(Path(self.out) / "refcache" / f"{pairing}-seed{seed}"),
                "checkpoint.every_steps": 0 if final_only else steps // d.checkpoints,
                "checkpoint.keep_last": d.checkpoints,
            },
            {"optim.lr": lr} if lr is not None else {},
        )


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class HeldOut:
    """The held-out prompts of one seed: the same ones for every method and checkpoint."""

    prompts: list[str]
    prompt_ids: list[str]
    groups: list[list] = field(repr=False)


def heldout_prompts(cfg) -> HeldOut:
    """The first `eval.num_prompts` validation prompts (by prompt_id) of the split training used.

    Training splits pairs with `split_by_prompt(pairs, val_fraction, data.seed)`; splitting responses
    with the same arguments gives the same prompts, so no evaluated prompt was trained on.
    """
    from engine.data.loading import load_responses
    from engine.data.pairs import group_by_prompt, split_by_prompt

    d = cfg.data
    responses, _ = load_responses(
        d.source, synthetic_prompts=d.synthetic_prompts, synthetic_seed=d.synthetic_seed, cleaning=d.cleaning
    )
    _, val = split_by_prompt(responses, d.val_fraction, d.seed)
    groups = group_by_prompt(val)
    if len(groups) < cfg.eval.num_prompts:
        raise DesignError(
            f"data.seed {d.seed} holds out {len(groups)} prompts but eval.num_prompts is {cfg.eval.num_prompts}: "
            f"raise data.val_fraction ({d.val_fraction}) or data.synthetic_prompts ({d.synthetic_prompts}) in the "
            "recipe, or lower eval.num_prompts (every seed must evaluate the same number of prompts)"
        )
    keys = sorted(groups)[: cfg.eval.num_prompts]
    return HeldOut([groups[k][0].prompt for k in keys], keys, [groups[k] for k in keys])


_EMBEDDERS: dict = {}  # per process: MiniLM takes seconds to load, so every evaluation of a worker shares it


def embedders(eval_cfg) -> dict:
    from engine.deviation import get_embedder

    key = (eval_cfg.semantic_model, eval_cfg.style_model)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = {
            "semantic": get_embedder(eval_cfg.semantic_model, device="cpu") if eval_cfg.semantic_model else None,
            "style": get_embedder(eval_cfg.style_model, device="cpu") if eval_cfg.style_model else None,
        }
    return _EMBEDDERS[key]


def checkpoint_model(step_dir: Path, base_dir: str | Path):
    """(model, tokenizer) holding the policy's weights at checkpoints/step-<n>/.

    The checkpoint is verified against its manifest first (`engine.checkpoint.verify`). Under ZeRO-0
    DeepSpeed keeps the whole `PolicyWithLoss` state in mp_rank_00_model_states.pt; its `model.`
    entries are the HF model's own state dict, loaded strictly into the SFT architecture.
    """
    import torch

    from engine.checkpoint import verify
    from engine.model import load_pretrained

    verify(step_dir)
    states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model, tok = load_pretrained(str(base_dir))
    model.load_state_dict({k[len("model.") :]: v for k, v in states.items() if k.startswith("model.")}, strict=True)
    return model.eval(), tok


def _eval_record(result, method: str, seed: int, step: int, t_wall: float, t_cpu: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "step": step,
        "summary": result.summary,
        "per_prompt": [{k: r[k] for k in PER_PROMPT_KEYS if k in r} for r in result.per_prompt],
        "eval_s": time.time() - t_wall,
        "eval_cpu_s": time.process_time() - t_cpu,
    }


def evaluate(model, tok, held: HeldOut, eval_cfg, out_dir: Path, label: str, seed: int, step: int) -> dict:
    from engine.evaluate import evaluate_model

    t_wall, t_cpu = time.time(), time.process_time()
    result = evaluate_model(
        model,
        tok,
        held.prompts,
        eval_cfg,
        out_dir=out_dir,
        prompt_ids=held.prompt_ids,
        synthetic=True,
        embedders=embedders(eval_cfg),
        model_name=label,
        show_progress=False,
    )
    return _eval_record(result, label, seed, step, t_wall, t_cpu)


def mean_logged_weight(run_dir: Path) -> float:
    """Mean over training steps of the logged mean chosen weight (weights/mean in metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    values = [json.loads(line).get("weights/mean") for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        raise RuntimeError(f"{path} logs no weights/mean: the run's objective is not deviation-weighted")
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------- jobs


def _init_worker() -> None:
    import torch

    # The tiny model's generate is per-op overhead: a second intra-op thread only spin-waits (measured on a
    # busy 2-core machine: 42 s instead of 4 s of CPU for the same 192 samples); parallelism comes from the
    # worker processes.
    torch.set_num_threads(1)


def job_sft(ctx: Context) -> dict:
    """Train the shared SFT checkpoint."""
    from engine.train import train

    cfg = make_config(
        ctx.design.recipe,
        ctx.common,
        ctx.design.sft,
        {"logging.output_dir": ctx.out, "logging.run_name": "sft", "checkpoint.every_steps": 0},
    )
    shutil.rmtree(cfg.logging.run_dir, ignore_errors=True)
    t_wall, t_cpu = time.time(), time.process_time()
    summary = train(cfg)
    if not summary:
        raise RuntimeError(f"SFT training in {cfg.logging.run_dir} returned no summary; see its metrics.jsonl")
    return {
        "sft_dir": str(cfg.logging.run_dir / "final"),
        "summary": summary,
        "train_s": time.time() - t_wall,
        "train_cpu_s": time.process_time() - t_cpu,
    }


def job_warmup(ctx: Context) -> dict:
    """Embed every preference response once (the deviation cache every weighted run then reads), and score
    the human responses of each seed's held-out prompts (the reference diversity of people)."""
    from engine.data.loading import load_responses
    from engine.deviation import compute_deviation
    from engine.evaluate import evaluate_human

    base = ctx.base_config()
    t_wall, t_cpu = time.time(), time.process_time()
    responses, _ = load_responses(
        base.data.source,
        synthetic_prompts=base.data.synthetic_prompts,
        synthetic_seed=base.data.synthetic_seed,
        cleaning=base.data.cleaning,
    )
    compute_deviation(responses, base.deviation, cache_dir=base.deviation.cache_dir, show_progress=False)
    warm = {"embed_s": time.time() - t_wall, "embed_cpu_s": time.process_time() - t_cpu, "responses": len(responses)}
    records = []
    for seed in ctx.design.seeds:
        cfg = ctx.base_config(seed)
        held = heldout_prompts(cfg)
        t_wall, t_cpu = time.time(), time.process_time()
        result = evaluate_human(
            held.groups,
            cfg.eval,
            out_dir=Path(ctx.out) / HUMAN / f"seed{seed}",
            how="random",
            synthetic=True,
            embedders=embedders(cfg.eval),
            device="cpu",
            show_progress=False,
        )
        records.append(_eval_record(result, HUMAN, seed, 0, t_wall, t_cpu))
    return {"warmup": warm, "evals": records}


def job_sft_eval(ctx: Context, seed: int) -> dict:
    """Evaluate the SFT start on one seed's held-out prompts: step 0 of every trajectory of that seed."""
    from engine.model import load_pretrained

    cfg = ctx.base_config(seed)
    model, tok = load_pretrained(ctx.sft_dir)
    record = evaluate(
        model, tok, heldout_prompts(cfg), cfg.eval, Path(ctx.out) / "sft" / "eval" / f"seed{seed}", SFT, seed, 0
    )
    return {"evals": [record], "runs": []}


def job_chain(
    ctx: Context, seed: int, methods: list[str], *, pairing: str | None = None, final_only: bool = False
) -> dict:
    """Train and evaluate `methods` of one seed in order (an lr control after the run it reads its weight from).

    Each run is evaluated at its checkpoints (every max_steps / checkpoints steps; final_only: the final
    model only) on the seed's held-out prompts, then its DeepSpeed checkpoints are deleted (final/ stays).
    """
    from engine.model import load_pretrained
    from engine.train import train

    held = heldout_prompts(ctx.base_config(seed))
    evals, runs, weights = [], [], {}
    for method in methods:
        m = ctx.design.methods[method]
        lr = None
        if m.lr_times_mean_weight_of:
            base_lr = ctx.base_config(seed).optim.lr
            lr = base_lr * weights[m.lr_times_mean_weight_of]
        cfg = ctx.method_config(method, seed, pairing=pairing, lr=lr, final_only=final_only)
        label = ctx.run_name(method, pairing or m.pairing)
        run_dir = cfg.logging.run_dir
        shutil.rmtree(run_dir, ignore_errors=True)  # <out>/<run>/seed<k> belongs to this experiment run
        print(
            f"-- {label} seed {seed}: objective {cfg.loss.objective}, pairs {cfg.data.pairs}, lr {cfg.optim.lr:.3g}, "
            f"{cfg.optim.max_steps} steps",
            flush=True,
        )
        t_wall, t_cpu = time.time(), time.process_time()
        summary = train(cfg)
        if not summary:
            raise RuntimeError(f"training {run_dir} returned no summary (stopped early?); see its metrics.jsonl")
        info = {
            "method": label,
            "seed": seed,
            "lr": cfg.optim.lr,
            "pairs_mode": cfg.data.pairs,
            "objective": cfg.loss.objective,
            "summary": summary,
            "train_s": time.time() - t_wall,
            "train_cpu_s": time.process_time() - t_cpu,
        }
        if cfg.loss.needs_weights:
            weights[method] = info["mean_chosen_weight"] = mean_logged_weight(run_dir)
        if m.lr_times_mean_weight_of:
            info["lr_scale"] = weights[m.lr_times_mean_weight_of]
            info["lr_scale_from"] = m.lr_times_mean_weight_of
        runs.append(info)
        steps = (
            [cfg.optim.max_steps]
            if final_only
            else [cfg.checkpoint.every_steps * (i + 1) for i in range(ctx.design.checkpoints)]
        )
        for step in steps:
            if step == cfg.optim.max_steps:
                model, tok = load_pretrained(str(run_dir / "final"))
            else:
                model, tok = checkpoint_model(run_dir / "checkpoints" / f"step-{step}", ctx.sft_dir)
            evals.append(evaluate(model, tok, held, cfg.eval, run_dir / "eval" / f"step-{step}", label, seed, step))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        last = evals[-1]["summary"]
        nan = float("nan")
        print(
            f"   {label} seed {seed}: quality {last.get('quality', nan):.4f}, semantic div. "
            f"{last.get('semantic_diversity', nan):.4f}, style div. {last.get('style_diversity', nan):.4f} "
            f"({info['train_s']:.0f} s train, {sum(e['eval_s'] for e in evals[-len(steps) :]):.0f} s eval)",
            flush=True,
        )
    return {"evals": evals, "runs": runs}


class _InProcess:
    """The executor of --workers 1: runs each job at submit time in this process."""

    def __init__(self):
        _init_worker()

    def submit(self, fn, *args, **kwargs) -> Future:
        f: Future = Future()
        f.set_result(fn(*args, **kwargs))
        return f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _collect(futures: list[Future], evals: list[dict], runs: list[dict]) -> None:
    """Gather the jobs' records in submission order; on the first failure cancel the jobs not yet started
    (the pool would otherwise run them all before the error surfaces)."""
    try:
        for f in futures:
            r = f.result()
            evals += r["evals"]
            runs += r["runs"]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def chains(design: Design) -> list[list[str]]:
    """Phase-2 job lists: each method not in the pilot, with its lr controls right after it."""
    dependents: dict[str, list[str]] = {}
    for m in design.methods.values():
        if m.lr_times_mean_weight_of:
            dependents.setdefault(m.lr_times_mean_weight_of, []).append(m.name)
    roots = [m for m, spec in design.methods.items() if not spec.lr_times_mean_weight_of and m != design.pilot]
    return sorted(([r] + dependents.get(r, []) for r in roots), key=len, reverse=True)


def run_experiment(
    design: Design, out: Path, *, workers: int | None = None, sft_dir: Path | None = None, log=print
) -> dict:
    """Every phase of the experiment; returns what results.json and the report hold."""
    from experiments.method_report import power_estimate

    out.mkdir(parents=True, exist_ok=True)
    workers = workers or design.workers
    ctx = Context(design, str(out))
    t_start, load_start = time.time(), os.getloadavg()
    phases: dict[str, float] = {}
    evals: list[dict] = []
    runs: list[dict] = []
    cpu: dict[str, float] = {}
    executor = (
        _InProcess()
        if workers == 1
        else ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
    )
    with executor as ex:
        log(f"== phase 0: SFT || embedding warm-up and human references ({workers} worker(s))")
        t0 = time.time()
        warm_f = ex.submit(job_warmup, ctx)
        if sft_dir is None:
            sft = ex.submit(job_sft, ctx).result()
        else:
            if not (Path(sft_dir) / "config.json").is_file():
                raise FileNotFoundError(
                    f"--sft {sft_dir} is not a save_pretrained directory (no config.json); pass <run>/final"
                )
            sft = {
                "sft_dir": str(sft_dir),
                "summary": {"note": f"given with --sft {sft_dir}"},
                "train_s": 0.0,
                "train_cpu_s": 0.0,
            }
        warm = warm_f.result()
        evals += warm["evals"]
        cpu["sft"], cpu["warmup"] = (
            sft["train_cpu_s"],
            warm["warmup"]["embed_cpu_s"] + sum(e["eval_cpu_s"] for e in warm["evals"]),
        )
        phases["phase0_s"] = time.time() - t0
        ctx = Context(design, str(out), sft["sft_dir"])

        log(f"== phase 1 (pilot): SFT and {design.pilot} on seeds {design.seeds}")
        t0 = time.time()
        # Separate jobs for the SFT evaluations and the pilot runs keep both workers busy to the end.
        futures = [ex.submit(job_chain, ctx, s, [design.pilot]) for s in design.seeds]
        futures += [ex.submit(job_sft_eval, ctx, s) for s in design.seeds]
        _collect(futures, evals, runs)
        phases["phase1_s"] = time.time() - t0
        loads = [os.getloadavg()[0]]  # 1-minute load average at each phase end, the workers busy till then
        power = power_estimate(evals, design)
        power["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _atomic_json(out / "power.json", power)
        log(
            f"   power: detectable {design.statistics['primary_metric']} difference "
            f"{power['detectable']:.4f} at {power['n_prompts']} prompts x {power['n_seeds']} seeds "
            f"(target {design.statistics['target_detectable']})"
        )

        log("== phase 2: the other methods, then best-vs-worst")
        t0 = time.time()
        jobs = [(s, c, {}) for c in chains(design) for s in design.seeds]
        jobs += [
            (s, design.bvw_methods, {"pairing": design.bvw_pairing, "final_only": True})
            for s in design.bvw_seeds
            if design.bvw_methods
        ]
        # Longest first (an evaluation costs about three trainings): the last jobs then end close together.
        jobs.sort(key=lambda j: -len(j[1]) * ((1 if j[2].get("final_only") else design.checkpoints) + 0.35))
        _collect([ex.submit(job_chain, ctx, s, c, **kw) for s, c, kw in jobs], evals, runs)
        phases["phase2_s"] = time.time() - t0
        loads.append(os.getloadavg()[0])
    phases["total_s"] = time.time() - t_start
    cpu["runs_train"] = sum(r["train_cpu_s"] for r in runs)
    cpu["evals"] = sum(e["eval_cpu_s"] for e in evals if e["method"] != HUMAN)
    return {
        "design": design.to_dict(),
        "evals": evals,
        "runs": runs,
        "power": power,
        "sft": sft,
        "warmup": warm["warmup"],
        "phases": phases,
        "cpu_s": cpu,
        "workers": workers,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "load_phase_ends": loads,
        "quick": design.quick,
        "recipe": make_config(design.recipe, ctx.common).to_dict(),
        "sft_given": sft_dir is not None,
        "model": {**model_facts(sft["sft_dir"]), "name": make_config(design.recipe, ctx.common).model.name},
        "n_held_out": {str(s): len(heldout_prompts(ctx.base_config(s)).prompts) for s in design.seeds},
    }


# ----------------------------------------------------------------------------------------------- I/O


def model_facts(model_dir: str) -> dict:
    """Shape and size of the shared start, read from the SFT checkpoint itself."""
    from engine.model import load_pretrained

    model, _ = load_pretrained(model_dir)
    c = model.config
    return {
        "architecture": type(model).__name__,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "vocab": c.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _atomic_json(path: Path, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1, default=str))


def versions() -> dict:
    import torch
    import transformers

    import engine

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes to tracked files)"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (git not available)"
    cpu_model = "unknown"
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "engine": getattr(engine, "__version__", "?"),
        "engine_commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
    }


def load_results(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m experiments.method --out {path.parent}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> dict:
    from experiments.method_report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.method", description=__doc__.split("\n\n")[0])
    p.add_argument("--design", type=Path, default=DESIGN, help="design file (default experiments/method.yaml)")
    p.add_argument("--quick", action="store_true", help="smoke version: the design's quick: section")
    p.add_argument("--out", type=Path, default=Path("runs/experiment"), help="output directory of all runs")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="report path (default: EXPERIMENTS.md at the repo root; with --quick: <out>/EXPERIMENTS.md)",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the design's workers)")
    p.add_argument("--seeds", type=int, nargs="+", help="run these seeds instead of the design's (a slice)")
    p.add_argument("--sft", type=Path, default=None, help="use this SFT final/ dir instead of training one")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rewrite the report and plots from <out>/results.json of an earlier run",
    )
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    doc = args.doc or (args.out / "EXPERIMENTS.md" if args.quick else ROOT / "EXPERIMENTS.md")
    if args.report_only:
        result = load_results(args.out / "results.json")
        write_report(result, doc)
        print(f"report: {doc}")
        return result
    design = load_design(args.design, quick=args.quick)
    if args.seeds:
        design = replace(design, seeds=list(args.seeds), bvw_seeds=[s for s in design.bvw_seeds if s in args.seeds])
    result = run_experiment(design, args.out, workers=args.workers, sft_dir=args.sft)
    result["out"] = str(args.out)
    result["command"] = "python -m experiments.method" + (" " + " ".join(argv) if argv else "  (= make experiment)")
    result["versions"] = versions()
    _atomic_json(args.out / "results.json", result)
    write_report(result, doc)
    print(f"report: {doc}\nresults: {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
