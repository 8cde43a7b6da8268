"""Baselines (docs/method.md, "Baselines") against PEFT's own `add_weighted_adapter` on the same adapters."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import load_adapter
from sstmerge_core.merge import WeightedAdapter, merge_modules, module_inputs
from sstmerge_core.methods.catalog import parse_params
from sstmerge_core.methods.registry import get_method
from sstmerge_core.tiny import random_lora

W_U, ALPHA = 0.7, 1.3


@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    u = random_lora(tiny_llama, root / "u", seed=11, r=4, lora_alpha=8)
    s = random_lora(tiny_llama, root / "s", seed=12, r=3, lora_alpha=3, use_rslora=True)
    inputs = module_inputs([WeightedAdapter(load_adapter(u), W_U)], [WeightedAdapter(load_adapter(s))])
    return tiny_llama, u, s, inputs


def ours(inputs, method: str, **params) -> dict[str, torch.Tensor]:
    results = merge_modules(get_method(method), inputs, parse_params(method, {"alphas": [ALPHA], **params}))[ALPHA]
    return {name: r.factors.delta().double() for name, r in results.items()}


def peft_merge(base, u, s, combination_type: str, **kwargs) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), u, adapter_name="u")
    model.load_adapter(s, adapter_name="s")
    model.add_weighted_adapter(["u", "s"], [W_U, ALPHA], "m", combination_type=combination_type, **kwargs)
    return {
        name: module.get_delta_weight("m").double()
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "lora_A") and "m" in module.lora_A
    }


def test_linear_is_exact_and_matches_peft_concatenation(pair):
    base, u, s, inputs = pair
    merged = ours(inputs, "linear")
    expected = {n: W_U * m.utility[0].delta().double() + ALPHA * m.safety.delta().double() for n, m in inputs.items()}
    reference = peft_merge(base, u, s, "cat")
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(merged[name], reference[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method, peft_type, extra",
    [
        ("ties", "ties_svd", {"majority_sign_method": "total"}),
        ("ties", "ties_svd", {"majority_sign_method": "frequency"}),
        ("magnitude_prune", "magnitude_prune_svd", {}),
    ],
)
def test_elementwise_rules_match_peft_svd_merges(pair, method, peft_type, extra):
    base, u, s, inputs = pair
    rank = 32  # = max over modules of min(d_out, d_in): no truncation, so near-equal σ cannot swap directions
    merged = ours(inputs, method, density=0.4, max_rank=rank, **extra)
    reference = peft_merge(base, u, s, peft_type, density=0.4, svd_rank=rank, svd_full_matrices=False, **extra)
    assert set(merged) == set(reference)
    for name in merged:
        torch.testing.assert_close(merged[name], reference[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_and_rescaled(pair, method):
    _, _, _, inputs = pair
    name = next(iter(inputs))
    one = {n: inputs[n] for n in [name]}
    full_rank = min(one[name].shape)
    a, b = (ours(one, method, density=0.5, seed=3, max_rank=full_rank)[name] for _ in range(2))
    c = ours(one, method, density=0.5, seed=4, max_rank=full_rank)[name]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    if method == "dare_linear":
        # drop with p = 1 − density and rescale by 1/density: unbiased, so the seed average → linear merge
        mean = torch.stack([ours(one, method, density=0.5, seed=k, max_rank=full_rank)[name] for k in range(60)]).mean(
            0
        )
        linear = ours(one, "linear")[name]
        assert float(torch.linalg.norm(mean - linear) / torch.linalg.norm(linear)) < 0.2
        assert float(torch.linalg.norm(a - linear) / torch.linalg.norm(linear)) > 0.3


def test_svd_error_is_reported(pair):
    _, _, _, inputs = pair
    results = merge_modules(get_method("ties"), inputs, parse_params("ties", {"alphas": [1.0], "max_rank": 2}))[1.0]
    errors = [r.diagnostics["svd_rel_error"] for r in results.values()]
    assert all(0 < e < 1 for e in errors)
    assert all(r.factors.rank == 2 for r in results.values())
