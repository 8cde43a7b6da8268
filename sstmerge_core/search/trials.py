"""A search trial as the search keeps it: a recipe evaluated on the search split to the end (`Trial`), or stopped
once it could not be chosen (`PrunedTrial`); `to_dict` is its row of trials.json and its job event."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..evaluation.derived import Scores
from ..evaluation.recommend import EPSILON
from ..evaluation.runner import ModelResult
from .pruning import TrialPruned
from .recipe import Recipe


@dataclass(frozen=True)
class Trial:
    """One evaluated recipe on the search split."""

    number: int
    recipe: Recipe
    result: ModelResult
    scores: Scores  # utility oriented so that higher is better
    utility_drop: float
    over_refusal_increase: float
    excess: Mapping[str, float]  # by how much each bound is broken (≤ 0 where it holds): optuna's constraints
    seconds: float
    repair: Mapping[str, Any] | None
    cost: float = 1.0  # in plain trials (`runner.trial_cost`), what the budget counts

    @property
    def feasible(self) -> bool:
        return all(v <= EPSILON for v in self.excess.values())

    def to_dict(self) -> dict:
        return {
            "number": self.number,
            "state": "complete",
            "label": self.recipe.label(),
            "recipe": self.recipe.model_dump(),
            "safety": self.scores.safety,
            "over_refusal": self.scores.over_refusal,
            "utility": self.result.utility["value"],
            "utility_drop": self.utility_drop,
            "over_refusal_increase": self.over_refusal_increase,
            "feasible": self.feasible,
            "seconds": round(self.seconds, 2),
            "cost": round(self.cost, 3),
            "repair": dict(self.repair) if self.repair is not None else None,
        }


@dataclass(frozen=True)
class PrunedTrial:
    """A recipe whose evaluation on the search split stopped once it could not be chosen (`pruning`)."""

    number: int
    recipe: Recipe
    stop: TrialPruned
    seconds: float
    repair: Mapping[str, Any] | None
    cost: float = 1.0
    feasible = False

    def to_dict(self) -> dict:
        return {
            "number": self.number,
            "state": "pruned",
            "label": self.recipe.label(),
            "recipe": self.recipe.model_dump(),
            "pruned": self.stop.to_dict(),
            "feasible": None,
            "seconds": round(self.seconds, 2),
            "cost": round(self.cost, 3),
            "repair": dict(self.repair) if self.repair is not None else None,
        }
