"""engine.compare: the statistics every report uses. The bootstrap interval must cover a known difference
at its nominal rate on data shaped like the experiment's (seeds x prompts), the power estimate must match
the rejection rate of that same test in simulation, and the matched-quality interpolation must pick the
right segment of a trajectory."""

import math

import numpy as np
import pytest

from engine import compare as C
from engine import metrics as M


def test_seed_stats_is_the_sample_std_and_skips_missing_values():
    assert C.seed_stats([0.55, 0.65]) == pytest.approx((0.6, math.sqrt(0.005), 2))
    m, s, n = C.seed_stats([0.3, None, float("nan")])
    assert (m, n) == (0.3, 1) and math.isnan(s)
    assert C.fmt_mean_std(0.3, s) == "0.3000" and C.fmt_mean_std(0.6, 0.0707) == "0.6000 +- 0.0707"


def test_pooled_entropy_from_share_means_equals_entropy_of_pooled_labels():
    rng = np.random.default_rng(1)
    cats = ("space", "dragons", "ghosts")
    groups = [[rng.choice([*cats, None]) for _ in range(4)] for _ in range(9)]
    rows = [{"q": float(i), "theme_share": M.label_shares(g, cats)} for i, g in enumerate(groups)]
    layout = C.MetricLayout(("q",), (("theme", cats),))
    feats = layout.features(rows)
    assert feats.shape == (9, 5)  # q, three themes, none
    got = layout.metrics(feats.mean(axis=0))
    pooled = [x for g in groups for x in g]
    assert got["theme_entropy_overall"] == pytest.approx(M.normalized_entropy(pooled, len(cats)))
    assert got["theme_share/ghosts"] == pytest.approx(M.label_shares(pooled, cats)["ghosts"])
    assert got["theme_share/none"] == pytest.approx(M.label_shares(pooled, cats)["none"])
    assert got["q"] == pytest.approx(4.0)
    assert C.normalized_entropy_of_shares(np.zeros(3)) == 0.0  # no labelled sample
    assert np.isnan(layout.features([{"q": None}])).all()


def _simulate(rng, n_seeds, n_prompts, delta, within, between):
    """Per-seed [P, 1] arrays of paired per-prompt differences: delta + seed effect + prompt noise."""
    return [
        (delta + rng.normal(0, math.sqrt(between)) + rng.normal(0, math.sqrt(within), (n_prompts, 1)))
        for _ in range(n_seeds)
    ]


def _mean_over_seeds(means):
    return means[..., 0].mean(axis=-1, keepdims=True)


def _pooled_interval(data, n_boot, rng):
    """The naive interval that ignores seeds: every (seed, prompt) row resampled as if independent."""
    rows = np.concatenate(data)[:, 0]
    means = rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))].mean(axis=1)
    return np.quantile(means, [0.025, 0.975])


def _coverage(rng, delta, within, between, *, reps=250, n_seeds=5, n_prompts=60):
    hits = naive_hits = 0
    for r in range(reps):
        data = _simulate(rng, n_seeds, n_prompts, delta, within, between)
        iv = C.hierarchical_bootstrap(data, _mean_over_seeds, n_boot=400, seed=r).interval(0)
        hits += iv.lo <= delta <= iv.hi
        lo, hi = _pooled_interval(data, 400, rng)
        naive_hits += lo <= delta <= hi
    return hits / reps, naive_hits / reps


def test_bootstrap_interval_covers_a_known_difference():
    rng = np.random.default_rng(0)
    # The experiment's regime: per-prompt noise (sd 0.08) dominates a small seed-to-seed spread.
    cov, _ = _coverage(rng, delta=0.02, within=0.08**2, between=0.004**2)
    assert 0.93 <= cov <= 1.0, cov
    # Seeds that really differ: with only 5 of them the interval runs somewhat narrow (the seed term is
    # counted (S-1)/S times), while the interval that treats every prompt of every seed as independent
    # undercovers badly.
    cov, naive = _coverage(rng, delta=0.02, within=0.08**2, between=0.03**2)
    assert cov >= 0.85 and naive < 0.7, (cov, naive)


def test_bootstrap_se_matches_its_formula_and_the_result_is_paired():
    rng = np.random.default_rng(3)
    vc = C.VarianceComponents(within=0.07**2, between=0.01**2, n_seeds=5, n_prompts=80)
    data = _simulate(rng, 5, 80, 0.0, vc.within, vc.between)
    # The formula is for the expected bootstrap variance; average it over many datasets.
    ses = [
        C.hierarchical_bootstrap(
            _simulate(rng, 5, 80, 0.0, vc.within, vc.between), _mean_over_seeds, n_boot=500, seed=i
        )
        .interval(0)
        .se
        for i in range(60)
    ]
    assert np.sqrt(np.mean(np.square(ses))) == pytest.approx(vc.bootstrap_se(80, 5), rel=0.12)
    # Two conditions in the columns of one prompt move together: a constant offset has zero spread.
    both = [np.concatenate([d, d + 0.05], axis=1) for d in data]
    res = C.hierarchical_bootstrap(both, lambda m: (m[..., 1] - m[..., 0]).mean(-1, keepdims=True), n_boot=200)
    assert res.point[0] == pytest.approx(0.05) and np.allclose(res.samples, 0.05)
    with pytest.raises(ValueError, match="features must be"):
        C.hierarchical_bootstrap([np.zeros((3, 1)), np.zeros((3, 2))], _mean_over_seeds)


