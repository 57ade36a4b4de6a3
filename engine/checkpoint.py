"""Atomic save and verified resume of everything a run needs.

A checkpoint is `checkpoints/step-<n>/`: DeepSpeed's model/optimizer/scheduler state (its own layout,
sharded per rank under ZeRO), our `trainer_state.json` (step, epoch, sampler position, metrics
counters, world size), one `rng-rank<r>.pt` per rank, the resolved config, and `MANIFEST.json` (every
file with its size and sha256) written last. Everything is first written to `checkpoints/tmp-step-<n>/`
and renamed once every rank is done, so a directory named `step-<n>` is complete by construction.

Nothing is resumed without verification: `resolve_resume` checks every file against the manifest;
with `resume auto` it falls back to the newest checkpoint that verifies, naming each one it skipped
and why. `check_compatible` then refuses a checkpoint whose config differs from the run's in a
field that changes the run's meaning (engine.rundir), or that was written by another world size.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from engine import parallelize
from engine.fileio import atomic_write, publish_dir, sha256_file

MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted or incompatible with this run; the message says how to fix it."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Published checkpoints (complete by construction, not yet verified), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, config, *, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    tag_tmp, final = f"tmp-step-{step}", ckpt_dir / f"step-{step}"
    tmp_dir = ckpt_dir / tag_tmp
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # Saves cut short by a kill (never published, never read), and replaced copies a kill left behind.
        for stale in [*ckpt_dir.glob("tmp-step-*"), *ckpt_dir.glob(".step-*.old.*")]:
            shutil.rmtree(stale, ignore_errors=True)
    parallelize.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag_tmp, save_latest=False)
    atomic_write(tmp_dir / f"rng-rank{rank}.pt", lambda f: torch.save(rng_state(), f))
    parallelize.barrier()
    if rank == 0:
        atomic_write(tmp_dir / "trainer_state.json", json.dumps(trainer_state, indent=1))
        config.save(tmp_dir / "config.yaml")
        files = sorted(p for p in tmp_dir.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
        atomic_write(tmp_dir / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1))
        publish_dir(tmp_dir, final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    parallelize.barrier()
    return final


def verify(path: Path) -> dict:
    """Check every file against the manifest; returns the trainer state. Raises CheckpointError naming the problem."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} does not match its manifest (corrupted or altered)")
    if "trainer_state.json" not in files:
        raise CheckpointError(f"checkpoint {path} has no trainer_state.json in its manifest")
    return json.loads((path / "trainer_state.json").read_text())


def resolve_resume(resume: str, ckpt_dir: Path, *, log=print) -> Path | None:
    """The verified checkpoint to resume from (None: start fresh). Rank 0 only; the caller broadcasts it.

    auto: the newest checkpoint that verifies; each newer one that does not is named with the reason.
    An explicit path must verify itself: falling back from a checkpoint the user named would be a surprise.
    """
    if resume == "none":
        return None
    if resume == "auto":
        skipped = []
        for path in reversed(list_checkpoints(Path(ckpt_dir))):
            try:
                verify(path)
            except CheckpointError as e:
                skipped.append(str(e))
                log(f"resume: skipping {path.name}: {e}")
                continue
            return path
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {ckpt_dir} verifies ({'; '.join(skipped)}); restore one from a copy, or start "
                "afresh with --checkpoint.resume none (the earlier outputs are moved aside, not deleted)"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume {resume!r} is not a directory; use auto, none or a checkpoints/step-<n> path"
        )
    try:
        verify(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; resume from another checkpoint (checkpoint.resume auto picks the newest valid one)"
        ) from None
    return path


def check_compatible(path: Path, cfg, *, world_size: int) -> dict:
    """The trainer state of a verified checkpoint, after refusing one whose config or world size differs in meaning."""
    from engine.rundir import config_differences, read_config

    state = json.loads((path / "trainer_state.json").read_text())
    recorded = read_config(path / "config.yaml")
    diffs = config_differences(recorded, cfg) if recorded is not None else []
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another config ({'; '.join(diffs)}); resume with the "
            "checkpoint's settings, or start a new run (another logging.run_name)"
        )
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} process(es), this run has {world_size}: the data "
            f"order and the sharded optimizer state depend on it; resume with {saved_world} process(es)"
        )
    return state


def load(engine, path: Path, *, rank: int) -> None:
    """Restore DeepSpeed state and this rank's RNG from a checkpoint `resolve_resume` verified."""
    path = Path(path)
    load_dir, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_dir is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
