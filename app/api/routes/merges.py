from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from sstmerge_core.contracts.metrics import Metrics
from sstmerge_core.contracts.search_report import SearchReport

from ...domain import artifacts
from ...domain import merges as service
from ...domain.requests import JobStatus, MergeRequest, method_error
from ...domain.storage import Storage
from .. import watch
from ..deps import DbDep, EngineDep, MetricsDep, QueueDep, SettingsDep, StorageDep, TenantDep
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


REPORT_HTML_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"
"""report.html runs nothing and fetches nothing: inline CSS and a data: image only, in a sandbox."""


def _stream(
    storage: Storage, key: str, media_type: str, filename: str | None = None, extra: dict[str, str] | None = None
) -> StreamingResponse:
    headers = dict(extra or {})
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
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=r"^[\x20-\x7e]*$")] = None,
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


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="A job: status, progress, outcome (long-poll with `wait`)",
    description="Every answer carries the job's version as `ETag`. With `wait=SECONDS` (at most 60) the request "
    "is held until the job differs from the version named in `If-None-Match` (without that header: from the job "
    "as it was when the request arrived), the job is finished, or the time is up, whichever comes first: one "
    "request per change instead of a polling loop. When `If-None-Match` names the current version the answer is "
    "304 without a body (also without `wait`).",
    responses={304: {"description": "the job is still at the version named in `If-None-Match`"}},
)
async def get_merge(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    engine: EngineDep,
    wait: Annotated[
        float | None,
        Query(ge=0, le=watch.MAX_WAIT_SECONDS, allow_inf_nan=False, description="seconds to wait for a change"),
    ] = None,
    if_none_match: Annotated[
        str | None, Header(max_length=1000, description="the `ETag` of the version the client has")
    ] = None,
) -> Response:
    state = await run_in_threadpool(watch.read_job, engine, tenant, job_id)
    if wait:
        state = await watch.wait_for_change(engine, tenant, job_id, state, if_none_match or state.etag, wait, request)
    return watch.job_response(state, if_none_match)


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description="A queued job is cancelled at once (200); a running one stops within seconds, between two "
    "batches of its current pass (202, `cancel_requested` is true until the worker stops it).",
    responses={202: {"model": JobOut}},
)
def cancel_merge(job_id: str, response: Response, tenant: TenantDep, db: DbDep) -> JobOut:
    job = service.cancel(db, tenant, job_id)
    response.status_code = 202 if job.status == "running" else 200
    return JobOut.from_job(job)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a finished job",
    description="Removes the job, its events and every artifact. A queued or running job is refused with 409 "
    "`job_active`: cancel it first and delete it once it is `cancelled`.",
    responses={409: {"description": "the job is queued or running (`job_active`)"}},
)
def delete_merge(job_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> Response:
    service.delete_job(db, storage, tenant, job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    response_model=Page[EventOut],
    summary="Status and stage events, oldest first (a live stream with `follow=true`)",
    description="A page of the events after `cursor`. With `follow=true` the answer is a stream of server-sent "
    "events (`text/event-stream`) instead: every recorded event after `cursor` (or after the `Last-Event-ID` "
    "header, which a reconnecting EventSource sends) once, as it is recorded, with `id:` its id and `event:` its "
    "kind (`status`, `stage`, `log`) and the event as JSON; an `event: progress` with `{status, stage, percent}` "
    "whenever those change; a `: ping` comment every 15 s without events; and, once the job is finished and its "
    "last event sent, an `event: end` with the job as JSON, after which the stream closes. A job with a `webhook_url` "
    "gets a `webhook` event per delivery attempt after its end (JSON: `webhook_id`, `attempt`, `outcome`, "
    "`status_code`, `error`, `next_attempt_at`): read those with a page request.",
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: 7\nevent: stage\ndata: {"id": 7, "kind": "stage", "stage": "fisher", ...}\n\n',
                }
            }
        }
    },
)
async def list_events(
    job_id: str,
    tenant: TenantDep,
    engine: EngineDep,
    cursor: int = Query(0, ge=0, le=2**31 - 1),
    limit: int = Query(200, ge=1, le=1000, description="page size (not used with `follow`)"),
    follow: bool = Query(False, description="stream events as server-sent events until the job is finished"),
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=2**31 - 1, description="with `follow`: resume after this event id (overrides `cursor`)"),
    ] = None,
) -> Page[EventOut] | Response:
    if not follow:
        _, events, next_cursor = await run_in_threadpool(watch.read_events, engine, tenant, job_id, cursor, limit)
        return Page(items=[EventOut.model_validate(e) for e in events], next_cursor=next_cursor)
    await run_in_threadpool(watch.read_job, engine, tenant, job_id)  # 404 before the stream starts
    after = cursor if last_event_id is None else last_event_id
    stopping = anyio.Event()  # set by sse-starlette when the server shuts down; the stream then ends cleanly
    return EventSourceResponse(
        watch.event_stream(engine, tenant, job_id, after, stopping),
        ping=watch.HEARTBEAT_SECONDS,
        shutdown_event=stopping,
        shutdown_grace_period=2 * watch.POLL_SECONDS,
    )


