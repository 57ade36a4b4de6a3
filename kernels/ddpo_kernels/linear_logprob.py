"""Per-sequence sums of next-token log-probs straight from hidden states and the LM head.

Where this sits in the flow: the trunk gives `hidden [N, D]` for a packed batch, the LM head is
`weight [V, D]`; this op returns, for every sequence (segment) s of the batch,
    seq_logps[s] = sum over tokens t of s with targets[t] != ignore_index of
                   logits[t, targets[t]] - logsumexp(logits[t, :]),   logits = hidden @ weight.T (fp32 accumulation)
and seq_token_counts[s], the number of those tokens. `fused_preference_loss` builds on it, and the
reference-log-prob cache calls it directly.

Design (CCE-style, Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"):
the upstream gradient d loss / d seq_logps is unknown in the forward pass, so the forward keeps only
lse [M] (M = tokens with a target; prompt tokens and boundaries are dropped before any matmul, which
also removes their share of the FLOPs), and the backward recomputes the logits block by block:
    d logp_t / d logits_t = onehot(target_t) - softmax(logits_t)
    dlogits_t = grad_seq[segment_t] * (onehot(target_t) - exp(logits_t - lse_t))
    dH = dlogits @ W,  dW = dlogits.T @ H.
Passes over the vocabulary: forward 1 matmul, backward 3 (recompute, dH, dW); memory beyond the
inputs and gradients is O(chunk x V) for "torch" and O(M) for "triton" (tiles live in SRAM).
- "torch": chunks of `chunk_tokens` rows; the per-chunk logsumexp / gather / softmax work is done by
  `kernels.chunk_ops` (native when built). dW accumulates in fp32 (addmm_ into one fp32 buffer), so
  half-precision weights get one rounding, like a single full matmul.
- "triton": a forward kernel tiles [BLOCK_M tokens x BLOCK_V vocab] with tl.dot over D blocks and
  keeps an online max / sum-exp per token; a backward kernel recomputes the same tiles and adds
  dlogits @ W into dH and dlogits.T @ H into dW with fp32 atomics.
Measured (bench/bench_kernels.py, rows in bench/results/kernels.csv; 2 CPU cores shared with
other jobs, fp32, N=8192, D=512, V=32000, forward + backward with a random upstream gradient):
extra peak memory eager 3000 MB, "torch" 328 MB (10.9%: one 1024 x 32000 fp32 chunk, the fp32 dW
and dH); time 35.8 s vs 44.6 s (one rep each; the recompute is the 4th matmul).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ddpo_kernels.chunk_ops import chunk_logprob_backward_, chunk_logprob_forward

# Logits chunk budgets (fp32 bytes of one [chunk, V] block). CPU: 128 MiB keeps the extra peak at
# N=8192, V=32000 near 10% of eager's (which holds several N x V fp32 tensors). GPU: 512 MiB gives
# 1024-row chunks at V=128256, big enough for full-width GEMMs and for whole 1024-token pairs, and
# still below the ~1 GiB per-chunk fp32 logits + log-softmax of Liger's one-pair chunks.
CPU_CHUNK_BYTES = 128 * 1024 * 1024
GPU_CHUNK_BYTES = 512 * 1024 * 1024


def default_chunk_tokens(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk so that one fp32 [chunk, V] logits block fits the device's budget (a power of two, 16..8192)."""
    budget_bytes = CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else GPU_CHUNK_BYTES
    rows = max(1, budget_bytes // (4 * max(1, vocab_size)))
    return int(min(8192, max(16, 2 ** int(math.floor(math.log2(rows))))))


# ---------------------------------------------------------------------------------------------
# Input checks and token selection (shared with fused_preference_loss)
# ---------------------------------------------------------------------------------------------


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor) -> None:
    """Raise ValueError naming the offending argument when shapes, dtypes or devices do not fit together."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D]; got shape {tuple(hidden.shape)} (flatten [R, L, D] to [R*L, D] first)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[1] = {hidden.shape[1]}; got shape {tuple(weight.shape)}"
        )
    n = hidden.shape[0]
    for name, t in (("targets", targets), ("segment_ids", segment_ids)):
        if t.shape != (n,):
            raise ValueError(f"{name} must be [N] = [{n}] like hidden's first dim; got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor; got dtype {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move them to one device")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; move them to one device")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"hidden must be float32, float16, bfloat16 or float64; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one of them")


def select_tokens(
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    vocab_size: int,
    ignore_index: int,
    keep_segment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows that contribute to some sequence's log-prob: (rows [M] int64, targets [M] int64, segments [M] int64).

    Ignored tokens (prompt, boundaries, padding) are dropped here so no backend spends a matmul on
    them. `keep_segment` [S] bool further drops segments that no consumer reads.
    """
    valid = targets != ignore_index
    seg = segment_ids.long()
    bad_seg = valid & ((seg < 0) | (seg >= num_segments))
    tgt = targets.long()
    bad_tgt = valid & ((tgt < 0) | (tgt >= vocab_size))
    # One host sync for both checks: the selection below syncs anyway (nonzero).
    flags = torch.stack([bad_seg.any(), bad_tgt.any()]).tolist()
    if flags[0]:
        bad = seg[bad_seg][:5].tolist()
        raise ValueError(
            f"tokens with a target have segment ids outside [0, num_segments={num_segments}), e.g. {bad}; "
            "pass num_segments = number of sequences, or set those targets to ignore_index"
        )
    if flags[1]:
        bad = tgt[bad_tgt][:5].tolist()
        raise ValueError(
            f"targets outside [0, V={vocab_size}) that are not ignore_index={ignore_index}, e.g. {bad}; "
            "check the tokenizer's vocabulary against the LM head and the ignore_index used for masking"
        )
    if keep_segment is not None:
        valid = valid & keep_segment[seg.clamp(0, num_segments - 1)]
    rows = valid.nonzero().squeeze(1)
    return rows, tgt[rows], seg[rows]


