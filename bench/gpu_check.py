"""`make gpu-check`: every GPU figure of the project from one command on one bare H100/H200 (<= 8 minutes).

Run:  python -m bench.gpu_check [--out DIR] [--wheels DIR] [--deadline 480] [--parts tests,kernels,train]
                               [--budget kernels=200,train=150] [--dry-run]
      python -m bench.gpu_check --import DIR   (append a finished check's rows to bench/results, regenerate
                                                BENCHMARKS.md)

Where this sits: the GPU end of bench/. It drives the existing benchmark code (bench/bench_kernels.py's case
worker, bench/bench_train.py's workers, bench/report.py) and the CUDA tests, each in child processes, on a
machine that has torch, triton, transformers and peft but no network: the packages it lacks (DeepSpeed, TRL
and datasets, Liger-Kernel, Cut Cross-Entropy and their small dependencies) come as wheels in .whl/
(`make gpu-wheels` fetches them beforehand). This process never imports torch, so it holds no GPU memory
while the parts measure.

Parts, in order, each with a time budget inside one global deadline (a part may use the time earlier parts
left unused; the nominal budgets of the parts after it stay reserved; a --deadline shorter than the budgets
scales them all down):
1. setup: installs the wheels into a temporary target directory (pip --no-index --no-deps; a wheel whose
   distribution is already installed at the same or a newer version is left out), then a probe process
   records versions (python, torch, CUDA, triton, transformers, peft, accelerate, every optional package and
   whether it imports), the GPU (name, compute capability, SMs, memory, driver), the attention
   implementation the end-to-end rows will use, and this card's two ceilings: a bf16 8192^3 cuBLAS matmul
   and a device-to-device copy (measured here, beside the data sheet's peak that % of peak divides by).
2. tests: `pytest -m cuda` over tests/ (tests/conftest.py marks every test that skips without CUDA), with
   a per-test timeout when pytest-timeout is there.
3. kernels: the fused loss forward + backward at the Llama-3-8B head (D 4096, V 128256, bf16, N 32768
   then 8192; DPO, DDPO, ORPO, DORPO): ours (triton backend), Liger-Kernel and Cut Cross-Entropy first,
   eager PyTorch last (the slowest; no target needs it).
   The worker is restarted after a crash or a lost CUDA context, and a case over its time limit is
   stopped; either way that case gets a row saying so and the rest go on.
4. train: one optimizer step of the Llama-3-8B-shaped model with 4 of its 32 layers (LoRA, then full
   fine-tuning): the engine (packed rows, reference cache) against TRL's DPOTrainer (reference forward,
   then precomputed reference), tokens/s, peak memory, MFU.
5. report: OUT/BENCHMARKS.md from the committed rows plus this run's (a preview: no plots), and a summary
   of every part and of issue #16's targets (met / NOT met / not measured), printed last.
Every planned row is written: measured, or with notes saying why not ("skipped: ..." for a missing wheel,
the wrong device or the part's time running out; "failed: ..." for an exception, an out-of-memory error or
a crash). A part that cannot run is recorded with its reason; nothing stops the parts after it.

Output folder (OUT_DIR; default bench/results/gpu-check-<run id>/, git-ignored; on the device, $OUT), at
most 8 files as the device tool brings back: env.json, runs.csv (one row per part), kernels.csv, train.csv
(the schemas of bench/results), BENCHMARKS.md, summary.md, gpu_check.log (everything every child printed).
To commit a run's rows: `python -m bench.gpu_check --import OUT_DIR` (refuses dry-run rows and a run
already imported), which appends them to bench/results/*.csv and regenerates BENCHMARKS.md.

Dry run (`--dry-run`, `make gpu-check DRY_RUN=1`): the same code on a CPU at tiny shapes, so CI checks the
plumbing: a dummy wheel (or --wheels DIR) installed and imported from the target, argument parsing, budgets
and skips, the kernel worker on the Triton interpreter, the engine and TRL workers on llama-tiny, CSV rows,
the report and the summary. Its run id and bench names start with "dryrun-": bench/report.py leaves such
rows out of BENCHMARKS.md and --import refuses them.
"""

from __future__ import annotations

import argparse
import base64
import collections
import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import bench_train, common, report  # noqa: E402

