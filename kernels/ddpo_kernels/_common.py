"""Shared machinery of the ops: backend names, input checks, chunk sizes, the chunked walk, fp32 dW accumulation.

Where this sits: `linear_logprob` and `fused_preference_loss` walk a `LossSchedule` (schedule.py) the
same way, with the helpers here; the per-row work of each chunk is `chunk_logprob` and the
per-sequence sums are `segment_sum`. One walk for both ops is what makes the reference log-probs
(linear_logprob, in the reference cache) and the policy's (fused_preference_loss) the same bits.

The walk (`Walk`). The selected tokens of a schedule, in walk order, are cut into GEMM chunks of
exactly `chunk_rows` rows (only the walk's last chunk is padded), and visited in windows of about
`block_rows` rows whose logits live in one buffer. Every GEMM has one shape whatever the batch: the
algorithm a BLAS picks depends on the shape, and with one shape a row's logits depend on nothing but
that row and the weight (batch invariance, cf. Thinking Machines' "Defeating Nondeterminism in LLM
Inference"). The logits stay in the input dtype (bf16 on GPUs, as eager autograd and Liger keep
them); all row math is fp32. Gradients: dH rows are written once each (index_copy_ of distinct
rows), dW accumulates in fp32 (`DwAccumulator`), nothing uses float atomics.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ddpo_kernels.chunk_logprob import INTERPRETED, chunk_logprob_backward_, chunk_logprob_forward
from ddpo_kernels.schedule import LossSchedule
from ddpo_kernels.segment_sum import segment_sums

Backend = Literal["auto", "triton", "torch", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_ENV_VAR = "ENGINE_KERNEL_BACKEND"

# Rows of one logits GEMM: the unit of batch invariance. Big enough for full-speed GEMMs (on a 2-core
# CPU at V=32000, eight 128-row GEMMs took about twice the time of one 1024-row GEMM, two 512-row ones
# about 1.16x), small enough that padding the walk's last chunk wastes little. On GPUs a 512-row GEMM at
# Llama-3-8B's head (D=4096, V=128256) is 0.5 TFLOP.
CPU_CHUNK_ROWS = 512
GPU_CHUNK_ROWS = 512
# Logits rows of a block (groups of pairs whose gradients are formed together), in the input dtype;
# the walk's buffer holds one chunk more. CPU: 128 MiB (1024 rows of fp32 at V=32000).
# GPU: 1 GiB, 4096 rows of bf16 at Llama-3's V=128256: whole pairs of 2 x 2048 tokens fit, so
# their gradients are formed without recomputing the logits; still below Liger's fp32 logits and
# log-softmax of one 2 x 1024-token pair.
CPU_LOGITS_BYTES = 128 * 1024 * 1024
GPU_LOGITS_BYTES = 1024 * 1024 * 1024
MAX_BLOCK_ROWS = 8192


def default_chunk_rows(device: torch.device | str = "cpu") -> int:
    """Rows per logits GEMM on `device` (the batch-invariance unit; keep it equal for reference and policy)."""
    return CPU_CHUNK_ROWS if torch.device(device).type == "cpu" else GPU_CHUNK_ROWS


def default_block_rows(
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_rows: int | None = None,
) -> int:
    """Logits rows kept at once: the device's budget over V x itemsize, a multiple of chunk_rows between one
    chunk and MAX_BLOCK_ROWS (small vocabularies gain nothing from bigger blocks)."""
    chunk = chunk_rows or default_chunk_rows(device)
    budget = CPU_LOGITS_BYTES if torch.device(device).type == "cpu" else GPU_LOGITS_BYTES
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = min(MAX_BLOCK_ROWS, budget // (itemsize * max(1, vocab_size)))
    return max(chunk, rows // chunk * chunk)


@dataclass(frozen=True)
class Launch:
    """How one call runs: the concrete backend and the walk's sizes."""

    backend: str  # "torch" or "triton"
    chunk_rows: int
    block_rows: int

    @classmethod
    def make(cls, backend: str, hidden: torch.Tensor, weight: torch.Tensor, chunk_rows, block_rows) -> Launch:
        chunk = int(chunk_rows or default_chunk_rows(hidden.device))
        if chunk < 1:
            raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
        block = int(block_rows or default_block_rows(weight.shape[0], hidden.dtype, hidden.device, chunk))
        if block < chunk or block % chunk:
            raise ValueError(f"block_rows must be a positive multiple of chunk_rows={chunk}; got {block_rows}")
        if backend == "triton" and hidden.dtype == torch.float64:
            raise ValueError(
                "the triton backend takes float32/float16/bfloat16 inputs; use backend='torch' for float64"
            )
        return cls(backend, chunk, block)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise ValueError naming the offending argument when hidden and weight do not fit together."""
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be [N, D]; got shape {tuple(hidden.shape)} (flatten [R, L, D] to [R*L, D] first)"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[1] = {hidden.shape[1]}; got shape {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; move them to one device")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"hidden must be float32, float16, bfloat16 or float64; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one of them")


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Return the concrete backend ("triton", "torch" or "eager") to run on `device`.

    ENGINE_KERNEL_BACKEND, when set, wins over `backend`. "triton" off CUDA needs the Triton
    interpreter (TRITON_INTERPRET=1 set before triton is first imported).
    """
    forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    choice = forced or (backend or "auto").lower()
    source = f"environment variable {BACKEND_ENV_VAR}={forced!r}" if forced else f"backend={backend!r}"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend from {source}; valid values are {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"kernel backend 'triton' was requested ({source}) but triton is not installed; "
                "install triton or use backend='torch'"
            )
        if dev.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"kernel backend 'triton' was requested ({source}) for device {dev}, but Triton runs on CPU only "
                "through its interpreter: set TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
            )
    return choice


