"""Preference loss fused with the LM head: hidden states in, scalar loss out, no [N, V] logits.

Where this sits in the flow: the trainer calls `fused_preference_loss(hidden [N, D], lm_head.weight
[V, D], targets, segment_ids, chosen_segments, rejected_segments, epilogue, schedule=batch.schedule)`
on a flattened packed batch, with `epilogue = engine.losses.loss_epilogue(objective, beta=..., ...)`
(the single source of truth for every formula; the reference log-probs in it come from
engine.refcache). This module knows no formula: it computes the per-sequence log-prob sums and
their gradients, and asks the epilogue for the loss and for d loss / d sums.

Why the gradients can be formed in the forward pass: the loss depends on the tokens only through
the per-sequence sums, so once a sequence's sum is final, g_s = d loss / d seq_logp_s is known, and
    dlogits_t = g_{segment_t} * (onehot(target_t) - softmax(logits_t)),  dH = dlogits @ W,  dW = dlogits.T @ H.
The forward therefore returns the loss and keeps dH [N, D] and dW [V, D]; backward only scales them
by grad_output (Liger-Kernel's trick; Liger's chunked preference losses likewise take the loss as a
function). The epilogue must be separable (see fused_preference_loss): then g for the sequences of
a group of pairs (pairs that share a sequence form one group, schedule.py) is exact as soon as the
group's sums are reduced, whatever placeholder values the other pairs hold.

The walk (_common.py, the same one `linear_logprob` takes, hence the same bits): groups are packed
into blocks of at most `block_rows` tokens. A block's logits are made once by fixed-shape GEMMs in
the input dtype and kept (the GEMM chunk at a block boundary is shared with the next block); the row
kernels (`chunk_logprob`) reduce them to lse and token log-probs, `segment_sum` adds each sequence's
tokens in order, the epilogue gives g, the row kernels overwrite the logits with their gradient in
place, and two more GEMMs give the block's dH rows and its dW share (3 matmuls in all, like Liger's
chunked loss). A group larger than `block_rows` is a block of its own walked in windows: the forward
keeps only lse, the backward recomputes each window's logits (4 matmuls for that group, the O(block
x V) memory bound kept). No float atomics anywhere: dH rows are written once each, dW accumulates in
fp32 (DwAccumulator), gradients are the same bits on every run. Extra memory beyond the inputs and
gradients: one block of logits, the fp32 dW accumulator, O(N) vectors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ddpo_kernels._common import (
    Backend,
    DwAccumulator,
    Launch,
    Walk,
    backward_window,
    check_inputs,
    check_schedule,
    forward_window,
    resolve_backend,
    sequence_sums,
    walk_forward,
    windows,
)
from ddpo_kernels.linear_logprob import linear_logprob_ref
from ddpo_kernels.schedule import LossSchedule
from ddpo_kernels.segment_sum import segment_sums

# epilogue(chosen_logps, rejected_logps, chosen_counts, rejected_counts) -> object with a scalar .loss
Epilogue = Callable[..., Any]


def _pair_inputs(seq: torch.Tensor, sched: LossSchedule) -> tuple[tuple, dict]:
    """The epilogue's arguments for per-segment sums `seq` [K]: (chosen sums, rejected sums or None,
    chosen counts, rejected counts or None), all [P], plus chosen_prompt_logps / chosen_prompt_counts
    when the schedule has prompt segments."""
    counts = sched.segment_counts
    c, r, p = sched.chosen, sched.rejected, sched.chosen_prompt
    args = (seq[c], None if r is None else seq[r], counts[c], None if r is None else counts[r])
    kwargs = {} if p is None else dict(chosen_prompt_logps=seq[p], chosen_prompt_counts=counts[p])
    return args, kwargs


def _segment_grads(epilogue: Epilogue, seq: torch.Tensor, sched: LossSchedule, launch: Launch) -> torch.Tensor:
    """g = d loss / d seq [K] (fp32, walk order) for the sums `seq`, through the epilogue's autograd.

    A sequence read by several pair slots gets the sum of their gradients, added in a fixed order.
    """
    (c, r, nc, nr), kwargs = _pair_inputs(seq.detach(), sched)
    prompt = kwargs.get("chosen_prompt_logps")
    inputs = [x.requires_grad_() for x in (c, r, prompt) if x is not None]  # the schedule's slot order
    with torch.enable_grad():
        out = epilogue(c, r, nc, nr, **kwargs)
        grads = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    slots = torch.cat([torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]).float()
    k = sched.num_walk_segments
    grad = torch.zeros(k, dtype=torch.float32, device=seq.device)
    use_triton = launch.backend == "triton" or seq.device.type == "cuda"
    segment_sums(slots[sched.slot_order], sched.slot_offsets, (0, k), (0, slots.shape[0]), grad, use_triton=use_triton)
    return grad


class FusedPreferenceLossFunction(torch.autograd.Function):
    """Forward: the loss, per-sequence sums, and the loss's gradients w.r.t. hidden and weight;
    backward: those gradients scaled by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, sched: LossSchedule, launch: Launch, epilogue: Epilogue, need: tuple):
        need_dh, need_dw = need
        if not (need_dh or need_dw):
            seq, _ = walk_forward(hidden, weight, sched, launch)
            ctx.grads = (None, None)
        else:
            seq, grads = _forward_with_grads(hidden, weight, sched, launch, epilogue, need_dh, need_dw)
            ctx.grads = grads
        args, kwargs = _pair_inputs(seq, sched)
        loss = epilogue(*args, **kwargs).loss.detach().float()
        ctx.mark_non_differentiable(seq)
        return loss, seq

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_preference_loss forms its gradients in the forward pass and hands them out once; "
                "a second backward through the same loss (retain_graph=True) is not supported"
            )
        dh, dw = ctx.grads
        ctx.grads = None
        # In place (these are ours): no second [N, D] / [V, D] buffer; one rounding of g * grad_out.
        for g in (dh, dw):
            if g is not None:
                g.mul_(grad_loss)
        return dh, dw, None, None, None, None


