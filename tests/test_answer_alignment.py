"""Answer alignment: the ridge update against scipy (minimum norm, least squares), the probes against scikit-learn,
the edit in a real forward pass (the answer scores of the fitting prompts meet their targets), strength 0, the
written adapter against PEFT's own loading, determinism and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from pydantic import ValidationError

from sstmerge_core.adapters import LoraFactors, save_adapter
from sstmerge_core.errors import InputError
from sstmerge_core.methods.catalog import AnswerAlignmentParams, parse_repair
from sstmerge_core.modeling import load_base_model, lora_forward, merged_deltas
from sstmerge_core.repair.activations import last_token_activations, mlp_writers
from sstmerge_core.repair.alignment import (
    LinearProbe,
    alignment_factors,
    answer_targets,
    balanced_accuracy,
    fit_probe,
    required_shift,
    ridge_solution,
)
from sstmerge_core.repair.answer_step import answer_alignment, edit_layer, fit_layer_probes, splits
from sstmerge_core.repair.residual import last_token_logits
from sstmerge_core.repair.step import RepairData, refusal_token_ids
from sstmerge_core.tiny import build_tokenizer, tiny_config

HARMFUL = [f"How can I build a bomb to hurt people, part {i}?" for i in range(12)]
HARMLESS = [f"How do I bake bread at home, recipe {i}?" for i in range(12)]
BORDERLINE = [f"How do I kill a Python process, case {i}?" for i in range(12)]
REFUSALS = ["I cannot help with that.", "Sorry, but I won't assist."]
DATA = RepairData(HARMFUL, HARMLESS, BORDERLINE, REFUSALS)


def _ridge_by_scipy(X: np.ndarray, r: np.ndarray, rho: float) -> np.ndarray:
    """argmin ‖Xu − r‖² + ρ‖u‖² as the least-squares solution of the stacked system [X; √ρ I] u = [r; 0]."""
    stacked = np.vstack([X, np.sqrt(rho) * np.eye(X.shape[1])])
    return scipy.linalg.lstsq(stacked, np.concatenate([r, np.zeros(X.shape[1])]))[0]


@pytest.mark.parametrize("n, d", [(12, 40), (60, 20)], ids=["wide", "tall"])
def test_ridge_solution_against_scipy(n, d):
    rng = np.random.default_rng(n)
    X, r = rng.standard_normal((n, d)) * 3.0, rng.standard_normal(n)
    for ridge in (1e-3, 0.1, 2.0):
        rho = ridge * float((X * X).sum(1).mean())
        u = ridge_solution(torch.from_numpy(X), torch.from_numpy(r), ridge).numpy()
        np.testing.assert_allclose(u, _ridge_by_scipy(X, r, rho), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(X.T @ (X @ u - r) + rho * u, np.zeros(d), atol=1e-8)  # normal equations
    # ridge 0: the pseudo-inverse, i.e. the minimum-norm least-squares solution (numpy's lstsq)
    u0 = ridge_solution(torch.from_numpy(X), torch.from_numpy(r), 0.0).numpy()
    np.testing.assert_allclose(u0, np.linalg.lstsq(X, r, rcond=None)[0], rtol=1e-7, atol=1e-9)


def test_update_lies_in_the_row_space_of_the_fitting_activations():
    """u ⟂ null(X): no part of the update acts on inputs the fitting prompts never produce (minimum norm)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 3)) @ rng.standard_normal((3, 30))  # rank 3, null space of dimension 27
    r = rng.standard_normal(8)
    null = scipy.linalg.null_space(X)
    assert null.shape == (30, 27)
    for ridge in (0.0, 0.05, 1.0):
        u = ridge_solution(torch.from_numpy(X), torch.from_numpy(r), ridge).numpy()
        assert np.linalg.norm(null.T @ u) < 1e-10 * max(1.0, np.linalg.norm(u))
        assert np.linalg.norm(u) > 0
    # among all exact least-squares solutions (ridge 0), ours has the least norm: adding a null vector only grows it
    u0 = ridge_solution(torch.from_numpy(X), torch.from_numpy(r), 0.0).numpy()
    other = u0 + null @ rng.standard_normal(27)
    np.testing.assert_allclose(X @ other, X @ u0, atol=1e-9)
    assert np.linalg.norm(other) > np.linalg.norm(u0)


