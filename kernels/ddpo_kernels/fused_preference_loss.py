"""Preference loss fused with the LM head: hidden states in, scalar loss out, no [N, V] logits.

Where this sits in the flow: the trainer calls `fused_preference_loss(hidden [N, D], lm_head.weight
[V, D], targets, segment_ids, chosen_segments, rejected_segments, objective=..., beta=...)` on a
flattened packed batch; the reference log-probs come from engine.refcache. The loss is exactly
`engine.losses.preference_loss` (the single source of truth for every formula) applied to the
per-sequence log-prob sums and token counts; this module only decides how those sums and their
gradients are computed.

Why the gradients can be formed in the forward pass: the loss depends on the tokens only through
the per-sequence sums, so once a sequence's sum is final, g_s = d loss / d seq_logp_s is known, and
    dlogits_t = g_{segment_t} * (onehot(target_t) - softmax(logits_t)),  dH = dlogits @ W,  dW = dlogits.T @ H.
The forward therefore returns the loss and keeps dH [N, D] and dW [V, D]; backward only scales them
by grad_output (Liger-Kernel's trick). Two schedules:
- Pair-aligned (default for "torch" and "triton"; 3 matmuls, like Liger): selected tokens (those
  with a target, of a sequence the objective reads) are permuted so every pair's tokens are
  contiguous (one stable argsort of the pair index per token, one gather of hidden per chunk), and
  chunks are made of whole pairs. Every objective of engine.losses is a sum over pairs of a
  function of that pair's sums, plus terms linear in the sums with coefficients fixed by the
  counts and weights (1/P, mean weight / total chosen tokens): so g for a chunk's pairs is exact
  as soon as the chunk's logits are reduced, and `preference_loss` is asked for it on the [P]
  vectors (other pairs hold placeholder values that, by that separability, do not change the
  chunk's gradients; the tests check every objective against eager). A chunk's logits are made
  once by a GEMM and overwritten in place by their gradient, then dH and dW are two more GEMMs:
  "torch" does the per-row work with kernels.chunk_ops on fp32 logits; "triton" keeps the logits
  in the input dtype and uses the two row kernels below (Liger's fused linear cross-entropy layout:
  cuBLAS for the FLOPs, Triton for the memory-bound softmax pass, no atomics).
- Two-pass (fallback when a segment is used by more than one pair slot, or a single pair is larger
  than MAX_PAIR_CHUNKS chunks, which would break the O(chunk x V) memory bound): pass 1 computes
  lse and token log-probs, `preference_loss` runs once under autograd on the [P] sums to give g,
  pass 2 recomputes the logits and accumulates dH and dW: kernels.linear_logprob's chunked torch
  loop, or its CCE-style Triton tile kernels (logits never leave SRAM). 4 matmul-equivalents.
Extra memory beyond inputs and gradients: dH, the dW accumulator, one chunk of logits (pair-aligned,
chunked torch) or O(N) vectors (Triton tiles).
Measured (bench/bench_kernels.py -> bench/results/kernels.csv; 2 CPU cores shared with other
jobs, DPO, fp32, 8 pairs x 2 x 512 tokens = N 8192, D=512, V=32000, forward + backward): extra
peak memory eager 3005 MB, "torch" 172 MB (5.7% of eager), Liger's LigerFusedLinearDPOLoss 449 MB;
time 42.9 s, 35.0 s, 47.8 s (one rep each). At N=2048, D=256, V=8000 (10 reps): eager 1.31 s,
"torch" 1.37 s, Liger 1.97 s; 187 / 60 / 141 MB. The "gpu-8b" config (Llama-3-8B head, bf16)
needs a CUDA machine and has no rows yet.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from engine.losses import LossOutput, preference_loss
from ddpo_kernels.chunk_ops import chunk_logprob_backward_, chunk_logprob_forward
from ddpo_kernels.linear_logprob import (
    accumulate_chunk_grads,
    check_inputs,
    default_chunk_tokens,
    finish_dw,
    linear_logprob_ref,
    new_dw_accumulator,
    select_tokens,
    torch_chunked_backward,
    torch_chunked_forward,
    triton_backward,
    triton_forward,
)

# A pair larger than this many chunks switches the "torch" schedule to two-pass, keeping the
# logits block bounded by O(chunk x V) whatever the sequence lengths.
MAX_PAIR_CHUNKS = 4


# ---------------------------------------------------------------------------------------------
# Triton row kernels for the pair-aligned schedule: the chunk's logits come from one cuBLAS GEMM
# (h_c @ W.T, kept in the input dtype as eager and Liger do); these kernels reduce them to lse and
# target log-probs, then overwrite them in place with their gradient (Liger's fused linear
# cross-entropy layout), so dH and dW are two more GEMMs and nothing is atomically accumulated.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_logprob_fwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, logp_ptr, V, stride_c, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: online max / sum-exp over vocab blocks; the target logit by one load."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_c
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
    x_t = tl.load(base + tgt).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, x_t - lse)


@triton.jit
def _chunk_logprob_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_ptr, V, stride_c, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row: logits := g * (onehot(target) - exp(logits - lse)), in place, fp32 math."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_c
    tgt = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        d = g * (tl.where(offs == tgt, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(base + offs, d.to(logits_ptr.dtype.element_ty), mask=mask)


def _row_launch(logits: torch.Tensor) -> dict:
    """Vocab block per loop step (<= 4096 lanes) and, on GPUs, 8 warps to spread them."""
    opts = dict(BLOCK_V=min(4096, triton.next_power_of_2(logits.shape[1])))
    if "Interpreted" not in type(_chunk_logprob_fwd_kernel).__name__:
        opts["num_warps"] = 8
    return opts


def triton_chunk_forward(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [C] fp32, token logp [C] fp32) of a [C, V] logits chunk whose rows all have a target."""
    c, v = logits.shape
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    logp = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _chunk_logprob_fwd_kernel[(c,)](logits, tgt, lse, logp, v, logits.stride(0), **_row_launch(logits))
    return lse, logp


