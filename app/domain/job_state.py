"""Job state transitions in the database, owned by one delivery at a time.

A delivery *claims* a job with one conditional UPDATE (queued, or running with a stale heartbeat) and gets a
fresh `attempt_token`; every later write names that token, so a delivery that lost its lease (its worker
stalled and another took over) can no longer change the job. This makes duplicate deliveries (Redis
visibility timeout, re-queue after worker loss) harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from typing_extensions import Self

from .db.models import TERMINAL_STATUSES, Job, JobEvent, utcnow
from .db.session import session_scope

log = logging.getLogger(__name__)


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


class JobStore:
    def __init__(self, database_url: str, lease_seconds: float, max_attempts: int) -> None:
        self.url, self.lease, self.max_attempts = database_url, timedelta(seconds=lease_seconds), max_attempts

    def _claimable(self, now):
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
            if job.attempts >= self.max_attempts:
                failed = session.execute(
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
                    )
                ).rowcount
                if failed:
                    session.add(JobEvent(job_id=job_id, kind="status", message="failed: worker_lost"))
                return None
            taken = session.execute(
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
                )
            ).rowcount
            if not taken:
                log.info("delivery dropped: job owned by a live worker", extra={"job_id": job_id})
                return None
            session.refresh(job)
            session.add(
                JobEvent(job_id=job_id, kind="status", message=f"running (attempt {job.attempts}, worker {job.worker})")
            )
            return Claim(job_id, token, job.tenant_id, dict(job.request), job.attempts)

    def beat(self, claim: Claim) -> tuple[bool, bool]:
        """Refresh the heartbeat; returns (still owned, cancel requested)."""
        with session_scope(self.url) as session:
            owned = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token, Job.status == "running")
                .values(heartbeat_at=utcnow())
            ).rowcount
            cancel = session.scalar(select(Job.cancel_requested).where(Job.id == claim.job_id))
        return bool(owned), bool(cancel)

    def progress(self, claim: Claim, stage: str, percent: float, new_stage: bool) -> None:
        with session_scope(self.url) as session:
            owned = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token)
                .values(stage=stage, percent=percent, heartbeat_at=utcnow())
            ).rowcount
            if owned and new_stage:
                session.add(
                    JobEvent(job_id=claim.job_id, kind="stage", stage=stage, percent=percent, message=f"stage {stage}")
                )

    def finish(
        self,
        claim: Claim,
        status: str,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        summary: dict | None = None,
        artifact_prefix: str | None = None,
    ) -> bool:
        """Record the outcome if this delivery still owns the job; returns whether it did."""
        values = {
            "status": status,
            "finished_at": utcnow(),
            "error_code": error_code,
            "error_message": error_message,
            "heartbeat_at": utcnow(),
        }
        if status == "succeeded":
            values |= {"summary": summary, "artifact_prefix": artifact_prefix, "percent": 100.0, "stage": "done"}
        with session_scope(self.url) as session:
            owned = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.attempt_token == claim.token, Job.status == "running")
                .values(**values)
            ).rowcount
            if owned:
                message = status if error_code is None else f"{status}: {error_code}: {error_message}"
                session.add(JobEvent(job_id=claim.job_id, kind="status", message=message[:2000]))
        log.info(
            "job finished" if owned else "outcome discarded: lease lost",
            extra={"job_id": claim.job_id, "status": status, "error_code": error_code, "attempt": claim.attempt},
        )
        return bool(owned)

    def requeue_stale(self) -> list[tuple[str, str]]:
        """Running jobs whose worker stopped beating go back to `queued`; returns (id, queue) pairs to re-send."""
        now = utcnow()
        requeued = []
        with session_scope(self.url) as session:
            stale = session.execute(
                select(Job.id, Job.queue).where(Job.status == "running", Job.heartbeat_at < now - self.lease)
            ).all()
            for job_id, queue in stale:
                done = session.execute(
                    update(Job)
                    .where(Job.id == job_id, self._claimable(now), Job.status == "running")
                    .values(status="queued", attempt_token=None, worker=None)
                ).rowcount
                if done:
                    session.add(JobEvent(job_id=job_id, kind="status", message="worker lost; re-queued"))
                    requeued.append((job_id, queue))
        return requeued


class Heartbeat:
    """Background thread that keeps a claim's lease alive and mirrors its cancel flag."""

    def __init__(self, store: JobStore, claim: Claim, interval: float) -> None:
        self.store, self.claim, self.interval = store, claim, interval
        self.cancel_requested = self.lost = False
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
        """True once the user cancelled or another delivery took the job over (read fresh: called only at
        stage boundaries)."""
        try:
            owned, cancel = self.store.beat(self.claim)
            self.cancel_requested, self.lost = cancel, not owned
        except Exception:
            log.warning("cancel check failed", exc_info=True, extra={"job_id": self.claim.job_id})
        return self.cancel_requested or self.lost

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class ProgressWriter:
    """The `progress(stage, fraction)` callback of `run_merge`: throttled writes, an event per new stage."""

    def __init__(self, store: JobStore, claim: Claim, min_interval: float = 1.0) -> None:
        self.store, self.claim, self.min_interval = store, claim, min_interval
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        new_stage = stage != self._stage
        now = time.monotonic()
        if not new_stage and now - self._last < self.min_interval:
            return
        self._stage, self._last = stage, now
        self.store.progress(self.claim, stage, round(100.0 * fraction, 1), new_stage)
