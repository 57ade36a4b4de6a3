"""BENCHMARKS.md from the benchmark CSVs: ratio tables per comparison group, environments, plots.

Run:  python -m bench.report [--results bench/results] [--out BENCHMARKS.md]
(`bench/run.py` calls it after the benchmarks.) Where this sits: the last step of `make bench`; it
reads every `bench/results/*.csv` the benchmark modules appended to and writes the document and
`bench/results/plots/*.png`. Every number in the document is formatted from a CSV cell or computed
from cells of rows of one run (a ratio's numerator and denominator come from the same run id); no
figure is typed in here.

Run ids: rows with a `run_id` column carry it. Rows of modules that record no run id are attributed
to the orchestrated run whose job wrote them (bench/results/runs.csv: one line per job with its start
and end time) and otherwise to their commit, so a comparison never mixes two runs' rows.

Dry runs: `make gpu-check DRY_RUN=1` writes rows whose run id (and bench name) start with "dryrun-";
they check plumbing, measure nothing, and are left out of every document except the dry run's own
preview. The GPU targets of issue #16 are evaluated here (`gpu_targets`), for the document and for
`make gpu-check`'s summary alike.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
OUT = REPO / "BENCHMARKS.md"
RUNS_CSV = "runs.csv"
RUNS_FIELDS = ["run_id", "mode", "job", "csv", "status", "reason", "start", "end", "seconds", "commit", "hardware"]
DRY_RUN_PREFIX = "dryrun-"


@dataclass(frozen=True)
class Spec:
    """How one results file is grouped and compared."""

    stem: str  # file name without .csv
    title: str
    intro: str
    group: tuple[str, ...]  # a comparison: rows sharing these values (within one run)
    member: tuple[str, ...]  # what differs inside a comparison (backend, system + variant, ...)
    time: str  # median time column
    time_unit: str
    p10: str | None = None
    p90: str | None = None
    mem: str | None = "peak_mem_mb"
    throughput: str | None = None
    throughput_label: str = "tokens/s"
    baseline: dict = field(default_factory=dict)  # member values of the reference row of a comparison
    baseline_label: str = ""
    ratio_by: str = "time"  # "time": baseline_time / time; "throughput": throughput / baseline_throughput
    others: tuple[tuple[str, dict], ...] = ()  # extra ratio columns: (label, member values)
    extra: tuple[str, ...] = ()  # further columns shown as they are
    sweeps: tuple[tuple[str, tuple[str, ...], str], ...] = ()  # (x column, fixed columns, x label)
    versions: tuple[str, ...] = ("torch",)
    notes_col: str | None = None
    others_mem: bool = False  # also a memory ratio against each of `others`
    plan: str | None = None  # column of a predicted peak (MB) shown beside the measured one, with their ratio


SPECS = [
    Spec(
        "train",
        "End-to-end training: this engine vs TRL DPOTrainer",
        "Same model (random init, same seed), same preference pairs in the same number per step, same "
        "optimizer, precision and hardware; one worker process per row (bench/bench_train.py). Ratios are "
        "tokens/s (real tokens) of the row over TRL's, and peak memory of the row over TRL's, from the same run.",
        group=("bench", "model", "pairs_per_step"),
        member=("system", "variant"),
        time="step_time_ms_median",
        time_unit="ms/step",
        p10="step_time_ms_p10",
        p90="step_time_ms_p90",
        throughput="tokens_per_s",
        baseline={"system": "trl", "variant": "ref_forward"},
        baseline_label="TRL (ref forward)",
        ratio_by="throughput",
        others=(("TRL (precomputed ref)", {"system": "trl", "variant": "precomputed_ref"}),),
        extra=("tokens_per_step", "reps", "mfu"),
        versions=("torch", "transformers", "trl", "deepspeed"),
        notes_col="notes",
        sweeps=(("tokens_per_step", ("model",), "real tokens per step (pairs per step x 2 x mean sequence length)"),),
        others_mem=True,
        plan="plan_mb",
    ),
    Spec(
        "attention",
        "Attention over packed rows: per-sequence routes, forward + backward",
        "One packed row of 8 sequences with gpt2-small's heads (bench/bench_attention.py). Speed-up = the time of "
        "transformers' stock route for packed rows (SDPA with the row's block-diagonal mask) / the row's time, same "
        "run. sdpa_varlen is the engine's default on CPU (engine/attention.py).",
        group=("bench", "heads", "head_dim", "sequences", "row_tokens", "dtype", "device"),
        member=("impl",),
        time="time_ms_median",
        time_unit="ms",
        p10="time_ms_p10",
        p90="time_ms_p90",
        throughput="tokens_per_s",
        baseline={"impl": "sdpa masked"},
        baseline_label="masked SDPA",
        extra=("reps",),
        notes_col="notes",
    ),
    Spec(
        "kernels",
        "Kernel microbenchmarks: fused LM-head ops, forward + backward",
        "Per backend on identical packed batches (bench/bench_kernels.py); N tokens, D hidden, V vocabulary. "
        "Speed-up = eager time / row time; memory ratio = row peak / eager peak; both from the same run.",
        group=("bench", "op", "objective", "N", "D", "V", "dtype", "device"),
        member=("backend",),
        time="time_ms_median",
        time_unit="ms",
        p10="time_ms_p10",
        p90="time_ms_p90",
        throughput="tokens_per_s",
        baseline={"backend": "eager"},
        baseline_label="eager PyTorch",
        others=(("Liger", {"backend": "liger"}), ("CCE", {"backend": "cce"})),
        extra=("reps", "tflops", "pct_peak", "loss"),
        notes_col="notes",
        sweeps=(
            ("N", ("op", "objective", "D", "V", "dtype", "device"), "tokens N (sequence length x sequences)"),
            ("V", ("op", "objective", "N", "D", "dtype", "device"), "vocabulary size V"),
        ),
        versions=("torch", "triton", "liger"),
    ),
    Spec(
        "native",
        "Native CPU chunk ops vs PyTorch",
        "One [C, V] logits chunk per call (bench/bench_native.py). Speed-up = torch time / native time, same run.",
        group=("bench", "op", "C", "V", "dtype"),
        member=("impl",),
        time="time_ms",
        time_unit="ms",
        p10="p10",
        p90="p90",
        baseline={"impl": "torch"},
        baseline_label="torch",
        extra=("reps",),
        sweeps=(("V", ("op", "C", "dtype"), "vocabulary size V"), ("C", ("op", "V", "dtype"), "chunk rows C")),
    ),
    Spec(
        "refcache",
        "Training step with and without the reference cache",
        "The trainer's micro-step on the same packed rows (bench/bench_refcache.py). Speed-up = on-the-fly "
        "step time / row step time; memory ratio = row peak / on-the-fly peak; same run.",
        group=("bench", "config", "model", "dtype", "lora_r"),
        member=("variant",),
        time="step_time_ms_median",
        time_unit="ms/step",
        p10="step_time_ms_p10",
        p90="step_time_ms_p90",
        baseline={"variant": "on_the_fly"},
        baseline_label="on-the-fly reference",
        extra=("tokens_per_step", "ref_time_ms_median", "reps"),
        versions=("torch", "transformers"),
        notes_col="note",
    ),
    Spec(
        "deviation",
        "Deviation: weights, FAISS knn, embedding throughput",
        "engine.deviation at scale (bench/bench_deviation.py); times in seconds per call. Weight rows: speed-up vs "
        "the numpy centroid pass of the same run on the same array (< 1: slower than it; target >= 0.5x).",
        group=("bench", "config", "n", "dims", "groups"),
        member=("backend",),
        time="time_s",
        time_unit="s",
        p10="time_p10",
        p90="time_p90",
        throughput="throughput",
        throughput_label="throughput",
        baseline={"backend": "numpy centroid pass"},
        baseline_label="numpy centroid pass",
        extra=("throughput_unit", "reps"),
        versions=("torch", "faiss", "numpy"),
        notes_col="note",
    ),
]


# ------------------------------------------------------------------------------------------ loading


def _f(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _ts(v: str) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(v)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def attribute_runs(stem: str, rows: list[dict], jobs: list[dict]) -> None:
    """Set `_run` on every row: its run_id, else the orchestrated job that wrote it, else its commit."""
    spans = []
    for j in jobs:
        if Path(j.get("csv", "")).stem == stem and _ts(j.get("start")) and _ts(j.get("end")):
            spans.append((_ts(j["start"]), _ts(j["end"]), j["run_id"]))
    for r in rows:
        rid = (r.get("run_id") or "").strip()
        if not rid:
            t = _ts(r.get("timestamp"))
            rid = next((s[2] for s in spans if t is not None and s[0] <= t <= s[1]), "")
        r["_run"] = rid or f"commit {r.get('commit') or 'unknown'}"
        r["_t"] = _ts(r.get("timestamp")) or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def _key(r: dict, cols) -> tuple:
    return tuple((r.get(c) or "").strip() for c in cols)


def _matches(r: dict, want: dict) -> bool:
    return all((r.get(k) or "") == v for k, v in want.items())


def select_comparisons(spec: Spec, rows: list[dict]) -> list[tuple[tuple, str, list[dict]]]:
    """(group key, run, rows) per comparison group: the latest run holding the group's baseline row (or
    the latest run at all when no run has one); inside it, the latest row per member."""
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(_key(r, spec.group), []).append(r)
    out = []
    for g, rs in groups.items():
        runs: dict[str, list[dict]] = {}
        for r in rs:
            runs.setdefault(r["_run"], []).append(r)

        def latest(run, runs=runs):
            return max(x["_t"] for x in runs[run])

        with_base = [run for run in runs if spec.baseline and any(_matches(x, spec.baseline) for x in runs[run])]
        run = max(with_base or list(runs), key=latest)
        members: OrderedDict[tuple, dict] = OrderedDict()
        for r in sorted(runs[run], key=lambda x: x["_t"]):
            members[_key(r, spec.member)] = r  # later rows of the same member win
        first: dict[tuple, int] = {}
        for i, r in enumerate(runs[run]):
            first.setdefault(_key(r, spec.member), i)  # members keep the order the benchmark wrote them in
        out.append((g, run, [members[k] for k in sorted(members, key=first.__getitem__)]))
    return out


# ------------------------------------------------------------------------------------------ format


def fmt(v, digits: int = 1) -> str:
    x = _f(v)
    if x is None:
        return "-" if v in (None, "") else str(v)
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    if digits == 0 or (x == int(x) and abs(x) >= 100):
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def fmt_mem(v) -> str:
    """A peak-memory cell in MB: below 1 MB with 3 decimals; a measured 0 (on CPU: no new resident page
    during the call, an op that writes into memory it was given) as "< 0.004" (one 4 KiB page)."""
    x = _f(v)
    if x is None or x != x:
        return "-"
    if x == 0:
        return "< 0.004"
    return fmt(x, 3) if abs(x) < 1 else fmt(x)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def ratio(spec: Spec, row: dict, base: dict | None, what: str) -> float | None:
    """time: base_time / row_time (speed-up); throughput: row / base; mem: row / base."""
    if base is None:
        return None
    if what == "mem":
        a, b = _f(row.get(spec.mem)) if spec.mem else None, _f(base.get(spec.mem)) if spec.mem else None
        return a / b if a is not None and b not in (None, 0.0) and a > 0 else None
    if spec.ratio_by == "throughput" and spec.throughput:
        a, b = _f(row.get(spec.throughput)), _f(base.get(spec.throughput))
        return a / b if a is not None and b else None
    a, b = _f(row.get(spec.time)), _f(base.get(spec.time))
    return b / a if a and b is not None else None


def comparison_table(spec: Spec, rows: list[dict]) -> list[str]:
    base = next((r for r in rows if spec.baseline and _matches(r, spec.baseline)), None)
    others = [(lbl, next((r for r in rows if _matches(r, want)), None)) for lbl, want in spec.others]
    others = [(lbl, r) for lbl, r in others if r is not None and r is not base]
    head = [" / ".join(spec.member), f"time ({spec.time_unit}) median [p10-p90]"]
    if spec.throughput:
        head.append(spec.throughput_label)
    if spec.mem:
        head.append("peak MB")
    if spec.plan:
        head += ["engine.plan MB", "peak / plan"]
    head += list(spec.extra)
    speed = "tokens/s vs " if spec.ratio_by == "throughput" else "speed-up vs "
    if base is not None:
        head += [speed + spec.baseline_label] + ([f"memory vs {spec.baseline_label}"] if spec.mem else [])
    for lbl, _ in others:
        head += [speed + lbl] + ([f"memory vs {lbl}"] if spec.others_mem and spec.mem else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = _f(r.get(spec.time))
        if t is None:
            cells = [
                " ".join(_key(r, spec.member)),
                "not measured: " + (r.get(spec.notes_col or "", "") or "no timing"),
            ]
            cells += ["-"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        digits = 3 if t < 10 else 1
        span = f" [{fmt(r.get(spec.p10), digits)}-{fmt(r.get(spec.p90), digits)}]" if spec.p10 and spec.p90 else ""
        cells = [" ".join(_key(r, spec.member)), fmt(t, digits) + span]
        if spec.throughput:
            cells.append(fmt(r.get(spec.throughput)))
        if spec.mem:
            cells.append(fmt_mem(r.get(spec.mem)))
        if spec.plan:
            pred, peak = _f(r.get(spec.plan)), _f(r.get(spec.mem)) if spec.mem else None
            cells += [fmt(r.get(spec.plan)), fmt_ratio(peak / pred if pred and peak else None)]
        cells += [
            fmt(r.get(c), 4)
            if c == "mfu"
            else (r.get(c) or "-")
            if not _f(r.get(c))
            else fmt(r.get(c), 0 if c == "reps" else 1)
            for c in spec.extra
        ]
        if base is not None:
            cells.append(fmt_ratio(ratio(spec, r, base, "time")))
            if spec.mem:
                cells.append(fmt_ratio(ratio(spec, r, base, "mem")))
        for _, o in others:
            cells.append(fmt_ratio(ratio(spec, r, o, "time")))
            if spec.others_mem and spec.mem:
                cells.append(fmt_ratio(ratio(spec, r, o, "mem")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def environments(spec: Spec, rows: list[dict]) -> list[str]:
    seen: OrderedDict[tuple, None] = OrderedDict()
    for r in rows:
        hw = re.sub(r";?\s*load1 [0-9.]+", "", r.get("hardware", "") or "").strip()
        seen[(hw, *(f"{v} {r.get(v)}" for v in spec.versions if r.get(v)), f"commit {r.get('commit', '?')}")] = None
    return ["- " + "; ".join(x for x in k if x) for k in seen]


# ------------------------------------------------------------------------------------------- plots


def find_sweeps(spec: Spec, rows: list[dict]) -> list[tuple[str, str, tuple, str, dict[tuple, list[dict]]]]:
    """Sweeps in the rows: (x column, x label, fixed values, run, {member: rows sorted by x}) where, inside
    one run, one member has >= 3 distinct x values with every fixed column equal."""
    found = []
    for xcol, fixed, xlabel in spec.sweeps:
        buckets: dict[tuple, dict[str, list[dict]]] = {}
        for r in rows:
            if _f(r.get(xcol)) is None or _f(r.get(spec.time)) is None:
                continue
            buckets.setdefault(_key(r, fixed), {}).setdefault(r["_run"], []).append(r)
        for fx, runs in buckets.items():
            best = None
            for run, rs in runs.items():
                series: dict[tuple, dict[float, dict]] = {}
                for r in sorted(rs, key=lambda x: x["_t"]):
                    series.setdefault(_key(r, spec.member), {})[_f(r[xcol])] = r
                series = {m: pts for m, pts in series.items() if len(pts) >= 3}
                if series and (best is None or max(x["_t"] for x in rs) > best[0]):
                    best = (
                        max(x["_t"] for x in rs),
                        run,
                        {m: [pts[x] for x in sorted(pts)] for m, pts in series.items()},
                    )
            if best is not None:
                found.append((xcol, xlabel, fx, best[1], best[2]))
    return found


def plot_sweep(spec: Spec, xcol: str, xlabel: str, fixed: tuple, run: str, series: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed_cols = next(f for x, f, _ in spec.sweeps if x == xcol)
    desc = ", ".join(f"{c}={v}" for c, v in zip(fixed_cols, fixed) if v)
    panels = [(spec.time, f"time ({spec.time_unit})")] + ([(spec.mem, "peak memory (MB)")] if spec.mem else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels):
        for member, rs in series.items():
            xs = [_f(r[xcol]) for r in rs]
            ys = [_f(r.get(col)) for r in rs]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(member))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec.stem}: {desc} (run {run})", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{spec.stem}-{xcol}-{desc}").strip("-").lower()
    path = out_dir / f"{slug}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- document


def _gpu_rows(stem: str, rows: list[dict]) -> bool:
    if stem == "kernels":
        return any((r.get("device") or "").startswith("cuda") for r in rows)
    if stem == "train":
        return any((r.get("bench") or "").startswith("gpu") for r in rows)
    return any("GPU" in (r.get("hardware") or "") or "NVIDIA" in (r.get("hardware") or "") for r in rows)


MISSING_WITHOUT_GPU = {
    "kernels": "the gpu-8b-n8192 / gpu-8b-n32768 rows (Llama-3-8B head: D 4096, V 128256, bf16; DPO, DDPO, ORPO, "
    "DORPO) for the Triton and eager backends, Liger-Kernel (compiled) and Cut Cross-Entropy "
    "(reduction='none' + the loss), timed with CUDA events, with TFLOP/s, % of bf16 peak and "
    "torch.cuda.max_memory_allocated (`make gpu-check` measures them all)",
    "train": "the 8B-shaped DDPO rows (gpu-8b4l-lora, gpu-8b4l-full from `make gpu-check`; gpu-8b-lora, gpu-8b-full "
    "from `make bench-full`: packing, fused Triton loss, reference cache) against TRL's DPOTrainer on the "
    "same GPU, and every MFU figure (MFU is left empty on CPU)",
    "refcache": "the GPU step-time and memory rows (e.g. gpt2-small in bf16)",
    "deviation": "the builtin:minilm embedding throughput on a GPU and FAISS on GPU",
}


def is_dry_run(row: dict) -> bool:
    """A row of `make gpu-check DRY_RUN=1`: plumbing checked on a CPU, not a measurement."""
    return any((row.get(k) or "").startswith(DRY_RUN_PREFIX) for k in ("run_id", "bench"))


# ------------------------------------------------------------------------------------- GPU targets

# Issue #16's targets at the Llama-3-8B head, N = 32768 (bench/bench_kernels.py's config).
TARGET_KERNEL_BENCH = "gpu-8b-n32768"
TARGET_PCT_PEAK = 60.0
TARGET_TIME_VS_LIGER = 0.8
TARGET_MEM_VS_CCE = 1.1
TARGET_TOKENS_VS_TRL = 1.5
# Liger-Kernel has no deviation-weighted losses: DDPO/DORPO are held to Liger's DPO/ORPO (same cost:
# the weights are one scalar per pair).
LIGER_COUNTERPART = {"dpo": "dpo", "ddpo": "dpo", "orpo": "orpo", "dorpo": "orpo"}
TRL_VARIANT_LABEL = {"ref_forward": "TRL (ref forward)", "precomputed_ref": "TRL (precomputed ref)"}
ENGINE_CACHE = {"system": "ddpo-engine", "variant": "packed+cache"}


def _target(name: str, goal: str, value: str, met: bool | None, source: str) -> dict:
    status = "not measured" if met is None else "met" if met else "NOT met"
    return {"target": name, "goal": goal, "measured": value, "status": status, "source": source}


def _unmeasured(row: dict | None, what: str, absent: str = "") -> str:
    """Why a compared row gives no number: absent (from the run), or its notes (the reason it was skipped)."""
    if row is None:
        return absent or f"no {what} row in this run"
    return f"{what}: " + (row.get("notes") or "no timing").split(";")[0]


def _compare(
    name: str, goal: str, ours: dict, other: dict | None, col: str, unit: str, ok, what: str, digits: int = 1
) -> dict:
    """A target on ours[col] / other[col], two rows of one run; ok(ratio) says whether it is met."""
    a = _f(ours.get(col))
    b = _f(other.get(col)) if other else None
    if not a or not b:
        return _target(name, goal, "-", None, _unmeasured(other, what) if a else f"our row has no {col}")
    value = f"{a / b:.2f}x ({fmt(a, digits)} / {fmt(b, digits)} {unit})"
    return _target(name, goal, value, ok(a / b), f"run `{ours['_run']}`")


def _latest(rows: list[dict], **want) -> dict | None:
    hits = [r for r in rows if _matches(r, want)]
    return max(hits, key=lambda r: r["_t"]) if hits else None


def _kernel_targets(rows: list[dict]) -> list[dict]:
    out = []
    head = [r for r in rows if r.get("bench") == TARGET_KERNEL_BENCH and r.get("op") == "fused_preference_loss"]
    for obj in ("dpo", "ddpo", "orpo", "dorpo"):
        label = f"{obj} N=32768"
        cp = LIGER_COUNTERPART[obj]
        vs = "" if cp == obj else f" ({cp}: Liger has no {obj})"
        names_goals = [
            (f"{label}: % of bf16 dense peak", f">= {TARGET_PCT_PEAK:.0f}%"),
            (f"{label}: time vs Liger{vs}", f"<= {TARGET_TIME_VS_LIGER}x"),
            (f"{label}: memory vs Liger{vs}", "<= 1.0x"),
            (f"{label}: memory vs CCE", f"<= {TARGET_MEM_VS_CCE}x"),
        ]
        ours = [r for r in head if r.get("backend") == "triton" and r.get("objective") == obj]
        timed = [r for r in ours if _f(r.get("time_ms_median"))]
        if not timed:
            why = _unmeasured(_latest(ours), "triton", f"no triton row at {TARGET_KERNEL_BENCH} yet (make gpu-check)")
            out += [_target(n, g, "-", None, why) for n, g in names_goals]
            continue
        r = max(timed, key=lambda x: x["_t"])
        run = [x for x in head if x["_run"] == r["_run"]]
        liger, cce = _latest(run, backend="liger", objective=cp), _latest(run, backend="cce", objective=obj)
        pct = _f(r.get("pct_peak"))
        measured = "-" if pct is None else f"{pct:.1f}% ({fmt(r.get('tflops'))} TFLOP/s)"
        src = f"run `{r['_run']}`" if pct is not None else "no bf16 peak known for this GPU"
        out.append(_target(*names_goals[0], measured, None if pct is None else pct >= TARGET_PCT_PEAK, src))
        faster = lambda x: x <= TARGET_TIME_VS_LIGER  # noqa: E731
        out.append(_compare(*names_goals[1], r, liger, "time_ms_median", "ms", faster, "liger"))
        out.append(_compare(*names_goals[2], r, liger, "peak_mem_mb", "MB", lambda x: x <= 1.0, "liger"))
        out.append(_compare(*names_goals[3], r, cce, "peak_mem_mb", "MB", lambda x: x <= TARGET_MEM_VS_CCE, "cce"))
    return out


def _train_targets(rows: list[dict]) -> list[dict]:
    out = []
    gpu = [r for r in rows if (r.get("bench") or "").startswith("gpu-")]
    benches = list(OrderedDict.fromkeys(r["bench"] for r in gpu)) or ["gpu-8b4l-lora", "gpu-8b4l-full"]
    for bench in benches:
        mine = [r for r in gpu if r["bench"] == bench]
        timed = [r for r in mine if _matches(r, ENGINE_CACHE) and _f(r.get("tokens_per_s"))]
        r = max(timed, key=lambda x: x["_t"]) if timed else None
        for variant, vlabel in TRL_VARIANT_LABEL.items():
            speed = (f"{bench}: tokens/s vs {vlabel}", f">= {TARGET_TOKENS_VS_TRL}x")
            memory = (f"{bench}: memory vs {vlabel}", "<= 1.0x")
            if r is None:
                absent = f"no ddpo-engine packed+cache row of {bench} yet (make gpu-check)"
                why = _unmeasured(_latest(mine, **ENGINE_CACHE), "ddpo-engine packed+cache", absent)
                out += [_target(*speed, "-", None, why), _target(*memory, "-", None, why)]
                continue
            trl = _latest([x for x in mine if x["_run"] == r["_run"]], system="trl", variant=variant)
            out.append(_compare(*speed, r, trl, "tokens_per_s", "tokens/s", lambda x: x >= TARGET_TOKENS_VS_TRL, "trl"))
            out.append(_compare(*memory, r, trl, "peak_mem_mb", "MB", lambda x: x <= 1.0, "trl"))
    return out


def gpu_targets(kernel_rows: list[dict], train_rows: list[dict]) -> list[dict]:
    """Issue #16's GPU targets from rows (with `_run`/`_t` set by attribute_runs): each a dict with target,
    goal, measured, status ("met", "NOT met", "not measured") and source (the run, or why not measured).
    A ratio's two rows always come from one run."""
    return _kernel_targets(kernel_rows) + _train_targets(train_rows)


