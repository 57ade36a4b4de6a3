"""Comparing evaluated runs: the one implementation of the statistics and the plot that reports use.

The last stop of the flow, after `engine.evaluate` has scored each prompt's samples. Both
`python -m engine.evaluate compare` and the method experiment (`python -m experiments.method`) read
their numbers from here, so a mean, a spread, an interval or a plot means the same in both:

- `seed_stats`: mean and sample standard deviation (ddof 1) over seeds.
- `MetricLayout`: per-prompt rows of `metrics.json` -> a feature matrix whose prompt means give back
  every report metric, including pooled ones (theme/style entropy over all samples of a run).
- `hierarchical_bootstrap`: the paired two-stage bootstrap over seeds, then prompts within a seed
  (Davison & Hinkley 1997, sec. 3.8; Saravanan et al. 2020). Conditions evaluated on the same prompts
  of a seed are resampled together, so differences are paired. `Interval.verdict` turns a 95% interval
  of a difference into "a win", "a loss" or "cannot tell at this power".
- `VarianceComponents` / `detectable_difference`: the power of that test for a design of P prompts x
  S seeds, from a pilot's paired per-prompt differences.
- `crossing` / `matched_level`: diversity at a matched quality (the highest quality two trajectories
  both reach), by linear interpolation along a training trajectory of (quality, diversity) checkpoints.
- `plot_frontier`: diversity against quality, one curve per run (a single evaluated point for a
  plain run, a trajectory for a run evaluated at several checkpoints), with seed bands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from engine.fileio import save_figure
from engine.metrics import NONE_LABEL

WIN, LOSS, UNDECIDED = "a win", "a loss", "cannot tell at this power"


# ------------------------------------------------------------------------------------- over seeds


def seed_stats(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1, n) of the finite values; std is NaN for fewer than 2 values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def fmt_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """ "m +- s", or "m" alone when the spread is undefined (one seed); "-" for a missing value."""
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None and math.isfinite(std) else "")


# ---------------------------------------------------------------------------------- per-prompt rows


def normalized_entropy_of_shares(shares: np.ndarray) -> np.ndarray:
    """Entropy of share vectors [..., K] over their K categories, renormalised, divided by log K.

    Same value as `engine.metrics.normalized_entropy` on the pooled labels: unlabelled samples are
    not among the K columns, and the shares are renormalised over the labelled ones. 0 where no
    sample is labelled.
    """
    s = np.asarray(shares, dtype=np.float64)
    k = s.shape[-1]
    total = s.sum(axis=-1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    h = -(p * logs).sum(axis=-1)
    return np.maximum(0.0, h / math.log(k)) if k > 1 else np.zeros_like(h)


@dataclass(frozen=True)
class MetricLayout:
    """Which per-prompt values a comparison resamples, and how their prompt means give the metrics.

    `scalars` are averaged over prompts, as `engine.evaluate` summarises a run. Each entry of `shares`
    (e.g. "theme" -> the generator's THEMES) reads the per-prompt `<name>_share` dicts, its labels plus
    the unlabelled share `none`; the prompt mean of those is the share over all samples of the run
    (every prompt has the same number of samples), from which come `<name>_entropy_overall` (over the
    labels, as `engine.metrics.normalized_entropy`) and `<name>_share/<label>` (and `/none`).
    """

    scalars: tuple[str, ...]
    shares: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def columns(self) -> list[str]:
        cols = list(self.scalars)
        for name, labels in self.shares:
            cols += [f"{name}_share/{lab}" for lab in (*labels, NONE_LABEL)]
        return cols

    @property
    def metric_names(self) -> list[str]:
        names = list(self.scalars)
        for name, labels in self.shares:
            names += [f"{name}_entropy_overall"] + [f"{name}_share/{lab}" for lab in (*labels, NONE_LABEL)]
        return names

    def features(self, rows: Sequence[Mapping]) -> np.ndarray:
        """[P, F] per-prompt values; NaN where a row lacks a value."""
        out = np.full((len(rows), len(self.columns)), np.nan)
        for i, row in enumerate(rows):
            for j, k in enumerate(self.scalars):
                v = row.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    out[i, j] = float(v)
            j = len(self.scalars)
            for name, labels in self.shares:
                shares = row.get(f"{name}_share")
                for lab in (*labels, NONE_LABEL):
                    if isinstance(shares, Mapping) and lab in shares:
                        out[i, j] = float(shares[lab])
                    j += 1
        return out

    def metrics(self, means: np.ndarray) -> dict[str, np.ndarray]:
        """Prompt means [..., F] -> {metric: [...]}: scalars as they are, entropies from the pooled shares."""
        means = np.asarray(means, dtype=np.float64)
        out = {k: means[..., j] for j, k in enumerate(self.scalars)}
        j = len(self.scalars)
        for name, labels in self.shares:
            block = means[..., j : j + len(labels) + 1]
            out[f"{name}_entropy_overall"] = normalized_entropy_of_shares(block[..., :-1])
            for i, lab in enumerate((*labels, NONE_LABEL)):
                out[f"{name}_share/{lab}"] = block[..., i]
            j += len(labels) + 1
        return out


# ----------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate [K] on the data as observed and the bootstrap replicates [B, K]."""

    point: np.ndarray
    samples: np.ndarray

    def interval(self, k: int = 0, level: float = 0.95) -> Interval:
        col = self.samples[:, k]
        col = col[np.isfinite(col)]
        lo, hi = np.quantile(col, [(1 - level) / 2, (1 + level) / 2]) if len(col) else (np.nan, np.nan)
        return Interval(
            float(self.point[k]),
            float(lo),
            float(hi),
            level,
            float(np.std(col, ddof=1)) if len(col) > 1 else float("nan"),
        )


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval of a difference (new - baseline) with its bootstrap standard error."""

    estimate: float
    lo: float
    hi: float
    level: float = 0.95
    se: float = float("nan")

    def verdict(self, higher_is_better: bool = True) -> str:
        """ "a win" when the whole interval favours the new condition, "a loss" when it favours the
        baseline, else "cannot tell at this power" (the interval contains 0)."""
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return UNDECIDED
        if self.lo > 0:
            return WIN if higher_is_better else LOSS
        if self.hi < 0:
            return LOSS if higher_is_better else WIN
        return UNDECIDED

    def fmt(self, digits: int = 4) -> str:
        pct = f"{100 * self.level:.0f}%"
        return f"{self.estimate:+.{digits}f} [{pct} CI {self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def _prompt_weights(rng: np.random.Generator, n_prompts: int, n_draws: int) -> np.ndarray:
    """[n_draws, P] resampling weights: multinomial counts of P draws with replacement, divided by P."""
    return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_draws) / n_prompts


def hierarchical_bootstrap(
    features: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> BootstrapResult:
    """Two-stage bootstrap: draw seeds with replacement, then each drawn seed's prompts with replacement.

    features[s] is [P_s, F]: one row per prompt of seed s, every condition compared on that prompt in
    its columns, so one prompt draw moves all conditions together (the pairing). `statistic` maps
    per-seed prompt means [..., S, F] (leading axes: replicates) to [..., K]; it is called once on
    the observed data (each seed once, prompt weights 1/P) and once on all B replicates.

    Variance of the result for a mean of paired differences with within-seed per-prompt variance w
    and between-seed variance b (see `VarianceComponents`): ((S-1)/S * b + w/P * ((S-1)/S + (P-1)/P)) / S,
    so prompt noise is counted about twice (conservative) and seed variance by (S-1)/S.
    """
    feats = [np.asarray(f, dtype=np.float64) for f in features]
    if not feats:
        raise ValueError("the bootstrap needs at least one seed's per-prompt features")
    widths = {f.shape[1] for f in feats if f.ndim == 2}
    if len(widths) != 1 or any(f.ndim != 2 or f.shape[0] < 1 for f in feats):
        raise ValueError(f"features must be [P_s, F] arrays with P_s >= 1 and one F; got {[f.shape for f in feats]}")
    n_seeds = len(feats)
    point = statistic(np.stack([f.mean(axis=0) for f in feats])[None])[0]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    means = np.empty((n_boot, n_seeds, feats[0].shape[1]))
    for s, f in enumerate(feats):
        slots = np.nonzero(picks == s)
        if len(slots[0]):
            means[slots] = _prompt_weights(rng, f.shape[0], len(slots[0])) @ f
    return BootstrapResult(np.asarray(point, dtype=np.float64), np.asarray(statistic(means), dtype=np.float64))


# --------------------------------------------------------------------------------------------- power


@dataclass(frozen=True)
class VarianceComponents:
    """Variance of a paired per-prompt difference: within seeds (prompt-to-prompt and sampling noise,
    per prompt) and between seeds (the true seed-level difference varies with the training seed)."""

    within: float
    between: float
    n_seeds: int
    n_prompts: float  # mean prompts per seed of the pilot

    @classmethod
    def from_differences(cls, diffs: Sequence[np.ndarray]) -> VarianceComponents:
        """Method-of-moments (one-way random effects ANOVA) estimate from per-seed arrays of per-prompt
        paired differences: within = pooled variance around each seed's mean; between = variance of
        the seed means minus the part the within variance explains, floored at 0."""
        ds = [np.asarray(d, dtype=np.float64)[np.isfinite(d)] for d in diffs]
        if len(ds) < 2 or any(len(d) < 2 for d in ds):
            raise ValueError(
                "variance components need >= 2 seeds with >= 2 prompts each; "
                f"got {[len(d) for d in ds]} prompts per seed"
            )
        within = sum(((d - d.mean()) ** 2).sum() for d in ds) / sum(len(d) - 1 for d in ds)
        seed_means = np.array([d.mean() for d in ds])
        noise = float(np.mean([within / len(d) for d in ds]))
        between = max(0.0, float(seed_means.var(ddof=1)) - noise)
        return cls(float(within), between, len(ds), float(np.mean([len(d) for d in ds])))

    def true_se(self, n_prompts: int, n_seeds: int) -> float:
        """Standard error of the mean difference over S seeds x P prompts."""
        return math.sqrt((self.between + self.within / n_prompts) / n_seeds)

    def bootstrap_se(self, n_prompts: int, n_seeds: int) -> float:
        """The standard error `hierarchical_bootstrap` reports for that mean, in expectation."""
        s, p = n_seeds, n_prompts
        return math.sqrt(((s - 1) / s * self.between + self.within / p * ((s - 1) / s + (p - 1) / p)) / s)

    def power(self, delta: float, n_prompts: int, n_seeds: int, alpha: float = 0.05) -> float:
        """Probability that the (1 - alpha) bootstrap interval excludes 0 when the true difference is delta
        (normal approximation: the interval is estimate +- z * bootstrap SE)."""
        z = NormalDist().inv_cdf(1 - alpha / 2)
        se_b, se_t = self.bootstrap_se(n_prompts, n_seeds), self.true_se(n_prompts, n_seeds)
        nd = NormalDist()
        return nd.cdf((abs(delta) - z * se_b) / se_t) + nd.cdf((-abs(delta) - z * se_b) / se_t)

    def detectable_difference(self, n_prompts: int, n_seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
        """Smallest true difference the design detects with probability `power` (two-sided, level alpha)."""
        z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
        return z_a * self.bootstrap_se(n_prompts, n_seeds) + z_b * self.true_se(n_prompts, n_seeds)


# ------------------------------------------------------------------------------------- frontier


def crossing(quality: np.ndarray, values: np.ndarray, level) -> tuple[np.ndarray, np.ndarray]:
    """Value at the first point along a trajectory where quality reaches `level`, by linear interpolation.

    quality, values: [..., T] (T checkpoints in training order); level: a scalar or an array of the
    leading shape [...]. Returns (value [...], reached [...]). The first segment [t-1, t] whose end
    points lie on both sides of the level (or on it) is used; where no segment does, the value at the
    checkpoint with the nearest quality, and reached False.
    """
    q = np.asarray(quality, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if q.shape != v.shape or q.ndim < 1 or q.shape[-1] < 1:
        raise ValueError(f"quality and values must have one shape [..., T >= 1]; got {q.shape} and {v.shape}")
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), q.shape[:-1])
    d = q - level[..., None]
    nearest = np.take_along_axis(v, np.abs(d).argmin(axis=-1)[..., None], axis=-1)[..., 0]
    if q.shape[-1] == 1:
        return np.where(d[..., 0] == 0, v[..., 0], nearest), d[..., 0] == 0
    seg = (d[..., :-1] * d[..., 1:]) <= 0  # [..., T-1]
    reached = seg.any(axis=-1)
    t = seg.argmax(axis=-1)[..., None]
    q0, q1 = np.take_along_axis(q, t, -1)[..., 0], np.take_along_axis(q, t + 1, -1)[..., 0]
    v0, v1 = np.take_along_axis(v, t, -1)[..., 0], np.take_along_axis(v, t + 1, -1)[..., 0]
    span = q1 - q0
    frac = np.divide(level - q0, span, out=np.zeros_like(span), where=span != 0)
    return np.where(reached, v0 + frac * (v1 - v0), nearest), reached


def matched_level(*trajectories: np.ndarray) -> np.ndarray:
    """The highest quality every trajectory [..., T] reaches: the min over trajectories of their max;
    NaN where their quality ranges do not overlap (then no matched comparison exists)."""
    qs = [np.asarray(t, dtype=np.float64) for t in trajectories]
    lo = np.max(np.stack([q.min(axis=-1) for q in qs]), axis=0)
    hi = np.min(np.stack([q.max(axis=-1) for q in qs]), axis=0)
    return np.where(hi >= lo, hi, np.nan)


# ------------------------------------------------------------------------------------------- plots


@dataclass
class Curve:
    """One run in a quality-vs-diversity plot: T points (T = 1 for a run evaluated once).

    x / y hold the mean over seeds per point, x_std / y_std the seed std (NaN: no band).
    `reference` runs (SFT, human) are drawn as grey markers; `row` picks the panel row.
    """

    label: str
    x: Sequence[float]
    y: Mapping[str, Sequence[float]]
    x_std: Sequence[float] | None = None
    y_std: Mapping[str, Sequence[float]] = field(default_factory=dict)
    reference: bool = False
    row: int = 0


def plot_frontier(
    curves: Sequence[Curve],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    x_label: str = "quality",
    title: str = "Diversity vs quality",
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Diversity (y, one panel per (key, label) in `panels`) against quality (x) for every curve.

    A curve of several points is a line through its seed means with a band of +- 1 seed std in y and
    thin x error bars; a one-point curve is a marker with error bars. Rows: `Curve.row`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = 1 + max((c.row for c in curves), default=0)
    fig, axes = plt.subplots(n_rows, len(panels), figsize=(5.2 * len(panels), 4.3 * n_rows), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: dict[str, str] = {}
    for c in curves:
        if not c.reference and c.label not in color_of:
            color_of[c.label] = colors[len(color_of) % len(colors)]
    for r in range(n_rows):
        for j, (key, label) in enumerate(panels):
            ax = axes[r][j]
            drawn = 0
            for c in curves:
                if key not in c.y or (c.row != r and not c.reference):
                    continue
                x, y = np.asarray(c.x, dtype=float), np.asarray(c.y[key], dtype=float)
                ok = np.isfinite(x) & np.isfinite(y)
                if not ok.any():
                    continue
                xs = np.asarray(c.x_std if c.x_std is not None else np.full_like(x, np.nan), dtype=float)
                ys = np.asarray(c.y_std.get(key, np.full_like(y, np.nan)), dtype=float)
                color = "gray" if c.reference else color_of[c.label]
                if len(x) > 1:
                    ax.plot(x[ok], y[ok], "-o", color=color, markersize=4, label=c.label)
                    band = ok & np.isfinite(ys)
                    if band.sum() > 1:
                        poly_x = np.concatenate([x[band], x[band][::-1]])
                        poly_y = np.concatenate([(y + ys)[band], (y - ys)[band][::-1]])
                        ax.fill(poly_x, poly_y, color=color, alpha=0.15, linewidth=0)
                    xe = np.where(np.isfinite(xs), xs, 0.0)
                    ax.errorbar(x[ok], y[ok], xerr=xe[ok], fmt="none", ecolor=color, elinewidth=0.6, alpha=0.6)
                    ax.annotate(
                        c.label,
                        (x[ok][-1], y[ok][-1]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                        color=color,
                    )
                else:
                    ax.errorbar(
                        x,
                        y,
                        xerr=np.where(np.isfinite(xs), xs, 0.0),
                        yerr=np.where(np.isfinite(ys), ys, 0.0),
                        fmt="s" if c.reference else "o",
                        markersize=7,
                        capsize=3,
                        color=color,
                        label=None if c.reference else c.label,
                    )
                    ax.annotate(c.label, (x[0], y[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
                drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, f"no run has quality and {label}", ha="center", va="center", transform=ax.transAxes)
            ax.margins(0.12)
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if row_titles and j == 0:
                ax.set_title(row_titles[r], loc="left", fontsize=10)
            if drawn and j == len(panels) - 1:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