def _forward_with_grads(hidden, weight, sched, launch, epilogue, need_dh, need_dw):
    """The block walk of the module docstring: (seq [K] fp32, (dH or None, dW or None))."""
    dev = hidden.device
    m, k = sched.num_tokens, sched.num_walk_segments
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    logp = torch.empty(m, dtype=torch.float32, device=dev)
    seq = torch.zeros(k, dtype=torch.float32, device=dev)
    done = torch.zeros(k, dtype=torch.bool, device=dev)
    # Placeholder sums for pairs not reduced yet: an average log-prob of -1 keeps every
    # objective's terms finite (0 would sit on ORPO's log(1 - exp(0)) clamp).
    placeholder = -sched.segment_counts.float()
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = DwAccumulator(weight) if need_dw else None
    walk = Walk(hidden, weight, sched, launch)
    for ta, tb, sa, sb in sched.blocks(launch.block_rows):
        block_windows = windows(ta, tb, launch)
        for window in block_windows:
            kept = forward_window(walk, launch, window, lse, logp)
        sequence_sums(sched, launch, logp, seq, (sa, sb), (ta, tb))
        done[sa:sb] = True
        grad_seg = _segment_grads(epilogue, torch.where(done, seq, placeholder), sched, launch)
        grad_tok = grad_seg[sched.token_segment[ta:tb]]
        if len(block_windows) > 1:
            walk.restart()  # a group larger than a block: its logits are recomputed window by window
        for a, b in block_windows:
            h, logits = kept if len(block_windows) == 1 else walk.window(a, b)
            backward_window(walk, launch, (a, b), lse, grad_tok[a - ta : b - ta], h, logits, dh, dw)
    return seq, (dh, None if dw is None else dw.result())


