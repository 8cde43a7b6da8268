"""Model outputs for evaluation: batched greedy completions, and the NLL of reference responses.

Prompts go through the tokenizer's chat template (`prompting.chat_prompt`), exactly as in the merge's
data passes. Batches are formed from prompts of similar length (fewer pad tokens), longest first, and
sized by `batching` ("auto": the most that fit the memory budget); results come back in input order.
Generation pads on the left so that every prompt ends where the new tokens start, and a row that has ended leaves
the running batch (`greedy_rows`). With `decided`, a row also ends as soon as its text so far settles the judge's
verdict (a refusal that no continuation can undo), and its completion is that text: outcomes are unchanged and
refused rows cost a few tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data import Example
from ..prompting import chat_prompt, encode
from .batching import BatchSize, ModelShape, batch_cap, memory_budget, plan_batches

OnBatch = Callable[[int], None]
"""Called after each batch with the number of examples it held."""
OnTexts = Callable[[list[int], list[str]], None]
"""Called after each batch with the prompt indices it held and their completions (before `OnBatch`)."""
Decided = Callable[[str], bool]
"""decided(text so far) -> True when the row's verdict can no longer change (`judges.settled_refusal_rule`)."""


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


COMPACT_FRACTION = 4
"""Ended rows leave the running batch once they are at least a quarter of it (`greedy_rows`)."""


def _accepts(model, argument: str) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes `argument` by name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


@torch.no_grad()
def greedy_rows(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos: Sequence[int],
    ended: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy new tokens of a left-padded batch: y_t = argmax p(· | x, y_<t), each row up to and including its first
    end-of-sequence token, or the step at which `ended(row, tokens so far)` first held.

    The same forward passes as `model.generate(do_sample=False)` (positions = cumsum(mask) − 1, one KV cache, the
    last position's logits), except that a row that has ended leaves the running batch, its KV-cache rows included:
    the remaining rows' passes are those of a smaller batch, so a batch costs what its longest rows need."""
    rows = list(range(input_ids.shape[0]))  # the batch row of each running row
    tokens: list[list[int]] = [[] for _ in rows]
    finished: set[int] = set()
    stops, device = set(eos), input_ids.device
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    step_inputs: dict = {"input_ids": input_ids}
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    for step in range(max_new_tokens):
        outputs = model(
            **step_inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra
        )
        cache_name = "cache" if outputs.get("cache") is not None else "past_key_values"
        cache = outputs[cache_name]
        chosen = outputs.logits[:, -1].float().argmax(dim=-1)
        for row, token in zip(rows, chosen.tolist()):
            if row in finished:
                continue
            tokens[row].append(token)
            if token in stops or (ended is not None and ended(row, tokens[row])):
                finished.add(row)
        if len(finished) == len(tokens) or step == max_new_tokens - 1:
            break
        running = [j for j, row in enumerate(rows) if row not in finished]
        if len(rows) - len(running) >= max(1, len(rows) // COMPACT_FRACTION):
            keep = torch.tensor(running, device=device)
            cache.batch_select_indices(keep)
            chosen, attention_mask, position_ids = chosen[keep], attention_mask[keep], position_ids[keep]
            rows = [rows[j] for j in running]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        step_inputs = {"input_ids": chosen[:, None], cache_name: cache}
    return tokens


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
    where `decided` first held (`greedy_rows`)."""
    eos = _eos_token_ids(model, tokenizer)
    ended = None
    if decided is not None:

        def ended(row: int, row_tokens: list[int]) -> bool:
            return decided(tokenizer.decode(row_tokens, skip_special_tokens=True))

    texts = [chat_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens: list[list[int]] = [[] for _ in prompts]
    for batch in generation_batches(model, [len(x) for x in ids], batch_size, max_new_tokens):
        inputs = tokenizer.pad(
            {"input_ids": [ids[i] for i in batch]}, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        rows = greedy_rows(
            model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens, eos=eos, ended=ended
        )
        for i, row in zip(batch, rows):
            tokens[i] = row
        del inputs
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
