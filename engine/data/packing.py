"""Packing tokenized pairs into rows and rows into `PackedBatch`es: the last step of the data flow.

Padded per-pair batches waste 30-60% of their tokens on WritingPrompts-like lengths (stories of
50-2000 tokens); packing many sequences into rows of `max_tokens_per_row` with first-fit-decreasing
wastes under 2% (measured in tests/test_data_packing.py). Both sequences of a pair go into the same
row, so a pair's chosen and rejected log-probs come from one micro-batch.

Inside a row every sequence restarts its `position_ids` at 0, which is what keeps sequences apart:
FlashAttention varlen uses `cu_seqlens`, and transformers' SDPA/eager paths detect packed sequences
from `position_ids` when called with `attention_mask=None` and `use_cache=False`.

Targets are already shifted: `targets[t] = input_ids[t + 1]` when t + 1 is in the same sequence and
is a response token (any token of the sequence with `nll_on_prompt`), else `ignore_index`; so the
last token of every sequence and all padding are ignored.

`collate` also builds the batch's loss schedule (ddpo_kernels.schedule.LossSchedule) from its CPU
tensors, before the move to the device: which rows feed which sequence, grouped by pairs, with the
chosen prompts as segments of their own under `nll_on_prompt`; the fused loss then never reads a
device value back to the host.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ddpo_kernels.schedule import LossSchedule
from engine.data.tokenize import TokenizedPair

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """One packed row: the sequences of whole pairs, concatenated (no padding)."""

    input_ids: np.ndarray  # int64 [n]
    position_ids: np.ndarray  # int64 [n]
    targets: np.ndarray  # int64 [n], shifted
    seq_lens: list[int]  # per segment, in row order
    pair_ids: list[str]
    chosen_segments: list[int]  # local segment index of each pair's chosen sequence
    rejected_segments: list[int]
    chosen_weights: list[float]
    rejected_weights: list[float]
    sequence_keys: list[tuple[str, str]]  # (pair_id, "chosen" | "rejected") per segment
    response_targets: np.ndarray | None = None  # with nll_on_prompt: targets on response tokens only
    pad_id: int = 0
    ignore_index: int = IGNORE_INDEX

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class PackedBatch:
    """One micro-batch of packed rows (DESIGN.md, "Records"). R rows, L columns, S sequences, P pairs."""

    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long
    targets: torch.Tensor  # [R, L] long, shifted; ignore_index on prompt tokens, boundaries, padding
    segment_ids: torch.Tensor  # [R, L] long, 0..S-1 unique across the batch, -1 on padding
    cu_seqlens: torch.Tensor  # [S + 1] int32, offsets into the flattened [R * L] stream
    max_seqlen: int
    chosen_segments: torch.Tensor  # [P] long
    rejected_segments: torch.Tensor  # [P] long
    pair_ids: list[str]  # [P]
    chosen_weights: torch.Tensor  # [P] float32
    rejected_weights: torch.Tensor  # [P] float32
    ref_chosen_logps: torch.Tensor | None  # [P] or None (filled from the reference cache)
    ref_rejected_logps: torch.Tensor | None
    num_real_tokens: int
    num_pad_tokens: int
    sequence_keys: list[tuple[str, str]] = field(default_factory=list)  # [S]
    # Only with nll_on_prompt (then `targets` also covers prompt tokens, for the NLL term): the
    # response-only targets, for the preference log-probs (the published ORPO code masks them so).
    response_targets: torch.Tensor | None = None  # [R, L] or None
    # The fused loss's walk over this batch (ddpo_kernels.schedule), built from the CPU tensors by
    # collate and moved with the batch, so the loss never reads a device value back to the host.
    schedule: LossSchedule | None = None

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            movable = isinstance(v, (torch.Tensor, LossSchedule))
            moved[f.name] = v.to(device, non_blocking=non_blocking) if movable else v
        return PackedBatch(**moved)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def padding_fraction(self) -> float:
        total = self.num_real_tokens + self.num_pad_tokens
        return self.num_pad_tokens / total if total else 0.0


# ---------------------------------------------------------------------------------- packing


def sequence_targets(
    ids: np.ndarray, prompt_len: int, *, nll_on_prompt: bool, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Shifted targets of one sequence: position t predicts token t + 1."""
    n = len(ids)
    t = np.full(n, ignore_index, dtype=np.int64)
    start = 0 if nll_on_prompt else max(prompt_len - 1, 0)
    if n > 1 and start < n - 1:
        t[start : n - 1] = ids[start + 1 : n]
    return t


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) by first-fit-decreasing, O(n log n) with a max-segment tree over
    the bins' remaining capacity. Deterministic: equal sizes keep input order."""
    n = len(sizes)
    if n == 0:
        return []
    too_big = [i for i in range(n) if sizes[i] > capacity]
    if too_big:
        i = too_big[0]
        raise ValueError(
            f"item {i} has {sizes[i]} tokens > row capacity {capacity}; raise data.max_tokens_per_row or lower "
            "data.max_length"
        )
    width = 1
    while width < n:
        width *= 2
    tree = [0] * (2 * width)  # leaves width..2*width-1: remaining capacity of bin b (unopened bins are empty)
    for b in range(n):
        tree[width + b] = capacity
    for node in range(width - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda k: (-sizes[k], k)):
        s = sizes[i]
        node = 1
        while node < width:  # leftmost bin with room: the "first" fit
            node = 2 * node if tree[2 * node] >= s else 2 * node + 1
        b = node - width
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= s
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def _worst_fit_decreasing(sizes: Sequence[int], capacity: int, k: int) -> list[list[int]] | None:
    """Items largest first, each onto the emptiest of k bins (LPT); None if some item does not fit."""
    heap = [(0, b) for b in range(k)]  # (load, bin): heapq pops the least-loaded bin
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        load, b = heapq.heappop(heap)
        if load + sizes[i] > capacity:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + sizes[i], b))
    return [b for b in bins if b]


