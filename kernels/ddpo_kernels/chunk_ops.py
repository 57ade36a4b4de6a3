"""Per-chunk log-prob operators and the preference-loss epilogue, native when built.

Where this sits: the chunked "torch" backend of `kernels/` computes logits one chunk of
tokens at a time (`hidden_chunk @ weight.T`) and hands each [C, V] chunk to the two ops
below, then feeds the per-sequence sums [S] to the preference epilogue:

    logits_CV -> chunk_logprob_forward  -> lse_C, seg_logps_S += ..., seg_counts_S += ...
    seq sums  -> preference_epilogue    -> loss, d loss / d seq sums
    logits_CV -> chunk_logprob_backward_ -> d loss / d logits, written over the chunk

Each op has a pure-PyTorch version (`*_ref`, the semantics) and a native one in `csrc/`
(`torch.ops.ddpo_ops.*`: a C++ CPU kernel, plus a CUDA kernel when the extension was
built with nvcc). The public functions dispatch to the native op when the library is
loaded and has a kernel for the tensors' device, else to the reference. The native
library comes from `ddpo_kernels._C` (built by `setup.py`) or, failing that, from a one-time
JIT build of the CPU sources (`torch.utils.cpp_extension.load`). `ENGINE_NATIVE_OPS=0`
or `set_native_enabled(False)` forces the references (debugging, A/B comparisons).

Token masking, identical on every path: a token contributes iff its target is not
`ignore_index` and its segment id is >= 0 (padding carries segment id -1). The backward
writes zeros on the rows of tokens that do not contribute.

Switches: `ENGINE_NATIVE_OPS=0` (or `set_native_enabled(False)`) uses the references;
`ENGINE_NATIVE_JIT=0` forbids the JIT build; `TORCH_EXTENSIONS_DIR` moves the JIT build
directory (default `<repo>/build/jit/`); `SKIP_CUDA_BUILD=1` keeps the JIT build CPU-only.

Why the native ops exist: the reference forward materialises an fp32 copy of the chunk
plus logsumexp temporaries; the native forward makes one read pass over the chunk and
allocates only [C] floats, and the native backward rewrites the chunk in place with no
[C, V] temporary. bench/bench_native.py (bench/results/native.csv, one run on a shared,
busy 2-core AMD EPYC; medians) measured, native vs reference:
    C=512 V=32003 fp32:   forward 33 vs 261 ms (+0 vs +62 MiB), backward 27 vs 145 ms
    C=256 V=128256 bf16:  forward 47 vs 543 ms (+0 vs +250 MiB), backward 72 vs 558 ms (+0 vs +125 MiB)

CUDA streams: the CUDA kernels run on the stream passed as the trailing `cuda_stream`
argument (the raw `cudaStream_t` of `torch.cuda.current_stream()`), because the CUDA
sources avoid the c10/cuda headers so that they compile against a CPU torch build too.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import torch

from engine.config import OBJECTIVES

__all__ = [
    "chunk_logprob_forward",
    "chunk_logprob_backward_",
    "preference_epilogue",
    "segment_logprobs",
    "preference_epilogue_loss",
    "chunk_logprob_forward_ref",
    "chunk_logprob_backward_ref_",
    "preference_epilogue_ref",
    "native_available",
    "native_has_device",
    "set_native_enabled",
    "load_native",
]

IGNORE_INDEX = -100
_REPO_ROOT = Path(__file__).resolve().parents[2]  # kernels/ddpo_kernels/chunk_ops.py -> repo root
_CSRC = _REPO_ROOT / "csrc"
# Rows per block in the reference backward: bounds its fp32 temporary to 256 x V floats.
_REF_BWD_ROWS = 256


# ---------------------------------------------------------------------------------------
# Pure-PyTorch references (the semantics every native kernel is tested against)
# ---------------------------------------------------------------------------------------


def _valid_mask(targets_C: torch.Tensor, segment_ids_C: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets_C != ignore_index) & (segment_ids_C >= 0)


def chunk_logprob_forward_ref(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    segment_ids_C: torch.Tensor,
    seg_logps_S: torch.Tensor,
    seg_counts_S: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Reference forward: lse_C = logsumexp(logits) in fp32; seg sums updated in place."""
    _check_chunk_args(logits_CV, targets_C, segment_ids_C, seg_logps_S, seg_counts_S)
    x = logits_CV.float()
    lse_C = torch.logsumexp(x, dim=-1)
    valid = _valid_mask(targets_C, segment_ids_C, ignore_index)
    safe_t = torch.where(valid, targets_C, torch.zeros_like(targets_C)).long()
    logp_C = torch.where(valid, x.gather(1, safe_t[:, None]).squeeze(1) - lse_C, torch.zeros_like(lse_C))
    seg = torch.where(valid, segment_ids_C, torch.zeros_like(segment_ids_C)).long()
    seg_logps_S.index_add_(0, seg, logp_C)
    seg_counts_S.index_add_(0, seg, valid.to(seg_counts_S.dtype))
    return lse_C


