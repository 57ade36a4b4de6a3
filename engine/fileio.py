"""Atomic, verifiable file writes: the one way the engine puts a file on disk.

Every writer of a file that another process, a later run or a resumed run may read (run configs,
metrics summaries, data reports, tokenisation and embedding caches, reference-cache parts,
checkpoints, evaluation outputs) goes through `atomic_write`: the bytes go to a hidden temp file in
the same directory, are fsync'ed, renamed over the target with `os.replace` (atomic on POSIX), and
the directory entry is fsync'ed. A reader therefore sees the old file or the new one, never half of
one, even after a SIGKILL or a power cut. With `checksum=True` the sha256 of the bytes as they
landed on disk is returned, for a manifest that later verifies the file (`verify_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    with contextlib.suppress(OSError):  # some filesystems refuse O_RDONLY fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: str | Path) -> Path:
    """The hidden, per-process temp name `atomic_write` uses next to `path` (stale ones match `.*.tmp.*`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[BinaryIO], None], *, checksum: bool = False, mkdir: bool = True
) -> str | None:
    """Write `data` (bytes, UTF-8 text, or a function writing into a binary file) to `path` atomically.

    Returns the sha256 of the written bytes when `checksum` is true (hashed from the temp file after
    fsync, so it describes exactly what was published), else None.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp) if checksum else None
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return digest


def verify_file(path: str | Path, *, sha256: str, size: int | None = None) -> str | None:
    """None when `path` has this size and sha256, else a short reason (missing, size, checksum)."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    have = path.stat().st_size
    if size is not None and have != size:
        return f"{path.name} has {have} bytes, expected {size} (truncated or overwritten)"
    digest = sha256_file(path)
    if digest != sha256:
        return f"{path.name} fails its sha256 check ({digest[:12]}..., expected {sha256[:12]}...)"
    return None


def publish_dir(tmp_dir: str | Path, final: str | Path) -> None:
    """Rename a fully written directory into place, replacing an older `final`; durable once it returns.

    Files inside `tmp_dir` must already be complete (atomic_write, or a library's save followed by
    this call, which fsyncs every file first).
    """
    tmp_dir, final = Path(tmp_dir), Path(final)
    for p in tmp_dir.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        # Rename the old copy away first: a crash between the two renames leaves one of them complete.
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    fsync_dir(final.parent)


def _arrays_digest(arrays: dict) -> str:
    """sha256 over every array's name, dtype, shape and bytes (the stored digest itself excluded)."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != "sha256"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz_verified(path: str | Path, arrays: dict) -> None:
    """Write `arrays` as an .npz atomically, with their digest inside the file (load_npz_verified checks it)."""
    import numpy as np

    arrays = dict(arrays, sha256=np.array(_arrays_digest(arrays)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz_verified(path: str | Path) -> dict | None:
    """The arrays of a save_npz_verified file, or None when it is missing, unreadable or fails its digest
    (a caller recomputes rather than trust it)."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            z = {k: npz[k] for k in npz.files}
        return z if str(z["sha256"]) == _arrays_digest(z) else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """A matplotlib figure written atomically, in the format of the path's suffix (png when none)."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig_kwargs))
    return path
