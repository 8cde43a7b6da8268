from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from ...domain import artifacts
from ...domain import merges as service
from ...domain.requests import JobStatus, MergeRequest, method_error
from ...domain.storage import Storage
from ..deps import DbDep, MetricsDep, QueueDep, SettingsDep, StorageDep, TenantDep
from ..schemas import EventOut, JobOut, Page


class MergeRoute(APIRoute):
    """A body whose only problems are its method or `params` gets the domain's code (`unknown_method`,
    `invalid_params`) instead of the generic `validation_error`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                raise method_error(exc.errors(), exc.body, root=("body",)) or exc from None

        return handler


router = APIRouter(prefix="/merges", tags=["merges"], route_class=MergeRoute)


def _stream(storage: Storage, key: str, media_type: str, filename: str | None = None) -> StreamingResponse:
    headers = {}
    if (size := storage.size(key)) is not None:
        headers["Content-Length"] = str(size)
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(storage.iter_bytes(key), media_type=media_type, headers=headers)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a merge job",
    responses={
        200: {"model": JobOut, "description": "replay of an earlier request with the same Idempotency-Key"},
        409: {"description": "Idempotency-Key reused with another body"},
    },
)
def create_merge(
    body: MergeRequest,
    response: Response,
    tenant: TenantDep,
    db: DbDep,
    settings: SettingsDep,
    queue: QueueDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    job, created = service.submit(db, settings, queue.enqueue, tenant, body, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/merges/{job.id}"
    if created:
        metrics.jobs_submitted.inc()
    return JobOut.from_job(job)


@router.get("", response_model=Page[JobOut], summary="List jobs, newest first")
def list_merges(
    tenant: TenantDep,
    db: DbDep,
    status: JobStatus | None = None,
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = None,
) -> Page[JobOut]:
    jobs, next_cursor = service.list_jobs(db, tenant, status, limit, cursor)
    return Page(items=[JobOut.from_job(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_merge(job_id: str, tenant: TenantDep, db: DbDep) -> JobOut:
    return JobOut.from_job(service.get_job(db, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description="A queued job is cancelled at once (200); a running one stops at its next stage "
    "boundary (202, `cancel_requested` is true until the worker stops it).",
    responses={202: {"model": JobOut}},
)
def cancel_merge(job_id: str, response: Response, tenant: TenantDep, db: DbDep) -> JobOut:
    job = service.cancel(db, tenant, job_id)
    response.status_code = 202 if job.status == "running" else 200
    return JobOut.from_job(job)


@router.get("/{job_id}/events", response_model=Page[EventOut], summary="Status and progress events, oldest first")
def list_events(
    job_id: str, tenant: TenantDep, db: DbDep, cursor: int = Query(0, ge=0), limit: int = Query(200, ge=1, le=1000)
) -> Page[EventOut]:
    events, next_cursor = service.list_events(db, service.get_job(db, tenant, job_id), cursor, limit)
    return Page(items=[EventOut.model_validate(e) for e in events], next_cursor=next_cursor)


@router.get(
    "/{job_id}/metrics",
    summary="metrics.json of the evaluation",
    responses={200: {"content": {"application/json": {}}}},
)
def get_metrics(job_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> StreamingResponse:
    key = artifacts.artifact_key(service.get_job(db, tenant, job_id), artifacts.METRICS)
    return _stream(storage, key, "application/json")


@router.get(
    "/{job_id}/report",
    summary="merge_report.json (per-module spectra and retained energy)",
    responses={200: {"content": {"application/json": {}}}},
)
def get_report(job_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> StreamingResponse:
    key = artifacts.artifact_key(service.get_job(db, tenant, job_id), artifacts.REPORT)
    return _stream(storage, key, "application/json")


@router.get(
    "/{job_id}/adapter",
    summary="The merged PEFT adapter as a zip",
    description="Without `alpha`: the only α of the job, else the recommended one. `method` selects a "
    "comparison baseline (`compare_with`) instead of the job's method.",
    responses={200: {"content": {"application/zip": {}}}},
)
def get_adapter(
    job_id: str,
    tenant: TenantDep,
    db: DbDep,
    storage: StorageDep,
    alpha: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    method: str | None = None,
) -> StreamingResponse:
    key, filename = artifacts.adapter_key(service.get_job(db, tenant, job_id), alpha, method)
    return _stream(storage, key, "application/zip", filename)


@router.get(
    "/{job_id}/plot.png",
    summary="Safety vs utility plot of every evaluated point",
    responses={200: {"content": {"image/png": {}}}},
)
def get_plot(job_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> StreamingResponse:
    key = artifacts.artifact_key(service.get_job(db, tenant, job_id), artifacts.PLOT)
    return _stream(storage, key, "image/png")
