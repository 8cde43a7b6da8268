from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...domain.health import readiness
from ..deps import DbDep, MetricsDep, QueueDep, StorageDep
from ..schemas import ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness: database, broker, storage",
    responses={503: {"model": ReadyOut}},
)
def readyz(db: DbDep, queue: QueueDep, storage: StorageDep) -> JSONResponse:
    checks = readiness(db, queue, storage)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        ReadyOut(status="ok" if ok else "unavailable", checks=checks).model_dump(), status_code=200 if ok else 503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
