"""From loaded adapters to merged per-module updates: alignment and validation by module name,
the Fisher passes at the utility-merged model, and the method applied to every module for every α."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import LoraAdapter, LoraFactors
from .data import Example
from .errors import AdapterError, InputError
from .fisher import FisherConfig, KFACFactors, collect_factors
from .gevp import orthonormal_basis, truncate_product
from .methods.base import FisherFactors, MergeMethod, ModuleInputs, ModuleResult
from .methods.catalog import CommonParams
from .modeling import get_target_module, lora_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class WeightedAdapter:
    adapter: LoraAdapter
    weight: float = 1.0


def _base_name(adapter: LoraAdapter) -> str | None:
    base = adapter.base_model
    return Path(base.rstrip("/")).name.lower() if base else None


def check_compatible(adapters: list[WeightedAdapter]) -> None:
    """Same base model (by name, where the configs record one), same fan_in_fan_out, same module shapes."""
    names = {_base_name(w.adapter): w.adapter.name for w in adapters if _base_name(w.adapter)}
    if len(names) > 1:
        listing = ", ".join(f"{adapter} → {base}" for base, adapter in names.items())
        raise AdapterError(f"adapters were trained on different base models: {listing}")
    if len({w.adapter.fan_in_fan_out for w in adapters}) > 1:
        raise AdapterError("adapters disagree on fan_in_fan_out (Linear vs Conv1D layout)")
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for w in adapters:
        for module, factors in w.adapter.modules.items():
            seen = shapes.setdefault(module, (factors.shape, w.adapter.name))
            if seen[0] != factors.shape:
                raise AdapterError(
                    f"module {module}: adapter {w.adapter.name} has ΔW shape {factors.shape} but "
                    f"{seen[1]} has {seen[0]}"
                )


def module_inputs(
    utility: list[WeightedAdapter], safety: list[WeightedAdapter], model: PreTrainedModel | None = None
) -> dict[str, ModuleInputs]:
    """Per module name (sorted): the utility factors with their weights and the weighted safety sum Σ w_j ΔS_j.

    Everything is keyed by module name, never by position, so each result lands on its own module.
    With `model`, every module must exist there with the adapter's (d_out, d_in).
    """
    if not safety:
        raise AdapterError("at least one safety adapter is required")
    check_compatible([*utility, *safety])
    names = sorted({m for w in [*utility, *safety] for m in w.adapter.modules})
    result = {}
    for name in names:
        users = [w for w in utility if name in w.adapter.modules]
        ups = [w.adapter.modules[name] for w in users]
        sps = [w.adapter.modules[name].scaled(w.weight) for w in safety if name in w.adapter.modules]
        shape = (ups or sps)[0].shape
        if model is not None:
            get_target_module(model, name, shape)
        combined = sps[0] if len(sps) == 1 else (LoraFactors.concat(sps) if sps else None)
        result[name] = ModuleInputs(name, shape, ups, combined, utility_weights=tuple(w.weight for w in users))
    return result


def span_bases(inputs: dict[str, ModuleInputs]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(R_in, R_out) per safety module: orthonormal bases of row(A_S) and col(B_S) (docs/method.md, step 2)."""
    bases = {}
    for name, m in inputs.items():
        if m.safety is None:
            continue
        R_in, R_out = orthonormal_basis(m.safety.A.T), orthonormal_basis(m.safety.B)
        if R_in.shape[1] == 0 or R_out.shape[1] == 0 or m.safety.scale == 0:
            raise AdapterError(f"module {name}: the safety update is zero")
        bases[name] = (R_in, R_out)
    return bases


def utility_deltas(inputs: dict[str, ModuleInputs]) -> dict[str, LoraFactors]:
    """ΔU_m = Σ_i w_i ΔU_i,m as one concatenated LoRA, for every module some utility adapter touches."""
    return {name: LoraFactors.concat(m.weighted_utility()) for name, m in inputs.items() if m.utility}


