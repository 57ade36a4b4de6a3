"""The published deviation-weight transform (Chung et al. 2025, DDPO/DORPO): scores -> weights.

Sits after deviation scores (scores.py) and before the data pipeline attaches one weight to each
side of every pair. Steps, exactly as the method defines them:
  1. per embedding model, per group: the "mean" deviation score of each response, min-max scaled
     within the group to [-1, 1]; a group whose scores are all equal (see Ties) gets 0 everywhere;
  2. models combined by the geometric mean on the [0, 1] scale:
         s = 2 * prod_m ((s_m + 1) / 2) ** (1 / M) - 1
  3. w_i = (s_i + 1) / mean_{k in group}(s_k + 1): weights average exactly 1 within every group;
     a group whose combined scores are all equal gets weight 1 everywhere.

Groups of one response: score 0 and weight 1 (also in knn mode and for DivPO's sets of one). The
authors' code divides 0 by 0 there (models/diversity_model.py:40, the sum of a 1 x 1 distance matrix
over n - 1 = 0), and the NaN runs through every later step
(scripts_dataset_cleaner/3_data_prep_for_diversified_training.py:100-145) into the weight. Their pairs
never form such a group (a pair adds two responses); `deviation.groups: all` does, for a prompt with a
single response (which then has no pair), and `python -m engine.deviation` reports the count
(`weight_summary`).

Ties. Equality is decided with `tie_atol` (default 1e-6 on the score scale); the authors test exact
equality (`div_max == div_min`, :103, and `min != max`, :143). The scores of a group of two are equal
in exact arithmetic (both are the one distance), as are those of duplicate texts, but not in floating
point: the O(N d) mean-distance identity here, and their float32 n x n matrix product whenever it is
not bit-symmetric, leave ~1e-12..1e-7 between them, which exact equality followed by min-max scaling
turns into +-1 (weights 0 and 2 instead of 1 and 1). The tolerance gives the exact-arithmetic answer
whatever the hardware; exact equality would only trade their rounding noise for ours, so it is not
offered. A real deviation spread below 1e-6 carries no signal anyway.

The authors compute the same weight in two steps: a score (s n - sum s) / (n + sum s) per response
(scripts_dataset_cleaner/3_data_prep_for_diversified_training.py:143-145), to which their trainers add
1 (models/ddpo_trainer.py:1237, models/dorpo_trainer.py:701,834); that is n (s + 1) / sum(s + 1),
step 3 here.

Options:
- max_per_prompt: only the first `max_per_prompt` rows of each group (input order) take part;
  the others get score 0 and the neutral weight 1 and are flagged in `considered` (the engine's
  groups; the authors' cap drops pairs instead: engine.data.pairs.paired_groups);
- `counts` (count_duplicates): a response used by c pairs counts as c copies in the mean distance
  of step 1 (its copies sit at distance 0 from it), as the authors' group lists hold one entry per
  pair use (3_data_prep_for_diversified_training.py:62-67,84); the scaling of step 1 and the mean
  of step 3 still count each distinct response once, as theirs run over a dict keyed by text
  (:86,98-111,140-145).
The authors also have a flag flooring the REJECTED response's score at -0.8 (`--min_score_non_zero`,
:147-149, off by default); neither of their trainers reads the rejected score, so the flag changes
no published training and has no counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scores import deviation_scores, group_codes

DEFAULT_TIE_ATOL = 1e-6


def minmax_scale_groups(
    scores: np.ndarray, codes: np.ndarray, n_groups: int, tie_atol: float = DEFAULT_TIE_ATOL
) -> np.ndarray:
    """Step 1's scaling: per group, map [min, max] linearly to [-1, 1]; all-equal groups -> 0."""
    scores = np.asarray(scores, dtype=np.float64)
    gmin = np.full(n_groups, np.inf)
    gmax = np.full(n_groups, -np.inf)
    np.minimum.at(gmin, codes, scores)
    np.maximum.at(gmax, codes, scores)
    rng = gmax - gmin
    tie = rng <= tie_atol
    denom = np.where(tie, 1.0, rng)
    scaled = 2.0 * (scores - gmin[codes]) / denom[codes] - 1.0
    scaled[tie[codes]] = 0.0
    return scaled


def combine_geometric(scaled: list[np.ndarray]) -> np.ndarray:
    """Step 2: s = 2 * prod_m ((s_m + 1) / 2) ** (1 / M) - 1 (geometric mean on the [0, 1] scale)."""
    if not scaled:
        raise ValueError("no per-model scores to combine: give at least one embedding model")
    m = len(scaled)
    acc = np.ones_like(np.asarray(scaled[0], dtype=np.float64))
    for s in scaled:
        acc *= np.clip((np.asarray(s, dtype=np.float64) + 1.0) / 2.0, 0.0, None) ** (1.0 / m)
    return 2.0 * acc - 1.0