PROBE_TAG = "GPUCHECK-PROBE "
# Kept in step with bench/bench_kernels.py, which imports torch, so this process cannot import it
# (tests/test_gpu_check.py checks that the names and tags agree).
KERNEL_CONFIGS = ("gpu-8b-n32768", "gpu-8b-n8192")
KERNEL_DRY_RUN_CONFIG = "dryrun-cpu-head"
KERNEL_PLAN_TAG, KERNEL_CASE_TAG = "GPUCHECK-PLAN ", "GPUCHECK-CASE "
OBJECTIVES = ("dpo", "ddpo", "orpo", "dorpo")
# Liger-Kernel has no deviation-weighted losses (bench/report.py holds DDPO/DORPO to its DPO/ORPO).
LIGER_OBJECTIVES = ("dpo", "orpo")
# End-to-end jobs in priority order: each setup's engine row and TRL's default first, so a short budget
# still yields one complete comparison per setup.
TRAIN_JOBS = (
    ("gpu-8b4l-lora", "ddpo-engine", "packed+cache"),
    ("gpu-8b4l-lora", "trl", "ref_forward"),
    ("gpu-8b4l-full", "ddpo-engine", "packed+cache"),
    ("gpu-8b4l-full", "trl", "ref_forward"),
    ("gpu-8b4l-lora", "trl", "precomputed_ref"),
    ("gpu-8b4l-full", "trl", "precomputed_ref"),
)
TRAIN_DRY_RUN_JOBS = (("cpu-tiny-smoke", "ddpo-engine", "packed+cache"), ("cpu-tiny-smoke", "trl", "precomputed_ref"))
# (distribution, import name) of everything the setup part reports
PROBE_PACKAGES = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("deepspeed", "deepspeed"),
    ("pydantic", "pydantic"),
    ("datasets", "datasets"),
    ("trl", "trl"),
    ("liger-kernel", "liger_kernel"),
    ("cut-cross-entropy", "cut_cross_entropy"),
    ("flash-attn", "flash_attn"),
    ("numpy", "numpy"),
    ("pytest", "pytest"),
    ("pytest-timeout", "pytest_timeout"),
)
DUMMY_WHEEL = ("ddpo-gpu-check-probe", "ddpo_gpu_check_probe", "1.0")  # (distribution, import name, version)
OUT_FILES = ("env.json", "runs.csv", "kernels.csv", "train.csv", "BENCHMARKS.md", "summary.md", "gpu_check.log")
PARTS = ("setup", "tests", "kernels", "train")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Time limits of one mode, in seconds. Part budgets are nominal (see `allowed_seconds`)."""

    deadline: float
    budgets: dict
    report_reserve: float
    min_start: float  # a part with less than this left is skipped, not started
    kernel_case: float  # one kernel case, warm-up and compilation included
    train_job: float  # one end-to-end worker
    train_job_min: float  # no worker starts with less than this left in the part
    test_timeout: float  # one CUDA test (with pytest-timeout)
    min_reps: int


GPU_LIMITS = Limits(
    deadline=480,
    budgets={"setup": 45, "tests": 75, "kernels": 150, "train": 185},
    report_reserve=15,
    min_start=10,
    kernel_case=120,
    train_job=150,
    train_job_min=30,
    test_timeout=120,
    min_reps=common.MIN_REPS,
)
# A dry run takes about a minute on an idle CPU; its budgets only guard against a hang on a busy one.
DRY_RUN_LIMITS = Limits(
    deadline=900,
    budgets={"setup": 120, "tests": 180, "kernels": 180, "train": 360},
    report_reserve=30,
    min_start=5,
    kernel_case=120,
    train_job=300,
    train_job_min=5,
    test_timeout=120,
    min_reps=2,
)


def case_id(case: dict) -> str:
    """bench/bench_kernels.py's id of a case (it prints it in its progress lines)."""
    return "/".join((case["config"], case["op"], case["method"], case["objective"]))


def parse_budgets(text: str | None) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in PARTS or seconds < 0:
            raise ValueError(f"--budget {item!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        out[name] = seconds
    return out


def fit_budgets(budgets: dict, deadline: float, reserve: float) -> dict:
    """The parts' nominal budgets, scaled down in proportion when with the report's reserve they exceed the
    deadline (a shorter --deadline shortens every part instead of starving the first)."""
    total = sum(budgets.values())
    scale = min(1.0, max(deadline - reserve, 0.0) / total) if total else 1.0
    return {p: b * scale for p, b in budgets.items()}


def allowed_seconds(left: float, later_budgets: list[float], reserve: float) -> float:
    """Time a part may use: what is left before the deadline, less the nominal budgets of the parts after
    it and the report's reserve. Time that earlier parts did not use thus goes to the next part."""
    return left - sum(later_budgets) - reserve


# ------------------------------------------------------------------------------------------ wheels


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) from a wheel file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name (name-version-python-abi-platform.whl)")
    return canonical_name(parts[0]), parts[1]


def version_key(v: str):
    try:
        from packaging.version import Version

        return Version(v)
    except Exception:  # noqa: BLE001 - no packaging, or not a PEP 440 version: compare the numbers
        return tuple(int(x) for x in re.findall(r"\d+", v))


def choose_wheels(wheels: list[Path], installed) -> tuple[list[Path], list[str], list[str]]:
    """(wheels to install, notes on the distributions left to the machine, warnings).

    One wheel per distribution (the newest, with a warning: pip refuses two); none for a distribution
    that `installed(name)` reports at the same or a newer version (the machine's build is kept).
    """
    newest: dict[str, tuple[str, Path]] = {}
    warnings = []
    for w in wheels:
        name, ver = wheel_dist(w)
        if name in newest:
            keep = max((ver, w), newest[name], key=lambda x: version_key(x[0]))
            warnings.append(f"two wheels of {name} ({newest[name][1].name}, {w.name}): using {keep[1].name}")
            newest[name] = keep
        else:
            newest[name] = (ver, w)
    use, kept = [], []
    for name, (ver, w) in sorted(newest.items()):
        have = installed(name)
        if have and version_key(have) >= version_key(ver):
            kept.append(f"{name} {have} (the machine's; carried {ver})")
        else:
            use.append(w)
    return use, kept, warnings


