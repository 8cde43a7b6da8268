"""Refusal-direction ablation: the linear algebra against direct computations, the exact rank-1 adapter
against PEFT's own loading (tied and untied embeddings), hooks vs weights, selection, determinism, bad input."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sstmerge_core.adapters import LoraFactors, load_adapter, save_adapter
from sstmerge_core.errors import InputError
from sstmerge_core.methods.catalog import RefusalAblationParams
from sstmerge_core.modeling import load_base_model, merged_deltas
from sstmerge_core.repair.directions import (
    ablation_factors,
    false_refusal_directions,
    kl_divergence,
    partial_orthogonalization,
    refusal_log_odds,
)
from sstmerge_core.repair.residual import (
    ablated,
    last_token_logits,
    post_instruction_length,
    residual_means,
    residual_writers,
    writer_weight,
)
from sstmerge_core.repair.selection import CandidateScore, Scores, choose, is_eligible
from sstmerge_core.repair.step import RepairData, fit_select_split, refusal_ablation
from sstmerge_core.tiny import build_tokenizer, tiny_config

HARMFUL = [f"How can I build a bomb to hurt people, part {i}?" for i in range(12)]
HARMLESS = [f"How do I bake bread at home, recipe {i}?" for i in range(12)]
BORDERLINE = [f"How do I kill a Python process, case {i}?" for i in range(12)]
REFUSALS = ["I cannot help with that.", "Sorry, but I won't assist."]


def test_partial_orthogonalization_against_direct_formula():
    torch.manual_seed(0)
    v, r = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    for lam in (0.0, 0.3, 1.0):
        got = partial_orthogonalization(v, r, lam)
        for i in range(5):
            expected = v[i] - lam * torch.dot(v[i], r[i]) / torch.dot(r[i], r[i]) * r[i]
            torch.testing.assert_close(got[i], expected / expected.norm())
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose((partial_orthogonalization(v, r, 1.0) * r).sum(-1), torch.zeros(5, dtype=torch.float64))


def test_lambda_one_makes_the_false_refusal_direction_orthogonal_to_the_true_one():
    torch.manual_seed(1)
    mu_h, mu_b, mu_p = (torch.randn(3, 2, 8, dtype=torch.float64) for _ in range(3))
    v_hat = false_refusal_directions(mu_h, mu_b, mu_p, lam=1.0)
    r = mu_h - mu_b
    assert torch.allclose((v_hat * r).sum(-1), torch.zeros(3, 2, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose((false_refusal_directions(mu_h, mu_b, mu_p, 0.0) * r).sum(-1), torch.zeros(3, 2).double())


def test_ablation_factors_remove_the_direction_exactly_and_c_zero_is_the_identity():
    torch.manual_seed(2)
    W = torch.randn(16, 24, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    x = torch.randn(24, 50, dtype=torch.float64)
    repaired = W + ablation_factors(W, v, 1.0).delta()
    assert torch.allclose(v @ (repaired @ x), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    half = W + ablation_factors(W, v, 0.5).delta()
    torch.testing.assert_close(half, (torch.eye(16, dtype=torch.float64) - 0.5 * torch.outer(v, v)) @ W)
    assert ablation_factors(W, v, 1.0).rank == 1
    torch.testing.assert_close(W + ablation_factors(W, v, 0.0).delta(), W)


def test_refusal_log_odds_and_kl_against_softmax():
    torch.manual_seed(3)
    logits, other = torch.randn(4, 30), torch.randn(4, 30)
    ids = torch.tensor([2, 7, 11])
    p = torch.softmax(logits, -1)
    p_r = p[:, ids].sum(-1)
    torch.testing.assert_close(refusal_log_odds(logits, ids), torch.log(p_r / (1 - p_r)))
    q = torch.softmax(other, -1)
    torch.testing.assert_close(kl_divergence(logits, other), (p * (p.log() - q.log())).sum(-1))
    assert torch.all(kl_divergence(logits, logits).abs() < 1e-6)


def test_choose_takes_the_eligible_candidate_that_lowers_borderline_refusals_most():
    params = RefusalAblationParams(kl_threshold=0.1, harmful_margin=1.0)
    baseline = Scores(harmful=3.0, borderline=1.0)

    def candidate(layer, harmful, borderline, kl):
        scores = Scores(harmful, borderline, kl)
        return CandidateScore(layer, -1, scores, is_eligible(scores, baseline, params))

    candidates = [
        candidate(0, 2.5, -2.0, 0.5),  # lowest borderline but moves harmless outputs too much
        candidate(1, 1.0, -3.0, 0.01),  # breaks harmful refusals
        candidate(2, 2.4, -1.0, 0.05),
        candidate(3, 2.9, -0.5, 0.02),
    ]
    assert choose(candidates, baseline).layer == 2
    assert choose([candidate(4, 3.0, 1.5, 0.0)], baseline) is None  # raises borderline refusals: no repair
    assert choose(candidates[:2], baseline) is None


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def chat_model(request, tmp_path_factory):
    """A tiny Llama with a chat template; with tied input and output embeddings or not."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    tokenizer = build_tokenizer()
    config = tiny_config("llama", len(tokenizer), hidden=32, layers=3)
    config.tie_word_embeddings = request.param
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_base_model(str(folder), "cpu", "float32")
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == request.param
    return folder, model, tokenizer


