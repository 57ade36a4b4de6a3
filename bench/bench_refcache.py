"""Training step with and without the reference log-prob cache: step time and peak memory.

Run:  python bench/bench_refcache.py [--config F] [--section.field v ...] [--reps 10] [--warmup 2]
Appends one row per variant to bench/results/refcache.csv (bench, config, variant, device, model,
dtype, tokens_per_step, step_time_ms median/p10/p90, reps, peak_mem_mb, ref_model_mb, hardware,
versions, commit, timestamp, note).

What a step is: the trainer's micro-step (engine/train.py) on the same packed rows, without
DeepSpeed so that both variants run the identical optimizer path:
    collate -> reference log-probs -> PolicyWithLoss (trunk + fused DPO loss) -> backward -> AdamW step
Variants:
- "cache": reference log-probs looked up in the cache (RefCache.fill); no reference model exists.
- "on_the_fly": engine.refcache.on_the_fly_reference: a frozen reference copy (full fine-tuning) or the
  policy with adapters disabled (LoRA), one extra no-grad forward per micro-batch.
Each variant runs in a fresh subprocess, so peak memory is that variant's alone: on CUDA
torch.cuda.max_memory_allocated over the whole worker (policy, optimizer state, reference copy,
activations); on CPU the process's resident-set high-water mark (VmHWM), which also counts the
Python/torch baseline common to both variants. `ref_model_mb` is the parameter bytes of the
reference copy (0 with the cache, 0 with LoRA). The cache is built once before the workers start;
its build time is reported in the cache row's note, not in the step time.
Default config: llama-tiny, synthetic data (64 prompts), DPO, fp32 on CPU; on CUDA pass e.g.
`--model.name gpt2-small --model.dtype bfloat16 --ref_cache.dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_csv, hardware  # noqa: E402
from bench.common import git_commit as _commit  # noqa: E402


def _hardware() -> str:
    return hardware("cuda" if torch.cuda.is_available() else "cpu")


RESULTS_CSV = REPO / "bench" / "results" / "refcache.csv"
CSV_FIELDS = (
    "bench config variant device model dtype lora_r tokens_per_step step_time_ms_median step_time_ms_p10 "
    "step_time_ms_p90 ref_time_ms_median reps peak_mem_mb ref_model_mb hardware torch transformers commit "
    "timestamp note"
).split()
DEFAULT_OVERRIDES = [
    "--data.synthetic_prompts",
    "64",
    "--loss.objective",
    "dpo",
    "--logging.progress",
    "false",
    "--eval.enabled",
    "false",
]


def _config(overrides: list[str], cache_dir: str):
    from engine.config import load_config

    return load_config([*DEFAULT_OVERRIDES, *overrides, "--ref_cache.dir", cache_dir], prog="bench/bench_refcache.py")


def _inputs(cfg):
    from engine.data import prepare_data
    from engine.model import load_tokenizer

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    return tok, prepare_data(cfg, tok, compute_weights=False, verbose=False)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def worker(variant: str, overrides: list[str], cache_dir: str, reps: int, warmup: int) -> dict:
    """One variant in this (fresh) process: set up the step as the trainer does, time `reps` steps."""
    from engine import refcache
    from engine.data import collate
    from engine.model import load_model
    from engine.train import PolicyWithLoss

    cfg = _config(overrides, cache_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tok, prepared = _inputs(cfg)
    rows = prepared.train_rows
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    model = load_model(cfg.model, device=device)
    cache = reference = None
    if variant == "cache":
        cache = refcache.RefCache.open(cache_dir, refcache.cache_fingerprint(cfg, tok, prepared))
    else:
        reference = refcache.on_the_fly_reference(model, cfg)
    ref_model = getattr(reference, "model", None)
    ref_mb = sum(p.numel() * p.element_size() for p in ref_model.parameters()) / 2**20 if ref_model is not None else 0.0
    module = PolicyWithLoss(model, cfg.loss).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forwards = 0  # reference forwards run (the cache variant never builds a reference, so it stays 0)

    def step(i: int) -> tuple[int, float]:
        nonlocal forwards
        batch = collate([rows[i % len(rows)]], device=device)
        sync()
        t_ref = time.perf_counter()
        if cache is not None:
            cache.fill(batch)
        else:
            batch.ref_chosen_logps, batch.ref_rejected_logps = reference(batch)
            forwards += 1
        sync()
        t_ref = (time.perf_counter() - t_ref) * 1000
        out = module(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch.num_real_tokens, t_ref

    for i in range(warmup):
        step(i)
    times, ref_times, tokens = [], [], []
    for i in range(warmup, warmup + reps):
        sync()
        t0 = time.perf_counter()
        n_tokens, t_ref = step(i)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
        ref_times.append(t_ref)
        tokens.append(n_tokens)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _status_mb("VmHWM")
    return {
        "variant": variant,
        "device": device.type,
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "lora_r": cfg.model.lora_r,
        "tokens": tokens,
        "step_ms": times,
        "ref_ms": ref_times,
        "peak_mem_mb": round(peak, 1),
        "ref_model_mb": round(ref_mb, 1),
        "reference_forwards": forwards,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="worker pairs run alternately (cache, on_the_fly, ...), so load drift on a shared machine hits both",
    )
    p.add_argument("--name", default=None, help="config label in the CSV (default: model name + device)")
    p.add_argument("--cache_dir", default=None, help="reference cache directory (default: a temporary one)")
    p.add_argument("--worker", choices=("cache", "on_the_fly"), help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.reps < 1 or args.rounds < 1:
        p.error(f"--reps and --rounds must be >= 1, got {args.reps} and {args.rounds}")

    if args.worker:
        print(
            "RESULT " + json.dumps(worker(args.worker, overrides, args.cache_dir, args.reps, args.warmup)), flush=True
        )
        return 0

    from engine import refcache

    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-refcache-")
        args.cache_dir = tmp.name
    cfg = _config(overrides, args.cache_dir)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tok, prepared = _inputs(cfg)
    t0 = time.perf_counter()
    refcache.build_cache(cfg, tok, prepared, device=device, progress=False)
    build_s = time.perf_counter() - t0
    common = {
        "bench": "train_step",
        "config": args.name or f"{cfg.model.name}-{device.type}",
        "hardware": _hardware(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": _commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    runs: dict[str, list[dict]] = {"cache": [], "on_the_fly": []}
    for _ in range(args.rounds):
        for variant in runs:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                variant,
                "--cache_dir",
                args.cache_dir,
                "--reps",
                str(args.reps),
                "--warmup",
                str(args.warmup),
                *overrides,
            ]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"bench worker {variant} failed with exit code {proc.returncode}")
            runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))
    results = {}
    for variant, rs in runs.items():
        t = np.asarray([x for r in rs for x in r["step_ms"]])
        results[variant] = {
            **{k: rs[0][k] for k in ("variant", "device", "model", "dtype", "lora_r", "ref_model_mb")},
            "tokens_per_step": int(np.mean([x for r in rs for x in r["tokens"]])),
            "step_time_ms_median": round(float(np.median(t)), 3),
            "step_time_ms_p10": round(float(np.percentile(t, 10)), 3),
            "step_time_ms_p90": round(float(np.percentile(t, 90)), 3),
            "ref_time_ms_median": round(float(np.median([x for r in rs for x in r["ref_ms"]])), 3),
            "reps": int(t.size),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rs),
            "reference_forwards": sum(r["reference_forwards"] for r in rs),
        }
    c, o = results["cache"], results["on_the_fly"]
    notes = {
        "cache": f"cache build {build_s:.1f}s for {len(prepared.train_rows)} rows (once, shared by later runs); "
        f"reference forwards {c['reference_forwards']}; {args.rounds} worker rounds",
        "on_the_fly": f"{o['step_time_ms_median'] / max(c['step_time_ms_median'], 1e-9):.2f}x the cache step time; "
        f"+{o['peak_mem_mb'] - c['peak_mem_mb']:.1f} MB peak; reference forwards {o['reference_forwards']}; "
        f"{args.rounds} worker rounds",
    }
    for variant, row in results.items():
        row = {**common, **row, "note": notes[variant]}
        append_csv(RESULTS_CSV, [{k: row.get(k, "") for k in CSV_FIELDS}], CSV_FIELDS)
        print(
            ", ".join(
                f"{k}={row[k]}"
                for k in (
                    "config",
                    "variant",
                    "step_time_ms_median",
                    "step_time_ms_p10",
                    "step_time_ms_p90",
                    "ref_time_ms_median",
                    "peak_mem_mb",
                    "ref_model_mb",
                    "note",
                )
            )
        )
    print(f"appended to {RESULTS_CSV}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
