"""`sstmerge search`: a budgeted, constrained search over merge recipes, confirmed on prompts it never saw
(docs/search.md).

    load once → Fisher factors once (cached) → split every evaluation set into search and report parts
    → trials (optuna): recipe → merged (and repaired) updates in memory → scores on the search split
    → chosen recipe and Pareto set → report split: references, chosen, Pareto set, linear's front, matched safety
    → the chosen adapter with its merge_spec.json, trials.json, search_report.json, plot.png
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import LoraFactors
from ..errors import InputError
from ..evaluation.derived import dominates
from ..evaluation.metrics import UTILITY_METRICS
from ..evaluation.pricing import SAFETY_TARGETS, WARNING_BELOW, price_list, tolerance_change, warning_text
from ..evaluation.recommend import Candidate, Tolerances
from ..evaluation.runner import EvaluationData, ModelResult
from ..jobspec import DATA_INPUTS, MergeSpec, RepairSpec
from ..merge import utility_deltas
from ..methods.catalog import REPAIRS
from ..methods.registry import get_method
from ..modeling import num_layers
from ..pipeline import staging_folder
from ..progress import CalibrationSize, JobProgress, ProgressFn, StageCost, constants_for, stage_costs, step_cost
from ..repair.residual import post_instruction_length
from ..report import now_iso
from ..specfile import InputNames
from ..stages.documents import write_documents
from ..stages.evaluation import score_updates
from ..stages.fisher import FisherResult, compute_fisher
from ..stages.inputs import LoadedInputs, ModelCache, load_inputs
from ..stages.merging import MergedUpdates, merge_updates
from ..stages.repair import load_repair_options, repair_updates, with_params
from ..stages.sizes import job_sizes, model_size, repair_size
from ..stages.writing import adapter_target, write_adapter_weights
from .bracket import Point, anchor, next_alpha
from .matched import matched_difference
from .pruning import CertainStop, TrialPruned
from .recipe import Recipe
from .report import PLOT_FILE, search_report, write_search_files
from .space import SearchSettings, default_trial, suggest_recipe, warm_start_trials
from .trials import PrunedTrial, Trial

log = logging.getLogger(__name__)
TrialCallback = Callable[[dict], None]
OBJECTIVE = (
    "highest safety on the search split among recipes with over_refusal − over_refusal(before) ≤ "
    "max_over_refusal_increase, utility(before) − utility ≤ max_utility_drop and over_refusal ≤ the safety "
    "adapter's own; ties → lower over-refusal"
)


@dataclass(frozen=True)
class SearchOutcome:
    out_dir: Path
    report: Mapping[str, Any]
    chosen: Trial | None
    adapter_dir: Path | None
    spec_path: Path | None


@dataclass(frozen=True)
class SearchContext:
    """What every trial shares: the loaded job, its Fisher factors, its splits and the references on them."""

    loaded: LoadedInputs
    fisher: FisherResult | None
    settings: SearchSettings
    search: EvaluationData
    report: EvaluationData
    layers: int
    positions: int
    before: ModelResult
    safety: ModelResult
    repairs: Mapping[str, Any]  # step → its loaded inputs (`stages.repair.load_repair_options`)
    pass_cost: float  # one model's evaluation on the search split, in the cost model's units

    @property
    def higher_is_better(self) -> bool:
        evaluation = self.loaded.evaluation
        assert evaluation is not None, "a search always evaluates"
        return UTILITY_METRICS[evaluation.spec.utility_metric].higher_is_better


def reference_updates(loaded: LoadedInputs) -> dict[str, dict[str, LoraFactors]]:
    """before = base + Σ w_i ΔU_i; safety = base + ΔS (the weighted safety sum), as in-memory updates."""
    safety = {name: m.safety for name, m in loaded.modules.items() if m.safety is not None}
    return {"before": utility_deltas(dict(loaded.modules)), "safety": safety}


def merged_recipe(
    loaded: LoadedInputs, fisher: FisherResult | None, recipe: Recipe, repairs: Mapping[str, Any] | None = None
) -> MergedUpdates:
    """The recipe's merge in memory: its method on every module (Fisher factors where needed), then its repair step
    with the recipe's parameters on that step's loaded inputs (`repairs`, else the job's own repair)."""
    method = get_method(recipe.method)
    factors = fisher.factors if fisher is not None and method.needs_fisher else None
    layers = num_layers(loaded.model)
    merged = merge_updates(loaded.modules, method, recipe.method_params(), factors, num_layers=layers)
    if recipe.repair is not None:
        inputs = repair_inputs(loaded, recipe, repairs)
        merged = repair_updates(loaded.model, loaded.tokenizer, merged, inputs)
    return merged


def repair_inputs(loaded: LoadedInputs, recipe: Recipe, repairs: Mapping[str, Any] | None) -> Any:
    """The loaded inputs of the recipe's repair step, with the recipe's parameters."""
    assert recipe.repair is not None
    step = recipe.repair.method
    available = dict(repairs or {})
    if not available and loaded.repair is not None and loaded.spec.repair is not None:
        available[loaded.spec.repair.method] = loaded.repair
    if step not in available:
        raise InputError(f"a recipe with the repair step {step!r} needs that step's data (docs/repair.md)")
    return with_params(available[step], recipe.repair)


def trial_cost(ctx: SearchContext, recipe: Recipe) -> float:
    """What a trial of `recipe` costs in plain trials (the budget's unit): 1 for its evaluation on the search split,
    plus its repair step's cost model ÷ that evaluation's (`progress.step_cost`). Deterministic: the budget spends
    the same trials on every machine."""
    if recipe.repair is None:
        return 1.0
    inputs = repair_inputs(ctx.loaded, recipe, ctx.repairs)
    size = repair_size(dataclasses.replace(ctx.loaded, repair=inputs), models=1)
    if size is None:
        return 1.0
    if isinstance(size, CalibrationSize) and inputs.targets_made:  # the `before` answers are made once per job
        size = dataclasses.replace(size, generated=0)
    cost = step_cost(model_size(ctx.loaded.model), size, constants_for(ctx.loaded.device)).total
    return 1.0 + cost / max(ctx.pass_cost, 1e-12)


def trial_repair(merged: MergedUpdates) -> dict | None:
    """The repair step's choice and scores in a trial (candidate tables and mixtures left out): the edits' chosen
    layer and baseline, the calibration's loss and time."""
    if not merged.repairs:
        return None
    step = next(iter(merged.repairs.values()))
    keys = ("step", "chosen", "baseline", "chosen_by", "reason", "trained", "loss", "seconds")
    return {k: step.get(k) for k in keys if k in step}


def judge_trial(
    ctx: SearchContext, number: int, recipe: Recipe, result: ModelResult, seconds: float, repair, cost: float = 1.0
) -> Trial:
    """Scores against the references and the constraints of the objective."""
    scores, before = result.scores(ctx.higher_is_better), ctx.before.scores(ctx.higher_is_better)
    utility_drop = before.utility - scores.utility
    increase = scores.over_refusal - before.over_refusal
    excess = bounds(ctx, utility_drop, increase, scores.over_refusal)
    return Trial(number, recipe, result, scores, utility_drop, increase, excess, seconds, repair, cost)


def bounds(ctx: SearchContext, utility_drop: float, over_refusal_increase: float, over_refusal: float) -> dict:
    """By how much each bound of the objective is broken (≤ 0 where it holds): the recommendation rule's bounds
    (`Tolerances.excess`) with the search's tolerances and the safety adapter's over-refusal as the cap."""
    tolerances = tolerances_of(ctx.settings)
    return tolerances.excess(
        utility_drop=utility_drop,
        over_refusal_increase=over_refusal_increase,
        over_refusal=over_refusal,
        over_refusal_cap=ctx.safety.over_refusal.rate,
    )


def tolerances_of(settings: SearchSettings) -> Tolerances:
    return Tolerances(settings.max_utility_drop, settings.max_over_refusal_increase)


def trial_candidate(ctx: SearchContext, trial: Trial) -> Candidate:
    """A trial as the recommendation's pricing sees it (`evaluation/pricing.py`): its search-split numbers."""
    return Candidate(
        f"trial-{trial.number}",
        trial.recipe.method,
        trial.recipe.alpha,
        trial.scores.safety,
        trial.scores.over_refusal,
        trial.scores.safety - ctx.before.safety.rate,
        trial.utility_drop,
        trial.over_refusal_increase,
    )


def priced_trials(ctx: SearchContext, trials: Sequence[Trial]) -> list[tuple[float, Trial | None]]:
    """The price list over the trials, picked on the search split: per safety target, the trial of lowest
    over-refusal reaching it within the utility tolerance (each pick is then confirmed on the report split)."""
    by_label = {f"trial-{t.number}": t for t in trials}
    picks = price_list([trial_candidate(ctx, t) for t in trials], tolerances_of(ctx.settings), None, SAFETY_TARGETS)
    return [(target, by_label[pick.label] if pick is not None else None) for target, pick in picks]


def search_warning(ctx: SearchContext, trials: Sequence[Trial], chosen_report_safety: float | None) -> str | None:
    """The warning of a chosen recipe whose report-split safety is below 0.5, naming the smallest tolerance change
    under which a trial of search-split safety ≥ 0.8 would be chosen."""
    if chosen_report_safety is None or chosen_report_safety >= WARNING_BELOW:
        return None
    tolerances = tolerances_of(ctx.settings)
    candidates = [trial_candidate(ctx, t) for t in trials]
    change = tolerance_change(candidates, tolerances, ctx.safety.over_refusal.rate)
    return warning_text(chosen_report_safety, change, tolerances)


def make_sampler(settings: SearchSettings):
    """TPE (multivariate and grouped, for the conditional space; it reads the trials' constraints) or random."""
    import warnings

    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=settings.startup_trials, multivariate=True, group=True
        )


