"""The torch-free adapter rules (`sstmerge_core.adapter_format`) are the worker's rules: every folder the upload
check refuses, `load_adapter` refuses with the same message, and what one accepts the other loads. Also: the
byte-level finite check against torch.isfinite, PEFT's pattern lookup, bounded JSON, the dataset row rules shared
by the upload scan and the worker's loader, and the writer's finite check of merged updates."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sstmerge_core import adapter_format as fmt
from sstmerge_core.adapters import LoraFactors, load_adapter, save_adapter
from sstmerge_core.data import load_examples, scan_rows
from sstmerge_core.errors import AdapterError, DatasetError, InputError
from sstmerge_core.stages.writing import FLOAT32_MAX, check_finite
from sstmerge_core.untrusted import UntrustedValueError, loads
from tests.helpers.files import safetensors_bytes

MODULE = "model.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"base_model.model.{MODULE}.lora_A.weight", f"base_model.model.{MODULE}.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}


def factors(rank: int = 2, d: int = 8, dtype: str = "F32", np_dtype=np.float32) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        A_KEY: (dtype, rng.standard_normal((rank, d)).astype(np_dtype)),
        B_KEY: (dtype, rng.standard_normal((d, rank)).astype(np_dtype)),
    }


def write_folder(folder: Path, config: dict | str | bytes = CONFIG, weights: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = config if isinstance(config, str | bytes) else json.dumps(config)
    (folder / fmt.CONFIG_NAME).write_bytes(raw.encode() if isinstance(raw, str) else raw)
    (folder / fmt.WEIGHTS_NAME).write_bytes(safetensors_bytes(factors()) if weights is None else weights)
    return folder


def first(header: dict) -> dict:
    return header[next(iter(header))]


def with_value(index: int, value: float, dtype: str = "F32", np_dtype=np.float32) -> bytes:
    tensors = factors(dtype=dtype, np_dtype=np_dtype)
    tensors[B_KEY][1].reshape(-1)[index] = value
    return safetensors_bytes(tensors)


def bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (truncated)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


BAD_FOLDERS = {
    # config: types and ranges
    "r_zero": ({**CONFIG, "r": 0}, None, "r must be an integer"),
    "r_2_pow_31": ({**CONFIG, "r": 2**31}, None, "r must be an integer"),
    "r_float": ({**CONFIG, "r": 2.5}, None, "r must be an integer"),
    "r_bool": ({**CONFIG, "r": True}, None, "r must be an integer"),
    "alpha_nan": (json.dumps(CONFIG).replace('"lora_alpha": 4', '"lora_alpha": NaN'), None, "NaN"),
    "alpha_1e400": (json.dumps(CONFIG).replace('"lora_alpha": 4', '"lora_alpha": 1e400'), None, "out of range"),
    "alpha_huge": ({**CONFIG, "lora_alpha": 1e300}, None, "lora_alpha must be a finite number"),
    "alpha_text": ({**CONFIG, "lora_alpha": "16"}, None, "lora_alpha must be a finite number"),
    "targets_ints": ({**CONFIG, "target_modules": [1, 2]}, None, "target_modules"),
    "targets_object": ({**CONFIG, "target_modules": {"a": 1}}, None, "target_modules"),
    "target_with_nul": ({**CONFIG, "target_modules": ["q\x00proj"]}, None, "target_modules"),
    "rslora_text": ({**CONFIG, "use_rslora": "yes"}, None, "use_rslora must be true or false"),
    "rank_pattern_negative": ({**CONFIG, "rank_pattern": {"q_proj": -1}}, None, "rank_pattern"),
    "rank_pattern_quantifier": ({**CONFIG, "rank_pattern": {"(a+)+$": 2}}, None, "without quantifiers"),
    "rank_pattern_bad_regex": ({**CONFIG, "rank_pattern": {"q_proj(": 2}}, None, "not a valid regex"),
    "rank_pattern_mismatch": ({**CONFIG, "rank_pattern": {"q_proj": 4}}, None, "says 4"),
    "alpha_pattern_nan": (
        json.dumps({**CONFIG, "alpha_pattern": {"q_proj": 1}}).replace('"q_proj": 1', '"q_proj": NaN'),
        None,
        "NaN",
    ),
    "hint_too_long": ({**CONFIG, "base_model_name_or_path": "m" * 600}, None, "base_model_name_or_path"),
    "config_deep": ('{"peft_type": "LORA", "x": ' + "[" * 5000 + "]" * 5000 + "}", None, "nested deeper"),
    "config_big_int": ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", None, "digits"),
    "config_not_object": ("[1, 2]", None, "must be a JSON object"),
    "config_too_large": ({**CONFIG, "pad": "x" * (fmt.MAX_CONFIG_BYTES + 1)}, None, "larger than"),
    "dora": ({**CONFIG, "use_dora": True}, None, "DoRA"),
    # safetensors header: dtypes, offsets, sizes
    "dtype_int": (CONFIG, safetensors_bytes(factors(dtype="I32", np_dtype=np.int32)), "has dtype 'I32'"),
    "dtype_lies": (CONFIG, safetensors_bytes(factors(dtype="F16", np_dtype=np.float32)), "spans"),
    "float_offsets": (
        CONFIG,
        safetensors_bytes(factors(), lambda h: first(h).update(data_offsets=[0.0, 64.0])),
        "data_offsets",
    ),
    "text_offsets": (
        CONFIG,
        safetensors_bytes(factors(), lambda h: first(h).update(data_offsets=["0", "a"])),
        "data_offsets",
    ),
    "float_shape": (CONFIG, safetensors_bytes(factors(), lambda h: first(h).update(shape=[2.0, 8])), "shape"),
    "overlap": (CONFIG, safetensors_bytes(factors(), lambda h: h[B_KEY].update(data_offsets=[0, 64])), "overlaps"),
    "trailing_bytes": (CONFIG, safetensors_bytes(factors(), data_suffix=b"\0" * 8), "trailing bytes"),
    "metadata_not_text": (
        CONFIG,
        safetensors_bytes(factors(), lambda h: h.update(__metadata__={"format": 1})),
        "__metadata__",
    ),
    "header_not_json": (CONFIG, struct.pack("<Q", 4) + b"{oop", "header"),
    "header_length_huge": (CONFIG, struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    # names and shapes
    "unknown_tensor": (
        CONFIG,
        safetensors_bytes({**factors(), "extra.weight": ("F32", np.zeros(2, np.float32))}),
        "unexpected tensor",
    ),
    "rank_zero_tensors": (
        CONFIG,
        safetensors_bytes({A_KEY: ("F32", np.zeros((0, 8), np.float32)), B_KEY: ("F32", np.zeros((8, 0), np.float32))}),
        "rank must be in",
    ),
    "not_b_a": (
        CONFIG,
        safetensors_bytes({A_KEY: ("F32", np.zeros((2, 8), np.float32)), B_KEY: ("F32", np.zeros((8, 3), np.float32))}),
        "do not form B·A",
    ),
    # values
    "nan_f32": (CONFIG, with_value(5, np.nan), "non-finite"),
    "inf_f32_last": (CONFIG, with_value(-1, -np.inf), "non-finite"),
    "inf_f16": (CONFIG, with_value(3, np.inf, "F16", np.float16), "non-finite"),
    "nan_f64": (CONFIG, with_value(0, np.nan, "F64", np.float64), "non-finite"),
    "f64_beyond_float32": (CONFIG, with_value(2, 1e39, "F64", np.float64), "beyond float32's range"),
    "f64_just_beyond_float32": (CONFIG, with_value(-1, -3.5e38, "F64", np.float64), "beyond float32's range"),
    "nan_bf16": (
        CONFIG,
        safetensors_bytes({A_KEY: ("BF16", bf16(np.ones((2, 8)))), B_KEY: ("BF16", bf16(np.full((8, 2), np.nan)))}),
        "non-finite",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_upload_check_and_worker_refuse_the_same_folders(case, tmp_path):
    config, weights, expected = BAD_FOLDERS[case]
    folder = write_folder(tmp_path / case, config, weights)
    with pytest.raises(AdapterError) as upload:
        fmt.check_finite_values(folder, fmt.read_layout(folder))
    assert expected in str(upload.value), str(upload.value)
    assert len(str(upload.value)) < 600 and "\n" not in str(upload.value)
    with pytest.raises(AdapterError) as worker:
        load_adapter(folder, name="ad_1")
    assert str(worker.value) == f"adapter ad_1: {upload.value}"
    assert worker.value.code == upload.value.code


def test_float64_values_are_checked_in_float32(tmp_path):
    """Finite float64 factors beyond float32's range are infinite where the merge computes: refused with their own
    code by the upload check and the loader alike; float32's largest value itself is accepted."""
    for value, refused in ((1e39, True), (-3.41e38, True), (float(np.finfo(np.float32).max), False), (1e38, False)):
        folder = write_folder(tmp_path / f"v{value:g}", CONFIG, with_value(0, value, "F64", np.float64))
        if not refused:
            fmt.check_finite_values(folder, fmt.read_layout(folder))
            assert torch.isfinite(load_adapter(folder).modules[MODULE].B.float()).all()
            continue
        with pytest.raises(AdapterError) as upload:
            fmt.check_finite_values(folder, fmt.read_layout(folder))
        with pytest.raises(AdapterError) as worker:
            load_adapter(folder)
        assert upload.value.code == worker.value.code == "adapter_out_of_range", (value, str(upload.value))


