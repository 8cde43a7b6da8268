"""`merge_spec.json`: a runnable record of a merge, written beside every result (as mergekit writes
`mergekit_config.yml`): the recipe (method, parameters with α, compare_with, evaluation settings) and the inputs
as the caller named them, each with its sha256. `sstmerge merge --spec FILE` runs it again.

Inputs are written as the caller named them: a display name given to `run_merge(names=...)` (the service passes
its adapter and dataset ids and the base model's folder name or Hub id) as is; a local path absolute if it was
given absolute, else relative to the folder of the spec file, so that the file runs from anywhere. When read back,
relative paths are resolved against the file's folder and every recorded hash is checked before anything runs.
Importing this module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .adapter_format import adapter_sha256
from .data import file_sha256
from .errors import InputError
from .jobspec import EvaluationSettings, EvaluationSpec, MergeSpec, RepairSpec

SPEC_FILE = "merge_spec.json"
InputNames = Mapping[str, str]
"""How the caller names each input: the value in the `MergeSpec` (a local path) → the name written to files."""


class FileInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str | None = None


class AdapterFileInput(FileInput):
    weight: float = 1.0
    name: str | None = None


class EvaluationFiles(EvaluationSettings):
    harmful: FileInput
    benign: FileInput
    utility_eval: FileInput


class MergeSpecFile(BaseModel):
    """The content of merge_spec.json (hashes are checked when present; drop one to accept a changed input)."""

    model_config = ConfigDict(extra="forbid")

    spec_version: Literal[1] = 1
    sstmerge_version: str | None = None
    base_model: str
    base_model_fingerprint: str | None = None
    utility: list[AdapterFileInput] = []
    safety: list[AdapterFileInput]
    utility_data: FileInput | None = None
    safety_data: FileInput | None = None
    method: str
    params: dict
    compare_with: list[str] = []
    repair: RepairSpec | None = None
    harmless_data: FileInput | None = None
    borderline_data: FileInput | None = None
    evaluation: EvaluationFiles | None = None
    dtype: str = "auto"


def display_name(value: str, names: InputNames | None) -> str:
    """What the caller calls the input `value` (the value itself when no name was given)."""
    return (names or {}).get(value, value)


def base_model_name(value: str, names: InputNames | None) -> str:
    """The base model as the Hub's `base_model` field wants it: a Hub id without revision, or a folder name;
    never a local or server path."""
    shown = display_name(value, names)
    if value in (names or {}):
        return shown.partition("@")[0]
    return Path(value).resolve().name if Path(value).is_dir() else value.partition("@")[0]


def _written_path(value: str, folder: Path, names: InputNames | None) -> str:
    """A named input as named; an absolute path as is; a relative path rebased onto `folder`."""
    if names is not None and value in names:
        return names[value]
    if os.path.isabs(value):
        return value
    return Path(os.path.relpath(os.path.abspath(value), folder)).as_posix()


def write_spec_file(
    path: Path,
    spec: MergeSpec,
    *,
    names: InputNames | None,
    version: str,
    dtype: str,
    hashes: Mapping[str, str],
    folder: Path | None = None,
) -> MergeSpecFile:
    """Write `spec` to `path` as merge_spec.json; `hashes` maps input values (paths) to their sha256 and `folder`
    is where the file will finally live (relative paths are written from there; default: its own folder)."""
    folder = folder or path.parent

    def file_input(value: str | None) -> FileInput | None:
        if value is None:
            return None
        return FileInput(path=_written_path(value, folder, names), sha256=hashes.get(value))

    def adapter_input(item) -> AdapterFileInput:
        return AdapterFileInput(
            path=_written_path(item.path, folder, names),
            sha256=hashes.get(item.path),
            weight=item.weight,
            name=item.name,
        )

    named_base = spec.base_model in (names or {})
    evaluation = None
    if spec.evaluation is not None:
        settings = spec.evaluation.model_dump(include=set(EvaluationSettings.model_fields))
        evaluation = EvaluationFiles(
            **settings,
            **{key: file_input(getattr(spec.evaluation, key)) for key in ("harmful", "benign", "utility_eval")},
        )
    content = MergeSpecFile(
        sstmerge_version=version,
        base_model=_written_path(spec.base_model, folder, names)
        if named_base or Path(spec.base_model).is_dir()
        else spec.base_model,
        base_model_fingerprint=hashes.get(spec.base_model),
        utility=[adapter_input(u) for u in spec.utility],
        safety=[adapter_input(s) for s in spec.safety],
        utility_data=file_input(spec.utility_data),
        safety_data=file_input(spec.safety_data),
        method=spec.method,
        params=spec.params,
        compare_with=list(spec.compare_with),
        repair=spec.repair,
        harmless_data=file_input(spec.harmless_data),
        borderline_data=file_input(spec.borderline_data),
        evaluation=evaluation,
        dtype=dtype,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
    return content


def input_hashes(spec: MergeSpec, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """sha256 of every local input of `spec` by its value: adapter folders (`adapter_sha256`), data files (bytes),
    and the base model's fingerprint when it is a local folder; values in `known` are taken as they are."""
    hashes: dict[str, str] = dict(known or {})
    for item in [*spec.utility, *spec.safety]:
        if item.path not in hashes:
            hashes[item.path] = adapter_sha256(Path(item.path))
    files = [spec.utility_data, spec.safety_data, spec.harmless_data, spec.borderline_data]
    if spec.evaluation is not None:
        files += [spec.evaluation.harmful, spec.evaluation.benign, spec.evaluation.utility_eval]
    for value in files:
        if value is not None and value not in hashes:
            hashes[value] = file_sha256(Path(value))
    if Path(spec.base_model).is_dir() and spec.base_model not in hashes:
        hashes[spec.base_model] = _fingerprint(spec.base_model)
    return hashes


