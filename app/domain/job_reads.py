"""The read behind `GET /merges/{id}` and its long-poll: one prepared primary-key SELECT on a pooled connection,
without an ORM session (the ORM's session, identity map and statement building cost about three times the
query itself, and this read is the one clients repeat)."""

from __future__ import annotations

from sqlalchemy import Engine, Row, bindparam, select

from .db.models import Job
from .errors import not_found

_BY_ID = select(Job.__table__).where(Job.id == bindparam("job_id"))


def job_row(engine: Engine, tenant: str, job_id: str) -> Row:
    """The job's columns as a read-only row (attributes named like `Job`'s); `NotFound` for a missing job or
    another tenant's."""
    with engine.connect() as connection:
        row = connection.execute(_BY_ID, {"job_id": job_id}).one_or_none()
    if row is None or row.tenant_id != tenant:
        raise not_found("merge", job_id)
    return row
