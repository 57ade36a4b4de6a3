"""kernels/: every backend of linear_logprob and fused_preference_loss against the eager reference.

fp32 is compared tightly (rtol 1e-5); half precision uses the flash-attention rule: the backend's
error against an fp64 reference is at most 2x the error of the same-precision eager run. The
Triton kernels run on CPU through the interpreter (conftest sets TRITON_INTERPRET=1), so their
shapes stay small; larger vocabularies run on the torch/eager backends and on CUDA when present.
Small `chunk_rows` / `block_rows` make the walk take every path at small sizes: several GEMM chunks
per window, several blocks, groups of pairs larger than a block (recomputed logits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpo_kernels import (
    BACKEND_ENV_VAR,
    chunk_logprob,
    fused_preference_loss,
    fused_preference_loss_ref,
    linear_logprob,
    linear_logprob_ref,
    resolve_backend,
    segment_sum,
)
from ddpo_kernels._common import DwAccumulator
from engine.config import POLICY_OBJECTIVES as OBJECTIVES
from engine.losses import loss_epilogue

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """A backend forced from the environment would make every comparison eager-vs-eager."""
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


@dataclasses.dataclass
class Batch:
    hidden: torch.Tensor  # [N, D] float64 master copy
    weight: torch.Tensor  # [V, D] float64 master copy
    targets: torch.Tensor
    segment_ids: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    num_segments: int
    chosen_weights: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    prompt_targets: torch.Tensor  # targets on prompt tokens (ignored elsewhere), for the prompt NLL

    def cast(self, dtype, device="cpu", requires_grad=True):
        h = self.hidden.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        w = self.weight.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        return h, w

    def quantised(self, dtype):
        """The same batch with hidden and weight rounded through `dtype`: the fp64 reference of a
        half-precision run starts from the inputs that run sees, so only compute error is compared."""
        return dataclasses.replace(self, hidden=self.hidden.to(dtype).double(), weight=self.weight.to(dtype).double())

    def to(self, device):
        return dataclasses.replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name != "num_segments"},
        )


def make_batch(num_pairs: int, row_len: int, d: int, v: int, seed: int = 0, max_resp: int = 9) -> Batch:
    """A packed batch of 2 * num_pairs sequences in rows of row_len tokens, flattened to [N].

    Sequences are placed in a random order of their segment ids (unsorted runs); each has a prompt
    (ignored targets), a response and an ignored boundary token; rows end in padding (segment -1).
    Sequence 0 has a single response token, sequence 1 an empty response (all targets ignored).
    `prompt_targets` puts targets on the prompt tokens instead (drawn from a generator of their own,
    so the rest of the batch does not depend on them).
    """
    g = torch.Generator().manual_seed(seed)
    s = 2 * num_pairs
    rows_t, rows_s, rows_p, cur_t, cur_s, cur_p = [], [], [], [], [], []
    for sid in torch.randperm(s, generator=g).tolist():
        p = int(torch.randint(1, 5, (1,), generator=g))
        r = {0: 1, 1: 0}.get(sid, int(torch.randint(1, max_resp + 1, (1,), generator=g)))
        if p + r > row_len:
            raise ValueError(f"row_len {row_len} too short for a sequence of {p + r} tokens")
        if len(cur_t) + p + r > row_len:
            pad = row_len - len(cur_t)
            rows_t.append(cur_t + [IGNORE] * pad)
            rows_s.append(cur_s + [-1] * pad)
            rows_p.append(cur_p + [False] * pad)
            cur_t, cur_s, cur_p = [], [], []
        tg = [IGNORE] * (p - 1) + torch.randint(0, v, (r,), generator=g).tolist() + [IGNORE]
        cur_t += tg
        cur_s += [sid] * (p + r)
        cur_p += [True] * (p - 1) + [False] * (r + 1)
    pad = row_len - len(cur_t)
    rows_t.append(cur_t + [IGNORE] * pad)
    rows_s.append(cur_s + [-1] * pad)
    rows_p.append(cur_p + [False] * pad)
    targets = torch.tensor(rows_t).reshape(-1)
    segment_ids = torch.tensor(rows_s).reshape(-1)
    is_prompt = torch.tensor(rows_p).reshape(-1)
    prompt_draw = torch.randint(0, v, targets.shape, generator=torch.Generator().manual_seed(seed + 10_000))
    prompt_targets = torch.where(is_prompt, prompt_draw, IGNORE)
    n = targets.numel()
    order = torch.randperm(s, generator=g)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (1.5 / d**0.5)
    return Batch(
        hidden=hidden,
        weight=weight,
        targets=targets,
        segment_ids=segment_ids,
        chosen=order[:num_pairs].clone(),
        rejected=order[num_pairs:].clone(),
        num_segments=s,
        chosen_weights=torch.rand(num_pairs, generator=g, dtype=torch.float64) * 1.5 + 0.25,
        ref_chosen=-torch.rand(num_pairs, generator=g, dtype=torch.float64) * 40,
        ref_rejected=-torch.rand(num_pairs, generator=g, dtype=torch.float64) * 40,
        prompt_targets=prompt_targets,
    )


def fused_kwargs(b: Batch, objective: str) -> dict:
    """The engine's epilogue for `objective` on this batch's weights and reference log-probs."""
    epilogue = loss_epilogue(
        objective,
        beta=0.25 if objective in ("orpo", "dorpo") else 0.1,
        chosen_weights=b.chosen_weights.float(),
        ref_chosen_logps=b.ref_chosen.float(),
        ref_rejected_logps=b.ref_rejected.float(),
    )
    return dict(epilogue=epilogue)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """rtol comparison with an absolute floor at rtol * max|expected| (entries near 0 of a gradient)."""
    expected = expected.double()
    atol = rtol * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# A small synthetic dataset for the tests that run the engine's data path.
TINY_DATA = ["--data.synthetic_prompts", "24", "--data.max_prompt_length", "48", "--data.max_length", "128"]
TINY_DATA += ["--data.max_tokens_per_row", "512"]

# Shapes: (num_pairs, row_len, D, V); row lengths are odd, so N is never a multiple of a block.
# SMALL: 8-row GEMMs, 16-row windows: several chunks, windows and blocks even at these sizes.
SMALL = dict(chunk_rows=8, block_rows=16)
TRITON_SHAPES = [(4, 23, 64, 1000), (5, 17, 96, 1000), (1, 13, 64, 1000)]
TORCH_SHAPES = TRITON_SHAPES + [(6, 41, 512, 1000), (8, 37, 256, 32003)]


def _backend_shapes():
    for shape in TRITON_SHAPES:
        yield pytest.param("triton", shape, id=f"triton-{'x'.join(map(str, shape))}")
    for shape in TORCH_SHAPES:
        yield pytest.param("torch", shape, id=f"torch-{'x'.join(map(str, shape))}")


# ---------------------------------------------------------------------------------------------
# linear_logprob
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,shape", list(_backend_shapes()))
def test_linear_logprob_fp32_matches_eager(backend, shape):
    b = make_batch(*shape, seed=sum(shape))
    h, w = b.cast(torch.float32)
    h_ref, w_ref = b.cast(torch.float32)
    # A random upstream gradient so every sequence's weight in dH / dW differs.
    g_up = torch.randn(b.num_segments, generator=torch.Generator().manual_seed(1))

    seq, cnt = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend=backend, **SMALL)
    seq_ref, cnt_ref = linear_logprob_ref(h_ref, w_ref, b.targets, b.segment_ids, b.num_segments)
    assert seq.dtype == torch.float32 and seq.shape == (b.num_segments,)
    assert torch.equal(cnt, cnt_ref)
    assert cnt[0] == 1 and cnt[1] == 0  # the single-token and the empty response
    assert seq[1] == 0
    close(seq, seq_ref, what="seq_logps")
    dh, dw = torch.autograd.grad((seq * g_up).sum(), [h, w])
    dh_ref, dw_ref = torch.autograd.grad((seq_ref * g_up).sum(), [h_ref, w_ref])
    close(dh, dh_ref, what="d hidden")
    close(dw, dw_ref, what="d weight")
    # Prompt, boundary and padding rows get exactly zero gradient.
    assert (dh[b.targets == IGNORE] == 0).all()


def test_linear_logprob_ref_matches_float64_math():
    """The reference itself against a direct float64 computation (guards the oracle)."""
    b = make_batch(3, 19, 32, 50, seed=3)
    seq, cnt = linear_logprob_ref(b.hidden, b.weight, b.targets, b.segment_ids, b.num_segments)
    logits = b.hidden @ b.weight.T
    expected = torch.zeros(b.num_segments, dtype=torch.float64)
    for t in range(b.targets.numel()):
        if b.targets[t] != IGNORE:
            row = logits[t]
            expected[b.segment_ids[t]] += row[b.targets[t]] - torch.logsumexp(row, 0)
    close(seq, expected, rtol=1e-12, what="ref vs float64 loop")
    assert cnt.tolist() == [int(((b.segment_ids == s) & (b.targets != IGNORE)).sum()) for s in range(b.num_segments)]


def test_linear_logprob_frozen_weight_and_no_grad():
    b = make_batch(3, 21, 64, 1000, seed=5)
    h, _ = b.cast(torch.float32)
    w = b.weight.float()  # frozen LM head (e.g. LoRA on the trunk only)
    seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend="torch", **SMALL)
    (dh,) = torch.autograd.grad(seq.sum(), [h])
    h_ref, _ = b.cast(torch.float32)
    seq_ref, _ = linear_logprob_ref(h_ref, w, b.targets, b.segment_ids, b.num_segments)
    (dh_ref,) = torch.autograd.grad(seq_ref.sum(), [h_ref])
    close(dh, dh_ref, what="d hidden, frozen weight")
    with torch.no_grad():
        seq_ng, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend="triton")
    assert not seq_ng.requires_grad
    close(seq_ng, seq_ref.detach(), what="no_grad seq_logps")


# ---------------------------------------------------------------------------------------------
# fused_preference_loss
# ---------------------------------------------------------------------------------------------


def _fused_case(b: Batch, objective: str, backend: str, dtype=torch.float32, device="cpu", **sizes):
    h, w = b.cast(dtype, device=device)
    kw = dict(backend=backend, return_output=True, **sizes, **fused_kwargs(b, objective))
    out = fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected, **kw)
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    return out, dh, dw


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend,shape", list(_backend_shapes()))
def test_fused_fp32_matches_eager(objective, backend, shape):
    b = make_batch(*shape, seed=7 + sum(shape))
    out, dh, dw = _fused_case(b, objective, backend, **SMALL)
    ref, dh_ref, dw_ref = _fused_case(b, objective, "eager")
    assert out.loss.dim() == 0
    close(out.loss, ref.loss, what="loss")
    close(dh, dh_ref, what="d hidden")
    close(dw, dw_ref, what="d weight")
    assert out.metrics.keys() == ref.metrics.keys()
    for k in ref.metrics:
        close(out.metrics[k], ref.metrics[k], rtol=1e-4, what=f"metric {k}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", ["ddpo", "dorpo"])
def test_fused_groups_larger_than_a_block_and_shared_sequences(objective, backend):
    """Pairs larger than a block (logits recomputed window by window) and sequences read by several pair
    slots (one group, found by union-find) get the eager loss and gradients, with no fallback path."""
    b = make_batch(4, 23, 64, 1000, seed=11, max_resp=12)
    out, dh, dw = _fused_case(b, objective, backend, chunk_rows=4, block_rows=8)
    ref, dh_ref, dw_ref = _fused_case(b, objective, "eager")
    close(out.loss, ref.loss, what="loss (big pairs)")
    close(dh, dh_ref, what="d hidden (big pairs)")
    close(dw, dw_ref, what="d weight (big pairs)")
    # The same chosen response in two pairs, and a chain: pair 2's rejected is pair 3's chosen ("all" pairing).
    chosen, rejected = b.chosen.clone(), b.rejected.clone()
    chosen[1] = chosen[0]
    chosen[3] = rejected[2]
    shared = dataclasses.replace(b, chosen=chosen, rejected=rejected)
    for sizes in (SMALL, dict(chunk_rows=4, block_rows=8)):
        out, dh, dw = _fused_case(shared, objective, backend, **sizes)
        ref, dh_ref, dw_ref = _fused_case(shared, objective, "eager")
        close(out.loss, ref.loss, what="loss (shared segment)")
        close(dh, dh_ref, what="d hidden (shared segment)")
        close(dw, dw_ref, what="d weight (shared segment)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_are_deterministic_and_sums_do_not_depend_on_the_walk(backend):
    """Same inputs twice: bitwise the same loss and gradients (no atomics). Other block sizes, same
    chunk_rows: bitwise the same per-sequence sums and loss (fixed GEMM shape, fixed-order sums)."""
    b = make_batch(5, 29, 64, 1000, seed=43, max_resp=14)
    runs = [_fused_case(b, "dorpo", backend, chunk_rows=8, block_rows=br) for br in (16, 16, 24, 1024)]
    (o1, dh1, dw1), (o2, dh2, dw2) = runs[:2]
    assert torch.equal(o1.loss, o2.loss) and torch.equal(dh1, dh2) and torch.equal(dw1, dw2)
    for out, _, _ in runs[2:]:
        assert torch.equal(out.loss, o1.loss)
        assert torch.equal(out.extras["log_odds"], o1.extras["log_odds"])
    h, w = b.cast(torch.float32, requires_grad=False)
    seqs = []
    for br in (8, 40, 1024):
        sizes = dict(chunk_rows=8, block_rows=br)
        seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend=backend, **sizes)
        seqs.append(seq)
    assert all(torch.equal(x, seqs[0]) for x in seqs[1:])


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fused_loss_is_preference_loss_of_eager_sums(objective, backend):
    b = make_batch(4, 23, 64, 1000, seed=13)
    h, w = b.cast(torch.float32)
    seq, cnt = linear_logprob_ref(h.detach(), w.detach(), b.targets, b.segment_ids, b.num_segments)
    kw = fused_kwargs(b, objective)
    expected = kw["epilogue"](seq[b.chosen], seq[b.rejected], cnt[b.chosen], cnt[b.rejected])
    loss = fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected, backend=backend, **kw)
    close(loss, expected.loss, what=f"{backend} loss vs preference_loss")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_grad_output_scaling_and_frozen_weight(backend):
    b = make_batch(3, 19, 64, 1000, seed=17)
    kw = fused_kwargs(b, "dpo")
    h, w = b.cast(torch.float32)
    (
        3.5 * fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected, backend=backend, **kw)
    ).backward()
    h_ref, w_ref = b.cast(torch.float32)
    (3.5 * fused_preference_loss_ref(h_ref, w_ref, b.targets, b.segment_ids, b.chosen, b.rejected, **kw)).backward()
    close(h.grad, h_ref.grad, what="scaled d hidden")
    close(w.grad, w_ref.grad, what="scaled d weight")
    # Frozen LM head: only d hidden is produced.
    h2, _ = b.cast(torch.float32)
    w2 = b.weight.float()
    loss = fused_preference_loss(h2, w2, b.targets, b.segment_ids, b.chosen, b.rejected, backend=backend, **kw)
    (dh,) = torch.autograd.grad(loss, [h2])
    close(dh, h_ref.grad / 3.5, what="d hidden, frozen weight")
    with torch.no_grad():
        loss_ng = fused_preference_loss(h2, w2, b.targets, b.segment_ids, b.chosen, b.rejected, backend=backend, **kw)
    assert not loss_ng.requires_grad
    close(loss_ng, loss.detach(), what="no_grad loss")


# ---------------------------------------------------------------------------------------------
# Half precision: within 2x the error of the same-precision eager run against fp64
# ---------------------------------------------------------------------------------------------


def _err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item()


def _assert_half_ok(name, x, x_eager, ref64):
    e, e_eager = _err(x, ref64), _err(x_eager, ref64)
    # The small floor covers eager runs that happen to land (almost) exactly on the fp64 value.
    floor = 1e-6 * max(ref64.abs().max().item(), 1e-12)
    assert e <= 2 * e_eager + floor, f"{name}: error {e:.3g} > 2 x eager's {e_eager:.3g} (+{floor:.2g})"


HALF_CASES = [
    pytest.param("torch", torch.float16, id="torch-fp16"),
    pytest.param("torch", torch.bfloat16, id="torch-bf16"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
    pytest.param("triton", torch.bfloat16, id="triton-bf16"),
]


@pytest.mark.parametrize("objective", ["ddpo", "dorpo"])
@pytest.mark.parametrize("backend,dtype", HALF_CASES)
def test_fused_half_precision(backend, dtype, objective):
    b = make_batch(4, 23, 64, 1000, seed=19).quantised(dtype)
    ref64, dh64, dw64 = _fused_case(b, objective, "eager", dtype=torch.float64)
    out_e, dh_e, dw_e = _fused_case(b, objective, "eager", dtype=dtype)
    out, dh, dw = _fused_case(b, objective, backend, dtype=dtype, **SMALL)
    assert dh.dtype == dtype and dw.dtype == dtype
    _assert_half_ok("loss", out.loss, out_e.loss, ref64.loss.double())
    _assert_half_ok("d hidden", dh, dh_e, dh64)
    _assert_half_ok("d weight", dw, dw_e, dw64)


@pytest.mark.parametrize("backend,dtype", HALF_CASES)
def test_linear_logprob_half_precision(backend, dtype):
    b = make_batch(5, 17, 96, 1000, seed=23).quantised(dtype)
    g_up = torch.randn(b.num_segments, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = {}
    for name, be, dt in (("ref64", "eager", torch.float64), ("eager", "eager", dtype), ("test", backend, dtype)):
        h, w = b.cast(dt)
        sizes = SMALL if be != "eager" else {}
        seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend=be, **sizes)
        res[name] = (seq, *torch.autograd.grad((seq * g_up.to(seq.dtype)).sum(), [h, w]))
    for i, what in enumerate(("seq_logps", "d hidden", "d weight")):
        _assert_half_ok(what, res["test"][i], res["eager"][i], res["ref64"][i].double())


# ---------------------------------------------------------------------------------------------
# Building blocks: row kernels, fixed-order segment sums, fp32 dW accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_chunk_logprob_triton_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(13, 1000, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 1000, (13,), generator=g)
    lse, logp = chunk_logprob.chunk_logprob_forward(logits, targets, backend="triton")
    lse_r, logp_r = chunk_logprob.chunk_logprob_forward_ref(logits, targets)
    close(lse, lse_r, rtol=1e-6, what="lse")
    close(logp, logp_r, rtol=1e-5, what="token log-probs")
    grad = torch.randn(13, generator=g)
    out, out_r = logits.clone(), logits.clone()
    chunk_logprob.chunk_logprob_backward_(out, targets, lse, grad, backend="triton")
    chunk_logprob.chunk_logprob_backward_ref_(out_r, targets, lse, grad)
    tol = {torch.float32: 1e-6}.get(dtype, 1e-2)
    close(out.float(), out_r.float(), rtol=tol, what="d logits")
    bad = targets.clone()
    bad[3] = 1000  # outside the vocabulary: the row is poisoned, nothing is read out of bounds
    _, logp_bad = chunk_logprob.chunk_logprob_forward(logits, bad, backend="triton")
    assert torch.isnan(logp_bad[3]) and torch.isfinite(logp_bad[torch.arange(13) != 3]).all()


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_segment_sums_fixed_order_and_position_invariant(use_triton):
    """Sums equal fp64 sums rounded once; a segment's bits do not depend on where it sits or what surrounds it."""
    g = torch.Generator().manual_seed(6)
    lengths = [0, 1, 5, 300, 129, 0, 64]
    values = torch.randn(sum(lengths), generator=g) * 10
    offsets = torch.tensor([0] + lengths).cumsum(0)
    out = torch.full((len(lengths),), 7.0)
    segment_sum.segment_sums(values, offsets, (1, len(lengths)), (0, values.numel()), out, use_triton=use_triton)
    expect = [float(values[a:b].double().sum()) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    assert out[0] == 7.0, "segments outside the range must stay untouched"
    close(out[1:], torch.tensor(expect[1:]), rtol=1e-7, what="segment sums")
    # The 300-token segment moved behind 77 other values, alone in its batch: the same bits.
    seg = values[6:306]
    moved = torch.cat([torch.randn(77, generator=g), seg])
    out2 = torch.zeros(2)
    segment_sum.segment_sums(moved, torch.tensor([0, 77, 377]), (0, 2), (0, 377), out2, use_triton=use_triton)
    assert out2[1] == out[3]


def test_dw_accumulator_rounds_once():
    """64 windows of bf16 products accumulate in fp32: within one bf16 rounding of the fp64 sum, where a
    bf16 accumulator (one rounding per window) drifts further."""
    g = torch.Generator().manual_seed(7)
    weight = torch.zeros(48, 32, dtype=torch.bfloat16)
    acc = DwAccumulator(weight)
    bf16_acc = torch.zeros(48, 32, dtype=torch.bfloat16)
    exact = torch.zeros(48, 32, dtype=torch.float64)
    for _ in range(64):
        dl = (torch.randn(16, 48, generator=g) * 1e-2 + 1e-2).to(torch.bfloat16)
        h = torch.randn(16, 32, generator=g).abs().to(torch.bfloat16)
        acc.add_(dl, h)
        bf16_acc += dl.t() @ h
        exact += dl.double().t() @ h.double()
    got = acc.result()
    assert got.dtype == torch.bfloat16
    half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 8)  # bf16 keeps 8 significant bits
    # One rounding: within half an ulp of the exact sum (plus the fp32 accumulation's own error).
    assert ((got.double() - exact).abs() <= half_ulp * (1 + 1e-3)).all()
    assert ((bf16_acc.double() - exact).abs() > half_ulp * 2).any(), "the test cannot tell the two apart"


