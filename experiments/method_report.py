"""The method experiment's analysis and report: results.json -> statistics -> EXPERIMENTS.md and its plots.

Every number and every verdict word in the report is computed here from the runs' per-prompt
evaluations with `engine.compare` (the statistics `python -m engine.evaluate compare` uses too):

- trajectories: per method and checkpoint, the mean and sample std over seeds of each metric;
- the power estimate (`power_estimate`, called by the driver after the pilot, before the comparison);
- per comparison, one paired hierarchical bootstrap over seeds and prompts for all metrics at once:
  the difference at matched quality (diversity interpolated along each method's seed-mean trajectory
  at the highest quality both reach) and at equal steps (the final checkpoints);
- the best-vs-worst table (final checkpoints only, equal steps).
Only fixed prose is written by hand; sentences that state a result are assembled from the intervals.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import numpy as np

from engine.compare import (
    Curve,
    Interval,
    MetricLayout,
    VarianceComponents,
    crossing,
    fmt_mean_std,
    hierarchical_bootstrap,
    matched_level,
    plot_frontier,
    seed_stats,
)
from engine.data.synthetic import (
    POPULAR_STYLE,
    POPULAR_THEME,
    STYLE_FREQ,
    STYLES,
    THEME_FREQ,
    THEMES,
    generate_rows,
    upvotes,
)
from engine.fileio import atomic_write, save_figure

SFT, HUMAN = "SFT", "human"
SCALARS = ("quality", "semantic_diversity", "style_diversity")
# The diversity metrics every comparison reports (higher = more diverse for all three).
DIVERSITY = (
    ("semantic_diversity", "semantic diversity"),
    ("style_diversity", "style diversity"),
    ("theme_entropy_overall", "theme entropy"),
)
# Further columns of the trajectory table; shares: higher = more concentrated (or more degenerate).
EXTRA = (
    ("style_entropy_overall", "style entropy"),
    (f"theme_share/{POPULAR_THEME}", f"share '{POPULAR_THEME}'"),
    (f"style_share/{POPULAR_STYLE}", f"share '{POPULAR_STYLE}'"),
    ("style_share/none", "style-less share"),
)
DEGENERATE_SHARE = 0.2  # above this share of style-less samples the report flags over-optimisation
COLLAPSED_SHARE = 0.95  # at or above this share of the popular theme, theme entropy cannot separate methods


class _MeanSource:
    """A random source whose gauss() returns the mean (and remembers the sd): reads the upvote formula."""

    sd = float("nan")

    def gauss(self, mu: float, sigma: float) -> float:
        self.sd = sigma
        return mu


def generator_facts() -> dict:
    """The synthetic generator's popularity bias and sizes, read from its code, for the report's setup."""
    src = _MeanSource()
    other_theme = next(t for t in THEMES if t != POPULAR_THEME)
    other_style = next(s for s in STYLES if s != POPULAR_STYLE)
    base = upvotes(0.0, other_theme, other_style, src)
    params = inspect.signature(generate_rows).parameters
    return {
        "quality_slope": upvotes(1.0, other_theme, other_style, src) - base,
        "theme_bonus": upvotes(0.0, POPULAR_THEME, other_style, src) - base,
        "style_bonus": upvotes(0.0, other_theme, POPULAR_STYLE, src) - base,
        "noise_sd": src.sd,
        "min_responses": params["min_responses"].default,
        "max_responses": params["max_responses"].default,
        "theme_freq": dict(zip(THEMES, THEME_FREQ)),
        "style_freq": dict(zip(STYLES, STYLE_FREQ)),
    }


# ------------------------------------------------------------------------------------------- data


def _rows(evals: list[dict], method: str, seed: int, step: int) -> dict[str, dict]:
    for e in evals:
        if e["method"] == method and e["seed"] == seed and e["step"] == step:
            return {r["prompt_id"]: r for r in e["per_prompt"]}
    raise KeyError(f"no evaluation of {method} seed {seed} step {step} in the results")


def layout_for(evals: list[dict]) -> MetricLayout:
    """The per-prompt values the statistics resample: quality, the diversity metrics that were measured
    (--quick drops MiniLM, so no semantic diversity), and the theme/style shares."""
    have = [k for k in SCALARS if any(isinstance(r.get(k), (int, float)) for e in evals for r in e["per_prompt"])]
    return MetricLayout(tuple(have), (("theme", THEMES), ("style", STYLES)))


def seed_features(
    evals: list[dict], conditions: list[tuple[str, int]], seeds: list[int], layout: MetricLayout
) -> list[np.ndarray]:
    """Per seed, [P, C * F]: the layout's features of every condition (method, step), side by side on the
    prompts all conditions were evaluated on (paired), rows with a missing value dropped."""
    out = []
    for s in seeds:
        by_cond = [_rows(evals, m, s, step) for m, step in conditions]
        common = sorted(set.intersection(*(set(r) for r in by_cond)))
        feats = np.concatenate([layout.features([rows[k] for k in common]) for rows in by_cond], axis=1)
        out.append(feats[np.isfinite(feats).all(axis=1)])
    return out


def _seed_metrics(features: list[np.ndarray], n_cond: int, layout: MetricLayout) -> dict[str, np.ndarray]:
    """{metric: [S, C]} from each seed's prompt means."""
    means = np.stack([f.mean(axis=0) for f in features]).reshape(len(features), n_cond, -1)
    return layout.metrics(means)


def steps_of(evals: list[dict], method: str) -> list[int]:
    return sorted({e["step"] for e in evals if e["method"] == method})


def primary_metric(evals: list[dict], wanted: str) -> str:
    """The design's primary metric, or style diversity where it was not measured (--quick drops MiniLM)."""
    have = any(isinstance(r.get(wanted), (int, float)) for e in evals for r in e["per_prompt"])
    return wanted if have else "style_diversity"


# ------------------------------------------------------------------------------------------- power


