"""Comparisons at matched safety: a model (or a family's front) against a reference method's front, with a paired
bootstrap interval.

A front is a method's sweep over α taken in α order up to its safest point (past it a larger α breaks the model),
as piecewise-linear functions safety ↦ over-refusal and safety ↦ utility between neighbouring points; a safety
reached at several α keeps their mean. Nothing is extrapolated: outside the front's safety range there is no
matched value. Every model answered the same prompts, so the interval of "over-refusal minus the reference's at
the same safety" comes from one bootstrap over prompts shared by all models (harmful, benign and utility prompts
each resampled with replacement), which independent intervals per model would overstate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from ..evaluation.bootstrap import Resamples
from ..evaluation.outcomes import Outcomes

Array = np.ndarray


def front_curve(alphas: ArrayLike, safety: ArrayLike, *values: ArrayLike) -> tuple[Array, ...]:
    """(safety, *values) sorted by safety, from the α-ordered points up to the safest one; ties averaged."""
    order = np.argsort(np.asarray(alphas, dtype=float), kind="stable")
    s = np.asarray(safety, dtype=float)[order]
    cols = [np.asarray(v, dtype=float)[order] for v in values]
    peak = int(np.argmax(s))  # first safest α
    s, cols = s[: peak + 1], [c[: peak + 1] for c in cols]
    unique = np.unique(s)
    return (unique, *(np.array([c[s == u].mean() for u in unique]) for c in cols))


def interpolate(curve: tuple[Array, ...], safety: float) -> tuple[float, ...] | None:
    """The front's values at `safety`, or None outside its safety range."""
    s, *values = curve
    if not s[0] <= safety <= s[-1]:
        return None
    return tuple(float(np.interp(safety, s, v)) for v in values)


def _interval(samples: Array) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size < 20:
        return None
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def matched_difference(
    model: Outcomes,
    reference: Sequence[tuple[float, Outcomes]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """`model` against the reference front (α, outcomes) at the model's own safety: point estimates of
    Δ over-refusal and Δ utility (model − reference) and their paired 95% bootstrap intervals."""
    sizes = (len(model.harmful), len(model.benign), len(model.utility))
    draws = Resamples.draw(sizes, n_boot, seed)
    s, o, u = draws.rates(model)
    alphas = [a for a, _ in reference]
    ref = np.array([draws.rates(outcomes) for _, outcomes in reference])  # (models, 3, draws)
    delta_o, delta_u = np.full(n_boot + 1, np.nan), np.full(n_boot + 1, np.nan)
    for i in range(n_boot + 1):
        matched = interpolate(front_curve(alphas, ref[:, 0, i], ref[:, 1, i], ref[:, 2, i]), float(s[i]))
        if matched is not None:
            delta_o[i], delta_u[i] = o[i] - matched[0], u[i] - matched[1]
    curve = front_curve(alphas, ref[:, 0, 0], ref[:, 1, 0], ref[:, 2, 0])
    point = interpolate(curve, float(s[0]))
    result = {
        "safety": float(s[0]),
        "over_refusal": float(o[0]),
        "utility": float(u[0]),
        "reference_safety_range": [float(curve[0][0]), float(curve[0][-1])],
        "bootstrap": {"draws": n_boot, "matched": int(np.isfinite(delta_o[1:]).sum()), "seed": seed},
    }
    if point is None:
        return {**result, "matched": False}
    return {
        **result,
        "matched": True,
        "reference_over_refusal": point[0],
        "reference_utility": point[1],
        "delta_over_refusal": float(delta_o[0]),
        "delta_over_refusal_ci": _interval(delta_o[1:]),
        "delta_utility": float(delta_u[0]),
        "delta_utility_ci": _interval(delta_u[1:]),
    }


def at_safety(
    family: Sequence[tuple[float, Outcomes]],
    reference: Sequence[tuple[float, Outcomes]],
    target: float,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Both fronts interpolated at safety `target`: each one's over-refusal and utility there, and the paired
    bootstrap interval of the differences (family − reference)."""
    sizes = (len(family[0][1].harmful), len(family[0][1].benign), len(family[0][1].utility))
    draws = Resamples.draw(sizes, n_boot, seed)

    def curves(points: Sequence[tuple[float, Outcomes]]) -> tuple[list[float], Array]:
        return [a for a, _ in points], np.array([draws.rates(o) for _, o in points])

    (fa, fr), (ra, rr) = curves(family), curves(reference)
    values = np.full((n_boot + 1, 4), np.nan)
    for i in range(n_boot + 1):
        mine = interpolate(front_curve(fa, fr[:, 0, i], fr[:, 1, i], fr[:, 2, i]), target)
        theirs = interpolate(front_curve(ra, rr[:, 0, i], rr[:, 1, i], rr[:, 2, i]), target)
        if mine is not None and theirs is not None:
            values[i] = [*mine, *theirs]
    if not np.isfinite(values[0]).all():
        return {"target": target, "matched": False}
    o, u, o_ref, u_ref = values[0]
    return {
        "target": target,
        "matched": True,
        "over_refusal": float(o),
        "utility": float(u),
        "reference_over_refusal": float(o_ref),
        "reference_utility": float(u_ref),
        "delta_over_refusal": float(o - o_ref),
        "delta_over_refusal_ci": _interval(values[1:, 0] - values[1:, 2]),
        "delta_utility": float(u - u_ref),
        "delta_utility_ci": _interval(values[1:, 1] - values[1:, 3]),
        "bootstrap": {"draws": n_boot, "matched": int(np.isfinite(values[1:]).all(axis=1).sum()), "seed": seed},
    }
