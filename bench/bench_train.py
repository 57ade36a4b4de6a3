"""End-to-end training throughput: this engine against TRL's DPOTrainer, same model, data and hardware.

Run:  python -m bench.bench_train [--quick] [--setup cpu-tiny] [--systems ddpo-engine,trl] [--reps 10]
Appends one row per (system, variant) to bench/results/train.csv; BENCHMARKS.md (bench/report.py)
reports the ratios ours / TRL from rows of the same run id.

Where this sits: it drives the engine's own step (engine.data -> engine.refcache -> PolicyWithLoss ->
engine.parallelize's DeepSpeed engine), not a re-implementation, and TRL's stock trainer, each in a
fresh subprocess (a "worker") so that peak memory and warm caches belong to one variant only.

What is held equal: the model (named architecture, same seed, same dtype), the preference pairs
(`prepare_data` on one fixed synthetic config; every worker takes the same first `steps x pairs`
training pairs in the same order), pairs per optimizer step, the chat-templated tokenizer and length
limits, the optimizer (torch AdamW, same lr/betas/eps, no weight decay, clipping at 1.0, constant
lr), the DPO sigmoid loss with beta 0.1, precision (fp32 on CPU) and gradient checkpointing (off on
CPU, on for the 8B GPU setups in both systems).

Variants:
- ddpo-engine "packed+cache" (the default): each step's pairs packed into one row; reference log-probs
  read from the engine's reference cache (built once beforehand by engine.refcache.build_cache, as
  the trainer does), so a step has no reference forward and no reference model exists.
- ddpo-engine "packed+on_the_fly" (ref_cache.mode off): a frozen reference copy (or, with LoRA, the
  policy with adapters off) runs one no-grad forward per step.
- ddpo-engine "unpacked+cache": one pair per row (chosen and rejected of a pair share the row), rows
  padded to the longest of the step, as padded trainers lay out a batch.
- trl "ref_forward": DPOTrainer defaults (precompute_ref_log_probs False: a reference forward per step).
- trl "precomputed_ref": precompute_ref_log_probs True (reference log-probs computed before training).
TRL 1.16's `padding_free` is disabled inside the trainer (it warns and falls back to padding), so TRL
has no packed variant.

CPU workers run the setup's torch threads (`--threads` for the llama-tiny setups, default 1; 2 for
gpt2-small), the same for both systems: the tiny model's ops are too small to gain from intra-op
parallelism, and on a shared machine two OpenMP threads waiting for each other made steps up to 30x
slower (78 ms vs 2.9 s per step measured for the same worker); gpt2-small's GEMMs are large enough to use both cores.

Setups at the seed recipe's size (gpt2-small, vocabulary 50,257, fp32, 4 pairs per step):
"cpu-gpt2-stories" (bench-full) draws WritingPrompts-like responses (data.synthetic_lengths stories:
hundreds of tokens, a long tail, sequences cut at max_length 512); "cpu-gpt2-quick" (make bench) is the same model
on the short default responses, 2 pairs per step, engine packed+cache against TRL's faster variant.
Beside every engine row the CSV holds `plan_mb`, engine.plan's predicted peak for the same config and
micro-batch geometry (one row of the step's tokens; device cpu). "cpu-gpt2-stories" also writes the
memory breakdown of one step (bench/results/memory.csv, see `breakdown_worker`).
Every worker flushes subnormal floats to zero (torch.set_flush_denormal): on x86 CPUs they otherwise
cost microcode assists that slowed whole steps of the tiny model ~10x, in either system, depending on
data order.

Measurements: `warmup` untimed optimizer steps, then `reps` (>= 10) timed steps. Step time: CUDA-synced
wall time of forward + backward + optimizer step (batch collation outside, for both systems; TRL's
steps are timed by a TrainerCallback from on_step_begin to on_step_end). tokens_per_s: real
(non-padding) tokens per timed step (mean) / the median step time. peak_mem_mb: on CUDA
max_memory_allocated; on CPU the peak resident set above the RSS at the start of a window that opens
just before the model is built and closes after the last step, in a fresh worker process per row,
the same for every system: the kernel's high-water mark (VmHWM) is reset at the window's start
(engine.memory.RssWindow; a sampling thread where it cannot be reset). Imports, data preparation and
the tokenizer fall before the window: both workers first build the architecture on the meta device,
so the modeling code's one-time import cost is outside it too. The engine worker applies the engine's
CPU allocator policy (engine.memory.limit_allocator_retention, as engine.train does); TRL runs stock.
MFU (GPU only): engine.flops (the trainer's definition): model FLOPs per token x tokens/s / the GPU's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from engine import flops  # noqa: E402

RESULTS_CSV = common.RESULTS_DIR / "train.csv"
FIELDS = (
    "bench system variant model pairs_per_step tokens_per_step step_time_ms_median step_time_ms_p10 "
    "step_time_ms_p90 reps tokens_per_s peak_mem_mb plan_mb mfu hardware torch transformers trl deepspeed "
    "commit run_id timestamp notes"
).split()
ENGINE = "ddpo-engine"
TRL = "trl"
ENGINE_VARIANTS = ("packed+cache", "packed+on_the_fly", "unpacked+cache")
TRL_VARIANTS = ("ref_forward", "precomputed_ref")
RESULT_TAG = "RESULT "


@dataclasses.dataclass(frozen=True)
class Setup:
    """One benchmark configuration: model, batch geometry and repetitions."""

    name: str
    model: str
    dtype: str
    device: str
    pairs_per_step: int
    max_prompt_length: int
    max_length: int
    warmup: int
    reps: int
    lr: float = 1e-4
    lora_r: int = 0
    gradient_checkpointing: bool = False
    objective: str = "dpo"  # the engine's objective; dpo on CPU is TRL's sigmoid loss exactly
    lengths: str = "short"  # data.synthetic_lengths
    threads: int | None = None  # CPU torch threads per worker; None: --threads
    jobs: tuple[tuple[str, str], ...] | None = None  # (system, variant) pairs to run; None: all of both systems
    breakdown: bool = False  # also write the memory breakdown of one step (memory.csv)

    @property
    def steps(self) -> int:
        return self.warmup + self.reps


_TINY = Setup("cpu-tiny", "llama-tiny", "float32", "cpu", 4, max_prompt_length=64, max_length=256, warmup=3, reps=20)
_GPT2 = Setup(
    "cpu-gpt2", "gpt2-small", "float32", "cpu", 4, max_prompt_length=64, max_length=512, warmup=1, reps=10, threads=2
)
_8B = Setup(
    "gpu-8b",
    "llama-8b",
    "bfloat16",
    "cuda",
    4,
    max_prompt_length=256,
    max_length=1024,
    warmup=2,
    reps=10,
    lr=5e-6,
    objective="ddpo",
)


def _variant(base: Setup, name: str, **changes) -> Setup:
    return dataclasses.replace(base, name=name, **changes)


SETUPS = {
    s.name: s
    for s in (
        # Same batch geometry as the default run (configs/tiny-cpu.yaml), fp32 on CPU.
        _TINY,
        # Batch-size sweep around cpu-tiny (bench-full): 2, 4, 8 pairs per step. The synthetic sequences are
        # ~100 tokens, below every max_length, so a max_length sweep would change nothing; the pairs per
        # step set the packed row length (engine) and the padded batch (TRL). BENCHMARKS.md plots time and
        # memory against the resulting tokens per step.
        _variant(_TINY, "cpu-tiny-p2", pairs_per_step=2),
        _variant(_TINY, "cpu-tiny-p8", pairs_per_step=8),
        # The smallest size, for the smoke test (tests/test_bench.py).
        _variant(_TINY, "cpu-tiny-smoke", pairs_per_step=2, max_length=128, warmup=1, reps=10),
        # The `make bench` size: a few seconds per worker on 2 cores.
        _variant(_TINY, "cpu-tiny-quick", warmup=2, reps=10),
        # The seed recipe's model at WritingPrompts-like response lengths (bench-full): responses of hundreds
        # of tokens with a long tail, cut at 512 tokens per sequence so that TRL's padded batches fit a
        # shared machine.
        _variant(_GPT2, "cpu-gpt2-stories", lengths="stories", breakdown=True),
        # gpt2-small at the make-bench size: short responses, the engine's default variant against TRL's
        # faster one.
        _variant(
            _GPT2,
            "cpu-gpt2-quick",
            pairs_per_step=2,
            max_length=256,
            jobs=(("ddpo-engine", "packed+cache"), ("trl", "precomputed_ref")),
        ),
        # Llama-3-8B architecture, random init, bf16; DDPO (deviation weights are per-pair scalars, 1.0
        # here: the step's cost is the same as with computed weights).
        _variant(_8B, "gpu-8b-lora", lora_r=16, gradient_checkpointing=True),
        _variant(_8B, "gpu-8b-full", pairs_per_step=2, gradient_checkpointing=True),
        # `make gpu-check` (bench/gpu_check.py): Llama-3-8B shapes with 4 of its 32 decoder layers, so that
        # every worker fits the check's minutes; both setups take the same pairs, so one reference cache
        # serves both. No gradient checkpointing: the 4-layer model fits a 80 GB GPU without it.
        _variant(_8B, "gpu-8b4l-lora", model="llama-8b-4layers", pairs_per_step=16, lora_r=16),
        _variant(_8B, "gpu-8b4l-full", model="llama-8b-4layers", pairs_per_step=16),
    )
}
QUICK_SETUPS = ("cpu-tiny-quick", "cpu-gpt2-quick")
FULL_SETUPS = ("cpu-tiny", "cpu-tiny-p2", "cpu-tiny-p8", "cpu-gpt2-stories")


# ------------------------------------------------------------------------------------ shared setup


def engine_overrides(s: Setup, *, cache_dir: str, data_cache: str, ref_mode: str = "auto") -> list[str]:
    """Config overrides (on the default preset) that both systems' data and model come from."""
    # Enough prompts that the training split (90%, one best-vs-worst pair per prompt) holds every step's pairs.
    prompts = math.ceil(s.steps * s.pairs_per_step / 0.85) + 4
    row_cap = max(1024, 2 * s.max_length)
    return [
        "--model.name",
        s.model,
        "--model.dtype",
        s.dtype,
        "--model.seed",
        "0",
        "--model.lora_r",
        str(s.lora_r),
        "--model.gradient_checkpointing",
        str(s.gradient_checkpointing).lower(),
        "--data.source",
        "synthetic",
        "--data.synthetic_prompts",
        str(prompts),
        "--data.synthetic_lengths",
        s.lengths,
        "--data.pairs",
        "best_vs_worst",
        "--data.max_prompt_length",
        str(s.max_prompt_length),
        "--data.max_length",
        str(s.max_length),
        "--data.max_tokens_per_row",
        str(row_cap),
        "--data.cache_dir",
        data_cache,
        "--data.num_workers",
        "1",
        "--loss.objective",
        s.objective,
        "--loss.beta",
        "0.1",
        "--optim.lr",
        repr(s.lr),
        "--optim.weight_decay",
        "0",
        "--optim.schedule",
        "constant",
        "--optim.warmup_ratio",
        "0",
        "--optim.grad_accum",
        "1",
        "--optim.max_grad_norm",
        "1.0",
        "--ref_cache.mode",
        ref_mode,
        "--ref_cache.dir",
        cache_dir,
        "--ref_cache.dtype",
        s.dtype,
        "--parallel.precision",
        "bf16" if s.dtype == "bfloat16" else "fp32",
        "--parallel.zero_stage",
        "0",
        "--logging.progress",
        "false",
        "--logging.tensorboard",
        "false",
        "--eval.enabled",
        "false",
    ]


