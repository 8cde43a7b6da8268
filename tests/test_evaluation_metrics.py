"""Utility metrics, Wilson intervals, derived metrics (taxes, Pareto) and the plot, against hand-computed values
(the recommendation rule is in test_evaluation_recommend.py)."""

from __future__ import annotations

import json

import pytest

from sstmerge_core.evaluation.derived import Scores, derived_metrics, pareto_flags
from sstmerge_core.evaluation.metrics import (
    UTILITY_METRICS,
    contains,
    exact_match,
    lcs_length,
    normalize,
    rouge_l,
    squad_tokens,
    summarize_utility,
    token_f1,
)
from sstmerge_core.evaluation.plot import build_figure, render_png
from sstmerge_core.evaluation.stats import Rate, wilson_interval
from tests.helpers.contracts import metrics as contract_metrics
from tests.helpers.contracts import model_entry, recommended

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


# --- plot -------------------------------------------------------------------------------------------------


def _model(label: str, kind: str, safety: int, over_refusal: int, utility: float, method=None, alpha=None):
    def rate(k: int) -> dict:
        return Rate.of(k, 20).to_dict()

    return model_entry(
        label,
        kind,
        rate(safety),
        rate(over_refusal),
        {"value": utility, "n": 20, "k": None, "ci_low": None, "ci_high": None},
        method=method,
        alpha=alpha,
    )


def _sweep_metrics(higher_is_better: bool = True, recommendation=None):
    models = [
        _model("base", "base", 0, 0, 0.0),
        _model("before", "before", 0, 0, 0.72),
        _model("safety", "safety", 19, 9, 0.0),
    ]
    for method, kind, points in (
        ("sst", "merged", [(0.5, 1, 0, 0.72), (1, 5, 1, 0.73), (2, 18, 6, 0.72), (3, 19, 15, 0.72)]),
        ("linear", "baseline", [(0.5, 2, 0, 0.73), (1, 13, 3, 0.73), (1.5, 18, 8, 0.70), (2, 20, 15, 0.5)]),
        ("ties", "baseline", [(0.5, 0, 0, 0.69), (1, 3, 1, 0.69), (2, 17, 5, 0.69)]),
    ):
        for alpha, s, o, u in points:
            models.append(_model(f"{method}@{alpha:g}", kind, s, o, u, method, alpha))
    runner_up = {"label": "linear@0.5", "method": "linear", "alpha": 0.5, "search": None, "report": None}
    return contract_metrics(
        models,
        recommendation or recommended("sst@1", alpha=1.0, runner_up=runner_up),
        utility_metric="exact_match" if higher_is_better else "nll",
        utility_higher_is_better=higher_is_better,
    )


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_plot_renders_a_png(higher_is_better: bool) -> None:
    png = render_png(_sweep_metrics(higher_is_better))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plot_draws_one_line_per_method_and_labels_without_collisions() -> None:
    figure = build_figure(_sweep_metrics())
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes[:2]:
        fronts = [line for line in ax.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata()) > 1]
        assert sorted(len(line.get_xdata()) for line in fronts) == [3, 4, 4]  # ties, linear, sst: one line each
        # the matched-safety segments: sst and ties points inside linear's safety range get one each
        assert len([line for line in ax.get_lines() if line.get_linestyle() == ":"]) >= 4
        texts = [t for t in ax.texts if t.get_text()]
        assert any(t.get_text() == "★ sst@1 (recommended)" for t in texts)
        boxes = [t.get_window_extent(renderer) for t in texts]
        frame = ax.get_window_extent(renderer)
        for i, box in enumerate(boxes):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert not any(box.overlaps(other) for other in boxes[i + 1 :])
        assert len(texts) < len(_sweep_metrics().models)  # crowded points go unlabelled rather than overlap


def test_plot_states_when_nothing_is_recommended() -> None:
    figure = build_figure(_sweep_metrics(recommendation=recommended(None)))
    assert "recommended: none" in figure._suptitle.get_text()
    assert not any("★" in t.get_text() for ax in figure.axes for t in ax.texts)


# --- token_f1 (SQuAD) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # [cat, sat, on, mat] vs [cat, is, sitting, on, mat]: C = {cat, on, mat}, P = 3/4, R = 3/5, F1 = 2/3
        ("The cat sat on the mat.", "A cat is sitting on a mat", 2 / 3),
        ("Paris paris", "Paris!", 2 / 3),  # C = {paris} once: P = 1/2, R = 1
        ("an apple", "The Apple.", 1.0),  # articles, case and punctuation are dropped
        ("42 km", "42", 2 / 3),
        ("x y", "a b", 0.0),  # "a" is an article: [x, y] vs [b], C empty
        ("the", "a", 1.0),  # both empty after normalisation
        ("", "Paris", 0.0),
        ("it's", "its", 1.0),  # the apostrophe is punctuation
    ],
)
def test_token_f1_hand_computed(prediction: str, reference: str, expected: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(expected)


def _f1_by_matching(pred: list[str], ref: list[str]) -> float:
    """Independent count: greedily match each predicted token with an unused equal reference token."""
    unused = list(ref)
    common = 0
    for token in pred:
        if token in unused:
            unused.remove(token)
            common += 1
    if not pred or not ref:
        return float(pred == ref)
    return 2 * common / (len(pred) + len(ref))


def test_token_f1_invariants() -> None:
    import random

    rng = random.Random(0)
    words = ["cat", "dog", "the", "a", "mat", "Sat", "on", "42", "x-ray", "Dog."]
    for _ in range(300):
        pred = " ".join(rng.choices(words, k=rng.randint(0, 6)))
        ref = " ".join(rng.choices(words, k=rng.randint(0, 6)))
        f1 = token_f1(pred, ref)
        assert 0.0 <= f1 <= 1.0
        assert f1 == pytest.approx(token_f1(ref, pred))  # symmetric
        shuffled = pred.split()
        rng.shuffle(shuffled)
        assert f1 == pytest.approx(token_f1(" ".join(shuffled), ref))  # order-free
        assert f1 == pytest.approx(_f1_by_matching(squad_tokens(pred), squad_tokens(ref)))
        assert token_f1(pred, pred) == 1.0
    assert squad_tokens("The  X-ray, an Apple!") == ["xray", "apple"]
    metric = UTILITY_METRICS["token_f1"]
    assert not metric.binary and metric.higher_is_better and metric.needs_generation
