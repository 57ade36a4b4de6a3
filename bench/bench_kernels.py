"""Microbenchmarks of the fused LM-head ops: time and peak memory of forward + backward.

Run:  pytest bench/bench_kernels.py --benchmark-json bench/results/kernels.json  [-k cpu-small]
Every benchmark also appends one row to bench/results/kernels.csv (the source of every figure in
BENCHMARKS.md): bench, op, backend, objective, N, D, V, dtype, device, time_ms median/p10/p90,
reps, peak_mem_mb, tokens_per_s, hardware and versions, commit, timestamp.

What is compared, on identical packed batches (P pairs, each sequence T tokens of which the first
`prompt` are prompt tokens with ignored targets):
- op "fused_preference_loss": our backends (eager reference, chunked torch, triton on CUDA) and
  Liger-Kernel's chunked preference losses (LigerFusedLinearDPOLoss with use_ref_model=False, i.e.
  reference log-probs of 0, and LigerFusedLinearORPOLoss); Cut Cross-Entropy + a separate loss
  when the `cut_cross_entropy` package is installed (CUDA only).
- op "linear_logprob": per-sequence log-probs with a random upstream gradient, our backends.
Peak memory is the increase over the inputs during one forward + backward (parameter gradients
included, identical for every method): on CUDA torch.cuda.max_memory_allocated; on CPU the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before each
round), which counts every allocator, torch's and the libraries' alike.
CPU configs: "cpu-small" (timing, 10 reps) and "cpu-target" (N=8192, D=512, V=32000, the
memory target of the issue; one timed rep because one eager fwd+bwd takes ~30 s on 2 cores).
GPU config "gpu-8b": Llama-3-8B head (D=4096, V=128256), 16 pairs x 1024 tokens, bf16.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import append_csv  # noqa: E402
from bench.common import git_commit as _git_commit  # noqa: E402
from bench.common import hardware as _hardware  # noqa: E402
from bench.common import version as _version  # noqa: E402
from engine.losses import loss_epilogue, preference_loss  # noqa: E402
from ddpo_kernels import LossSchedule, fused_preference_loss, linear_logprob  # noqa: E402

RESULTS_CSV = REPO / "bench" / "results" / "kernels.csv"
CSV_FIELDS = [
    "bench", "op", "backend", "objective", "N", "D", "V", "dtype", "device",
    "time_ms_median", "time_ms_p10", "time_ms_p90", "reps", "peak_mem_mb", "tokens_per_s",
    "hardware", "torch", "triton", "liger", "commit", "timestamp",
]  # fmt: skip
IGNORE = -100
HAS_CUDA = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    pairs: int
    seq_len: int  # tokens per sequence (chosen and rejected alike)
    prompt: int  # leading prompt tokens per sequence, targets ignored
    d: int
    v: int
    dtype: torch.dtype
    device: str
    reps: int
    warmup: int

    @property
    def n(self) -> int:
        return 2 * self.pairs * self.seq_len


CONFIGS = [
    Config("cpu-small", pairs=4, seq_len=256, prompt=32, d=256, v=8000, dtype=torch.float32, device="cpu", reps=10, warmup=1),
    Config("cpu-target", pairs=8, seq_len=512, prompt=64, d=512, v=32000, dtype=torch.float32, device="cpu", reps=1, warmup=0),
    Config("gpu-8b", pairs=16, seq_len=512, prompt=64, d=4096, v=128256, dtype=torch.bfloat16, device="cuda", reps=10, warmup=2),
    # Sweeps for the report's plots (eager vs torch only, to stay inside make bench's budget): tokens N
    # at fixed D, V; then vocabulary V at fixed N, D (the n512 point is also the V=8000 point).
    *[Config(f"cpu-sweep-n{2 * 4 * t}", pairs=4, seq_len=t, prompt=8, d=128, v=8000, dtype=torch.float32, device="cpu",
             reps=10, warmup=1) for t in (32, 64, 128, 256)],
    *[Config(f"cpu-sweep-v{v}", pairs=4, seq_len=64, prompt=8, d=128, v=v, dtype=torch.float32, device="cpu",
             reps=10, warmup=1) for v in (2000, 16000, 32000)],
]  # fmt: skip


def _cfg_param(cfg: Config):
    marks = [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")] if cfg.device == "cuda" else []
    return pytest.param(cfg, id=cfg.name, marks=marks)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


_INPUTS: dict[str, dict] = {}


def make_inputs(cfg: Config) -> dict:
    """A packed batch laid out as Liger expects ([2P, T]: all chosen rows, then all rejected rows)."""
    if cfg.name in _INPUTS:
        return _INPUTS[cfg.name]
    _INPUTS.clear()  # one config's tensors at a time keeps the host/GPU footprint bounded
    g = torch.Generator().manual_seed(0)
    rows, t, d, v, p = 2 * cfg.pairs, cfg.seq_len, cfg.d, cfg.v, cfg.pairs
    targets = torch.randint(0, v, (rows, t), generator=g)
    targets[:, : cfg.prompt] = IGNORE
    targets[:, -1] = IGNORE  # sequence boundary
    hidden = torch.randn(rows * t, d, generator=g).to(cfg.dtype)
    weight = (torch.randn(v, d, generator=g) * d**-0.5).to(cfg.dtype)
    dev = cfg.device
    inputs = dict(
        hidden=hidden.to(dev),
        weight=weight.to(dev),
        targets=targets.reshape(-1).to(dev),
        targets_2d=targets.to(dev),
        segment_ids=torch.arange(rows).repeat_interleave(t).to(dev),
        chosen=torch.arange(p).to(dev),
        rejected=torch.arange(p, 2 * p).to(dev),
        ref_chosen=torch.zeros(p, device=dev),
        ref_rejected=torch.zeros(p, device=dev),
        grad_seq=torch.randn(rows, generator=g).to(dev),
    )
    _INPUTS[cfg.name] = inputs
    return inputs


# ---------------------------------------------------------------------------------------------
# The measured functions: forward + backward of one method
# ---------------------------------------------------------------------------------------------


def _fused_fn(cfg: Config, inp: dict, backend: str, objective: str):
    beta = 0.1 if objective == "dpo" else 0.25
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
            mod(w, h3, inp["targets_2d"])[0].backward()

    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def run():
            nll = linear_cross_entropy(h, w, inp["targets"], ignore_index=IGNORE, reduction="none")
            mask = inp["targets"] != IGNORE
            seq = torch.zeros(2 * cfg.pairs, device=h.device).index_add(0, inp["segment_ids"], -nll.float() * mask)
            cnt = torch.bincount(inp["segment_ids"][mask], minlength=2 * cfg.pairs)
            c, r = inp["chosen"], inp["rejected"]
            preference_loss(
                objective, seq[c], seq[r], cnt[c], cnt[r], beta=beta,
                ref_chosen_logps=inp["ref_chosen"], ref_rejected_logps=inp["ref_rejected"],
            ).loss.backward()  # fmt: skip

    else:
        # Built once, as the trainer's collate does on the CPU: the timed step is the loss alone.
        schedule = LossSchedule.for_pairs(
            inp["targets"].cpu(), inp["segment_ids"].cpu(), inp["chosen"].cpu(), inp["rejected"].cpu()
        ).to(h.device)
        epilogue = loss_epilogue(
            objective, beta=beta, ref_chosen_logps=inp["ref_chosen"], ref_rejected_logps=inp["ref_rejected"]
        )

        def run():
            fused_preference_loss(
                h, w, inp["targets"], inp["segment_ids"], inp["chosen"], inp["rejected"], epilogue, backend=backend,
                schedule=schedule,
            ).backward()  # fmt: skip

    def reset():
        h.grad = None
        w.grad = None

    return run, reset


def _logprob_fn(cfg: Config, inp: dict, backend: str):
    h = inp["hidden"].detach().requires_grad_()
    w = inp["weight"].detach().requires_grad_()

    def run():
        seq, _ = linear_logprob(h, w, inp["targets"], inp["segment_ids"], 2 * cfg.pairs, backend=backend)
        (seq * inp["grad_seq"]).sum().backward()

    def reset():
        h.grad = None
        w.grad = None

    return run, reset


# ---------------------------------------------------------------------------------------------
# Memory, environment, CSV
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










def measure(benchmark, cfg: Config, op: str, backend: str, objective: str, run, reset) -> dict:
    meter = PeakMeter(cfg.device)
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)

    def setup():
        reset()
        meter.start()

    times: list[float] = []

    def timed():
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
        meter.stop()

    benchmark.extra_info.update(config=cfg.name, op=op, backend=backend, objective=objective)
    benchmark.pedantic(timed, setup=setup, rounds=cfg.reps, warmup_rounds=cfg.warmup, iterations=1)
    # Our own clock (same rounds as pytest-benchmark's) also works under --benchmark-disable,
    # where pedantic runs the target once and records nothing; warm-up rounds come first.
    data = np.asarray(times[cfg.warmup :] or times)
    med, p10, p90 = (float(np.quantile(data, q)) * 1e3 for q in (0.5, 0.1, 0.9))
    peak = max(meter.peaks[cfg.warmup :] or meter.peaks)
    row = dict(
        bench=cfg.name, op=op, backend=backend, objective=objective, N=cfg.n, D=cfg.d, V=cfg.v,
        dtype=str(cfg.dtype).replace("torch.", ""), device=cfg.device,
        time_ms_median=round(med, 3), time_ms_p10=round(p10, 3), time_ms_p90=round(p90, 3), reps=int(data.size),
        peak_mem_mb=round(peak, 1), tokens_per_s=round(cfg.n / (med / 1e3), 1),
        hardware=_hardware(cfg.device), torch=torch.__version__, triton=_version("triton"),
        liger=_version("liger-kernel"), commit=_git_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip
    benchmark.extra_info.update(peak_mem_mb=row["peak_mem_mb"], tokens_per_s=row["tokens_per_s"])
    append_csv(RESULTS_CSV, [row], CSV_FIELDS)
    return row


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def _backends(cfg: Config, with_baselines: bool) -> list[str]:
    out = ["eager", "torch"] + (["triton"] if cfg.device == "cuda" else [])
    if with_baselines and not cfg.name.startswith("cpu-sweep"):
        out.append("liger")
        if cfg.device == "cuda" and _version("cut-cross-entropy"):
            out.append("cce")
    return out


FUSED_CASES = [
    pytest.param(cfg, be, obj, id=f"{cfg.name}-{obj}-{be}", marks=_cfg_param(cfg).marks)
    for cfg in CONFIGS
    for obj in (("dpo", "orpo") if cfg.name in ("cpu-small", "gpu-8b") else ("dpo",))
    for be in _backends(cfg, with_baselines=True)
]
LOGPROB_CASES = [
    pytest.param(cfg, be, id=f"{cfg.name}-{be}", marks=_cfg_param(cfg).marks)
    for cfg in CONFIGS
    if not cfg.name.startswith("cpu-sweep")
    for be in _backends(cfg, with_baselines=False)
]


@pytest.mark.parametrize("cfg,backend,objective", FUSED_CASES)
def test_fused_preference_loss(benchmark, cfg, backend, objective):
    inp = make_inputs(cfg)
    run, reset = _fused_fn(cfg, inp, backend, objective)
    measure(benchmark, cfg, "fused_preference_loss", backend, objective, run, reset)


@pytest.mark.parametrize("cfg,backend", LOGPROB_CASES)
def test_linear_logprob(benchmark, cfg, backend):
    inp = make_inputs(cfg)
    run, reset = _logprob_fn(cfg, inp, backend)
    measure(benchmark, cfg, "linear_logprob", backend, "", run, reset)
