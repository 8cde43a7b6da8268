"""The on-disk rules of a PEFT LoRA folder that this project accepts, without torch.

Shared by `adapters.load_adapter` (which then reads the values) and by the service, which checks an
upload's config and safetensors header before any worker sees it, so both refuse the same folders with
the same messages.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from .data import file_sha256
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<factor>[AB])(?:\.[^.]+)?$")

T = TypeVar("T")


def check_config(config: dict) -> None:
    """Refuse what a LoRA merge cannot represent as ΔW = s·BA: other PEFT types, DoRA, trained biases,
    modules_to_save. Raises `AdapterError`."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not a LoRA adapter")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported (their update is not s·BA)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapters that train biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"modules_to_save={config['modules_to_save']} holds full weights that a LoRA merge cannot combine; "
            "retrain without it"
        )


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
            raise AdapterError(f"unexpected tensor {key!r} (only lora_A/lora_B or lora_embedding_A/B)")
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
    """A (r × d_in) and B (d_out × r) must form B·A. Raises `AdapterError`."""
    if len(shape_A) != 2 or len(shape_B) != 2 or shape_A[0] != shape_B[1]:
        raise AdapterError(f"module {module}: lora_A {tuple(shape_A)} and lora_B {tuple(shape_B)} do not form B·A")


def refuse_pickles(names: Iterable[str]) -> None:
    """Raise `AdapterError` (code pickle_refused) if any file name has a pickle suffix."""
    pickles = sorted(name for name in names if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"only safetensors weights are accepted; refusing pickle file(s) {', '.join(pickles[:5])}",
            code="pickle_refused",
        )


def adapter_sha256(folder: Path) -> str:
    """An adapter's identity: sha256(config bytes + hex sha256 of the weights file)."""
    digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
    digest.update(file_sha256(folder / WEIGHTS_NAME).encode())
    return digest.hexdigest()
