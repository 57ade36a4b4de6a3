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

CPU workers run `--threads` torch threads (default 1, the same for both systems): the tiny model's ops
are too small to gain from intra-op parallelism, and on a shared machine two OpenMP threads waiting
for each other made steps up to 30x slower (78 ms vs 2.9 s per step measured for the same worker).
Every worker flushes subnormal floats to zero (torch.set_flush_denormal): on x86 CPUs they otherwise
cost microcode assists that slowed whole steps of the tiny model ~10x, in either system, depending on
data order.

Measurements: `warmup` untimed optimizer steps, then `reps` (>= 10) timed steps. Step time: CUDA-synced
wall time of forward + backward + optimizer step (batch collation outside, for both systems; TRL's
steps are timed by a TrainerCallback from on_step_begin to on_step_end). tokens_per_s: real
(non-padding) tokens per timed step (mean) / the median step time. peak_mem_mb: on CUDA
max_memory_allocated; on CPU the increase of the worker's RSS high-water mark from just before the
model is built to the end (imports are excluded: both workers first build the architecture on the
meta device, so the modeling code's one-time import cost falls before the window).
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
FIELDS = [
    "bench", "system", "variant", "model", "pairs_per_step", "tokens_per_step",
    "step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90", "reps", "tokens_per_s", "peak_mem_mb", "mfu",
    "hardware", "torch", "transformers", "trl", "deepspeed", "commit", "run_id", "timestamp", "notes",
]  # fmt: skip
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

    @property
    def steps(self) -> int:
        return self.warmup + self.reps


SETUPS = {
    # Same batch geometry as the default run (configs/tiny-cpu.yaml), fp32 on CPU.
    "cpu-tiny": Setup("cpu-tiny", "llama-tiny", "float32", "cpu", pairs_per_step=4, max_prompt_length=64, max_length=256,
                      warmup=3, reps=20),
    # Batch-size sweep around cpu-tiny (bench-full): 2, 4, 8 pairs per step. The synthetic sequences are
    # ~100 tokens, below every max_length, so a max_length sweep would change nothing; the pairs per
    # step set the packed row length (engine) and the padded batch (TRL). BENCHMARKS.md plots time and
    # memory against the resulting tokens per step.
    "cpu-tiny-p2": Setup("cpu-tiny-p2", "llama-tiny", "float32", "cpu", pairs_per_step=2, max_prompt_length=64,
                         max_length=256, warmup=3, reps=20),
    "cpu-tiny-p8": Setup("cpu-tiny-p8", "llama-tiny", "float32", "cpu", pairs_per_step=8, max_prompt_length=64,
                         max_length=256, warmup=3, reps=20),
    # The smallest size, for the smoke test (tests/test_bench.py).
    "cpu-tiny-smoke": Setup("cpu-tiny-smoke", "llama-tiny", "float32", "cpu", pairs_per_step=2, max_prompt_length=64,
                            max_length=128, warmup=1, reps=10),
    # The `make bench` size: a few seconds per worker on 2 cores.
    "cpu-tiny-quick": Setup("cpu-tiny-quick", "llama-tiny", "float32", "cpu", pairs_per_step=4, max_prompt_length=64,
                            max_length=256, warmup=2, reps=10),
    # Llama-3-8B architecture, random init, bf16, LoRA; DDPO (deviation weights are per-pair scalars,
    # 1.0 here: the step's cost is the same as with computed weights).
    "gpu-8b-lora": Setup("gpu-8b-lora", "llama-8b", "bfloat16", "cuda", pairs_per_step=4, max_prompt_length=256,
                         max_length=1024, warmup=2, reps=10, lr=5e-6, lora_r=16, gradient_checkpointing=True, objective="ddpo"),
    "gpu-8b-full": Setup("gpu-8b-full", "llama-8b", "bfloat16", "cuda", pairs_per_step=2, max_prompt_length=256,
                         max_length=1024, warmup=2, reps=10, lr=5e-6, gradient_checkpointing=True, objective="ddpo"),
    # `make gpu-check` (bench/gpu_check.py): Llama-3-8B shapes with 4 of its 32 decoder layers, so that
    # every worker fits the check's minutes; both setups take the same pairs, so one reference cache
    # serves both. No gradient checkpointing: the 4-layer model fits a 80 GB GPU without it.
    "gpu-8b4l-lora": Setup("gpu-8b4l-lora", "llama-8b-4layers", "bfloat16", "cuda", pairs_per_step=16,
                           max_prompt_length=256, max_length=1024, warmup=2, reps=10, lr=5e-6, lora_r=16,
                           objective="ddpo"),
    "gpu-8b4l-full": Setup("gpu-8b4l-full", "llama-8b-4layers", "bfloat16", "cuda", pairs_per_step=16,
                           max_prompt_length=256, max_length=1024, warmup=2, reps=10, lr=5e-6, objective="ddpo"),
}  # fmt: skip


# ------------------------------------------------------------------------------------ shared setup


def engine_overrides(s: Setup, *, cache_dir: str, data_cache: str, ref_mode: str = "auto") -> list[str]:
    """Config overrides (on the default preset) that both systems' data and model come from."""
    # Enough prompts that the training split (90%, one best-vs-worst pair per prompt) holds every step's pairs.
    prompts = math.ceil(s.steps * s.pairs_per_step / 0.85) + 4
    row_cap = max(1024, 2 * s.max_length)
    return [
        "--model.name", s.model, "--model.dtype", s.dtype, "--model.seed", "0", "--model.lora_r", str(s.lora_r),
        "--model.gradient_checkpointing", str(s.gradient_checkpointing).lower(),
        "--data.source", "synthetic", "--data.synthetic_prompts", str(prompts), "--data.pairs", "best_vs_worst",
        "--data.max_prompt_length", str(s.max_prompt_length), "--data.max_length", str(s.max_length),
        "--data.max_tokens_per_row", str(row_cap), "--data.cache_dir", data_cache, "--data.num_workers", "1",
        "--loss.objective", s.objective, "--loss.beta", "0.1",
        "--optim.lr", repr(s.lr), "--optim.weight_decay", "0", "--optim.schedule", "constant", "--optim.warmup_ratio", "0",
        "--optim.grad_accum", "1", "--optim.max_grad_norm", "1.0",
        "--ref_cache.mode", ref_mode, "--ref_cache.dir", cache_dir, "--ref_cache.dtype", s.dtype,
        "--parallel.precision", "bf16" if s.dtype == "bfloat16" else "fp32", "--parallel.zero_stage", "0",
        "--logging.progress", "false", "--logging.tensorboard", "false", "--eval.enabled", "false",
    ]  # fmt: skip


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
    chunks = [prepared.train_tokenized[i * s.pairs_per_step:(i + 1) * s.pairs_per_step] for i in range(s.steps)]
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
        **timing.row("step_time_ms"), "tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_s": round(tok_s, 1), "peak_mem_mb": round(peak_mb, 1), "mfu": None if m is None else round(m, 4),
    }  # fmt: skip


