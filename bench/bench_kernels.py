"""Microbenchmarks of the fused LM-head ops: time and peak memory of forward + backward.

Two drivers share the inputs, the compared methods and the row format; every row goes to
bench/results/kernels.csv (or the file given), the source of every kernel figure in BENCHMARKS.md:
- pytest (`pytest bench/bench_kernels.py [-k cpu-small]`, what `make bench` runs): one test per
  (config, method, objective), timed through pytest-benchmark's rounds on our own clock.
- the case worker (`python -m bench.bench_kernels --cases JSON [--csv PATH]`), which `make gpu-check`
  (bench/gpu_check.py) runs for the Llama-3-8B head: CUDA-event timing per repetition, one row per
  case even when the case cannot run (the row's notes say why), and progress lines on stdout so the
  orchestrator can tell which case a crash or a hang belongs to.

What is compared, on identical packed batches (P pairs, each sequence T tokens of which the first
`prompt` are prompt tokens with ignored targets, and the last has no target: a sequence boundary):
- op "fused_preference_loss": our backends (eager reference, chunked torch, triton) through `fused_loss`,
  the one call site of ddpo_kernels.fused_preference_loss in bench/; Liger-Kernel's chunked preference
  losses (LigerFusedLinearDPOLoss with use_ref_model=False, i.e. reference log-probs of 0 as ours get,
  and LigerFusedLinearORPOLoss; torch.compile'd on CUDA as Liger defaults; Liger has no
  deviation-weighted variant, so it has no DDPO/DORPO rows); Cut Cross-Entropy (CUDA only): its
  linear_cross_entropy with reduction="none" (per-token NLL, its default gradient filtering) feeding
  the same per-sequence sums and engine.losses.preference_loss.
- op "linear_logprob": per-sequence log-probs with a random upstream gradient, our backends.
DDPO/DORPO get deviation-like chosen weights in [0.5, 1.5]; DPO/DDPO reference log-probs of 0.

Columns: time quantiles over >= 10 timed repetitions after warm-up; peak_mem_mb = the increase over
the memory in use before one forward + backward (inputs excluded; parameter gradients included,
identical for every method): on CUDA torch.cuda.max_memory_allocated from a reset baseline, on CPU the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs), which counts every
allocator, torch's and the libraries' alike; tokens_per_s = N / median; tflops = 6 N V D / median
(engine.flops.lm_head_flops: forward logits, input and weight gradients; N counts every hidden row);
pct_peak = that over the GPU's dense bf16 peak (engine.flops); loss = the method's loss value, so a
reader can see that the methods computed the same function. notes: why a row has no timing.
CPU configs: "cpu-small" (timing, 10 reps), "cpu-target" (N=8192, D=512, V=32000, the memory target of
the issue; one timed rep because one eager fwd+bwd takes ~30 s on 2 cores) and the sweeps. GPU
configs: "gpu-8b-n8192" and "gpu-8b-n32768": Llama-3-8B head (D=4096, V=128256), bf16, sequences of
1024 tokens without prompt, so N is 8192 or 32768 and all but one token per sequence has a target.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from ddpo_kernels import LossSchedule, fused_preference_loss, linear_logprob  # noqa: E402
from engine import flops  # noqa: E402
from engine.losses import loss_epilogue, preference_loss  # noqa: E402
from engine.memory import limit_allocator_retention  # noqa: E402

RESULTS_CSV = common.RESULTS_DIR / "kernels.csv"
CSV_FIELDS = (
    "bench op backend objective N D V dtype device time_ms_median time_ms_p10 time_ms_p90 reps "
    "peak_mem_mb tokens_per_s tflops pct_peak loss hardware torch triton liger cce commit run_id "
    "timestamp notes"
).split()
IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
OBJECTIVES = ("dpo", "ddpo", "orpo", "dorpo")
WEIGHTED = ("ddpo", "dorpo")
WITH_REFERENCE = ("dpo", "ddpo")
# Liger's module per objective; Liger has no deviation-weighted variant.
LIGER_OBJECTIVES = ("dpo", "orpo")
# Progress lines of the case worker (read by bench/gpu_check.py).
PLAN_TAG, CASE_TAG, CONTEXT_LOST_TAG = "GPUCHECK-PLAN ", "GPUCHECK-CASE ", "GPUCHECK-CONTEXT-LOST"
CONTEXT_LOST_EXIT = 3


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    pairs: int
    seq_len: int  # tokens per sequence (chosen and rejected alike)
    prompt: int  # leading prompt tokens per sequence, targets ignored
    d: int
    v: int
    dtype: str  # torch dtype name
    device: str
    reps: int
    warmup: int

    @property
    def n(self) -> int:
        return 2 * self.pairs * self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


LLAMA3_8B_HEAD = dict(d=4096, v=128256)
CONFIGS = [
    Config(
        "cpu-small", pairs=4, seq_len=256, prompt=32, d=256, v=8000, dtype="float32", device="cpu", reps=10, warmup=1
    ),
    Config(
        "cpu-target", pairs=8, seq_len=512, prompt=64, d=512, v=32000, dtype="float32", device="cpu", reps=1, warmup=0
    ),
    # The Llama-3-8B head at the token counts of the GPU targets (make gpu-check measures these).
    *[
        Config(
            f"gpu-8b-n{2 * p * 1024}",
            pairs=p,
            seq_len=1024,
            prompt=0,
            **LLAMA3_8B_HEAD,
            dtype="bfloat16",
            device="cuda",
            reps=10,
            warmup=2,
        )
        for p in (4, 16)
    ],
    # Sweeps for the report's plots (eager vs torch only, to stay inside make bench's budget): tokens N
    # at fixed D, V; then vocabulary V at fixed N, D (the n512 point is also the V=8000 point).
    *[
        Config(
            f"cpu-sweep-n{2 * 4 * t}",
            pairs=4,
            seq_len=t,
            prompt=8,
            d=128,
            v=8000,
            dtype="float32",
            device="cpu",
            reps=10,
            warmup=1,
        )
        for t in (32, 64, 128, 256)
    ],
    *[
        Config(
            f"cpu-sweep-v{v}",
            pairs=4,
            seq_len=64,
            prompt=8,
            d=128,
            v=v,
            dtype="float32",
            device="cpu",
            reps=10,
            warmup=1,
        )
        for v in (2000, 16000, 32000)
    ],
]
# The `make gpu-check DRY_RUN=1` head: tiny, so the Triton interpreter runs it in seconds on a CPU.
# Its name marks its rows as a dry run (bench/report.py leaves them out of BENCHMARKS.md).
DRY_RUN_CONFIG = Config(
    "dryrun-cpu-head", pairs=2, seq_len=12, prompt=2, d=32, v=160, dtype="float32", device="cpu", reps=2, warmup=1
)


def config_by_name(name: str) -> Config:
    for cfg in (*CONFIGS, DRY_RUN_CONFIG):
        if cfg.name == name:
            return cfg
    known = ", ".join(c.name for c in (*CONFIGS, DRY_RUN_CONFIG))
    raise ValueError(f"unknown kernel benchmark config {name!r}; known: {known}")


def methods_for(cfg: Config, op: str, objective: str) -> list[str]:
    """The methods a config compares for one op and objective (availability is checked when measuring)."""
    ours = ["eager", "torch"] + (["triton"] if cfg.device == "cuda" else [])
    if op != "fused_preference_loss" or cfg.name.startswith("cpu-sweep"):
        return ours
    return ours + (["liger"] if objective in LIGER_OBJECTIVES else []) + (["cce"] if cfg.device == "cuda" else [])


def objectives_for(cfg: Config) -> tuple[str, ...]:
    if cfg.name.startswith("gpu-"):
        return OBJECTIVES
    return ("dpo", "orpo") if cfg.name == "cpu-small" else ("dpo",)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


_INPUTS: dict[str, dict] = {}


def make_inputs(cfg: Config) -> dict:
    """A packed batch laid out as Liger expects ([2P, T]: all chosen rows, then all rejected rows)."""
    if cfg.name in _INPUTS:
        return _INPUTS[cfg.name]
    _INPUTS.clear()  # one config's tensors at a time keeps the host/GPU footprint bounded
    dev = cfg.device
    # Drawn where they live: the 8B head's weight is 0.5e9 numbers, slow to draw on a CPU.
    g = torch.Generator(device=dev).manual_seed(0)
    rows, t, d, v, p = 2 * cfg.pairs, cfg.seq_len, cfg.d, cfg.v, cfg.pairs
    targets = torch.randint(0, v, (rows, t), generator=g, device=dev)
    targets[:, : cfg.prompt] = IGNORE
    targets[:, -1] = IGNORE  # sequence boundary
    hidden = torch.randn(rows * t, d, generator=g, device=dev).to(cfg.torch_dtype)
    weight = (torch.randn(v, d, generator=g, device=dev) * d**-0.5).to(cfg.torch_dtype)
    inputs = dict(
        hidden=hidden,
        weight=weight,
        targets=targets.reshape(-1),
        targets_2d=targets,
        segment_ids=torch.arange(rows, device=dev).repeat_interleave(t),
        chosen=torch.arange(p, device=dev),
        rejected=torch.arange(p, 2 * p, device=dev),
        ref_chosen=torch.zeros(p, device=dev),
        ref_rejected=torch.zeros(p, device=dev),
        # Deviation weights are per-pair scalars around 1 (the published transform's range).
        weights=0.5 + torch.rand(p, generator=g, device=dev),
        grad_seq=torch.randn(rows, generator=g, device=dev),
    )
    _INPUTS[cfg.name] = inputs
    return inputs


# ---------------------------------------------------------------------------------------------
# The measured functions: forward + backward of one method; run() returns the detached loss
# ---------------------------------------------------------------------------------------------


def loss_schedule(inp: dict) -> LossSchedule:
    """The batch's loss schedule, built once on the CPU as the trainer's collate does, so that a timed step
    is the loss alone."""
    return LossSchedule.for_pairs(
        inp["targets"].cpu(), inp["segment_ids"].cpu(), inp["chosen"].cpu(), inp["rejected"].cpu()
    ).to(inp["targets"].device)


def fused_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inp: dict,
    *,
    objective: str,
    beta: float,
    backend: str,
    schedule: LossSchedule | None = None,
):
    """The engine's fused preference loss on a benchmark batch: the single call site of
    ddpo_kernels.fused_preference_loss in bench/, so a change of its signature is fixed here only."""
    epilogue = loss_epilogue(
        objective,
        beta=beta,
        chosen_weights=inp["weights"] if objective in WEIGHTED else None,
        ref_chosen_logps=inp["ref_chosen"] if objective in WITH_REFERENCE else None,
        ref_rejected_logps=inp["ref_rejected"] if objective in WITH_REFERENCE else None,
    )
    return fused_preference_loss(
        hidden,
        weight,
        inp["targets"],
        inp["segment_ids"],
        inp["chosen"],
        inp["rejected"],
        epilogue,
        backend=backend,
        schedule=schedule,
    )


def _fused_fn(cfg: Config, inp: dict, backend: str, objective: str):
    beta = 0.1 if objective in WITH_REFERENCE else 0.25
    h = inp["hidden"].detach().requires_grad_()
    w = inp["weight"].detach().requires_grad_()

    if backend == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearORPOLoss

        compiled = cfg.device == "cuda"  # torch.compile is Liger's default on GPUs; CPU runs it eagerly
        if objective == "dpo":
            mod = LigerFusedLinearDPOLoss(beta=beta, compiled=compiled, use_ref_model=False)
        else:
            mod = LigerFusedLinearORPOLoss(beta=beta, compiled=compiled)
        h3 = h.view(2 * cfg.pairs, cfg.seq_len, cfg.d)

        def run():
            loss = mod(w, h3, inp["targets_2d"])[0]
            loss.backward()
            return loss.detach()

    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def run():
            nll = linear_cross_entropy(h, w, inp["targets"], ignore_index=IGNORE, reduction="none")
            mask = inp["targets"] != IGNORE
            seq = torch.zeros(2 * cfg.pairs, device=h.device).index_add(0, inp["segment_ids"], -nll.float() * mask)
            cnt = torch.bincount(inp["segment_ids"][mask], minlength=2 * cfg.pairs)
            c, r = inp["chosen"], inp["rejected"]
            ref = objective in WITH_REFERENCE
            loss = preference_loss(
                objective,
                seq[c],
                seq[r],
                cnt[c],
                cnt[r],
                beta=beta,
                chosen_weights=inp["weights"] if objective in WEIGHTED else None,
                ref_chosen_logps=inp["ref_chosen"] if ref else None,
                ref_rejected_logps=inp["ref_rejected"] if ref else None,
            ).loss
            loss.backward()
            return loss.detach()

    else:
        schedule = loss_schedule(inp)

        def run():
            loss = fused_loss(h, w, inp, objective=objective, beta=beta, backend=backend, schedule=schedule)
            loss.backward()
            return loss.detach()

    def reset():
        h.grad = None
        w.grad = None

    return run, reset


def _logprob_fn(cfg: Config, inp: dict, backend: str):
    h = inp["hidden"].detach().requires_grad_()
    w = inp["weight"].detach().requires_grad_()

    def run():
        seq, _ = linear_logprob(h, w, inp["targets"], inp["segment_ids"], 2 * cfg.pairs, backend=backend)
        out = (seq * inp["grad_seq"]).sum()
        out.backward()
        return out.detach()

    def reset():
        h.grad = None
        w.grad = None

    return run, reset


def measured_fn(cfg: Config, op: str, backend: str, objective: str):
    inp = make_inputs(cfg)
    return _fused_fn(cfg, inp, backend, objective) if op == "fused_preference_loss" else _logprob_fn(cfg, inp, backend)


def unavailable(cfg: Config, backend: str) -> str | None:
    """Why a method cannot run here (a missing package, the wrong device), or None."""
    wheel = "make gpu-check installs it from a wheel in .whl/ (make gpu-wheels)"
    if backend == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return f"liger-kernel is not installed; {wheel}"
    if backend == "cce":
        if cfg.device != "cuda":
            return "Cut Cross-Entropy runs on CUDA only"
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return f"cut-cross-entropy is not installed; {wheel}"
    if backend == "triton" and cfg.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend off CUDA needs the Triton interpreter (TRITON_INTERPRET=1)"
    return None


# ---------------------------------------------------------------------------------------------
# Memory, rows
# ---------------------------------------------------------------------------------------------


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


class PeakMeter:
    """Peak memory increase of each round over the memory in use just before it."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0.0
        self.peaks: list[float] = []
        if device != "cuda":
            # Freed blocks of 1 MiB or more leave the process (engine.train's CPU policy), so each round's
            # temporaries raise the RSS again instead of reusing what glibc kept from the round before.
            limit_allocator_retention()

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self.base = float("nan")
                return
            self.base = _proc_status_mb("VmRSS")

    def stop(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() / 2**20 - self.base)
        else:
            self.peaks.append(_proc_status_mb("VmHWM") - self.base)


