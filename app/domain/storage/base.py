"""The storage interface."""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path, PurePosixPath


class StorageError(Exception):
    """A backend failure (unreachable, permission, missing object)."""


class StorageFull(StorageError):
    """Writing would leave less than the configured free space (or the device is full)."""


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

    @abstractmethod
    def children(self, prefix: str) -> builtins.list[str]:
        """The names directly under the folder-like `prefix` (`tenants` → `["acme", "globex"]`)."""

    @abstractmethod
    def newest(self, prefix: str) -> datetime | None:
        """When the most recently written object under `prefix` was written (UTC), or None if there is none."""

    def free_bytes(self) -> int | None:
        """Free space where objects are written, or None where the backend has no such limit (S3)."""
        return None

    def remove_stale_temp(self, grace: float) -> int:
        """Remove temporary files of writes that died (nobody holds them, older than `grace` s); returns how many."""
        return 0

    def exists(self, key: str) -> bool:
        return self.size(key) is not None
