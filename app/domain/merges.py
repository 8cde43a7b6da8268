"""Merge jobs: submit-time validation, idempotency, listing, cancellation, deletion and events."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sstmerge_core.errors import InputError
from sstmerge_core.methods.catalog import CATALOG
from sstmerge_core.search.space import evaluation_values, from_evaluation

from . import artifacts, base_models, webhooks
from .db.locking import begin_write, locked
from .db.models import TERMINAL_STATUSES, Adapter, Dataset, Job, JobEvent, utcnow
from .db.session import rows_changed
from .errors import Conflict, InvalidInput, not_found
from .job_spec import build_spec
from .pagination import page_of, paginate
from .requests import MergeRequest
from .settings import Settings
from .storage import Storage, StorageError

log = logging.getLogger(__name__)
Owned = TypeVar("Owned", Adapter, Dataset)
Enqueue = Callable[[str], None]


def request_sha256(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _errors(exc: ValidationError) -> list[dict]:
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _check_data(body: MergeRequest) -> None:
    """Methods that read data need both merge datasets (the method and its params are valid by construction)."""
    if CATALOG[body.method].needs_fisher and not (body.utility_dataset_id and body.safety_dataset_id):
        raise InvalidInput(
            f"method {body.method!r} needs utility_dataset_id and safety_dataset_id", code="missing_dataset"
        )


def one_search_place(body: MergeRequest) -> MergeRequest:
    """A search job's split and tolerances from one place (`search.space.from_evaluation`: what `evaluation` gives,
    else the search's own), stated alike in both parts of the stored request; a contradiction is `InvalidInput`
    (`conflicting_settings`)."""
    if body.search is None or body.evaluation is None:
        return body
    try:
        search = from_evaluation(body.search, body.evaluation)
    except InputError as exc:
        raise InvalidInput(str(exc), code=exc.code) from None
    evaluation = body.evaluation.model_copy(update=evaluation_values(search, body.evaluation))
    return body.model_copy(update={"search": search, "evaluation": evaluation})


def _owned(session: Session, model: type[Owned], tenant: str, ids: set[str], *, lock: bool = False) -> dict[str, Owned]:
    """The tenant's rows of `model` among `ids`; with `lock`, share-locked until commit (`db.locking`)."""
    query = select(model).where(model.tenant_id == tenant, model.id.in_(ids))
    rows = session.scalars(locked(query, shared=True) if lock else query).all()
    return {row.id: row for row in rows}


def _require_inputs(session: Session, tenant: str, body: MergeRequest, *, lock: bool = False) -> dict[str, Adapter]:
    """The job's adapters by id; `InvalidInput` naming the adapters or datasets the tenant does not have."""
    adapter_ids = {ref.adapter_id for ref in body.adapter_refs()}
    adapters = _owned(session, Adapter, tenant, adapter_ids, lock=lock)
    if missing := sorted(adapter_ids - adapters.keys()):
        raise InvalidInput(
            f"adapter(s) not found: {', '.join(missing)}", code="adapter_not_found", details={"ids": missing}
        )
    dataset_ids = set(body.dataset_ids())
    if missing := sorted(dataset_ids - _owned(session, Dataset, tenant, dataset_ids, lock=lock).keys()):
        raise InvalidInput(
            f"dataset(s) not found: {', '.join(missing)}", code="dataset_not_found", details={"ids": missing}
        )
    return adapters


def _check_base_model(base: base_models.BaseModelRef, adapters: list[Adapter]) -> None:
    aliases = base_models.model_aliases(base)
    for adapter in adapters:
        hint = adapter.base_model_hint
        if hint and base_models.short_name(hint) not in aliases:
            raise InvalidInput(
                f"adapter {adapter.id} ({adapter.name}) was trained on {hint!r}, not on {base.name!r}",
                code="base_model_mismatch",
                details={"adapter_id": adapter.id, "base_model_hint": hint, "base_model": base.name},
            )
    shapes: dict[str, tuple[list[int], Adapter]] = {}
    for adapter in adapters:
        for module, (d_out, d_in, _) in adapter.modules.items():
            seen = shapes.setdefault(module, ([d_out, d_in], adapter))
            if seen[0] != [d_out, d_in]:
                raise InvalidInput(
                    f"module {module}: adapter {seen[1].id} has ΔW {tuple(seen[0])} but adapter "
                    f"{adapter.id} has {(d_out, d_in)}; the adapters do not share a base model",
                    code="adapter_mismatch",
                    details={"module": module},
                )
    weights = base_models.weight_shapes(base.path) if base.path else {}
    if not weights:
        return
    for adapter in adapters:
        for module, (d_out, d_in, _) in adapter.modules.items():
            key = f"{module}.weight"
            shape = weights.get(key) or weights.get(key.split(".", 1)[-1])
            expected = [d_in, d_out] if adapter.fan_in_fan_out else [d_out, d_in]
            if shape is None:
                raise InvalidInput(
                    f"module {module} of adapter {adapter.id} does not exist in base model {base.name}",
                    code="base_model_mismatch",
                    details={"adapter_id": adapter.id, "module": module},
                )
            if shape != expected:
                raise InvalidInput(
                    f"module {module}: base model {base.name} has weight {tuple(shape)}, adapter "
                    f"{adapter.id} expects {tuple(expected)}",
                    code="base_model_mismatch",
                    details={"adapter_id": adapter.id, "module": module},
                )


