"""Shared helpers of the benchmarks: environment record, timing quantiles, peak memory, MFU, CSV rows.

Where this sits: every new benchmark module (`bench/bench_train.py`, the orchestrator `bench/run.py`)
uses these, so that all rows carry the same hardware/version/commit/run-id record and every time
figure comes from the same warm-up + >= 10 timed repetitions + quantile code. `bench/report.py`
reads the rows back; nothing here formats a report.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
RUN_ID_ENV = "BENCH_RUN_ID"
MIN_REPS = 10

# Dense bf16 tensor-core peak (no sparsity) per GPU family, FLOP/s; matched as a substring of the
# device name, most specific first. Sources: the vendors' data sheets (SXM parts).
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


# ------------------------------------------------------------------------------------- environment


def git_commit() -> str:
    """Short HEAD sha, with "-dirty" when the work tree has changes (so numbers are traceable)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "no-commit") + ("-dirty" if dirty else "")


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


def environment(device: str = "cpu", packages: Sequence[str] = ("torch", "triton", "transformers", "trl", "deepspeed", "liger-kernel")) -> dict:
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
        return {f"{prefix}_median": round(self.median, 3), f"{prefix}_p10": round(self.p10, 3),
                f"{prefix}_p90": round(self.p90, 3), "reps": self.reps}  # fmt: skip


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, reps: int = MIN_REPS, warmup: int = 1, sync: Callable[[], None] | None = None,
            setup: Callable[[], None] | None = None, min_reps: int = MIN_REPS) -> Timing:  # fmt: skip
    """Run `fn` `warmup` times untimed, then `reps` timed times; `setup` runs before each call, untimed.

    `sync` (default: CUDA synchronize when CUDA is present) runs before the clock is read on both
    sides, so asynchronous GPU work is inside the measured interval.
    """
    if reps < min_reps:
        raise ValueError(f"reps={reps}: at least {min_reps} timed repetitions are needed for stable quantiles; raise reps")
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

    def __enter__(self) -> "PeakMemory":
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


# -------------------------------------------------------------------------------------------- MFU


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name; None when the name is not in the table."""
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def model_flops_per_token(n_params: int, n_layers: int, d_model: int, context: float, *, n_trainable: int | None = None,
                          n_embedding: int = 0) -> float:  # fmt: skip
    """Training FLOPs per token: 6 N for the matmuls (forward 2N, backward 4N) plus 12 L d T for attention
    scores and values (PaLM appendix B), with T the attended context (for packed rows: the mean
    sequence length, since sequences do not attend across each other).

    With LoRA (n_trainable < n_params) the frozen weights need no weight gradients: 4 N_frozen + 6 N_trainable.
    The input embedding is a lookup, not a matmul: its `n_embedding` parameters are left out.
    """
    n = n_params - n_embedding
    if n_trainable is None or n_trainable >= n:
        dense = 6.0 * n
    else:
        dense = 4.0 * (n - n_trainable) + 6.0 * n_trainable
    return dense + 12.0 * n_layers * d_model * context


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str | None) -> float | None:
    """Model FLOPs utilisation; None on CPU or an unknown GPU (no peak to divide by)."""
    if not device_name:
        return None
    peak = gpu_peak_flops(device_name)
    return flops_per_token * tokens_per_s / peak if peak else None


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
