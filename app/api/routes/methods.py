from __future__ import annotations

from fastapi import APIRouter

from sstmerge_core.methods.catalog import CATALOG

from ..schemas import MethodList, MethodOut

router = APIRouter(tags=["methods"])


@router.get(
    "/methods",
    response_model=MethodList,
    summary="Merge methods and the JSON Schema of their parameters",
    description="Every method a job's `method` or `compare_with` may name, read from the method catalogue. "
    "Public, like the OpenAPI document that carries the same schemas.",
)
def list_methods() -> MethodList:
    return MethodList(items=[MethodOut.from_info(info) for info in CATALOG.values()])
