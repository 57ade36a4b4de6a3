"""Benchmarks of engine.deviation; each measurement APPENDS one row to bench/results/deviation.csv.

    python -m bench.bench_deviation            # full: 1M x 384 weights, 100k knn (20k flat), 128 texts embedded
    python -m bench.bench_deviation --quick    # 100k weights, 10k knn, 32 texts (minutes on a busy 2-core machine)

What is measured (issue 6, "Done when"):
- weights_mean: deviation_weights (published transform, exact mean mode, cosine) on N random unit
  vectors x 384 dims in G groups; rows grouped by prompt ("grouped") and in random order
  ("shuffled"). Warm-up run, then >= 10 timed reps; median, p10, p90. Target: 1M x 384 in 20k
  groups under 10 s on a 2-core CPU.
- knn: deviation_scores mode="knn", k=10, on clustered vectors: scope "global" through IVF (FAISS,
  default nlist/nprobe) with its recall@10 against exact flat search noted, and scope "group"
  through per-prompt flat indexes. Throughput in queries/s.
- embed: texts/s of the default embedders (builtin:minilm on the available device, builtin:stylometric)
  on synthetic WritingPrompts-style stories.
peak_mem_mb: tracemalloc peak (numpy + Python heap) of the untimed warm-up run for the numpy benches;
process peak RSS for the embedder benches (torch allocations are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import append_csv
from bench.common import git_commit as _commit
from bench.common import hardware as _hardware

RESULTS = Path(__file__).resolve().parent / "results" / "deviation.csv"
COLUMNS = ["bench", "config", "n", "dims", "groups", "backend", "time_s", "time_p10", "time_p90", "reps",
           "throughput", "throughput_unit", "peak_mem_mb", "hardware", "torch", "faiss", "numpy", "commit",
           "timestamp", "note"]




def _versions() -> dict:
    out = {"numpy": np.__version__}
    for mod in ("torch", "faiss"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = ""
    return out




def _append(row: dict) -> None:
    append_csv(RESULTS, [{k: row.get(k, "") for k in COLUMNS}], COLUMNS)
    print(", ".join(f"{k}={row.get(k)}" for k in ("bench", "config", "n", "time_s", "throughput", "throughput_unit", "note")))


def _time(fn, reps: int) -> tuple[np.ndarray, float]:
    """(times of `reps` runs, tracemalloc peak MB of the untimed warm-up run before them)."""
    peak = _traced_peak_mb(fn)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return np.asarray(ts), peak


def _traced_peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def _row(bench, config, n, dims, groups, backend, ts, throughput, unit, peak, note="", common=None) -> dict:
    return {"bench": bench, "config": config, "n": n, "dims": dims, "groups": groups, "backend": backend,
            "time_s": f"{np.median(ts):.4f}", "time_p10": f"{np.quantile(ts, 0.1):.4f}",
            "time_p90": f"{np.quantile(ts, 0.9):.4f}", "reps": len(ts), "throughput": f"{throughput:.1f}",
            "throughput_unit": unit, "peak_mem_mb": f"{peak:.1f}", "note": note, **(common or {})}


def _unit_rows(rng, n, d) -> np.ndarray:
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):  # generate in blocks: a float64 1M x 384 temporary would be 3 GB
        b = rng.standard_normal((min(65536, n - s), d), dtype=np.float32)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        x[s : s + len(b)] = b
    return x


def bench_weights(n, d, g, reps, common, rng) -> None:
    from engine.deviation import deviation_weights

    x = _unit_rows(rng, n, d)
    gid = rng.integers(0, g, size=n)
    for config, groups in (("grouped", np.sort(gid)), ("shuffled", gid)):
        fn = lambda: deviation_weights([x], groups)  # noqa: E731
        ts, peak = _time(fn, reps)
        note = "exact mean mode, cosine, float64 accumulation; input float32 %.0f MB" % (x.nbytes / 2**20)
        if reps < 10:
            note += f"; only {reps} reps (each run takes seconds)"
        _append(_row("weights_mean", config, n, d, len(np.unique(gid)), "numpy+scipy", ts, n / np.median(ts),
                     "responses/s", peak, note, common))


def _clustered(rng, n, d, clusters=256, spread=0.35) -> np.ndarray:
    centres = _unit_rows(rng, clusters, d)
    x = centres[rng.integers(0, clusters, size=n)] + spread * _unit_rows(rng, n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_knn(n, d, g, reps, common, rng, flat_n) -> None:
    import faiss

    from engine.deviation import deviation_scores
    from engine.deviation.scores import _build_index, default_nlist, default_nprobe, faiss_has_gpu

    x = _clustered(rng, n, d)
    gid = np.sort(rng.integers(0, g, size=n))
    backend = "faiss-gpu" if faiss_has_gpu() else f"faiss-cpu ({faiss.omp_get_max_threads()} threads)"
    k = 10
    slow_reps = max(3, reps // 3)
    # global scope, IVF with the default nlist / nprobe; recall of a query sample against flat search
    fn = lambda: deviation_scores(x, gid, mode="knn", k=k, scope="global", ivf_min_size=0)  # noqa: E731
    ts, peak = _time(fn, slow_reps)
    nlist = default_nlist(n)
    q = x[rng.choice(n, size=min(500, n), replace=False)]
    ivf = _build_index(x, "cosine", True, nlist, None, False)
    flat = _build_index(x, "cosine", False, None, None, False)
    _, ia = ivf.search(q, k + 1)
    _, ib = flat.search(q, k + 1)
    recall = np.mean([len(set(a) & set(b)) / (k + 1) for a, b in zip(ia, ib)])
    _append(_row("knn", f"global-ivf k={k} nlist={nlist} nprobe={default_nprobe(nlist)}", n, d, g, backend, ts,
                 n / np.median(ts), "queries/s", peak,
                 f"includes IVF training + add; recall@{k + 1} vs flat {recall:.3f} on {len(q)} queries; "
                 f"clustered data; only {slow_reps} reps (each run takes seconds to minutes)", common))
    xf, gf = x[:flat_n], gid[:flat_n]
    fn = lambda: deviation_scores(xf, gf, mode="knn", k=k, scope="global", ivf_min_size=flat_n + 1)  # noqa: E731
    ts, peak = _time(fn, slow_reps)
    _append(_row("knn", f"global-flat k={k}", flat_n, d, len(np.unique(gf)), backend, ts, flat_n / np.median(ts),
                 "queries/s", peak, f"exact brute force over all rows; only {slow_reps} reps (each run takes seconds)", common))
    fn = lambda: deviation_scores(x, gid, mode="knn", k=k, scope="group")  # noqa: E731
    ts, peak = _time(fn, reps)
    _append(_row("knn", f"group-flat k={k}", n, d, g, backend, ts, n / np.median(ts), "queries/s",
                 peak, "one exact flat index per prompt, single-threaded", common))


def _story_texts(n: int) -> list[str]:
    try:
        from engine.data.synthetic import generate_rows

        texts = []
        seed = 0
        while len(texts) < n:
            for row in generate_rows(max(1, n // 6), seed=seed):
                texts.extend(row["comment_texts"])
            seed += 1
        return texts[:n]
    except ImportError:
        rng = np.random.default_rng(0)
        words = "the ship drifted through silent void while captain slept and stars burned cold above".split()
        return [" ".join(rng.choice(words, size=150)) + "." for _ in range(n)]


def bench_embed(n_texts, reps, common) -> None:
    from engine.deviation import get_embedder
    from engine.deviation.embedders import _resolve_device

    texts = _story_texts(n_texts)
    mean_words = float(np.mean([len(t.split()) for t in texts]))
    for name in ("builtin:minilm", "builtin:stylometric"):
        emb = get_embedder(name, batch_size=64)
        device = _resolve_device("auto") if name == "builtin:minilm" else "cpu (python)"
        if name == "builtin:minilm":
            import torch

            device += f" ({torch.get_num_threads()} torch threads)"
        fn = lambda: emb.encode(texts)  # noqa: E731
        ts, _ = _time(fn, reps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _append(_row("embed", name, len(texts), emb.dim, "", device, ts, len(texts) / np.median(ts), "texts/s", peak,
                     f"synthetic stories, {mean_words:.0f} words mean; batch 64; peak = process max RSS", common))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI / smoke)")
    p.add_argument("--only", choices=("weights", "knn", "embed"), action="append", help="run only these (repeatable)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (after one warm-up)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    common = {"hardware": _hardware(), "commit": _commit(),
              "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **_versions()}
    only = set(a.only or ("weights", "knn", "embed"))
    if "weights" in only:
        n, g = (100_000, 2_000) if a.quick else (1_000_000, 20_000)
        bench_weights(n, 384, g, a.reps, common, rng)
    if "knn" in only:
        n, g, flat_n = (10_000, 200, 10_000) if a.quick else (100_000, 2_000, 20_000)
        bench_knn(n, 384, g, a.reps, common, rng, flat_n)
    if "embed" in only:
        bench_embed(32 if a.quick else 128, 3, common)
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
