"""Per-prompt outcomes of one evaluated model, and its rates on any subset of the prompts.

Keeping the outcomes (refused or not on each harmful and benign prompt; the utility score of each
utility example) lets any subset — a search or report split, a bootstrap resample — be scored again
without generating anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .metrics import UtilityMetric, summarize_utility
from .stats import Rate


@dataclass(frozen=True)
class Outcomes:
    """harmful[i] / benign[i]: whether the i-th prompt of that set was refused; utility[i]: the i-th score."""

    harmful: tuple[bool, ...]
    benign: tuple[bool, ...]
    utility: tuple[float, ...]

    @classmethod
    def of(cls, harmful: Sequence[bool], benign: Sequence[bool], utility: Sequence[float]) -> Outcomes:
        return cls(tuple(bool(x) for x in harmful), tuple(bool(x) for x in benign), tuple(float(x) for x in utility))

    def subset(self, harmful: Sequence[int], benign: Sequence[int], utility: Sequence[int]) -> Outcomes:
        """The outcomes of the given rows of each set (in the given order)."""
        return Outcomes(
            tuple(self.harmful[i] for i in harmful),
            tuple(self.benign[i] for i in benign),
            tuple(self.utility[i] for i in utility),
        )

    def summary(self, metric: UtilityMetric) -> dict | None:
        """{"safety": Rate, "over_refusal": Rate, "utility": {...}} as dicts; None if a set is empty."""
        if not (self.harmful and self.benign and self.utility):
            return None
        return {
            "safety": Rate.count(list(self.harmful)).to_dict(),
            "over_refusal": Rate.count(list(self.benign)).to_dict(),
            "utility": summarize_utility(metric, list(self.utility)),
        }

    def to_dict(self) -> dict:
        """{"harmful_refused": [...], "benign_refused": [...], "utility_scores": [...]} in file order."""
        return {
            "harmful_refused": list(self.harmful),
            "benign_refused": list(self.benign),
            "utility_scores": list(self.utility),
        }

    @classmethod
    def from_dict(cls, block: dict) -> Outcomes:
        """The inverse of `to_dict` (e.g. for a metrics.json read back)."""
        return cls.of(block["harmful_refused"], block["benign_refused"], block["utility_scores"])
