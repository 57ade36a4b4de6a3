"""The loss schedule: which rows of `hidden` feed which sequence, in the order the kernels walk them.

Where this sits in the flow: `engine.data.collate` builds one per micro-batch on the CPU from the
batch's CPU tensors and moves it to the device with the batch; `fused_preference_loss` and
`linear_logprob` walk it. Everything that needs the data's values (which tokens have a target,
where each sequence's tokens are, which pairs share a sequence, how many tokens each sequence has)
is decided here, on the CPU, once: the kernels then never read a device value back to the host
(no `.item()`, `nonzero`, `bincount(...).tolist()` inside the loss), and bad input (a target
outside the vocabulary, a token whose segment is out of range, a pair naming no sequence) fails
here with a message that names the value and the fix.

Layout. The selected tokens (those with a target, of a sequence some consumer reads) are ordered
by segment, and within a segment in sequence order (ascending row). Segments are ordered by
*group*: pairs that share a sequence (e.g. "all" pairing reuses a response in several pairs) form
one group, found by union-find, and every segment belongs to exactly one group. A group's gradient
is complete as soon as its own segments are reduced (the epilogue's separability, see
fused_preference_loss), so the walk forms gradients group by group without float atomics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LossSchedule:
    """One micro-batch's walk: M selected tokens in K segments (G groups), P pairs (pair schedules).

    Tensors live on one device (`.to(device)` moves them all); the Python ints describe the group
    boundaries, so the walk is planned without reading any tensor.
    """

    rows: torch.Tensor  # [M] int64: row of hidden of each selected token, in walk order
    targets: torch.Tensor  # [M] int64: its target token, in [0, V)
    token_segment: torch.Tensor  # [M] int64: index of its segment in walk order (0..K-1)
    segment_offsets: torch.Tensor  # [K + 1] int64: tokens of segment k are [offsets[k], offsets[k + 1])
    segment_counts: torch.Tensor  # [K] int64: tokens per segment
    segment_ids: torch.Tensor  # [K] int64: the caller's segment id of segment k (S + k: prompt of sequence k)
    chosen: torch.Tensor | None  # [P] int64: walk index of each pair's chosen segment (pair schedules)
    rejected: torch.Tensor | None  # [P] int64, or None when the rejected side is not read
    chosen_prompt: torch.Tensor | None  # [P] int64: walk index of the chosen prompt's segment (prompt NLL)
    slot_order: torch.Tensor | None  # [S_slots]: pair slots (chosen, rejected, prompt...) sorted by segment
    slot_offsets: torch.Tensor | None  # [K + 1]: slots of segment k are slot_order[slot_offsets[k]:...]
    num_rows: int  # N: rows of the hidden states this schedule indexes
    num_segments: int  # S: the caller's segment ids are in [0, S)
    vocab_size: int | None  # V the targets were checked against (None: not checked)
    group_tokens: tuple[int, ...]  # [G + 1] token offset of each group's start, then M
    group_segments: tuple[int, ...]  # [G + 1] segment offset of each group's start, then K

    @property
    def num_tokens(self) -> int:
        return self.group_tokens[-1]

    @property
    def num_walk_segments(self) -> int:
        return self.group_segments[-1]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LossSchedule:
        """The same schedule with every tensor on `device` (one copy per tensor, made with the batch's)."""
        moved = {
            f.name: v.to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def blocks(self, block_rows: int) -> list[tuple[int, int, int, int]]:
        """Consecutive groups packed greedily into blocks of at most block_rows tokens:
        (token_start, token_end, segment_start, segment_end) each; a group larger than block_rows
        is a block of its own (its logits are then recomputed in the backward half of the walk)."""
        out: list[tuple[int, int, int, int]] = []
        t, s = self.group_tokens, self.group_segments
        first = 0  # the group the open block starts with
        for g in range(len(t) - 1):
            if g > first and t[g + 1] - t[first] > block_rows:
                out.append((t[first], t[g], s[first], s[g]))
                first = g
        if len(t) > 1:
            out.append((t[first], t[-1], s[first], s[-1]))
        return out

    # -------------------------------------------------------------------------------- builders

    @classmethod
    def for_sequences(
        cls,
        targets: torch.Tensor,
        segment_ids: torch.Tensor,
        num_segments: int,
        *,
        vocab_size: int | None = None,
        ignore_index: int = -100,
    ) -> LossSchedule:
        """Every segment 0..S-1 in id order, each its own group (what `linear_logprob` needs)."""
        t, s = _as_numpy(targets, "targets"), _as_numpy(segment_ids, "segment_ids")
        if s.shape != t.shape:
            raise ValueError(f"segment_ids must be [N] = [{t.shape[0]}] like targets; got shape {s.shape}")
        if num_segments < 0:
            raise ValueError(f"num_segments must be >= 0; got {num_segments}")
        valid = t != ignore_index
        _check_tokens(t, s, valid, num_segments, vocab_size, ignore_index, "targets")
        walk = np.arange(num_segments, dtype=np.int64)
        token_seg = np.where(valid, s, -1)
        return cls._build(t, token_seg, walk, walk, (None, None, None), num_segments, vocab_size)

    @classmethod
    def for_pairs(
        cls,
        targets: torch.Tensor,
        segment_ids: torch.Tensor,
        chosen_segments: torch.Tensor,
        rejected_segments: torch.Tensor,
        *,
        prompt_targets: torch.Tensor | None = None,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        with_rejected: bool = True,
    ) -> LossSchedule:
        """The segments the pairs read, grouped by shared sequences (what `fused_preference_loss` needs).

        `prompt_targets` [N] (targets on prompt tokens, ignore_index elsewhere; `targets` then holds the
        response tokens only): the prompt tokens of each chosen sequence form a segment of their own,
        whose sum reaches the epilogue as the chosen prompt log-prob (the prompt + response NLL of the
        authors' ORPO/DORPO); prompt tokens of other sequences are left out.
        `with_rejected=False` leaves the rejected sequences out (an epilogue that reads only the
        chosen side, such as SFT, then costs half the matmuls).
        """
        t, s = _as_numpy(targets, "targets"), _as_numpy(segment_ids, "segment_ids")
        c, r = _as_numpy(chosen_segments, "chosen_segments"), _as_numpy(rejected_segments, "rejected_segments")
        if s.shape != t.shape:
            raise ValueError(f"segment_ids must be [N] = [{t.shape[0]}] like targets; got shape {s.shape}")
        if c.shape != r.shape:
            raise ValueError(
                f"chosen_segments {c.shape} and rejected_segments {r.shape} must both be [P] (one entry per pair)"
            )
        if c.size == 0:
            raise ValueError("no pairs: chosen_segments is empty; a batch needs at least one pair")
        lo = min(c.min(), r.min())
        if lo < 0:
            raise ValueError(f"pair segment ids must be >= 0; got {lo} in chosen_segments/rejected_segments")
        valid = t != ignore_index
        pt = None if prompt_targets is None else _as_numpy(prompt_targets, "prompt_targets")
        if pt is not None:
            if pt.shape != t.shape:
                raise ValueError(f"prompt_targets must be [N] = [{t.shape[0]}] like targets; got shape {pt.shape}")
            both = valid & (pt != ignore_index)
            if both.any():
                raise ValueError(
                    f"{int(both.sum())} tokens have both a response target and a prompt target (e.g. row "
                    f"{int(np.flatnonzero(both)[0])}); put each target in exactly one of targets / prompt_targets"
                )
        pvalid = np.zeros_like(valid) if pt is None else pt != ignore_index
        num_segments = int(max(c.max(), r.max(), s[valid | pvalid].max(initial=-1))) + 1
        _check_tokens(t, s, valid, num_segments, vocab_size, ignore_index, "targets")
        if pt is not None:
            _check_tokens(pt, s, pvalid, num_segments, vocab_size, ignore_index, "prompt_targets")

        # The prompt segment of sequence k has id S + k; it belongs to k's pairs.
        sides = (c, r if with_rejected else None, c + num_segments if pt is not None else None)
        walk, groups = _group_pairs([x for x in sides if x is not None])
        token_seg = np.where(valid, s, np.where(pvalid, s + num_segments, -1))
        merged = np.where(valid, t, pt) if pt is not None else t
        return cls._build(merged, token_seg, np.array(walk), np.array(groups), sides, num_segments, vocab_size)

    @classmethod
    def _build(cls, t, token_seg, walk, groups, sides, num_segments, vocab_size) -> LossSchedule:
        """t [N] targets, token_seg [N] segment id of each token (-1: no target; S + k: prompt of k),
        walk [K] the segment ids in walk order, groups [K] a group label per walk entry (contiguous runs),
        sides: the pair slots (chosen, rejected, prompt) as [P] segment ids, None where absent."""
        k = walk.size
        pos = np.full(2 * num_segments + 1, -1, dtype=np.int64)
        pos[walk] = np.arange(k, dtype=np.int64)
        key = np.where(token_seg >= 0, pos[np.maximum(token_seg, 0)], -1)
        selected = np.flatnonzero(key >= 0)
        order = selected[np.argsort(key[selected], kind="stable")]  # by segment, then by row
        counts = np.bincount(key[order], minlength=k).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Group boundaries in walk order (groups are contiguous runs of `groups`).
        starts = [0] + [i for i in range(1, k) if groups[i] != groups[i - 1]] + [k]
        slots = [x for x in sides if x is not None]
        slot_order = slot_offsets = None
        if slots:
            slot_seg = np.concatenate([pos[side] for side in slots])
            slot_order = np.argsort(slot_seg, kind="stable")
            slot_offsets = np.concatenate([[0], np.cumsum(np.bincount(slot_seg, minlength=k))]).astype(np.int64)

        def tensor(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        chosen, rejected, prompt = (None if x is None else tensor(pos[x]) for x in sides)
        return cls(
            rows=tensor(order),
            targets=tensor(t[order]),
            token_segment=tensor(key[order]),
            segment_offsets=tensor(offsets),
            segment_counts=tensor(counts),
            segment_ids=tensor(walk),
            chosen=chosen,
            rejected=rejected,
            chosen_prompt=prompt,
            slot_order=tensor(slot_order),
            slot_offsets=tensor(slot_offsets),
            num_rows=int(t.shape[0]),
            num_segments=int(num_segments),
            vocab_size=vocab_size,
            group_tokens=tuple(int(offsets[i]) for i in starts) if k else (0,),
            group_segments=tuple(starts) if k else (0,),
        )


def _group_pairs(slots: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """Union-find over pairs that share a segment: (segment ids in walk order, group label of each).

    Groups come in order of their first pair; within a group, pairs in order and, per pair, its slots
    in the order given (chosen, rejected, prompt), each segment at its first appearance.
    """
    p = slots[0].size
    parent = list(range(p))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for side in slots:
        for i, seg in enumerate(side.tolist()):
            a, b = find(i), find(owner.setdefault(seg, i))
            if a != b:
                parent[max(a, b)] = min(a, b)
    root = [find(i) for i in range(p)]
    walk, groups, placed = [], [], set()
    for g in sorted(set(root)):
        for i in (j for j in range(p) if root[j] == g):
            for side in slots:
                seg = int(side[i])
                if seg not in placed:
                    placed.add(seg)
                    walk.append(seg)
                    groups.append(g)
    return walk, groups


def _as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)} (flatten [R, L] to [R*L] first)")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor; got dtype {t.dtype}")
    # A device tensor is copied here (a host sync): collate builds schedules from CPU tensors.
    return t.detach().cpu().numpy().astype(np.int64, copy=False)


def _check_tokens(t, s, valid, num_segments: int, vocab_size: int | None, ignore_index: int, name: str) -> None:
    bad_seg = valid & ((s < 0) | (s >= num_segments))
    if bad_seg.any():
        raise ValueError(
            f"tokens with {name} have segment ids outside [0, num_segments={num_segments}), "
            f"e.g. {s[bad_seg][:5].tolist()}; pass num_segments = number of sequences, or set those targets "
            "to ignore_index"
        )
    bad_tgt = valid & ((t < 0) | ((t >= vocab_size) if vocab_size is not None else False))
    if bad_tgt.any():
        raise ValueError(
            f"{name} outside [0, V={vocab_size}) that are not ignore_index={ignore_index}, e.g. "
            f"{t[bad_tgt][:5].tolist()}; check the tokenizer's vocabulary against the LM head and the "
            "ignore_index used for masking"
        )