def test_accepted_folders_load_with_the_same_modules_and_scales(tmp_path):
    folder = write_folder(tmp_path / "ok", {**CONFIG, "use_rslora": True, "alpha_pattern": {"q_proj": 3}})
    layout = fmt.read_layout(folder)
    fmt.check_finite_values(folder, layout)
    adapter = load_adapter(folder)
    assert set(layout.modules) == set(adapter.modules) == {MODULE}
    assert layout.modules[MODULE].scale == adapter.modules[MODULE].scale == pytest.approx(3 / math.sqrt(2))
    assert (layout.modules[MODULE].d_out, layout.modules[MODULE].d_in, layout.modules[MODULE].rank) == (8, 8, 2)
    big = with_value(0, float(np.finfo(np.float32).max))  # finite extremes are finite
    fmt.check_finite_values(write_folder(tmp_path / "big", CONFIG, big), layout)


def test_embedding_lora_is_accepted_by_both(tmp_path):
    """PEFT embedding LoRA tensors (`lora_embedding_A` (r × V), `lora_embedding_B` (d × r)) as the writer saves them."""
    g = torch.Generator().manual_seed(0)
    modules = {
        "model.embed_tokens": LoraFactors(torch.randn(16, 2, generator=g), torch.randn(2, 50, generator=g)),
        MODULE: LoraFactors(torch.randn(16, 3, generator=g), torch.randn(3, 16, generator=g)),
    }
    folder = tmp_path / "emb"
    save_adapter(folder, modules, base_model="tiny", embedding_modules=frozenset({"model.embed_tokens"}))
    layout = fmt.read_layout(folder)
    fmt.check_finite_values(folder, layout)
    embedding = layout.modules["model.embed_tokens"]
    assert embedding.embedding and not layout.modules[MODULE].embedding
    assert (embedding.d_out, embedding.d_in, embedding.rank, embedding.scale) == (16, 50, 2, 1.0)
    adapter = load_adapter(folder)
    assert adapter.embedding_modules == {"model.embed_tokens"}
    torch.testing.assert_close(adapter.delta("model.embed_tokens"), modules["model.embed_tokens"].delta())


