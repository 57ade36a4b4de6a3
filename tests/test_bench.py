"""bench/: timing quantiles, CSV schema guard, report generation from rows, and a smoke
run of the end-to-end training benchmark (engine and TRL workers at the smallest size)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common, report

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ timing


def test_timing_quantiles_follow_numpy_linear_interpolation():
    t = common.Timing([float(x) for x in range(1, 11)])  # 1..10 ms
    assert t.reps == 10
    assert t.median == pytest.approx(5.5)
    assert t.p10 == pytest.approx(1.9)
    assert t.p90 == pytest.approx(9.1)
    assert t.row("step_time_ms") == {
        "step_time_ms_median": 5.5,
        "step_time_ms_p10": 1.9,
        "step_time_ms_p90": 9.1,
        "reps": 10,
    }
    with pytest.raises(ValueError, match="no timed repetitions"):
        _ = common.Timing().median


def test_time_fn_warms_up_then_times_each_rep():
    calls, setups, syncs = [], [], []
    t = common.time_fn(
        lambda: calls.append(1), reps=12, warmup=3, setup=lambda: setups.append(1), sync=lambda: syncs.append(1)
    )
    assert len(calls) == 15 and len(setups) == 15  # warm-up calls are made but not timed
    assert t.reps == 12 and all(x >= 0 for x in t.samples_ms)
    assert len(syncs) == 1 + 2 * 12  # after warm-up, then around every timed call
    with pytest.raises(ValueError, match="at least 10 timed repetitions"):
        common.time_fn(lambda: None, reps=3)


def test_peak_memory_sees_a_large_allocation():
    import numpy as np

    with common.PeakMemory("cpu") as m:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del a
    assert m.peak_mb >= 48


def test_append_csv_refuses_a_different_header(tmp_path):
    path = tmp_path / "x.csv"
    common.append_csv(path, [{"a": 1, "b": None}], ["a", "b"])
    common.append_csv(path, [{"a": 2, "b": 3}], ["a", "b"])
    assert common.read_csv(path) == [{"a": "1", "b": ""}, {"a": "2", "b": "3"}]
    with pytest.raises(ValueError, match="move the old file aside"):
        common.append_csv(path, [{"a": 1}], ["a", "c"])
    with pytest.raises(ValueError, match="not columns"):
        common.append_csv(path, [{"a": 1, "z": 2}], ["a", "b"])


# ------------------------------------------------------------------------------------------ report


KERNEL_FIELDS = (
    "bench op backend objective N D V dtype device time_ms_median time_ms_p10 time_ms_p90 reps "
    "peak_mem_mb tokens_per_s hardware torch triton liger commit timestamp"
).split()


def _kernel_row(backend, n, t, mem, commit, ts, v=8000):
    return {
        "bench": "sweep",
        "op": "fused_preference_loss",
        "backend": backend,
        "objective": "dpo",
        "N": n,
        "D": 64,
        "V": v,
        "dtype": "float32",
        "device": "cpu",
        "time_ms_median": t,
        "time_ms_p10": t * 0.9,
        "time_ms_p90": t * 1.1,
        "reps": 10,
        "peak_mem_mb": mem,
        "tokens_per_s": round(n / (t / 1e3), 1),
        "hardware": "Test CPU x2",
        "torch": "2.x",
        "triton": "3.x",
        "liger": "0.x",
        "commit": commit,
        "timestamp": ts,
    }


def _write(path: Path, fields, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_report_ratios_come_from_rows_of_one_run(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    rows = []
    # An old run (commit aaa) with very different numbers, then the current run (commit bbb) with an N sweep.
    rows.append(_kernel_row("eager", 1024, 999.0, 900.0, "aaa", "2026-01-01T00:00:00+00:00"))
    rows.append(_kernel_row("torch", 1024, 111.0, 11.0, "aaa", "2026-01-01T00:00:01+00:00"))
    for i, n in enumerate((256, 512, 1024)):
        rows.append(_kernel_row("eager", n, 40.0 * (i + 1), 300.0 * (i + 1), "bbb", f"2026-02-01T00:00:0{2 * i}+00:00"))
        rows.append(
            _kernel_row("torch", n, 10.0 * (i + 1), 30.0 * (i + 1), "bbb", f"2026-02-01T00:00:0{2 * i + 1}+00:00")
        )
    _write(res / "kernels.csv", KERNEL_FIELDS, rows)
    train_rows = []
    systems = (
        ("ddpo-engine", "packed+cache", 3000.0, 50.0, 40.0),
        ("trl", "ref_forward", 1000.0, 200.0, ""),
        ("trl", "precomputed_ref", 1500.0, 150.0, ""),
    )
    for system, variant, tps, mem, plan in systems:
        train_rows.append(
            {
                "bench": "cpu-tiny",
                "system": system,
                "variant": variant,
                "model": "llama-tiny",
                "pairs_per_step": 4,
                "tokens_per_step": 700,
                "step_time_ms_median": round(700 / tps * 1e3, 3),
                "step_time_ms_p10": 1,
                "step_time_ms_p90": 2,
                "reps": 10,
                "tokens_per_s": tps,
                "peak_mem_mb": mem,
                "plan_mb": plan,
                "mfu": "",
                "hardware": "Test CPU",
                "torch": "2.x",
                "transformers": "5.x",
                "trl": "1.16.0",
                "deepspeed": "0.x",
                "commit": "bbb",
                "run_id": "run-1",
                "timestamp": "2026-02-01T00:01:00+00:00",
                "notes": f"note of {variant}",
            }
        )
    from bench.bench_train import FIELDS

    _write(res / "train.csv", FIELDS, train_rows)
    out = tmp_path / "BENCHMARKS.md"
    text = report.render(res, out)
    assert out.read_text() == text

    kern = text.split("## Kernel")[1].split("\n## ")[0]
    # N=1024 of the current run: eager 120 ms / torch 30 ms = 4.00x, memory 90/900 = 0.10x; the old run's
    # 999/111 = 9.00x must not appear (its rows are another run).
    sec = kern.split("N=1024")[1].split("###")[0]
    # (reps, tflops, pct_peak and loss columns: the last three are empty in these rows)
    assert "| torch | 30.0 [27.0-33.0] | 34,133.3 | 90.0 | 10 | - | - | - | 4.00x | 0.10x |" in sec
    assert "9.00x" not in kern and "999" not in kern
    assert "Run `commit bbb`" in sec
    # The N sweep (3 values per backend, same run) gives a plot, referenced from the document.
    pngs = sorted((res / "plots").glob("*.png"))
    assert len(pngs) == 1 and "kernels-n-" in pngs[0].name
    assert f"]({pngs[0].relative_to(tmp_path).as_posix()})" in text
    assert pngs[0].stat().st_size > 1000

    train = text.split("## End-to-end")[1].split("\n## ")[0]
    assert "| ddpo-engine packed+cache |" in train
    line = next(ln for ln in train.splitlines() if ln.startswith("| ddpo-engine packed+cache"))
    # peak 50 MB against the planner's 40 MB = 1.25x; tokens/s ratio ours / TRL(ref forward) = 3.00x, memory
    # 50/200 = 0.25x; vs TRL(precomputed): tokens/s 2.00x, memory 50/150 = 0.33x
    assert re.search(r"\| 50\.0 \| 40\.0 \| 1\.25x \|", line), line
    assert re.search(r"\| 3\.00x \| 0\.25x \| 2\.00x \| 0\.33x \|$", line), line
    assert "note of packed+cache" in train
    # No GPU rows: the document says which rows are missing and why.
    missing = text.split("## Missing rows")[1]
    assert "`kernels.csv`: no CUDA GPU" in missing and "`train.csv`: no CUDA GPU" in missing
    assert "`refcache.csv`: no rows at all" in missing


def test_report_memory_breakdown_section(tmp_path):
    from bench.bench_train import MEMORY_FIELDS

    res = tmp_path / "results"
    res.mkdir()
    base = {
        "bench": "cpu-gpt2-stories",
        "model": "gpt2-small",
        "variant": "packed+cache",
        "tokens_per_step": 2000,
        "hardware": "Test CPU",
        "torch": "2.x",
        "transformers": "5.x",
        "deepspeed": "0.x",
        "commit": "ddd",
    }
    before = "before the window (interpreter, imports, tokenizer, prepared data; not in the rise)"
    rows = [
        {**base, "component": c, "mb": mb, "plan_mb": plan, "note": "", "run_id": rid, "timestamp": ts}
        for rid, ts, scale in (("old", "2026-01-01T00:00:00+00:00", 9), ("new", "2026-02-01T00:00:00+00:00", 1))
        for c, mb, plan in (
            ("weights", 500 * scale, 480),
            ("activations saved for backward", 1500, 1400),
            ("total: RSS peak rise of the step", 2000 * scale, 1900),
            (before, 700, ""),
        )
    ]
    _write(res / "memory.csv", MEMORY_FIELDS, rows)
    text = report.render(res, tmp_path / "B.md")
    sec = text.split("## Memory breakdown")[1].split("\n## ")[0]
    assert "Run `new`" in sec and "Run `old`" not in sec
    assert "| weights | 500 | 25.0% | 480 |" in sec  # the share of the newest run's own total
    assert "| activations saved for backward | 1,500 | 75.0% | 1,400 |" in sec
    assert f"| {before} | 700 | - |" in sec


def test_report_attributes_rows_without_run_id_to_the_orchestrated_job(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    # Same commit, two orchestrated runs: each ratio must use its own run's rows only.
    rows = [
        _kernel_row("eager", 512, 100.0, 100.0, "ccc", "2026-03-01T00:00:10+00:00"),
        _kernel_row("torch", 512, 50.0, 10.0, "ccc", "2026-03-01T00:00:20+00:00"),
        _kernel_row("eager", 512, 300.0, 100.0, "ccc", "2026-03-02T00:00:10+00:00"),
    ]
    _write(res / "kernels.csv", KERNEL_FIELDS, rows)
    jobs = [
        {
            "run_id": "r1",
            "mode": "quick",
            "job": "kernels",
            "csv": "kernels.csv",
            "status": "ok",
            "reason": "",
            "start": "2026-03-01T00:00:00+00:00",
            "end": "2026-03-01T00:01:00+00:00",
            "seconds": 60,
            "commit": "ccc",
            "hardware": "h",
        },
        {
            "run_id": "r2",
            "mode": "quick",
            "job": "kernels",
            "csv": "kernels.csv",
            "status": "timeout",
            "reason": "stopped after its 240 s budget",
            "start": "2026-03-02T00:00:00+00:00",
            "end": "2026-03-02T00:04:00+00:00",
            "seconds": 240,
            "commit": "ccc",
            "hardware": "h",
        },
    ]
    _write(res / report.RUNS_CSV, report.RUNS_FIELDS, jobs)
    text = report.render(res, tmp_path / "B.md")
    # r2 has the latest eager row but no torch row; r1 is the latest run with a comparison... both hold the
    # baseline, so the latest (r2) is shown alone, and r1's torch row is not divided by r2's eager time.
    sec = text.split("## Kernel")[1].split("\n## ")[0]
    assert "Run `r2`" in sec and "| torch |" not in sec and "6.00x" not in sec
    assert "job `kernels` of run `r2`: timeout: stopped after its 240 s budget" in text


# ------------------------------------------------------------------------------------------ smoke


def test_bench_train_smoke(tmp_path):
    """Both systems' workers run at the smallest size and append well-formed rows."""
    out = tmp_path / "train.csv"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    mem = tmp_path / "memory.csv"
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_train",
        "--setup",
        "cpu-tiny-smoke",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--min-reps",
        "2",
        "--variants",
        "packed+cache,ref_forward",
        "--csv",
        str(out),
        "--breakdown",
        "--memory-csv",
        str(mem),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = common.read_csv(out)
    assert [(r["system"], r["variant"]) for r in rows] == [("ddpo-engine", "packed+cache"), ("trl", "ref_forward")]
    for r in rows:
        assert r["reps"] == "2" and r["pairs_per_step"] == "2" and r["mfu"] == ""
        assert float(r["step_time_ms_p10"]) <= float(r["step_time_ms_median"]) <= float(r["step_time_ms_p90"])
        assert float(r["tokens_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0
        assert r["run_id"] == rows[0]["run_id"] and r["trl"] and r["torch"]
    ours, trl = rows
    assert "reference forwards 0" in ours["notes"] and "attention sdpa_varlen" in ours["notes"]
    assert float(ours["plan_mb"]) > 0 and trl["plan_mb"] == ""
    # The memory breakdown: components at the peak, the RSS total, the planner beside each.
    parts = {r["component"]: r for r in common.read_csv(mem)}
    total = float(parts["total: RSS peak rise of the step"]["mb"])
    assert total > 0 and float(parts["total: RSS peak rise of the step"]["plan_mb"]) > 0
    assert float(parts["weights"]["mb"]) > 0 and float(parts["optimizer states (Adam m, v)"]["mb"]) > 0
    assert float(parts["activations saved for backward"]["mb"]) > 0
    # Same pairs, same tokenization: TRL's real-token count equals the engine's.
    m = re.match(r"(\d+) real tokens over all steps vs (\d+)", trl["notes"])
    assert m and m.group(1) == m.group(2), trl["notes"]


# ------------------------------------------------------------------------------------------ deviation


def test_centroid_pass_baseline_and_embedding_row():
    """The deviation benchmark's baseline computes each row's dot with its group's sum, grouped or not; the
    embedding row states texts/s, the GEMM-rate fraction and (half precision) the agreement with fp32."""
    import numpy as np

    from bench import bench_deviation as bd

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    gid = rng.integers(0, 6, size=50)
    ref = np.array([x[i] @ x[gid == gid[i]].sum(0) for i in range(50)])
    order = np.argsort(gid, kind="stable")
    np.testing.assert_allclose(bd.centroid_pass(x[order], gid[order], grouped=True), ref[order], rtol=1e-5)
    np.testing.assert_allclose(bd.centroid_pass(x, gid, grouped=False), ref[order], rtol=1e-5)

    texts = bd.story_texts(6)
    assert len(set(texts)) == 6 and min(len(t.split()) for t in texts) > 20
    row, vecs = bd.embed_throughput("cpu", "float32", texts=texts, reps=1, with_vectors=True)
    assert row["bench"] == "embed" and row["throughput_unit"] == "texts/s" and float(row["throughput"]) > 0
    frac = float(re.search(r"([0-9.]+)% of this device's measured float32 GEMM rate", row["note"]).group(1))
    assert 0 < frac < 100 and row["hardware"] and row["commit"]
    half = bd.embed_throughput("cpu", "bfloat16", texts=texts, reps=1, reference=vecs)
    assert "builtin:minilm bfloat16" == half["config"]
    assert float(re.search(r"min cosine with float32 vectors ([0-9.]+)", half["note"]).group(1)) > 0.999


# ------------------------------------------------------------------------------------------ attention


def test_attention_routes_agree_and_rows_are_written(tmp_path):
    """Every route that runs here computes the same attention (forward and q/k/v gradients) on a packed row;
    the benchmark writes one row per route, with the reason for a route this torch cannot run."""
    import torch

    from bench import bench_attention as ba

    lengths = [5, 1, 9, 3]
    results = {}
    for impl in ba.IMPLS:
        q, k, v, pos = ba._inputs(lengths, 2, 8, "cpu", torch.float32)
        try:
            ba.route(impl, lengths, q, k, v, pos)()
        except (RuntimeError, NotImplementedError):
            continue
        results[impl] = [t.grad for t in (q, k, v)]
    assert {"sdpa masked", "sdpa_varlen", "padded rows"} <= set(results)
    for impl, grads in results.items():
        for a, b in zip(grads, results["sdpa masked"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=impl)
    ba.CONFIGS["tiny-test"] = lengths
    out = tmp_path / "attention.csv"
    try:
        rows = [ba.measure("tiny-test", impl, reps=10, heads=2, head_dim=8) for impl in ba.IMPLS]
    finally:
        del ba.CONFIGS["tiny-test"]
    common.append_csv(out, rows, ba.FIELDS)
    by = {r["impl"]: r for r in common.read_csv(out)}
    assert float(by["sdpa_varlen"]["time_ms_median"]) > 0 and by["sdpa_varlen"]["reps"] == "10"
    assert all(r["reps"] == "10" or r["notes"].startswith("not measured: ") for r in by.values())


def test_readme_performance_summary_is_generated_from_the_results():
    """The README's performance table is what bench.report renders from the committed CSVs (no figure typed
    by hand); `python -m bench.report` rewrites it."""
    from bench import report

    readme = (ROOT / "README.md").read_text()
    begin, end = readme.index(report.README_BEGIN), readme.index(report.README_END) + len(report.README_END)
    assert readme[begin:end] == "\n".join(report.readme_summary(report.RESULTS_DIR))


def test_memory_cells_never_read_zero_mb():
    """A measured 0 is shown as below one resident page, small peaks keep their digits, missing ones a dash."""
    assert report.fmt_mem("0.0") == "< 0.004"
    assert report.fmt_mem("0.05") == "0.050"
    assert report.fmt_mem("3445.2") == "3,445.2"
    assert report.fmt_mem("") == "-"
