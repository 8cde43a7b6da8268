"""What keeps a job's memory bounded, checked for exactness: variants applied by forward hooks instead of weight
copies, and Fisher passes split into micro-batches with logits only at the scored positions."""

from __future__ import annotations

import pytest
import torch

from sstmerge_core.adapters import load_adapter
from sstmerge_core.data import Example
from sstmerge_core.fisher import FisherConfig, ScoredLogits, collect_factors, micro_batches, sample_labels
from sstmerge_core.modeling import load_base_model, lora_forward, merged_deltas
from sstmerge_core.prompting import Encoded
from sstmerge_core.tiny import random_lora

EXAMPLES = [
    Example(f"How do I bake bread number {i}?", "Mix flour and water, then bake." if i % 3 else None) for i in range(7)
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_forward_matches_merged_weights_and_touches_nothing(tiny_models, tmp_path, family: str) -> None:
    model, tokenizer = load_base_model(str(tiny_models[family]), "cpu", "float32")
    adapter = load_adapter(random_lora(tiny_models[family], tmp_path / "lora", seed=3, r=4))
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    ids = torch.tensor([tokenizer("How do I bake bread at home?")["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with merged_deltas(model, adapter.modules):
            merged = model(input_ids=ids).logits
        with lora_forward(model, adapter.modules):
            hooked = model(input_ids=ids).logits
            for name, p in model.named_parameters():  # while applied, the weights are the base weights
                assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
        after = model(input_ids=ids).logits
    assert not torch.allclose(merged, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, plain)  # the hooks are gone


def _close(a, b) -> None:
    for name in a:
        assert a[name].n_A == b[name].n_A and a[name].n_G == b[name].n_G
        torch.testing.assert_close(a[name].A, b[name].A, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(a[name].G, b[name].G, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_fisher_factors_do_not_depend_on_micro_batching(model_and_bases, estimator: str) -> None:
    model, tokenizer, bases = model_and_bases
    examples = [Example(e.prompt, e.response or "Sure.") for e in EXAMPLES] if estimator == "empirical" else EXAMPLES
    config = FisherConfig(estimator=estimator, batch_size=4, max_length=64, label_samples=2, continuation_tokens=5)
    whole = collect_factors(model, tokenizer, examples, bases, config, max_tokens=10**6)
    one_by_one = collect_factors(model, tokenizer, examples, bases, config, max_tokens=1)
    _close(whole, one_by_one)


def test_logits_at_scored_positions_only_change_nothing(model_and_bases, monkeypatch) -> None:
    model, tokenizer, bases = model_and_bases
    config = FisherConfig(estimator="sampled", batch_size=3, max_length=64, continuation_tokens=5)
    calls = []
    original = ScoredLogits._hook

    def recording(self, module, inputs):
        result = original(self, module, inputs)
        calls.append(result is not None and result[0].shape[0] == 1)
        return result

    monkeypatch.setattr(ScoredLogits, "_hook", recording)
    gathered = collect_factors(model, tokenizer, EXAMPLES, bases, config)
    assert calls and all(calls)  # the head only ever saw the scored rows
    monkeypatch.setattr(ScoredLogits, "_hook", lambda self, module, inputs: None)
    _close(gathered, collect_factors(model, tokenizer, EXAMPLES, bases, config))


def test_micro_batches_respect_the_token_budget() -> None:
    items = [Encoded(list(range(n)), 1) for n in (3, 4, 4, 6, 9, 20)]
    groups = micro_batches(items, max_tokens=12)
    assert [len(g) for g in groups] == [3, 1, 1, 1]
    assert [i for g in groups for i in g] == items
    assert all(len(g) == 1 or len(g) * max(len(i.input_ids) for i in g) <= 12 for g in groups)


def test_inverse_cdf_labels_follow_the_distribution() -> None:
    probs = torch.softmax(torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 5.0]]), -1)
    uniforms = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for row in range(2):
        labels = sample_labels(probs[row].expand(len(uniforms), -1), uniforms)
        frequencies = torch.bincount(labels, minlength=4).double() / len(uniforms)
        torch.testing.assert_close(frequencies, probs[row].double(), atol=5e-3, rtol=0)
