"""Staging of uploaded files: copied into a private temporary folder, size-limited, removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from .errors import TooLarge
from .storage import Storage


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the upload exceeds the limit of {limit} bytes", details={"limit": limit})


@contextmanager
def staging_dir(work_dir: Path) -> Iterator[Path]:
    """A fresh folder under `work_dir/uploads`, deleted on exit whatever happens."""
    root = work_dir / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_stream(source: IO[bytes], destination: Path, limit: int) -> int:
    """Copy `source` to `destination`, refusing (413) more than `limit` bytes; returns the size."""
    written = 0
    with destination.open("wb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise too_large(limit)
            out.write(chunk)
    return written


def clean_name(filename: str | None, fallback: str) -> str:
    """A display name from an uploaded file name (no folders, no archive suffix)."""
    name = Path(filename or "").name
    for suffix in (".tar.gz", ".tgz", ".zip", ".jsonl", ".json", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:200] or fallback


@contextmanager
def stored_with_row(session: Session, storage: Storage, prefix: str) -> Iterator[None]:
    """Files put under `prefix` and rows added in the block land together: committed on success; on any
    failure the session is rolled back and everything under `prefix` is deleted."""
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_prefix(prefix)
        raise
