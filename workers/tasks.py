"""The Celery task (a job id in, the job's outcome in the database) and the worker-process hooks, registered
on a worker app by `register_tasks`."""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from app.domain.bootstrap import prepare
from app.domain.job_state import JobStore
from app.domain.logging_setup import configure_logging
from app.domain.queue import RUN_MERGE_TASK, JobQueue
from app.domain.settings import Settings
from app.domain.storage import StorageError, get_storage
from sstmerge_core.pipeline import ModelCache

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


class Reaper:
    """Re-queues jobs whose worker died (brokers such as kombu's SQL transport do not re-deliver them)."""

    def __init__(self, store: JobStore, queue: JobQueue, interval: float) -> None:
        self.store, self.queue, self.interval = store, queue, interval
        self._stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                for job_id, queue in self.store.requeue_stale():
                    self.queue.enqueue(job_id, queue)
                    log.warning("re-queued a job whose worker was lost", extra={"job_id": job_id})
            except Exception:
                log.warning("reaper pass failed", exc_info=True)
            if self._stop.wait(self.interval):
                return

    def start(self) -> None:
        threading.Thread(target=self.run, name="reaper", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def register_tasks(worker_app: Celery, settings: Settings) -> None:
    """Register `RUN_MERGE_TASK` on `worker_app`, and the hooks of the worker's main process: logging, the
    schema migration before the pool starts, and the reaper while it runs."""
    runner = ProcessRunner(settings)
    store = JobStore(settings.resolved_database_url, settings.job_lease_seconds, settings.max_attempts)
    reaper = Reaper(store, JobQueue(settings, worker_app), interval=max(1.0, settings.job_lease_seconds / 2))

    @worker_app.task(
        name=RUN_MERGE_TASK,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(OperationalError, StorageError),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=5,
    )
    def run_merge_job(job_id: str) -> None:
        """Run job `job_id` (idempotent: a finished, cancelled or live-owned job is left alone)."""
        runner().run(job_id)

    def _logging(**_) -> None:
        configure_logging(settings.log_level, settings.log_json)

    def _prepare(**_) -> None:
        prepare(settings)

    def _start_reaper(**_) -> None:
        reaper.start()

    def _stop_reaper(**_) -> None:
        reaper.stop()

    for signal, receiver in (
        (setup_logging, _logging),
        (worker_init, _prepare),
        (worker_ready, _start_reaper),
        (worker_shutdown, _stop_reaper),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=f"sstmerge.{receiver.__name__}")