# ------------------------------------------------------------------------------------- engine worker


def engine_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    import torch

    from engine import parallelize, refcache
    from engine.data import collate
    from engine.model import load_model
    from engine.train import PolicyWithLoss

    packed = variant.startswith("packed")
    on_the_fly = variant.endswith("on_the_fly")
    cfg, tok, prepared, chunks = load_inputs(s, engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache,
                                                                 ref_mode="off" if on_the_fly else "require"))  # fmt: skip
    env = parallelize.init_distributed(cfg.parallel)
    device = env.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate(step_rows(c, packed=packed, pad_id=pad_id, nll_on_prompt=cfg.loss.nll_on_prompt), device=device)
               for c in chunks]  # fmt: skip
    seq_lens = [n for b in batches for n in torch.bincount(b.segment_ids[b.segment_ids >= 0]).tolist()]

    warm_imports(cfg)
    mem = common.PeakMemory(device.type).__enter__()
    model = load_model(cfg.model, device=device)
    cache = reference = None
    if on_the_fly:
        reference = refcache.on_the_fly_reference(model, cfg)
    else:
        # The trainer's cache path: open the cache built before the workers (fingerprint-checked).
        cache = refcache.RefCache.open(refcache.cache_dir_for(cfg), refcache.cache_fingerprint(cfg, tok, prepared))
    module = PolicyWithLoss(model, cfg.loss)
    engine, _, _ = parallelize.setup_deepspeed(module, cfg, total_steps=s.steps)
    engine.train()

    forwards = 0  # reference forwards run (the cache path never builds a reference, so it stays 0)

    def step(batch) -> None:
        nonlocal forwards
        if cache is not None:
            cache.fill(batch)
        else:
            batch.ref_chosen_logps, batch.ref_rejected_logps = reference(batch)
            forwards += 1
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()

    times, tokens = [], []
    for i, batch in enumerate(batches):
        common.cuda_sync()
        t0 = time.perf_counter()
        step(batch)
        common.cuda_sync()
        if i >= s.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            tokens.append(batch.num_real_tokens)
    mem.__exit__(None, None, None)
    pad = sum(b.num_pad_tokens for b in batches) / max(1, sum(b.num_pad_tokens + b.num_real_tokens for b in batches))
    notes = [f"padding {100 * pad:.1f}%", f"reference forwards {forwards}", "DeepSpeed ZeRO-0 engine, world of one",
             model_note(model), "subnormals flushed"]
    return {**_summary(times, tokens, seq_lens, model, device, mem.peak_mb), "notes": "; ".join(notes)}


