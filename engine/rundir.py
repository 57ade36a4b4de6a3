"""A run directory belongs to one run: the lock, the ownership rules, and the checks made before any work.

Where this sits: the first thing `engine.train` does after joining the process group (rank 0 only),
before data preparation or any cache, model or checkpoint work.

Rules for `runs/<name>/` (see the README):
- a lock (`flock` on `<output_dir>/.<name>.lock`, beside the directory so that moving the directory
  aside keeps it) is held for the run's lifetime: a second run on the same directory fails at once,
  naming the holder;
- a fresh run (`checkpoint.resume none`) into a directory whose recorded `config.yaml` differs in a
  field that changes the run's meaning is refused, naming the fields, with the fixes: another
  `logging.run_name`, `--checkpoint.resume auto`, or `--logging.overwrite true`, which moves the old
  contents aside to `<name>.old-<time>/` (nothing is ever deleted);
- a fresh run with the same meaning moves the earlier attempt's outputs (checkpoints, metrics, export,
  evaluation) aside the same way and keeps its verified caches;
- a resumed run refuses the same meaning-changing differences (checked again against the config
  stored in the checkpoint it resumes from).
Fields allowed to differ between the segments of one run are `RESUMABLE_FIELDS` (logging, evaluation,
checkpoint cadence, cache locations, worker counts, `optim.max_steps` to extend or shorten a run).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import yaml

from engine.fileio import atomic_write

# Sections and fields that may differ between a run's recorded config and a later segment of it:
# they change where outputs go, how often things are logged or saved, or how fast a step runs (and
# its last bits: the attention and loss kernels, recomputation), never which model is trained on what
# with which objective. ZeRO stage and offload stay fixed: DeepSpeed's checkpoint layout depends on them.
RESUMABLE_FIELDS = (
    "logging.*",
    "eval.*",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.export_final",
    "checkpoint.merge_lora",
    "optim.max_steps",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "loss.backend",
    "data.cache_dir",
    "data.num_workers",
    "deviation.cache_dir",
    "deviation.batch_size",
    "deviation.device",
    "ref_cache.dir",
    "ref_cache.mode",
    "parallel.backend",
)
# What a fresh run with the same meaning keeps of an earlier attempt: content-verified caches and
# the record of the config. Everything else (checkpoints, metrics, export, evaluation) is moved aside.
KEPT_ON_RESTART = ("config.yaml", "data_report.json", "ref_cache")


class RunDirError(RuntimeError):
    """The run directory is in use, belongs to another run, or cannot be written; the message says how to fix it."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resumable(key: str) -> bool:
    return any(key == f or (f.endswith(".*") and key.startswith(f[:-1])) for f in RESUMABLE_FIELDS)


def config_differences(recorded: dict, cfg) -> list[str]:
    """'field: recorded -> current' for every meaning-changing field that differs (recorded may be partial).

    The recorded dict is completed with this engine's defaults first, so a field added since the run
    started does not count as a difference.
    """
    from engine.config import ConfigError, from_dict

    try:
        recorded_cfg = from_dict(recorded)
    except ConfigError as e:
        return [f"the recorded config is not readable by this engine ({e})"]
    old, new = _flatten(dataclasses.asdict(recorded_cfg)), _flatten(cfg.to_dict())
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not _resumable(k)
    ]


