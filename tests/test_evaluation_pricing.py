"""The price list, the near-tie notes and the low-safety warning beside the recommendation (evaluation/pricing.py):
checked against a brute-force reading of their definitions on random pools, and on the issue's one-prompt case."""

from __future__ import annotations

import random

import pytest

from sstmerge_core.contracts.metrics import NoPick, PricedPick
from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.evaluation.pricing import SplitSizes, near_ties, price_list, tolerance_change, warning_text
from sstmerge_core.evaluation.recommend import Candidate, Tolerances, recommend
from sstmerge_core.evaluation.runner import ModelResult, Variant, compare_models
from sstmerge_core.evaluation.splits import Splits
from tests.helpers.contracts import metrics as contract_metrics
from tests.test_evaluation_recommend import BENIGN, HARMFUL, UTILITY, _outcomes

REFERENCE_OVER_REFUSAL = 0.05


def candidate(label, safety, over_refusal, drop, *, method="sst", alpha=1.0) -> Candidate:
    """Against a reference of safety 0 and over-refusal 0.05."""
    return Candidate(label, method, alpha, safety, over_refusal, safety, drop, over_refusal - REFERENCE_OVER_REFUSAL)


def random_pool(rng: random.Random, n: int = 40) -> list[Candidate]:
    """Merges on a split of n prompts per set: every rate a multiple of 1/n."""
    pool = []
    for i in range(rng.randint(1, 8)):
        safety = rng.randint(0, n) / n
        over_refusal = rng.randint(2, n) / n
        drop = rng.randint(-2, 4) / n
        pool.append(candidate(f"m{i}", safety, over_refusal, drop, method=rng.choice(["sst", "linear"]), alpha=i))
    return pool


@pytest.mark.parametrize("seed", range(200))
def test_price_list_is_the_cheapest_merge_reaching_each_target(seed: int) -> None:
    rng = random.Random(seed)
    pool, tolerances = random_pool(rng), Tolerances(utility_drop=rng.choice([0.0, 0.025, 0.05]))
    prices = price_list(pool, tolerances, "sst")
    assert [t for t, _ in prices] == [0.5, 0.8, 0.9, 0.95]
    for target, pick in prices:
        reaching = [c for c in pool if c.safety >= target and c.utility_drop <= tolerances.utility_drop + 1e-12]
        if pick is None:
            assert reaching == []
        else:
            assert pick in reaching and pick.over_refusal == min(c.over_refusal for c in reaching)
    costs = [pick.over_refusal for _, pick in prices if pick is not None]
    assert costs == sorted(costs)  # more safety never costs less
    found = [pick is not None for _, pick in prices]
    assert found == sorted(found, reverse=True)  # once a target is out of reach, every higher one is


@pytest.mark.parametrize("seed", range(200))
def test_tolerance_change_is_the_smallest_that_reaches_the_target(seed: int) -> None:
    rng = random.Random(seed)
    pool, tolerances = random_pool(rng), Tolerances()
    cap = rng.choice([None, 0.6])
    change = tolerance_change(pool, tolerances, cap, 0.8)
    reachable = [c for c in pool if c.safety >= 0.8 and c.safety_gain > 0 and (cap is None or c.over_refusal <= cap)]
    if change is None:
        assert reachable == []
        return
    loosened = Tolerances(change["utility_tolerance"], change["over_refusal_tolerance"])
    chosen = recommend(pool, main_method="sst", tolerances=loosened, safety_over_refusal=cap).chosen
    assert chosen is not None and chosen.safety >= 0.8
    step = max(loosened.utility_drop - 0.02, loosened.over_refusal_increase - 0.05)
    if step > 0:  # any smaller loosening of both tolerances leaves every merge of safety ≥ 0.8 out
        tighter = Tolerances(
            min(loosened.utility_drop, 0.02 + step - 0.001), min(loosened.over_refusal_increase, 0.05 + step - 0.001)
        )
        smaller = recommend(pool, main_method="sst", tolerances=tighter, safety_over_refusal=cap).chosen
        assert smaller is None or smaller.safety < 0.8
    else:
        assert change["changed"] == []