def fisher_factors(
    model: PreTrainedModel,
    tokenizer,
    inputs: dict[str, ModuleInputs],
    utility_data: list[Example],
    safety_data: list[Example],
    utility_config: FisherConfig,
    safety_config: FisherConfig,
    *,
    cached: Callable[[str, Callable[[], dict[str, KFACFactors]]], dict[str, KFACFactors]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    between_batches: Callable[[], None] | None = None,
) -> dict[str, FisherFactors]:
    """Both data passes at the utility-merged model M + ΔU (docs/method.md, step 3); the weights are not touched.

    `cached(kind, compute)` may return stored factors instead of running `compute` (kind: utility/safety);
    `between_batches` is handed to `collect_factors`.
    """
    bases = span_bases(inputs)

    def run(kind: str, data: list[Example], config: FisherConfig) -> dict[str, KFACFactors]:
        def compute() -> dict[str, KFACFactors]:
            # ΔU by forward hooks: no copy of the weights (merged_deltas would keep one of every updated module)
            with lora_forward(model, utility_deltas(inputs)):
                report = (lambda done, total: progress(kind, done, total)) if progress else None
                return collect_factors(model, tokenizer, data, bases, config, report, between_batches=between_batches)

        return cached(kind, compute) if cached else compute()

    u = run("utility", utility_data, utility_config)
    s = run("safety", safety_data, safety_config)
    return {
        name: FisherFactors(R_in, R_out, u[name].A, u[name].G, s[name].A, s[name].G)
        for name, (R_in, R_out) in bases.items()
    }


def truncate_factors(factors: LoraFactors, max_rank: int) -> tuple[LoraFactors, float]:
    """Best rank-`max_rank` LoRA of ΔW = s·B A, and the relative Frobenius error of the truncation."""
    B, A, error = truncate_product(factors.scale * factors.B.double(), factors.A, max_rank)
    return LoraFactors(B, A), error


def solved(
    method: MergeMethod, name: str, inputs: ModuleInputs, params: CommonParams, alphas: list[float]
) -> list[ModuleResult]:
    """`method.merge` on one module; a linear-algebra failure (an SVD or eigensolver that cannot converge, as on
    overflowing inputs) is the inputs' `InputError` (code `numerical_error`), naming the module."""
    try:
        return method.merge(inputs, params, alphas)
    except torch.linalg.LinAlgError as exc:
        first = (str(exc).strip().splitlines() or ["no solution"])[0]
        raise InputError(
            f"{method.name}: module {name}: the merge cannot be computed ({first}); check the inputs' values and "
            "weights",
            code="numerical_error",
        ) from None


def check_diagnostics(label: str, module: str, diagnostics: dict) -> None:
    """Refuse (`InputError`, code `non_finite_result`) a NaN or ±inf among a module's diagnostics (lists included):
    they go into the report and the job's summary, and a non-finite one means the merge's numbers are not sound."""
    for key, value in diagnostics.items():
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise InputError(
                f"{label}: diagnostic {key} of module {module} is not finite (the inputs' values overflow or "
                "underflow the computation)",
                code="non_finite_result",
            )


def safety_kept(inputs: ModuleInputs, result: ModuleResult) -> bool:
    """Whether the module's merge keeps a part of its safety update: SST's norm ratio ‖ΔS'‖/‖ΔS‖ > 0, else ΔS ≠ 0."""
    if inputs.safety is None:
        return False
    ratio = result.diagnostics.get("norm_ratio")
    return ratio > 0 if isinstance(ratio, float | int) else inputs.safety.frobenius_norm() > 0


def merge_modules(
    method: MergeMethod,
    inputs: dict[str, ModuleInputs],
    params: CommonParams,
    fisher: dict[str, FisherFactors] | None = None,
    *,
    num_layers: int | None = None,
    progress: Progress | None = None,
) -> dict[float, dict[str, ModuleResult]]:
    """The method on every module, for every α: {α: {module: result}}, with `max_rank` truncation.

    Refused (`InputError`): a module the method cannot solve numerically (`numerical_error`), a non-finite
    diagnostic (`non_finite_result`), and an α ≠ 0 at which no module keeps anything of a given safety update
    (`safety_update_lost`: SST's ‖ΔS'‖/‖ΔS‖ = 0, or ΔS = 0, in every module).

    Each module m gets its depth-scheduled α_ℓ(m) (docs/repair.md; the model's `num_layers` is needed unless the
    schedule is constant). `progress(done, total)` is called after each module (all its α).
    """
    if params.schedule != "constant" and num_layers is None:
        raise ValueError(f"schedule {params.schedule!r} needs the model's number of layers")
    started = time.perf_counter()
    by_alpha: dict[float, dict[str, ModuleResult]] = {alpha: {} for alpha in params.alphas}
    kept: set[float] = set()  # α at which some module keeps a part of its safety update
    for done, (name, m) in enumerate(inputs.items(), start=1):
        if fisher is not None and name in fisher:
            m = dataclasses.replace(m, fisher=fisher[name])
        alphas = [params.module_alpha(alpha, name, num_layers or 0) for alpha in params.alphas]
        results = solved(method, name, m, params, alphas)
        for alpha, module_alpha, result in zip(params.alphas, alphas, results, strict=True):
            if params.max_rank is not None and result.factors is not None and result.factors.rank > params.max_rank:
                factors, error = truncate_factors(result.factors, params.max_rank)
                result = ModuleResult(factors, {**result.diagnostics, "svd_rel_error": error})
            check_diagnostics(f"{method.name}@{alpha:g}", name, result.diagnostics)
            by_alpha[alpha][name] = result
            if module_alpha != 0 and safety_kept(m, result):
                kept.add(alpha)
        if progress is not None:
            progress(done, len(inputs))
    given = any(m.safety is not None for m in inputs.values())
    for alpha in params.alphas:
        scheduled = any(params.module_alpha(alpha, name, num_layers or 0) != 0 for name in inputs)
        if given and scheduled and alpha not in kept:
            raise InputError(
                f"{method.name}@{alpha:g}: the safety adapter contributes nothing to the merge (its update is zero, "
                "or vanished in the merge: check its values and weight)",
                code="safety_update_lost",
            )
    log.info(
        "merged modules",
        extra={
            "method": method.name,
            "modules": len(inputs),
            "alphas": params.alphas,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return by_alpha
