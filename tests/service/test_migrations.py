"""The Alembic migrations and the SQLAlchemy models describe the same schema: a fresh database migrated to
head has nothing for `alembic revision --autogenerate` to add, on SQLite and on PostgreSQL. A model change
without a migration fails here (the sensitivity test below adds a column the migrations do not know)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from service_helpers import empty_postgres_database
from sqlalchemy import Column, MetaData, String, create_engine

from app.domain.db.migrate import upgrade
from app.domain.db.models import Base


def schema_drift(url: str, metadata: MetaData = Base.metadata) -> list:
    """Migrate `url` to head, then the differences autogenerate finds between it and `metadata`."""
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def test_sqlite_schema_matches_the_models(tmp_path):
    assert schema_drift(f"sqlite:///{tmp_path / 'fresh.db'}") == []


def test_a_column_without_migration_is_drift(tmp_path):
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["jobs"].append_column(Column("priority", String(16)))
    drift = schema_drift(f"sqlite:///{tmp_path / 'fresh.db'}", metadata)
    assert [(d[0], d[2], d[3].name) for d in drift] == [("add_column", "jobs", "priority")]


@pytest.fixture
def fresh_postgres(postgres_url) -> Iterator[str]:
    """An empty database of its own on the test server, dropped afterwards."""
    with empty_postgres_database(postgres_url, "sstmerge_drift") as url:
        yield url


@pytest.mark.service
def test_postgres_schema_matches_the_models(fresh_postgres):
    assert schema_drift(fresh_postgres) == []
