"""Building a reference cache: a deterministic plan, resumable parts, a distributed build, auto repair.

Parts are fixed slices of the train rows, shared round-robin among the ranks; so the set of files and
their bytes do not depend on the number of processes, and a 2-process build equals a 1-process build
byte for byte. The build forms micro-batches of `data.rows_per_batch` consecutive rows, as training
does; with one row per batch (the default) cached and on-the-fly values are the same bits, with
several they can differ by float rounding only (packed sequences never see each other).

Rank 0 plans, reconciles the directory under an exclusive lock and writes the manifest; every rank
computes its share of the parts. Collectives come from engine.parallelize.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from engine import parallelize
from engine.refcache import reference
from engine.refcache.fingerprint import cache_fingerprint, check_fingerprint, fingerprint_diff, sha256_hex
from engine.refcache.format import (
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    PLAN_NAME,
    RefCacheError,
    build_command,
    encode_key,
    part_name,
    part_problem,
    part_record_name,
    plan_digest,
    read_manifest,
    record_dtype,
    row_keys,
    train_rows,
    verify_parts,
    write_json,
    write_part,
)
from engine.refcache.reader import RefCache

# Packed rows per part file: small enough that a killed build loses little work, large enough that
# a lookup (one binary search per part) stays cheap. 256 rows of 2048 tokens are ~0.5M tokens.
ROWS_PER_PART = 256


def cache_dir_for(cfg) -> Path:
    return Path(cfg.ref_cache.dir) if cfg.ref_cache.dir else Path(cfg.logging.run_dir) / "ref_cache"


def _shared_fingerprint(cfg, tokenizer, prepared, rank: int) -> dict:
    """The fingerprint, computed on rank 0 only (a local reference's weights are hashed once, not per rank)."""
    error, fingerprint = None, None
    if rank == 0:
        try:
            fingerprint = cache_fingerprint(cfg, tokenizer, prepared)
        except Exception as e:  # every rank must learn of it
            error = e
    parallelize.raise_if_any_failed(error, what="reference cache build", error_type=RefCacheError)
    return parallelize.broadcast_from_zero(fingerprint)


@contextlib.contextmanager
def _build_lock(cache_dir: Path):
    """Exclusive lock on the cache directory (rank 0 only) so two jobs never write one cache at once."""
    import fcntl

    with open(cache_dir / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def make_plan(rows: Sequence, fingerprint: dict, *, rows_per_part: int, rows_per_batch: int) -> dict:
    """Deterministic assignment of packed rows to parts, with a hash of each part's keys."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1; got {rows_per_part}")
    if not rows:
        raise RefCacheError(
            "the train set has no packed rows: nothing to cache (check data.source and the data report)"
        )
    parts, key_bytes = [], 1
    for index, start in enumerate(range(0, len(rows), rows_per_part)):
        stop = min(len(rows), start + rows_per_part)
        keys = sorted({encode_key(k) for row in rows[start:stop] for k in row_keys(row)})
        key_bytes = max([key_bytes] + [len(k) for k in keys])
        parts.append({"file": part_name(index), "rows": [start, stop], "keys_sha256": sha256_hex(b"\n".join(keys))})
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "rows_per_part": rows_per_part,
        "rows_per_batch": rows_per_batch,
        "num_rows": len(rows),
        "key_bytes": key_bytes,
        "parts": parts,
    }


def _existing_layout(cache_dir: Path, fingerprint: dict) -> int | None:
    """rows_per_part of the finished cache (or unfinished build) in cache_dir for these inputs, if any.

    Repairs and resumes keep the layout the cache was built with, so they recompute exactly the bad
    parts instead of starting over with the default layout.
    """
    for name in (MANIFEST_NAME, PLAN_NAME):
        try:
            doc = json.loads((cache_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(doc, dict)
            and doc.get("format") == FORMAT_VERSION
            and doc.get("fingerprint") == fingerprint
            and isinstance(doc.get("rows_per_part"), int)
        ):
            return doc["rows_per_part"]
    return None


def _prepare_dir(cache_dir: Path, plan: dict, *, overwrite: bool, log: Callable) -> tuple[list[int], bool]:
    """Rank 0, under the lock: reconcile the directory with the plan.

    Returns (part indices still to compute, whether a finished, verified cache for these inputs is there).
    A part on disk is kept only when its checksum record says it was computed for this plan and its
    bytes still match (format.part_problem); every other part is recomputed.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(".*.tmp.*"):  # temp files of a killed build
        stale.unlink(missing_ok=True)
    manifest_path = cache_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("format") == FORMAT_VERSION:
            if fingerprint_diff(old.get("fingerprint", {}), plan["fingerprint"]):
                if not overwrite:
                    check_fingerprint(cache_dir, old["fingerprint"], plan["fingerprint"])
            elif not verify_parts(cache_dir, old):
                # Valid for these inputs, even if built with another part layout: keep it (runs may be reading it).
                return [], True
        # The manifest must never describe parts that are about to change: remove it before touching them.
        manifest_path.unlink()
    digest = plan_digest(plan)
    todo = []
    for index, part in enumerate(plan["parts"]):
        problem = part_problem(cache_dir, part["file"], digest)
        if problem is None:
            continue
        if (cache_dir / part["file"]).is_file():
            log(f"refcache: {problem}; recomputing it")
        todo.append(index)
    planned = {p["file"] for p in plan["parts"]} | {part_record_name(p["file"]) for p in plan["parts"]}
    for extra in sorted(cache_dir.glob("part-*")):
        if extra.name not in planned:
            extra.unlink()
    write_json(cache_dir / PLAN_NAME, plan)
    return todo, False


def _compute_part(model, rows: Sequence, plan: dict, *, device, backend: str) -> np.ndarray:
    """Records of one part, sorted by key; micro-batches of rows_per_batch rows, as training forms them."""
    from engine.data import collate

    keys: list[bytes] = []
    logps: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    step = plan["rows_per_batch"]
    for start in range(0, len(rows), step):
        batch = collate(list(rows[start : start + step]), device=device)
        seg_logps, seg_counts = reference.sequence_logps(model, batch, backend=backend)
        if len(batch.sequence_keys) != seg_logps.numel():
            raise RuntimeError(
                f"batch has {len(batch.sequence_keys)} sequence keys but {seg_logps.numel()} segments; "
                "engine.data.collate must give one key per segment"
            )
        keys.extend(encode_key((str(p), str(s))) for p, s in batch.sequence_keys)
        logps.append(seg_logps.cpu().numpy())
        counts.append(seg_counts.cpu().numpy())
    rec = np.zeros(len(keys), dtype=record_dtype(plan["key_bytes"]))
    rec["key"] = keys
    rec["logp"] = np.concatenate(logps) if logps else []
    rec["count"] = np.concatenate(counts) if counts else []
    rec = rec[np.argsort(rec["key"], kind="stable")]
    # A sequence repeated in the data (same pair twice) is stored once: the first occurrence wins.
    _, first = np.unique(rec["key"], return_index=True)
    return rec[np.sort(first)]


def _finalize(cache_dir: Path, plan: dict) -> dict:
    """Verify every part against the checksum written with it, then write the manifest (last)."""
    digest = plan_digest(plan)
    parts, num_sequences, chosen, rejected = [], 0, set(), set()
    for part in plan["parts"]:
        problem = part_problem(cache_dir, part["file"], digest)
        if problem is not None:
            raise RefCacheError(f"after every rank finished, {problem}; rerun the build: {build_command(cache_dir)}")
        record = json.loads((cache_dir / part_record_name(part["file"])).read_text())
        arr = np.load(cache_dir / part["file"], allow_pickle=False)
        for key in arr["key"].tolist():
            pair_id, side = key.rsplit(b"/", 1)
            (chosen if side == b"c" else rejected).add(pair_id)
        parts.append({k: record[k] for k in ("file", "sha256", "bytes", "records")})
        num_sequences += len(arr)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": plan["fingerprint"],
        "rows_per_part": plan["rows_per_part"],
        "rows_per_batch": plan["rows_per_batch"],
        "num_rows": plan["num_rows"],
        "key_bytes": plan["key_bytes"],
        "num_sequences": num_sequences,
        "num_pairs": len(chosen & rejected),
        "plan_sha256": digest,
        "parts": parts,
    }
    write_json(cache_dir / MANIFEST_NAME, manifest)
    return manifest


def build_cache(
    cfg,
    tokenizer,
    prepared,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    rows_per_part: int | None = None,
    overwrite: bool = False,
    backend: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Compute (or finish) the cache of the train rows; every rank of an initialised process group calls it.

    Resumable: parts already on disk that match the plan and the checksum written with them are kept,
    so a killed build picks up where it stopped and ends with the same bytes as an uninterrupted one;
    a repair recomputes exactly the bad parts. rows_per_part None keeps the layout of the cache (or
    unfinished build) already in the directory, else ROWS_PER_PART. A finished cache with another
    fingerprint is an error unless overwrite=True.
    """
    if world_size > 1 and not torch.distributed.is_initialized():
        raise RuntimeError(
            f"build_cache with world_size={world_size} needs an initialised torch.distributed process group "
            "(run under torchrun)"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_dir_for(cfg)
    backend = backend or cfg.loss.backend
    progress = cfg.logging.progress if progress is None else progress
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    rows = train_rows(prepared)
    fingerprint = _shared_fingerprint(cfg, tokenizer, prepared, rank)
    if rows_per_part is None:
        layout = _existing_layout(cache_dir, fingerprint) if rank == 0 else None
        rows_per_part = parallelize.broadcast_from_zero(layout) or ROWS_PER_PART
    plan = make_plan(rows, fingerprint, rows_per_part=rows_per_part, rows_per_batch=cfg.data.rows_per_batch)
    digest = plan_digest(plan)

    lock = contextlib.nullcontext()
    state, error = None, None
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = _build_lock(cache_dir)
        lock.__enter__()
    try:
        if rank == 0:
            try:
                state = _prepare_dir(cache_dir, plan, overwrite=overwrite, log=log)
            except Exception as e:  # every rank must learn of it
                error = e
        parallelize.raise_if_any_failed(error, what="reference cache build", error_type=RefCacheError)
        todo, up_to_date = parallelize.broadcast_from_zero(state)
        if up_to_date:
            log(f"refcache: {cache_dir} is up to date (fingerprint matches, every shard verified)")
            return cache_dir
        # Round-robin over the parts still to do (balanced on resume too); which rank computes a part
        # does not change its bytes.
        mine = todo[rank::world_size]
        n_parts = len(plan["parts"])
        log(f"refcache: building {cache_dir}: {n_parts} parts, {len(todo)} to compute on {world_size} rank(s)")

        error, model, t0, done_rows, done_tokens = None, None, time.perf_counter(), 0, 0
        try:
            if mine:
                model = reference.load_reference_model(cfg, device=device)
                from tqdm import tqdm

                total = sum(plan["parts"][i]["rows"][1] - plan["parts"][i]["rows"][0] for i in mine)
                bar = tqdm(total=total, unit="row", desc="ref log-probs", disable=not (progress and rank == 0))
                for index in mine:
                    part = plan["parts"][index]
                    part_rows = rows[part["rows"][0] : part["rows"][1]]
                    rec = _compute_part(model, part_rows, plan, device=device, backend=backend)
                    write_part(cache_dir, part["file"], rec, digest)
                    done_rows += len(part_rows)
                    done_tokens += int(rec["count"].sum())
                    bar.update(len(part_rows))
                bar.close()
        except Exception as e:
            error = e
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        parallelize.raise_if_any_failed(error, what="reference cache build", error_type=RefCacheError)
        elapsed = time.perf_counter() - t0
        if done_rows:
            rate = done_tokens / max(elapsed, 1e-9)
            log(
                f"refcache: rank 0 computed {done_rows} rows, {done_tokens} target tokens in {elapsed:.1f}s "
                f"({rate:.0f} tok/s)"
            )

        error = None
        if rank == 0:
            try:
                manifest = _finalize(cache_dir, plan)
                log(
                    f"refcache: wrote {cache_dir / MANIFEST_NAME}: {manifest['num_sequences']} sequences, "
                    f"{manifest['num_pairs']} pairs"
                )
            except Exception as e:
                error = e
        parallelize.raise_if_any_failed(error, what="reference cache build", error_type=RefCacheError)
    finally:
        if rank == 0:
            lock.__exit__(None, None, None)
    return cache_dir


def ensure_cache(
    cfg, tokenizer, prepared, *, device, rank: int = 0, world_size: int = 1, **build_kwargs
) -> RefCache | None:
    """The trainer's entry point: the cache to read reference log-probs from, or None to compute them on the fly.

    mode off (or an objective without a reference): None. require: open, or fail with the build
    command. auto: open when valid; build (or resume, or repair missing/corrupted shards) when there
    is no finished valid cache; a finished cache built for other inputs is an error, never
    overwritten (another run may be using it).
    """
    mode = cfg.ref_cache.mode
    if mode == "off" or not cfg.loss.needs_reference:
        return None
    cache_dir = cache_dir_for(cfg)
    fingerprint = _shared_fingerprint(cfg, tokenizer, prepared, rank)
    if mode == "require":
        return RefCache.open(cache_dir, fingerprint)
    status, error = None, None
    if rank == 0:
        if not (cache_dir / MANIFEST_NAME).is_file():
            status = "missing"
        else:
            try:
                manifest = read_manifest(cache_dir)
                check_fingerprint(cache_dir, manifest["fingerprint"], fingerprint)
                problems = verify_parts(cache_dir, manifest)
                status = "ok" if not problems else "repair: " + "; ".join(problems)
            except RefCacheError as e:
                error = e
    parallelize.raise_if_any_failed(error, what="reference cache build", error_type=RefCacheError)
    status = parallelize.broadcast_from_zero(status)
    if status != "ok":
        if rank == 0 and status != "missing":
            problems = status[len("repair: ") :]
            print(f"refcache: WARNING: {cache_dir}: {problems}; recomputing those parts", file=sys.stderr, flush=True)
        build_cache(
            cfg,
            tokenizer,
            prepared,
            cache_dir=cache_dir,
            device=device,
            rank=rank,
            world_size=world_size,
            **build_kwargs,
        )
    return RefCache.open(cache_dir, fingerprint)
