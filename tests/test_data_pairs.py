"""engine.data.pairs: every pair mode on hand-made responses with known expected pairs; split; weights."""

import itertools

import pytest

from engine.data.pairs import (
    attach_weights,
    build_pairs,
    divpo_set_size,
    pair_skip_counts,
    response_pair_counts,
    split_by_prompt,
)
from engine.data.records import Response, make_pair_id, make_prompt_id, make_response_id


def group(prompt, scored):
    """Responses of one prompt from (text, score) tuples."""
    pid = make_prompt_id(prompt)
    return [
        Response(prompt_id=pid, response_id=make_response_id(pid, t), prompt=prompt, text=t, score=s) for t, s in scored
    ]


class FakeDeviation:
    """Dict-backed stand-in for engine.deviation's result (the two methods the engine's pairs use)."""

    def __init__(self, scores, weights=None):
        self.scores, self.weights = scores, weights or {}

    def score_of(self, rid):
        return self.scores[rid]

    def weight_of(self, rid):
        return self.weights[rid]


def texts(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


def test_best_vs_worst():
    a = group("A", [("a1", 3), ("a2", 10), ("a3", 1), ("a4", 10)])
    b = group("B", [("b1", 5)])  # one response: skipped
    c = group("C", [("c1", 4), ("c2", 4)])  # all equal: skipped
    pairs = build_pairs(a + b + c, "best_vs_worst")
    assert texts(pairs) == [("a2", "a3")]  # ties: the first in input order
    p = pairs[0]
    assert (p.chosen_score, p.rejected_score) == (10.0, 1.0)
    assert p.pair_id == make_pair_id(p.chosen_id, p.rejected_id) and p.prompt_id == make_prompt_id("A")
    assert pair_skip_counts(a + b + c, pairs) == {"prompt_fewer_than_2_responses": 1, "prompt_all_scores_equal": 1}


def test_gap_prefers_min_gap_then_falls_back():
    # Scores 0, 1, 10, 11: gap >= 5 gives two disjoint pairs, each spanning the low and the high cluster.
    g = group("G", [("s0", 0), ("s1", 1), ("s10", 10), ("s11", 11)])
    for seed in range(10):
        pairs = build_pairs(g, "gap", min_gap=5, seed=seed)
        assert len(pairs) == 2
        assert all(p.chosen_score - p.rejected_score >= 5 for p in pairs)
        used = [t for pr in texts(pairs) for t in pr]
        assert sorted(used) == ["s0", "s1", "s10", "s11"]  # disjoint, all used
    # No pair reaches the gap: fall back to any different scores; equal scores never pair.
    h = group("H", [("h1", 1), ("h2", 2), ("h3", 2), ("h4", 3)])
    pairs = build_pairs(h, "gap", min_gap=5, seed=0)
    assert len(pairs) == 2 and all(p.chosen_score > p.rejected_score for p in pairs)
    assert len({t for pr in texts(pairs) for t in pr}) == 4
    # max_pairs_per_prompt caps
    many = group("M", [(f"m{i}", i * 10) for i in range(20)])
    assert len(build_pairs(many, "gap", max_pairs_per_prompt=3)) == 3
    assert len(build_pairs(many, "gap")) == 10


def test_gap_is_deterministic_per_seed_and_independent_of_other_prompts():
    g = group("G", [(f"g{i}", i * 3) for i in range(12)])
    other = group("O", [(f"o{i}", i) for i in range(6)])
    p0 = build_pairs(g, "gap", seed=0)
    assert texts(p0) == texts(build_pairs(g, "gap", seed=0))
    assert texts(p0) == texts([p for p in build_pairs(other + g, "gap", seed=0) if p.prompt == "G"])
    assert any(texts(build_pairs(g, "gap", seed=s)) != texts(p0) for s in range(1, 5))


def test_all_mode():
    g = group("A", [("x", 1), ("y", 2), ("z", 2), ("w", 5)])
    pairs = build_pairs(g, "all")
    expected = {
        (c, r) for (c, sc), (r, sr) in itertools.permutations([("x", 1), ("y", 2), ("z", 2), ("w", 5)], 2) if sc > sr
    }
    assert set(texts(pairs)) == expected and len(pairs) == 5
    capped = build_pairs(g, "all", max_pairs_per_prompt=3, seed=1)
    assert len(capped) == 3 and set(texts(capped)) <= expected
    assert texts(capped) == texts(build_pairs(g, "all", max_pairs_per_prompt=3, seed=1))


def test_divpo_picks_most_diverse_high_and_least_diverse_low():
    # 8 responses, rho 0.25 -> high set = top 2 by upvotes, low set = bottom 2.
    g = group("D", [("h1", 50), ("h2", 40), ("m1", 30), ("m2", 25), ("m3", 20), ("m4", 15), ("l1", 5), ("l2", 1)])
    ids = {r.text: r.response_id for r in g}
    div = FakeDeviation(
        {
            ids["h1"]: 0.1,
            ids["h2"]: 0.9,
            ids["l1"]: 0.2,
            ids["l2"]: 0.7,
            ids["m1"]: 5.0,
            ids["m2"]: 5.0,
            ids["m3"]: -5.0,
            ids["m4"]: -5.0,
        }
    )
    pairs = build_pairs(g, "divpo", rho=0.25, deviation=div)
    # pair 1: most diverse high (h2) vs least diverse low (l1); pair 2 without reuse: h1 vs l2.
    assert texts(pairs) == [("h2", "l1"), ("h1", "l2")]
    assert texts(build_pairs(g, "divpo", rho=0.25, deviation=div, max_pairs_per_prompt=1)) == [("h2", "l1")]
    # rho 0.5: high = top 4, low = bottom 4; the very diverse middle responses now compete.
    pairs = build_pairs(g, "divpo", rho=0.5, deviation=div)
    assert texts(pairs)[0] == ("m1", "m3")
    with pytest.raises(ValueError, match="deviation"):
        build_pairs(g, "divpo")


def test_divpo_set_sizes():
    assert [divpo_set_size(n, 0.25) for n in (2, 3, 4, 5, 8, 10, 100)] == [1, 1, 1, 1, 2, 3, 25]  # round half up
    assert divpo_set_size(5, 0.5) == 2  # never overlapping


def test_split_by_prompt_disjoint_deterministic_and_consistent():
    items = [r for k in range(400) for r in group(f"P{k}", [(f"t{k}a", 1), (f"t{k}b", 2)])]
    train, val = split_by_prompt(items, 0.25, seed=0)
    val_ids = {r.prompt_id for r in val}
    assert {r.prompt_id for r in train}.isdisjoint(val_ids) and len(train) + len(val) == len(items)
    assert 70 <= len(val_ids) <= 130  # 100 expected (binomial, sd ~9)
    assert [r.response_id for r in val] == [r.response_id for r in split_by_prompt(items, 0.25, seed=0)[1]]
    assert val_ids != {r.prompt_id for r in split_by_prompt(items, 0.25, seed=1)[1]}
    # A prompt's side depends only on its id: splitting pairs (a subset of prompts, reordered) agrees
    # with splitting responses, which is what keeps evaluation prompts out of training.
    pairs = build_pairs(items[::-1][:300], "best_vs_worst")
    p_train, p_val = split_by_prompt(pairs, 0.25, seed=0)
    assert {p.prompt_id for p in p_val} == val_ids & {p.prompt_id for p in pairs}
    assert {p.prompt_id for p in p_train}.isdisjoint(val_ids)
    assert split_by_prompt(items, 0.0, seed=0) == (list(items), [])


def test_attach_weights_and_pair_counts():
    g = group("W", [("a", 9), ("b", 1), ("c", 5)])
    ids = [r.response_id for r in g]
    dev = FakeDeviation({}, weights={ids[0]: 1.3, ids[1]: 0.05, ids[2]: 0.9})
    pairs = attach_weights(build_pairs(g, "all"), dev)
    got = {(p.chosen, p.rejected): (p.chosen_weight, p.rejected_weight) for p in pairs}
    assert got == {("a", "b"): (1.3, 0.05), ("a", "c"): (1.3, 0.9), ("c", "b"): (0.9, 0.05)}
    assert response_pair_counts(pairs) == {ids[0]: 2, ids[1]: 2, ids[2]: 2}


def test_divpo_and_weights_with_real_deviation_pipeline(tmp_path):
    try:
        from engine.deviation import compute_deviation
    except Exception as e:  # another helper is writing engine.deviation; test the wiring once it imports
        pytest.skip(f"engine.deviation does not import yet: {type(e).__name__}: {e}")
    from engine.config import DeviationConfig
    from engine.data.loading import load_responses

    responses, _ = load_responses("synthetic", synthetic_prompts=12, synthetic_seed=0)
    cfg = DeviationConfig(semantic_model="", style_model="builtin:stylometric", cache_dir=str(tmp_path / "emb"))
    dev = compute_deviation(responses, cfg, cache_dir=str(tmp_path / "emb"))
    pairs = build_pairs(responses, "divpo", rho=0.25, deviation=dev)
    assert pairs and all(p.chosen_score > p.rejected_score for p in pairs)
    weighted = attach_weights(pairs, dev)
    assert all(p.rejected_weight == dev.weight_of(p.rejected_id) for p in weighted)
    assert any(p.chosen_weight != 1.0 for p in weighted)
