"""Base models the server offers: folders under `SSTMERGE_MODEL_DIRS`, and Hub ids when Hub access is on.

For a local model the weight shapes are read from its safetensors headers (no torch), so that a job whose
adapters do not fit the base model is refused at submit time, naming the module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from sstmerge_core.evaluation.judges import JUDGES

from .adapter_files import read_safetensors_header
from .errors import InvalidInput
from .settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class OfferedModel:
    """A base model a job may name: a folder under a model root, or a Hub id."""

    name: str
    source: Literal["local", "hub"]
    model_type: str | None = None


@dataclass(frozen=True)
class BaseModelRef:
    """`name` as the user gave it; `path` for a local folder, else a Hub id with revision."""

    name: str
    path: Path | None

    @property
    def spec_value(self) -> str:
        """What `MergeSpec.base_model` gets: the folder path or `org/name@rev`."""
        return str(self.path) if self.path else self.name


def _local_models(settings: Settings) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in settings.model_dirs:
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if child.is_dir() and (child / "config.json").is_file() and child.name not in found:
                found[child.name] = child
    return found


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def list_models(settings: Settings) -> list[OfferedModel]:
    items = [
        OfferedModel(name=name, source="local", model_type=_model_type(path))
        for name, path in _local_models(settings).items()
    ]
    if settings.hub_enabled:
        items += [OfferedModel(name=hub_id, source="hub") for hub_id in settings.hub_models]
    return items


def resolve(settings: Settings, name: str) -> BaseModelRef:
    """The base model called `name`, or `InvalidInput` with code `unknown_base_model`."""
    local = _local_models(settings)
    if name in local:
        return BaseModelRef(name, local[name])
    if HUB_ID.match(name) and settings.hub_enabled:
        allowed = {m.partition("@")[0] for m in settings.hub_models}
        if not allowed or name.partition("@")[0] in allowed:
            return BaseModelRef(name, None)
    hint = "" if settings.hub_enabled else " (Hub ids are disabled on this server)"
    raise InvalidInput(
        f"base model {name!r} is not available{hint}; see GET /models",
        code="unknown_base_model",
        details={"available": sorted(local)},
    )


def model_aliases(ref: BaseModelRef) -> set[str]:
    """Lower-case short names the base model goes by (folder name, Hub repo name, config `_name_or_path`)."""
    names = {short_name(ref.name)}
    if ref.path is not None:
        try:
            original = json.loads((ref.path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            original = None
        if original:
            names.add(short_name(str(original)))
    return names


def short_name(name_or_path: str) -> str:
    """`/models/SmolLM2-135M/` or `HuggingFaceTB/SmolLM2-135M@main` -> `smollm2-135m`."""
    return name_or_path.partition("@")[0].rstrip("/").rsplit("/", 1)[-1].lower()


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor shape of a local model's safetensors weights (sharded or not); empty if none are found."""
    files = sorted(folder.glob("*.safetensors"))
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _weight_shapes(folder, stamp)


@lru_cache(maxsize=32)
def _weight_shapes(folder: Path, stamp: tuple) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for name, _, _ in stamp:
        for key, entry in read_safetensors_header(folder / name).items():
            shapes[key] = [int(d) for d in entry["shape"]]
    return shapes


def resolve_judge(settings: Settings, judge: str) -> tuple[str, BaseModelRef | None]:
    """The judge as the worker runs it, and its model if any: a judge that takes no model (`keyword`) as is; one that
    does (`JUDGES[kind].takes_model`: `classifier:<model>[#LABEL]`) with <model> resolved exactly as a base model is
    (`resolve`: a folder name under `SSTMERGE_MODEL_DIRS`, a Hub id only when the Hub is on and `hub_models` allow it;
    never a path), else `InvalidInput` with code `unknown_judge`."""
    kind, _, target = judge.partition(":")
    info = JUDGES.get(kind)
    if info is None or not info.takes_model:
        return judge, None
    model, sep, label = target.partition("#")
    try:
        ref = resolve(settings, model)
    except InvalidInput as exc:
        raise InvalidInput(
            f"judge {judge!r}: the classifier is not available: {exc.message}",
            code="unknown_judge",
            details=exc.details,
        ) from None
    return f"classifier:{ref.spec_value}{sep}{label}", ref
