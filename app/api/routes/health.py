"""Probes and metrics. `/healthz` is open and touches nothing. `/readyz` is open for probes (its status code and
which check fails), but the reasons (hosts, paths, free bytes) and `/metrics` (every tenant's job counts) need the
operator token `SSTMERGE_OPS_TOKEN` as `Authorization: Bearer <token>`; without a configured token `/metrics` is
refused."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ...domain.health import readiness
from ...domain.settings import Settings
from ..deps import DbDep, MetricsDep, QueueDep, SettingsDep, StorageDep
from ..schemas import ReadyOut

router = APIRouter(tags=["health"])
_ops_bearer = HTTPBearer(auto_error=False, description="the operator token (SSTMERGE_OPS_TOKEN)")
OpsCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_ops_bearer)]


def is_operator(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """The request carries the configured operator token (compared in constant time)."""
    token = settings.ops_token.get_secret_value() if settings.ops_token is not None else ""
    return bool(token) and credentials is not None and hmac.compare_digest(credentials.credentials, token)


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness: database, broker, storage (with free space)",
    description="Each check is `ok` or `error`; with the operator token the error says why.",
    responses={503: {"model": ReadyOut}},
    openapi_extra={"security": [{}]},  # with FastAPI's requirement: the operator token is optional
)
def readyz(
    db: DbDep, queue: QueueDep, storage: StorageDep, settings: SettingsDep, credentials: OpsCredentials
) -> JSONResponse:
    checks = readiness(db, queue, storage, settings)
    ok = all(v == "ok" for v in checks.values())
    if not is_operator(settings, credentials):
        checks = {name: "ok" if result == "ok" else "error" for name, result in checks.items()}
    return JSONResponse(
        ReadyOut(status="ok" if ok else "unavailable", checks=checks).model_dump(),
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (operator token)",
    response_class=Response,
    responses={401: {"description": "no or wrong operator token, or none configured"}},
)
def metrics(metrics: MetricsDep, settings: SettingsDep, credentials: OpsCredentials) -> Response:
    if not is_operator(settings, credentials):
        raise HTTPException(
            401,
            "the metrics need the operator token (SSTMERGE_OPS_TOKEN) as `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