def load_inputs(s: Setup, overrides: list[str]):
    """(cfg, tokenizer, prepared data, the tokenized pairs of every step, in order)."""
    from engine.config import load_config
    from engine.data import prepare_data
    from engine.model import load_tokenizer

    cfg = load_config(overrides, prog="bench/bench_train.py")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    prepared = prepare_data(cfg, tok, compute_weights=False, verbose=False)
    need = s.steps * s.pairs_per_step
    if len(prepared.train_tokenized) < need:
        raise RuntimeError(
            f"setup {s.name} needs {need} training pairs, data preparation gave {len(prepared.train_tokenized)}; "
            f"raise the synthetic prompt count in engine_overrides"
        )
    chunks = [prepared.train_tokenized[i * s.pairs_per_step : (i + 1) * s.pairs_per_step] for i in range(s.steps)]
    return cfg, tok, prepared, chunks


def step_rows(chunk, *, packed: bool, pad_id: int, nll_on_prompt: bool):
    """Packed rows of one step: all its pairs in one row, or one pair per row."""
    from engine.data import pack_pairs

    if packed:
        cap = sum(p.num_tokens for p in chunk)
        return pack_pairs(chunk, cap, pad_id=pad_id, nll_on_prompt=nll_on_prompt)
    return [pack_pairs([p], p.num_tokens, pad_id=pad_id, nll_on_prompt=nll_on_prompt)[0] for p in chunk]


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def model_note(model) -> str:
    """Which attention implementation ran and how many decoder layers the model has (rows state both)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return f"attention {cfg._attn_implementation}; {cfg.num_hidden_layers} decoder layers"


def warm_imports(cfg) -> None:
    """Build the architecture on the meta device (allocates nothing): the modeling code's one-time
    imports (~200 MB of RSS with transformers 5) then happen before the memory window, in both systems."""
    from engine.model import build_model, is_named_architecture

    if is_named_architecture(cfg.model.name):
        build_model(cfg.model.name, dtype=cfg.model.dtype, device="meta")


def _summary(times_ms: list[float], tokens: list[int], seq_lens: list[int], model, device, peak_mb: float) -> dict:
    """Step-time quantiles, tokens/s, peak memory and MFU (`seq_lens`: every sequence's real length)."""
    timing = common.Timing(times_ms)
    # Mean real tokens per step over the median step time: on a shared machine a few descheduled steps
    # would dominate a total-time average, while the median is the steady state.
    tok_s = (sum(tokens) / len(tokens)) / (timing.median / 1e3)
    per_token = flops.ModelFlops.of(model).per_token(flops.attention_context(seq_lens))
    m = flops.mfu(per_token, tok_s, flops.device_name(device))
    return {
        **timing.row("step_time_ms"),
        "tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_s": round(tok_s, 1),
        "peak_mem_mb": round(peak_mb, 1),
        "mfu": None if m is None else round(m, 4),
    }


# ------------------------------------------------------------------------------------- engine worker


class _EngineRun:
    """The engine's own step on a setup's batches: model, reference (cache or on the fly), DeepSpeed engine.

    Built inside an open memory window by `engine_worker` and `breakdown_worker`, so both measure the
    same thing; the batches are collated before the window, as the trainer's data is prepared before
    its model exists.
    """

    def __init__(self, s: Setup, variant: str, cache_dir: str, data_cache: str):
        from engine import parallelize
        from engine.data import collate

        self.packed = variant.startswith("packed")
        self.on_the_fly = variant.endswith("on_the_fly")
        ref_mode = "off" if self.on_the_fly else "require"
        overrides = engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache, ref_mode=ref_mode)
        self.cfg, self.tok, self.prepared, chunks = load_inputs(s, overrides)
        self.env = parallelize.init_distributed(self.cfg.parallel)
        self.device = self.env.device
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        nll = self.cfg.loss.nll_on_prompt
        self.batches = [
            collate(step_rows(c, packed=self.packed, pad_id=pad_id, nll_on_prompt=nll), device=self.device)
            for c in chunks
        ]
        self.s = s

    def warm_imports(self) -> float:
        """Import what the step imports on first use (the fused-loss kernels with triton, their native ops, the
        trainer), as the TRL worker imports trl before its window: import costs are outside every window.
        Returns the RSS those imports added, MiB."""
        from engine.memory import current_rss_mb

        before = current_rss_mb() or 0.0
        warm_imports(self.cfg)
        import ddpo_kernels  # noqa: F401
        import engine.train  # noqa: F401
        from ddpo_kernels.chunk_logprob import load_native

        load_native()
        return (current_rss_mb() or 0.0) - before

    def build(self) -> None:
        """Model, reference and DeepSpeed engine, as engine.train builds them (call inside the window)."""
        from engine import parallelize, refcache
        from engine.model import load_model
        from engine.train import PolicyWithLoss

        cfg = self.cfg
        self.model = load_model(cfg.model, device=self.device)
        self.cache = self.reference = None
        self.forwards = 0  # reference forwards run (the cache path never builds a reference, so it stays 0)
        if self.on_the_fly:
            self.reference = refcache.on_the_fly_reference(self.model, cfg)
        else:
            # The trainer's cache path: open the cache built before the workers (fingerprint-checked).
            fingerprint = refcache.cache_fingerprint(cfg, self.tok, self.prepared)
            self.cache = refcache.RefCache.open(refcache.cache_dir_for(cfg), fingerprint)
        self.engine, self.optimizer, _ = parallelize.setup_deepspeed(
            PolicyWithLoss(self.model, cfg.loss), cfg, total_steps=self.s.steps
        )
        self.engine.train()

    def step(self, batch) -> None:
        if self.cache is not None:
            self.cache.fill(batch)
        else:
            batch.ref_chosen_logps, batch.ref_rejected_logps = self.reference(batch)
            self.forwards += 1
        out = self.engine(batch)
        self.engine.backward(out.loss)
        self.engine.step()

    def plan(self, batch=None):
        """engine.plan's MemoryPlan for this config and the run's micro-batch geometry: one row holding the
        tokens of `batch` (default: the largest step's), padding included, on this device."""
        from engine.plan import PlanSettings, plan_memory

        n = (batch or max(self.batches, key=lambda b: b.input_ids.numel())).input_ids.numel()
        d = self.cfg.data
        # max_length only bounds the config's validation here (a row must hold a pair); the plan does not use it.
        geometry = {
            "data.rows_per_batch": 1,
            "data.max_tokens_per_row": n,
            "data.max_length": min(d.max_length, n // 2),
            "data.max_prompt_length": min(d.max_prompt_length, n // 2 - 1),
        }
        return plan_memory(PlanSettings.of(geometry, base=self.cfg, device=self.device.type))


def engine_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    import torch

    from engine.memory import limit_allocator_retention

    limit_allocator_retention()  # engine.train does the same for a CPU run
    run = _EngineRun(s, variant, cache_dir, data_cache)
    seq_lens = [n for b in run.batches for n in torch.bincount(b.segment_ids[b.segment_ids >= 0]).tolist()]
    run.warm_imports()
    mem = common.PeakMemory(run.device.type).__enter__()
    run.build()
    times, tokens = [], []
    for i, batch in enumerate(run.batches):
        common.cuda_sync()
        t0 = time.perf_counter()
        run.step(batch)
        common.cuda_sync()
        if i >= s.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            tokens.append(batch.num_real_tokens)
    forwards = run.forwards
    mem.__exit__(None, None, None)
    batches = run.batches
    pad = sum(b.num_pad_tokens for b in batches) / max(1, sum(b.num_pad_tokens + b.num_real_tokens for b in batches))
    notes = [
        f"padding {100 * pad:.1f}%",
        f"reference forwards {forwards}",
        "DeepSpeed ZeRO-0 engine, world of one",
        model_note(run.model),
        "subnormals flushed",
        f"peak: {mem.method}",
    ]
    row = _summary(times, tokens, seq_lens, run.model, run.device, mem.peak_mb)
    return {**row, "plan_mb": round(run.plan().total / 2**20, 1), "notes": "; ".join(notes)}


MEMORY_CSV = common.RESULTS_DIR / "memory.csv"
MEMORY_FIELDS = (
    "bench model variant tokens_per_step component mb plan_mb note hardware torch transformers deepspeed "
    "commit run_id timestamp"
).split()


def breakdown_worker(
    s: Setup, variant: str, cache_dir: str, data_cache: str, memory_csv: str | Path = MEMORY_CSV
) -> dict:
    """Where every MB of one engine step goes: what holds how much memory at the step's peak.

    The engine's packed+cache step on the setup's largest batch, after the warm-up steps (so Adam's
    states exist), in its own process. Two measurements of the same step: the RSS peak above the
    window's baseline (RssWindow, as the benchmark rows), and torch.profiler's memory timeline of a
    second run of it, whose categories (parameters, optimizer states, gradients, activations,
    inputs, temporaries) are summed over the tensors live at the moment of the largest total; the
    fused loss's logits block is split out of the activations by its [rows, V] size. The difference
    between the RSS peak and the live tensors is memory no tensor holds (allocator retention,
    Python and library heaps). The process's RSS before the window (interpreter, imports,
    tokenizer, prepared data) is listed too; it is not part of the peak rise. Each component is
    printed beside engine.plan's figure for it.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    from engine.memory import current_rss_mb, limit_allocator_retention

    limit_allocator_retention()
    run = _EngineRun(s, variant, cache_dir, data_cache)
    imports_mb = run.warm_imports()
    before = current_rss_mb()
    biggest = max(run.batches, key=lambda b: b.input_ids.numel())
    mem = common.PeakMemory(run.device.type).__enter__()
    run.build()
    for batch in run.batches[: max(2, s.warmup)]:
        run.step(batch)
    run.step(biggest)
    mem.__exit__(None, None, None)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run.step(biggest)
    mp = prof._memory_profile()
    cpu = torch.device("cpu")
    totals = [sum(x) for x in MemoryProfileTimeline(mp)._coalesce_timeline("cpu")[1]]
    t_peak = MemoryProfileTimeline(mp)._coalesce_timeline("cpu")[0][max(range(len(totals)), key=totals.__getitem__)]
    live: dict = {}
    for t, action, (key, version), nbytes in mp.timeline:
        if key.device != cpu:
            continue
        if (t / 1000 if t != -1 else -1) > t_peak:
            break
        if action in (Action.PREEXISTING, Action.CREATE):
            live[(key, version)] = nbytes
        elif action == Action.INCREMENT_VERSION:
            live[(key, version + 1)] = live.pop((key, version), nbytes)
        elif action == Action.DESTROY:
            live.pop((key, version), None)
    vocab = run.model.config.vocab_size
    parts = {
        "weights": 0,
        "optimizer states (Adam m, v)": 0,
        "gradients": 0,
        "activations saved for backward": 0,
        "fused loss: fp32 logits block [rows, V]": 0,
        "inputs and temporaries": 0,
    }
    names = {
        "PARAMETER": "weights",
        "OPTIMIZER_STATE": "optimizer states (Adam m, v)",
        "GRADIENT": "gradients",
        "ACTIVATION": "activations saved for backward",
    }
    for (key, version), nbytes in live.items():
        cat = mp._categories.get(key, version)
        name = names.get(cat.name if cat is not None else "", "inputs and temporaries")
        transient = name in ("activations saved for backward", "inputs and temporaries")
        if transient and nbytes % (4 * vocab) == 0 and nbytes >= 4 * vocab * 16:
            name = "fused loss: fp32 logits block [rows, V]"
        parts[name] += nbytes
    tensors_mb = sum(parts.values()) / 2**20
    plan = run.plan(biggest)
    head_dw = plan.logits_fused - plan.logits_block  # the head's fp32 gradient, filled by the loss's backward
    plan_of = {
        "weights": plan.at_peak.get("weights", 0),
        "optimizer states (Adam m, v)": plan.at_peak.get("optimizer", 0),
        "gradients": plan.at_peak.get("gradients", 0) + head_dw,
        "activations saved for backward": plan.at_peak.get("activations", 0),
        "fused loss: fp32 logits block [rows, V]": plan.logits_block,
    }
    MB = 2**20
    rows = [(k, v / MB, plan_of[k] / MB if k in plan_of else None, "") for k, v in parts.items()]
    rows.append(
        (
            "memory held by no tensor (allocator retention, Python and library heaps)",
            mem.peak_mb - tensors_mb,
            None,
            "RSS peak rise minus the tensors live at the tensor peak",
        )
    )
    rows.append(("total: RSS peak rise of the step", mem.peak_mb, plan.total / MB, mem.method))
    rows.append(
        (
            "before the window (interpreter, imports, tokenizer, prepared data; not in the rise)",
            before,
            None,
            f"RSS when the window opened; of it {imports_mb:.0f} MB from importing what the step uses (the fused "
            "loss's kernels, which import triton also on CPU, their native ops, the trainer, the modeling code)",
        )
    )
    env = common.environment(run.device.type, packages=("torch", "transformers", "deepspeed"))
    out = [
        {
            "bench": s.name,
            "model": s.model,
            "variant": variant,
            "tokens_per_step": biggest.num_real_tokens,
            "component": k,
            "mb": round(v, 1),
            "plan_mb": None if p is None else round(p, 1),
            "note": n,
            **{c: env[c] for c in ("hardware", "torch", "transformers", "deepspeed", "commit", "run_id", "timestamp")},
        }
        for k, v, p, n in rows
    ]
    common.append_csv(memory_csv, out, MEMORY_FIELDS)
    return {"rows": len(out), "peak_mb": mem.peak_mb, "tensors_mb": tensors_mb}


# ---------------------------------------------------------------------------------------- TRL worker


def stock_model(mcfg, device):
    """The model as a TRL user loads it: transformers' own modules (attention "sdpa", the configured
    activation and dropout; TRL disables dropout itself), the same weights as the engine's (same seed),
    LoRA through peft when the setup uses it (DPOConfig turns gradient checkpointing on). None of
    engine.model's training preparation."""
    from engine.model import apply_lora, build_model

    model = build_model(mcfg.name, dtype=mcfg.dtype, seed=mcfg.seed, device=device, attn_implementation="sdpa")
    return apply_lora(model, mcfg) if mcfg.lora_r > 0 else model


def trl_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    precompute = variant == "precomputed_ref"
    cfg, tok, prepared, chunks = load_inputs(s, engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache))
    device = _device()
    by_id = {p.pair_id: p for p in prepared.train_pairs}
    pairs = [by_id[t.pair_id] for c in chunks for t in c]
    # Conversational form: TRL applies the tokenizer's chat template exactly as engine.data does.
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )
    ours_tokens = sum(t.num_tokens for c in chunks for t in c)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0 = 0.0
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            common.cuda_sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            common.cuda_sync()
            self.times.append((time.perf_counter() - self.t0) * 1e3)

    class CountingDPOTrainer(DPOTrainer):
        """DPOTrainer that records each step's real tokens and sequence count (nothing else changes)."""

        step_tokens: list[int] = []
        seq_lens: list[int] = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.step_tokens.append(int(inputs["attention_mask"].sum()))
            self.seq_lens.extend(inputs["attention_mask"].sum(-1).tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    bf16 = s.dtype == "bfloat16"
    args = DPOConfig(
        output_dir=out_dir,
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=1.0,
        optim="adamw_torch",
        per_device_train_batch_size=s.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=s.steps,
        num_train_epochs=1,
        max_length=s.max_length,
        truncation_mode="keep_start",
        padding_free=False,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=s.gradient_checkpointing,
        bf16=bf16,
        fp16=False,
        use_cpu=device.type == "cpu",
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )

    warm_imports(cfg)
    mem = common.PeakMemory(device.type).__enter__()
    model = stock_model(cfg.model, device)
    ref_model = None
    if not precompute and cfg.model.lora_r == 0:
        # A random-init model has no path TRL could reload its reference copy from: pass the same-seed copy
        # TRL would otherwise create (frozen, eval mode, same dtype and attention).
        ref_model = stock_model(cfg.model, device).eval().requires_grad_(False)
    clock = StepClock()
    trainer = CountingDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock]
    )
    trainer.train()
    mem.__exit__(None, None, None)
    shutil.rmtree(out_dir, ignore_errors=True)
    if len(clock.times) != s.steps or len(trainer.step_tokens) != s.steps:
        raise RuntimeError(f"TRL ran {len(clock.times)} steps ({len(trainer.step_tokens)} batches), expected {s.steps}")
    tokens = trainer.step_tokens[s.warmup :]
    trl_tokens = sum(trainer.step_tokens)
    notes = [
        f"{trl_tokens} real tokens over all steps vs {ours_tokens} in the engine's tokenization"
        + (
            ""
            if trl_tokens == ours_tokens
            else " (TRL truncates prompt+completion to max_length, keep_start; "
            "the engine keeps the prompt start up to max_prompt_length, then truncates the response)"
        ),
        "batch padded to the longest sequence (TRL 1.16 disables padding_free)",
        "stock transformers modules",
        model_note(trainer.model),
        "reference: "
        + (
            "precomputed before training by the policy"
            if precompute
            else "adapters disabled"
            if cfg.model.lora_r
            else "frozen same-seed copy passed as ref_model"
        ),
        "shuffled sampler over the same pairs",
        "subnormals flushed",
        f"peak: {mem.method}",
    ]
    return {
        **_summary(clock.times[s.warmup :], tokens, trainer.seq_lens, trainer.model, device, mem.peak_mb),
        "notes": "; ".join(notes),
    }