def make_dummy_wheel(directory: Path) -> Path:
    """A minimal valid wheel (one module and its dist-info, RECORD hashed) for the dry run's install step."""
    dist, mod, ver = DUMMY_WHEEL
    info = f"{mod}-{ver}.dist-info"
    files = {
        f"{mod}/__init__.py": f'"""make gpu-check DRY_RUN=1 installs this to check its wheel step."""\nV = "{ver}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {ver}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench.gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    out = directory / f"{mod}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


# ------------------------------------------------------------------------------------------- probe


def probe(wheel_dists: list[str]) -> dict:
    """Versions, GPU, attention choice and measured ceilings (runs in a child process: it imports torch).

    wheel_dists: distributions just installed from wheels; each is reported with where it was found.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, distribution

    import torch

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform()}
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    packages = {}
    known = dict(PROBE_PACKAGES + (DUMMY_WHEEL[:2],))
    for dist in [d for d in wheel_dists if canonical_name(d) not in map(canonical_name, known)]:
        try:
            found = distribution(dist)
            packages[dist] = {"version": found.version, "import": "not checked", "location": str(found.locate_file(""))}
        except PackageNotFoundError:
            packages[dist] = {"version": "", "import": "not installed", "location": ""}
    wanted = PROBE_PACKAGES + ((DUMMY_WHEEL[:2],) if DUMMY_WHEEL[0] in wheel_dists else ())
    for dist, mod in wanted:
        entry = {"version": common.version(dist), "import": "not installed", "location": ""}
        if importlib.util.find_spec(mod) is not None:
            try:
                m = importlib.import_module(mod)
                entry["import"] = "ok"
                entry["location"] = str(Path(m.__file__).parent) if getattr(m, "__file__", None) else ""
            except Exception as e:  # noqa: BLE001 - the import error is what this records
                first = (str(e).strip().splitlines() or [""])[0][:200]
                entry["import"] = f"{type(e).__name__}: {first}"
        packages[dist] = entry
    info["packages"] = packages
    device = "cuda" if info["cuda_available"] else "cpu"
    info["gpu"] = gpu_info() if device == "cuda" else None
    from engine.model import resolve_attn_implementation

    info["attention"] = resolve_attn_implementation("auto", device)
    info["ceilings"] = measure_ceilings(device)
    info["environment"] = common.environment(device, packages=("torch", "triton", "transformers", "trl", "deepspeed"))
    return info


def gpu_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            driver = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "name": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
    }


def measure_ceilings(device: str) -> dict:
    """This machine's matmul rate and copy bandwidth (medians of 10 timed runs after 3 warm-ups, random data)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(2**28 if device == "cuda" else 2**22, device=device)  # 1 GiB (CPU: 16 MiB) of fp32
    dst = torch.empty_like(src)
    out = {"device": device, "matmul": f"{n}^3 {str(dtype).replace('torch.', '')}"}
    matmul, copy = _median_ms(lambda: a @ b, device), _median_ms(lambda: dst.copy_(src), device)
    out["matmul_tflops"] = round(2 * n**3 / (matmul / 1e3) / 1e12, 1)
    out["copy_gbps"] = round(2 * src.numel() * 4 / (copy / 1e3) / 1e9, 1)  # bytes read + written
    return out


def _median_ms(fn, device: str, reps: int = 10, warmup: int = 3) -> float:
    """Median time of fn: CUDA events around each call on a GPU (no host sync inside), a clock on a CPU."""
    import torch

    if device != "cuda":
        return common.time_fn(fn, reps=reps, warmup=warmup).median
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return common.Timing([start.elapsed_time(end) for start, end in events]).median


# ------------------------------------------------------------------------------------------ child


class Child:
    """A child process in its own session whose output lines a thread reads (so every wait can time out).

    Its own session lets a timeout stop it with everything it started; `Child.live` lets a SIGTERM of
    this process stop them too (a machine's tool kills this process's session, not theirs).
    """

    live: set = set()

    def __init__(self, cmd: list[str], env: dict, sink):
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        Child.live.add(self)
        self.lines: queue.Queue = queue.Queue()
        self.tail: collections.deque = collections.deque(maxlen=25)
        self.sink = sink
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)
        self.proc.wait()
        Child.live.discard(self)

    def next_line(self, timeout: float) -> str | None | bool:
        """The next line; None when none came within `timeout`; False at the end of the output."""
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            return False
        self.tail.append(line)
        self.sink(line)
        return line

    def stop(self) -> None:
        """SIGTERM the child's process group, then SIGKILL if it lingers."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()

    def tail_text(self, n: int = 6) -> str:
        return " | ".join(list(self.tail)[-n:])

    @classmethod
    def stop_all(cls, signum=None, frame=None) -> None:
        """SIGTERM handler: stop every live child's process group, then exit (rows written so far stay)."""
        for child in list(cls.live):
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise SystemExit(128 + (signum or 0))


# ------------------------------------------------------------------------------------------ check


@dataclasses.dataclass
class PartResult:
    status: str  # ok, partial (some rows not measured), skipped, failed, timeout
    reason: str = ""
    detail: str = ""  # key numbers for the summary
    seconds: float = 0.0
    budget: float = 0.0


