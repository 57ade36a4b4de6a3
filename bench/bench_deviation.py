"""Benchmarks of engine.deviation; each measurement APPENDS one row to bench/results/deviation.csv.

    python -m bench.bench_deviation            # full: 1M x 384 weights, 100k knn (20k flat), 128 texts embedded
    python -m bench.bench_deviation --quick    # 100k weights, 10k knn, 32 texts (minutes on a busy 2-core machine)

What is measured (issue 6, "Done when"):
- weights_mean: deviation_weights (published transform, exact mean mode, cosine) on N random unit
  vectors x 384 dims in G groups; rows grouped by prompt ("grouped") and in random order
  ("shuffled"). Warm-up run, then >= 10 timed reps; median, p10, p90. Beside each, in the same run
  on the same array, the baseline row "numpy centroid pass": the plainest fast numpy computation of
  each row's dot with its group's sum (float32, a Python loop over the contiguous groups with one
  sum and one matrix-vector product each; the shuffled config first sorts the rows by group). The
  engine's row notes its time as a multiple of that pass (target: at most 2x); the engine computes
  exact float64 mean cosine distances with its own normalisation, then the weight transform.
- knn: deviation_scores mode="knn", k=10, on clustered vectors: scope "global" through IVF (FAISS,
  default nlist/nprobe) with its recall@10 against exact flat search noted, and scope "group"
  through per-prompt flat indexes. Throughput in queries/s.
- embed: texts/s of the embedders on synthetic WritingPrompts-length stories (data.synthetic_lengths
  stories: ~250 words): builtin:minilm in float32 and in the fastest mode this machine offers
  (bfloat16 autocast where the CPU does bf16 natively; float16 on CUDA), each with the fraction of
  this machine's measured GEMM rate (same dtype) its useful FLOPs reach and, for half precision, the
  smallest cosine between its vectors and float32's; builtin:stylometric. `embed_throughput` is the
  function `make gpu-check` calls for the GPU half-precision row.
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
COLUMNS = [
    "bench",
    "config",
    "n",
    "dims",
    "groups",
    "backend",
    "time_s",
    "time_p10",
    "time_p90",
    "reps",
    "throughput",
    "throughput_unit",
    "peak_mem_mb",
    "hardware",
    "torch",
    "faiss",
    "numpy",
    "commit",
    "timestamp",
    "note",
]


def _versions() -> dict:
    out = {"numpy": np.__version__}
    for mod in ("torch", "faiss"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = ""
    return out


def environment(device: str = "cpu") -> dict:
    """The hardware/version/commit/time columns of a row."""
    return {
        "hardware": _hardware(device),
        "commit": _commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **_versions(),
    }


def _append(row: dict) -> None:
    append_csv(RESULTS, [{k: row.get(k, "") for k in COLUMNS}], COLUMNS)
    print(
        ", ".join(
            f"{k}={row.get(k)}" for k in ("bench", "config", "n", "time_s", "throughput", "throughput_unit", "note")
        )
    )


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
    return {
        "bench": bench,
        "config": config,
        "n": n,
        "dims": dims,
        "groups": groups,
        "backend": backend,
        "time_s": f"{np.median(ts):.4f}",
        "time_p10": f"{np.quantile(ts, 0.1):.4f}",
        "time_p90": f"{np.quantile(ts, 0.9):.4f}",
        "reps": len(ts),
        "throughput": f"{throughput:.1f}",
        "throughput_unit": unit,
        "peak_mem_mb": f"{peak:.1f}",
        "note": note,
        **(common or {}),
    }


def _unit_rows(rng, n, d) -> np.ndarray:
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):  # generate in blocks: a float64 1M x 384 temporary would be 3 GB
        b = rng.standard_normal((min(65536, n - s), d), dtype=np.float32)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        x[s : s + len(b)] = b
    return x


BASELINE = "numpy centroid pass"


def centroid_pass(x: np.ndarray, gid: np.ndarray, grouped: bool) -> np.ndarray:
    """The baseline: each row's dot with its group's sum, plainly in numpy (float32, one sum and one
    matrix-vector product per contiguous group; rows sorted by group first unless already grouped)."""
    if not grouped:
        order = np.argsort(gid, kind="stable")
        x, gid = x[order], gid[order]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    out = np.empty(len(gid), dtype=np.float32)
    for a, b in zip(starts.tolist(), np.r_[starts[1:], len(gid)].tolist()):
        block = x[a:b]
        out[a:b] = block @ block.sum(axis=0)
    return out


def bench_weights(n, d, g, reps, common, rng) -> None:
    from engine.deviation import deviation_weights

    x = _unit_rows(rng, n, d)
    gid = rng.integers(0, g, size=n)
    for config, groups in (("grouped", np.sort(gid)), ("shuffled", gid)):
        ngroups = len(np.unique(groups))
        base_ts, base_peak = _time(
            lambda groups=groups, config=config: centroid_pass(x, groups, config == "grouped"), reps
        )
        _append(
            _row(
                "weights_mean",
                config,
                n,
                d,
                ngroups,
                BASELINE,
                base_ts,
                n / np.median(base_ts),
                "responses/s",
                base_peak,
                "float32, one Python-level sum and matrix-vector product per group",
                common,
            )
        )
        ts, peak = _time(lambda groups=groups: deviation_weights([x], groups), reps)
        ratio = np.median(ts) / np.median(base_ts)
        note = (
            f"{ratio:.2f}x the {BASELINE} of this run ({np.median(base_ts):.3f} s); exact mean mode, cosine, "
            f"float64 in cache-sized blocks of whole groups, then the weight transform; input float32 "
            f"{x.nbytes / 2**20:.0f} MB"
        )
        if reps < 10:
            note += f"; only {reps} reps (each run takes seconds)"
        _append(
            _row(
                "weights_mean",
                config,
                n,
                d,
                ngroups,
                "engine.deviation",
                ts,
                n / np.median(ts),
                "responses/s",
                peak,
                note,
                common,
            )
        )


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
    _append(
        _row(
            "knn",
            f"global-ivf k={k} nlist={nlist} nprobe={default_nprobe(nlist)}",
            n,
            d,
            g,
            backend,
            ts,
            n / np.median(ts),
            "queries/s",
            peak,
            f"includes IVF training + add; recall@{k + 1} vs flat {recall:.3f} on {len(q)} queries; "
            f"clustered data; only {slow_reps} reps (each run takes seconds to minutes)",
            common,
        )
    )
    xf, gf = x[:flat_n], gid[:flat_n]
    fn = lambda: deviation_scores(xf, gf, mode="knn", k=k, scope="global", ivf_min_size=flat_n + 1)  # noqa: E731
    ts, peak = _time(fn, slow_reps)
    _append(
        _row(
            "knn",
            f"global-flat k={k}",
            flat_n,
            d,
            len(np.unique(gf)),
            backend,
            ts,
            flat_n / np.median(ts),
            "queries/s",
            peak,
            f"exact brute force over all rows; only {slow_reps} reps (each run takes seconds)",
            common,
        )
    )
    fn = lambda: deviation_scores(x, gid, mode="knn", k=k, scope="group")  # noqa: E731
    ts, peak = _time(fn, reps)
    _append(
        _row(
            "knn",
            f"group-flat k={k}",
            n,
            d,
            g,
            backend,
            ts,
            n / np.median(ts),
            "queries/s",
            peak,
            "one exact flat index per prompt, single-threaded",
            common,
        )
    )


def story_texts(n: int) -> list[str]:
    """n distinct WritingPrompts-length stories from the synthetic generator (lengths "stories")."""
    from engine.data.synthetic import generate_rows

    texts: list[str] = []
    seed = 0
    while len(texts) < n:
        rows = generate_rows(max(1, n // 5), seed=seed, lengths="stories")
        texts += [t for row in rows for t in row["comment_texts"]]
        seed += 1
    return list(dict.fromkeys(texts))[:n]


def gemm_flops(device: str, dtype: str, size: int | None = None, reps: int = 10) -> float:
    """This machine's measured dense GEMM rate (FLOP/s): the median of `reps` square matmuls after a warm-up."""
    import torch

    size = size or (8192 if device.startswith("cuda") else 1024)
    dt = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    times = []
    for i in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.median(times))