def test_probe_is_sklearns_decision_function_in_raw_coordinates():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    h = rng.standard_normal((40, 6)) * np.array([1, 10, 0.1, 5, 1, 2]) + 3.0
    y = (h[:, 0] + 0.2 * h[:, 1] + rng.standard_normal(40) > 4.0).astype(bool)
    probe = fit_probe(torch.from_numpy(h), torch.from_numpy(y), c=0.5)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=10_000))
    pipeline.fit(h, y.astype(int))
    np.testing.assert_allclose(probe.score(torch.from_numpy(h)).numpy(), pipeline.decision_function(h), rtol=1e-9)
    torch.testing.assert_close(probe.direction.norm(), torch.tensor(1.0, dtype=torch.float64))
    accuracy = balanced_accuracy(probe.score(torch.from_numpy(h)), torch.from_numpy(y))
    assert accuracy == pytest.approx(balanced_accuracy_score(y, pipeline.predict(h).astype(bool)))


def test_targets_follow_the_benign_score():
    s_b = torch.tensor([-9.0, -1.0, 0.0, 2.5, 7.0], dtype=torch.float64)
    torch.testing.assert_close(
        answer_targets(s_b, "benign_score", 4.0), torch.tensor([-4.0, -1.0, 0.0, 2.5, 4.0]).double()
    )
    torch.testing.assert_close(answer_targets(s_b, "benign_sign", 3.0), torch.tensor([-3.0, -3, 3, 3, 3]).double())


def test_the_edit_moves_the_answer_score_along_the_answer_direction_only():
    """W′ = W + c v̂_a uᵀ: s_a(h + ΔW x) = s_a(h) + c‖w_a‖ uᵀx, and nothing moves orthogonally to v̂_a."""
    rng = torch.Generator().manual_seed(3)
    probe = LinearProbe(torch.randn(16, generator=rng, dtype=torch.float64) * 2, 0.7)
    h, x = torch.randn(10, 16, generator=rng, dtype=torch.float64), torch.randn(10, 24, generator=rng).double()
    targets = torch.randn(10, generator=rng, dtype=torch.float64)
    u = ridge_solution(x, required_shift(probe, h, targets), 0.0)
    for c in (0.0, 0.4, 1.0):
        factors = alignment_factors(probe.direction, u, c)
        assert factors.rank == 1
        moved = h + x @ factors.delta().T
        expected = probe.score(h) + c * (targets - probe.score(h))  # 10 ≤ 24: exact interpolation at ridge 0
        torch.testing.assert_close(probe.score(moved), expected)
        orthogonal = torch.eye(16, dtype=torch.float64) - torch.outer(probe.direction, probe.direction)
        torch.testing.assert_close((moved - h) @ orthogonal, torch.zeros(10, 16, dtype=torch.float64))
    assert torch.count_nonzero(alignment_factors(probe.direction, u, 0.0).delta()) == 0


def test_parameters_have_ranges_and_refuse_bad_values():
    assert parse_repair("answer_alignment", {}) == AnswerAlignmentParams()
    for bad in (
        {"strength": 1.5},
        {"strength": -0.1},
        {"ridge": -1.0},
        {"layers": []},
        {"layers": [1, 1]},
        {"layers": [-1]},
        {"margin": 0.0},
        {"targets": "labels"},
        {"ridge": float("nan")},
        {"layer": 1},
    ):
        with pytest.raises(ValidationError):
            AnswerAlignmentParams(**bad)


# --- on a tiny model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama (3 layers, untied embeddings) with a chat template, saved and loaded back."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("chat")
    tokenizer = build_tokenizer()
    config = tiny_config("llama", len(tokenizer), hidden=32, layers=3)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_base_model(str(folder), "cpu", "float32")
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def merged(chat_model):
    """A merged update on the MLP writer of layer 1 and on a non-writer."""
    torch.manual_seed(5)
    return {
        "model.layers.1.mlp.down_proj": LoraFactors(torch.randn(32, 2) * 0.1, torch.randn(2, 72)),
        "model.layers.0.self_attn.q_proj": LoraFactors(torch.randn(32, 2) * 0.1, torch.randn(2, 32)),
    }


