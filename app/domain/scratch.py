"""Ownership of scratch files and folders: a process holds an exclusive `flock` on what it is writing, so that a
sweep at start-up can tell leftovers of dead processes (nobody holds them: the kernel drops the locks of a
killed process) from files a live process is still using.

`owned(path)` is held for as long as a staging folder or a temporary file is in use; `is_leftover(path, grace)`
is true when nobody holds it and nothing in it changed for `grace` seconds (the grace covers the instant between
creating a path and locking it, and paths whose writer does not lock them).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def owned(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file or folder `path` for the block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def hold(fd: int) -> None:
    """Lock an open file descriptor exclusively (released when it is closed)."""
    fcntl.flock(fd, fcntl.LOCK_EX)


def _held_by_someone(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return True
        raise
    finally:
        os.close(fd)
    return False


def free_bytes(folder: Path) -> int:
    """Free bytes on the device of `folder` (or of its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def newest_change(path: Path) -> float:
    """The latest modification time of `path` and of everything inside it (seconds since the epoch)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def is_leftover(path: Path, grace: float) -> bool:
    """Nobody holds `path` and nothing in it changed for `grace` seconds."""
    return time.time() - newest_change(path) >= grace and not _held_by_someone(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(paths: list[Path], grace: float) -> list[Path]:
    """Remove those of `paths` that are leftovers; returns them."""
    removed = [path for path in paths if is_leftover(path, grace)]
    for path in removed:
        remove(path)
    return removed