# ---------------------------------------------------------------------------------------------
# Reference and policy: the same arithmetic, so the DPO margin is exactly 0 at step 0
# ---------------------------------------------------------------------------------------------


def _relayout(b: Batch, seed: int) -> tuple[Batch, torch.Tensor]:
    """The same sequences in another batch: reversed order, junk rows between them, an extra sequence
    first. Returns the new batch and new_id [S] (new segment id of each old one)."""
    g = torch.Generator().manual_seed(seed)
    d = b.hidden.shape[1]
    pieces_h, pieces_t, pieces_s = [torch.randn(7, d, generator=g, dtype=torch.float64)], [], []
    pieces_t.append(torch.randint(0, b.weight.shape[0], (7,), generator=g))
    pieces_s.append(torch.zeros(7, dtype=torch.long))  # an unrelated sequence 0 with targets
    pieces_p = [torch.full((7,), IGNORE)]
    new_id = torch.empty(b.num_segments, dtype=torch.long)
    for k, old in enumerate(reversed(range(b.num_segments))):
        rows = (b.segment_ids == old).nonzero().squeeze(1)
        junk = int(torch.randint(0, 5, (1,), generator=g))
        pieces_h += [torch.randn(junk, d, generator=g, dtype=torch.float64), b.hidden[rows]]
        pieces_t += [torch.full((junk,), IGNORE), b.targets[rows]]
        pieces_s += [torch.full((junk,), -1), torch.full((rows.numel(),), k + 1)]
        pieces_p += [torch.full((junk,), IGNORE), b.prompt_targets[rows]]
        new_id[old] = k + 1
    moved = dataclasses.replace(
        b,
        hidden=torch.cat(pieces_h),
        targets=torch.cat(pieces_t),
        segment_ids=torch.cat(pieces_s),
        prompt_targets=torch.cat(pieces_p),
        chosen=new_id[b.chosen],
        rejected=new_id[b.rejected],
        num_segments=b.num_segments + 1,
    )
    return moved, new_id


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_and_policy_log_probs_are_the_same_bits(backend, dtype, device):
    """A sequence's log-prob does not depend on the batch it sits in (order, neighbours, padding, chunk
    and window boundaries), and linear_logprob (the reference cache's op) gives the fused loss's bits:
    a DPO step with reference = policy has chosen and rejected rewards exactly 0."""
    b = make_batch(6, 31, 64, 1000, seed=53, max_resp=14)
    moved, new_id = _relayout(b, seed=54)
    b, moved = b.to(device), moved.to(device)
    sizes = dict(chunk_rows=8, block_rows=24)
    h, w = b.cast(dtype, device=device, requires_grad=False)
    seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend=backend, **sizes)
    hm, wm = moved.cast(dtype, device=device, requires_grad=False)
    moved_args = (moved.targets, moved.segment_ids, moved.num_segments)
    seq_moved, _ = linear_logprob(hm, wm, *moved_args, backend=backend, **sizes)
    assert torch.equal(seq_moved[new_id.to(device)], seq)
    # The policy: the fused loss in the first layout, the reference from the second.
    hp, wp = b.cast(dtype, device=device)
    epilogue = loss_epilogue(
        "dpo",
        beta=0.1,
        ref_chosen_logps=seq_moved[new_id[b.chosen.cpu()].to(device)],
        ref_rejected_logps=seq_moved[new_id[b.rejected.cpu()].to(device)],
    )
    kw = dict(backend=backend, return_output=True, **sizes)
    out = fused_preference_loss(hp, wp, b.targets, b.segment_ids, b.chosen, b.rejected, epilogue, **kw)
    assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards))
    assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step0_margins_are_zero_through_the_reference_cache(tmp_path, dtype, device):
    """The real path: the reference cache built by engine.refcache (micro-batches of its own), then the
    trainer's first micro-batch through PolicyWithLoss: every chosen and rejected margin is exactly 0."""
    from engine.config import load_config
    from engine.data import RowSampler, collate, prepare_data
    from engine.model import load_model, load_tokenizer
    from engine.refcache import ensure_cache
    from engine.train import PolicyWithLoss

    cfg = load_config(
        TINY_DATA
        + ["--deviation.enabled", "false", "--loss.objective", "dpo", "--model.dtype", dtype]
        + ["--ref_cache.dtype", dtype, "--logging.output_dir", str(tmp_path)]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--ref_cache.dir", str(tmp_path / "ref")]
    )
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    prepared = prepare_data(cfg, tokenizer)
    cache = ensure_cache(cfg, tokenizer, prepared, device=device)
    rows = prepared.train_rows
    sampler = RowSampler(
        [r.num_tokens for r in rows], num_replicas=1, rank=0, rows_per_batch=cfg.data.rows_per_batch, seed=cfg.data.seed
    )
    module = PolicyWithLoss(load_model(cfg.model, device=device), cfg.loss)
    batch = collate([rows[i] for i in next(iter(sampler))], device=device, **module.batch_options)
    cache.fill(batch)
    with torch.no_grad():
        out = module(batch)
    assert out.chosen_rewards.numel() == batch.num_pairs > 1
    assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards)), out.chosen_rewards
    assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards)), out.rejected_rewards


