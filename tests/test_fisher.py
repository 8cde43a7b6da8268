"""Restricted K-FAC factors against a naive per-sequence, per-token computation, and the sampled
(true-Fisher) estimator against the exact expectation over labels."""

from __future__ import annotations

import pytest
import torch

from sstmerge_core.data import Example
from sstmerge_core.fisher import FisherConfig, collect_factors, encode_examples

EXAMPLES = [
    Example("How do I bake bread?", "Mix flour and water."),
    Example("What is the capital of France? Answer briefly.", "Paris."),
    Example("Explain photosynthesis.", "Plants turn light into sugar."),
]


def per_sequence_grads(model, ids: list[int], start: int, bases, labels: list[int] | None = None, position=None):
    """Projected inputs and output-gradients of one unpadded sequence; loss on positions start−1 … n−2
    (or only `position`), labels = the next tokens or the given ones."""
    captured = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: captured.__setitem__(n, (inp[0].detach(), out))
        )
        for n in bases
    ]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.detach().requires_grad_()))
    try:
        tensor = torch.tensor([ids])
        logits = model(input_ids=tensor).logits[0]
    finally:
        for h in handles:
            h.remove()
    scored = list(range(start - 1, len(ids) - 1))
    targets = torch.tensor(labels if labels is not None else ids[start:])
    losses = torch.nn.functional.cross_entropy(logits[scored], targets, reduction="none")
    loss = losses.sum() if position is None else losses[position]
    grads = torch.autograd.grad(loss, [captured[n][1] for n in bases], retain_graph=True)
    out = {}
    for (name, (R_in, R_out)), grad in zip(bases.items(), grads):
        out[name] = (captured[name][0][0, scored] @ R_in, grad[0, scored] @ R_out)
    return out, logits[scored].detach(), scored


def test_empirical_factors_match_naive_per_token_computation(model_and_bases):
    model, tokenizer, bases = model_and_bases
    config = FisherConfig(estimator="empirical", batch_size=2, max_length=64)
    factors = collect_factors(model, tokenizer, EXAMPLES, bases, config)
    sums = {n: [0, 0, 0] for n in bases}
    for item in encode_examples(model, tokenizer, EXAMPLES, config):
        proj, _, scored = per_sequence_grads(model, item.input_ids, item.response_start, bases)
        for name, (x, d) in proj.items():
            sums[name][0] = sums[name][0] + x.double().T @ x.double()
            sums[name][1] = sums[name][1] + d.double().T @ d.double()
            sums[name][2] += len(scored)
    for name, (sum_a, sum_g, n) in sums.items():
        assert factors[name].n_A == n == factors[name].n_G
        torch.testing.assert_close(factors[name].A, sum_a / n, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(factors[name].G, sum_g / n, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters()), "no parameter gradient may be formed"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"


def exact_expected_factors(model, tokenizer, examples, bases):
    """E_y[G] with y_t' ~ p(·|prefix) independently: Σ_t' Σ_y p_t'(y) g_{t,t'}(y) g_{t,t'}(y)ᵀ (cross terms vanish)."""
    config = FisherConfig(estimator="sampled", max_length=64)
    totals = {n: torch.zeros(b[1].shape[1], b[1].shape[1], dtype=torch.float64) for n, b in bases.items()}
    count = 0
    for item in encode_examples(model, tokenizer, examples, config):
        _, logits, scored = per_sequence_grads(model, item.input_ids, item.response_start, bases)
        probs = torch.softmax(logits.double(), -1)
        count += len(scored)
        for position in range(len(scored)):
            for y in torch.nonzero(probs[position] > 1e-6).flatten().tolist():
                labels = [0] * len(scored)
                labels[position] = y
                proj, _, _ = per_sequence_grads(model, item.input_ids, item.response_start, bases, labels, position)
                for name, (_, d) in proj.items():
                    totals[name] += probs[position, y] * (d.double().T @ d.double())
    return {n: t / count for n, t in totals.items()}


@pytest.mark.slow
def test_sampled_factors_converge_to_the_exact_expected_fisher(model_and_bases):
    model, tokenizer, bases = model_and_bases
    examples = [Example("Hi", "Ok"), Example("Name a color.", "Red")]
    exact = exact_expected_factors(model, tokenizer, examples, bases)

    def error(draws: int, seed: int) -> float:
        config = FisherConfig(estimator="sampled", max_length=64, label_samples=draws, seed=seed)
        sampled = collect_factors(model, tokenizer, examples, bases, config)
        return max(float(torch.linalg.norm(sampled[n].G - exact[n]) / torch.linalg.norm(exact[n])) for n in bases)

    # the median over three seeds: a single seed's Monte Carlo error at 256 draws ranges 0.03–0.13 here
    errors = [sorted(error(draws, seed) for seed in (1, 2, 3))[1] for draws in (1, 16, 256)]
    assert errors[2] < errors[0] and errors[2] < 0.1, errors


def test_sampled_estimator_writes_continuations_for_prompts_without_response(model_and_bases):
    model, tokenizer, bases = model_and_bases
    config = FisherConfig(estimator="sampled", continuation_tokens=6, max_length=64)
    items = encode_examples(model, tokenizer, [Example("How do I bake bread?")], config)
    assert len(items) == 1 and 1 <= len(items[0].input_ids) - items[0].response_start <= 6
    factors = collect_factors(model, tokenizer, [Example("How do I bake bread?")], bases, config)
    assert all(f.n_A > 0 and torch.trace(f.G) > 0 for f in factors.values())


def test_empirical_estimator_needs_responses(model_and_bases):
    from sstmerge_core.errors import InputError

    model, tokenizer, bases = model_and_bases
    with pytest.raises(InputError, match="response"):
        collect_factors(model, tokenizer, [Example("no answer")], bases, FisherConfig(estimator="empirical"))
