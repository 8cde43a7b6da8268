"""Task arithmetic: ΔW = Σ_i w_i ΔU_i + α ΔS, written exactly as a concatenated LoRA (no SVD): `linear`, and `cat`,
PEFT's concatenation that keeps every input's factors."""

from __future__ import annotations

import torch

from ..adapters import LoraFactors
from .base import ModuleInputs, ModuleResult, concat_update, implements
from .catalog import CommonParams


@implements("linear")
def merge(inputs: ModuleInputs, params: CommonParams, alphas: list[float]) -> list[ModuleResult]:
    return [ModuleResult(concat_update(inputs.weighted_utility(), inputs.safety, alpha)) for alpha in alphas]


@implements("cat")
def merge_cat(inputs: ModuleInputs, params: CommonParams, alphas: list[float]) -> list[ModuleResult]:
    """PEFT's `cat`: B = [B_1 | … | B_S], A = [w_1 s_1 A_1; …; α s_S A_S] (weight and scaling on A), every input
    kept; float64 if any input is, else float32."""
    parts = inputs.weighted_utility()
    results = []
    for alpha in alphas:
        factors = parts + ([inputs.safety.scaled(alpha)] if inputs.safety is not None else [])
        if not factors:
            results.append(ModuleResult(None))
            continue
        dtype = torch.float64 if any(f.A.dtype == torch.float64 for f in factors) else torch.float32
        B = torch.cat([f.B.to(dtype) for f in factors], dim=1)
        A = torch.cat([f.A.to(dtype) * f.scale for f in factors], dim=0)
        results.append(ModuleResult(LoraFactors(B, A, 1.0)))
    return results
