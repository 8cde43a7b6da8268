from __future__ import annotations

from fastapi import APIRouter

from sstmerge_core.methods.catalog import CATALOG, REPAIRS

from ..schemas import MethodList, MethodOut, RepairOut

router = APIRouter(tags=["methods"])


@router.get(
    "/methods",
    response_model=MethodList,
    summary="Merge methods and repair steps, with the JSON Schema of their parameters",
    description="Every method a job's `method` or `compare_with` may name, read from the method catalogue. "
    "Public, like the OpenAPI document that carries the same schemas.",
)
def list_methods() -> MethodList:
    return MethodList(
        items=[MethodOut.from_info(info) for info in CATALOG.values()],
        repairs=[RepairOut.from_info(info) for info in REPAIRS.values()],
    )
