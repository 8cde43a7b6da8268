"""The storage interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath


class StorageError(Exception):
    """A backend failure (unreachable, permission, missing object)."""


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key or key.endswith("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    """Where uploaded inputs and job artifacts live."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store the file `source` under `key`, atomically replacing any previous object."""

    @abstractmethod
    def get_file(self, key: str, destination: Path) -> None:
        """Copy the object `key` to the local file `destination` (written atomically)."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream the object `key`."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes of `key`, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a folder-like key without the trailing slash)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix`; a missing prefix is not an error."""

    @abstractmethod
    def check(self) -> None:
        """Raise `StorageError` unless the backend is usable (readiness probe)."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None