def targets_section(kernel_rows: list[dict], train_rows: list[dict]) -> list[str]:
    checks = gpu_targets(kernel_rows, train_rows)
    counts = {s: sum(c["status"] == s for c in checks) for s in ("met", "NOT met", "not measured")}
    intro = (
        "Fused loss forward + backward at the Llama-3-8B head (N = 32768, bf16): >= 60% of bf16 dense peak "
        "(6 N V D / time), <= 0.8x Liger-Kernel's time, peak memory <= Liger's and <= 1.1x Cut Cross-Entropy's. "
        "End-to-end 8B-shaped DDPO step with the reference cache: >= 1.5x TRL DPOTrainer's tokens/s at no more "
        "memory. Rows come from `make gpu-check` (bench/gpu_check.py); each ratio uses rows of one run."
    )
    md = ["## GPU targets (issue #16)", "", intro, ""]
    md += [f"{counts['met']} met, {counts['NOT met']} NOT met, {counts['not measured']} not measured.", ""]
    return md + _target_table(checks) + [""]


# CPU targets of issue #22 (gpt2-small end to end on CPU, the planner, the deviation weights).
CPU_TRAIN_BENCH = "cpu-gpt2-stories"
TARGET_CPU_TOKENS_VS_TRL = 2.0
TARGET_CPU_MEM_VS_TRL = 0.6
TARGET_PLAN_ERROR = 0.15
TARGET_DEVIATION_VS_CENTROID = 2.0
README_BEGIN = "<!-- performance summary: generated by python -m bench.report; do not edit -->"
README_END = "<!-- end of performance summary -->"