# ---------------------------------------------------------------------------------------- TRL worker


def trl_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from engine.model import load_model

    precompute = variant == "precomputed_ref"
    cfg, tok, prepared, chunks = load_inputs(s, engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache))
    device = _device()
    by_id = {p.pair_id: p for p in prepared.train_pairs}
    pairs = [by_id[t.pair_id] for c in chunks for t in c]
    # Conversational form: TRL applies the tokenizer's chat template exactly as engine.data does.
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}]}
        for p in pairs
    ])  # fmt: skip
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
        output_dir=out_dir, beta=0.1, loss_type=["sigmoid"], learning_rate=s.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps, max_grad_norm=1.0, optim="adamw_torch",
        per_device_train_batch_size=s.pairs_per_step, gradient_accumulation_steps=1, max_steps=s.steps,
        num_train_epochs=1, max_length=s.max_length, truncation_mode="keep_start", padding_free=False,
        precompute_ref_log_probs=precompute, gradient_checkpointing=s.gradient_checkpointing,
        bf16=bf16, fp16=False, use_cpu=device.type == "cpu", report_to="none", eval_strategy="no",
        save_strategy="no", logging_steps=10, dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip

    warm_imports(cfg)
    mem = common.PeakMemory(device.type).__enter__()
    model = load_model(cfg.model, device=device)
    ref_model = None
    if not precompute and cfg.model.lora_r == 0:
        # A random-init model has no path TRL could reload its reference copy from: pass the same-seed copy
        # TRL would otherwise create (frozen, eval mode, same dtype and attention).
        ref_model = load_model(cfg.model, device=device, for_training=False)
    clock = StepClock()
    trainer = CountingDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok,
                                 callbacks=[clock])  # fmt: skip
    trainer.train()
    mem.__exit__(None, None, None)
    shutil.rmtree(out_dir, ignore_errors=True)
    if len(clock.times) != s.steps or len(trainer.step_tokens) != s.steps:
        raise RuntimeError(f"TRL ran {len(clock.times)} steps ({len(trainer.step_tokens)} batches), expected {s.steps}")
    tokens = trainer.step_tokens[s.warmup:]
    trl_tokens = sum(trainer.step_tokens)
    notes = [
        f"{trl_tokens} real tokens over all steps vs {ours_tokens} in the engine's tokenization"
        + ("" if trl_tokens == ours_tokens else " (TRL truncates prompt+completion to max_length, keep_start; "
           "the engine keeps the prompt start up to max_prompt_length, then truncates the response)"),
        "batch padded to the longest sequence (TRL 1.16 disables padding_free)", model_note(trainer.model),
        "reference: " + ("precomputed before training by the policy" if precompute
                         else "adapters disabled" if cfg.model.lora_r else "frozen same-seed copy passed as ref_model"),
        "shuffled sampler over the same pairs", "subnormals flushed",
    ]  # fmt: skip
    return {**_summary(clock.times[s.warmup:], tokens, trainer.seq_lens, trainer.model, device, mem.peak_mb),
            "notes": "; ".join(notes)}  # fmt: skip


# ------------------------------------------------------------------------------------------ driver


def cache_worker(s: Setup, variant: str, cache_dir: str, data_cache: str) -> dict:
    """Build the engine's reference cache for the setup's data once, shared by the cache variants (its own
    process, so the driver never holds a model or GPU memory while the measured workers run)."""
    from engine import refcache

    cfg, tok, prepared, _ = load_inputs(s, engine_overrides(s, cache_dir=cache_dir, data_cache=data_cache))
    t0 = time.perf_counter()
    refcache.build_cache(cfg, tok, prepared, device=_device(), progress=False)
    return {"build_s": time.perf_counter() - t0}


def run_worker(s: Setup, system: str, variant: str, cache_dir: str, data_cache: str, timeout: float | None,
               min_reps: int = common.MIN_REPS, threads: int = 1, echo=None) -> dict:
    """One (system, variant) in a fresh interpreter; its RESULT line, or {"error": ...}.

    echo: called with the worker's whole output (stdout, then stderr) once it ends, e.g. to keep a log."""
    cmd = [sys.executable, "-m", "bench.bench_train", "--worker", f"{system}:{variant}", "--setup", s.name,
           "--reps", str(s.reps), "--warmup", str(s.warmup), "--min-reps", str(min_reps), "--cache-dir", cache_dir,
           "--data-cache", data_cache]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU setup stays on the CPU on a GPU machine too
        # Set before torch starts its OpenMP pool, so the pool has this many threads.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
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
    return json.loads(lines[-1][len(RESULT_TAG):])


