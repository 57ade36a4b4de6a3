"""Synthetic WritingPrompts data: deterministic, schema-valid, ground truth present, popularity bias measurable."""

import statistics

import pytest

from engine.data.synthetic import POPULAR_STYLE, POPULAR_THEME, STYLES, THEMES, classify, generate_rows

SCHEMA = {
    "post_title": str,
    "post_text": str,
    "post_scores": int,
    "comment_texts": list,
    "comment_scores": list,
    "comment_times": list,
}


def test_deterministic():
    assert generate_rows(20, seed=5) == generate_rows(20, seed=5)
    assert generate_rows(20, seed=5) != generate_rows(20, seed=6)


def test_prompts_are_distinct():
    for n in (240, 1000):
        titles = [r["post_title"] for r in generate_rows(n, seed=1)]
        assert len(set(titles)) == n


def test_schema_and_ground_truth():
    rows = generate_rows(50, seed=0)
    for row in rows:
        for key, typ in SCHEMA.items():
            assert isinstance(row[key], typ), key
        n = len(row["comment_texts"])
        assert n >= 4 and len(row["comment_scores"]) == n == len(row["comment_times"]) == len(row["truth"])
        assert row["post_title"].startswith("[WP] ")
        assert all(isinstance(s, int) and s >= 0 for s in row["comment_scores"])
        for text, truth in zip(row["comment_texts"], row["truth"]):
            assert truth["theme"] in THEMES and truth["style"] in STYLES
            got = classify(text)
            # The classifier recovers the generator's ground truth exactly.
            assert (got.theme, got.style, got.quality) == (truth["theme"], truth["style"], truth["quality"])
            assert 0.0 <= got.quality <= 1.0


def test_popularity_bias_is_measurable():
    rows = generate_rows(300, seed=0)
    pop, other, quality, score = [], [], [], []
    best_popular = 0
    for row in rows:
        for s, t in zip(row["comment_scores"], row["truth"]):
            (pop if (t["theme"], t["style"]) == (POPULAR_THEME, POPULAR_STYLE) else other).append(s)
            quality.append(t["quality"])
            score.append(s)
        best = max(range(len(row["comment_scores"])), key=row["comment_scores"].__getitem__)
        best_popular += row["truth"][best]["theme"] == POPULAR_THEME
    # The popular theme+style earns clearly more upvotes on average...
    assert statistics.mean(pop) > statistics.mean(other) + 8
    # ...so it wins best-vs-worst far more often than its share of responses...
    share = sum(t["theme"] == POPULAR_THEME for r in rows for t in r["truth"]) / len(quality)
    assert best_popular / len(rows) > share + 0.15
    # ...while quality still drives upvotes.
    assert statistics.correlation(quality, score) > 0.4


def test_classify_on_arbitrary_text():
    assert classify("").quality == 0.0 and classify("").theme is None
    salad = classify("luminous luminous luminous luminous")
    assert salad.style is None
    good = classify(
        "Mara watched the luminous stars near the ancient station. Theo held the jagged comet near the silent orbit."
    )
    assert good.theme == "space" and good.style == "plain" and good.quality > 0


def test_story_lengths_for_benchmarks():
    """lengths="stories" makes WritingPrompts-like responses (hundreds of words, a long tail); the default
    stays the short data every other test and the golden run use."""
    short = [len(t.split()) for r in generate_rows(40, 0) for t in r["comment_texts"]]
    stories = [len(t.split()) for r in generate_rows(40, 0, lengths="stories") for t in r["comment_texts"]]
    assert max(short) < 120
    assert 150 < statistics.median(stories) < 320 and max(stories) > 2.5 * statistics.median(stories)
    assert generate_rows(3, 5, lengths="stories") == generate_rows(3, 5, lengths="stories")
    with pytest.raises(ValueError, match="lengths"):
        generate_rows(3, lengths="novels")
