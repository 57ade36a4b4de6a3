"""Per-row log-probs of a block of logits, and their gradient written over the block: the row work of a chunk.

Where this sits: the chunked walk (_common.py) makes a [c, V] block of logits with fixed-shape GEMMs
and hands it here:

    chunk_logprob_forward(logits, targets)               -> lse [c], logp [c] = logits[i, t_i] - lse_i
    chunk_logprob_backward_(logits, targets, lse, grad)  :  logits[i] := grad_i * (onehot(t_i) - softmax_i)

Every row has a target in [0, V) (the schedule selected them). All math is fp32 whatever the
logits' dtype; the backward rounds each gradient once to the logits' dtype, as eager autograd does.
One semantics, three implementations:
- Triton kernels (the "triton" backend; on CPU through the interpreter): one program per row, a
  per-lane online max / sum-exp over vocabulary blocks merged once at the end (one exp per element).
- native C++/CUDA operators (csrc/, torch.ops.ddpo_ops.*), used by the "torch" backend when the
  library is built or JIT-buildable and not switched off (ENGINE_NATIVE_OPS=0 or
  `set_native_enabled(False)` force the references, for debugging and A/B comparisons);
- `*_ref`: pure PyTorch, what the tests hold the others to, and the fallback (bench/bench_native.py
  times native against it and appends rows to bench/results/native.csv).
A row's results depend only on that row (no cross-row reduction), and the Triton kernels run one
fixed configuration rather than an autotuned one: the reference cache and the policy compute the
same rows in different processes, and an autotuner could pick a different lane layout (hence a
different rounding of lse) in each.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Rows per block of the reference backward: bounds its fp32 temporary to 256 x V floats.
_REF_BWD_ROWS = 256


@triton.jit
def _logprob_rows_fwd_kernel(logits_ptr, targets_ptr, lse_ptr, logp_ptr, V, stride_row, BLOCK_V: tl.constexpr):
    """One program per row: online max / sum-exp over vocabulary blocks; the target logit by one load."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    tgt = tl.load(targets_ptr + row).to(tl.int64)
    # Per-lane running max / sum, merged once at the end: one exp per element, no per-block reduction.
    m_i = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, x)
        # Lanes that have seen only padding keep m = -inf: shift by 0 there, so exp(-inf) = 0, not nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.exp(x - m_safe)
        m_i = m_new
    m = tl.max(m_i, 0)
    lse = m + tl.log(tl.sum(s_i * tl.exp(m_i - m), 0))
    # A target outside [0, V) cannot be checked on the host without a sync: it reads nothing and
    # poisons its row with NaN, so the loss shows the bad input.
    valid = (tgt >= 0) & (tgt < V)
    x_t = tl.load(base + tgt, mask=valid, other=float("nan")).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x_t - lse)


@triton.jit
def _logprob_rows_bwd_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, V, stride_row, BLOCK_V: tl.constexpr):
    """One program per row: logits := g * (onehot(target) - exp(logits - lse)), in place, fp32 math."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    tgt = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        d = g * (tl.where(offs == tgt, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(base + offs, d.to(logits_ptr.dtype.element_ty), mask=mask)


INTERPRETED = isinstance(_logprob_rows_fwd_kernel, InterpretedFunction)


def _launch_options(vocab_size: int) -> dict:
    """The one configuration per device: 4096 lanes and 8 warps on GPUs (16 elements per thread per
    step, vectorised loads); fewer, larger numpy ops under the interpreter."""
    if INTERPRETED:
        return dict(BLOCK_V=min(4096, triton.next_power_of_2(max(vocab_size, 16))))
    return dict(BLOCK_V=4096, num_warps=8)


def _check_block(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [C, V] and targets [C]; got {tuple(logits.shape)} and {tuple(targets.shape)}")


def _stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def chunk_logprob_forward_ref(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward: (lse [C], logp [C]) in fp32 (fp64 for fp64 logits)."""
    _check_block(logits, targets)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    return lse, x.gather(1, targets.long()[:, None]).squeeze(1) - lse


def chunk_logprob_backward_ref_(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor
) -> None:
    """Reference backward: logits := grad[:, None] * (onehot(targets) - softmax(logits)), in place."""
    _check_block(logits, targets)
    acc = torch.promote_types(logits.dtype, torch.float32)
    g, t = grad.to(acc), targets.long()
    # Row blocks keep the fp32 temporary small; fp32 math then one cast, so low-precision
    # blocks get g * (1 - p) rounded once rather than g and g * p rounded separately.
    for r0 in range(0, logits.shape[0], _REF_BWD_ROWS):
        r1 = min(logits.shape[0], r0 + _REF_BWD_ROWS)
        blk = logits[r0:r1].to(acc)
        blk.sub_(lse[r0:r1, None].to(acc)).exp_().mul_(-g[r0:r1, None])
        blk.scatter_add_(1, t[r0:r1, None], g[r0:r1, None])
        logits[r0:r1].copy_(blk)