@dataclass(frozen=True)
class ArtifactRoute:
    """A file of a job's results served as stored: `GET /merges/{job_id}/<path>` streams `artifact` (its name in the
    job's artifact folder, `app.domain.artifacts`) as `media_type`, with `headers`; `name` is the endpoint's name
    (and so its OpenAPI operation id)."""

    path: str
    artifact: str
    name: str
    media_type: str
    summary: str
    description: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    model: type[BaseModel] | None = None
    """The stored document's contract (`sstmerge_core.contracts`), for the OpenAPI document's response schema."""


JSON = "application/json"
ARTIFACT_ROUTES = (
    ArtifactRoute("metrics", artifacts.METRICS, "get_metrics", JSON, "metrics.json of the evaluation", model=Metrics),
    ArtifactRoute(
        "report", artifacts.REPORT, "get_report", JSON, "merge_report.json (per-module spectra and retained energy)"
    ),
    ArtifactRoute(
        "search",
        artifacts.SEARCH_REPORT,
        "get_search_report",
        JSON,
        "search_report.json of a search job (docs/search.md)",
        "The chosen recipe with its search- and report-split numbers and its comparison with linear at the same "
        "safety, the Pareto set and linear's front on the report split, and the split sizes.",
        model=SearchReport,
    ),
    ArtifactRoute(
        "trials",
        artifacts.TRIALS,
        "get_trials",
        JSON,
        "trials.json of a search job: every trial's recipe and search-split scores",
    ),
    ArtifactRoute(
        "plot.png", artifacts.PLOT, "get_plot", "image/png", "Safety vs utility plot of every evaluated point"
    ),
    ArtifactRoute(
        "report.html",
        artifacts.HTML,
        "get_report_html",
        "text/html; charset=utf-8",
        "The job's report as one self-contained HTML page",
        "The recommendation with its rule, the price of safety, every evaluated model with its intervals, the plot, "
        "sample answers, the search's trials and matched-safety comparison (a search job) and the inputs with their "
        "sha256. Inline CSS and a data: image only: no script, nothing fetched (its Content-Security-Policy forbids "
        "both).",
        (("Content-Security-Policy", REPORT_HTML_POLICY), ("X-Content-Type-Options", "nosniff")),
    ),
)


def _artifact_endpoint(route: ArtifactRoute) -> Callable[..., StreamingResponse]:
    def endpoint(job_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> StreamingResponse:
        key = artifacts.artifact_key(service.get_job(db, tenant, job_id), route.artifact)
        return _stream(storage, key, route.media_type, extra=dict(route.headers))

    return endpoint


for _route in ARTIFACT_ROUTES:
    _response: dict[str, Any] = {"content": {_route.media_type.partition(";")[0]: {}}}
    if _route.model is not None:
        _response["model"] = _route.model
    router.add_api_route(
        f"/{{job_id}}/{_route.path}",
        _artifact_endpoint(_route),
        methods=["GET"],
        name=_route.name,
        summary=_route.summary,
        description=_route.description or "",
        responses={200: _response},
    )


@router.get(
    "/{job_id}/adapter",
    summary="The merged PEFT adapter as a zip",
    description="Without `alpha`: the only α of the job, else the recommended one (a search job: the chosen "
    "recipe's adapter). `method` selects a comparison baseline (`compare_with`) instead of the job's method.",
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
