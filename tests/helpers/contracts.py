"""Valid contract documents built by hand (`sstmerge_core.contracts`), for tests that need a metrics.json or a job
summary without running an evaluation: every required field filled with a plain value."""

from __future__ import annotations

from typing import Any

from sstmerge_core.contracts.metrics import Metrics, ModelEntry, Recommended
from sstmerge_core.contracts.summary import Diagnostics, MergeJobSummary

DIGEST = "0" * 64


def model_entry(label: str, kind: str, safety: dict, over_refusal: dict, utility: dict, **fields: Any) -> ModelEntry:
    """A metrics.json model entry with the given rates (whole sets only: no split blocks, no outcomes)."""
    entry = {
        "label": label,
        "kind": kind,
        "method": None,
        "alpha": None,
        "params": {},
        "adapters": [],
        "safety": safety,
        "over_refusal": over_refusal,
        "utility": utility,
        "splits": {"search": None, "report": None},
        "outcomes": {"harmful_refused": [], "benign_refused": [], "utility_scores": []},
        "derived": None,
        "pareto": False,
    }
    return ModelEntry.model_validate({**entry, **fields})


def recommended(label: str | None = None, *, alpha: float | None = None, **fields: Any) -> Recommended:
    """A recommendation block naming `label` (nothing when None), with no split numbers and an empty price list."""
    block = {
        "label": label,
        "method": label.split("@")[0] if label else None,
        "alpha": alpha,
        "rule": "the test's rule",
        "reason": "the test's reason" if label else "nothing qualifies: the test's reason",
        "tolerances": {
            "utility_drop": 0.02,
            "over_refusal_increase": 0.05,
            "over_refusal_at_most_safety_adapter": None,
        },
        "chosen_on": "search",
        "qualified": 1 if label else 0,
        "candidates": 1,
        "search": None,
        "report": None,
        "runner_up": None,
        "near_tie": [],
        "warning": None,
        "price_list": {"rule": "the test's price rule", "chosen_on": "search", "reported_on": "report", "targets": []},
        "to_reach_safety": {"target": 0.8, "change": None},
    }
    return Recommended.model_validate({**block, **fields})


def metrics(models: list[ModelEntry], recommendation: Recommended, **fields: Any) -> Metrics:
    """A metrics.json of `models` and `recommendation` (20 prompts per set, none kept as samples)."""
    sizes = {"search": 10, "report": 10}
    document = {
        "schema_version": 2,
        "judge": "keyword",
        "utility_metric": "exact_match",
        "utility_higher_is_better": True,
        "max_new_tokens": 8,
        "limit": None,
        "utility_tolerance": 0.02,
        "over_refusal_tolerance": 0.05,
        "reference": "before",
        "datasets": {name: {"n": 20, "sha256": DIGEST} for name in ("harmful", "benign", "utility_eval")},
        "splits": {
            "seed": 0,
            "report_fraction": 0.5,
            "rule": "the test's rule",
            "sizes": {name: sizes for name in ("harmful", "benign", "utility_eval")},
            "report_indices": {name: list(range(10)) for name in ("harmful", "benign", "utility_eval")},
        },
        "models": models,
        "recommended": recommendation,
        "samples": {},
    }
    return Metrics.model_validate({**document, **fields})


def merge_summary(*, alpha: float = 1.0, **diagnostics: float) -> MergeJobSummary:
    """A merge job's summary: sst at one α, evaluated, `alpha` recommended; `diagnostics` as the medians."""
    return MergeJobSummary(
        method="sst",
        alphas=[alpha],
        modules=1,
        adapters={f"{alpha:g}": f"alpha-{alpha:g}"},
        timings_s={"merge": 0.1},
        diagnostics=Diagnostics.model_validate({**diagnostics, "modules": 1}),
        compare_with=[],
        recommended=recommended(f"sst@{alpha:g}", alpha=alpha),
    )
