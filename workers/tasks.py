"""The Celery task (a job id in, the job's outcome in the database) and the worker-process hooks, registered
on a worker app by `register_tasks`."""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from app.domain import scratch
from app.domain.bootstrap import prepare
from app.domain.db.session import session_scope
from app.domain.job_state import JobStore
from app.domain.logging_setup import configure_logging
from app.domain.queue import RUN_MERGE_TASK, JobQueue
from app.domain.retention import LOCKED_GRACE, expire_jobs
from app.domain.settings import Settings
from app.domain.storage import Storage, StorageError, get_storage
from app.domain.webhook_sender import WebhookSender
from sstmerge_core.cache import FisherCache
from sstmerge_core.pipeline import ModelCache

from .inputs import InputCache
from .runner import JobRunner

log = logging.getLogger(__name__)


class ProcessRunner:
    """The `JobRunner` of this process, made on first use: in the prefork child that runs the jobs, where the
    last base model stays loaded between jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runner: JobRunner | None = None

    def __call__(self) -> JobRunner:
        if self._runner is None:
            self._runner = JobRunner(self.settings, get_storage(self.settings), ModelCache())
        return self._runner


class Recovery:
    """The worker's recovery loop (`JobStore.recover`), every half lease in the worker's main process: jobs past
    their time limit fail, running jobs whose worker died are re-queued, and queued jobs whose message the broker
    lost are sent again; finished jobs past their retention are deleted. Every worker runs it; the conditional
    UPDATEs in the store make each action happen once however many run."""

    def __init__(self, store: JobStore, queue: JobQueue, settings: Settings, interval: float) -> None:
        self.store, self.queue, self.settings, self.interval = store, queue, settings, interval
        self._stop = threading.Event()
        self._storage: Storage | None = None

    def run_once(self) -> None:
        done = self.store.recover(self.queue.enqueue)
        for job_id in done.timed_out:
            log.warning("job failed: past its time limit", extra={"job_id": job_id})
        for job_id in done.requeued:
            log.warning("job re-queued: its worker was lost", extra={"job_id": job_id})
        if done.sent:
            log.info("jobs sent to the queue again", extra={"jobs": done.sent})
        if self.settings.job_retention_seconds is not None:
            self._storage = self._storage or get_storage(self.settings)
            expire_jobs(self.settings, self._storage)

    def run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                log.warning("recovery pass failed", exc_info=True)
            if self._stop.wait(self.interval):
                return

    def start(self) -> None:
        threading.Thread(target=self.run, name="recovery", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def sweep_worker_leftovers(settings: Settings) -> None:
    """At worker start-up: job folders of attempts that no longer run, half-fetched inputs, inputs deleted since
    they were fetched, half-written Fisher cache entries, and both caches back under their caps."""
    grace = settings.leftover_grace_seconds
    store = JobStore.from_settings(settings)
    jobs_dir = settings.resolved_work_dir / "jobs"
    folders = list(jobs_dir.iterdir()) if jobs_dir.is_dir() else []
    live = store.running_attempts([folder.name.split("-", 1)[0] for folder in folders])
    removed = scratch.remove_leftovers([f for f in folders if f.name not in live], min(grace, LOCKED_GRACE))
    inputs = InputCache(get_storage(settings), settings.resolved_work_dir / "inputs", settings.input_cache_max_bytes)
    partial = inputs.remove_leftovers(grace)
    with session_scope(settings.resolved_database_url) as session:
        inputs.prune_deleted(session)
    inputs.trim()
    fisher = FisherCache(settings.resolved_cache_dir / "fisher")
    temp = scratch.remove_leftovers(list(fisher.folder.glob("*.tmp")) if fisher.folder.is_dir() else [], grace)
    fisher.trim(settings.fisher_cache_max_bytes)
    if removed or partial or temp:
        log.info("worker leftovers removed", extra={"job_folders": len(removed), "inputs": partial, "temp": len(temp)})


def register_tasks(worker_app: Celery, settings: Settings) -> None:
    """Register `RUN_MERGE_TASK` on `worker_app`, and the hooks of the worker's main process: logging, the
    schema migration and the start-up sweep before the pool starts, and the recovery and webhook loops while it
    runs. Webhooks go out from the workers' main processes (never the pool child running a job, never the API):
    every deployment has a worker, the outbox is read from the database whichever process wrote it, and a
    receiver that is slow or down holds up no request and no job."""
    runner = ProcessRunner(settings)
    store = JobStore.from_settings(settings)
    interval = max(1.0, settings.job_lease_seconds / 2)
    recovery = Recovery(store, JobQueue(settings, worker_app), settings, interval=interval)
    webhooks = WebhookSender(settings)

    @worker_app.task(
        name=RUN_MERGE_TASK,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(OperationalError, StorageError),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=settings.task_max_retries,
        # the job's own limit is checked between batches (failed: time_limit_exceeded) and by the recovery loop;
        # this hard limit only frees a pool process stuck inside one call (it is killed and replaced)
        time_limit=settings.job_time_limit_seconds + 2 * settings.job_lease_seconds + 60,
    )
    def run_merge_job(job_id: str) -> None:
        """Run job `job_id` (idempotent: a finished, cancelled or live-owned job is left alone)."""
        runner().run(job_id)

    def _logging(**_: object) -> None:
        configure_logging(settings.log_level, settings.log_json)

    def _prepare(**_: object) -> None:
        prepare(settings)
        try:
            sweep_worker_leftovers(settings)
        except Exception:  # noqa: BLE001 - housekeeping never stops a worker from starting
            log.warning("start-up sweep incomplete", exc_info=True)

    def _start_recovery(**_: object) -> None:
        recovery.start()
        webhooks.start()

    def _stop_recovery(**_: object) -> None:
        recovery.stop()
        webhooks.stop()

    for signal, receiver in (
        (setup_logging, _logging),
        (worker_init, _prepare),
        (worker_ready, _start_recovery),
        (worker_shutdown, _stop_recovery),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=f"sstmerge.{receiver.__name__}")
