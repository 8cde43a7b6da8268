from __future__ import annotations

from fastapi import APIRouter

from sstmerge_core.evaluation.judges import JUDGES
from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.methods.catalog import CATALOG, REPAIRS

from ..schemas import JudgeOut, MethodList, MethodOut, RepairOut, UtilityMetricOut

router = APIRouter(tags=["methods"])


@router.get(
    "/methods",
    response_model=MethodList,
    summary="Merge methods and repair steps, with the JSON Schema of their parameters; utility metrics and judges",
    description="Every method a job's `method` or `compare_with` may name, read from the method catalogue, every "
    "repair step, and the utility metrics and refusal judges a job's `evaluation` may name, read from their "
    "registries. Public, like the OpenAPI document that carries the same schemas.",
)
def list_methods() -> MethodList:
    return MethodList(
        items=[MethodOut.from_info(info) for info in CATALOG.values()],
        repairs=[RepairOut.from_info(info) for info in REPAIRS.values()],
        utility_metrics=[UtilityMetricOut.model_validate(metric) for metric in UTILITY_METRICS.values()],
        judges=[JudgeOut.model_validate(judge) for judge in JUDGES.values()],
    )
