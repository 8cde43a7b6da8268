from __future__ import annotations

from typing import IO

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ...domain import adapters as service
from ...domain.db.models import Adapter
from ...domain.requests import AdapterSource
from ..bodies import upload_or_json, upload_or_json_openapi
from ..deps import DbDep, MetricsDep, SettingsDep, StorageDep, TenantDep
from ..schemas import AdapterOut, Page

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.post(
    "",
    status_code=201,
    response_model=AdapterOut,
    summary="Upload a PEFT LoRA adapter",
    openapi_extra=upload_or_json_openapi(
        AdapterSource, "a .zip or .tar.gz of a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)"
    ),
)
async def create_adapter(
    request: Request, tenant: TenantDep, db: DbDep, storage: StorageDep, settings: SettingsDep, metrics: MetricsDep
) -> AdapterOut:
    async def from_upload(file: IO[bytes], filename: str | None, name: str | None) -> Adapter:
        return await run_in_threadpool(service.create_from_archive, db, storage, settings, tenant, file, filename, name)

    async def from_json(body: AdapterSource) -> Adapter:
        return await run_in_threadpool(service.create_from_hub, db, storage, settings, tenant, body.source, body.name)

    adapter = await upload_or_json(request, AdapterSource, from_upload, from_json)
    metrics.uploads.labels("adapter").inc()
    return AdapterOut.model_validate(adapter)


@router.get("", response_model=Page[AdapterOut], summary="List adapters, newest first")
def list_adapters(
    tenant: TenantDep, db: DbDep, limit: int = Query(50, ge=1, le=200), cursor: str | None = None
) -> Page[AdapterOut]:
    rows, next_cursor = service.list_adapters(db, tenant, limit, cursor)
    return Page(items=[AdapterOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{adapter_id}", response_model=AdapterOut)
def get_adapter(adapter_id: str, tenant: TenantDep, db: DbDep) -> AdapterOut:
    return AdapterOut.model_validate(service.get_adapter(db, tenant, adapter_id))


@router.delete("/{adapter_id}", status_code=204, response_class=Response)
def delete_adapter(adapter_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> Response:
    service.delete_adapter(db, storage, tenant, adapter_id)
    return Response(status_code=204)