def pack_bins(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing for the number of bins, then worst-fit-decreasing to balance them.

    FFD is within 11/9 of the optimum, but with several items per bin it typically ends a few bins
    above the lower bound ceil(sum / capacity), and every extra bin is pure padding. Worst-fit-
    decreasing into exactly k bins (items largest first onto the emptiest bin) spreads the items
    evenly and often succeeds at or near the bound, so the smallest k in [bound, FFD's count] where it
    succeeds is found by bisection (a handful of O(n log n) passes; feasibility is close to monotone
    in k, and anything found is checked); if none works FFD's bins are kept. Balanced rows also mean
    that micro-batches of several rows need almost no padding and that ranks get similar token counts.
    """
    ffd = first_fit_decreasing(sizes, capacity)
    lo, hi = (-(-sum(sizes) // capacity) if sizes else 0), len(ffd)
    best = _worst_fit_decreasing(sizes, capacity, hi)
    if best is None:
        return ffd
    while lo < hi:
        mid = (lo + hi) // 2
        bins = _worst_fit_decreasing(sizes, capacity, mid)
        if bins is None:
            lo = mid + 1
        else:
            best, hi = bins, mid
    return best


def _build_row(items: Sequence[TokenizedPair], *, pad_id: int, ignore_index: int, nll_on_prompt: bool) -> PackedRow:
    ids, pos, tgt, rtgt, lens, keys = [], [], [], [], [], []
    ch, rj = [], []
    for p in items:
        for side, seq, plen in (
            ("chosen", p.chosen_input_ids, p.chosen_prompt_len),
            ("rejected", p.rejected_input_ids, p.rejected_prompt_len),
        ):
            seq = np.asarray(seq, dtype=np.int64)
            (ch if side == "chosen" else rj).append(len(lens))
            ids.append(seq)
            pos.append(np.arange(len(seq), dtype=np.int64))
            tgt.append(sequence_targets(seq, plen, nll_on_prompt=nll_on_prompt, ignore_index=ignore_index))
            if nll_on_prompt:
                rtgt.append(sequence_targets(seq, plen, nll_on_prompt=False, ignore_index=ignore_index))
            lens.append(len(seq))
            keys.append((p.pair_id, side))
    return PackedRow(
        input_ids=np.concatenate(ids),
        position_ids=np.concatenate(pos),
        targets=np.concatenate(tgt),
        seq_lens=lens,
        pair_ids=[p.pair_id for p in items],
        chosen_segments=ch,
        rejected_segments=rj,
        chosen_weights=[float(p.chosen_weight) for p in items],
        rejected_weights=[float(p.rejected_weight) for p in items],
        sequence_keys=keys,
        response_targets=np.concatenate(rtgt) if nll_on_prompt else None,
        pad_id=pad_id,
        ignore_index=ignore_index,
    )


def pack_pairs(
    tokenized: Sequence[TokenizedPair],
    max_tokens_per_row: int,
    *,
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    nll_on_prompt: bool = False,
) -> list[PackedRow]:
    """Rows of whole pairs, binned by pair length (chosen + rejected tokens) with `pack_bins`.

    Within a row, pairs keep their input order, so the row content is deterministic.
    """
    sizes = [p.num_tokens for p in tokenized]
    rows = []
    for b in pack_bins(sizes, max_tokens_per_row):
        rows.append(
            _build_row(
                [tokenized[i] for i in sorted(b)], pad_id=pad_id, ignore_index=ignore_index, nll_on_prompt=nll_on_prompt
            )
        )
    return rows


def packing_padding_fraction(rows: Sequence[PackedRow], max_tokens_per_row: int) -> float:
    """Share of padding if every row were padded to the full capacity (static shapes): the worst case;
    `collate` pads only to the longest row of a micro-batch."""
    if not rows:
        return 0.0
    real = sum(r.num_tokens for r in rows)
    return 1.0 - real / (len(rows) * max_tokens_per_row)


def microbatch_padding_fraction(rows: Sequence[PackedRow], batches: Sequence[Sequence[int]]) -> float:
    """Padding share of the micro-batches `collate` would build from `batches` (lists of row indices):
    each batch is padded to its longest row. Compare with `padded_pairs_padding_fraction`."""
    real = total = 0
    for b in batches:
        lens = [rows[i].num_tokens for i in b]
        real += sum(lens)
        total += len(lens) * max(lens)
    return 1.0 - real / total if total else 0.0


def padded_pairs_padding_fraction(tokenized: Sequence[TokenizedPair], pairs_per_batch: int) -> float:
    """Padding share of the common trainers' layout (each sequence padded to the longest of its batch of
    pairs, chosen and rejected concatenated batch-wise), for the comparison in the data report."""
    real = pad = 0
    for i in range(0, len(tokenized), pairs_per_batch):
        batch = tokenized[i : i + pairs_per_batch]
        lens = [len(p.chosen_input_ids) for p in batch] + [len(p.rejected_input_ids) for p in batch]
        real += sum(lens)
        pad += len(lens) * max(lens) - sum(lens)
    return pad / (real + pad) if real + pad else 0.0


def collate(
    rows: Sequence[PackedRow],
    *,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    with_rejected: bool = True,
) -> PackedBatch:
    """One micro-batch: rows padded on the right to the longest row; segments numbered across the batch.

    cu_seqlens index the flattened [R * L] stream; a row's tail padding is absorbed into the span of
    that row's last sequence (causal attention keeps the real tokens from seeing it, and its targets
    are ignored), so the spans tile the stream and FlashAttention varlen can run on it directly.

    The batch's loss schedule is built here, on the CPU, before the move to `device`: `vocab_size`
    (the LM head's V) checks every target against the vocabulary (a clear error here rather than a
    NaN loss later); `with_rejected=False` leaves the rejected sequences out of the walk (SFT).
    """
    if not rows:
        raise ValueError("collate needs at least one packed row")
    R, L = len(rows), max(r.num_tokens for r in rows)
    pad_id, ignore = rows[0].pad_id, rows[0].ignore_index
    input_ids = np.full((R, L), pad_id, dtype=np.int64)
    position_ids = np.zeros((R, L), dtype=np.int64)
    targets = np.full((R, L), ignore, dtype=np.int64)
    segment_ids = np.full((R, L), -1, dtype=np.int64)
    with_resp = [r.response_targets is not None for r in rows]
    if any(with_resp) and not all(with_resp):
        raise ValueError("collate got rows packed with and without nll_on_prompt; pack all rows with the same setting")
    response_targets = np.full((R, L), ignore, dtype=np.int64) if all(with_resp) else None
    cu = [0]
    chosen, rejected, pair_ids, cw, rw, keys = [], [], [], [], [], []
    seg0 = 0
    for r, row in enumerate(rows):
        n = row.num_tokens
        input_ids[r, :n] = row.input_ids
        targets[r, :n] = row.targets
        if response_targets is not None:
            response_targets[r, :n] = row.response_targets
        position_ids[r, :n] = row.position_ids
        # Padding continues the last sequence's positions, matching its absorbed cu_seqlens span.
        last = row.seq_lens[-1]
        position_ids[r, n:] = np.arange(last, last + L - n)
        start = 0
        for k, ln in enumerate(row.seq_lens):
            segment_ids[r, start : start + ln] = seg0 + k
            start += ln
            cu.append(r * L + start)
        cu[-1] = (r + 1) * L
        chosen.extend(seg0 + k for k in row.chosen_segments)
        rejected.extend(seg0 + k for k in row.rejected_segments)
        pair_ids.extend(row.pair_ids)
        cw.extend(row.chosen_weights)
        rw.extend(row.rejected_weights)
        keys.extend(row.sequence_keys)
        seg0 += len(row.seq_lens)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    real = sum(r.num_tokens for r in rows)
    # With nll_on_prompt, `targets` covers prompt + response: the preference walk takes the response
    # targets, and the prompt targets become the chosen sequences' prompt segments (their NLL term).
    flat_targets, prompt_targets = targets.reshape(-1), None
    if response_targets is not None:
        flat_response = response_targets.reshape(-1)
        prompt_targets = torch.from_numpy(np.where(flat_response == ignore, flat_targets, ignore))
        flat_targets = flat_response
    schedule = LossSchedule.for_pairs(
        torch.from_numpy(flat_targets),
        torch.from_numpy(segment_ids.reshape(-1)),
        torch.tensor(chosen, dtype=torch.long),
        torch.tensor(rejected, dtype=torch.long),
        prompt_targets=prompt_targets,
        vocab_size=vocab_size,
        ignore_index=ignore,
        with_rejected=with_rejected,
    )
    batch = PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        targets=torch.from_numpy(targets),
        segment_ids=torch.from_numpy(segment_ids),
        cu_seqlens=cu_t,
        max_seqlen=int((cu_t[1:] - cu_t[:-1]).max()),
        chosen_segments=torch.tensor(chosen, dtype=torch.long),
        rejected_segments=torch.tensor(rejected, dtype=torch.long),
        pair_ids=pair_ids,
        chosen_weights=torch.tensor(cw, dtype=torch.float32),
        rejected_weights=torch.tensor(rw, dtype=torch.float32),
        ref_chosen_logps=None,
        ref_rejected_logps=None,
        num_real_tokens=real,
        num_pad_tokens=R * L - real,
        sequence_keys=keys,
        response_targets=torch.from_numpy(response_targets) if response_targets is not None else None,
        schedule=schedule,
    )
    return batch if torch.device(device).type == "cpu" else batch.to(device)


# --------------------------------------------------------------------------------- unpacking


def segment_sum(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-sequence sums [S] of per-token values [R, L] (padding excluded), e.g. masked token log-probs."""
    seg = batch.segment_ids.reshape(-1)
    keep = seg >= 0
    out = torch.zeros(batch.num_segments, dtype=values.dtype, device=values.device)
    return out.index_add(0, seg[keep], values.reshape(-1)[keep])


def unpack(batch: PackedBatch) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Every sequence of a batch back, keyed by (pair_id, side): its input_ids, position_ids and targets
    (and response_targets when the batch has them)."""
    out = {}
    seg = batch.segment_ids
    for s, key in enumerate(batch.sequence_keys):
        mask = seg == s
        out[key] = {
            "input_ids": batch.input_ids[mask],
            "position_ids": batch.position_ids[mask],
            "targets": batch.targets[mask],
        }
        if batch.response_targets is not None:
            out[key]["response_targets"] = batch.response_targets[mask]
    return out
