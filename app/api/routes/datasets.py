from __future__ import annotations

from typing import IO

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ...domain import datasets as service
from ...domain.db.models import Dataset
from ...domain.requests import DatasetSource
from ..bodies import upload_or_json, upload_or_json_openapi
from ..deps import DbDep, MetricsDep, SettingsDep, StorageDep, TenantDep
from ..schemas import DatasetOut, Page

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a JSONL/CSV prompt set",
    openapi_extra=upload_or_json_openapi(
        DatasetSource, "a .jsonl or .csv file with a `prompt` column and an optional `response` column"
    ),
)
async def create_dataset(
    request: Request, tenant: TenantDep, db: DbDep, storage: StorageDep, settings: SettingsDep, metrics: MetricsDep
) -> DatasetOut:
    async def from_upload(file: IO[bytes], filename: str | None, name: str | None) -> Dataset:
        return await run_in_threadpool(service.create_from_upload, db, storage, settings, tenant, file, filename, name)

    async def from_json(body: DatasetSource) -> Dataset:
        return await run_in_threadpool(service.create_from_hub, db, storage, settings, tenant, body)

    dataset = await upload_or_json(request, DatasetSource, from_upload, from_json)
    metrics.uploads.labels("dataset").inc()
    return DatasetOut.model_validate(dataset)


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first")
def list_datasets(
    tenant: TenantDep, db: DbDep, limit: int = Query(50, ge=1, le=200), cursor: str | None = None
) -> Page[DatasetOut]:
    rows, next_cursor = service.list_datasets(db, tenant, limit, cursor)
    return Page(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, tenant: TenantDep, db: DbDep) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(db, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(dataset_id: str, tenant: TenantDep, db: DbDep, storage: StorageDep) -> Response:
    service.delete_dataset(db, storage, tenant, dataset_id)
    return Response(status_code=204)
