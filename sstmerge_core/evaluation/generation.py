"""Model outputs for evaluation: batched greedy completions, and the NLL of reference responses.

Prompts go through the tokenizer's chat template (`prompting.chat_prompt`), exactly as in the merge's
data passes. Batches are formed from prompts of similar length (fewer pad tokens) and returned in input
order; generation pads on the left so that every prompt ends where the new tokens start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data import Example
from ..prompting import chat_prompt, encode

OnBatch = Callable[[int], None]
"""Called after each batch with the number of examples it held."""


def _eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer (the chat turn end)."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of `batch_size`, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
) -> list[str]:
    """Greedy completion of each prompt (chat template applied), decoded without the prompt or special tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=_eos_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    completions: list[str] = [""] * len(prompts)
    for batch in _length_sorted_batches([len(x) for x in ids], batch_size):
        inputs = tokenizer.pad(
            {"input_ids": [ids[i] for i in batch]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        output = model.generate(**inputs, generation_config=config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            completions[i] = text.strip()
        if on_batch is not None:
            on_batch(len(batch))
    return completions


@torch.no_grad()
def response_nll(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    on_batch: OnBatch | None = None,
) -> list[float]:
    """Per example, the mean over response tokens (end-of-turn included) of −log p(token | preceding text)."""
    encoded = [encode(tokenizer, e.prompt, e.response or "", max_length) for e in examples]
    scores: list[float] = [0.0] * len(examples)
    for batch in _length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
        width = max(len(encoded[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            item = encoded[i]
            input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            scored[row, item.response_start : len(item.input_ids)] = True
        lengths = torch.tensor([len(encoded[i].input_ids) for i in batch])
        attention_mask = torch.arange(width)[None, :] < lengths[:, None]
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        token_nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(model.device), reduction="none"
        ).cpu()
        mask = scored[:, 1:]
        per_example = (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        for row, i in enumerate(batch):
            scores[i] = float(per_example[row])
        if on_batch is not None:
            on_batch(len(batch))
    return scores
