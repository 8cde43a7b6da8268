"""Alembic environment: runs on the connection handed in by `app.domain.db.migrate.upgrade`.

For `alembic revision --autogenerate` by hand: `SSTMERGE_DATABASE_URL=… alembic -c app/domain/db/alembic.ini …`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.domain.db.models import Base
from app.domain.settings import get_settings

target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        with create_engine(get_settings().resolved_database_url).connect() as own:
            context.configure(connection=own, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            own.commit()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