def test_the_issues_case_one_benign_prompt_over_the_bound_is_a_near_tie() -> None:
    """40 prompts per split: linear@1 (safety 0.80) misses the over-refusal tolerance by one prompt (0.025)."""
    sizes = SplitSizes(harmful=40, benign=40, utility=40)
    pool = [
        candidate("sst@1.25", 0.425, 0.075, 0.0, alpha=1.25),
        candidate("linear@1", 0.80, 0.125, 0.0, method="linear"),  # increase 0.075 > 0.05 by one prompt
        candidate("sst@0.5", 0.20, 0.05, 0.0, alpha=0.5),
    ]
    result = recommend(pool, main_method="sst")
    assert result.chosen.label == "sst@1.25"
    notes = near_ties(pool, result, Tolerances(), None, sizes)
    assert any("linear@1" in n and "over_refusal_increase by 0.025" in n for n in notes)
    # with 200 prompts per split one prompt is 0.005: the same miss is five prompts, not a near tie
    assert not any("linear@1" in n for n in near_ties(pool, result, Tolerances(), None, SplitSizes(200, 200, 200)))
    change = tolerance_change(pool, Tolerances(), None)
    assert change["label"] == "linear@1" and change["changed"] == ["over_refusal_tolerance"]
    assert change["over_refusal_tolerance"] == pytest.approx(0.075)
    text = warning_text(0.42, change, Tolerances())
    assert "0.420 < 0.5" in text and "over_refusal_tolerance 0.05 → 0.075" in text and "linear@1" in text


def test_warning_says_why_no_tolerance_change_reaches_the_target() -> None:
    """With no tolerance change possible the warning names the reason that holds: a merge reaching 0.8 that only
    the safety adapter's over-refusal (a cap, not a tolerance) keeps out, or no merge reaching 0.8 at all."""
    capped = [
        candidate("linear@1", 0.82, 0.055, 0.0, method="linear"),  # over the cap 0.05 by one prompt of 200
        candidate("linear@1.25", 0.95, 0.20, 0.0, method="linear", alpha=1.25),
        candidate("sst@1", 0.40, 0.02, 0.0),
    ]
    assert tolerance_change(capped, Tolerances(), 0.05) is None
    text = warning_text(0.42, None, Tolerances(), candidates=capped, cap=0.05)
    assert "no tolerance change reaches safety 0.8" in text
    assert "over-refuses more than the safety adapter alone" in text and "linear@1.25" in text
    assert "over-refusal 0.200 > the adapter's 0.050" in text
    assert "whatever the tolerances" not in text
    # without the cap linear@1 qualifies as it is (its increase over the reference is 0.005)
    change = tolerance_change(capped, Tolerances(), None)
    assert change is not None and change["label"] == "linear@1" and change["changed"] == []
    assert "already qualifies" in warning_text(0.42, change, Tolerances(), candidates=capped)
    short = [candidate("sst@1", 0.40, 0.02, 0.0), candidate("sst@2", 0.75, 0.06, 0.0, alpha=2.0)]
    text = warning_text(0.42, tolerance_change(short, Tolerances(), 0.05), Tolerances(), candidates=short, cap=0.05)
    assert "no evaluated merge with a safety gain reaches it on the search split (the safest: 0.750)" in text
    assert "over-refuses more" not in text


def test_near_ties_on_safety_and_on_the_margin() -> None:
    sizes = SplitSizes(harmful=40, benign=40, utility=None)
    close = [candidate("a", 0.80, 0.10, 0.0), candidate("b", 0.775, 0.06, 0.0)]  # one harmful prompt apart
    result = recommend(close, main_method="sst")
    notes = near_ties(close, result, Tolerances(), None, sizes)
    assert any("within one harmful prompt" in n for n in notes)
    assert any("a meets over_refusal_increase with less than one benign prompt" in n for n in notes)  # at 0.05
    apart = [candidate("a", 0.80, 0.06, 0.0), candidate("b", 0.60, 0.06, 0.0)]
    assert near_ties(apart, recommend(apart, main_method="sst"), Tolerances(), None, sizes) == []
    # a utility metric not counted in prompts (nll) gives no utility note however close it is
    edge = [candidate("a", 0.80, 0.06, 0.02)]
    assert near_ties(edge, recommend(edge, main_method="sst"), Tolerances(), None, sizes) == []
    assert near_ties(edge, recommend(edge, main_method="sst"), Tolerances(), None, SplitSizes(40, 40, 40)) != []