def base_row(s: Setup, system: str, variant: str, env: dict) -> dict:
    """The cells of a (setup, system, variant) row that name it and its environment (`env`: a
    common.environment record); a worker's result, or the reason it has none, fills the rest."""
    keys = ("hardware", "torch", "transformers", "trl", "deepspeed", "commit", "run_id")
    return {"bench": s.name, "system": system, "variant": variant, "model": s.model, "pairs_per_step": s.pairs_per_step,
            **{k: env.get(k, "") for k in keys}, "timestamp": common.timestamp()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the make-bench size (setup cpu-tiny-quick on CPU)")
    p.add_argument("--setup", action="append", choices=sorted(SETUPS), help="setups to run (repeatable); default: "
                   "cpu-tiny-quick with --quick, else cpu-tiny and its batch sweep (cpu-tiny-p2, cpu-tiny-p8), "
                   "plus gpu-8b-lora and gpu-8b-full on CUDA")
    p.add_argument("--systems", default=f"{ENGINE},{TRL}", help="comma list of systems")
    p.add_argument("--variants", default=None, help="comma list of variants (default: all of each system)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (>= 10; default: the setup's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: the setup's)")
    p.add_argument("--min-reps", type=int, default=common.MIN_REPS, help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results file (rows are appended)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each CPU worker (default 1: the tiny model's "
                   "ops are too small to gain from intra-op threads, and on a shared machine OpenMP threads that wait "
                   "for a descheduled peer made steps up to 30x slower)")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is stopped")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--data-cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.setup:
        names = args.setup
    elif args.quick:
        names = ["cpu-tiny-quick"]
    else:
        names = ["cpu-tiny", "cpu-tiny-p2", "cpu-tiny-p8"] + (["gpu-8b-lora", "gpu-8b-full"] if cuda else [])
    setups = []
    for n in names:
        s = SETUPS[n]
        if s.device == "cuda" and not cuda:
            print(f"skip setup {n}: needs a CUDA GPU (torch.cuda.is_available() is False)")
            continue
        s = dataclasses.replace(s, reps=args.reps or s.reps, warmup=s.warmup if args.warmup is None else args.warmup)
        if s.reps < args.min_reps:
            p.error(f"--reps {s.reps}: at least {args.min_reps} timed steps are needed for stable quantiles")
        setups.append(s)

    if args.worker:
        system, variant = args.worker.split(":", 1)
        fn = {ENGINE: engine_worker, TRL: trl_worker, "cache": cache_worker}[system]
        # Subnormal floats appear in the tiny fp32 model's training state after a few steps; x86 CPUs handle
        # them in microcode, which made whole steps ~10x slower depending on data order (measured: a TRL
        # step 2.7 s -> 0.28 s once flushed). Both systems run with them flushed to zero, so the steps
        # measure the arithmetic; GPUs flush subnormals at full speed anyway.
        torch.set_flush_denormal(True)
        if setups[0].device == "cpu":
            torch.set_num_threads(args.threads)
        try:
            result = fn(setups[0], variant, args.cache_dir, args.data_cache)
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
        jobs = [(ENGINE, v) for v in ENGINE_VARIANTS if ENGINE in systems] + [(TRL, v) for v in TRL_VARIANTS if TRL in systems]
        jobs = [j for j in jobs if wanted is None or j[1] in wanted]
        build_s = None
        if any(sys_ == ENGINE and not v.endswith("on_the_fly") for sys_, v in jobs):
            r = run_worker(s, "cache", "build", cache_dir, data_cache, args.worker_timeout, args.min_reps, args.threads)
            if "error" in r:
                print(f"[bench_train] {s.name}: reference cache build failed, cache variants skipped: {r['error']}")
                crashes += 1
                jobs = [j for j in jobs if not (j[0] == ENGINE and not j[1].endswith("on_the_fly"))]
            else:
                build_s = r["build_s"]
        if s.device == "cpu":
            torch.set_num_threads(args.threads)  # so the recorded hardware line states the workers' thread count
        env = common.environment(s.device, packages=("torch", "transformers", "trl", "deepspeed"))
        for system, variant in jobs:
            print(f"[bench_train] {s.name} {system} {variant} ...", flush=True)
            r = run_worker(s, system, variant, cache_dir, data_cache, args.worker_timeout, args.min_reps, args.threads)
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
                print(f"[bench_train]   {r['step_time_ms_median']:.1f} ms/step (p10 {r['step_time_ms_p10']:.1f}, "
                      f"p90 {r['step_time_ms_p90']:.1f}), {r['tokens_per_s']:.0f} tok/s, peak +{r['peak_mem_mb']:.0f} MB", flush=True)  # fmt: skip
            common.append_csv(args.csv, [row], FIELDS)
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench_train] rows appended to {args.csv}")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
