"""Process start-up shared by the API, the worker and the CLI: folders, schema, tenants of env keys."""

from __future__ import annotations

from .auth import ensure_tenant
from .db.migrate import upgrade
from .db.session import session_scope
from .settings import Settings


def prepare(settings: Settings) -> None:
    """Create local folders, migrate the database to head and register the tenants of `SSTMERGE_API_KEYS`."""
    for folder in (settings.data_dir, settings.resolved_work_dir):
        folder.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        for tenant in {entry.tenant for entry in settings.api_keys}:
            ensure_tenant(session, tenant)