# ---------------------------------------------------------------------------------------------
# NLL on prompt tokens (the authors' ORPO/DORPO): a second target stream through every backend
# ---------------------------------------------------------------------------------------------


def _authors_orpo_loss(b: Batch, objective: str, beta: float) -> torch.Tensor:
    """The authors' DORPO / TRL's ORPO loss written from their code (models/dorpo_trainer.py,
    concatenated_forward and odds_ratio_loss), not from engine.losses: in fp64, per pair the chosen and
    rejected sequences with full logits; NLL = token mean of the chosen sequences' prompt + response
    log-probs (labels masked only by the attention mask), log-odds from response-token means
    (get_batch_logps with average_log_prob=True), (score_chosen + 1) = the deviation weight w."""
    logp = torch.log_softmax(b.hidden @ b.weight.T, dim=-1)
    all_targets = torch.where(b.targets != IGNORE, b.targets, b.prompt_targets)

    def token_logps(seg: int, targets: torch.Tensor) -> torch.Tensor:
        rows = ((b.segment_ids == seg) & (targets != IGNORE)).nonzero().squeeze(1)
        return logp[rows, targets[rows]]

    nll_terms, odds = [], []
    for c, r in zip(b.chosen.tolist(), b.rejected.tolist()):
        nll_terms.append(token_logps(c, all_targets))
        pc, pr = (token_logps(s, b.targets) for s in (c, r))
        pc, pr = (x.sum() / max(x.numel(), 1) for x in (pc, pr))
        odds.append((pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr))))
    nll = -torch.cat(nll_terms).mean()
    if objective == "sft":
        return nll
    w = b.chosen_weights if objective == "dorpo" else torch.ones_like(b.chosen_weights)
    ratio = torch.nn.functional.logsigmoid(w * torch.stack(odds))
    return (w * nll).mean() - (beta * ratio).mean()