def _cpu_train_targets(rows: list[dict]) -> list[dict]:
    bench = CPU_TRAIN_BENCH
    mine = [r for r in rows if r.get("bench") == bench and _f(r.get("tokens_per_s"))]
    ours = _latest(mine, **ENGINE_CACHE)
    if ours is None:
        why = f"no ddpo-engine packed+cache row of {bench} yet (python -m bench.bench_train --setup {bench})"
        return [_target(f"{bench}: engine packed+cache", "-", "-", None, why)]
    run = [r for r in mine if r["_run"] == ours["_run"]]
    trl = _latest(run, system="trl", variant="precomputed_ref")
    unpacked = _latest(run, system="ddpo-engine", variant="unpacked+cache")
    out = [
        _compare(
            f"{bench}: tokens/s vs TRL (precomputed ref)",
            f">= {TARGET_CPU_TOKENS_VS_TRL:g}x",
            ours,
            trl,
            "tokens_per_s",
            "tokens/s",
            lambda x: x >= TARGET_CPU_TOKENS_VS_TRL,
            "trl precomputed_ref",
        ),
        _compare(
            f"{bench}: peak memory vs TRL (precomputed ref)",
            f"<= {TARGET_CPU_MEM_VS_TRL:g}x",
            ours,
            trl,
            "peak_mem_mb",
            "MB",
            lambda x: x <= TARGET_CPU_MEM_VS_TRL,
            "trl precomputed_ref",
        ),
        _compare(
            f"{bench}: packed tokens/s vs unpacked",
            ">= 1x",
            ours,
            unpacked,
            "tokens_per_s",
            "tokens/s",
            lambda x: x >= 1.0,
            "ddpo-engine unpacked+cache",
        ),
    ]
    for r in [x for x in run if x.get("system") == "ddpo-engine"]:
        measured, planned = _f(r.get("peak_mem_mb")), _f(r.get("plan_mb"))
        name = f"{bench} {r['variant']}: measured peak vs engine.plan"
        if not measured or not planned:
            out.append(_target(name, f"within {TARGET_PLAN_ERROR:.0%}", "-", None, "the row has no plan_mb"))
            continue
        err = measured / planned - 1
        out.append(
            _target(
                name,
                f"within {TARGET_PLAN_ERROR:.0%}",
                f"{err:+.1%} ({fmt(measured)} / {fmt(planned)} MB)",
                abs(err) <= TARGET_PLAN_ERROR,
                f"run `{r['_run']}`",
            )
        )
    return out