def triton_available() -> bool:
    """True when the triton package can be imported (a pinned dependency; CPU-only installs may lack it)."""
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------
# The chunked walk
# ---------------------------------------------------------------------------------------------


class Walk:
    """The logits of a schedule's selected tokens, made by GEMMs of exactly chunk_rows rows into one reused
    buffer of block_rows + chunk_rows rows (the walk's only [*, V] memory).

    Chunk k is walk rows [k * chunk_rows, (k + 1) * chunk_rows), whatever the windows asked for: a row's
    logits come from a GEMM of one shape (the last chunk of the walk is padded with hidden's row 0,
    whose logits are computed and ignored), so they depend on nothing but that row and the weight.
    Consecutive windows share the chunk at their boundary: the rows of it past the previous window's
    end are still untouched logits, so it is moved to the buffer's start instead of recomputed.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, sched: LossSchedule, launch: Launch):
        self.hidden, self.weight, self.sched, self.chunk = hidden, weight, sched, launch.chunk_rows
        rows = min(launch.block_rows + self.chunk, math.ceil(sched.num_tokens / self.chunk) * self.chunk)
        self.h = hidden.new_empty(rows, hidden.shape[1])
        self.logits = hidden.new_empty(rows, weight.shape[0])
        self.last = None  # (chunk index, buffer offset) of the last chunk computed, while reusable

    def restart(self) -> None:
        """Forget the last chunk (its logits were overwritten by gradients, or a new pass begins)."""
        self.last = None

    def window(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [b - a, D], logits [b - a, V]) of walk rows [a, b), a window from `windows`."""
        c, m = self.chunk, self.sched.num_tokens
        k0, k1 = a // c, -(-b // c)
        start = k0
        if self.last is not None and self.last[0] == k0:
            offset = self.last[1]
            if offset:
                self.h[:c].copy_(self.h[offset : offset + c])
                self.logits[:c].copy_(self.logits[offset : offset + c])
            start = k0 + 1
        wt = self.weight.t()
        for k in range(start, k1):
            rows = self.sched.rows[k * c : min((k + 1) * c, m)]
            if rows.shape[0] < c:
                rows = torch.nn.functional.pad(rows, (0, c - rows.shape[0]))
            o = (k - k0) * c
            torch.index_select(self.hidden, 0, rows, out=self.h[o : o + c])
            torch.mm(self.h[o : o + c], wt, out=self.logits[o : o + c])
        self.last = (k1 - 1, (k1 - 1 - k0) * c)
        lo, hi = a - k0 * c, b - k0 * c
        return self.h[lo:hi], self.logits[lo:hi]


