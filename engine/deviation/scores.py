"""Deviation scores: how far each response lies from the other responses to the same prompt.

Sits between the embedders and the weight transform (DESIGN.md: embed -> deviation scores -> weight
per response id). Input is one embedding matrix [N, d] and a group id per row (the prompt); output
is one float64 score per row.

Modes
- "mean" (the published definition): mean distance of response i to the other n - 1 responses of
  its group. For cosine this is exact in O(N d) through the group's sum of unit vectors S:
      mean_{j != i} (1 - u_i.u_j) = 1 - (u_i.S - 1) / (n - 1)
  so no n x n matrix is ever formed. Euclidean mean distance has no such identity (a sqrt sits on
  every pair), so it is computed exactly from per-group Gram blocks (O(sum n_g^2 d)), batched over groups of equal
  size (no Python loop over groups; groups above `_BIG_GROUP` rows are tiled by row blocks).
- "knn": mean distance to the k nearest other responses, searched with FAISS. scope "group": a flat
  (exact) index per group, IVF for groups of `ivf_min_size` rows or more; scope "global": one index
  over every response of every prompt (corpus-level homogenisation), IVF from `ivf_min_size` rows.

Multiplicities (`counts`, mean mode only) treat row i as `counts[i]` identical copies, which is how
the published scripts count a response that appears in several pairs (see weights.py).
Groups of one response (or of copies of one response) score 0.
"""

from __future__ import annotations

import math
import os

import numpy as np

# Rows per chunk when streaming the embedding matrix in float64: 16384 x 384 x 8 B = 50 MB, small
# next to the 1.5 GB a 1M x 384 float32 input already takes.
_CHUNK_ROWS = 16384
# Rows per block of whole groups in the mean cosine pass: a float64 block (2048 x 384 x 8 B = 6 MB)
# stays in the CPU cache from its copy to its last use.
_BLOCK_ROWS = 2048
# Above this size a group's pairwise block is tiled by rows instead of batched with other groups.
_BIG_GROUP = 2048
# Budget (in float64 elements) for one batched pairwise block: 8M elements = 64 MB.
_BLOCK_ELEMS = 8 * 1024 * 1024

METRICS = ("cosine", "euclidean")
MODES = ("mean", "knn")
SCOPES = ("group", "global")


def group_codes(group_ids) -> tuple[np.ndarray, int]:
    """Map any int/str group ids to dense int64 codes 0..G-1 (first-appearance order) and G."""
    ids = np.asarray(group_ids)
    if ids.ndim != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {ids.shape}")
    if ids.dtype.kind in "iu" and len(ids) and ids[0] == 0 and np.all((d := np.diff(ids)) >= 0) and np.all(d <= 1):
        # Grouped codes 0, 0, 1, 1, 2, ... are already their own first-appearance coding (deviation_weights
        # passes its codes on to deviation_scores): skip a second hash pass over 1M ids.
        return ids.astype(np.int64, copy=False), int(ids[-1]) + 1
    try:
        import pandas as pd  # hash-based factorize: ~10x faster than np.unique's sort on 1M str ids

        codes, uniques = pd.factorize(ids, sort=False)
        n_groups = len(uniques)
    except ImportError:
        _, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        # renumber to first-appearance order so codes do not depend on the sort of the id type
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        codes, n_groups = rank[inv], len(first)
    codes = np.asarray(codes, dtype=np.int64)
    if len(codes) and codes.min() < 0:
        raise ValueError("group_ids contain missing values (None/NaN): give every response a prompt id")
    return codes, int(n_groups)


def _check_embeddings(embeddings: np.ndarray, n: int | None = None) -> np.ndarray:
    e = np.asarray(embeddings)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {e.shape}")
    if n is not None and e.shape[0] != n:
        raise ValueError(f"embeddings have {e.shape[0]} rows but group_ids has {n} entries: they must align")
    if e.dtype not in (np.float32, np.float64):
        e = e.astype(np.float32)
    return e