def make_row(
    cfg: Config,
    op: str,
    backend: str,
    objective: str,
    *,
    timing: common.Timing | None = None,
    peak_mb: float | None = None,
    loss: float | None = None,
    notes: str = "",
) -> dict:
    """One kernels.csv row; without a timing it records that the case was not measured, and `notes` why."""
    row = dict(
        bench=cfg.name,
        op=op,
        backend=backend,
        objective=objective,
        N=cfg.n,
        D=cfg.d,
        V=cfg.v,
        dtype=cfg.dtype,
        device=cfg.device,
        hardware=common.hardware(cfg.device),
        torch=torch.__version__,
        triton=common.version("triton"),
        liger=common.version("liger-kernel"),
        cce=common.version("cut-cross-entropy"),
        commit=common.git_commit(),
        run_id=common.run_id(),
        timestamp=common.timestamp(),
        notes=notes,
    )
    if timing is not None:
        med_s = timing.median / 1e3
        rate = flops.lm_head_flops(cfg.n, cfg.v, cfg.d) / med_s
        peak = flops.gpu_peak_flops(flops.device_name(cfg.device)) if cfg.device == "cuda" else None
        row.update(timing.row(), tokens_per_s=round(cfg.n / med_s, 1), tflops=float(f"{rate / 1e12:.4g}"))
        row["pct_peak"] = round(100 * rate / peak, 1) if peak else None
    if peak_mb is not None:
        row["peak_mem_mb"] = round(peak_mb, 1)
    if loss is not None:
        row["loss"] = f"{loss:.8g}"
    return row


