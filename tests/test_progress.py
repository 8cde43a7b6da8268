"""Cost-weighted progress: stage costs from a job's sizes, the fraction within and across stages, cancellation
checks, the smoothed time left, and the CLI's log lines when stdout is not a terminal."""

from __future__ import annotations

import pytest

from sstmerge_core.commands.progress import LogLines
from sstmerge_core.errors import Cancelled
from sstmerge_core.progress import (
    CPU,
    EvaluationSize,
    JobProgress,
    JobSizes,
    MergeRun,
    ModelSize,
    PassSize,
    RemainingTime,
    StageCost,
    stage_costs,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sizes(models: int = 15, dense: bool = False, new_tokens: int = 64) -> JobSizes:
    """SmolLM2-135M-like: 30 layers, 210 modules; 128 + 100 Fisher examples; `models` evaluated on 330 prompts."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    return JobSizes(
        model=ModelSize(params=135_000_000, layers=30),
        model_loaded=True,
        files=7,
        shapes=shapes,
        merges=[MergeRun(3), MergeRun(3, dense=dense)],
        fisher={
            "utility": PassSize(examples=128, tokens=60, batch_size=8),
            "safety": PassSize(examples=100, tokens=50, batch_size=8),
        },
        evaluation=EvaluationSize(
            models=models,
            generated=330,
            scored=0,
            prompt_tokens=40,
            scored_tokens=0,
            max_new_tokens=new_tokens,
            batch_size=8,
        ),
    )


def test_costs_follow_the_job_sizes():
    costs = stage_costs(sizes())
    assert list(costs) == [
        "loading",
        "fisher_utility",
        "fisher_safety",
        "merging",
        "writing",
        "evaluating",
        "reporting",
    ]
    # evaluation grows linearly with the models and with the tokens generated per prompt
    assert stage_costs(sizes(models=30))["evaluating"].total == pytest.approx(2 * costs["evaluating"].total)
    assert stage_costs(sizes(new_tokens=128))["evaluating"].total > 1.7 * costs["evaluating"].total
    # a dense baseline (SVD per module and α) costs far more than the low-rank merges
    assert stage_costs(sizes(dense=True))["merging"].total > 20 * costs["merging"].total
    # more utility examples: a proportionally longer pass
    bigger = JobSizes(**{**sizes().__dict__, "fisher": {**sizes().fisher, "utility": PassSize(256, 60, batch_size=8)}})
    assert stage_costs(bigger)["fisher_utility"].total == pytest.approx(2 * costs["fisher_utility"].total, rel=0.01)


def test_calibration_matches_the_testbed_timings():
    """bench/RESULTS.md (SmolLM2-135M, 2 CPU threads): empirical utility pass over 128 rows 34 s, safety pass over
    100 rows 20 s, evaluation 43–106 s per model on 330 prompts with 48 new tokens, dense baselines 26–48 s for
    210 modules × 3 α. The model should land within a factor of 2.5 of each."""
    costs = stage_costs(sizes(models=1, dense=True, new_tokens=48), CPU)
    assert 34 / 2.5 < costs["fisher_utility"].total < 34 * 2.5
    assert 20 / 2.5 < costs["fisher_safety"].total < 20 * 2.5
    assert 43 / 2.5 < costs["evaluating"].total < 106 * 2.5
    assert 26 / 2.5 < costs["merging"].total < 48 * 2.5


def test_one_of_fifteen_models_evaluated_is_not_three_quarters_done():
    """The old fixed weights read 72% after 1 of 15 evaluated models; the cost-weighted fraction reads what is done."""
    costs = stage_costs(sizes(models=15))
    track = JobProgress(clock=Clock())
    track.plan(costs)
    for stage in ("loading", "fisher_utility", "fisher_safety", "merging", "writing", "evaluating"):
        track.begin(stage)
    track.advance(1, 15)
    total = sum(c.total for c in costs.values())
    before = sum(costs[s].total for s in ("loading", "fisher_utility", "fisher_safety", "merging", "writing"))
    assert track.fraction() == pytest.approx((before + costs["evaluating"].total / 15) / total)
    assert track.fraction() < 0.35


def test_fraction_is_monotone_and_reaches_one():
    seen = []
    clock = Clock()
    track = JobProgress(lambda stage, f: seen.append((stage, f)), clock=clock)
    track.begin("loading")
    track.plan({"loading": StageCost(lead=1), "work": StageCost(lead=2, body=6), "end": StageCost(lead=1)})
    track.begin("work")
    assert seen[-1] == ("work", pytest.approx(0.1))
    track.advance(1, 3)  # the lead (e.g. continuations) is done by the first tick, then a third of the body
    assert seen[-1] == ("work", pytest.approx((1 + 2 + 2) / 10))
    track.advance(0, 3)  # never goes back
    assert seen[-1][1] == pytest.approx(0.5)
    track.begin("end")
    track.finish()
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert set(track.timings) == {"loading", "work", "end"}


def test_cancellation_is_checked_at_boundaries_and_every_few_seconds():
    clock, calls = Clock(), []

    def should_cancel() -> bool:
        calls.append(clock.now)
        return clock.now >= 10

    track = JobProgress(should_cancel=should_cancel, cancel_check_s=2.0, clock=clock)
    track.plan({"a": StageCost(body=1), "b": StageCost(body=1)})
    track.begin("a")
    for t in (0.5, 1.0, 1.5):
        clock.now = t
        track.advance(t, 10)
    assert calls == [0.0]  # throttled: no check within 2 s of the last
    clock.now = 2.5
    track.advance(3, 10)
    assert calls == [0.0, 2.5]
    clock.now = 10
    with pytest.raises(Cancelled, match="before stage b"):
        track.begin("b")


def test_remaining_time_is_elapsed_over_fraction_smoothed():
    clock = Clock()
    eta = RemainingTime(tau_s=10, clock=clock)
    assert eta.remaining() is None
    for t in range(1, 11):  # a steady 1% per second: 100 s in all
        clock.now = t
        eta.update(t / 100)
    assert eta.remaining() == pytest.approx(90)
    clock.now = 11
    eta.update(0.5)  # a jump (a stage that was cheaper than planned) is eased in, not taken at once
    assert 22 - 11 < eta.remaining() < 89
    clock.now = 16  # between updates the estimate counts down
    assert eta.remaining() == pytest.approx(eta._total - 16)


def test_log_lines_every_interval_and_at_each_stage(capsys):
    clock = Clock()
    lines = LogLines(interval_s=10, clock=clock)
    for t, stage, fraction in [
        (0, "loading", 0.0),
        (1, "fisher_utility", 0.05),
        (2, "fisher_utility", 0.1),
        (9, "fisher_utility", 0.2),
        (12, "fisher_utility", 0.3),
        (13, "merging", 0.5),
        (14, "merging", 1.0),
        (14, "merging", 1.0),
    ]:
        clock.now = t
        lines(stage, fraction)
    out = capsys.readouterr().out.splitlines()
    assert [line.split("stage=")[1].split()[0] for line in out] == [
        "loading",
        "fisher_utility",
        "fisher_utility",
        "merging",
        "merging",
    ]
    assert "percent=100.0" in out[-1]
    assert "percent=30.0" in out[2] and "eta_s=" in out[2] and "elapsed_s=12" in out[2]