def _row_norms(e: np.ndarray) -> np.ndarray:
    """float64 L2 norm of every row, streamed in chunks (no full float64 copy)."""
    out = np.empty(e.shape[0], dtype=np.float64)
    for s in range(0, e.shape[0], _CHUNK_ROWS):
        x = e[s : s + _CHUNK_ROWS].astype(np.float64)
        out[s : s + _CHUNK_ROWS] = np.sqrt(np.einsum("ij,ij->i", x, x))
    return out


def _chunk_bounds(sizes: np.ndarray, target: int) -> list[tuple[int, int]]:
    """Split the group-sorted row order into [a, b) ranges of about `target` rows that never cut a
    group (a group larger than `target` becomes a range of its own)."""
    ends = np.cumsum(sizes)
    bounds, a = [], 0
    total = int(ends[-1]) if len(ends) else 0
    while a < total:
        # last group end <= a + target, or the end of the group containing a if that one is bigger
        j = int(np.searchsorted(ends, a + target, side="right")) - 1
        b = int(ends[j]) if j >= 0 and ends[j] > a else int(ends[np.searchsorted(ends, a, side="right")])
        bounds.append((a, b))
        a = b
    return bounds


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products; numpy >= 2's vecdot is 2.4x faster than einsum here (2048 x 384 float64)."""
    vecdot = getattr(np, "vecdot", None)
    return vecdot(a, b) if vecdot is not None else np.einsum("ij,ij->i", a, b)


def _mean_cosine(e, codes, n_groups, counts) -> np.ndarray:
    """Exact mean cosine distance to the other members of the group, O(N d).

    With S_g = sum_j m_j u_j over the group (m = multiplicities, u = x / |x|), one instance of row i
    sees n_eff - 1 others whose cosine sum is u_i.S - u_i.u_i = u_i.S - 1. S_g = w_g @ X_g with
    w = m / |x|, and u_i.S = (x_i.S) / |x_i|: two BLAS matrix-vector products per group on the raw
    rows, so no normalised copy is written.

    Rows are visited in group order, in blocks of whole groups of about `_BLOCK_ROWS` rows: one
    float64 copy of a block stays in the CPU cache through its norms and every group's two products,
    so the float32 input is read from memory once (1M x 384 in 20k groups: 0.27 s of CPU time where
    the former vectorised pass, with a repeated [rows, d] array of group sums, took 1.4 s). A group
    larger than two blocks is streamed in two passes (its sum, then the dots). Single-threaded on
    purpose: blocks on a thread pool ran slower on 2 shared cores (the per-group products are too
    small to release the GIL for long).
    """
    order, sizes, _ = _group_layout(codes, n_groups)
    in_order = _grouped(codes)
    sorted_codes = codes if in_order else codes[order]
    n_eff = np.bincount(codes, weights=counts, minlength=n_groups)
    unit_counts = bool(np.all(counts == 1))
    out = np.empty(e.shape[0], dtype=np.float64)
    matmul = np.matmul

    def rows(a, b):
        return slice(a, b) if in_order else order[a:b]

    def block(a, b):
        """(float64 rows, 1 / |row|, weights m / |row|) of sorted positions [a, b)."""
        x = e[rows(a, b)].astype(np.float64)
        norms = np.sqrt(_row_dots(x, x))
        if not norms.all():
            bad = np.arange(len(codes))[rows(a, b)][norms == 0][:5].tolist()
            raise ValueError(
                f"cosine distance is undefined for zero embeddings (rows {bad}); drop those rows or use "
                "metric='euclidean'"
            )
        inv = 1.0 / norms
        return x, inv, inv if unit_counts else inv * counts[rows(a, b)]

    def finish(a, b, dots):
        others = n_eff[sorted_codes[a:b]] - 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            out[rows(a, b)] = np.where(others > 0, 1.0 - (dots - 1.0) / others, 0.0)

    def groups_of_block(a, b):
        x, inv, w = block(a, b)
        c = sorted_codes[a:b]
        bounds = np.flatnonzero(np.r_[True, c[1:] != c[:-1], True]).tolist()
        dots = np.empty(b - a)
        for s, t in zip(bounds[:-1], bounds[1:]):
            matmul(x[s:t], matmul(w[s:t], x[s:t]), out=dots[s:t])
        finish(a, b, dots * inv)

    def one_big_group(a, b):
        total = np.zeros(e.shape[1], dtype=np.float64)
        for s in range(a, b, _BLOCK_ROWS):
            x, _, w = block(s, min(b, s + _BLOCK_ROWS))
            total += w @ x
        for s in range(a, b, _BLOCK_ROWS):
            t = min(b, s + _BLOCK_ROWS)
            x, inv, _ = block(s, t)
            finish(s, t, (x @ total) * inv)

    for a, b in _chunk_bounds(sizes, _BLOCK_ROWS):
        (groups_of_block if b - a <= 2 * _BLOCK_ROWS else one_big_group)(a, b)
    return out


