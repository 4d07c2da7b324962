"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

The data goes to a temporary file in the destination's directory (same filesystem, so the
final ``os.replace`` is an atomic rename), is fsync'd, then renamed over the destination; the
directory is fsync'd too so the rename survives a power cut. On any failure the temporary
file is removed and the destination is left untouched.

Refused up front (ValueError naming the path): a destination that exists and is not a
regular file (a device such as /dev/null, a FIFO, a directory, a symlink: renaming over it
would replace the node itself, not write through it), and a destination that is the same file
as one of the write's ``inputs`` (it would destroy the source it is made from).

SIGTERM during a write in the main thread removes the temporary file before the process dies
(Python runs the handler between bytecodes, so while a long C call such as safetensors'
writer runs, termination waits for it to return). A handler the program installed itself is
called instead and decides; an exception it raises unwinds through the write, which removes
the temporary as for any failure. Writes from other threads get no handler (Python only
lets the main thread install one).
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Set, Union

__all__ = ["atomic_path", "atomic_write_bytes", "check_target"]

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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_target(dest: PathLike, inputs: Iterable[PathLike] = ()) -> None:
    """Raise ValueError unless ``dest`` may be replaced by a new file: it does not exist, or is
    a regular file (not a symlink) that is none of ``inputs`` (compared by device and inode,
    so hard links and other spellings of the same path count)."""
    dest = Path(dest)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"refusing to write {dest}: it exists and is {_kind(st.st_mode)}, not a regular file")
    for src in inputs:
        try:
            same = os.path.samefile(dest, src)
        except OSError:  # an input that does not exist (yet) is not the destination
            continue
        if same:
            raise ValueError(f"refusing to write {dest}: it is the input {src} (the write would destroy its source)")


# Temporary files of writes in progress in the main thread, removed on SIGTERM.
_pending: Set[Path] = set()
_previous_handler = None


def _on_sigterm(signum, frame) -> None:
    prev = _previous_handler
    if callable(prev):  # the program's own handler decides
        prev(signum, frame)
        return
    for tmp in list(_pending):
        with contextlib.suppress(OSError):
            tmp.unlink()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # die as SIGTERM would have killed us


@contextlib.contextmanager
def _removed_on_sigterm(tmp: Path) -> Iterator[None]:
    global _previous_handler
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _pending:
        prev = signal.getsignal(signal.SIGTERM)
        if prev in (signal.SIG_IGN, None):  # ignored, or installed outside Python: leave it be
            yield
            return
        _previous_handler = prev
        signal.signal(signal.SIGTERM, _on_sigterm)
    _pending.add(tmp)
    try:
        yield
    finally:
        _pending.discard(tmp)
        if not _pending and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous_handler)
            _previous_handler = None


@contextlib.contextmanager
def atomic_path(dest: PathLike, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; when the block finishes without error the file
    written there is fsync'd and atomically renamed to ``dest``. ``inputs``: files the write
    reads from, which ``dest`` must not be (see :func:`check_target`)."""
    dest = Path(dest)
    inputs = list(inputs)
    check_target(dest, inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _removed_on_sigterm(tmp):
            yield tmp
            # mkstemp (and writers that replace the file, like safetensors) leave 0600; give the
            # result the permissions a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync_path(tmp)
            check_target(dest, inputs)  # again: the block may have run long
            os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def atomic_write_bytes(dest: PathLike, data: bytes, inputs: Iterable[PathLike] = ()) -> None:
    """Write ``data`` to ``dest`` atomically (see the module docstring)."""
    with atomic_path(dest, inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
