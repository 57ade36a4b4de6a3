"""The on-disk format of a reference cache: names, records, keys, and verified reads of the manifest.

A cache directory holds `build.json` (the plan), `part-<i>.npy` record files each with its
checksum record `part-<i>.json`, and, once complete, `manifest.json` (see the package docstring).
Records are a numpy structured array sorted by key: key bytes "<pair_id>/c" or "<pair_id>/r",
float32 summed log-prob, int32 token count. Every write goes through `engine.fileio.atomic_write`,
so a reader sees a whole file or none.

The checksum record is written right after its part and names the plan it was computed for, so a
part is adopted by a resumed or repaired build only when its bytes match the checksum written with
them, for this very plan; a part without one (killed between the two writes), of another plan, or
altered since, is recomputed. The manifest repeats every part's checksum for readers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.fileio import atomic_write, sha256_file, verify_file

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "build.json"
LOCK_NAME = ".build.lock"
SIDES = ("chosen", "rejected")
_SIDE_CODE = {"chosen": "c", "rejected": "r"}


class RefCacheError(RuntimeError):
    """The cache is missing, unfinished, corrupted or built for other inputs; the message says how to fix it."""


class RefCacheKeyError(KeyError):
    """A sequence key asked for is not in the cache (KeyError, with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "sequence not in reference cache"


def build_command(cache_dir: str | Path | None = None) -> str:
    """The command line that (re)builds a cache, for error messages."""
    d = f" --ref_cache.dir {cache_dir}" if cache_dir is not None else ""
    return f"torchrun --nproc_per_node <gpus> -m engine.refcache build --config <your config>{d}"


def row_keys(row) -> list[tuple[str, str]]:
    """(pair_id, side) of every sequence in a packed row, in segment order."""
    keys = getattr(row, "sequence_keys", None)
    if keys is None:
        raise TypeError(f"a packed row must expose sequence_keys [(pair_id, side), ...]; got {type(row).__name__}")
    return [(str(p), str(s)) for p, s in keys]


def encode_key(key: tuple[str, str]) -> bytes:
    pair_id, side = key
    if side not in _SIDE_CODE:
        raise ValueError(f"sequence side must be 'chosen' or 'rejected'; got {side!r} for pair {pair_id}")
    return f"{pair_id}/{_SIDE_CODE[side]}".encode("ascii")


def record_dtype(key_bytes: int) -> np.dtype:
    return np.dtype([("key", f"S{key_bytes}"), ("logp", "<f4"), ("count", "<i4")])


def part_name(index: int) -> str:
    return f"part-{index:05d}.npy"


def part_record_name(part_file: str) -> str:
    """The checksum record written with a part file: part-00000.npy -> part-00000.json."""
    return part_file[: -len(".npy")] + ".json"


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()


def write_part(cache_dir: Path, part_file: str, records: np.ndarray, plan_sha256: str) -> None:
    """The part, then its checksum record (a part without a record is never adopted)."""
    path = cache_dir / part_file
    digest = atomic_write(path, lambda f: np.save(f, records, allow_pickle=False), checksum=True)
    record = {
        "file": part_file,
        "plan_sha256": plan_sha256,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "records": int(len(records)),
    }
    write_json(cache_dir / part_record_name(part_file), record)


def part_problem(cache_dir: Path, part_file: str, plan_sha256: str) -> str | None:
    """None when the part on disk is complete, of this plan and unaltered; else why it must be recomputed."""
    record_path = cache_dir / part_record_name(part_file)
    if not (cache_dir / part_file).is_file():
        return f"{part_file} is missing"
    if not record_path.is_file():
        return f"{part_file} has no checksum record (its build was cut short)"
    try:
        record = json.loads(record_path.read_text())
        sha, size, planned = record["sha256"], record["bytes"], record["plan_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{part_file} has an unreadable checksum record"
    if planned != plan_sha256:
        return f"{part_file} was computed for another build plan"
    return verify_file(cache_dir / part_file, sha256=sha, size=size)


def train_rows(prepared) -> Sequence:
    rows = getattr(prepared, "train_rows", None)
    if rows is None:
        raise TypeError(f"expected engine.data.PreparedData with .train_rows; got {type(prepared).__name__}")
    return list(rows)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefCacheError(
            f"{what} {path} cannot be read ({e}); delete it and rebuild: {build_command(path.parent)}"
        ) from None


def read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        plan_path = cache_dir / PLAN_NAME
        if plan_path.is_file():
            plan = read_json(plan_path, "build plan")
            digest = plan_digest(plan)
            done = sum(part_problem(cache_dir, p["file"], digest) is None for p in plan["parts"])
            state = f"an unfinished build ({done}/{len(plan['parts'])} parts) is there; rerun the build to resume it"
        else:
            state = "no cache has been built there"
        raise RefCacheError(
            f"no reference cache at {cache_dir} ({MANIFEST_NAME} missing: {state}): {build_command(cache_dir)}"
        )
    manifest = read_json(path, "manifest")
    if manifest.get("format") != FORMAT_VERSION:
        raise RefCacheError(
            f"reference cache {cache_dir} has format {manifest.get('format')!r}, this engine reads format "
            f"{FORMAT_VERSION}; rebuild it: {build_command(cache_dir)}"
        )
    return manifest


def verify_parts(cache_dir: Path, manifest: dict) -> list[str]:
    """Problems found (missing shard, wrong size, sha256 mismatch), one string per shard; [] when all good."""
    problems = []
    for part in manifest["parts"]:
        path = cache_dir / part["file"]
        if not path.is_file():
            problems.append(f"shard {part['file']} is missing")
            continue
        size = path.stat().st_size
        if size != part["bytes"]:
            problems.append(
                f"shard {part['file']} has {size} bytes, manifest says {part['bytes']} (truncated or overwritten)"
            )
            continue
        digest = sha256_file(path)
        if digest != part["sha256"]:
            problems.append(
                f"shard {part['file']} is corrupted (sha256 {digest[:12]}..., manifest {part['sha256'][:12]}...)"
            )
    return problems
