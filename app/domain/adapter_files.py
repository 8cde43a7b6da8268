"""Inspect a PEFT LoRA folder without torch: `adapter_config.json` and the safetensors header (JSON).

The rules are `sstmerge_core.adapter_format`'s, the same that `sstmerge_core.adapters.load_adapter`
applies, checked here on metadata (config flags, tensor names, shapes) so that a bad adapter is refused at
upload time; the worker re-validates the values on load.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sstmerge_core.adapter_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_sha256,
    check_config,
    check_pair_shapes,
    pair_factors,
    refuse_pickles,
)
from sstmerge_core.errors import AdapterError

from .errors import InvalidInput

KEPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
_MAX_HEADER = 100 << 20


def invalid(message: str, code: str = "invalid_adapter") -> InvalidInput:
    return InvalidInput(message, code=code)


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


def find_adapter_folder(root: Path, files: list[PurePosixPath]) -> Path:
    """The one folder of an extracted archive that holds `adapter_config.json` (at the top or one level down)."""
    try:
        refuse_pickles(str(f) for f in files)
    except AdapterError as exc:
        raise invalid(str(exc), exc.code) from None
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
    """Validate a PEFT LoRA folder's metadata; raises `InvalidInput` naming the problem."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise invalid(f"{CONFIG_NAME} must be a JSON object")
    header = read_safetensors_header(folder / WEIGHTS_NAME)
    try:
        check_config(config)
        pairs = pair_factors((key, [int(d) for d in entry["shape"]]) for key, entry in header.items())
        for module, (A, B) in pairs.items():
            check_pair_shapes(module, tuple(A), tuple(B))
    except AdapterError as exc:
        raise invalid(str(exc), exc.code) from None
    modules = {module: [B[0], A[1], A[0]] for module, (A, B) in pairs.items()}
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
        sha256=adapter_sha256(folder),
    )