class Families:
    """Which trials are fixed in advance: the warm start, then per method the α bracketing (`bracket`), one trial at a
    time as each result comes in; `anchors` are the α where each method's tolerance binds, for the sampled trials."""

    def __init__(self, settings: SearchSettings, warm_start: list[dict[str, Any]]) -> None:
        self.settings, self.warm_start = settings, warm_start
        self.members: dict[int, str] = {}  # trial number → method, for the trials of the default family
        self.steps = {m: settings.bracket_steps if warm_start else 0 for m in settings.methods}

    def next_fixed(self, number: int, trials: Sequence[Trial | PrunedTrial]) -> dict[str, Any] | None:
        """The fixed values of trial `number`, or None when the sampler draws it."""
        if number < len(self.warm_start):
            self.members[number] = self.warm_start[number]["method"]
            return self.warm_start[number]
        for method, left in self.steps.items():
            alpha = next_alpha(self.points(method, trials), self.settings.alpha_min, self.settings.alpha_max)
            if left > 0 and alpha is not None:
                self.steps[method] -= 1
                self.members[number] = method
                return default_trial(self.settings, method, alpha)
        return None

    def points(self, method: str, trials: Sequence[Trial | PrunedTrial]) -> list[Point]:
        """The default family's trials of `method` (a pruned one is above α* when it broke a bound, else below)."""
        return [
            Point(t.recipe.alpha, t.feasible if isinstance(t, Trial) else not t.stop.broken)
            for t in trials
            if self.members.get(t.number) == method
        ]

    def anchors(self, trials: Sequence[Trial | PrunedTrial]) -> dict[str, float] | None:
        if not self.warm_start:
            return None
        found = {m: anchor(self.points(m, trials)) for m in self.settings.methods}
        return {m: a for m, a in found.items() if a is not None}


