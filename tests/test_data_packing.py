"""engine.data.packing and engine.data.sampler: round trips, boundaries, padding, ranks, resume, and
packed forwards equal to separate forwards."""

import numpy as np
import pytest
import torch

from engine.data.packing import (
    IGNORE_INDEX,
    collate,
    first_fit_decreasing,
    pack_bins,
    pack_pairs,
    packing_padding_fraction,
    padded_pairs_padding_fraction,
    segment_sum,
    unpack,
)
from engine.data.sampler import RowSampler
from engine.data.tokenize import TokenizedPair


def fake_pairs(n, seed=0, lo=1, hi=60, vocab=50):
    """Tokenized pairs of awkward lengths: 1-token responses, prompt-only-plus-one, long ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        plen = int(rng.integers(1, 12))
        c = rng.integers(1, vocab, plen + int(rng.integers(lo, hi))).astype(np.int32)
        r = rng.integers(1, vocab, plen + int(rng.integers(lo, hi))).astype(np.int32)
        r[:plen] = c[:plen]
        out.append(
            TokenizedPair(f"pair{i:03d}", c, plen, r, plen, chosen_weight=1 + i / 100, rejected_weight=0.5 + i / 1000)
        )
    return out


def expected_targets(ids, plen, nll_on_prompt=False):
    t = [IGNORE_INDEX] * len(ids)
    for k in range(len(ids) - 1):
        if nll_on_prompt or k + 1 >= plen:
            t[k] = int(ids[k + 1])
    return t


@pytest.mark.parametrize("capacity,rows_per_batch", [(128, 1), (128, 3), (301, 2), (1000, 4)])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_pack_round_trip(capacity, rows_per_batch, nll_on_prompt):
    pairs = fake_pairs(37)
    rows = pack_pairs(pairs, capacity, pad_id=0, nll_on_prompt=nll_on_prompt)
    assert all(r.num_tokens <= capacity for r in rows)
    by_id = {p.pair_id: p for p in pairs}
    seen = []
    for b in range(0, len(rows), rows_per_batch):
        batch = collate(rows[b : b + rows_per_batch])
        R, L = batch.input_ids.shape
        S, P = batch.num_segments, batch.num_pairs
        assert batch.targets.shape == batch.position_ids.shape == batch.segment_ids.shape == (R, L)
        assert len(batch.sequence_keys) == S == 2 * P and batch.cu_seqlens.dtype == torch.int32
        # Segment ids: unique per sequence across the batch, -1 exactly on padding.
        pad = batch.segment_ids == -1
        assert int(pad.sum()) == batch.num_pad_tokens and batch.num_real_tokens + batch.num_pad_tokens == R * L
        assert sorted(batch.segment_ids[~pad].unique().tolist()) == list(range(S))
        assert (batch.targets[pad] == IGNORE_INDEX).all() and (batch.input_ids[pad] == 0).all()
        # cu_seqlens tile the flattened stream; each span starts where its sequence starts.
        cu = batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == R * L and all(a < b for a, b in zip(cu, cu[1:]))
        assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
        flat_seg = batch.segment_ids.reshape(-1)
        for s in range(S):
            assert flat_seg[cu[s]] == s and (flat_seg[cu[s] : cu[s + 1]][flat_seg[cu[s] : cu[s + 1]] >= 0] == s).all()
        # Unpacking gives back every sequence exactly, with positions from 0 and correct shifted targets.
        seqs = unpack(batch)
        for pid, side in batch.sequence_keys:
            p = by_id[pid]
            ids = p.chosen_input_ids if side == "chosen" else p.rejected_input_ids
            plen = p.chosen_prompt_len if side == "chosen" else p.rejected_prompt_len
            got = seqs[(pid, side)]
            assert got["input_ids"].tolist() == ids.tolist()
            assert got["position_ids"].tolist() == list(range(len(ids)))
            assert got["targets"].tolist() == expected_targets(ids, plen, nll_on_prompt)
            if nll_on_prompt:
                assert got["response_targets"].tolist() == expected_targets(ids, plen, False)
            else:
                assert "response_targets" not in got
            seen.append((pid, side))
        # Pair bookkeeping: segments, ids and weights line up.
        for j, pid in enumerate(batch.pair_ids):
            assert batch.sequence_keys[batch.chosen_segments[j]] == (pid, "chosen")
            assert batch.sequence_keys[batch.rejected_segments[j]] == (pid, "rejected")
            assert batch.chosen_weights[j].item() == pytest.approx(by_id[pid].chosen_weight)
            assert batch.rejected_weights[j].item() == pytest.approx(by_id[pid].rejected_weight)
        assert batch.ref_chosen_logps is None and batch.ref_rejected_logps is None
    # No sequence lost or duplicated, and no token lost either.
    assert sorted(seen) == sorted((p.pair_id, s) for p in pairs for s in ("chosen", "rejected"))
    assert sum(r.num_tokens for r in rows) == sum(p.num_tokens for p in pairs)


def test_single_token_and_prompt_edge_targets():
    one = TokenizedPair("a", np.array([7], np.int32), 0, np.array([5, 6], np.int32), 1)
    batch = collate(pack_pairs([one], 16, pad_id=0))
    assert batch.targets[0, :3].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX]
    assert batch.padding_fraction == 0.0 and batch.num_segments == 2


def test_batch_to_device_and_segment_sum():
    batch = collate(pack_pairs(fake_pairs(5), 200, pad_id=0), device="cpu")
    moved = batch.to("cpu")
    assert moved.pair_ids == batch.pair_ids and torch.equal(moved.input_ids, batch.input_ids)
    counts = segment_sum((batch.targets != IGNORE_INDEX).float(), batch)
    assert counts.shape == (batch.num_segments,)
    assert counts.sum().item() == (batch.targets != IGNORE_INDEX).sum().item()


def test_ffd_properties_and_errors():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 100, 500).tolist()
    for packer in (first_fit_decreasing, pack_bins):
        bins = packer(sizes, 150)
        assert sorted(i for b in bins for i in b) == list(range(500))
        assert all(sum(sizes[i] for i in b) <= 150 for b in bins)
        assert bins == packer(sizes, 150)
    # A naive first-fit-decreasing gives the same bins as the segment-tree one.
    naive: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(500), key=lambda k: (-sizes[k], k)):
        b = next((j for j, ld in enumerate(loads) if ld + sizes[i] <= 150), None)
        if b is None:
            naive.append([])
            loads.append(0)
            b = len(naive) - 1  # noqa: E702
        naive[b].append(i)
        loads[b] += sizes[i]  # noqa: E702
    assert first_fit_decreasing(sizes, 150) == naive
    assert len(pack_bins(sizes, 150)) <= len(naive)
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        pack_pairs(fake_pairs(2, hi=200), 100, pad_id=0)


def _story_pairs(n, seed):
    """WritingPrompts-like lengths: prompts 20-100 tokens, stories 50-2000 (log-normal around 400)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        plen = int(rng.integers(20, 100))
        c, r = (int(np.clip(rng.lognormal(np.log(400), 0.8), 50, 2000)) for _ in range(2))
        out.append(TokenizedPair(f"s{i}", np.ones(plen + c, np.int32), plen, np.ones(plen + r, np.int32), plen))
    return out


