"""Fused LM-head ops: per-sequence log-probs and preference losses without the [N, V] logits.

Where this sits in the flow: the model trunk produces `hidden [N, D]` for a packed batch and the
trainer hands it, with the LM head `weight [V, D]`, to `fused_preference_loss`, which returns the
loss of `engine.losses` (the single source of truth for the formulas). `linear_logprob` is the
building block (per-sequence sums of token log-probs), also used by the reference-log-prob cache.

Backends (same maths, same results up to rounding):
- "triton": Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1, which tests use).
- "torch": chunked pure PyTorch, the memory-efficient CPU path.
- "eager": the plain reference (full logits, log_softmax, gather); what tests and benches compare to.
- "auto": "triton" on CUDA, "torch" otherwise.
The environment variable ENGINE_KERNEL_BACKEND overrides the argument everywhere, so any run can be
switched to the reference path for debugging without touching code.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch", "eager")
BACKEND_ENV_VAR = "ENGINE_KERNEL_BACKEND"


def triton_available() -> bool:
    """True when the triton package can be imported (it is a pinned dependency, but keep CPU-only installs working)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when the Triton kernels run through the interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    from ddpo_kernels.linear_logprob import _linear_logprob_fwd_kernel

    return isinstance(_linear_logprob_fwd_kernel, InterpretedFunction)


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
        if dev.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"kernel backend 'triton' was requested ({source}) for device {dev}, but Triton runs on CPU only "
                "through its interpreter: set TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
            )
    return choice


from ddpo_kernels.fused_preference_loss import fused_preference_loss, fused_preference_loss_ref  # noqa: E402
from ddpo_kernels.linear_logprob import linear_logprob, linear_logprob_ref  # noqa: E402

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "fused_preference_loss",
    "fused_preference_loss_ref",
    "linear_logprob",
    "linear_logprob_ref",
    "resolve_backend",
    "triton_available",
]
