"""Job state transitions in the database, owned by one delivery at a time.

A delivery *claims* a job with one conditional UPDATE (queued, or running with a stale heartbeat) and gets a
fresh `attempt_token`; every later write names that token, so a delivery that lost its lease (its worker
stalled and another took over) can no longer change the job. This makes duplicate deliveries (Redis
visibility timeout, re-queue after worker loss) harmless.

A job is never lost: the database, not the broker, says what is to be done. `recover` (run by every worker's
recovery loop) re-queues running jobs whose worker stopped beating, fails jobs past their time limit, and sends
again every queued job that no worker claimed within a lease of its last send (the broker lost the message: a
Redis crash, a delivery whose retries ran out while the database was down, an API that died before sending).
Sends are taken with a conditional UPDATE of `publish_count`, so that one process sends each due job once however
many loops run; the wait between two sends of a job still queued doubles, from a lease up to
`republish_max_seconds`, so that a job waiting behind long ones gathers few duplicate messages (a duplicate is
dropped by `claim`).

Every change to a terminal status adds the job's webhook (if it names one) to the outbox in the same transaction
(`webhooks.record_terminal`), so that a finished job's event is never lost and never sent for a change that
was rolled back.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from typing_extensions import Self

from sstmerge_core.contracts.summary import JobSummary

from .db.models import TERMINAL_STATUSES, Job, JobEvent, utcnow
from .db.session import rows_changed, session_scope
from .settings import Settings
from .webhooks import record_terminal

log = logging.getLogger(__name__)


NON_FINITE = "non_finite_result"


def non_finite_at(value: object, path: str = "summary") -> str | None:
    """Where a JSON-like value holds a NaN or ±inf (`summary.diagnostics.x`), else None. PostgreSQL's JSON refuses
    them (the outcome could never be recorded) and SQLite's stores what no client can parse."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        if (found := non_finite_at(item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]")) is not None:
            return found
    return None


