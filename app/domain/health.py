"""Readiness: the database, the broker and the storage each answer."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from .queue import JobQueue
from .storage import Storage

log = logging.getLogger(__name__)


def _probe(name: str, check: Callable[[], object]) -> str:
    try:
        check()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is reported
        log.warning("readiness check failed", extra={"check": name, "error": str(exc)})
        return f"error: {type(exc).__name__}: {exc}"[:300]


def readiness(session: Session, queue: JobQueue, storage: Storage) -> dict[str, str]:
    return {
        "database": _probe("database", lambda: session.execute(text("SELECT 1"))),
        "broker": _probe("broker", queue.check),
        "storage": _probe("storage", storage.check),
    }
