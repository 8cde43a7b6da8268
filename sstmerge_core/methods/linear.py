"""Task arithmetic: ΔW = Σ_i w_i ΔU_i + α ΔS, written exactly as a concatenated LoRA (no SVD)."""

from __future__ import annotations

from .base import ModuleInputs, ModuleResult, concat_update, implements
from .catalog import CommonParams


@implements("linear")
def merge(inputs: ModuleInputs, params: CommonParams, alphas: list[float]) -> list[ModuleResult]:
    return [ModuleResult(concat_update(inputs.weighted_utility(), inputs.safety, alpha)) for alpha in alphas]
