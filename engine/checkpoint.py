"""Atomic save and verified resume of everything a run needs.

A checkpoint is `checkpoints/step-<n>/`: DeepSpeed's model/optimizer/scheduler state (its own layout,
sharded per rank under ZeRO), our `trainer_state.json` (step, epoch, sampler position, metrics
counters), one `rng-rank<r>.pt` per rank, the resolved config, and `MANIFEST.json` (every file with its
size and sha256) written last. Everything is first written to `checkpoints/tmp-step-<n>/` and renamed
once every rank is done, so a directory named `step-<n>` is complete by construction; the manifest is
checked again on load, so a truncated or altered file is an error, never silently used.
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
    pass


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


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, config, *, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    tag_tmp, final = f"tmp-step-{step}", ckpt_dir / f"step-{step}"
    tmp_dir = ckpt_dir / tag_tmp
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
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
    """Check every file against the manifest; returns the trainer state."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete; delete it or resume from another one")
    manifest = json.loads(mf.read_text())
    for rel, meta in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}; resume from an earlier checkpoint")
        if p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} does not match its manifest (corrupted or altered); resume from an earlier checkpoint")
    return json.loads((path / "trainer_state.json").read_text())


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(ckpt_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume {resume!r} is not a directory; use auto, none or a checkpoints/step-<n> path")
    return path


def load(engine, path: Path, *, rank: int) -> dict:
    """Restore DeepSpeed state and this rank's RNG; returns the trainer state."""
    path = Path(path)
    state = verify(path)
    load_dir, tag = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_dir is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