class Check:
    """One run of the check: its output folder, log, deadline, and the parts' results."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.limits = DRY_RUN_LIMITS if self.dry else GPU_LIMITS
        self.budgets = {**self.limits.budgets, **parse_budgets(args.budget)}
        self.deadline = args.deadline if args.deadline is not None else self.limits.deadline
        wanted = [p.strip() for p in (args.parts or "tests,kernels,train").split(",") if p.strip()]
        unknown = sorted(set(wanted) - set(PARTS))
        if unknown:
            raise ValueError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS[1:])} (setup always runs)")
        self.parts = ["setup"] + [p for p in PARTS[1:] if p in wanted]
        self.budgets = fit_budgets({p: self.budgets[p] for p in self.parts}, self.deadline, self.limits.report_reserve)
        self.run_id = (report.DRY_RUN_PREFIX if self.dry else "") + common.new_run_id()
        self.mode = "gpu-check-dry-run" if self.dry else "gpu-check"
        out = Path(args.out).resolve() if args.out else common.RESULTS_DIR / f"gpu-check-{self.run_id}"
        if out == common.RESULTS_DIR.resolve():
            raise ValueError(f"--out {out} is bench/results itself: write to a new folder, then --import its rows")
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty: give a new or empty folder, so no other run's rows mix in")
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log_file = (out / "gpu_check.log").open("a", buffering=1)
        self.clock = time.monotonic  # the deadline's clock (tests substitute their own)
        self.t0 = self.clock()
        self.base_env = dict(os.environ)
        self.results: dict[str, PartResult] = {}
        self.probe: dict = {}
        self.env_record: dict = {"commit": common.git_commit(), "run_id": self.run_id}
        self.site: Path | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    # ---------------------------------------------------------------- logging and environment

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def say(self, msg: str) -> None:
        """A status line: to stdout and the log."""
        line = f"[gpu-check +{self.elapsed():4.0f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def log(self, text: str) -> None:
        """Child output: to the log only (stdout keeps the status lines and the summary)."""
        if text:
            self.log_file.write(text if text.endswith("\n") else text + "\n")

    def child_env(self) -> dict:
        env = dict(self.base_env)
        paths = [str(REPO), str(REPO / "kernels")] + ([str(self.site)] if self.site else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env[common.RUN_ID_ENV] = self.run_id
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
        if self.dry:
            env["TRITON_INTERPRET"] = "1"  # the Triton kernels run on the CPU through the interpreter
        else:
            env.pop("TRITON_INTERPRET", None)  # `make` exports 1 where there is no .venv: never on a GPU
        return env

    def use_env(self) -> None:
        """Make the child environment this process's own (bench_train.run_worker's children inherit it)."""
        os.environ.clear()
        os.environ.update(self.child_env())

    def allowed(self, part: str) -> float:
        later = [self.budgets[p] for p in self.parts[self.parts.index(part) + 1 :]]
        return allowed_seconds(self.deadline - self.elapsed(), later, self.limits.report_reserve)

    def record(self, part: str, res: PartResult, start: str) -> None:
        self.results[part] = res
        row = {
            "run_id": self.run_id,
            "mode": self.mode,
            "job": part,
            "csv": {"kernels": "kernels.csv", "train": "train.csv"}.get(part, ""),
            "status": res.status,
            "reason": res.reason,
            "start": start,
            "end": common.timestamp(),
            "seconds": round(res.seconds, 1),
            "commit": self.env_record.get("commit", ""),
            "hardware": self.env_record.get("hardware", ""),
        }
        common.append_csv(self.out / report.RUNS_CSV, [row], report.RUNS_FIELDS)
        self.say(f"{part}: {res.status} in {res.seconds:.0f} s" + (f": {res.reason}" if res.reason else ""))

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        budgets = ", ".join(f"{p} {self.budgets[p]:.0f} s" for p in self.parts)
        self.say(f"run {self.run_id} ({self.mode}) into {self.out}; deadline {self.deadline:.0f} s ({budgets})")
        self.use_env()
        previous = signal.signal(signal.SIGTERM, Child.stop_all)
        try:
            for part in self.parts:
                start, t = common.timestamp(), self.clock()
                budget = self.allowed(part)
                if budget < self.limits.min_start:
                    res = PartResult("skipped", f"the {self.deadline:.0f} s deadline left it {max(budget, 0):.0f} s")
                    self.write_unmeasured(part, f"skipped: {res.reason}")
                else:
                    self.say(f"{part}: starting (up to {budget:.0f} s)")
                    res = getattr(self, f"part_{part}")(budget)
                res.seconds, res.budget = self.clock() - t, max(budget, 0.0)
                self.record(part, res, start)
            self.write_report()
        finally:
            signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.log_file.close()
        return 1 if any(r.status == "failed" for r in self.results.values()) else 0

    def no_gpu_reason(self) -> str | None:
        if self.dry or self.probe.get("cuda_available"):
            return None
        if not self.probe:
            return "the setup probe gave no result (see gpu_check.log)"
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False); on a CPU machine use --dry-run"

    # ---------------------------------------------------------------- part 1: setup

    def part_setup(self, budget: float) -> PartResult:
        end = time.monotonic() + budget
        wheels = self.install_wheels(budget / 2)
        self.use_env()  # the install target is on PYTHONPATH from here on
        installed = [wheel_dist(Path(w))[0] for w in wheels.get("installed", [])]
        cmd = [sys.executable, "-m", "bench.gpu_check", "--probe", ",".join(installed)]
        child = Child(cmd, self.child_env(), self.log)
        found = None
        while (line := child.next_line(end - time.monotonic())) is not False:
            if line is None:
                child.stop()
                break
            if line.startswith(PROBE_TAG):
                found = json.loads(line[len(PROBE_TAG) :])
        child.proc.wait()
        info = {"run_id": self.run_id, "mode": self.mode, "deadline_s": self.deadline, "budgets_s": self.budgets}
        (self.out / "env.json").write_text(json.dumps({**info, "wheels": wheels, "probe": found}, indent=2) + "\n")
        if found is None:
            self.env_record["hardware"] = "unknown (the setup probe failed)"
            return PartResult("failed", f"the probe gave no result (exit {child.proc.returncode}): {child.tail_text()}")
        self.probe, self.env_record = found, found["environment"]
        pkgs = found["packages"]
        versions = [f"{d} {e['version'] or '-'} ({e['import']})" for d, e in pkgs.items()]
        self.say(f"setup: python {found['python']}, CUDA {found['torch_cuda']}; " + ", ".join(versions))
        broken = {d: e["import"] for d, e in pkgs.items() if e["import"] not in ("ok", "not installed", "not checked")}
        problems = [f"{d} does not import: {error}" for d, error in broken.items()]
        for dist in installed:  # each wheel must be what the children see, not the machine's copy
            location = next((e["location"] for d, e in pkgs.items() if canonical_name(d) == dist), "")
            if not location.startswith(str(self.site)):
                problems.append(f"{dist} was installed into {self.site} but is found at {location or 'no location'}")
        if not self.dry and not found["cuda_available"]:
            problems.append(self.no_gpu_reason())
        gpu, ceil = found.get("gpu"), found["ceilings"]
        detail = [
            f"torch {found['torch']} (CUDA {found['torch_cuda']}), triton {pkgs['triton']['version']}",
            f"{gpu['name']} ({gpu['capability']}, {gpu['sms']} SMs, {gpu['memory_gib']} GiB, driver {gpu['driver']})"
            if gpu
            else "no CUDA GPU",
            f"attention {found['attention']}",
            f"wheels: {len(wheels.get('installed', []))} installed, {len(wheels.get('kept', []))} kept",
            f"{ceil['matmul']} matmul {ceil['matmul_tflops']} TFLOP/s, copy {ceil['copy_gbps']} GB/s "
            f"({ceil['device']})",
        ]
        missing = [d for d, e in pkgs.items() if e["import"] == "not installed"]
        if missing:
            detail.append("not installed: " + ", ".join(missing))
        reason = "; ".join(([wheels["reason"]] if wheels.get("reason") else []) + problems)
        status = "failed" if wheels["status"] == "failed" else "partial" if reason else "ok"
        return PartResult(status, reason, "; ".join(detail))

    def install_wheels(self, timeout: float) -> dict:
        if self.args.wheels:
            wheel_dir = Path(self.args.wheels)
        elif self.dry:
            wheel_dir = self.scratch / "wheels"
            wheel_dir.mkdir()
            make_dummy_wheel(wheel_dir)
        else:
            wheel_dir = REPO / ".whl"
        wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
        if not wheels:
            reason = (
                f"no wheels in {wheel_dir}: rows needing DeepSpeed, TRL, Liger-Kernel or Cut Cross-Entropy are skipped "
                "(make gpu-wheels fetches them; carry .whl to the GPU machine)"
            )
            self.say(f"setup: {reason}")
            return {"status": "skipped", "reason": reason, "dir": str(wheel_dir)}
        try:
            use, kept, warnings = choose_wheels(wheels, common.version)
        except ValueError as e:
            return {"status": "failed", "reason": str(e), "dir": str(wheel_dir)}
        for w in warnings + [f"kept {k}" for k in kept]:
            self.say(f"setup: {w}")
        self.site = Path(self.args.site).resolve() if self.args.site else self.scratch / "site"
        self.site.mkdir(parents=True, exist_ok=True)
        info = {"status": "ok", "dir": str(wheel_dir), "site": str(self.site), "installed": [w.name for w in use]}
        info.update(kept=kept, warnings=warnings)
        if not use:
            return info
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
        cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, use)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**info, "status": "failed", "reason": f"pip install did not finish in {timeout:.0f} s"}
        self.log(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            return {**info, "status": "failed", "reason": f"pip install failed ({proc.returncode}): {tail}"}
        self.say(f"setup: installed {len(use)} wheels into {self.site}")
        return info

    # ---------------------------------------------------------------- part 2: CUDA tests

    def part_tests(self, budget: float) -> PartResult:
        reason = self.no_gpu_reason()
        if reason:
            return PartResult("skipped", reason)
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfE", "-p", "no:cacheprovider"]
        cmd.append("--continue-on-collection-errors")  # a module that cannot import here must not stop the rest
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append(f"--timeout={self.limits.test_timeout:.0f}")
        cmd += ["tests/test_kernels.py", "tests"]  # kernel tests first: a short budget cuts the others
        end = time.monotonic() + budget
        child = Child(cmd, self.child_env(), self.log)
        outcomes: dict[str, str] = {}
        uncollected, summary, stopped = [], "", False
        while (line := child.next_line(end - time.monotonic())) is not False:
            if line is None:
                stopped = True
                child.stop()
                break
            if m := re.match(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line):
                outcomes[m.group(1)] = m.group(2)
            elif m := re.match(r"^ERROR collecting (\S+)", line.strip("_ ")):
                uncollected.append(m.group(1))
            elif re.match(r"^=+ .* in [0-9.]+s", line):
                summary = line.strip("= ")
        rc = child.proc.wait()
        counts = collections.Counter(outcomes.values())
        failing = [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")]
        tally = ", ".join(f"{n} {o.lower()}" for o, n in sorted(counts.items())) or "no test finished"
        detail = summary or tally
        if failing:
            detail += "; failing: " + ", ".join(failing[:8]) + (" ..." if len(failing) > 8 else "")
        if uncollected:
            detail += "; not collected here: " + ", ".join(sorted(set(uncollected)))
        if stopped:
            why = f"stopped after its {budget:.0f} s ({tally} by then); the rest did not run"
            return PartResult("timeout", why, detail)
        if rc == 5:
            why = "no CUDA test was selected: is the cuda marking of tests/conftest.py intact?"
            return PartResult("failed", why, detail)
        if failing or (rc != 0 and not uncollected):
            return PartResult("failed", f"pytest exit {rc}: {len(failing)} CUDA tests failed", detail)
        if uncollected:
            return PartResult("partial", f"{len(set(uncollected))} test modules could not be collected here", detail)
        return PartResult("ok", "", detail)

    # ---------------------------------------------------------------- part 3: kernels

    def kernel_cases(self) -> list[dict]:
        """In priority order: what the targets compare (ours, Liger, CCE) at N 32768 then 8192, eager last
        (the slowest, and no target needs it), so a part that runs short loses the least."""
        configs = (KERNEL_DRY_RUN_CONFIG,) if self.dry else KERNEL_CONFIGS
        objectives = ("dpo", "dorpo") if self.dry else OBJECTIVES
        compared, eager = [], []
        for cfg in configs:
            for obj in objectives:
                case = {"config": cfg, "op": "fused_preference_loss", "objective": obj}
                methods = ["triton"] + (["liger"] if obj in LIGER_OBJECTIVES else []) + ["cce"]
                compared += [{**case, "method": m} for m in methods]
                eager.append({**case, "method": "eager"})
        return compared + eager

    def kernel_worker(self, cases: list[dict], *extra: str) -> Child:
        cmd = [sys.executable, "-m", "bench.bench_kernels", "--cases", json.dumps(cases)]
        cmd += ["--csv", str(self.out / "kernels.csv"), "--min-reps", str(self.limits.min_reps), *extra]
        return Child(cmd, self.child_env(), self.log)

    def kernel_templates(self, cases: list[dict]) -> tuple[list[str], dict]:
        """(fields, {case id: row}) from the worker's --plan-only, for rows of cases no worker finished."""
        child = self.kernel_worker(cases, "--plan-only")
        plan = None
        while (line := child.next_line(120)) not in (False, None):
            if line.startswith(KERNEL_PLAN_TAG):
                plan = json.loads(line[len(KERNEL_PLAN_TAG) :])
        if child.proc.poll() is None:
            child.stop()
        child.proc.wait()
        return (plan["fields"], plan["rows"]) if plan else ([], {})

    def part_kernels(self, budget: float) -> PartResult:
        reason = self.no_gpu_reason()
        if reason:
            self.write_unmeasured("kernels", f"skipped: {reason}")
            return PartResult("skipped", reason)
        end = time.monotonic() + budget
        cases = self.kernel_cases()
        pending = list(cases)
        closing: dict[str, str] = {}  # notes for the cases the worker did not finish, by case id
        templates: dict[str, dict] = {}  # every case's row as the first worker planned it
        fields: list[str] = []
        failure, attempts = "", len(cases) + 2
        for _ in range(attempts):  # one worker, restarted after each crash
            if not pending or time.monotonic() >= end:
                break
            child = self.kernel_worker(pending)
            current, started, planned, out_of_time = None, 0.0, False, False
            while True:
                limit = min(end, started + self.limits.kernel_case) if current else end
                line = child.next_line(limit - time.monotonic())
                if line is False:
                    break
                if line is None:  # the part's time or the case's limit ran out
                    child.stop()
                    out_of_time = limit == end
                    if current and out_of_time:
                        closing[current] = f"failed: stopped when the kernels part's {budget:.0f} s ran out"
                    elif current:
                        closing[current] = (
                            f"failed: exceeded the per-case limit of {self.limits.kernel_case:.0f} s "
                            "(a hang, or compilation slower than that)"
                        )
                    break
                if line.startswith(KERNEL_PLAN_TAG):
                    plan = json.loads(line[len(KERNEL_PLAN_TAG) :])
                    fields, planned = plan["fields"], True
                    templates = {**plan["rows"], **templates}
                elif line.startswith(KERNEL_CASE_TAG):
                    cid, _, rest = line[len(KERNEL_CASE_TAG) :].partition(" ")
                    if rest.startswith("start"):
                        current, started = cid, time.monotonic()
                    else:
                        pending = [c for c in pending if case_id(c) != cid]
                        current = None
                        self.say(f"kernels: {cid} {rest[len('done') :].strip()}")
            rc = child.proc.wait()
            if current:
                closing.setdefault(current, f"failed: the worker died (exit {rc}) in this case: {child.tail_text(3)}")
                pending = [c for c in pending if case_id(c) != current]
            if out_of_time or (rc == 0 and not pending):
                break
            if not planned:
                failure = f"the kernel worker exited with {rc} before its plan: {child.tail_text()}"
                break
            self.say(f"kernels: worker exited with {rc}; a new one takes the {len(pending)} remaining cases")
        if failure:
            leftover = f"skipped: {failure}"
        elif pending and time.monotonic() < end:
            leftover = f"skipped: the kernel worker was started {attempts} times without finishing"
        else:
            leftover = f"skipped: the kernels part's {budget:.0f} s ran out before this case"
        for c in pending:
            closing.setdefault(case_id(c), leftover)
        if closing:
            self.write_kernel_rows(cases, closing, fields, templates)
        return self.rows_result("kernels", len(cases), failure)

    def write_kernel_rows(self, cases: list[dict], notes: dict[str, str], fields=(), templates=None) -> None:
        """Rows for cases no worker finished, from the worker's plan (asked for anew if none was seen)."""
        templates = templates or {}
        if any(cid not in templates for cid in notes):
            fields, templates = self.kernel_templates([c for c in cases if case_id(c) in notes])
        now = common.timestamp()
        rows = [{**templates[cid], "timestamp": now, "notes": n} for cid, n in notes.items() if cid in templates]
        if rows:
            common.append_csv(self.out / "kernels.csv", rows, fields)

    # ---------------------------------------------------------------- part 4: end-to-end

    def train_jobs(self) -> list[tuple]:
        jobs = []
        for name, system, variant in TRAIN_DRY_RUN_JOBS if self.dry else TRAIN_JOBS:
            s = bench_train.SETUPS[name]
            if self.dry:
                s = dataclasses.replace(s, reps=self.limits.min_reps, warmup=1)
            jobs.append((s, system, variant))
        return jobs

    def train_row(self, s, system: str, variant: str, notes: str = "") -> dict:
        row = bench_train.base_row(s, system, variant, self.env_record)
        if self.dry:
            row["bench"] = report.DRY_RUN_PREFIX + row["bench"]
        return {**row, "notes": notes} if notes else row

    def part_train(self, budget: float) -> PartResult:
        jobs = self.train_jobs()
        csv_path = self.out / "train.csv"
        reason = self.no_gpu_reason()
        if reason:
            self.write_unmeasured("train", f"skipped: {reason}")
            return PartResult("skipped", reason)
        end = time.monotonic() + budget
        work = self.scratch / "train"
        cache_dir, data_cache = str(work / "ref_cache"), str(work / "data")
        cache: dict | None = None  # one reference cache for every setup (same model and pairs)
        for s, system, variant in jobs:
            row = self.train_row(s, system, variant)
            label = f"{s.name} {system} {variant}"
            uses_cache = system == bench_train.ENGINE and not variant.endswith("on_the_fly")
            if uses_cache and cache is None and end - time.monotonic() >= self.limits.train_job_min:
                self.say("train: building the reference cache (shared by every setup: same model and pairs)")
                cache = self.train_worker(s, "cache", "build", cache_dir, data_cache, end)
            left = end - time.monotonic()
            if left < self.limits.train_job_min:
                row["notes"] = (
                    f"skipped: the train part's {budget:.0f} s ran out ({left:.0f} s left; "
                    f"a worker needs about {self.limits.train_job_min:.0f} s)"
                )
            else:
                if uses_cache and "error" in cache:
                    row["notes"] = f"failed: the reference cache build failed: {cache['error']}"
                else:
                    self.say(f"train: {label}")
                    r = self.train_worker(s, system, variant, cache_dir, data_cache, end)
                    if "error" in r:
                        row["notes"] = f"failed: {r['error']}"
                    else:
                        if uses_cache:
                            r["notes"] += f"; cache built once before training in {cache['build_s']:.1f} s"
                        row.update(r)
            common.append_csv(csv_path, [row], bench_train.FIELDS)
            if row.get("tokens_per_s"):
                mfu = f", MFU {row['mfu']:.3f}" if row.get("mfu") else ""
                brief = f"{row['tokens_per_s']:.0f} tokens/s, peak {row['peak_mem_mb']:.0f} MB{mfu}"
            else:
                brief = row["notes"][:300]
            self.say(f"train: {label}: {brief}")
        shutil.rmtree(work, ignore_errors=True)
        return self.rows_result("train", len(jobs), "")

    def train_worker(self, s, system: str, variant: str, cache_dir: str, data_cache: str, end: float) -> dict:
        timeout = max(1.0, min(self.limits.train_job, end - time.monotonic()))
        echo = lambda text: self.log(f"----- {s.name} {system} {variant}\n{text}")  # noqa: E731
        min_reps = self.limits.min_reps
        return bench_train.run_worker(s, system, variant, cache_dir, data_cache, timeout, min_reps, echo=echo)

    # ---------------------------------------------------------------- rows, report, summary

    def rows_result(self, part: str, planned: int, failure: str) -> PartResult:
        rows = self.this_run_rows(part)
        timing = "step_time_ms_median" if part == "train" else "time_ms_median"
        timed = [r for r in rows if r.get(timing)]
        untimed = [r for r in rows if not r.get(timing)]
        detail = f"{len(rows)} of {planned} rows, {len(timed)} measured"
        if untimed:
            kinds = collections.Counter((r.get("notes") or "no notes").split(":")[0] for r in untimed)
            detail += " (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
        if failure:
            return PartResult("failed", failure, detail)
        if not timed:
            why = "; ".join(sorted({(r.get("notes") or "")[:160] for r in untimed}))
            skipped = all((r.get("notes") or "").startswith("skipped:") for r in untimed)
            return PartResult("skipped" if skipped else "failed", f"no row was measured: {why}", detail)
        if untimed or len(rows) < planned:
            return PartResult("partial", f"{planned - len(timed)} rows not measured (their notes say why)", detail)
        return PartResult("ok", "", detail)

    def write_unmeasured(self, part: str, notes: str) -> None:
        """A row for every planned case of a part that did not run, saying why."""
        if part == "train":
            rows = [self.train_row(*job, notes=notes) for job in self.train_jobs()]
            common.append_csv(self.out / "train.csv", rows, bench_train.FIELDS)
        elif part == "kernels":
            cases = self.kernel_cases()
            self.write_kernel_rows(cases, {case_id(c): notes for c in cases})

    def this_run_rows(self, stem: str) -> list[dict]:
        path = self.out / f"{stem}.csv"
        rows = [r for r in common.read_csv(path) if r.get("run_id") == self.run_id] if path.exists() else []
        report.attribute_runs(stem, rows, [])
        return rows

    def write_report(self) -> None:
        preview = self.scratch / "results"
        preview.mkdir()
        for p in common.RESULTS_DIR.glob("*.csv"):
            shutil.copy(p, preview / p.name)
        for name in ("kernels.csv", "train.csv", report.RUNS_CSV):
            src = self.out / name
            if not src.exists():
                continue
            with src.open(newline="") as f:
                fields = next(csv.reader(f), [])
            try:
                common.append_csv(preview / name, common.read_csv(src), fields)
            except ValueError as e:  # the committed file has another schema: preview this run's rows alone
                self.say(f"report: {name}: {e}")
                shutil.copy(src, preview / name)
        report.render(preview, self.out / "BENCHMARKS.md", plots=False, include_dry_run=self.dry)
        summary = self.summary()
        (self.out / "summary.md").write_text(summary + "\n")
        self.log(summary)
        files = sorted(p.name for p in self.out.iterdir())
        stray = sorted(set(files) - set(OUT_FILES))
        if stray:  # the device tool brings back 8 files at most: nothing else may land here
            self.say(f"report: unexpected files in {self.out}: {stray}")
        print(f"{summary}\n\nWrote {len(files)} files to {self.out}: {', '.join(files)}", flush=True)

    def summary(self) -> str:
        """Rows first, then the targets and the parts: the device tool keeps the end of the output."""
        kind = " DRY RUN (plumbing on a CPU; nothing here is a measurement)" if self.dry else ""
        md = [f"# make gpu-check{kind}: run {self.run_id}", ""]
        md += [
            f"{self.env_record.get('hardware', '?')}; commit {self.env_record.get('commit', '?')}; "
            f"{self.elapsed():.0f} s of the {self.deadline:.0f} s deadline."
        ]
        kernel_rows, train_rows = self.this_run_rows("kernels"), self.this_run_rows("train")
        if kernel_rows:
            md += [
                "",
                "Kernel rows, fused loss forward + backward (loss vs eager: relative difference from the eager "
                "row's loss for the same config and objective):",
                "",
            ]
            md += ["| config | objective | method | ms | TFLOP/s | % peak | peak MB | loss vs eager | notes |"]
            md += ["|---|---|---|---|---|---|---|---|---|"]
            md += [self.kernel_line(r, kernel_rows) for r in kernel_rows]
        if train_rows:
            md += ["", "End-to-end rows, one optimizer step:", ""]
            md += ["| setup | system | variant | ms/step | tokens/s | peak MB | MFU | notes |"]
            md += ["|---|---|---|---|---|---|---|---|"]
            md += [
                f"| {r['bench']} | {r['system']} | {r['variant']} | {r.get('step_time_ms_median') or '-'} | "
                f"{r.get('tokens_per_s') or '-'} | {r.get('peak_mem_mb') or '-'} | {r.get('mfu') or '-'} | "
                f"{(r.get('notes') or '')[:160]} |"
                for r in train_rows
            ]
        checks = report.gpu_targets(kernel_rows, train_rows)
        n = collections.Counter(c["status"] for c in checks)
        note = " (a dry run measures none)" if self.dry else ""
        tally = f"{n['met']} met, {n['NOT met']} NOT met, {n['not measured']} not measured{note}"
        md += ["", f"Targets of issue #16: {tally}.", ""]
        md += ["| status | target | goal | measured | source |", "|---|---|---|---|---|"]
        md += [f"| {c['status']} | {c['target']} | {c['goal']} | {c['measured']} | {c['source']} |" for c in checks]
        md += ["", "Parts:", "", "| part | status | seconds | budget | detail | reason |", "|---|---|---|---|---|---|"]
        md += [
            f"| {p} | {r.status} | {r.seconds:.0f} | {r.budget:.0f} | {r.detail} | {r.reason} |"
            for p, r in self.results.items()
        ]
        return "\n".join(md)

    @staticmethod
    def kernel_line(r: dict, rows: list[dict]) -> str:
        key = (r["bench"], r["objective"], "eager")
        eager = next((x for x in rows if (x["bench"], x["objective"], x["backend"]) == key), None)
        diff = "-"
        if eager is not None and eager is not r and eager.get("loss") and r.get("loss"):
            a, b = float(r["loss"]), float(eager["loss"])
            diff = f"{abs(a - b) / max(abs(b), 1e-12):.1e}"
        cells = [r["bench"], r["objective"], r["backend"], r.get("time_ms_median"), r.get("tflops"), r.get("pct_peak")]
        cells += [r.get("peak_mem_mb"), diff, (r.get("notes") or "")[:160]]
        return "| " + " | ".join(str(c) if c else "-" for c in cells) + " |"


