"""Native CPU row ops (csrc/) against their pure-PyTorch versions: time and peak memory.

Where this sits: the chunked "torch" backend of ddpo_kernels calls
`chunk_logprob_forward` / `chunk_logprob_backward_` once per [C, V] window of logits; this
benchmark times each op on one chunk, native vs `*_ref`, in the same run, and appends one
CSV row per (op, impl, C, V, dtype) to bench/results/native.csv.

Method: 3 warm-up calls, then `--reps` (>= 10) timed calls; the median, p10 and p90 of the
per-call times are reported. The logits block the in-place backward mutates is reset outside
the timed region. Peak memory is the extra
resident memory of one call: the kernel's peak-RSS counter is reset (/proc/self/clear_refs)
after the inputs exist, and VmHWM - VmRSS is read after the call. So that freed blocks go
back to the OS and each call's temporaries show up in RSS, the script re-executes itself
with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB (glibc otherwise raises the threshold and keeps
freed memory, hiding repeat allocations).

Run: `PYTHONPATH=. python bench/bench_native.py [--shapes 512x32003,256x128256] [--dtypes float32,bfloat16]`
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_csv  # noqa: E402
from bench.common import git_commit as _commit  # noqa: E402
from bench.common import hardware as _hardware  # noqa: E402
from ddpo_kernels import chunk_logprob  # noqa: E402

CSV_PATH = ROOT / "bench" / "results" / "native.csv"
COLUMNS = [
    "bench",
    "op",
    "impl",
    "C",
    "V",
    "dtype",
    "time_ms",
    "p10",
    "p90",
    "reps",
    "peak_mem_mb",
    "hardware",
    "torch",
    "commit",
    "timestamp",
]
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def peak_extra_mb(fn) -> float:
    """Extra resident memory (MiB) at the peak of one call of fn(), relative to just before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) / 1024.0


def time_ms(fn, reset, reps: int, warmup: int = 3) -> tuple[float, float, float]:
    for _ in range(warmup):
        reset()
        fn()
    times = []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1]


def make_inputs(C: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(C, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (C,), generator=g)  # the walk hands over only rows that have a target
    return logits, targets


def bench_one(C: int, V: int, dtype: torch.dtype, reps: int) -> list[dict]:
    logits, targets = make_inputs(C, V, dtype)
    grad = torch.randn(C)
    lse = torch.logsumexp(logits.float(), dim=-1)
    work = logits.clone()

    def reset_work():
        work.copy_(logits)

    impls = {
        "native": (chunk_logprob.chunk_logprob_forward, chunk_logprob.chunk_logprob_backward_),
        "torch": (chunk_logprob.chunk_logprob_forward_ref, chunk_logprob.chunk_logprob_backward_ref_),
    }
    rows = []
    for impl, (fwd, bwd) in impls.items():
        cases = {
            "forward": (lambda fwd=fwd: fwd(logits, targets), lambda: None),
            "backward": (lambda bwd=bwd: bwd(work, targets, lse, grad), reset_work),
        }
        for op, (fn, reset) in cases.items():
            med, p10, p90 = time_ms(fn, reset, reps)
            reset()
            mem = peak_extra_mb(fn)
            rows.append(
                dict(
                    op=op,
                    impl=impl,
                    C=C,
                    V=V,
                    dtype=str(dtype).replace("torch.", ""),
                    time_ms=round(med, 3),
                    p10=round(p10, 3),
                    p90=round(p90, 3),
                    reps=reps,
                    peak_mem_mb=round(mem, 2),
                )
            )
            print(
                f"{op:9s} {impl:6s} C={C:5d} V={V:6d} {rows[-1]['dtype']:8s} "
                f"{med:9.2f} ms (p10 {p10:.2f}, p90 {p90:.2f})  peak +{mem:.1f} MiB"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x32003,256x128256", help="comma list of CxV chunk shapes")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv", default=str(CSV_PATH))
    args = ap.parse_args(argv)
    if args.reps < 10:
        raise SystemExit(f"--reps must be >= 10 for stable quantiles, got {args.reps}")
    if os.environ.get(MMAP_ENV) is None and sys.platform.startswith("linux"):
        env = dict(os.environ, **{MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env)

    if not chunk_logprob.native_has_device("cpu"):
        raise SystemExit(f"native CPU ops unavailable ({chunk_logprob.native_error()}); nothing to compare")
    meta = dict(
        bench="native_chunk_ops",
        hardware=_hardware(),
        torch=torch.__version__,
        commit=_commit(),
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    rows = []
    for shape in args.shapes.split(","):
        C, V = (int(x) for x in shape.lower().split("x"))
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name.strip())
            rows += [{**meta, **r} for r in bench_one(C, V, dtype, args.reps)]

    path = Path(args.csv)
    append_csv(path, rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
