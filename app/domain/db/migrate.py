"""Apply the Alembic migrations (`app/domain/db/migrations`) up to head, serialised across processes."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from .session import get_engine

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x5357_4D45  # arbitrary constant, shared by every sstmerge process


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(url: str) -> None:
    """Bring the database at `url` to the latest schema (idempotent; safe when API and workers start together)."""
    parsed = make_url(url)
    engine = get_engine(url)
    if parsed.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            try:
                command.upgrade(alembic_config(connection), "head")
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                connection.commit()
    else:
        database = parsed.database
        on_disk = parsed.get_backend_name() == "sqlite" and bool(database) and database != ":memory:"
        lock = _file_lock(Path(database).with_suffix(".migrate.lock")) if on_disk and database else nullcontext()
        with lock, engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    log.info("database schema up to date", extra={"database": parsed.render_as_string(hide_password=True)})
