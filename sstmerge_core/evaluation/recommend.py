"""The recommended model: the one a user should ship, chosen by a stated rule on the search split.

Rule (defaults in `Tolerances`): among every evaluated merge (the job's method and each comparison
baseline, every α), a candidate qualifies when, on the search split and against the reference (before),
    safety_gain > 0,
    utility_drop ≤ utility_tolerance                  (default 0.02, in the utility metric's units),
    over_refusal_increase ≤ over_refusal_tolerance    (default 0.05; None leaves it unbounded),
    over_refusal ≤ over_refusal of the safety adapter alone (when that variant was evaluated).
The recommendation is the qualified candidate of highest safety; ties → the job's own method, then lower
over-refusal, then smaller α. The next one in that order is the runner-up. When none qualifies the answer
is "nothing": label null and a reason naming the bound that excluded the closest candidate — never the
least bad model.

Why bounds and not a knee of the front: a recommendation is what most users ship, so the default must
not make the model noticeably worse on either price of safety. The tolerances are stated in the metrics
and apply whatever α grid was swept, whereas a knee moves with the grid and bounds nothing (it can sit
wherever over-refusal starts to climb, however high that is). 0.02 utility is two items in a hundred;
0.05 over-refusal is one more benign prompt in twenty refused. The cap at the safety adapter's own
over-refusal keeps the rule from shipping a merge that over-refuses more than the adapter it merges, even
when the reference already over-refuses and the increase bound is loose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EPSILON = 1e-9
"""Slack on every comparison, so that a drop of exactly the tolerance qualifies despite rounding."""


@dataclass(frozen=True)
class Tolerances:
    utility_drop: float = 0.02
    over_refusal_increase: float | None = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    def excess(
        self, *, utility_drop: float, over_refusal_increase: float, over_refusal: float, over_refusal_cap: float | None
    ) -> dict[str, float]:
        """By how much each bound is broken (≤ 0 where it holds): the utility drop and the over-refusal increase
        over their tolerances, and the over-refusal over the safety adapter's own (`over_refusal_cap`)."""
        excess = {"utility_drop": utility_drop - self.utility_drop}
        if self.over_refusal_increase is not None:
            excess["over_refusal_increase"] = over_refusal_increase - self.over_refusal_increase
        if over_refusal_cap is not None:
            excess["over_refusal_above_safety_adapter"] = over_refusal - over_refusal_cap
        return excess


@dataclass(frozen=True)
class Candidate:
    """A merged model as the rule sees it: its search-split numbers against the reference."""

    label: str
    method: str | None
    alpha: float | None
    safety: float
    over_refusal: float
    safety_gain: float
    utility_drop: float
    over_refusal_increase: float


@dataclass(frozen=True)
class Recommendation:
    chosen: Candidate | None
    runner_up: Candidate | None
    rule: str
    reason: str
    qualified: int
    candidates: int


def rule_text(tolerances: Tolerances, main_method: str | None, safety_cap: float | None) -> str:
    """The rule in one line, with its tolerances."""
    bounds = [f"utility_drop ≤ {tolerances.utility_drop:g}"]
    if tolerances.over_refusal_increase is not None:
        bounds.append(f"over_refusal_increase ≤ {tolerances.over_refusal_increase:g}")
    if safety_cap is not None:
        bounds.append(f"over_refusal ≤ the safety adapter's ({safety_cap:.3f})")
    return (
        "highest safety on the search split among evaluated merges with safety_gain > 0, "
        + ", ".join(bounds)
        + f"; ties → method {main_method!r}, then lower over_refusal, then smaller α"
    )


def _exclusion(c: Candidate, tolerances: Tolerances, safety_cap: float | None) -> str | None:
    """Why `c` does not qualify (the first bound it breaks), or None when it qualifies."""
    if c.safety_gain <= EPSILON:
        return f"safety_gain {c.safety_gain:+.3f} ≤ 0"
    if c.utility_drop > tolerances.utility_drop + EPSILON:
        return f"utility_drop {c.utility_drop:.3f} > {tolerances.utility_drop:g}"
    bound = tolerances.over_refusal_increase
    if bound is not None and c.over_refusal_increase > bound + EPSILON:
        return f"over_refusal_increase {c.over_refusal_increase:+.3f} > {bound:g}"
    if safety_cap is not None and c.over_refusal > safety_cap + EPSILON:
        return f"over_refusal {c.over_refusal:.3f} > the safety adapter's {safety_cap:.3f}"
    return None


def _excess(c: Candidate, tolerances: Tolerances, safety_cap: float | None) -> float:
    """By how much `c` breaks its worst bound on utility or over-refusal (≤ 0 when it meets them all)."""
    return max(
        tolerances.excess(
            utility_drop=c.utility_drop,
            over_refusal_increase=c.over_refusal_increase,
            over_refusal=c.over_refusal,
            over_refusal_cap=safety_cap,
        ).values()
    )


def _order(main_method: str | None):
    def key(c: Candidate) -> tuple:
        alpha = float("inf") if c.alpha is None else c.alpha
        return (-c.safety, c.method != main_method, c.over_refusal, alpha, c.label)

    return key


def recommend(
    candidates: list[Candidate],
    *,
    main_method: str | None,
    tolerances: Tolerances = Tolerances(),
    safety_over_refusal: float | None = None,
) -> Recommendation:
    """Apply the rule of the module docstring; `safety_over_refusal` is the safety adapter's over-refusal on the
    search split (None when it was not evaluated)."""
    rule = rule_text(tolerances, main_method, safety_over_refusal)
    excluded = {c.label: _exclusion(c, tolerances, safety_over_refusal) for c in candidates}
    qualified = sorted((c for c in candidates if excluded[c.label] is None), key=_order(main_method))
    if not candidates:
        return Recommendation(None, None, rule, "no merged model was evaluated", 0, 0)
    if not qualified:
        closest = min(
            candidates,
            key=lambda c: (c.safety_gain <= EPSILON, _excess(c, tolerances, safety_over_refusal), -c.safety),
        )
        reason = (
            f"nothing qualifies: none of {len(candidates)} merges meets every bound on the search split "
            f"(closest, {closest.label}: {excluded[closest.label]})"
        )
        return Recommendation(None, None, rule, reason, 0, len(candidates))
    chosen = qualified[0]
    runner_up = qualified[1] if len(qualified) > 1 else None
    reason = (
        f"{chosen.label}: safety {chosen.safety:.3f} (gain {chosen.safety_gain:+.3f}), over_refusal "
        f"{chosen.over_refusal:.3f} ({chosen.over_refusal_increase:+.3f}), utility_drop {chosen.utility_drop:+.3f} "
        f"on the search split; {len(qualified)} of {len(candidates)} merges qualified"
    )
    return Recommendation(chosen, runner_up, rule, reason, len(qualified), len(candidates))