@pytest.mark.parametrize("objective", ["orpo", "dorpo", "sft"])
@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_prompt_nll_matches_eager_and_the_authors_formula(backend, objective):
    """With prompt_targets the chosen prompts' tokens join the NLL (not the odds ratio): loss and both
    gradients equal eager's on every backend, and the value equals the authors' formula."""
    b = make_batch(4, 23, 64, 1000, seed=67, max_resp=9)
    kw = dict(prompt_targets=b.prompt_targets, **fused_kwargs(b, objective))
    sizes = SMALL if backend != "eager" else {}
    h, w = b.cast(torch.float32)
    out = fused_preference_loss(
        h, w, b.targets, b.segment_ids, b.chosen, b.rejected, backend=backend, return_output=True, **sizes, **kw
    )
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    h_ref, w_ref = b.cast(torch.float32)
    ref = fused_preference_loss_ref(h_ref, w_ref, b.targets, b.segment_ids, b.chosen, b.rejected, **kw)
    dh_ref, dw_ref = torch.autograd.grad(ref, [h_ref, w_ref])
    close(out.loss, ref, what="loss vs eager")
    close(dh, dh_ref, what="d hidden")
    close(dw, dw_ref, what="d weight")
    close(out.loss, _authors_orpo_loss(b, objective, beta=0.25), what="loss vs the authors' formula")
    # The prompt tokens did enter: without them the NLL, hence the loss, differs.
    h0, w0 = h.detach(), w.detach()
    plain = dict(backend=backend, **sizes, **fused_kwargs(b, objective))
    without = fused_preference_loss(h0, w0, b.targets, b.segment_ids, b.chosen, b.rejected, **plain)
    assert (without - out.loss).abs() > 1e-3
    # Prompt tokens of the rejected sequences are not read: changing their targets changes nothing.
    moved = b.prompt_targets.clone()
    rejected_rows = torch.isin(b.segment_ids, b.rejected) & (moved != IGNORE)
    moved[rejected_rows] = (moved[rejected_rows] + 1) % 1000
    again = fused_preference_loss(h0, w0, b.targets, b.segment_ids, b.chosen, b.rejected, prompt_targets=moved, **plain)
    assert torch.equal(again, out.loss.detach())


