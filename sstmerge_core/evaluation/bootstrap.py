"""Paired bootstrap over prompts: how sure is a difference between two models scored on the same prompts?

For models a and b with per-prompt outcomes on the same rows, each replicate draws, with replacement,
n_h harmful, n_b benign and n_u utility rows — the three sets in the same replicate, the same rows for both
models — and records Δ = statistic(a) − statistic(b) on the drawn rows, for
    safety (refusal rate on harmful), over_refusal (refusal rate on benign), utility (mean score).
Pairing removes the between-prompt variance that two independent intervals would double-count; drawing
all sets in one replicate keeps the joint distribution of (Δsafety, Δover_refusal, Δutility), so a joint
statement ("safer and not more over-refusing") can be read off `replicates`. The interval is the
percentile interval [q_(1−level)/2, q_(1+level)/2] of the replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .outcomes import Outcomes

QUANTITIES = ("safety", "over_refusal", "utility")


@dataclass(frozen=True)
class Difference:
    """statistic(a) − statistic(b) on all prompts, and its percentile bootstrap interval."""

    estimate: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high}


@dataclass(frozen=True)
class PairedBootstrap:
    """Differences a − b per quantity, with the replicates they were read from (one value per resample)."""

    safety: Difference
    over_refusal: Difference
    utility: Difference
    replicates: dict[str, np.ndarray]
    resamples: int
    level: float

    def to_dict(self) -> dict:
        return {
            **{q: getattr(self, q).to_dict() for q in QUANTITIES},
            "resamples": self.resamples,
            "level": self.level,
        }


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator, block: int = 512) -> np.ndarray:
    """Mean of `values` over `resamples` draws of len(values) rows with replacement (drawn in blocks)."""
    n = len(values)
    means = np.empty(resamples)
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        means[start : start + count] = values[rng.integers(0, n, size=(count, n))].mean(axis=1)
    return means


def paired_bootstrap(
    a: Outcomes, b: Outcomes, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> PairedBootstrap:
    """Differences a − b with percentile intervals (module docstring); the two models must share the rows.

    `a` and `b` are `Outcomes`, or anything with `harmful`, `benign` and `utility` sequences of that shape.
    """
    if (len(a.harmful), len(a.benign), len(a.utility)) != (len(b.harmful), len(b.benign), len(b.utility)):
        raise ValueError("paired bootstrap needs both models' outcomes on the same prompts")
    if min(len(a.harmful), len(a.benign), len(a.utility)) == 0:
        raise ValueError("paired bootstrap needs at least one prompt in every set")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples ≥ 1 and 0 < level < 1, got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    per_prompt = {
        "safety": np.asarray(a.harmful, dtype=float) - np.asarray(b.harmful, dtype=float),
        "over_refusal": np.asarray(a.benign, dtype=float) - np.asarray(b.benign, dtype=float),
        "utility": np.asarray(a.utility, dtype=float) - np.asarray(b.utility, dtype=float),
    }
    replicates = {q: _resampled_means(per_prompt[q], resamples, rng) for q in QUANTITIES}
    tails = [(1 - level) / 2, (1 + level) / 2]
    differences = {}
    for q in QUANTITIES:
        low, high = np.quantile(replicates[q], tails)
        differences[q] = Difference(float(per_prompt[q].mean()), float(low), float(high))
    return PairedBootstrap(**differences, replicates=replicates, resamples=resamples, level=level)
