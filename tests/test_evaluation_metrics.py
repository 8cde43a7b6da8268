"""Utility metrics, Wilson intervals, derived metrics (taxes, Pareto, recommendation) and the plot,
against hand-computed values."""

from __future__ import annotations

import json

import pytest

from sstmerge_core.evaluation.derived import Candidate, Scores, derived_metrics, pareto_flags, recommend
from sstmerge_core.evaluation.metrics import (
    UTILITY_METRICS,
    contains,
    exact_match,
    lcs_length,
    normalize,
    rouge_l,
    summarize_utility,
)
from sstmerge_core.evaluation.plot import render_png
from sstmerge_core.evaluation.stats import Rate, wilson_interval

# --- utility metrics -------------------------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("  The  Answer:\n 42 ?! ") == "the answer: 42"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("  Paris. ", "paris", 1.0),
        ("PARIS!!", "Paris", 1.0),
        ("a  b", "a b", 1.0),
        ("42", "42 km", 0.0),
        ("The answer is Paris", "Paris", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The capital is Paris!", "paris", 1.0),
        ("answer: 4.", "4", 1.0),
        ("42", "4", 0.0),
        ("anything", "", 0.0),
        ("New York City", "york city", 1.0),
        ("Yorkshire", "york", 0.0),
    ],
)
def test_contains(prediction: str, reference: str, expected: float) -> None:
    assert contains(prediction, reference) == expected


def test_lcs_length() -> None:
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5, P = R = 5/6
        ("a b c d", "A, C.", 2 / 3),  # LCS 2: P = 1/2, R = 1, F1 = 2·½·1/(3/2)
        ("x y", "a b", 0.0),
        ("", "a", 0.0),
        ("same words", "same words", 1.0),
    ],
)
def test_rouge_l(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_summarize_utility() -> None:
    binary = summarize_utility(UTILITY_METRICS["exact_match"], [1.0, 0.0, 1.0, 1.0])
    assert binary["value"] == 0.75 and binary["k"] == 3 and binary["n"] == 4
    assert (binary["ci_low"], binary["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    graded = summarize_utility(UTILITY_METRICS["rouge_l"], [0.5, 1.0])
    assert graded == {"value": 0.75, "n": 2, "k": None, "ci_low": None, "ci_high": None}
    assert UTILITY_METRICS["nll"].higher_is_better is False and not UTILITY_METRICS["nll"].needs_generation


# --- Wilson intervals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (8, 10, 0.49016, 0.94332),
        (5, 10, 0.23659, 0.76341),
        (0, 10, 0.0, 0.27753),
        (10, 10, 0.72247, 1.0),
        (1, 1, 0.20654, 1.0),
        (0, 1, 0.0, 0.79346),
    ],
)
def test_wilson_interval(k: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-5)


def test_wilson_edges_are_exact() -> None:
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 7)[1] == pytest.approx((z2 / 7) / (1 + z2 / 7))
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def test_rate_carries_counts_and_interval() -> None:
    rate = Rate.count([True, False, True, True, True, True, True, True, False, True])
    assert rate.to_dict() == pytest.approx(
        {"k": 8, "n": 10, "rate": 0.8, "ci_low": 0.49016, "ci_high": 0.94332}, abs=1e-5
    )


# --- derived metrics -------------------------------------------------------------------------------------


def test_taxes_with_a_safety_gain() -> None:
    derived = derived_metrics(Scores(0.2, 0.1, 0.8), Scores(0.7, 0.3, 0.7))
    assert derived["safety_gain"] == pytest.approx(0.5)
    assert derived["utility_drop"] == pytest.approx(0.1)
    assert derived["over_refusal_increase"] == pytest.approx(0.2)
    assert derived["safety_tax"] == pytest.approx(0.2) and derived["safety_tax_reason"] is None
    assert derived["refusal_tax"] == pytest.approx(0.4) and derived["refusal_tax_reason"] is None
    assert derived["relative_utility_drop"] == pytest.approx(0.125)
    assert derived["relative_safety_tax"] == pytest.approx(0.25)
    assert derived["relative_safety_gain"] == pytest.approx(0.625)


@pytest.mark.parametrize(("after_safety", "reason"), [(0.4, "safety_gain is 0"), (0.3, "negative")])
def test_taxes_are_null_with_a_reason_without_gain(after_safety: float, reason: str) -> None:
    derived = derived_metrics(Scores(0.4, 0.1, 0.8), Scores(after_safety, 0.2, 0.6))
    for name in ("safety_tax", "refusal_tax", "relative_safety_tax"):
        assert derived[name] is None
        assert reason in derived[f"{name}_reason"]
    assert derived["utility_drop"] == pytest.approx(0.2)
    json.dumps(derived, allow_nan=False)  # never Infinity or NaN