def certain_stop(ctx: SearchContext, trials: Sequence[Trial | PrunedTrial], *, family: bool) -> CertainStop | None:
    """The watch that prunes the next trial (`pruning.CertainStop`), or None when pruning is off. A trial of the
    default family (warm start, bracketing) stops only on a broken bound: the bracketing needs its feasibility."""
    if not ctx.settings.prune:
        return None
    evaluation = ctx.loaded.evaluation
    assert evaluation is not None, "a search always evaluates"
    metric = UTILITY_METRICS[evaluation.spec.utility_metric]
    best = choose(completed(trials))
    return CertainStop(
        sizes={
            "harmful": len(ctx.search.harmful),
            "benign": len(ctx.search.benign),
            "utility": len(ctx.search.utility),
        },
        before=ctx.before.scores(ctx.higher_is_better),
        tolerances=tolerances_of(ctx.settings),
        over_refusal_cap=ctx.safety.over_refusal.rate,
        best_safety=best.scores.safety if best is not None and not family else None,
        utility_bounded=metric.needs_generation and metric.higher_is_better,
    )


def run_trials(
    ctx: SearchContext, track: JobProgress, on_trial: TrialCallback | None, base_params: dict
) -> list[Trial | PrunedTrial]:
    """Trials until `settings.budget` is spent (each costs `trial_cost` plain trials; the last may overrun it), each
    scored on the search split only, stopped early once it cannot be chosen."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = ctx.settings
    study = optuna.create_study(direction="maximize", sampler=make_sampler(settings))
    warm_start = warm_start_trials(settings)
    trials: list[Trial | PrunedTrial] = []
    families = Families(settings, warm_start)
    repair_defaults = {step: RepairSpec(method=step, params=i.params.model_dump()) for step, i in ctx.repairs.items()}
    spent = 0.0
    number = 0
    while spent < settings.budget:
        started = time.perf_counter()
        fixed = families.next_fixed(number, trials)
        if fixed is not None:
            study.enqueue_trial(fixed)
        handle = study.ask()
        recipe = suggest_recipe(
            handle,
            settings,
            base_params=base_params,
            num_layers=ctx.layers,
            positions=ctx.positions,
            repair_defaults=repair_defaults,
            anchors=None if fixed is not None else families.anchors(trials),
        )
        cost = trial_cost(ctx, recipe)

        def advance(done: float, total: float, spent: float = spent, cost: float = cost) -> None:
            track.advance(min(spent + cost * done / max(total, 1), settings.budget), settings.budget)

        merged = merged_recipe(ctx.loaded, ctx.fisher, recipe, ctx.repairs)
        watch = certain_stop(ctx, trials, family=fixed is not None)
        updates = {"trial": merged.updates(recipe.alpha)}
        trial: Trial | PrunedTrial
        try:
            result = score_updates(ctx.loaded, updates, data=ctx.search, progress=advance, watch=watch)
        except TrialPruned as stop:
            assert watch is not None
            trial = PrunedTrial(number, recipe, stop, time.perf_counter() - started, trial_repair(merged), cost)
            for key, value in watch.excess().items():
                handle.set_constraint(key, value)
            best_case = stop.bounds["safety"][1] - 1e-3 * stop.bounds["over_refusal"][0]
            handle.report(best_case, step=sum(t.seen for t in watch.tallies.values()))
            study.tell(handle, state=optuna.trial.TrialState.PRUNED)
        else:
            seconds = time.perf_counter() - started
            trial = judge_trial(ctx, number, recipe, result["trial"], seconds, trial_repair(merged), cost)
            for key, value in trial.excess.items():
                handle.set_constraint(key, value)
            study.tell(handle, trial.scores.safety - 1e-3 * trial.scores.over_refusal)
        trials.append(trial)
        spent += cost
        number += 1
        log.info("search trial", extra={k: v for k, v in trial.to_dict().items() if k not in ("recipe", "repair")})
        if on_trial is not None:
            on_trial(trial.to_dict())
    return trials


def completed(trials: Sequence[Trial | PrunedTrial]) -> list[Trial]:
    """The trials that were evaluated to the end."""
    return [t for t in trials if isinstance(t, Trial)]


def choose(trials: Sequence[Trial]) -> Trial | None:
    """The feasible trial with the highest search-split safety; ties → lower over-refusal, then the earlier trial."""
    feasible = [t for t in trials if t.feasible]
    return min(feasible, key=lambda t: (-t.scores.safety, t.scores.over_refusal, t.number), default=None)


def pareto_set(trials: Sequence[Trial], chosen: Trial | None, limit: int) -> list[Trial]:
    """Feasible trials no other feasible trial dominates (safety ↑, over-refusal ↓, utility ↑), at most `limit`
    spread evenly by safety, the chosen one always kept."""
    feasible = [t for t in trials if t.feasible]
    front = [t for t in feasible if not any(dominates(o.scores, t.scores) for o in feasible if o is not t)]
    front.sort(key=lambda t: (t.scores.safety, t.number))
    if len(front) > limit:
        picks = {round(i * (len(front) - 1) / max(limit - 1, 1)) for i in range(limit)}
        front = [t for i, t in enumerate(front) if i in picks]
    if chosen is not None and chosen not in front:
        front = [*front[: limit - 1], chosen]
    return sorted(front, key=lambda t: (t.scores.safety, t.number))


def linear_front_updates(ctx: SearchContext) -> dict[float, dict[str, LoraFactors]]:
    """Linear merges over the settings' reference α grid (constant schedule, no repair), in memory."""
    from ..methods.catalog import parse_params

    params = parse_params("linear", {"alphas": ctx.settings.reference_alphas()})
    merged = merge_updates(ctx.loaded.modules, get_method("linear"), params, num_layers=ctx.layers)
    return {alpha: merged.updates(alpha) for alpha in merged.alphas}