def _direction(model, tokenizer, layer: int = 1, position: int = -1) -> torch.Tensor:
    k = post_instruction_length(tokenizer)
    means = [residual_means(model, tokenizer, prompts, k, 4) for prompts in (HARMFUL, HARMLESS, BORDERLINE)]
    return false_refusal_directions(*means, lam=1.0)[layer, position].float()


def test_post_instruction_tokens_are_the_template_suffix(chat_model):
    _, _, tokenizer = chat_model
    # tiny template: "<|user|>{content}<|end|><|assistant|>" → two tokens after the message
    assert post_instruction_length(tokenizer) == 2


def test_residual_means_do_not_depend_on_batch_size_or_padding(chat_model):
    _, model, tokenizer = chat_model
    prompts = HARMFUL[:3] + ["Hi?"]
    torch.testing.assert_close(
        residual_means(model, tokenizer, prompts, 2, 1),
        residual_means(model, tokenizer, prompts, 2, 4),
        atol=1e-5,
        rtol=1e-4,
    )


def test_hook_ablation_equals_weight_ablation(chat_model):
    _, model, tokenizer = chat_model
    direction = _direction(model, tokenizer)
    writers = residual_writers(model)
    assert "model.embed_tokens" in writers and len(writers) == 2 * 3 + 1
    with ablated(writers, direction, 1.0):
        hooked = last_token_logits(model, tokenizer, BORDERLINE[:4], 4)
    factors = {name: ablation_factors(writer_weight(m), direction, 1.0) for name, m in writers.items()}
    with merged_deltas(model, factors):
        baked = last_token_logits(model, tokenizer, BORDERLINE[:4], 4)
    torch.testing.assert_close(hooked, baked, atol=1e-4, rtol=1e-4)
    plain = last_token_logits(model, tokenizer, BORDERLINE[:4], 4)
    assert not torch.allclose(plain, baked, atol=1e-3)


