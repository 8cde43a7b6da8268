"""What a recipe search may try and what it must respect (torch-free: the API validates a job's `search` with it),
and how one optuna trial draws a recipe from that space.

The objective is the highest safety on the search split among recipes with
over_refusal − over_refusal_before ≤ `max_over_refusal_increase` and utility_before − utility ≤ `max_utility_drop`
(ties → lower over-refusal). The space is conditional: β or k only for SST, density only for TIES/DARE, γ only for
the linear schedule, one scale per layer group only for `groups`, and each repair step's knobs (`REPAIR_SPACES`) only
when that step is drawn: the refusal ablation's λ, c, layer and position; the answer alignment's c and layer; the
calibration's rank, steps, learning rate and borderline weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..errors import InputError
from ..jobspec import EvaluationSettings, RepairSpec
from ..methods.catalog import CATALOG, REPAIRS
from ..schedules import ScheduleKind
from .recipe import Recipe

DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
ALPHA_RATIO = (0.5, 2.0)
"""α of a sampled trial = anchor × ratio, ratio log-uniform in this range (see `suggest_recipe`)."""


class SearchSettings(BaseModel):
    """A budgeted, constrained recipe search (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(
        default=30,
        ge=1,
        le=1000,
        description="cost in plain trials (one evaluation on the search split each); a repair trial costs more",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the sampler")
    max_over_refusal_increase: float = Field(
        default=0.05, ge=0, le=1, description="constraint: over_refusal − over_refusal(before) ≤ this"
    )
    max_utility_drop: float = Field(
        default=0.02, ge=0, le=1, description="constraint: utility(before) − utility ≤ this"
    )
    methods: list[str] = Field(default=["sst", "linear"], min_length=1, description="merge methods the search may use")
    alpha_min: float = Field(default=0.25, ge=0, le=100, description="smallest α tried")
    alpha_max: float = Field(default=3.0, gt=0, le=100, description="largest α tried")
    schedules: list[ScheduleKind] = Field(
        default=["constant", "linear", "groups"], min_length=1, description="depth schedules the search may use"
    )
    groups: int = Field(default=3, ge=2, le=8, description="layer groups of the `groups` schedule")
    separate_mlp: bool = Field(default=True, description="`groups`: MLP modules get their own scales")
    repair: Literal["off", "search", "always"] = Field(
        default="search", description="repair steps: never, as a searched option, or one in every trial"
    )
    repair_methods: list[str] = Field(
        default=list(REPAIRS),
        min_length=1,
        description="repair steps the search may try (those whose data the job has: docs/repair.md)",
    )
    split_seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the search/report split")
    report_fraction: float = Field(default=0.5, gt=0, lt=1, description="share of each evaluation set kept for report")
    report_points: int = Field(
        default=6, ge=1, le=50, description="Pareto-optimal trials re-evaluated on the report split"
    )
    front_alphas: list[float] | None = Field(
        default=None, min_length=2, max_length=32, description="α of linear's reference front (default: a grid)"
    )
    warm_start: bool = Field(
        default=True,
        description="first trials: each method at its defaults at every warm-start α, constant schedule, no repair",
    )
    warm_start_alphas: list[float] = Field(
        default=[0.5, 1.0, 1.5], min_length=1, max_length=16, description="α of the warm-start trials"
    )
    bracket_steps: int = Field(
        default=3,
        ge=0,
        le=20,
        description="after the warm start: trials per method bracketing the α where the tolerance binds",
    )
    prune: bool = Field(
        default=True, description="stop a trial once its search split outcome is certain to lose (docs/search.md)"
    )
    sampler: Literal["tpe", "random"] = Field(default="tpe", description="optuna sampler")
    startup_trials: int = Field(default=8, ge=1, le=1000, description="random trials before TPE models the space")

    @field_validator("methods", "repair_methods")
    @classmethod
    def _known(cls, names: list[str], info: ValidationInfo) -> list[str]:
        known, kind = (CATALOG, "method") if info.field_name == "methods" else (REPAIRS, "repair step")
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown {kind}(s) {unknown}; one of {sorted(known)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{info.field_name} must be distinct")
        return names

    @field_validator("front_alphas", "warm_start_alphas")
    @classmethod
    def _finite(cls, alphas: list[float] | None) -> list[float] | None:
        if alphas is not None and not all(math.isfinite(a) and 0 <= a <= 100 for a in alphas):
            raise ValueError("α values must be finite and within [0, 100]")
        return alphas

    @model_validator(mode="after")
    def _range(self) -> SearchSettings:
        if self.alpha_min >= self.alpha_max:
            raise ValueError("alpha_min must be below alpha_max")
        return self

    def reference_alphas(self) -> list[float]:
        """α of linear's front on the report split: the given ones, else 10 points over [0, alpha_max]."""
        if self.front_alphas:
            return sorted(set(self.front_alphas))
        return [round(self.alpha_max * i / 9, 4) for i in range(10)]


# The search's split and tolerances, and the evaluation settings that name the same things (one concept, one value)
EVALUATION_NAMES = {
    "split_seed": "split_seed",
    "report_fraction": "report_fraction",
    "max_utility_drop": "utility_tolerance",
    "max_over_refusal_increase": "over_refusal_tolerance",
}


def _as_search_value(field: str, value: object) -> object:
    """An evaluation setting as the search field reads it: an unbounded over-refusal tolerance is an increase ≤ 1."""
    return 1.0 if field == "max_over_refusal_increase" and value is None else value


def from_evaluation(settings: SearchSettings, evaluation: EvaluationSettings) -> SearchSettings:
    """The search's split seed, report fraction and tolerances from one place: each from `evaluation` where it was
    given, else the search's own. Both given with different values is an `InputError` (code `conflicting_settings`)
    naming each pair: a search never ignores a setting silently."""
    taken: dict[str, Any] = {}
    conflicts = []
    for field, name in EVALUATION_NAMES.items():
        if name not in evaluation.model_fields_set:
            continue
        value = _as_search_value(field, getattr(evaluation, name))
        if field in settings.model_fields_set and getattr(settings, field) != value:
            conflicts.append(f"search.{field} = {getattr(settings, field)} but evaluation.{name} = {value}")
        taken[field] = value
    if conflicts:
        raise InputError(
            f"the search and its evaluation disagree: {'; '.join(conflicts)} (give each once)",
            code="conflicting_settings",
        )
    return SearchSettings.model_validate({**settings.model_dump(exclude_unset=True), **taken})


def evaluation_values(settings: SearchSettings, evaluation: EvaluationSettings) -> dict[str, Any]:
    """The evaluation settings that say what the search uses (`from_evaluation`'s result), for a record that states
    each value the same way in both places; an unbounded over-refusal tolerance stays unbounded."""
    values = {name: getattr(settings, field) for field, name in EVALUATION_NAMES.items()}
    if evaluation.over_refusal_tolerance is None and settings.max_over_refusal_increase == 1.0:
        values["over_refusal_tolerance"] = None
    return values


def search_repair(settings: SearchSettings, given: Collection[str]) -> RepairSpec | None:
    """The repair step a search job's spec carries (its loading reads that step's data): the first of
    `settings.repair_methods` whose data inputs (`RepairInfo.needs`, MergeSpec field names) are all in `given`."""
    if settings.repair == "off":
        return None
    step = next((s for s in settings.repair_methods if set(REPAIRS[s].needs) <= set(given)), None)
    return RepairSpec(method=step) if step is not None else None


def warm_start_trials(settings: SearchSettings) -> list[dict[str, Any]]:
    """The fixed values of the first trials: every searched method with its default parameters at each warm-start α
    within [alpha_min, alpha_max], constant schedule, no repair — the sweep a user would run by hand, so that the
    search's choice is never less safe on the search split than the best feasible point of that sweep. None when
    `warm_start` is off or the constant schedule is not searched."""
    if not settings.warm_start or "constant" not in settings.schedules:
        return []
    alphas = sorted({a for a in settings.warm_start_alphas if settings.alpha_min <= a <= settings.alpha_max})
    return [default_trial(settings, method, alpha) for alpha in alphas for method in settings.methods]


def default_trial(settings: SearchSettings, method: str, alpha: float) -> dict[str, Any]:
    """The fixed values of a trial of `method` at its default parameters at `alpha`, constant schedule, no repair
    (a drawn one when `settings.repair` is "always"): the family that the warm start and the α bracketing
    (`bracket`) evaluate."""
    fixed: dict[str, Any] = {"method": method, "alpha": alpha, "schedule": "constant"}
    if settings.repair == "search":
        fixed["repair"] = "off"
    defaults = CATALOG[method].params.model_fields
    if method == "sst":
        fixed |= {"selection": "soft", "beta": defaults["beta"].default}
    elif method in DENSITY_METHODS:
        fixed["density"] = defaults["density"].default
    return fixed


def suggest_recipe(
    trial: Any,
    settings: SearchSettings,
    *,
    base_params: dict[str, Any],
    num_layers: int,
    repair_defaults: dict[str, RepairSpec] | None = None,
    positions: int = 1,
    anchors: dict[str, float] | None = None,
) -> Recipe:
    """One recipe drawn by an optuna `trial` (define-by-run, so the space is conditional as described above).

    With an `anchors[method]` (the α where the method's tolerance binds, `bracket.anchor`) α is drawn as
    anchor × ratio, ratio log-uniform in [`ALPHA_RATIO`], else uniformly in [alpha_min, alpha_max]; either way it is
    clipped to that range. Depth schedules are drawn so that no layer's α_ℓ leaves [0, alpha_max].

    `base_params` are the job's own method parameters (Fisher data settings, rank cap, seed), kept fixed so that
    every SST trial reuses the same cached Fisher factors; `repair_defaults` the repair steps the trial may draw
    (those of `settings.repair_methods` whose data the job has), each with the job's fixed settings (sample sizes,
    seed). An edit names its layer (and the ablation its post-instruction position, one of the last `positions`
    tokens), so the step applies exactly that edit and the trial's evaluation judges it.
    """
    method = trial.suggest_categorical("method", settings.methods)
    anchor = (anchors or {}).get(method)
    if anchor is None:
        alpha = trial.suggest_float("alpha", settings.alpha_min, settings.alpha_max)
    else:
        alpha = anchor * trial.suggest_float("alpha_ratio", *ALPHA_RATIO, log=True)
    alpha = min(max(alpha, settings.alpha_min), settings.alpha_max)
    fields = CATALOG[method].params.model_fields
    params: dict[str, Any] = {k: v for k, v in base_params.items() if k in fields}
    params["alphas"] = [alpha]
    schedule = trial.suggest_categorical("schedule", settings.schedules)
    params["schedule"] = schedule
    if schedule == "linear":  # α_L = u · min(3α, alpha_max): from no safety in the last layer to three times α there
        last = trial.suggest_float("last_layer_fraction", 0.0, 1.0) * min(3 * alpha, settings.alpha_max)
        params["schedule_gamma"] = last - alpha
    elif schedule == "groups":  # α·g_k with g_k = v_k · min(2, alpha_max/α): each group in [0, min(2α, alpha_max)]
        top = min(2.0, settings.alpha_max / alpha) if alpha > 0 else 2.0
        params["schedule_groups"] = [top * trial.suggest_float(f"group_{k}", 0.0, 1.0) for k in range(settings.groups)]
        if settings.separate_mlp:
            params["schedule_mlp_groups"] = [
                top * trial.suggest_float(f"mlp_group_{k}", 0.0, 1.0) for k in range(settings.groups)
            ]
    if method == "sst":
        selection = trial.suggest_categorical("selection", ["soft", "topk"])
        params["selection"] = selection
        if selection == "soft":
            params["beta"] = trial.suggest_float("beta", 0.05, 20.0, log=True)
        else:
            params["k"] = trial.suggest_int("k", 4, 256, log=True)
    elif method in DENSITY_METHODS:
        params["density"] = trial.suggest_float("density", 0.1, 0.9)
    repair = suggest_repair(trial, settings, repair_defaults or {}, num_layers=num_layers, positions=positions)
    return Recipe(method=method, params=params, repair=repair)


def suggest_repair(
    trial: Any, settings: SearchSettings, defaults: dict[str, RepairSpec], *, num_layers: int, positions: int
) -> RepairSpec | None:
    """The trial's repair step ("off" is a choice unless `settings.repair` is "always") and its drawn knobs, over
    the job's fixed settings of that step."""
    steps = [s for s in settings.repair_methods if s in defaults]
    if settings.repair == "off" or not steps:
        return None
    choices = steps if settings.repair == "always" else ["off", *steps]
    step = trial.suggest_categorical("repair", choices)
    if step == "off":
        return None
    given = defaults[step]
    fixed = given.step_params()
    knobs = REPAIR_SPACES[step](trial, fixed, num_layers, positions)
    return RepairSpec(method=step, params=fixed.model_copy(update=knobs).model_dump())


def candidate_layers(fixed: Any, num_layers: int) -> int:
    """How many of the first layers an edit may use: ℓ < max_layer_fraction · L (at least one)."""
    return max(1, int(fixed.max_layer_fraction * num_layers))


def ablation_space(trial: Any, fixed: Any, num_layers: int, positions: int) -> dict[str, Any]:
    """λ, c ∈ [0, 1]; the direction's layer among the candidates and its post-instruction position."""
    return {
        "lam": trial.suggest_float("repair_lambda", 0.0, 1.0),
        "strength": trial.suggest_float("repair_strength", 0.0, 1.0),
        "layer": trial.suggest_int("repair_layer", 0, candidate_layers(fixed, num_layers) - 1),
        "position": trial.suggest_int("repair_position", -positions, -1),
    }


def alignment_space(trial: Any, fixed: Any, num_layers: int, positions: int) -> dict[str, Any]:
    """c ∈ [0, 1] and one edited layer among the candidates."""
    return {
        "strength": trial.suggest_float("alignment_strength", 0.0, 1.0),
        "layers": [trial.suggest_int("alignment_layer", 0, candidate_layers(fixed, num_layers) - 1)],
    }


def calibration_space(trial: Any, fixed: Any, num_layers: int, positions: int) -> dict[str, Any]:
    """Rank ∈ {4, 8, 16}; steps log-uniform in [25, 400] (the cost: steps × batch rows of training); learning
    rate log-uniform in [5e-5, 2e-3]; the borderline prompts' mixture weight log-uniform in [0.25, 4]."""
    return {
        "rank": trial.suggest_categorical("calibration_rank", [4, 8, 16]),
        "steps": trial.suggest_int("calibration_steps", 25, 400, log=True),
        "learning_rate": trial.suggest_float("calibration_learning_rate", 5e-5, 2e-3, log=True),
        "borderline_weight": trial.suggest_float("calibration_borderline_weight", 0.25, 4.0, log=True),
    }


REPAIR_SPACES: dict[str, Callable[[Any, Any, int, int], dict[str, Any]]] = {
    "refusal_ablation": ablation_space,
    "answer_alignment": alignment_space,
    "calibration": calibration_space,
}
"""Each repair step's searched knobs (a test checks that every step of `methods.catalog.REPAIRS` has one)."""