def worker_name() -> str:
    """host:pid of the process running the job (a prefork child, not the Celery main process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    tenant: str
    request: dict
    attempt: int
    started_at: datetime  # of the first attempt: the time limit counts from here


@dataclass(frozen=True)
class Recovery:
    """What one pass of `JobStore.recover` did (job ids)."""

    requeued: list[str]
    timed_out: list[str]
    sent: list[str]


TIME_LIMIT = "time_limit_exceeded"


class JobStore:
    def __init__(
        self,
        database_url: str,
        lease_seconds: float,
        max_attempts: int,
        *,
        time_limit_seconds: float = 6 * 3600.0,
        republish_max_seconds: float = 900.0,
    ) -> None:
        self.url, self.lease, self.max_attempts = database_url, timedelta(seconds=lease_seconds), max_attempts
        self.time_limit = timedelta(seconds=time_limit_seconds)
        self.republish_max = timedelta(seconds=republish_max_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls(
            settings.resolved_database_url,
            settings.job_lease_seconds,
            settings.max_attempts,
            time_limit_seconds=settings.job_time_limit_seconds,
            republish_max_seconds=settings.republish_max_seconds,
        )

    def time_limit_message(self) -> str:
        return f"the job ran longer than its time limit of {self.time_limit.total_seconds():g} s"

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        stale = now - self.lease
        return or_(
            Job.status == "queued",
            and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale)),
        )

    def claim(self, job_id: str) -> Claim | None:
        """Take the job for this delivery, or None if it is finished, cancelled or owned by a live worker."""
        now, token = utcnow(), uuid.uuid4().hex
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            if job is None or job.status in TERMINAL_STATUSES:
                log.info("delivery dropped", extra={"job_id": job_id, "status": job and job.status})
                return None
            if job.started_at is not None and now - job.started_at > self.time_limit:
                if self._fail_where(session, job_id, self._claimable(now), TIME_LIMIT, self.time_limit_message()):
                    log.warning("job past its time limit failed", extra={"job_id": job_id})
                return None
            if job.attempts >= self.max_attempts:
                failed = rows_changed(
                    session,
                    update(Job)
                    .where(Job.id == job_id, self._claimable(now))
                    .values(
                        status="failed",
                        error_code="worker_lost",
                        finished_at=now,
                        error_message=(
                            f"the job was started {job.attempts} times and its worker was lost each time "
                            "(out of memory or killed?)"
                        ),
                    ),
                )
                if failed:
                    session.add(JobEvent(job_id=job_id, kind="status", message="failed: worker_lost"))
                    record_terminal(session, job_id)
                return None
            taken = rows_changed(
                session,
                update(Job)
                .where(Job.id == job_id, self._claimable(now))
                .values(
                    status="running",
                    attempts=Job.attempts + 1,
                    attempt_token=token,
                    worker=worker_name(),
                    heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now),
                    stage="starting",
                    percent=0.0,
                ),
            )
            if not taken:
                log.info("delivery dropped: job owned by a live worker", extra={"job_id": job_id})
                return None
            session.refresh(job)
            session.add(
                JobEvent(job_id=job_id, kind="status", message=f"running (attempt {job.attempts}, worker {job.worker})")
            )
            return Claim(job_id, token, job.tenant_id, dict(job.request), job.attempts, job.started_at or now)

    @staticmethod
    def _fail_where(session: Session, job_id: str, condition: ColumnElement[bool], code: str, message: str) -> bool:
        """Fail the job if `condition` still holds (one conditional UPDATE); returns whether it did."""
        failed = rows_changed(
            session,
            update(Job)
            .where(Job.id == job_id, condition)
            .values(status="failed", error_code=code, error_message=message, finished_at=utcnow()),
        )
        if failed:
            session.add(JobEvent(job_id=job_id, kind="status", message=f"failed: {code}: {message}"[:2000]))
            record_terminal(session, job_id)
        return bool(failed)

    def beat(self, claim: Claim) -> tuple[bool, bool]:
        """Refresh the heartbeat; returns (still owned, cancel requested)."""
        with session_scope(self.url) as session:
            owned = rows_changed(
                session,
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token, Job.status == "running")
                .values(heartbeat_at=utcnow()),
            )
            cancel = session.scalar(select(Job.cancel_requested).where(Job.id == claim.job_id))
        return bool(owned), bool(cancel)

    def progress(self, claim: Claim, stage: str, percent: float, new_stage: bool) -> None:
        with session_scope(self.url) as session:
            owned = rows_changed(
                session,
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token)
                .values(stage=stage, percent=percent, heartbeat_at=utcnow()),
            )
            if owned and new_stage:
                session.add(
                    JobEvent(job_id=claim.job_id, kind="stage", stage=stage, percent=percent, message=f"stage {stage}")
                )

    def record_event(self, claim: Claim, kind: str, message: str) -> None:
        """An event of the job (e.g. a search trial) while this delivery owns it."""
        with session_scope(self.url) as session:
            owned = session.scalar(
                select(func.count()).select_from(Job).where(Job.id == claim.job_id, Job.attempt_token == claim.token)
            )
            if owned:
                session.add(JobEvent(job_id=claim.job_id, kind=kind, message=message[:2000]))

    def finish(
        self,
        claim: Claim,
        status: str,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        summary: JobSummary | None = None,
        artifact_prefix: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record the outcome if this delivery still owns the job; returns whether it did. The summary is stored as
        its model's JSON dump. `reason` goes into the status event only (why a job was cancelled: where it stopped).
        A success whose summary holds a non-finite number is recorded as failed (`non_finite_result`), never stored
        as such."""
        stored = summary.model_dump(mode="json") if summary is not None else None
        if status == "succeeded" and (where := non_finite_at(stored)) is not None:
            status, error_code, stored = "failed", NON_FINITE, None
            error_message = f"the job's result holds a non-finite value ({where}); nothing is served"
        values = {
            "status": status,
            "finished_at": utcnow(),
            "error_code": error_code,
            "error_message": error_message,
            "heartbeat_at": utcnow(),
        }
        if status == "succeeded":
            values |= {"summary": stored, "artifact_prefix": artifact_prefix, "percent": 100.0, "stage": "done"}
        with session_scope(self.url) as session:
            owned = rows_changed(
                session,
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token, Job.status == "running")
                .values(**values),
            )
            if owned:
                message = ": ".join(part for part in (status, error_code, error_message or reason) if part)
                session.add(JobEvent(job_id=claim.job_id, kind="status", message=message[:2000]))
                record_terminal(session, claim.job_id)
        log.info(
            "job finished" if owned else "outcome discarded: lease lost",
            extra={"job_id": claim.job_id, "status": status, "error_code": error_code, "attempt": claim.attempt},
        )
        return bool(owned)

    def requeue_stale(self) -> list[str]:
        """Running jobs whose worker stopped beating go back to `queued`, to be sent now (`enqueued_at` NULL)."""
        now = utcnow()
        requeued = []
        with session_scope(self.url) as session:
            stale = session.scalars(
                select(Job.id).where(Job.status == "running", Job.heartbeat_at < now - self.lease)
            ).all()
            for job_id in stale:
                done = rows_changed(
                    session,
                    update(Job)
                    .where(Job.id == job_id, self._claimable(now), Job.status == "running")
                    .values(status="queued", attempt_token=None, worker=None, enqueued_at=None),
                )
                if done:
                    session.add(JobEvent(job_id=job_id, kind="status", message="worker lost; re-queued"))
                    requeued.append(job_id)
        return requeued

    def running_attempts(self, job_ids: list[str]) -> set[str]:
        """`<job id>-<attempt token>` of those of `job_ids` that are running (their work folders are in use)."""
        if not job_ids:
            return set()
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Job.id, Job.attempt_token).where(Job.id.in_(job_ids), Job.status == "running")
            ).all()
        return {f"{job_id}-{token}" for job_id, token in rows}

    def fail_overdue(self) -> list[str]:
        """Jobs past their time limit (plus a lease, for the worker's own check to act first) fail: this catches a
        worker stuck inside one call, whose heartbeat thread still beats."""
        cutoff = utcnow() - self.time_limit - self.lease
        overdue = Job.status.in_(("queued", "running")) & (Job.started_at < cutoff)
        failed = []
        with session_scope(self.url) as session:
            for job_id in session.scalars(select(Job.id).where(overdue)).all():
                if self._fail_where(session, job_id, overdue, TIME_LIMIT, self.time_limit_message()):
                    failed.append(job_id)
        return failed

    def send_interval(self, publish_count: int) -> timedelta:
        """Wait after the `publish_count`-th send before the next: a lease, doubling, at most `republish_max`."""
        return min(self.lease * 2 ** min(max(publish_count - 1, 0), 30), self.republish_max)

    def due_to_send(self) -> list[tuple[str, str, int]]:
        """(id, queue, publish_count) of the queued jobs to send now: re-queued ones, and those that no worker
        claimed within `send_interval` of their last send."""
        now = utcnow()
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Job.id, Job.queue, Job.publish_count, Job.enqueued_at).where(
                    Job.status == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - self.lease)
                )
            ).all()
        return [
            (job_id, queue, count)
            for job_id, queue, count, sent in rows
            if sent is None or sent < now - self.send_interval(count)
        ]

    def take_send(self, job_id: str, publish_count: int) -> bool:
        """Record a send of a queued job seen with `publish_count`; False when another process took it first or the
        job is no longer queued (a compare-and-set on `publish_count`)."""
        with session_scope(self.url) as session:
            taken = rows_changed(
                session,
                update(Job)
                .where(Job.id == job_id, Job.status == "queued", Job.publish_count == publish_count)
                .values(enqueued_at=utcnow(), publish_count=publish_count + 1),
            )
        return bool(taken)

    def undo_send(self, job_id: str, publish_count: int) -> None:
        """The send recorded by `take_send(job_id, publish_count)` failed: make the job due again."""
        with session_scope(self.url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued", Job.publish_count == publish_count + 1)
                .values(enqueued_at=None, publish_count=publish_count)
            )

    def send_due(self, send: Callable[[str, str], None]) -> list[str]:
        """Send every due job once (`send(job_id, queue)`); a failed send leaves the job due and ends the pass (the
        broker is down: the next pass tries again). Returns the sent ids."""
        sent = []
        for job_id, queue, count in self.due_to_send():
            if not self.take_send(job_id, count):
                continue
            try:
                send(job_id, queue)
            except Exception:
                log.warning("send failed; the job stays due", exc_info=True, extra={"job_id": job_id})
                self.undo_send(job_id, count)
                break
            sent.append(job_id)
        return sent

    def recover(self, send: Callable[[str, str], None]) -> Recovery:
        """One pass of the recovery loop: time limits, lost workers, lost messages."""
        timed_out = self.fail_overdue()
        requeued = self.requeue_stale()
        return Recovery(requeued=requeued, timed_out=timed_out, sent=self.send_due(send))