def evaluate_report_split(
    ctx: SearchContext,
    chosen: Trial | None,
    pareto: Sequence[Trial],
    track: JobProgress,
    priced: Sequence[Trial] = (),
) -> dict[str, Any]:
    """Every model of the report on the report split: references, the Pareto set (chosen included), the price
    list's picks (`priced`), linear's front."""
    models: dict[str, dict[str, LoraFactors]] = dict(reference_updates(ctx.loaded))
    for trial in [*pareto, *([chosen] if chosen is not None else []), *priced]:
        label = f"trial-{trial.number}"
        if label not in models:
            models[label] = merged_recipe(ctx.loaded, ctx.fisher, trial.recipe, ctx.repairs).updates(trial.recipe.alpha)
    front = linear_front_updates(ctx)
    models.update({f"linear@{alpha:g}": updates for alpha, updates in front.items()})
    results = score_updates(ctx.loaded, models, data=ctx.report, progress=track.advance)
    reference = [(alpha, results[f"linear@{alpha:g}"].outcomes) for alpha in front]
    matched = {
        label: matched_difference(result.outcomes, reference, seed=ctx.settings.seed)
        for label, result in results.items()
        if label.startswith("trial-")
    }
    return {"results": results, "linear_alphas": list(front), "matched": matched}


