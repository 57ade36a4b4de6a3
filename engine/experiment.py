"""The paper's headline in miniature: DPO, DDPO, ORPO, DORPO and DivPO from one SFT checkpoint, compared.

`make experiment` (= `python -m engine.experiment`) runs, on CPU, in one process:

    SFT (objective sft on a separate synthetic corpus)  ->  <out>/sft/final
    for seed in seeds:                      (seed = data split, pair sampling, shuffling, sampling)
        for method in DPO DDPO ORPO DORPO DivPO:
            engine.train.train(configs/experiment.yaml + method + seed, model.name = <out>/sft/final)
            engine.evaluate.evaluate_model(final/, the seed's held-out prompts, 4 samples per prompt)
        the SFT checkpoint and the human responses of the same prompts are scored as reference rows
    -> mean and std over seeds -> EXPERIMENTS.md (tables, verdict, timings) + its quality-vs-diversity plot

Every method gets the same optimizer steps, the same packed-row token budget per step, the same
learning-rate schedule and the same seeds; only the objective (and DivPO's pair mode) differs. DPO,
DDPO and DivPO read reference log-probs from the reference cache (DPO and DDPO share one per seed:
same pairs, weights are not part of the cache key); the odds-ratio objectives need no reference.
Quality and the theme/style labels of every sample come from the synthetic generator's ground truth
(`engine.data.synthetic.classify`), so the share of the popular theme and style is exact.

    python -m engine.experiment [--seeds 0 1 2] [--quick] [--out runs/experiment] [--doc EXPERIMENTS.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "experiment.yaml"

# Per-method differences from the shared recipe; nothing else changes between methods.
# ORPO/DORPO: loss.beta is the odds-ratio weight lambda (published DORPO: 0.25).
METHODS: dict[str, dict] = {
    "DPO": {"loss.objective": "dpo", "data.pairs": "best_vs_worst"},
    "DDPO": {"loss.objective": "ddpo", "data.pairs": "best_vs_worst"},
    "ORPO": {"loss.objective": "orpo", "data.pairs": "best_vs_worst", "loss.beta": 0.25},
    "DORPO": {"loss.objective": "dorpo", "data.pairs": "best_vs_worst", "loss.beta": 0.25},
    "DivPO": {"loss.objective": "dpo", "data.pairs": "divpo"},
}
# The shared starting point. A separate synthetic corpus (synthetic_seed 1000, disjoint from the
# preference data and its held-out prompts), learned from the chosen side of `gap` pairs: random
# disjoint pairs, so the SFT data keeps most of the natural theme/style mix instead of only the
# per-prompt winners that best_vs_worst pairs would teach.
SFT_OVERRIDES: dict = {
    "loss.objective": "sft", "data.pairs": "gap", "data.synthetic_prompts": 400, "data.synthetic_seed": 1000,
    "data.seed": 0, "optim.max_steps": 200, "optim.lr": 3e-3, "optim.warmup_ratio": 0.05,
    "deviation.enabled": False,
}
# --quick: the smoke version (tests/test_experiment.py): tiny data, a few steps, a tiny evaluation.
QUICK_OVERRIDES: dict = {
    "data.synthetic_prompts": 40, "data.val_fraction": 0.2, "optim.max_steps": 2, "eval.num_prompts": 3,
    "eval.max_new_tokens": 24, "deviation.semantic_model": "", "eval.semantic_model": "",
}
QUICK_SFT_OVERRIDES: dict = {"data.synthetic_prompts": 24, "optim.max_steps": 3}

# Table columns: (summary key, header). Shares and entropies are over all samples of a run.
TABLE_KEYS = (
    ("quality", "quality"),
    ("semantic_diversity", "semantic div."),
    ("style_diversity", "style div."),
    ("ngram_diversity", "n-gram div."),
    ("compression_ratio", "compression (lower=div.)"),
    ("homogenization", "homogen. (lower=div.)"),
    ("popular_theme_share", "share 'space'"),
    ("popular_style_share", "share 'plain'"),
    ("theme_entropy_overall", "theme entropy"),
    ("style_entropy_overall", "style entropy"),
    ("length_words_mean", "words"),
)
# Why the recipe is what it is: measurements taken while choosing it (seed 0 only, DPO and DDPO from an
# SFT checkpoint made with SFT_OVERRIDES; not rerun by this command, which reports its own numbers below).
RECIPE_NOTES = (
    "- Learning rate. The published 5e-6 barely moves a random-init 0.6M-parameter model in 40 steps. At lr 1e-3, "
    "DPO reached loss 0.011 and over-optimised: share of 'space' 1.00, 54% of samples without sentence structure "
    "(lists of vivid, on-theme words that the ground-truth quality still rates 0.77), semantic diversity 0.30 "
    "(SFT: 0.46); DDPO degenerated the same way (65% style-less). At lr 2e-4 (the recipe) DPO ends at loss 0.13, "
    "still concentrates fully on 'space' but most samples stay well-formed stories (31% style-less for DPO, 9% for "
    "DDPO).",
    "- Data generator: unchanged. Plain DPO visibly concentrates on the popular theme with the bundled popularity "
    "bonus (+8 upvotes for 'space', +6 for 'plain'), so no generator change was needed.",
    "- SFT start on `gap` pairs of a separate corpus rather than best-vs-worst: the SFT model should start near the "
    "natural theme/style mix (like a base model), so that the concentration measured after preference tuning is "
    "caused by the preference objective.",
)
DEGENERATE_SHARE = 0.2  # above this share of style-less samples the report flags over-optimisation
QUALITY_TOLERANCE = 0.05  # "comparable quality": within 5% of the baseline's mean quality


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def overrides_argv(overrides: dict) -> list[str]:
    """{"optim.lr": 1e-3, ...} -> ["--optim.lr", "0.001", ...] for engine.config.load_config."""
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", _fmt_value(v)]
    return out


def make_config(recipe: Path, *overrides: dict):
    """The validated Config of one run: the recipe file, then each override dict in order."""
    from engine.config import load_config

    merged: dict = {}
    for o in overrides:
        merged.update(o)
    return load_config(["--config", str(recipe)] + overrides_argv(merged))


# ------------------------------------------------------------------------------------------ prompts


@dataclass
class HeldOut:
    """The held-out prompts of one seed: the same ones for every method, and their human responses."""

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
    responses, _ = load_responses(d.source, synthetic_prompts=d.synthetic_prompts, synthetic_seed=d.synthetic_seed,
                                  cleaning=d.cleaning)
    _, val = split_by_prompt(responses, d.val_fraction, d.seed)
    groups = group_by_prompt(val)
    if not groups:
        raise ValueError(
            f"no held-out prompt for data.seed {d.seed} with val_fraction {d.val_fraction} and "
            f"{d.synthetic_prompts} prompts; raise data.val_fraction or data.synthetic_prompts"
        )
    keys = sorted(groups)[: cfg.eval.num_prompts]
    return HeldOut([groups[k][0].prompt for k in keys], keys, [groups[k] for k in keys])


# ------------------------------------------------------------------------------------------ running


@dataclass
class RunRecord:
    """One evaluated row of the comparison: a method (or SFT / human) at one seed."""

    method: str
    seed: int
    summary: dict
    train: dict = field(default_factory=dict)
    train_time_s: float = 0.0
    eval_time_s: float = 0.0


def _train(cfg) -> dict:
    from engine.train import train

    summary = train(cfg)
    if not summary:
        raise RuntimeError(f"training {cfg.logging.run_dir} returned no summary (stopped early?); see its metrics.jsonl")
    return summary


def _evaluate(model_dir: Path, held: HeldOut, eval_cfg, out_dir: Path, embedders: dict, label: str) -> dict:
    from engine.evaluate import evaluate_model
    from engine.model import load_pretrained

    model, tok = load_pretrained(str(model_dir))
    result = evaluate_model(
        model, tok, held.prompts, eval_cfg, out_dir=out_dir, prompt_ids=held.prompt_ids, synthetic=True,
        embedders=embedders, model_name=label, show_progress=False,
    )
    return result.summary


def _load_embedders(eval_cfg) -> dict:
    """Loaded once and shared by every evaluation (MiniLM takes seconds to load on a CPU)."""
    from engine.deviation import get_embedder

    return {
        "semantic": get_embedder(eval_cfg.semantic_model, device="cpu") if eval_cfg.semantic_model else None,
        "style": get_embedder(eval_cfg.style_model, device="cpu") if eval_cfg.style_model else None,
    }


def train_sft(out: Path, recipe: Path, quick: bool, common: dict) -> tuple[Path, dict, float]:
    cfg = make_config(
        recipe, common, SFT_OVERRIDES, QUICK_SFT_OVERRIDES if quick else {},
        {"logging.output_dir": str(out), "logging.run_name": "sft"},
    )
    t0 = time.time()
    summary = _train(cfg)
    return cfg.logging.run_dir / "final", summary, time.time() - t0


def run_experiment(
    out: Path,
    seeds: list[int],
    *,
    methods: list[str] | None = None,
    quick: bool = False,
    recipe: Path = RECIPE,
    sft_dir: Path | None = None,
    log=print,
) -> dict:
    """Train and evaluate every (method, seed); returns everything the report needs."""
    import torch

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ValueError("no seeds given; pass e.g. --seeds 0 1 2")
    out.mkdir(parents=True, exist_ok=True)
    # Caches live under <out> so a fresh output directory is a fresh, honestly timed run.
    common = {
        "data.cache_dir": str(out / "cache" / "data"),
        "deviation.cache_dir": str(out / "cache" / "embeddings"),
        **(QUICK_OVERRIDES if quick else {}),
    }
    t_start = time.time()
    load_start = os.getloadavg()
    records: list[RunRecord] = []
    phases: dict[str, float] = {}

    if sft_dir is None:
        log("== SFT: the shared starting checkpoint")
        sft_dir, sft_summary, dt = train_sft(out, recipe, quick, common)
        phases["sft_train_s"] = dt
    else:
        sft_summary = {"note": f"given with --sft {sft_dir}"}
        if not (sft_dir / "config.json").is_file():
            raise FileNotFoundError(f"--sft {sft_dir} is not a save_pretrained directory (no config.json); pass <run>/final")
    sft_dir = Path(sft_dir)

    base_eval_cfg = make_config(recipe, common).eval
    embedders = _load_embedders(base_eval_cfg)
    for seed in seeds:
        seed_o = {"data.seed": seed, "eval.seed": seed, "model.name": str(sft_dir)}
        probe = make_config(recipe, common, seed_o)
        held = heldout_prompts(probe)
        log(f"== seed {seed}: {len(held.prompts)} held-out prompts x {probe.eval.n_samples} samples")

        t0 = time.time()
        s = _evaluate(sft_dir, held, probe.eval, out / "sft" / "eval" / f"seed{seed}", embedders, "SFT")
        sft_time = phases.get("sft_train_s", 0.0) if seed == seeds[0] else 0.0  # trained once, counted once
        records.append(RunRecord("SFT", seed, s, train=sft_summary, train_time_s=sft_time, eval_time_s=time.time() - t0))

        from engine.evaluate import evaluate_human

        t0 = time.time()
        human = evaluate_human(
            held.groups, probe.eval, out_dir=out / "human" / f"seed{seed}", how="random", synthetic=True,
            embedders=embedders, device="cpu", show_progress=False,
        )
        records.append(RunRecord("human (random)", seed, human.summary, eval_time_s=time.time() - t0))

        for method in methods:
            pairs = METHODS[method].get("data.pairs", "best_vs_worst")
            cfg = make_config(
                recipe, common, METHODS[method], seed_o,
                {
                    "logging.output_dir": str(out / method.lower()), "logging.run_name": f"seed{seed}",
                    # One cache per (pairs, seed): DPO and DDPO share it, DivPO has its own pairs.
                    "ref_cache.dir": str(out / "refcache" / f"{pairs}-seed{seed}"),
                },
            )
            log(f"-- {method} seed {seed}: objective {cfg.loss.objective}, pairs {cfg.data.pairs}, "
                f"{cfg.optim.max_steps} steps")
            t0 = time.time()
            summary = _train(cfg)
            t_train = time.time() - t0
            torch.manual_seed(seed)
            t0 = time.time()
            s = _evaluate(cfg.logging.run_dir / "final", held, cfg.eval, cfg.logging.run_dir / "eval", embedders, method)
            records.append(RunRecord(method, seed, s, train=summary, train_time_s=t_train, eval_time_s=time.time() - t0))
            log(f"   quality {s.get('quality', float('nan')):.4f}  semantic div. "
                f"{s.get('semantic_diversity', float('nan')):.4f}  share space "
                f"{s.get('theme_share', {}).get('space', float('nan')):.3f}  ({t_train:.0f}s train, "
                f"{records[-1].eval_time_s:.0f}s eval)")

    phases["total_s"] = time.time() - t_start
    return {
        "records": records,
        "methods": methods,
        "seeds": list(seeds),
        "quick": quick,
        "phases": phases,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "recipe": make_config(recipe, common, {"data.seed": seeds[0]}).to_dict(),
        "sft_overrides": {**SFT_OVERRIDES, **(QUICK_SFT_OVERRIDES if quick else {})},
        "sft_dir": str(sft_dir),
        "sft_given": "note" in sft_summary,
    }


# --------------------------------------------------------------------------------------- aggregating


def flat_metrics(summary: dict) -> dict[str, float]:
    """The scalar metrics of one evaluation, with the popular theme/style shares pulled out."""
    from engine.data.synthetic import POPULAR_STYLE, POPULAR_THEME

    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["popular_theme_share"] = float(summary.get("theme_share", {}).get(POPULAR_THEME, float("nan")))
    out["popular_style_share"] = float(summary.get("style_share", {}).get(POPULAR_STYLE, float("nan")))
    for kind in ("theme", "style"):
        for label, v in (summary.get(f"{kind}_share") or {}).items():
            out[f"{kind}_share/{label}"] = float(v)
    return out


def aggregate(records: list[RunRecord]) -> dict[str, dict]:
    """method -> {"n": seeds, "mean": {k: v}, "std": {k: v}, "min", "max"} over seeds (std with ddof 1)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(flat_metrics(r.summary))
    out = {}
    for method, rows in by_method.items():
        keys = sorted({k for row in rows for k in row})
        agg = {"n": len(rows), "mean": {}, "std": {}, "min": {}, "max": {}}
        for k in keys:
            vals = np.array([row[k] for row in rows if k in row and math.isfinite(row[k])], dtype=np.float64)
            if not len(vals):
                continue
            agg["mean"][k] = float(vals.mean())
            agg["std"][k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            agg["min"][k], agg["max"][k] = float(vals.min()), float(vals.max())
        out[method] = agg
    return out


def verdicts(agg: dict) -> list[dict]:
    """Each deviation-weighted objective against its base: diversity gain and quality ratio."""
    out = []
    for new, base in (("DDPO", "DPO"), ("DORPO", "ORPO"), ("DivPO", "DPO")):
        if new not in agg or base not in agg:
            continue
        m_new, m_base = agg[new]["mean"], agg[base]["mean"]
        q_new, q_base = m_new.get("quality", float("nan")), m_base.get("quality", float("nan"))
        rel_q = (q_new - q_base) / q_base if q_base else float("nan")
        row = {"method": new, "baseline": base, "quality_rel_change": rel_q,
               "quality_comparable": bool(rel_q >= -QUALITY_TOLERANCE) if math.isfinite(rel_q) else False}
        for k in ("semantic_diversity", "style_diversity", "popular_theme_share", "popular_style_share",
                  "theme_entropy_overall", "style_entropy_overall"):
            if k in m_new and k in m_base:
                row[f"{k}_delta"] = m_new[k] - m_base[k]
                # A difference is called real only when it exceeds the seeds' spread of both runs.
                spread = max(agg[new]["std"].get(k, 0.0), agg[base]["std"].get(k, 0.0))
                row[f"{k}_beyond_spread"] = abs(row[f"{k}_delta"]) > spread
        primary = "semantic_diversity" if "semantic_diversity_delta" in row else "style_diversity"
        row["primary_diversity"] = primary
        row["more_diverse"] = row.get(f"{primary}_delta", 0.0) > 0
        row["wins"] = row["more_diverse"] and row["quality_comparable"]
        row["wins_beyond_spread"] = row["wins"] and bool(row.get(f"{primary}_beyond_spread", False))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- report


def _cell(agg_m: dict, key: str) -> str:
    if key not in agg_m["mean"]:
        return "-"
    m, s = agg_m["mean"][key], agg_m["std"][key]
    return f"{m:.3f} +- {s:.3f}" if agg_m["n"] > 1 else f"{m:.3f}"


def plot(agg: dict, order: list[str], path: Path) -> Path:
    """Left: quality vs diversity (semantic, else style), std error bars. Right: popular theme/style share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = "semantic_diversity" if any("semantic_diversity" in agg[m]["mean"] for m in order) else "style_diversity"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for m in order:
        mean, std = agg[m]["mean"], agg[m]["std"]
        if xkey not in mean or "quality" not in mean:
            continue
        ref = m in ("SFT", "human (random)")
        ax.errorbar(mean[xkey], mean["quality"], xerr=std.get(xkey), yerr=std.get("quality"),
                    fmt="s" if ref else "o", markersize=8, capsize=3, color="gray" if ref else None)
        ax.annotate(m, (mean[xkey], mean["quality"]), textcoords="offset points", xytext=(6, 6))
    ax.margins(0.2)
    ax.set_xlabel(xkey.replace("_", " ") + " (higher = more diverse)")
    ax.set_ylabel("quality (generator ground truth)")
    ax.set_title("Quality vs diversity (mean +- std over seeds)")
    ax.grid(True, alpha=0.3)
    x = np.arange(len(order))
    for i, (key, label) in enumerate((("popular_theme_share", "share of theme 'space'"),
                                      ("popular_style_share", "share of style 'plain'"))):
        vals = [agg[m]["mean"].get(key, np.nan) for m in order]
        errs = [agg[m]["std"].get(key, 0.0) for m in order]
        bx.bar(x + (i - 0.5) * 0.38, vals, 0.38, yerr=errs, capsize=3, label=label)
    bx.set_xticks(x, order, rotation=20)
    bx.set_ylabel("share of all samples")
    bx.set_title("Concentration on the popular theme / style")
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def _versions() -> dict:
    import torch
    import transformers

    import engine

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes to tracked files)"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (git not available)"
    return {
        "engine": getattr(engine, "__version__", "?"), "engine_commit": commit, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


def _fmt_pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


_VERDICT_NAMES = (
    ("semantic_diversity", "semantic diversity"), ("style_diversity", "style diversity"),
    ("popular_theme_share", "share 'space'"), ("popular_style_share", "share 'plain'"),
    ("theme_entropy_overall", "theme entropy"), ("style_entropy_overall", "style entropy"),
)


def _discussion(agg: dict, verdict_rows: list[dict]) -> list[str]:
    """Sentences computed from the measured numbers, so the text cannot drift from the table."""
    lines = []
    single = all(a["n"] < 2 for a in agg.values())

    def spread_note(beyond: bool) -> str:
        if single:
            return "one seed: no spread to compare with"
        return ("larger" if beyond else "not larger") + " than the seeds' std"

    if "SFT" in agg and "DPO" in agg:
        s, d = agg["SFT"]["mean"], agg["DPO"]["mean"]
        dt = d.get("popular_theme_share", float("nan")) - s.get("popular_theme_share", float("nan"))
        ds = d.get("popular_style_share", float("nan")) - s.get("popular_style_share", float("nan"))
        # "Visibly": at least 5 points more of the samples, and more than the seeds' spread.
        concentrated = dt > max(0.05, agg["DPO"]["std"].get("popular_theme_share", 0.0)) or ds > max(
            0.05, agg["DPO"]["std"].get("popular_style_share", 0.0))
        lines.append(
            f"- **Does plain DPO concentrate?** The share of the popular theme 'space' among samples goes from "
            f"{s.get('popular_theme_share', float('nan')):.3f} (SFT) to {d.get('popular_theme_share', float('nan')):.3f} "
            f"(DPO), of the popular style 'plain' from {s.get('popular_style_share', float('nan')):.3f} to "
            f"{d.get('popular_style_share', float('nan')):.3f}. "
            + ("DPO visibly concentrates its samples on the popular theme/style, as the paper reports for human data."
               if concentrated else
               "This is not a shift beyond the seeds' spread: in this run DPO did not visibly concentrate, so the "
               "comparison below says little about the mechanism the paper describes.")
        )
    for v in verdict_rows:
        k = v["primary_diversity"]
        delta = v.get(f"{k}_delta", float("nan"))
        beyond = v.get(f"{k}_beyond_spread", False)
        q = v["quality_rel_change"]
        beyond_keys = [f"{name} {v[key + '_delta']:+.3f}" for key, name in _VERDICT_NAMES
                       if v.get(key + "_beyond_spread") and key + "_delta" in v]
        if v["wins"] and (beyond or single):
            head = f"**{v['method']} beats {v['baseline']} on {k.replace('_', ' ')} at comparable quality.**"
        elif v["wins"]:
            head = (f"**{v['method']} is nominally more diverse than {v['baseline']} on {k.replace('_', ' ')} at "
                    "comparable quality, but by less than the seeds' spread: not a demonstrated win.**")
        elif v["more_diverse"]:
            head = (f"**{v['method']} is more diverse than {v['baseline']} but loses more than "
                    f"{100 * QUALITY_TOLERANCE:.0f}% quality.**")
        else:
            head = f"**{v['method']} does not beat {v['baseline']} on {k.replace('_', ' ')}.**"
        lines.append(
            f"- {head} {k.replace('_', ' ')} {delta:+.4f} "
            f"({spread_note(beyond)}), quality {_fmt_pct(q)}; "
            f"share 'space' {v.get('popular_theme_share_delta', float('nan')):+.3f}, share 'plain' "
            f"{v.get('popular_style_share_delta', float('nan')):+.3f}, theme entropy "
            f"{v.get('theme_entropy_overall_delta', float('nan')):+.3f}, style entropy "
            f"{v.get('style_entropy_overall_delta', float('nan')):+.3f}."
            + (" Beyond the seeds' spread (for shares, + = more concentrated): " + ", ".join(beyond_keys) + "." if beyond_keys and not single else "")
        )
    degenerate = [(m, a["mean"].get("style_share/none", 0.0)) for m, a in agg.items()]
    degenerate = [(m, x) for m, x in degenerate if x > DEGENERATE_SHARE]
    if degenerate:
        lines.append(
            "- **Degenerate samples.** Share of samples with no recognisable style (no sentence structure, "
            "usually a list of on-theme and vivid words): " + ", ".join(f"{m} {x:.2f}" for m, x in degenerate)
            + ". The ground-truth quality scores vivid, on-theme word density and length, so such over-optimised "
            "text can still score high quality: read quality together with this share."
        )
    return lines


def write_report(result: dict, doc: Path, plot_path: Path, command: str) -> Path:
    from engine.data.synthetic import STYLES, THEMES

    records: list[RunRecord] = result["records"]
    agg = aggregate(records)
    order = [m for m in ("SFT", *result["methods"], "human (random)") if m in agg]
    verdict_rows = verdicts(agg)
    plot(agg, order, plot_path)
    rel_plot = os.path.relpath(plot_path, doc.parent)
    v = result.get("versions") or {**_versions(), "note": " (read when this report was regenerated)"}
    rec = result["recipe"]
    ph = result["phases"]
    seeds = result["seeds"]
    train_total = sum(r.train_time_s for r in records if r.method != "SFT")
    eval_total = sum(r.eval_time_s for r in records)

    L = ["# Experiment: deviation-weighted objectives vs DPO / ORPO / DivPO (synthetic WritingPrompts)", ""]
    L += [
        "Generated by `engine/experiment.py`; do not edit by hand, rerun the command below. The numbers are what "
        "this run measured." + (" **This is the --quick smoke version: a few steps on tiny data; the numbers mean "
                                "nothing.**" if result["quick"] else ""),
        "",
        f"- Command: `{command}`",
        f"- Seeds: {', '.join(map(str, seeds))} (seed = data split, pair sampling, row shuffling and sampling seed; "
        "the SFT checkpoint is trained once and shared by all seeds and methods"
        + (", here given with --sft" if result["sft_given"] else "") + ")",
        f"- Versions: engine {v['engine']}, commit {v['engine_commit']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, numpy {v['numpy']}, Python {v['python']}{v.get('note', '')}",
        f"- Machine: {v['platform']}, {v['cpu_count']} CPU cores visible, {v['torch_threads']} torch threads; "
        f"load average {result['load_start'][0]:.1f} at start, {result['load_end'][0]:.1f} at the end "
        "(above the core count means other jobs shared the CPU and the times below are pessimistic)",
        f"- Wall time: **{ph['total_s'] / 60:.1f} min** in all"
        + (f" (SFT {ph['sft_train_s']:.0f} s" if "sft_train_s" in ph else " (")
        + f", preference training {train_total:.0f} s incl. reference caches, evaluation {eval_total:.0f} s)",
        "",
        "## Setup",
        "",
        "- Data: the bundled generator (`engine/data/synthetic.py`), "
        f"{rec['data']['synthetic_prompts']} prompts (synthetic_seed {rec['data']['synthetic_seed']}), 4-10 responses each. "
        "Each response has a theme (space, dragons, detective, ghosts, robots), a style (plain, dialogue, terse, "
        "ornate) and a true quality (vivid vs filler words, length, coherence). Upvotes = 30 x quality + 8 if the "
        "theme is 'space' + 6 if the style is 'plain' + noise, and 'space'/'plain' are also the most frequent, so "
        "upvote-ranked pairs prefer the popular theme/style beyond what quality explains.",
        "- Model: `llama-tiny` (random-init Llama, 2 layers, hidden 128, vocab 960, ~0.6M parameters).",
        "- SFT (shared start): objective sft on the chosen side of `gap` pairs of a separate synthetic corpus "
        "(overrides: " + ", ".join(f"`{k}={_fmt_value(x)}`" for k, x in result["sft_overrides"].items()) + ").",
        f"- Preference runs (`configs/experiment.yaml`): {rec['optim']['max_steps']} optimizer steps each, one "
        f"packed row of <= {rec['data']['max_tokens_per_row']} tokens per step (about 3 pairs), lr "
        f"{rec['optim']['lr']} with {rec['optim']['schedule']} schedule and {rec['optim']['warmup_ratio']} warmup, "
        f"DPO/DDPO/DivPO beta {rec['loss']['beta']}, ORPO/DORPO lambda 0.25, best-vs-worst pairs (DivPO: its own "
        f"pairs, rho {rec['data']['divpo_rho']}); deviation embedders: "
        f"{rec['deviation']['semantic_model'] or '-'} + {rec['deviation']['style_model']}. Reference log-probs "
        "come from the reference cache (one per seed for DPO/DDPO, one for DivPO).",
        f"- Evaluation (`engine.evaluate`): the first {rec['eval']['num_prompts']} held-out prompts (fewer when the "
        "seed's split holds fewer; the per-run table gives the count) of each seed's split (never trained on), {rec['eval']['n_samples']} samples each, temperature {rec['eval']['temperature']}, "
        f"top-p {rec['eval']['top_p']}, top-k {rec['eval']['top_k']}, repetition penalty "
        f"{rec['eval']['repetition_penalty']}, at most {rec['eval']['max_new_tokens']} new tokens. Quality and "
        "theme/style labels from the generator's ground truth (`classify`); diversity metrics are within each "
        "prompt's 4 samples, then averaged; shares and entropies over all samples of a run. 'human (random)' "
        "scores 4 random human responses of the same prompts.",
        "",
        "### Recipe choices",
        "",
        *RECIPE_NOTES,
        "",
        "## Results",
        "",
        f"Mean +- std over {len(seeds)} seed(s) (std with ddof 1). Higher is more diverse except compression and "
        "homogenisation.",
        "",
        "| method | " + " | ".join(h for _, h in TABLE_KEYS) + " |",
        "|" + "---|" * (1 + len(TABLE_KEYS)),
    ]
    for m in order:
        L.append(f"| {m} | " + " | ".join(_cell(agg[m], k) for k, _ in TABLE_KEYS) + " |")
    L += ["", f"![quality vs diversity]({rel_plot})", "", "### Theme and style shares among samples (mean over seeds)", ""]
    labels = [f"theme_share/{t}" for t in (*THEMES, "none")] + [f"style_share/{s}" for s in (*STYLES, "none")]
    L.append("| method | " + " | ".join(x.split("/")[1] + (" (theme)" if x.startswith("theme") else " (style)")
                                       for x in labels) + " |")
    L.append("|" + "---|" * (1 + len(labels)))
    for m in order:
        L.append(f"| {m} | " + " | ".join(f"{agg[m]['mean'].get(x, 0.0):.3f}" for x in labels) + " |")

    L += ["", "### Verdict", ""]
    L += [f"Deviation-weighted vs base objective; quality is 'comparable' when it is at most "
          f"{100 * QUALITY_TOLERANCE:.0f}% below the base.", ""]
    L += _discussion(agg, verdict_rows)
    L += [
        "",
        "### Why it may or may not show (read with the numbers above)",
        "",
        "- Scale: a 0.6M-parameter model, a few dozen steps and a few hundred pairs. Differences between methods of "
        "the size of the seed std are noise; the table's spread says which ones are not.",
        "- Theme collapse. Where DPO-family runs put (almost) every sample on 'space', theme shares and theme "
        "entropy cannot separate the methods any more; the differences then show in style diversity, style entropy "
        "and the share of degenerate samples. A smaller step budget or lr keeps the theme mix partly alive, at the "
        "cost of a weaker DPO effect.",
        "- DDPO/DORPO only reweight the chosen side by its deviation from the prompt's other responses; on "
        "best-vs-worst pairs most chosen responses are popular-theme/popular-style ones, so the weights can lower "
        "the push towards 'space'/'plain' but do not add pairs that prefer rare themes. The effect grows with the "
        "number of pairs per prompt and with the spread of the weights.",
        "- The ORPO/DORPO pair adds an NLL term on the chosen responses, which itself moves the model towards the "
        "chosen (popular) distribution, so its concentration comes from both terms.",
        "- Semantic diversity uses MiniLM embeddings of the samples; on this synthetic data the theme shares and "
        "theme entropy are the exact version of the same question and are reported next to it.",
        "",
        "## Per-run details",
        "",
        "| method | seed | prompts x samples | steps | train pairs | tokens trained | first loss | final loss | "
        "reference | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t = r.train
        fl = lambda k: f"{t[k]:.4f}" if isinstance(t.get(k), (int, float)) else "-"  # noqa: E731
        L.append(
            f"| {r.method} | {r.seed} | {r.summary.get('n_prompts', '-')} x {rec['eval']['n_samples']} | "
            f"{t.get('steps', '-')} | {t.get('pairs', '-')} | {t.get('tokens', '-')} | "
            f"{fl('first_loss')} | {fl('final_loss')} | {t.get('reference', '-')} | {r.train_time_s:.0f} | "
            f"{r.eval_time_s:.0f} |"
        )
    L += ["", f"Raw outputs: `{result.get('out', 'runs/experiment')}/<method>/seed<k>/` (config, metrics.jsonl, "
          "final/, eval/generations.jsonl, eval/metrics.json) and `results.json` there.", ""]
    atomic_write(doc, "\n".join(L))
    return doc


def load_results(path: Path) -> dict:
    """A results.json written by save_results, with its records as RunRecords again (for --report-only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m engine.experiment --out {path.parent}` first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["records"] = [
        RunRecord(r["method"], r["seed"], r["summary"], r.get("train") or {}, r.get("train_time_s", 0.0),
                  r.get("eval_time_s", 0.0))
        for r in doc["records"]
    ]
    doc["load_start"], doc["load_end"] = tuple(doc["load_start"]), tuple(doc["load_end"])
    return doc


def save_results(result: dict, path: Path) -> None:
    doc = {k: v for k, v in result.items() if k != "records"}
    doc["records"] = [
        {"method": r.method, "seed": r.seed, "summary": r.summary, "train": r.train,
         "train_time_s": r.train_time_s, "eval_time_s": r.eval_time_s}
        for r in result["records"]
    ]
    doc["aggregate"] = aggregate(result["records"])
    doc["verdicts"] = verdicts(doc["aggregate"])
    atomic_write(path, json.dumps(doc, indent=1, default=str))


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m engine.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--quick", action="store_true", help="smoke version: tiny data, a few steps, tiny evaluation")
    p.add_argument("--out", type=Path, default=Path("runs/experiment"), help="output directory of all runs")
    p.add_argument("--doc", type=Path, default=None,
                   help="report path (default: EXPERIMENTS.md at the repo root; with --quick: <out>/EXPERIMENTS.md)")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="shared recipe (default configs/experiment.yaml)")
    p.add_argument("--sft", type=Path, default=None, help="use this SFT final/ dir instead of training one")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the report and plot from <out>/results.json of an earlier run")
    args = p.parse_args(argv)
    doc = args.doc or (args.out / "EXPERIMENTS.md" if args.quick else ROOT / "EXPERIMENTS.md")
    plot_path = doc.parent / (doc.stem + "_quality_vs_diversity.png")
    if args.report_only:
        result = load_results(args.out / "results.json")
        command = result.get("command") or "python -m engine.experiment  (= make experiment)"
        write_report(result, doc, plot_path, command)
        print(f"report: {doc}\nplot: {plot_path}")
        return result
    result = run_experiment(args.out, args.seeds, methods=args.methods, quick=args.quick, recipe=args.recipe,
                            sft_dir=args.sft)
    result["out"] = str(args.out)
    result["command"] = "python -m engine.experiment" + (" " + " ".join(argv) if argv else "  (= make experiment)")
    result["versions"] = _versions()
    write_report(result, doc, plot_path, result["command"])
    save_results(result, args.out / "results.json")
    print(f"report: {doc}\nplot: {plot_path}\nresults: {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