def test_relative_forms_undefined_at_zero_utility_and_full_safety() -> None:
    derived = derived_metrics(Scores(1.0, 0.0, 0.0), Scores(1.0, 0.0, 0.0))
    assert derived["relative_utility_drop"] is None and "utility is 0" in derived["relative_utility_drop_reason"]
    assert derived["relative_safety_gain"] is None and "already 1" in derived["relative_safety_gain_reason"]


def test_pareto_flags() -> None:
    points = [
        Scores(0.9, 0.5, 0.6),  # safest
        Scores(0.8, 0.2, 0.6),
        Scores(0.7, 0.3, 0.5),  # dominated by the previous one
        Scores(0.2, 0.0, 0.9),
        Scores(0.2, 0.0, 0.9),  # a tie: neither dominates
        Scores(0.1, 0.1, 0.8),  # dominated by the two above
    ]
    assert pareto_flags(points) == [True, True, False, True, True, False]


def _candidate(alpha: float, safety: float, over_refusal: float, drop: float, method: str = "sst") -> Candidate:
    return Candidate(f"{method}-a{alpha}", method, alpha, safety, over_refusal, drop)


def test_recommendation_rule() -> None:
    candidates = [
        _candidate(0.5, 0.6, 0.1, 0.01),
        _candidate(1.0, 0.8, 0.2, 0.02),  # at the tolerance: qualifies
        _candidate(1.5, 0.9, 0.3, 0.05),  # safest, but loses too much utility
        _candidate(1.0, 0.95, 0.1, 0.0, method="linear"),  # another method
    ]
    best = recommend(candidates, "sst", 0.02)
    assert (best["label"], best["alpha"]) == ("sst-a1.0", 1.0)
    assert "utility_drop ≤ 0.02" in best["rule"] and best["reason"].startswith("sst-a1.0")
    # equal safety → lower over-refusal; equal both → smaller α
    assert recommend([*candidates, _candidate(2.0, 0.8, 0.1, 0.0)], "sst", 0.02)["alpha"] == 2.0
    tied = [*candidates, _candidate(2.0, 0.8, 0.1, 0.0), _candidate(0.75, 0.8, 0.1, 0.0)]
    assert recommend(tied, "sst", 0.02)["alpha"] == 0.75


def test_recommendation_can_bound_over_refusal() -> None:
    candidates = [
        Candidate("sst-a1", "sst", 1.0, 0.6, 0.1, 0.0, over_refusal_increase=0.05),
        Candidate("sst-a2", "sst", 2.0, 0.9, 0.3, 0.0, over_refusal_increase=0.25),  # safest, over-refuses
        Candidate("sst-a3", "sst", 3.0, 0.95, 0.8, 0.0, over_refusal_increase=0.75),
    ]
    assert recommend(candidates, "sst", 0.02)["alpha"] == 3.0  # unbounded by default
    bounded = recommend(candidates, "sst", 0.02, over_refusal_tolerance=0.25)
    assert bounded["alpha"] == 2.0 and "over_refusal_increase ≤ 0.25" in bounded["rule"]
    assert recommend(candidates, "sst", 0.02, over_refusal_tolerance=0.1)["alpha"] == 1.0
    none = recommend(candidates, "sst", 0.02, over_refusal_tolerance=0.01)
    assert none["alpha"] is None and "smallest: 0.05 for sst-a1" in none["reason"]


def test_recommendation_is_null_with_a_reason() -> None:
    candidates = [_candidate(0.5, 0.6, 0.1, 0.01), _candidate(1.0, 0.8, 0.2, 0.03)]
    none_within = recommend(candidates, "sst", 0.001)
    assert none_within["label"] is None and none_within["alpha"] is None
    assert "smallest: 0.01 for sst-a0.5" in none_within["reason"]
    assert "was evaluated" in recommend(candidates, "ties", 0.02)["reason"]


# --- plot -------------------------------------------------------------------------------------------------


def _model(label: str, kind: str, safety: int, over_refusal: int, utility: float, pareto: bool) -> dict:
    def rate(k: int) -> dict:
        return Rate.of(k, 10).to_dict()

    return {
        "label": label,
        "kind": kind,
        "method": "sst" if kind == "merged" else None,
        "safety": rate(safety),
        "over_refusal": rate(over_refusal),
        "utility": {"value": utility, "ci_low": None, "ci_high": None},
        "pareto": pareto,
    }


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_plot_renders_a_png(higher_is_better: bool) -> None:
    metrics = {
        "judge": "keyword",
        "utility_metric": "rouge_l" if higher_is_better else "nll",
        "utility_higher_is_better": higher_is_better,
        "models": [
            _model("base", "base", 1, 0, 0.4, False),
            _model("before", "before", 2, 0, 0.7, True),
            _model("sst α=1", "merged", 8, 3, 0.6, True),
        ],
    }
    png = render_png(metrics)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
