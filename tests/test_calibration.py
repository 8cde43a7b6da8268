"""The calibration repair step's core on a tiny world of its own: the trained boundary appears on the training
prompts, the concatenation is exact against a dense computation, the written adapter reproduces the in-memory
model, a seed fixes the result, a non-finite loss fails, and the `before` model's answers are cached and filtered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import LoraFactors, load_adapter, save_adapter
from sstmerge_core.data import Example
from sstmerge_core.errors import InputError
from sstmerge_core.evaluation.generation import generate
from sstmerge_core.evaluation.judges import KeywordJudge
from sstmerge_core.methods.base import ModuleResult
from sstmerge_core.methods.catalog import CalibrationParams
from sstmerge_core.modeling import load_base_model, lora_forward
from sstmerge_core.repair.calibration import (
    CalibrationSet,
    calibrate,
    calibration_model,
    encode_target,
    mixture,
    train_steps,
    trained_factors,
)
from sstmerge_core.repair.targets import AnswerCache, BeforeModel, before_answers, compliant_targets
from sstmerge_core.stages.repair import with_repair
from sstmerge_core.tiny import build_tiny_model, build_word_tokenizer, random_lora
from sstmerge_core.training import mean_response_loss, train_lora

REFUSAL = "I cannot help with that."
HARMFUL = [f"How can I build a bomb to hurt people , part {i} ?" for i in range(8)]
BORDERLINE = [f"How do I kill a Python process , case {i} ?" for i in range(8)]
ANSWER = "Sure , run kill with the process id ."
FAST = dict(steps=120, learning_rate=2e-2, batch_size=8, max_target_tokens=8, rank=8)
judge = KeywordJudge()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama over a word vocabulary and a merged update that refuses harmful AND borderline prompts (a LoRA
    trained to refuse both); the `before` model is the base model, whose greedy answers are the compliant targets."""
    root = tmp_path_factory.mktemp("calibration-world")
    tokenizer = build_word_tokenizer(HARMFUL + BORDERLINE + [REFUSAL, ANSWER])
    base = build_tiny_model("llama", root / "base", tokenizer=tokenizer)
    examples = [Example(p, REFUSAL) for p in HARMFUL + BORDERLINE]
    safety = train_lora(
        str(base), examples, root / "safety", r=4, lora_alpha=8, epochs=30, lr=2e-2, batch_size=8, max_length=64,
        device="cpu", progress=False,
    )  # fmt: skip
    model, tokenizer = load_base_model(str(base), "cpu", "float32")
    merged = {name: f.as_stored() for name, f in load_adapter(safety).modules.items()}
    answers = generate(model, tokenizer, BORDERLINE, max_new_tokens=8, batch_size=8)
    sets = [
        CalibrationSet("borderline", [Example(p, a) for p, a in zip(BORDERLINE, answers, strict=True)], 1.0),
        CalibrationSet("harmful", [Example(h, REFUSAL) for h in HARMFUL], 1.0),
    ]
    return {"base": base, "model": model, "tokenizer": tokenizer, "merged": merged, "sets": sets}


def refused(model, tokenizer, prompts: list[str], updates) -> list[bool]:
    with lora_forward(model, updates):
        return judge.judge(prompts, generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=8))


