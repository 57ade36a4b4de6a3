"""Attention over packed rows: the routes to per-sequence causal attention on one device, forward + backward.

Run:  python -m bench.bench_attention [--quick] [--reps 10]
Appends one row per (configuration, route) to bench/results/attention.csv; BENCHMARKS.md compares each
route with transformers' stock route for packed rows, the row-sized block-diagonal mask.

Where this sits: it measures engine/attention.py's choice (model.attn_implementation "sdpa_varlen", the
default on CPU) against the alternatives the issue names, on the attention op alone, with gpt2-small's
heads (12 x 64) and sequence lengths like the cpu-gpt2-stories training benchmark:
- "sdpa masked": one SDPA call over the whole row with the [L, L] block-diagonal causal mask that
  transformers builds from packed position ids (its "sdpa" implementation); cost grows with the row.
- "sdpa_varlen": engine.attention.sdpa_varlen_attention_forward, one causal SDPA call per sequence
  (split views of q, k, v; outputs concatenated); cost grows with each sequence.
- "padded rows": the same sequences unpacked, one per row, padded to the longest (what a padded
  trainer's attention costs: causal SDPA over [S, H, L_max, D]).
- "flex_attention": FlexAttention with a block mask, and "nested jagged": SDPA on a jagged nested
  tensor. Both are attempted and recorded as "not measured" with the reason when the installed torch
  cannot run them forward + backward on this device (torch 2.13 on CPU: FlexAttention has no CPU
  backward, jagged SDPA has no causal kernel).
Time: median of >= 10 timed forward + backward passes after a warm-up (bench.common.time_fn).
Peak memory: the peak resident set above the block's start (engine.memory.RssWindow) for one forward +
backward after a warm-up one, measured before the timed passes of the same route, with the engine's
CPU allocator policy (freed blocks of 1 MiB or more return to the system, so a route's window sees
its own allocations rather than heap left by the previous route).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

RESULTS_CSV = common.RESULTS_DIR / "attention.csv"
FIELDS = (
    "bench impl heads head_dim sequences row_tokens dtype device time_ms_median time_ms_p10 time_ms_p90 "
    "reps tokens_per_s peak_mem_mb hardware torch commit run_id timestamp notes"
).split()
# Sequence lengths of one packed row: 8 sequences of WritingPrompts-length stories (prompt + response, as in
# the cpu-gpt2-stories benchmark) and 8 of the short default data.
CONFIGS = {
    "stories": [300, 520, 180, 700, 410, 260, 640, 350],
    "short": [96, 120, 80, 110, 70, 130, 90, 104],
}
IMPLS = ("sdpa masked", "sdpa_varlen", "padded rows", "flex_attention", "nested jagged")


def _inputs(lengths: list[int], heads: int, head_dim: int, device: str, dtype):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    L = sum(lengths)
    q, k, v = (torch.randn(1, heads, L, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    return q, k, v, positions


def route(impl: str, lengths: list[int], q, k, v, positions):
    """A closure running one forward + backward of `impl` over the packed row (q, k, v: [1, H, L, D])."""
    import torch
    import torch.nn.functional as F

    from engine.attention import sdpa_varlen_attention_forward

    L = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))
    if impl == "sdpa masked":
        mask = (seg[:, None] == seg[None, :]) & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()

        def fn():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None]).sum().backward()
    elif impl == "sdpa_varlen":
        module = torch.nn.Module()
        module.is_causal = True

        def fn():
            out, _ = sdpa_varlen_attention_forward(module, q, k, v, None, position_ids=positions)
            out.sum().backward()
    elif impl == "padded rows":
        lmax = max(lengths)

        def rows(t):
            # Each sequence at the start of its own row; causal attention keeps the right padding out of
            # every real token's view.
            return torch.cat([F.pad(part, (0, 0, 0, lmax - part.shape[2])) for part in t.split(lengths, dim=2)])

        real = torch.arange(lmax, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        real = real[:, None, :, None]  # [S, 1, L_max, 1]: padding rows do not enter the loss

        def fn():
            (F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True) * real).sum().backward()
    elif impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(
            lambda b, h, qi, ki: (seg[qi] == seg[ki]) & (qi >= ki), None, None, L, L, device=str(q.device)
        )

        def fn():
            flex_attention(q, k, v, block_mask=block).sum().backward()
    elif impl == "nested jagged":

        def fn():
            parts = [
                torch.nested.nested_tensor(
                    [p[0].transpose(0, 1) for p in t.split(lengths, dim=2)], layout=torch.jagged
                ).transpose(1, 2)
                for t in (q, k, v)
            ]
            F.scaled_dot_product_attention(*parts, is_causal=True).values().sum().backward()
    else:
        raise ValueError(f"unknown attention route {impl!r}; choose from {', '.join(IMPLS)}")
    return fn


def measure(config: str, impl: str, reps: int, device: str = "cpu", heads: int = 12, head_dim: int = 64) -> dict:
    """One row: time (median of `reps` forward + backward passes) and peak memory of `impl`."""
    import torch

    from engine.memory import RssWindow

    lengths = CONFIGS[config]
    q, k, v, positions = _inputs(lengths, heads, head_dim, device, torch.float32)
    row = {
        "bench": config,
        "impl": impl,
        "heads": heads,
        "head_dim": head_dim,
        "sequences": len(lengths),
        "row_tokens": sum(lengths),
        "dtype": "float32",
        "device": device,
    }
    try:
        fn = route(impl, lengths, q, k, v, positions)
        fn()  # warm-up: lazy imports and first-call allocations stay out of the memory window
        with RssWindow() as mem:
            fn()
    except (RuntimeError, NotImplementedError) as e:  # the route does not run here: a recorded outcome
        return {**row, "reps": 0, "notes": f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    timing = common.time_fn(fn, reps=reps, warmup=0)
    return {
        **row,
        **timing.row("time_ms"),
        "tokens_per_s": round(sum(lengths) / (timing.median / 1e3), 1),
        "peak_mem_mb": round(mem.peak_mb, 1),
        "notes": f"peak: {mem.method}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short configuration only")
    p.add_argument("--reps", type=int, default=common.MIN_REPS, help="timed forward + backward passes (>= 10)")
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results file (rows are appended)")
    args = p.parse_args(argv)
    from engine.memory import limit_allocator_retention

    # Freed blocks of 1 MiB or more go back to the system, so a route's window sees its own allocations
    # instead of reusing what an earlier route left in the heap (as engine.train runs on CPU).
    limit_allocator_retention()
    if args.reps < common.MIN_REPS:
        p.error(f"--reps {args.reps}: at least {common.MIN_REPS} timed repetitions are needed for stable quantiles")
    env = common.environment("cpu", packages=("torch",))
    for config in ("short",) if args.quick else ("short", "stories"):
        for impl in IMPLS:
            r = measure(config, impl, args.reps)
            r.update({k: env[k] for k in ("hardware", "torch", "commit", "run_id")}, timestamp=common.timestamp())
            common.append_csv(args.csv, [r], FIELDS)
            shown = f"{r['time_ms_median']:.1f} ms, peak +{r['peak_mem_mb']:.0f} MB" if r.get("reps") else r["notes"]
            print(f"[bench_attention] {config} {impl}: {shown}", flush=True)
    print(f"[bench_attention] rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
