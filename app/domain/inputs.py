"""What adapters and datasets share as a tenant's stored inputs: a page of them, one of them (another tenant's is
a 404 like a missing one), and deleting one that no unfinished job names (under `jobs_index.lock_for_delete`)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db.models import Adapter, Dataset
from .errors import Conflict, not_found
from .jobs_index import active_references, lock_for_delete
from .pagination import page_of, paginate
from .requests import well_formed_id
from .storage import Storage

Input = TypeVar("Input", Adapter, Dataset)


def kind_of(model: type[Adapter] | type[Dataset]) -> str:
    return "adapter" if model is Adapter else "dataset"


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
