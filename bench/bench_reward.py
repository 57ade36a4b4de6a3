"""Reward-model quality: the tiny preset trained end to end, then its export scored on held-out responses.

Run:  python -m bench.bench_reward [--quick] [--variants preset,published_labels,bradley_terry] [--threads 1]
Appends one row per variant to bench/results/reward.csv; BENCHMARKS.md ("Reward model") shows the rows of
the latest run, and the issue's bar (Spearman >= 0.6 with the ground-truth quality) next to them.

Where this sits: each variant runs in a fresh worker process: `engine.train.train` on
configs/reward-tiny-cpu.yaml (plus the variant's overrides), the same call as `python -m engine.train`;
then the exported `final/` directory is loaded by `engine.evaluate.RewardScorer` (transformers'
AutoModelForSequenceClassification, as any evaluation loads it) and scores every held-out response of
the synthetic data: the prompts `split_by_prompt` holds out with the run's val_fraction and seed. The
Spearman correlation of those scores with the generator's ground-truth quality
(`engine.data.synthetic.classify`) is computed here, from the export; the training-time held-out value
(the trainer's forward on packed rows, summary.json) is recorded next to it.

Variants (everything else is the preset):
- preset: L1 on the authors' transformed upvotes, standardised (reward.standardize_labels true).
- published_labels: the authors' labels as they are (standardize_labels false). With the synthetic
  upvotes' minimum of 0 the published transform puts every label within [0.94, 1.0001]; this row
  measures what that does to the same training run.
- bradley_terry: TRL's pairwise loss on the preset's training pairs (data.pairs all), one epoch: the
  4,765 pairs are 2 x 3 times the preset's 1,497 responses in tokens per epoch.

Timing: wall and CPU seconds of the worker's train call (data preparation, training, held-out
evaluations, exports), its torch threads, and the 1-minute load average before and after, since on a
shared machine the load decides the wall time. Workers run 1 torch thread by default and flush
subnormal floats, for the reasons bench/bench_train.py measured (OpenMP threads waiting on a shared
2-core machine; microcode assists on subnormals of the tiny fp32 model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

RESULTS_CSV = common.RESULTS_DIR / "reward.csv"
PRESET = REPO / "configs" / "reward-tiny-cpu.yaml"
TARGET_SPEARMAN = 0.6  # issue #20, "done when": held-out Spearman with the ground-truth quality
RESULT_TAG = "RESULT "
VARIANTS = {
    "preset": [],
    "published_labels": ["--reward.standardize_labels", "false"],
    "bradley_terry": ["--loss.reward_loss", "bradley_terry", "--optim.epochs", "1"],
}
FIELDS = (
    "bench variant config model reward_loss labels template train_responses val_responses val_pairs "
    "epochs steps best_step stopped_early_at spearman_quality spearman_quality_train spearman_label "
    "pairwise_accuracy val_loss target_spearman_quality wall_s cpu_s threads load1_start load1_end "
    "peak_mem_mb hardware torch transformers deepspeed commit run_id timestamp notes"
).split()


def score_export(final_dir: Path, cfg) -> dict:
    """Held-out metrics of the exported model, loaded by transformers through engine.evaluate."""
    import numpy as np

    from engine.data.loading import load_responses
    from engine.data.pairs import build_pairs, split_by_prompt
    from engine.data.synthetic import classify
    from engine.evaluate import RewardScorer
    from engine.reward import spearman

    d = cfg.data
    responses, _ = load_responses(d.source, synthetic_prompts=d.synthetic_prompts, synthetic_seed=d.synthetic_seed)
    _, val = split_by_prompt(responses, d.val_fraction, d.seed)
    scorer = RewardScorer(str(final_dir), batch_size=16)
    scores = scorer.score([r.prompt for r in val], [r.text for r in val])
    by_id = {r.response_id: s for r, s in zip(val, scores)}
    pairs = build_pairs(val, d.pairs, min_gap=d.min_gap, max_pairs_per_prompt=d.max_pairs_per_prompt, seed=d.seed)
    right = [by_id[p.chosen_id] > by_id[p.rejected_id] for p in pairs]
    return {
        "val_responses": len(val),
        "val_pairs": len(pairs),
        "spearman_quality": spearman(scores, [classify(r.text).quality for r in val]),
        "spearman_label": spearman(scores, [r.score for r in val]),  # upvotes: same ranks as any monotone label
        "pairwise_accuracy": float(np.mean(right)) if right else None,
    }


def worker(variant: str, out_dir: str) -> dict:
    import torch

    from engine.config import load_config
    from engine.train import train

    # Subnormals of the tiny fp32 model cost microcode assists on x86 (bench/bench_train.py measured ~10x).
    torch.set_flush_denormal(True)
    argv = [
        "--config",
        str(PRESET),
        "--logging.output_dir",
        out_dir,
        "--logging.progress",
        "false",
        "--data.cache_dir",
        str(Path(out_dir) / "cache"),
        *VARIANTS[variant],
    ]
    cfg = load_config(argv)
    load_start = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = train(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load_end = os.getloadavg()[0]
    exported = score_export(cfg.logging.run_dir / "final", cfg)
    ev = summary.get("eval", {})
    return {
        "variant": variant,
        "config": PRESET.name,
        "model": cfg.model.name,
        "reward_loss": cfg.loss.reward_loss,
        "labels": cfg.reward.score_transform + (" standardized" if cfg.reward.standardize_labels else ""),
        "template": cfg.reward.template,
        "train_responses": summary["responses"],
        "epochs": cfg.optim.epochs,
        "steps": summary["steps"],
        "best_step": summary["best_step"],
        "stopped_early_at": summary["stopped_early_at"],
        "spearman_quality_train": ev.get("spearman_quality"),
        "val_loss": ev.get("loss"),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "threads": torch.get_num_threads(),
        "load1_start": round(load_start, 2),
        "load1_end": round(load_end, 2),
        "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **exported,
    }


def run_worker(variant: str, threads: int, timeout: float | None) -> dict:
    """One variant in a fresh interpreter: its RESULT line, or {"error": ...}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # before torch starts its OpenMP pool
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny preset is a CPU measurement on any machine
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as out:
        cmd = [sys.executable, "-m", "bench.bench_reward", "--worker", variant, "--out", out]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"worker timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_TAG) :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the make-bench set: the preset only")
    p.add_argument("--variants", default=None, help="comma list of " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker (default 1)")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is stopped")
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results file (rows are appended)")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args.worker, args.out)), flush=True)
        return 0

    names = args.variants.split(",") if args.variants else (["preset"] if args.quick else list(VARIANTS))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    env = common.environment("cpu", packages=("torch", "transformers", "deepspeed"))
    failed = 0
    for name in names:
        print(f"[bench_reward] {name} ...", flush=True)
        result = run_worker(name, args.threads, args.worker_timeout)
        if "error" in result:
            print(f"[bench_reward] {name}: {result['error']}", file=sys.stderr, flush=True)
            failed += 1
            continue
        row = {
            "bench": "reward-tiny-cpu",
            **result,
            "target_spearman_quality": TARGET_SPEARMAN,
            **{k: v for k, v in env.items() if k in FIELDS},
            "timestamp": common.timestamp(),
            "notes": "spearman_quality: the export scored by engine.evaluate.RewardScorer; "
            "spearman_quality_train: the trainer's packed forward at the best step",
        }
        common.append_csv(args.csv, [row], FIELDS)
        print(
            f"[bench_reward] {name}: Spearman(quality) {row['spearman_quality']:.4f} (train-time "
            f"{row['spearman_quality_train']:.4f}), {row['steps']} steps in {row['wall_s']} s wall / "
            f"{row['cpu_s']} s CPU",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
