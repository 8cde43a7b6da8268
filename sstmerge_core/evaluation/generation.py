"""Model outputs for evaluation: batched greedy completions, and the NLL of reference responses.

Prompts go through the tokenizer's chat template (`prompting.chat_prompt`), exactly as in the merge's
data passes. Prompts enter longest first, and the running batch has as many slots as `batching` plans for the
first (longest) prompts ("auto": the most that fit the memory budget); results come back in input order.
Generation pads on the left so that every prompt ends where the new tokens start, and is batched continuously: a
row that has ended leaves the running batch and a waiting prompt takes its slot (`greedy_stream`). With `decided`,
a row also ends as soon as its text so far settles the judge's verdict (a refusal that no continuation can undo),
and its completion is that text: outcomes are unchanged and refused rows cost a few tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
"""Ended rows leave the running batch, and waiting prompts join it, in groups of at least a quarter of its slots."""


def _accepts(model, argument: str) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes `argument` by name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def _joinable(cache) -> bool:
    """Whether a KV cache's rows can be padded, joined and cropped here: every layer a plain growing one."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


@dataclass
class _Running:
    """The running batch: per cache row its prompt's index, the attention mask over the cached columns, the
    position of its last cached token and the token it is fed next; and the KV cache."""

    prompts: list[int]
    mask: torch.Tensor
    last_position: torch.Tensor
    next_token: torch.Tensor
    cache: Any

    def select(self, keep: list[int]) -> None:
        """Keep these rows only, and crop the columns that are padding in every kept row (a joinable cache)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.prompts = [self.prompts[j] for j in keep]
        self.mask, self.last_position, self.next_token = (
            self.mask[index],
            self.last_position[index],
            self.next_token[index],
        )
        padding = int((self.mask.cumsum(-1) == 0).sum(-1).min())
        if padding and _joinable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, padding:], layer.values[:, :, padding:]
            self.mask = self.mask[:, padding:]

    def join(self, other: _Running) -> None:
        """Append `other`'s rows, each side's cached columns left-padded to the longer one (masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = width - tensor.shape[dim]
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.prompts += other.prompts
        self.last_position = torch.cat([self.last_position, other.last_position])
        self.next_token = torch.cat([self.next_token, other.next_token])


def _last_logits(model, extra: dict, **inputs) -> tuple[torch.Tensor, Any]:
    """One forward pass: the chosen next token of every row (arg-max of the last position's logits) and the cache."""
    outputs = model(**inputs, use_cache=True, **extra)
    cache = outputs["cache"] if outputs.get("cache") is not None else outputs["past_key_values"]
    return outputs.logits[:, -1].float().argmax(dim=-1), cache


@torch.no_grad()
def greedy_stream(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    slots: int,
    max_new_tokens: int,
    eos: Sequence[int],
    ended: Callable[[int, list[int]], bool] | None = None,
    on_done: Callable[[list[int], list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """Greedy new tokens of each prompt, y_t = argmax p(· | x, y_<t), up to and including its first end-of-sequence
    token, or the step at which `ended(prompt index, tokens so far)` first held; prompts enter in the given order.

    The forward passes are those of `model.generate(do_sample=False)` on a left-padded batch (positions =
    cumsum(mask) − 1, one KV cache, the last position's logits), with continuous batching: rows that have ended
    leave the running batch (their KV-cache rows too) and waiting prompts take their slots (prefilled on their own,
    then joined to the cache, left-padded), each in groups of at least 1/`COMPACT_FRACTION` of the slots since every
    change copies the cache. A prompt's tokens do not depend on which others share its batch (up to float rounding),
    and a refused prompt whose verdict settles early frees its slot after a few tokens. `on_done` receives the
    indices of the prompts that have just left and their tokens. A cache that cannot be joined (e.g. a sliding-window
    one) is filled only when it is empty."""
    waiting = list(range(len(prompt_ids)))[::-1]  # popped from the end: the given order
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    finished: set[int] = set()
    stops = set(eos)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    device = model.device
    cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"
    running: _Running | None = None

    def record(prompts: list[int], chosen: torch.Tensor) -> None:
        for i, token in zip(prompts, chosen.tolist()):
            if i not in finished:
                tokens[i].append(token)
                if token in stops or len(tokens[i]) == max_new_tokens or (ended is not None and ended(i, tokens[i])):
                    finished.add(i)

    def enter(count: int) -> _Running:
        prompts = [waiting.pop() for _ in range(count)]
        batch = tokenizer.pad(
            {"input_ids": [list(prompt_ids[i]) for i in prompts]},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        chosen, cache = _last_logits(model, extra, input_ids=ids, attention_mask=mask, position_ids=positions)
        record(prompts, chosen)
        return _Running(prompts, mask, positions[:, -1:], chosen[:, None], cache)

    group = max(1, slots // COMPACT_FRACTION)
    while waiting or running is not None:
        if running is None:
            running = enter(min(slots, len(waiting)))
        elif waiting and slots - len(running.prompts) >= min(group, len(waiting)) and _joinable(running.cache):
            running.join(enter(min(slots - len(running.prompts), len(waiting))))
        else:
            running.mask = torch.cat([running.mask, running.mask.new_ones((len(running.prompts), 1))], dim=-1)
            running.last_position = running.last_position + 1
            chosen, running.cache = _last_logits(
                model,
                extra,
                input_ids=running.next_token,
                attention_mask=running.mask,
                position_ids=running.last_position,
                **{cache_argument: running.cache},
            )
            running.next_token = chosen[:, None]
            record(running.prompts, chosen)
        done = [i for i in running.prompts if i in finished]
        if len(done) == len(running.prompts):
            running = None
        elif len(done) >= group:
            running.select([j for j, i in enumerate(running.prompts) if i not in finished])
        else:
            continue
        if on_done is not None:
            on_done(done, [tokens[i] for i in done])
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
    where `decided` first held (`greedy_stream`, longest prompts first, as many slots as the first planned batch)."""
    ended = None
    if decided is not None:

        def ended(i: int, row_tokens: list[int]) -> bool:
            return decided(tokenizer.decode(row_tokens, skip_special_tokens=True))

    ids = tokenizer([chat_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    batches = generation_batches(model, [len(x) for x in ids], batch_size, max_new_tokens)
    order = [i for batch in batches for i in batch]

    def done(positions: list[int], rows: list[list[int]]) -> None:
        if on_rows is not None:
            on_rows([order[k] for k in positions], rows)
        if on_batch is not None:
            on_batch(len(positions))

    streamed = greedy_stream(
        model,
        tokenizer,
        [ids[i] for i in order],
        slots=len(batches[0]) if batches else 1,
        max_new_tokens=max_new_tokens,
        eos=_eos_token_ids(model, tokenizer),
        ended=(lambda k, row: ended(order[k], row)) if ended is not None else None,
        on_done=done,
    )
    tokens: list[list[int]] = [[] for _ in prompts]
    for k, i in enumerate(order):
        tokens[i] = streamed[k]
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
