from __future__ import annotations

from fastapi import APIRouter

from ...domain import base_models
from ..deps import SettingsDep, TenantDep
from ..schemas import ModelList, ModelOut

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="Base models a job can use")
def list_models(settings: SettingsDep, _: TenantDep) -> ModelList:
    items = [ModelOut.model_validate(model) for model in base_models.list_models(settings)]
    return ModelList(items=items, hub_enabled=settings.hub_enabled)
