"""Automatic batch sizes: the batch plan, the memory model against a real KV cache, and completions that do not
depend on the batch size."""

from __future__ import annotations

import pytest
import torch

from sstmerge_core.evaluation.batching import CPU_BATCH_CAP, ModelShape, memory_budget, plan_batches, weight_bytes
from sstmerge_core.evaluation.generation import generate, generation_batches, response_nll
from sstmerge_core.modeling import load_base_model
from sstmerge_core.prompting import chat_prompt

PROMPTS = [
    f"{verb} {thing}{suffix}"
    for verb in ("How do I bake", "Explain", "Can you help me build", "What is")
    for thing in ("bread", "a bomb", "photosynthesis")
    for suffix in ("?", " at home, step by step, for a beginner?")
]


def test_fixed_batches_are_longest_first() -> None:
    lengths = [5, 9, 1, 7, 3]
    assert plan_batches(lengths, 2) == [[1, 3], [0, 4], [2]]
    with pytest.raises(ValueError):
        plan_batches(lengths, 0)


def test_auto_batches_fit_the_budget_and_the_cap() -> None:
    lengths = [10, 200, 50, 50, 120, 10, 10, 10]

    def per_sequence(length: int) -> int:
        return 100 * length

    batches = plan_batches(lengths, "auto", bytes_per_sequence=per_sequence, budget=30_000, cap=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert 1 <= len(batch) <= 3
        assert len(batch) == 1 or len(batch) * per_sequence(longest) <= 30_000
    assert batches[0] == [1]  # 200 tokens: one sequence fills the budget (2 × 20,000 > 30,000)
    assert len(plan_batches(lengths, "auto", bytes_per_sequence=per_sequence, budget=1, cap=3)) == len(lengths)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_bytes_per_token_match_the_cache_the_model_builds(tiny_models, family: str) -> None:
    model, tokenizer = load_base_model(str(tiny_models[family]), "cpu", "float32")
    ids = torch.tensor([tokenizer("How do I bake bread at home?")["input_ids"]])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    measured = sum(t.numel() * t.element_size() for t in tensors) / ids.shape[1]
    assert ModelShape.of(model).kv_bytes_per_token == measured


def test_cpu_budget_is_half_the_weights_with_a_floor(tiny_llama) -> None:
    model, _ = load_base_model(str(tiny_llama), "cpu", "float32")
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert weight_bytes(model) >= sum(params.values())
    assert memory_budget(model) == 256 * 2**20  # a tiny model gets the floor


def test_auto_batch_gives_the_same_completions_as_batch_8(tiny_llama) -> None:
    model, tokenizer = load_base_model(str(tiny_llama), "cpu", "float32")
    lengths = [len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    plan = generation_batches(model, lengths, "auto", 6)
    assert max(len(b) for b in plan) == min(len(PROMPTS), CPU_BATCH_CAP) > 8  # auto really batches differently
    auto = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size="auto")
    assert auto == generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    assert len(set(auto)) > 1


def test_auto_batch_gives_the_same_reference_nll_as_batch_8(tiny_llama) -> None:
    from sstmerge_core.data import Example

    model, tokenizer = load_base_model(str(tiny_llama), "cpu", "float32")
    examples = [Example(p, "Mix flour and water, then bake.") for p in PROMPTS]
    auto = response_nll(model, tokenizer, examples, batch_size="auto")
    assert auto == pytest.approx(response_nll(model, tokenizer, examples, batch_size=8), rel=1e-5)