def test_prompt_nll_is_refused_where_there_is_no_nll():
    b = make_batch(2, 17, 64, 1000, seed=71)
    h, w = b.cast(torch.float32)
    args = (h, w, b.targets, b.segment_ids, b.chosen, b.rejected)
    with pytest.raises(ValueError, match="no NLL term"):
        fused_preference_loss(*args, prompt_targets=b.prompt_targets, backend="torch", **fused_kwargs(b, "ddpo"))
    with pytest.raises(ValueError, match="exactly one of targets / prompt_targets"):
        fused_preference_loss(*args, prompt_targets=b.targets, backend="torch", **fused_kwargs(b, "dorpo"))


def test_prompt_nll_through_the_engine(tmp_path):
    """loss.nll_on_prompt with dorpo: packing puts targets on prompt tokens, collate's schedule makes the chosen
    prompts segments of their own, PolicyWithLoss's fused loss and gradients equal the eager path's."""
    from engine.config import load_config
    from engine.data import collate, prepare_data
    from engine.model import load_model, load_tokenizer
    from engine.train import PolicyWithLoss

    cfg = load_config(
        TINY_DATA
        + ["--deviation.semantic_model", "", "--loss.objective", "dorpo", "--loss.nll_on_prompt", "true"]
        + ["--logging.output_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--deviation.cache_dir", str(tmp_path / "emb")]
    )
    prepared = prepare_data(cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.name))
    batch = collate(prepared.train_rows[:2], vocab_size=load_model(cfg.model).config.vocab_size)
    assert batch.schedule.chosen_prompt is not None and batch.response_targets is not None
    results = {}
    for backend in ("torch", "eager"):
        model = load_model(cfg.model)
        out = PolicyWithLoss(model, dataclasses.replace(cfg.loss, backend=backend))(batch)
        out.loss.backward()
        results[backend] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (fused, grads), (eager, grads_e) = results["torch"], results["eager"]
    close(fused.loss, eager.loss, what="loss")
    close(fused.metrics["nll_loss"], eager.metrics["nll_loss"], what="nll")
    assert grads.keys() == grads_e.keys() and len(grads) > 10
    for name in grads:
        close(grads[name], grads_e[name], rtol=1e-4, what=name)