# ------------------------------------------------------------------------------------------ driver


def cache_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    """Build the engine's reference cache for the setup's data once, shared by the cache variants (its own
    process, so the driver never holds a model or GPU memory while the measured workers run)."""
    from engine import refcache

    cfg, tok, prepared, _ = load_inputs(s, engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache))
    t0 = time.perf_counter()
    refcache.build_cache(cfg, tok, prepared, device=_device(), progress=False)
    return {"build_s": time.perf_counter() - t0}


def run_worker(
    s: Setup,
    system: str,
    variant: str,
    cache_dir: str,
    data_cache: str,
    timeout: float | None,
    min_reps: int = common.MIN_REPS,
    extra: tuple[str, ...] = (),
    echo=None,
) -> dict:
    """One (system, variant) in a fresh interpreter; its RESULT line, or {"error": ...}.

    extra: more worker arguments; echo: called with the worker's whole output (stdout, then stderr) once
    it ends, e.g. to keep a log."""
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_train",
        "--worker",
        f"{system}:{variant}",
        "--setup",
        s.name,
        "--reps",
        str(s.reps),
        "--warmup",
        str(s.warmup),
        "--min-reps",
        str(min_reps),
        "--cache-dir",
        cache_dir,
        "--data-cache",
        data_cache,
        "--threads",
        str(s.threads or 1),
        *extra,
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU setup stays on the CPU on a GPU machine too
        # Set before torch starts its OpenMP pool, so the pool has this many threads.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(s.threads or 1)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        if echo is not None:  # output captured before the timeout comes as bytes whatever text= says
            echo("".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x))
        return {"error": f"worker timed out after {timeout:.0f} s"}
    if echo is not None:
        echo(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_TAG) :])