def paired_differences(
    evals: list[dict], seeds: list[int], a: tuple[str, int], b: tuple[str, int], metric: str
) -> list[np.ndarray]:
    """Per seed, the per-prompt differences a - b of `metric` between two (method, step) evaluations."""
    out = []
    for s in seeds:
        ra, rb = _rows(evals, a[0], s, a[1]), _rows(evals, b[0], s, b[1])
        d = np.array([ra[k][metric] - rb[k][metric] for k in sorted(set(ra) & set(rb))], dtype=np.float64)
        out.append(d[np.isfinite(d)])
    return out


def power_estimate(evals: list[dict], design) -> dict:
    """Smallest difference of the primary metric the design detects, from the pilot (SFT vs DPO).

    Per seed, the per-prompt differences pilot(final) - SFT on the same prompts give the within-seed
    variance of a paired difference between two models and the between-seed variance of a trained
    model's seed mean. A comparison of two trained methods carries that training variance twice, so
    the between-seed component is doubled. Detectable difference: `VarianceComponents.detectable_difference`
    (the bootstrap test's two-sided level and the design's power).
    """
    stats = design["statistics"] if isinstance(design, dict) else design.statistics
    seeds = design["seeds"] if isinstance(design, dict) else design.seeds
    pilot = stats["pilot"]
    metric = primary_metric(evals, stats["primary_metric"])
    final = max(steps_of(evals, pilot))
    diffs = paired_differences(evals, seeds, (pilot, final), (SFT, 0), metric)
    pilot_vc = VarianceComponents.from_differences(diffs)
    vc = VarianceComponents(pilot_vc.within, 2 * pilot_vc.between, pilot_vc.n_seeds, pilot_vc.n_prompts)
    alpha, power = 1 - stats["level"], stats["power"]
    n_prompts, n_seeds = min(len(d) for d in diffs), len(seeds)
    detectable = vc.detectable_difference(n_prompts, n_seeds, alpha, power)
    target = stats["target_detectable"]
    seeds_for_target = next(
        (s for s in range(2, 10_000) if vc.detectable_difference(n_prompts, s, alpha, power) <= target), None
    )
    grid_p = sorted({20, 30, 60, 100, 200, n_prompts})
    grid_s = sorted({5, 8, 16, 24, 32, n_seeds} | ({seeds_for_target} if seeds_for_target else set()))
    basis = stats.get("design_basis")
    if basis:
        predicted = VarianceComponents(basis["within"], basis["between"], 0, 0)
        basis = {**basis, "detectable": predicted.detectable_difference(n_prompts, n_seeds, alpha, power)}
    return {
        "metric": metric,
        "pilot": pilot,
        "pilot_step": final,
        "within": vc.within,
        "pilot_between": pilot_vc.between,
        "between": vc.between,
        "n_prompts": n_prompts,
        "n_seeds": n_seeds,
        "alpha": alpha,
        "power": power,
        "detectable": detectable,
        "target": target,
        "power_at_target": vc.power(target, n_prompts, n_seeds, alpha),
        "seeds_for_target": seeds_for_target,
        "design_basis": basis,
        "grid": {
            "prompts": grid_p,
            "seeds": grid_s,
            "detectable": [[vc.detectable_difference(p, s, alpha, power) for s in grid_s] for p in grid_p],
        },
    }


# ------------------------------------------------------------------------------------------- analysis


def _curve_index(conditions: list[tuple[str, int]], method: str) -> list[int]:
    """Condition indices of a method's trajectory, the SFT start first."""
    return [conditions.index((SFT, 0))] + [i for i, (m, _) in enumerate(conditions) if m == method]


def analyze(result: dict) -> dict:
    """Everything the report states, computed from results.json."""
    design = result["design"]
    evals = result["evals"]
    stats = design["statistics"]
    seeds = design["seeds"]
    level, n_boot = stats["level"], stats["n_boot"]
    main_methods = list(design["methods"])
    conditions = [(SFT, 0)] + [(m, st) for m in main_methods for st in steps_of(evals, m)]
    layout = layout_for(evals)
    feats = seed_features(evals, conditions, seeds, layout)
    per_seed = _seed_metrics(feats, len(conditions), layout)
    metric_names = [k for k, _ in DIVERSITY + EXTRA if k in layout.metric_names] + ["quality"]
    diversity = [(k, n) for k, n in DIVERSITY if k in metric_names]

    # Trajectories: mean and sample std over seeds at every checkpoint.
    traj = {}
    for m in [SFT] + main_methods:
        idx = _curve_index(conditions, m) if m != SFT else [0]
        traj[m] = {
            "steps": [conditions[i][1] for i in idx],
            "idx": idx,
            "mean": {k: [seed_stats(per_seed[k][:, i])[0] for i in idx] for k in metric_names},
            "std": {k: [seed_stats(per_seed[k][:, i])[1] for i in idx] for k in metric_names},
        }
    human = _reference_stats(evals, HUMAN, seeds, metric_names, layout)

    # Matched quality, in the data and in every bootstrap replicate: `matched_quality_fraction` of the way
    # from the shared SFT start to the highest quality both seed-mean trajectories reach (both start at
    # the SFT point, so their ranges always overlap). At the very top one trajectory is at its end or on
    # a plateau, where the first crossing jumps between checkpoints; below it both are still rising.
    frac = stats["matched_quality_fraction"]
    comps = [{"new": new, "base": base} for new, base in design["comparisons"]]
    pilot = stats["pilot"]
    columns: list[tuple] = []
    for j in range(len(comps)):
        columns.append(("level", j, "quality"))
        for k, _ in diversity + [("quality", "quality")]:
            columns.append(("final", j, k))
            if k != "quality":
                columns.append(("matched", j, k))
    for k in metric_names:
        columns.append(("pilot_vs_sft", 0, k))

    def statistic(means):
        x = means.reshape(*means.shape[:-1], len(conditions), -1)
        avg = {k: v.mean(axis=-2) for k, v in layout.metrics(x).items()}  # [..., C]: means over seed slots
        outs = []
        for kind, j, k in columns:
            if kind == "pilot_vs_sft":
                a, b = _curve_index(conditions, pilot)[-1], 0
                outs.append(avg[k][..., a] - avg[k][..., b])
                continue
            ia, ib = _curve_index(conditions, comps[j]["new"]), _curve_index(conditions, comps[j]["base"])
            if kind == "final":
                outs.append(avg[k][..., ia[-1]] - avg[k][..., ib[-1]])
                continue
            qa, qb = avg["quality"][..., ia], avg["quality"][..., ib]
            start = qa[..., 0]  # the SFT point, first on both trajectories
            lvl = start + frac * (matched_level(qa, qb) - start)
            if kind == "level":
                outs.append(lvl)
                continue
            outs.append(crossing(qa, avg[k][..., ia], lvl)[0] - crossing(qb, avg[k][..., ib], lvl)[0])
        return np.stack(outs, axis=-1)

    boot = hierarchical_bootstrap(feats, statistic, n_boot=n_boot, seed=0)
    for i, (kind, j, k) in enumerate(columns):
        if kind != "pilot_vs_sft":
            comps[j].setdefault(kind, {})[k] = _iv(boot.interval(i, level))
    for c in comps:
        c["q_star"] = c["level"]["quality"]["estimate"]
        # One trajectory never trains above the SFT start: the matched point is the shared start itself.
        c["q_star_is_start"] = math.isclose(c["q_star"], traj[SFT]["mean"]["quality"][0], abs_tol=1e-9)
    pilot_vs_sft = {k: _iv(boot.interval(i, level)) for i, (kind, _, k) in enumerate(columns) if kind == "pilot_vs_sft"}

    return {
        "conditions": conditions,
        "prompts_per_seed": [len(f) for f in feats],
        "trajectories": traj,
        "human": human,
        "comparisons": comps,
        "pilot_vs_sft": pilot_vs_sft,
        "diversity": diversity,
        "metric_names": metric_names,
        "post_hoc": _post_hoc_power(evals, design, comps),
        "bvw": _bvw(result, metric_names, layout),
        "weights": _weights(result),
    }