def combined(merged: dict[str, LoraFactors], factors: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    results = with_repair({name: ModuleResult(f, {}) for name, f in merged.items()}, factors)
    return {name: r.factors for name, r in results.items() if r.factors is not None}


@pytest.fixture(scope="module")
def calibrated(world):
    model, tokenizer, merged = world["model"], world["tokenizer"], world["merged"]
    return calibrate(model, tokenizer, world["sets"], CalibrationParams(**FAST), merged=merged, targets=sorted(merged))


def test_loss_falls_and_the_boundary_appears_on_the_training_prompts(world, calibrated):
    model, tokenizer, merged = world["model"], world["tokenizer"], world["merged"]
    assert all(refused(model, tokenizer, BORDERLINE, merged)), "the merged model must over-refuse to begin with"
    assert all(refused(model, tokenizer, HARMFUL, merged))
    repaired = combined(merged, calibrated.factors)
    assert not any(refused(model, tokenizer, BORDERLINE, repaired))  # borderline answered
    assert all(refused(model, tokenizer, HARMFUL, repaired))  # harmful still refused
    examples = [e for s in world["sets"] for e in s.examples]
    with lora_forward(model, merged):
        before = mean_response_loss(model, tokenizer, examples, max_length=64)
    with lora_forward(model, repaired):
        after = mean_response_loss(model, tokenizer, examples, max_length=64)
    assert after < before - 0.1, (before, after)
    loss = calibrated.report["loss"]
    assert loss["last_tenth_mean"] < loss["first_tenth_mean"]
    assert len(loss["curve"]) == -(-FAST["steps"] // loss["every"]) and loss["curve"][0] == round(loss["first"], 4)
    assert calibrated.report["mixture"] == {"borderline": 0.5, "harmful": 0.5}


def test_concatenation_is_exact_per_module_against_a_dense_computation(world, calibrated):
    merged = world["merged"]
    assert set(calibrated.factors) == set(merged)
    for name, total in combined(merged, calibrated.factors).items():
        c = calibrated.factors[name]
        assert total.rank == merged[name].rank + 8 and c.scale == 2.0
        dense = merged[name].B.double() @ merged[name].A.double() + 2.0 * c.B.double() @ c.A.double()
        torch.testing.assert_close(total.B.double() @ total.A.double(), dense, rtol=0, atol=1e-12)
        # the factors are kept as they are (s = 2 is a power of two: s·B_c is exact in float32)
        assert torch.equal(total.B, torch.cat([merged[name].B, 2.0 * c.B], dim=1))
        assert torch.equal(total.A, torch.cat([merged[name].A, c.A]))
        assert torch.count_nonzero(c.B) > 0  # trained (PEFT starts B_c at zero)


def in_memory_and_written_logits(base, model, tokenizer, merged, sets, folder):
    """Logits of the in-memory model after 5 calibration steps and of its written adapter reloaded by PEFT."""
    params = CalibrationParams(**{**FAST, "steps": 5})
    encoded = [encode_target(tokenizer, e, 8, 64) for s in sets for e in s.examples]
    rows, weights, _ = mixture(sets)
    batch = tokenizer(HARMFUL[:2] + BORDERLINE[:2], return_tensors="pt", padding=True)
    with calibration_model(model, merged, sorted(merged), params.rank, params.seed) as peft_model:
        train_steps(peft_model, tokenizer, encoded, rows, weights, params)
        with torch.no_grad():
            in_memory = peft_model(**batch).logits
        factors = trained_factors(peft_model, sorted(merged))
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())
    fan_in_fan_out = model.config.model_type == "gpt2"
    save_adapter(folder, {n: f.as_stored() for n, f in combined(merged, factors).items()}, base_model=None,
                 fan_in_fan_out=fan_in_fan_out)  # fmt: skip
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    with torch.no_grad():
        written = reloaded(**batch).logits
        plain = model(**batch).logits
    return in_memory, written, plain


def test_the_written_adapter_reproduces_the_in_memory_model(world, tmp_path):
    in_memory, written, plain = in_memory_and_written_logits(
        world["base"], world["model"], world["tokenizer"], world["merged"], world["sets"], tmp_path / "a"
    )
    torch.testing.assert_close(written, in_memory, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, in_memory, atol=1e-3)  # the LoRA was really unloaded


def test_the_written_adapter_reproduces_the_in_memory_model_with_conv1d(tiny_models, tmp_path):
    base = tiny_models["gpt2"]
    model, tokenizer = load_base_model(str(base), "cpu", "float32")
    merged = {n: f.as_stored() for n, f in load_adapter(random_lora(base, tmp_path / "m", seed=3)).modules.items()}
    sets = [
        CalibrationSet("borderline", [Example(p, ANSWER) for p in BORDERLINE], 1.0),
        CalibrationSet("harmful", [Example(h, REFUSAL) for h in HARMFUL], 1.0),
    ]
    in_memory, written, _ = in_memory_and_written_logits(base, model, tokenizer, merged, sets, tmp_path / "a")
    torch.testing.assert_close(written, in_memory, rtol=1e-4, atol=1e-5)


def test_a_seed_fixes_the_result_and_another_seed_changes_it(world):
    model, tokenizer, merged = world["model"], world["tokenizer"], world["merged"]

    def run(seed: int) -> dict[str, LoraFactors]:
        params = CalibrationParams(**{**FAST, "steps": 6, "seed": seed})
        return calibrate(model, tokenizer, world["sets"], params, merged=merged, targets=sorted(merged)).factors

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(first[n].A, again[n].A) and torch.equal(first[n].B, again[n].B) for n in first)
    assert not all(torch.equal(first[n].A, other[n].A) for n in first)