# ---------------------------------------------------------------------------------------------
# No host synchronisation inside the loss: the schedule is built on the CPU beforehand
# ---------------------------------------------------------------------------------------------

_ATEN = torch.ops.aten
# What makes a GPU stream wait for the host: reading a value back, or an output whose size depends
# on values (nonzero, boolean-mask indexing, unique, bincount...).
_SYNCING_OPS = {
    _ATEN._local_scalar_dense,
    _ATEN.nonzero,
    _ATEN.nonzero_static,
    _ATEN.masked_select,
    _ATEN.is_nonzero,
    _ATEN.equal,
    _ATEN._unique2,
    _ATEN.unique_dim,
    _ATEN.unique_consecutive,
    _ATEN.bincount,
    _ATEN.argwhere,
}


class _HostSyncSpy(TorchDispatchMode):
    """Records every op that would synchronise a GPU with the host, and Python-level reads of tensor values."""

    PY_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _SYNCING_OPS:
            self.syncs.append(str(func))
        if func.overloadpacket in (_ATEN.index, _ATEN.index_put, _ATEN.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.syncs.append(f"{func} with a boolean mask")
        if func.overloadpacket is _ATEN.repeat_interleave and kwargs.get("output_size") is None and len(args) < 3:
            self.syncs.append(f"{func} without output_size")
        return func(*args, **kwargs)

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.PY_READS}
        for name in self.PY_READS:
            setattr(torch.Tensor, name, self._spy(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def _spy(self, name):
        real = self._saved[name]

        def spy(t, *a, **k):
            self.syncs.append(f"Tensor.{name}")
            return real(t, *a, **k)

        return spy


@pytest.mark.parametrize("objective", ["ddpo", "dorpo", "sft"])
def test_loss_with_a_schedule_never_reads_device_values(objective):
    """With the batch's schedule built beforehand (as collate does), forward and backward of the fused
    loss and of linear_logprob make no .item()/.tolist()/nonzero/bool(tensor)-style call: on a GPU
    the whole step is queued without waiting for the device. (The CUDA test runs it under
    torch.cuda.set_sync_debug_mode("error").)"""
    from ddpo_kernels import LossSchedule

    b = make_batch(5, 29, 64, 1000, seed=59, max_resp=14)
    chosen = b.chosen.clone()
    chosen[1] = chosen[0]  # a shared sequence: groups and slot sums too
    b = dataclasses.replace(b, chosen=chosen)
    kw = fused_kwargs(b, objective)
    sched = LossSchedule.for_pairs(
        b.targets, b.segment_ids, b.chosen, b.rejected, vocab_size=1000, with_rejected=objective != "sft"
    )
    seq_sched = LossSchedule.for_sequences(b.targets, b.segment_ids, b.num_segments, vocab_size=1000)
    h, w = b.cast(torch.float32)
    with _HostSyncSpy() as spy:
        opts = dict(backend="torch", schedule=sched, chunk_rows=8, block_rows=16, return_output=True, **kw)
        out = fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected, **opts)
        out.loss.backward()
        seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend="torch", schedule=seq_sched)
        seq.sum().backward()
    assert spy.syncs == [], spy.syncs
    # The spy sees them: the schedule's own construction reads values (it runs on the CPU, in collate).
    with _HostSyncSpy() as spy:
        LossSchedule.for_pairs(b.targets, b.segment_ids, b.chosen, b.rejected)
    assert spy.syncs


