"""Depth schedules: α_ℓ by layer against the formulas, and exact per-module merges that PEFT loads back."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import load_adapter, save_adapter
from sstmerge_core.merge import WeightedAdapter, merge_modules, module_inputs
from sstmerge_core.methods.catalog import parse_params
from sstmerge_core.methods.registry import get_method
from sstmerge_core.schedules import ScheduleParams, layer_index, module_kind
from sstmerge_core.tiny import build_tiny_model, random_lora

LAYERS = 4


def test_layer_index_and_kind_across_families():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("transformer.h.3.mlp.c_fc") == 3
    assert layer_index("model.embed_tokens") is None and layer_index("lm_head") is None
    assert module_kind("model.layers.0.self_attn.o_proj") == "attention"
    assert module_kind("transformer.h.3.attn.c_attn") == "attention"
    assert module_kind("model.layers.0.mlp.down_proj") == "mlp"
    assert module_kind("model.embed_tokens") is None


def test_module_alpha_follows_the_formulas():
    linear = ScheduleParams(schedule="linear", schedule_gamma=0.9)
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.mlp.up_proj"
        assert linear.module_alpha(1.5, name, LAYERS) == pytest.approx(1.5 + 0.9 * layer / (LAYERS - 1))
    groups = ScheduleParams(schedule="groups", schedule_groups=[0.0, 2.0], schedule_mlp_groups=[1.0, 0.5])
    assert [groups.module_alpha(2.0, f"model.layers.{i}.self_attn.q_proj", LAYERS) for i in range(LAYERS)] == [
        0.0,
        0.0,
        4.0,
        4.0,
    ]
    assert [groups.module_alpha(2.0, f"model.layers.{i}.mlp.up_proj", LAYERS) for i in range(LAYERS)] == [
        2.0,
        2.0,
        1.0,
        1.0,
    ]
    assert groups.module_alpha(2.0, "model.embed_tokens", LAYERS) == 2.0  # outside the layers: α
    with pytest.raises(ValueError, match="outside"):
        groups.module_alpha(1.0, "model.layers.9.mlp.up_proj", LAYERS)


@pytest.mark.parametrize(
    "bad",
    [
        {"schedule": "groups"},
        {"schedule": "linear", "schedule_groups": [1.0]},
        {"schedule": "constant", "schedule_gamma": 0.5},
        {"schedule": "groups", "schedule_groups": [float("inf")]},
        {"schedule": "linear", "schedule_gamma": 1e6},
    ],
)
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValidationError):
        parse_params("linear", bad)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    base = build_tiny_model("llama", root / "base", layers=LAYERS)
    u = random_lora(base, root / "u", seed=1, r=4)
    s = random_lora(base, root / "s", seed=2, r=3)
    inputs = module_inputs([WeightedAdapter(load_adapter(u))], [WeightedAdapter(load_adapter(s))])
    return base, inputs


@pytest.mark.parametrize(
    "schedule",
    [
        {"schedule": "linear", "schedule_gamma": -0.8},
        {"schedule": "groups", "schedule_groups": [0.25, 1.0], "schedule_mlp_groups": [2.0, 0.0]},
    ],
)
def test_scheduled_linear_merge_is_exact_per_module_and_loads_in_peft(four_layers, schedule, tmp_path):
    base, inputs = four_layers
    params = parse_params("linear", {"alphas": [1.2], **schedule})
    results = merge_modules(get_method("linear"), inputs, params, num_layers=LAYERS)[1.2]
    expected = {}
    for name, m in inputs.items():
        alpha = params.module_alpha(1.2, name, LAYERS)
        expected[name] = m.utility_delta() + alpha * m.safety.delta().double()
        torch.testing.assert_close(results[name].factors.delta().double(), expected[name], rtol=1e-5, atol=1e-6)
    save_adapter(tmp_path / "merged", {n: r.factors for n, r in results.items()}, base_model=str(base))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "merged")
    for name, delta in expected.items():
        reloaded = peft.base_model.model.get_submodule(name).get_delta_weight("default").double()
        torch.testing.assert_close(reloaded, delta, rtol=1e-4, atol=1e-5)


def test_scheduled_sst_equals_sst_at_each_modules_own_alpha(four_layers):
    """SST (soft rule, on given Fisher factors) with a schedule = SST of each module at its own α_ℓ."""
    from sstmerge_core.methods.base import FisherFactors

    _, inputs = four_layers
    torch.manual_seed(0)
    fisher = {}
    for name, m in inputs.items():
        R_in = torch.linalg.qr(m.safety.A.T.double())[0]
        R_out = torch.linalg.qr(m.safety.B.double())[0]

        def spd(n):
            x = torch.randn(n, n, dtype=torch.float64)
            return x @ x.T + n * torch.eye(n, dtype=torch.float64)

        fisher[name] = FisherFactors(R_in, R_out, spd(3), spd(3), spd(3), spd(3))
    schedule = {"schedule": "linear", "schedule_gamma": 1.0}
    scheduled = merge_modules(
        get_method("sst"), inputs, parse_params("sst", {"alphas": [0.5], **schedule}), fisher, num_layers=LAYERS
    )[0.5]
    params = parse_params("sst", {"alphas": [0.5], **schedule})
    for name in inputs:
        alpha = params.module_alpha(0.5, name, LAYERS)
        single = merge_modules(
            get_method("sst"), {name: inputs[name]}, parse_params("sst", {"alphas": [alpha]}), {name: fisher[name]}
        )[alpha][name]
        torch.testing.assert_close(scheduled[name].factors.delta(), single.factors.delta())


def test_a_schedule_needs_the_number_of_layers(four_layers):
    _, inputs = four_layers
    params = parse_params("linear", {"schedule": "linear", "schedule_gamma": 0.5})
    with pytest.raises(ValueError, match="number of layers"):
        merge_modules(get_method("linear"), inputs, params)