def chunk_logprob_forward(
    logits: torch.Tensor, targets: torch.Tensor, *, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [C], logp [C]) in fp32 of a [C, V] block of logits (fp32/fp16/bf16) whose rows all have a target."""
    _check_block(logits, targets)
    c, v = logits.shape
    if backend == "triton":
        lse = torch.empty(c, dtype=torch.float32, device=logits.device)
        logp = torch.empty(c, dtype=torch.float32, device=logits.device)
        if c:
            _logprob_rows_fwd_kernel[(c,)](logits, targets, lse, logp, v, logits.stride(0), **_launch_options(v))
        return lse, logp
    if logits.stride(-1) == 1 and logits.dtype != torch.float64 and native_has_device(logits.device.type):
        lse, logp = torch.ops.ddpo_ops.logprob_rows_forward(logits, targets, _stream_of(logits))
        return lse, logp
    return chunk_logprob_forward_ref(logits, targets)


def chunk_logprob_backward_(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, *, backend: str = "torch"
) -> None:
    """Overwrite the block with grad[:, None] * (onehot(targets) - softmax(logits)) in its own dtype."""
    _check_block(logits, targets)
    c, v = logits.shape
    if backend == "triton":
        if c:
            grad = grad.float().contiguous()
            _logprob_rows_bwd_kernel[(c,)](logits, targets, lse, grad, v, logits.stride(0), **_launch_options(v))
        return
    if logits.stride(-1) == 1 and logits.dtype != torch.float64 and native_has_device(logits.device.type):
        torch.ops.ddpo_ops.logprob_rows_backward_(logits, targets, lse, grad, _stream_of(logits))
        return
    chunk_logprob_backward_ref_(logits, targets, lse, grad)


# ---------------------------------------------------------------------------------------------
# Native library (csrc/): loading and switches
# ---------------------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parents[2]  # kernels/ddpo_kernels/chunk_logprob.py -> repo root
_CSRC = _REPO_ROOT / "csrc"
_lock = threading.Lock()
_native: dict = {"tried": False, "loaded": False, "source": None, "error": None}
_native_override: bool | None = None


def set_native_enabled(enabled: bool | None) -> None:
    """Force the native ops on (True, when loadable) or off (False); None = follow ENGINE_NATIVE_OPS."""
    global _native_override
    _native_override = enabled


def _native_wanted() -> bool:
    if _native_override is not None:
        return _native_override
    return os.environ.get("ENGINE_NATIVE_OPS", "1").strip().lower() not in ("0", "false", "off", "no")


def _ops_registered() -> bool:
    return hasattr(torch.ops, "ddpo_ops") and hasattr(torch.ops.ddpo_ops, "logprob_rows_forward")


def _jit_build() -> None:
    from torch.utils.cpp_extension import CUDA_HOME, load

    with_cuda = os.environ.get("SKIP_CUDA_BUILD", "0") != "1" and torch.cuda.is_available() and CUDA_HOME is not None
    sources = [str(_CSRC / "ops.cpp")] + ([str(_CSRC / "ops_cuda.cu")] if with_cuda else [])
    name = "ddpo_ops_cuda" if with_cuda else "ddpo_ops_cpu"
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    build_dir = Path(root) / name if root else _REPO_ROOT / "build" / "jit" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's load() holds a file lock on the build directory, so concurrent processes
    # (pytest-xdist, several ranks) build once and the others wait and reuse it.
    load(
        name=name,
        sources=sources,
        build_directory=str(build_dir),
        extra_cflags=["-O3", "-std=c++20", "-fopenmp"],
        extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load_native() -> bool:
    """Load the native operators once (built extension ddpo_kernels._C, else a JIT build); True on success.

    ENGINE_NATIVE_JIT=0 forbids the JIT build; TORCH_EXTENSIONS_DIR moves its directory (default
    <repo>/build/jit/); SKIP_CUDA_BUILD=1 keeps it CPU-only.
    """
    if _native["tried"]:
        return _native["loaded"]
    with _lock:
        if _native["tried"]:
            return _native["loaded"]
        _native["tried"] = True
        if _ops_registered():  # loaded by someone else in this process
            _native.update(loaded=True, source="preloaded")
            return True
        spec = importlib.util.find_spec("ddpo_kernels._C")
        if spec is not None and spec.origin and Path(spec.origin).parent != Path(__file__).parent:
            # An editable install of another checkout resolves the name to its own build: loading it
            # would register that checkout's operators under our namespace.
            _native["error"] = f"ignored {spec.origin}: built from another checkout than {Path(__file__).parent}"
            spec = None
        if spec is not None and spec.origin:
            try:
                importlib.import_module("ddpo_kernels._C")  # its import registers torch.ops.ddpo_ops
                _native.update(loaded=_ops_registered(), source=spec.origin)
            except ImportError as exc:  # stale build (other torch ABI), missing libcudart...
                _native["error"] = f"{spec.origin}: {exc}"
        if not _native["loaded"] and os.environ.get("ENGINE_NATIVE_JIT", "1") != "0":
            print(f"[ddpo_kernels] ddpo_kernels._C not built; using the JIT build of {_CSRC} (first build ~1 min)")
            try:
                _jit_build()
                _native.update(loaded=_ops_registered(), source="jit")
            except Exception as exc:  # no compiler, missing headers: fall back, say so once
                lines = str(exc).strip().splitlines()
                _native["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        if not _native["loaded"]:
            print(f"[ddpo_kernels] native ops unavailable ({_native['error']}); using the PyTorch versions")
        return _native["loaded"]


def native_error() -> str | None:
    """Why the native library did not load (None when it did or was not tried)."""
    return _native["error"]


def native_has_device(device_type: str) -> bool:
    """True when the native library is loaded, not switched off, and has kernels for `device_type`."""
    if not (_native_wanted() and load_native()):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("ddpo_ops::logprob_rows_forward", key)
