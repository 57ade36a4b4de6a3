"""engine.metrics against values computed by hand on small fixed texts (the arithmetic is in the comments).

Both definitions: the engine's (the default) and `compat="authors"` (the authors' evaluation code; its
equality with an independent port of that code is tested in tests/test_fidelity.py, point 11).
"""

import gzip
import itertools
import math
import types

import numpy as np
import pytest

from engine import metrics as M

# ------------------------------------------------------------------------------------ n-gram diversity


def test_ngram_diversity_hand_computed():
    # words: a b c a b d
    # 1-grams: 6 total, distinct {a, b, c, d} = 4          -> 4/6
    # 2-grams: ab bc ca ab bd = 5 total, distinct 4         -> 4/5
    # 3-grams: abc bca cab abd = 4 total, all distinct      -> 4/4
    # 4-grams: abca bcab cabd = 3 total, all distinct       -> 3/3
    assert M.ngram_diversity(["a b c", "a b d"]) == pytest.approx(4 / 6 + 4 / 5 + 1 + 1)


def test_ngram_diversity_identical_samples():
    # words: a b a b -> 1-grams 2/4, 2-grams (ab ba ab) 2/3, 3-grams (aba bab) 2/2, 4-grams 1/1
    assert M.ngram_diversity(["a b", "a b"]) == pytest.approx(0.5 + 2 / 3 + 1 + 1)


def test_ngram_diversity_disjoint_vocabularies_is_maximal():
    assert M.ngram_diversity(["a b", "c d"]) == pytest.approx(4.0)
    assert M.ngram_diversity(["one two three", "four five six"], max_n=3) == pytest.approx(3.0)


def test_ngram_diversity_short_texts_contribute_zero_for_large_n():
    # words: x y -> 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams (contribute 0, no division by zero)
    assert M.ngram_diversity(["x", "y"]) == pytest.approx(2.0)
    assert M.ngram_diversity(["hello"]) == pytest.approx(1.0)
    assert M.ngram_diversity([]) == 0.0
    assert M.ngram_diversity(["", "  "]) == 0.0


def test_ngram_diversity_splits_on_any_whitespace():
    # "a  b\n" + " " + "c" -> words a b c: 3/3 + 2/2 + 1/1 + (no 4-grams)
    assert M.ngram_diversity(["a  b\n", "c"]) == pytest.approx(3.0)


def test_ngram_diversity_rejects_bad_max_n():
    with pytest.raises(ValueError, match="max_n"):
        M.ngram_diversity(["a"], max_n=0)


# ---------------------------------------------------------------------------------- compression ratio


def test_compression_ratio_hand_computed():
    # gzip stream = 10-byte header + deflate data + 8-byte trailer (CRC32, size).
    # Empty input: deflate is one fixed block with only end-of-block (3 + 7 bits -> 2 bytes): 20 bytes.
    assert M.compression_ratio([]) == 0.0
    # "a": 3 header bits + 8-bit literal + 7-bit end-of-block = 18 bits -> 3 bytes; 21 in all.
    assert M.compression_ratio(["a"]) == pytest.approx(1 / 21)
    # ["a", "b"] joins to "a b": 3 + 3*8 + 7 = 34 bits -> 5 bytes; 23 in all; 3 bytes of input.
    assert M.compression_ratio(["a", "b"]) == pytest.approx(3 / 23)


def test_compression_ratio_counts_utf8_bytes():
    # "e-acute" is 2 bytes in UTF-8: input 2 bytes; deflate: 3 + 2 literals of 9 bits (>= 144) + 7 = 28 bits -> 4 bytes
    assert M.compression_ratio(["\u00e9"]) == pytest.approx(2 / 22)


def test_compression_ratio_is_higher_for_repetitive_text():
    repetitive = ["the cat sat on the mat"] * 8
    varied = [f"story {i} about a {w} under the {v}" for i, (w, v) in enumerate(zip("abcdefgh", "zyxwvuts"))]
    assert M.compression_ratio(repetitive) > 1.5 * M.compression_ratio(varied)
    assert M.compression_ratio(repetitive) == M.compression_ratio(list(repetitive))  # deterministic


# ------------------------------------------------------------------------------------- homogenization


def test_homogenization_hand_computed():
    # LCS("a b c", "a b d") = 2 -> P = R = 2/3 -> F = 2/3, both orders
    assert M.homogenization(["a b c", "a b d"]) == pytest.approx(2 / 3)
    # Add "x y z" (no overlap): ordered pairs (0,1),(1,0) = 2/3, the four others 0 -> (4/3) / 6
    assert M.homogenization(["a b c", "a b d", "x y z"]) == pytest.approx(2 / 9)
    # Different lengths: LCS("a b c d", "a b") = 2, P = 1, R = 1/2 -> F = 2/3 (same in the other order)
    assert M.homogenization(["a b c d", "a b"]) == pytest.approx(2 / 3)


