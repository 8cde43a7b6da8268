"""The job queue: Celery configured from `Settings`, jobs sent by task *name* with their id only.

The API sends `RUN_MERGE_TASK` without knowing its implementation; the worker (`workers.main`) builds its
Celery app with `create_celery` too and registers the task under that name. Nothing here imports the worker.
"""

from __future__ import annotations

from celery import Celery

from .settings import Settings

RUN_MERGE_TASK = "sstmerge.run_merge"
CONNECT_TIMEOUT = 3.0  # seconds to open a broker connection (a blackholed host must not hang a request)


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`: late acks, re-delivery on worker loss, one job per worker process at a time."""
    celery = Celery("sstmerge", broker=settings.resolved_broker_url, set_as_current=False)
    # kombu's SQL transport hands its options to create_engine; the SQLite file's folder is made by
    # `app.domain.bootstrap.prepare`. Redis re-delivers unacknowledged jobs after the visibility timeout.
    transport_options = (
        {}
        if settings.embedded_broker
        else {"visibility_timeout": settings.broker_visibility_timeout, "socket_connect_timeout": CONNECT_TIMEOUT}
    )
    celery.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_TIMEOUT,
        # a send to a broker that is down fails within about a second; the job stays queued in the database and
        # the workers' recovery loop sends it again (`JobStore.recover`)
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.4, "interval_max": 1},
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        task_serializer="json",
        accept_content=["json"],
    )
    return celery


class JobQueue:
    """Sends jobs to the broker (the API, and the worker's re-queue of jobs whose worker was lost)."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self.celery = celery or create_celery(settings)

    def enqueue(self, job_id: str, queue: str | None = None) -> None:
        """Send the job to `queue` (default `Settings.queue`; a re-sent job goes to the queue it was recorded with)."""
        self.celery.send_task(RUN_MERGE_TASK, args=[job_id], queue=queue or self.settings.queue)

    def check(self, timeout: float = 3.0) -> None:
        """Raise unless the broker accepts a connection within `timeout` seconds."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
