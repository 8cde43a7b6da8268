"""`/adapters` and `/datasets`: a tenant's stored inputs, two resources that differ only in their names, models and
how one is created, so one factory (`input_router`) builds both routers from their declarations (`ADAPTERS`,
`DATASETS`). Each has create (a multipart upload or a JSON Hub source), list (newest first), get and delete (409
`in_use` while an unfinished job names it).

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, and the id's (`IdPath`, its
alias the resource's `{kind}_id`) is local to the factory, so it must be a value, not a string.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ...domain import adapters, datasets, inputs
from ...domain.db.models import Adapter, Dataset
from ...domain.requests import AdapterSource, DatasetSource
from ...domain.settings import Settings
from ...domain.storage import Storage
from ..bodies import upload_or_json, upload_or_json_openapi
from ..deps import DbDep, MetricsDep, SettingsDep, StorageDep, TenantDep
from ..schemas import AdapterOut, DatasetOut, Page

Row = TypeVar("Row", Adapter, Dataset)
Source = TypeVar("Source", bound=BaseModel)


@dataclass(frozen=True)
class InputResource(Generic[Row, Source]):
    """One kind of stored input: `kind` names it (`/{kind}s`, `{kind}_id`, the tags, the operation ids and the
    uploads metric), `model` is its table, `out` its response body, `source` the JSON body of a Hub source;
    `from_upload(session, storage, settings, tenant, file, filename, name)` and
    `from_source(session, storage, settings, tenant, body)` are the domain's two ways to create one; `page` is the
    body of a list (`Page[out]`)."""

    kind: str
    model: type[Row]
    out: type[BaseModel]
    page: type[BaseModel]
    source: type[Source]
    summary: str
    file_help: str
    from_upload: Callable[[Session, Storage, Settings, str, IO[bytes], str | None, str | None], Row]
    from_source: Callable[[Session, Storage, Settings, str, Source], Row]


ADAPTERS = InputResource(
    kind="adapter",
    model=Adapter,
    out=AdapterOut,
    page=Page[AdapterOut],
    source=AdapterSource,
    summary="Upload a PEFT LoRA adapter",
    file_help="a .zip or .tar.gz of a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)",
    from_upload=adapters.create_from_archive,
    from_source=lambda session, storage, settings, tenant, body: adapters.create_from_hub(
        session, storage, settings, tenant, body.source, body.name
    ),
)
DATASETS = InputResource(
    kind="dataset",
    model=Dataset,
    out=DatasetOut,
    page=Page[DatasetOut],
    source=DatasetSource,
    summary="Upload a JSONL/CSV prompt set",
    file_help="a .jsonl or .csv file with a `prompt` column and an optional `response` column",
    from_upload=datasets.create_from_upload,
    from_source=datasets.create_from_hub,
)


def input_router(resource: InputResource[Any, Any]) -> APIRouter:
    """The router of `resource`: POST, GET (a page), GET `/{kind_id}` and DELETE `/{kind_id}` under `/{kind}s`,
    named as the hand-written routes were (`create_adapter`, `list_adapters`, …), so operation ids stay."""
    kind, plural, out, source = resource.kind, f"{resource.kind}s", resource.out, resource.source
    IdPath = Annotated[str, Path(alias=f"{kind}_id")]
    router = APIRouter(prefix=f"/{plural}", tags=[plural])

    async def create(
        request: Request, tenant: TenantDep, db: DbDep, storage: StorageDep, settings: SettingsDep, metrics: MetricsDep
    ) -> BaseModel:
        async def from_upload(file: IO[bytes], filename: str | None, name: str | None) -> Any:
            return await run_in_threadpool(resource.from_upload, db, storage, settings, tenant, file, filename, name)

        async def from_json(body: BaseModel) -> Any:
            return await run_in_threadpool(resource.from_source, db, storage, settings, tenant, body)

        row = await upload_or_json(request, source, from_upload, from_json)
        metrics.uploads.labels(kind).inc()
        return out.model_validate(row)

    def list_page(
        tenant: TenantDep, db: DbDep, limit: int = Query(50, ge=1, le=200), cursor: str | None = None
    ) -> BaseModel:
        rows, next_cursor = inputs.list_inputs(db, resource.model, tenant, limit, cursor)
        return resource.page(items=[out.model_validate(r) for r in rows], next_cursor=next_cursor)

    def get_one(ident: IdPath, tenant: TenantDep, db: DbDep) -> BaseModel:
        return out.model_validate(inputs.get_input(db, resource.model, tenant, ident))

    def delete_one(ident: IdPath, tenant: TenantDep, db: DbDep, storage: StorageDep) -> Response:
        inputs.delete_input(db, storage, resource.model, tenant, ident)
        return Response(status_code=204)

    router.add_api_route(
        "",
        create,
        methods=["POST"],
        name=f"create_{kind}",
        status_code=201,
        response_model=out,
        summary=resource.summary,
        openapi_extra=upload_or_json_openapi(source, resource.file_help),
    )
    router.add_api_route(
        "",
        list_page,
        methods=["GET"],
        name=f"list_{plural}",
        response_model=resource.page,
        summary=f"List {plural}, newest first",
    )
    router.add_api_route(f"/{{{kind}_id}}", get_one, methods=["GET"], name=f"get_{kind}", response_model=out)
    router.add_api_route(
        f"/{{{kind}_id}}",
        delete_one,
        methods=["DELETE"],
        name=f"delete_{kind}",
        status_code=204,
        response_class=Response,
    )
    return router


adapters_router, datasets_router = input_router(ADAPTERS), input_router(DATASETS)
