"""engine.deviation against brute force: exact mean scores, FAISS knn, the published weight transform,
the embedders, the embedding cache, compute_deviation and the CLI. Small inputs only."""

import json
import math

import numpy as np
import pytest

from engine.data.records import Response, make_prompt_id, make_response_id
from engine.deviation import (
    CorruptCacheError,
    DeviationResult,
    EmbeddingCache,
    StylometricEmbedder,
    compute_deviation,
    deviation_scores,
    deviation_weights,
    embed_cached,
    get_embedder,
)
from engine.deviation import scores as scores_mod

SIZES = (1, 2, 3, 17, 200)


# ---------------------------------------------------------------------------- references


def pairwise_ref(x, metric):
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - u @ u.T
    diff = x[:, None, :] - x[None, :, :]
    return np.sqrt((diff**2).sum(-1))


def mean_ref(x, groups, metric):
    out = np.zeros(len(x))
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == g)
        if len(idx) < 2:
            continue
        d = pairwise_ref(x[idx], metric)
        np.fill_diagonal(d, 0.0)
        out[idx] = d.sum(1) / (len(idx) - 1)
    return out


def knn_ref(x, groups, metric, k, scope):
    """Mean distance to the k nearest others, by full sort. Exact ties at the k-th place do not change
    the mean (tied distances are equal), so the reference is unambiguous."""
    out = np.zeros(len(x))
    groups = np.asarray(groups)
    sets = (
        [np.arange(len(x))]
        if scope == "global"
        else [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    )
    for idx in sets:
        if len(idx) < 2:
            continue
        d = pairwise_ref(x[idx], metric)
        np.fill_diagonal(d, np.inf)
        kk = min(k, len(idx) - 1)
        out[idx] = np.sort(d, axis=1)[:, :kk].mean(1)
    return out


def weights_ref(emb_list, groups, tie=1e-6, counts=None):
    """The three published steps, written out group by group with plain Python loops."""
    groups = list(groups)
    n = len(groups)
    counts = [1] * n if counts is None else list(counts)
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    scaled_all = []
    for e in emb_list:
        raw = [0.0] * n
        for idx in members.values():
            # expand multiplicities into physical copies, as the published scripts see them
            rows = [i for i in idx for _ in range(counts[i])]
            if len(rows) < 2:
                continue
            d = pairwise_ref(e[rows], "cosine")
            seen = set()
            for a, i in enumerate(rows):
                if i in seen:
                    continue
                seen.add(i)
                raw[i] = sum(d[a, b] for b in range(len(rows)) if b != a) / (len(rows) - 1)
        scaled = [0.0] * n
        for idx in members.values():
            lo, hi = min(raw[i] for i in idx), max(raw[i] for i in idx)
            for i in idx:
                scaled[i] = 0.0 if hi - lo <= tie else 2 * (raw[i] - lo) / (hi - lo) - 1
        scaled_all.append(scaled)
    m = len(emb_list)
    comb = [2 * math.prod(((s[i] + 1) / 2) ** (1 / m) for s in scaled_all) - 1 for i in range(n)]
    w = [1.0] * n
    for idx in members.values():
        vals = [comb[i] + 1 for i in idx]
        if max(vals) - min(vals) <= tie:
            continue
        mean = sum(comb[i] + 1 for i in idx) / len(idx)  # distinct responses, as the published dict of texts
        for i in idx:
            w[i] = (comb[i] + 1) / mean
    return np.asarray(w), np.asarray(comb), [np.asarray(s) for s in scaled_all]


def make_groups(rng, sizes=SIZES, d=16, dup=True, shuffle=True, str_ids=True):
    """Random groups of the given sizes; some exact duplicate rows; rows shuffled across groups."""
    xs, gs = [], []
    for gi, n in enumerate(sizes):
        x = rng.standard_normal((n, d)).astype(np.float32)
        if dup and n >= 3:
            x[1] = x[0]  # exact duplicate text -> identical embedding
        xs.append(x)
        gs += [f"p{gi}" if str_ids else gi] * n
    x = np.concatenate(xs)
    g = np.asarray(gs, dtype=object if str_ids else np.int64)
    if shuffle:
        perm = rng.permutation(len(x))
        x, g = x[perm], g[perm]
    return x, g


# ---------------------------------------------------------------------------- mean scores


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_mean_matches_bruteforce(metric, shuffle):
    rng = np.random.default_rng(1)
    x, g = make_groups(rng, shuffle=shuffle)
    got = deviation_scores(x, g, metric=metric, mode="mean")
    ref = mean_ref(x, g, metric)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    assert np.all(got[np.asarray([np.sum(g == v) for v in g]) == 1] == 0)  # lone responses score 0


def test_mean_cosine_unnormalised_and_float64_inputs():
    rng = np.random.default_rng(2)
    x, g = make_groups(rng, sizes=(5, 17), d=8)
    x = x * rng.uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)
    for arr in (x, x.astype(np.float64)):
        np.testing.assert_allclose(deviation_scores(arr, g), mean_ref(x, g, "cosine"), atol=1e-9)


