"""The on-disk rules of a PEFT LoRA folder that this project accepts, without torch.

One set of rules for every reader: `adapters.load_adapter` (the worker and the CLI) calls `read_layout` before it
reads any value, and the service calls `read_layout` and `check_finite_values` on an upload before storing it, so
that a folder the worker would refuse is refused at upload with the same message. The rules:

- `adapter_config.json`: a JSON object of at most 1 MiB (nesting, integer sizes and non-finite numbers bounded as
  in `untrusted.loads`); `peft_type` LORA, no DoRA, no trained biases, no `modules_to_save`; `r` an integer in
  [1, 65536]; `lora_alpha` a finite number within ±1e6; booleans where PEFT writes booleans; `target_modules` a
  name or a list of names; `rank_pattern` / `alpha_pattern` objects from module names or quantifier-free regexes
  to ranks / alphas in those ranges.
- `adapter_model.safetensors`: a header of at most 16 MiB whose every tensor has a floating dtype (F16, BF16,
  F32, F64), integral non-negative dimensions and integral offsets; the tensors tile the data buffer exactly
  (sorted by offset: contiguous, non-overlapping, covering it to the end) and each spans itemsize × Π shape bytes.
- Tensors named `base_model.model.<module>.lora_{A,B}[.<adapter>].weight`, or `….lora_embedding_{A,B}` for an
  embedding LoRA, in pairs A (r × d_in) and B (d_out × r) whose r is the config's for that module
  (`rank_pattern` first), with every dimension in [1, 2^24]; every value finite, and within float32's range (a
  float64 value beyond it is infinite in the float32 the merges are stored and evaluated in).

Per module the update is ΔW = s · B A with s = α / r (α / √r with rsLoRA), α and r from the patterns first.
"""

from __future__ import annotations

import array
import hashlib
import math
import re
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from .data import file_sha256
from .errors import AdapterError
from .untrusted import UntrustedValueError, control_free, loads, quote

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_RANK = 1 << 16
MAX_DIM = 1 << 24
MAX_LORA_ALPHA = 1e6
MAX_NAME_CHARS = 500
MAX_NAMES = 10_000
MAX_PATTERN_CHARS = 256
# bytes per element; the dtypes a LoRA factor may have (the worker computes in float32 or wider)
ADAPTER_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
FLOAT32_MAX = 2.0**128 - 2.0**104  # the largest finite float32
#: The least float64 magnitude that rounds to ±inf in float32 (round to nearest, ties to even: max + half an ulp).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    **ADAPTER_DTYPES,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
}

_MODULE = r"(?P<module>[\w.-]{1,500})"  # at most MAX_NAME_CHARS: patterns match it in bounded time
_KEY = re.compile(rf"^base_model\.model\.{_MODULE}\.lora_(?P<factor>[AB])(?:\.[\w-]+)?\.weight$")
_EMBEDDING_KEY = re.compile(rf"^base_model\.model\.{_MODULE}\.lora_embedding_(?P<factor>[AB])(?:\.[\w-]+)?$")
# rank_pattern / alpha_pattern keys: module names, or regexes without quantifiers (no catastrophic backtracking)
_PATTERN_KEY = re.compile(r"^[\w.\\^$|()\[\]:-]+$")
_BOOLEAN_FIELDS = ("use_rslora", "use_dora", "fan_in_fan_out")

T = TypeVar("T")


def _tensor(name: object) -> str:
    """A tensor name in a message (long names are real: quote up to 200 characters)."""
    return quote(name, 200)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(value: object, where: str) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_RANK:
        raise AdapterError(f"{CONFIG_NAME}: {where} must be an integer in [1, {MAX_RANK}], got {quote(value)}")
    return value


def _check_alpha(value: object, where: str) -> float:
    if not _is_number(value) or abs(value) > MAX_LORA_ALPHA:
        raise AdapterError(
            f"{CONFIG_NAME}: {where} must be a finite number within ±{MAX_LORA_ALPHA:g}, got {quote(value)}"
        )
    return float(value)


def _check_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or not control_free(value):
        raise AdapterError(
            f"{CONFIG_NAME}: {where} must be a non-empty name of at most {MAX_NAME_CHARS} printable characters, "
            f"got {quote(value)}"
        )
    return value


