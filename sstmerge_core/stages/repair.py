"""Repair: a post-merge step applied to every merged model of the job (docs/repair.md), from `MergedUpdates` to
`MergedUpdates` whose factors carry the step's exact low-rank update, with the step's report per α."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..adapters import LoraFactors
from ..data import load_examples
from ..jobspec import MergeSpec, RepairSpec
from ..methods.base import ModuleResult
from ..methods.catalog import REPAIRS, CalibrationParams
from ..repair.answer_step import alignment_passes, answer_alignment
from ..repair.step import RepairData, RepairOutcome, candidate_grid, refusal_ablation
from .merging import MergedUpdates, map_factors

if TYPE_CHECKING:
    from .calibration import CalibrationInputs


@dataclass(frozen=True)
class PassPlan:
    """What the cost model counts of a step on one merged model: prompts per set at most, passes over the halves
    beyond the first two (`progress.RepairSize.candidates`), prompts per forward pass."""

    max_samples: int
    candidates: int
    batch_size: int


@dataclass(frozen=True)
class RepairStep:
    """How the stage runs a repair step declared in `methods.catalog.REPAIRS`: `run(model, tokenizer, data, params,
    merged=…, progress=…)`, and `plan(params, layers, post-instruction tokens)` for the cost model."""

    run: Callable[..., RepairOutcome]
    plan: Callable[[Any, int, int], PassPlan]


# The implementation of every declared repair step, by name.
STEPS: dict[str, RepairStep] = {
    "refusal_ablation": RepairStep(
        refusal_ablation, lambda p, layers, k: PassPlan(p.max_samples, len(candidate_grid(layers, k, p)), p.batch_size)
    ),
    "answer_alignment": RepairStep(
        answer_alignment, lambda p, layers, _k: PassPlan(p.max_samples, alignment_passes(layers, p), p.batch_size)
    ),
}


def step_of(params: BaseModel) -> str:
    """The name of the repair step whose parameter class `params` is an instance of."""
    return next(name for name, info in REPAIRS.items() if type(params) is info.params)


@dataclass(frozen=True)
class RepairInputs:
    """The step's parameters and prompt sets (H: the safety data, with its refusals; B: harmless; P: borderline)."""

    params: BaseModel  # a step's parameter class (`methods.catalog.REPAIRS`); it names the step
    data: RepairData

    @property
    def step(self) -> RepairStep:
        return STEPS[step_of(self.params)]


def load_repair_inputs(spec: MergeSpec, *, judge: Any = None) -> Any:
    """The repair's data, read at loading so that a bad file fails before any pass; None without a repair. (The
    calibration step's are `stages.calibration.CalibrationInputs`; `judge`, the job's refusal judge, filters its
    targets.)"""
    if spec.repair is None:
        return None
    if spec.repair.method == "calibration":
        from .calibration import load_calibration_inputs

        return load_calibration_inputs(spec, judge)
    assert spec.safety_data and spec.harmless_data and spec.borderline_data  # MergeSpec checks it
    safety = load_examples(spec.safety_data, require_response=True)
    data = RepairData(
        harmful=[e.prompt for e in safety],
        harmless=[e.prompt for e in load_examples(spec.harmless_data)],
        borderline=[e.prompt for e in load_examples(spec.borderline_data)],
        refusals=[e.response for e in safety if e.response],
    )
    return RepairInputs(spec.repair.step_params(), data)


def load_repair_options(
    spec: MergeSpec, steps: Sequence[str], *, judge: Any = None, loaded: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The inputs of every repair step of `steps` whose data `spec` has (`RepairInfo.needs`), each with `spec.repair`'s
    settings when it names that step and the step's defaults otherwise: what a recipe search may apply. Steps in
    `loaded` (already loaded inputs) are taken from it, not read again."""
    options = {}
    for step in steps:
        if loaded and step in loaded:
            options[step] = loaded[step]
        elif all(getattr(spec, key) for key in REPAIRS[step].needs):
            given = spec.repair if spec.repair is not None and spec.repair.method == step else RepairSpec(method=step)
            options[step] = load_repair_inputs(spec.model_copy(update={"repair": given}), judge=judge)
    return options


def with_params(inputs: Any, repair: RepairSpec) -> Any:
    """The same step's loaded inputs with `repair`'s parameters (a search trial's knobs); the calibration's prepared
    targets are shared, so the `before` model's answers are made once per job."""
    from .calibration import CalibrationInputs

    params = repair.step_params()
    if isinstance(inputs, CalibrationInputs):
        assert isinstance(params, CalibrationParams)
        return dataclasses.replace(inputs, params=params)
    return RepairInputs(params, inputs.data)


def with_repair(results: Mapping[str, ModuleResult], factors: Mapping[str, LoraFactors]) -> dict[str, ModuleResult]:
    """Each module's merged factors with the repair's factors concatenated (ΔW + ΔW_repair, exact)."""
    combined = dict(results)
    for name, extra in factors.items():
        current = combined.get(name)
        parts = [f for f in (current.factors if current is not None else None, extra) if f is not None]
        diagnostics = dict(current.diagnostics) if current is not None else {}
        combined[name] = ModuleResult(LoraFactors.concat(parts), {**diagnostics, "repair_rank": extra.rank})
    return dict(sorted(combined.items()))


def repair_updates(
    model,
    tokenizer,
    merged: MergedUpdates,
    repair: RepairInputs | CalibrationInputs,
    *,
    progress: Callable[[float, float], None] | None = None,
) -> MergedUpdates:
    """The repair step on the model merged at every α of `merged`; the model's weights are unchanged on return."""
    from .calibration import CalibrationInputs, calibrate_updates

    if isinstance(repair, CalibrationInputs):
        return calibrate_updates(model, tokenizer, merged, repair, progress=progress)
    by_alpha: dict[float, dict[str, ModuleResult]] = {}
    reports: dict[float, Mapping] = {}
    embeddings: set[str] = set()
    for i, alpha in enumerate(merged.alphas):

        def advance(fraction: float, i: int = i) -> None:
            if progress is not None:
                progress(i + fraction, len(merged.alphas))

        outcome = repair.step.run(
            model, tokenizer, repair.data, repair.params, merged=merged.updates(alpha), progress=advance
        )
        by_alpha[alpha] = map_factors(with_repair(merged.by_alpha[alpha], outcome.factors), LoraFactors.as_stored)
        reports[alpha] = outcome.report
        embeddings |= outcome.embedding_modules
    return dataclasses.replace(merged, by_alpha=by_alpha, repairs=reports, embedding_modules=frozenset(embeddings))
