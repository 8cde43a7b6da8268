"""Cancellation inside a long pass: the continuations that lead a sampled Fisher pass call `between_batches` after
every batch (a job's cancel check), and `JobProgress.check_cancel` asks `should_cancel` at most every
`cancel_check_s` seconds."""

from __future__ import annotations

import pytest
import torch

from sstmerge_core.data import Example
from sstmerge_core.errors import Cancelled
from sstmerge_core.fisher import FisherConfig, collect_factors
from sstmerge_core.gevp import orthonormal_basis
from sstmerge_core.modeling import linear_shape, load_base_model
from sstmerge_core.progress import JobProgress

MODULE = "model.layers.0.self_attn.q_proj"


def test_a_sampled_pass_stops_between_continuation_batches(tiny_llama):
    model, tokenizer = load_base_model(str(tiny_llama), device="cpu", dtype="float32")
    d_out, d_in = linear_shape(model.get_submodule(MODULE))
    g = torch.Generator().manual_seed(0)
    bases = {
        MODULE: (
            orthonormal_basis(torch.randn(d_in, 2, generator=g)).float(),
            orthonormal_basis(torch.randn(d_out, 2, generator=g)).float(),
        )
    }
    prompts = [Example(f"How do I bake bread number {n}?") for n in range(6)]  # no responses: continuations
    config = FisherConfig(estimator="sampled", batch_size=2, max_length=32, continuation_tokens=3)
    calls, reported = [], []

    def stop_on_second() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise Cancelled("cancelled during stage fisher_utility")

    with pytest.raises(Cancelled):
        collect_factors(
            model, tokenizer, prompts, bases, config, lambda d, t: reported.append(d), between_batches=stop_on_second
        )
    assert calls == [0, 1] and reported == []  # stopped after the second of three batches, before any scoring
    counted = []
    collect_factors(model, tokenizer, prompts, bases, config, between_batches=lambda: counted.append(1))
    assert len(counted) == 3  # one call per batch of continuations
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_check_cancel_is_rate_limited_and_names_the_stage():
    now = [0.0]
    asked = []

    def should_cancel() -> bool:
        asked.append(now[0])
        return now[0] >= 5.0

    track = JobProgress(None, should_cancel, cancel_check_s=2.0, clock=lambda: now[0])
    track.check_cancel()  # no stage yet: nothing to stop
    assert asked == []
    track.begin("fisher_utility")  # a stage boundary always asks
    for t in (0.5, 1.0, 1.9, 2.0, 3.0, 4.1):
        now[0] = t
        track.check_cancel()
    assert asked == [0.0, 2.0, 4.1]
    now[0] = 6.5
    with pytest.raises(Cancelled, match="during stage fisher_utility"):
        track.check_cancel()