def read_config(path: Path) -> dict | None:
    """The config recorded at `path` as a nested dict, None when absent; unreadable is an error."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunDirError(
            f"{path} cannot be read ({e}); move the run directory aside or set logging.overwrite true"
        ) from None
    return data if isinstance(data, dict) else {}


class RunLock:
    """Exclusive, non-blocking flock held for a run's lifetime (rank 0 only); released by the kernel on any exit."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self._file = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise RunDirError(
                f"cannot create the run lock {self.path} ({e.strerror or e}); point logging.output_dir at a "
                "writable directory"
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another run ({holder}); wait for it to finish, "
                "or give this run another logging.run_name"
            ) from None
        f.seek(0)
        f.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        f.write(json.dumps(holder))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _aside_path(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    return dest


def move_aside(run_dir: Path, *, keep: tuple[str, ...] = ()) -> Path | None:
    """Move the contents of run_dir (all but `keep`) into a new sibling directory; returns it (None: nothing moved)."""
    entries = [p for p in run_dir.iterdir() if p.name not in keep]
    if not entries:
        return None
    dest = _aside_path(run_dir)
    if not keep:
        os.replace(run_dir, dest)  # one rename: the whole directory, atomically
        run_dir.mkdir()
        return dest
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    return dest


def _holds_files(path: Path) -> bool:
    """Whether `path` is or holds a file; hidden entries are the engine's temp files (a write cut short)."""
    if path.name.startswith("."):
        return False
    return path.is_file() or (path.is_dir() and any(p.is_file() and p.name[0] != "." for p in path.rglob("*")))


def progress_summary(run_dir: Path) -> str:
    """What an earlier run left that a new one would mix with (checkpoints, metrics, outputs), or ''."""
    found = []
    steps = [int(p.name[5:]) for p in run_dir.glob("checkpoints/step-*") if p.name[5:].isdigit()]
    if steps:
        found.append(f"checkpoints up to step-{max(steps)}")
    for name in ("metrics.jsonl", "tensorboard", "final", "eval", "summary.json"):
        if _holds_files(run_dir / name):
            found.append(name)
    return ", ".join(found)


def claim(cfg) -> str | None:
    """Rank 0, under the lock: make run_dir this run's, per the module's rules. Returns a line to print, or None."""
    run_dir = cfg.logging.run_dir
    contents = [p.name for p in run_dir.iterdir() if _holds_files(p)] if run_dir.is_dir() else []
    if not contents:
        return None
    if cfg.logging.overwrite:
        dest = move_aside(run_dir)
        return f"logging.overwrite: moved the earlier contents of {run_dir} to {dest}"
    recorded = read_config(run_dir / "config.yaml")
    if recorded is None:
        if contents == ["ref_cache"]:
            return None  # a reference cache built first by `engine.refcache build` (fingerprint-checked on use)
        raise RunDirError(
            f"{run_dir} holds files but no config.yaml, so it is no run directory of this engine; give this run "
            "another logging.run_name, or use --logging.overwrite true (moves its contents aside, deletes nothing)"
        )
    diffs = config_differences(recorded, cfg)
    resuming = cfg.checkpoint.resume != "none"
    if diffs:
        fixes = (
            "give this run another logging.run_name, or --logging.overwrite true to start afresh there (the old "
            "contents are moved aside, nothing is deleted), or set the fields back"
        )
        fixes += " to continue that run" if resuming else " and add --checkpoint.resume auto to continue that run"
        raise RunDirError(f"run directory {run_dir} belongs to a run with another config ({'; '.join(diffs)}); {fixes}")
    if resuming:
        return None
    progress = progress_summary(run_dir)
    if not progress:
        return None
    dest = move_aside(run_dir, keep=KEPT_ON_RESTART)
    return (
        f"{run_dir} held an earlier run of this config ({progress}); this fresh run moved its outputs to {dest} "
        "(use --checkpoint.resume auto to continue a run instead)"
    )


def check_writable(dirs: dict[str, Path]) -> None:
    """Create each directory and a file in it, so a permission problem fails now, not at the first checkpoint.

    `dirs` maps the setting that chooses a directory (e.g. "logging.output_dir") to the directory.
    """
    for setting, d in dirs.items():
        d = Path(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".write-check-"):
                pass
        except OSError as e:
            raise RunDirError(
                f"cannot write to {d} ({e.strerror or e}); make it writable, or point {setting} at a writable directory"
            ) from None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the checkpoint resumed from), so each step is logged once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill: it belongs to no step
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))
