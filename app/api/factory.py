"""The FastAPI application factory: `create_app(settings)` wires the domain (database, storage, job queue) to
the routes, error handlers and middleware. The database is migrated on start-up (lifespan)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from ..domain.bootstrap import prepare
from ..domain.db.session import session_factory
from ..domain.merges import status_counts
from ..domain.queue import JobQueue
from ..domain.settings import Settings, get_settings
from ..domain.storage import get_storage
from .errors import install_error_handlers
from .limits import BodySizeLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .routes import adapters, datasets, health, merges, methods, models

log = logging.getLogger("app.access")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prepare(settings)
        yield

    app = FastAPI(
        title="sstmerge",
        version="0.1.0",
        description="Merge LoRA adapters with SST-Merge (Fisher-subspace safety merging) or a baseline, "
        "as background jobs, and evaluate safety and utility.",
        lifespan=lifespan,
    )
    sessions = session_factory(settings.resolved_database_url)

    def job_counts() -> dict[str, int]:
        with sessions() as session:
            return status_counts(session)

    app.state.settings = settings
    app.state.sessions = sessions
    app.state.storage = get_storage(settings)
    app.state.queue = JobQueue(settings)
    app.state.metrics = Metrics(job_counts)

    install_error_handlers(app)
    for router in (models.router, methods.router, adapters.router, datasets.router, merges.router, health.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    @app.middleware("http")
    async def access_log(request: Request, call_next) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        log.info(
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "duration_ms": round(1000 * (time.perf_counter() - start), 1),
            },
        )
        return response

    return app
