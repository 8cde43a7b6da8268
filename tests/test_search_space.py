"""The recipe search's pure parts: settings, the conditional space, recipes, fronts and matched-safety bootstrap."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from pydantic import ValidationError

from sstmerge_core.evaluation.outcomes import Outcomes
from sstmerge_core.jobspec import RepairSpec
from sstmerge_core.methods.catalog import REPAIRS
from sstmerge_core.search.matched import at_safety, front_curve, interpolate, matched_difference
from sstmerge_core.search.recipe import Recipe
from sstmerge_core.search.space import REPAIR_SPACES, SearchSettings, search_repair, suggest_recipe, warm_start_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
EVERY_STEP = {step: RepairSpec(method=step) for step in REPAIRS}


def test_settings_refuse_bad_values():
    for bad in (
        {"methods": ["nope"]},
        {"methods": []},
        {"alpha_min": 2.0, "alpha_max": 1.0},
        {"budget": 0},
        {"max_over_refusal_increase": -0.1},
        {"front_alphas": [float("nan"), 1.0]},
        {"warm_start_alphas": [-1.0]},
        {"warm_start_alphas": []},
        {"report_fraction": 1.0},
        {"extra": 1},
        {"repair_methods": ["nope"]},
        {"repair_methods": []},
        {"repair_methods": ["calibration", "calibration"]},
    ):
        with pytest.raises(ValidationError):
            SearchSettings(**bad)
    assert SearchSettings().reference_alphas()[0] == 0.0 and SearchSettings().reference_alphas()[-1] == 3.0


def test_every_drawn_recipe_is_valid_and_only_carries_the_parameters_it_uses():
    settings = SearchSettings(methods=["sst", "linear", "ties"], repair="search")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        recipe = suggest_recipe(
            trial, settings, base_params={"max_samples": 64}, num_layers=30, repair_defaults=EVERY_STEP
        )
        study.tell(trial, 0.0)
        p = recipe.method_params()
        seen.add((recipe.method, p.schedule, recipe.repair.method if recipe.repair else None))
        assert settings.alpha_min <= recipe.alpha <= settings.alpha_max
        assert ("beta" in trial.params or "k" in trial.params) == (recipe.method == "sst")
        assert ("density" in trial.params) == (recipe.method == "ties")
        assert ("last_layer_fraction" in trial.params) == (p.schedule == "linear")
        assert (len(p.schedule_groups or []) == settings.groups) == (p.schedule == "groups")
        if recipe.method == "sst":
            assert p.max_samples == 64  # the job's Fisher settings are kept, so cached factors are reused
        step = recipe.repair.step_params() if recipe.repair is not None else None
        if recipe.repair is not None and recipe.repair.method == "refusal_ablation":
            assert 0 <= step.layer < 24 and 0 <= step.strength <= 1 and -1 >= step.position >= -1
        if recipe.repair is not None and recipe.repair.method == "answer_alignment":
            assert len(step.layers) == 1 and 0 <= step.layers[0] < 24 and 0 <= step.strength <= 1
        if recipe.repair is not None and recipe.repair.method == "calibration":
            assert step.rank in (4, 8, 16) and 25 <= step.steps <= 400 and 5e-5 <= step.learning_rate <= 2e-3
            assert 0.25 <= step.borderline_weight <= 4 and step.harmful_weight == 1.0  # the rest: the job's own
        assert ("repair_lambda" in trial.params) == (
            recipe.repair is not None and recipe.repair.method == "refusal_ablation"
        )
        assert ("calibration_steps" in trial.params) == (
            recipe.repair is not None and recipe.repair.method == "calibration"
        )
        assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe
    assert {m for m, _, _ in seen} == {"sst", "linear", "ties"}
    assert {r for *_, r in seen} == {None, *REPAIRS}
    fresh = optuna.create_study().ask()
    no_repair = suggest_recipe(fresh, SearchSettings(repair="always"), base_params={}, num_layers=30)
    assert no_repair.repair is None


def test_every_repair_step_has_a_search_space_and_the_job_data_decides_which_are_tried():
    assert set(REPAIR_SPACES) == set(REPAIRS)
    only_calibration = {"calibration": RepairSpec(method="calibration", params={"max_samples": 32, "seed": 3})}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    steps = set()
    for _ in range(20):
        trial = study.ask()
        recipe = suggest_recipe(
            trial, SearchSettings(repair="always"), base_params={}, num_layers=30, repair_defaults=only_calibration
        )
        study.tell(trial, 0.0)
        steps.add(recipe.repair.method)
        assert recipe.repair.step_params().max_samples == 32 and recipe.repair.step_params().seed == 3
    assert steps == {"calibration"}
    settings = SearchSettings()
    assert search_repair(settings, {"safety_data", "borderline_data"}).method == "calibration"
    assert search_repair(settings, {"safety_data", "harmless_data", "borderline_data"}).method == "refusal_ablation"
    assert search_repair(settings, {"safety_data"}) is None
    assert search_repair(settings.model_copy(update={"repair": "off"}), {"safety_data", "borderline_data"}) is None


def test_warm_start_trials_are_each_method_at_its_defaults_then_the_sampler_takes_over():
    settings = SearchSettings(methods=["sst", "linear", "ties"], alpha_min=0.75, warm_start_alphas=[1.5, 0.5, 1.0])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for fixed in warm_start_trials(settings):
        study.enqueue_trial(fixed)
    drawn = []
    for _ in range(8):
        trial = study.ask()
        drawn.append(suggest_recipe(trial, settings, base_params={}, num_layers=30, repair_defaults=EVERY_STEP))
        study.tell(trial, 0.0)
    # 0.5 is below alpha_min: two α × three methods, α ascending, then sampled trials
    assert [(r.method, r.alpha) for r in drawn[:6]] == [(m, a) for a in (1.0, 1.5) for m in ("sst", "linear", "ties")]
    for recipe in drawn[:6]:
        p = recipe.method_params()
        assert p.schedule == "constant" and recipe.repair is None
        assert p == type(p)(alphas=[recipe.alpha])  # the method's defaults, nothing else
    assert any(r.method_params().schedule != "constant" or r.repair is not None for r in drawn[6:])
    assert warm_start_trials(settings.model_copy(update={"warm_start": False})) == []
    assert warm_start_trials(settings.model_copy(update={"schedules": ["linear"]})) == []


def test_recipe_needs_one_alpha():
    with pytest.raises(ValidationError, match="one α"):
        Recipe(method="linear", params={"alphas": [1.0, 2.0]})


def test_front_follows_alpha_up_to_the_safest_point_and_averages_ties():
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    safety = [0.1, 0.5, 0.5, 0.9, 0.8, 0.3]  # falls again past α=1.5
    over = [0.0, 0.1, 0.3, 0.4, 0.6, 0.9]
    s, o = front_curve(alphas, safety, over)
    assert s.tolist() == [0.1, 0.5, 0.9] and o.tolist() == pytest.approx([0.0, 0.2, 0.4])
    shuffled = front_curve(alphas[::-1], safety[::-1], over[::-1])
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, (s, o)))
    assert interpolate((s, o), 0.7) == pytest.approx((0.3,))
    assert interpolate((s, o), 0.95) is None and interpolate((s, o), 0.05) is None


def _bernoulli(rng, p, n):
    return rng.random(n) < p


def _model(rng, safety, over, utility, n=(200, 300, 100)):
    return Outcomes.of(_bernoulli(rng, safety, n[0]), _bernoulli(rng, over, n[1]), _bernoulli(rng, utility, n[2]))


def test_a_point_of_the_reference_front_matches_it_exactly_in_every_draw():
    rng = np.random.default_rng(0)
    front = [(a, _model(rng, 0.3 + 0.3 * a, 0.1 + 0.3 * a, 0.8)) for a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    result = matched_difference(front[2][1], front, n_boot=300, seed=1)
    assert result["matched"] and result["delta_over_refusal"] == pytest.approx(0.0)
    assert result["delta_over_refusal_ci"] == pytest.approx([0.0, 0.0])


def test_matched_difference_point_estimate_and_a_real_improvement_is_outside_the_interval():
    rng = np.random.default_rng(1)
    front = [(a, _model(rng, 0.2 + 0.35 * a, 0.05 + 0.25 * a, 0.8)) for a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    better = _model(rng, 0.72, 0.12, 0.8)  # linear needs over-refusal ≈ 0.4 for this safety
    result = matched_difference(better, front, n_boot=500, seed=2)

    def mean(values):
        return float(np.mean(values))

    s = mean(better.harmful)
    curve = front_curve([a for a, _ in front], *zip(*[(mean(m.harmful), mean(m.benign)) for _, m in front]))
    expected = mean(better.benign) - float(np.interp(s, curve[0], curve[1]))
    assert result["delta_over_refusal"] == pytest.approx(expected)
    low, high = result["delta_over_refusal_ci"]
    assert low <= result["delta_over_refusal"] <= high < 0
    outside = matched_difference(_model(rng, 0.99, 0.5, 0.8), front, n_boot=50)
    assert outside["matched"] is False


def test_at_safety_of_a_front_against_itself_is_zero_and_a_shifted_front_is_found():
    rng = np.random.default_rng(3)
    front = [(a, _model(rng, 0.2 + 0.35 * a, 0.05 + 0.25 * a, 0.8)) for a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    same = at_safety(front, front, 0.6, n_boot=200)
    assert same["delta_over_refusal"] == pytest.approx(0.0) and same["delta_over_refusal_ci"] == pytest.approx([0, 0])
    shifted = [(a, _model(rng, 0.2 + 0.35 * a, 0.02 + 0.1 * a, 0.8)) for a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    result = at_safety(shifted, front, 0.6, n_boot=300)
    assert result["matched"] and result["delta_over_refusal_ci"][1] < 0
    assert at_safety(shifted, front, 0.999, n_boot=10)["matched"] is False


def test_bracketing_bisects_towards_the_alpha_where_the_tolerance_binds():
    from sstmerge_core.search.bracket import Point, anchor, next_alpha

    def within(alpha: float) -> bool:  # a family whose tolerance binds at α* = 1.3
        return alpha <= 1.3

    points = [Point(a, within(a)) for a in (0.5, 1.0, 1.5)]
    for _ in range(10):
        alpha = next_alpha(points, 0.25, 3.0)
        if alpha is None:
            break
        points.append(Point(alpha, within(alpha)))
    found = anchor(points)
    assert found is not None and 1.3 * (1 - 0.1) <= found <= 1.3  # within the stopping width below α*
    assert len(points) <= 3 + 3
    # every α met the tolerances: double up to alpha_max; none did: halve down to alpha_min
    assert next_alpha([Point(0.5, True), Point(1.0, True)], 0.25, 3.0) == 2.0
    assert next_alpha([Point(2.0, True)], 0.25, 3.0) == 3.0
    assert next_alpha([Point(3.0, True)], 0.25, 3.0) is None
    assert next_alpha([Point(0.5, False), Point(1.0, False)], 0.25, 3.0) == 0.25
    assert next_alpha([Point(0.25, False)], 0.25, 3.0) is None
    assert anchor([Point(0.5, False)]) is None and next_alpha([], 0.25, 3.0) is None
    # a trial beyond the bracket that met the tolerances does not move the anchor past the first failure
    assert anchor([Point(0.5, True), Point(1.0, False), Point(2.0, True)]) == 0.5


def test_sampled_alphas_follow_the_anchor_and_schedules_stay_within_the_alpha_range():
    settings = SearchSettings(methods=["sst", "linear"], alpha_max=3.0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    layers = 30
    for _ in range(80):
        trial = study.ask()
        anchors = {"linear": 2.5}
        recipe = suggest_recipe(trial, settings, base_params={}, num_layers=layers, anchors=anchors)
        study.tell(trial, 0.0)
        if recipe.method == "linear":
            assert "alpha_ratio" in trial.params and "alpha" not in trial.params
            assert recipe.alpha == pytest.approx(min(2.5 * trial.params["alpha_ratio"], 3.0))
        else:  # no anchor for SST: α drawn over the whole range
            assert "alpha" in trial.params
        per_layer = recipe.method_params().layer_alphas(recipe.alpha, layers)
        assert all(-1e-9 <= a <= settings.alpha_max + 1e-9 for kind in per_layer.values() for a in kind), recipe.label()


def test_split_and_tolerances_come_from_one_place():
    """`from_evaluation`: the evaluation's value where given, else the search's own; a contradiction is refused; an
    over-refusal tolerance of 0 stays 0 (before, the CLI read `0 or 1.0`: unbounded) and None means ≤ 1."""
    from sstmerge_core.errors import InputError
    from sstmerge_core.jobspec import EvaluationSettings
    from sstmerge_core.search.space import evaluation_values, from_evaluation

    search = SearchSettings(split_seed=3, budget=5)
    taken = from_evaluation(search, EvaluationSettings(over_refusal_tolerance=0.0, utility_tolerance=0.1))
    assert (taken.split_seed, taken.max_over_refusal_increase, taken.max_utility_drop, taken.budget) == (3, 0, 0.1, 5)
    unbounded = EvaluationSettings(over_refusal_tolerance=None)
    assert from_evaluation(SearchSettings(), unbounded).max_over_refusal_increase == 1
    assert from_evaluation(search, EvaluationSettings(split_seed=3)).split_seed == 3  # the same value twice: fine
    with pytest.raises(InputError) as error:
        from_evaluation(search, EvaluationSettings(split_seed=4, report_fraction=0.5))
    assert error.value.code == "conflicting_settings" and "search.split_seed = 3" in str(error.value)
    values = evaluation_values(from_evaluation(SearchSettings(), unbounded), unbounded)
    expected = {"split_seed": 0, "report_fraction": 0.5, "utility_tolerance": 0.02, "over_refusal_tolerance": None}
    assert values == expected
