"""Preference pairs from scored responses, the train/validation split, and deviation weights on pairs.

Second step of the data flow: cleaned `Response`s (grouped by prompt) -> `Pair`s. Modes:
- `best_vs_worst`: highest- vs lowest-scored response per prompt (the classic small recipe);
- `gap` (the published pairs): disjoint pairs whose upvotes differ by at least `min_gap` where
  possible, then pairs with any difference. Two samplers (`data.gap_sampler`): "authors" draws
  uniformly among all valid pairs at every step, exactly as the authors' `sample_pairs_with_gap`
  (models/utils.py:294-347); "engine" is greedy over a seeded shuffle, then a maximum matching;
- `all`: every pair with different scores, sampled down to `max_pairs_per_prompt`;
- `divpo` (Lanchantin et al. 2025): high/low sets by upvotes, chosen = diverse high, rejected = typical
  low. "authors" (`data.divpo_sampler`) follows scripts_dataset_cleaner/4_data_prep_for_divpo.py
  (sets from the gap-paired responses, re-ranked within each set, random pairing); "engine" ranks by
  whole-prompt deviation and pairs in rank order.

Everything random is seeded per (seed, prompt id), so the pairs of one prompt do not depend on the
order or the number of the other prompts. `paired_groups` forms the authors' deviation groups (the
responses of a prompt's pairs) and applies their per-prompt cap.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from engine.config import PAIR_MODES
from engine.data.records import Pair, Response, content_id

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


def _gap(group: list[Response], min_gap: float, max_pairs: int | None, rng: random.Random) -> list[Pair]:
    """Random disjoint pairs: first those with the required gap (greedy in a seeded random order), then
    the leftovers paired by any score difference as a maximum matching."""
    cap = math.inf if max_pairs is None else max_pairs
    order = list(group)
    rng.shuffle(order)
    used = [False] * len(order)
    pairs: list[Pair] = []
    for i, a in enumerate(order):
        if used[i] or len(pairs) >= cap:
            continue
        for j in range(i + 1, len(order)):
            if not used[j] and abs(a.score - order[j].score) >= max(min_gap, 1e-12):
                used[i] = used[j] = True
                pairs.append(_oriented(a, order[j]))
                break
    # Fallback: responses with equal scores cannot pair, so always take one from the largest
    # equal-score class; that pairs as many leftovers as possible (n - largest class, at most n / 2).
    rest = [r for r, u in zip(order, used) if not u]
    while len(pairs) < cap:
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


def _first_partner(s: np.ndarray, min_gap: float) -> np.ndarray:
    """For ascending scores s: per i, the first j with s[j] != s[i] and s[j] - s[i] >= min_gap (len(s) if none).

    Every j after it qualifies too (s is sorted and float subtraction is monotone), so row i's valid
    partners are the suffix s[lo[i]:]. Upvotes are integers, where s + min_gap is exact; the two
    correction loops keep the test `s[j] - s[i] >= min_gap` exact for any float scores.
    """
    n = len(s)
    lo = np.maximum(np.searchsorted(s, s + min_gap, side="left"), np.searchsorted(s, s, side="right"))
    idx = np.arange(n)
    while True:  # a candidate that fails the exact test: move right
        bad = (lo < n) & ((s[np.minimum(lo, n - 1)] - s < min_gap) | (s[np.minimum(lo, n - 1)] == s))
        if not bad.any():
            break
        lo[bad] += 1
    while True:  # a predecessor that passes it: move left
        prev = np.maximum(lo - 1, 0)
        good = (lo - 1 > idx) & (s[prev] - s >= min_gap) & (s[prev] != s)
        if not good.any():
            break
        lo[good] -= 1
    return lo


def _gap_authors(group: list[Response], min_gap: float, max_pairs: int | None, rng: random.Random) -> list[Pair]:
    """The authors' sampler: models/utils.py:294-347, called at scripts_dataset_cleaner/2_data_prep_to_preference.py:66.

    Until fewer than two responses are left: draw one pair uniformly among the available pairs with
    different upvotes differing by >= min_gap; when none is left, uniformly among the pairs with any
    difference; stop when no pair has one. Chosen = the higher score. Their list of valid pairs is
    rebuilt by an O(n^2) scan per draw; here the valid partners of each response are a suffix of the
    score order, so a draw is an index into the prefix sums of the suffix lengths (same distribution,
    O(n log n) per draw). They have no cap (max_pairs None); a cap stops after that many draws.
    """
    avail = sorted(group, key=lambda r: r.score)
    pairs: list[Pair] = []
    while len(avail) >= 2 and (max_pairs is None or len(pairs) < max_pairs):
        s = np.asarray([r.score for r in avail], dtype=np.float64)
        for gap in (min_gap, 0.0):  # the gap pairs, else the fallback: any different scores
            lo = _first_partner(s, gap)
            sizes = len(s) - lo
            total = int(sizes.sum())
            if total:
                break
        else:
            break
        k = rng.randrange(total)
        ends = np.cumsum(sizes)
        i = int(np.searchsorted(ends, k, side="right"))
        j = int(lo[i] + k - (ends[i] - sizes[i]))
        pairs.append(_oriented(avail[i], avail[j]))
        avail = [r for t, r in enumerate(avail) if t != i and t != j]
    return pairs


def _all(group: list[Response], max_pairs: int | None, rng: random.Random) -> list[Pair]:
    combos = [(a, b) for a, b in itertools.combinations(group, 2) if a.score != b.score]
    if max_pairs is not None and len(combos) > max_pairs:
        keep = sorted(rng.sample(range(len(combos)), max_pairs))
        combos = [combos[k] for k in keep]
    return [_oriented(a, b) for a, b in combos]


def divpo_set_size(n: int, rho: float) -> int:
    """Size of the high and of the low set: round(rho * n), at least 1, at most n // 2 so they are disjoint."""
    return min(n // 2, max(1, int(math.floor(rho * n + 0.5))))


def _divpo(group: list[Response], rho: float, max_pairs: int | None, deviation) -> list[Pair]:
    k = divpo_set_size(len(group), rho)
    by_score = sorted(group, key=lambda r: -r.score)  # stable: input order among equal upvotes
    high, low = by_score[:k], by_score[len(by_score) - k :]
    div = {r.response_id: float(deviation.score_of(r.response_id)) for r in high + low}
    high = sorted(high, key=lambda r: -div[r.response_id])  # most diverse first
    low = sorted(low, key=lambda r: div[r.response_id])  # least diverse first
    pairs = []
    for c, r in zip(high, low):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        if c.score > r.score:  # equal upvotes carry no preference
            pairs.append(Pair.from_responses(c, r))
    return pairs


def divpo_authors_set_size(n: int, rho: float, max_pair_num: int) -> tuple[int, int]:
    """(set size, pairs) of the authors' DivPO for n responses: int(min(max(max_pair_num, rho n), n / 2))
    and min(max_pair_num, set size) (scripts_dataset_cleaner/4_data_prep_for_divpo.py:113-120)."""
    size = max(max_pair_num, n * rho)
    if size > n / 2:
        size = n / 2
    size = int(size)
    return size, min(max_pair_num, size)


def _divpo_authors(pool: list[Response], rho: float, max_pair_num: int, deviation, rng: random.Random) -> list[Pair]:
    """The authors' DivPO pairs of one prompt (scripts_dataset_cleaner/4_data_prep_for_divpo.py:106-171).

    `pool`: the prompt's responses that the gap sampler paired, in input order (their step 4 reads
    step 2's `posttraining_comment_text`). High/low sets: the top/bottom `size` by upvotes; each set is
    re-ranked by deviation computed within the set alone (`deviation.scores_within`); the `m` most
    diverse of the high set and the `m` least diverse of the low set are shuffled and zipped, chosen =
    the high one, even when its upvotes equal the low one's. Ties in upvotes or deviation follow numpy's
    stable argsort (theirs uses the default argsort, whose order of ties is not specified).
    """
    size, m = divpo_authors_set_size(len(pool), rho, max_pair_num)
    if m <= 0:
        return []
    order = np.argsort(np.asarray([r.score for r in pool], dtype=np.float64), kind="stable")
    high = [pool[i] for i in order[::-1][:size]]
    low = [pool[i] for i in order[:size]]
    div_high = deviation.scores_within([r.response_id for r in high])
    div_low = deviation.scores_within([r.response_id for r in low])
    high = [high[i] for i in np.argsort(div_high, kind="stable")[::-1][:m]]
    low = [low[i] for i in np.argsort(div_low, kind="stable")[:m]]
    hi, lo = list(range(m)), list(range(m))
    rng.shuffle(hi)
    rng.shuffle(lo)
    return [Pair.from_responses(high[h], low[t]) for h, t in zip(hi, lo)]


def build_pairs(
    responses: Sequence[Response],
    mode: str,
    *,
    min_gap: float = 5,
    max_pairs_per_prompt: int | None = 100,
    rho: float = 0.25,
    seed: int = 0,
    deviation=None,
    gap_sampler: str = "engine",
    divpo_sampler: str = "engine",
) -> list[Pair]:
    """Pairs of every prompt (prompt order of first appearance); prompts with < 2 responses give none.

    `deviation` (divpo only) has `score_of(response_id) -> float` (engine sampler) and
    `scores_within(response_ids) -> array` (authors sampler), higher = more diverse.
    `max_pairs_per_prompt` None: no cap (the authors' gap sampler has none).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {', '.join(PAIR_MODES)}; got {mode!r}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    if gap_sampler not in ("authors", "engine") or divpo_sampler not in ("authors", "engine"):
        raise ValueError(
            f"gap_sampler and divpo_sampler must be 'authors' or 'engine'; got {gap_sampler!r}, {divpo_sampler!r}"
        )
    if mode == "divpo" and deviation is None:
        raise ValueError(
            "divpo pairs rank responses by diversity: pass deviation=compute_deviation(responses, cfg.deviation)"
        )
    if mode == "divpo" and not 0 < rho <= 0.5:
        raise ValueError(f"divpo rho must be in (0, 0.5] so the high and low sets do not overlap, got {rho}")
    if mode == "divpo" and divpo_sampler == "authors" and max_pairs_per_prompt is None:
        raise ValueError("the authors' divpo sampler needs max_pairs_per_prompt (their max_pair_num, 2)")
    gap = _gap_authors if gap_sampler == "authors" else _gap
    out: list[Pair] = []
    for pid, group in group_by_prompt(responses).items():
        if len(group) < 2:
            continue
        if mode == "best_vs_worst":
            out.extend(_best_vs_worst(group))
        elif mode == "gap":
            out.extend(gap(group, min_gap, max_pairs_per_prompt, _rng(seed, pid, "gap")))
        elif mode == "all":
            out.extend(_all(group, max_pairs_per_prompt, _rng(seed, pid, "all")))
        elif divpo_sampler == "authors":
            # Their DivPO reads the responses their gap step paired (max_pairs None: the pool is not capped).
            gap_pairs = gap(group, min_gap, None, _rng(seed, pid, "gap"))
            paired = {r for p in gap_pairs for r in (p.chosen_id, p.rejected_id)}
            pool = [r for r in group if r.response_id in paired]
            out.extend(_divpo_authors(pool, rho, max_pairs_per_prompt, deviation, _rng(seed, pid, "divpo")))
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
    """Copies of the pairs with chosen_weight = weight_of(chosen), rejected_weight = weight_of(rejected).

    Only the chosen weight enters a loss (as in the authors' trainers, models/ddpo_trainer.py:1237 and
    models/dorpo_trainer.py:701,834); the rejected weight is recorded for reports."""
    return [
        replace(
            p,
            chosen_weight=float(deviation.weight_of(p.chosen_id)),
            rejected_weight=float(deviation.weight_of(p.rejected_id)),
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


def responses_of_pairs(pairs: Sequence[Pair]) -> list[Response]:
    """Distinct responses of the pairs, in order of first use."""
    seen: dict[str, Response] = {}
    for p in pairs:
        sides = ((p.chosen_id, p.chosen, p.chosen_score), (p.rejected_id, p.rejected, p.rejected_score))
        for rid, text, score in sides:
            if rid not in seen:
                seen[rid] = Response(prompt_id=p.prompt_id, response_id=rid, prompt=p.prompt, text=text, score=score)
    return list(seen.values())


def paired_groups(
    pairs: Sequence[Pair], max_per_prompt: int | None = None
) -> tuple[list[Pair], list[Response], dict[str, int]]:
    """The authors' deviation groups (scripts_dataset_cleaner/3_data_prep_for_diversified_training.py:52-73).

    Per prompt, its pairs are read in order and each adds its chosen and rejected response to the
    prompt's group list; with `max_per_prompt` (their max_cutoff) a pair is read only while that list
    holds fewer than max_per_prompt entries, and afterwards every pair of the prompt whose two responses
    are not both in the list is dropped. Returns (kept pairs in input order, the distinct responses of
    the groups, how often each appears in its group list: the counts count_duplicates uses).
    """
    lists: dict[str, list[Pair]] = {}
    for p in pairs:
        lists.setdefault(p.prompt_id, [])
        if max_per_prompt is None or 2 * len(lists[p.prompt_id]) < max_per_prompt:
            lists[p.prompt_id].append(p)
    taken = [p for ps in lists.values() for p in ps]
    counts = response_pair_counts(taken)
    kept = [p for p in pairs if p.chosen_id in counts and p.rejected_id in counts]
    return kept, responses_of_pairs(taken), counts
