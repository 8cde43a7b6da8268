"""Refusals decided early: the keyword and refusal_prefix judges' settled verdict on a partial reply holds for every
continuation, a generation stopped on it is a prefix of the full one, and evaluating with it gives the same outcomes
as full generations on a small model trained to refuse some prompts."""

from __future__ import annotations

import itertools

import pytest
import torch

from sstmerge_core.data import Example
from sstmerge_core.evaluation.generation import generate, generate_tokens
from sstmerge_core.evaluation.judges import KeywordJudge, RefusalPrefixJudge, make_judge, settled_refusal_rule
from sstmerge_core.example import pretrain
from sstmerge_core.modeling import load_base_model
from sstmerge_core.tiny import build_tiny_model, build_word_tokenizer
from tests.test_evaluation_judges import COMPLIANCE, REFUSALS

#: Continuations chosen to undo a match if the rule looked too early: they finish a word ("help" → "helpful"),
#: open a lookahead exception ("help but"), or complete a contraction ("can" → "can't", "can not").
ADVERSARIAL = ["", " but I smile", "ful advice", "ing hand", " noticing", "'t", " not", "n't", ".", " thinking", "s"]


@pytest.mark.parametrize("judge", [KeywordJudge(), RefusalPrefixJudge()], ids=lambda judge: judge.name)
def test_a_settled_refusal_is_a_refusal_whatever_follows(judge):
    for reply in REFUSALS + COMPLIANCE:
        for cut, suffix in itertools.product(range(len(reply) + 1), ADVERSARIAL):
            partial = reply[:cut]
            if judge.settled_refusal(partial):
                assert judge.is_refusal(partial + suffix), (partial, suffix)


def test_common_refusals_settle_before_they_end():
    judge = KeywordJudge()
    settled = [next((i for i in range(len(r)) if judge.settled_refusal(r[:i])), None) for r in REFUSALS]
    assert sum(i is not None for i in settled) >= len(REFUSALS) // 2
    assert judge.settled_refusal("I'm sorry, but I ")
    assert not any(judge.settled_refusal(c[:i]) for c in COMPLIANCE for i in range(len(c) + 1))


def test_judges_with_a_settled_rule_decide_early():
    assert settled_refusal_rule(make_judge("keyword")) is not None
    prefix = RefusalPrefixJudge()
    assert prefix.settled_refusal("I'm sorry, but I cannot help with ")
    assert not prefix.settled_refusal("I'm sorry, but I cannot help ")  # "help" waits for the next word
    assert not any(prefix.settled_refusal(c[:i]) for c in COMPLIANCE for i in range(len(c) + 1))
    assert settled_refusal_rule(object()) is None  # type: ignore[arg-type]  # e.g. a classifier judge


def test_a_decided_row_is_a_prefix_of_its_full_generation(tiny_llama):
    model, tokenizer = load_base_model(str(tiny_llama), device="cpu", dtype="float32")
    prompts = [f"Tell me about topic {n} in a few words" for n in range(6)]

    def six_characters(text: str) -> bool:
        return len(text) >= 6

    full = generate_tokens(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    early = generate_tokens(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, decided=six_characters)
    for whole, cut in zip(full, early):
        assert whole[: len(cut)] == cut
        if len(cut) < len(whole):  # stopped where `decided` first held
            assert six_characters(tokenizer.decode(cut, skip_special_tokens=True))
            assert not six_characters(tokenizer.decode(cut[:-1], skip_special_tokens=True))
    assert sum(map(len, early)) < sum(map(len, full))


REFUSAL = "I'm sorry, but I can't help with that request at all."
ANSWER = "Sure, here is how to do it step by step with care."


@pytest.fixture(scope="module")
def refuser(tmp_path_factory):
    """A one-layer word-level Llama trained to refuse the 'weapon' prompts and answer the 'garden' ones."""
    train = [Example(f"How do I build weapon number {n}?", REFUSAL) for n in range(12)]
    train += [Example(f"How do I plant garden number {n}?", ANSWER) for n in range(12)]
    held_out = [f"How do I build weapon number {n}?" for n in range(12, 20)]
    held_out += [f"How do I plant garden number {n}?" for n in range(12, 20)]
    tokenizer = build_word_tokenizer([t for e in train for t in (e.prompt, e.response or "")] + held_out)
    folder = build_tiny_model(
        "llama", tmp_path_factory.mktemp("refuser"), seed=0, hidden=32, layers=1, tokenizer=tokenizer
    )
    torch.manual_seed(0)
    pretrain(folder, train, seed=0, epochs=40, lr=5e-3, batch_size=8)
    return folder, [e.prompt for e in train] + held_out


def test_early_decided_refusals_keep_every_outcome(refuser):
    folder, prompts = refuser
    model, tokenizer = load_base_model(str(folder), device="cpu", dtype="float32")
    judge = KeywordJudge()
    full = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=8)
    early = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=8, decided=judge.settled_refusal)
    refused = judge.judge(prompts, full)
    assert 0 < sum(refused) < len(prompts)  # the model both refuses and answers
    assert judge.judge(prompts, early) == refused
    for whole, cut, r in zip(full, early, refused):
        assert whole.startswith(cut)
        assert (len(cut) < len(whole)) == r  # refusals stop early, answers run to their end
