"""Staging of uploaded files: copied into a private temporary folder, size-limited, removed afterwards; display
names checked before anything is stored."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from sstmerge_core.untrusted import control_free, encodable, quote

from . import scratch
from .errors import InvalidInput, TooLarge
from .requests import INVISIBLE
from .storage import Storage

MAX_NAME_CHARS = 200  # the `name` column of adapters and datasets
MAX_SOURCE_CHARS = 500  # the `source` column
MAX_RECORDED_BYTES = 2**31 - 1  # the `size_bytes` columns are 32-bit integers
_UNPRINTABLE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{INVISIBLE}]")
_INVISIBLE = re.compile(f"[{INVISIBLE}]")


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the upload exceeds the limit of {limit} bytes", details={"limit": limit})


@contextmanager
def staging_dir(work_dir: Path) -> Iterator[Path]:
    """A fresh folder under `work_dir/uploads`, deleted on exit whatever happens."""
    root = work_dir / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        with scratch.owned(folder):  # the start-up sweep removes a staging folder only if its process died
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


def recorded_size(size: int) -> int:
    """`size` if the catalogue can record it, else `TooLarge` (413): never an out-of-range database write."""
    if size > MAX_RECORDED_BYTES:
        raise TooLarge(
            f"the stored files would take {size} bytes; at most {MAX_RECORDED_BYTES} are accepted",
            details={"limit": MAX_RECORDED_BYTES},
        )
    return size


def check_name(name: str) -> str:
    """A display name given by the client: 1 to 200 printable characters (leading/trailing spaces dropped), no
    bidi controls or zero-width characters (`INVISIBLE`); `InvalidInput` (code invalid_name) otherwise."""
    stripped = name.strip()
    if not stripped or len(stripped) > MAX_NAME_CHARS or not control_free(stripped) or _INVISIBLE.search(stripped):
        raise InvalidInput(
            f"name {quote(name)} must be 1 to {MAX_NAME_CHARS} printable characters, without bidi controls or "
            "zero-width characters",
            code="invalid_name",
        )
    return stripped


def file_label(filename: str | None) -> str:
    """An uploaded file's base name, made printable (control, bidi and zero-width characters and lone surrogates
    dropped)."""
    name = Path(filename or "").name
    name = _UNPRINTABLE.sub("", name)
    return name if encodable(name) else name.encode("utf-8", "ignore").decode("utf-8")


def clean_name(filename: str | None, fallback: str) -> str:
    """A display name from an uploaded file name (no folders, no archive suffix, printable, at most 200 characters)."""
    name = file_label(filename)
    for suffix in (".tar.gz", ".tgz", ".zip", ".jsonl", ".json", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.strip()[:MAX_NAME_CHARS].strip() or fallback


def display_name(name: str | None, filename: str | None, fallback: str) -> str:
    """The name to store: the client's `name` (checked) when given, else one made from the file name."""
    return check_name(name) if name is not None else clean_name(filename, fallback)


def upload_source(filename: str | None, fallback: str) -> str:
    """The `source` recorded for an upload: `upload:<file name>`, at most 500 characters."""
    return f"upload:{file_label(filename) or fallback}"[:MAX_SOURCE_CHARS]


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