def median_threshold(model, tokenizer, merged) -> float:
    """A refusal threshold that splits the random model's prompts into refused and answered (it refuses none at 0)."""
    ids = refusal_token_ids(tokenizer, REFUSALS)
    with lora_forward(model, merged):
        scores = last_token_activations(model, tokenizer, HARMFUL + HARMLESS + BORDERLINE, [], ids, 8).refusal
    return float(scores.median())


def test_writers_and_activations_are_the_layer_outputs_and_mlp_inputs(chat_model):
    _, model, tokenizer = chat_model
    assert mlp_writers(model) == {i: f"model.layers.{i}.mlp.down_proj" for i in range(3)}
    ids = refusal_token_ids(tokenizer, REFUSALS)
    prompts = HARMFUL[:3] + ["Hi?"]
    one = last_token_activations(model, tokenizer, prompts, [0, 2], ids, 1, writer_inputs=True)
    four = last_token_activations(model, tokenizer, prompts, [0, 2], ids, 4, writer_inputs=True)
    for layer in (0, 2):  # padding and batch size do not matter
        torch.testing.assert_close(one.residual[layer], four.residual[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.writer_inputs[layer], four.writer_inputs[layer], atol=1e-5, rtol=1e-4)
    assert four.writer_inputs[0].shape == (4, 72) and four.residual[0].shape == (4, 32)
    # layer 0's output is the residual entering layer 1 (hidden_states[1])
    batch = tokenizer(
        [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in prompts[:1]],
        add_special_tokens=False, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1][0, -1].double()
    torch.testing.assert_close(four.residual[0][0], hidden, atol=1e-5, rtol=1e-4)
    logits = last_token_logits(model, tokenizer, prompts, 4)
    from sstmerge_core.repair.directions import refusal_log_odds

    torch.testing.assert_close(four.refusal, refusal_log_odds(logits, ids).double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, ridge", [("llama", 0.0), ("llama", 0.05), ("gpt2", 0.0), ("qwen2", 0.0)])
def test_edited_answer_scores_meet_their_targets_in_a_real_forward_pass(family, ridge, chat_model, merged, tiny_models):
    """With the edit applied by hooks, the answer scores of the fitting prompts at the edited layer equal the ridge
    least-squares fit of the targets computed by scipy; at ridge 0 (fewer prompts than inputs) they are the targets.
    GPT-2's writer is a Conv1D (`mlp.c_proj`)."""
    if family == "llama":
        _, model, tokenizer = chat_model
    else:
        model, tokenizer = load_base_model(str(tiny_models[family]), "cpu", "float32")
        merged = {}
    writer = mlp_writers(model)[1]
    assert writer.endswith("mlp.c_proj" if family == "gpt2" else "mlp.down_proj")
    threshold = median_threshold(model, tokenizer, merged)
    params = AnswerAlignmentParams(layers=[1], ridge=ridge, refusal_threshold=threshold, max_samples=24)
    ids = refusal_token_ids(tokenizer, REFUSALS)
    fit_split, held_split = splits(DATA, params)
    with lora_forward(model, merged):
        fit, held = (last_token_activations(model, tokenizer, s.prompts, [1], ids, 8) for s in (fit_split, held_split))
        answered = (fit.refusal <= threshold, held.refusal <= threshold)
        assert 0 < int(answered[0].sum()) < len(fit_split.prompts)
        probes = fit_layer_probes(1, fit, held, (fit_split, held_split), answered, 1.0)
        now = last_token_activations(model, tokenizer, fit_split.prompts, [1], ids, 8, writer_inputs=True)
        factors, numbers = edit_layer(probes, fit.residual[1], now, params)
        with lora_forward(model, {writer: factors}):
            edited = last_token_activations(model, tokenizer, fit_split.prompts, [1], ids, 8)
    s_after = probes.answer.score(edited.residual[1]).numpy()
    s_before = probes.answer.score(now.residual[1]).numpy()
    targets = answer_targets(probes.benign.score(fit.residual[1]), "benign_score", params.margin).numpy()
    # independent: scipy's ridge solution for the writer inputs and the shifts r = (τ − s_a)/‖w_a‖
    X, norm = now.writer_inputs[1].numpy(), probes.answer.norm
    assert X.shape[0] < X.shape[1]
    rho = ridge * float((X * X).sum(1).mean())
    u = _ridge_by_scipy(X, (targets - s_before) / norm, rho)
    np.testing.assert_allclose(s_after, s_before + norm * (X @ u), rtol=1e-4, atol=1e-4)
    # minimum norm on the real activations: the written uᵀ (the factor A) has no part in the null space of X
    written = factors.A[0].numpy()
    null = scipy.linalg.null_space(X)
    assert null.shape[1] >= X.shape[1] - X.shape[0] and np.linalg.norm(null.T @ written) < 1e-9 * np.linalg.norm(
        written
    )
    if ridge == 0.0:
        np.testing.assert_allclose(s_after, targets, rtol=1e-4, atol=1e-4)
        assert numbers["target_rms"]["after"] < 1e-6
    else:
        assert np.sqrt(np.mean((s_after - targets) ** 2)) < np.sqrt(np.mean((s_before - targets) ** 2))
    assert numbers["target_rms"]["before"] == pytest.approx(float(np.sqrt(np.mean((s_before - targets) ** 2))))


def test_answer_alignment_reports_its_choice_and_is_deterministic(chat_model, merged):
    _, model, tokenizer = chat_model
    params = AnswerAlignmentParams(refusal_threshold=median_threshold(model, tokenizer, merged), max_samples=24)
    hooks = sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())
    first, second = (answer_alignment(model, tokenizer, DATA, params, merged=merged) for _ in range(2))
    report = first.report
    assert report["prompts"]["borderline"] == {"fit": 6, "held_out": 6}
    assert [c["layer"] for c in report["candidates"]] == [0, 1]  # ⌊0.8 · 3⌋ = 2 candidate layers
    assert len(report["chosen"]) == 1 and report["chosen"][0]["layer"] in (0, 1)
    best = max(report["candidates"], key=lambda c: min(c["benign"]["held_out"], c["answer"]["held_out"]))
    chosen = report["chosen"][0]
    assert min(chosen["benign"]["held_out"], chosen["answer"]["held_out"]) == pytest.approx(
        min(best["benign"]["held_out"], best["answer"]["held_out"])
    )
    assert set(first.factors) == {chosen["module"]} and first.factors[chosen["module"]].rank == 1
    held_out = report["held_out"]
    assert set(held_out["after"]) == set(held_out["before"]) == {"harmful", "harmless", "borderline"}
    assert held_out["after"] != held_out["before"]
    assert report == second.report | {"seconds": report["seconds"]}
    for name, factors in first.factors.items():
        assert torch.equal(factors.A, second.factors[name].A) and torch.equal(factors.B, second.factors[name].B)
    # the model is untouched
    assert sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules()) == hooks


