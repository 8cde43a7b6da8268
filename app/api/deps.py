"""FastAPI dependencies: settings, database session, storage, queue and the authenticated tenant.

Dependencies that only read the application's state are `async def`, so that FastAPI calls them on the event
loop instead of sending each one to the thread pool; the tenant is found without I/O when its key was checked
in the last few seconds (`KeyCache`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..domain.auth import KeyCache
from ..domain.inputs import check_quota
from ..domain.queue import JobQueue
from ..domain.rate_limits import RateLimits, key_bucket
from ..domain.settings import Settings
from ..domain.storage import Storage
from .metrics import Metrics

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


async def get_engine(request: Request) -> Engine:
    """The database engine, for endpoints that take a pooled connection per read (the job reads of
    `app.api.watch`) instead of a session for the whole request."""
    return request.app.state.engine


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Session, Depends(get_db)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(settings: Settings) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in settings.trusted_proxies)


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def forwarded_client(peer: str, forwarded: list[str], trusted: tuple[Network, ...]) -> str:
    """The client of a request from `peer` carrying the `X-Forwarded-For` values `forwarded`: the peer itself
    unless it is a trusted proxy; else, walking the chain from the right, the first address no trusted proxy
    owns (the left-most when all are trusted). Entries left of the first untrusted one are the client's to
    forge and are never read."""
    chain = [entry.strip() for value in forwarded for entry in value.split(",") if entry.strip()]
    client = peer
    for hop in reversed(chain):
        if not is_trusted(client, trusted):
            break
        client = hop[:64]
    return client


def client_address(request: Request) -> str:
    """The address a request comes from (see `forwarded_client`; proxies from `SSTMERGE_TRUSTED_PROXIES`)."""
    peer = request.client.host if request.client else "unknown"
    trusted: tuple[Network, ...] = request.app.state.trusted_proxies
    if not trusted:
        return peer
    return forwarded_client(peer, request.headers.getlist("x-forwarded-for"), trusted)


async def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The tenant owning the bearer key, or 401. A key seen in the last `auth_cache_seconds` costs no I/O;
    otherwise it is checked in a short session of its own, so no request holds a database connection while it
    waits for a thread. An address that sent too many wrong keys starting like this one gets 429 before its key
    is looked at (`app.domain.rate_limits`), and each tenant has a request budget (429 past it; `Retry-After`
    says when to retry)."""
    limits: RateLimits = request.app.state.rate_limits
    client = client_address(request)
    bucket = key_bucket(credentials.credentials if credentials else None)
    await limits.check_client(client, bucket)
    tenant = None
    if credentials:
        keys: KeyCache = request.app.state.keys
        tenant = keys.cached(credentials.credentials) or await run_in_threadpool(
            keys.authenticate, credentials.credentials
        )
    if tenant is None:
        if credentials:
            await limits.count_failure(client, bucket)
        raise HTTPException(
            401, "a valid API key is required (Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"}
        )
    await limits.hit_tenant(tenant)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def upload_quota(request: Request, tenant: TenantDep) -> None:
    """507 `quota_exceeded` before an upload is read when the tenant's quota of stored inputs is used up (POST
    only); the exact check, with the input's size, is made before it is stored (`app.domain.inputs.check_quota`)."""
    if request.method != "POST":
        return

    def check() -> None:
        with request.app.state.sessions() as session:
            check_quota(session, request.app.state.settings, tenant, 0)

    await run_in_threadpool(check)