def search_spec(spec: MergeSpec, settings: SearchSettings) -> MergeSpec:
    """The job as loaded for a search: every searched method in its merge plan, so that the Fisher data of SST is
    read when SST may be tried."""
    if spec.evaluation is None:
        raise InputError("a search needs evaluation sets: its trials are scored on their search split")
    others = [m for m in settings.methods if m != spec.method]
    evaluation = spec.evaluation.model_copy(
        update={"split_seed": settings.split_seed, "report_fraction": settings.report_fraction}
    )
    return spec.model_copy(update={"compare_with": others, "evaluation": evaluation})


def search_repairs(loaded: LoadedInputs, settings: SearchSettings) -> dict[str, Any]:
    """The inputs of every repair step the search may apply (`stages.repair.load_repair_options`), the job's own step
    as `load_inputs` already loaded it."""
    if settings.repair == "off":
        return {}
    spec = loaded.spec
    own = {spec.repair.method: loaded.repair} if spec.repair is not None and loaded.repair is not None else {}
    assert loaded.evaluation is not None, "a search always evaluates"
    return load_repair_options(spec, settings.repair_methods, judge=loaded.evaluation.judge, loaded=own)


def plan_costs(
    loaded: LoadedInputs, settings: SearchSettings, report_models: int
) -> tuple[dict[str, StageCost], float]:
    """The progress plan — loading and Fisher passes as in a merge job; a trial ≈ one evaluation on the search
    split; the report ≈ one evaluation per model on the report split — and one model's evaluation on the search
    split, the unit of `trial_cost`."""
    sizes = job_sizes(loaded)
    costs = stage_costs(sizes, constants_for(loaded.device))
    assert sizes.evaluation is not None, "a search always evaluates"
    per_model = costs["evaluating"].total / max(sizes.evaluation.models, 1)
    plan = {k: v for k, v in costs.items() if k in ("loading", "fisher_utility", "fisher_safety")}
    plan["references"] = StageCost(body=2 * per_model * (1 - settings.report_fraction))
    plan["searching"] = StageCost(body=settings.budget * per_model * (1 - settings.report_fraction))
    plan["reporting_split"] = StageCost(body=report_models * per_model * settings.report_fraction)
    plan["writing"] = StageCost(body=costs["writing"].total / max(len(sizes.merges), 1))
    plan["reporting"] = costs["reporting"]
    return plan, per_model * (1 - settings.report_fraction)


