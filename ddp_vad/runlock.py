"""One live writer per output folder: ``with run_lock(out, what="pretrain"):``.

The lock is a file beside the folder, ``<parent>/.<name>.lock`` (beside, not inside: shard sets and reports are
swapped in whole, which would replace a lock kept inside). It holds ``{"pid", "host", "what", "started"}`` and an
``flock`` on it is the lock itself, so the kernel drops it when the holder dies, even by ``kill -9``: a lock file whose
flock is free is stale and is taken over with a warning. A second live writer gets a :class:`UserError` naming the
holder's pid and host.

Folders nest: ``ddp_vad pipeline`` locks ``OUT`` and its stages lock ``OUT/gan`` etc. A lock of an enclosing folder
held by this same process is not a conflict; one held by another live process is. Under a launcher with several
processes only the main process takes the lock (see :func:`ddp_vad.train.distributed.main_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ddp_vad.errors import UserError
from ddp_vad.files import make_folder
from ddp_vad.warn import warn


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of ``folder``: a hidden file beside it."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return (
        f"{holder.get('what') or 'another ddp_vad command'} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('started', '?')})"
    )


def _busy(path: Path, folder: Path) -> str:
    """The message for a folder whose lock file is held by another live process."""
    return f"{folder} is in use by {_describe(_peek(path))}; wait for it to finish or stop it (lock file {path})"


def _peek(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the flock of ``path`` (this process's own locks count as free)."""
    if _peek(path).get("pid") == os.getpid() and _peek(path).get("host") == socket.gethostname():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone meanwhile: free
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return False


def _check_enclosing(folder: Path) -> None:
    """Refuse when a folder that encloses ``folder`` is locked by another live process (e.g. a running pipeline)."""
    for parent in folder.parents:
        path = lock_path(parent) if parent != parent.parent else None
        if path is not None and path.is_file() and _held_elsewhere(path):
            raise UserError(_busy(path, parent))


def _acquire(path: Path, folder: Path, what: str) -> int:
    """Open and flock ``path``; retries when the file was replaced between open and flock (a release unlinks it)."""
    make_folder(path.parent)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(_busy(path, folder)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released (and unlinked) it between our open and flock: take the new file


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock of ``folder`` for the block; a second live writer gets a UserError naming the holder.

    Re-entrant for this process: a folder (or an enclosing one) this process already holds is not refused.
    """
    folder = Path(folder).resolve()
    _check_enclosing(folder)
    path = lock_path(folder)
    mine = _peek(path)
    if mine.get("pid") == os.getpid() and mine.get("host") == socket.gethostname() and path.is_file():
        yield path  # already ours (a stage inside a command that holds this folder)
        return
    fd = _acquire(path, folder, what)
    previous = _read_holder(fd)
    if previous.get("pid") is not None:
        warn(f"{path}: taking over the stale lock of {_describe(previous)}, which is no longer running")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    try:
        yield path
    finally:
        # Unlink while still holding the flock; an acquirer that opened the old file sees the inode change and retries.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