def _deviation_targets(rows: list[dict]) -> list[dict]:
    out = []
    for config in ("grouped", "shuffled"):
        mine = [r for r in rows if r.get("bench") == "weights_mean" and r.get("config") == config]
        ours = _latest(mine, backend="engine.deviation")
        name = f"deviation weights, 1M x 384, {config}: time vs numpy centroid pass"
        goal = f"<= {TARGET_DEVIATION_VS_CENTROID:g}x"
        if ours is None:
            out.append(_target(name, goal, "-", None, "no engine.deviation row yet (python -m bench.bench_deviation)"))
            continue
        base = _latest([r for r in mine if r["_run"] == ours["_run"]], backend="numpy centroid pass")
        out.append(
            _compare(
                name,
                goal,
                ours,
                base,
                "time_s",
                "s",
                lambda x: x <= TARGET_DEVIATION_VS_CENTROID,
                "numpy centroid pass",
                digits=3,
            )
        )
    embeds = [r for r in rows if r.get("bench") == "embed" and "minilm" in (r.get("config") or "")]
    if embeds:
        latest_run = max(embeds, key=lambda r: r["_t"])["_run"]
        for r in sorted((r for r in embeds if r["_run"] == latest_run), key=lambda r: r["config"]):
            note = (r.get("note") or "").split(";")[1].strip() if ";" in (r.get("note") or "") else ""
            value = f"{fmt(r.get('throughput'))} texts/s" + (f", {note}" if note else "")
            out.append(
                {
                    **_target(f"embedding throughput, {r['config']}", "stated", value, None, f"run `{r['_run']}`"),
                    "status": "stated",
                }
            )
    return out


