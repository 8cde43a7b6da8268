"""Task arithmetic: ΔW = Σ_i w_i ΔU_i + α ΔS, written exactly as a concatenated LoRA (no SVD)."""

from __future__ import annotations

from .base import MergeMethod, ModuleInputs, ModuleResult, concat_update
from .params import CommonParams


def merge(inputs: ModuleInputs, params: CommonParams, alphas: list[float]) -> list[ModuleResult]:
    return [ModuleResult(concat_update(inputs.weighted_utility(), inputs.safety, alpha)) for alpha in alphas]


METHOD = MergeMethod(
    name="linear",
    merge=merge,
    description="Task arithmetic: the weighted sum of the utility updates plus α times the safety update.",
    reference="https://arxiv.org/abs/2212.04089",
)
