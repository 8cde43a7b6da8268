"""Artifact storage: a small interface with a local-folder backend and an S3-compatible backend.

Keys are `/`-separated relative paths (`tenants/<tenant>/adapters/<id>/adapter_config.json`). Every write is
atomic: a reader sees the old object or the new one, never a partial file.
"""

from __future__ import annotations

from .base import Storage, StorageError, StorageFull
from .factory import get_storage

__all__ = ["Storage", "StorageError", "StorageFull", "get_storage"]