def _grouped(codes: np.ndarray) -> bool:
    """Whether the rows are already grouped: codes in first-appearance order (group_codes) are then non-decreasing."""
    return bool(np.all(codes[1:] >= codes[:-1]))


def _group_layout(codes: np.ndarray, n_groups: int):
    """(row order that groups the rows, group sizes, group starts in that order)."""
    order = np.arange(len(codes)) if _grouped(codes) else np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_groups)
    starts = np.zeros(n_groups, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return order, sizes, starts


def _euclid_block(xq: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Pairwise euclidean distances [..., q, b] in float64 via the Gram identity, clamped at 0."""
    sq_q = np.einsum("...ij,...ij->...i", xq, xq)
    sq_b = np.einsum("...ij,...ij->...i", xb, xb)
    d2 = sq_q[..., :, None] + sq_b[..., None, :] - 2.0 * (xq @ np.swapaxes(xb, -1, -2))
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2)


def _mean_euclidean(e, codes, n_groups, counts) -> np.ndarray:
    order, sizes, starts = _group_layout(codes, n_groups)
    out = np.zeros(e.shape[0], dtype=np.float64)
    n_eff = np.bincount(codes, weights=counts, minlength=n_groups)
    for size in np.unique(sizes):
        size = int(size)
        if size < 2:
            continue  # a lone row (even with multiplicity) has only copies of itself: distance 0
        gs = np.flatnonzero(sizes == size)
        if size <= _BIG_GROUP:
            per = max(1, _BLOCK_ELEMS // (size * max(size, e.shape[1])))
            for b in range(0, len(gs), per):
                g = gs[b : b + per]
                idx = order[starts[g][:, None] + np.arange(size)[None, :]]  # [b, size]
                x = e[idx].astype(np.float64)
                dist = _euclid_block(x, x)
                # the diagonal is exactly 0 in math; clear the Gram rounding there
                dist[:, np.arange(size), np.arange(size)] = 0.0
                tot = np.einsum("gij,gj->gi", dist, counts[idx])
                out[idx] = tot / (n_eff[g][:, None] - 1.0)
        else:
            rows = max(1, _BLOCK_ELEMS // size)
            for g in gs:
                idx = order[starts[g] : starts[g] + size]
                xb = e[idx].astype(np.float64)
                for r in range(0, size, rows):
                    dist = _euclid_block(xb[r : r + rows], xb)
                    dist[np.arange(dist.shape[0]), r + np.arange(dist.shape[0])] = 0.0
                    out[idx[r : r + rows]] = (dist @ counts[idx]) / (n_eff[g] - 1.0)
    return out


# ----------------------------------------------------------------------------------------- knn


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_nlist(n: int) -> int:
    """IVF list count: 2 sqrt(n), at most n // 39 so every centroid gets the 39 training points FAISS
    asks for. For an all-vs-all search the per-query cost is nlist + nprobe * n / nlist rows and the
    k-means cost grows with nlist^2; 2 sqrt(n) balances the two (FAISS's 4-16 sqrt(n) guideline
    is for indexes trained once and queried many times)."""
    return int(max(1, min(2 * math.sqrt(n), n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: nlist / 32, at least 8: each query then scans ~3% of the rows plus the
    centroids. Recall@11 against exact search is recorded with every knn row of
    bench/bench_deviation.py; pass nprobe=nlist for exact search."""
    return int(min(nlist, max(8, nlist // 32)))


# k-means iterations and points per centroid for IVF training: 10 iterations on 64 points per list
# cost ~1/10 of FAISS's defaults (25 x 256) and coarse centroids only shift which lists are probed.
_IVF_TRAIN_ITERS = 10
_IVF_TRAIN_PER_LIST = 64


def _build_index(x: np.ndarray, metric: str, ivf: bool, nlist: int | None, nprobe: int | None, use_gpu: bool):
    import faiss

    d = x.shape[1]
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if ivf:
        nlist = int(nlist or default_nlist(x.shape[0]))
        quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fmetric)
        index.cp.niter = _IVF_TRAIN_ITERS
        index.cp.seed = 1234
        # train on a fixed-seed sample: FAISS's k-means wants at least 39 points per centroid
        n_train = min(x.shape[0], _IVF_TRAIN_PER_LIST * nlist)
        rng = np.random.default_rng(0)
        train = x if n_train == x.shape[0] else x[np.sort(rng.choice(x.shape[0], n_train, replace=False))]
        index.train(train)
        index.nprobe = int(nprobe or default_nprobe(nlist))
    else:
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if use_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._gpu_res = res  # keep the resources alive as long as the index
    index.add(x)
    return index


def _knn_mean(index, xq: np.ndarray, qids: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Mean distance of each query to its k nearest base rows other than itself.

    Searches k + 1 and drops the query's own row; when the own row is not among the results (exact
    duplicates tie with it, or IVF did not probe its list) the farthest result is dropped instead."""
    dist, ids = index.search(xq, k + 1)
    is_self = ids == qids[:, None]
    drop = is_self.copy()
    no_self = ~is_self.any(axis=1)
    drop[no_self, -1] = True
    # a row can contain its own id only once; the line above guarantees exactly one drop per row
    keep = ~drop
    dist = dist[keep].reshape(len(xq), k).astype(np.float64)
    valid = ids[keep].reshape(len(xq), k) >= 0  # IVF returns -1 when the probed lists run short
    if metric == "cosine":
        dist = 1.0 - dist
    else:
        dist = np.sqrt(np.maximum(dist, 0.0))
    dist[~valid] = 0.0
    n_valid = valid.sum(axis=1)
    return np.where(n_valid > 0, dist.sum(axis=1) / np.maximum(n_valid, 1), 0.0)


def _prepare_for_faiss(e: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(e, dtype=np.float32)
    if metric == "cosine":
        norms = _row_norms(x)
        if np.any(norms == 0):
            raise ValueError(
                "cosine distance is undefined for zero embeddings; drop those rows or use metric='euclidean'"
            )
        x = (x / norms[:, None]).astype(np.float32, copy=False)
    return x


def _knn_scores(e, codes, n_groups, metric, k, scope, nlist, nprobe, ivf_min_size, use_gpu) -> np.ndarray:
    x = _prepare_for_faiss(e, metric)
    n = x.shape[0]
    out = np.zeros(n, dtype=np.float64)
    if scope == "global":
        k_eff = min(k, n - 1)
        if k_eff < 1:
            return out
        index = _build_index(x, metric, n >= ivf_min_size, nlist, nprobe, use_gpu)
        for s in range(0, n, _CHUNK_ROWS):
            out[s : s + _CHUNK_ROWS] = _knn_mean(
                index, x[s : s + _CHUNK_ROWS], np.arange(s, min(n, s + _CHUNK_ROWS)), k_eff, metric
            )
        return out
    import faiss

    order, sizes, starts = _group_layout(codes, n_groups)
    # One small exact index per group: the per-group cost is one FAISS call, the search itself is the
    # pairwise work. Groups are independent, so this loop is over groups by design. A prompt's few
    # dozen rows are too small to split across OpenMP threads: thread start-up dominated, measured
    # 8.0 s with 2 threads vs 0.36 s with 1 for 400 groups x 50 x 384 on a busy 2-core machine, so
    # small groups run single-threaded (IVF groups keep the caller's thread count).
    threads = faiss.omp_get_max_threads()
    try:
        for g in np.flatnonzero(sizes > 1):
            idx = order[starts[g] : starts[g] + sizes[g]]
            xg = x[idx]
            k_eff = min(k, len(idx) - 1)
            big = len(idx) >= ivf_min_size
            faiss.omp_set_num_threads(threads if big else 1)
            index = _build_index(xg, metric, big, nlist, nprobe, use_gpu and big)
            out[idx] = _knn_mean(index, xg, np.arange(len(idx)), k_eff, metric)
    finally:
        faiss.omp_set_num_threads(threads)
    return out


def deviation_scores(
    embeddings: np.ndarray,
    group_ids,
    metric: str = "cosine",
    mode: str = "mean",
    k: int | None = None,
    scope: str = "group",
    *,
    counts: np.ndarray | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    ivf_min_size: int = 50_000,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Deviation score of every row: its mean distance to the other responses of its group.

    embeddings [N, d] float32/64 (need not be normalised: cosine normalises, euclidean uses them as
    given); group_ids [N] any int/str ids. metric "cosine" (1 - cos) or "euclidean". mode "mean"
    (all others, the published definition) or "knn" (k nearest others, FAISS; k defaults to 10).
    scope "group" or, for knn only, "global" (neighbours among all responses of all prompts).
    counts [N] ints >= 1 (mean mode only): row i stands for counts[i] identical copies.
    nlist/nprobe/ivf_min_size: IVF settings for knn (see default_nlist / default_nprobe); an index
    over ivf_min_size rows or more is IVF, smaller ones are exact flat indexes.
    use_gpu: GPU FAISS index for IVF searches; None = when faiss has GPU support and a GPU.
    Returns float64 [N]; groups of one response score 0."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {METRICS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not supported; use one of {SCOPES}")
    codes, n_groups = group_codes(group_ids)
    e = _check_embeddings(embeddings, len(codes))
    if e.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if mode == "mean":
        if scope != "group":
            raise ValueError(
                "mode='mean' is defined within each prompt's group; use scope='group' (or mode='knn' for "
                "scope='global')"
            )
        if counts is None:
            cnt = np.ones(e.shape[0], dtype=np.float64)
        else:
            cnt = np.asarray(counts, dtype=np.float64)
            if cnt.shape != (e.shape[0],) or np.any(cnt < 1) or np.any(cnt != np.round(cnt)):
                raise ValueError(
                    f"counts must be [N] integers >= 1 (multiplicity of each row), got shape {cnt.shape}, "
                    f"min {cnt.min() if cnt.size else None}"
                )
        fn = _mean_cosine if metric == "cosine" else _mean_euclidean
        return fn(e, codes, n_groups, cnt)
    if counts is not None and np.any(np.asarray(counts) != 1):
        raise ValueError("counts (count_duplicates) are only defined for mode='mean'; drop them or use mode='mean'")
    k = 10 if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1 for mode='knn', got {k}")
    if use_gpu is None:
        use_gpu = faiss_has_gpu() and os.environ.get("ENGINE_DEVIATION_FAISS_GPU", "1") != "0"
    return _knn_scores(e, codes, n_groups, metric, k, scope, nlist, nprobe, ivf_min_size, use_gpu)
