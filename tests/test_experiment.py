"""`make experiment` in miniature and its analysis on known data.

The --quick design (2 seeds, 4 steps with a checkpoint after each, a tiny evaluation, two worker
processes) runs end to end and writes the report, both plots, power.json and results.json; its runs
obey the design (same prompts and checkpoints for every method, controls at lr x the measured mean
weight, the power estimate written before the comparison ran). The matched-quality analysis is checked
on hand-made trajectories whose answer is known. No test asserts the experiment's headline result.
"""

import json
import math

import numpy as np
import pytest
import yaml

from experiments import method as X
from experiments import method_report as R


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    doc = out / "EXPERIMENTS.md"
    result = X.main(["--quick", "--out", str(out), "--doc", str(doc)])
    return out, doc, result


@pytest.mark.slow
def test_quick_experiment_writes_report_plots_and_results(quick_run):
    out, doc, result = quick_run
    text = doc.read_text()
    assert "--quick smoke version" in text and "python -m experiments.method --quick" in text
    published = ", ".join(f"`{k}={v}`" for k, v in X.load_design(quick=True).pairings["published"].items())
    for needle in (
        "## Power (estimated after the pilot",
        "### Comparisons at matched quality",
        "### Verdicts",
        "Does plain DPO concentrate?",
        "## Second table: best-vs-worst",
        "torch 2.",
        "Wall time",
        f"published pairing ran as {published}",
        "Upvotes = 30 x quality + 8 if the theme is 'space'",
    ):
        assert needle in text, needle
    # The first version's bugs: a literal f-string field, and a claim no source here supports.
    assert "{rec[" not in text and "as the paper reports" not in text
    for a, b in X.load_design(quick=True).comparisons:
        assert f"| {a} - {b} |" in text
    assert text.count(": a win") + text.count(": a loss") + text.count(": cannot tell at this power") >= 7 * 3
    for name in ("frontier", "intervals"):
        png = (out / f"EXPERIMENTS_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
        assert f"](EXPERIMENTS_{name}.png)" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["workers"] == 2 and saved["power"]["metric"] == "style_diversity"  # quick has no MiniLM


@pytest.mark.slow
def test_quick_experiment_follows_the_design(quick_run):
    out, _, result = quick_run
    design = X.load_design(quick=True)
    evals = result["evals"]
    steps = [1, 2, 3, 4]
    for seed in design.seeds:
        prompts = set()
        for m in design.methods:
            got = sorted(e["step"] for e in evals if e["method"] == m and e["seed"] == seed)
            assert got == steps, (m, seed, got)
            for e in evals:
                if e["method"] == m and e["seed"] == seed:
                    prompts.add(tuple(sorted(r["prompt_id"] for r in e["per_prompt"])))
            assert not (out / m.lower() / f"seed{seed}" / "checkpoints").exists()  # deleted once evaluated
            assert (out / m.lower() / f"seed{seed}" / "final" / "config.json").is_file()
        sft = [e for e in evals if e["method"] == "SFT" and e["seed"] == seed]
        assert len(sft) == 1 and sft[0]["step"] == 0
        prompts.add(tuple(sorted(r["prompt_id"] for r in sft[0]["per_prompt"])))
        assert len(prompts) == 1 and len(next(iter(prompts))) == 3  # one prompt set per seed, for every run
    bvw = sorted((e["method"], e["seed"], e["step"]) for e in evals if "@" in e["method"])
    assert bvw == sorted((f"{m}@best_vs_worst", 0, 4) for m in design.bvw_methods)
    # Reference caches: one per (pairing, seed), shared by every dpo/ddpo run on the same pairs.
    assert sorted(p.name for p in (out / "refcache").iterdir()) == [
        "best_vs_worst-seed0",
        "divpo-seed0",
        "divpo-seed1",
        "published-seed0",
        "published-seed1",
    ]


@pytest.mark.slow
def test_controls_use_lr_times_the_measured_mean_weight(quick_run):
    out, _, result = quick_run
    base_lr = yaml.safe_load((X.ROOT / "configs" / "experiment.yaml").read_text())["optim"]["lr"]
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    for control, source in (("DPO-lrw", "DDPO"), ("ORPO-lrw", "DORPO")):
        for seed in (0, 1):
            logged = [
                json.loads(line)["weights/mean"]
                for line in (out / source.lower() / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            ]
            w = float(np.mean(logged))
            assert 0 < w and runs[(source, seed)]["mean_chosen_weight"] == pytest.approx(w)
            assert runs[(control, seed)]["lr"] == pytest.approx(base_lr * w)
            cfg = yaml.safe_load((out / control.lower() / f"seed{seed}" / "config.yaml").read_text())
            assert cfg["optim"]["lr"] == pytest.approx(base_lr * w) and cfg["loss"]["objective"] == source[1:].lower()


@pytest.mark.slow
def test_power_is_estimated_before_the_comparison_runs(quick_run):
    out, _, result = quick_run
    power_written = (out / "power.json").stat().st_mtime
    pilot = X.load_design(quick=True).pilot
    for m in X.load_design(quick=True).methods:
        started = (out / m.lower() / "seed0" / "config.yaml").stat().st_mtime
        assert (started < power_written) == (m == pilot), m
    p = json.loads((out / "power.json").read_text())
    assert p["n_seeds"] == 2 and p["n_prompts"] == 3 and p["detectable"] > 0
    assert p["between"] == pytest.approx(2 * p["pilot_between"])


@pytest.mark.slow
def test_report_only_rebuilds_the_same_document(quick_run):
    out, doc, _ = quick_run
    before = doc.read_text()
    doc.unlink()
    X.main(["--report-only", "--out", str(out), "--doc", str(doc)])
    assert doc.read_text() == before


# ------------------------------------------------------------------------------------ checkpoint weights


@pytest.mark.slow
def test_checkpoint_model_loads_the_weights_of_that_step(tmp_path):
    import torch

    from engine.checkpoint import CheckpointError
    from engine.model import load_pretrained
    from engine.train import train

    design = X.load_design(quick=True)
    ctx = X.Context(design, str(tmp_path))
    cfg = X.make_config(
        design.recipe,
        ctx.common,
        {
            "loss.objective": "orpo",
            "optim.max_steps": 2,
            "logging.output_dir": str(tmp_path),
            "logging.run_name": "r",
            "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 5,
        },
    )
    train(cfg)
    run = cfg.logging.run_dir
    final, _ = load_pretrained(str(run / "final"))
    at2, _ = X.checkpoint_model(run / "checkpoints" / "step-2", "llama-tiny")
    at1, _ = X.checkpoint_model(run / "checkpoints" / "step-1", "llama-tiny")
    sd_final, sd2, sd1 = final.state_dict(), at2.state_dict(), at1.state_dict()
    assert all(torch.equal(sd_final[k], sd2[k]) for k in sd_final)
    assert not all(torch.equal(sd_final[k], sd1[k]) for k in sd_final)
    with open(run / "checkpoints" / "step-1" / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        X.checkpoint_model(run / "checkpoints" / "step-1", "llama-tiny")


# ------------------------------------------------------------------------------------------------ design


def _design_file(tmp_path, **changes):
    raw = yaml.safe_load(X.DESIGN.read_text())
    raw.update(changes)
    path = tmp_path / "design.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_design_loads_and_bad_designs_name_the_fix(tmp_path):
    d = X.load_design()
    assert len(d.seeds) >= 5 and d.pilot == "DPO" and d.statistics["target_detectable"] == 0.015
    assert set(d.pairings) == {"published", "divpo", "best_vs_worst"}
    assert X.chains(d)[:2] == [["DDPO", "DPO-lrw"], ["DORPO", "ORPO-lrw"]]
    assert sorted(m for c in X.chains(d) for m in c) == sorted(set(d.methods) - {"DPO"})
    q = X.load_design(quick=True)
    assert q.seeds == [0, 1] and q.bvw_seeds == [0] and q.sft["optim.max_steps"] == 3
    assert q.sft["loss.objective"] == "sft" and q.statistics["n_boot"] == 200 and q.statistics["level"] == 0.95
    with pytest.raises(X.DesignError, match="unknown key"):
        X.load_design(_design_file(tmp_path, seed=[1]))
    bad = yaml.safe_load(X.DESIGN.read_text())["methods"]
    bad["DPO-lrw"]["lr_times_mean_weight_of"] = "DPO"
    with pytest.raises(X.DesignError, match="only those log deviation weights"):
        X.load_design(_design_file(tmp_path, methods=bad))
    with pytest.raises(X.DesignError, match="entries must be"):
        X.load_design(_design_file(tmp_path, comparisons=[["DDPO", "PPO"]]))
    with pytest.raises(X.DesignError, match="best_vs_worst.seeds"):
        X.load_design(
            _design_file(tmp_path, best_vs_worst={"pairing": "best_vs_worst", "methods": ["DPO"], "seeds": [999]})
        )
    with pytest.raises(X.DesignError, match="must be a non-empty list"):
        X.load_design(_design_file(tmp_path, seeds=[]))
    stats = {**yaml.safe_load(X.DESIGN.read_text())["statistics"], "design_basis": {"within": 0.1, "between": 0.0}}
    with pytest.raises(X.DesignError, match="design_basis must be"):
        X.load_design(_design_file(tmp_path, statistics=stats))
    ctx = X.Context(X.load_design(_design_file(tmp_path, checkpoints=3)), str(tmp_path), "llama-tiny")
    with pytest.raises(X.DesignError, match=r"multiple of checkpoints \(3\)"):
        ctx.method_config("DPO", 0)


def test_heldout_prompts_are_never_trained_on_and_too_few_is_an_error(tmp_path):
    from engine.data.loading import load_responses
    from engine.data.pairs import build_pairs, split_by_prompt

    ctx = X.Context(X.load_design(quick=True), str(tmp_path), "llama-tiny")
    cfg = ctx.method_config("DPO", 3)
    held = X.heldout_prompts(cfg)
    responses, _ = load_responses(
        "synthetic", synthetic_prompts=cfg.data.synthetic_prompts, synthetic_seed=cfg.data.synthetic_seed
    )
    train_pairs, _ = split_by_prompt(build_pairs(responses, "gap", seed=3), cfg.data.val_fraction, 3)
    assert len(held.prompts) == cfg.eval.num_prompts
    assert not set(held.prompt_ids) & {p.prompt_id for p in train_pairs}
    assert held.prompt_ids == sorted(held.prompt_ids)
    cfg = X.make_config(ctx.design.recipe, ctx.common, {"eval.num_prompts": 500})
    with pytest.raises(X.DesignError, match="raise data.val_fraction"):
        X.heldout_prompts(cfg)


# ---------------------------------------------------------------------------------- analysis, known data


def _rows(rng, n, quality, sem, noise=0.02):
    """Per-prompt rows around (quality, semantic diversity); theme/style shares over 4 samples."""
    rows = []
    for i in range(n):
        space = rng.integers(0, 5) / 4
        rows.append(
            {
                "prompt_id": f"p{i:03d}",
                "quality": quality + rng.normal(0, noise),
                "semantic_diversity": sem + rng.normal(0, noise),
                "style_diversity": 0.3 + rng.normal(0, noise),
                "theme_share": {
                    "space": space,
                    "dragons": 1 - space,
                    "detective": 0.0,
                    "ghosts": 0.0,
                    "robots": 0.0,
                    "none": 0.0,
                },
                "style_share": {"plain": 0.5, "dialogue": 0.5, "terse": 0.0, "ornate": 0.0, "none": 0.0},
            }
        )
    return rows


def _fake_result(trajectories: dict, seeds=(0, 1, 2), n_prompts=60):
    """A results.json-like dict whose methods follow given (quality, semantic diversity) trajectories."""
    rng = np.random.default_rng(0)
    design = X.load_design()
    d = design.to_dict()
    d.update(
        seeds=list(seeds),
        bvw_methods=[],
        bvw_seeds=[],
        comparisons=[["DDPO", "DPO"]],
        methods={k: v for k, v in d["methods"].items() if k in trajectories},
    )
    d["statistics"]["n_boot"] = 400
    evals = []
    for s in seeds:
        evals.append({"method": "SFT", "seed": s, "step": 0, "per_prompt": _rows(rng, n_prompts, 0.5, 0.5)})
        evals.append({"method": "human", "seed": s, "step": 0, "per_prompt": _rows(rng, n_prompts, 0.45, 0.55)})
        for m, points in trajectories.items():
            for step, (q, sem) in zip((10, 20, 30, 40), points):
                evals.append({"method": m, "seed": s, "step": step, "per_prompt": _rows(rng, n_prompts, q, sem)})
    return {"design": d, "evals": evals, "runs": []}


def test_matched_quality_separates_training_less_far_from_being_more_diverse():
    # Both methods lie on one frontier, diversity = 1 - quality; DDPO just trains less far.
    line = lambda qs: [(q, 1.0 - q) for q in qs]  # noqa: E731
    res = _fake_result({"DPO": line([0.55, 0.6, 0.65, 0.7]), "DDPO": line([0.52, 0.55, 0.58, 0.6])})
    c = R.analyze(res)["comparisons"][0]
    frac = res["design"]["statistics"]["matched_quality_fraction"]
    assert c["q_star"] == pytest.approx(0.5 + frac * (0.6 - 0.5), abs=0.01)  # from the SFT start to the top
    final, matched = R.interval(c["final"]["semantic_diversity"]), R.interval(c["matched"]["semantic_diversity"])
    assert final.estimate == pytest.approx(0.1, abs=0.01) and final.verdict() == "a win"  # equal steps: misleading
    assert abs(matched.estimate) < 0.01 and matched.verdict() == "cannot tell at this power"
    assert matched.lo < 0 < matched.hi


def test_matched_quality_finds_a_real_gain_and_a_real_loss():
    line = lambda qs, shift: [(q, 1.0 - q + shift) for q in qs]  # noqa: E731
    res = _fake_result({"DPO": line([0.55, 0.6, 0.65, 0.7], 0.0), "DDPO": line([0.55, 0.6, 0.65, 0.7], 0.05)})
    analysis = R.analyze(res)
    c = analysis["comparisons"][0]
    m = R.interval(c["matched"]["semantic_diversity"])
    assert m.estimate == pytest.approx(0.05, abs=0.01) and m.verdict() == "a win"
    assert R.interval(c["matched"]["theme_entropy_overall"]).verdict() == "cannot tell at this power"
    lines = "\n".join(R._verdict_lines(analysis, {**res, "design": res["design"]}))
    assert "**DDPO vs DPO at matched quality" in lines and f"semantic diversity {m.fmt()}: **a win**" in lines
    res = _fake_result({"DPO": line([0.55, 0.6, 0.65, 0.7], 0.0), "DDPO": line([0.55, 0.6, 0.65, 0.7], -0.05)})
    assert R.interval(R.analyze(res)["comparisons"][0]["matched"]["semantic_diversity"]).verdict() == "a loss"


def test_power_estimate_from_the_pilot():
    res = _fake_result({"DPO": [(0.55, 0.45), (0.6, 0.4), (0.65, 0.35), (0.7, 0.3)]}, seeds=(0, 1, 2, 3))
    p = R.power_estimate(res["evals"], res["design"])
    # Per-prompt noise sd 0.02 on both sides: the paired difference has variance 2 * 0.02^2.
    assert p["within"] == pytest.approx(2 * 0.02**2, rel=0.2)
    assert p["n_seeds"] == 4 and p["n_prompts"] == 60 and p["pilot_step"] == 40
    assert p["detectable"] == pytest.approx(
        p["grid"]["detectable"][p["grid"]["prompts"].index(60)][p["grid"]["seeds"].index(4)]
    )
    assert math.isfinite(p["detectable"]) and p["detectable"] < 0.02
    # The target is above the detectable difference, so it is detected with more than the design's power.
    assert p["power_at_target"] > p["power"]
    # What the components the design was chosen from predicted for this design, beside the pilot's own estimate.
    basis = res["design"]["statistics"]["design_basis"]
    predicted = R.VarianceComponents(basis["within"], basis["between"], 0, 0).detectable_difference(60, 4)
    assert p["design_basis"]["detectable"] == pytest.approx(predicted)
    assert p["design_basis"]["source"] == basis["source"]
    # The fewest seeds that meet the target at the run's prompts per seed.
    vc = R.VarianceComponents(p["within"], p["between"], 0, 0)
    need = p["seeds_for_target"]
    assert vc.detectable_difference(60, need, p["alpha"], p["power"]) <= p["target"]
    assert need == 2 or vc.detectable_difference(60, need - 1, p["alpha"], p["power"]) > p["target"]


def test_load_note_tells_a_shared_cpu_from_a_quiet_one():
    result = {
        "workers": 2,
        "load_end": [2.0],
        "load_phase_ends": [2.1, 1.9],
        "cpu_s": {"sft": 10.0, "warmup": 10.0, "runs_train": 80.0, "evals": 280.0},
        "phases": {"total_s": 200.0},
    }
    assert R._load_note(result).endswith("95% of wall time x workers: nothing else ran.")
    result["load_phase_ends"] = [3.4, 2.0]
    assert "other jobs shared the CPU" in R._load_note(result)
