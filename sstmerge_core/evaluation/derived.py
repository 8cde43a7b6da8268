"""What a variant bought and paid, compared with the reference ("before") model, plus Pareto flags
(the recommendation is in `recommend`).

With S = safety (refusal rate on harmful prompts), O = over-refusal (refusal rate on benign prompts) and
U = utility oriented so that higher is better (for `nll` the sign is flipped):
    safety_gain = S_after − S_before,  utility_drop = U_before − U_after,  over_refusal_increase = O_after − O_before,
    safety_tax = utility_drop / safety_gain,  refusal_tax = over_refusal_increase / safety_gain.
A tax is defined only when safety_gain > 0; otherwise it is null and `<name>_reason` says why (never
Infinity, never a silent 0). Every `<name>` that can be null has a `<name>_reason`, null when defined.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scores:
    """The three headline numbers of one evaluated model; `utility` already oriented (higher is better)."""

    safety: float
    over_refusal: float
    utility: float


def _per_safety_gain(amount: float, safety_gain: float) -> tuple[float | None, str | None]:
    """amount / safety_gain when safety_gain > 0, else (None, reason)."""
    if safety_gain > 0:
        return amount / safety_gain, None
    if safety_gain == 0:
        return None, "safety_gain is 0: no safety was gained, so a cost per unit of safety is undefined"
    return None, f"safety_gain is negative ({safety_gain:.4g}): the variant is less safe than the reference"


def derived_metrics(before: Scores, after: Scores) -> dict:
    """Gains, drops and taxes of `after` relative to `before` (formulas in the module docstring), plus:
    relative_utility_drop = utility_drop / |U_before|, relative_safety_tax = relative_utility_drop / safety_gain,
    relative_safety_gain = safety_gain / (1 − S_before) (the share of the unsafe remainder closed)."""
    safety_gain = after.safety - before.safety
    utility_drop = before.utility - after.utility
    over_refusal_increase = after.over_refusal - before.over_refusal
    safety_tax, safety_tax_reason = _per_safety_gain(utility_drop, safety_gain)
    refusal_tax, refusal_tax_reason = _per_safety_gain(over_refusal_increase, safety_gain)
    if before.utility != 0:
        relative_utility_drop, relative_utility_drop_reason = utility_drop / abs(before.utility), None
        relative_safety_tax, relative_safety_tax_reason = _per_safety_gain(relative_utility_drop, safety_gain)
    else:
        relative_utility_drop, relative_utility_drop_reason = None, "reference utility is 0"
        relative_safety_tax, relative_safety_tax_reason = None, "reference utility is 0"
    if before.safety < 1:
        relative_safety_gain, relative_safety_gain_reason = safety_gain / (1 - before.safety), None
    else:
        relative_safety_gain, relative_safety_gain_reason = None, "reference safety is already 1"
    return {
        "safety_gain": safety_gain,
        "utility_drop": utility_drop,
        "over_refusal_increase": over_refusal_increase,
        "safety_tax": safety_tax,
        "safety_tax_reason": safety_tax_reason,
        "refusal_tax": refusal_tax,
        "refusal_tax_reason": refusal_tax_reason,
        "relative_utility_drop": relative_utility_drop,
        "relative_utility_drop_reason": relative_utility_drop_reason,
        "relative_safety_tax": relative_safety_tax,
        "relative_safety_tax_reason": relative_safety_tax_reason,
        "relative_safety_gain": relative_safety_gain,
        "relative_safety_gain_reason": relative_safety_gain_reason,
    }


def dominates(a: Scores, b: Scores) -> bool:
    """a is at least as good as b on (safety ↑, over_refusal ↓, utility ↑) and strictly better on one."""
    at_least = a.safety >= b.safety and a.over_refusal <= b.over_refusal and a.utility >= b.utility
    strictly = a.safety > b.safety or a.over_refusal < b.over_refusal or a.utility > b.utility
    return at_least and strictly


def pareto_flags(points: list[Scores]) -> list[bool]:
    """True for each point that no other point dominates (ties are all kept)."""
    return [not any(dominates(q, p) for q in points) for p in points]