def validate(session: Session, settings: Settings, tenant: str, body: MergeRequest) -> None:
    """Everything that can be checked without a model; `InvalidInput` with a code naming the first problem."""
    if body.webhook_url is not None:
        webhooks.check_url(settings, body.webhook_url)
    _check_data(body)
    base = base_models.resolve(settings, body.base_model)
    judge = base_models.resolve_judge(settings, body.evaluation.judge)[0] if body.evaluation else None
    adapters = _require_inputs(session, tenant, body)
    _check_base_model(base, [adapters[ref.adapter_id] for ref in body.adapter_refs()])
    try:  # the core's own checks, on placeholder paths
        build_spec(body, base.spec_value, lambda ident: ident, lambda ident: ident, judge=judge)
    except ValidationError as exc:
        raise InvalidInput("the job is not valid", code="invalid_request", details=_errors(exc)) from None


def _by_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == key))


def _replay(job: Job, digest: str) -> Job:
    if job.request_sha256 != digest:
        raise Conflict(
            "this Idempotency-Key was used for a different request",
            code="idempotency_conflict",
            details={"job_id": job.id},
        )
    return job


def submit(
    session: Session, settings: Settings, enqueue: Enqueue, tenant: str, body: MergeRequest, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Create and send a job; returns (job, created). Same key + same body returns the first job.

    The job is accepted once its row is committed: if the broker cannot take it now, it stays queued and the
    workers' recovery loop sends it when the broker is back (`job_state`), so a client never has to retry a
    submit that was answered. The inputs it names are locked from the final check to the commit, so that a
    concurrent delete of one of them either fails with `in_use` or makes this submit fail with `*_not_found`.
    """
    if idempotency_key is not None and not idempotency_key.strip():
        raise InvalidInput("the Idempotency-Key header is empty", code="invalid_idempotency_key")
    body = one_search_place(body)
    request = body.model_dump(mode="json")
    digest = request_sha256(request)
    if idempotency_key and (existing := _by_key(session, tenant, idempotency_key)):
        return _replay(existing, digest), False
    validate(session, settings, tenant, body)
    begin_write(session)
    _require_inputs(session, tenant, body, lock=True)
    job = Job(
        tenant_id=tenant,
        queue=settings.queue,
        request=request,
        request_sha256=digest,
        idempotency_key=idempotency_key,
        enqueued_at=utcnow(),
        publish_count=1,
    )
    job.events.append(JobEvent(kind="status", message="queued"))
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = _by_key(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest), False
    try:
        enqueue(job.id)
    except Exception:
        log.warning("job not sent: the queue is unavailable; it stays queued", exc_info=True, extra={"job_id": job.id})
        session.execute(update(Job).where(Job.id == job.id, Job.publish_count == 1).values(enqueued_at=None))
        session.add(JobEvent(job_id=job.id, kind="log", message="the job queue is unavailable; sent when it is back"))
        session.commit()
        session.refresh(job)
    log.info("job queued", extra={"tenant": tenant, "job_id": job.id, "method": body.method})
    return job, True


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant:
        raise not_found("merge", job_id)
    return job


def list_jobs(
    session: Session, tenant: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.tenant_id == tenant)
    if status:
        query = query.where(Job.status == status)
    return page_of(list(session.scalars(paginate(query, Job, limit, cursor)).all()), limit)


def cancel(session: Session, tenant: str, job_id: str) -> Job:
    """A queued job is cancelled now; a running one by its worker, between two batches of its current pass."""
    job = get_job(session, tenant, job_id)
    now = utcnow()
    queued = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now),
    )
    running = (
        0
        if queued
        else rows_changed(
            session, update(Job).where(Job.id == job.id, Job.status == "running").values(cancel_requested=True)
        )
    )
    if queued or running:
        message = "cancelled" if queued else "cancel requested"
        session.add(JobEvent(job_id=job.id, kind="status" if queued else "log", message=message))
    if queued:
        webhooks.record_terminal(session, job.id)
    session.commit()
    session.refresh(job)
    if job.status in ("succeeded", "failed"):
        raise Conflict(f"merge {job.id} already {job.status}", code="job_finished")
    log.info("job cancel", extra={"tenant": tenant, "job_id": job.id, "status": job.status})
    return job


def delete_job(session: Session, storage: Storage, tenant: str, job_id: str) -> None:
    """Delete a finished job: its row, its events and every artifact of every attempt. A queued or running job is
    refused (`job_active`): cancel it first, so that no worker is writing what this removes."""
    job = get_job(session, tenant, job_id)
    deleted = rows_changed(
        session,
        delete(Job)
        .where(Job.id == job.id, Job.status.in_(TERMINAL_STATUSES))
        .execution_options(synchronize_session=False),
    )
    if not deleted:
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"merge {job.id} is {job.status}; cancel it and wait until it stops",
            code="job_active",
            details={"status": job.status},
        )
    session.commit()
    session.expunge(job)
    remove_job_files(storage, tenant, job_id)
    log.info("job deleted", extra={"tenant": tenant, "job_id": job_id})


def remove_job_files(storage: Storage, tenant: str, job_id: str) -> None:
    """Every stored file of the job (a failure is logged: the start-up sweep removes files whose job is gone)."""
    try:
        storage.delete_prefix(artifacts.job_root(tenant, job_id))
    except StorageError:
        log.warning("job files not removed; left to the next sweep", exc_info=True, extra={"job_id": job_id})


def list_events(session: Session, job: Job, after: int, limit: int) -> tuple[list[JobEvent], str | None]:
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id > after).order_by(JobEvent.id).limit(limit + 1)
    ).all()
    page = list(rows[:limit])
    return page, (str(page[-1].id) if len(rows) > limit else None)


def status_counts(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