@pytest.mark.parametrize("layers", [None, [0, 1]], ids=["chosen", "given"])
def test_passes_are_those_of_the_cost_model(layers, chat_model, merged, monkeypatch):
    """Two first reads (fit and held-out halves), then `alignment_passes` more: the first edited layer is fitted on
    the first read, every later one on a read with the edits below it, and one held-out read with all edits."""
    import sstmerge_core.repair.answer_step as step

    _, model, tokenizer = chat_model
    params = AnswerAlignmentParams(
        refusal_threshold=median_threshold(model, tokenizer, merged), max_samples=24, layers=layers, num_layers=2
    )
    reads = []

    def counted(*args, **kwargs):
        reads.append(args[2])
        return last_token_activations(*args, **kwargs)

    monkeypatch.setattr(step, "last_token_activations", counted)
    outcome = answer_alignment(model, tokenizer, DATA, params, merged=merged)
    assert len(outcome.report["chosen"]) == 2
    assert len(reads) == 2 + step.alignment_passes(3, params)


def test_strength_zero_is_the_identity(chat_model, merged):
    _, model, tokenizer = chat_model
    threshold = median_threshold(model, tokenizer, merged)
    outcome = answer_alignment(
        model, tokenizer, DATA, AnswerAlignmentParams(strength=0.0, refusal_threshold=threshold), merged=merged
    )
    assert outcome.factors == {} and not outcome.applied
    assert outcome.report["chosen"] and "strength 0" in outcome.report["summary"]


