"""Fused LM-head ops: per-sequence log-probs and preference losses without the [N, V] logits.

Where this sits in the flow: the model trunk produces `hidden [N, D]` for a packed batch and the
trainer hands it, with the LM head `weight [V, D]` and the batch's `LossSchedule` (built on the CPU
by engine.data's collate), to `fused_preference_loss`, which returns the loss of `engine.losses`
(the single source of truth for the formulas). `linear_logprob` gives the per-sequence log-probs
themselves, with the same arithmetic; the reference-log-prob cache uses it.

Files: one op per file (kernels, launcher, autograd Function, public function, `*_ref`):
`fused_preference_loss.py`, `linear_logprob.py`, and their building blocks `chunk_logprob.py` (the
per-row work on a block of logits: Triton kernels, native csrc/ operators, PyTorch reference) and
`segment_sum.py` (fixed-order per-sequence sums); `schedule.py` (the frozen schedule object);
`_common.py` (shared helpers: sizes, the chunked walk, fp32 dW accumulation, backend resolution).

Backends (same maths, same results up to rounding):
- "triton": Triton row kernels around cuBLAS GEMMs (CUDA; or CPU under TRITON_INTERPRET=1, which tests use).
- "torch": the same walk with the native C++/CUDA row operators (or their PyTorch references).
- "eager": the plain reference (full logits, log_softmax, gather); what tests and benches compare to.
- "auto": "triton" on CUDA, "torch" otherwise.
The environment variable ENGINE_KERNEL_BACKEND overrides the argument everywhere, so any run can be
switched to the reference path for debugging without touching code.
"""

from __future__ import annotations

from ddpo_kernels._common import (
    BACKEND_ENV_VAR,
    BACKENDS,
    Backend,
    default_block_rows,
    default_chunk_rows,
    resolve_backend,
    triton_available,
)
from ddpo_kernels.fused_preference_loss import fused_preference_loss, fused_preference_loss_ref
from ddpo_kernels.linear_logprob import linear_logprob, linear_logprob_ref
from ddpo_kernels.schedule import LossSchedule

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "Backend",
    "LossSchedule",
    "default_block_rows",
    "default_chunk_rows",
    "fused_preference_loss",
    "fused_preference_loss_ref",
    "linear_logprob",
    "linear_logprob_ref",
    "resolve_backend",
    "triton_available",
]