def test_pattern_lookup_is_peft_s():
    from peft.utils.other import get_pattern_key

    patterns = [
        r"q_proj",
        r"layers\.1\.mlp\.down_proj",
        r"^model\.layers\.0\.self_attn\.v_proj",
        "mlp",
        "k_proj|o_proj",
    ]
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.3.self_attn.o_proj",
        "model.layers.3.mlp",
        "lm_head",
    ]
    for name in names:
        for ordered in (patterns, patterns[::-1]):
            expected = get_pattern_key(ordered, name)
            assert fmt.pattern_key(ordered, name) == (expected if expected in ordered else None), name


@pytest.mark.parametrize(
    ("dtype", "np_dtype"), [("F16", np.float16), ("BF16", np.float32), ("F32", np.float32), ("F64", np.float64)]
)
def test_byte_level_finite_check_agrees_with_torch(dtype, np_dtype):
    rng = np.random.default_rng(1)
    info = np.finfo(np.float16 if dtype == "F16" else np_dtype)
    special = np.array([0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, 1.0, -2.5], dtype=np.float64)
    for trial in range(60):
        values = rng.standard_normal(257) * 10.0 ** rng.integers(-30, 30)
        values[: len(special)] = special
        if trial % 3:
            values[rng.integers(len(values))] = rng.choice([np.nan, np.inf, -np.inf])
        with np.errstate(over="ignore"):
            array = values.astype(np.float16 if dtype == "F16" else np_dtype)
        raw = bf16(array).tobytes() if dtype == "BF16" else array.tobytes()
        reference = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype.lower().replace("f", "float")))
        assert fmt._has_non_finite(raw, dtype) == (not bool(torch.isfinite(reference).all())), (dtype, trial)


def test_finite_check_reads_in_chunks(tmp_path):
    """A NaN in the last element of the last chunk is found; reading is chunked (here 64 bytes at a time)."""
    tensors = factors(d=64)
    tensors[B_KEY][1].reshape(-1)[-1] = np.nan
    folder = write_folder(tmp_path / "chunks", CONFIG, safetensors_bytes(tensors))
    with pytest.raises(AdapterError, match="non-finite"):
        fmt.check_finite_values(folder, fmt.read_layout(folder), chunk_bytes=64)