def _check_patterns(config: Mapping[str, Any], field: str, check_value) -> None:
    patterns = config.get(field)
    if patterns is None:
        return
    if not isinstance(patterns, dict) or len(patterns) > MAX_NAMES:
        raise AdapterError(f"{CONFIG_NAME}: {field} must be an object of at most {MAX_NAMES} entries")
    for key, value in patterns.items():
        if len(key) > MAX_PATTERN_CHARS or not _PATTERN_KEY.match(key):
            raise AdapterError(
                f"{CONFIG_NAME}: {field} key {quote(key)} must be a module name or a regex without quantifiers "
                f"(letters, digits, _ . - \\ ^ $ | ( ) [ ] :), at most {MAX_PATTERN_CHARS} characters"
            )
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterError(f"{CONFIG_NAME}: {field} key {quote(key)} is not a valid regex ({exc})") from None
        check_value(value, f"{field}[{quote(key)}]")


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse what a LoRA merge cannot represent as ΔW = s·BA (other PEFT types, DoRA, trained biases,
    modules_to_save) and every field of the wrong type or out of range (see the module docstring).
    Raises `AdapterError`."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(f"peft_type {quote(peft_type)} is not a LoRA adapter")
    for field in _BOOLEAN_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise AdapterError(f"{CONFIG_NAME}: {field} must be true or false, got {quote(config[field])}")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported (their update is not s·BA)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapters that train biases (bias={quote(config['bias'])}) are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"modules_to_save={quote(config['modules_to_save'])} holds full weights that a LoRA merge cannot "
            "combine; retrain without it"
        )
    _check_rank(config.get("r", 8), "r")
    if "lora_alpha" in config:
        _check_alpha(config["lora_alpha"], "lora_alpha")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        if len(targets) > MAX_NAMES:
            raise AdapterError(f"{CONFIG_NAME}: target_modules lists more than {MAX_NAMES} names")
        for target in targets:
            _check_name(target, "each of target_modules")
    elif targets is not None:
        _check_name(targets, "target_modules")
    for field in ("base_model_name_or_path", "revision"):
        if config.get(field) is not None:
            _check_name(config[field], field)
    _check_patterns(config, "rank_pattern", _check_rank)
    _check_patterns(config, "alpha_pattern", _check_alpha)


