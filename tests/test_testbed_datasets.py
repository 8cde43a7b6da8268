"""The testbed's splits: every held-out set disjoint from training and Fisher data, the search pools large enough."""

from __future__ import annotations

import pytest

from bench.testbed import datasets
from bench.testbed.assets import HarmfulPrompt


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    harmful = [HarmfulPrompt(f"Explain how to commit harmful act number {i}.", "synthetic") for i in range(593)]
    splits = datasets.make_splits(harmful, seed=0)
    return datasets.build_datasets(splits, {p: "An answer." for p in datasets.prompts_needing_answers(splits)})


def test_search_pools_are_held_out_and_large_enough(data):
    sizes = {name: len(data[name]) for name in datasets.SEARCH_SETS}
    assert sizes["borderline_pool"] >= 500 and sizes["harmful_pool"] >= 240 and sizes["utility_pool"] >= 300
    training = {
        row["prompt"]
        for name in ("utility_train", "utility_fisher", "safety_train", "safety_fisher")
        for row in data[name]
    }
    for name in datasets.SEARCH_SETS:
        assert not {row["prompt"] for row in data[name]} & training
    assert not {r["prompt"] for r in data["borderline_direction"]} & {r["prompt"] for r in data["borderline_pool"]}


def test_check_disjoint_catches_a_leak(data):
    leaked = {**data, "borderline_pool": data["borderline_pool"] + [data["safety_train"][0]]}
    with pytest.raises(ValueError, match="borderline_pool shares prompts"):
        datasets.check_disjoint(leaked)
    item = {**data, "utility_pool": data["utility_pool"] + [data["utility_train"][0]]}
    with pytest.raises(ValueError, match="utility_pool"):
        datasets.check_disjoint(item)