def _fingerprint(folder: str) -> str:
    from .cache import model_fingerprint

    return model_fingerprint(str(Path(folder).resolve()), None)


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "input"
    return f"{where}: {error['msg']}"


def read_spec_file(path: str | Path, *, device: str = "auto", cache_dir: str | None = None) -> MergeSpec:
    """The `MergeSpec` of a merge_spec.json, inputs resolved against its folder and checked against their hashes.

    Raises `InputError` (one line) for an unreadable file, a missing input or an input whose sha256 changed.
    """
    path = Path(path)
    try:
        content = MergeSpecFile.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except ValidationError as exc:
        raise InputError(f"{path}: {_one_line(exc)}") from None
    folder = path.resolve().parent

    def resolve(item: FileInput, what: str, *, adapter: bool = False) -> str:
        local = Path(item.path) if os.path.isabs(item.path) else folder / item.path
        if not local.exists():
            raise InputError(f"{path}: {what} {item.path} not found (relative paths are read from {folder})")
        if item.sha256 is not None:
            actual = adapter_sha256(local) if adapter else file_sha256(local)
            if actual != item.sha256:
                raise InputError(
                    f"{path}: {what} {item.path} changed since the spec was written "
                    f"(sha256 {actual[:12]}… ≠ {item.sha256[:12]}…)"
                )
        return str(local)

    def adapters(items: list[AdapterFileInput], role: str) -> list[dict]:
        return [
            {"path": resolve(a, f"{role} adapter", adapter=True), "weight": a.weight, "name": a.name} for a in items
        ]

    base = content.base_model
    local_base = base if os.path.isabs(base) else str(folder / base)
    if Path(local_base).is_dir():
        base = local_base
        if content.base_model_fingerprint and _fingerprint(base) != content.base_model_fingerprint:
            raise InputError(f"{path}: base model {content.base_model} changed since the spec was written")
    evaluation = None
    if content.evaluation is not None:
        ev = content.evaluation
        evaluation = EvaluationSpec(
            **ev.model_dump(include=set(EvaluationSettings.model_fields)),
            **{
                key: resolve(getattr(ev, key), f"evaluation set {key!r}")
                for key in ("harmful", "benign", "utility_eval")
            },
        )
    try:
        return MergeSpec(
            base_model=base,
            utility=adapters(content.utility, "utility"),
            safety=adapters(content.safety, "safety"),
            utility_data=resolve(content.utility_data, "utility data") if content.utility_data else None,
            safety_data=resolve(content.safety_data, "safety data") if content.safety_data else None,
            method=content.method,
            params=content.params,
            compare_with=content.compare_with,
            repair=content.repair,
            harmless_data=resolve(content.harmless_data, "harmless data") if content.harmless_data else None,
            borderline_data=resolve(content.borderline_data, "borderline data") if content.borderline_data else None,
            evaluation=evaluation,
            device=device,
            dtype=content.dtype,
            cache_dir=cache_dir,
        )
    except ValidationError as exc:
        raise InputError(f"{path}: {_one_line(exc)}") from None
