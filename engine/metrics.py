"""Diversity and quality metrics on plain texts and embedding arrays.

This is the last stop of the flow: after training, `engine.evaluate` samples a few responses per
prompt and scores each prompt's group of samples with the functions here; the same functions score
groups of human responses, so a model can be compared with people. Everything here is a pure
function of texts (or of an embedding array): no models, no torch, importable anywhere.

Definitions follow the paper's evaluation code (Chung et al. 2025, which uses the `diversity`
package of Shaib et al.) with its rough edges made explicit:
- n-gram diversity: the samples joined with single spaces and split on whitespace; the sum over
  n = 1..max_n of distinct n-grams / total n-grams. n-grams may span the boundary between two
  samples, as in the reference code. A size n with no n-grams (fewer than n words) adds 0.
  Range [0, max_n]; max_n when no n-gram repeats (e.g. disjoint vocabularies).
- compression ratio: UTF-8 size of the space-joined samples / size of its gzip compression (level 9,
  as Python's GzipFile writes by default). Higher = more repetitive. The gzip header is written
  without file name and with mtime 0, so the value is deterministic; the reference code compressed a
  named temp file, whose header is longer by the name's length + 1 byte.
- homogenization: the mean over ordered pairs i != j of the ROUGE-L F-measure (rouge-score's
  scorer, no stemming) between samples i and j. Two samples with identical text score 1 even when
  ROUGE's tokenizer finds no tokens in them (it returns 0 for empty text); the reference code scored
  identical texts 0, a bug that made duplicated samples look diverse. Fewer than 2 samples: NaN.
- embedding diversity (semantic / style): mean pairwise cosine distance 1 - cos(e_i, e_j) over
  pairs i != j of the rows. Fewer than 2 rows: 0.0 (no spread). A zero row has cosine similarity 0
  with every row (distance 1).
"""

from __future__ import annotations

import gzip
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

# Scalars reported per prompt and averaged over prompts; the order is the report's column order.
DIVERSITY_KEYS = ("semantic_diversity", "style_diversity", "ngram_diversity", "compression_ratio", "homogenization")
NONE_LABEL = "none"  # share key for samples the ground truth could not label


def ngram_diversity(texts: Sequence[str], max_n: int = 4) -> float:
    """Sum over n = 1..max_n of distinct / total n-grams of the space-joined, whitespace-split texts.

    Example: ["a b c", "a b d"] -> words a b c a b d; unigrams 4/6, bigrams 4/5 (ab bc ca ab bd),
    trigrams 4/4, 4-grams 3/3 -> 2/3 + 4/5 + 1 + 1 = 3.4667.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    words = " ".join(texts).split()
    score = 0.0
    for n in range(1, max_n + 1):
        total = len(words) - n + 1
        if total <= 0:
            continue  # fewer than n words: this size has no n-grams and contributes 0
        distinct = len({tuple(words[i : i + n]) for i in range(total)})
        score += distinct / total
    return score


def compression_ratio(texts: Sequence[str]) -> float:
    """UTF-8 bytes of the space-joined texts / bytes of their gzip compression (higher = more repetitive).

    Empty input gives 0.0 (0 bytes over a 20-byte empty gzip stream).
    """
    data = " ".join(texts).encode("utf-8", errors="surrogatepass")
    compressed = gzip.compress(data, compresslevel=9, mtime=0)
    return len(data) / len(compressed)


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


def homogenization(texts: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over ordered pairs i != j of the texts; NaN for fewer than 2 texts.

    ROUGE-L F is symmetric in (target, prediction) (precision and recall swap, their harmonic mean
    does not change), so each unordered pair is scored once and counts for both orders.
    """
    n = len(texts)
    if n < 2:
        return float("nan")
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            total += rouge_l(texts[i], texts[j])
    return total / (n * (n - 1) / 2)


def embedding_diversity(embeddings) -> float:
    """Mean pairwise cosine distance of the rows of an [n, d] array; 0.0 for fewer than 2 rows."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [n, d] array, got shape {e.shape}")
    n = e.shape[0]
    if n < 2:
        return 0.0
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


def text_metrics(texts: Sequence[str], max_n: int = 4) -> dict[str, float]:
    """The embedding-free metrics of one prompt's samples: n-gram diversity, compression, homogenization, lengths."""
    out = {
        "n_samples": float(len(texts)),
        "ngram_diversity": ngram_diversity(texts, max_n=max_n),
        "compression_ratio": compression_ratio(texts),
        "homogenization": homogenization(texts),
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
