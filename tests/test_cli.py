"""`sstmerge merge` exit codes and messages: 0 with a loadable output, 2 with one line for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from sstmerge_core.cli import main


@pytest.fixture
def args(tiny_llama, llama_adapters, merge_data, tmp_path):
    def build(*extra: str, base=None, safety=None, safety_data=None, out=None) -> list[str]:
        return [
            "merge",
            "--base",
            str(base or tiny_llama),
            "--utility",
            f"{llama_adapters['utility']}:0.5",
            "--safety",
            str(safety or llama_adapters["safety"]),
            "--utility-data",
            str(merge_data["utility"]),
            "--safety-data",
            str(safety_data or merge_data["safety"]),
            "--out",
            str(out or tmp_path / "out"),
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--max-length",
            "64",
            "--continuation-tokens",
            "4",
            *extra,
        ]

    return build


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_merge_succeeds_with_a_sweep(args, tmp_path, capsys):
    code, _ = run(args("--alpha", "0.5", "--alpha", "1.0", "--selection", "topk", "--k", "4"), capsys)
    assert code == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["params"]["k"] == 4 and report["params"]["selection"] == "topk"
    assert report["alphas"] == [0.5, 1.0]
    assert report["inputs"]["utility_adapters"][0]["weight"] == 0.5
    assert (tmp_path / "out" / "alpha-0.5" / "adapter_model.safetensors").is_file()


def bad_file(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("k0", "k"),
        ("nan_alpha", "finite"),
        ("foreign_flag", "--density does not apply to method sst"),
        ("empty_data", "no rows"),
        ("missing_column", "missing column 'prompt'"),
        ("latin1", "not UTF-8"),
        ("no_response", "response"),
        ("pickle", "refusing pickle"),
        ("missing_adapter", "not found"),
        ("wrong_base", "not found in the base model"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(case, expected, args, tmp_path, tiny_models, llama_adapters, capsys):
    argv = {
        "k0": lambda: args("--selection", "topk", "--k", "0"),
        "nan_alpha": lambda: args("--alpha", "nan"),
        "foreign_flag": lambda: args("--density", "0.3"),
        "empty_data": lambda: args(safety_data=bad_file(tmp_path, "e.jsonl", b"")),
        "missing_column": lambda: args(safety_data=bad_file(tmp_path, "m.jsonl", b'{"text": "x"}\n')),
        "latin1": lambda: args(
            safety_data=bad_file(tmp_path, "l.csv", "prompt,response\ncaf\xe9,no\n".encode("latin-1"))
        ),
        "no_response": lambda: args(safety_data=bad_file(tmp_path, "n.jsonl", b'{"prompt": "x"}\n')),
        "pickle": lambda: args(safety=_pickled(llama_adapters["safety"], tmp_path)),
        "missing_adapter": lambda: args(safety=tmp_path / "nowhere"),
        "wrong_base": lambda: args(base=tiny_models["gpt2"]),
    }[case]()
    code, err = run(argv, capsys)
    assert code == 2, err
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _pickled(adapter, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return folder


def test_existing_out_is_kept_unless_overwrite(args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run(args(), capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _ = run(args("--overwrite"), capsys)
    assert code == 0 and not (out / "precious.txt").exists() and (out / "alpha-1").is_dir()


def test_help_lists_every_method_parameter(capsys):
    code = main(["merge", "--help"])
    out = capsys.readouterr().out
    assert code == 0
    for flag in (
        "--selection",
        "--beta",
        "--k",
        "--k-in",
        "--utility-fisher",
        "--safety-fisher",
        "--density",
        "--majority-sign-method",
        "--max-rank",
        "--alpha",
        "--compare-with",
        "--evaluate",
    ):
        assert flag in out
