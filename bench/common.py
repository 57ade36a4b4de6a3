"""Shared helpers of the benchmarks: environment record, timing quantiles, peak memory, CSV rows.

Where this sits: every new benchmark module (`bench/bench_train.py`, the orchestrator `bench/run.py`)
uses these, so that all rows carry the same hardware/version/commit/run-id record and every time
figure comes from the same warm-up + >= 10 timed repetitions + quantile code. `bench/report.py`
reads the rows back; nothing here formats a report. FLOPs and MFU come from `engine.flops` (one
definition shared with the trainer's logs).

Run ids: `bench/run.py` sets BENCH_RUN_ID once per orchestrated run and every row written during that
run carries it, so the report computes each ratio from rows of one run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
RUN_ID_ENV = "BENCH_RUN_ID"
MIN_REPS = 10


# ------------------------------------------------------------------------------------- environment


COMMIT_ENV = "BENCH_COMMIT"


def git_commit() -> str:
    """Short HEAD sha, with "-dirty" when the work tree has changes (so numbers are traceable).

    A copy of the tree without its .git (as a GPU machine may get) has no HEAD: then BENCH_COMMIT, set
    by whoever sent the copy, names the commit; "unknown" when neither is there.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = dirty = ""
    if not sha:
        return os.environ.get(COMMIT_ENV, "").strip() or "unknown"
    return sha + ("-dirty" if dirty else "")


def run_id() -> str:
    """The id of the current benchmark run: BENCH_RUN_ID when the orchestrator set it, else a new one
    (set into the environment so that subprocesses of this run share it)."""
    rid = os.environ.get(RUN_ID_ENV)
    if not rid:
        rid = new_run_id()
        os.environ[RUN_ID_ENV] = rid
    return rid


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        name = m.group(1).strip() if m else name
    except OSError:
        pass
    return name


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware(device: str = "cpu") -> str:
    """One-line description: the GPU name on CUDA, else CPU model, usable cores, torch threads and load."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host {cpu_name()} x{usable_cores()}"
    load = f"; load1 {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu_name()}; {usable_cores()} cores; threads={torch.get_num_threads()}{load}"


def version(dist_name: str) -> str:
    """Installed version of a distribution, "" when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v(dist_name)
    except PackageNotFoundError:
        return ""


def _pyproject_version() -> str:
    """The version in pyproject.toml, for a checkout that is not pip-installed."""
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    except OSError:
        return ""
    return m.group(1) if m else ""


def environment(
    device: str = "cpu",
    packages: Sequence[str] = ("torch", "triton", "transformers", "trl", "deepspeed", "liger-kernel"),
) -> dict:
    """The record every row carries: hardware, versions (keys as given, "-" replaced by "_"), commit, run id, time."""
    env = {"hardware": hardware(device), "commit": git_commit(), "run_id": run_id(), "timestamp": timestamp()}
    env["package"] = version("ddpo-engine") or _pyproject_version()
    for p in packages:
        env[p.replace("-", "_")] = version(p)
    return env


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Timed repetitions (milliseconds, warm-up excluded) and their quantiles."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def reps(self) -> int:
        return len(self.samples_ms)

    def quantile(self, q: float) -> float:
        if not self.samples_ms:
            raise ValueError("no timed repetitions recorded; run at least one rep before reading quantiles")
        return float(np.quantile(np.asarray(self.samples_ms, dtype=np.float64), q))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def p10(self) -> float:
        return self.quantile(0.1)

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    def row(self, prefix: str = "time_ms") -> dict:
        return {
            f"{prefix}_median": round(self.median, 3),
            f"{prefix}_p10": round(self.p10, 3),
            f"{prefix}_p90": round(self.p90, 3),
            "reps": self.reps,
        }


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object],
    *,
    reps: int = MIN_REPS,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    setup: Callable[[], None] | None = None,
    min_reps: int = MIN_REPS,
) -> Timing:
    """Run `fn` `warmup` times untimed, then `reps` timed times; `setup` runs before each call, untimed.

    `sync` (default: CUDA synchronize when CUDA is present) runs before the clock is read on both
    sides, so asynchronous GPU work is inside the measured interval.
    """
    if reps < min_reps:
        raise ValueError(
            f"reps={reps}: at least {min_reps} timed repetitions are needed for stable quantiles; raise reps"
        )
    sync = sync or cuda_sync
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync()
    out = Timing()
    for _ in range(reps):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.samples_ms.append((time.perf_counter() - t0) * 1e3)
    return out


# ------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated over the block, or on CPU the peak resident set
    above the RSS at entry (engine.memory.RssWindow: the kernel's high-water mark reset at entry, or a
    sampling thread where it cannot be reset); `method` says which.

    Measure each configuration in a fresh subprocess so that allocator state left by another
    configuration cannot hide or inflate its peak.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.before_mb = 0.0
        self.peak_mb = float("nan")
        self.method = "CUDA max_memory_allocated" if device.startswith("cuda") else ""
        self._rss = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_mb = torch.cuda.memory_allocated() / 2**20
        else:
            from engine.memory import RssWindow

            self._rss = RssWindow().__enter__()
            self.before_mb, self.method = self._rss.baseline_mb, self._rss.method
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._rss.__exit__(*exc)
            self.peak_mb = self._rss.peak_mb


# --------------------------------------------------------------------------------------------- CSV


def append_csv(path: str | Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    """Append rows under a fixed header; the file gets the header when new.

    A file whose header differs (an older schema) is not mixed with new rows: the error says how to
    proceed, since silently realigning columns would misattribute numbers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(
                f"{path} has columns {header}, expected {fields}; move the old file aside (e.g. {path.name}.old) "
                f"and rerun, so rows of the two schemas are not mixed"
            )
        new = False
    else:
        new = True
    extra = sorted({k for r in rows for k in r} - set(fields))
    if extra:
        raise ValueError(f"row keys {extra} are not columns of {path.name}; add them to its field list")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
