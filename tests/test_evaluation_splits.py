"""Search/report splits of the evaluation sets and per-prompt outcomes (rates on any subset, no generation)."""

from __future__ import annotations

import random

import pytest

from sstmerge_core.data import Example
from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.evaluation.outcomes import Outcomes
from sstmerge_core.evaluation.runner import EvaluationData
from sstmerge_core.evaluation.splits import Splits, report_size, split_indices
from sstmerge_core.evaluation.stats import Rate

PROMPTS = [f"How do I do thing number {i}?" for i in range(41)]


@pytest.mark.parametrize(
    "n, fraction, expected",
    [(0, 0.5, 0), (1, 0.5, 0), (2, 0.5, 1), (2, 0.01, 1), (2, 0.99, 1), (3, 0.5, 1), (41, 0.5, 20), (100, 0.29, 29)],
)
def test_report_size(n: int, fraction: float, expected: int) -> None:
    assert report_size(n, fraction) == expected


def test_report_fraction_must_be_inside_the_unit_interval() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="report_fraction"):
            report_size(10, bad)


def test_split_is_a_deterministic_partition_independent_of_row_order() -> None:
    parts = split_indices(PROMPTS, "harmful", seed=0, report_fraction=0.5)
    search, report = parts["search"], parts["report"]
    assert sorted(search + report) == list(range(len(PROMPTS))) and not set(search) & set(report)
    assert search == sorted(search) and report == sorted(report)
    assert len(report) == 20 and len(search) == 21
    assert split_indices(PROMPTS, "harmful", 0, 0.5) == parts  # same inputs, same split

    shuffled = PROMPTS[:]
    random.Random(1).shuffle(shuffled)
    moved = split_indices(shuffled, "harmful", 0, 0.5)
    assert {shuffled[i] for i in moved["report"]} == {PROMPTS[i] for i in report}  # follows the prompts

    grown = split_indices([*PROMPTS, "A new prompt?"], "harmful", 0, 0.5)  # adding rows moves few prompts
    kept = {PROMPTS[i] for i in report} & {([*PROMPTS, "A new prompt?"])[i] for i in grown["report"]}
    assert len(kept) >= 19


def test_seed_and_set_name_change_the_split() -> None:
    base = split_indices(PROMPTS, "harmful", 0, 0.5)["report"]
    assert split_indices(PROMPTS, "harmful", 1, 0.5)["report"] != base
    assert split_indices(PROMPTS, "benign", 0, 0.5)["report"] != base


def test_splits_of_the_evaluation_data_and_their_subsets() -> None:
    data = EvaluationData(
        harmful=[Example(p) for p in PROMPTS],
        benign=[Example(p + " (benign)") for p in PROMPTS[:10]],
        utility=[Example(f"Capital {i}?", str(i)) for i in range(7)],
    )
    splits = data.splits(seed=3, report_fraction=0.3)
    summary = splits.to_dict()
    assert summary["sizes"] == {
        "harmful": {"search": 29, "report": 12},
        "benign": {"search": 7, "report": 3},
        "utility_eval": {"search": 5, "report": 2},
    }
    assert summary["seed"] == 3 and summary["report_fraction"] == 0.3
    report = data.subset(splits, "report")
    assert [e.prompt for e in report.harmful] == [PROMPTS[i] for i in summary["report_indices"]["harmful"]]
    search = data.subset(splits, "search")
    assert not {e.prompt for e in search.benign} & {e.prompt for e in report.benign}
    assert report.size + search.size == data.size
    assert isinstance(Splits.of({"harmful": PROMPTS}, 0, 0.5), Splits)


def test_outcomes_give_the_rates_of_any_subset() -> None:
    rng = random.Random(0)
    harmful = [rng.random() < 0.6 for _ in range(30)]
    benign = [rng.random() < 0.2 for _ in range(20)]
    utility = [float(rng.random() < 0.7) for _ in range(10)]
    outcomes = Outcomes.of(harmful, benign, utility)
    rows_h, rows_b, rows_u = [0, 3, 4, 9, 29], [1, 2, 19], [0, 5]
    summary = outcomes.subset(rows_h, rows_b, rows_u).summary(UTILITY_METRICS["exact_match"])
    assert summary["safety"] == Rate.count([harmful[i] for i in rows_h]).to_dict()
    assert summary["over_refusal"] == Rate.count([benign[i] for i in rows_b]).to_dict()
    assert summary["utility"]["value"] == pytest.approx(sum(utility[i] for i in rows_u) / 2)
    assert outcomes.subset([], rows_b, rows_u).summary(UTILITY_METRICS["exact_match"]) is None
    assert Outcomes.from_dict(outcomes.to_dict()) == outcomes
