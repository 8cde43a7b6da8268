"""Enqueueing jobs (by id only; the worker reads everything else from the database)."""

from __future__ import annotations

from workers.celery_app import RUN_MERGE_TASK, create_celery

from .config import Settings


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = create_celery(settings)

    def enqueue(self, job_id: str) -> None:
        """Send the job to `Settings.queue` (recorded on the job, which re-deliveries reuse)."""
        self.celery.send_task(RUN_MERGE_TASK, args=[job_id], queue=self.settings.queue)

    def check(self, timeout: float = 3.0) -> None:
        """Raise unless the broker accepts a connection within `timeout` seconds."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
