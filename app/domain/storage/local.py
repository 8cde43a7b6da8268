"""Local-folder backend: write to a temporary file in the target folder (locked while it is written), fsync, then
rename. A write that would leave less than `min_free_bytes` free is refused with `StorageFull`."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from .. import scratch
from .base import Storage, StorageError, StorageFull, check_key

TEMP_SUFFIX = ".tmp"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def atomic_copy(source: Path, destination: Path) -> None:
    """Copy `source` to `destination` so that readers never see a partial file. The temporary file is locked
    while it is written, so that a start-up sweep removes it only if its writer died."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=TEMP_SUFFIX)
    try:
        scratch.hold(fd)
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            os.replace(tmp, destination)  # before the descriptor (and its lock) is closed
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def free_bytes(self) -> int:
        return scratch.free_bytes(self.root)

    def _ensure_space(self, key: str, size: int) -> None:
        free = self.free_bytes()
        if free - size < self.min_free_bytes:
            raise StorageFull(
                f"cannot write {key} ({size} bytes): {free} bytes free, {self.min_free_bytes} must stay free"
            )

    def put_file(self, key: str, source: Path) -> None:
        self._ensure_space(key, source.stat().st_size)
        try:
            atomic_copy(source, self._path(key))
        except OSError as exc:
            kind = StorageFull if exc.errno in FULL_ERRNOS else StorageError
            raise kind(f"cannot write {key}: {exc}") from exc

    def get_file(self, key: str, destination: Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no such object: {key}")
        atomic_copy(path, destination)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no such object: {key}")
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(TEMP_SUFFIX)
        )

    def children(self, prefix: str) -> builtins.list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    def newest(self, prefix: str) -> datetime | None:
        """The newest file's time (a temporary file a live writer holds counts as now), or None when there is
        no file under `prefix` (an empty folder included)."""
        folder = self._path(prefix)
        times = []
        for path in folder.rglob("*") if folder.is_dir() else []:
            try:
                if not path.is_file():
                    continue
                if path.name.endswith(TEMP_SUFFIX) and not scratch.is_leftover(path, 0):
                    return datetime.now(timezone.utc)
                times.append(path.stat().st_mtime)
            except FileNotFoundError:
                continue
        return datetime.fromtimestamp(max(times), timezone.utc) if times else None

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def remove_stale_temp(self, grace: float) -> int:
        if not self.root.is_dir():
            return 0
        return len(scratch.remove_leftovers(list(self.root.rglob(f".*{TEMP_SUFFIX}")), grace))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready.", suffix=TEMP_SUFFIX):
                pass
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not writable: {exc}") from exc
