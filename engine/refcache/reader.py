"""Reading a finished reference cache: verified on open, memory-mapped, looked up by sequence key.

`RefCache.open` checks the fingerprint and every shard's sha256, then memory-maps the parts; a lookup
is one binary search per part over the sorted keys (vectorised over the batch). The trainer calls
`fill(batch)` to set a PackedBatch's reference log-probs from its pair ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.data.packing import IGNORE_INDEX
from engine.refcache.fingerprint import check_fingerprint
from engine.refcache.format import (
    RefCacheError,
    RefCacheKeyError,
    build_command,
    encode_key,
    read_manifest,
    record_dtype,
    verify_parts,
)


class RefCache:
    """A finished, verified cache directory, memory-mapped; values are looked up by sequence key."""

    def __init__(self, cache_dir: Path, manifest: dict, parts: list[np.ndarray]):
        self.dir = cache_dir
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self._parts = parts
        self._key_dtype = np.dtype(f"S{manifest['key_bytes']}")

    @classmethod
    def open(
        cls, cache_dir: str | Path, expected_manifest_fingerprint: dict | None = None, *, verify: bool = True
    ) -> RefCache:
        """Open a finished cache: fingerprint fields compared (when given), every shard's sha256 checked."""
        cache_dir = Path(cache_dir)
        manifest = read_manifest(cache_dir)
        if expected_manifest_fingerprint is not None:
            check_fingerprint(cache_dir, manifest["fingerprint"], expected_manifest_fingerprint)
        if verify:
            problems = verify_parts(cache_dir, manifest)
            if problems:
                raise RefCacheError(
                    f"reference cache {cache_dir} failed verification: {'; '.join(problems)}. "
                    f"Corrupted or missing shards are never used: rerun the build, which recomputes only those parts: "
                    f"{build_command(cache_dir)}"
                )
        dtype = record_dtype(manifest["key_bytes"])
        parts = []
        for part in manifest["parts"]:
            path = cache_dir / part["file"]
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise RefCacheError(
                    f"shard {path} of reference cache {cache_dir} cannot be read ({e}); rebuild it: "
                    f"{build_command(cache_dir)}"
                ) from None
            if arr.dtype != dtype or arr.shape != (part["records"],):
                raise RefCacheError(
                    f"shard {path} holds {arr.shape} records of dtype {arr.dtype}, but the manifest says "
                    f"({part['records']},) of {dtype}; delete it and rebuild: {build_command(cache_dir)}"
                )
            parts.append(arr)
        return cls(cache_dir, manifest, parts)

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    def __contains__(self, key: tuple[str, str]) -> bool:
        return bool(self._find([key])[2].all())

    def _find(self, keys: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = self._key_dtype.itemsize
        enc = [encode_key(k) for k in keys]
        fits = np.array([len(e) <= width for e in enc], dtype=bool)
        query = np.array([e if len(e) <= width else b"" for e in enc], dtype=self._key_dtype)
        logp = np.zeros(len(enc), dtype=np.float32)
        count = np.zeros(len(enc), dtype=np.int32)
        found = np.zeros(len(enc), dtype=bool)
        for arr in self._parts:
            if len(arr) == 0:
                continue
            stored = arr["key"]
            idx = np.minimum(np.searchsorted(stored, query), len(arr) - 1)
            hit = (stored[idx] == query) & fits & ~found
            if hit.any():
                rec = arr[idx[hit]]
                logp[hit] = rec["logp"]
                count[hit] = rec["count"]
                found |= hit
        return logp, count, found

    def _missing_error(self, keys, found) -> RefCacheKeyError:
        missing = [keys[i] for i in np.flatnonzero(~found)]
        return RefCacheKeyError(
            f"sequence {missing[0]} not in cache {self.dir} ({len(missing)} of {len(keys)} keys missing): the cache "
            f"was built for another train set; rebuild with: {build_command(self.dir)}"
        )

    def lookup(self, sequence_keys: Sequence[tuple[str, str]], *, with_counts: bool = False):
        """fp32 tensor [K] of summed reference log-probs (and int64 token counts [K] with with_counts)."""
        keys = [(str(p), str(s)) for p, s in sequence_keys]
        logp, count, found = self._find(keys)
        if not found.all():
            raise self._missing_error(keys, found)
        values = torch.from_numpy(logp)
        return (values, torch.from_numpy(count.astype(np.int64))) if with_counts else values

    def fill(self, batch, *, check_counts: bool = True):
        """Set batch.ref_chosen_logps / ref_rejected_logps [P] (fp32, on the batch's device) from pair_ids.

        check_counts compares the cached token count of every sequence with the batch's own: a
        mismatch means the batch was tokenised differently from the cached rows (one small host sync).
        """
        pair_ids = [str(p) for p in batch.pair_ids]
        keys = [(p, "chosen") for p in pair_ids] + [(p, "rejected") for p in pair_ids]
        values, counts = self.lookup(keys, with_counts=True)
        n = len(pair_ids)
        if check_counts:
            self._check_counts(batch, counts[:n], counts[n:], keys)
        device = batch.input_ids.device
        batch.ref_chosen_logps = values[:n].to(device, non_blocking=True)
        batch.ref_rejected_logps = values[n:].to(device, non_blocking=True)
        return batch

    def _check_counts(self, batch, chosen_counts, rejected_counts, keys) -> None:
        targets = batch.targets.reshape(-1)
        seg = batch.segment_ids.reshape(-1).long()
        valid = (targets != IGNORE_INDEX) & (seg >= 0)
        per_seg = torch.bincount(seg[valid], minlength=int(batch.num_segments)).cpu()
        have = torch.cat([per_seg[batch.chosen_segments.long().cpu()], per_seg[batch.rejected_segments.long().cpu()]])
        want = torch.cat([chosen_counts, rejected_counts])
        bad = torch.nonzero(have != want).flatten().tolist()
        if bad:
            i = bad[0]
            raise RefCacheError(
                f"sequence {keys[i]} has {int(have[i])} target tokens in this batch but {int(want[i])} in cache "
                f"{self.dir} ({len(bad)} sequences differ): the cache was built from a different tokenisation; "
                f"rebuild it: {build_command(self.dir)}"
            )
