"""Per-sequence ("varlen") attention over packed rows on every device: the `sdpa_varlen` implementation.

Where this sits: the model trunk's attention layers (engine.model selects it). A packed row holds
several sequences whose `position_ids` restart at 0. transformers' stock "sdpa" keeps them apart
with a row-sized block-diagonal [L, L] mask, so every layer pays for attention over the whole row:
measured on 2 CPU cores for 8 sequences of 180-700 tokens (3,360 in the row), gpt2-small heads,
forward + backward 1.86 s with the mask against 0.80 s per sequence (bench/bench_attention.py
records the rows). FlashAttention-2 varlen does the per-sequence split on CUDA; this module does the
same with `torch.nn.functional.scaled_dot_product_attention` (fused flash kernels on CPU and CUDA,
no mask): each sequence is one causal SDPA call over a `split` view of q, k, v, and the outputs are
concatenated back into the row. Cost and memory then grow with each sequence, not with the row.

Where the sequences are: `cu_seq_lens_q` (the FlashAttention kwargs over the flattened [R * L]
stream, as PackedBatch.cu_seqlens) when the caller passes them, else the `position_ids` that
transformers hands every attention layer (a new sequence wherever the position does not go up by 1,
the rule of transformers' own packed-sequence detection). A padded row tail continues its last
sequence's positions (engine.data.collate), so it rides along in that sequence's causal span.

The mask function registered next to it returns no mask when there is nothing but causality and
packing to express (no padding mask, no KV cache offset, no sliding window), and otherwise builds
transformers' own SDPA mask, in which case attention falls back to the stock SDPA path: generation
with left padding and a KV cache works unchanged. It assumes the model's mask is causal apart from
packing; engine.model only selects it for such architectures (VARLEN_MODEL_TYPES).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
# Text-only decoders whose attention mask is causal (plus packing): no image-token or-masks, no
# bidirectional prefixes. Sliding-window layers are handled (they get transformers' mask).
VARLEN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "gemma", "olmo", "olmo2")

# One entry: every layer of a forward sees the same position-id (or cu_seqlens) tensor, so its
# segment lengths are read once per forward (on CUDA that read is a host sync).
_last_lengths: tuple[weakref.ref, int, tuple, list[list[int]]] | None = None


def segment_lengths(
    batch_size: int, row_len: int, *, cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> list[list[int]]:
    """Lengths of the sequences in each of `batch_size` rows of `row_len` tokens (they sum to row_len).

    From `cu_seqlens` (offsets into the flattened rows; every row end must be a boundary) or else
    from `position_ids` [B or 1, L] (a sequence starts where the position does not follow the
    previous one by +1); with neither, one sequence per row.
    """
    global _last_lengths
    source = cu_seqlens if cu_seqlens is not None else position_ids
    if source is None:
        return [[row_len]] * batch_size
    key = (source.shape, batch_size, row_len)
    # Inference tensors keep no version counter (and cannot change under a forward anyway).
    current = None if source.is_inference() else source._version
    if _last_lengths is not None:
        ref, version, last_key, lengths = _last_lengths
        if ref() is source and version == current and last_key == key:
            return lengths
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != batch_size * row_len:
            raise ValueError(
                f"cu_seq_lens_q must run from 0 to batch x row length = {batch_size * row_len}; got "
                f"{bounds[0]}..{bounds[-1]}"
            )
        bset = set(bounds)
        missing = [r * row_len for r in range(1, batch_size) if r * row_len not in bset]
        if missing:
            raise ValueError(f"cu_seq_lens_q has no boundary at row end(s) {missing[:3]}: a sequence may not span rows")
        lengths = [[] for _ in range(batch_size)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                lengths[a // row_len].append(b - a)
    else:
        pos = position_ids.expand(batch_size, -1) if position_ids.shape[0] != batch_size else position_ids
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        rows, cols = starts.nonzero(as_tuple=True)
        rows, cols = rows.tolist(), cols.tolist()
        lengths = [[] for _ in range(batch_size)]
        for i, (r, c) in enumerate(zip(rows, cols)):
            end = cols[i + 1] if i + 1 < len(rows) and rows[i + 1] == r else row_len
            lengths[r].append(end - c)
    _last_lengths = (weakref.ref(source), current, key, lengths)
    return lengths


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, L, D], k/v [B, Hkv, L, D] -> ([B, L, Hq, D], None).

    Causal attention within each packed sequence; anything else (a mask, a KV cache, non-causal
    attention) goes to transformers' stock SDPA function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    B, _, L, _ = query.shape
    if attention_mask is not None or not causal or key.shape[2] != L or L < 2 or kwargs.get("sliding_window"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    lengths = segment_lengths(B, L, cu_seqlens=kwargs.get("cu_seq_lens_q"), position_ids=kwargs.get("position_ids"))
    extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **extra)

    if all(len(r) == 1 for r in lengths):
        out = attend(query, key, value)
    else:
        rows = []
        for b, lens in enumerate(lengths):
            q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
            if len(lens) == 1:
                rows.append(attend(q, k, v))
                continue
            # split (not slicing) so that backward concatenates the pieces' gradients in one copy.
            parts = [attend(qs, ks, vs) for qs, ks, vs in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))]
            rows.append(torch.cat(parts, dim=2))
        out = rows[0] if B == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def sdpa_varlen_mask(
    *,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
):
    """transformers mask function: None where per-sequence causal attention says it all, else the SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    plain = (
        attention_mask is None
        and local_size is None
        and q_length == kv_length
        and isinstance(q_offset, int)
        and q_offset == 0
        and isinstance(kv_offset, int)
        and kv_offset == 0
    )
    if plain:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
