"""Reference log-prob cache: compute the frozen reference model's log-probs once, read them in training.

Where this sits in the flow: DPO/DDPO need, for every pair, the reference model's summed log-prob of
the chosen and of the rejected response. Computing them inside the step costs one extra forward per
micro-batch and a second model copy in memory. This package runs the reference over the packed train
rows once (exactly the rows, tokens and micro-batches training uses), writes the per-sequence values
to a directory shared by every rank, node and later run, and the trainer then fills
`PackedBatch.ref_chosen_logps / ref_rejected_logps` by sequence key with no reference model loaded:

    prepared rows -> reference_logps (trunk + ddpo_kernels.linear_logprob) -> part files + manifest
    PackedBatch.pair_ids -> RefCache.fill -> fused_preference_loss

One concern per module:
- `reference`: loading the reference model and its forward (also the trainer's on-the-fly path);
- `fingerprint`: everything the cached values depend on, compared field by field;
- `format`: names, record layout, keys, manifest reads and shard verification;
- `reader`: `RefCache`, a verified, memory-mapped finished cache;
- `build`: the plan, the resumable distributed build, `ensure_cache` (the trainer's entry point);
- `cli`: `python -m engine.refcache build|info|verify`.

Layout of a cache directory:
- `build.json`: the build plan (fingerprint, which packed rows go into which part, a hash of each
  part's sequence keys). Written first, so an interrupted build resumes against the same plan.
  Multi-node builds need the directory on a filesystem every node sees (rank 0 plans and finalises).
- `part-00000.npy` ...: numpy arrays of records sorted by key (see `format`).
- `manifest.json`: written last (atomically), only when every part exists: the fingerprint, each
  part's sha256, size and record count. No timestamps: two builds of the same inputs give the same
  directory, byte for byte, whether or not one of them was killed and resumed.
"""

from engine.refcache.build import ROWS_PER_PART, build_cache, cache_dir_for, ensure_cache, make_plan
from engine.refcache.cli import describe, main
from engine.refcache.fingerprint import cache_fingerprint, check_fingerprint, fingerprint_diff, model_identity
from engine.refcache.format import (
    MANIFEST_NAME,
    PLAN_NAME,
    RefCacheError,
    RefCacheKeyError,
    build_command,
    read_manifest,
    verify_parts,
)
from engine.refcache.reader import RefCache
from engine.refcache.reference import (
    load_reference_model,
    on_the_fly_reference,
    reference_logps,
    reference_model_name,
    sequence_logps,
)

__all__ = [
    "MANIFEST_NAME",
    "PLAN_NAME",
    "ROWS_PER_PART",
    "RefCache",
    "RefCacheError",
    "RefCacheKeyError",
    "build_cache",
    "build_command",
    "cache_dir_for",
    "cache_fingerprint",
    "check_fingerprint",
    "describe",
    "ensure_cache",
    "fingerprint_diff",
    "load_reference_model",
    "main",
    "make_plan",
    "model_identity",
    "on_the_fly_reference",
    "read_manifest",
    "reference_logps",
    "reference_model_name",
    "sequence_logps",
    "verify_parts",
]
