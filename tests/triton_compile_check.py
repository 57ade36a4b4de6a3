"""Compile every Triton launch of ddpo_kernels for real GPUs on a machine without one.

Used by tests/test_kernels.py (in a subprocess: the kernels must be imported without TRITON_INTERPRET).
A compile check proves something only if it compiles the variant the JIT launches, so nothing here
types a signature: a fake CUDA driver of a chosen compute capability is made Triton's active driver,
the package's own launchers are called on CPU tensors, and `JITFunction.run` is wrapped so that each
launch goes through the JIT's own binder (specialisation of every argument: a stride of 1 becomes a
constant, pointers and ints get divisibility-by-16 hints, constexprs and launch options as passed),
compiles (ttir -> ptx -> cubin with triton's bundled ptxas), and stops before the launch. An
autotuned kernel is compiled once per config. Each compiled kernel is then checked against the
hardware it targets:
- shared memory (Triton's allocation, what the launch asks for) within the per-block opt-in limit;
- no register spills in half precision (ptxas -v, run with the flags Triton's own cubin step uses);
- tensor-core instructions (wgmma on sm_90, mma on sm_80) wherever a half-precision kernel has a tl.dot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# Largest dynamic shared memory one block may opt into (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100).
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
HALF_POINTERS = ("*bf16", "*fp16")


class FakeCudaDriver(DriverBase):
    """Just enough of a CUDA driver for the JIT to bind and compile (never to launch) on a CPU box."""

    def __init__(self, capability: int):
        super().__init__()
        self.capability = capability

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the fake driver builds no launcher")

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("no benchmarking without a GPU: the compile check walks every autotune config instead")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclasses.dataclass
class Compiled:
    """One compiled launch and what the checks need from it."""

    name: str
    capability: int
    signature: dict
    constants: dict
    num_warps: int
    num_stages: int
    shared: int
    ptx: str
    has_dot: bool
    registers: int = -1
    spill_bytes: int = -1

    @property
    def half(self) -> bool:
        return any(v in HALF_POINTERS for v in self.signature.values())

    def describe(self) -> str:
        # Arguments as the JIT specialised them: pointer dtypes, int widths, constants (constexprs and
        # ints equal to 1 or strides of 1 folded in).
        args = ",".join(str(self.constants.get(k, v)) if v == "constexpr" else v for k, v in self.signature.items())
        return f"{self.name}[sm_{self.capability}, warps={self.num_warps}, stages={self.num_stages}]({args})"


def _names(fn: JITFunction, keys) -> dict:
    """Signature/constant dict keyed by parameter name (the JIT keys constants by index path)."""
    params = [p.name for p in fn.params]
    return {params[k[0]] if isinstance(k, tuple) else k: v for k, v in keys.items()}


@contextlib.contextmanager
def recording(capability: int) -> Iterator[list[Compiled]]:
    """Within the block, Triton launches compile for `capability` and are recorded instead of run."""
    records: list[Compiled] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        src = kernel.src
        records.append(
            Compiled(
                name=self.fn.__name__,
                capability=capability,
                signature=_names(self, src.signature),
                constants={k: getattr(v, "value", v) for k, v in _names(self, src.constants).items()},
                num_warps=kernel.metadata.num_warps,
                num_stages=kernel.metadata.num_stages,
                shared=kernel.metadata.shared,
                ptx=kernel.asm["ptx"],
                has_dot="tt.dot" in kernel.asm["ttir"],
            )
        )
        return kernel

    def tuner(self, *args, **kwargs):
        # Every config the autotuner could pick is compiled (benchmarking needs a GPU).
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    previous = driver._active  # None on a machine without a GPU driver (reading .active would raise)
    driver.set_active(FakeCudaDriver(capability))
    JITFunction.run, Autotuner.run = run, tuner
    try:
        yield records
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = previous


def reset_device_caches(*kernels) -> None:
    """Forget binders/compiled kernels made for another fake target (the JIT caches them per device id)."""
    for k in kernels:
        fn = k.fn if isinstance(k, Autotuner) else k
        fn.device_caches.clear()


def ptxas_resources(c: Compiled) -> None:
    """Fill registers and spill bytes from `ptxas -v`, with the arguments of Triton's own cubin step."""
    arch = sm_arch_from_capability(c.capability)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(c.ptx)
        cmd = [get_ptxas(c.capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
        cmd += [str(ptx), "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output for {c.describe()}:\n{log}")
    c.registers = int(regs.group(1))
    c.spill_bytes = int(spills.group(1)) + int(spills.group(2))


def problems(c: Compiled) -> list[str]:
    """What would fail or be slow on the target: empty when the kernel is fine."""
    out = []
    limit = SHARED_MEMORY_LIMIT[c.capability]
    if c.shared > limit:
        out.append(f"{c.describe()}: shared memory {c.shared:,} B > sm_{c.capability} limit {limit:,} B")
    if c.half and c.spill_bytes > 0:
        out.append(f"{c.describe()}: {c.spill_bytes} B of register spills ({c.registers} registers)")
    if c.half and c.has_dot:
        needle = "wgmma" if c.capability >= 90 else "mma.sync"
        if needle not in c.ptx and "mma.sync" not in c.ptx:
            out.append(f"{c.describe()}: tl.dot without tensor-core instructions ({needle}) in the PTX")
    return out


def check_launches(launch: Callable[[], None], kernels, capabilities=(90, 80)) -> tuple[list[Compiled], list[str]]:
    """Compile every launch `launch()` makes, for each capability; return the records and the problems."""
    all_records, found = [], []
    for cap in capabilities:
        reset_device_caches(*kernels)
        with recording(cap) as records:
            launch()
        reset_device_caches(*kernels)
        for c in records:
            ptxas_resources(c)
            found += problems(c)
        all_records += records
    return all_records, found


def triton_ptxas_missing() -> str | None:
    """Why the check cannot run here, or None."""
    try:
        path = Path(get_ptxas(90).path)
    except Exception as exc:  # noqa: BLE001 - any failure to locate it means: skip with the reason
        return f"triton's bundled ptxas is not usable: {exc}"
    return None if path.exists() else f"triton's bundled ptxas is missing ({path})"


__all__ = ["Compiled", "SHARED_MEMORY_LIMIT", "check_launches", "problems", "recording", "triton_ptxas_missing"]
