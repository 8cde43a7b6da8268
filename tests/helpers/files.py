"""Files the tests write: JSONL data sets and raw safetensors bytes (for headers a test wants to corrupt)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line (UTF-8, each line ending in a newline); returns `path`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def safetensors_bytes(
    tensors: dict[str, tuple[str, np.ndarray]],
    edit: Callable[[dict[str, Any]], object] | None = None,
    data_suffix: bytes = b"",
) -> bytes:
    """A safetensors file of (dtype name, array) tensors; `edit(header)` may corrupt the header first and
    `data_suffix` is appended after the tensor data."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, (dtype, array) in tensors.items():
        blob = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if edit is not None:
        edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs) + data_suffix