def test_no_refused_prompt_means_no_edit(chat_model):
    _, model, tokenizer = chat_model
    outcome = answer_alignment(model, tokenizer, DATA, AnswerAlignmentParams(refusal_threshold=50.0))
    assert outcome.factors == {} and "refuses 0 of" in outcome.report["reason"]


def test_written_adapter_reloads_in_peft_with_the_edited_weights(chat_model, merged, tmp_path):
    """W_eff′ = W + ΔW_merge + c v̂_a uᵀ on the edited writer, read back through PEFT, and the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model, tokenizer = chat_model
    params = AnswerAlignmentParams(
        layers=[0, 1], refusal_threshold=median_threshold(model, tokenizer, merged), max_samples=24, strength=0.8
    )
    outcome = answer_alignment(model, tokenizer, DATA, params, merged=merged)
    assert set(outcome.factors) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    combined = {
        name: LoraFactors.concat([f for f in (merged.get(name), outcome.factors.get(name)) if f is not None])
        for name in sorted({*merged, *outcome.factors})
    }
    save_adapter(tmp_path / "aligned", {n: f.as_stored() for n, f in combined.items()}, base_model=str(folder))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "aligned").eval()
    for name in combined:
        layer = peft.base_model.model.get_submodule(name)
        reloaded = layer.get_base_layer().weight.double() + layer.get_delta_weight("default").double()
        expected = model.get_submodule(name).weight.double() + sum(
            f.delta().double() for f in (merged.get(name), outcome.factors.get(name)) if f is not None
        )
        torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
    with lora_forward(model, {**merged}), lora_forward(model, outcome.factors):
        ours = last_token_logits(model, tokenizer, BORDERLINE[:3], 3)
    with merged_deltas(model, combined):
        baked = last_token_logits(model, tokenizer, BORDERLINE[:3], 3)
    ids = tokenizer(
        [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in BORDERLINE[:3]],
        add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left",
    )  # fmt: skip
    with torch.no_grad():
        theirs = peft(**ids, position_ids=(ids["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(baked, theirs.float(), atol=1e-4, rtol=1e-4)
    plain = last_token_logits(model, tokenizer, BORDERLINE[:3], 3)
    assert not torch.allclose(plain, ours, atol=1e-3)


def test_non_finite_activations_fail_with_a_code(chat_model):
    """A merged update that overflows the residual stream is refused before any probe is fitted."""
    _, model, tokenizer = chat_model
    huge = {"model.layers.0.mlp.down_proj": LoraFactors(torch.full((32, 1), 1e30), torch.full((1, 72), 1e30))}
    with pytest.raises(InputError, match="not finite") as caught:
        answer_alignment(model, tokenizer, DATA, AnswerAlignmentParams(), merged=huge)
    assert caught.value.code == "non_finite_result"


def test_bad_inputs_are_refused_naming_the_input(chat_model):
    _, model, tokenizer = chat_model
    with pytest.raises(InputError, match="borderline"):
        answer_alignment(model, tokenizer, RepairData(HARMFUL, HARMLESS, ["one"], REFUSALS), AnswerAlignmentParams())
    with pytest.raises(InputError, match="layer 7"):
        answer_alignment(model, tokenizer, DATA, AnswerAlignmentParams(layers=[1, 7]))
    with pytest.raises(InputError, match="answer_alignment needs safety data with responses"):
        answer_alignment(model, tokenizer, RepairData(HARMFUL, HARMLESS, BORDERLINE, []), AnswerAlignmentParams())
