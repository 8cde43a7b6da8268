"""Readiness: the database, the broker and the storage each answer, and the storage and scratch folders keep their
minimum free space. Free space is also checked before an upload is accepted (`ensure_space`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from . import scratch
from .errors import InsufficientStorage
from .queue import JobQueue
from .settings import Settings
from .storage import Storage

log = logging.getLogger(__name__)


def _probe(name: str, check: Callable[[], object]) -> str:
    try:
        check()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is reported
        log.warning("readiness check failed", extra={"check": name, "error": str(exc)})
        return f"error: {type(exc).__name__}: {exc}"[:300]


def space_shortfall(settings: Settings, storage: Storage, need: int = 0) -> str | None:
    """Why writing `need` more bytes would break the minimum free space, or None if it would not."""
    places = {"scratch folder": scratch.free_bytes(settings.resolved_work_dir), "storage": storage.free_bytes()}
    for place, free in places.items():
        if free is not None and free - need < settings.min_free_bytes:
            return f"the {place} has {free} bytes free; {settings.min_free_bytes} must stay free"
    return None


def ensure_space(settings: Settings, storage: Storage, need: int = 0) -> None:
    """`InsufficientStorage` unless `need` bytes can be written and the minimum free space kept."""
    if (reason := space_shortfall(settings, storage, need)) is not None:
        raise InsufficientStorage(f"not enough free space to accept this: {reason}")


def _storage(settings: Settings, storage: Storage) -> None:
    """The backend answers, and it and the scratch folder keep the minimum free space."""
    storage.check()
    if (reason := space_shortfall(settings, storage)) is not None:
        raise InsufficientStorage(reason)


def readiness(session: Session, queue: JobQueue, storage: Storage, settings: Settings) -> dict[str, str]:
    """ "ok" or "error: …" per check: database, broker, storage (reachable, writable, enough free space)."""
    return {
        "database": _probe("database", lambda: session.execute(text("SELECT 1"))),
        "broker": _probe("broker", queue.check),
        "storage": _probe("storage", lambda: _storage(settings, storage)),
    }