def test_homogenization_identical_and_disjoint():
    assert M.homogenization(["the cat sat", "the cat sat", "the cat sat"]) == pytest.approx(1.0)
    assert M.homogenization(["", ""]) == pytest.approx(1.0)  # identical empty texts are identical
    assert M.homogenization(["red fox", "blue whale"]) == 0.0
    assert M.homogenization(["", "a"]) == 0.0


def test_homogenization_uses_rouge_tokenizer():
    # rouge-score lowercases and drops punctuation: these two differ as strings but not as tokens
    assert M.homogenization(["The Cat!", "the cat"]) == pytest.approx(1.0)


def test_homogenization_single_sample_is_nan():
    assert math.isnan(M.homogenization(["only one"]))
    assert math.isnan(M.homogenization([]))


# -------------------------------------------------------------------------------- embedding diversity


def test_embedding_diversity_hand_computed():
    assert M.embedding_diversity(np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)
    assert M.embedding_diversity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # pairs: (e1, e2) cos 0 -> 1; (e1, -e1) cos -1 -> 2; (e2, -e1) cos 0 -> 1; mean 4/3
    assert M.embedding_diversity(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])) == pytest.approx(4 / 3)
    # 60 degrees apart: cos 1/2 -> distance 1/2
    assert M.embedding_diversity([[1.0, 0.0], [0.5, math.sqrt(3) / 2]]) == pytest.approx(0.5)


def test_embedding_diversity_normalises_rows_and_handles_edges():
    assert M.embedding_diversity(np.array([[2.0, 0.0], [0.0, 3.0]], dtype=np.float32)) == pytest.approx(1.0)
    assert M.embedding_diversity(np.array([[3.0, 4.0], [0.6, 0.8], [6.0, 8.0]])) == pytest.approx(0.0, abs=1e-12)
    assert M.embedding_diversity(np.ones((1, 5))) == 0.0  # one sample: no spread
    assert M.embedding_diversity(np.zeros((0, 5))) == 0.0
    assert M.embedding_diversity(np.array([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)  # zero row: cos 0
    with pytest.raises(ValueError, match="2-D"):
        M.embedding_diversity(np.ones(3))


# --------------------------------------------------------------------------- lengths, shares, entropy


def test_length_stats_hand_computed():
    s = M.length_stats(["a b", "c d e f", ""])
    # words 2, 4, 0: mean 2, population std sqrt((0 + 4 + 4) / 3); chars 3, 7, 0
    assert s["length_words_mean"] == pytest.approx(2.0)
    assert s["length_words_std"] == pytest.approx(math.sqrt(8 / 3))
    assert (s["length_words_min"], s["length_words_max"]) == (0.0, 4.0)
    assert s["length_chars_mean"] == pytest.approx(10 / 3)
    assert s["empty_share"] == pytest.approx(1 / 3)
    assert M.length_stats([]) == {}


def test_label_shares_and_entropy_hand_computed():
    labels = ["a", "a", "b", None]
    assert M.label_shares(labels, ("a", "b", "c")) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.0, M.NONE_LABEL: 0.25})
    # labelled: a 2/3, b 1/3 -> H = (2/3) ln 1.5 + (1/3) ln 3 = 0.636514; / ln 3 = 0.579380
    assert M.normalized_entropy(labels, 3) == pytest.approx(0.579380, abs=1e-6)
    assert M.normalized_entropy(["a", "b", "c"], 3) == pytest.approx(1.0)
    assert M.normalized_entropy(["a", "a"], 3) == 0.0
    assert math.copysign(1.0, M.normalized_entropy(["a", "a"], 3)) == 1.0  # not -0.0 in reports
    assert M.normalized_entropy([None, None], 3) == 0.0
    with pytest.raises(ValueError, match="not among the categories"):
        M.label_shares(["zebra"], ("a", "b"))


def test_text_metrics_and_mean_over_prompts():
    row = M.text_metrics(["a b c", "a b d"])
    assert row["n_samples"] == 2
    assert row["ngram_diversity"] == pytest.approx(4 / 6 + 4 / 5 + 2)
    assert row["homogenization"] == pytest.approx(2 / 3)
    per_prompt = [
        {"x": 1.0, "h": float("nan"), "shares": {"a": 1.0}, "prompt": "p"},
        {"x": 3.0, "h": 0.5, "n": 2},
    ]
    avg = M.mean_over_prompts(per_prompt)
    assert avg == {"x": 2.0, "h": 0.5, "n": 2.0}
    assert math.isnan(M.mean_over_prompts([{"h": float("nan")}])["h"])


# ------------------------------------------------------------------------- engine: what the names claim


def test_compression_ratio_is_one_gzip_stream_independent_of_the_clock(monkeypatch):
    text = ["the cat sat on the mat, " * 20, "and the dog sat on the log."]
    data = " ".join(text).encode()
    before = M.compression_ratio(text)
    monkeypatch.setattr(gzip, "time", types.SimpleNamespace(time=lambda: 1.75e9))  # the stamp gzip would write
    assert M.compression_ratio(text) == before == len(data) / len(gzip.compress(data, 9, mtime=0))


