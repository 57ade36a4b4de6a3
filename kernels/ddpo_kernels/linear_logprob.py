"""Per-sequence sums of next-token log-probs straight from hidden states and the LM head.

Where this sits in the flow: the trunk gives `hidden [N, D]` for a packed batch, the LM head is
`weight [V, D]`; this op returns, for every sequence (segment) s of the batch,
    seq_logps[s] = sum over tokens t of s with targets[t] != ignore_index of
                   logits[t, targets[t]] - logsumexp(logits[t, :]),   logits = hidden @ weight.T
and seq_token_counts[s]. The reference-log-prob cache calls it; `fused_preference_loss` computes
its sums with the same walk (_common.py), so a sequence's reference and policy log-probs are the
same bits when the weights are (the DPO margin is exactly 0 at step 0), whatever the batches.

How ("torch" and "triton" backends): the selected tokens (those with a target) are walked in
windows of about `block_rows`; each window's logits come from fixed-shape GEMMs of `chunk_rows` rows
in the input dtype (_common.Walk), `chunk_logprob` reduces each row to lse and its target's log-prob, and
`segment_sum` adds a sequence's tokens in sequence order. The forward keeps only lse [M]; the
backward recomputes each window's logits (same GEMMs, same bits), overwrites them with
    dlogits_t = grad_seq[segment_t] * (onehot(target_t) - exp(logits_t - lse_t))
and forms dH = dlogits @ W (each row written once) and dW = sum of dlogits.T @ H in fp32: no
[N, V] tensor, no float atomics, the same gradients bit for bit on every run. Memory beyond the
inputs and gradients: one window of logits ((block_rows + chunk_rows) x V) and the fp32 dW accumulator.
"eager" is the plain reference (full logits, log_softmax, gather), for tests and debugging.

Why there is no Cut-Cross-Entropy-style tile forward (logits formed in SRAM by a Triton tl.dot, never
stored): its fp32 accumulators cannot reproduce the GEMM's logits bit for bit, so reference
log-probs made with it would differ from the policy's at step 0 (the policy's gradients need the
materialised block anyway); and the window this walk keeps instead is small ((block_rows + chunk_rows)
x V in the input dtype). The earlier tile kernels, with their fp32 atomic backward, were removed.
"""

from __future__ import annotations

import torch

from ddpo_kernels._common import (
    DwAccumulator,
    Launch,
    Walk,
    backward_window,
    check_inputs,
    check_schedule,
    resolve_backend,
    walk_forward,
    windows,
)
from ddpo_kernels.schedule import LossSchedule


class LinearLogprobFunction(torch.autograd.Function):
    """seq_logps [S] from the schedule's walk; backward recomputes the logits window by window."""

    @staticmethod
    def forward(ctx, hidden, weight, sched: LossSchedule, launch: Launch):
        seq, lse = walk_forward(hidden, weight, sched, launch)
        ctx.save_for_backward(hidden, weight, lse)
        ctx.sched, ctx.launch = sched, launch
        # Walk order -> segment ids (an identity for the schedules linear_logprob builds).
        return torch.zeros(sched.num_segments, dtype=torch.float32, device=hidden.device).index_copy_(
            0, sched.segment_ids, seq
        )

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, lse = ctx.saved_tensors
        sched, launch = ctx.sched, ctx.launch
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = DwAccumulator(weight) if need_dw else None
        grad_tok = grad_seq.float()[sched.segment_ids][sched.token_segment]
        walk = Walk(hidden, weight, sched, launch)
        for a, b in windows(0, sched.num_tokens, launch):
            # The recomputed logits are the forward's bits (same GEMM shapes), so the saved lse applies.
            h, logits = walk.window(a, b)
            backward_window(walk, launch, (a, b), lse, grad_tok[a:b], h, logits, dh, dw)
        return dh, None if dw is None else dw.result(), None, None


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    schedule: LossSchedule | None = None,
    chunk_rows: int | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of next-token log-probs and token counts.

    hidden [N, D], weight [V, D] (same float dtype), targets [N] (already shifted; ignore_index on
    prompt tokens and sequence boundaries), segment_ids [N] in [0, num_segments) for every token
    with a target (runs need not be sorted). Returns (seq_logps [S] float32, seq_token_counts [S]
    int64); seq_logps is differentiable w.r.t. hidden and weight.

    `schedule`: a `LossSchedule` of these tensors built beforehand on the CPU (then targets and
    segment_ids are not read, and nothing syncs with the device): `for_sequences`, or a batch's
    `for_pairs` schedule (segments no pair reads get 0); built here otherwise.
    `chunk_rows` (rows per logits GEMM: the unit of batch invariance) and `block_rows` (logits rows
    kept at once, a multiple of chunk_rows; the buffer holds one chunk more) default to the device's
    sizes (_common.py); a reference and a policy compared bit for bit must use the same chunk_rows.
    """
    check_inputs(hidden, weight)
    backend = resolve_backend(backend, hidden.device)
    if backend == "eager":
        return linear_logprob_ref(hidden, weight, targets, segment_ids, num_segments, ignore_index=ignore_index)
    if schedule is None:
        schedule = LossSchedule.for_sequences(
            targets, segment_ids, num_segments, vocab_size=weight.shape[0], ignore_index=ignore_index
        ).to(hidden.device)
    check_schedule(schedule, hidden, weight)
    if schedule.chosen_prompt is not None:
        raise ValueError("linear_logprob takes schedules without prompt segments (built without prompt_targets)")
    launch = Launch.make(backend, hidden, weight, chunk_rows, block_rows)
    seq = LinearLogprobFunction.apply(hidden, weight, schedule, launch)
    counts = torch.zeros(schedule.num_segments, dtype=torch.int64, device=hidden.device)
    return seq, counts.index_copy_(0, schedule.segment_ids, schedule.segment_counts)


def linear_logprob_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: full logits (fp32, fp64 for fp64 inputs), log_softmax, gather, per-segment sum.

    Returns (seq_logps [S], seq_token_counts [S] int64), differentiable through ordinary autograd.
    """
    check_inputs(hidden, weight)
    for name, t in (("targets", targets), ("segment_ids", segment_ids)):
        if t.shape != (hidden.shape[0],):
            raise ValueError(f"{name} must be [N] = [{hidden.shape[0]}] like hidden's first dim; got {tuple(t.shape)}")
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.t()).to(acc_dtype)
    logp = torch.log_softmax(logits, dim=-1)
    mask = targets != ignore_index
    safe_t = torch.where(mask, targets.long(), 0)
    tok = logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    seg = torch.where(mask, segment_ids.long(), 0).clamp(0, max(num_segments - 1, 0))
    seq = torch.zeros(num_segments, dtype=acc_dtype, device=hidden.device).index_add(0, seg, tok)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=hidden.device).index_add(0, seg, mask.long())
    return seq, counts