class Heartbeat:
    """Background thread that keeps a claim's lease alive and mirrors its cancel flag; `should_cancel` is also true
    once the job's time limit has passed (`timed_out`)."""

    def __init__(self, store: JobStore, claim: Claim, interval: float) -> None:
        self.store, self.claim, self.interval = store, claim, interval
        self.cancel_requested = self.lost = self.timed_out = False
        remaining = (claim.started_at + store.time_limit - utcnow()).total_seconds()
        self._deadline = time.monotonic() + remaining
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                owned, cancel = self.store.beat(self.claim)
            except Exception:
                log.warning("heartbeat failed", exc_info=True, extra={"job_id": self.claim.job_id})
                continue
            self.cancel_requested, self.lost = cancel, not owned

    def should_cancel(self) -> bool:
        """True once the user cancelled, another delivery took the job over, or the time limit passed (read fresh;
        the core calls this between stages and every few seconds within one)."""
        if time.monotonic() >= self._deadline:
            self.timed_out = True
            return True
        try:
            owned, cancel = self.store.beat(self.claim)
            self.cancel_requested, self.lost = cancel, not owned
        except Exception:
            log.warning("cancel check failed", exc_info=True, extra={"job_id": self.claim.job_id})
        return self.cancel_requested or self.lost

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class ProgressWriter:
    """The `progress(stage, fraction)` callback of `run_merge`: throttled writes, an event per new stage. Progress
    is best effort: a database that is briefly unreachable does not stop the job."""

    def __init__(self, store: JobStore, claim: Claim, min_interval: float = 1.0) -> None:
        self.store, self.claim, self.min_interval = store, claim, min_interval
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        new_stage = stage != self._stage
        now = time.monotonic()
        if not new_stage and now - self._last < self.min_interval:
            return
        try:
            self.store.progress(self.claim, stage, round(100.0 * fraction, 1), new_stage)
        except SQLAlchemyError:
            log.warning("progress not recorded", exc_info=True, extra={"job_id": self.claim.job_id, "stage": stage})
            return
        self._stage, self._last = stage, now
