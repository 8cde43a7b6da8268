"""Compliant targets of the calibration step: the `before` model's (base + utility adapters, no safety) own greedy
answers to prompts without a response, generated once per job and kept in an on-disk cache keyed by everything
they depend on; targets the refusal judge calls refusals, and empty ones, are dropped and counted."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..adapters import LoraFactors
from ..cache import cache_key
from ..data import Example
from ..modeling import lora_forward


@dataclass(frozen=True)
class AnswerCache:
    """JSON files of generated answers under `folder`, one per key, written atomically (temp file + rename)."""

    folder: Path

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str, count: int) -> list[str] | None:
        """The answers stored under `key`, or None (absent, unreadable or not `count` strings: a miss)."""
        try:
            answers = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        ok = isinstance(answers, list) and len(answers) == count and all(isinstance(a, str) for a in answers)
        return answers if ok else None

    def save(self, key: str, answers: Sequence[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(list(answers), handle)
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@dataclass(frozen=True)
class BeforeModel:
    """The `before` model as an update of the base model: ΔU = Σ_i w_i ΔU_i per module, and what identifies it in a
    cache key (the base model's fingerprint and dtype, each utility adapter's sha256 and weight)."""

    updates: Mapping[str, LoraFactors]
    identity: Mapping[str, object]


def before_answers(
    model,
    tokenizer,
    before: BeforeModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    cache: AnswerCache | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[str], bool]:
    """(greedy answers of the `before` model to `prompts`, whether they came from the cache)."""
    from ..evaluation.generation import generate

    if not prompts:
        return [], False
    key = cache_key(
        kind="before_answers",
        **before.identity,
        device=str(model.device),
        prompts=list(prompts),
        max_new_tokens=max_new_tokens,
    )
    if cache is not None and (stored := cache.load(key, len(prompts))) is not None:
        return stored, True
    with lora_forward(model, before.updates):
        answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, on_batch=on_batch)
    if cache is not None:
        cache.save(key, answers)
    return answers, False


@dataclass(frozen=True)
class Targets:
    """A set's rows with their compliant targets, and how many rows were dropped for a refusal or an empty target."""

    examples: list[Example]
    generated: int  # targets that are the `before` model's answers (the others are the rows' own responses)
    dropped_refusals: int
    dropped_empty: int

    def summary(self, rows: int) -> dict:
        return {
            "rows": rows,
            "used": len(self.examples),
            "generated": self.generated,
            "dropped_refusals": self.dropped_refusals,
            "dropped_empty": self.dropped_empty,
        }


def compliant_targets(examples: Sequence[Example], answers: Mapping[str, str], judge, *, judge_own: bool) -> Targets:
    """Each row with its own response, else the `before` model's answer to its prompt (`answers`); targets the judge
    calls refusals are dropped (own responses too when `judge_own`), and so are empty ones."""
    rows = [
        (e.prompt, e.response if e.response is not None else answers[e.prompt], e.response is None) for e in examples
    ]
    judged = [i for i, (_, _, made) in enumerate(rows) if made or judge_own]
    refused = dict(zip(judged, judge.judge([rows[i][0] for i in judged], [rows[i][1] for i in judged]), strict=True))
    kept, refusals, empty = [], 0, 0
    for i, (prompt, target, _) in enumerate(rows):
        if not target.strip():
            empty += 1
        elif refused.get(i, False):
            refusals += 1
        else:
            kept.append((Example(prompt, target), rows[i][2]))
    return Targets([e for e, _ in kept], sum(made for _, made in kept), refusals, empty)
