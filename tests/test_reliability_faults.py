"""Faults from outside: SIGKILL at random points, SIGTERM/SIGINT at every stage, two processes on one run.

Every run here is a real `engine.train` process wrapped by HARNESS, which observes progress points
(file writes and renames, training steps, DeepSpeed's checkpoint files, stage entry points) by
wrapping the functions that make them, and kills or signals its own process at a chosen one. The
engine has no test hooks: the faults are injected from outside it, at exact, reproducible points.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.refcache import RefCache
from tests.tiny_run import TINY_RUN, argv

REPO = Path(__file__).resolve().parent.parent

# argv: spec (JSON) then the engine.train arguments. The spec names `root` (paths in event ids are
# relative to it), optionally `trace` (a file each event id is appended to), `kill` (an event id at
# which the process SIGKILLs itself), `signals` ([event id, signum, seconds to wait after it] sent to
# itself; then the real function runs on, as a signal from outside would find it), `signal_log` (a
# file the time of each signal is written to), `rows_per_part` (reference-cache part size).
HARNESS = r"""
import json, os, re, signal, sys, time
spec = json.loads(sys.argv[1])
sys.argv = [sys.argv[0]] + sys.argv[2:]
import torch
import engine.data, engine.fileio as fileio, engine.refcache.build as build, engine.train as T

root = os.path.realpath(spec["root"])
hits = {}

def event(eid):
    eid = re.sub(r"shard-[0-9a-f]{32}", "shard-*", re.sub(r"\.(old|tmp)\.\d+", r".\1", eid))
    if spec.get("trace"):
        with open(spec["trace"], "a") as f:
            f.write(eid + "\n")
    if eid == spec.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    for i, (at, signum, wait) in enumerate(spec.get("signals", [])):
        if eid == at and i not in hits:
            hits[i] = True
            with open(spec["signal_log"], "a") as f:
                f.write(f"{time.time()}\n")
            os.kill(os.getpid(), signum)
            time.sleep(wait)

def rel(path):
    return os.path.relpath(os.path.realpath(os.fspath(path)), root)

def wrap(owner, name, make_id):
    real = getattr(owner, name)
    def wrapped(*a, **k):
        eid = make_id(*a, **k)
        if eid:
            event(eid)
        return real(*a, **k)
    setattr(owner, name, wrapped)

wrap(fileio, "temp_name", lambda path: "write:" + rel(path))  # atomic_write's first act
wrap(os, "replace", lambda src, dst: "replace:" + rel(dst))  # the publishing rename
wrap(torch, "save", lambda obj, f, *a, **k: "torch.save:" + rel(f) if isinstance(f, (str, os.PathLike)) else None)
wrap(T, "train_step", lambda run, stream: f"step:{run.state['step'] + 1}")
wrap(engine.data, "prepare_data", lambda *a, **k: "stage:data")
wrap(build, "_compute_part", lambda *a, **k: "stage:cache")
wrap(T, "export", lambda *a, **k: "stage:export")
wrap(T, "evaluate_after_training", lambda *a, **k: "stage:eval")
if spec.get("rows_per_part"):
    build.ROWS_PER_PART = spec["rows_per_part"]
T.main()
"""

TINY = argv({**TINY_RUN, "logging.tensorboard": False, "checkpoint.resume": "auto"})


def _env() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _args(root: Path, *extra) -> list[str]:
    """Outputs and caches under `root`, so that two lineages share nothing."""
    return TINY + [
        "--logging.output_dir",
        str(root / "runs"),
        "--logging.run_name",
        "run",
        "--data.cache_dir",
        str(root / "cache"),
        "--deviation.cache_dir",
        str(root / "emb"),
        *map(str, extra),
    ]


def _launch(root: Path, args: list[str], **spec) -> subprocess.Popen:
    spec = {"root": str(root), "signal_log": str(root / "signals.log"), **spec}
    return subprocess.Popen(
        [sys.executable, "-c", HARNESS, json.dumps(spec), *args],
        cwd=root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(root: Path, args: list[str], **spec) -> subprocess.CompletedProcess:
    proc = _launch(root, args, **spec)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]


def _category(eid: str) -> str | None:
    if eid.startswith("step:"):
        return "training"
    if "/checkpoints/" in eid:
        return "checkpoint"
    if "/ref_cache/" in eid:
        return "cache build"
    if eid.startswith(("write:", "replace:")) and (
        eid.split(":", 1)[1].startswith(("cache/", "emb/")) or eid.endswith(("data_report.json", "run/config.yaml"))
    ):
        return "data prep"
    return None


@pytest.mark.slow
def test_sigkill_at_ten_random_points_then_resume_gives_the_uninterrupted_run(tmp_path):
    """Done-when of #17: SIGKILL at 10 random points across data preparation, the reference-cache build,
    training and checkpoint writes; resume after each; the per-step losses equal those of an
    uninterrupted run, every step is logged once, the summary covers the whole run (table row 6), and
    the cache verifies and equals the uninterrupted run's byte for byte."""
    args = [
        "--loss.objective",
        "ddpo",
        "--optim.max_steps",
        8,
        "--checkpoint.every_steps",
        2,
        "--checkpoint.keep_last",
        2,
        "--eval.enabled",
        "false",
        "--checkpoint.export_final",
        "false",
    ]
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    straight.mkdir()
    faulty.mkdir()
    trace = straight / "events.txt"
    ref = _run(straight, _args(straight, *args), trace=str(trace), rows_per_part=4)
    assert ref.returncode == 0, ref.stderr[-3000:]
    events = list(dict.fromkeys(trace.read_text().splitlines()))  # first occurrences, in order
    by_category: dict[str, list[str]] = {}
    for eid in events:
        if (cat := _category(eid)) is not None:
            by_category.setdefault(cat, []).append(eid)
    assert {k: len(v) >= 3 for k, v in by_category.items()} == dict.fromkeys(
        ("data prep", "cache build", "training", "checkpoint"), True
    ), by_category
    rng = random.Random(17)
    chosen = [
        e
        for cat, n in (("data prep", 2), ("cache build", 2), ("training", 3), ("checkpoint", 3))
        for e in rng.sample(by_category[cat], n)
    ]
    points = sorted(chosen, key=events.index)
    print("SIGKILL points:", *points, sep="\n  ")  # shown with -s

    for point in points:
        r = _run(faulty, _args(faulty, *args), kill=point, rows_per_part=4)
        assert r.returncode == -signal.SIGKILL, f"the run did not reach {point}: rc {r.returncode}\n{r.stderr[-3000:]}"
    done = _run(faulty, _args(faulty, *args), rows_per_part=4)
    assert done.returncode == 0, done.stderr[-3000:]

    want, got = _metrics(straight), _metrics(faulty)
    assert [r["step"] for r in got] == list(range(1, 9))  # one record per step, whatever the kills
    assert [r["loss"] for r in got] == [r["loss"] for r in want], points
    s_want = json.loads((straight / "runs/run/summary.json").read_text())
    s_got = json.loads((faulty / "runs/run/summary.json").read_text())
    assert s_got["first_loss"] == s_want["first_loss"] and s_got["final_loss"] == s_want["final_loss"]
    assert s_got["tokens"] == s_want["tokens"] and s_got["segments"] > 1
    assert s_got["tokens_per_s"] == pytest.approx(s_got["tokens"] / s_got["train_time_s"])
    cache = faulty / "runs/run/ref_cache"
    assert len(RefCache.open(cache)) > 0  # every shard verified against the manifest

    def files(d):
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}

    assert files(cache) == files(straight / "runs/run/ref_cache")


