"""Honest answers when a part of the service is down or full: the exceptions of the database, broker and storage
clients become the domain's `Unavailable` (503, `Retry-After`) or `InsufficientStorage` (507) and leave through
the one error table (`errors.STATUS`), instead of a 500 or a reset connection.

`upload_space` refuses an upload (507) before its body is read when the storage or scratch folder would fall
below `SSTMERGE_MIN_FREE_BYTES`.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..domain.errors import DomainError, InsufficientStorage, Unavailable
from ..domain.health import ensure_space
from ..domain.storage import StorageError, StorageFull
from .deps import TenantDep
from .errors import error_body, error_response

log = logging.getLogger(__name__)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def database_down(exc: Exception) -> bool:
    """A failure of the database connection (not of the statement): down, restarting, unreachable, pool empty."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def as_domain_error(exc: Exception) -> DomainError | None:
    """The domain error an infrastructure exception stands for, or None (a bug: 500)."""
    if isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS):
        return InsufficientStorage("the storage is full; nothing was stored")
    if isinstance(exc, StorageError):
        return Unavailable("the artifact storage is unavailable; try again", code="storage_unavailable")
    if isinstance(exc, DBAPIError | PoolTimeout) and database_down(exc):
        return Unavailable("the database is unavailable; try again", code="database_unavailable")
    if isinstance(exc, BrokerError | RedisConnectionError | RedisTimeoutError):
        return Unavailable("the job queue is unavailable; try again", code="broker_unavailable")
    return None


def install_outage_handlers(app: FastAPI) -> None:
    """Handlers for the infrastructure exceptions that mean "down" or "full" (the rest stay 500)."""

    async def outage(request: Request, exc: Exception) -> JSONResponse:
        error = as_domain_error(exc)
        if error is None:
            log.error("unhandled error", extra={"path": request.url.path}, exc_info=exc)
            return JSONResponse(error_body("internal_error", "internal server error"), 500)
        log.warning(
            "request refused: %s", error.code, extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"}
        )
        return error_response(error)

    for kind in (DBAPIError, PoolTimeout, StorageError, OSError, BrokerError, RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(kind, outage)


async def upload_space(request: Request, _tenant: TenantDep) -> None:
    """507 before an upload is read (and after authentication) when writing it would break the minimum free space
    (POST only)."""
    if request.method != "POST":
        return
    length = request.headers.get("content-length", "")
    ensure_space(request.app.state.settings, request.app.state.storage, int(length) if length.isdigit() else 0)
