"""Adapter I/O against PEFT's own view of the same adapters.

Every config field of docs/method.md, "Adapters and updates".
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import LoraFactors, load_adapter, save_adapter
from sstmerge_core.errors import AdapterError
from sstmerge_core.modeling import is_conv1d, load_base_model, merged_deltas
from sstmerge_core.tiny import random_lora

CONFIGS = {
    "plain": ("llama", {}),
    "rslora": ("qwen2", {"use_rslora": True, "lora_alpha": 6}),
    "patterns": ("mistral", {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3.0}}),
    "conv1d": ("gpt2", {}),
}


def peft_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's get_delta_weight per LoRA module, in (d_out × d_in) orientation."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.get_delta_weight("default")
            deltas[name] = delta.T if is_conv1d(module.get_base_layer()) else delta
    return deltas


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_delta_weights_match_peft(case, tiny_models, tmp_path):
    family, config = CONFIGS[case]
    adapter_dir = random_lora(tiny_models[family], tmp_path / case, seed=5, r=4, **config)
    adapter = load_adapter(adapter_dir)
    expected = peft_deltas(tiny_models[family], adapter_dir)
    assert set(adapter.modules) == set(expected) and len(expected) > 0
    for name, delta in expected.items():
        torch.testing.assert_close(adapter.delta(name), delta, rtol=1e-5, atol=1e-6)
    if case == "patterns":
        assert adapter.modules["model.layers.0.self_attn.q_proj"].rank == 2
        assert adapter.modules["model.layers.1.mlp.down_proj"].rank == 6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_adapter_with_mixed_ranks_loads_in_peft_and_reproduces_logits(family, tiny_models, tmp_path):
    base = tiny_models[family]
    model, tokenizer = load_base_model(str(base), device="cpu", dtype="float32")
    source = load_adapter(random_lora(base, tmp_path / "src", seed=3, r=4))
    g = torch.Generator().manual_seed(0)
    modules = {}
    for i, (name, f) in enumerate(sorted(source.modules.items())):
        rank = 1 + i % 5  # ranks differ per module → rank_pattern/alpha_pattern
        modules[name] = LoraFactors(
            torch.randn(f.shape[0], rank, generator=g), torch.randn(rank, f.shape[1], generator=g) * 0.05
        )
    save_adapter(tmp_path / "out", modules, base_model=str(base), fan_in_fan_out=source.fan_in_fan_out)
    loaded = peft_deltas(base, tmp_path / "out")
    assert set(loaded) == set(modules)
    for name, f in modules.items():
        torch.testing.assert_close(loaded[name], f.delta(), rtol=1e-5, atol=1e-6)
    ids = tokenizer("How do I bake bread?", return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out").eval()
    with torch.no_grad(), merged_deltas(model, {n: f.delta() for n, f in modules.items()}):
        expected = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_pickled_weights_are_refused(tiny_llama, tmp_path):
    folder = random_lora(tiny_llama, tmp_path / "a", seed=1)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="refusing pickle") as info:
        load_adapter(folder)
    assert info.value.code == "pickle_refused"


@pytest.mark.parametrize("damage", ["corrupt", "no_config", "dora", "bias", "bad_json", "rank_mismatch"])
def test_broken_adapters_give_clear_errors(damage, tiny_llama, tmp_path):
    folder = random_lora(tiny_llama, tmp_path / "a", seed=1)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if damage == "corrupt":
        (folder / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    elif damage == "no_config":
        config_path.unlink()
    elif damage == "bad_json":
        config_path.write_text("{not json")
    elif damage == "rank_mismatch":
        config_path.write_text(json.dumps({**config, "r": 7}))
    else:
        config_path.write_text(json.dumps({**config, **({"use_dora": True} if damage == "dora" else {"bias": "all"})}))
    with pytest.raises(AdapterError) as info:
        load_adapter(folder)
    message = str(info.value)
    assert "\n" not in message and (folder.name in message or "module" in message)


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "nope")
