"""Records that flow from raw rows to packed batches, and the content-derived ids every cache keys on.

Ids are hashes of content, never of position: a reordered, re-split or re-downloaded dataset keeps
every id, so embedding, weight, tokenisation and reference-logprob caches stay valid
(see DESIGN.md, "Identities").
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

ID_HEX_CHARS = 16  # 64-bit ids: collision probability ~N^2 / 2^65, negligible below 1e8 responses


def content_id(*parts: str) -> str:
    """Stable hex id of a tuple of strings (length-prefixed so ("ab", "c") != ("a", "bc"))."""
    h = hashlib.blake2b(digest_size=ID_HEX_CHARS // 2)
    for part in parts:
        data = part.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def make_prompt_id(prompt: str) -> str:
    return content_id("prompt", prompt)


def make_response_id(prompt_id: str, text: str) -> str:
    return content_id("response", prompt_id, text)


def make_pair_id(chosen_id: str, rejected_id: str) -> str:
    return content_id("pair", chosen_id, rejected_id)


@dataclass
class Response:
    """One cleaned response to one prompt, with its upvotes."""

    prompt_id: str
    response_id: str
    prompt: str
    text: str
    score: float
    meta: dict = field(default_factory=dict)  # e.g. synthetic ground truth (theme, style, quality)


@dataclass
class Pair:
    """One preference pair. Weights are the deviation weights of each side (1.0 until deviation runs)."""

    pair_id: str
    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_id: str
    rejected_id: str
    chosen_score: float
    rejected_score: float
    chosen_weight: float = 1.0
    rejected_weight: float = 1.0

    @classmethod
    def from_responses(cls, chosen: Response, rejected: Response) -> Pair:
        if chosen.prompt_id != rejected.prompt_id:
            raise ValueError(
                f"a pair must share its prompt: chosen prompt_id {chosen.prompt_id} != rejected {rejected.prompt_id}"
            )
        return cls(
            pair_id=make_pair_id(chosen.response_id, rejected.response_id),
            prompt_id=chosen.prompt_id,
            prompt=chosen.prompt,
            chosen=chosen.text,
            rejected=rejected.text,
            chosen_id=chosen.response_id,
            rejected_id=rejected.response_id,
            chosen_score=float(chosen.score),
            rejected_score=float(rejected.score),
        )

    def to_dict(self) -> dict:
        return asdict(self)