# ------------------------------------------------------------------------------------------ import


def import_rows(src: Path, results_dir: Path | None = None, out: Path | None = None) -> int:
    """Append a finished check's rows to bench/results (every file checked before any is written) and
    regenerate BENCHMARKS.md."""
    results_dir, out = results_dir or common.RESULTS_DIR, out or report.OUT
    plan = []
    for name in ("kernels.csv", "train.csv", report.RUNS_CSV):
        path = src / name
        if not path.exists():
            continue
        rows = common.read_csv(path)
        with path.open(newline="") as f:
            fields = next(csv.reader(f), [])
        if any(report.is_dry_run(r) for r in rows):
            raise SystemExit(f"{path} holds dry-run rows ({report.DRY_RUN_PREFIX}...): a dry run measures nothing")
        target = results_dir / name
        if target.exists():
            with target.open(newline="") as f:
                have = next(csv.reader(f), [])
            if have != fields:
                raise SystemExit(f"{path} has columns {fields}, {target} has {have}: regenerate one of them first")
            ids = {r.get("run_id") for r in rows} - {"", None}
            dup = sorted(ids & {r.get("run_id") for r in common.read_csv(target)})
            if dup:
                raise SystemExit(f"{target} already holds the rows of run(s) {dup}; nothing was imported")
        plan.append((target, rows, fields))
    if not plan:
        raise SystemExit(f"{src} holds none of kernels.csv, train.csv, runs.csv: give a make gpu-check output folder")
    for target, rows, fields in plan:
        common.append_csv(target, rows, fields)
        print(f"appended {len(rows)} rows to {target}")
    report.render(results_dir, out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="check the plumbing on a CPU at tiny shapes (CI runs this)")
    p.add_argument("--out", default=None, help="new or empty output folder (default bench/results/gpu-check-<run id>/)")
    p.add_argument("--wheels", default=None, help="folder of wheels to install (default .whl; --dry-run: a dummy)")
    p.add_argument("--site", default=None, help="install target of the wheels (default: a temporary folder)")
    p.add_argument("--deadline", type=float, default=None, help="seconds for everything (default 480; --dry-run: 900)")
    p.add_argument("--parts", default=None, help="comma list of parts after setup: tests, kernels, train (default all)")
    p.add_argument("--budget", default=None, help="nominal part budgets in seconds, e.g. kernels=200,train=150")
    p.add_argument(
        "--import",
        dest="import_dir",
        default=None,
        help="append the rows of a finished check's output folder to bench/results and regenerate BENCHMARKS.md",
    )
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: comma list of installed wheels
    args = p.parse_args(argv)
    if args.probe is not None:
        print(PROBE_TAG + json.dumps(probe([d for d in args.probe.split(",") if d])), flush=True)
        return 0
    if args.import_dir:
        return import_rows(Path(args.import_dir))
    try:
        check = Check(args)
    except ValueError as e:
        p.error(str(e))
    return check.run()


if __name__ == "__main__":
    raise SystemExit(main())
