"""Responses in, one deviation weight per response id out: the entry point the trainer and CLI use.

Flow position (DESIGN.md): engine.data has built `Response` records and pairs; this module embeds
every distinct response with each configured embedder (through the on-disk cache), computes the
published weight transform (weights.py), and returns a DeviationResult that engine.data queries by
response id when it attaches `chosen_weight` / `rejected_weight` to every pair.

The rejected-side floor. The published scripts floor the rejected response's deviation at -0.8 on
the [-1, 1] score scale, which the issue states as a weight floor of 0.2 (score + 1). We apply it
where the pipeline uses it, as `rejected_weight_of(id) = max(weight, rejected_weight_floor)`; the
stored weights themselves stay the exact step-3 values that average 1 per prompt. (We could not
locate the published scripts offline; this is our reading of the issue text.)
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
    rejected_weight_floor: float = 0.2
    _index: dict[str, int] | None = field(default=None, repr=False)

    def _row(self, response_id: str) -> int:
        if self._index is None:
            self._index = {rid: i for i, rid in enumerate(self.response_ids.tolist())}
        try:
            return self._index[response_id]
        except KeyError:
            raise KeyError(f"response id {response_id!r} was not among the responses given to compute_deviation") from None

    def weight_of(self, response_id: str) -> float:
        return float(self.weights[self._row(response_id)])

    def score_of(self, response_id: str) -> float:
        return float(self.scores[self._row(response_id)])

    def rejected_weight_of(self, response_id: str) -> float:
        """max(weight, rejected_weight_floor): the weight a pair gives its rejected response."""
        return max(self.weight_of(response_id), float(self.rejected_weight_floor))

    def chosen_weight_of(self, response_id: str) -> float:
        return self.weight_of(response_id)

    def pair_weights(self, chosen_id: str, rejected_id: str) -> tuple[float, float]:
        """(chosen_weight, rejected_weight) of one pair, the rejected side floored."""
        return self.chosen_weight_of(chosen_id), self.rejected_weight_of(rejected_id)

    def to_rows(self) -> list[dict]:
        rows = []
        for i, rid in enumerate(self.response_ids.tolist()):
            row = {"response_id": rid, "prompt_id": str(self.prompt_ids[i]), "score": float(self.scores[i]),
                   "weight": float(self.weights[i]),
                   "considered": bool(self.considered[i]) if self.considered is not None else True}
            for mid, v in self.per_model.items():
                row[f"score[{mid}]"] = float(v[i])
            rows.append(row)
        return rows


def _neutral(responses, floor: float) -> DeviationResult:
    n = len(responses)
    return DeviationResult(
        response_ids=np.asarray([r.response_id for r in responses], dtype=object),
        prompt_ids=np.asarray([r.prompt_id for r in responses], dtype=object),
        scores=np.zeros(n), weights=np.ones(n), per_model={}, considered=np.ones(n, dtype=bool),
        rejected_weight_floor=floor,
    )


def compute_deviation(responses: list, cfg, *, cache_dir: str | Path | None = None,
                      pair_counts: dict[str, int] | None = None, show_progress: bool | None = None) -> DeviationResult:
    """Deviation scores and weights of `responses` (engine.data.records.Response) under `cfg`
    (engine.config.DeviationConfig or any object with its fields).

    A response id listed several times is computed once and its values repeated. `pair_counts`
    (response_id -> number of pairs using it) is used when cfg.count_duplicates is set; ids missing
    from it count once. cfg.enabled False gives score 0 and weight 1 everywhere."""
    floor = float(getattr(cfg, "rejected_weight_floor", 0.2))
    if not getattr(cfg, "enabled", True) or not responses:
        return _neutral(responses, floor)
    names = [m for m in (getattr(cfg, "semantic_model", "builtin:minilm"), getattr(cfg, "style_model", "builtin:stylometric")) if m]
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
    if getattr(cfg, "count_duplicates", False):
        if pair_counts is None:
            log.warning("count_duplicates is set but no pair_counts were given: every response counts once")
        else:
            counts = np.asarray([max(int(pair_counts.get(r.response_id, 1)), 1) for r in uresp], dtype=np.float64)

    cache = EmbeddingCache(cache_dir if cache_dir is not None else getattr(cfg, "cache_dir", ".cache/embeddings"))
    embedders = [
        get_embedder(n, device=getattr(cfg, "device", "auto"), batch_size=getattr(cfg, "batch_size", 64),
                     precision=getattr(cfg, "precision", "auto"))
        for n in names
    ]
    embeddings = [embed_cached(e, texts, cache, show_progress=show_progress) for e in embedders]

    det = deviation_weights(
        embeddings, groups, metric=getattr(cfg, "metric", "cosine"), mode=getattr(cfg, "mode", "mean"),
        k=getattr(cfg, "k", 10), scope=getattr(cfg, "scope", "group"),
        max_per_prompt=getattr(cfg, "max_per_prompt", None), counts=counts, return_details=True,
    )
    # back to the caller's rows (repeated ids share their values)
    slot = {rid: s for s, rid in enumerate(first)}
    back = np.asarray([slot[rid] for rid in all_ids], dtype=np.int64)
    return DeviationResult(
        response_ids=np.asarray(all_ids, dtype=object),
        prompt_ids=np.asarray([r.prompt_id for r in responses], dtype=object),
        scores=det.scores[back], weights=det.weights[back],
        per_model={e.id: s[back] for e, s in zip(embedders, det.per_model)},
        considered=det.considered[back], rejected_weight_floor=floor,
    )


def weight_summary(result: DeviationResult, bins=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, np.inf)) -> dict:
    """Histogram of weights per prompt-size bucket (considered responses, each distinct id once)."""
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
            "prompts": int(len(np.unique(codes[m]))), "responses": int(m.sum()),
            "weight_min": float(w[m].min()), "weight_max": float(w[m].max()), "weight_std": float(w[m].std()),
            "hist": hist.tolist(),
        }
    out["responses"] = int(cons.sum())
    out["prompts"] = int(g)
    out["not_considered"] = int((~cons).sum())
    return out