# ---------------------------------------------------------------------------------------------
# pytest driver (make bench)
# ---------------------------------------------------------------------------------------------


def measure(benchmark, cfg: Config, op: str, backend: str, objective: str, run, reset) -> dict:
    meter = PeakMeter(cfg.device)
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    losses: list[torch.Tensor] = []

    def setup():
        reset()
        meter.start()

    times: list[float] = []

    def timed():
        t0 = time.perf_counter()
        losses.append(run())
        sync()
        times.append(time.perf_counter() - t0)
        meter.stop()

    benchmark.extra_info.update(config=cfg.name, op=op, backend=backend, objective=objective)
    benchmark.pedantic(timed, setup=setup, rounds=cfg.reps, warmup_rounds=cfg.warmup, iterations=1)
    # Our own clock (same rounds as pytest-benchmark's) also works under --benchmark-disable,
    # where pedantic runs the target once and records nothing; warm-up rounds come first.
    timing = common.Timing([t * 1e3 for t in (times[cfg.warmup :] or times)])
    peak = max(meter.peaks[cfg.warmup :] or meter.peaks)
    row = make_row(cfg, op, backend, objective, timing=timing, peak_mb=peak, loss=float(losses[-1]))
    benchmark.extra_info.update(peak_mem_mb=row["peak_mem_mb"], tokens_per_s=row["tokens_per_s"])
    common.append_csv(RESULTS_CSV, [row], CSV_FIELDS)
    return row


