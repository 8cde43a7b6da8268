from __future__ import annotations

from fastapi import APIRouter

from ...schemas import ModelList
from ...services import base_models
from ..deps import SettingsDep, TenantDep

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="Base models a job can use")
def list_models(settings: SettingsDep, _: TenantDep) -> ModelList:
    return ModelList(items=base_models.list_models(settings), hub_enabled=settings.hub_enabled)
