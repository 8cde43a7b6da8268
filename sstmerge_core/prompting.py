"""Turning a prompt (and optional response) into token ids the way the model was tuned: the tokenizer's
chat template when it has one, else the plain prompt text."""

from __future__ import annotations

from dataclasses import dataclass


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before it answers `prompt` (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + response; positions ≥ `response_start` are the response tokens."""

    input_ids: list[int]
    response_start: int


def encode(tokenizer, prompt: str, response: str | None, max_length: int) -> Encoded:
    """ids = chat_prompt(prompt) + response + eos, truncated from the left of the prompt to `max_length`.

    The response (and its end-of-turn token) is kept whole when it fits, since those are the scored tokens.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids: list[int] = []
    if response is not None:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    return Encoded(prompt_ids + response_ids, len(prompt_ids))