def _iv(iv: Interval) -> dict:
    return {"estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "level": iv.level, "se": iv.se}


def interval(d: dict) -> Interval:
    return Interval(d["estimate"], d["lo"], d["hi"], d["level"], d["se"])


def _reference_stats(evals, method, seeds, metric_names, layout: MetricLayout) -> dict:
    """Mean and std over seeds of a reference row (human responses) from its own per-prompt rows."""
    vals = {k: [] for k in metric_names}
    for s in seeds:
        rows = list(_rows(evals, method, s, 0).values())
        f = layout.features(rows)
        f = f[np.isfinite(f).all(axis=1)]
        if not len(f):
            continue
        m = layout.metrics(f.mean(axis=0))
        for k in metric_names:
            vals[k].append(float(m[k]))
    stats = {k: seed_stats(v) for k, v in vals.items()}
    return {"mean": {k: st[0] for k, st in stats.items()}, "std": {k: st[1] for k, st in stats.items()}}


def _post_hoc_power(evals, design, comps) -> dict | None:
    """The detectable difference from the first comparison's own final-checkpoint differences (after the fact)."""
    if not comps:
        return None
    metric = primary_metric(evals, design["statistics"]["primary_metric"])
    new, base = comps[0]["new"], comps[0]["base"]
    diffs = paired_differences(
        evals, design["seeds"], (new, max(steps_of(evals, new))), (base, max(steps_of(evals, base))), metric
    )
    vc = VarianceComponents.from_differences(diffs)
    p, s = min(len(d) for d in diffs), len(diffs)
    st = design["statistics"]
    return {
        "new": new,
        "base": base,
        "metric": metric,
        "within": vc.within,
        "between": vc.between,
        "detectable": vc.detectable_difference(p, s, 1 - st["level"], st["power"]),
        "n_prompts": p,
        "n_seeds": s,
    }


def _bvw(result: dict, metric_names: list[str], layout: MetricLayout) -> dict | None:
    design, evals = result["design"], result["evals"]
    if not design["bvw_methods"] or not design["bvw_seeds"]:
        return None
    labels = [f"{m}@{design['bvw_pairing']}" for m in design["bvw_methods"]]
    conditions = [(lab, max(steps_of(evals, lab))) for lab in labels]
    seeds = design["bvw_seeds"]
    feats = seed_features(evals, conditions, seeds, layout)
    per_seed = _seed_metrics(feats, len(conditions), layout)
    table = {
        lab: {
            "mean": {k: seed_stats(per_seed[k][:, i])[0] for k in metric_names},
            "std": {k: seed_stats(per_seed[k][:, i])[1] for k in metric_names},
        }
        for i, lab in enumerate(labels)
    }
    keys = [k for k, _ in DIVERSITY if k in metric_names] + ["quality"]
    cols = [(j, k) for j in range(len(design["bvw_comparisons"])) for k in keys]

    def statistic(means):
        x = means.reshape(*means.shape[:-1], len(conditions), -1)
        avg = {k: v.mean(axis=-2) for k, v in layout.metrics(x).items()}
        outs = []
        for j, k in cols:
            new, base = design["bvw_comparisons"][j]
            a, b = labels.index(f"{new}@{design['bvw_pairing']}"), labels.index(f"{base}@{design['bvw_pairing']}")
            outs.append(avg[k][..., a] - avg[k][..., b])
        return np.stack(outs, axis=-1)

    boot = hierarchical_bootstrap(feats, statistic, n_boot=design["statistics"]["n_boot"], seed=1)
    comps = [{"new": n, "base": b, "final": {}} for n, b in design["bvw_comparisons"]]
    for i, (j, k) in enumerate(cols):
        comps[j]["final"][k] = _iv(boot.interval(i, design["statistics"]["level"]))
    return {
        "labels": labels,
        "steps": [c[1] for c in conditions],
        "seeds": seeds,
        "table": table,
        "comparisons": comps,
        "prompts_per_seed": [len(f) for f in feats],
    }


def _weights(result: dict) -> list[dict]:
    """The measured mean chosen weight of each weighted run and the lr each control derived from it."""
    out = []
    for r in result["runs"]:
        if "mean_chosen_weight" in r or "lr_scale" in r:
            keys = ("method", "seed", "lr", "mean_chosen_weight", "lr_scale", "lr_scale_from")
            out.append({k: r.get(k) for k in keys})
    return out


# ----------------------------------------------------------------------------------------------- plots


def _row_of(design: dict, method: str) -> int:
    objective = design["methods"][method]["overrides"].get("loss.objective", "dpo")
    return 1 if objective in ("orpo", "dorpo") else 0


def plot_trajectories(analysis: dict, design: dict, path: Path) -> Path:
    traj = analysis["trajectories"]
    curves = [
        Curve(
            m,
            t["mean"]["quality"],
            {k: t["mean"][k] for k, _ in analysis["diversity"]},
            x_std=t["std"]["quality"],
            y_std={k: t["std"][k] for k, _ in analysis["diversity"]},
            row=_row_of(design, m),
        )
        for m, t in traj.items()
        if m != SFT
    ]
    sft = traj[SFT]
    curves.append(
        Curve(
            "SFT (start)",
            sft["mean"]["quality"],
            {k: sft["mean"][k] for k, _ in analysis["diversity"]},
            x_std=sft["std"]["quality"],
            y_std={k: sft["std"][k] for k, _ in analysis["diversity"]},
            reference=True,
        )
    )
    h = analysis["human"]
    curves.append(
        Curve(
            "human",
            [h["mean"]["quality"]],
            {k: [h["mean"][k]] for k, _ in analysis["diversity"]},
            x_std=[h["std"]["quality"]],
            y_std={k: [h["std"][k]] for k, _ in analysis["diversity"]},
            reference=True,
        )
    )
    return plot_frontier(
        curves,
        [(k, n) for k, n in analysis["diversity"]],
        path,
        x_label="quality (generator ground truth)",
        title="Quality-diversity frontier: SFT start, then each evaluated checkpoint "
        "(mean over seeds, band = +- 1 seed std)",
        row_titles=["DPO family", "ORPO family"],
    )


def plot_intervals(analysis: dict, path: Path) -> Path:
    """Forest plot: each comparison's difference per diversity metric with its interval, at matched quality
    (circles) and at equal steps (grey squares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = analysis["comparisons"]
    panels = analysis["diversity"]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.0 * len(panels), 0.55 * len(comps) + 1.8), dpi=110, squeeze=False
    )
    for ax, (k, name) in zip(axes[0], panels):
        for i, c in enumerate(comps):
            for kind, dy, marker, color, label in (
                ("matched", -0.15, "o", "black", "matched quality"),
                ("final", 0.15, "s", "gray", "equal steps (final)"),
            ):
                iv = c[kind][k]
                # A percentile interval need not contain the point estimate (tiny or skewed data): clip the bars.
                xerr = [[max(0.0, iv["estimate"] - iv["lo"])], [max(0.0, iv["hi"] - iv["estimate"])]]
                ax.errorbar(
                    iv["estimate"],
                    i + dy,
                    xerr=xerr,
                    fmt=marker,
                    capsize=3,
                    color=color,
                    label=label if i == 0 else None,
                )
        ax.axvline(0.0, color="gray", linewidth=0.8)
        ax.set_yticks(range(len(comps)), [f"{c['new']} - {c['base']}" for c in comps])
        ax.invert_yaxis()
        ax.set_xlabel(f"{name} difference (new - baseline)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    level = comps[0]["final"]["quality"]["level"]
    fig.suptitle(f"Diversity differences with {100 * level:.0f}% paired bootstrap intervals", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- report


def _direction(iv: Interval) -> str:
    """An interval of a difference in words: the sign only when the whole interval has it."""
    if iv.lo > 0:
        return "an increase"
    if iv.hi < 0:
        return "a decrease"
    return "no change detectable at this power"


def _f(x, digits=4) -> str:
    return "-" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def _load_note(result: dict) -> str:
    """Did other jobs share the CPU? The 1-minute load average at each phase end (the workers' own load is
    their number) and how busy the workers kept the cores: CPU time / (wall time x workers)."""
    workers, loads = result["workers"], result.get("load_phase_ends") or [result["load_end"][0]]
    busy = sum(result["cpu_s"].values()) / (result["phases"]["total_s"] * workers)
    shared = max(loads) > workers + 0.5
    return (
        f"Load average at the phase ends {', '.join(f'{x:.1f}' for x in loads)}; the workers' CPU time was "
        f"{100 * busy:.0f}% of wall time x workers"
        + (": other jobs shared the CPU, so the times are pessimistic." if shared else ": nothing else ran.")
    )


def _setup_lines(result: dict) -> list[str]:
    design, rec, v = result["design"], result["recipe"], result["versions"]
    ph, cpu = result["phases"], result["cpu_s"]
    pub = design["pairings"]["published"]
    pairing = ", ".join(f"`{k}={val}`" for k, val in pub.items())
    methods = design["methods"]
    ev = rec["eval"]
    g = generator_facts()
    model = result["model"]
    prompt_term, seed_term = result["power"]["within"] / result["power"]["n_prompts"], result["power"]["between"]
    lines = [
        f"- Command: `{result['command']}`",
        f"- Design: `{os.path.relpath(design['path'], Path(design['recipe']).parent.parent)}`, recipe "
        f"`{os.path.relpath(design['recipe'], Path(design['recipe']).parent.parent)}`; seeds "
        f"{', '.join(map(str, design['seeds']))} (seed = data split and so the held-out prompts, pair sampling, row "
        "shuffling, sampling seed; the SFT checkpoint is trained once and shared"
        + (", here given with --sft" if result.get("sft_given") else "")
        + ").",
        f"- Versions: engine {v['engine']}, commit {v['engine_commit']}, torch {v['torch']}, transformers "
        f"{v['transformers']}, numpy {v['numpy']}, Python {v['python']}",
        f"- Machine: {v['cpu_model']}, {v['cpu_count']} CPU cores visible, {v['platform']}; {result['workers']} worker "
        f"process(es) with one torch thread each. {_load_note(result)}",
        f"- Wall time: **{ph['total_s'] / 60:.1f} min** (phase 0: SFT and embedding warm-up {ph['phase0_s']:.0f} s; "
        f"phase 1, pilot {ph['phase1_s']:.0f} s; phase 2 {ph['phase2_s']:.0f} s). CPU time: SFT {cpu['sft']:.0f} s, "
        f"warm-up and human references {cpu['warmup']:.0f} s, preference training {cpu['runs_train']:.0f} s, "
        f"evaluation {cpu['evals']:.0f} s.",
        "",
        "## Setup",
        "",
        f"- Data: the bundled generator (`engine/data/synthetic.py`), {rec['data']['synthetic_prompts']} prompts "
        f"(synthetic_seed {rec['data']['synthetic_seed']}), 4-10 responses each, "
        f"{100 * rec['data']['val_fraction']:.0f}% of the prompts held out per seed, "
        f"{g['min_responses']}-{g['max_responses']} responses per prompt. Each response has a theme "
        f"({', '.join(THEMES)}), a style ({', '.join(STYLES)}) and a true quality (vivid vs filler words, length, "
        f"coherence). Upvotes = {g['quality_slope']:g} x quality + {g['theme_bonus']:g} if the theme is "
        f"'{POPULAR_THEME}' + {g['style_bonus']:g} if the style is '{POPULAR_STYLE}' + noise (sd {g['noise_sd']:g}), "
        f"and '{POPULAR_THEME}'/'{POPULAR_STYLE}' are also the most frequent (written with probability "
        f"{g['theme_freq'][POPULAR_THEME]:g} / {g['style_freq'][POPULAR_STYLE]:g}), so upvote-ranked pairs prefer "
        "the popular theme/style beyond what quality explains.",
        f"- Model: `{model['name']}` ({model['architecture']}, {model['layers']} layers, hidden {model['hidden']}, "
        f"vocab {model['vocab']}, {model['parameters'] / 1e6:.2f}M parameters), the SFT start of every run.",
        "- SFT (the shared start, step 0 of every trajectory): "
        + ", ".join(f"`{k}={val}`" for k, val in design["sft"].items())
        + ".",
        f"- Pairs: the published pairing ran as {pairing} (the engine's `gap` pairs: random disjoint pairs per prompt "
        f"whose upvotes differ by >= {rec['data']['min_gap']}, then leftovers with different scores); DivPO on its own "
        f"pairs ({', '.join(f'`{k}={val}`' for k, val in design['pairings']['divpo'].items())}, rho "
        f"{rec['data']['divpo_rho']}); the second table on "
        + ", ".join(f"`{k}={val}`" for k, val in design["pairings"].get(design["bvw_pairing"], {}).items())
        + ".",
        f"- Preference runs (`{Path(design['recipe']).name}`): {rec['optim']['max_steps']} optimizer steps, "
        f"{rec['data']['rows_per_batch']} packed row(s) of <= {rec['data']['max_tokens_per_row']} tokens per step "
        f"(both sequences of a pair in one row), lr {rec['optim']['lr']} "
        f"with {rec['optim']['schedule']} schedule and {rec['optim']['warmup_ratio']} warmup, DPO-family beta "
        f"{rec['loss']['beta']}; deviation embedders {rec['deviation']['semantic_model'] or '-'} + "
        f"{rec['deviation']['style_model']} (offline stand-ins for the published ones). Methods: "
        + "; ".join(
            f"{name}: "
            + ", ".join(f"`{k}={val}`" for k, val in m["overrides"].items())
            + (
                f", lr x the measured mean chosen weight of {m['lr_times_mean_weight_of']}"
                if m["lr_times_mean_weight_of"]
                else ""
            )
            for name, m in methods.items()
        )
        + ".",
        f"- Checkpoints: {design['checkpoints']} per run, every {rec['optim']['max_steps'] // design['checkpoints']} "
        "steps (the last is the final model), each evaluated; the SFT start is step 0.",
        f"- Evaluation (`engine.evaluate`): the first {ev['num_prompts']} held-out prompts (by prompt id) of each "
        f"seed's split, never trained on, the same for every method and checkpoint; {ev['n_samples']} samples each, "
        f"temperature {ev['temperature']}, top-p {ev['top_p']}, top-k {ev['top_k']}, repetition penalty "
        f"{ev['repetition_penalty']}, at most {ev['max_new_tokens']} new tokens, sampling seed = the run's seed. "
        "Quality, theme and style of each sample from the generator's ground truth (`classify`); semantic (MiniLM) "
        "and style (stylometric) diversity are within each prompt's samples, then averaged over prompts; theme and "
        "style entropy over all samples of a run. 'human' scores random human responses of the same prompts.",
        f"- Statistics (`engine.compare`): paired hierarchical bootstrap, {design['statistics']['n_boot']} replicates: "
        "draw seeds with replacement, then each drawn seed's prompts with replacement; every condition evaluated on "
        "a prompt moves with it, so differences are paired by prompt and seed. "
        f"{100 * design['statistics']['level']:.0f}% percentile intervals. Matched quality: each method's trajectory "
        "(seed means per checkpoint, SFT first) is interpolated linearly, at its first crossing in training order, "
        f"at the quality {100 * design['statistics']['matched_quality_fraction']:.0f}% of the way from the SFT "
        "start to the highest quality both trajectories reach; the level and the interpolation are redone inside "
        "every bootstrap replicate. Where prompt noise dominates the seed-to-seed spread, the two-stage bootstrap "
        "counts the prompt noise about twice and its intervals are conservative; with few seeds and a large seed "
        "spread they run somewhat narrow (tests/test_compare.py measures both). In this run's pilot the prompt "
        f"term of a seed mean (within / prompts = {prompt_term:.3g}) is "
        f"{'larger' if prompt_term > seed_term else 'not larger'} than the seed term ({seed_term:.3g}). "
        "Verdict: 'a win' when the "
        "whole interval of (new - baseline) diversity is above 0, 'a loss' when below, else 'cannot tell at this "
        "power'.",
        "",
        "### Fixed before the comparison",
        "",
        f"- The synthetic generator, its popularity bias (+{g['theme_bonus']:g} upvotes for '{POPULAR_THEME}', "
        f"+{g['style_bonus']:g} for '{POPULAR_STYLE}') and the evaluation metrics are those of the first version of "
        "this experiment, unchanged.",
        "- Changes of design from the first version, each for a reason that does not come from a comparison's "
        "result: the published pairing instead of best-vs-worst (the paper's pairing, where several pairs per "
        "prompt let the weight choose between them); more prompts with a larger held-out share, so every seed has "
        "the evaluation prompts the power estimate asks for, and more seeds (the design's power, below); "
        "checkpoints along training (comparison at matched quality); the two learning-rate controls (the mean "
        "weight confound); evaluation prompts in batches of "
        f"{ev['batch_size']} (speed; it changes the sampling random stream, equally for every run).",
        *(
            [
                f"- This version changes only the numbers of seeds and prompts ({len(design['seeds'])} seeds x "
                f"{ev['num_prompts']} prompts), chosen from the variance components of the {basis['source']} and the "
                "45-minute budget: the between-seed term was larger than the prompt term, so at equal evaluation "
                "cost seeds buy more power than prompts (the choice and its cost model are in "
                "`experiments/method.yaml`). The previous version's comparison was run and read before this choice "
                "(its document is in the git history); the choice uses only its pilot's variance components and "
                "the time budget.",
            ]
            if (basis := design["statistics"].get("design_basis"))
            else []
        ),
        "- The learning rate, steps, beta and SFT recipe are those of the first version (chosen there before any "
        "DDPO/DORPO comparison) and were not retuned.",
    ]
    return lines


def _power_lines(result: dict, analysis: dict) -> list[str]:
    p = result["power"]
    met = p["metric"].replace("_", " ")
    ok = p["detectable"] <= p["target"]
    grid = p["grid"]
    lines = [
        "## Power (estimated after the pilot, before the comparison ran)",
        "",
        f"Pilot: the SFT start and {p['pilot']} (final checkpoint, step {p['pilot_step']}) on every seed, written to "
        f"`power.json` at {p['written_at']} before any other method trained. From the per-prompt paired differences "
        f"{p['pilot']} - SFT of {met}: within-seed variance {p['within']:.3g} per prompt, between-seed variance "
        f"{p['pilot_between']:.3g} (one trained model), taken twice ({p['between']:.3g}) for a difference of two "
        "trained methods. With the bootstrap test above (two-sided "
        f"{100 * p['alpha']:.0f}%, power {100 * p['power']:.0f}%), this design of {p['n_prompts']} prompts x "
        f"{result['recipe']['eval']['n_samples']} samples x {p['n_seeds']} seeds detects a {met} difference of "
        f"**{p['detectable']:.4f}** (target: at most {p['target']}: {'met' if ok else 'NOT met'}); a true difference "
        f"of {p['target']} would be detected with probability {p['power_at_target']:.2f}."
        + (
            f" The design was chosen before this run from the {b['source']} (within {b['within']:.3g}, between "
            f"{b['between']:.3g}), which predicted {b['detectable']:.4f} for it."
            if (b := p.get("design_basis"))
            else ""
        ),
        "",
        "| prompts per seed \\ seeds | " + " | ".join(map(str, grid["seeds"])) + " |",
        "|" + "---|" * (1 + len(grid["seeds"])),
    ]
    for i, n in enumerate(grid["prompts"]):
        lines.append(f"| {n} | " + " | ".join(f"{x:.4f}" for x in grid["detectable"][i]) + " |")
    need = p.get("seeds_for_target")
    if not ok and need:
        cpu, seeds = result["cpu_s"], p["n_seeds"]
        per_seed = (cpu["runs_train"] + cpu["evals"]) / seeds
        fixed = cpu["sft"] + cpu["warmup"]
        lines += [
            "",
            f"Meeting the target at {p['n_prompts']} prompts per seed takes {need} seeds. At this run's measured CPU "
            f"time per seed ({per_seed:.0f} s: every method trained and evaluated, the best-vs-worst runs spread "
            f"over the seeds) plus its fixed part ({fixed:.0f} s), that is at least "
            f"{(fixed + per_seed * need) / result['workers'] / 60:.0f} min of wall time with {result['workers']} "
            "workers (CPU time / workers), against this run's "
            f"{(fixed + per_seed * seeds) / result['workers'] / 60:.0f} min by the same count.",
        ]
    ph = analysis["post_hoc"]
    if ph:
        lines += [
            "",
            f"After the fact, from the comparison's own final-checkpoint differences {ph['new']} - "
            f"{ph['base']} (within {ph['within']:.3g}, between {ph['between']:.3g}): detectable "
            f"{ph['metric'].replace('_', ' ')} difference {ph['detectable']:.4f} at {ph['n_prompts']} "
            f"prompts x {ph['n_seeds']} seeds.",
        ]
    return lines


def _trajectory_table(analysis: dict) -> list[str]:
    keys = ["quality"] + [k for k, _ in analysis["diversity"]] + [k for k, _ in EXTRA if k in analysis["metric_names"]]
    names = dict(DIVERSITY + EXTRA + (("quality", "quality"),))
    lines = ["| method | step | " + " | ".join(names[k] for k in keys) + " |", "|" + "---|" * (2 + len(keys))]
    for m, t in analysis["trajectories"].items():
        for i, step in enumerate(t["steps"]):
            if m != SFT and step == 0:
                continue  # the SFT row
            lines.append(
                f"| {m} | {step} | " + " | ".join(fmt_mean_std(t["mean"][k][i], t["std"][k][i], 3) for k in keys) + " |"
            )
    h = analysis["human"]
    lines.append(
        "| human (random) | - | " + " | ".join(fmt_mean_std(h["mean"][k], h["std"][k], 3) for k in keys) + " |"
    )
    return lines


def _comparison_lines(analysis: dict) -> list[str]:
    div = analysis["diversity"]
    lines = [
        "| comparison | matched quality | "
        + " | ".join(f"{n} (matched)" for _, n in div)
        + " | "
        + " | ".join(f"{n} (final)" for _, n in div)
        + " | quality (final) |",
        "|" + "---|" * (3 + 2 * len(div)),
    ]
    for c in analysis["comparisons"]:
        matched = c.get("matched", {})
        lv = c["level"]["quality"]
        cells = [f"{c['new']} - {c['base']}", f"{_f(c['q_star'])} [{_f(lv['lo'])}, {_f(lv['hi'])}]"]
        cells += [
            f"{interval(matched[k]).fmt()}: {interval(matched[k]).verdict()}" if k in matched else "-" for k, _ in div
        ]
        cells += [f"{interval(c['final'][k]).fmt()}: {interval(c['final'][k]).verdict()}" for k, _ in div]
        cells.append(interval(c["final"]["quality"]).fmt())
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdict_lines(analysis: dict, result: dict) -> list[str]:
    lines = []
    pv = analysis["pilot_vs_sft"]
    pilot = result["design"]["statistics"]["pilot"]
    theme, style = f"theme_share/{POPULAR_THEME}", f"style_share/{POPULAR_STYLE}"
    t = analysis["trajectories"]
    if theme in pv:
        lines.append(
            f"- **Does plain {pilot} concentrate?** Share of the popular theme '{POPULAR_THEME}' among samples, SFT "
            f"{_f(t[SFT]['mean'][theme][0], 3)} -> {pilot} {_f(t[pilot]['mean'][theme][-1], 3)}: "
            f"{interval(pv[theme]).fmt(3)}, {_direction(interval(pv[theme]))}; popular style '{POPULAR_STYLE}': "
            f"{interval(pv[style]).fmt(3)}, {_direction(interval(pv[style]))}; theme entropy "
            f"{interval(pv['theme_entropy_overall']).fmt(3)}, {_direction(interval(pv['theme_entropy_overall']))}"
            + (
                f"; semantic diversity {interval(pv['semantic_diversity']).fmt(3)}, "
                f"{_direction(interval(pv['semantic_diversity']))}"
                if "semantic_diversity" in pv
                else ""
            )
            + f"; quality {interval(pv['quality']).fmt(3)}, {_direction(interval(pv['quality']))}."
        )
    for c in analysis["comparisons"]:
        matched = c.get("matched", {})
        parts = [
            f"{n} {interval(matched[k]).fmt()}: **{interval(matched[k]).verdict()}**"
            for k, n in analysis["diversity"]
            if k in matched
        ]
        note = ""
        if c["q_star_is_start"]:
            note = (
                " The highest quality both reach is the SFT start itself (one of them never trains above it), "
                "so the matched difference is 0 by construction; read the equal-steps columns."
            )
        lines.append(
            f"- **{c['new']} vs {c['base']} at matched quality {c['q_star']:.4f}**: " + "; ".join(parts) + "." + note
        )
    return lines


def _discussion_lines(analysis: dict, result: dict) -> list[str]:
    t = analysis["trajectories"]
    theme = f"theme_share/{POPULAR_THEME}"
    lines = [
        "- The controls. With Adam, multiplying every gradient by one constant leaves the update unchanged (the "
        "step is normalised by the gradient's running scale; only epsilon and clipping see the constant), so DDPO's "
        "mean weight below 1 does not by itself shrink its steps; what it changes is the relative weight of pairs "
        "within and across batches. 'lr x mean weight' is the explicit version of 'weighted less': a control that "
        "moves like its base says the step size matters at this scale; a weighted run that differs from its "
        "control shows the effect of weighting differently.",
        "- Matched quality. A method that trains less far stays nearer to the SFT start, which is more diverse; "
        "comparing at the quality both reach removes that advantage. The equal-steps columns are the comparison "
        "the first version made.",
        "- DORPO's weight also scales the NLL term on the chosen responses (the mean weight multiplies it), which "
        "by itself moves the model towards the chosen, popular distribution less strongly.",
    ]
    lines.append(
        "- How far each method moved quality from the SFT start by its final checkpoint (seed means): "
        + ", ".join(
            f"{m} {v['mean']['quality'][-1] - t[SFT]['mean']['quality'][0]:+.3f}" for m, v in t.items() if m != SFT
        )
        + ". A method that barely moves leaves its comparison little quality range to match along."
    )
    collapsed = [m for m, v in t.items() if m != SFT and theme in v["mean"] and v["mean"][theme][-1] >= COLLAPSED_SHARE]
    if collapsed:
        lines.append(
            f"- Theme collapse: {', '.join(collapsed)} put at least {100 * COLLAPSED_SHARE:.0f}% of their final "
            f"samples on '{POPULAR_THEME}'; "
            "there theme entropy can no longer separate methods and the differences show in style diversity and "
            "style entropy."
        )
    degenerate = [
        (m, v["mean"]["style_share/none"][-1])
        for m, v in t.items()
        if "style_share/none" in v["mean"] and v["mean"]["style_share/none"][-1] > DEGENERATE_SHARE
    ]
    if degenerate:
        lines.append(
            "- Degenerate samples (no recognisable style, usually lists of on-theme and vivid words) at the final "
            "checkpoint: " + ", ".join(f"{m} {x:.2f}" for m, x in degenerate) + ". The ground-truth quality rewards "
            "vivid, on-theme word density and length, so such text can still score high quality."
        )
    lines.append(
        f"- Scale: a {result['model']['parameters'] / 1e6:.2f}M-parameter model and "
        f"{result['recipe']['optim']['max_steps']} steps on synthetic data. What transfers is the mechanism "
        "(popularity-biased pairs concentrate a DPO-tuned model; weighting can push back), not the effect sizes."
    )
    return lines


def _bvw_lines(analysis: dict) -> list[str]:
    b = analysis["bvw"]
    if not b:
        return []
    keys = ["quality"] + [k for k, _ in analysis["diversity"]] + [f"theme_share/{POPULAR_THEME}"]
    names = dict(DIVERSITY + EXTRA + (("quality", "quality"),))
    lines = [
        "## Second table: best-vs-worst pairs (one pair per prompt)",
        "",
        f"Final checkpoint (step {b['steps'][0]}) only, seeds {', '.join(map(str, b['seeds']))}, "
        f"{min(b['prompts_per_seed'])} prompts per seed: compared at equal steps, not along a frontier, and with "
        "fewer seeds, so with less power than the main table.",
        "",
        "| run | " + " | ".join(names[k] for k in keys) + " |",
        "|" + "---|" * (1 + len(keys)),
    ]
    for lab in b["labels"]:
        row = b["table"][lab]
        lines.append(f"| {lab} | " + " | ".join(fmt_mean_std(row["mean"][k], row["std"][k], 3) for k in keys) + " |")
    lines += [
        "",
        "| comparison | " + " | ".join(n for _, n in analysis["diversity"]) + " | quality |",
        "|" + "---|" * (2 + len(analysis["diversity"])),
    ]
    for c in b["comparisons"]:
        cells = [
            f"{interval(c['final'][k]).fmt()}: {interval(c['final'][k]).verdict()}" for k, _ in analysis["diversity"]
        ]
        cells.append(interval(c["final"]["quality"]).fmt())
        lines.append(f"| {c['new']} - {c['base']} | " + " | ".join(cells) + " |")
    return lines


def _runs_lines(result: dict) -> list[str]:
    evals = result["evals"]
    lines = [
        "| run | seed | lr | mean chosen weight | train pairs | first loss | final loss | reference | train s | "
        "eval s (all checkpoints) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["method"], r["seed"])):
        s = r["summary"]
        ev = sum(e["eval_s"] for e in evals if e["method"] == r["method"] and e["seed"] == r["seed"])
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['lr']:.3g} | {_f(r.get('mean_chosen_weight'), 3)} | "
            f"{s.get('pairs', '-')} "
            f"| {_f(s.get('first_loss'))} | {_f(s.get('final_loss'))} | {s.get('reference', '-')} | {r['train_s']:.0f} "
            f"| {ev:.0f} |"
        )
    return lines


def write_report(result: dict, doc: Path) -> Path:
    """EXPERIMENTS.md and its two plots (<stem>_frontier.png, <stem>_intervals.png) next to it."""
    analysis = analyze(result)
    design = result["design"]
    frontier = plot_trajectories(analysis, design, doc.parent / f"{doc.stem}_frontier.png")
    forest = plot_intervals(analysis, doc.parent / f"{doc.stem}_intervals.png")
    quick = result["quick"]
    L = [
        "# Experiment: deviation-weighted objectives vs DPO / ORPO / DivPO along the quality-diversity frontier",
        "",
        "Generated by `experiments/method.py` (`make experiment`); do not edit by hand, rerun the command. Every "
        "number and every verdict word below is computed from this run's evaluations."
        + (
            " **This is the --quick smoke version: tiny data, a few steps, a tiny evaluation; the numbers mean "
            "nothing.**"
            if quick
            else ""
        ),
        "",
        *_setup_lines(result),
        "",
        *_power_lines(result, analysis),
        "",
        "## Results",
        "",
        f"![quality-diversity frontier]({os.path.relpath(frontier, doc.parent)})",
        "",
        "### Comparisons at matched quality and at equal steps",
        "",
        f"Difference new - baseline with its {100 * design['statistics']['level']:.0f}% paired bootstrap interval "
        "and the verdict it supports (higher = more diverse for all three metrics). 'Matched quality' is the "
        "ground-truth quality level the differences are read at (with its interval: the level is re-chosen in "
        f"every bootstrap replicate). Prompts per seed: "
        f"{', '.join(map(str, analysis['prompts_per_seed']))}.",
        "",
        *_comparison_lines(analysis),
        "",
        f"![differences at matched quality]({os.path.relpath(forest, doc.parent)})",
        "",
        "### Verdicts",
        "",
        *_verdict_lines(analysis, result),
        "",
        "### Trajectories (mean +- sample std over seeds)",
        "",
        *_trajectory_table(analysis),
        "",
        "### Measured mean chosen weights and the controls' learning rates",
        "",
        "| run | seed | lr | mean chosen weight (mean of the logged per-step mean) | lr scale (from) |",
        "|---|---|---|---|---|",
        *[
            f"| {w['method']} | {w['seed']} | {w['lr']:.4g} | {_f(w.get('mean_chosen_weight'), 4)} | "
            + (f"{w['lr_scale']:.4f} ({w['lr_scale_from']})" if w.get("lr_scale") is not None else "-")
            + " |"
            for w in sorted(analysis["weights"], key=lambda w: (w["method"], w["seed"]))
        ],
        "",
        *_bvw_lines(analysis),
        "",
        "## Discussion",
        "",
        *_discussion_lines(analysis, result),
        "",
        "## Per-run details",
        "",
        *_runs_lines(result),
        "",
        f"Raw outputs: `{result.get('out', 'runs/experiment')}/<run>/seed<k>/` (config, metrics.jsonl, final/, "
        "eval/step-<n>/generations.jsonl and metrics.json), `power.json` and `results.json` there.",
        "",
    ]
    atomic_write(doc, "\n".join(L))
    return doc