def run_search(
    spec: MergeSpec,
    settings: SearchSettings,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    model_cache: ModelCache | None = None,
    names: InputNames | None = None,
    on_trial: TrialCallback | None = None,
) -> SearchOutcome:
    """Search recipes for `spec`'s adapters under `settings`, write the results into `out_dir` atomically.

    `spec.method`/`spec.params` give the fixed settings of every trial (Fisher data passes, rank cap, seed) and
    `spec.repair`, when set, the repair data and fixed repair settings. Raises `InputError` for bad inputs and
    `Cancelled` when `should_cancel()` turns true.
    """
    out_dir = Path(out_dir).resolve()
    track = JobProgress(progress, should_cancel)
    with staging_folder(out_dir) as staging:
        track.begin("loading")
        loaded = load_inputs(search_spec(spec, settings), model_cache=model_cache, names=names)
        report_models = 2 + settings.report_points + 1 + len(SAFETY_TARGETS) + len(settings.reference_alphas())
        plan, pass_cost = plan_costs(loaded, settings, report_models)
        track.plan(plan)
        fisher = compute_fisher(loaded, progress=track) if loaded.fisher_data else None
        evaluation = loaded.evaluation
        assert evaluation is not None, "a search always evaluates"
        splits = evaluation.data.splits(settings.split_seed, settings.report_fraction)
        track.begin("references")
        search_data, report_data = (evaluation.data.subset(splits, part) for part in ("search", "report"))
        references = score_updates(loaded, reference_updates(loaded), data=search_data, progress=track.advance)
        ctx = SearchContext(
            loaded=loaded,
            fisher=fisher,
            settings=settings,
            search=search_data,
            report=report_data,
            layers=num_layers(loaded.model),
            positions=post_instruction_length(loaded.tokenizer),
            before=references["before"],
            safety=references["safety"],
            repairs=search_repairs(loaded, settings),
            pass_cost=pass_cost,
        )
        track.begin("searching")
        trials = run_trials(ctx, track, on_trial, base_params=dict(spec.params))
        chosen = choose(completed(trials))
        pareto = pareto_set(completed(trials), chosen, settings.report_points)
        prices = priced_trials(ctx, completed(trials))
        track.begin("reporting_split")
        confirmed = evaluate_report_split(ctx, chosen, pareto, track, [t for _, t in prices if t is not None])
        track.begin("writing")
        adapter_dir = spec_path = None
        if chosen is not None:
            adapter_dir, spec_path = write_chosen(staging, ctx, chosen, names=names, final_root=out_dir)
        track.begin("reporting")
        report = search_report(
            ctx,
            splits=splits,
            trials=trials,
            chosen=chosen,
            pareto=pareto,
            confirmed=confirmed,
            objective=OBJECTIVE,
            prices=prices,
        )
        if report["chosen"] is not None:
            report["warning"] = search_warning(ctx, completed(trials), report["chosen"]["report"]["safety"]["rate"])
        write_search_files(staging, report=report, trials=trials)
        write_search_html(staging, ctx, report, trials, names=names)
        track.finish()
    return SearchOutcome(
        out_dir=out_dir,
        report=report,
        chosen=chosen,
        adapter_dir=out_dir / adapter_dir if adapter_dir else None,
        spec_path=out_dir / spec_path if spec_path else None,
    )