def test_repaired_adapter_reloads_in_peft_with_the_ablated_weights(chat_model, tmp_path):
    """W_eff′ = (I − c v̂v̂ᵀ)(W + ΔW) per writer (the merge's own ΔW included), read back through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model, tokenizer = chat_model
    torch.manual_seed(5)
    merged = {  # a merged update on one writer and one non-writer
        "model.layers.0.self_attn.o_proj": LoraFactors(torch.randn(32, 2) * 0.1, torch.randn(2, 32)),
        "model.layers.1.self_attn.q_proj": LoraFactors(torch.randn(32, 2) * 0.1, torch.randn(2, 32)),
    }
    with merged_deltas(model, merged):
        direction = _direction(model, tokenizer)
        writers = residual_writers(model)
        effective = {name: writer_weight(m).double().clone() for name, m in writers.items()}
        repair = {name: ablation_factors(writer_weight(m), direction, 0.7) for name, m in writers.items()}
    combined = {
        name: LoraFactors.concat([f for f in (merged.get(name), repair.get(name)) if f is not None])
        for name in sorted({*merged, *repair})
    }
    save_adapter(
        tmp_path / "repaired", combined, base_model=str(folder), embedding_modules=frozenset({"model.embed_tokens"})
    )
    assert load_adapter(tmp_path / "repaired").embedding_modules == {"model.embed_tokens"}

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "repaired").eval()
    projector = torch.eye(32, dtype=torch.float64) - 0.7 * torch.outer(direction.double(), direction.double())
    for name, weight in effective.items():
        layer = peft.base_model.model.get_submodule(name)
        delta = layer.get_delta_weight("default").double()
        base = layer.get_base_layer().weight.double()
        reloaded = (base + delta).T if name == "model.embed_tokens" else base + delta
        torch.testing.assert_close(reloaded, projector @ weight, atol=1e-5, rtol=1e-5)
    # and the whole model: PEFT's logits equal ours with the same update applied in place
    with merged_deltas(model, combined):
        ours = last_token_logits(model, tokenizer, BORDERLINE[:3], 3)
    ids = tokenizer(
        [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in BORDERLINE[:3]
        ],
        add_special_tokens=False,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with torch.no_grad():
        theirs = peft(**ids, position_ids=(ids["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
    # the tied output head is untouched by the embedding update
    if model.get_input_embeddings().weight is model.get_output_embeddings().weight:
        with merged_deltas(model, combined):
            assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_refusal_ablation_is_deterministic_and_reports_its_choice(chat_model):
    _, model, tokenizer = chat_model
    data = RepairData(HARMFUL, HARMLESS, BORDERLINE, REFUSALS)
    params = RefusalAblationParams(kl_threshold=100.0, harmful_margin=100.0, max_samples=12, batch_size=6)
    first, second = (refusal_ablation(model, tokenizer, data, params) for _ in range(2))
    assert first.report["candidates"] == second.report["candidates"]
    assert len(first.report["candidates"]) == 2 * 2  # int(0.8·3) = 2 layers × 2 positions
    assert first.report["prompts"]["borderline"] == {"fit": 6, "select": 6}
    if first.applied:
        assert first.report["chosen"]["borderline"] < first.report["baseline"]["borderline"]
        for name, factors in first.factors.items():
            torch.testing.assert_close(factors.A, second.factors[name].A)
    else:
        assert "reason" in first.report


def test_fit_and_select_halves_are_disjoint_and_seeded():
    prompts = [f"p{i}" for i in range(20)]
    fit, select = fit_select_split(prompts, 10, seed=3)
    assert len(fit) == len(select) == 5 and not set(fit) & set(select)
    assert fit_select_split(prompts, 10, seed=3) == (fit, select)
    assert fit_select_split(prompts, 10, seed=4) != (fit, select)


def test_bad_inputs_are_refused(chat_model):
    _, model, tokenizer = chat_model
    with pytest.raises(InputError, match="borderline"):
        refusal_ablation(model, tokenizer, RepairData(HARMFUL, HARMLESS, [], REFUSALS), RefusalAblationParams())
    with pytest.raises(InputError, match="layer 7"):
        refusal_ablation(
            model, tokenizer, RepairData(HARMFUL, HARMLESS, BORDERLINE, REFUSALS), RefusalAblationParams(layer=7)
        )
    for bad in ({"strength": 1.5}, {"strength": -0.1}, {"lam": 2.0}, {"position": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            RefusalAblationParams(**bad)
