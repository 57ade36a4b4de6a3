"""Preference pairs from scored responses, the train/validation split, and deviation weights on pairs.

Second step of the data flow: cleaned `Response`s (grouped by prompt) -> `Pair`s. Modes:
- `best_vs_worst`: highest- vs lowest-scored response per prompt (the classic small recipe);
- `gap` (published default): random disjoint pairs whose upvotes differ by at least `min_gap`
  where possible, then any remaining responses with different scores;
- `all`: every pair with different scores, sampled down to `max_pairs_per_prompt`;
- `divpo` (Lanchantin et al. 2025): the top/bottom `rho` fraction by upvotes are the high/low sets;
  chosen = most diverse of the high set, rejected = least diverse of the low set, without reuse.

Everything random is seeded per (seed, prompt id), so the pairs of one prompt do not depend on the
order or the number of the other prompts.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from dataclasses import replace
from typing import Iterable, Sequence, TypeVar

from engine.data.records import Pair, Response, content_id

PAIR_MODES = ("best_vs_worst", "gap", "all", "divpo")
T = TypeVar("T")


def group_by_prompt(responses: Iterable[Response]) -> dict[str, list[Response]]:
    """prompt_id -> responses, prompts in order of first appearance, responses in input order."""
    groups: dict[str, list[Response]] = {}
    for r in responses:
        groups.setdefault(r.prompt_id, []).append(r)
    return groups


def _rng(seed: int, prompt_id: str, salt: str) -> random.Random:
    return random.Random(int(content_id(salt, str(seed), prompt_id), 16))


def _best_vs_worst(group: list[Response]) -> list[Pair]:
    # Ties: the first response in input order wins on both ends (max/min are stable).
    best = max(group, key=lambda r: r.score)
    worst = min(group, key=lambda r: r.score)
    if best.score == worst.score:
        return []
    return [Pair.from_responses(best, worst)]


def _oriented(a: Response, b: Response) -> Pair:
    return Pair.from_responses(a, b) if a.score > b.score else Pair.from_responses(b, a)


def _gap(group: list[Response], min_gap: float, max_pairs: int, rng: random.Random) -> list[Pair]:
    """Random disjoint pairs: first those with the required gap (greedy in a seeded random order), then
    the leftovers paired by any score difference as a maximum matching."""
    order = list(group)
    rng.shuffle(order)
    used = [False] * len(order)
    pairs: list[Pair] = []
    for i, a in enumerate(order):
        if used[i] or len(pairs) >= max_pairs:
            continue
        for j in range(i + 1, len(order)):
            if not used[j] and abs(a.score - order[j].score) >= max(min_gap, 1e-12):
                used[i] = used[j] = True
                pairs.append(_oriented(a, order[j]))
                break
    # Fallback: responses with equal scores cannot pair, so always take one from the largest
    # equal-score class; that pairs as many leftovers as possible (n - largest class, at most n / 2).
    rest = [r for r, u in zip(order, used) if not u]
    while len(pairs) < max_pairs:
        classes: dict[float, list[Response]] = {}
        for r in rest:
            classes.setdefault(r.score, []).append(r)
        if len(classes) < 2:
            break
        big = max(classes.values(), key=len)  # ties: the class met first in the random order
        a = big[0]
        b = next(r for r in rest if r.score != a.score)
        rest = [r for r in rest if r is not a and r is not b]
        pairs.append(_oriented(a, b))
    return pairs


def _all(group: list[Response], max_pairs: int, rng: random.Random) -> list[Pair]:
    combos = [(a, b) for a, b in itertools.combinations(group, 2) if a.score != b.score]
    if len(combos) > max_pairs:
        keep = sorted(rng.sample(range(len(combos)), max_pairs))
        combos = [combos[k] for k in keep]
    return [_oriented(a, b) for a, b in combos]


def divpo_set_size(n: int, rho: float) -> int:
    """Size of the high and of the low set: round(rho * n), at least 1, at most n // 2 so they are disjoint."""
    return min(n // 2, max(1, int(math.floor(rho * n + 0.5))))


def _divpo(group: list[Response], rho: float, max_pairs: int, deviation) -> list[Pair]:
    k = divpo_set_size(len(group), rho)
    by_score = sorted(group, key=lambda r: -r.score)  # stable: input order among equal upvotes
    high, low = by_score[:k], by_score[len(by_score) - k:]
    div = {r.response_id: float(deviation.score_of(r.response_id)) for r in high + low}
    high = sorted(high, key=lambda r: -div[r.response_id])  # most diverse first
    low = sorted(low, key=lambda r: div[r.response_id])  # least diverse first
    pairs = []
    for c, r in zip(high, low):
        if len(pairs) >= max_pairs:
            break
        if c.score > r.score:  # equal upvotes carry no preference
            pairs.append(Pair.from_responses(c, r))
    return pairs


def build_pairs(
    responses: Sequence[Response],
    mode: str,
    *,
    min_gap: float = 5,
    max_pairs_per_prompt: int = 100,
    rho: float = 0.25,
    seed: int = 0,
    deviation=None,
) -> list[Pair]:
    """Pairs of every prompt (prompt order of first appearance); prompts with < 2 responses give none.

    `deviation` (divpo only) is anything with `score_of(response_id) -> float`, higher = more diverse.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {', '.join(PAIR_MODES)}; got {mode!r}")
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
    if mode == "divpo" and deviation is None:
        raise ValueError("divpo pairs rank responses by diversity: pass deviation=compute_deviation(responses, cfg.deviation)")
    if mode == "divpo" and not 0 < rho <= 0.5:
        raise ValueError(f"divpo rho must be in (0, 0.5] so the high and low sets do not overlap, got {rho}")
    out: list[Pair] = []
    for pid, group in group_by_prompt(responses).items():
        if len(group) < 2:
            continue
        if mode == "best_vs_worst":
            out.extend(_best_vs_worst(group))
        elif mode == "gap":
            out.extend(_gap(group, min_gap, max_pairs_per_prompt, _rng(seed, pid, "gap")))
        elif mode == "all":
            out.extend(_all(group, max_pairs_per_prompt, _rng(seed, pid, "all")))
        else:
            out.extend(_divpo(group, rho, max_pairs_per_prompt, deviation))
    return out


def pair_skip_counts(responses: Sequence[Response], pairs: Sequence[Pair]) -> dict[str, int]:
    """Prompts that gave no pair, by reason (for the data report)."""
    paired = {p.prompt_id for p in pairs}
    counts: Counter = Counter()
    for pid, group in group_by_prompt(responses).items():
        if pid in paired:
            continue
        if len(group) < 2:
            counts["prompt_fewer_than_2_responses"] += 1
        elif len({r.score for r in group}) == 1:
            counts["prompt_all_scores_equal"] += 1
        else:
            counts["prompt_no_valid_pair"] += 1
    return dict(counts)


def split_by_prompt(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, val) with no prompt in both: a prompt is in val iff hash(seed, prompt_id) / 2^64 < val_fraction.

    The side of a prompt depends on nothing but its id and the seed, so splitting responses (as the
    evaluator does) and splitting pairs (as training does) agree for every prompt even though the
    two lists hold different prompt sets, and adding data never moves a validation prompt into
    training. The val share is therefore val_fraction only on average (binomial around it).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    threshold = val_fraction * 2**64
    side: dict[str, bool] = {}
    train: list[T] = []
    val: list[T] = []
    for x in items:
        pid = x.prompt_id
        if pid not in side:
            side[pid] = int(content_id("split", str(seed), pid), 16) < threshold
        (val if side[pid] else train).append(x)
    return train, val


def attach_weights(pairs: Sequence[Pair], deviation) -> list[Pair]:
    """Copies of the pairs with chosen_weight = weight_of(chosen), rejected_weight = rejected_weight_of(rejected)."""
    return [
        replace(
            p,
            chosen_weight=float(deviation.weight_of(p.chosen_id)),
            rejected_weight=float(deviation.rejected_weight_of(p.rejected_id)),
        )
        for p in pairs
    ]


def response_pair_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """How many pairs use each response (the deviation pipeline's `pair_counts`)."""
    counts: Counter = Counter()
    for p in pairs:
        counts[p.chosen_id] += 1
        counts[p.rejected_id] += 1
    return dict(counts)
