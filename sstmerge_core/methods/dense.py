"""Element-wise merges on dense ΔW (TIES, DARE, magnitude pruning) with PEFT's own merge rules,
factorized back to a LoRA by truncated SVD with the relative error reported."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TypeVar

import torch
from peft.utils import merge_utils

from ..adapters import LoraFactors
from ..errors import InputError
from ..gevp import truncated_svd
from .base import ModuleInputs, ModuleResult, implements
from .catalog import CommonParams, DensityParams, TiesParams

P = TypeVar("P", bound=CommonParams)


def task_tensors(inputs: ModuleInputs) -> tuple[list[torch.Tensor], list[float]]:
    """Task updates [ΔU_1, …] (float32, d_out × d_in, LoRA scaling applied) and their weights [w_1, …].

    As in PEFT, the rules see the unweighted updates (TIES elects signs on them) and the weights apart.
    """
    return [part.delta().float() for part in inputs.utility], inputs.weights


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that does not depend on module order (DARE's random drops)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def dense_merge(
    rule: Callable[[list[torch.Tensor], torch.Tensor, P], torch.Tensor],
) -> Callable[[ModuleInputs, P, list[float]], list[ModuleResult]]:
    """A method that applies `rule(task_tensors, weights, params)` per α, then SVD back to the target rank."""

    def merge(inputs: ModuleInputs, params: P, alphas: list[float]) -> list[ModuleResult]:
        tensors, weights = task_tensors(inputs)
        safety = inputs.safety
        has_safety = safety is not None
        if safety is not None:
            tensors.append(safety.delta().float())
        target_rank = params.max_rank or (
            sum(p.rank for p in inputs.utility) + (safety.rank if safety is not None else 0)
        )
        results = []
        for alpha in alphas:
            torch.manual_seed(module_seed(params.seed, inputs.name))
            w = torch.tensor(weights + ([alpha] if has_safety else []), dtype=torch.float32)
            merged = rule(tensors, w, params)
            if not torch.isfinite(merged).all():
                raise InputError(
                    f"module {inputs.name}: the merged update at α={alpha:g} is not finite (the inputs' values or "
                    "weights overflow float32); check them",
                    code="non_finite_result",
                )
            if not torch.any(merged):
                results.append(ModuleResult(None, {"svd_rel_error": 0.0}))
                continue
            B, A, error = truncated_svd(merged, target_rank)
            results.append(ModuleResult(LoraFactors(B, A), {"svd_rel_error": error, "rank": int(A.shape[0])}))
        return results

    return merge


@implements("ties")
@dense_merge
def _ties(t: list[torch.Tensor], w: torch.Tensor, p: TiesParams) -> torch.Tensor:
    return merge_utils.ties(t, w, p.density, p.majority_sign_method)


@implements("dare_linear")
@dense_merge
def _dare_linear(t: list[torch.Tensor], w: torch.Tensor, p: DensityParams) -> torch.Tensor:
    return merge_utils.dare_linear(t, w, p.density)


@implements("dare_ties")
@dense_merge
def _dare_ties(t: list[torch.Tensor], w: torch.Tensor, p: TiesParams) -> torch.Tensor:
    return merge_utils.dare_ties(t, w, p.density, p.majority_sign_method)


@implements("magnitude_prune")
@dense_merge
def _magnitude_prune(t: list[torch.Tensor], w: torch.Tensor, p: DensityParams) -> torch.Tensor:
    return merge_utils.magnitude_prune(t, w, p.density)
