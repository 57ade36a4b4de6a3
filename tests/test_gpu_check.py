"""make gpu-check (bench/gpu_check.py) without a GPU: its wheel step, budgets and skips, the kernel worker's
crash / hang / lost-context handling, the targets of issue #16, the import of rows, and one whole dry run
through `make gpu-check DRY_RUN=1` (the paths that need a GPU are the same code, at other shapes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from bench import bench_train, common, gpu_check, report

ROOT = Path(__file__).resolve().parent.parent


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(dry_run=True, out=str(tmp_path / "out"), wheels=None, site=None, deadline=None, parts=None, budget=None)
    return argparse.Namespace(**{**base, **kw})


def _rows(path: Path) -> list[dict]:
    return common.read_csv(path) if path.exists() else []


# ------------------------------------------------------------------------------------------ wheels


def test_wheel_names_and_the_choice_of_wheels(tmp_path):
    assert gpu_check.wheel_dist(Path("liger_kernel-0.8.5-py3-none-any.whl")) == ("liger-kernel", "0.8.5")
    assert gpu_check.wheel_dist(Path("pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.whl"))[0] == "pydantic-core"
    with pytest.raises(ValueError, match="not a wheel file name"):
        gpu_check.wheel_dist(Path("notes.txt"))
    names = ["trl-1.16.0", "trl-1.9.0", "numpy-1.0", "hjson-3.1.0", "typing_extensions-4.16.0"]
    have = {"numpy": "2.4.6", "typing-extensions": "4.12.0"}
    use, kept, warnings = gpu_check.choose_wheels([Path(f"{n}-py3-none-any.whl") for n in names], have.get)
    # the newest of two trl wheels (1.16 > 1.9 as versions, not as strings); the machine's newer numpy is kept;
    # an older typing-extensions on the machine is upgraded from the wheel
    chosen = sorted(p.name[: -len("-py3-none-any.whl")] for p in use)
    assert chosen == ["hjson-3.1.0", "trl-1.16.0", "typing_extensions-4.16.0"]
    assert kept == ["numpy 2.4.6 (the machine's; carried 1.0)"]
    assert len(warnings) == 1 and "two wheels of trl" in warnings[0] and "using trl-1.16.0" in warnings[0]


def test_the_dummy_wheel_is_a_valid_wheel_that_pip_installs(tmp_path):
    whl = gpu_check.make_dummy_wheel(tmp_path)
    assert gpu_check.wheel_dist(whl) == ("ddpo-gpu-check-probe", "1.0")
    with zipfile.ZipFile(whl) as z:
        record = z.read("ddpo_gpu_check_probe-1.0.dist-info/RECORD").decode()
        assert "ddpo_gpu_check_probe/__init__.py,sha256=" in record
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), str(whl)]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    probe = [sys.executable, "-c", "import ddpo_gpu_check_probe as m; print(m.__file__)"]
    out = subprocess.run(probe, cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().startswith(str(site)), out.stderr


# ------------------------------------------------------------------------------------------ budgets


def test_budgets_reserve_time_for_later_parts(tmp_path):
    assert gpu_check.parse_budgets("kernels=200, train=10") == {"kernels": 200.0, "train": 10.0}
    for bad in ("kernel=3", "train=", "train=-1", "train=soon"):
        with pytest.raises(ValueError, match="PART=SECONDS"):
            gpu_check.parse_budgets(bad)
    # 300 s left, tests and kernels come after setup with 75 + 150 s, 15 s kept for the report
    assert gpu_check.allowed_seconds(300, [75, 150], 15) == 60
    # a deadline shorter than the budgets shortens each in proportion
    assert gpu_check.fit_budgets({"setup": 20, "kernels": 60}, 50, 10) == {"setup": 10, "kernels": 30}
    assert gpu_check.fit_budgets({"setup": 20, "kernels": 60}, 500, 10) == {"setup": 20, "kernels": 60}
    # the GPU budgets fit the 8-minute deadline with the report's reserve
    lim = gpu_check.GPU_LIMITS
    assert lim.deadline <= 480 and sum(lim.budgets.values()) + lim.report_reserve <= lim.deadline


def test_output_folder_must_be_new_and_apart_from_the_committed_results(tmp_path):
    with pytest.raises(ValueError, match="bench/results itself"):
        gpu_check.Check(_args(tmp_path, out=str(common.RESULTS_DIR)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "kernels.csv").write_text("x\n")
    with pytest.raises(ValueError, match="not empty"):
        gpu_check.Check(_args(tmp_path, out=str(busy)))
    with pytest.raises(ValueError, match="unknown"):
        gpu_check.Check(_args(tmp_path, parts="kernels,bench"))


def test_names_shared_with_the_workers_agree():
    """gpu_check cannot import bench_kernels (torch): its copies of names and tags must match."""
    from bench import bench_kernels

    names = {c.name for c in bench_kernels.CONFIGS}
    assert set(gpu_check.KERNEL_CONFIGS) <= names
    assert gpu_check.KERNEL_DRY_RUN_CONFIG == bench_kernels.DRY_RUN_CONFIG.name
    assert (gpu_check.KERNEL_PLAN_TAG, gpu_check.KERNEL_CASE_TAG) == (bench_kernels.PLAN_TAG, bench_kernels.CASE_TAG)
    assert gpu_check.OBJECTIVES == bench_kernels.OBJECTIVES
    case = {"config": "gpu-8b-n8192", "op": "fused_preference_loss", "method": "cce", "objective": "dorpo"}
    assert gpu_check.case_id(case) == bench_kernels.case_id(case)
    assert gpu_check.LIGER_OBJECTIVES == bench_kernels.LIGER_OBJECTIVES
    head = bench_kernels.config_by_name("gpu-8b-n32768")
    assert (head.n, head.d, head.v, head.dtype) == (32768, 4096, 128256, "bfloat16")
    assert report.TARGET_KERNEL_BENCH == "gpu-8b-n32768"
    for name, system, variant in gpu_check.TRAIN_JOBS + gpu_check.TRAIN_DRY_RUN_JOBS:
        s = bench_train.SETUPS[name]
        assert variant in (bench_train.ENGINE_VARIANTS if system == bench_train.ENGINE else bench_train.TRL_VARIANTS)
    lora, full = bench_train.SETUPS["gpu-8b4l-lora"], bench_train.SETUPS["gpu-8b4l-full"]
    # one reference cache serves both setups only if they take the same pairs
    assert (lora.pairs_per_step, lora.steps, lora.max_length) == (full.pairs_per_step, full.steps, full.max_length)
    assert s.model and lora.model == "llama-8b-4layers" and lora.lora_r > 0 and full.lora_r == 0


# ------------------------------------------------------------------------------------- kernel worker

FAKE_WORKER = textwrap.dedent('''
    """Stands in for bench/bench_kernels.py's case worker: each case's method says how it behaves."""
    import csv, json, os, sys, time
    args = sys.argv[1:]
    cases = json.loads(args[args.index("--cases") + 1])
    path = args[args.index("--csv") + 1]
    fields = ["bench", "op", "backend", "objective", "time_ms_median", "run_id", "timestamp", "notes"]
    cid = lambda c: "/".join((c["config"], c["op"], c["method"], c["objective"]))
    row = lambda c: {"bench": c["config"], "op": c["op"], "backend": c["method"], "objective": c["objective"],
                     "run_id": os.environ["BENCH_RUN_ID"]}
    print("GPUCHECK-PLAN " + json.dumps({"fields": fields, "rows": {cid(c): row(c) for c in cases}}), flush=True)
    if "--plan-only" in args:
        sys.exit(0)
    for c in cases:
        print(f"GPUCHECK-CASE {cid(c)} start", flush=True)
        if c["method"] == "crash":
            sys.exit(7)
        if c["method"] == "hang":
            time.sleep(600)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow({**row(c), "time_ms_median": 1.5})
        print(f"GPUCHECK-CASE {cid(c)} done {{}}", flush=True)
        if c["method"] == "lost":
            print("GPUCHECK-CONTEXT-LOST", flush=True)
            sys.exit(3)
''')


def _fake_kernel_check(tmp_path, methods, **limits):
    check = gpu_check.Check(_args(tmp_path))
    check.limits = dataclasses.replace(check.limits, **limits)
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    case = {"config": "fake", "op": "fused_preference_loss"}
    cases = [{**case, "method": m, "objective": f"o{i}"} for i, m in enumerate(methods)]
    check.kernel_cases = lambda: cases
    starts = []

    def worker(cs, *extra):
        starts.append(extra)
        cmd = [sys.executable, str(script), "--cases", json.dumps(cs), "--csv", str(check.out / "kernels.csv"), *extra]
        return gpu_check.Child(cmd, check.child_env(), check.log)

    check.kernel_worker = worker
    return check, starts


def test_kernel_worker_crash_hang_and_lost_context_each_cost_one_case(tmp_path):
    check, starts = _fake_kernel_check(tmp_path, ["ok", "crash", "ok", "hang", "lost", "ok"], kernel_case=3)
    res = check.part_kernels(120)
    rows = {r["backend"] + r["objective"]: r for r in _rows(check.out / "kernels.csv")}
    assert len(rows) == 6 and all(r["run_id"] == check.run_id for r in rows.values())
    assert [rows[k]["time_ms_median"] for k in ("oko0", "oko2", "losto4", "oko5")] == ["1.5"] * 4
    assert rows["crasho1"]["notes"].startswith("failed: the worker died (exit 7) in this case")
    assert rows["hango3"]["notes"].startswith("failed: exceeded the per-case limit of 3 s")
    # the first worker, then one after the crash, the hang and the lost context (the rows of the cases they
    # could not finish come from the first worker's plan: no --plan-only call)
    assert starts == [(), (), (), ()]
    assert res.status == "partial" and "6 of 6 rows, 4 measured (2 failed)" in res.detail
    check.log_file.close()


def test_kernel_part_out_of_time_records_every_remaining_case(tmp_path):
    check, _ = _fake_kernel_check(tmp_path, ["ok", "hang", "ok"], kernel_case=100)
    res = check.part_kernels(4)
    rows = {r["objective"]: r for r in _rows(check.out / "kernels.csv")}
    assert rows["o0"]["time_ms_median"] == "1.5"
    assert rows["o1"]["notes"] == "failed: stopped when the kernels part's 4 s ran out"
    assert rows["o2"]["notes"] == "skipped: the kernels part's 4 s ran out before this case"
    assert res.status == "partial"
    check.log_file.close()


def test_a_deadline_that_runs_out_skips_the_later_parts_with_rows_saying_why(tmp_path, monkeypatch):
    check = gpu_check.Check(_args(tmp_path, deadline=100, parts="kernels,train"))
    clock = [0.0]
    check.clock, check.t0 = (lambda: clock[0]), 0.0

    def slow_setup(budget):
        clock[0] += 95  # setup overran: nothing is left for the rest
        return gpu_check.PartResult("ok", "", "fake setup")

    check.part_setup = slow_setup

    def templates(cases):
        rows = {}
        for c in cases:
            rows[gpu_check.case_id(c)] = {"bench": c["config"], "backend": c["method"], "objective": c["objective"]}
            rows[gpu_check.case_id(c)]["run_id"] = check.run_id
        return ["bench", "backend", "objective", "run_id", "timestamp", "notes"], rows

    check.kernel_templates = templates
    assert check.run() == 0
    runs = {r["job"]: r for r in _rows(check.out / "runs.csv")}
    assert [runs[p]["status"] for p in ("setup", "kernels", "train")] == ["ok", "skipped", "skipped"]
    assert "the 100 s deadline left it 0 s" in runs["kernels"]["reason"]
    kernels, train = _rows(check.out / "kernels.csv"), _rows(check.out / "train.csv")
    assert len(kernels) == len(check.kernel_cases()) and len(train) == len(gpu_check.TRAIN_DRY_RUN_JOBS)
    assert all(r["notes"].startswith("skipped: the 100 s deadline") for r in kernels + train)
    assert all(r["bench"].startswith(report.DRY_RUN_PREFIX) for r in kernels + train)
    summary = (check.out / "summary.md").read_text()
    assert "| kernels | skipped |" in summary and "0 met, 0 NOT met, 24 not measured" in summary


# ----------------------------------------------------------------------------------- targets, import

KFIELDS = "bench op backend objective N time_ms_median peak_mem_mb tflops pct_peak run_id timestamp notes".split()
TFIELDS = "bench system variant tokens_per_s step_time_ms_median peak_mem_mb run_id timestamp notes".split()
TS = "2026-01-01T00:00:00+00:00"


def _k(backend, objective, t, mem, run="r1", pct=None, notes=""):
    row = dict(bench="gpu-8b-n32768", op="fused_preference_loss", backend=backend, objective=objective, N=32768)
    return {
        **row,
        "time_ms_median": t,
        "peak_mem_mb": mem,
        "pct_peak": pct,
        "run_id": run,
        "timestamp": TS,
        "notes": notes,
    }


def _t(system, variant, tps, mem, run="r1"):
    row = dict(bench="gpu-8b4l-lora", system=system, variant=variant, tokens_per_s=tps, step_time_ms_median=1.0)
    return {**row, "peak_mem_mb": mem, "run_id": run, "timestamp": TS}


def _targets(krows, trows):
    for stem, rows in (("kernels", krows), ("train", trows)):
        report.attribute_runs(stem, rows, [])
    return {c["target"]: c for c in report.gpu_targets(krows, trows)}


def test_targets_are_judged_from_rows_of_one_run():
    krows = [_k("triton", "dpo", 100.0, 900.0, pct=65.2), _k("liger", "dpo", 130.0, 1000.0)]
    krows.append(_k("cce", "dpo", 90.0, 800.0))
    krows.append(_k("triton", "ddpo", 120.0, 1200.0, pct=55.0))
    # an older run's Liger row must not be compared with this run's triton row
    krows += [_k("triton", "orpo", 100.0, 500.0, pct=70.0), _k("liger", "orpo", 50.0, 400.0, run="old")]
    krows.append(_k("triton", "dorpo", "", "", notes="failed: out of memory: CUDA"))
    trows = [_t("ddpo-engine", "packed+cache", 3000.0, 500.0), _t("trl", "ref_forward", 1500.0, 600.0)]
    trows.append(_t("trl", "precomputed_ref", 2500.0, 400.0))
    c = _targets(krows, trows)
    assert c["dpo N=32768: % of bf16 dense peak"]["status"] == "met"
    assert c["dpo N=32768: time vs Liger"]["status"] == "met"  # 100 / 130 = 0.77 <= 0.8
    assert c["dpo N=32768: time vs Liger"]["measured"].startswith("0.77x")
    assert c["dpo N=32768: memory vs Liger"]["status"] == "met"
    assert c["dpo N=32768: memory vs CCE"]["status"] == "NOT met"  # 900 / 800 = 1.125 > 1.1
    # DDPO is held to Liger's DPO (Liger has no weighted loss)
    ddpo = c["ddpo N=32768: time vs Liger (dpo: Liger has no ddpo)"]
    assert ddpo["status"] == "NOT met" and ddpo["measured"].startswith("0.92x")
    assert c["ddpo N=32768: % of bf16 dense peak"]["status"] == "NOT met"
    assert c["orpo N=32768: time vs Liger"]["status"] == "not measured"
    assert c["orpo N=32768: time vs Liger"]["source"] == "no liger row in this run"
    assert c["dorpo N=32768: % of bf16 dense peak"]["source"] == "triton: failed: out of memory: CUDA"
    assert c["gpu-8b4l-lora: tokens/s vs TRL (ref forward)"]["status"] == "met"  # 2.00x
    assert c["gpu-8b4l-lora: tokens/s vs TRL (precomputed ref)"]["status"] == "NOT met"  # 1.20x
    assert c["gpu-8b4l-lora: memory vs TRL (precomputed ref)"]["status"] == "NOT met"  # 500 > 400
    assert len(c) == 16 + 4


def test_report_leaves_dry_run_rows_out_unless_previewing(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    dry = [_k("triton", "dpo", 100.0, 900.0, run="dryrun-x"), _k("eager", "dpo", 300.0, 9000.0, run="dryrun-x")]
    common.append_csv(res / "kernels.csv", [*dry, {**_k("eager", "dpo", 300.0, 9000.0), "bench": "cpu-small"}], KFIELDS)
    text = report.render(res, tmp_path / "B.md", plots=False)
    assert "2 dry-run rows" in text and "dryrun-x" not in text and "bench=cpu-small" in text
    assert "## GPU targets (issue #16)" in text
    assert "| dpo N=32768: % of bf16 dense peak | >= 60% | - | not measured | no triton row at gpu-8b-n32768" in text
    preview = report.render(res, tmp_path / "P.md", plots=False, include_dry_run=True)
    assert "Dry-run preview" in preview and "Run `dryrun-x`" in preview


def test_committed_results_hold_no_dry_run_rows():
    for path in common.RESULTS_DIR.glob("*.csv"):
        assert not any(report.is_dry_run(r) for r in common.read_csv(path)), path


def test_import_appends_a_gpu_run_once_and_refuses_dry_runs(tmp_path):
    results, src = tmp_path / "results", tmp_path / "check"
    results.mkdir()
    src.mkdir()
    common.append_csv(results / "kernels.csv", [_k("eager", "dpo", 300.0, 9000.0, run="old")], KFIELDS)
    common.append_csv(src / "kernels.csv", [_k("triton", "dpo", 100.0, 900.0, run="gpu1")], KFIELDS)
    common.append_csv(src / "train.csv", [_t("trl", "ref_forward", 1.0, 1.0, run="gpu1")], TFIELDS)
    assert gpu_check.import_rows(src, results, tmp_path / "B.md") == 0
    assert [r["run_id"] for r in common.read_csv(results / "kernels.csv")] == ["old", "gpu1"]
    assert (results / "train.csv").exists() and (tmp_path / "B.md").exists()
    with pytest.raises(SystemExit, match="already holds the rows of run"):
        gpu_check.import_rows(src, results, tmp_path / "B.md")
    common.append_csv(src / "kernels.csv", [_k("triton", "dpo", 1.0, 1.0, run="dryrun-1")], KFIELDS)
    with pytest.raises(SystemExit, match="dry-run rows"):
        gpu_check.import_rows(src, results, tmp_path / "B.md")


def test_cuda_tests_carry_the_cuda_marker():
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider"]
    cmd += ["tests/test_native_ops.py", "tests/test_flops.py"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    assert ids and all(ln.startswith("tests/test_native_ops.py::") for ln in ids), out.stdout[-2000:]
    assert all("cuda" in ln for ln in ids)  # the CPU parametrisations are not selected


# ------------------------------------------------------------------------------------------ dry run


@pytest.mark.slow
def test_make_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu-check"
    cmd = ["make", "-s", "gpu-check", "DRY_RUN=1", f"OUT_DIR={out}", f"GPU_CHECK_PY={sys.executable}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # What the device tool brings back: at most 8 plain files, names of letters, digits, '.', '_', '-'.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES) and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    runs = {r["job"]: r for r in common.read_csv(out / "runs.csv")}
    assert list(runs) == ["setup", "tests", "kernels", "train"]
    assert all(r["run_id"].startswith(report.DRY_RUN_PREFIX) for r in runs.values())
    assert all(r["mode"] == "gpu-check-dry-run" for r in runs.values())
    assert runs["setup"]["status"] == "ok" and runs["tests"]["status"] == "ok", runs
    env = json.loads((out / "env.json").read_text())
    assert env["wheels"]["installed"] == ["ddpo_gpu_check_probe-1.0-py3-none-any.whl"]
    assert env["probe"]["packages"]["ddpo-gpu-check-probe"]["location"].startswith(env["wheels"]["site"])
    kernels = common.read_csv(out / "kernels.csv")
    assert len(kernels) == 7 and all(r["bench"] == "dryrun-cpu-head" for r in kernels)
    by = {(r["backend"], r["objective"]): r for r in kernels}
    for key in (("triton", "dpo"), ("eager", "dpo"), ("triton", "dorpo"), ("eager", "dorpo"), ("liger", "dpo")):
        assert float(by[key]["time_ms_median"]) > 0 and by[key]["reps"] == "2", by[key]
    # the fused Triton kernels (interpreted) and eager compute the same loss
    for obj in ("dpo", "dorpo"):
        assert float(by[("triton", obj)]["loss"]) == pytest.approx(float(by[("eager", obj)]["loss"]), rel=1e-4)
    assert by[("cce", "dpo")]["notes"] == "skipped: Cut Cross-Entropy runs on CUDA only"
    train = common.read_csv(out / "train.csv")
    assert [(r["system"], r["variant"]) for r in train] == [("ddpo-engine", "packed+cache"), ("trl", "precomputed_ref")]
    assert all(r["bench"] == "dryrun-cpu-tiny-smoke" and float(r["tokens_per_s"]) > 0 for r in train), train
    assert "attention sdpa_varlen; 2 decoder layers" in train[0]["notes"] and "cache built once" in train[0]["notes"]
    doc = (out / "BENCHMARKS.md").read_text()
    assert "Dry-run preview" in doc and "## GPU targets (issue #16)" in doc and "dryrun-cpu-head" in doc
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# make gpu-check DRY RUN") and "24 not measured (a dry run measures none)" in summary
    assert summary in proc.stdout  # printed last, where the device tool's output tail keeps it