def cpu_targets(train_rows: list[dict], deviation_rows: list[dict]) -> list[dict]:
    """Issue #22's CPU targets from rows (with `_run`/`_t` set): the ratios of one run each; a figure the
    issue asks to state (embedding throughput) has status "stated"."""
    return _cpu_train_targets(train_rows) + _deviation_targets(deviation_rows)


def _target_table(checks: list[dict]) -> list[str]:
    md = ["| target | goal | measured | status | source |", "|---|---|---|---|---|"]
    return md + [f"| {c['target']} | {c['goal']} | {c['measured']} | {c['status']} | {c['source']} |" for c in checks]


def cpu_targets_section(train_rows: list[dict], deviation_rows: list[dict]) -> list[str]:
    checks = cpu_targets(train_rows, deviation_rows)
    intro = (
        f"gpt2-small (vocabulary 50,257) on CPU in fp32 with WritingPrompts-like stories (`{CPU_TRAIN_BENCH}`): "
        f"the engine's packed rows with the reference cache against TRL DPOTrainer with precomputed reference "
        f"log-probs, >= {TARGET_CPU_TOKENS_VS_TRL:g}x its tokens/s at <= {TARGET_CPU_MEM_VS_TRL:g}x its peak memory, "
        f"packed at least as fast as unpacked; every engine row's measured peak within "
        f"{TARGET_PLAN_ERROR:.0%} of engine.plan's prediction; deviation weights at 1M x 384 in at most "
        f"{TARGET_DEVIATION_VS_CENTROID:g}x the time of a numpy centroid pass over the same array. Each ratio "
        "uses rows of one run."
    )
    return ["## CPU targets (issue #22)", "", intro, ""] + _target_table(checks) + [""]