def _encoder_flops(emb, texts: list[str]) -> float:
    """Useful FLOPs of one forward over `texts`: 2 x (encoder matmul parameters) per real token plus
    attention's 4 x L x d per token and layer, with each text's own (truncated) token count L."""
    import torch

    model = emb.model
    tok, auto = model.tokenizer, model[0].auto_model
    cfg = auto.config
    lengths = np.minimum([len(ids) for ids in tok(texts, truncation=False)["input_ids"]], model.max_seq_length)
    dense = sum(
        m.weight.numel()
        for name, m in auto.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 2
        and "embeddings" not in name
        and "pooler" not in name
    )
    return float(sum(2 * dense * n + 4 * n * n * cfg.hidden_size * cfg.num_hidden_layers for n in lengths.tolist()))


def embed_throughput(
    device: str = "cuda",
    precision: str = "float16",
    n_texts: int = 512,
    batch_size: int = 64,
    reps: int = 3,
    texts: list[str] | None = None,
    reference: np.ndarray | None = None,
    with_vectors: bool = False,
):
    """builtin:minilm on `device` in `precision`: a deviation.csv row (texts/s over the median of `reps`
    timed passes after a warm-up, the fraction of this device's measured GEMM rate in the same dtype that
    its useful FLOPs reach, and, given `reference` fp32 vectors of the same texts, the smallest cosine
    with them). `make gpu-check` calls it for the GPU half-precision row and appends the row with
    bench.common.append_csv(path, [row], COLUMNS). with_vectors: return (row, the embeddings) instead."""
    import torch

    from engine.deviation import get_embedder

    texts = texts or story_texts(n_texts)
    emb = get_embedder("builtin:minilm", device=device, batch_size=batch_size, precision=precision)
    out = emb.encode(texts)  # warm-up (and the vectors for the agreement check)
    ts = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        emb.encode(texts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts)
    rate = gemm_flops(device, emb.precision)
    fraction = _encoder_flops(emb, texts) / float(np.median(ts)) / rate
    words = float(np.mean([len(t.split()) for t in texts]))
    note = (
        f"{emb.precision}; {fraction:.1%} of this device's measured {emb.precision} GEMM rate "
        f"({rate / 1e9:.0f} GFLOP/s); synthetic stories, {words:.0f} words mean; batch {batch_size}, "
        "length-sorted; peak = process max RSS"
    )
    if reference is not None:
        note += f"; min cosine with float32 vectors {float(np.min(np.sum(out * reference, axis=1))):.6f}"
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        note = note.replace("peak = process max RSS", "peak = CUDA max_memory_allocated")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = _row(
        "embed",
        f"builtin:minilm {emb.precision}",
        len(texts),
        emb.dim,
        "",
        device,
        ts,
        len(texts) / np.median(ts),
        "texts/s",
        peak,
        note,
        environment(device),
    )
    return (row, out) if with_vectors else row


