"""The fingerprint of a reference cache: everything its values depend on, compared field by field.

Objective, beta and other training settings are not in it, so runs that differ only in them share a
cache. Numerical settings that change values only by rounding (attention kernel, loss backend,
device) are left out on purpose, so a cache built on one machine serves another.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from engine.fileio import sha256_file
from engine.refcache.format import RefCacheError, build_command, encode_key, row_keys, train_rows
from engine.refcache.reference import reference_model_name

# How the data pipeline truncates (engine.data): part of what the cached values depend on.
TRUNCATION_POLICY = (
    "prompt: keep start (max_prompt_length); sequence: cut response end (max_length); "
    "drop responses > max_response_tokens"
)


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def _weights_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by (path, size, mtime) so one process hashes a multi-GB checkpoint once (~1 GB/s).
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(Path(path).name.encode())
        h.update(sha256_file(path).encode())
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
    return sha256_hex(body + "\n" + special)


def data_digest(rows: Sequence) -> str:
    """sha256 of the sorted sequence keys of the train rows.

    Keys are content hashes (pair_id covers prompt and both response texts), so this identifies the
    data exactly while ignoring deviation weights and row order: DPO and DDPO runs share a cache.
    """
    keys = sorted(encode_key(k) for row in rows for k in row_keys(row))
    return sha256_hex(b"\n".join(keys))


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
        "chat_template": sha256_hex(getattr(tokenizer, "chat_template", None) or ""),
        "data": data_digest(train_rows(prepared)),
        "tokenization": str(getattr(prepared, "tokenization_fingerprint", "")),
        "max_length": int(cfg.data.max_length),
        "max_prompt_length": int(cfg.data.max_prompt_length),
        "max_response_tokens": int(cfg.data.max_response_tokens),
        "truncation": TRUNCATION_POLICY,
        "nll_on_prompt": bool(cfg.loss.nll_on_prompt),
    }


def fingerprint_diff(cached: dict, current: dict) -> list[str]:
    return sorted(k for k in set(cached) | set(current) if cached.get(k) != current.get(k))


def short_repr(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_fingerprint(cache_dir: Path, cached: dict, current: dict) -> None:
    diff = fingerprint_diff(cached, current)
    if diff:
        detail = ", ".join(
            f"{k} (cache: {short_repr(cached.get(k))}, this run: {short_repr(current.get(k))})" for k in diff
        )
        raise RefCacheError(
            f"reference cache {cache_dir} was built for different inputs; differing field(s): {detail}. "
            f"Use another ref_cache.dir for this run, or delete {cache_dir} and rebuild: {build_command(cache_dir)}"
        )
