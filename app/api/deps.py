"""FastAPI dependencies: settings, database session, storage, queue and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from ..domain.auth import authenticate
from ..domain.queue import JobQueue
from ..domain.settings import Settings
from ..domain.storage import Storage
from .metrics import Metrics

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_tenant(
    db: DbDep, settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The tenant owning the bearer key, or 401."""
    tenant = authenticate(db, settings, credentials.credentials) if credentials else None
    if tenant is None:
        raise HTTPException(
            401, "a valid API key is required (Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"}
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