def load_results(results_dir: Path, *, include_dry_run: bool = False) -> tuple[dict, list[dict], int]:
    """(rows by CSV stem, orchestrated jobs, dry-run rows seen) of `results_dir`, every row with its `_run`
    and `_t`; dry-run rows and jobs (and stems left empty by them) are dropped unless include_dry_run."""
    jobs = read_rows(results_dir / RUNS_CSV) if (results_dir / RUNS_CSV).exists() else []
    data = {p.stem: read_rows(p) for p in sorted(results_dir.glob("*.csv")) if p.name != RUNS_CSV}
    dry = sum(is_dry_run(r) for rows in [jobs, *data.values()] for r in rows)
    if not include_dry_run:
        jobs = [r for r in jobs if not is_dry_run(r)]
        data = {stem: [r for r in rows if not is_dry_run(r)] for stem, rows in data.items()}
        data = {stem: rows for stem, rows in data.items() if rows}
    for stem, rows in data.items():
        attribute_runs(stem, rows, jobs)
    return data, jobs, dry


def readme_summary(results_dir: Path) -> list[str]:
    """The README's performance summary: the CPU target table from the committed CSVs."""
    data, _, _ = load_results(results_dir)
    lines = _target_table(cpu_targets(data.get("train", []), data.get("deviation", [])))
    return [README_BEGIN, "", *lines, "", README_END]