def _cfg_marks(cfg: Config):
    return [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")] if cfg.device == "cuda" else []


FUSED_CASES = [
    pytest.param(cfg, be, obj, id=f"{cfg.name}-{obj}-{be}", marks=_cfg_marks(cfg))
    for cfg in CONFIGS
    for obj in objectives_for(cfg)
    for be in methods_for(cfg, "fused_preference_loss", obj)
]
LOGPROB_CASES = [
    pytest.param(cfg, be, id=f"{cfg.name}-{be}", marks=_cfg_marks(cfg))
    for cfg in CONFIGS
    if not cfg.name.startswith("cpu-sweep")
    for be in methods_for(cfg, "linear_logprob", "")
]


@pytest.mark.parametrize("cfg,backend,objective", FUSED_CASES)
def test_fused_preference_loss(benchmark, cfg, backend, objective):
    reason = unavailable(cfg, backend)
    if reason:
        pytest.skip(reason)
    run, reset = measured_fn(cfg, "fused_preference_loss", backend, objective)
    measure(benchmark, cfg, "fused_preference_loss", backend, objective, run, reset)


@pytest.mark.parametrize("cfg,backend", LOGPROB_CASES)
def test_linear_logprob(benchmark, cfg, backend):
    run, reset = measured_fn(cfg, "linear_logprob", backend, "")
    measure(benchmark, cfg, "linear_logprob", backend, "", run, reset)


# ---------------------------------------------------------------------------------------------
# Case worker (make gpu-check)
# ---------------------------------------------------------------------------------------------


def case_id(case: dict) -> str:
    return "/".join((case["config"], case["op"], case["method"], case["objective"]))


def time_case(cfg: Config, run, reset, min_reps: int = common.MIN_REPS) -> tuple[common.Timing, float, float]:
    """(timing, peak MB, loss): warm-up, one untimed forward + backward measured for memory from a reset
    baseline, then `cfg.reps` timed ones (CUDA events around each on CUDA, so only GPU time of the
    repetition counts and no host sync sits inside the interval; a synced wall clock on CPU)."""
    if cfg.reps < min_reps:
        raise ValueError(f"config {cfg.name}: reps={cfg.reps}; at least {min_reps} timed repetitions are needed")
    for _ in range(cfg.warmup):
        reset()
        run()
    reset()
    meter = PeakMeter(cfg.device)
    meter.start()
    loss = float(run())  # the sync point that reads the value is outside every timed interval
    meter.stop()
    samples = []
    if cfg.device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(cfg.reps)]
        for start, end in events:
            reset()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(cfg.reps):
            reset()
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
    reset()
    return common.Timing(samples), meter.peaks[-1], loss


