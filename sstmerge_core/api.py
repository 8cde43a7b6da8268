"""The Python API: the same capabilities as `sstmerge merge`, without the command line.

SSTMerge(selection="topk", k=16, alphas=[0.5, 1.0]).merge(base=..., utility=[...], safety=[...],
                                                          utility_data=..., safety_data=..., out=...)
rerun("merged/merge_spec.json", out="again/")   # the recipe written beside a result, run again
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .jobspec import AdapterInput, EvaluationSpec, MergeSpec

AdapterArg = str | Path | tuple[str | Path, float] | AdapterInput


def _adapter(item: AdapterArg) -> AdapterInput:
    if isinstance(item, AdapterInput):
        return item
    if isinstance(item, tuple):
        return AdapterInput(path=str(item[0]), weight=float(item[1]))
    return AdapterInput(path=str(item))


def merge(
    base: str | Path,
    *,
    safety: Sequence[AdapterArg],
    out: str | Path,
    utility: Sequence[AdapterArg] = (),
    utility_data: str | Path | None = None,
    safety_data: str | Path | None = None,
    method: str = "sst",
    params: dict | None = None,
    compare_with: Sequence[str] = (),
    evaluation: EvaluationSpec | dict | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    progress=None,
    names: dict[str, str] | None = None,
):
    """Run one merge job (see `pipeline.run_merge`); adapters are paths or (path, weight) pairs. `names` maps
    input paths to the names the written documents use for them."""
    from .pipeline import run_merge

    spec = MergeSpec(
        base_model=str(base),
        utility=[_adapter(u) for u in utility],
        safety=[_adapter(s) for s in safety],
        utility_data=str(utility_data) if utility_data else None,
        safety_data=str(safety_data) if safety_data else None,
        method=method,
        params=params or {},
        compare_with=list(compare_with),
        evaluation=evaluation,
        device=device,
        dtype=dtype,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    return run_merge(spec, out, progress=progress, names=names)


def rerun(
    spec_file: str | Path,
    *,
    out: str | Path,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress=None,
):
    """Run a merge_spec.json again (inputs resolved from its folder, their sha256 checked first)."""
    from .pipeline import run_merge
    from .specfile import read_spec_file

    spec = read_spec_file(spec_file, device=device, cache_dir=str(cache_dir) if cache_dir else None)
    return run_merge(spec, out, progress=progress)


class SSTMerge:
    """SST-Merge with fixed parameters (any field of `SSTParams`, e.g. selection, beta, k, alphas)."""

    method = "sst"

    def __init__(self, *, alpha: float | None = None, **params) -> None:
        from .methods.catalog import parse_params

        if alpha is not None:
            params["alphas"] = [alpha]
        self.params = parse_params(self.method, params).model_dump()

    def merge(self, base: str | Path, *, safety: Sequence[AdapterArg], out: str | Path, **kwargs):
        return merge(base, safety=safety, out=out, method=self.method, params=self.params, **kwargs)
