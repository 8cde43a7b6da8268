"""Which unfinished jobs refer to an adapter or dataset (deleting those inputs is refused), and the lock that
makes that check hold until the delete commits (`db.locking`)."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from .db.locking import begin_write, locked
from .db.models import TERMINAL_STATUSES, Adapter, Dataset, Job
from .errors import not_found
from .requests import MergeRequest


def parsed_request(request: dict) -> MergeRequest | None:
    """The stored request as the typed model the worker reads it with; None if it no longer parses (such a job
    cannot run: its worker refuses it the same way)."""
    try:
        return MergeRequest.model_validate(request)
    except ValidationError:
        return None


def request_adapter_ids(request: dict) -> set[str]:
    body = parsed_request(request)
    return {ref.adapter_id for ref in body.adapter_refs()} if body else set()


def request_dataset_ids(request: dict) -> set[str]:
    """Every dataset the job reads (`MergeRequest.dataset_ids`: merge, repair/search and evaluation sets)."""
    body = parsed_request(request)
    return set(body.dataset_ids()) if body else set()


def active_references(
    session: Session, tenant: str, *, adapter_id: str | None = None, dataset_id: str | None = None
) -> list[str]:
    """Ids of the tenant's queued/running jobs whose request names `adapter_id` or `dataset_id`."""
    jobs = session.execute(
        select(Job.id, Job.request).where(Job.tenant_id == tenant, Job.status.not_in(TERMINAL_STATUSES))
    ).all()
    return [
        job_id
        for job_id, request in jobs
        if (adapter_id and adapter_id in request_adapter_ids(request))
        or (dataset_id and dataset_id in request_dataset_ids(request))
    ]


def lock_for_delete(
    session: Session, model: type[Adapter] | type[Dataset], tenant: str, ident: str
) -> Adapter | Dataset:
    """The tenant's adapter or dataset `ident`, locked until commit against a concurrent submit naming it (which
    then fails with `*_not_found`, or commits first and makes `active_references` see its job); 404 if absent."""
    begin_write(session)
    row = session.scalar(locked(select(model).where(model.id == ident, model.tenant_id == tenant), shared=False))
    if row is None:
        raise not_found("adapter" if model is Adapter else "dataset", ident)
    return row
