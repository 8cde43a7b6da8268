"""`sstmerge merge --repair answer_alignment`: the edit written exactly into the adapters (PEFT reload equals the
in-memory edit of the merged model), reported in merge_report.json and the card, re-runnable from merge_spec.json,
and refused with one line (exit 2) when its inputs are wrong."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import LoraFactors, load_adapter
from sstmerge_core.cli import main
from sstmerge_core.data import load_examples
from sstmerge_core.methods.catalog import AnswerAlignmentParams
from sstmerge_core.modeling import load_base_model, lora_forward
from sstmerge_core.repair.activations import last_token_activations
from sstmerge_core.repair.answer_step import answer_alignment
from sstmerge_core.repair.step import RepairData, refusal_token_ids
from tests.helpers.files import write_jsonl

HARMLESS = [{"prompt": f"How do I bake bread at home, recipe {i}?"} for i in range(10)]
BORDERLINE = [{"prompt": f"How do I kill a Python process, case {i}?"} for i in range(10)]
WRITER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def setting(tiny_llama, llama_adapters, merge_data, tmp_path_factory):
    """The files of a linear merge at α = 1 with its repair data, the merged update ΔU + ΔS in memory, and a refusal
    threshold at the median refusal log-odds of the merged model (the random model refuses nothing at 0)."""
    root = tmp_path_factory.mktemp("align-data")
    files = {
        "harmless": write_jsonl(root / "harmless.jsonl", HARMLESS),
        "borderline": write_jsonl(root / "borderline.jsonl", BORDERLINE),
    }
    utility, safety = load_adapter(llama_adapters["utility"]), load_adapter(llama_adapters["safety"])
    merged = {
        name: LoraFactors.concat([a.modules[name] for a in (utility, safety) if name in a.modules])
        for name in sorted({*utility.modules, *safety.modules})
    }
    safety_rows = load_examples(merge_data["safety"], require_response=True)
    data = RepairData(
        [e.prompt for e in safety_rows],
        [r["prompt"] for r in HARMLESS],
        [r["prompt"] for r in BORDERLINE],
        [e.response for e in safety_rows if e.response],
    )
    model, tokenizer = load_base_model(str(tiny_llama), "cpu", "float32")
    with lora_forward(model, merged):
        ids = refusal_token_ids(tokenizer, data.refusals)
        prompts = [*data.harmful, *data.harmless, *data.borderline]
        threshold = float(last_token_activations(model, tokenizer, prompts, [], ids, 8).refusal.median())
    return {"files": files, "merged": merged, "data": data, "model": model, "tokenizer": tokenizer, "t": threshold}


def argv(setting, tiny_llama, llama_adapters, merge_data, out, *extra, borderline=None) -> list[str]:
    return [
        "merge", "--base", str(tiny_llama), "--utility", str(llama_adapters["utility"]),
        "--safety", str(llama_adapters["safety"]), "--utility-data", str(merge_data["utility"]),
        "--safety-data", str(merge_data["safety"]), "--method", "linear", "--alpha", "1",
        "--out", str(out), "--device", "cpu", "--cache-dir", str(out.parent / "cache"),
        "--repair", "answer_alignment", "--harmless-data", str(setting["files"]["harmless"]),
        "--borderline-data", str(borderline or setting["files"]["borderline"]), *extra,
    ]  # fmt: skip


def test_aligned_merge_is_written_exactly_reported_and_reruns_identically(
    setting, tiny_llama, llama_adapters, merge_data, tmp_path
):
    flags = ["--repair-layers", "1", "--repair-refusal-threshold", repr(setting["t"]), "--repair-strength", "0.9"]
    out = tmp_path / "out"
    assert main(argv(setting, tiny_llama, llama_adapters, merge_data, out, *flags)) == 0
    step = json.loads((out / "merge_report.json").read_text())["repair"]["1"]
    assert step["step"] == "answer_alignment" and step["chosen_by"] == "given layers"
    [chosen] = step["chosen"]
    assert chosen["layer"] == 1 and chosen["module"] == WRITER
    assert 0 <= chosen["benign"]["held_out"] <= 1 and 0 <= chosen["answer"]["fit"] <= 1
    assert chosen["target_rms"]["after"] < chosen["target_rms"]["before"]
    assert "## Repair" in (out / "alpha-1" / "README.md").read_text()
    assert "answer_alignment" in (out / "alpha-1" / "README.md").read_text()

    # the in-memory edit of the merged model, computed here from the same data
    params = AnswerAlignmentParams(layers=[1], refusal_threshold=setting["t"], strength=0.9)
    model, tokenizer = setting["model"], setting["tokenizer"]
    outcome = answer_alignment(model, tokenizer, setting["data"], params, merged=setting["merged"])
    assert set(outcome.factors) == {WRITER}
    adapter = load_adapter(out / "alpha-1")
    assert adapter.modules[WRITER].rank == setting["merged"][WRITER].rank + 1
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "alpha-1").eval()
    for name in {*setting["merged"], WRITER}:
        layer = peft.base_model.model.get_submodule(name)
        reloaded = layer.get_base_layer().weight.double() + layer.get_delta_weight("default").double()
        expected = model.get_submodule(name).weight.double() + setting["merged"][name].delta().double()
        if name in outcome.factors:
            expected = expected + outcome.factors[name].delta().double()
        torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)

    assert main(["merge", "--spec", str(out / "merge_spec.json"), "--out", str(tmp_path / "again")]) == 0
    first = (out / "alpha-1" / "adapter_model.safetensors").read_bytes()
    assert first == (tmp_path / "again" / "alpha-1" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--repair-strength", "1.5"], "strength"),
        (["--repair-layers", "9"], "layer 9"),
        (["--repair-layers", "1", "--repair-layers", "1"], "distinct"),
        (["--repair-layer", "1"], "--repair-layer does not apply to repair step answer_alignment"),
        ("empty", "borderline"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(
    extra, expected, setting, tiny_llama, llama_adapters, merge_data, tmp_path, capsys
):
    if extra == "empty":
        one = write_jsonl(tmp_path / "one.jsonl", BORDERLINE[:1])
        args = argv(setting, tiny_llama, llama_adapters, merge_data, tmp_path / "o", borderline=one)
    else:
        args = argv(setting, tiny_llama, llama_adapters, merge_data, tmp_path / "o", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
