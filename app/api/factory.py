"""The FastAPI application factory: `create_app(settings)` wires the domain (database, storage, job queue) to
the routes, error handlers and middleware. The database is migrated on start-up (lifespan); leftovers are swept
then and every `leftover_sweep_seconds` after."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from ..domain.auth import KeyCache
from ..domain.bootstrap import prepare
from ..domain.db.session import get_engine, session_factory
from ..domain.merges import status_counts
from ..domain.queue import JobQueue
from ..domain.rate_limits import RateLimits
from ..domain.retention import sweep_leftovers
from ..domain.settings import Settings, get_settings
from ..domain.storage import Storage, get_storage
from .access_log import AccessLogMiddleware
from .deps import trusted_networks, upload_quota
from .errors import install_error_handlers
from .limits import BodySizeLimitMiddleware, PrintablePathMiddleware
from .metrics import Metrics, MetricsMiddleware
from .outages import install_outage_handlers, upload_space
from .routes import health, merges, methods, models, webhooks
from .routes.inputs import adapters_router, datasets_router

log = logging.getLogger(__name__)


async def sweep_periodically(settings: Settings, storage: Storage) -> None:
    """`sweep_leftovers` every `leftover_sweep_seconds` while the API runs (in a thread: it reads the disk and the
    database), so that leftovers of a process killed mid-upload go without waiting for a restart."""
    while True:
        await asyncio.sleep(settings.leftover_sweep_seconds)
        try:
            await run_in_threadpool(sweep_leftovers, settings, storage)
        except Exception:  # noqa: BLE001 - the database may be down; the next pass tries again
            log.warning("leftover sweep failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prepare(settings)
        sweep_leftovers(settings, app.state.storage)  # staging and stored leftovers of processes that died
        sweeper = asyncio.create_task(sweep_periodically(settings, app.state.storage))
        try:
            yield
        finally:
            sweeper.cancel()

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
    app.state.engine = get_engine(settings.resolved_database_url)
    app.state.keys = KeyCache(sessions, settings, settings.auth_cache_seconds)
    app.state.storage = get_storage(settings)
    app.state.queue = JobQueue(settings)
    app.state.metrics = Metrics(job_counts)
    app.state.rate_limits = RateLimits(settings)
    app.state.trusted_proxies = trusted_networks(settings)

    install_error_handlers(app)
    install_outage_handlers(app)
    # the polled routes first: a request is matched against the routes in order
    routers = (merges.router, models.router, methods.router, adapters_router, datasets_router, health.router)
    for router in (*routers, webhooks.router):
        uploads = router in (adapters_router, datasets_router)
        app.include_router(router, dependencies=[Depends(upload_space), Depends(upload_quota)] if uploads else None)
    app.add_middleware(
        BodySizeLimitMiddleware, limit=settings.max_upload_bytes, json_limit=settings.max_json_body_bytes
    )
    app.add_middleware(PrintablePathMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    app.add_middleware(AccessLogMiddleware)

    return app