def test_mean_streaming_paths(monkeypatch):
    """Chunks smaller than groups (cosine streams one big group in two passes; euclidean tiles rows)."""
    monkeypatch.setattr(scores_mod, "_CHUNK_ROWS", 7)
    monkeypatch.setattr(scores_mod, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(scores_mod, "_BIG_GROUP", 10)
    monkeypatch.setattr(scores_mod, "_BLOCK_ELEMS", 64)
    rng = np.random.default_rng(3)
    x, g = make_groups(rng, sizes=(1, 2, 3, 17, 40, 5))
    for metric in ("cosine", "euclidean"):
        np.testing.assert_allclose(deviation_scores(x, g, metric=metric), mean_ref(x, g, metric), atol=1e-9)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_mean_counts_equal_physical_copies(metric):
    rng = np.random.default_rng(4)
    x, g = make_groups(rng, sizes=(1, 2, 3, 17))
    counts = rng.integers(1, 4, size=len(x))
    rep = np.repeat(np.arange(len(x)), counts)
    ref = mean_ref(x[rep], g[rep], metric)
    got = deviation_scores(x, g, metric=metric, counts=counts)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    np.testing.assert_allclose(got, ref[first], atol=1e-9)


def test_mean_ties_and_lone_copies():
    x = np.tile(np.asarray([[1.0, 2.0, 3.0]], dtype=np.float32), (4, 1))
    assert np.allclose(deviation_scores(x, [0, 0, 0, 0]), 0.0, atol=1e-12)  # all identical
    assert deviation_scores(x[:1], [0], counts=[3])[0] == 0.0  # copies of one response only


def test_scores_reject_bad_input():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        deviation_scores(x, [0, 0, 0], metric="manhattan")
    with pytest.raises(ValueError, match="align"):
        deviation_scores(x, [0, 0])
    with pytest.raises(ValueError, match="zero embeddings"):
        deviation_scores(np.zeros((2, 4), np.float32), [0, 0])
    with pytest.raises(ValueError, match="counts"):
        deviation_scores(x, [0, 0, 0], counts=[0, 1, 1])
    with pytest.raises(ValueError, match="scope"):
        deviation_scores(x, [0, 0, 0], scope="global")


# ---------------------------------------------------------------------------- knn (FAISS)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_knn_group_flat_exact(metric, k):
    rng = np.random.default_rng(5)
    x, g = make_groups(rng)
    got = deviation_scores(x, g, metric=metric, mode="knn", k=k)
    np.testing.assert_allclose(got, knn_ref(x, g, metric, k, "group"), atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_global_flat_and_ivf_exact(metric):
    rng = np.random.default_rng(6)
    x, g = make_groups(rng, sizes=(1, 3, 17, 200))
    ref = knn_ref(x, g, metric, 5, "global")
    flat = deviation_scores(x, g, metric=metric, mode="knn", k=5, scope="global")
    np.testing.assert_allclose(flat, ref, atol=1e-5)
    # IVF with every list probed is exact
    ivf = deviation_scores(x, g, metric=metric, mode="knn", k=5, scope="global", ivf_min_size=0, nlist=4, nprobe=4)
    np.testing.assert_allclose(ivf, ref, atol=1e-5)
    # group scope through IVF for the big group
    ivf_g = deviation_scores(x, g, metric=metric, mode="knn", k=4, ivf_min_size=100, nlist=4, nprobe=4)
    np.testing.assert_allclose(ivf_g, knn_ref(x, g, metric, 4, "group"), atol=1e-5)


def test_knn_with_all_others_equals_mean():
    rng = np.random.default_rng(7)
    x, g = make_groups(rng, sizes=(2, 3, 17))
    np.testing.assert_allclose(deviation_scores(x, g, mode="knn", k=100), deviation_scores(x, g), atol=1e-5)


# ---------------------------------------------------------------------------- weights


def _assert_mean_one(w, g):
    for v in dict.fromkeys(np.asarray(g).tolist()):
        assert abs(w[np.asarray(g) == v].mean() - 1.0) < 1e-12


@pytest.mark.parametrize("n_models", [1, 2])
def test_weights_match_stepwise_reference(n_models):
    rng = np.random.default_rng(8)
    x, g = make_groups(rng, d=12)
    embs = [x] + [rng.standard_normal((len(x), 6)).astype(np.float32) for _ in range(n_models - 1)]
    det = deviation_weights(embs, g, return_details=True)
    w_ref, comb_ref, scaled_ref = weights_ref(embs, g)
    np.testing.assert_allclose(det.weights, w_ref, atol=1e-9)
    np.testing.assert_allclose(det.scores, comb_ref, atol=1e-9)
    for got, ref in zip(det.per_model, scaled_ref):
        np.testing.assert_allclose(got, ref, atol=1e-9)
    _assert_mean_one(det.weights, g)
    assert np.all(det.per_model[0] >= -1) and np.all(det.per_model[0] <= 1)


def test_weights_counts_match_reference():
    rng = np.random.default_rng(9)
    x, g = make_groups(rng, sizes=(1, 3, 17))
    counts = rng.integers(1, 4, size=len(x))
    w = deviation_weights([x], g, counts=counts)
    w_ref, _, _ = weights_ref([x], g, counts=counts)
    np.testing.assert_allclose(w, w_ref, atol=1e-9)
    _assert_mean_one(w, g)  # over distinct responses: copies enter the distances only


def test_weights_ties_give_one():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((1, 8)).astype(np.float32)
    b = rng.standard_normal((2, 8)).astype(np.float32)
    x = np.concatenate([np.repeat(a, 4, 0), b, a])  # group 0: 4 identical; group 1: a pair; group 2: alone
    g = [0, 0, 0, 0, 1, 1, 2]
    det = deviation_weights([x], g, return_details=True)
    np.testing.assert_array_equal(det.weights, np.ones(7))
    np.testing.assert_array_equal(det.per_model[0], np.zeros(7))


def test_weights_max_per_prompt():
    rng = np.random.default_rng(11)
    x, g = make_groups(rng, sizes=(3, 17), shuffle=True)
    det = deviation_weights([x], g, max_per_prompt=5, return_details=True)
    keep = det.considered
    for v in ("p0", "p1"):
        rows = np.flatnonzero(g == v)
        assert keep[rows].sum() == min(5, len(rows)) and keep[rows[: min(5, len(rows))]].all()
    w_ref, _, _ = weights_ref([x[keep]], g[keep])
    np.testing.assert_allclose(det.weights[keep], w_ref, atol=1e-9)
    assert np.all(det.weights[~keep] == 1.0) and np.all(det.scores[~keep] == 0.0)


# ---------------------------------------------------------------------------- embedders

TEXTS = [
    "The ship drifted through the void, its engines silent, the captain asleep.",
    '"Run!" she screamed. "It\'s coming -- NOW!"',
    "Rain fell on the detective's office; the witness lied, and the case went cold.",
    "i dunno. maybe. whatever",
    "",
]


def test_stylometric_deterministic_batch_independent():
    e = StylometricEmbedder()
    full = e.encode(TEXTS)
    assert full.shape == (len(TEXTS), e.dim) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-6)
    one = np.stack([e.encode([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(full, one)
    np.testing.assert_array_equal(full, StylometricEmbedder().encode(TEXTS))
    # dialogue-heavy text differs in style from plain narration more than narration from narration
    nar2 = e.encode(["The station drifted past the planet, its lights dim, the crew asleep."])[0]
    assert full[0] @ nar2 > full[0] @ full[1]
    assert get_embedder("builtin:stylometric").id == e.id


def test_minilm_offline():
    emb = get_embedder("builtin:minilm", device="cpu")
    x = emb.encode(
        ["A dragon burned the castle.", "The dragon set fire to the keep.", "Quarterly tax filing deadlines."]
    )
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]
    assert "minilm" in emb.id


def test_embedding_precision():
    """auto picks half precision where it is native (float16 on CUDA; bfloat16 on CPUs with bf16 units), and
    the precision is part of the embedder id, so caches of the modes never mix."""
    from engine.deviation.embedders import cpu_has_native_bf16, resolve_precision

    assert resolve_precision("auto", "cuda") == "float16" and resolve_precision("float32", "cuda") == "float32"
    assert resolve_precision("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with pytest.raises(ValueError, match="float16 embedding on CPU"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")
    fp32 = get_embedder("builtin:minilm", device="cpu", precision="float32")
    bf16 = get_embedder("builtin:minilm", device="cpu", precision="bfloat16")
    assert fp32.id != bf16.id and bf16.id.endswith("+bfloat16") and "+" not in fp32.id
    texts = ["A dragon burned the castle.", "The dragon set fire to the keep.", "Quarterly tax filing deadlines."]
    a, b = fp32.encode(texts), bf16.encode(texts)
    assert np.min(np.sum(a * b, axis=1)) > 0.999


def test_get_embedder_errors():
    with pytest.raises(ValueError, match="builtin"):
        get_embedder("builtin:nope")
    with pytest.raises(ValueError, match="empty"):
        get_embedder("")


class CountingEmbedder:
    id = "test:counting@1"
    dim = 4

    def __init__(self):
        self.seen = []

    def encode(self, texts, show_progress=False):
        self.seen += list(texts)
        out = np.asarray([[len(t) + 1, t.count("a") + 1, 1.0, 2.0] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_cache_embeds_only_new_texts(tmp_path):
    cache = EmbeddingCache(tmp_path)
    emb = CountingEmbedder()
    first = embed_cached(emb, ["a", "bb", "a", "ccc"], cache, shard_size=2)
    assert emb.seen == ["ccc", "bb", "a"]  # duplicate embedded once; longest first (similar lengths per call)
    assert first.shape == (4, 4)
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(first, CountingEmbedder().encode(["a", "bb", "a", "ccc"]), rtol=1e-6)  # rows aligned
    emb.seen.clear()
    again = embed_cached(emb, ["ccc", "dddd", "a"], EmbeddingCache(tmp_path))  # fresh process view
    assert emb.seen == ["dddd"]
    np.testing.assert_array_equal(again[0], first[3])
    np.testing.assert_array_equal(again[2], first[0])


def test_cache_corrupt_shard_detected(tmp_path):
    emb = CountingEmbedder()
    embed_cached(emb, ["x", "yy"], EmbeddingCache(tmp_path))
    (shard,) = EmbeddingCache(tmp_path).model_dir(emb.id).glob("shard-*.npz")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the payload
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError):
        EmbeddingCache(tmp_path, on_corrupt="raise").lookup(emb.id, [b"\0" * 32])
    emb.seen.clear()
    out = embed_cached(emb, ["x", "yy"], EmbeddingCache(tmp_path))
    assert sorted(emb.seen) == ["x", "yy"]  # re-embedded, not read from the corrupt shard
    assert np.isfinite(out).all()
    assert list(shard.parent.glob("*.corrupt"))


# ---------------------------------------------------------------------------- pipeline + CLI


class Cfg:
    enabled = True
    semantic_model = ""
    style_model = "builtin:stylometric"
    metric = "cosine"
    mode = "mean"
    k = 10
    scope = "group"
    max_per_prompt = None
    groups = "all"
    count_duplicates = False
    trust_remote_code = False
    precision = "float32"
    batch_size = 8
    device = "cpu"
    cache_dir = ".cache/embeddings"


def _responses():
    out = []
    for p, texts in {"Write about space.": TEXTS[:4], "Write about dragons.": TEXTS[1:3], "Alone.": TEXTS[:1]}.items():
        pid = make_prompt_id(p)
        for i, t in enumerate(texts):
            out.append(Response(prompt_id=pid, response_id=make_response_id(pid, t), prompt=p, text=t, score=float(i)))
    return out


def test_compute_deviation(tmp_path):
    resp = _responses()
    res = compute_deviation(resp + resp[:1], Cfg(), cache_dir=tmp_path)  # a repeated id is computed once
    assert isinstance(res, DeviationResult) and len(res.weights) == len(resp) + 1
    assert res.weights[0] == res.weights[-1]
    pids = np.asarray([r.prompt_id for r in resp])
    _assert_mean_one(res.weights[: len(resp)], pids)
    emb = StylometricEmbedder().encode([r.text for r in resp])
    w_ref, comb_ref, _ = weights_ref([emb], pids)
    np.testing.assert_allclose(res.weights[: len(resp)], w_ref, atol=1e-6)
    rid = resp[0].response_id
    assert res.weight_of(rid) == pytest.approx(w_ref[0]) and res.score_of(rid) == pytest.approx(comb_ref[0])
    assert list(res.per_model) == [StylometricEmbedder().id]
    with pytest.raises(KeyError, match="not among"):
        res.weight_of("missing")
    # count_duplicates through pair_counts
    cfg = Cfg()
    cfg.count_duplicates = True
    counts = {r.response_id: 1 + i % 3 for i, r in enumerate(resp)}
    res2 = compute_deviation(resp, cfg, cache_dir=tmp_path, pair_counts=counts)
    w2, _, _ = weights_ref([emb], pids, counts=[counts[r.response_id] for r in resp])
    np.testing.assert_allclose(res2.weights, w2, atol=1e-6)
    # disabled: neutral
    cfg.enabled = False
    assert np.all(compute_deviation(resp, cfg).weights == 1.0)


def test_compute_deviation_default_config_with_minilm(tmp_path):
    from engine.config import DeviationConfig

    resp = _responses()
    res = compute_deviation(resp, DeviationConfig(device="cpu"), cache_dir=tmp_path)
    assert len(res.per_model) == 2 and any("minilm" in k for k in res.per_model)
    _assert_mean_one(res.weights, np.asarray([r.prompt_id for r in resp]))


def test_cli_on_pairs_jsonl(tmp_path):
    from engine.deviation.__main__ import main

    resp = _responses()
    by_prompt = {}
    for r in resp:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    lines = []
    for rs in by_prompt.values():
        for c in rs:
            for rj in rs:
                if c.score > rj.score:
                    lines.append(
                        {
                            "prompt": c.prompt,
                            "prompt_id": c.prompt_id,
                            "chosen": c.text,
                            "rejected": rj.text,
                            "chosen_id": c.response_id,
                            "rejected_id": rj.response_id,
                            "chosen_score": c.score,
                            "rejected_score": rj.score,
                        }
                    )
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "w.jsonl"
    assert (
        main(
            [
                "--data",
                str(data),
                "--out",
                str(out),
                "--semantic-model",
                "",
                "--cache-dir",
                str(tmp_path / "c"),
                "--count-duplicates",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    used = {x["chosen_id"] for x in lines} | {x["rejected_id"] for x in lines}
    assert {r["response_id"] for r in rows} == used
    pairs = [json.loads(x) for x in (tmp_path / "w.pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(lines)
    wmap = {r["response_id"]: r["weight"] for r in rows}
    for p in pairs:
        assert p["chosen_weight"] == wmap[p["chosen_id"]]
        assert p["rejected_weight"] == wmap[p["rejected_id"]]
    summary = json.loads((tmp_path / "w.summary.json").read_text())
    assert summary["responses"] == len(rows) and summary["by_prompt_size"]
    # parquet output
    outp = tmp_path / "w.parquet"
    assert (
        main(["--data", str(data), "--out", str(outp), "--semantic-model", "", "--cache-dir", str(tmp_path / "c")]) == 0
    )
    import pandas as pd

    assert len(pd.read_parquet(outp)) == len(rows)
