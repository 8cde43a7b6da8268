"""What the service keeps, and for how long.

- Finished jobs older than `job_retention_seconds` (when set) are deleted with their artifacts, like
  `DELETE /merges/{id}` (`expire_jobs`, run by the workers' recovery loop).
- At start-up and every `leftover_sweep_seconds` while the API runs, leftovers of processes that died are removed
  (`sweep_leftovers`): upload staging folders and
  temporary files nobody holds (`scratch`), stored adapters and datasets without a row (an upload killed between
  storing its files and committing its row), files of deleted jobs, and the folders of attempts other than the
  one a finished job points at. Objects without a row are removed only once `leftover_grace_seconds` old, since
  a live upload in another process stores its files before it commits its row.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from . import scratch
from .artifacts import job_root
from .db.models import TERMINAL_STATUSES, Adapter, Dataset, Job, utcnow
from .db.session import session_scope
from .merges import remove_job_files
from .settings import Settings
from .storage import Storage, StorageError

log = logging.getLogger(__name__)
LOCKED_GRACE = 10.0
"""Seconds a path must be unchanged before a sweep may take it even when nobody holds its lock (the moment
between creating a staging folder or temporary file and locking it)."""
_CHUNK = 500


def locked_grace(settings: Settings) -> float:
    return min(settings.leftover_grace_seconds, LOCKED_GRACE)


def sweep_uploads(settings: Settings) -> int:
    """Remove upload staging folders of dead processes; returns how many."""
    root = settings.resolved_work_dir / "uploads"
    if not root.is_dir():
        return 0
    return len(scratch.remove_leftovers(list(root.iterdir()), locked_grace(settings)))


def _existing(session: Session, model: type[Adapter] | type[Dataset] | type[Job], ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        found.update(session.scalars(select(model.id).where(model.id.in_(ids[start : start + _CHUNK]))))
    return found


def _old_enough(storage: Storage, prefix: str, grace: float) -> bool:
    newest = storage.newest(prefix)
    return newest is None or newest < utcnow() - timedelta(seconds=grace)


def _sweep_inputs(session: Session, storage: Storage, tenant: str, grace: float) -> int:
    removed = 0
    for kind, model in (("adapters", Adapter), ("datasets", Dataset)):
        ids = storage.children(f"tenants/{tenant}/{kind}")
        for ident in sorted(set(ids) - _existing(session, model, ids)):
            prefix = f"tenants/{tenant}/{kind}/{ident}"
            if _old_enough(storage, prefix, grace):
                storage.delete_prefix(prefix)
                removed += 1
    return removed


def _sweep_jobs(session: Session, storage: Storage, tenant: str) -> int:
    """Files of deleted jobs, and attempt folders of finished jobs other than the one the job points at."""
    removed = 0
    ids = storage.children(f"tenants/{tenant}/jobs")
    rows: dict[str, tuple[str, str | None]] = {}
    for start in range(0, len(ids), _CHUNK):
        query = select(Job.id, Job.status, Job.artifact_prefix).where(Job.id.in_(ids[start : start + _CHUNK]))
        rows.update({job_id: (status, prefix) for job_id, status, prefix in session.execute(query)})
    for job_id in ids:
        root = job_root(tenant, job_id)
        if job_id not in rows:
            storage.delete_prefix(root)
            removed += 1
            continue
        status, kept = rows[job_id]
        if status not in TERMINAL_STATUSES:
            continue
        for attempt in storage.children(root):
            if f"{root}/{attempt}" != kept:
                storage.delete_prefix(f"{root}/{attempt}")
                removed += 1
    return removed


def sweep_storage(settings: Settings, storage: Storage) -> dict[str, int]:
    """Stored leftovers (see the module docstring); returns counts by kind."""
    counts = {"temp_files": storage.remove_stale_temp(locked_grace(settings)), "inputs": 0, "job_folders": 0}
    with session_scope(settings.resolved_database_url) as session:
        for tenant in storage.children("tenants"):
            counts["inputs"] += _sweep_inputs(session, storage, tenant, settings.leftover_grace_seconds)
            counts["job_folders"] += _sweep_jobs(session, storage, tenant)
    return counts


def sweep_leftovers(settings: Settings, storage: Storage) -> dict[str, int]:
    """The API's sweep (at start-up and periodically): staging folders and stored leftovers. Never fails the
    start-up on an unreadable disk or storage."""
    counts = {"staging": 0}
    try:
        counts["staging"] = sweep_uploads(settings)
        counts |= sweep_storage(settings, storage)
    except (OSError, StorageError):
        log.warning("leftover sweep incomplete", exc_info=True)
    if any(counts.values()):
        log.info("leftovers removed", extra=counts)
    return counts


def expire_jobs(settings: Settings, storage: Storage, limit: int = 200) -> list[str]:
    """Delete up to `limit` finished jobs older than `job_retention_seconds` (rows, events, artifacts)."""
    if settings.job_retention_seconds is None:
        return []
    cutoff = utcnow() - timedelta(seconds=settings.job_retention_seconds)
    expired = Job.status.in_(TERMINAL_STATUSES) & (Job.finished_at < cutoff)
    with session_scope(settings.resolved_database_url) as session:
        jobs = session.execute(select(Job.id, Job.tenant_id).where(expired).limit(limit)).all()
        if jobs:
            session.execute(
                delete(Job)
                .where(Job.id.in_([j for j, _ in jobs]), expired)
                .execution_options(synchronize_session=False)
            )
    for job_id, tenant in jobs:
        remove_job_files(storage, tenant, job_id)
    if jobs:
        log.info("expired jobs deleted", extra={"jobs": len(jobs)})
    return [job_id for job_id, _ in jobs]
