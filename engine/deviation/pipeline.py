"""Responses in, one deviation weight per response id out: the entry point the trainer and CLI use.

Flow position (DESIGN.md): engine.data has built `Response` records and pairs and chosen which
responses form each prompt's group (`deviation.groups`, engine.data.prepare); this module embeds
every distinct response with each configured embedder (through the on-disk cache), computes the
published weight transform (weights.py), and returns a DeviationResult that engine.data queries by
response id when it attaches `chosen_weight` / `rejected_weight` to every pair. Asked to
(`keep_embeddings`), the result keeps the embeddings, so the authors' DivPO sampler can score a
subset of a prompt's responses as a group of its own (`scores_within`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embedders import EmbeddingCache, embed_cached, get_embedder
from .scores import group_codes
from .weights import deviation_weights

log = logging.getLogger(__name__)


@dataclass
class DeviationResult:
    """Arrays aligned with the `responses` passed to compute_deviation."""

    response_ids: np.ndarray  # [N] str
    prompt_ids: np.ndarray  # [N] str
    scores: np.ndarray  # [N] combined score on [-1, 1]
    weights: np.ndarray  # [N] step-3 weight; averages 1 over each prompt's considered responses
    per_model: dict[str, np.ndarray] = field(default_factory=dict)  # embedder id -> [N] scaled score
    considered: np.ndarray | None = None  # [N] bool: inside max_per_prompt
    embeddings: list[np.ndarray] = field(default_factory=list, repr=False)  # per embedder [U, d] (keep_embeddings)
    embedding_row: np.ndarray | None = field(default=None, repr=False)  # [N] row of each response in embeddings
    metric: str = "cosine"
    _index: dict[str, int] | None = field(default=None, repr=False)

    def _row(self, response_id: str) -> int:
        if self._index is None:
            self._index = {rid: i for i, rid in enumerate(self.response_ids.tolist())}
        try:
            return self._index[response_id]
        except KeyError:
            raise KeyError(
                f"response id {response_id!r} was not among the responses given to compute_deviation"
            ) from None

    def weight_of(self, response_id: str) -> float:
        return float(self.weights[self._row(response_id)])

    def score_of(self, response_id: str) -> float:
        return float(self.scores[self._row(response_id)])

    def scores_within(self, response_ids) -> np.ndarray:
        """Combined deviation scores (steps 1-2, mean distance) of these responses as one group of their own.

        The authors' DivPO ranks its high and low sets this way (scripts_dataset_cleaner/
        4_data_prep_for_divpo.py:73-103,136-139); their final normalisation is increasing in this score,
        so the order is the same. A set of one scores 0 (theirs: NaN, 0/0, which sorts the same).
        """
        if not self.embeddings:
            raise ValueError("this DeviationResult holds no embeddings: compute it with keep_embeddings=True")
        rows = [int(self.embedding_row[self._row(rid)]) for rid in response_ids]
        if len(rows) < 2:
            return np.zeros(len(rows))
        det = deviation_weights(
            [e[rows] for e in self.embeddings],
            np.zeros(len(rows), dtype=np.int64),
            metric=self.metric,
            mode="mean",
            return_details=True,
        )
        return det.scores

    def to_rows(self) -> list[dict]:
        rows = []
        for i, rid in enumerate(self.response_ids.tolist()):
            row = {
                "response_id": rid,
                "prompt_id": str(self.prompt_ids[i]),
                "score": float(self.scores[i]),
                "weight": float(self.weights[i]),
                "considered": bool(self.considered[i]) if self.considered is not None else True,
            }
            for mid, v in self.per_model.items():
                row[f"score[{mid}]"] = float(v[i])
            rows.append(row)
        return rows


def _neutral(responses) -> DeviationResult:
    n = len(responses)
    return DeviationResult(
        response_ids=np.asarray([r.response_id for r in responses], dtype=object),
        prompt_ids=np.asarray([r.prompt_id for r in responses], dtype=object),
        scores=np.zeros(n),
        weights=np.ones(n),
        per_model={},
        considered=np.ones(n, dtype=bool),
    )


def compute_deviation(
    responses: list,
    cfg,
    *,
    cache_dir: str | Path | None = None,
    pair_counts: dict[str, int] | None = None,
    show_progress: bool | None = None,
    keep_embeddings: bool = False,
) -> DeviationResult:
    """Deviation scores and weights of `responses` (engine.data.records.Response) under `cfg`
    (engine.config.DeviationConfig or any object with its fields).

    Every prompt's responses in `responses` form its group. A response id listed several times is
    computed once and its values repeated. `pair_counts` (response_id -> number of pairs using it)
    is used when cfg.count_duplicates is set; ids missing from it count once. cfg.max_per_prompt
    applies with cfg.groups "all" (with "paired" the caller has capped the pairs already).
    keep_embeddings: keep one embedding matrix per embedder for `scores_within` (memory: N x d floats).
    cfg.enabled False gives score 0 and weight 1 everywhere."""
    if not cfg.enabled or not responses:
        return _neutral(responses)
    names = [m for m in (cfg.semantic_model, cfg.style_model) if m]
    if not names:
        raise ValueError("deviation needs at least one embedder: set semantic_model or style_model, or enabled=False")

    all_ids = [r.response_id for r in responses]
    first: dict[str, int] = {}
    for i, rid in enumerate(all_ids):
        first.setdefault(rid, i)
    uniq_rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    uresp = [responses[i] for i in uniq_rows.tolist()]
    texts = [r.text for r in uresp]
    groups = np.asarray([r.prompt_id for r in uresp], dtype=object)

    counts = None
    if cfg.count_duplicates:
        if pair_counts is None:
            log.warning("count_duplicates is set but no pair_counts were given: every response counts once")
        else:
            counts = np.asarray([max(int(pair_counts.get(r.response_id, 1)), 1) for r in uresp], dtype=np.float64)

    cache = EmbeddingCache(cache_dir if cache_dir is not None else cfg.cache_dir)
    embedders = [
        get_embedder(
            n,
            device=cfg.device,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            trust_remote_code=cfg.trust_remote_code,
        )
        for n in names
    ]
    embeddings = [embed_cached(e, texts, cache, show_progress=show_progress) for e in embedders]

    det = deviation_weights(
        embeddings,
        groups,
        metric=cfg.metric,
        mode=cfg.mode,
        k=cfg.k,
        scope=cfg.scope,
        max_per_prompt=cfg.max_per_prompt if cfg.groups == "all" else None,
        counts=counts,
        return_details=True,
    )
    # back to the caller's rows (repeated ids share their values)
    slot = {rid: s for s, rid in enumerate(first)}
    back = np.asarray([slot[rid] for rid in all_ids], dtype=np.int64)
    return DeviationResult(
        response_ids=np.asarray(all_ids, dtype=object),
        prompt_ids=np.asarray([r.prompt_id for r in responses], dtype=object),
        scores=det.scores[back],
        weights=det.weights[back],
        per_model={e.id: s[back] for e, s in zip(embedders, det.per_model)},
        considered=det.considered[back],
        embeddings=embeddings if keep_embeddings else [],
        embedding_row=back if keep_embeddings else None,
        metric=cfg.metric,
    )


def weight_summary(result: DeviationResult, bins=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, np.inf)) -> dict:
    """Histogram of weights per prompt-size bucket (considered responses, each distinct id once), and the count
    of prompts whose group holds a single response (weight 1; NaN in the authors' code), with a note when any."""
    _, first = np.unique(result.response_ids.astype(str), return_index=True)
    pid = result.prompt_ids[first]
    w = result.weights[first]
    cons = result.considered[first] if result.considered is not None else np.ones(len(first), bool)
    codes, g = group_codes(pid)
    size = np.bincount(codes[cons], minlength=g)[codes]
    buckets = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**12)]
    labels = [f"{a}" if a == b else (f"{a}-{b}" if b < 10**12 else f"{a}+") for a, b in buckets]
    edges = list(bins)
    out = {"bins": [f"[{edges[i]:g}, {edges[i + 1]:g})" for i in range(len(edges) - 1)], "by_prompt_size": {}}
    for (a, b), label in zip(buckets, labels):
        m = cons & (size >= a) & (size <= b)
        if not m.any():
            continue
        hist, _ = np.histogram(w[m], bins=edges)
        out["by_prompt_size"][label] = {
            "prompts": int(len(np.unique(codes[m]))),
            "responses": int(m.sum()),
            "weight_min": float(w[m].min()),
            "weight_max": float(w[m].max()),
            "weight_std": float(w[m].std()),
            "hist": hist.tolist(),
        }
    out["responses"] = int(cons.sum())
    out["prompts"] = int(g)
    out["not_considered"] = int((~cons).sum())
    groups_of_one = int(len(np.unique(codes[cons & (size == 1)])))
    out["groups_of_one"] = groups_of_one
    if groups_of_one:
        out["notes"] = [
            f"{groups_of_one} prompt(s) with a single response in their group: score 0, weight 1 (the "
            "authors' code gives NaN there, 0/0: models/diversity_model.py:40)"
        ]
    return out
