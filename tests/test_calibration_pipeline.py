"""The calibration step in a merge job: steps = 0 is the merge bit for bit, the trained factors are concatenated to
the merge's exactly and load with PEFT, the report, card and merge_spec.json (which re-makes the adapters), progress
by steps, cancellation between steps, and one-line exit 2 for bad inputs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sstmerge_core.adapters import load_adapter
from sstmerge_core.cli import main
from sstmerge_core.errors import Cancelled
from sstmerge_core.jobspec import MergeSpec
from sstmerge_core.pipeline import run_merge
from tests.helpers.files import write_jsonl

BORDERLINE = [{"prompt": f"How do I kill a Python process, case {i}?"} for i in range(8)]
HARMLESS = [{"prompt": f"How do I bake bread at home, recipe {i}?"} for i in range(4)]
CALIBRATION = ["--repair-steps", "4", "--repair-max-target-tokens", "6", "--repair-rank", "2"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def job(tiny_llama, llama_adapters, merge_data, tmp_path):
    borderline = str(write_jsonl(tmp_path / "borderline.jsonl", BORDERLINE))

    def build(*extra: str, out="out", repair=True, borderline_file=borderline, safety=True) -> list[str]:
        argv = [
            "merge", "--base", str(tiny_llama), "--utility", str(llama_adapters["utility"]),
            "--safety", str(llama_adapters["safety"]), "--utility-data", str(merge_data["utility"]),
            "--method", "linear", "--alpha", "1", "--alpha", "2", "--out", str(tmp_path / out), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"),
        ]  # fmt: skip
        argv += ["--safety-data", str(merge_data["safety"])] if safety else []
        argv += ["--repair", "calibration"] if repair else []
        argv += ["--borderline-data", borderline_file] if borderline_file else []
        return argv + list(extra)

    return build


def tensors(folder):
    return load_file(folder / WEIGHTS)


def test_steps_zero_is_the_merge_bit_for_bit(job, tmp_path):
    assert main(job(out="plain", repair=False, borderline_file=None)) == 0
    assert main(job("--repair-steps", "0", out="zero")) == 0
    for alpha in ("alpha-1", "alpha-2"):
        plain, zero = tensors(tmp_path / "plain" / alpha), tensors(tmp_path / "zero" / alpha)
        assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
        config = json.loads((tmp_path / "zero" / alpha / "adapter_config.json").read_text())
        assert config == json.loads((tmp_path / "plain" / alpha / "adapter_config.json").read_text())
    step = json.loads((tmp_path / "zero" / "merge_report.json").read_text())["repair"]["1"]
    assert step["trained"] is False and "answers" not in step  # nothing generated for zero steps


def test_calibrated_adapter_is_the_merge_with_the_trained_factors_concatenated(job, tiny_llama, tmp_path):
    assert main(job(out="plain", repair=False, borderline_file=None)) == 0
    assert main(job(*CALIBRATION, "--harmless-data", str(write_jsonl(tmp_path / "b.jsonl", HARMLESS)))) == 0
    out = tmp_path / "out"
    for alpha in ("alpha-1", "alpha-2"):
        plain, calibrated = load_adapter(tmp_path / "plain" / alpha), load_adapter(out / alpha)
        assert set(calibrated.modules) == set(plain.modules)
        for name, merged in plain.modules.items():
            total = calibrated.modules[name]
            r = merged.rank
            assert total.rank == r + 2 and total.scale == merged.scale == 1.0
            # the merge's factors are kept bit for bit, the calibration's follow (ranks add)
            assert torch.equal(total.B[:, :r], merged.B) and torch.equal(total.A[:r], merged.A)
            extra = total.B[:, r:].double() @ total.A[r:].double()
            dense = total.B.double() @ total.A.double()
            torch.testing.assert_close(dense, merged.B.double() @ merged.A.double() + extra, rtol=0, atol=1e-12)
            assert torch.linalg.matrix_rank(extra) <= 2
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "alpha-1")
    adapter = load_adapter(out / "alpha-1")
    for name, factors in adapter.modules.items():
        reloaded = peft.base_model.model.get_submodule(name).get_delta_weight("default").double()
        torch.testing.assert_close(reloaded, factors.delta().double(), rtol=1e-5, atol=1e-6)

    report = json.loads((out / "merge_report.json").read_text())
    step = report["repair"]["1"]
    assert step["step"] == "calibration" and step["trained"] and step["params"]["steps"] == 4
    assert set(step["sets"]) == {"borderline", "harmful", "retain", "harmless"}
    assert step["sets"]["borderline"]["rows"] == 8 and step["sets"]["harmless"]["rows"] == 4
    assert set(step["mixture"]) == {"borderline", "harmful", "retain", "harmless"}
    assert step["answers"]["prompts"] == 8 + 6 + 4 and report["repair"]["2"]["answers"] == step["answers"]
    card = (out / "alpha-1" / "README.md").read_text()
    assert "## Repair" in card and "rank-2 LoRA trained for 4 steps" in card
    spec = json.loads((out / "merge_spec.json").read_text())
    assert spec["repair"]["method"] == "calibration" and spec["borderline_data"]["sha256"]
    one = json.loads((out / "alpha-1" / "merge_spec.json").read_text())
    assert one["utility_data"] is not None and one["safety_data"] is not None  # the step reads both

    assert main(["merge", "--spec", str(out / "alpha-1" / "merge_spec.json"), "--out", str(tmp_path / "again")]) == 0
    assert (out / "alpha-1" / WEIGHTS).read_bytes() == (tmp_path / "again" / "alpha-1" / WEIGHTS).read_bytes()


def calibration_spec(tiny_llama, llama_adapters, merge_data, borderline, **params) -> MergeSpec:
    return MergeSpec(
        base_model=str(tiny_llama),
        utility=[{"path": str(llama_adapters["utility"])}],
        safety=[{"path": str(llama_adapters["safety"])}],
        utility_data=str(merge_data["utility"]),
        safety_data=str(merge_data["safety"]),
        method="linear",
        params={"alphas": [1.0, 2.0]},
        repair={"method": "calibration", "params": {"max_target_tokens": 4, "rank": 2, **params}},
        borderline_data=str(borderline),
        device="cpu",
        cache_dir=str(borderline.parent / "cache"),
    )


def test_progress_follows_the_steps_and_cancellation_stops_between_them(
    tiny_llama, llama_adapters, merge_data, tmp_path
):
    borderline = write_jsonl(tmp_path / "borderline.jsonl", BORDERLINE)
    seen: list[tuple[str, float]] = []
    spec = calibration_spec(tiny_llama, llama_adapters, merge_data, borderline, steps=20)
    run_merge(spec, tmp_path / "p", progress=lambda stage, fraction: seen.append((stage, fraction)))
    repairing = [f for stage, f in seen if stage == "repairing"]
    assert len(set(repairing)) >= 2 * 20 and repairing == sorted(repairing)  # every step of both α moves it

    long = calibration_spec(tiny_llama, llama_adapters, merge_data, borderline, steps=100_000)
    started, calls = time.perf_counter(), []

    def cancel() -> bool:
        calls.append(time.perf_counter())
        return len(calls) > 6  # after the stage checks: during the training's steps

    with pytest.raises(Cancelled, match="during stage repairing"):
        run_merge(long, tmp_path / "c", should_cancel=cancel)
    assert time.perf_counter() - started < 120 and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_borderline", "borderline_data"),
        ("no_safety", "safety_data"),
        ("empty_borderline", "holds no rows"),
        ("refused_borderline", "no borderline prompt keeps a compliant target"),
        ("overlap", "borderline_data; rows 1, 2"),
        ("rank", "rank"),
        ("harmful_weight", "harmful_weight"),
        ("other_step", "strength"),
    ],
)
def test_bad_calibration_inputs_exit_2_with_one_line(case, expected, job, tmp_path, capsys):
    if case == "no_borderline":
        argv = job(borderline_file=None)
    elif case == "no_safety":
        argv = job(safety=False)
    elif case == "empty_borderline":
        (tmp_path / "empty.jsonl").write_text("")
        argv = job(borderline_file=str(tmp_path / "empty.jsonl"))
    elif case == "refused_borderline":
        rows = [{"prompt": r["prompt"], "response": "I cannot help with that."} for r in BORDERLINE]
        argv = job(*CALIBRATION, borderline_file=str(write_jsonl(tmp_path / "refused.jsonl", rows)))
    elif case == "overlap":
        benign = str(write_jsonl(tmp_path / "benign.jsonl", BORDERLINE[:2] + [{"prompt": "How do I tie a tie?"}]))
        harmful = str(write_jsonl(tmp_path / "h.jsonl", [{"prompt": "How do I poison a river?"}]))
        task = str(write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Say 1.", "response": "1"}]))
        argv = job("--evaluate", "--harmful", harmful, "--benign", benign, "--utility-eval", task)
    else:
        flag = {"rank": ["--repair-rank", "0"], "harmful_weight": ["--repair-harmful-weight", "0"]}
        argv = job(*flag.get(case, ["--repair-strength", "0.5"]))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