def chosen_spec(spec: MergeSpec, recipe: Recipe) -> MergeSpec:
    """A merge job that makes exactly the chosen recipe's adapter (`sstmerge merge --spec` re-runs it): the data
    inputs kept are those its method's Fisher passes and its repair step read."""
    kept = set(REPAIRS[recipe.repair.method].inputs) if recipe.repair is not None else set()
    if get_method(recipe.method).needs_fisher:
        kept |= {"utility_data", "safety_data"}
    data = {key: getattr(spec, key) if key in kept else None for key in DATA_INPUTS}
    return spec.model_copy(
        update={
            "method": recipe.method,
            "params": recipe.params,
            "compare_with": [],
            "repair": recipe.repair,
            "evaluation": None,
            **data,
        }
    )


def write_chosen(
    root: Path, ctx: SearchContext, chosen: Trial, *, names: InputNames | None, final_root: Path
) -> tuple[Path, Path]:
    """The chosen recipe's PEFT adapter, model card, merge_report.json and a runnable merge_spec.json."""
    merged = merged_recipe(ctx.loaded, ctx.fisher, chosen.recipe, ctx.repairs)
    loaded = dataclasses.replace(
        ctx.loaded,
        spec=chosen_spec(ctx.loaded.spec, chosen.recipe),
        method=merged.method,
        params=merged.params,
        evaluation=None,
    )
    written = write_adapter_weights(root, merged, adapter_target(loaded, names))
    documents = write_documents(
        root,
        loaded=loaded,
        written=[written],
        fisher=ctx.fisher if merged.method.needs_fisher else None,
        evaluation=None,
        timings={},
        estimated={},
        created_at=now_iso(),
        names=names,
        final_root=final_root,
    )
    return next(iter(written.dirs.values())), Path(documents.spec_file)


def write_search_html(
    root: Path,
    ctx: SearchContext,
    report: Mapping[str, Any],
    trials: Sequence[Trial | PrunedTrial],
    *,
    names: InputNames | None,
) -> None:
    """report.html of the search (`htmlreport.search_view`): the choice, the price list, the trials, the
    matched-safety comparison, the plot and every input with its sha256."""
    from ..files import write_atomic
    from ..htmlreport import REPORT_HTML, render_page, search_view
    from ..specfile import input_hashes
    from ..stages.documents import input_rows, known_hashes

    spec = ctx.loaded.spec
    rows = input_rows(spec, input_hashes(spec, known=known_hashes(ctx.loaded)), names)
    plot = root / PLOT_FILE
    view = search_view(
        report,
        [t.to_dict() for t in trials],
        plot_png=plot.read_bytes() if plot.is_file() else None,
        inputs=rows,
        title="sstmerge report: recipe search",
    )
    write_atomic(root / REPORT_HTML, render_page(view).encode("utf-8"))
