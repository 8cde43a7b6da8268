"""The worker's Celery app, built by a factory: `create_worker_app(settings)` takes the domain's queue wiring
(`app.domain.queue.create_celery`) and registers the merge task under its name, with the worker-process hooks.

Nothing is built at import. `sstmerge worker` calls the factory; for Celery's own command line this module
builds the app from the environment on first access of its `celery` attribute:

    celery -A workers.main worker --queues sstmerge --concurrency 1
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from app.domain.queue import create_celery
from app.domain.settings import Settings, get_settings

from .tasks import register_tasks


def create_worker_app(settings: Settings) -> Celery:
    """A Celery app for `settings` that runs merge jobs."""
    worker_app = create_celery(settings)
    worker_app.set_current()
    register_tasks(worker_app, settings)
    return worker_app


@lru_cache
def _default_app() -> Celery:
    return create_worker_app(get_settings())


def __getattr__(name: str) -> Celery:
    """`celery -A workers.main` looks up `celery` (after `app`, which this module does not define)."""
    if name == "celery":
        return _default_app()
    raise AttributeError(name)
