"""Stored adapters and datasets of a job, fetched once into a local cache (they are immutable by id).

The cache is bounded: `trim` evicts the least recently used entries (an entry's folder time is refreshed on every
use) until it holds at most `max_bytes`, and `prune_deleted` drops entries whose adapter or dataset was deleted.
Jobs hold a shared lock on the cache while they run (`in_use`); eviction takes it exclusively and skips its turn
when a job in another process of this machine is running, so no job loses a file it is reading.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain import scratch
from app.domain.db.models import Adapter, Dataset
from app.domain.storage import Storage
from sstmerge_core.errors import AdapterError, DatasetError

log = logging.getLogger(__name__)
KINDS: dict[str, type[Adapter] | type[Dataset]] = {"adapters": Adapter, "datasets": Dataset}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class InputCache:
    def __init__(self, storage: Storage, root: Path, max_bytes: int | None = None) -> None:
        self.storage, self.root, self.max_bytes = storage, root, max_bytes

    @contextmanager
    def _lock(self, mode: int) -> Iterator[bool]:
        """Hold the cache's lock in `mode`; yields False when a non-blocking request was refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            try:
                fcntl.flock(handle, mode)
            except BlockingIOError:
                yield False
                return
            yield True

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the cache for a job: no entry is evicted until the block ends."""
        with self._lock(fcntl.LOCK_SH):
            yield

    def _fetch(self, folder: Path, files: dict[str, str]) -> Path:
        """Download `files` (local name -> storage key) into `folder`, unless a previous fetch completed it."""
        if folder.is_dir():
            os.utime(folder)  # most recently used
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            for name, key in files.items():
                self.storage.get_file(key, tmp / name)
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # a concurrent fetch of the same id winning the rename is fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def adapter(self, session: Session, tenant: str, adapter_id: str) -> Path:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None or adapter.tenant_id != tenant:
            raise AdapterError(f"adapter {adapter_id} no longer exists", code="adapter_not_found")
        keys = self.storage.list(adapter.storage_prefix)
        return self._fetch(self.root / "adapters" / adapter_id, {k.rsplit("/", 1)[-1]: k for k in keys})

    def dataset(self, session: Session, tenant: str, dataset_id: str) -> Path:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant_id != tenant:
            raise DatasetError(f"dataset {dataset_id} no longer exists", code="dataset_not_found")
        name = dataset.storage_key.rsplit("/", 1)[-1]
        return self._fetch(self.root / "datasets" / dataset_id, {name: dataset.storage_key}) / name

    def entries(self) -> list[Path]:
        """Cached adapters and datasets, least recently used first."""
        found = [
            entry
            for kind in KINDS
            if (self.root / kind).is_dir()
            for entry in (self.root / kind).iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        ]
        return sorted(found, key=lambda entry: entry.stat().st_mtime)

    def trim(self) -> list[str]:
        """Evict least recently used entries until the cache holds at most `max_bytes`; returns the evicted ids
        (none while a job of this machine holds the cache)."""
        if self.max_bytes is None:
            return []
        with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB) as exclusive:
            if not exclusive:
                return []
            entries = [(entry, folder_bytes(entry)) for entry in self.entries()]
            total, evicted = sum(size for _, size in entries), []
            for entry, size in entries:
                if total <= self.max_bytes:
                    break
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
                evicted.append(entry.name)
        if evicted:
            log.info("input cache trimmed", extra={"evicted": len(evicted), "bytes": total})
        return evicted

    def prune_deleted(self, session: Session) -> list[str]:
        """Drop cached adapters and datasets whose row no longer exists; returns their ids."""
        dropped = []
        with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB) as exclusive:
            if not exclusive:
                return []
            for kind, model in KINDS.items():
                folder = self.root / kind
                if not folder.is_dir():
                    continue
                cached = [entry.name for entry in folder.iterdir() if not entry.name.startswith(".")]
                existing = set(session.scalars(select(model.id).where(model.id.in_(cached)))) if cached else set()
                for ident in set(cached) - existing:
                    shutil.rmtree(folder / ident, ignore_errors=True)
                    dropped.append(ident)
        if dropped:
            log.info("deleted inputs dropped from the cache", extra={"ids": dropped})
        return dropped

    def remove_leftovers(self, grace: float) -> int:
        """Half-fetched folders of fetches that died (unchanged for `grace` seconds)."""
        partial = [
            entry
            for kind in KINDS
            if (self.root / kind).is_dir()
            for entry in (self.root / kind).iterdir()
            if entry.name.startswith(".")
        ]
        return len(scratch.remove_leftovers(partial, grace))
