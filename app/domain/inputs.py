"""What adapters and datasets share as a tenant's stored inputs: a page of them, one of them (another tenant's is
a 404 like a missing one), the tenant's quota (`check_quota`), and deleting one that no unfinished job names (under
`jobs_index.lock_for_delete`)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db.models import Adapter, Dataset
from .errors import Conflict, QuotaExceeded, not_found
from .jobs_index import active_references, lock_for_delete
from .pagination import page_of, paginate
from .requests import well_formed_id
from .settings import Settings
from .storage import Storage

Input = TypeVar("Input", Adapter, Dataset)


def kind_of(model: type[Adapter] | type[Dataset]) -> str:
    return "adapter" if model is Adapter else "dataset"


def stored_totals(session: Session, tenant: str) -> tuple[int, int]:
    """How many adapters and datasets `tenant` has stored, and their bytes."""
    count, size = 0, 0
    for model in (Adapter, Dataset):
        rows, total = session.execute(
            select(func.count(), func.coalesce(func.sum(model.size_bytes), 0)).where(model.tenant_id == tenant)
        ).one()
        count, size = count + rows, size + total
    return count, size


def check_quota(session: Session, settings: Settings, tenant: str, incoming: int) -> None:
    """`QuotaExceeded` (507 `quota_exceeded`) unless one more input of `incoming` bytes fits the tenant's quota:
    at most `tenant_max_inputs` adapters and datasets, `tenant_max_input_bytes` bytes. Inputs already stored
    are never touched (a lowered quota refuses new ones only); uploads in flight at once are not counted against
    each other, so they can overshoot the byte quota by what they carry."""
    count, size = stored_totals(session, tenant)
    if count + 1 > settings.tenant_max_inputs:
        raise QuotaExceeded(
            f"this tenant stores {count} adapters and datasets; at most {settings.tenant_max_inputs} are allowed "
            "(delete some first)",
            details={"quota": "inputs", "limit": settings.tenant_max_inputs, "used": count},
        )
    if size + incoming > settings.tenant_max_input_bytes:
        raise QuotaExceeded(
            f"this tenant stores {size} bytes of adapters and datasets; {incoming} more would pass the quota of "
            f"{settings.tenant_max_input_bytes} bytes (delete some first)",
            details={"quota": "bytes", "limit": settings.tenant_max_input_bytes, "used": size, "incoming": incoming},
        )


def list_inputs(
    session: Session, model: type[Input], tenant: str, limit: int, cursor: str | None
) -> tuple[list[Input], str | None]:
    """The tenant's page after `cursor`, newest first, and the next cursor (None on the last page)."""
    rows = session.scalars(paginate(select(model).where(model.tenant_id == tenant), model, limit, cursor)).all()
    return page_of(list(rows), limit)


def get_input(session: Session, model: type[Input], tenant: str, ident: str) -> Input:
    row = session.get(model, ident) if well_formed_id(ident) else None
    if row is None or row.tenant_id != tenant:
        raise not_found(kind_of(model), ident)
    return row


def delete_input(session: Session, storage: Storage, model: type[Input], tenant: str, ident: str) -> None:
    """Delete the row, then its files; 409 `in_use` while a queued or running job names it."""
    row = lock_for_delete(session, model, tenant, ident)
    kind = kind_of(model)
    jobs = active_references(session, tenant, **{f"{kind}_id": ident})
    if jobs:
        raise Conflict(f"{kind} {ident} is used by unfinished jobs", code="in_use", details={"jobs": jobs})
    session.delete(row)
    session.commit()
    storage.delete_prefix(row.storage_prefix if isinstance(row, Adapter) else row.storage_key.rsplit("/", 1)[0])