def test_variance_components_recover_known_values():
    rng = np.random.default_rng(5)
    diffs = [d[:, 0] for d in _simulate(rng, 400, 50, 0.1, 0.06**2, 0.02**2)]
    vc = C.VarianceComponents.from_differences(diffs)
    assert vc.within == pytest.approx(0.06**2, rel=0.05)
    assert vc.between == pytest.approx(0.02**2, rel=0.25)
    assert (vc.n_seeds, vc.n_prompts) == (400, 50)
    with pytest.raises(ValueError, match=">= 2 seeds"):
        C.VarianceComponents.from_differences([np.zeros(5)])


def test_detectable_difference_matches_simulated_power():
    vc = C.VarianceComponents(within=0.08**2, between=0.006**2, n_seeds=5, n_prompts=100)
    n_prompts, n_seeds = 60, 5
    mdd = vc.detectable_difference(n_prompts, n_seeds)
    assert vc.power(mdd, n_prompts, n_seeds) == pytest.approx(0.8, abs=0.01)
    # More prompts -> a smaller detectable difference; more seeds too.
    assert vc.detectable_difference(120, 5) < mdd and vc.detectable_difference(60, 8) < mdd
    rng = np.random.default_rng(11)
    reps = 300

    def rejection_rate(delta):
        rejected = 0
        for r in range(reps):
            data = _simulate(rng, n_seeds, n_prompts, delta, vc.within, vc.between)
            iv = C.hierarchical_bootstrap(data, _mean_over_seeds, n_boot=400, seed=r).interval(0)
            rejected += iv.lo > 0 or iv.hi < 0
        return rejected / reps

    assert rejection_rate(mdd) == pytest.approx(0.8, abs=0.08)
    assert rejection_rate(0.0) <= 0.06  # the conservative prompt term keeps the false-positive rate below 5%


def test_interval_verdicts():
    assert C.Interval(0.02, 0.005, 0.04).verdict() == C.WIN == "a win"
    assert C.Interval(-0.02, -0.04, -0.001).verdict() == "a loss"
    assert C.Interval(0.01, -0.002, 0.03).verdict() == "cannot tell at this power"
    assert C.Interval(0.02, 0.005, 0.04).verdict(higher_is_better=False) == "a loss"
    assert C.Interval(0.0, float("nan"), float("nan")).verdict() == C.UNDECIDED
    assert C.Interval(0.0123, -0.001, 0.02).fmt() == "+0.0123 [95% CI -0.0010, +0.0200]"


def test_crossing_interpolates_the_first_segment_that_reaches_the_level():
    q = np.array([0.5, 0.6, 0.7, 0.65, 0.8])
    v = np.array([0.40, 0.36, 0.30, 0.31, 0.20])
    val, ok = C.crossing(q, v, 0.65)
    assert ok and val == pytest.approx(0.33)  # between 0.6 and 0.7, not the later 0.65 point
    val, ok = C.crossing(q, v, 0.5)
    assert ok and val == pytest.approx(0.40)  # the level is the start
    val, ok = C.crossing(q, v, 0.9)
    assert not ok and val == pytest.approx(0.20)  # never reached: the nearest checkpoint, flagged
    # Falling quality is crossed too, and leading axes are batch axes.
    qs = np.stack([q, q[::-1]])
    vs = np.stack([v, v[::-1]])
    val, ok = C.crossing(qs, vs, 0.75)
    assert ok.all() and val == pytest.approx([0.31 - 0.11 * 2 / 3] * 2)  # the segment 0.65 -> 0.8 both ways
    # One level per trajectory of a batch.
    val, ok = C.crossing(qs, vs, np.array([0.65, 0.75]))
    assert ok.all() and val == pytest.approx([0.33, 0.31 - 0.11 * 2 / 3])
    assert C.matched_level(np.array([0.5, 0.7]), np.array([0.5, 0.62, 0.6])) == pytest.approx(0.62)
    assert np.isnan(C.matched_level(np.array([0.1, 0.2]), np.array([0.3, 0.4])))
    levels = C.matched_level(np.array([[0.5, 0.7], [0.5, 0.55]]), np.array([[0.5, 0.6], [0.5, 0.8]]))
    assert levels == pytest.approx([0.6, 0.55])


def test_plot_frontier_draws_trajectories_and_single_points(tmp_path):
    curves = [
        C.Curve(
            "DPO",
            [0.5, 0.6, 0.7],
            {"sem": [0.4, 0.35, 0.3]},
            x_std=[0.01, 0.02, 0.02],
            y_std={"sem": [0.01, 0.01, 0.02]},
        ),
        C.Curve("ORPO", [0.5, 0.55], {"sem": [0.4, 0.39]}, row=1),
        C.Curve("human", [0.45], {"sem": [0.5]}, reference=True),
    ]
    path = C.plot_frontier(
        curves,
        [("sem", "semantic diversity"), ("style", "style diversity")],
        tmp_path / "f.png",
        row_titles=["DPO family", "ORPO family"],
    )
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