def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    chosen_segments: torch.Tensor,
    rejected_segments: torch.Tensor,
    epilogue: Epilogue,
    *,
    prompt_targets: torch.Tensor | None = None,
    schedule: LossSchedule | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
    return_output: bool = False,
    chunk_rows: int | None = None,
    block_rows: int | None = None,
):
    """A preference loss computed from hidden states and the LM head, without the [N, V] logits.

    hidden [N, D], weight [V, D], targets [N] (shifted, ignore_index where there is no target),
    segment_ids [N] (sequence of each token; unsorted runs allowed; -1 allowed on ignored tokens),
    chosen_segments / rejected_segments [P] (segment of each pair's chosen / rejected response).

    `epilogue(chosen_logps, rejected_logps, chosen_counts, rejected_counts)` maps the [P] per-sequence
    sums of token log-probs and token counts to an object with a scalar `.loss` (engine.losses's
    `loss_epilogue(objective, beta=..., ...)` is the engine's). The rejected arguments are None when
    the schedule leaves the rejected side out. `prompt_targets` [N] (targets on prompt tokens,
    ignore_index elsewhere; `targets` then covers the response tokens only): the prompt tokens of each
    chosen sequence are reduced as a sequence of their own, passed to the epilogue as the keyword
    arguments chosen_prompt_logps / chosen_prompt_counts [P] (the authors' ORPO/DORPO NLL covers
    prompt and response; the odds ratio the response only). Contract (what lets the kernel form gradients in the
    forward, group by group): the epilogue is deterministic, differentiable in the sums, and separable
    -- loss = sum over pairs of f_p(that pair's sums) + sum over sequences of a_s * sum_s, with every
    a_s fixed by counts and constants, never by other sums -- so that a group's gradient does not
    depend on the placeholder values the other pairs hold while the group is reduced. It is called
    on fp32 [P] tensors, once per block under autograd, once for the value.

    Returns the scalar loss (differentiable w.r.t. hidden and weight), or with return_output=True the
    epilogue's object for the final sums with its .loss replaced by that differentiable scalar.
    `schedule`: a `LossSchedule.for_pairs` of these tensors built on the CPU beforehand (engine.data's
    collate does), so that nothing in the loss reads a device value back to the host; built here
    otherwise (a host copy of targets and segment ids). `chunk_rows` / `block_rows`: see linear_logprob.
    """
    check_inputs(hidden, weight)
    backend = resolve_backend(backend, hidden.device)
    if backend == "eager":
        tensors = (hidden, weight, targets, segment_ids, chosen_segments, rejected_segments)
        ref_kw = dict(prompt_targets=prompt_targets, ignore_index=ignore_index, return_output=True)
        out = fused_preference_loss_ref(*tensors, epilogue, **ref_kw)
        return out if return_output else out.loss
    if schedule is None:
        pairs = (targets, segment_ids, chosen_segments, rejected_segments)
        schedule_kw = dict(prompt_targets=prompt_targets, vocab_size=weight.shape[0], ignore_index=ignore_index)
        schedule = LossSchedule.for_pairs(*pairs, **schedule_kw).to(hidden.device)
    check_schedule(schedule, hidden, weight)
    # Let the epilogue validate its own arguments (objective, reference log-probs, weights) on
    # placeholder sums now, so a bad one fails before any [chunk, V] matmul rather than after it.
    with torch.no_grad():
        args, kwargs = _pair_inputs(torch.zeros(schedule.num_walk_segments, device=hidden.device), schedule)
        epilogue(*args, **kwargs)
    launch = Launch.make(backend, hidden, weight, chunk_rows, block_rows)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    loss, seq = FusedPreferenceLossFunction.apply(hidden, weight, schedule, launch, epilogue, need)
    if not return_output:
        return loss
    with torch.no_grad():
        args, kwargs = _pair_inputs(seq, schedule)
        out = epilogue(*args, **kwargs)
    return _with_loss(out, loss)


def fused_preference_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    chosen_segments: torch.Tensor,
    rejected_segments: torch.Tensor,
    epilogue: Epilogue,
    *,
    prompt_targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_output: bool = False,
):
    """Eager reference: full logits via linear_logprob_ref, then the epilogue under ordinary autograd."""
    check_inputs(hidden, weight)
    if chosen_segments.shape != rejected_segments.shape or chosen_segments.dim() != 1:
        raise ValueError(
            f"chosen_segments {tuple(chosen_segments.shape)} and rejected_segments {tuple(rejected_segments.shape)} "
            "must both be [P] (one entry per pair)"
        )
    chosen, rejected = chosen_segments.long(), rejected_segments.long()
    # The reference may sync: S is the largest segment id seen in the pairs or the targeted tokens, + 1.
    all_targets = targets if prompt_targets is None else torch.where(targets != ignore_index, targets, prompt_targets)
    seen = torch.cat([chosen, rejected, segment_ids[all_targets != ignore_index].long()])
    s = int(seen.max()) + 1
    seq, counts = linear_logprob_ref(hidden, weight, targets, segment_ids, s, ignore_index=ignore_index)
    kwargs = {}
    if prompt_targets is not None:
        prompt, prompt_counts = linear_logprob_ref(
            hidden, weight, prompt_targets, segment_ids, s, ignore_index=ignore_index
        )
        kwargs = dict(chosen_prompt_logps=prompt[chosen], chosen_prompt_counts=prompt_counts[chosen])
    out = epilogue(seq[chosen], seq[rejected], counts[chosen], counts[rejected], **kwargs)
    return out if return_output else out.loss


def _with_loss(out, loss: torch.Tensor):
    """The epilogue's output with .loss replaced (a copy: the epilogue's object is left as it was)."""
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, loss=loss)
    out = copy.copy(out)
    out.loss = loss
    return out