# ---------------------------------------------------------------------------------------------
# Eager reference
# ---------------------------------------------------------------------------------------------


def linear_logprob_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: full fp32 logits, log_softmax, gather, per-segment sum.

    Returns (seq_logps [S] float32 (float64 for float64 inputs), seq_token_counts [S] int64).
    Differentiable w.r.t. hidden and weight through ordinary autograd.
    """
    check_inputs(hidden, weight, targets, segment_ids)
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


# ---------------------------------------------------------------------------------------------
# "torch" backend: chunked PyTorch
# ---------------------------------------------------------------------------------------------


def torch_chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    chunk_tokens: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the selected rows: (lse [M] fp32, seq_logps [S] fp32, counts [S] int64)."""
    dev = hidden.device
    m = rows.numel()
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    seq = torch.zeros(num_segments, dtype=torch.float32, device=dev)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=dev)
    for a in range(0, m, chunk_tokens):
        b = min(m, a + chunk_tokens)
        logits = (hidden[rows[a:b]] @ weight.t()).float()
        lse[a:b] = chunk_logprob_forward(logits, tgt[a:b], seg[a:b], seq, counts, ignore_index=ignore_index)
    return lse, seq, counts


def torch_chunked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    seg: torch.Tensor,
    lse: torch.Tensor,
    grad_seq: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Recompute logits chunk by chunk and return (dH [N, D] in hidden's dtype, dW [V, D] in weight's dtype)."""
    grad_seq = grad_seq.float().contiguous()
    dh = torch.zeros_like(hidden) if need_dh else None
    dw_acc = new_dw_accumulator(weight) if need_dw else None
    m = rows.numel()
    for a in range(0, m, chunk_tokens):
        b = min(m, a + chunk_tokens)
        h = hidden[rows[a:b]]
        dlogits = (h @ weight.t()).float()
        chunk_logprob_backward_(dlogits, tgt[a:b], seg[a:b], lse[a:b], grad_seq, ignore_index=ignore_index)
        accumulate_chunk_grads(dlogits, h, weight, rows[a:b], dh, dw_acc)
    return dh, finish_dw(dw_acc, weight)


def new_dw_accumulator(weight: torch.Tensor) -> torch.Tensor:
    """Zeroed dW accumulator: fp32, except half-precision weights on GPUs.

    On CPU an fp32 accumulator rounds once like one full matmul, and CPU half GEMMs are no faster.
    On GPUs a [V, D] fp32 buffer would cost 2x the weight (2 GB at Llama-3-8B's head) and fp32
    GEMMs are slow, so dW accumulates in the weight's dtype through addmm_ (fp32 inside each GEMM,
    one rounding per chunk, no [V, D] temporary), as Liger does.
    """
    acc_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
    return torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)


def finish_dw(dw_acc: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """The accumulator in the weight's dtype (itself when they already match)."""
    if dw_acc is None or dw_acc.dtype == weight.dtype:
        return dw_acc
    return dw_acc.to(weight.dtype)


