"""`make bench` / `make bench-full`: run every benchmark module, then regenerate BENCHMARKS.md.

Run:  python -m bench.run [--quick] [--only kernels,train] [--budget SECONDS] [--no-report]

Where this sits: the top of bench/. Each benchmark module runs in its own subprocess (fresh memory
high-water marks, no state shared between modules) with a time budget; the quick set is sized for
about 12 minutes on 2 CPU cores. A job that is missing, crashes or overruns its budget is reported
with its reason (printed, and recorded in bench/results/runs.csv, which BENCHMARKS.md lists); rows it
appended before stopping are real measurements and stay. No row is ever written here on a module's
behalf. Every job of one invocation shares one run id (BENCH_RUN_ID), and runs.csv records each job's
time span, so bench/report.py can tie rows of modules that record no run id to this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common, report  # noqa: E402

QUICK_TOTAL_S = 12 * 60


@dataclasses.dataclass(frozen=True)
class Job:
    """One benchmark module: how to run it in each mode, its results file and its time budgets."""

    name: str
    source: str  # the module file that must exist
    csv: str  # results file it appends to (bench/results/<csv>)
    quick: tuple[str, ...]  # arguments after the python executable
    full: tuple[str, ...]
    budget_quick_s: int
    budget_full_s: int
    needs: tuple[str, ...] = ()  # importable modules it requires


def _pytest_kernels(k: str | None) -> tuple[str, ...]:
    args = (
        "-m",
        "pytest",
        "bench/bench_kernels.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-columns=median,iqr,rounds",
    )
    return args + (("-k", k) if k else ())


JOBS = [
    # Kernels first: the fused-loss numbers are the engine's core claim. Quick: the cpu-small configs
    # (10 timed reps each); full adds cpu-target and, with CUDA, the Llama-3-8B head shapes.
    Job(
        "kernels",
        "bench/bench_kernels.py",
        "kernels.csv",
        _pytest_kernels("cpu-small or cpu-sweep"),
        _pytest_kernels(None),
        budget_quick_s=330,
        budget_full_s=3600,
        needs=("pytest_benchmark",),
    ),
    Job(
        "native",
        "bench/bench_native.py",
        "native.csv",
        ("bench/bench_native.py", "--shapes", "512x32003", "--dtypes", "float32"),
        ("bench/bench_native.py",),
        budget_quick_s=60,
        budget_full_s=600,
    ),
    Job(
        "refcache",
        "bench/bench_refcache.py",
        "refcache.csv",
        ("bench/bench_refcache.py", "--reps", "10", "--warmup", "2", "--rounds", "1"),
        ("bench/bench_refcache.py",),
        budget_quick_s=120,
        budget_full_s=1200,
    ),
    Job(
        "deviation",
        "bench/bench_deviation.py",
        "deviation.csv",
        ("-m", "bench.bench_deviation", "--quick"),
        ("-m", "bench.bench_deviation"),
        budget_quick_s=150,
        budget_full_s=3600,
        needs=("faiss",),
    ),
    Job(
        "attention",
        "bench/bench_attention.py",
        "attention.csv",
        ("-m", "bench.bench_attention", "--quick"),
        ("-m", "bench.bench_attention"),
        budget_quick_s=60,
        budget_full_s=600,
    ),
    Job(
        "train",
        "bench/bench_train.py",
        "train.csv",
        ("-m", "bench.bench_train", "--quick"),
        ("-m", "bench.bench_train"),
        budget_quick_s=270,
        budget_full_s=5400,
        needs=("trl", "deepspeed"),
    ),
    # The tiny reward preset trained end to end and its export scored on held-out responses (quality, not time).
    Job(
        "reward",
        "bench/bench_reward.py",
        "reward.csv",
        ("-m", "bench.bench_reward", "--quick"),
        ("-m", "bench.bench_reward"),
        budget_quick_s=240,
        budget_full_s=3600,
        needs=("deepspeed", "scipy"),
    ),
]


def job_env(run_id: str) -> dict:
    env = dict(os.environ)
    env[common.RUN_ID_ENV] = run_id
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")]) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    # Without a GPU the Triton kernels can only run through the interpreter (as in `make test`).
    env.setdefault("TRITON_INTERPRET", "0" if cuda else "1")
    return env


def missing_reason(job: Job) -> str | None:
    """Why a job cannot run here (its module or a dependency is absent), or None."""
    if not (REPO / job.source).is_file():
        return f"{job.source} does not exist"
    for mod in job.needs:
        if importlib.util.find_spec(mod) is None:
            return f"python module {mod!r} is not installed (pip install the project's requirements)"
    return None


def run_job(job: Job, args: tuple[str, ...], budget_s: float, env: dict) -> tuple[str, str, float]:
    """(status, reason, seconds). The job runs in its own process group so an overrun stops all of it."""
    cmd = [sys.executable, *args]
    print(f"[bench.run] {job.name}: {' '.join(args)} (budget {budget_s:.0f} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return (
            "timeout",
            f"stopped after its {budget_s:.0f} s budget; rows written before that are kept",
            time.monotonic() - t0,
        )
    dt = time.monotonic() - t0
    if rc != 0:
        return "failed", f"exit code {rc} (see the output above)", dt
    return "ok", "", dt


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the job's process group (it was started as its own session), then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick CPU set (about 12 minutes on 2 cores)")
    p.add_argument("--only", default=None, help="comma list of jobs: " + ", ".join(j.name for j in JOBS))
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="total seconds for all jobs (default: 720 with --quick, none otherwise)",
    )
    p.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md")
    args = p.parse_args(argv)

    jobs = JOBS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {j.name for j in JOBS})
        if unknown:
            p.error(f"--only: unknown job(s) {unknown}; choose from {', '.join(j.name for j in JOBS)}")
        jobs = [j for j in JOBS if j.name in names]
    total = args.budget if args.budget is not None else (QUICK_TOTAL_S if args.quick else None)
    mode = "quick" if args.quick else "full"
    run_id = common.new_run_id()
    os.environ[common.RUN_ID_ENV] = run_id
    env = job_env(run_id)
    commit, hw = common.git_commit(), common.hardware("cuda" if _cuda() else "cpu")
    print(f"[bench.run] run {run_id} ({mode}), commit {commit}, {hw}", flush=True)

    t_start = time.monotonic()
    records = []
    for job in jobs:
        start = common.timestamp()
        reason = missing_reason(job)
        status, seconds = "skipped", 0.0
        if reason is None:
            budget = job.budget_quick_s if args.quick else job.budget_full_s
            if total is not None:
                left = total - (time.monotonic() - t_start)
                if left < 20:
                    reason = f"the run's total budget of {total:.0f} s was used up by the jobs before it"
                else:
                    budget = min(budget, left)
            if reason is None:
                status, reason, seconds = run_job(job, job.quick if args.quick else job.full, budget, env)
        if status != "ok":
            print(f"[bench.run] {job.name}: {status}: {reason}", flush=True)
        records.append(
            {
                "run_id": run_id,
                "mode": mode,
                "job": job.name,
                "csv": job.csv,
                "status": status,
                "reason": reason or "",
                "start": start,
                "end": common.timestamp(),
                "seconds": round(seconds, 1),
                "commit": commit,
                "hardware": hw,
            }
        )
        common.append_csv(common.RESULTS_DIR / report.RUNS_CSV, records[-1:], report.RUNS_FIELDS)

    print(f"[bench.run] benchmarks took {time.monotonic() - t_start:.0f} s", flush=True)
    for r in records:
        print(f"[bench.run]   {r['job']:<10} {r['status']:<8} {r['seconds']:>7.1f} s  {r['reason']}")
    if not args.no_report:
        report.render(common.RESULTS_DIR, report.OUT)
        print(f"[bench.run] wrote {report.OUT.relative_to(REPO)} and {common.RESULTS_DIR.relative_to(REPO)}/plots/")
    # A crash is an error; a skip or an overrun is a recorded outcome (listed in BENCHMARKS.md).
    return 1 if any(r["status"] == "failed" for r in records) else 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
