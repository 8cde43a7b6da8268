"""Writing: one standard PEFT LoRA folder per method and α (`alpha-{α}/`, baselines under `baselines/{method}/`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..adapters import save_adapter
from ..errors import InputError
from ..specfile import InputNames
from .inputs import LoadedInputs
from .merging import MergedUpdates


def alpha_dirname(alpha: float) -> str:
    """Folder of the adapter merged at α: `alpha-0.5`, `alpha-1`, `alpha-1.5`."""
    return f"alpha-{alpha:g}"


def adapter_subdir(merged: MergedUpdates) -> Path:
    """Where a method's adapters go, relative to the job's folder: the job's own at the top, baselines below."""
    return Path(".") if merged.role == "merged" else Path("baselines") / merged.name


@dataclass(frozen=True)
class AdapterTarget:
    """What a written adapter_config.json says about the base model."""

    base_model: str | None
    revision: str | None
    fan_in_fan_out: bool


def adapter_target(loaded: LoadedInputs, names: InputNames | None = None) -> AdapterTarget:
    """The base model as adapter_config.json records it: the caller's name for it when given (the service's folder
    name or Hub id, never a server path), else the model as loaded (a local folder's absolute path or a Hub id)."""
    named = (names or {}).get(loaded.spec.base_model)
    base = named.partition("@")[0] if named is not None else loaded.ref.name_or_path
    return AdapterTarget(base, loaded.ref.revision, loaded.fan_in_fan_out)


@dataclass(frozen=True)
class WrittenAdapters:
    """The folders of one method's merged adapters, relative to the job's folder, by α."""

    merged: MergedUpdates
    dirs: Mapping[float, Path]


def write_adapter_weights(
    root: Path,
    merged: MergedUpdates,
    target: AdapterTarget,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> WrittenAdapters:
    """adapter_config.json + adapter_model.safetensors per α under `root`; refuses an all-zero merge."""
    dirs = {}
    for done, alpha in enumerate(merged.alphas, start=1):
        modules = merged.updates(alpha)
        if not modules:
            raise InputError(f"the merge at α={alpha:g} is zero on every module; nothing to write")
        relative = adapter_subdir(merged) / alpha_dirname(alpha)
        save_adapter(
            root / relative,
            modules,
            base_model=target.base_model,
            revision=target.revision,
            fan_in_fan_out=target.fan_in_fan_out,
        )
        dirs[alpha] = relative
        if progress is not None:
            progress(done, len(merged.alphas))
    return WrittenAdapters(merged, dirs)
