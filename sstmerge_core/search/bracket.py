"""Where the tolerance binds: a bracketing search over α per method (torch-free; docs/search.md, "Where the budget
goes").

Safety and over-refusal rise with α almost monotonically, so for a method at its default parameters (constant
schedule, no repair) the recipes within the tolerances are those below some α*, and the safest of them sits at
α*. The warm start evaluates each method at a few α; `next_alpha` then places one more trial of that family per
call: halfway between the largest α that met the tolerances and the smallest that did not (bisection), or, while
every α tried met them, twice the largest (up to `alpha_max`), or, while none did, half the smallest (down to
`alpha_min`). `anchor` is the largest α that met them: the sampler then draws α as anchor × ratio, exploring the
family's other knobs (schedule, SST's selection, the repair) around the α where the tolerance binds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Bisection stops once the bracket is this narrow relative to its upper end (a finer α is not worth a trial).
RELATIVE_WIDTH = 0.1


@dataclass(frozen=True)
class Point:
    """One trial of the family: its α and whether it met the tolerances (a trial stopped for lack of safety counts as
    below α*, one stopped for a broken bound as above)."""

    alpha: float
    within: bool


def next_alpha(points: Sequence[Point], alpha_min: float, alpha_max: float) -> float | None:
    """The α of the family's next bracketing trial, or None when the bracket is narrow enough or at an end of the
    range."""
    tried = {round(p.alpha, 9) for p in points}
    inside = [p.alpha for p in points if p.within]
    outside = [p.alpha for p in points if not p.within]
    if not points:
        return None
    if inside and outside:
        high = min(outside)
        below = [a for a in inside if a < high]
        if not below:  # not monotone here: a trial beyond the bracket met the tolerances; stop bracketing
            return None
        low = max(below)
        if high - low <= RELATIVE_WIDTH * high:
            return None
        candidate = (low + high) / 2
    elif inside:
        candidate = min(2 * max(inside), alpha_max)
    else:
        candidate = max(min(outside) / 2, alpha_min)
    return None if round(candidate, 9) in tried else candidate


def anchor(points: Sequence[Point]) -> float | None:
    """The largest α of the family that met the tolerances below the smallest that did not (None: none did)."""
    outside = [p.alpha for p in points if not p.within]
    inside = [p.alpha for p in points if p.within and (not outside or p.alpha < min(outside))]
    return max(inside, default=None)
