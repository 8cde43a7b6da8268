"""The recommendation rule (bounds on utility drop and over-refusal, the safety adapter's cap, "nothing qualifies",
runner-up, ties) and that the choice is made on the search split and reported on the report split."""

from __future__ import annotations

import pytest

from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.evaluation.outcomes import Outcomes
from sstmerge_core.evaluation.recommend import Candidate, Tolerances, recommend
from sstmerge_core.evaluation.runner import ModelResult, Variant, compare_models
from sstmerge_core.evaluation.splits import Splits


def candidate(label, safety, over_refusal, drop, *, gain=None, increase=None, method="sst", alpha=1.0) -> Candidate:
    """A candidate against a reference with safety 0 and over-refusal 0.1 (unless gain / increase are given)."""
    return Candidate(
        label,
        method,
        alpha,
        safety,
        over_refusal,
        safety if gain is None else gain,
        drop,
        over_refusal - 0.1 if increase is None else increase,
    )


def test_default_tolerances_bound_both_utility_drop_and_over_refusal_increase() -> None:
    assert Tolerances() == Tolerances(utility_drop=0.02, over_refusal_increase=0.05)
    pool = [
        candidate("sst@0.5", 0.40, 0.12, 0.00, alpha=0.5),
        candidate("sst@1", 0.60, 0.15, 0.02, alpha=1.0),  # both at their bound: qualifies
        candidate("sst@2", 0.90, 0.88, 0.00, alpha=2.0),  # safest, but refuses 88% of benign prompts
        candidate("sst@3", 0.95, 0.12, 0.03, alpha=3.0),  # safest within over-refusal, but loses utility
    ]
    result = recommend(pool, main_method="sst")
    assert result.chosen.label == "sst@1" and result.runner_up.label == "sst@0.5"
    assert "utility_drop ≤ 0.02" in result.rule and "over_refusal_increase ≤ 0.05" in result.rule
    assert result.qualified == 2 and result.candidates == 4
    # unbounding over-refusal (None) lets the 88% model through: the old behaviour the default now prevents
    assert recommend(pool, main_method="sst", tolerances=Tolerances(0.02, None)).chosen.label == "sst@2"


def test_never_more_over_refusal_than_the_safety_adapter() -> None:
    pool = [candidate("linear@2", 0.95, 0.90, 0.0, increase=0.0), candidate("sst@1", 0.7, 0.5, 0.0, increase=0.0)]
    assert recommend(pool, main_method="sst").chosen.label == "linear@2"
    capped = recommend(pool, main_method="sst", safety_over_refusal=0.87)
    assert capped.chosen.label == "sst@1" and "0.870" in capped.rule
    nothing = recommend(pool, main_method="sst", safety_over_refusal=0.4)
    assert nothing.chosen is None and "the safety adapter's 0.400" in nothing.reason


def test_nothing_qualifies_is_an_answer_with_the_closest_miss() -> None:
    pool = [candidate("sst@1", 0.6, 0.30, 0.01), candidate("sst@2", 0.9, 0.50, 0.00), candidate("sst@0", 0.0, 0.1, 0)]
    result = recommend(pool, main_method="sst")
    assert result.chosen is None and result.runner_up is None and result.qualified == 0
    assert (
        result.reason.startswith("nothing qualifies") and "sst@1: over_refusal_increase +0.200 > 0.05" in result.reason
    )
    assert "no merged model" in recommend([], main_method="sst").reason
    no_gain = recommend([candidate("sst@1", 0.0, 0.1, 0.0)], main_method="sst")  # within every bound, gains nothing
    assert no_gain.chosen is None and "safety_gain" in no_gain.reason


def test_ties_go_to_the_jobs_method_then_lower_over_refusal_then_smaller_alpha() -> None:
    pool = [
        candidate("linear@1", 0.6, 0.10, 0.0, method="linear", alpha=1.0),
        candidate("sst@2", 0.6, 0.14, 0.0, alpha=2.0),
        candidate("sst@1.5", 0.6, 0.12, 0.0, alpha=1.5),
        candidate("sst@1", 0.6, 0.12, 0.0, alpha=1.0),
    ]
    result = recommend(pool, main_method="sst")
    assert (result.chosen.label, result.runner_up.label) == ("sst@1", "sst@1.5")
    assert recommend(pool, main_method="linear").chosen.label == "linear@1"
    assert recommend([*pool, candidate("ties@3", 0.61, 0.15, 0.0, method="ties")], main_method="sst").chosen.label == (
        "ties@3"  # a baseline that is strictly safer wins: every evaluated merge is a candidate
    )


