"""Reference log-prob cache: compute the frozen reference model's log-probs once, read them in training.

Where this sits in the flow: DPO/DDPO need, for every pair, the reference model's summed log-prob of
the chosen and of the rejected response. Computing them inside the step costs one extra forward per
micro-batch and a second model copy in memory. This module runs the reference over the packed train
rows once (exactly the rows, tokens and micro-batches training uses), writes the per-sequence values
to a directory shared by every rank, node and later run, and the trainer then fills
`PackedBatch.ref_chosen_logps / ref_rejected_logps` by sequence key with no reference model loaded:

    prepared rows -> reference_logps (trunk + kernels.linear_logprob) -> part files + manifest
    PackedBatch.pair_ids -> RefCache.fill -> fused_preference_loss

Layout of a cache directory:
- `build.json`: the build plan (fingerprint, which packed rows go into which part, a hash of each
  part's sequence keys). Written first, so an interrupted build resumes against the same plan.
  Multi-node builds need the directory on a filesystem every node sees (rank 0 plans and finalises).
- `part-00000.npy` ...: numpy arrays of records (key bytes "<pair_id>/c" or "<pair_id>/r", float32
  summed log-prob, int32 token count), sorted by key. Parts are fixed slices of the train rows,
  shared round-robin among the ranks; so the set of files and their bytes do not depend on the
  number of processes, and a 2-process build equals a 1-process build byte for byte.
- `manifest.json`: written last (atomically), only when every part exists: the fingerprint, each
  part's sha256, size and record count. No timestamps: two builds of the same inputs give the same
  directory, byte for byte, whether or not one of them was killed and resumed.

The fingerprint (`cache_fingerprint`) holds everything the values depend on; a cache whose
fingerprint differs from the run's is refused with the names of the differing fields. Objective,
beta and other training settings are not in it, so runs that differ only in them share one cache.
Numerical settings that change values only by rounding (attention kernel, loss backend, device) are
left out on purpose, so a cache built on one machine serves another. Likewise the build forms
micro-batches of `data.rows_per_batch` consecutive rows, while training samples rows into batches:
with one row per batch (the default) cached and on-the-fly values are the same bits, with several
they can differ by float rounding only (packed sequences never see each other).

Reading: `RefCache.open` checks the fingerprint and every shard's sha256, then memory-maps the
parts; a lookup is one binary search per part over the sorted keys (vectorised over the batch).

CLI (same config loader and overrides as training):
    torchrun [--nproc_per_node N] -m engine.refcache build --config F [--ref_cache.dir D] [--rows_per_part K]
    python -m engine.refcache info <dir>
    python -m engine.refcache verify <dir> [--config F ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from engine.data.packing import IGNORE_INDEX

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "build.json"
LOCK_NAME = ".build.lock"
SIDES = ("chosen", "rejected")
_SIDE_CODE = {"chosen": "c", "rejected": "r"}
# Packed rows per part file: small enough that a killed build loses little work, large enough that
# a lookup (one binary search per part) stays cheap. 256 rows of 2048 tokens are ~0.5M tokens.
ROWS_PER_PART = 256
# Test hook: a build process SIGKILLs itself after writing this many parts (used by the resume test).
KILL_AFTER_PARTS_ENV = "ENGINE_REFCACHE_KILL_AFTER_PARTS"
# How the data pipeline truncates (engine.data): part of what the cached values depend on.
TRUNCATION_POLICY = "prompt: keep start (max_prompt_length); sequence: cut response end (max_length); drop responses > max_response_tokens"

# Calls that load or run a reference model, so the trainer (and tests) can assert that a run using
# the cache never did either.
COUNTERS = {"reference_model_loads": 0, "reference_forwards": 0}


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


# ------------------------------------------------------------------------------------ reference forward


def sequence_logps(model, batch, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [S] fp32, token count [S] int64) of every segment of a PackedBatch under `model`.

    The trunk gets the [R, L] rows exactly as the trainer's policy forward does; SDPA /
    flash-attention keep the packed sequences apart through the position ids (attention_mask=None).
    The [N, V] logits are never built: ddpo_kernels.linear_logprob reduces the flattened hidden states
    and the LM head weight directly, with the walk of the policy's fused loss (fixed-shape GEMMs, the
    same row kernels, sums in sequence order), so for equal hidden states and weights the policy's
    log-probs are these bits whatever the batches (tests/test_kernels.py, test_step0_margins_*).
    """
    from engine.model import trunk_and_head
    from ddpo_kernels import linear_logprob

    trunk, head = trunk_and_head(model)
    with torch.no_grad():
        out = trunk(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=None,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = head.weight
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        logps, counts = linear_logprob(
            hidden,
            weight,
            batch.targets.reshape(-1),
            batch.segment_ids.reshape(-1),
            int(batch.num_segments),
            ignore_index=IGNORE_INDEX,
            backend=backend,
            schedule=batch.schedule,
        )
    COUNTERS["reference_forwards"] += 1
    return logps.float(), counts


def reference_logps(model, batch, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) fp32 reference log-probs of a PackedBatch, under torch.no_grad().

    The one function that computes reference values: the cache build and the trainer's on-the-fly
    path both call it, so cached and on-the-fly values are the same computation. For a peft model
    whose base is the reference, wrap the call in `model.disable_adapter()` (on_the_fly_reference does).
    """
    logps, _ = sequence_logps(model, batch, backend=backend)
    return logps[batch.chosen_segments.long()], logps[batch.rejected_segments.long()]


def reference_model_name(cfg) -> str:
    return cfg.ref_cache.model or cfg.model.name


def load_reference_model(cfg, *, device: str | torch.device = "cpu"):
    """The frozen reference model of a run (eval mode, no grads, no LoRA), in ref_cache.dtype.

    Loaded from its source (not copied from the policy), so a run resumed from a checkpoint still
    gets the initial weights. A named random-init architecture is built in model.dtype (the policy's
    initial weights) and then cast, so a bf16 reference equals the fp32 policy rounded to bf16.
    """
    from engine.config import NAMED_ARCHITECTURES
    from engine.model import load_model

    name = reference_model_name(cfg)
    named = name in NAMED_ARCHITECTURES
    load_dtype = cfg.model.dtype if named else cfg.ref_cache.dtype
    mcfg = dataclasses.replace(cfg.model, dtype=load_dtype, lora_r=0, gradient_checkpointing=False)
    model = load_model(mcfg, device=device, name=name, for_training=False)
    target = getattr(torch, cfg.ref_cache.dtype)
    if next(model.parameters()).dtype != target:
        model = model.to(target)
    COUNTERS["reference_model_loads"] += 1
    return model


def _unwrap(model):
    """The nn.Module under DDP / DeepSpeed engine wrappers (they expose it as `.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for the reference forward, then every submodule back to its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def on_the_fly_reference(policy_model, cfg, *, backend: str | None = None) -> Callable:
    """A callable batch -> (chosen [P], rejected [P]) computing reference log-probs during training.

    With LoRA (a PeftModel whose base is the reference, i.e. ref_cache.model unset or equal to
    model.name) the policy itself with adapters disabled is the reference: no second copy. The
    base then runs in the policy's dtype. Otherwise a frozen reference is loaded once, on the
    policy's device. The returned callable has `.model` (the separate reference, or None).
    """
    backend = backend or cfg.loss.backend
    policy = _unwrap(policy_model)
    if _is_peft(policy) and reference_model_name(cfg) == cfg.model.name:

        def ref_from_base(batch):
            with _eval_mode(policy), policy.disable_adapter():
                return reference_logps(policy, batch, backend=backend)

        ref_from_base.model = None
        return ref_from_base

    device = next(policy.parameters()).device
    ref_model = load_reference_model(cfg, device=device)

    def ref_from_copy(batch):
        return reference_logps(ref_model, batch, backend=backend)

    ref_from_copy.model = ref_model
    return ref_from_copy


# ----------------------------------------------------------------------------------------- fingerprint


def _sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _weights_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by (path, size, mtime) so one process hashes a multi-GB checkpoint once (~1 GB/s).
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        h.update(_sha256_file(Path(path)).encode())
    return h.hexdigest()


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit of a hub model in the local HF cache (snapshots/<commit>/config.json), when present."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id, no cache: fall back to the name and revision
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def model_identity(name: str, *, seed: int, revision: str | None, init_dtype: str = "float32") -> str:
    """What the reference weights are: named arch + seed (+ init dtype), a local directory's weight hash,
    or hub name@commit (the cached snapshot's commit when known, else the revision asked for)."""
    from engine.config import NAMED_ARCHITECTURES

    if name in NAMED_ARCHITECTURES:
        return f"named:{name}:seed={seed}:init={init_dtype}"
    path = Path(name)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pt"))
        if not weights:
            raise RefCacheError(
                f"reference model directory {path} holds no *.safetensors / *.bin / *.pt weight files; "
                "point ref_cache.model (or model.name) at a save_pretrained directory"
            )
        # config.json changes the function too (rope scaling, norms), not only the tensors.
        files = weights + ([path / "config.json"] if (path / "config.json").is_file() else [])
        stats = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        return f"local:sha256:{_weights_digest(stats)}"
    return f"hub:{name}@{_hub_commit(name, revision) or revision or 'default-branch'}"


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return _sha256_hex(body + "\n" + special)


def _train_rows(prepared) -> list:
    rows = getattr(prepared, "train_rows", None)
    if rows is None:
        raise TypeError(f"expected engine.data.PreparedData with .train_rows; got {type(prepared).__name__}")
    return list(rows)


def data_digest(rows: Sequence) -> str:
    """sha256 of the sorted sequence keys of the train rows.

    Keys are content hashes (pair_id covers prompt and both response texts), so this identifies the
    data exactly while ignoring deviation weights and row order: DPO and DDPO runs share a cache.
    """
    keys = sorted(_encode_key(k) for row in rows for k in _row_keys(row))
    return _sha256_hex(b"\n".join(keys))


def cache_fingerprint(cfg, tokenizer, prepared) -> dict:
    """Everything the cached values depend on, as flat named fields (compared field by field on load)."""
    import engine

    name = reference_model_name(cfg)
    separate = cfg.ref_cache.model is not None and cfg.ref_cache.model != cfg.model.name
    return {
        "engine_version": engine.__version__,
        "ref_model": model_identity(
            name, seed=cfg.model.seed, revision=None if separate else cfg.model.revision, init_dtype=cfg.model.dtype
        ),
        "ref_dtype": cfg.ref_cache.dtype,
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": _sha256_hex(getattr(tokenizer, "chat_template", None) or ""),
        "data": data_digest(_train_rows(prepared)),
        "tokenization": str(getattr(prepared, "tokenization_fingerprint", "")),
        "max_length": int(cfg.data.max_length),
        "max_prompt_length": int(cfg.data.max_prompt_length),
        "max_response_tokens": int(cfg.data.max_response_tokens),
        "truncation": TRUNCATION_POLICY,
        "nll_on_prompt": bool(cfg.loss.nll_on_prompt),
    }


def fingerprint_diff(cached: dict, current: dict) -> list[str]:
    return sorted(k for k in set(cached) | set(current) if cached.get(k) != current.get(k))


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------------------ keys, files


def _row_keys(row) -> list[tuple[str, str]]:
    """(pair_id, side) of every sequence in a packed row, in segment order."""
    keys = getattr(row, "sequence_keys", None)
    if keys is None:
        raise TypeError(f"a packed row must expose sequence_keys [(pair_id, side), ...]; got {type(row).__name__}")
    return [(str(p), str(s)) for p, s in keys]


def _encode_key(key: tuple[str, str]) -> bytes:
    pair_id, side = key
    if side not in _SIDE_CODE:
        raise ValueError(f"sequence side must be 'chosen' or 'rejected'; got {side!r} for pair {pair_id}")
    return f"{pair_id}/{_SIDE_CODE[side]}".encode("ascii")


def _record_dtype(key_bytes: int) -> np.dtype:
    return np.dtype([("key", f"S{key_bytes}"), ("logp", "<f4"), ("count", "<i4")])


def _part_name(index: int) -> str:
    return f"part-{index:05d}.npy"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write via a hidden temp file in the same directory, fsync, rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefCacheError(f"{what} {path} cannot be read ({e}); delete it and rebuild: {build_command(path.parent)}") from None


# ------------------------------------------------------------------------------------------- the cache


class RefCache:
    """A finished, verified cache directory, memory-mapped; values are looked up by sequence key."""

    def __init__(self, cache_dir: Path, manifest: dict, parts: list[np.ndarray]):
        self.dir = cache_dir
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self._parts = parts
        self._key_dtype = np.dtype(f"S{manifest['key_bytes']}")
        self._counters_at_open = dict(COUNTERS)

    def assert_no_reference_used(self) -> None:
        """Raise AssertionError if a reference model was loaded or run in this process since the cache was opened.

        The trainer calls it after its steps: a run that reads the cache must never pay for a reference.
        """
        delta = {k: COUNTERS[k] - self._counters_at_open.get(k, 0) for k in COUNTERS}
        if any(delta.values()):
            raise AssertionError(
                f"reference cache {self.dir} is in use, yet since it was opened this process loaded a reference model "
                f"{delta['reference_model_loads']} time(s) and ran {delta['reference_forwards']} reference forward(s)"
            )

    @classmethod
    def open(cls, cache_dir: str | Path, expected_manifest_fingerprint: dict | None = None, *, verify: bool = True) -> "RefCache":
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
        dtype = _record_dtype(manifest["key_bytes"])
        parts = []
        for part in manifest["parts"]:
            path = cache_dir / part["file"]
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise RefCacheError(
                    f"shard {path} of reference cache {cache_dir} cannot be read ({e}); rebuild it: {build_command(cache_dir)}"
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
        enc = [_encode_key(k) for k in keys]
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
            f"sequence {missing[0]} not in cache {self.dir} ({len(missing)} of {len(keys)} keys missing): the cache was built "
            f"for another train set; rebuild with: {build_command(self.dir)}"
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
                f"sequence {keys[i]} has {int(have[i])} target tokens in this batch but {int(want[i])} in cache {self.dir} "
                f"({len(bad)} sequences differ): the cache was built from a different tokenisation; rebuild it: {build_command(self.dir)}"
            )


def read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        plan_path = cache_dir / PLAN_NAME
        if plan_path.is_file():
            plan = _read_json(plan_path, "build plan")
            done = sum((cache_dir / p["file"]).is_file() for p in plan["parts"])
            state = f"an unfinished build ({done}/{len(plan['parts'])} parts) is there; rerun the build to resume it"
        else:
            state = "no cache has been built there"
        raise RefCacheError(f"no reference cache at {cache_dir} ({MANIFEST_NAME} missing: {state}): {build_command(cache_dir)}")
    manifest = _read_json(path, "manifest")
    if manifest.get("format") != FORMAT_VERSION:
        raise RefCacheError(
            f"reference cache {cache_dir} has format {manifest.get('format')!r}, this engine reads format {FORMAT_VERSION}; "
            f"rebuild it: {build_command(cache_dir)}"
        )
    return manifest


def check_fingerprint(cache_dir: Path, cached: dict, current: dict) -> None:
    diff = fingerprint_diff(cached, current)
    if diff:
        detail = ", ".join(f"{k} (cache: {_short(cached.get(k))}, this run: {_short(current.get(k))})" for k in diff)
        raise RefCacheError(
            f"reference cache {cache_dir} was built for different inputs; differing field(s): {detail}. "
            f"Use another ref_cache.dir for this run, or delete {cache_dir} and rebuild: {build_command(cache_dir)}"
        )


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
            problems.append(f"shard {part['file']} has {size} bytes, manifest says {part['bytes']} (truncated or overwritten)")
            continue
        digest = _sha256_file(path)
        if digest != part["sha256"]:
            problems.append(f"shard {part['file']} is corrupted (sha256 {digest[:12]}..., manifest {part['sha256'][:12]}...)")
    return problems


# ------------------------------------------------------------------------------------------- the build


def cache_dir_for(cfg) -> Path:
    return Path(cfg.ref_cache.dir) if cfg.ref_cache.dir else Path(cfg.logging.run_dir) / "ref_cache"


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _agree(error: BaseException | None) -> None:
    """Collective: if any rank failed, every rank raises (so none waits forever at the next barrier)."""
    d = _dist()
    if d is None:
        if error is not None:
            raise error
        return
    msgs: list = [None] * d.get_world_size()
    d.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, msg in enumerate(msgs):
        if msg is not None:
            raise RefCacheError(f"reference cache build failed on rank {rank}: {msg}")


def _broadcast_from_zero(obj):
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def _shared_fingerprint(cfg, tokenizer, prepared, rank: int) -> dict:
    """The fingerprint, computed on rank 0 only (a local reference's weights are hashed once, not per rank)."""
    error, fingerprint = None, None
    if rank == 0:
        try:
            fingerprint = cache_fingerprint(cfg, tokenizer, prepared)
        except Exception as e:  # every rank must learn of it, see _agree
            error = e
    _agree(error)
    return _broadcast_from_zero(fingerprint)


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
        raise RefCacheError("the train set has no packed rows: nothing to cache (check data.source and the data report)")
    parts, key_bytes = [], 1
    for index, start in enumerate(range(0, len(rows), rows_per_part)):
        stop = min(len(rows), start + rows_per_part)
        keys = sorted({_encode_key(k) for row in rows[start:stop] for k in _row_keys(row)})
        key_bytes = max([key_bytes] + [len(k) for k in keys])
        parts.append({"file": _part_name(index), "rows": [start, stop], "keys_sha256": _sha256_hex(b"\n".join(keys))})
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "rows_per_part": rows_per_part,
        "rows_per_batch": rows_per_batch,
        "num_rows": len(rows),
        "key_bytes": key_bytes,
        "parts": parts,
    }


def _part_is_valid(path: Path, plan: dict, part: dict, known_sha: str | None) -> bool:
    """A part file left by an earlier build counts as done when it matches the plan (and the old manifest)."""
    if known_sha is not None:
        return _sha256_file(path) == known_sha
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return False
    if arr.dtype != _record_dtype(plan["key_bytes"]) or arr.ndim != 1:
        return False
    return _sha256_hex(b"\n".join(arr["key"].tolist())) == part["keys_sha256"]


def _plan_digest(plan: dict) -> str:
    return _sha256_hex(json.dumps(plan, sort_keys=True))


def _prepare_dir(cache_dir: Path, plan: dict, *, overwrite: bool, log: Callable) -> tuple[list[int], bool]:
    """Rank 0, under the lock: reconcile the directory with the plan.

    Returns (part indices still to compute, whether a finished manifest for this plan is already there).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(".*.tmp.*"):  # temp files of a killed build
        stale.unlink(missing_ok=True)
    manifest_path, plan_path = cache_dir / MANIFEST_NAME, cache_dir / PLAN_NAME
    digest = _plan_digest(plan)
    known: dict[str, str] = {}  # part file -> sha256 from a finished manifest of this very plan
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
        if old.get("plan_sha256") == digest:
            known = {p["file"]: p["sha256"] for p in old.get("parts", [])}
    try:
        same_plan = plan_path.is_file() and json.loads(plan_path.read_text()) == plan
    except ValueError:  # an unreadable plan is as good as none
        same_plan = False
    if not same_plan and not known:
        # Parts on disk (if any) were planned for other inputs or another layout.
        if manifest_path.is_file():
            manifest_path.unlink()
        stale_parts = sorted(cache_dir.glob("part-*.npy"))
        if stale_parts:
            log(f"refcache: {cache_dir} holds {len(stale_parts)} parts of another build plan; discarding them")
        for old_part in stale_parts:
            old_part.unlink()
    todo, bad = [], []
    for index, part in enumerate(plan["parts"]):
        path = cache_dir / part["file"]
        if path.is_file() and _part_is_valid(path, plan, part, known.get(part["file"])):
            continue
        if path.is_file():
            bad.append(path)
        todo.append(index)
    extra = sorted(set(p.name for p in cache_dir.glob("part-*.npy")) - {p["file"] for p in plan["parts"]})
    # The manifest must never describe parts that are about to change: remove it before touching them.
    if manifest_path.is_file():
        manifest_path.unlink()
    for path in bad:
        log(f"refcache: part {path.name} does not match the plan or its checksum; recomputing it")
        path.unlink()
    for name in extra:
        (cache_dir / name).unlink()
    if not same_plan:
        _write_json(plan_path, plan)
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
        seg_logps, seg_counts = sequence_logps(model, batch, backend=backend)
        if len(batch.sequence_keys) != seg_logps.numel():
            raise RuntimeError(
                f"batch has {len(batch.sequence_keys)} sequence keys but {seg_logps.numel()} segments; "
                "engine.data.collate must give one key per segment"
            )
        keys.extend(_encode_key((str(p), str(s))) for p, s in batch.sequence_keys)
        logps.append(seg_logps.cpu().numpy())
        counts.append(seg_counts.cpu().numpy())
    rec = np.zeros(len(keys), dtype=_record_dtype(plan["key_bytes"]))
    rec["key"] = keys
    rec["logp"] = np.concatenate(logps) if logps else []
    rec["count"] = np.concatenate(counts) if counts else []
    rec = rec[np.argsort(rec["key"], kind="stable")]
    # A sequence repeated in the data (same pair twice) is stored once: the first occurrence wins.
    _, first = np.unique(rec["key"], return_index=True)
    return rec[np.sort(first)]


def _finalize(cache_dir: Path, plan: dict) -> dict:
    parts, num_sequences, chosen, rejected = [], 0, set(), set()
    for part in plan["parts"]:
        path = cache_dir / part["file"]
        if not path.is_file():
            raise RefCacheError(f"part {path} is missing after every rank finished; rerun the build: {build_command(cache_dir)}")
        arr = np.load(path, allow_pickle=False)
        for key in arr["key"].tolist():
            pair_id, side = key.rsplit(b"/", 1)
            (chosen if side == b"c" else rejected).add(pair_id)
        parts.append({"file": part["file"], "sha256": _sha256_file(path), "bytes": path.stat().st_size, "records": int(len(arr))})
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
        "plan_sha256": _plan_digest(plan),
        "parts": parts,
    }
    _write_json(cache_dir / MANIFEST_NAME, manifest)
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
    rows_per_part: int = ROWS_PER_PART,
    overwrite: bool = False,
    backend: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Compute (or finish) the cache of the train rows; every rank of an initialised process group calls it.

    Resumable: parts already on disk that match the plan are kept, so a killed build picks up where
    it stopped and ends with the same bytes as an uninterrupted one. A finished cache with another
    fingerprint is an error unless overwrite=True.
    """
    if world_size > 1 and _dist() is None:
        raise RuntimeError(
            f"build_cache with world_size={world_size} needs an initialised torch.distributed process group (run under torchrun)"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_dir_for(cfg)
    backend = backend or cfg.loss.backend
    progress = cfg.logging.progress if progress is None else progress
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    rows = _train_rows(prepared)
    fingerprint = _shared_fingerprint(cfg, tokenizer, prepared, rank)
    plan = make_plan(rows, fingerprint, rows_per_part=rows_per_part, rows_per_batch=cfg.data.rows_per_batch)

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
            except Exception as e:  # every rank must learn of it, see _agree
                error = e
        _agree(error)
        todo, up_to_date = _broadcast_from_zero(state)
        if up_to_date:
            log(f"refcache: {cache_dir} is up to date (fingerprint matches, every shard verified)")
            return cache_dir
        # Round-robin over the parts still to do (balanced on resume too); which rank computes a part
        # does not change its bytes.
        mine = todo[rank::world_size]
        log(f"refcache: building {cache_dir}: {len(plan['parts'])} parts, {len(todo)} to compute on {world_size} rank(s)")

        error, model, t0, done_rows, done_tokens = None, None, time.perf_counter(), 0, 0
        kill_after = int(os.environ.get(KILL_AFTER_PARTS_ENV, "0") or 0)
        try:
            if mine:
                model = load_reference_model(cfg, device=device)
                from tqdm import tqdm

                total = sum(plan["parts"][i]["rows"][1] - plan["parts"][i]["rows"][0] for i in mine)
                bar = tqdm(total=total, unit="row", desc="ref log-probs", disable=not (progress and rank == 0))
                for written, index in enumerate(mine, start=1):
                    part = plan["parts"][index]
                    part_rows = rows[part["rows"][0] : part["rows"][1]]
                    rec = _compute_part(model, part_rows, plan, device=device, backend=backend)
                    _atomic_write(cache_dir / part["file"], lambda f, rec=rec: np.save(f, rec, allow_pickle=False))
                    done_rows += len(part_rows)
                    done_tokens += int(rec["count"].sum())
                    bar.update(len(part_rows))
                    if kill_after and written >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                bar.close()
        except Exception as e:
            error = e
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _agree(error)
        elapsed = time.perf_counter() - t0
        if done_rows:
            rate = done_tokens / max(elapsed, 1e-9)
            log(f"refcache: rank 0 computed {done_rows} rows, {done_tokens} target tokens in {elapsed:.1f}s ({rate:.0f} tok/s)")

        error = None
        if rank == 0:
            try:
                manifest = _finalize(cache_dir, plan)
                log(f"refcache: wrote {cache_dir / MANIFEST_NAME}: {manifest['num_sequences']} sequences, {manifest['num_pairs']} pairs")
            except Exception as e:
                error = e
        _agree(error)
    finally:
        if rank == 0:
            lock.__exit__(None, None, None)
    return cache_dir


def ensure_cache(cfg, tokenizer, prepared, *, device, rank: int = 0, world_size: int = 1, **build_kwargs) -> RefCache | None:
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
    _agree(error)
    status = _broadcast_from_zero(status)
    if status != "ok":
        if rank == 0 and status != "missing":
            print(f"refcache: WARNING: {cache_dir}: {status[len('repair: '):]}; recomputing those parts", file=sys.stderr, flush=True)
        build_cache(cfg, tokenizer, prepared, cache_dir=cache_dir, device=device, rank=rank, world_size=world_size, **build_kwargs)
    return RefCache.open(cache_dir, fingerprint)


# ------------------------------------------------------------------------------------------------- CLI


def describe(cache_dir: Path) -> str:
    """Manifest and coverage of a cache directory (finished or not), as text."""
    lines = [f"reference cache {cache_dir}"]
    manifest_path, plan_path = cache_dir / MANIFEST_NAME, cache_dir / PLAN_NAME
    if manifest_path.is_file():
        m = _read_json(manifest_path, "manifest")
        lines.append(f"  status: finished (format {m.get('format')})")
        lines.append(f"  sequences: {m['num_sequences']}  pairs with both sides: {m['num_pairs']}  packed rows: {m['num_rows']}")
        lines.append(f"  parts: {len(m['parts'])} ({m['rows_per_part']} rows each, micro-batches of {m['rows_per_batch']} rows)")
        size = sum(p["bytes"] for p in m["parts"])
        lines.append(f"  size: {size / 1024:.1f} KiB")
        fp = m["fingerprint"]
    elif plan_path.is_file():
        plan = _read_json(plan_path, "build plan")
        done = [p for p in plan["parts"] if (cache_dir / p["file"]).is_file()]
        rows_done = sum(p["rows"][1] - p["rows"][0] for p in done)
        lines.append(f"  status: unfinished build: {len(done)}/{len(plan['parts'])} parts, {rows_done}/{plan['num_rows']} packed rows "
                     f"({100.0 * rows_done / max(plan['num_rows'], 1):.1f}%); rerun the build to resume")
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
    b = sub.add_parser("build", help="compute the cache for a config (every --section.field override of training works)")
    b.add_argument("--rows_per_part", type=int, default=ROWS_PER_PART, help="packed rows per part file (resume granularity)")
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
                print(f"fix: rerun the build, which recomputes only these shards: {build_command(args.dir)}", file=sys.stderr)
                return 1
            print(f"reference cache {args.dir}: OK ({len(manifest['parts'])} shards, {manifest['num_sequences']} sequences)")
            return 0
        cfg = load_config(rest, prog="python -m engine.refcache build")
        rank, world_size, device = _init_distributed(cfg)
        tokenizer, prepared = _prepare_inputs(cfg)
        out = build_cache(
            cfg, tokenizer, prepared, device=device, rank=rank, world_size=world_size,
            rows_per_part=args.rows_per_part, overwrite=args.overwrite,
        )  # fmt: skip
        if rank == 0:
            print(describe(out))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    except (ConfigError, RefCacheError) as e:
        print(f"refcache error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
