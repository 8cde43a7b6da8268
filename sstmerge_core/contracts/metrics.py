"""metrics.json (schema_version 2), the output of an evaluation: one model, parsed once where it is read.

The layout and the meaning of every field are in `sstmerge_core/evaluation/README.md`; the writer is
`sstmerge_core.evaluation.runner`. Field order is the file's key order, so `model_dump(mode="json")` written with
`json.dumps(..., indent=2, ensure_ascii=False)` is the file byte for byte.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import BySet, Contract

SCHEMA_VERSION = 2
VariantKind = Literal["base", "before", "safety", "merged", "baseline"]


class Rate(Contract):
    """k of n refused, with the rate and its 95% Wilson interval."""

    k: int
    n: int
    rate: float
    ci_low: float
    ci_high: float


class Utility(Contract):
    """The mean utility score of n examples; k and the Wilson interval only for a 0/1 metric (else null)."""

    value: float
    n: int
    k: int | None
    ci_low: float | None
    ci_high: float | None


class Derived(Contract):
    """Gains, drops and taxes against the reference; an undefined quantity is null and its `_reason` says why."""

    safety_gain: float
    utility_drop: float
    over_refusal_increase: float
    safety_tax: float | None
    safety_tax_reason: str | None
    refusal_tax: float | None
    refusal_tax_reason: str | None
    relative_utility_drop: float | None
    relative_utility_drop_reason: str | None
    relative_safety_tax: float | None
    relative_safety_tax_reason: str | None
    relative_safety_gain: float | None
    relative_safety_gain_reason: str | None


class SetSummary(Contract):
    """An evaluation set as used: its rows (after `limit`) and `data.examples_sha256` of them."""

    n: int
    sha256: str


class SplitSizes(Contract):
    """Prompts of a set in each split."""

    search: int
    report: int


class SplitsInfo(Contract):
    """How the sets were split into a search and a report part, and which rows are in the report part."""

    seed: int
    report_fraction: float
    rule: str
    sizes: BySet[SplitSizes]
    report_indices: BySet[list[int]]


class AdapterRef(Contract):
    """One adapter of a variant's weighted sum."""

    name: str
    weight: float
    sha256: str


class SplitBlock(Contract):
    """A model's rates on one split, and its derived metrics against the reference on the same split."""

    safety: Rate
    over_refusal: Rate
    utility: Utility
    derived: Derived | None


class ModelSplits(Contract):
    """A model's numbers on each split; null for a split that is empty for some set."""

    search: SplitBlock | None
    report: SplitBlock | None


class Outcomes(Contract):
    """Per prompt, in file order: refused or not (harmful, benign) and the utility score."""

    harmful_refused: list[bool]
    benign_refused: list[bool]
    utility_scores: list[float]


class ModelEntry(Contract):
    """One evaluated model: how it was made, its rates on the whole sets and on each split, its outcomes."""

    label: str
    kind: VariantKind
    method: str | None
    alpha: float | None
    params: dict[str, Any]
    adapters: list[AdapterRef]
    safety: Rate
    over_refusal: Rate
    utility: Utility
    splits: ModelSplits
    outcomes: Outcomes
    derived: Derived | None
    pareto: bool


class Numbers(Contract):
    """A merge's rates and gains on one split (for the recommendation block)."""

    safety: Rate
    over_refusal: Rate
    utility: Utility
    safety_gain: float | None
    utility_drop: float | None
    over_refusal_increase: float | None
    refusal_tax: float | None


class Pick(Contract):
    """A merge the recommendation names (the runner-up, a price-list row): its numbers on both splits."""

    label: str
    method: str | None
    alpha: float | None
    search: Numbers | None
    report: Numbers | None


class AppliedTolerances(Contract):
    """The bounds the recommendation applied (the cap: the safety adapter's own search-split over-refusal)."""

    utility_drop: float
    over_refusal_increase: float | None
    over_refusal_at_most_safety_adapter: float | None


class PricedPick(Contract):
    """The price list's pick for one safety target."""

    target: float
    label: str
    method: str | None
    alpha: float | None
    search: Numbers | None
    report: Numbers | None


class NoPick(Contract):
    """A safety target that no evaluated merge reaches within the utility tolerance."""

    target: float
    label: None
    method: None
    alpha: None


class PriceList(Contract):
    """Per safety target, the least over-refusing merge that reaches it (picked on search, reported on report)."""

    rule: str
    chosen_on: Literal["search"]
    reported_on: Literal["report"]
    targets: list[PricedPick | NoPick]


class ToleranceChange(Contract):
    """The smallest loosening of the tolerances under which a merge of safety >= the target qualifies."""

    label: str
    safety: float
    utility_tolerance: float
    over_refusal_tolerance: float | None
    changed: list[str]


class ToReachSafety(Contract):
    """What it would take to recommend a merge of search-split safety >= `target` (null: nothing can)."""

    target: float
    change: ToleranceChange | None


class Recommended(Contract):
    """The model to ship by the rule of `evaluation/recommend.py`, or nothing (label, method and alpha null)."""

    label: str | None
    method: str | None
    alpha: float | None
    rule: str
    reason: str
    tolerances: AppliedTolerances
    chosen_on: Literal["search"]
    qualified: int
    candidates: int
    search: Numbers | None
    report: Numbers | None
    runner_up: Pick | None
    near_tie: list[str]
    warning: str | None
    price_list: PriceList
    to_reach_safety: ToReachSafety


class RefusalSample(Contract):
    """One harmful or benign prompt, the model's completion and the judge's verdict."""

    prompt: str
    completion: str
    refused: bool


class UtilitySample(Contract):
    """One utility example: the completion (null for a metric that generates nothing), reference and score."""

    prompt: str
    completion: str | None
    reference: str | None
    score: float


class Samples(Contract):
    """The first rows of each set, for inspection."""

    harmful: list[RefusalSample]
    benign: list[RefusalSample]
    utility: list[UtilitySample]


class Metrics(Contract):
    """metrics.json: every evaluated model against the reference, the recommendation and samples."""

    schema_version: Literal[2] = Field(description="2: splits, outcomes and the split-aware recommendation")
    judge: str
    utility_metric: str
    utility_higher_is_better: bool
    max_new_tokens: int
    limit: int | None
    utility_tolerance: float
    over_refusal_tolerance: float | None
    reference: str = Field(description="the label of the model derived metrics compare with (before, else base)")
    datasets: BySet[SetSummary]
    splits: SplitsInfo
    models: list[ModelEntry]
    recommended: Recommended
    samples: dict[str, Samples] = Field(description="by model label")

    def model(self, label: str) -> ModelEntry | None:
        """The entry of the model called `label` (`sst@0.5`, `before`, …), if it was evaluated."""
        return next((m for m in self.models if m.label == label), None)