def _stopped_in_time(root: Path, proc_end: float, limit: float = 15.0) -> bool:
    sent = float((root / "signals.log").read_text().split()[-1])
    return proc_end - sent < limit


@pytest.mark.slow
def test_sigterm_and_sigint_at_every_stage_stop_quickly_and_resume(tmp_path):
    """Table row 5: a stop signal during data preparation, cache build, training, export and evaluation
    ends the process within seconds with 128 + signum, saying where it stopped; each time the run
    resumes to the end. A second SIGINT kills at once."""
    args = _args(
        tmp_path,
        "--loss.objective",
        "dpo",
        "--optim.max_steps",
        6,
        "--eval.num_prompts",
        2,
        "--eval.n_samples",
        2,
        "--eval.max_new_tokens",
        8,
        "--eval.semantic_model",
        "",
    )
    # A signal during a stage that stops at once interrupts the 30 s the harness then waits; during a
    # training step it waits for the end of the step (the harness does not wait there).
    stages = [
        ("stage:data", signal.SIGTERM, "data preparation", 30),
        ("stage:cache", signal.SIGINT, "reference cache", 30),
        ("step:3", signal.SIGTERM, "training (checkpoint saved at step 3)", 0),
        ("stage:export", signal.SIGTERM, "export", 30),
        ("stage:eval", signal.SIGINT, "evaluation", 30),
    ]
    for at, signum, where, wait in stages:
        r = _run(tmp_path, args, signals=[[at, int(signum), wait]])
        end = time.time()
        name = signal.Signals(signum).name
        assert r.returncode == 128 + signum, r.stderr[-3000:]
        assert f"stopped by {name} during {where}; the run is resumable" in r.stderr.splitlines()[-1]
        assert _stopped_in_time(tmp_path, end), "the stop took too long"
    assert (tmp_path / "runs/run/final/config.json").is_file() and not (tmp_path / "runs/run/summary.json").exists()
    r = _run(tmp_path, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path)] == list(range(1, 7))
    summary = json.loads((tmp_path / "runs/run/summary.json").read_text())
    assert summary["steps"] == 6 and "eval" in summary and (tmp_path / "runs/run/eval/metrics.json").is_file()

    # Ctrl-C twice: the first asks for a checkpoint at the end of the step, the second stops at once.
    again = tmp_path / "again"
    again.mkdir()
    r = _run(
        again,
        _args(again, "--loss.objective", "sft", "--optim.max_steps", 6, "--eval.enabled", "false"),
        signals=[["step:2", int(signal.SIGINT), 0.5], ["step:2", int(signal.SIGINT), 60]],
    )
    end = time.time()
    assert r.returncode == -signal.SIGINT, r.stderr[-2000:]
    assert "stopped by" not in r.stderr and _stopped_in_time(again, end, limit=5.0)


@pytest.mark.slow
def test_a_second_process_on_a_running_run_dir_is_refused(tmp_path):
    """Table row 4: while one run trains, a second on the same run directory exits at once with one line;
    the first is unaffected (its log holds only its own steps) and stops cleanly on SIGTERM."""
    args = _args(tmp_path, "--loss.objective", "sft", "--optim.max_steps", 500, "--eval.enabled", "false")
    first = _launch(tmp_path, args)
    metrics = tmp_path / "runs/run/metrics.jsonl"
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()[-3000:]
    second = _run(tmp_path, args)
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert re.search(rf"run directory error: .*runs/run is in use by another run \(.*\"pid\": {first.pid}", lines[-1])
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert (tmp_path / f"runs/run/checkpoints/step-{steps[-1]}/MANIFEST.json").is_file()
