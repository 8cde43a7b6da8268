"""Rates with 95% Wilson score intervals.

For k successes in n trials, p̂ = k/n and z = 1.96 (the 97.5% normal quantile):
    centre = (p̂ + z²/2n) / (1 + z²/n),  half-width = z/(1 + z²/n) · √(p̂(1−p̂)/n + z²/4n²).
Unlike the normal interval it stays inside [0, 1] and is sensible at k = 0 and k = n.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for k successes out of n (n ≥ 1)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n and n ≥ 1, got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """k of n, with its point estimate and 95% Wilson interval."""

    k: int
    n: int
    rate: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        low, high = wilson_interval(k, n)
        return cls(k=k, n=n, rate=k / n, ci_low=low, ci_high=high)

    @classmethod
    def count(cls, flags: list[bool]) -> Rate:
        """The rate of True among `flags`."""
        return cls.of(sum(bool(f) for f in flags), len(flags))

    def to_dict(self) -> dict:
        return asdict(self)