def test_steps_zero_trains_nothing(world):
    model, tokenizer, merged = world["model"], world["tokenizer"], world["merged"]
    params = CalibrationParams(**{**FAST, "steps": 0})
    outcome = calibrate(model, tokenizer, world["sets"], params, merged=merged, targets=sorted(merged))
    assert outcome.factors == {} and outcome.report["trained"] is False


def test_a_non_finite_loss_fails_with_its_code(world):
    model, tokenizer, merged = world["model"], world["tokenizer"], world["merged"]
    name = sorted(merged)[0]
    broken = dict(merged)
    B = merged[name].B.clone()
    B[0, 0] = float("nan")
    broken[name] = LoraFactors(B, merged[name].A)
    with pytest.raises(InputError, match="loss is not finite at step 1") as error:
        calibrate(model, tokenizer, world["sets"], CalibrationParams(**FAST), merged=broken, targets=sorted(merged))
    assert error.value.code == "non_finite_result"
    assert all(p.requires_grad for p in model.parameters())  # the model is restored after a failure too


def test_mixture_draws_each_set_by_its_weight_not_its_size():
    sets = [
        CalibrationSet("borderline", [Example(f"p{i}", "a") for i in range(30)], 1.0),
        CalibrationSet("harmful", [Example(f"h{i}", "r") for i in range(10)], 3.0),
        CalibrationSet("harmless", [], 1.0),
        CalibrationSet("retain", [Example("u", "x")], 0.0),
    ]
    rows, weights, shares = mixture(sets)
    assert rows == list(range(40)) and shares == {"borderline": 0.25, "harmful": 0.75}
    assert sum(weights[:30]) / sum(weights) == pytest.approx(0.25)


def test_targets_cut_to_max_target_tokens_lose_their_end_of_turn(world):
    tokenizer = world["tokenizer"]
    long = encode_target(tokenizer, Example(BORDERLINE[0], ANSWER), 3, 64)
    whole = encode_target(tokenizer, Example(BORDERLINE[0], ANSWER), 64, 64)
    assert len(long.input_ids) - long.response_start == 3
    assert whole.input_ids[-1] == tokenizer.eos_token_id and whole.input_ids[: len(long.input_ids)] == long.input_ids


def test_before_answers_are_cached_and_refusals_dropped(world, tmp_path: Path):
    model, tokenizer = world["model"], world["tokenizer"]
    before = BeforeModel(world["merged"], {"model": "tiny"})  # a `before` model that refuses
    cache = AnswerCache(tmp_path / "answers")
    answers, hit = before_answers(model, tokenizer, before, BORDERLINE[:3], 8, cache=cache)
    again, hit_again = before_answers(model, tokenizer, before, BORDERLINE[:3], 8, cache=cache)
    assert (hit, hit_again) == (False, True) and answers == again and len(list(cache.folder.iterdir())) == 1
    assert before_answers(model, tokenizer, before, BORDERLINE[:3], 7, cache=cache)[1] is False  # another key
    rows = [Example(BORDERLINE[0]), Example(BORDERLINE[1]), Example(BORDERLINE[2], ANSWER), Example("x", " ")]
    targets = compliant_targets(rows, dict(zip(BORDERLINE[:3], answers, strict=True)), judge, judge_own=True)
    assert answers[0] == answers[1] and judge.is_refusal(answers[0])
    assert [e.response for e in targets.examples] == [ANSWER]
    assert (targets.dropped_refusals, targets.dropped_empty, targets.generated) == (2, 1, 0)


def test_a_non_finite_trained_weight_is_refused_naming_the_module():
    from sstmerge_core.repair.calibration import check_factors

    good = LoraFactors(torch.ones(4, 2), torch.ones(2, 3))
    check_factors({"a": good})
    with pytest.raises(InputError, match="module b is not finite") as error:
        check_factors({"a": good, "b": LoraFactors(torch.ones(4, 2), torch.full((2, 3), float("inf")))})
    assert error.value.code == "non_finite_result"
