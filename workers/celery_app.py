"""The Celery application (no torch here: the API imports this module to enqueue jobs).

Start a worker with `sstmerge worker` (or `celery -A workers.celery_app worker`).
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings

RUN_MERGE_TASK = "sstmerge.run_merge"


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`: late acks, re-delivery on worker loss, one job per worker process at a time."""
    celery = Celery("sstmerge", broker=settings.resolved_broker_url, include=["workers.tasks"])
    # kombu's SQL transport hands its options to create_engine; the SQLite file's folder is made by
    # `app.bootstrap.prepare`. Redis re-delivers unacknowledged jobs after the visibility timeout.
    transport_options = {} if settings.embedded_broker else {"visibility_timeout": settings.broker_visibility_timeout}
    celery.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        task_serializer="json",
        accept_content=["json"],
    )
    return celery


app = create_celery(get_settings())