def test_padding_fraction_realistic_lengths():
    pairs = _story_pairs(3000, seed=0)
    rows = pack_pairs(pairs, 8192, pad_id=0)
    packed = packing_padding_fraction(rows, 8192)
    padded = padded_pairs_padding_fraction(pairs, 8)
    print(f"realistic lengths: packed padding {packed:.4f} vs padded pair batches {padded:.3f}")
    assert packed < 0.02
    assert padded > 0.30  # what padded per-pair batches waste on the same lengths


def test_padding_fraction_bundled_data():
    from engine.data.loading import load_responses
    from engine.data.pairs import build_pairs
    from engine.data.tokenize import tokenize_pairs
    from engine.model import load_tokenizer

    tok = load_tokenizer()
    responses, _ = load_responses("synthetic", synthetic_prompts=240)
    pairs = build_pairs(responses, "gap", seed=0)
    tokd, _ = tokenize_pairs(pairs, tok, max_prompt_length=64, max_length=256)
    rows = pack_pairs(tokd, 4096, pad_id=0)
    frac = packing_padding_fraction(rows, 4096)
    padded = padded_pairs_padding_fraction(tokd, 8)
    print(f"bundled data: packed padding {frac:.4f} vs padded pair batches {padded:.3f}")
    assert frac < 0.02 and padded > 0.2


# ------------------------------------------------------------------------------------ sampler


