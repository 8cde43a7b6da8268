"""Writing: one standard PEFT LoRA folder per method and α (`alpha-{α}/`, baselines under `baselines/{method}/`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import LoraFactors, save_adapter
from ..errors import InputError
from ..specfile import InputNames
from .inputs import LoadedInputs
from .merging import MergedUpdates

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_finite(modules: Mapping[str, LoraFactors], label: str) -> None:
    """Refuse (`InputError`, code non_finite_result, naming the module) a merged update that is not finite where
    it is used: every stored factor finite and |s|·‖B‖_F·‖A‖_F ≤ float32's largest value, which bounds every entry
    of ΔW = s·B A (|(BA)_ij| ≤ ‖B_i,:‖·‖A_:,j‖, Cauchy–Schwarz), so that PEFT's float32 product cannot overflow."""
    for name, f in modules.items():
        finite = bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all())
        norms = float(
            torch.linalg.vector_norm(f.B, dtype=torch.float64) * torch.linalg.vector_norm(f.A, dtype=torch.float64)
        )
        if not (finite and abs(f.scale) * norms <= FLOAT32_MAX):
            raise InputError(
                f"{label}: the merged update of module {name} is not finite (inf or NaN, or beyond float32); "
                "check the inputs' weights and α",
                code="non_finite_result",
            )


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

    merged: MergedUpdates  # shapes and diagnostics only (`MergedUpdates.without_values`)
    dirs: Mapping[float, Path]


def write_adapter_weights(
    root: Path,
    merged: MergedUpdates,
    target: AdapterTarget,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> WrittenAdapters:
    """adapter_config.json + adapter_model.safetensors per α under `root`; refuses an all-zero merge and a
    non-finite one (`check_finite`). The result keeps the merge's shapes and diagnostics, not its values."""
    dirs = {}
    for done, alpha in enumerate(merged.alphas, start=1):
        modules = merged.updates(alpha)
        if not modules:
            raise InputError(f"the merge at α={alpha:g} is zero on every module; nothing to write")
        check_finite(modules, merged.label(alpha))
        relative = adapter_subdir(merged) / alpha_dirname(alpha)
        save_adapter(
            root / relative,
            modules,
            base_model=target.base_model,
            revision=target.revision,
            fan_in_fan_out=target.fan_in_fan_out,
            embedding_modules=merged.embedding_modules,
        )
        dirs[alpha] = relative
        if progress is not None:
            progress(done, len(merged.alphas))
    return WrittenAdapters(merged.without_values(), dirs)
