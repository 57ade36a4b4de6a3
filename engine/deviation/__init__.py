"""Deviation weights for DDPO/DORPO: how different each response is from the other responses to the
same prompt (Chung et al. 2025, "Modifying Large Language Model Post-Training for Diverse Creative
Writing").

Flow position (DESIGN.md): engine.data builds responses and pairs -> here: embed responses (cached)
-> deviation scores -> one weight per response id -> engine.data attaches chosen/rejected weights to
each pair. Modules:
- embedders.py: get_embedder, the builtin MiniLM and stylometric embedders, EmbeddingCache, embed_cached
- scores.py: deviation_scores (exact O(N d) mean distance; FAISS knn within a prompt or global)
- weights.py: deviation_weights, the published three-step transform
- pipeline.py: compute_deviation(responses, cfg) -> DeviationResult (what training calls)
- __main__.py: `python -m engine.deviation --data <path> --out <file>`
"""

from .embedders import (
    CorruptCacheError,
    Embedder,
    EmbeddingCache,
    SentenceTransformerEmbedder,
    StylometricEmbedder,
    embed_cached,
    get_embedder,
    text_key,
)
from .pipeline import DeviationResult, compute_deviation, weight_summary
from .scores import deviation_scores, group_codes
from .weights import (
    WeightDetails,
    combine_geometric,
    deviation_weights,
    minmax_scale_groups,
    normalise_weights,
)

__all__ = [
    "Embedder",
    "EmbeddingCache",
    "CorruptCacheError",
    "SentenceTransformerEmbedder",
    "StylometricEmbedder",
    "embed_cached",
    "get_embedder",
    "text_key",
    "DeviationResult",
    "compute_deviation",
    "weight_summary",
    "deviation_scores",
    "group_codes",
    "WeightDetails",
    "combine_geometric",
    "deviation_weights",
    "minmax_scale_groups",
    "normalise_weights",
]
