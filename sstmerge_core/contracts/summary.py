"""The job summary: what a finished job stores with it (`Job.summary`) and the API serves (`JobOut.summary`).

A merge job's summary comes from `sstmerge_core.pipeline`, a search job's from `workers.runner.search_summary`;
the worker adds the manifest of the stored files (`artifacts`). A search summary is the one with a `search` key,
so the union needs no tag of its own and summaries stored before these models read back unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from .base import BySet, Contract, absent
from .metrics import Rate, Recommended, SplitSizes, Utility


class Diagnostics(Contract):
    """Medians over modules of the SST diagnostics (present only for a method that has them), and the module count."""

    median_norm_ratio: float | None = Field(default=None, exclude_if=absent)
    median_energy_retained_fu: float | None = Field(default=None, exclude_if=absent)
    median_energy_retained_fs: float | None = Field(default=None, exclude_if=absent)
    median_gevp_residual: float | None = Field(default=None, exclude_if=absent)
    median_lambda_median: float | None = Field(default=None, exclude_if=absent)
    median_lambda_top1: float | None = Field(default=None, exclude_if=absent)
    modules: int


class MergeArtifacts(Contract):
    """The files a merge job stored: adapter zips per method and α, the other files by name."""

    adapters: dict[str, list[float]] = Field(description="the α of every stored adapter, by method")
    files: list[str]
    recommended_alpha: float | None


class SearchArtifacts(MergeArtifacts):
    """The files a search job stored: the chosen recipe's adapter (if any) and the search's documents."""

    recommended_method: str | None


class MergeJobSummary(Contract):
    """A merge job: its method and α sweep, adapter folders, timings, diagnostics and (evaluated) recommendation."""

    method: str
    alphas: list[float]
    modules: int | None
    adapters: dict[str, str] = Field(description="the adapter's folder, by α")
    timings_s: dict[str, float] = Field(description="seconds per finished stage")
    diagnostics: Diagnostics
    compare_with: list[str]
    recommended: Recommended | None = Field(
        default=None, exclude_if=absent, description="metrics.json's recommendation; only when evaluated"
    )
    artifacts: MergeArtifacts | None = Field(default=None, exclude_if=absent)


class TrialCounts(Contract):
    """How many trials ran, were feasible or pruned, and how long they took."""

    count: int
    feasible: int
    pruned: int
    seconds_median: float | None
    seconds_total: float
    file: str


class Rates(Contract):
    """Safety, over-refusal and utility of one model on one split, with n and 95 % intervals."""

    safety: Rate
    over_refusal: Rate
    utility: Utility


class TrialNumbers(Rates):
    """A trial's rates on one split, with utility_drop and over_refusal_increase against before."""

    utility_drop: float
    over_refusal_increase: float


class SearchChoice(Contract):
    """The chosen recipe: picked on the search split, confirmed on the report split, against linear."""

    label: str
    recipe: dict[str, Any] = Field(description="the recipe (method and parameters) as search_report.json has it")
    search: TrialNumbers
    report: TrialNumbers
    matched_linear: dict[str, Any] = Field(description="the matched-safety comparison with linear (docs/search.md)")


class SearchEntry(Contract):
    """A trial confirmed on the report split, as search_report.json has it: its recipe, its numbers on both splits,
    the matched-safety comparison with linear's front and what its repair step chose (if it had one)."""

    trial: int
    label: str
    recipe: dict[str, Any] = Field(description="the recipe (method, parameters, schedule, repair step)")
    search: TrialNumbers
    report: TrialNumbers
    matched_linear: dict[str, Any] = Field(description="the matched-safety comparison with linear (docs/search.md)")
    repair: dict[str, Any] | None


class SearchPricedTrial(SearchEntry):
    """The price list's trial for one safety target."""

    target: float


class SearchNoPick(Contract):
    """A safety target that no trial reaches."""

    target: float
    label: None


class SearchPriceList(Contract):
    """Per safety target, the least over-refusing trial that reaches it."""

    rule: str
    chosen_on: Literal["search"]
    reported_on: Literal["report"]
    targets: list[SearchPricedTrial | SearchNoPick]


class SearchResult(Contract):
    """What the search found: its trials, split sizes, the choice (or why there is none) and the price list."""

    trials: TrialCounts
    splits: BySet[SplitSizes]
    chosen: SearchChoice | None
    reason: str | None
    warning: str | None
    price_list: SearchPriceList


class SearchRecommendation(Contract):
    """The chosen recipe's method and α."""

    label: str
    method: str
    alpha: float


class SearchJobSummary(Contract):
    """A search job: the search's outcome and the recommendation it makes."""

    search: SearchResult
    recommended: SearchRecommendation | None
    artifacts: SearchArtifacts | None = Field(default=None, exclude_if=absent)


def _kind(value: Any) -> str:
    """ "search" for a search job's summary (a model, or a dict with a `search` key), else "merge"."""
    if isinstance(value, dict):
        return "search" if "search" in value else "merge"
    return "search" if isinstance(value, SearchJobSummary) else "merge"


JobSummary = Annotated[
    Annotated[MergeJobSummary, Tag("merge")] | Annotated[SearchJobSummary, Tag("search")], Discriminator(_kind)
]
"""A finished job's summary: a merge job's or a search job's."""
