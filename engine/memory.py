"""Host memory of a training process: the allocator policy of CPU runs and peak resident-memory measurement.

Where this sits: beside the step loop. engine.train applies `limit_allocator_retention()` before a
CPU run builds its model; the benchmarks measure every system's peak the same way with `RssWindow`.

Why an allocator policy: glibc serves allocations below its mmap threshold from heap arenas and
raises that threshold (up to 32 MB) each time a larger mmap'ed block is freed, so after the first
step every activation of a mid-sized model lands in the heap, and freed activations stay resident
as fragments. On one gpt2-small step (743 tokens) that held 384 MB beyond the live tensors (RSS
peak 2,546 MB against 2,162 MB with a fixed 1 MiB threshold). A fixed threshold returns large
blocks to the system when they are freed; `MALLOC_MMAP_THRESHOLD_` in the environment wins over it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import threading
import time
from pathlib import Path

# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def limit_allocator_retention(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold so freed blocks of `threshold_bytes` or more leave the process.

    Returns whether it was applied: not on a non-glibc C library, and not when the user set
    MALLOC_MMAP_THRESHOLD_ (glibc already applied theirs).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """This process's resident set now (Linux), MiB; None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark, MiB (since start, or since `reset_peak_rss`)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0, /proc/self/clear_refs "5")."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class RssWindow:
    """Peak resident memory of a block above the RSS at its start, the same way in every process.

    On entry: garbage collection, then the kernel's high-water mark is reset to the current RSS, which
    becomes the baseline; on exit the mark is read back. Where the mark cannot be reset, a thread
    samples the current RSS every `interval_s` (a short peak between samples can be missed: the
    method is recorded in `method`). So a block shows the memory it added on top of what the process
    held when it began, whatever the process did before (imports, data preparation); the old
    ru_maxrss difference read 0 whenever an earlier phase had peaked higher.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.baseline_mb = float("nan")
        self.peak_mb = float("nan")  # peak rise above the baseline
        self.method = ""
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssWindow:
        gc.collect()
        if reset_peak_rss():
            self.method = "kernel high-water mark (VmHWM) reset at the start"
            self.baseline_mb = current_rss_mb()
        elif current_rss_mb() is not None:
            self.method = f"RSS sampled every {self.interval_s * 1e3:g} ms"
            self.baseline_mb = current_rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.method = "ru_maxrss difference (a lower bound: no /proc)"
            self.baseline_mb = peak_rss_mb()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(current_rss_mb() or 0.0)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._samples.append(current_rss_mb() or 0.0)
            self.peak_mb = max(self._samples) - self.baseline_mb
        else:
            self.peak_mb = peak_rss_mb() - self.baseline_mb
