"""Greedy generation with ended rows leaving the batch: the tokens are those of `model.generate` run on each prompt
alone (no padding, an independent computation), for every tiny family, also when rows end at different steps."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from sstmerge_core.evaluation.generation import _eos_token_ids, generate_tokens, greedy_rows
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


def test_rows_that_end_early_leave_the_batch_without_changing_the_others(tiny_llama) -> None:
    model, tokenizer = load_noisy(tiny_llama)
    full = reference_tokens(model, tokenizer, PROMPTS, _eos_token_ids(model, tokenizer))
    inputs = tokenizer.pad(
        {"input_ids": [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]},
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    asked: list[int] = []

    def ended(row: int, tokens: list[int]) -> bool:  # row r ends after r + 1 tokens
        asked.append(row)
        return len(tokens) == row + 1

    rows = greedy_rows(
        model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=NEW_TOKENS, eos=[], ended=ended
    )
    assert rows == [whole[: row + 1] for row, whole in enumerate(full)]
    # an ended row is never asked again: row r is asked once per token it generated
    assert [asked.count(row) for row in range(len(PROMPTS))] == [
        min(row + 1, NEW_TOKENS) for row in range(len(PROMPTS))
    ]
