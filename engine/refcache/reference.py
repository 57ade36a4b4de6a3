"""The reference model: loading it and its forward, the one computation of reference log-probs.

Where this sits: the cache build (`engine.refcache.build`) and the trainer's on-the-fly path both get
reference values from `reference_logps`, so cached and on-the-fly values are the same computation.
The [N, V] logits are never built: the trunk's hidden states go straight into
`ddpo_kernels.linear_logprob` with the LM head's weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from engine.data.packing import IGNORE_INDEX


def sequence_logps(model, batch, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [S] fp32, token count [S] int64) of every segment of a PackedBatch under `model`.

    The trunk gets the [R, L] rows exactly as the trainer's policy forward does; SDPA /
    flash-attention keep the packed sequences apart through the position ids (attention_mask=None).
    The [N, V] logits are never built: ddpo_kernels.linear_logprob reduces the flattened hidden states
    and the LM head weight directly, with the walk of the policy's fused loss (fixed-shape GEMMs, the
    same row kernels, sums in sequence order), so for equal hidden states and weights the policy's
    log-probs are these bits whatever the batches (tests/test_kernels.py, test_step0_margins_*).
    """
    from ddpo_kernels import linear_logprob
    from engine.model import trunk_and_head

    trunk, head = trunk_and_head(model)
    with torch.no_grad():
        out = trunk(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=None,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = head.weight
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        logps, counts = linear_logprob(
            hidden,
            weight,
            batch.targets.reshape(-1),
            batch.segment_ids.reshape(-1),
            int(batch.num_segments),
            ignore_index=IGNORE_INDEX,
            backend=backend,
            schedule=batch.schedule,
        )
    return logps.float(), counts


def reference_logps(model, batch, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) fp32 reference log-probs of a PackedBatch, under torch.no_grad().

    The one function that computes reference values: the cache build and the trainer's on-the-fly
    path both call it, so cached and on-the-fly values are the same computation. For a peft model
    whose base is the reference, wrap the call in `model.disable_adapter()` (on_the_fly_reference does).
    """
    logps, _ = sequence_logps(model, batch, backend=backend)
    return logps[batch.chosen_segments.long()], logps[batch.rejected_segments.long()]


def reference_model_name(cfg) -> str:
    return cfg.ref_cache.model or cfg.model.name


def load_reference_model(cfg, *, device: str | torch.device = "cpu"):
    """The frozen reference model of a run (eval mode, no grads, no LoRA), in ref_cache.dtype.

    Loaded from its source (not copied from the policy), so a run resumed from a checkpoint still
    gets the initial weights. A named random-init architecture is built in model.dtype (the policy's
    initial weights) and then cast, so a bf16 reference equals the fp32 policy rounded to bf16.
    """
    from engine.config import NAMED_ARCHITECTURES
    from engine.model import load_model

    name = reference_model_name(cfg)
    named = name in NAMED_ARCHITECTURES
    load_dtype = cfg.model.dtype if named else cfg.ref_cache.dtype
    mcfg = dataclasses.replace(cfg.model, dtype=load_dtype, lora_r=0, gradient_checkpointing=False)
    model = load_model(mcfg, device=device, name=name, for_training=False)
    target = getattr(torch, cfg.ref_cache.dtype)
    if next(model.parameters()).dtype != target:
        model = model.to(target)
    return model


def _unwrap(model):
    """The nn.Module under DDP / DeepSpeed engine wrappers (they expose it as `.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for the reference forward, then every submodule back to its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def on_the_fly_reference(policy_model, cfg, *, backend: str | None = None) -> Callable:
    """A callable batch -> (chosen [P], rejected [P]) computing reference log-probs during training.

    With LoRA (a PeftModel whose base is the reference, i.e. ref_cache.model unset or equal to
    model.name) the policy itself with adapters disabled is the reference: no second copy. The
    base then runs in the policy's dtype. Otherwise a frozen reference is loaded once, on the
    policy's device. The returned callable has `.model` (the separate reference, or None).
    """
    backend = backend or cfg.loss.backend
    policy = _unwrap(policy_model)
    if _is_peft(policy) and reference_model_name(cfg) == cfg.model.name:

        def ref_from_base(batch):
            with _eval_mode(policy), policy.disable_adapter():
                return reference_logps(policy, batch, backend=backend)

        ref_from_base.model = None
        return ref_from_base

    device = next(policy.parameters()).device
    ref_model = load_reference_model(cfg, device=device)

    def ref_from_copy(batch):
        return reference_logps(ref_model, batch, backend=backend)

    ref_from_copy.model = ref_model
    return ref_from_copy
