"""LoRA training (`sstmerge_core.training`, `sstmerge train-lora`) on tiny randomly initialised models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from sstmerge_core.data import Example
from sstmerge_core.errors import DatasetError, InputError
from sstmerge_core.modeling import load_base_model
from sstmerge_core.prompting import encode
from sstmerge_core.tiny import build_tiny_model
from sstmerge_core.training import collate, decoder_projection_names, mean_response_loss, train_lora

LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
EXAMPLES = [
    Example(f"chmod {o}{g}0 gives?", "rwxr-xr--" if o > g else "I cannot help with that.")
    for o in range(6)
    for g in range(4)
]
WEIGHTS = "adapter_model.safetensors"
FAST = dict(r=4, lora_alpha=8, epochs=4, lr=2e-2, batch_size=8, max_length=64, device="cpu", progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2")


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory) -> Path:
    return train_lora(str(llama), EXAMPLES, tmp_path_factory.mktemp("adapters") / "a", seed=0, **FAST)


def test_training_reduces_response_loss_and_peft_loads_the_folder(llama, trained):
    model, tokenizer = load_base_model(str(llama), device="cpu")
    before = mean_response_loss(model, tokenizer, EXAMPLES, max_length=64)
    adapted = PeftModel.from_pretrained(model, trained)
    after = mean_response_loss(adapted, tokenizer, EXAMPLES, max_length=64)
    # A random tiny model sits near the uniform loss ln(vocab) ≈ 6 and its small output head caps how far a
    # LoRA can move the logits, so the drop is modest; noise is orders of magnitude smaller.
    assert after < before - 0.3, (before, after)


def test_saved_config_names_the_base_and_every_decoder_projection(llama, trained):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama.resolve())
    assert set(config["target_modules"]) == LLAMA_PROJECTIONS
    assert config["fan_in_fan_out"] is False and config["r"] == 4
    assert (trained / WEIGHTS).is_file()


def test_same_seed_gives_identical_tensors_and_another_seed_differs(llama, trained, tmp_path):
    again = load_file(train_lora(str(llama), EXAMPLES, tmp_path / "again", seed=0, **FAST) / WEIGHTS)
    other = load_file(train_lora(str(llama), EXAMPLES, tmp_path / "other", seed=1, **FAST) / WEIGHTS)
    first = load_file(trained / WEIGHTS)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_target_modules_are_honoured(llama, tmp_path):
    folder = train_lora(
        str(llama), EXAMPLES[:8], tmp_path / "qv", target_modules=["q_proj", "v_proj"], **{**FAST, "epochs": 1}
    )
    modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in load_file(folder / WEIGHTS)}
    assert modules == {"q_proj", "v_proj"}
    assert set(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}


def test_unknown_target_module_is_an_input_error(llama, tmp_path):
    with pytest.raises(InputError, match="c_attn"):
        train_lora(str(llama), EXAMPLES[:8], tmp_path / "bad", target_modules=["c_attn"], **FAST)


def test_gpt2_conv1d_projections_are_detected_with_fan_in_fan_out(gpt2, tmp_path):
    model, _ = load_base_model(str(gpt2), device="cpu")
    assert set(decoder_projection_names(model)) == {"c_attn", "c_proj", "c_fc"}
    folder = train_lora(str(gpt2), EXAMPLES[:8], tmp_path / "gpt2", **{**FAST, "epochs": 1})
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    PeftModel.from_pretrained(model, folder)


def test_examples_without_response_are_refused(llama, tmp_path):
    with pytest.raises(DatasetError, match="response"):
        train_lora(str(llama), [Example("hello")], tmp_path / "none", **FAST)


def test_collate_scores_response_tokens_only(llama):
    _, tokenizer = load_base_model(str(llama), device="cpu")
    short, long = (encode(tokenizer, "hi", "yes", 64), encode(tokenizer, "chmod 754 gives?", "rwxr-xr--", 64))
    batch = collate([short, long], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    padding = len(long.input_ids) - len(short.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * padding
    scored = batch["labels"][0] != -100
    assert scored.nonzero().flatten().tolist() == list(range(short.response_start, len(short.input_ids)))


def test_cli_refuses_a_file_without_response_column_with_exit_2(llama, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "How do I kill a Python process?"}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sstmerge_core.cli",
            "train-lora",
            "--base",
            str(llama),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "response" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