def triton_chunk_backward_(logits: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor, grad_tok: torch.Tensor) -> None:
    """Overwrite the chunk with grad_tok[:, None] * (onehot(target) - softmax), in its own dtype."""
    c, v = logits.shape
    if c:
        grad_tok = grad_tok.float().contiguous()
        _chunk_logprob_bwd_kernel[(c,)](logits, tgt, lse, grad_tok, v, logits.stride(0), **_row_launch(logits))


def _check_pairs(chosen_segments: torch.Tensor, rejected_segments: torch.Tensor, hidden: torch.Tensor) -> None:
    for name, t in (("chosen_segments", chosen_segments), ("rejected_segments", rejected_segments)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [P]; got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of segment ids; got dtype {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move them to one device")
    if chosen_segments.shape != rejected_segments.shape:
        raise ValueError(
            f"chosen_segments {tuple(chosen_segments.shape)} and rejected_segments {tuple(rejected_segments.shape)} "
            "must both be [P] (one entry per pair)"
        )
    if chosen_segments.numel() == 0:
        raise ValueError("no pairs: chosen_segments is empty; a batch needs at least one pair")


def _num_segments(segment_ids: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> int:
    """S = 1 + the largest segment id seen in the tokens or the pairs (one host sync)."""
    parts = [chosen.max(), rejected.max()]
    if segment_ids.numel():
        parts.append(segment_ids.max().to(chosen.dtype))
    lo = torch.stack([chosen.min(), rejected.min()]).min()
    hi, lo = torch.stack(parts).max().item(), lo.item()
    if lo < 0:
        raise ValueError(f"pair segment ids must be >= 0; got {lo} in chosen_segments/rejected_segments")
    return int(hi) + 1


def _epilogue(
    objective: str,
    seq: torch.Tensor,
    counts: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    loss_kwargs: dict,
    want_grad: bool,
) -> tuple[LossOutput, torch.Tensor | None]:
    """preference_loss on the [P] gathers of the sums; with want_grad also g = d loss / d seq [S] (fp32)."""
    with torch.enable_grad():
        c = seq[chosen].detach().requires_grad_(want_grad)
        r = seq[rejected].detach().requires_grad_(want_grad)
        out = preference_loss(objective, c, r, counts[chosen], counts[rejected], **loss_kwargs)
        if not want_grad:
            return out, None
        gc, gr = torch.autograd.grad(out.loss, [c, r], allow_unused=True)
    grad = torch.zeros_like(seq, dtype=torch.float32)
    if gc is not None:
        grad.index_add_(0, chosen, gc.float())
    if gr is not None:
        grad.index_add_(0, rejected, gr.float())
    return out, grad


def _pair_chunks(tokens_per_pair: list[int], chunk_tokens: int) -> list[tuple[int, int]]:
    """Greedy [token_start, token_end) chunks made of whole pairs, each about chunk_tokens long."""
    chunks, start, size = [], 0, 0
    for n in tokens_per_pair:
        if size and size + n > chunk_tokens:
            chunks.append((start, start + size))
            start, size = start + size, 0
        size += n
    if size:
        chunks.append((start, start + size))
    return chunks


class FusedPreferenceLossFunction(torch.autograd.Function):
    """Forward: loss and its gradients w.r.t. hidden and weight; backward: scale them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, plan):
        objective, kw = plan["objective"], plan["loss_kwargs"]
        chosen, rejected = plan["chosen"], plan["rejected"]
        rows, tgt, seg, counts = plan["rows"], plan["tgt"], plan["seg"], plan["counts"]
        s, ignore_index, chunk = plan["num_segments"], plan["ignore_index"], plan["chunk_tokens"]
        need_dh, need_dw = plan["need_dh"], plan["need_dw"]
        want_grad = need_dh or need_dw

        if plan["schedule"] == "pair_aligned":
            dh = torch.zeros_like(hidden) if need_dh else None
            dw_acc = new_dw_accumulator(weight) if need_dw else None
            seq = torch.zeros(s, dtype=torch.float32, device=hidden.device)
            scratch_counts = torch.zeros(s, dtype=torch.int64, device=hidden.device)
            done = torch.zeros(s, dtype=torch.bool, device=hidden.device)
            # Placeholder sums for pairs not reduced yet: an average log-prob of -1 keeps every
            # objective's terms finite (0 would sit on ORPO's log(1 - exp(0)) clamp). Empty
            # sequences get 0, their true (final) value, since no chunk ever marks them done.
            placeholder = -counts.float()
            on_triton = plan["backend"] == "triton"
            for a, b in plan["chunks"]:
                h = hidden[rows[a:b]]
                if on_triton:
                    # Logits stay in the input dtype: one GEMM, half the bytes of fp32 for bf16.
                    logits = h @ weight.t()
                    lse, logp = triton_chunk_forward(logits, tgt[a:b])
                    seq.index_add_(0, seg[a:b], logp)
                else:
                    logits = (h @ weight.t()).float()
                    lse = chunk_logprob_forward(
                        logits, tgt[a:b], seg[a:b], seq, scratch_counts, ignore_index=ignore_index
                    )
                if not want_grad:
                    continue
                done[seg[a:b]] = True
                _, grad_seq = _epilogue(
                    objective, torch.where(done, seq, placeholder), counts, chosen, rejected, kw, True
                )
                if on_triton:
                    triton_chunk_backward_(logits, tgt[a:b], lse, grad_seq[seg[a:b]])
                else:
                    chunk_logprob_backward_(logits, tgt[a:b], seg[a:b], lse, grad_seq, ignore_index=ignore_index)
                accumulate_chunk_grads(logits, h, weight, rows[a:b], dh, dw_acc)
                del logits
            out, _ = _epilogue(objective, seq, counts, chosen, rejected, kw, False)
            dw = finish_dw(dw_acc, weight)
        else:
            if plan["backend"] == "triton":
                lse, logp = triton_forward(hidden, weight, rows, tgt)
                seq = torch.zeros(s, dtype=torch.float32, device=hidden.device).index_add_(0, seg, logp)
            else:
                lse, seq, _ = torch_chunked_forward(hidden, weight, rows, tgt, seg, s, chunk, ignore_index)
            out, grad_seq = _epilogue(objective, seq, counts, chosen, rejected, kw, want_grad)
            dh = dw = None
            if want_grad:
                if plan["backend"] == "triton":
                    dh, dw = triton_backward(hidden, weight, rows, tgt, lse, grad_seq[seg], need_dh, need_dw)
                else:
                    dh, dw = torch_chunked_backward(
                        hidden, weight, rows, tgt, seg, lse, grad_seq, chunk, ignore_index, need_dh, need_dw
                    )
        plan["output"] = out
        plan["seq_logps"] = seq
        ctx.save_for_backward(dh, dw)
        return out.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        # Skip the [N, D] and [V, D] multiplies in the common case of a plain loss.backward().
        if grad_out.item() != 1.0:
            dh = None if dh is None else dh * grad_out.to(dh.dtype)
            dw = None if dw is None else dw * grad_out.to(dw.dtype)
        return dh, dw, None


def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    chosen_segments: torch.Tensor,
    rejected_segments: torch.Tensor,
    *,
    objective: str,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    return_output: bool = False,
    chunk_tokens: int | None = None,
) -> torch.Tensor | LossOutput:
    """The preference loss of engine.losses computed from hidden states and the LM head.

    hidden [N, D], weight [V, D], targets [N] (shifted, ignore_index where there is no target),
    segment_ids [N] (sequence of each token; unsorted runs allowed; -1 allowed on ignored tokens),
    chosen_segments / rejected_segments [P] (segment of each pair's chosen / rejected response).
    Returns the scalar loss (differentiable w.r.t. hidden and weight), or with return_output=True
    the full LossOutput whose .loss is that differentiable scalar and whose .metrics are TRL-style.
    """
    from ddpo_kernels import resolve_backend

    check_inputs(hidden, weight, targets, segment_ids)
    _check_pairs(chosen_segments, rejected_segments, hidden)
    backend = resolve_backend(backend, hidden.device)
    loss_kwargs = dict(
        beta=beta,
        chosen_weights=chosen_weights,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if backend == "eager":
        out = fused_preference_loss_ref(
            hidden, weight, targets, segment_ids, chosen_segments, rejected_segments,
            objective=objective, ignore_index=ignore_index, return_output=True, **loss_kwargs,
        )  # fmt: skip
        return out if return_output else out.loss

    chosen, rejected = chosen_segments.long(), rejected_segments.long()
    s = _num_segments(segment_ids, chosen, rejected)
    keep = torch.zeros(s, dtype=torch.bool, device=hidden.device)
    keep[chosen] = True
    if objective != "sft":  # SFT reads only the chosen side: skip the rejected tokens' matmuls
        keep[rejected] = True
    rows, tgt, seg = select_tokens(targets, segment_ids, s, weight.shape[0], ignore_index, keep_segment=keep)
    counts = torch.bincount(seg, minlength=s)[:s]
    # Let engine.losses validate objective, reference log-probs and weights on placeholder sums
    # now, so a bad argument fails before any [chunk, V] matmul rather than after the first one.
    with torch.no_grad():
        zeros = torch.zeros(chosen.numel(), dtype=torch.float32, device=hidden.device)
        preference_loss(objective, zeros, zeros, counts[chosen], counts[rejected], **loss_kwargs)
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device))
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")

    grad_on = torch.is_grad_enabled()
    plan = dict(
        objective=objective, loss_kwargs=loss_kwargs, chosen=chosen, rejected=rejected, counts=counts,
        num_segments=s, ignore_index=ignore_index, chunk_tokens=chunk, backend=backend, schedule="two_pass",
        need_dh=grad_on and hidden.requires_grad, need_dw=grad_on and weight.requires_grad,
    )  # fmt: skip

    if backend in ("torch", "triton"):
        p = chosen.numel()
        pair_of_seg = torch.full((s,), -1, dtype=torch.int64, device=hidden.device)
        pair_of_seg[chosen] = torch.arange(p, device=hidden.device)
        pair_of_seg[rejected] = torch.arange(p, device=hidden.device)
        slots = torch.bincount(torch.cat([chosen, rejected]), minlength=s)
        pair_tok = pair_of_seg[seg]
        tokens_per_pair = torch.bincount(pair_tok, minlength=p)
        unique_slots, biggest = (slots.max() <= 1).item(), int(tokens_per_pair.max().item()) if p else 0
        if unique_slots and biggest <= MAX_PAIR_CHUNKS * chunk:
            order = torch.argsort(pair_tok, stable=True)
            rows, tgt, seg = rows[order], tgt[order], seg[order]
            plan["schedule"] = "pair_aligned"
            plan["chunks"] = _pair_chunks(tokens_per_pair.tolist(), chunk)
    plan.update(rows=rows, tgt=tgt, seg=seg)

    loss = FusedPreferenceLossFunction.apply(hidden, weight, plan)
    if not return_output:
        return loss
    return dataclasses.replace(plan["output"], loss=loss)


def fused_preference_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    chosen_segments: torch.Tensor,
    rejected_segments: torch.Tensor,
    *,
    objective: str,
    beta: float,
    chosen_weights: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_output: bool = False,
) -> torch.Tensor | LossOutput:
    """Eager reference: full logits via linear_logprob_ref, then engine.losses.preference_loss."""
    check_inputs(hidden, weight, targets, segment_ids)
    _check_pairs(chosen_segments, rejected_segments, hidden)
    chosen, rejected = chosen_segments.long(), rejected_segments.long()
    s = _num_segments(segment_ids, chosen, rejected)
    seq, counts = linear_logprob_ref(hidden, weight, targets, segment_ids, s, ignore_index=ignore_index)
    out = preference_loss(
        objective, seq[chosen], seq[rejected], counts[chosen], counts[rejected], beta=beta,
        chosen_weights=chosen_weights, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )  # fmt: skip
    return out if return_output else out.loss
