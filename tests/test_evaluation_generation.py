"""Continuously batched greedy generation: the tokens are those of `model.generate` run on each prompt alone (no
padding, an independent computation), for every tiny family, also when rows end at different steps and waiting
prompts take their slots."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from sstmerge_core.evaluation.generation import _eos_token_ids, generate_tokens, greedy_stream
from sstmerge_core.modeling import load_base_model
from sstmerge_core.prompting import chat_prompt

PROMPTS = [f"Tell me about topic {n}" + " in more words" * n for n in range(7)]
NEW_TOKENS = 10


def load_noisy(folder):
    """A tiny model with noise added to every weight: a freshly built one answers every prompt alike, and a batch
    whose rows were mixed up would go unseen."""
    model, tokenizer = load_base_model(str(folder), device="cpu", dtype="float32")
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=noise))
    return model, tokenizer


def reference_tokens(model, tokenizer, prompts: list[str], eos: list[int]) -> list[list[int]]:
    """`model.generate` on each prompt alone, cut after its first end-of-sequence token."""
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    rows = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        row = row[0, ids.shape[1] :].tolist()
        rows.append(row[: next((t + 1 for t, token in enumerate(row) if token in eos), len(row))])
    return rows


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_batched_rows_are_the_tokens_of_generate_on_each_prompt_alone(tiny_models, family: str) -> None:
    model, tokenizer = load_noisy(tiny_models[family])
    expected = reference_tokens(model, tokenizer, PROMPTS, _eos_token_ids(model, tokenizer))
    assert len({tuple(row) for row in expected}) == len(PROMPTS)  # every prompt is answered its own way
    assert generate_tokens(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=4) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_rows_leave_and_prompts_join_without_changing_any_prompts_tokens(tiny_models, family: str) -> None:
    model, tokenizer = load_noisy(tiny_models[family])
    prompts = PROMPTS[::-1]  # longest first, as the evaluation sends them: the rows that stay share left padding
    full = reference_tokens(model, tokenizer, prompts, _eos_token_ids(model, tokenizer))
    ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    asked: list[int] = []
    left: list[int] = []

    def ended(i: int, tokens: list[int]) -> bool:  # prompt i ends after i + 1 tokens
        asked.append(i)
        return len(tokens) == i + 1

    def done(indices: list[int], rows: list[list[int]]) -> None:
        left.extend(indices)
        assert rows == [full[i][: i + 1] for i in indices]

    rows = greedy_stream(
        model, tokenizer, ids, slots=4, max_new_tokens=NEW_TOKENS, eos=[], ended=ended,
        on_done=done,
    )  # fmt: skip
    assert rows == [whole[: i + 1] for i, whole in enumerate(full)]
    assert sorted(left) == list(range(len(prompts)))  # every prompt left once
    # an ended row is never asked again: prompt i is asked once per token it generated
    assert [asked.count(i) for i in range(len(prompts))] == [min(i + 1, NEW_TOKENS) for i in range(len(prompts))]