def _context_alive() -> bool:
    """False when the CUDA context is lost (after an illegal access every later call fails)."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context cannot be trusted
        return False


def print_plan(cases: list[dict]) -> None:
    """The row of every case before it runs (the orchestrator writes them for cases that never finish)."""
    plan = {case_id(c): make_row(config_by_name(c["config"]), c["op"], c["method"], c["objective"]) for c in cases}
    print(PLAN_TAG + json.dumps({"fields": CSV_FIELDS, "rows": plan}), flush=True)


def run_cases(cases: list[dict], csv_path: Path, min_reps: int = common.MIN_REPS) -> int:
    """Measure each case in order, one row each; returns CONTEXT_LOST_EXIT when the CUDA context died."""
    print_plan(cases)
    for case in cases:
        cid, cfg = case_id(case), config_by_name(case["config"])
        op, backend, objective = case["op"], case["method"], case["objective"]
        print(f"{CASE_TAG}{cid} start", flush=True)
        reason = unavailable(cfg, backend)
        if reason:
            row = make_row(cfg, op, backend, objective, notes=f"skipped: {reason}")
        else:
            run = reset = None
            try:
                run, reset = measured_fn(cfg, op, backend, objective)
                timing, peak, loss = time_case(cfg, run, reset, min_reps)
                row = make_row(cfg, op, backend, objective, timing=timing, peak_mb=peak, loss=loss)
            except torch.OutOfMemoryError as e:
                row = make_row(cfg, op, backend, objective, notes=f"failed: out of memory: {str(e).splitlines()[0]}")
            except Exception as e:  # noqa: BLE001 - a method that raises is a recorded result, not the end of the run
                first = (str(e).strip().splitlines() or [""])[0][:300]
                row = make_row(cfg, op, backend, objective, notes=f"failed: {type(e).__name__}: {first}")
                print(f"[bench_kernels] {cid}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                if reset is not None:
                    reset()  # the method's gradients go before the next case's inputs arrive
                run = reset = None
        common.append_csv(csv_path, [row], CSV_FIELDS)
        brief = {k: row.get(k) for k in ("time_ms_median", "peak_mem_mb", "notes")}
        print(f"{CASE_TAG}{cid} done {json.dumps(brief)}", flush=True)
        gc.collect()
        if cfg.device == "cuda":
            if not _context_alive():
                print(CONTEXT_LOST_TAG, flush=True)
                return CONTEXT_LOST_EXIT
            torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Kernel benchmark case worker (bench/gpu_check.py runs it).")
    p.add_argument("--cases", required=True, help='JSON list of {"config", "op", "method", "objective"}')
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results file (rows are appended)")
    p.add_argument("--min-reps", type=int, default=common.MIN_REPS, help=argparse.SUPPRESS)  # dry runs only
    p.add_argument("--plan-only", action="store_true", help="print the cases' row templates and measure nothing")
    args = p.parse_args(argv)
    cases = json.loads(args.cases)
    for c in cases:
        config_by_name(c["config"])  # unknown names fail here, before any measurement
    if args.plan_only:
        print_plan(cases)
        return 0
    return run_cases(cases, Path(args.csv), args.min_reps)


if __name__ == "__main__":
    raise SystemExit(main())