def accumulate_chunk_grads(
    dlogits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    dh: torch.Tensor | None,
    dw_acc: torch.Tensor | None,
) -> None:
    """dH[rows] = dlogits @ W in the input dtype (the rounding eager autograd applies); dW_acc += dlogits.T @ h."""
    if dh is not None:
        dh.index_copy_(0, rows, (dlogits.to(weight.dtype) @ weight).to(dh.dtype))
    if dw_acc is not None:
        dw_acc.addmm_(dlogits.t().to(dw_acc.dtype), h.to(dw_acc.dtype))


# ---------------------------------------------------------------------------------------------
# "triton" backend
# ---------------------------------------------------------------------------------------------


@triton.jit
def _linear_logprob_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    rows_ptr,
    targets_ptr,
    lse_ptr,
    logp_ptr,
    M,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M selected tokens; loop over vocab tiles with an online logsumexp."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            w = tl.load(
                weight_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                mask=mask_v[:, None] & mask_d[None, :],
                other=0.0,
            )
            if DOT_FP32:
                # The interpreter's bf16 dot is wrong; fp32 operands give the exact product instead.
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        logits = tl.where(mask_v[None, :], acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), 1)
    lse = m_i + tl.log(s_i)
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    tl.store(logp_ptr + offs_m, tgt_logit - lse, mask=mask_m)