def base_row(s: Setup, system: str, variant: str, env: dict) -> dict:
    """The cells of a (setup, system, variant) row that name it and its environment (`env`: a
    common.environment record); a worker's result, or the reason it has none, fills the rest."""
    keys = ("hardware", "torch", "transformers", "trl", "deepspeed", "commit", "run_id")
    return {
        "bench": s.name,
        "system": system,
        "variant": variant,
        "model": s.model,
        "pairs_per_step": s.pairs_per_step,
        **{k: env.get(k, "") for k in keys},
        "timestamp": common.timestamp(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the make-bench size (setups " + ", ".join(QUICK_SETUPS) + ")")
    p.add_argument(
        "--setup",
        action="append",
        choices=sorted(SETUPS),
        help="setups to run (repeatable); default: "
        f"{', '.join(QUICK_SETUPS)} with --quick, else {', '.join(FULL_SETUPS)}, plus gpu-8b-lora and "
        "gpu-8b-full on CUDA",
    )
    p.add_argument("--systems", default=f"{ENGINE},{TRL}", help="comma list of systems")
    p.add_argument("--variants", default=None, help="comma list of variants (default: all of each system)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (>= 10; default: the setup's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: the setup's)")
    p.add_argument("--min-reps", type=int, default=common.MIN_REPS, help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results file (rows are appended)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each CPU worker of a setup that does not "
        "set its own (default 1: the tiny model's ops are too small to gain from intra-op threads, and on a "
        "shared machine OpenMP threads that wait for a descheduled peer made steps up to 30x slower)",
    )
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is stopped")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--data-cache", help=argparse.SUPPRESS)
    p.add_argument("--memory-csv", default=str(MEMORY_CSV), help="memory breakdown results file (rows are appended)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="write the memory breakdown for every setup run (default: the setups that ask for it)",
    )
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.setup:
        names = args.setup
    elif args.quick:
        names = list(QUICK_SETUPS)
    else:
        names = list(FULL_SETUPS) + (["gpu-8b-lora", "gpu-8b-full"] if cuda else [])
    setups = []
    for n in names:
        s = SETUPS[n]
        if s.device == "cuda" and not cuda:
            print(f"skip setup {n}: needs a CUDA GPU (torch.cuda.is_available() is False)")
            continue
        s = dataclasses.replace(
            s,
            reps=args.reps or s.reps,
            warmup=s.warmup if args.warmup is None else args.warmup,
            threads=s.threads or args.threads,
        )
        if s.reps < args.min_reps:
            p.error(f"--reps {s.reps}: at least {args.min_reps} timed steps are needed for stable quantiles")
        setups.append(s)

    if args.worker:
        system, variant = args.worker.split(":", 1)
        fn = {ENGINE: engine_worker, TRL: trl_worker, "cache": cache_worker, "breakdown": breakdown_worker}[system]
        # Subnormal floats appear in the tiny fp32 model's training state after a few steps; x86 CPUs handle
        # them in microcode, which made whole steps ~10x slower depending on data order (measured: a TRL
        # step 2.7 s -> 0.28 s once flushed). Both systems run with them flushed to zero, so the steps
        # measure the arithmetic; GPUs flush subnormals at full speed anyway.
        torch.set_flush_denormal(True)
        if setups[0].device == "cpu":
            torch.set_num_threads(setups[0].threads)
        kwargs = {"memory_csv": args.memory_csv} if system == "breakdown" else {}
        try:
            result = fn(setups[0], variant, args.cache_dir, args.data_cache, **kwargs)
        except torch.OutOfMemoryError as e:
            result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = set(systems) - {ENGINE, TRL}
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}; choose from {ENGINE}, {TRL}")
    wanted = set(args.variants.split(",")) if args.variants else None
    common.run_id()  # fixed here so every worker's row carries the same run id
    crashes = 0
    for s in setups:
        work = tempfile.mkdtemp(prefix="bench-train-")
        cache_dir, data_cache = os.path.join(work, "ref_cache"), os.path.join(work, "data")
        jobs = [(ENGINE, v) for v in ENGINE_VARIANTS if ENGINE in systems] + [
            (TRL, v) for v in TRL_VARIANTS if TRL in systems
        ]
        jobs = [j for j in jobs if (wanted is None or j[1] in wanted) and (s.jobs is None or j in s.jobs)]
        build_s = None
        if any(sys_ == ENGINE and not v.endswith("on_the_fly") for sys_, v in jobs):
            r = run_worker(s, "cache", "build", cache_dir, data_cache, args.worker_timeout, args.min_reps)
            if "error" in r:
                print(f"[bench_train] {s.name}: reference cache build failed, cache variants skipped: {r['error']}")
                crashes += 1
                jobs = [j for j in jobs if not (j[0] == ENGINE and not j[1].endswith("on_the_fly"))]
            else:
                build_s = r["build_s"]
        if s.device == "cpu":
            torch.set_num_threads(s.threads)  # so the recorded hardware line states the workers' thread count
        env = common.environment(s.device, packages=("torch", "transformers", "trl", "deepspeed"))
        for system, variant in jobs:
            print(f"[bench_train] {s.name} {system} {variant} ...", flush=True)
            r = run_worker(s, system, variant, cache_dir, data_cache, args.worker_timeout, args.min_reps)
            row = base_row(s, system, variant, env)
            if "error" in r:
                print(f"[bench_train]   failed: {r['error']}", flush=True)
                if "out of memory" not in r["error"]:
                    crashes += 1
                    continue  # a crash is not a measurement: no row
                row.update(reps=0, notes=r["error"])  # running out of memory is a result ("as memory allows")
            else:
                if system == ENGINE and build_s is not None and "cache" in variant:
                    r["notes"] += f"; cache built once before training in {build_s:.1f} s (not in step time)"
                row.update(r)
                plan = f", plan {r['plan_mb']:.0f} MB" if r.get("plan_mb") else ""
                print(
                    f"[bench_train]   {r['step_time_ms_median']:.1f} ms/step (p10 {r['step_time_ms_p10']:.1f}, "
                    f"p90 {r['step_time_ms_p90']:.1f}), {r['tokens_per_s']:.0f} tok/s, "
                    f"peak +{r['peak_mem_mb']:.0f} MB{plan}",
                    flush=True,
                )
            common.append_csv(args.csv, [row], FIELDS)
        if (s.breakdown or args.breakdown) and build_s is not None:
            print(f"[bench_train] {s.name} memory breakdown of one engine step ...", flush=True)
            r = run_worker(
                s,
                "breakdown",
                "packed+cache",
                cache_dir,
                data_cache,
                args.worker_timeout,
                args.min_reps,
                ("--memory-csv", args.memory_csv),
            )
            if "error" in r:
                print(f"[bench_train]   failed: {r['error']}", flush=True)
                crashes += 1
            else:
                print(
                    f"[bench_train]   {r['rows']} rows appended to {args.memory_csv}: "
                    f"RSS peak +{r['peak_mb']:.0f} MB, live tensors {r['tensors_mb']:.0f} MB",
                    flush=True,
                )
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench_train] rows appended to {args.csv}")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
