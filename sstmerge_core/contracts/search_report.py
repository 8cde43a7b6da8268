"""search_report.json: what a recipe search writes beside its chosen adapter (`search.report.search_report`; the
layout is explained in docs/search.md). The writer validates the document with `SearchReport` before it is stored,
and the API's `GET /merges/{id}/search` is described by it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import BySet, Contract, absent
from .metrics import SplitSizes
from .summary import Rates, SearchEntry, SearchPriceList, TrialCounts


class SearchSplits(Contract):
    """How the evaluation sets were cut into a search and a report split, and what that means for the numbers."""

    seed: int
    report_fraction: float
    rule: str
    sizes: BySet[SplitSizes]
    statement: str


class References(Contract):
    """`before` (no safety adapter) and the safety adapter alone, on one split."""

    before: Rates
    safety: Rates


class FrontPoint(Contract):
    """A point of linear's front on the report split."""

    alpha: float
    report: Rates


class SearchReport(Contract):
    """The whole search_report.json."""

    schema_version: Literal[2] = Field(description="2: with pruned trials, the warning and the price list")
    objective: str
    settings: dict[str, Any] = Field(description="the search's settings (`SearchSettings`)")
    splits: SearchSplits
    references: dict[Literal["search", "report"], References]
    trials: TrialCounts
    chosen: SearchEntry | None
    warning: str | None
    price_list: SearchPriceList
    pareto: list[SearchEntry]
    linear_front: list[FrontPoint]
    outcomes: dict[str, dict[str, Any]] = Field(description="per model label, the row outcomes on the report split")
    reason: str | None = Field(default=None, exclude_if=absent, description="why nothing was chosen")
