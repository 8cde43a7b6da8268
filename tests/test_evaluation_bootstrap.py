"""The paired bootstrap over prompts: invariants, and its interval against scipy's paired percentile bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sstmerge_core.evaluation.bootstrap import paired_bootstrap
from sstmerge_core.evaluation.outcomes import Outcomes
from sstmerge_core.evaluation.stats import Rate


def outcomes(seed: int, n_h: int = 60, n_b: int = 50, n_u: int = 40, p=(0.6, 0.2, 0.7)) -> Outcomes:
    rng = np.random.default_rng(seed)
    return Outcomes.of(rng.random(n_h) < p[0], rng.random(n_b) < p[1], (rng.random(n_u) < p[2]).astype(float))


def flipped(o: Outcomes, rows: int, seed: int) -> Outcomes:
    """`o` with the first `rows` harmful and benign outcomes set to True (a slightly more refusing model)."""
    harmful, benign = list(o.harmful), list(o.benign)
    for i in np.random.default_rng(seed).choice(len(harmful), rows, replace=False):
        harmful[i] = True
    for i in np.random.default_rng(seed + 1).choice(len(benign), rows, replace=False):
        benign[i] = True
    return Outcomes.of(harmful, benign, o.utility)


def test_identical_models_differ_by_exactly_zero() -> None:
    a = outcomes(0)
    result = paired_bootstrap(a, a, resamples=500)
    for q in ("safety", "over_refusal", "utility"):
        assert (getattr(result, q).estimate, getattr(result, q).ci_low, getattr(result, q).ci_high) == (0, 0, 0)


def test_estimate_is_the_rate_difference_and_swapping_negates_the_interval() -> None:
    a, b = outcomes(1), outcomes(2)
    ab, ba = paired_bootstrap(a, b, seed=7), paired_bootstrap(b, a, seed=7)
    assert ab.safety.estimate == pytest.approx(Rate.count(list(a.harmful)).rate - Rate.count(list(b.harmful)).rate)
    assert ab.utility.estimate == pytest.approx(np.mean(a.utility) - np.mean(b.utility))
    for q in ("safety", "over_refusal", "utility"):
        x, y = getattr(ab, q), getattr(ba, q)
        assert x.ci_low == pytest.approx(-y.ci_high) and x.ci_high == pytest.approx(-y.ci_low)
        assert x.ci_low <= x.estimate <= x.ci_high
    assert {len(r) for r in ab.replicates.values()} == {2000}


def test_pairing_makes_the_interval_of_a_small_change_narrow() -> None:
    a = outcomes(3)
    b = flipped(a, 3, seed=4)  # b refuses 3 more prompts of each set than a, on the same prompts
    result = paired_bootstrap(b, a, resamples=4000)
    assert result.safety.estimate > 0 and result.safety.ci_low >= 0  # never below: b refuses a superset
    independent = sum(Rate.count(list(o.harmful)).ci_high - Rate.count(list(o.harmful)).ci_low for o in (a, b))
    assert result.safety.ci_high - result.safety.ci_low < independent / 3


def test_interval_matches_scipy_paired_percentile_bootstrap() -> None:
    a, b = outcomes(5), outcomes(6)
    ours = paired_bootstrap(a, b, resamples=20000, seed=0)
    x, y = np.asarray(a.benign, float), np.asarray(b.benign, float)
    reference = stats.bootstrap(
        (x, y),
        lambda u, v, axis=-1: u.mean(axis=axis) - v.mean(axis=axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=20000,
        random_state=np.random.default_rng(1),
    ).confidence_interval
    step = 1 / len(x)  # the statistic moves in steps of 1/n, so quantiles of two samplers differ by ≤ one step
    assert ours.over_refusal.ci_low == pytest.approx(reference.low, abs=step + 1e-9)
    assert ours.over_refusal.ci_high == pytest.approx(reference.high, abs=step + 1e-9)


def test_models_must_share_the_prompts() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(outcomes(0), outcomes(0, n_h=59))
    with pytest.raises(ValueError, match="every set"):
        paired_bootstrap(outcomes(0, n_u=0), outcomes(0, n_u=0))