def update_readme(readme: Path, results_dir: Path) -> bool:
    """Replace the README's generated performance summary (between the markers); False if it has none."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + "\n".join(readme_summary(results_dir)) + tail)
    return True


def render(
    results_dir: Path,
    out_path: Path,
    plots_dir: Path | None = None,
    *,
    plots: bool = True,
    include_dry_run: bool = False,
) -> str:
    """Write the document (and plots) from the CSVs in `results_dir`; returns the markdown.

    plots=False writes no PNG (a preview away from the repository); dry-run rows are left out (and
    counted) unless include_dry_run.
    """
    plots_dir = plots_dir or results_dir / "plots"
    specs = {s.stem: s for s in SPECS}
    files = sorted(p for p in results_dir.glob("*.csv") if p.name != RUNS_CSV)
    order = [s.stem for s in SPECS] + sorted(p.stem for p in files if p.stem not in specs)
    data, jobs, dry = load_results(results_dir, include_dry_run=include_dry_run)

    if plots and plots_dir.exists():
        for old in plots_dir.glob("*.png"):
            old.unlink()  # plots of sweeps no longer in the data must not linger
    md = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` (run by `make bench` / `make bench-full`, i.e. `python -m bench.run "
        "[--quick]`) from the CSV rows in `bench/results/`. Do not edit by hand: every number below is a CSV cell or a "
        "ratio of two cells of rows from the same run.",
        "",
        "Ratios: *speed-up vs X* = X's median time / the row's median time (> 1: the row is faster); *tokens/s vs X* = "
        "the row's tokens/s / X's; *memory vs X* = the row's peak memory / X's (< 1: the row uses less). Times are the "
        "median of the timed repetitions with the 10th-90th percentile range in brackets; `reps` is the number of "
        "timed "
        "repetitions after warm-up.",
        "",
    ]
    if include_dry_run and dry:
        md.append(
            f"**Dry-run preview**: {dry} rows marked `{DRY_RUN_PREFIX}` come from `make gpu-check DRY_RUN=1` "
            "on a CPU; they check the plumbing and measure nothing, and never belong in bench/results."
        )
        md.append("")
    elif dry:
        md += [f"{dry} dry-run rows (`{DRY_RUN_PREFIX}`, from `make gpu-check DRY_RUN=1`) were left out.", ""]
    md += targets_section(data.get("kernels", []), data.get("train", []))
    md += cpu_targets_section(data.get("train", []), data.get("deviation", []))
    missing = []
    for stem in order:
        rows = data.get(stem)
        spec = specs.get(stem)
        if rows is None:
            if spec is not None:
                missing.append(f"- `{stem}.csv`: no rows at all (the benchmark has not been run here).")
            continue
        if stem == MEMORY_STEM:
            md += _memory_section(rows)
            continue
        if stem == "reward":
            md += _reward_section(rows)
            continue
        if spec is None:
            md += _generic_section(stem, rows)
            continue
        md += [f"## {spec.title}", "", spec.intro, ""]
        for g, run, rs in select_comparisons(spec, rows):
            label = ", ".join(f"{c}={v}" for c, v in zip(spec.group, g) if v)
            md += [f"### {label}", "", f"Run `{run}`.", ""]
            md += comparison_table(spec, rs)
            notes = [
                (" ".join(_key(r, spec.member)), r.get(spec.notes_col))
                for r in rs
                if spec.notes_col and r.get(spec.notes_col)
            ]
            if notes:
                md += [""] + [f"- {m}: {n}" for m, n in notes]
            md.append("")
        sweeps = find_sweeps(spec, rows)
        if sweeps and not plots:
            md += ["Plots are omitted from this preview (`python -m bench.report` draws them).", ""]
        elif sweeps:
            md += ["Plots (time and peak memory against the swept dimension; one run each):", ""]
            for xcol, xlabel, fx, run, series in sweeps:
                path = plot_sweep(spec, xcol, xlabel, fx, run, series, plots_dir)
                rel = path.relative_to(out_path.parent) if path.is_relative_to(out_path.parent) else path
                md.append(f"![{stem} vs {xcol}]({rel.as_posix()})")
            md.append("")
        else:
            if spec.sweeps:
                md += [
                    f"No plot: no run of `{stem}.csv` holds a sweep (>= 3 values of "
                    f"{' or '.join(x for x, _, _ in spec.sweeps)} with the other dimensions fixed).",
                    "",
                ]
        md += ["Hardware and versions of these rows:", ""] + environments(spec, rows) + [""]
        if stem in MISSING_WITHOUT_GPU and not _gpu_rows(stem, rows):
            missing.append(
                f"- `{stem}.csv`: no CUDA GPU was available to the runs behind these rows, so "
                f"{MISSING_WITHOUT_GPU[stem]} are missing."
            )

    if jobs:
        last = max(jobs, key=lambda j: _ts(j.get("start")) or _dt.datetime.min.replace(tzinfo=_dt.timezone.utc))[
            "run_id"
        ]
        js = [j for j in jobs if j["run_id"] == last]
        md += [
            "## Last orchestrated run",
            "",
            f"Run `{last}` ({js[0].get('mode', '')}), commit {js[0].get('commit', '')}, {js[0].get('hardware', '')}:",
            "",
            "| job | status | seconds | results | reason |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| {j['job']} | {j['status']} | {fmt(j.get('seconds'))} | {j.get('csv') or '-'} | "
            f"{j.get('reason') or ''} |"
            for j in js
        ]
        md.append("")
        missing += [
            f"- job `{j['job']}` of run `{last}`: {j['status']}: {j.get('reason')}" for j in js if j["status"] != "ok"
        ]
    md += ["## Missing rows", ""] + (missing or ["- none"]) + [""]
    text = "\n".join(md)
    out_path.write_text(text)
    return text


MEMORY_STEM = "memory"


def _memory_section(rows: list[dict]) -> list[str]:
    """memory.csv (bench/bench_train.py breakdown_worker): per benchmark setup, its latest run's components
    of one step's peak, their share of the RSS peak rise, and engine.plan's figure for each."""
    md = [
        "## Memory breakdown of one training step",
        "",
        "What holds memory at the peak of one engine step (packed rows, reference cache), measured in its own "
        "process by bench/bench_train.py: the RSS peak above the window's baseline, and torch.profiler's memory "
        "categories summed over the tensors live at the moment of the largest total; the fused loss's logits block "
        "is split out of the activations by its [rows, V] size. `engine.plan MB` is the planner's figure for the "
        "same component.",
        "",
    ]
    by_bench: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        by_bench.setdefault(r.get("bench", ""), []).append(r)
    for bench, rs in by_bench.items():
        last = max(rs, key=lambda r: r["_t"])["_run"]
        rs = [r for r in rs if r["_run"] == last]
        total = next((_f(r["mb"]) for r in rs if r["component"].startswith("total")), None)
        r0 = rs[0]
        tokens = fmt(r0.get("tokens_per_step"), 0)
        md += [
            f"### bench={bench}, model={r0.get('model')}, {r0.get('variant')}, {tokens} real tokens",
            "",
            f"Run `{last}`.",
            "",
            "| component | MB | share of the peak rise | engine.plan MB | note |",
            "|---|---|---|---|---|",
        ]
        for r in rs:
            mb = _f(r.get("mb"))
            counted = total and mb is not None and not r["component"].startswith("before")
            share = f"{100 * mb / total:.1f}%" if counted else "-"
            note = r.get("note") or ""
            md.append(f"| {r['component']} | {fmt(r.get('mb'))} | {share} | {fmt(r.get('plan_mb'))} | {note} |")
        versions = (
            f"torch {r0.get('torch')}",
            f"transformers {r0.get('transformers')}",
            f"deepspeed {r0.get('deepspeed')}",
            f"commit {r0.get('commit')}",
        )
        env = "; ".join(x for x in (r0.get("hardware"), *versions) if x)
        md += ["", f"- {env}", ""]
    return md


def _reward_section(rows: list[dict]) -> list[str]:
    """reward.csv (bench/bench_reward.py): held-out quality of the tiny reward preset and its variants, the
    latest row of each variant (quality figures stand alone: no ratio is taken across rows)."""
    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["_t"]):
        latest[r["variant"]] = r
    rs = list(latest.values())
    md = [
        "## Reward model: held-out quality of the tiny preset",
        "",
        "`configs/reward-tiny-cpu.yaml` trained by `engine.train`, its exported `final/` loaded by transformers "
        "(engine.evaluate.RewardScorer) and scored on every held-out response of the synthetic data "
        "(bench/bench_reward.py). *Spearman (quality)*: rank correlation of the export's scores with the "
        "generator's ground-truth quality; *train-time*: the same from the trainer's packed forward at the best "
        "step; *Spearman (upvotes)*, *pair accuracy*: against the held-out upvotes and preference pairs. Times: "
        "the whole train call (data, training, held-out evaluations, exports) in wall and CPU seconds, with the "
        "machine's 1-minute load average before and after. The latest row of each variant.",
        "",
        "| variant | loss | labels | Spearman (quality) | bar | train-time | Spearman (upvotes) | pair accuracy | "
        "steps (best) | wall s | CPU s | threads | load | run |",
        "|" + "---|" * 14,
    ]
    for r in rs:
        q, bar = _f(r.get("spearman_quality")), _f(r.get("target_spearman_quality"))
        verdict = "-" if q is None or bar is None else (f">= {bar:g}" if q >= bar else f"< {bar:g}")
        md.append(
            f"| {r['variant']} | {r['reward_loss']} | {r['labels']} | {fmt(q, 3)} | {verdict} | "
            f"{fmt(r.get('spearman_quality_train'), 3)} | {fmt(r.get('spearman_label'), 3)} | "
            f"{fmt(r.get('pairwise_accuracy'), 3)} | {r['steps']} ({r['best_step']}) | {fmt(r.get('wall_s'))} | "
            f"{fmt(r.get('cpu_s'))} | {r['threads']} | {r['load1_start']} -> {r['load1_end']} | {r['_run']} |"
        )
    envs = sorted({(r["hardware"], r["torch"], r["transformers"], r["commit"]) for r in rs})
    md += ["", "Hardware and versions of these rows:", ""]
    md += [f"- {h}; torch {t}, transformers {tf}, commit {c}" for h, t, tf, c in envs]
    return md + [""]


def _generic_section(stem: str, rows: list[dict]) -> list[str]:
    """A results file without a spec: its rows of the latest run, as they are."""
    last = max(rows, key=lambda r: r["_t"])["_run"]
    rs = [r for r in rows if r["_run"] == last]
    cols = [c for c in rs[0] if not c.startswith("_")]
    md = [
        f"## {stem}",
        "",
        f"Rows of run `{last}` from `{stem}.csv` (no comparison defined for this file).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join((r.get(c) or "").replace("|", "/") for c in cols) + " |" for r in rs]
    return md + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="directory of the *.csv results")
    p.add_argument("--out", default=str(OUT), help="markdown file to write")
    p.add_argument("--plots", default=None, help="directory for PNG plots (default: <results>/plots)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(
            f"results directory {results} does not exist; run `make bench` (python -m bench.run --quick) first"
        )
    render(results, Path(args.out), Path(args.plots) if args.plots else None)
    print(f"wrote {args.out}")
    if Path(args.out).resolve() == OUT and update_readme(REPO / "README.md", results):
        print("updated the performance summary in README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
