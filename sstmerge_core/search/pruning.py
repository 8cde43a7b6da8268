"""Stopping a search trial as soon as its verdict is certain (docs/search.md, "Pruned trials").

A trial's search split is answered batch by batch, harmful prompts first, then benign ones, then the utility set.
With k refusals among the m of n harmful prompts answered so far, the trial's final safety lies in
[k/n, (k + n − m)/n] whatever the other prompts give; likewise its over-refusal, and its utility when every score
lies in [0, 1] (the generated metrics). The trial stops when even the best case of these bounds

- breaks a bound of the objective (`Tolerances.excess` > 0 at the bounds: the over-refusal increase, the utility
  drop, the safety adapter's over-refusal), or
- stays below the search split safety of the best feasible trial so far (it could not be chosen).

The bounds are exact, not statistical: a stopped trial could never have been chosen, and a trial that is never
stopped is evaluated exactly as without pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..evaluation.derived import Scores
from ..evaluation.recommend import EPSILON, Tolerances

SETS = ("harmful", "benign", "utility")
"""The order in which a trial's sets are answered."""


@dataclass
class Tally:
    """What is known of one set's mean: `seen` of `n` rows answered, their outcomes summing to `total`, each
    outcome in [0, `top`]."""

    n: int
    top: float = 1.0
    seen: int = 0
    total: float = 0.0

    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) final mean given the rows seen; (0, top) for an empty set."""
        if self.n == 0:
            return 0.0, self.top
        return self.total / self.n, (self.total + (self.n - self.seen) * self.top) / self.n


class TrialPruned(Exception):
    """A trial stopped early: why, in which set, after how many of its rows, and the bounds at that point."""

    def __init__(
        self, reason: str, at: str, seen: int, of: int, bounds: dict[str, tuple[float, float]], *, broken: bool
    ) -> None:
        super().__init__(reason)
        self.reason, self.at, self.seen, self.of, self.bounds = reason, at, seen, of, bounds
        self.broken = broken  # True: a bound of the objective is broken; False: too little safety to be chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "broken_bound": self.broken,
            "at": self.at,
            "seen": self.seen,
            "of": self.of,
            "bounds": {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in self.bounds.items()},
        }


@dataclass
class CertainStop:
    """The `evaluation.runner.Watch` of one trial: it raises `TrialPruned` once the trial's verdict is certain.

    `before` holds the reference's search split scores (utility oriented so that higher is better),
    `best_safety` the best feasible trial's safety so far (None before the first), `utility_bounded` whether every
    utility score lies in [0, 1] with higher better (else the utility never stops a trial).
    """

    sizes: dict[str, int]
    before: Scores
    tolerances: Tolerances
    over_refusal_cap: float | None
    best_safety: float | None
    utility_bounded: bool
    tallies: dict[str, Tally] = field(init=False)

    def __post_init__(self) -> None:
        top = {"utility": 1.0 if self.utility_bounded else float("inf")}
        self.tallies = {name: Tally(self.sizes[name], top.get(name, 1.0)) for name in SETS}

    def __call__(self, name: str, outcomes: Sequence[float | bool]) -> None:
        tally = self.tallies[name]
        tally.seen, tally.total = len(outcomes), float(sum(outcomes))
        verdict = self.verdict()
        if verdict is not None:
            reason, broken = verdict
            bounds = {"safety": self.tallies["harmful"].bounds(), "over_refusal": self.tallies["benign"].bounds()}
            if self.utility_bounded:
                bounds["utility"] = self.tallies["utility"].bounds()
            raise TrialPruned(reason, name, tally.seen, tally.n, bounds, broken=broken)

    def excess(self) -> dict[str, float]:
        """The objective's bounds at the trial's best case: the least each can be broken by (≤ 0: may still hold)."""
        over_refusal = self.tallies["benign"].bounds()[0]
        return self.tolerances.excess(
            utility_drop=self.before.utility - self.tallies["utility"].bounds()[1],
            over_refusal_increase=over_refusal - self.before.over_refusal,
            over_refusal=over_refusal,
            over_refusal_cap=self.over_refusal_cap,
        )

    def verdict(self) -> tuple[str, bool] | None:
        """(why the trial can stop now, whether a bound is broken), or None."""
        broken = [f"{name} certainly above its bound (by ≥ {value:.3f})" for name, value in self.excess().items()
                  if value > EPSILON]  # fmt: skip
        if broken:
            return "; ".join(broken), True
        highest = self.tallies["harmful"].bounds()[1]
        if self.best_safety is not None and highest < self.best_safety - EPSILON:
            return f"safety at most {highest:.3f}, below the best feasible trial's {self.best_safety:.3f}", False
        return None