@triton.jit
def _linear_logprob_bwd_kernel(
    hidden_ptr,
    weight_ptr,
    rows_ptr,
    targets_ptr,
    lse_ptr,
    grad_ptr,
    dh_ptr,
    dw_ptr,
    M,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_dhn,
    stride_dwv,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """One program: a [BLOCK_M x BLOCK_V] tile; recompute logits, form dlogits, add its dH and dW shares."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_v = offs_v < V
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)

    p = tl.exp(acc - lse[:, None])
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    dlogits = g[:, None] * (onehot - p)
    dlogits = tl.where(mask_m[:, None] & mask_v[None, :], dlogits, 0.0)
    if DOT_FP32:
        dl = dlogits
    else:
        # Same rounding as eager autograd: the fp32 gradient of the logits is cast to the input dtype.
        dl = dlogits.to(hidden_ptr.dtype.element_ty)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        if COMPUTE_DH:
            w = tl.load(
                weight_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                mask=mask_v[:, None] & mask_d[None, :],
                other=0.0,
            )
            if DOT_FP32:
                w = w.to(tl.float32)
            dh = tl.dot(dl, w, input_precision=INPUT_PRECISION)
            tl.atomic_add(
                dh_ptr + rows[:, None] * stride_dhn + offs_d[None, :], dh, mask=mask_m[:, None] & mask_d[None, :]
            )
        if COMPUTE_DW:
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                mask=mask_m[:, None] & mask_d[None, :],
                other=0.0,
            )
            if DOT_FP32:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dl), h, input_precision=INPUT_PRECISION)
            tl.atomic_add(
                dw_ptr + offs_v[:, None] * stride_dwv + offs_d[None, :], dw, mask=mask_v[:, None] & mask_d[None, :]
            )


def _triton_config(hidden: torch.Tensor) -> dict:
    """Block sizes and dot settings for the device (interpreter: fewer, larger numpy ops)."""
    # The kernels' type says how they run (decided when triton was imported; resolve_backend refuses
    # CPU tensors for compiled kernels), so the compile check can take the GPU configuration.
    interpreted = "Interpreted" in type(_linear_logprob_fwd_kernel).__name__
    # The interpreter's bf16 tl.dot gives wrong results; there bf16 operands are cast to fp32 (exact products).
    dot_fp32 = hidden.dtype == torch.float32 or (interpreted and hidden.dtype != torch.float16)
    cfg = dict(
        DOT_FP32=dot_fp32,
        # fp32 inputs must not silently drop to tf32 on GPUs: tests compare at rtol 1e-5.
        INPUT_PRECISION="ieee",
    )
    if interpreted:
        cfg.update(BLOCK_M=32, BLOCK_V=128, BLOCK_D=64)
    else:
        # 8 warps spread each program's fp32 accumulator tile (untuned). In half precision the
        # [64 x 128] tiles with 128-wide D blocks and 3 stages needed 245,760 B of shared memory in the
        # backward (sm_90 limit 232,448 B) and spilled registers on sm_80 and at odd shapes; 64-wide tiles
        # with 2 stages fit everywhere (tests/triton_compile_check.py).
        if hidden.dtype == torch.float32:
            cfg.update(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64, num_warps=8)
        else:
            cfg.update(BLOCK_M=64, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=2)
    return cfg


def triton_forward(
    hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, tgt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [M] fp32, token logp [M] fp32) for the selected rows, without storing logits."""
    if hidden.dtype == torch.float64:
        raise ValueError("the triton backend takes float32/float16/bfloat16 inputs; use backend='torch' for float64")
    m = rows.numel()
    v, d = weight.shape
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    if m == 0:
        return lse, logp
    cfg = _triton_config(hidden)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _linear_logprob_fwd_kernel[grid](
        hidden, weight, rows, tgt, lse, logp, m, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        **cfg,
    )  # fmt: skip
    return lse, logp


def triton_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    tgt: torch.Tensor,
    lse: torch.Tensor,
    grad_tok: torch.Tensor,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dH [N, D] and dW [V, D] (input dtypes) for per-token upstream gradients grad_tok [M]."""
    m = rows.numel()
    v, d = weight.shape
    dh32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    if m > 0 and (need_dh or need_dw):
        cfg = _triton_config(hidden)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(v, cfg["BLOCK_V"]))
        # Unused output pointers still need a valid tensor argument.
        dh_arg = dh32 if dh32 is not None else lse
        dw_arg = dw32 if dw32 is not None else lse
        _linear_logprob_bwd_kernel[grid](
            hidden, weight, rows, tgt, lse, grad_tok.float().contiguous(), dh_arg, dw_arg, m, v, d,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            dh32.stride(0) if dh32 is not None else 0, dw32.stride(0) if dw32 is not None else 0,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, **cfg,
        )  # fmt: skip
    dh = None if dh32 is None else (dh32 if hidden.dtype == torch.float32 else dh32.to(hidden.dtype))
    dw = None if dw32 is None else (dw32 if weight.dtype == torch.float32 else dw32.to(weight.dtype))
    return dh, dw


# ---------------------------------------------------------------------------------------------
# autograd Function and public entry point
# ---------------------------------------------------------------------------------------------


class LinearLogprobFunction(torch.autograd.Function):
    """seq_logps = per-segment sums of token log-probs; backward recomputes logits (never stored)."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, tgt, seg, num_segments, backend, chunk_tokens, ignore_index):
        if backend == "triton":
            lse, logp = triton_forward(hidden, weight, rows, tgt)
            seq = torch.zeros(num_segments, dtype=torch.float32, device=hidden.device).index_add_(0, seg, logp)
        else:
            lse, seq, _ = torch_chunked_forward(
                hidden, weight, rows, tgt, seg, num_segments, chunk_tokens, ignore_index
            )
        ctx.save_for_backward(hidden, weight, rows, tgt, seg, lse)
        ctx.backend = backend
        ctx.chunk_tokens = chunk_tokens
        ctx.ignore_index = ignore_index
        return seq

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, rows, tgt, seg, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            dh, dw = triton_backward(hidden, weight, rows, tgt, lse, grad_seq.float()[seg], need_dh, need_dw)
        else:
            dh, dw = torch_chunked_backward(
                hidden, weight, rows, tgt, seg, lse, grad_seq, ctx.chunk_tokens, ctx.ignore_index, need_dh, need_dw
            )
        return dh, dw, None, None, None, None, None, None, None


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of next-token log-probs and token counts.

    hidden [N, D], weight [V, D] (same float dtype), targets [N] (already shifted; ignore_index on
    prompt tokens and sequence boundaries), segment_ids [N] in [0, num_segments) for every token
    with a target (runs need not be sorted). Returns (seq_logps [S] float32, seq_token_counts [S]
    int64); seq_logps is differentiable w.r.t. hidden and weight. `chunk_tokens` sets the "torch"
    backend's rows per chunk (default: default_chunk_tokens, a 128 MiB (CPU) / 512 MiB (GPU) fp32 block).
    """
    from ddpo_kernels import resolve_backend

    check_inputs(hidden, weight, targets, segment_ids)
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0; got {num_segments}")
    backend = resolve_backend(backend, hidden.device)
    if backend == "eager":
        return linear_logprob_ref(hidden, weight, targets, segment_ids, num_segments, ignore_index=ignore_index)
    rows, tgt, seg = select_tokens(targets, segment_ids, num_segments, weight.shape[0], ignore_index)
    counts = torch.bincount(seg, minlength=num_segments)[:num_segments] if num_segments else seg.new_zeros(0)
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.device))
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    seq = LinearLogprobFunction.apply(hidden, weight, rows, tgt, seg, num_segments, backend, chunk, ignore_index)
    return seq, counts
