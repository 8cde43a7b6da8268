"""Stored adapters and datasets of a job, fetched once into a local cache (they are immutable by id)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.domain.db.models import Adapter, Dataset
from app.domain.storage import Storage
from sstmerge_core.errors import AdapterError, DatasetError


class InputCache:
    def __init__(self, storage: Storage, root: Path) -> None:
        self.storage, self.root = storage, root

    def _fetch(self, folder: Path, files: dict[str, str]) -> Path:
        """Download `files` (local name -> storage key) into `folder`, unless a previous fetch completed it."""
        if folder.is_dir():
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
