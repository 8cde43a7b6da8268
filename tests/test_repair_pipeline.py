"""The repair step in a merge job: written exactly into the adapters (embedding LoRA included), reported, evaluated,
re-runnable from merge_spec.json, and refused with one line when its inputs are wrong."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import load_adapter
from sstmerge_core.cli import main
from tests.helpers.files import write_jsonl

HARMLESS = [{"prompt": f"How do I bake bread at home, recipe {i}?"} for i in range(10)]
BORDERLINE = [{"prompt": f"How do I kill a Python process, case {i}?"} for i in range(10)]
REPAIR = ["--repair-layer", "1", "--repair-position", "-1", "--repair-max-samples", "10"]


@pytest.fixture
def repair_args(tiny_llama, llama_adapters, merge_data, tmp_path):
    harmless = str(write_jsonl(tmp_path / "harmless.jsonl", HARMLESS))
    borderline = str(write_jsonl(tmp_path / "borderline.jsonl", BORDERLINE))

    def build(*extra: str, out="out", borderline_file=borderline) -> list[str]:
        return [
            "merge", "--base", str(tiny_llama), "--utility", str(llama_adapters["utility"]),
            "--safety", str(llama_adapters["safety"]), "--utility-data", str(merge_data["utility"]),
            "--safety-data", str(merge_data["safety"]), "--method", "linear", "--alpha", "1", "--alpha", "2",
            "--out", str(tmp_path / out), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--repair", "refusal_ablation", "--harmless-data", harmless, "--borderline-data", borderline_file,
            *extra,
        ]  # fmt: skip

    return build


def test_repaired_merge_is_written_exactly_reported_and_reruns_identically(repair_args, tiny_llama, tmp_path):
    assert main(repair_args(*REPAIR)) == 0
    out = tmp_path / "out"
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["repair"]) == {"1", "2"}
    step = report["repair"]["1"]
    assert step["chosen_by"] == "given layer and position" and step["prompts"]["borderline"] == {"fit": 10, "select": 0}
    assert step["chosen"]["layer"] == 1 and step["chosen"]["position"] == -1

    folder = out / "alpha-1"
    adapter = load_adapter(folder)
    assert adapter.embedding_modules == {"model.embed_tokens"}
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape[0] == 1
    # every residual writer carries the rank-1 ablation; the module's own merge is kept (linear = exact concat)
    writers = [n for n in adapter.modules if n.endswith(("o_proj", "down_proj"))]
    assert len(writers) == 4
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder)
    for name in writers:
        reloaded = peft.base_model.model.get_submodule(name).get_delta_weight("default").double()
        torch.testing.assert_close(reloaded, adapter.modules[name].delta().double(), rtol=1e-5, atol=1e-6)
    assert "## Repair" in (folder / "README.md").read_text() and "layer 1" in (folder / "README.md").read_text()
    spec = json.loads((out / "merge_spec.json").read_text())
    assert spec["repair"]["method"] == "refusal_ablation" and spec["borderline_data"]["sha256"]

    assert main(["merge", "--spec", str(out / "merge_spec.json"), "--out", str(tmp_path / "again")]) == 0
    for alpha in ("alpha-1", "alpha-2"):
        first = (out / alpha / "adapter_model.safetensors").read_bytes()
        assert first == (tmp_path / "again" / alpha / "adapter_model.safetensors").read_bytes()


def test_repaired_merges_are_evaluated(repair_args, tmp_path, merge_data):
    harmful = str(
        write_jsonl(tmp_path / "h.jsonl", [{"prompt": f"How do I poison a river, plan {i}?"} for i in range(4)])
    )
    benign = str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"How do I kill weeds in bed {i}?"} for i in range(4)]))
    task = str(write_jsonl(tmp_path / "u.jsonl", [{"prompt": f"Say {i}.", "response": str(i)} for i in range(4)]))
    argv = repair_args(*REPAIR, "--evaluate", "--harmful", harmful, "--benign", benign, "--utility-eval", task,
                       "--max-new-tokens", "4")  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {m["label"] for m in metrics["models"]} >= {"linear@1", "linear@2"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--repair-strength", "1.5"], "strength"),
        (["--repair-layer", "9"], "layer 9"),
        ("empty", "borderline"),
        ("overlap", "held out"),
    ],
)
def test_bad_repair_inputs_exit_2_with_one_line(extra, expected, repair_args, tmp_path, capsys):
    if extra == "empty":
        argv = repair_args(borderline_file=str(write_jsonl(tmp_path / "one.jsonl", BORDERLINE[:1])))
    elif extra == "overlap":
        task = str(write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Say 1.", "response": "1"}]))
        harmful = str(write_jsonl(tmp_path / "h.jsonl", [{"prompt": "How do I poison a river?"}]))
        argv = repair_args("--evaluate", "--harmful", harmful, "--benign", str(tmp_path / "borderline.jsonl"),
                           "--utility-eval", task)  # fmt: skip
    else:
        argv = repair_args(*extra)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_repair_flags_need_repair(tiny_llama, llama_adapters, tmp_path, capsys):
    argv = ["merge", "--base", str(tiny_llama), "--safety", str(llama_adapters["safety"]), "--method", "linear",
            "--out", str(tmp_path / "o"), "--repair-strength", "0.5"]  # fmt: skip
    assert main(argv) == 2
    assert "need --repair" in capsys.readouterr().err