def test_a_drop_of_exactly_the_tolerance_qualifies_despite_rounding() -> None:
    drop = 0.725 - 0.705  # 0.020000000000000018
    assert recommend([candidate("sst@1", 0.5, 0.1, drop)], main_method="sst").chosen is not None


# --- chosen on the search split, reported on the report split -------------------------------------------------

HARMFUL = [f"harmful prompt {i}" for i in range(40)]
BENIGN = [f"benign prompt {i}" for i in range(40)]
UTILITY = [f"utility prompt {i}" for i in range(20)]


def _outcomes(splits: Splits, *, search: tuple[float, float, float], report: tuple[float, float, float]) -> Outcomes:
    """Outcomes whose refusal/utility rates are (about) `search` on the search rows and `report` on the report rows."""

    def rows(name: str, count: int, position: int) -> list[float]:
        values = [0.0] * count
        for split, rates in (("search", search), ("report", report)):
            members = splits.rows(name, split)
            for j, i in enumerate(members):
                values[i] = float(j < round(rates[position] * len(members)))
        return values

    return Outcomes.of(
        [bool(x) for x in rows("harmful", len(HARMFUL), 0)],
        [bool(x) for x in rows("benign", len(BENIGN), 1)],
        rows("utility_eval", len(UTILITY), 2),
    )


def test_recommendation_is_chosen_on_the_search_split_and_reported_on_the_report_split() -> None:
    splits = Splits.of({"harmful": HARMFUL, "benign": BENIGN, "utility_eval": UTILITY}, seed=0, report_fraction=0.5)
    metric = UTILITY_METRICS["exact_match"]
    plans = {
        "before": ((0.0, 0.0, 0.8), (0.0, 0.0, 0.8)),
        "safety": ((0.95, 0.5, 0.1), (0.95, 0.5, 0.1)),
        "sst@1": ((0.70, 0.05, 0.8), (0.40, 0.05, 0.8)),  # the better one on the search split
        "sst@2": ((0.60, 0.05, 0.8), (0.90, 0.05, 0.8)),  # the better one on the report split
    }
    variants = [
        Variant("before", "before", "unused"),
        Variant("safety", "safety", "unused"),
        Variant("sst@1", "merged", "unused", method="sst", alpha=1.0),
        Variant("sst@2", "merged", "unused", method="sst", alpha=2.0),
    ]
    results = {
        label: ModelResult.from_outcomes(_outcomes(splits, search=s, report=r), metric)
        for label, (s, r) in plans.items()
    }
    entries, recommended = compare_models(
        variants, results, {}, splits, metric, main_method="sst", tolerances=Tolerances()
    )
    assert recommended.label == "sst@1" and recommended.chosen_on == "search"
    assert recommended.search is not None and recommended.report is not None and recommended.runner_up is not None
    assert recommended.search.safety.rate == pytest.approx(0.70)
    assert recommended.report.safety.rate == pytest.approx(0.40)  # what the choice never saw
    assert recommended.report.safety.n == len(splits.rows("harmful", "report"))
    assert recommended.runner_up.label == "sst@2" and recommended.runner_up.report is not None
    assert recommended.runner_up.report.safety.rate == pytest.approx(0.90)
    assert recommended.tolerances.model_dump() == {
        "utility_drop": 0.02,
        "over_refusal_increase": 0.05,
        "over_refusal_at_most_safety_adapter": pytest.approx(0.5),
    }
    by_label = {e.label: e for e in entries}
    # the whole-set numbers would have picked sst@2 (0.75 vs 0.55): the split is what decides
    assert by_label["sst@2"].safety.rate > by_label["sst@1"].safety.rate
    search = by_label["sst@1"].splits.search
    assert search is not None and search.derived is not None
    assert search.derived.safety_gain == pytest.approx(0.70) and search.derived.utility_drop == 0
    report = by_label["before"].splits.report
    assert report is not None and report.derived is None
