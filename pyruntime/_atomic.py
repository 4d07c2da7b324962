"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

The data goes to a temporary file in the destination's directory (same filesystem, so the
final ``os.replace`` is an atomic rename), is fsync'd, then renamed over the destination; the
directory is fsync'd too so the rename survives a power cut. On any failure the temporary
file is removed and the destination is left untouched.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "atomic_write_bytes"]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directories cannot be opened for fsync on every platform (e.g. Windows); best effort.
    try:
        _fsync_path(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(dest: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; when the block finishes without error the file
    written there is fsync'd and atomically renamed to ``dest``."""
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp (and writers that replace the file, like safetensors) leave 0600; give the
        # result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(dest: PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (see the module docstring)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
