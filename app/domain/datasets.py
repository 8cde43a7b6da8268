"""Datasets: JSONL/CSV uploads (or a Hub dataset copied to JSONL), validated with `sstmerge_core.data`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from sstmerge_core.data import file_sha256, load_hub_examples, scan_rows
from sstmerge_core.errors import DatasetError

from .db.models import Dataset, new_id
from .errors import InvalidInput
from .inputs import check_quota, delete_input
from .requests import DatasetSource
from .settings import Settings
from .storage import Storage
from .uploads import display_name, recorded_size, save_stream, staging_dir, stored_with_row, upload_source

log = logging.getLogger(__name__)
SUFFIXES = {".jsonl": ".jsonl", ".json": ".jsonl", ".csv": ".csv"}


def _store(
    session: Session, storage: Storage, settings: Settings, tenant: str, path: Path, *, name: str, source: str
) -> Dataset:
    """Check every row (streamed: one row in memory), then store the file and its row together."""
    size = recorded_size(path.stat().st_size)
    check_quota(session, settings, tenant, size)
    try:
        summary = scan_rows(path, name, max_row_bytes=settings.max_row_bytes)
    except DatasetError as exc:
        raise InvalidInput(str(exc), code=exc.code) from None
    dataset_id = new_id("ds")
    prefix = f"tenants/{tenant}/datasets/{dataset_id}"
    key = f"{prefix}/data{path.suffix}"
    with stored_with_row(session, storage, prefix):
        storage.put_file(key, path)
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant,
            name=name,
            rows=summary.rows,
            columns=summary.columns,
            sha256=file_sha256(path),
            source=source[:500],
            size_bytes=size,
            storage_key=key,
        )
        session.add(dataset)
    log.info("dataset stored", extra={"tenant": tenant, "dataset_id": dataset_id, "rows": summary.rows})
    return dataset


def create_from_upload(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    upload: IO[bytes],
    filename: str | None,
    name: str | None,
) -> Dataset:
    suffix = SUFFIXES.get(Path(filename or "").suffix.lower())
    if suffix is None:
        raise InvalidInput(
            "upload a .jsonl or .csv file (the file name's suffix tells the format)", code="invalid_dataset"
        )
    name = display_name(name, filename, "dataset")
    with staging_dir(settings.resolved_work_dir) as staging:
        path = staging / f"data{suffix}"
        save_stream(upload, path, settings.max_upload_bytes)
        return _store(session, storage, settings, tenant, path, name=name, source=upload_source(filename, "dataset"))


def create_from_hub(
    session: Session, storage: Storage, settings: Settings, tenant: str, body: DatasetSource
) -> Dataset:
    """Copy a Hub dataset's (prompt, response) columns into storage as JSONL."""
    if not settings.hub_enabled:
        raise InvalidInput(
            "Hugging Face Hub access is disabled on this server (SSTMERGE_HUB_ENABLED)", code="hub_disabled"
        )
    dataset_id, _, revision = body.source.removeprefix("hf://").removeprefix("datasets/").partition("@")
    name = display_name(body.name, None, dataset_id.rsplit("/", 1)[-1])
    try:
        examples = load_hub_examples(
            dataset_id,
            split=body.split,
            revision=revision or None,
            prompt_column=body.prompt_column,
            response_column=body.response_column,
            limit=body.limit,
        )
    except DatasetError as exc:
        raise InvalidInput(str(exc), code=exc.code) from None
    with staging_dir(settings.resolved_work_dir) as staging:
        path = staging / "data.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for example in examples:
                row = {"prompt": example.prompt}
                if example.response is not None:
                    row["response"] = example.response
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return _store(session, storage, settings, tenant, path, name=name, source=body.source)


def delete_dataset(session: Session, storage: Storage, tenant: str, dataset_id: str) -> None:
    delete_input(session, storage, Dataset, tenant, dataset_id)