def test_untrusted_json_bounds():
    assert loads('{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads("[" * 32 + "]" * 32) is not None
    for text, message in [
        ("NaN", "NaN"),
        ("[Infinity]", "Infinity"),
        ('{"a": -Infinity}', "Infinity"),
        ("1e400", "out of range"),
        ("9" * 65, "digits"),
        ("-" + "9" * 65, "digits"),
        ("[" * 33 + "]" * 33, "nested deeper"),
        ("[" * 200_000 + "]" * 200_000, "nested deeper"),
        ("{oops", "not valid JSON"),
        (b"\xff\xfe", "not"),
    ]:
        with pytest.raises(UntrustedValueError, match=message):
            loads(text)


BAD_ROWS = {
    "surrogate.jsonl": (b'{"prompt": "hi \\ud800"}\n', "lone surrogate"),
    "surrogate_response.jsonl": (b'{"prompt": "hi", "response": "\\udfff"}\n', "lone surrogate"),
    "big_int.jsonl": (b'{"prompt": "hi", "n": ' + b"1" * 5000 + b"}\n", "digits"),
    "deep.jsonl": (b'{"prompt": "hi", "n": ' + b"[" * 100 + b"]" * 100 + b"}\n", "nested deeper"),
    "nan.jsonl": (b'{"prompt": "hi", "score": NaN}\n', "NaN"),
    "long_row.jsonl": (b'{"prompt": "' + b"x" * 10_000 + b'"}\n', "longer than"),
    "long_column.jsonl": (b'{"prompt": "hi", "' + b"c" * 300 + b'": 1}\n', "column name"),
    "extra_fields.csv": (b"prompt\nhi,there\n", "more fields"),
    "latin1.csv": ("prompt\ncaf\xe9\n".encode("latin-1"), "UTF-8"),
    "empty_prompt.jsonl": (b'{"prompt": "hi"}\n{"prompt": " "}\n', "row 2"),
    "no_prompt.jsonl": (b'{"question": "hi"}\n', "missing column"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_dataset_rules_are_shared_by_upload_scan_and_worker(name, tmp_path):
    payload, expected = BAD_ROWS[name]
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match=expected) as upload:
        scan_rows(path, "ds_1", max_row_bytes=8192)
    assert len(str(upload.value)) < 400
    if name != "long_row.jsonl":  # the worker reads with the default row limit (1 MiB)
        with pytest.raises(DatasetError, match=expected):
            load_examples(path)


def test_dataset_scan_counts_what_the_worker_loads(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "x": 1}\n\n{"prompt": "b", "response": 7}\r\n{"prompt": "c"}')
    summary = scan_rows(path, "ds_1")
    assert (summary.rows, summary.columns) == (3, ["prompt", "x", "response"])
    assert [(e.prompt, e.response) for e in load_examples(path)] == [("a", None), ("b", "7"), ("c", None)]
    csv_path = tmp_path / "ok.csv"
    csv_path.write_text('prompt,response\n"multi\nline",yes\n\nsecond\n', encoding="utf-8")
    assert scan_rows(csv_path, "ds_2").rows == 2
    assert [(e.prompt, e.response) for e in load_examples(csv_path)] == [("multi\nline", "yes"), ("second", None)]


def test_writer_refuses_non_finite_merged_updates():
    d, r = 4, 1
    fine = LoraFactors(torch.ones(d, r), torch.ones(r, d))
    check_finite({"a": fine}, "sst@1")
    for bad in (
        LoraFactors(torch.full((d, r), float("nan")), torch.ones(r, d)),
        LoraFactors(torch.ones(d, r), torch.full((r, d), float("inf"))),
        LoraFactors(torch.full((d, r), 1e20), torch.full((r, d), 1e20)),  # finite factors, BA = 1e40 overflows
    ):
        assert not torch.isfinite(bad.B.float() @ bad.A.float()).all()  # what PEFT would compute on load
        with pytest.raises(InputError, match="module model.layers.3.mlp.down_proj") as error:
            check_finite({"model.layers.3.mlp.down_proj": bad}, "sst@1")
        assert error.value.code == "non_finite_result" and "sst@1" in str(error.value)
    # the bound is |s|·‖B‖·‖A‖ ≤ float32 max, which every entry of s·B A obeys (Cauchy–Schwarz)
    edge = LoraFactors(torch.full((d, r), 9e18), torch.full((r, d), 9e18), scale=1.0)
    norms = float(torch.linalg.vector_norm(edge.B.double()) * torch.linalg.vector_norm(edge.A.double()))
    assert norms <= FLOAT32_MAX and torch.isfinite(edge.B @ edge.A).all()
    check_finite({"edge": edge}, "sst@1")
