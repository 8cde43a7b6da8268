"""Local-folder backend: write to a temporary file in the target folder, fsync, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .base import Storage, StorageError, check_key


def atomic_copy(source: Path, destination: Path) -> None:
    """Copy `source` to `destination` so that readers never see a partial file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, source: Path) -> None:
        try:
            atomic_copy(source, self._path(key))
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc}") from exc

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
            str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready.", suffix=".tmp"):
                pass
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not writable: {exc}") from exc
