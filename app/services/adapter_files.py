"""Inspect a PEFT LoRA folder without torch: `adapter_config.json` and the safetensors header (JSON).

The checks mirror `sstmerge_core.adapters.load_adapter` as far as metadata goes (tensor names, shapes, rank,
config flags), so that a bad adapter is refused at upload time; the worker re-validates values on load.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ApiError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_MAX_HEADER = 100 << 20


def invalid(message: str, code: str = "invalid_adapter") -> ApiError:
    return ApiError(422, code, message)


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: list[str]
    modules: dict[str, list[int]]  # name -> [d_out, d_in, r]
    fan_in_fan_out: bool
    base_model_hint: str | None
    sha256: str


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> {dtype, shape, data_offsets}), checked against its size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise invalid(f"{path.name}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise invalid(f"{path.name}: not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise invalid(f"{path.name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise invalid(f"{path.name}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise invalid(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= start <= end <= data or any(d < 0 for d in shape):
            raise invalid(f"{path.name}: tensor {name!r} lies outside the file (truncated upload?)")
    return header


def _sha256(config_path: Path, weights_path: Path) -> str:
    """Same definition as `sstmerge_core.adapters.load_adapter`: sha256(config bytes + hex sha256 of weights)."""
    weights = hashlib.sha256()
    with weights_path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            weights.update(chunk)
    digest = hashlib.sha256(config_path.read_bytes())
    digest.update(weights.hexdigest().encode())
    return digest.hexdigest()


def _check_config(config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise invalid(f"peft_type {peft_type!r} is not a LoRA adapter")
    if config.get("use_dora"):
        raise invalid("DoRA adapters are not supported (their update is not s·BA)")
    if config.get("bias", "none") != "none":
        raise invalid(f"adapters that train biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise invalid("modules_to_save holds full weights that a LoRA merge cannot combine; retrain without it")


def find_adapter_folder(root: Path, files: list[PurePosixPath]) -> Path:
    """The one folder of an extracted archive that holds `adapter_config.json` (at the top or one level down)."""
    pickles = sorted(str(f) for f in files if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise invalid(
            f"pickled weights are refused ({', '.join(pickles[:5])}); upload adapter_model.safetensors",
            "pickle_refused",
        )
    folders = sorted({f.parent for f in files if f.name == CONFIG_NAME and len(f.parts) <= 2})
    if len(folders) != 1:
        raise invalid(
            f"the archive must hold exactly one {CONFIG_NAME} (at the top or in one folder); found {len(folders)}"
        )
    folder = root.joinpath(*folders[0].parts)
    if not (folder / WEIGHTS_NAME).is_file():
        raise invalid(f"missing {WEIGHTS_NAME} next to {CONFIG_NAME}")
    return folder


def inspect_adapter(folder: Path) -> AdapterInfo:
    """Validate a PEFT LoRA folder's metadata; raises ApiError(422) naming the problem."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise invalid(f"{CONFIG_NAME} must be a JSON object")
    _check_config(config)
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, entry in read_safetensors_header(weights_path).items():
        match = _KEY.match(key)
        if match is None:
            raise invalid(f"unexpected tensor {key!r} (only lora_A/lora_B of Linear modules)")
        pairs.setdefault(match["module"], {})[match["factor"]] = [int(d) for d in entry["shape"]]
    if not pairs:
        raise invalid(f"{WEIGHTS_NAME} holds no LoRA tensors")
    modules: dict[str, list[int]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise invalid(f"module {module}: needs both lora_A and lora_B")
        A, B = pair["A"], pair["B"]
        if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
            raise invalid(f"module {module}: lora_A {tuple(A)} and lora_B {tuple(B)} do not form B·A")
        modules[module] = [B[0], A[1], A[0]]
    try:
        rank = int(config.get("r", 8))
    except (TypeError, ValueError):
        raise invalid(f"{CONFIG_NAME}: r must be an integer") from None
    targets = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in modules})
    hint = config.get("base_model_name_or_path")
    return AdapterInfo(
        rank=rank,
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        modules=modules,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        base_model_hint=str(hint) if hint else None,
        sha256=_sha256(config_path, weights_path),
    )
