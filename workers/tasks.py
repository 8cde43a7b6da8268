"""The Celery task: a job id in, the job's outcome in the database. Plus worker-process hooks."""

from __future__ import annotations

import logging
import threading

from celery.signals import setup_logging, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from app.bootstrap import prepare
from app.config import get_settings
from app.logging_setup import configure_logging
from app.storage import StorageError, get_storage
from sstmerge_core.pipeline import ModelCache

from .celery_app import RUN_MERGE_TASK, app
from .runner import JobRunner
from .state import JobStore

log = logging.getLogger(__name__)
MODEL_CACHE = ModelCache()  # the last base model stays loaded between jobs of this worker process
_runner: JobRunner | None = None
_stop_reaper = threading.Event()


def runner() -> JobRunner:
    global _runner
    if _runner is None:
        settings = get_settings()
        _runner = JobRunner(settings, get_storage(settings), MODEL_CACHE)
    return _runner


@app.task(
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


@setup_logging.connect
def _logging(**_) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


def _reap(store: JobStore, interval: float) -> None:
    """Re-queue jobs whose worker died (brokers such as kombu's SQL transport do not re-deliver them)."""
    while True:
        try:
            for job_id, queue in store.requeue_stale():
                app.send_task(RUN_MERGE_TASK, args=[job_id], queue=queue)
                log.warning("re-queued a job whose worker was lost", extra={"job_id": job_id})
        except Exception:
            log.warning("reaper pass failed", exc_info=True)
        if _stop_reaper.wait(interval):
            return


@worker_ready.connect
def _start_reaper(**_) -> None:
    settings = get_settings()
    store = JobStore(settings.resolved_database_url, settings.job_lease_seconds, settings.max_attempts)
    interval = max(1.0, settings.job_lease_seconds / 2)
    threading.Thread(target=_reap, args=(store, interval), name="reaper", daemon=True).start()


@worker_shutdown.connect
def _stop(**_) -> None:
    _stop_reaper.set()


def worker_startup() -> None:
    """Called by `sstmerge worker` before Celery starts: folders and schema."""
    prepare(get_settings())
