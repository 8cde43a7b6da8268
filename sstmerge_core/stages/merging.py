"""Merging: a method on every module for every α, held in memory as `MergedUpdates`.

`MergedUpdates.updates(α)` gives the module updates exactly as the adapter writer stores them (float32 factors,
scaling 1), so that evaluating them in memory scores the same ΔW as loading the written adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..adapters import LoraFactors
from ..jobspec import MergeSpec
from ..merge import merge_modules
from ..methods.base import FisherFactors, MergeMethod, ModuleInputs, ModuleResult
from ..methods.catalog import CommonParams, parse_params
from ..methods.registry import get_method

Role = Literal["merged", "baseline"]
STORED_DTYPE = torch.float32


@dataclass(frozen=True)
class MergedUpdates:
    """One method's merged update of every module, for every α of its parameters."""

    method: MergeMethod
    params: CommonParams
    by_alpha: Mapping[float, Mapping[str, ModuleResult]]
    role: Role = "merged"  # the job's own method, or a compare_with baseline
    repairs: Mapping[float, Mapping] = field(default_factory=dict)  # the repair step's report per α, when repaired
    embedding_modules: frozenset[str] = frozenset()  # modules whose update is an embedding LoRA (the repair's)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def alphas(self) -> list[float]:
        return list(self.by_alpha)

    def label(self, alpha: float) -> str:
        """How evaluation names the model merged at α: `sst@0.5`."""
        return f"{self.name}@{alpha:g}"

    def updates(self, alpha: float) -> dict[str, LoraFactors]:
        """ΔW_m = B_m A_m per module at α as stored: A and s·B rounded to float32, scaling 1; zero modules left out."""
        return {
            name: LoraFactors(
                (r.factors.scale * r.factors.B.to(torch.float64)).to(STORED_DTYPE).contiguous(),
                r.factors.A.to(STORED_DTYPE).contiguous(),
                1.0,
            )
            for name, r in self.by_alpha[alpha].items()
            if r.factors is not None
        }


def baseline_params(name: str, params: CommonParams) -> CommonParams:
    """A comparison method runs with the job's α sweep, rank cap and seed, and its own defaults otherwise."""
    return parse_params(name, {"alphas": params.alphas, "max_rank": params.max_rank, "seed": params.seed})


def merge_updates(
    modules: Mapping[str, ModuleInputs],
    method: MergeMethod,
    params: CommonParams,
    fisher: Mapping[str, FisherFactors] | None = None,
    *,
    role: Role = "merged",
    num_layers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergedUpdates:
    """`method` with `params` on every module (Fisher factors where it needs them; `num_layers` of the model for a
    depth schedule); nothing is written."""
    by_alpha = merge_modules(
        method, dict(modules), params, dict(fisher) if fisher else None, num_layers=num_layers, progress=progress
    )
    return MergedUpdates(method, params, by_alpha, role)


def merge_plan(spec: MergeSpec) -> list[tuple[MergeMethod, CommonParams, Role]]:
    """The job's method, then each `compare_with` method other than it, with their parameters."""
    params = spec.method_params()
    plan: list[tuple[MergeMethod, CommonParams, Role]] = [(get_method(spec.method), params, "merged")]
    plan.extend(
        (get_method(name), baseline_params(name, params), "baseline")
        for name in dict.fromkeys(spec.compare_with)
        if name != spec.method
    )
    return plan