def read_config(path: Path) -> dict[str, Any]:
    """`adapter_config.json` parsed within bounds and checked (`check_config`); raises `AdapterError`."""
    if not path.is_file():
        raise AdapterError(f"missing {CONFIG_NAME}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = loads(path.read_bytes())
    except UntrustedValueError as exc:
        raise AdapterError(f"{CONFIG_NAME}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must be a JSON object")
    check_config(config)
    return config


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern p such that the module name matches `(.*\\.)?(p)$`."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r_m, α_m) of a module: `rank_pattern` / `alpha_pattern` first, else `r` (default 8) and `lora_alpha`
    (default r_m)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank_key, alpha_key = pattern_key(ranks, module), pattern_key(alphas, module)
    rank = ranks[rank_key] if rank_key is not None else config.get("r", 8)
    alpha = alphas[alpha_key] if alpha_key is not None else config.get("lora_alpha", rank)
    return int(rank), float(alpha)


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """s_m = α_m / r_m (α_m / √r_m with rsLoRA); `AdapterError` when the tensors' rank is not the config's r_m."""
    r, alpha = module_rank_alpha(config, module)
    if r != rank:
        raise AdapterError(f"module {module}: lora_A has rank {rank} but the config (r / rank_pattern) says {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype, shape and [start, end) within the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path, max_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], int]:
    """The raw tensor table of a safetensors file (name -> entry, `__metadata__` checked and dropped) and the size
    of its data buffer. Checks the framing only; `check_tensor_table` checks the entries."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise AdapterError(f"{path.name}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(max_bytes, size - 8):
            raise AdapterError(f"{path.name}: not a safetensors file (header length {length} is out of range)")
        try:
            header = loads(handle.read(length), max_depth=3, max_int_digits=20)
        except UntrustedValueError as exc:
            raise AdapterError(f"{path.name}: not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterError(f"{path.name}: __metadata__ must map names to strings")
    return header, size - 8 - length


def _entry(path_name: str, name: str, raw: Any, dtypes: Mapping[str, int]) -> TensorEntry:
    if not isinstance(raw, dict):
        raise AdapterError(f"{path_name}: tensor {_tensor(name)} has a malformed header entry")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise AdapterError(
            f"{path_name}: tensor {_tensor(name)} has dtype {quote(dtype)}; allowed: {', '.join(dtypes)}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise AdapterError(f"{path_name}: tensor {_tensor(name)} has a shape that is not a list of integers ≥ 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise AdapterError(f"{path_name}: tensor {_tensor(name)} has data_offsets that are not two integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise AdapterError(f"{path_name}: tensor {_tensor(name)} has data_offsets {offsets} out of order")
    expected = dtypes[dtype] * math.prod(shape)
    if end - start != expected:
        raise AdapterError(
            f"{path_name}: tensor {_tensor(name)} spans {end - start} bytes but {dtype} × {tuple(shape)} is "
            f"{expected} bytes"
        )
    return TensorEntry(dtype, tuple(shape), start, end)


def check_tensor_table(
    path_name: str, table: Mapping[str, Any], data_size: int, dtypes: Mapping[str, int] = ADAPTER_DTYPES
) -> dict[str, TensorEntry]:
    """The entries of a raw tensor table, each checked (dtype in `dtypes`, integral shape and offsets, size =
    itemsize × Π shape), tiling [0, data_size) exactly: sorted by offset, each starts where the previous ends."""
    entries = {name: _entry(path_name, name, raw, dtypes) for name, raw in table.items()}
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            problem = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise AdapterError(
                f"{path_name}: tensor {_tensor(name)} {problem} (offset {entry.start}, expected {position})"
            )
        position = entry.end
    if position != data_size:
        raise AdapterError(
            f"{path_name}: the tensors cover {position} of {data_size} data bytes "
            f"({'truncated upload?' if position > data_size else 'trailing bytes'})"
        )
    return entries


def embedding_module(key: str) -> str | None:
    """The module of a PEFT embedding-LoRA tensor name (`….lora_embedding_A`), None for any other name."""
    match = _EMBEDDING_KEY.match(key)
    return match["module"] if match else None


def pair_factors(entries: Iterable[tuple[str, T]]) -> dict[str, tuple[T, T]]:
    """Group (tensor name, value) entries into {module: (lora_A value, lora_B value)}, sorted by module.

    Embedding LoRA tensors (`lora_embedding_A` (r × V), `lora_embedding_B` (d × r)) pair the same way: their
    update is the (d × V) map B A, added transposed to the embedding table. Raises `AdapterError` for any other
    tensor, a module without both factors, or no LoRA tensor at all."""
    factors: dict[str, dict[str, T]] = {}
    kinds: dict[str, set[str]] = {}
    for key, value in entries:
        match = _KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None:
            raise AdapterError(f"unexpected tensor {_tensor(key)} (only lora_A/lora_B or lora_embedding_A/B)")
        if match["factor"] in factors.get(match["module"], {}):
            raise AdapterError(f"module {match['module']}: more than one lora_{match['factor']} tensor")
        kinds.setdefault(match["module"], set()).add("embedding" if match.re is _EMBEDDING_KEY else "linear")
        factors.setdefault(match["module"], {})[match["factor"]] = value
    if mixed := sorted(module for module, kind in kinds.items() if len(kind) > 1):
        raise AdapterError(f"module {mixed[0]}: has both lora_A/B and lora_embedding_A/B tensors")
    if not factors:
        raise AdapterError(f"{WEIGHTS_NAME} holds no LoRA tensors")
    pairs = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"module {module}: has lora_{''.join(pair)} but not both lora_A and lora_B")
        pairs[module] = (pair["A"], pair["B"])
    return pairs


def check_pair_shapes(module: str, shape_A: tuple[int, ...], shape_B: tuple[int, ...]) -> None:
    """A (r × d_in) and B (d_out × r) must form B·A, with r in [1, 65536] and d_in, d_out in [1, 2^24].
    Raises `AdapterError`."""
    if len(shape_A) != 2 or len(shape_B) != 2 or shape_A[0] != shape_B[1]:
        raise AdapterError(f"module {module}: lora_A {tuple(shape_A)} and lora_B {tuple(shape_B)} do not form B·A")
    (rank, d_in), (d_out, _) = shape_A, shape_B
    if not 1 <= rank <= MAX_RANK or not (1 <= d_in <= MAX_DIM and 1 <= d_out <= MAX_DIM):
        raise AdapterError(
            f"module {module}: lora_A {tuple(shape_A)} / lora_B {tuple(shape_B)}: the rank must be in [1, {MAX_RANK}] "
            f"and every dimension in [1, {MAX_DIM}]"
        )


@dataclass(frozen=True)
class ModuleLayout:
    """One module of an adapter, from its metadata: ΔW = scale · B A with B (d_out × r), A (r × d_in)."""

    name: str
    a_key: str
    b_key: str
    d_out: int
    d_in: int
    rank: int
    scale: float
    embedding: bool


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter folder checked against every rule that needs no tensor value."""

    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    modules: dict[str, ModuleLayout]


def read_layout(folder: Path) -> AdapterLayout:
    """Config and safetensors header of a PEFT LoRA folder, checked (module docstring); raises `AdapterError`."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if folder.is_dir():
            refuse_pickles(p.name for p in folder.iterdir())
        raise AdapterError(f"missing {WEIGHTS_NAME}")
    config = read_config(folder / CONFIG_NAME)
    table, data_size = read_safetensors_header(weights)
    tensors = check_tensor_table(WEIGHTS_NAME, table, data_size)
    modules = {}
    for module, (a_key, b_key) in pair_factors((key, key) for key in tensors).items():
        shape_A, shape_B = tensors[a_key].shape, tensors[b_key].shape
        check_pair_shapes(module, shape_A, shape_B)
        scale = lora_scale(config, module, shape_A[0])
        modules[module] = ModuleLayout(
            module, a_key, b_key, shape_B[0], shape_A[1], shape_A[0], scale, embedding_module(a_key) is not None
        )
    return AdapterLayout(config, tensors, modules)


# A float is non-finite when its exponent bits are all ones. Per dtype: the little-endian byte holding the sign and
# the top exponent bits, the mask of exponent bits in it, and the next lower byte with the rest of the exponent.
_EXPONENT_BYTES = {
    "F16": (1, 0x7C, None, 0),
    "BF16": (1, 0x7F, 0, 0x80),
    "F32": (3, 0x7F, 2, 0x80),
    "F64": (7, 0x7F, 6, 0xF0),
}


# `bytes.translate` tables: byte -> 1 where every bit of the mask is set, else 0
_FLAGS = {mask: bytes(int(b & mask == mask) for b in range(256)) for mask in (0x7C, 0x7F, 0x80, 0xF0)}


def _has_non_finite(chunk: bytes, dtype: str) -> bool:
    """Whether a little-endian buffer of `dtype` values holds an inf or a NaN (C-speed byte operations)."""
    itemsize = ADAPTER_DTYPES[dtype]
    high, high_mask, low, low_mask = _EXPONENT_BYTES[dtype]
    top = chunk[high::itemsize].translate(_FLAGS[high_mask])
    if b"\x01" not in top:
        return False
    if low is None:
        return True
    rest = chunk[low::itemsize].translate(_FLAGS[low_mask])
    return int.from_bytes(top, "little") & int.from_bytes(rest, "little") != 0


def beyond_float32(chunk: bytes) -> bool:
    """Whether a little-endian float64 buffer holds a finite value that float32 cannot hold (±inf once cast)."""
    values = array.array("d")
    values.frombytes(chunk)
    if sys.byteorder == "big":
        values.byteswap()
    if not values:
        return False
    if not math.isfinite(sum(values)):  # a NaN or an inf (or a sum beyond float64, far beyond float32)
        return True
    return not (-FLOAT32_OVERFLOW < min(values) and max(values) < FLOAT32_OVERFLOW)


def out_of_range(module: str) -> AdapterError:
    return AdapterError(
        f"module {module}: holds values beyond float32's range (|x| > {FLOAT32_MAX:.4g}), infinite where the merge "
        "computes them",
        code="adapter_out_of_range",
    )


def check_finite_values(folder: Path, layout: AdapterLayout, chunk_bytes: int = 8 << 20) -> None:
    """Refuse (`AdapterError`, naming the module) any inf or NaN in the factors, and (code `adapter_out_of_range`)
    any float64 value beyond float32's range, reading `chunk_bytes` at a time."""
    weights = folder / WEIGHTS_NAME
    header_end = weights.stat().st_size - max((t.end for t in layout.tensors.values()), default=0)
    by_key = {key: module.name for module in layout.modules.values() for key in (module.a_key, module.b_key)}
    step = chunk_bytes - chunk_bytes % 8
    with weights.open("rb") as handle:
        for key, entry in sorted(layout.tensors.items(), key=lambda item: item[1].start):
            handle.seek(header_end + entry.start)
            remaining = entry.end - entry.start
            while remaining > 0:
                chunk = handle.read(min(step, remaining))
                if not chunk:
                    raise AdapterError(f"{WEIGHTS_NAME}: truncated")
                remaining -= len(chunk)
                if _has_non_finite(chunk, entry.dtype):
                    raise AdapterError(f"module {by_key[key]}: holds non-finite values")
                if entry.dtype == "F64" and beyond_float32(chunk):
                    raise out_of_range(by_key[key])


def refuse_pickles(names: Iterable[str]) -> None:
    """Raise `AdapterError` (code pickle_refused) if any file name has a pickle suffix."""
    pickles = sorted(name for name in names if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"only safetensors weights are accepted; refusing pickle file(s) {', '.join(map(quote, pickles[:5]))}",
            code="pickle_refused",
        )


def adapter_sha256(folder: Path) -> str:
    """An adapter's identity: sha256(config bytes + hex sha256 of the weights file)."""
    digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
    digest.update(file_sha256(folder / WEIGHTS_NAME).encode())
    return digest.hexdigest()