def run_epoch(tokens, W, B, epoch, seed=0, **kw):
    out = []
    for rank in range(W):
        s = RowSampler(tokens, num_replicas=W, rank=rank, rows_per_batch=B, seed=seed, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,B", [(40, 1), (41, 3), (7, 4), (3, 2)])
def test_two_ranks_cover_every_row_once(n, B):
    tokens = np.random.default_rng(n).integers(100, 1000, n).tolist()
    W = 2
    for epoch in (0, 1):
        per_rank = run_epoch(tokens, W, B, epoch)
        assert len(per_rank[0]) == len(per_rank[1]) > 0  # same number of micro-batches on every rank
        got = sorted(i for batches in per_rank for b in batches for i in b)
        assert got == list(range(n))  # exactly once (n >= W here, so nothing repeated)
        assert all(1 <= len(b) <= B for batches in per_rank for b in batches)
    assert run_epoch(tokens, W, B, 0) == run_epoch(tokens, W, B, 0)
    if n > 8:
        assert run_epoch(tokens, W, B, 0) != run_epoch(tokens, W, B, 1)


def test_fewer_rows_than_ranks_repeats_and_reports():
    per_rank = run_epoch([10, 20, 30], 4, 1, 0)
    assert all(len(b) == 1 for b in per_rank)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert set(flat) == {0, 1, 2} and len(flat) == 4
    s = RowSampler([10, 20, 30], num_replicas=4, rank=0, rows_per_batch=1, seed=0)
    assert s.epoch_stats()["repeated_rows"] == 1
    d = RowSampler(list(range(1, 10)), num_replicas=2, rank=0, rows_per_batch=2, seed=0, drop_last=True)
    assert len(d) == 2 and d.epoch_stats()["dropped_rows"] == 1


def test_token_balance_across_ranks():
    tokens = np.random.default_rng(0).integers(200, 4000, 256).tolist()
    stats = RowSampler(tokens, num_replicas=4, rank=0, rows_per_batch=4, seed=0).epoch_stats()
    naive = RowSampler(tokens, num_replicas=4, rank=0, rows_per_batch=1, seed=0).epoch_stats()
    assert stats["imbalance"] < 1.02, stats
    assert naive["micro_batches"] == 64


def test_resume_continues_exactly():
    tokens = list(range(100, 160))
    full = RowSampler(tokens, num_replicas=2, rank=1, rows_per_batch=2, seed=3)
    full.set_epoch(2)
    expected = list(full)
    s = RowSampler(tokens, num_replicas=2, rank=1, rows_per_batch=2, seed=3)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    resumed = RowSampler(tokens, num_replicas=2, rank=1, rows_per_batch=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer re-entering its epoch loop keeps the position
    assert head + list(resumed) == expected
    with pytest.raises(ValueError, match="num_replicas"):
        RowSampler(tokens, num_replicas=4, rank=0, rows_per_batch=2, seed=3).load_state_dict(state)


# ------------------------------------------------------------------------- packed model forward


def test_packed_forward_matches_separate_forwards():
    from engine.model import build_model

    torch.manual_seed(0)
    model = build_model("llama-tiny", attn_implementation="sdpa").eval()
    vocab = model.config.vocab_size
    pairs = fake_pairs(3, seed=5, lo=2, hi=14, vocab=vocab - 1)
    rows = pack_pairs(pairs, 80, pad_id=0)
    batch = collate(rows)
    assert batch.num_pad_tokens > 0 or len(rows) == 1  # exercise the padding path when it exists
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        ).logits
        logp = torch.log_softmax(logits.float(), -1)
        mask = batch.targets != IGNORE_INDEX
        tok_logp = logp.gather(-1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        packed = segment_sum(tok_logp, batch)
        by_id = {p.pair_id: p for p in pairs}
        for s, (pid, side) in enumerate(batch.sequence_keys):
            p = by_id[pid]
            ids = torch.as_tensor(p.chosen_input_ids if side == "chosen" else p.rejected_input_ids, dtype=torch.long)
            plen = p.chosen_prompt_len if side == "chosen" else p.rejected_prompt_len
            lp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), -1)
            ref = lp[plen - 1 : -1].gather(-1, ids[plen:, None]).sum()
            torch.testing.assert_close(packed[s], ref, rtol=1e-5, atol=1e-4)
