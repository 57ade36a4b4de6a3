"""Diversity and quality metrics on plain texts and embedding arrays.

This is the last stop of the flow: after training, `engine.evaluate` samples a few responses per
prompt and scores each prompt's group of samples with the functions here; the same functions score
groups of human responses, so a model can be compared with people. Everything here is a pure
function of texts (or of an embedding array): no models, no torch, importable anywhere.

Two definitions of the text metrics, chosen by `compat` (`eval.metrics_compat`, `--metrics-compat`):

engine (the default): what each metric's name says.
- n-gram diversity: the samples joined with single spaces and split on any whitespace; the sum over
  n = 1..max_n of distinct n-grams / total n-grams. n-grams may span the boundary between two
  samples. A size n with no n-grams (fewer than n words) adds 0. Range [0, max_n]; max_n when no
  n-gram repeats (e.g. disjoint vocabularies).
- compression ratio: UTF-8 size of the space-joined samples / size of their gzip compression (level 9,
  mtime 0, no file name, so the value is a function of the texts). Higher = more repetitive.
- homogenization: the mean over ordered pairs i != j of the ROUGE-L F-measure (rouge-score, no
  stemming) between samples i and j; identical texts score 1 (ROUGE's tokenizer would give 0 to two
  texts without a word character). Fewer than 2 samples: NaN. Invariant to the order of the samples.
- embedding diversity (semantic / style): mean pairwise cosine distance 1 - cos(e_i, e_j) over
  pairs i != j of the rows. Fewer than 2 rows: 0.0 (no spread). A zero row has cosine similarity 0
  with every row (distance 1).

authors: the values of Chung et al.'s evaluation (github.com/mj-storytelling/DiversityTuning at
cb06958, its vendored copy of Shaib et al.'s `diversity` package), so that numbers can be set beside
the paper's. Differences from the engine's definitions, each read off their code:
- texts first go through their CSV: scripts_eval/generation_eval1_1.py:84-99 writes the samples with
  pandas, generation_eval1_2.py:24,31-34 reads them back and applies str(), so a sample pandas reads
  as missing (the empty string, "NA", "None", "null", ... `AUTHORS_CSV_MISSING`) is scored as "nan".
  Embedding diversity is computed before the CSV (generation_eval1_1.py:82-83) and is not affected;
- n-gram diversity (diversity/ngram_diversity.py:19-26): split on single spaces, so runs of spaces
  give empty "words" and newlines stay inside words; a size with no n-gram divides by zero there
  (NaN here); rounded to 3 decimals;
- compression ratio (diversity/compression.py:33-43,58): the denominator is the size of a gzip FILE
  named compressed.gz (its header holds the name "compressed") whose content is gzip.compress of the
  text, i.e. the text compressed twice; rounded to 3 decimals. The inner stream's header holds the
  time of the call (gzip.compress's default mtime), and its 4 bytes can change the outer size by a
  byte or two, so for some texts their value depends on the second it was computed; here the inner
  time is AUTHORS_GZIP_MTIME, their repository's first commit: their function as run at that second;
- homogenization (diversity/homogenization.py:40-65,73-74): ordered pairs are walked row by row and
  a row's sum is added (divided by n - 1) when the next row's TEXT differs, so the last row's sum is
  never added (the result is (n - 1) / n of the mean over the other rows, and depends on the order),
  consecutive identical samples merge into one row, and when nothing was added (every sample
  identical, or every earlier row scoring 0) the last row's undivided sum is used instead: n
  identical samples score n - 1, not 1. Identical texts score 1 there too (:73-74). One sample: 0.0;
  rounded to 3 decimals;
- embedding diversity (models/diversity_model.py:25-42, mean over each prompt's samples of their
  per-sample mean distance, which is the mean over pairs above): the same value up to their float32
  arithmetic (~1e-7); one sample: NaN (0/0 there; generation_eval2.py:54-59 writes NaN too).
Their aggregation over prompts is not in their repository; the engine averages per prompt (their CSV
holds one row per sample, so a row mean is the same with equal group sizes, as with 4 samples).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from engine.config import METRICS_COMPATS

# Scalars reported per prompt and averaged over prompts; the order is the report's column order.
DIVERSITY_KEYS = ("semantic_diversity", "style_diversity", "ngram_diversity", "compression_ratio", "homogenization")
NONE_LABEL = "none"  # share key for samples the ground truth could not label

# pandas 2.2.3's default `na_values` of read_csv (their requirements.txt pins pandas 2.2.3): a sample
# equal to one of these comes back from their CSV as NaN, which str() turns into "nan".
AUTHORS_CSV_MISSING = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
# Inner gzip header time of the authors' compression ratio (theirs: the time of the call). The time of their
# repository's first commit, 2025-03-21 13:28:33 UTC: a second at which they could have run it. Not 0, which
# gzip.compress(mtime=0) writes with another header on Python >= 3.11.
AUTHORS_GZIP_MTIME = 1742563713
# Their outer file is compressed.gz; GzipFile writes its name without ".gz", NUL-terminated, into the header.
_AUTHORS_GZIP_FNAME = b"compressed\0"
_GZIP_HEADER_BYTES, _GZIP_TRAILER_BYTES = 10, 8
_AUTHORS_DECIMALS = 3  # round(..., 3) in all three of their text metrics


def _check_compat(compat: str) -> None:
    if compat not in METRICS_COMPATS:
        raise ValueError(
            f"metrics compat must be one of {', '.join(METRICS_COMPATS)}, got {compat!r}; "
            "set eval.metrics_compat (--metrics-compat) to one of them"
        )


def authors_csv_texts(texts: Sequence[str]) -> list[str]:
    """The samples as the authors' metric script reads them back from their CSV: missing values -> "nan"."""
    return ["nan" if t in AUTHORS_CSV_MISSING else t for t in texts]