class DwAccumulator:
    """dW = sum over windows of dlogits.T @ h, accumulated in fp32 and rounded once at the end.

    Memory: one fp32 [V, D] buffer, i.e. 2x the weight's bytes for a bf16 head (2 GiB at Llama-3-8B's
    V=128256, D=4096), plus, at the end, the [V, D] result in the weight's dtype. Half precision on
    GPUs: cuBLAS with bf16/fp16 operands and fp32 output (`torch.addmm(..., out_dtype=float32)`,
    added to the accumulator in place), no fp32 copy of the operands; torch builds whose addmm
    takes no fp32 accumulator there add `torch.mm(..., out_dtype=float32)` slices of V instead.
    CPU: operands upcast per window (CPU half GEMMs are no faster).
    """

    # V rows per slice of the fallback path: bounds its fp32 temporary.
    SLICE_ROWS = 8192

    def __init__(self, weight: torch.Tensor):
        self.dtype = weight.dtype
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.acc = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)

    def add_(self, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        """acc += dlogits.T @ h for one window (dlogits [c, V], h [c, D], same dtype)."""
        a = dlogits.t()
        if dlogits.dtype == self.acc.dtype or dlogits.device.type != "cuda":
            self.acc.addmm_(a.to(self.acc.dtype), h.to(self.acc.dtype))
        elif _cuda_addmm_fp32_accumulates():
            torch.addmm(self.acc, a, h, out_dtype=torch.float32, out=self.acc)
        else:
            for v0 in range(0, a.shape[0], self.SLICE_ROWS):
                part = torch.mm(a[v0 : v0 + self.SLICE_ROWS], h, out_dtype=torch.float32)
                self.acc[v0 : v0 + self.SLICE_ROWS].add_(part)

    def result(self) -> torch.Tensor:
        """The gradient in the weight's dtype (the accumulator itself for fp32/fp64 weights)."""
        return self.acc.to(self.dtype)


_ADDMM_PROBE: dict[str, bool] = {}


def _cuda_addmm_fp32_accumulates() -> bool:
    """Whether this torch's CUDA addmm accepts an fp32 accumulator with half operands (checked once)."""
    if "ok" not in _ADDMM_PROBE:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
        acc = torch.zeros(16, 16, dtype=torch.float32, device="cuda")
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _ADDMM_PROBE["ok"] = True
        except (RuntimeError, TypeError):  # older builds: the accumulator must have the operands' dtype
            _ADDMM_PROBE["ok"] = False
    return _ADDMM_PROBE["ok"]


def window_grads_(
    dlogits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    dh: torch.Tensor | None,
    dw: DwAccumulator | None,
) -> None:
    """dH[rows] = dlogits @ W (input dtype, the rounding eager autograd applies); dW += dlogits.T @ h."""
    if dh is not None:
        dh.index_copy_(0, rows, torch.mm(dlogits, weight))
    if dw is not None:
        dw.add_(dlogits, h)


def windows(start: int, end: int, launch: Launch) -> list[tuple[int, int]]:
    """Walk rows [start, end) cut into windows that each fit the Walk's buffer: the first window ends
    block_rows + chunk_rows past the start of its first chunk, the others start on a chunk boundary."""
    out, a = [], start
    while a < end:
        b = min(end, a // launch.chunk_rows * launch.chunk_rows + launch.block_rows + launch.chunk_rows)
        out.append((a, b))
        a = b
    return out


def forward_window(
    walk: Walk, launch: Launch, tokens: tuple[int, int], lse: torch.Tensor, logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the window's tokens; fills lse and logp there. Returns (h, logits) for the backward."""
    a, b = tokens
    h, logits = walk.window(a, b)
    lse[a:b], logp[a:b] = chunk_logprob_forward(logits, walk.sched.targets[a:b], backend=launch.backend)
    return h, logits


def backward_window(
    walk: Walk,
    launch: Launch,
    tokens: tuple[int, int],
    lse: torch.Tensor,
    grad_tok: torch.Tensor,
    h: torch.Tensor,
    logits: torch.Tensor,
    dh: torch.Tensor | None,
    dw: DwAccumulator | None,
) -> None:
    """Turn the window's logits into their gradient (grad_tok = d loss / d logp per token) and add its
    dH and dW shares."""
    a, b = tokens
    chunk_logprob_backward_(logits, walk.sched.targets[a:b], lse[a:b], grad_tok, backend=launch.backend)
    window_grads_(logits, h, walk.weight, walk.sched.rows[a:b], dh, dw)


def sequence_sums(
    sched: LossSchedule,
    launch: Launch,
    logp: torch.Tensor,
    out: torch.Tensor,
    segments: tuple[int, int] | None = None,
    tokens: tuple[int, int] | None = None,
) -> None:
    """out[k] = sum of logp over segment k's tokens, for the walk segments in `segments` (default: all)."""
    segments = segments or (0, sched.num_walk_segments)
    tokens = tokens or (0, sched.num_tokens)
    use_triton = launch.backend == "triton" or logp.device.type == "cuda"
    segment_sums(logp, sched.segment_offsets, segments, tokens, out, use_triton=use_triton)


def walk_forward(
    hidden: torch.Tensor, weight: torch.Tensor, sched: LossSchedule, launch: Launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-segment log-prob sums [K] fp32 in walk order, lse [M] fp32) without any gradient work."""
    m = sched.num_tokens
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    walk = Walk(hidden, weight, sched, launch)
    for window in windows(0, m, launch):
        forward_window(walk, launch, window, lse, logp)
    seq = torch.zeros(sched.num_walk_segments, dtype=torch.float32, device=hidden.device)
    sequence_sums(sched, launch, logp, seq)
    return seq, lse


def check_schedule(sched: LossSchedule, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """The schedule was built for these inputs (sizes only: nothing is read from the device)."""
    if sched.num_rows != hidden.shape[0]:
        raise ValueError(
            f"the schedule indexes {sched.num_rows} rows but hidden has {hidden.shape[0]}; pass the flattened "
            "[R * L, D] hidden states of the batch the schedule was built from (padding rows included)"
        )
    if sched.vocab_size is not None and sched.vocab_size != weight.shape[0]:
        raise ValueError(
            f"the schedule's targets were checked against V={sched.vocab_size} but weight has V={weight.shape[0]}"
        )
    if sched.device != hidden.device:
        raise ValueError(f"the schedule is on {sched.device} but hidden is on {hidden.device}; move it with .to()")