def chunk_logprob_backward_ref_(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    segment_ids_C: torch.Tensor,
    lse_C: torch.Tensor,
    grad_seg_S: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Reference backward: logits_CV := g[seg_t] * (onehot(target_t) - softmax_t), in place."""
    C = logits_CV.shape[0]
    valid = _valid_mask(targets_C, segment_ids_C, ignore_index)
    seg = torch.where(valid, segment_ids_C, torch.zeros_like(segment_ids_C)).long()
    g_C = torch.where(valid, grad_seg_S.float()[seg], torch.zeros((), dtype=torch.float32, device=lse_C.device))
    safe_t = torch.where(valid, targets_C, torch.zeros_like(targets_C)).long()
    # Row blocks keep the fp32 temporary small; fp32 math then one cast, so low-precision
    # chunks get g * (1 - p) rounded once rather than g and g * p rounded separately.
    for r0 in range(0, C, _REF_BWD_ROWS):
        r1 = min(C, r0 + _REF_BWD_ROWS)
        blk = logits_CV[r0:r1].float()
        blk.sub_(lse_C[r0:r1, None]).exp_().mul_(-g_C[r0:r1, None])
        blk.scatter_add_(1, safe_t[r0:r1, None], g_C[r0:r1, None])
        logits_CV[r0:r1].copy_(blk)


def preference_epilogue_ref(
    objective: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    *,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference epilogue: engine.losses.preference_loss and its gradient by autograd."""
    from engine.losses import preference_loss  # lazy: engine.losses imports nothing of ours

    pc = chosen_logps.detach().float().requires_grad_(True)
    pr = rejected_logps.detach().float().requires_grad_(True)
    with torch.enable_grad():
        out = preference_loss(
            objective,
            pc,
            pr,
            chosen_counts,
            rejected_counts,
            beta=beta,
            chosen_weights=chosen_weights,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
        )
        g_c, g_r = torch.autograd.grad(out.loss, (pc, pr), allow_unused=True)
    g_c = torch.zeros_like(pc) if g_c is None else g_c
    g_r = torch.zeros_like(pr) if g_r is None else g_r
    return out.loss.detach().float(), g_c.detach(), g_r.detach()


def _check_chunk_args(logits_CV, targets_C, segment_ids_C, seg_logps_S, seg_counts_S) -> None:
    if logits_CV.dim() != 2:
        raise ValueError(f"logits_CV must be 2-D [C, V], got shape {tuple(logits_CV.shape)}")
    C = logits_CV.shape[0]
    if targets_C.shape != (C,) or segment_ids_C.shape != (C,):
        raise ValueError(
            f"targets_C {tuple(targets_C.shape)} and segment_ids_C {tuple(segment_ids_C.shape)} "
            f"must both be [C] = [{C}] to match logits_CV {tuple(logits_CV.shape)}"
        )
    if seg_logps_S.dtype != torch.float32 or seg_counts_S.dtype != torch.int64:
        raise ValueError(
            f"seg_logps_S must be float32 and seg_counts_S int64 (accumulators), got "
            f"{seg_logps_S.dtype} and {seg_counts_S.dtype}; allocate them with torch.zeros(S, dtype=...)"
        )
    if seg_logps_S.shape != seg_counts_S.shape or seg_logps_S.dim() != 1:
        raise ValueError(
            f"seg_logps_S {tuple(seg_logps_S.shape)} and seg_counts_S {tuple(seg_counts_S.shape)} must be the same [S]"
        )


# ---------------------------------------------------------------------------------------
# Native library: loading, switches
# ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "source": None, "error": None}
_enabled_override: bool | None = None


def set_native_enabled(enabled: bool | None) -> None:
    """Force the native ops on (True, when loadable) or off (False); None = follow ENGINE_NATIVE_OPS."""
    global _enabled_override
    _enabled_override = enabled


def _native_wanted() -> bool:
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get("ENGINE_NATIVE_OPS", "1").strip().lower() not in ("0", "false", "off", "no")


def _ops_registered() -> bool:
    return hasattr(torch.ops, "ddpo_ops") and hasattr(torch.ops.ddpo_ops, "chunk_logprob_forward")


def _jit_build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    path = Path(root) / name if root else _REPO_ROOT / "build" / "jit" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_with_cuda() -> bool:
    """JIT-build the CUDA kernels too when a GPU, a CUDA torch and nvcc are all present."""
    if os.environ.get("SKIP_CUDA_BUILD", "0") == "1" or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    with_cuda = _jit_with_cuda()
    sources = [str(_CSRC / "ops.cpp")] + ([str(_CSRC / "ops_cuda.cu")] if with_cuda else [])
    name = "ddpo_ops_cuda" if with_cuda else "ddpo_ops_cpu"
    # torch's load() holds a file lock on the build directory, so concurrent processes
    # (pytest-xdist, several ranks) build once and the others wait and reuse it.
    load(
        name=name,
        sources=sources,
        build_directory=str(_jit_build_dir(name)),
        extra_cflags=["-O3", "-std=c++20", "-fopenmp"],
        extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load_native() -> bool:
    """Load the native operators once (built extension, else JIT CPU build); True on success."""
    if _state["tried"]:  # lock-free fast path (and the one torch.compile traces through)
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        if _ops_registered():  # loaded by someone else in this process
            _state.update(loaded=True, source="preloaded")
        else:
            spec = importlib.util.find_spec("ddpo_kernels._C")
            if spec is not None and spec.origin:
                try:
                    importlib.import_module("ddpo_kernels._C")  # its import registers torch.ops.ddpo_ops
                    _state.update(loaded=_ops_registered(), source=spec.origin)
                except ImportError as exc:  # stale build (other torch ABI), missing libcudart...
                    _state["error"] = f"{spec.origin}: {exc}"
            if not _state["loaded"] and os.environ.get("ENGINE_NATIVE_JIT", "1") != "0":
                print(f"[ddpo_kernels.chunk_ops] ddpo_kernels._C not built; using the JIT build of {_CSRC} (first build ~1 min)")
                try:
                    _jit_build()
                    _state.update(loaded=_ops_registered(), source="jit")
                except Exception as exc:  # no compiler, missing headers: fall back, say so once
                    lines = str(exc).strip().splitlines()
                    _state["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            if not _state["loaded"]:
                print(f"[kernels.chunk_ops] native ops unavailable ({_state['error']}); using the PyTorch versions")
        if _state["loaded"]:
            _register_fakes()
        return _state["loaded"]


def native_available() -> bool:
    """True when the native library is loaded (loading it on first call) and not switched off."""
    return _native_wanted() and load_native()


@torch.compiler.assume_constant_result
def native_has_device(device_type: str) -> bool:
    """True when the native library has kernels for `device_type` ("cpu", "cuda") and is not
    switched off. Under torch.compile this is evaluated once at trace time (a constant of the
    compiled graph), so flip the switches before compiling."""
    if not native_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("ddpo_ops::chunk_logprob_forward", key)


_fakes_registered = False


def _register_fakes() -> None:
    """Shape-only implementations so the ops trace under torch.compile / FakeTensor."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    try:
        _define_fakes()
    except RuntimeError as exc:  # already registered: this module was loaded twice (reload)
        if "already" not in str(exc):
            raise


def _define_fakes() -> None:
    @torch.library.register_fake("ddpo_ops::chunk_logprob_forward")
    def _fwd_fake(logits, targets, segment_ids, seg_logps, seg_counts, ignore_index=IGNORE_INDEX, cuda_stream=0):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("ddpo_ops::chunk_logprob_backward_")
    def _bwd_fake(logits, targets, segment_ids, lse, grad_seg, ignore_index=IGNORE_INDEX, cuda_stream=0):
        return None

    @torch.library.register_fake("ddpo_ops::preference_epilogue")
    def _epi_fake(
        objective, chosen, rejected, chosen_counts, rejected_counts, beta,
        weights=None, ref_c=None, ref_r=None, cuda_stream=0,
    ):  # fmt: skip
        return (
            chosen.new_empty((), dtype=torch.float32),
            chosen.new_empty(chosen.shape, dtype=torch.float32),
            chosen.new_empty(chosen.shape, dtype=torch.float32),
        )


def _stream_of(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def _use_native(*tensors: torch.Tensor) -> bool:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False  # mixed devices: let the reference raise torch's own clear error
    return native_has_device(dev.type)


# ---------------------------------------------------------------------------------------
# Public dispatching API
# ---------------------------------------------------------------------------------------


def chunk_logprob_forward(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    segment_ids_C: torch.Tensor,
    seg_logps_S: torch.Tensor,
    seg_counts_S: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """fp32 logsumexp per row of a logits chunk; adds each contributing token's
    log p(target) = logit[target] - lse into `seg_logps_S[seg]` and 1 into `seg_counts_S[seg]`
    (in place). logits fp32/fp16/bf16, math in fp32. Returns lse_C [C] fp32 (for the backward).
    """
    _check_chunk_args(logits_CV, targets_C, segment_ids_C, seg_logps_S, seg_counts_S)
    if logits_CV.stride(-1) == 1 and _use_native(logits_CV, targets_C, segment_ids_C, seg_logps_S, seg_counts_S):
        # detach: the op has no autograd formula; differentiable use goes through segment_logprobs.
        return torch.ops.ddpo_ops.chunk_logprob_forward(
            logits_CV.detach(), targets_C, segment_ids_C, seg_logps_S, seg_counts_S, ignore_index, _stream_of(logits_CV)
        )
    return chunk_logprob_forward_ref(logits_CV, targets_C, segment_ids_C, seg_logps_S, seg_counts_S, ignore_index)


def chunk_logprob_backward_(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    segment_ids_C: torch.Tensor,
    lse_C: torch.Tensor,
    grad_seg_S: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Overwrite `logits_CV` with d(sum_s grad_seg_S[s] * seg_logp_s) / d logits, i.e.
    grad_seg[seg_t] * (onehot(target_t) - softmax(logits_t)) with softmax from `lse_C`;
    rows of non-contributing tokens become 0. No [C, V] temporary on the native path.
    """
    if logits_CV.dim() != 2 or lse_C.shape != (logits_CV.shape[0],):
        raise ValueError(f"lse_C {tuple(lse_C.shape)} must be [C] for logits_CV {tuple(logits_CV.shape)}")
    if logits_CV.stride(-1) == 1 and _use_native(logits_CV, targets_C, segment_ids_C, lse_C, grad_seg_S):
        torch.ops.ddpo_ops.chunk_logprob_backward_(
            logits_CV, targets_C, segment_ids_C, lse_C, grad_seg_S, ignore_index, _stream_of(logits_CV)
        )
        return
    chunk_logprob_backward_ref_(logits_CV, targets_C, segment_ids_C, lse_C, grad_seg_S, ignore_index)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives: {', '.join(OBJECTIVES)}")


def preference_epilogue(
    objective: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    *,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of `engine.losses.preference_loss` and its gradient w.r.t. the per-sequence sums.

    Inputs are per-sequence SUMS of response-token log-probs and token counts, all [P].
    Returns (loss fp32 scalar, d loss / d chosen_logps [P] fp32, d loss / d rejected_logps [P] fp32).
    """
    _check_objective(objective)
    if objective == "sft":  # the rejected side is unused; engine.losses accepts None for it
        rejected_logps = torch.zeros_like(chosen_logps) if rejected_logps is None else rejected_logps
        rejected_counts = torch.zeros_like(chosen_counts) if rejected_counts is None else rejected_counts
    if objective in ("dpo", "ddpo") and (ref_chosen_logps is None or ref_rejected_logps is None):
        missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
        raise ValueError(
            f"objective {objective!r} needs reference log-probs: {missing} is None (build the reference cache)"
        )
    tensors = [chosen_logps, rejected_logps, chosen_counts, rejected_counts]
    tensors += [t for t in (chosen_weights, ref_chosen_logps, ref_rejected_logps) if t is not None]
    P = chosen_logps.shape
    if chosen_logps.dim() != 1 or any(t.shape != P for t in tensors):
        raise ValueError(f"epilogue inputs must all be [P]; got shapes {[tuple(t.shape) for t in tensors]}")
    if _use_native(*tensors):
        return tuple(
            torch.ops.ddpo_ops.preference_epilogue(
                objective,
                chosen_logps.detach(),
                rejected_logps.detach(),
                chosen_counts,
                rejected_counts,
                float(beta),
                chosen_weights,
                ref_chosen_logps,
                ref_rejected_logps,
                _stream_of(chosen_logps),
            )
        )
    return preference_epilogue_ref(
        objective,
        chosen_logps,
        rejected_logps,
        chosen_counts,
        rejected_counts,
        beta=beta,
        chosen_weights=chosen_weights,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )


# ---------------------------------------------------------------------------------------
# Autograd wrappers (differentiable uses of the ops; the tests check their gradients)
# ---------------------------------------------------------------------------------------


class _SegmentLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_CV, targets_C, segment_ids_C, num_segments, ignore_index):
        seg_logps = torch.zeros(num_segments, dtype=torch.float32, device=logits_CV.device)
        seg_counts = torch.zeros(num_segments, dtype=torch.int64, device=logits_CV.device)
        lse = chunk_logprob_forward(logits_CV, targets_C, segment_ids_C, seg_logps, seg_counts, ignore_index)
        ctx.save_for_backward(logits_CV, targets_C, segment_ids_C, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(seg_counts)
        return seg_logps, seg_counts

    @staticmethod
    def backward(ctx, grad_seg, _grad_counts):
        logits_CV, targets_C, segment_ids_C, lse = ctx.saved_tensors
        # The saved logits belong to the caller, so the in-place backward works on a copy;
        # the chunked backend, which owns its chunks, calls chunk_logprob_backward_ directly.
        grad_logits = logits_CV.detach().clone(memory_format=torch.contiguous_format)
        chunk_logprob_backward_(grad_logits, targets_C, segment_ids_C, lse, grad_seg.contiguous(), ctx.ignore_index)
        return grad_logits, None, None, None, None


def segment_logprobs(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    segment_ids_C: torch.Tensor,
    num_segments: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-segment sums of target log-probs: (seg_logps_S fp32, seg_counts_S int64)."""
    return _SegmentLogprobs.apply(logits_CV, targets_C, segment_ids_C, int(num_segments), ignore_index)


class _PreferenceEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, objective, chosen_logps, rejected_logps, chosen_counts, rejected_counts, beta, w, rc, rr):
        loss, g_c, g_r = preference_epilogue(
            objective,
            chosen_logps,
            rejected_logps,
            chosen_counts,
            rejected_counts,
            beta=beta,
            chosen_weights=w,
            ref_chosen_logps=rc,
            ref_rejected_logps=rr,
        )
        ctx.save_for_backward(g_c, g_r)
        ctx.dtypes = (chosen_logps.dtype, rejected_logps.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        g_c, g_r = ctx.saved_tensors
        return (
            None,
            (g_c * grad_loss).to(ctx.dtypes[0]),
            (g_r * grad_loss).to(ctx.dtypes[1]),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def preference_epilogue_loss(
    objective: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    *,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable scalar loss (w.r.t. chosen_logps, rejected_logps) from the epilogue op;
    the gradient is the analytic one computed in the same forward call."""
    return _PreferenceEpilogue.apply(
        objective,
        chosen_logps,
        rejected_logps,
        chosen_counts,
        rejected_counts,
        beta,
        chosen_weights,
        ref_chosen_logps,
        ref_rejected_logps,
    )