# ---------------------------------------------------------------------------------------------
# Backend selection and errors
# ---------------------------------------------------------------------------------------------


def test_kernels_do_not_import_the_engine():
    """The dependency runs one way: engine -> ddpo_kernels (the formulas come in as the epilogue)."""
    repo = Path(__file__).resolve().parent.parent
    code = "import sys, ddpo_kernels; print(sorted(m for m in sys.modules if m.split('.')[0] == 'engine'))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo / "kernels")]))
    res = subprocess.run([sys.executable, "-c", code], cwd=repo / "kernels", env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("eager", "cpu") == "eager"
    if HAS_CUDA:
        assert resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setenv(BACKEND_ENV_VAR, "eager")
    assert resolve_backend("torch", "cpu") == "eager"
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend("auto", "cpu")
    monkeypatch.delenv(BACKEND_ENV_VAR)
    with pytest.raises(ValueError, match="valid values"):
        resolve_backend("fast", "cpu")


def test_env_var_forces_backend_in_ops(monkeypatch):
    """ENGINE_KERNEL_BACKEND=eager makes the op take the reference path (full logits under autograd)."""
    b = make_batch(2, 17, 64, 1000, seed=29)
    h, w = b.cast(torch.float32)
    monkeypatch.setenv(BACKEND_ENV_VAR, "eager")
    seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend="triton")
    assert "LinearLogprob" not in type(seq.grad_fn).__name__
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    seq, _ = linear_logprob(h, w, b.targets, b.segment_ids, b.num_segments, backend="eager")
    assert "LinearLogprob" in type(seq.grad_fn).__name__


@pytest.mark.parametrize("backend", ["torch", "triton", "eager"])
def test_errors_name_the_problem(backend):
    b = make_batch(2, 17, 64, 1000, seed=31)
    h, w = b.cast(torch.float32)
    bad_t = b.targets.clone()
    bad_t[b.targets != IGNORE] = 1000
    if backend != "eager":  # eager raises torch's own gather index error
        with pytest.raises(ValueError, match="targets outside"):
            linear_logprob(h, w, bad_t, b.segment_ids, b.num_segments, backend=backend)
        with pytest.raises(ValueError, match="num_segments"):
            linear_logprob(h, w, b.targets, b.segment_ids, 2, backend=backend)
    with pytest.raises(ValueError, match="weight must be"):
        linear_logprob(h, w[:, :10], b.targets, b.segment_ids, b.num_segments, backend=backend)
    sft, dpo = loss_epilogue("sft", beta=0.1), loss_epilogue("dpo", beta=0.1)
    with pytest.raises(ValueError, match="must both be"):
        fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected[:1], sft, backend=backend)
    with pytest.raises(ValueError, match="ref_"):
        fused_preference_loss(h, w, b.targets, b.segment_ids, b.chosen, b.rejected, dpo, backend=backend)


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled Triton kernels at a real vocabulary
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("objective", ["ddpo", "dorpo", "sft"])
def test_fused_triton_cuda_fp32(objective):
    b = make_batch(8, 129, 256, 32003, seed=37, max_resp=100).to("cuda")
    out, dh, dw = _fused_case(b, objective, "triton", device="cuda")
    ref, dh_ref, dw_ref = _fused_case(b, objective, "eager", device="cuda")
    close(out.loss, ref.loss, what="loss")
    close(dh, dh_ref, rtol=2e-5, what="d hidden")
    close(dw, dw_ref, rtol=2e-5, what="d weight")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_triton_cuda_half(dtype):
    b = make_batch(8, 129, 256, 32003, seed=41, max_resp=100).quantised(dtype).to("cuda")
    ref64, dh64, dw64 = _fused_case(b, "dorpo", "eager", dtype=torch.float64, device="cuda")
    out_e, dh_e, dw_e = _fused_case(b, "dorpo", "eager", dtype=dtype, device="cuda")
    out, dh, dw = _fused_case(b, "dorpo", "triton", dtype=dtype, device="cuda")
    _assert_half_ok("loss", out.loss, out_e.loss, ref64.loss.double())
    _assert_half_ok("d hidden", dh, dh_e, dh64)
    _assert_half_ok("d weight", dw, dw_e, dw64)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_gradients_bitwise_deterministic(backend, dtype):
    """No float atomics on the GPU: the same inputs give the same bits twice, including groups larger
    than a block (recomputed logits) and a sequence shared by two pairs."""
    b = make_batch(8, 129, 256, 32003, seed=47, max_resp=100)
    chosen = b.chosen.clone()
    chosen[1] = chosen[0]
    b = dataclasses.replace(b, chosen=chosen).to("cuda")
    sizes = dict(chunk_rows=64, block_rows=128)
    runs = [_fused_case(b, "ddpo", backend, dtype=dtype, device="cuda", **sizes) for _ in range(2)]
    (o1, dh1, dw1), (o2, dh2, dw2) = runs
    assert torch.equal(o1.loss, o2.loss) and torch.equal(dh1, dh2) and torch.equal(dw1, dw2)
    if dtype == torch.float32:
        ref, dh_ref, dw_ref = _fused_case(b, "ddpo", "eager", device="cuda")
        close(o1.loss, ref.loss, what="loss")
        close(dh1, dh_ref, rtol=2e-5, what="d hidden")
        close(dw1, dw_ref, rtol=2e-5, what="d weight")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("objective", ["ddpo", "dorpo"])