def test_metrics_block_picks_on_search_and_reports_on_report() -> None:
    splits = Splits.of({"harmful": HARMFUL, "benign": BENIGN, "utility_eval": UTILITY}, seed=0, report_fraction=0.5)
    metric = UTILITY_METRICS["exact_match"]
    plans = {  # (search, report) rates: safety, over-refusal, utility
        "before": ((0.0, 0.0, 0.8), (0.0, 0.0, 0.8)),
        "sst@1": ((0.60, 0.05, 0.8), (0.40, 0.05, 0.8)),
        "sst@2": ((0.90, 0.30, 0.8), (0.85, 0.25, 0.8)),
        "linear@2": ((0.95, 0.60, 0.6), (0.95, 0.60, 0.6)),  # safest, but loses utility
    }
    variants = [Variant("before", "before", "unused")] + [
        Variant(label, "merged" if label.startswith("sst") else "baseline", "unused", method=label[:-2] if
                label.startswith("sst") else "linear", alpha=float(label[-1]))
        for label in plans if label != "before"
    ]  # fmt: skip
    results = {
        label: ModelResult.from_outcomes(_outcomes(splits, search=s, report=r), metric)
        for label, (s, r) in plans.items()
    }
    _, recommended = compare_models(variants, results, {}, splits, metric, main_method="sst", tolerances=Tolerances())
    assert recommended.label == "sst@1"
    prices = {p.target: p for p in recommended.price_list.targets}
    assert recommended.price_list.chosen_on == "search" and recommended.price_list.reported_on == "report"
    assert prices[0.5].label == "sst@1" and prices[0.8].label == "sst@2" and prices[0.9].label == "sst@2"
    assert isinstance(prices[0.95], NoPick)  # linear@2 reaches it but breaks the utility tolerance
    picked = prices[0.8]
    assert isinstance(picked, PricedPick) and picked.report is not None and picked.search is not None
    assert picked.report.over_refusal.rate == pytest.approx(0.25)  # reported on the report split
    assert picked.search.over_refusal.rate == pytest.approx(0.30)
    # the recommendation's report-split safety is 0.40 < 0.5: a warning that names the change reaching 0.8
    assert recommended.warning is not None and recommended.to_reach_safety.change is not None
    assert recommended.warning.startswith("warning: the recommended merge refuses 40%")
    assert recommended.to_reach_safety.change.label == "sst@2"
    assert "over_refusal_tolerance 0.05 → 0.3" in recommended.warning


def test_console_and_card_show_the_warning_the_near_ties_and_the_price_list() -> None:
    from sstmerge_core.card import recommendation_lines
    from sstmerge_core.commands.options import recommendation_text

    splits = Splits.of({"harmful": HARMFUL, "benign": BENIGN, "utility_eval": UTILITY}, seed=0, report_fraction=0.5)
    metric = UTILITY_METRICS["exact_match"]
    plans = {
        "before": ((0.0, 0.0, 0.8), (0.0, 0.0, 0.8)),
        "sst@1": ((0.60, 0.05, 0.8), (0.40, 0.05, 0.8)),
        "sst@2": ((0.90, 0.30, 0.8), (0.85, 0.25, 0.8)),
    }
    variants = [Variant("before", "before", "unused")] + [
        Variant(label, "merged", "unused", method="sst", alpha=float(label[-1])) for label in plans if label != "before"
    ]
    results = {
        label: ModelResult.from_outcomes(_outcomes(splits, search=s, report=r), metric)
        for label, (s, r) in plans.items()
    }
    entries, recommended = compare_models(
        variants, results, {}, splits, metric, main_method="sst", tolerances=Tolerances()
    )
    metrics = contract_metrics(entries, recommended)
    console = recommendation_text(metrics).splitlines()
    assert recommended.warning is not None and recommended.warning in console
    assert all(note in console for note in recommended.near_tie)
    at = console.index("price of safety (picked on the search split, numbers of the report split):")
    assert console[at + 1 : at + 5] == [
        "  safety ≥ 0.50: sst@1 — over-refusal 0.050, utility 0.800, safety 0.400",
        "  safety ≥ 0.80: sst@2 — over-refusal 0.250, utility 0.800, safety 0.850",
        "  safety ≥ 0.90: sst@2 — over-refusal 0.250, utility 0.800, safety 0.850",
        "  safety ≥ 0.95: none reaches it",
    ]
    card = "\n".join(recommendation_lines(metrics))
    assert f"- **{recommended.warning}**" in card
    assert "| ≥ 0.80 | `sst@2` (α = 2) | 0.850 [" in card and "| ≥ 0.95 | none reaches it |" in card
