"""Inspect a PEFT LoRA folder without torch: `adapter_config.json`, the safetensors header and the values.

The rules are `sstmerge_core.adapter_format`'s, the ones `sstmerge_core.adapters.load_adapter` applies in the worker
(`read_layout`), plus its finite-values check done on the raw bytes (`check_finite_values`): an upload the worker
would refuse is refused here, with the worker's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sstmerge_core.adapter_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_sha256,
    check_finite_values,
    read_layout,
    refuse_pickles,
)
from sstmerge_core.adapter_format import read_safetensors_header as read_header
from sstmerge_core.errors import AdapterError
from sstmerge_core.untrusted import quote

from .errors import InvalidInput

KEPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")


def invalid(message: str, code: str = "invalid_adapter") -> InvalidInput:
    return InvalidInput(message, code=code)


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: list[str]
    modules: dict[str, list[int]]  # name -> [rows, columns, r] of the base weight the update lands on
    fan_in_fan_out: bool
    base_model_hint: str | None
    sha256: str


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a (base model's) safetensors file, name -> {dtype, shape, data_offsets}: integral shapes
    and offsets inside the file; any dtype (base models may be quantized)."""
    try:
        table, data_size = read_header(path)
    except AdapterError as exc:
        raise invalid(str(exc)) from None
    for name, entry in table.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2) or not all(
            type(v) is int and v >= 0 for v in [*shape, *offsets]
        ):
            raise invalid(f"{path.name}: tensor {quote(name)} has a malformed header entry")
        if not offsets[0] <= offsets[1] <= data_size:
            raise invalid(f"{path.name}: tensor {quote(name)} lies outside the file (truncated upload?)")
    return table


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
    """Validate a PEFT LoRA folder (metadata and values); raises `InvalidInput` naming the problem."""
    try:
        layout = read_layout(folder)
        check_finite_values(folder, layout)
    except AdapterError as exc:
        raise invalid(str(exc), exc.code) from None
    config = layout.config
    # an embedding's update B A (d × V) is added transposed to its (V × d) table: record the table's shape
    modules = {
        name: [m.d_in, m.d_out, m.rank] if m.embedding else [m.d_out, m.d_in, m.rank]
        for name, m in layout.modules.items()
    }
    targets = config.get("target_modules") or sorted({name.rsplit(".", 1)[-1] for name in modules})
    hint = config.get("base_model_name_or_path")
    return AdapterInfo(
        rank=config.get("r", 8),
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        modules=modules,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        base_model_hint=hint or None,
        sha256=adapter_sha256(folder),
    )