def test_cuda_step_runs_under_sync_debug_mode_error(backend, objective):
    """A whole training step of a small model (a linear trunk, the fused loss with the batch's schedule,
    backward, an optimizer step) with torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    from ddpo_kernels import LossSchedule

    b = make_batch(8, 129, 256, 32003, seed=61, max_resp=100)
    sched = LossSchedule.for_pairs(b.targets, b.segment_ids, b.chosen, b.rejected, vocab_size=32003).to("cuda")
    b = b.to("cuda")
    trunk = torch.nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16)
    head = torch.nn.Parameter(b.weight.to(torch.bfloat16))
    opt = torch.optim.SGD([*trunk.parameters(), head], lr=1e-3, foreach=True)
    x = b.hidden.to(torch.bfloat16)
    kw = dict(backend=backend, schedule=sched, chunk_rows=64, block_rows=128, **fused_kwargs(b, objective))

    def step():
        loss = fused_preference_loss(trunk(x), head, b.targets, b.segment_ids, b.chosen, b.rejected, **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compiles the Triton kernels, creates cuBLAS handles: first-call work, not part of a step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Without a GPU: every Triton launch compiles for H100/H200 (sm_90) and A100 (sm_80) and fits them
# ---------------------------------------------------------------------------------------------

# Runs in a subprocess: the kernels must be imported without TRITON_INTERPRET. The package's own
# launchers are called on meta tensors at the Llama-3-8B head (V 128256, windows of 4096 rows) and at
# odd sizes; tests/triton_compile_check.py compiles what the JIT would launch and checks it. The
# GEMMs are cuBLAS's; the Triton kernels are the row kernels and the segment sums.
_COMPILE_SCRIPT = r"""
import json
import torch
from tests.triton_compile_check import check_launches
from ddpo_kernels import chunk_logprob, segment_sum
meta = dict(device="meta")
def launch():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for rows, v in ((4096, 128256), (1000, 32003)):
            logits, targets = torch.empty(rows, v, dtype=dt, **meta), torch.empty(rows, dtype=torch.long, **meta)
            grad = torch.empty(rows, **meta)
            # The walk passes views: a window starts at any row of its buffer and of the token vectors,
            # so pointers may lose the divisibility-by-16 hint (another specialisation).
            for lo in (0, 3):
                lse, _ = chunk_logprob.chunk_logprob_forward(logits[lo:], targets[lo:], backend="triton")
                chunk_logprob.chunk_logprob_backward_(logits[lo:], targets[lo:], lse, grad[lo:], backend="triton")
    values, offsets = torch.empty(4096, **meta), torch.empty(65, dtype=torch.long, **meta)
    for first in (0, 1, 5):  # the JIT specialises ints: 1 is a constant, multiples of 16 get a hint
        segment_sum.segment_sums(values, offsets, (first, 64), (0, 4096), values, use_triton=True)
kernels = [chunk_logprob._logprob_rows_fwd_kernel, chunk_logprob._logprob_rows_bwd_kernel,
           segment_sum._segment_sum_kernel]
records, problems = check_launches(launch, kernels)
print(json.dumps({"compiled": [c.describe() + f": {c.shared} B shared, {c.registers} registers, "
                               f"{c.spill_bytes} B spilled" for c in records], "problems": problems}))
"""


def test_triton_kernels_compile_for_sm90_and_sm80():
    """Shared memory within the per-block limit, no half-precision spills, tensor cores wherever tl.dot runs
    in half precision: what only the GPU compiler and the launch would reject, checked on a CPU-only box."""
    from tests.triton_compile_check import triton_ptxas_missing

    reason = triton_ptxas_missing()
    if reason:
        pytest.skip(reason)
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(repo), str(repo / "kernels")]), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    # 2 archs x (3 dtypes x 2 shapes x 2 offsets x 2 row kernels + 3 segment-sum specialisations)
    assert len(report["compiled"]) == 2 * (3 * 2 * 2 * 2 + 3), report["compiled"]
    assert not report["problems"], "\n".join(report["problems"])