def ngram_diversity(texts: Sequence[str], max_n: int = 4, *, compat: str = "engine") -> float:
    """Sum over n = 1..max_n of distinct / total n-grams of the space-joined texts (see the module docstring).

    Example (engine): ["a b c", "a b d"] -> words a b c a b d; unigrams 4/6, bigrams 4/5 (ab bc ca ab bd),
    trigrams 4/4, 4-grams 3/3 -> 2/3 + 4/5 + 1 + 1 = 3.4667. authors: words split on single spaces, NaN
    when a size has no n-gram, rounded to 3 decimals.
    """
    _check_compat(compat)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    joined = " ".join(texts)
    words = joined.split(" ") if compat == "authors" else joined.split()
    score = 0.0
    for n in range(1, max_n + 1):
        total = len(words) - n + 1
        if total <= 0:
            if compat == "authors":
                return float("nan")  # theirs: len(set(ngrams)) / len(ngrams) with no n-gram, ZeroDivisionError
            continue  # fewer than n words: this size has no n-grams and contributes 0
        distinct = len({tuple(words[i : i + n]) for i in range(total)})
        score += distinct / total
    return round(score, _AUTHORS_DECIMALS) if compat == "authors" else score


def _gzip_member(data: bytes, mtime: int) -> bytes:
    """gzip.compress(data) as Python writes it for a nonzero mtime: a 10-byte header without file name
    (extra flags 2 for level 9, OS 255), the raw level-9 deflate stream, CRC32 and size."""
    header = struct.pack("<BBBBLBB", 0x1F, 0x8B, 8, 0, mtime, 2, 255)
    trailer = struct.pack("<LL", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + zlib.compress(data, level=9, wbits=-15) + trailer


def compression_ratio(texts: Sequence[str], *, compat: str = "engine") -> float:
    """UTF-8 bytes of the space-joined texts / bytes of their gzip compression (higher = more repetitive).

    engine: one gzip stream (level 9, mtime 0, no name); empty input gives 0.0 (0 bytes over a 20-byte
    empty stream). authors: the size of their compressed.gz file, which holds the text gzip-compressed
    twice (header with the name "compressed"; inner mtime AUTHORS_GZIP_MTIME), rounded to 3 decimals.
    """
    _check_compat(compat)
    data = " ".join(texts).encode("utf-8", errors="surrogatepass")
    if compat == "engine":
        return len(data) / len(gzip.compress(data, compresslevel=9, mtime=0))
    inner = _gzip_member(data, AUTHORS_GZIP_MTIME)
    # Their GzipFile: header + file name, the level-9 raw deflate of the inner member, CRC32 and size.
    outer = _GZIP_HEADER_BYTES + len(_AUTHORS_GZIP_FNAME) + len(zlib.compress(inner, level=9, wbits=-15))
    return round(len(data) / (outer + _GZIP_TRAILER_BYTES), _AUTHORS_DECIMALS)


_ROUGE_SCORER = None


def _rouge_scorer():
    # Building the scorer loads its tokenizer; keep one per process.
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE_SCORER


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of `prediction` against `target`; identical texts score 1."""
    if target == prediction:
        return 1.0
    return float(_rouge_scorer().score(target, prediction)["rougeL"].fmeasure)


def _pair_scores(texts: Sequence[str]) -> np.ndarray:
    """[n, n] ROUGE-L F of every pair, diagonal 0. ROUGE-L F is symmetric in (target, prediction), bit for bit
    (precision and recall swap; 2pr / (p + r) does not change), so each unordered pair is scored once."""
    n = len(texts)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = rouge_l(texts[i], texts[j])
    return sim


def homogenization(texts: Sequence[str], *, compat: str = "engine") -> float:
    """Mean ROUGE-L F-measure over ordered pairs i != j of the texts (see the module docstring).

    engine: NaN for fewer than 2 texts. authors: their row-by-row walk (the last row left out, consecutive
    identical texts merged, the undivided last row when nothing else scored), 0.0 for one text, NaN for none
    (an IndexError there), rounded to 3 decimals.
    """
    _check_compat(compat)
    n = len(texts)
    if compat == "engine":
        if n < 2:
            return float("nan")
        sim = _pair_scores(texts)
        return float(sum(sim[i, j] for i in range(n) for j in range(i + 1, n))) / (n * (n - 1) / 2)
    if n == 0:
        return float("nan")
    sim = _pair_scores(texts)
    # diversity/homogenization.py:45-65, summed in the same order so that the rounding is theirs too.
    corpus, row_sum, current = 0.0, 0.0, texts[0]
    for i in range(n if n > 1 else 0):  # one text: no pair, so no row is walked
        if texts[i] != current:
            corpus += row_sum / (n - 1)
            current, row_sum = texts[i], 0.0
        for j in range(n):
            if j != i:
                row_sum += sim[i, j]
    if corpus == 0:
        corpus += row_sum
    return round(float(corpus) / n, _AUTHORS_DECIMALS)


def embedding_diversity(embeddings, *, compat: str = "engine") -> float:
    """Mean pairwise cosine distance of the rows of an [n, d] array; fewer than 2 rows: 0.0 (authors: NaN)."""
    _check_compat(compat)
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [n, d] array, got shape {e.shape}")
    n = e.shape[0]
    if n < 2:
        return float("nan") if compat == "authors" else 0.0
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    off_diag = sim.sum() - np.trace(sim)
    mean_sim = off_diag / (n * (n - 1))
    return float(1.0 - mean_sim)


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    """Length of the samples in whitespace words and characters (mean, std, min, max) and the empty share."""
    if not texts:
        return {}
    words = np.array([len(t.split()) for t in texts], dtype=np.float64)
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    return {
        "length_words_mean": float(words.mean()),
        "length_words_std": float(words.std()),
        "length_words_min": float(words.min()),
        "length_words_max": float(words.max()),
        "length_chars_mean": float(chars.mean()),
        "empty_share": float(np.mean([not t.strip() for t in texts])),
    }


def label_shares(labels: Iterable[str | None], categories: Sequence[str]) -> dict[str, float]:
    """Share of each category among the labels, plus NONE_LABEL for unlabelled (None) samples.

    Every category appears in the result (0.0 when absent), so shares from different runs line up.
    """
    labels = list(labels)
    counts = Counter(NONE_LABEL if lab is None else lab for lab in labels)
    unknown = set(counts) - set(categories) - {NONE_LABEL}
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the categories {list(categories)}")
    total = len(labels)
    keys = list(categories) + [NONE_LABEL]
    return {k: (counts.get(k, 0) / total if total else 0.0) for k in keys}


def normalized_entropy(labels: Iterable[str | None], num_categories: int) -> float:
    """Shannon entropy of the labelled samples' category distribution divided by log(num_categories).

    1 = the samples spread evenly over all categories, 0 = one category (or no labelled sample).
    Unlabelled samples (None) are left out; their share is reported by `label_shares`.
    """
    counts = Counter(lab for lab in labels if lab is not None)
    total = sum(counts.values())
    if total == 0 or num_categories < 2:
        return 0.0
    h = -sum((c / total) * math.log(c / total) for c in counts.values())
    return max(0.0, h / math.log(num_categories))  # one category gives -0.0; report it as 0.0


def text_metrics(texts: Sequence[str], max_n: int = 4, *, compat: str = "engine") -> dict[str, float]:
    """The embedding-free metrics of one prompt's samples: n-gram diversity, compression, homogenization, lengths.

    authors: the three diversity metrics score the texts as read back from the authors' CSV
    (`authors_csv_texts`); the lengths always describe the samples themselves."""
    _check_compat(compat)
    scored = authors_csv_texts(texts) if compat == "authors" else texts
    out = {
        "n_samples": float(len(texts)),
        "ngram_diversity": ngram_diversity(scored, max_n=max_n, compat=compat),
        "compression_ratio": compression_ratio(scored, compat=compat),
        "homogenization": homogenization(scored, compat=compat),
    }
    out.update(length_stats(texts))
    return out


def mean_over_prompts(per_prompt: Sequence[dict]) -> dict[str, float]:
    """Average every scalar metric over prompts, skipping NaN/None (e.g. homogenization of 1 sample).

    Dict-valued and string entries are left out: shares are recomputed over all samples by the caller.
    A metric that is NaN for every prompt averages to NaN.
    """
    keys: list[str] = []
    for row in per_prompt:
        for k, v in row.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    out = {}
    for k in keys:
        vals = [row.get(k) for row in per_prompt]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        vals = [v for v in vals if not math.isnan(v)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
