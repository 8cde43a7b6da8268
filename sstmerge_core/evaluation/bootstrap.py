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


@dataclass(frozen=True)
class Resamples:
    """Prompt indices of every bootstrap draw, one row per draw, the three sets drawn together; row 0 is the
    identity (every prompt once), so column 0 of `rates` is the point estimate. Shared by every paired comparison
    (`paired_bootstrap` here, the matched-safety comparisons of `search.matched`)."""

    harmful: np.ndarray
    benign: np.ndarray
    utility: np.ndarray

    @classmethod
    def draw(cls, sizes: tuple[int, int, int], n: int, seed: int) -> Resamples:
        rng = np.random.default_rng(seed)

        def indices(size: int) -> np.ndarray:
            return np.vstack([np.arange(size)[None, :], rng.integers(0, size, size=(n, size))])

        return cls(*(indices(size) for size in sizes))

    def rates(self, o: Outcomes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(safety, over-refusal, utility) of `o` per draw."""
        harmful, benign, utility = (np.asarray(x, dtype=float) for x in (o.harmful, o.benign, o.utility))
        return harmful[self.harmful].mean(1), benign[self.benign].mean(1), utility[self.utility].mean(1)


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
    draws = Resamples.draw((len(a.harmful), len(a.benign), len(a.utility)), resamples, seed)
    per_draw = {q: x - y for q, x, y in zip(QUANTITIES, draws.rates(a), draws.rates(b))}
    replicates = {q: per_draw[q][1:] for q in QUANTITIES}
    tails = [(1 - level) / 2, (1 + level) / 2]
    differences = {}
    for q in QUANTITIES:
        low, high = np.quantile(replicates[q], tails)
        differences[q] = Difference(float(per_draw[q][0]), float(low), float(high))
    return PairedBootstrap(**differences, replicates=replicates, resamples=resamples, level=level)
