"""`make experiment` in miniature: the smoke version of engine.experiment (1 seed, a few steps, a tiny
evaluation) runs end to end and writes the report, the plot and the raw results; plus the aggregation
and verdict logic on hand-made numbers. No test here asserts the headline result."""

import json
import math

import pytest

from engine import experiment as X


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    doc = out / "EXPERIMENTS.md"
    result = X.main(["--quick", "--seeds", "0", "--out", str(out), "--doc", str(doc)])
    return out, doc, result


def test_quick_experiment_writes_report_plot_and_results(quick_run):
    out, doc, result = quick_run
    text = doc.read_text()
    assert "--quick smoke version" in text
    assert "python -m engine.experiment --quick --seeds 0" in text
    for method in ("SFT", *X.METHODS, "human (random)"):
        assert f"| {method} |" in text, method
    for needle in ("torch 2.", "transformers ", "Wall time", "share 'space'", "### Verdict", "Does plain DPO concentrate"):
        assert needle in text, needle
    png = out / "EXPERIMENTS_quality_vs_diversity.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](EXPERIMENTS_quality_vs_diversity.png)" in text

    saved = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in saved["records"]]
    assert sorted(methods) == sorted(["SFT", "human (random)", *X.METHODS])
    for r in saved["records"]:
        assert math.isfinite(r["summary"]["quality"]) and 0.0 <= r["summary"]["quality"] <= 1.0
        shares = r["summary"]["theme_share"]
        assert abs(sum(shares.values()) - 1.0) < 1e-6


def test_quick_experiment_same_budget_and_prompts_for_every_method(quick_run):
    out, _, result = quick_run
    prefs = [r for r in result["records"] if r.method in X.METHODS]
    assert len(prefs) == len(X.METHODS)
    assert {r.train["steps"] for r in prefs} == {X.QUICK_OVERRIDES["optim.max_steps"]}
    # Reference log-probs come from the cache for the objectives that need them, none for ORPO/DORPO.
    ref = {r.method: r.train["reference"] for r in prefs}
    assert ref == {"DPO": "cache", "DDPO": "cache", "ORPO": "none", "DORPO": "none", "DivPO": "cache"}
    # DPO and DDPO share one cache directory (same pairs); DivPO builds its own.
    assert sorted(p.name for p in (out / "refcache").iterdir()) == ["best_vs_worst-seed0", "divpo-seed0"]
    prompt_sets = set()
    for method in X.METHODS:
        gens = [json.loads(line) for line in (out / method.lower() / "seed0" / "eval" / "generations.jsonl").open()]
        assert len(gens) == X.QUICK_OVERRIDES["eval.num_prompts"] * 4
        prompt_sets.add(tuple(sorted({g["prompt_id"] for g in gens})))
    assert len(prompt_sets) == 1  # every method is evaluated on the same held-out prompts


def test_report_only_rebuilds_the_same_tables_from_results_json(quick_run):
    out, doc, _ = quick_run
    before = doc.read_text()
    doc.unlink()
    X.main(["--report-only", "--out", str(out), "--doc", str(doc)])
    after = doc.read_text()
    table = lambda t: [line for line in t.splitlines() if line.startswith("| ")]  # noqa: E731
    assert table(after) == table(before) and len(table(after)) > 10
    assert "python -m engine.experiment --quick --seeds 0" in after


def test_heldout_prompts_are_never_trained_on(tmp_path):
    from engine.data.loading import load_responses
    from engine.data.pairs import build_pairs, split_by_prompt

    cfg = X.make_config(X.RECIPE, X.QUICK_OVERRIDES, {"data.seed": 3, "data.cache_dir": str(tmp_path)})
    held = X.heldout_prompts(cfg)
    responses, _ = load_responses("synthetic", synthetic_prompts=cfg.data.synthetic_prompts,
                                  synthetic_seed=cfg.data.synthetic_seed)
    train_pairs, _ = split_by_prompt(build_pairs(responses, "best_vs_worst", seed=3), cfg.data.val_fraction, 3)
    assert held.prompts and len(held.prompts) <= cfg.eval.num_prompts
    assert not set(held.prompt_ids) & {p.prompt_id for p in train_pairs}
    assert held.prompt_ids == sorted(held.prompt_ids)


def _rec(method, seed, quality, sem, space):
    return X.RunRecord(method, seed, {
        "quality": quality, "semantic_diversity": sem, "style_diversity": 0.3,
        "theme_share": {"space": space, "dragons": 1 - space}, "style_share": {"plain": 0.5, "terse": 0.5},
    })


def test_aggregate_mean_std_and_popular_shares():
    agg = X.aggregate([_rec("DPO", 0, 0.5, 0.10, 0.6), _rec("DPO", 1, 0.7, 0.20, 0.8)])["DPO"]
    assert agg["n"] == 2
    assert agg["mean"]["quality"] == pytest.approx(0.6)
    assert agg["std"]["quality"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert agg["mean"]["popular_theme_share"] == pytest.approx(0.7)
    assert agg["mean"]["theme_share/dragons"] == pytest.approx(0.3)
    assert agg["min"]["semantic_diversity"] == pytest.approx(0.1) and agg["max"]["semantic_diversity"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "q_new, sem_new, wins, more_diverse",
    [
        (0.60, 0.30, True, True),    # more diverse, same quality
        (0.58, 0.30, True, True),    # 3.3% lower quality: within 5%
        (0.50, 0.30, False, True),   # 16.7% lower quality: not comparable
        (0.70, 0.10, False, False),  # better quality but less diverse
    ],
)
def test_verdict_quality_tolerance_and_diversity(q_new, sem_new, wins, more_diverse):
    recs = [_rec("DPO", s, 0.60, 0.20, 0.8) for s in (0, 1)] + [_rec("DDPO", s, q_new, sem_new, 0.5) for s in (0, 1)]
    (v,) = X.verdicts(X.aggregate(recs))
    assert (v["method"], v["baseline"], v["primary_diversity"]) == ("DDPO", "DPO", "semantic_diversity")
    assert v["wins"] is wins and v["more_diverse"] is more_diverse
    assert v["popular_theme_share_delta"] == pytest.approx(-0.3)


def test_overrides_reach_the_config_and_unknown_methods_fail(tmp_path):
    cfg = X.make_config(X.RECIPE, X.METHODS["DORPO"], {"data.seed": 2, "deviation.enabled": True})
    assert (cfg.loss.objective, cfg.loss.beta, cfg.data.seed) == ("dorpo", 0.25, 2)
    assert X.make_config(X.RECIPE, X.METHODS["DivPO"]).data.pairs == "divpo"
    with pytest.raises(ValueError, match="unknown method"):
        X.run_experiment(tmp_path, [0], methods=["PPO"])