def normalise_weights(
    combined: np.ndarray, codes: np.ndarray, n_groups: int, tie_atol: float = DEFAULT_TIE_ATOL
) -> np.ndarray:
    """Step 3: w = (s + 1) / mean_group(s + 1); groups whose combined scores are all equal get weight 1."""
    a = np.asarray(combined, dtype=np.float64) + 1.0
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    mean = np.bincount(codes, weights=a, minlength=n_groups) / np.maximum(n, 1.0)
    gmin = np.full(n_groups, np.inf)
    gmax = np.full(n_groups, -np.inf)
    np.minimum.at(gmin, codes, a)
    np.maximum.at(gmax, codes, a)
    tie = (gmax - gmin) <= tie_atol
    w = a / np.where(tie, 1.0, mean)[codes]
    w[tie[codes]] = 1.0
    return w


def first_per_group(codes: np.ndarray, n_groups: int, max_per_group: int | None) -> np.ndarray:
    """Mask of the first `max_per_group` rows of each group in input order (all rows when None)."""
    n = len(codes)
    if max_per_group is None:
        return np.ones(n, dtype=bool)
    if max_per_group < 1:
        raise ValueError(f"max_per_prompt must be >= 1 or None, got {max_per_group}")
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.zeros(n_groups, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[codes[order]]
    return rank < max_per_group


@dataclass
class WeightDetails:
    """Everything the transform computed, aligned with the input rows."""

    weights: np.ndarray  # [N] step 3; 1.0 for rows outside max_per_prompt
    scores: np.ndarray  # [N] combined score on [-1, 1] (step 2); 0.0 outside max_per_prompt
    per_model: list[np.ndarray] = field(default_factory=list)  # [M][N] step-1 scaled scores
    raw: list[np.ndarray] = field(default_factory=list)  # [M][N] unscaled deviation scores
    considered: np.ndarray | None = None  # [N] bool: row took part (max_per_prompt)


def deviation_weights(
    embeddings_list: list[np.ndarray],
    group_ids,
    *,
    metric: str = "cosine",
    mode: str = "mean",
    k: int | None = None,
    scope: str = "group",
    max_per_prompt: int | None = None,
    counts: np.ndarray | None = None,
    tie_atol: float = DEFAULT_TIE_ATOL,
    return_details: bool = False,
    **knn_options,
):
    """Per-response weights from one [N, d] embedding matrix per model (e.g. [semantic, style]).

    mode "mean" is the published definition; "knn"/scope "global" swap in the FAISS k-nearest
    score for step 1 (same scaling and combination). counts: multiplicity per row in the mean
    distance (count_duplicates). Returns weights [N] float64, or WeightDetails when return_details."""
    if isinstance(embeddings_list, np.ndarray) and embeddings_list.ndim == 2:
        embeddings_list = [embeddings_list]
    if len(embeddings_list) == 0:
        raise ValueError("embeddings_list is empty: give one [N, d] array per embedding model")
    codes, n_groups = group_codes(group_ids)
    n = len(codes)
    for m, e in enumerate(embeddings_list):
        if e.shape[0] != n:
            raise ValueError(f"embeddings_list[{m}] has {e.shape[0]} rows, group_ids has {n}: they must align")
    considered = first_per_group(codes, n_groups, max_per_prompt)
    subset = None if considered.all() else np.flatnonzero(considered)
    sub_codes = codes if subset is None else codes[subset]
    sub_counts = None if counts is None else np.asarray(counts, dtype=np.float64)
    if sub_counts is not None and subset is not None:
        sub_counts = sub_counts[subset]

    raw, scaled = [], []
    for e in embeddings_list:
        es = e if subset is None else e[subset]
        r = deviation_scores(
            es, sub_codes, metric=metric, mode=mode, k=k, scope=scope, counts=sub_counts, **knn_options
        )
        raw.append(r)
        scaled.append(minmax_scale_groups(r, sub_codes, n_groups, tie_atol))
    combined = combine_geometric(scaled)
    w = normalise_weights(combined, sub_codes, n_groups, tie_atol)

    if subset is not None:

        def expand(v, fill):
            out = np.full(n, fill, dtype=np.float64)
            out[subset] = v
            return out

        w = expand(w, 1.0)
        combined = expand(combined, 0.0)
        scaled = [expand(s, 0.0) for s in scaled]
        raw = [expand(r, 0.0) for r in raw]
    if not return_details:
        return w
    return WeightDetails(weights=w, scores=combined, per_model=scaled, raw=raw, considered=considered)
