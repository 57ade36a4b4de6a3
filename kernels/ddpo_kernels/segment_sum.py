"""Per-sequence sums of per-token values in a fixed order: the reduction behind every sequence log-prob.

Where this sits: the chunked walk (_common.py) writes one log-prob per selected token, with the
tokens of each sequence contiguous and in sequence order (schedule.py); this op reduces them to
one fp32 sum per sequence, and reduces per-pair-slot gradients to per-sequence gradients:

    segment_sums(values, offsets, first, last, ...) : out[k] = sum(values[offsets[k]:offsets[k + 1]])

The order of additions depends only on the segment's own values: a sequence gets the same bits
whichever batch, chunk or position it sits in (what makes reference and policy log-probs equal),
and nothing is accumulated with atomics (index_add_ on CUDA is atomic, hence order-dependent).
Accumulation is in fp64, rounded once to fp32.
- Triton (CUDA, and the "triton" backend on CPU through the interpreter): one program per segment;
  lane j adds the elements j, j + BLOCK, ... counted from the segment's start, then a fixed tree
  sums the lanes.
- `segment_sums_ref` (the "torch" backend on CPU): torch.segment_reduce, a sequential loop per segment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Lanes per program; fixed, since the lane layout sets the order of additions.
BLOCK = 128


@triton.jit
def _segment_sum_kernel(values_ptr, offsets_ptr, out_ptr, first, BLOCK: tl.constexpr):
    """One program per segment: out[k] = fp32(sum in fp64 of values[offsets[k]:offsets[k + 1]])."""
    k = first + tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + k)
    end = tl.load(offsets_ptr + k + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i0 in range(start, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(values_ptr + offs, mask=offs < end, other=0.0).to(tl.float64)
    tl.store(out_ptr + k, tl.sum(acc, axis=0).to(tl.float32))


def segment_sums_ref(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive runs of `values` of the given lengths, sequentially in fp64, as fp32."""
    return torch.segment_reduce(values.double(), "sum", lengths=lengths, unsafe=True).float()


def segment_sums(
    values: torch.Tensor,
    offsets: torch.Tensor,
    segments: tuple[int, int],
    tokens: tuple[int, int],
    out: torch.Tensor,
    *,
    use_triton: bool,
) -> None:
    """out[k] = sum(values[offsets[k]:offsets[k + 1]]) for k in range(*segments), in place.

    values [M] (float), offsets [K + 1] int64 (device), out [K] fp32. `tokens` = (offsets[first],
    offsets[last]) as Python ints (the schedule knows them; reading them here would sync a GPU).
    """
    first, last = segments
    if last <= first:
        return
    if use_triton:
        _segment_sum_kernel[(last - first,)](values, offsets, out, first, BLOCK=BLOCK)
        return
    lengths = offsets[first + 1 : last + 1] - offsets[first:last]
    out[first:last] = segment_sums_ref(values[tokens[0] : tokens[1]], lengths)
