"""Engines and sessions, one engine per (URL, process): forked Celery children never share a pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_ENGINES: dict[tuple[str, int], Engine] = {}
POOL_SIZE, POOL_OVERFLOW = 10, 30
"""Server databases: 10 kept connections plus 30 on demand = 40, the size of the thread pool that runs
FastAPI's sync endpoints, so a request thread never waits for a connection (SQLAlchemy's default is 5 + 10).
SQLite keeps all 40 and may open 30 more (the threads of waiting endpoints, see app.api.watch)."""


POOL_TIMEOUT = 10.0
"""Seconds a request waits for a free connection before it fails (503, `database_unavailable`)."""
CONNECT_ARGS = {"postgresql": {"connect_timeout": 5}}
"""A database host that does not answer fails a connection in seconds (503) instead of hanging the request."""


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _drop_inherited_engines() -> None:
    """In a forked child: forget the parent's pools without closing its connections (they are the parent's)."""
    for key in [k for k in _ENGINES if k[1] != os.getpid()]:
        _ENGINES.pop(key).dispose(close=False)


os.register_at_fork(after_in_child=_drop_inherited_engines)


def get_engine(url: str) -> Engine:
    """The engine for `url` in this process (created on first use)."""
    key = (url, os.getpid())
    engine = _ENGINES.get(key)
    if engine is None:
        if url.startswith("sqlite"):  # connections are cheap: keep them (a new one costs a file open and pragmas)
            engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=POOL_SIZE + POOL_OVERFLOW,
                max_overflow=POOL_OVERFLOW,
            )
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_size=POOL_SIZE,
                max_overflow=POOL_OVERFLOW,
                pool_timeout=POOL_TIMEOUT,
                connect_args=CONNECT_ARGS.get(make_url(url).get_backend_name(), {}),
            )
        _ENGINES[key] = engine
    return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with session_factory(url)() as session, session.begin():
        yield session


def rows_changed(session: Session, statement: Executable) -> int:
    """How many rows an UPDATE or DELETE `statement` matched. `Session.execute` returns a `CursorResult` for such a
    statement but is typed to return its base class `Result`, which has no `rowcount`: the cast says which it is."""
    return cast(CursorResult, session.execute(statement)).rowcount
