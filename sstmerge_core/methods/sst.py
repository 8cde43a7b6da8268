"""SST-Merge: add only the part of the safety update that matters for safety and little for utility.

In the F_U-orthonormal generalized eigenbasis of (F_S, F_U) restricted to the safety update's span,
ΔS = R_out Y C Xᵀ R_inᵀ; a selection rule weighs each coefficient, ΔS' = R_out Y (C ⊙ W) Xᵀ R_inᵀ, and
ΔW = ΔU + α ΔS' (docs/method.md, steps 5–8).
"""

from __future__ import annotations

import torch

from ..adapters import LoraFactors
from ..gevp import Eigenbasis, eigenbasis, factorize
from .base import ModuleInputs, ModuleResult, concat_update, implements
from .catalog import SSTParams

TOP = 8  # spectrum values recorded per module


def selection_weights(basis: Eigenbasis, params: SSTParams) -> torch.Tensor:
    """W (p × q) ∈ [0, 1]: soft λ/(λ+β·median λ), the k largest λ_ij, or the k_in largest μ_j (all i)."""
    lam = basis.lam
    if params.selection == "soft":
        beta = params.beta * torch.quantile(lam.flatten(), 0.5)
        return lam / (lam + beta)
    weights = torch.zeros_like(lam)
    if params.selection == "topk":
        top = torch.topk(lam.flatten(), min(params.k, lam.numel())).indices
        weights.view(-1)[top] = 1.0
    else:  # "input": μ is sorted descending, so the k_in largest are the first columns
        weights[:, : min(params.k_in, lam.shape[1])] = 1.0
    return weights


def project(inputs: ModuleInputs, params: SSTParams) -> tuple[LoraFactors, dict]:
    """ΔS' as exact minimal LoRA factors, with the per-module diagnostics of docs/method.md (step 7)."""
    f = inputs.fisher
    if f is None or inputs.safety is None:
        raise ValueError(f"module {inputs.name}: SST needs the safety update and its Fisher factors")
    basis = eigenbasis(f.R_out, f.R_in, f.A_u, f.G_u, f.A_s, f.G_s, params.damping)
    C = basis.coefficients(inputs.safety.core(basis.R_out, basis.R_in))
    W = selection_weights(basis, params)
    kept = C * W
    left, right = basis.left_right()
    B, A = factorize(left, kept, right)
    projected = LoraFactors(B, A)
    lam = basis.lam
    energy_u = float((kept**2).sum() / (C**2).sum()) if torch.any(C) else 0.0
    energy_s = float((lam * kept**2).sum() / (lam * C**2).sum()) if torch.any(C) else 0.0
    safety_norm = inputs.safety.frobenius_norm()
    diagnostics = {
        "span": [int(basis.R_out.shape[1]), int(basis.R_in.shape[1])],
        "lambda_top": torch.sort(lam.flatten(), descending=True).values[:TOP].tolist(),
        "lambda_median": float(torch.quantile(lam.flatten(), 0.5)),
        "mu_top": basis.mu[:TOP].tolist(),
        "nu_top": basis.nu[:TOP].tolist(),
        "weights_sum": float(W.sum()),
        "weights_kept": int((W > 0.5).sum()),
        "projected_rank": int(A.shape[0]),
        "norm_ratio": projected.frobenius_norm() / safety_norm if safety_norm > 0 else 0.0,
        "energy_retained_fu": energy_u,
        "energy_retained_fs": energy_s,
        "gevp_residual": basis.residual(),
    }
    return projected, diagnostics


@implements("sst")
def merge(inputs: ModuleInputs, params: SSTParams, alphas: list[float]) -> list[ModuleResult]:
    if inputs.safety is None:
        return [ModuleResult(concat_update(inputs.weighted_utility(), None, alpha)) for alpha in alphas]
    projected, diagnostics = project(inputs, params)
    return [ModuleResult(concat_update(inputs.weighted_utility(), projected, alpha), diagnostics) for alpha in alphas]
