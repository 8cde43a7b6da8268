"""Merging: a method on every module for every α, held in memory as `MergedUpdates`.

The merged factors are kept exactly as the adapter writer stores them (`LoraFactors.as_stored`: float32, scale 1):
evaluating them in memory scores the same ΔW as loading the written adapter, and a job holds each merge once, at
half the size of the float64 factors the methods compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from ..adapters import LoraFactors
from ..jobspec import MergeSpec
from ..merge import merge_modules
from ..methods.base import FisherFactors, MergeMethod, ModuleInputs, ModuleResult
from ..methods.catalog import CommonParams, parse_params
from ..methods.registry import get_method

Role = Literal["merged", "baseline"]


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
        """ΔW_m = B_m A_m per module at α, as stored (no copy); zero modules left out."""
        return {name: r.factors for name, r in self.by_alpha[alpha].items() if r.factors is not None}

    def without_values(self) -> MergedUpdates:
        """This merge with every factor moved to the meta device: ranks, shapes and diagnostics kept, the values
        freed (once the adapters are written, evaluation reads them back from the files)."""
        return replace(
            self, by_alpha={alpha: map_factors(results, shape_only) for alpha, results in self.by_alpha.items()}
        )


def shape_only(factors: LoraFactors) -> LoraFactors:
    """The factors on the meta device: shapes and rank without storage."""
    return LoraFactors(factors.B.to("meta"), factors.A.to("meta"), factors.scale)


def map_factors(
    results: Mapping[str, ModuleResult], change: Callable[[LoraFactors], LoraFactors]
) -> dict[str, ModuleResult]:
    """Every module's result with `change` applied to its factors (zero modules and diagnostics as they are)."""
    return {
        name: r if r.factors is None else ModuleResult(change(r.factors), r.diagnostics) for name, r in results.items()
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
    stored = {alpha: map_factors(results, LoraFactors.as_stored) for alpha, results in by_alpha.items()}
    return MergedUpdates(method, params, stored, role)


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