# Four samples whose pairs are scored by hand: LCS("a b c", "a b d") = 2 of 3 and 3 -> F 2/3;
# LCS("a b c", "a b") = 2: P 1, R 2/3 -> F 4/5 (likewise "a b d" / "a b"); "x y z" shares nothing.
FOUR = ["a b c", "a b d", "x y z", "a b"]


def test_homogenization_counts_every_sample_in_any_order():
    # unordered pairs: 2/3 + 4/5 + 4/5 and three zeros -> (34/15) / 6 = 17/45
    for order in itertools.permutations(FOUR):
        assert M.homogenization(list(order)) == pytest.approx(17 / 45)


# ------------------------------------------------------------------------------- authors' definitions


def test_authors_ngram_diversity_splits_on_single_spaces_and_rounds():
    # "a  b" + " " + "c d" split on " " -> a, "", b, c, d: 5/5 + 4/4 + 3/3 + 2/2; the engine sees a b c d: 1+1+1+1
    assert M.ngram_diversity(["a  b", "c d"], compat="authors") == 4.0
    # "x\ny z" -> words "x\ny", "z" for them (no 3-gram: their 0/0, NaN here); x, y, z for the engine
    assert math.isnan(M.ngram_diversity(["x\ny z"], compat="authors"))
    assert M.ngram_diversity(["x\ny z"]) == pytest.approx(3.0)
    assert M.ngram_diversity(["a b c", "a b d"], compat="authors") == 3.467  # 3.4667 rounded to 3 decimals


def test_authors_compression_ratio_compresses_twice():
    # Their denominator is a gzip stream compressed again inside a gzip file with a name (a 21-byte header
    # and an 8-byte trailer around it): a compressed stream hardly compresses, so their ratio is lower.
    for texts in (["the cat sat on the mat"] * 8, ["a story about a cat", "a story about a dog"], ["x"]):
        authors = M.compression_ratio(texts, compat="authors")
        assert authors == round(authors, 3) and authors < M.compression_ratio(texts)
    assert M.compression_ratio([], compat="authors") == 0.0


def test_authors_homogenization_by_hand():
    # Rows of FOUR: r0 = 2/3 + 0 + 4/5 = 22/15, r1 = 22/15, r2 = 0; the last row is never added:
    # (22/15 + 22/15 + 0) / 3 / 4 = 11/45 = 0.2444
    assert M.homogenization(FOUR, compat="authors") == 0.244
    # Another order, another value: r0 ("a b") = 0 + 4/5 + 4/5, r1 = 0, r2 = 4/5 + 0 + 2/3, r3 dropped:
    # (8/5 + 22/15) / 3 / 4 = 46/180 = 0.2556
    assert M.homogenization(["a b", "x y z", "a b c", "a b d"], compat="authors") == 0.256
    assert M.homogenization(["a b c", "a b d"], compat="authors") == 0.333  # (2/3) / 1 / 2
    # n identical samples: one merged row of n (n - 1) ones, nothing added before it -> n (n - 1) / n
    assert M.homogenization(["same"] * 3, compat="authors") == 2.0
    assert M.homogenization(["same"] * 4, compat="authors") == 3.0
    assert M.homogenization(["same"] * 3) == 1.0
    # consecutive copies merge: rows "a" (twice: 1 + 0 + 1 + 0) then "b" (dropped) -> 2 / 2 / 3
    assert M.homogenization(["a", "a", "b"], compat="authors") == 0.333
    assert M.homogenization(["only one"], compat="authors") == 0.0
    assert math.isnan(M.homogenization([], compat="authors"))


def test_authors_embedding_diversity_of_one_sample_is_nan():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert M.embedding_diversity(e, compat="authors") == M.embedding_diversity(e) == pytest.approx(4 / 3)
    assert math.isnan(M.embedding_diversity(np.ones((1, 3)), compat="authors"))
    assert M.embedding_diversity(np.ones((1, 3))) == 0.0


def test_authors_text_metrics_read_samples_as_their_csv_does():
    assert M.authors_csv_texts(["", "None", "NA", "none", " ", "nan x"]) == ["nan", "nan", "nan", "none", " ", "nan x"]
    samples = ["", "", "a", "b"]
    row = M.text_metrics(samples, compat="authors")
    # scored "nan nan a b": 3/4 + 3/3 + 2/2 + 1/1; the engine scores "a b": 2/2 + 1/1 (no 3- or 4-gram)
    assert row["ngram_diversity"] == 3.75 and M.text_metrics(samples)["ngram_diversity"] == pytest.approx(2.0)
    # "nan" == "nan" scores 1; the two "nan" rows merge (1 + 1), "a" adds 0, "b" is dropped: (2 / 3) / 4
    assert row["homogenization"] == 0.167
    assert row["length_chars_mean"] == 0.5 and row["empty_share"] == 0.5  # lengths are the samples' own


def test_metrics_reject_an_unknown_compat():
    for call in (
        lambda: M.ngram_diversity(["a"], compat="paper"),
        lambda: M.text_metrics(["a"], compat="paper"),
        lambda: M.embedding_diversity(np.ones((2, 2)), compat="paper"),
    ):
        with pytest.raises(ValueError, match="'paper'.*eval.metrics_compat"):
            call()
