"""CLI of the reference cache, run as `python -m engine.refcache` (same config loader and overrides as training):

torchrun [--nproc_per_node N] -m engine.refcache build --config F [--ref_cache.dir D] [--rows_per_part K]
python -m engine.refcache info <dir>
python -m engine.refcache verify <dir> [--config F ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from engine.refcache.build import ROWS_PER_PART, build_cache
from engine.refcache.fingerprint import cache_fingerprint, check_fingerprint
from engine.refcache.format import (
    MANIFEST_NAME,
    PLAN_NAME,
    RefCacheError,
    build_command,
    part_problem,
    plan_digest,
    read_json,
    read_manifest,
    verify_parts,
)


def describe(cache_dir: Path) -> str:
    """Manifest and coverage of a cache directory (finished or not), as text."""
    lines = [f"reference cache {cache_dir}"]
    manifest_path, plan_path = cache_dir / MANIFEST_NAME, cache_dir / PLAN_NAME
    if manifest_path.is_file():
        m = read_json(manifest_path, "manifest")
        lines.append(f"  status: finished (format {m.get('format')})")
        lines.append(
            f"  sequences: {m['num_sequences']}  pairs with both sides: {m['num_pairs']}  packed rows: {m['num_rows']}"
        )
        lines.append(
            f"  parts: {len(m['parts'])} ({m['rows_per_part']} rows each, micro-batches of {m['rows_per_batch']} rows)"
        )
        size = sum(p["bytes"] for p in m["parts"])
        lines.append(f"  size: {size / 1024:.1f} KiB")
        fp = m["fingerprint"]
    elif plan_path.is_file():
        plan = read_json(plan_path, "build plan")
        digest = plan_digest(plan)
        done = [p for p in plan["parts"] if part_problem(cache_dir, p["file"], digest) is None]
        rows_done = sum(p["rows"][1] - p["rows"][0] for p in done)
        lines.append(
            f"  status: unfinished build: {len(done)}/{len(plan['parts'])} parts, "
            f"{rows_done}/{plan['num_rows']} packed rows "
            f"({100.0 * rows_done / max(plan['num_rows'], 1):.1f}%); rerun the build to resume"
        )
        fp = plan["fingerprint"]
    else:
        raise RefCacheError(f"{cache_dir} holds no reference cache ({MANIFEST_NAME} and {PLAN_NAME} missing)")
    lines.append("  fingerprint:")
    lines.extend(f"    {k}: {v}" for k, v in sorted(fp.items()))
    return "\n".join(lines)


def _prepare_inputs(cfg):
    """(tokenizer, prepared data) exactly as the trainer makes them (no deviation weights: values do not use them)."""
    from engine.data import prepare_data
    from engine.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name, revision=cfg.model.revision)
    return tokenizer, prepare_data(cfg, tokenizer, compute_weights=False)


def _init_distributed(cfg) -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun the process group comes from engine.parallelize, else a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from engine import parallelize

        env = parallelize.init_distributed(cfg.parallel)
        return env.rank, env.world_size, env.device
    return 0, 1, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m engine.refcache", description="Build, inspect and verify the reference log-prob cache."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="compute the cache for a config (every --section.field override of training works)"
    )
    b.add_argument(
        "--rows_per_part",
        type=int,
        default=None,
        help=f"packed rows per part file (resume granularity); default: the existing cache's, else {ROWS_PER_PART}",
    )
    b.add_argument("--overwrite", action="store_true", help="replace a finished cache built for other inputs")
    i = sub.add_parser("info", help="print the manifest and coverage of a cache directory")
    i.add_argument("dir", type=Path)
    v = sub.add_parser("verify", help="re-check every shard's checksum (and the fingerprint, given a config)")
    v.add_argument("dir", type=Path)
    args, rest = parser.parse_known_args(argv)

    from engine.config import ConfigError, load_config

    try:
        if args.command == "info":
            print(describe(args.dir))
            return 0
        if args.command == "verify":
            manifest = read_manifest(args.dir)
            if rest:
                cfg = load_config(rest, prog="python -m engine.refcache verify DIR")
                tokenizer, prepared = _prepare_inputs(cfg)
                check_fingerprint(args.dir, manifest["fingerprint"], cache_fingerprint(cfg, tokenizer, prepared))
            problems = verify_parts(args.dir, manifest)
            if problems:
                print(f"reference cache {args.dir}: FAILED", file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
                fix = build_command(args.dir)
                print(f"fix: rerun the build, which recomputes only these shards: {fix}", file=sys.stderr)
                return 1
            n_parts, n_seqs = len(manifest["parts"]), manifest["num_sequences"]
            print(f"reference cache {args.dir}: OK ({n_parts} shards, {n_seqs} sequences)")
            return 0
        cfg = load_config(rest, prog="python -m engine.refcache build")
        rank, world_size, device = _init_distributed(cfg)
        tokenizer, prepared = _prepare_inputs(cfg)
        out = build_cache(
            cfg,
            tokenizer,
            prepared,
            device=device,
            rank=rank,
            world_size=world_size,
            rows_per_part=args.rows_per_part,
            overwrite=args.overwrite,
        )
        if rank == 0:
            print(describe(out))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    except (ConfigError, RefCacheError) as e:
        print(f"refcache error: {e}", file=sys.stderr)
        return 2