def bench_embed(n_texts, reps, common) -> None:
    import torch

    from engine.deviation import get_embedder
    from engine.deviation.embedders import _resolve_device, resolve_precision

    texts = story_texts(n_texts)
    device = _resolve_device("auto")
    threads = f" ({torch.get_num_threads()} torch threads)" if device == "cpu" else ""
    fp32, vectors = embed_throughput(device, "float32", texts=texts, reps=reps, with_vectors=True)
    _append({**fp32, "backend": device + threads})
    fast = resolve_precision("auto", device)
    if fast != "float32":
        row = embed_throughput(device, fast, texts=texts, reps=reps, reference=vectors)
        _append({**row, "backend": device + threads})
    emb = get_embedder("builtin:stylometric")
    ts, _ = _time(lambda: emb.encode(texts), reps)
    _append(
        _row(
            "embed",
            "builtin:stylometric",
            len(texts),
            emb.dim,
            "",
            "cpu (python)",
            ts,
            len(texts) / np.median(ts),
            "texts/s",
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "synthetic stories; one text at a time in Python",
            common,
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI / smoke)")
    p.add_argument("--only", choices=("weights", "knn", "embed"), action="append", help="run only these (repeatable)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (after one warm-up)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    common = environment("cpu")
    only = set(a.only or ("weights", "knn", "embed"))
    if "weights" in only:
        n, g = (100_000, 2_000) if a.quick else (1_000_000, 20_000)
        bench_weights(n, 384, g, a.reps, common, rng)
    if "knn" in only:
        n, g, flat_n = (10_000, 200, 10_000) if a.quick else (100_000, 2_000, 20_000)
        bench_knn(n, 384, g, a.reps, common, rng, flat_n)
    if "embed" in only:
        bench_embed(32 if a.quick else 256, 3, common)
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
