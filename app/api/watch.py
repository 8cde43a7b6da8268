"""Waiting for a job with one request: the long-poll of `GET /merges/{id}?wait=` and the event stream of
`GET /merges/{id}/events?follow=true`.

Both re-read the job every `POLL_SECONDS` on a pooled connection taken for that read only, so no database
connection is held between reads, and run those reads on a thread limiter of their own (`WAIT_THREADS`), so
waiting clients never take the threads that run the sync endpoints. Between reads they only sleep on the event
loop.

A job's version is the ETag of its JSON representation: any visible change (status, stage, percent, cancel
flag, attempts, outcome) gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi import Request, Response
from sqlalchemy import Engine, Row
from sqlalchemy.orm import Session
from sse_starlette import ServerSentEvent
from sse_starlette.sse import AppStatus

from ..domain import merges as service
from ..domain.db.models import TERMINAL_STATUSES, Job, JobEvent
from ..domain.errors import DomainError
from ..domain.job_reads import job_row
from .errors import error_body
from .schemas import EventOut, JobOut

POLL_SECONDS = 0.5
"""Time between two reads of a waited-for job (the worker records progress at most once a second)."""
MAX_WAIT_SECONDS = 60.0
"""Longest long-poll: a proxy or client timeout of a minute or more is common."""
HEARTBEAT_SECONDS = 15.0
"""An event stream sends a comment line after this long without an event, so idle proxies keep it open."""
RETRY_MS = 2000
"""Reconnection delay the event stream asks of its clients (SSE `retry:`)."""
EVENT_BATCH = 200
WAIT_THREADS = 16
_limiter = anyio.CapacityLimiter(WAIT_THREADS)
T = TypeVar("T")


@dataclass(frozen=True)
class JobState:
    """A job as the API shows it: the JSON body, its ETag and whether it can still change."""

    body: bytes
    etag: str
    status: str
    stage: str | None
    percent: float

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def of(cls, job: Job | Row) -> JobState:
        body = JobOut.from_job(job).model_dump_json().encode()
        etag = f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"'
        return cls(body, etag, job.status, job.stage, job.percent)


def read_job(engine: Engine, tenant: str, job_id: str) -> JobState:
    """The job now (blocking; `NotFound` for another tenant's or a missing job)."""
    return JobState.of(job_row(engine, tenant, job_id))


def read_events(
    engine: Engine, tenant: str, job_id: str, after: int, limit: int
) -> tuple[JobState, list[JobEvent], str | None]:
    """The job, then up to `limit` of its events after id `after` (blocking). The job is read first: a job seen
    finished has its final event recorded too (they are committed together)."""
    with Session(engine) as session:
        job = service.get_job(session, tenant, job_id)
        state = JobState.of(job)
        events, next_cursor = service.list_events(session, job, after, limit)
        return state, events, next_cursor


async def in_wait_thread(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking read on the waiting endpoints' own threads."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=_limiter)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of `If-None-Match` (a list, `*`, `W/` prefixes) with `etag`."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def server_stopping() -> bool:
    """The server is shutting down (SIGTERM/SIGINT): waits end early so that shutdown is not held up. Read from
    sse-starlette's flag, set when uvicorn handles the signal, or from the uvicorn server that owns the signal
    handler (its flag when the application was imported after the handler was installed: `serve --workers`)."""
    if AppStatus.should_exit:
        return True
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def wait_for_change(
    engine: Engine, tenant: str, job_id: str, state: JobState, known: str, seconds: float, request: Request
) -> JobState:
    """Re-read the job until its ETag differs from `known`, it is finished, `seconds` have passed, the client has
    gone or the server is stopping; returns the last state read."""
    deadline = time.monotonic() + seconds
    while state.etag == known and not state.terminal:
        left = deadline - time.monotonic()
        if left <= 0 or server_stopping() or await request.is_disconnected():
            break
        await anyio.sleep(min(POLL_SECONDS, left))
        state = await in_wait_thread(read_job, engine, tenant, job_id)
    return state


def job_response(state: JobState, if_none_match: str | None) -> Response:
    """200 with the job and its ETag, or 304 when the client's `If-None-Match` names the current version."""
    headers = {"ETag": state.etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, state.etag):
        return Response(status_code=304, headers=headers)
    return Response(state.body, media_type="application/json", headers=headers)


def _event(event: JobEvent) -> ServerSentEvent:
    return ServerSentEvent(EventOut.model_validate(event).model_dump_json(), event=event.kind, id=str(event.id))


def _progress(state: JobState) -> ServerSentEvent:
    return ServerSentEvent(
        json.dumps({"status": state.status, "stage": state.stage, "percent": state.percent}), event="progress"
    )


def _error(exc: DomainError) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(error_body(exc.code, exc.message, exc.details)), event="error")


async def event_stream(
    engine: Engine, tenant: str, job_id: str, after: int, stopping: anyio.Event
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events of a job from event id `after`: each recorded event once (`id:` its id, `event:` its
    kind), a `progress` event when status, stage or percent change, and a final `end` event with the job once
    it is finished and every event was sent. When `stopping` is set (the server is shutting down) the stream
    ends cleanly without `end`, and the client reconnects after the last id it received."""
    yield ServerSentEvent(retry=RETRY_MS)
    shown: tuple | None = None
    while not stopping.is_set():
        try:
            state, events, more = await in_wait_thread(read_events, engine, tenant, job_id, after, EVENT_BATCH)
        except DomainError as exc:  # the job was deleted meanwhile
            yield _error(exc)
            return
        for event in events:
            yield _event(event)
            after = event.id
        if more:
            continue
        if (state.status, state.stage, state.percent) != shown:
            shown = (state.status, state.stage, state.percent)
            yield _progress(state)
        if state.terminal:
            yield ServerSentEvent(state.body.decode(), event="end")
            return
        await anyio.sleep(POLL_SECONDS)
