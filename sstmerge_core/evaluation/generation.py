"""Model outputs for evaluation: batched greedy completions, and the NLL of reference responses.

Prompts go through the tokenizer's chat template (`prompting.chat_prompt`), exactly as in the merge's
data passes. Batches are formed from prompts of similar length (fewer pad tokens), longest first, and
sized by `batching` ("auto": the most that fit the memory budget); results come back in input order.
Generation pads on the left so that every prompt ends where the new tokens start. With `decided`, a row stops as
soon as its text so far settles the judge's verdict (a refusal that no continuation can undo), and its completion is
that text: outcomes are unchanged, refused rows cost a few tokens, and a batch ends when every row has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria

from ..data import Example
from ..prompting import chat_prompt, encode
from .batching import BatchSize, ModelShape, batch_cap, memory_budget, plan_batches

OnBatch = Callable[[int], None]
"""Called after each batch with the number of examples it held."""
OnTexts = Callable[[list[int], list[str]], None]
"""Called after each batch with the prompt indices it held and their completions (before `OnBatch`)."""
Decided = Callable[[str], bool]
"""decided(text so far) -> True when the row's verdict can no longer change (`judges.settled_refusal_rule`)."""


class _DecidedRows(StoppingCriteria):
    """A per-row stopping criterion for `generate`: row r is done once `decided(decode(new tokens of r))`; the
    number of new tokens it had then is kept in `lengths[r]`."""

    def __init__(self, tokenizer, prompt_width: int, decided: Decided) -> None:
        self.tokenizer, self.prompt_width, self.decided = tokenizer, prompt_width, decided
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]
        for row in range(new.shape[0]):
            if row not in self.lengths and self.decided(self.tokenizer.decode(new[row], skip_special_tokens=True)):
                self.lengths[row] = new.shape[1]
        return torch.tensor([row in self.lengths for row in range(new.shape[0])], device=input_ids.device)


def _eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer (the chat turn end)."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def generation_batches(model, lengths: Sequence[int], batch_size: BatchSize, max_new_tokens: int) -> list[list[int]]:
    """Prompt indices in batches, longest first; "auto" sizes each batch to the memory budget (`batching`)."""
    if batch_size != "auto":
        return plan_batches(lengths, batch_size)
    shape = ModelShape.of(model)
    return plan_batches(
        lengths,
        "auto",
        bytes_per_sequence=lambda length: shape.generation_bytes(length, max_new_tokens),
        budget=memory_budget(model),
        cap=batch_cap(model),
    )


@torch.no_grad()
def generate_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: BatchSize = "auto",
    on_batch: OnBatch | None = None,
    decided: Decided | None = None,
    on_rows: Callable[[list[int], list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """Greedy new tokens of each prompt (chat template applied), cut after the first end-of-sequence token, or
    where `decided` first held."""
    from transformers import GenerationConfig, StoppingCriteriaList

    eos = _eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens: list[list[int]] = [[] for _ in prompts]
    for batch in generation_batches(model, [len(x) for x in ids], batch_size, max_new_tokens):
        inputs = tokenizer.pad(
            {"input_ids": [ids[i] for i in batch]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        width = inputs["input_ids"].shape[1]
        stop = _DecidedRows(tokenizer, width, decided) if decided is not None else None
        output = model.generate(
            **inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([stop] if stop else [])
        )
        for r, (i, row) in enumerate(zip(batch, output[:, width:].tolist())):
            end = next((t + 1 for t, token in enumerate(row) if token in eos), len(row))
            tokens[i] = row[: min(end, stop.lengths.get(r, end)) if stop else end]
        del inputs, output
        if on_rows is not None:
            on_rows(batch, [tokens[i] for i in batch])
        if on_batch is not None:
            on_batch(len(batch))
    return tokens


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: BatchSize = "auto",
    on_batch: OnBatch | None = None,
    decided: Decided | None = None,
    on_texts: OnTexts | None = None,
) -> list[str]:
    """Greedy completion of each prompt (chat template applied), decoded without the prompt or special tokens."""

    def decode(rows: list[list[int]]) -> list[str]:
        return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]

    tokens = generate_tokens(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
        decided=decided,
        on_rows=(lambda batch, rows: on_texts(batch, decode(rows))) if on_texts is not None else None,
    )
    return decode(tokens)


@torch.no_grad()
def response_nll(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: BatchSize = "auto",
    max_length: int = 1024,
    on_batch: OnBatch | None = None,
) -> list[float]:
    """Per example, the mean over response tokens (end-of-turn included) of −log p(token | preceding text)."""
    encoded = [encode(tokenizer, e.prompt, e.response or "", max_length) for e in examples]
    scores: list[float] = [0.0] * len(examples)
    lengths = [len(e.input_ids) for e in encoded]
    if batch_size == "auto":
        shape = ModelShape.of(model)
        batches = plan_batches(
            lengths, "auto", bytes_per_sequence=shape.nll_bytes, budget=memory_budget(model), cap=batch_cap(model)
        )
    else:
        batches = plan_batches(lengths, batch_size)
    for batch in batches:
        width = max(len(encoded[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            item = encoded[i]
            input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            scored[row, item.response_start : len(item.input_ids)] = True
        row_lengths = torch.tensor([len(encoded[i].input_ids) for i in batch])
        attention_mask = torch.arange(width)[None, :] < row_lengths[:, None]
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
