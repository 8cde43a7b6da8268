"""`merge_report.json`: the recipe, the inputs (hashes), per-module spectra and diagnostics, timings, and the
evaluation's recommendation, built from a method's finished merge (`MergedUpdates`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from .contracts.metrics import Recommended
from .methods.base import ModuleResult
from .stages.merging import MergedUpdates
from .stages.writing import alpha_dirname

SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "alpha_dirname", "build_report", "module_section", "package_version", "summary_section"]


def package_version() -> str:
    try:
        return version("sstmerge")
    except PackageNotFoundError:
        return "0+local"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def module_section(by_alpha: Mapping[float, Mapping[str, ModuleResult]]) -> dict:
    """Per module: the α-independent diagnostics once, then rank and SVD error per α."""
    first = next(iter(by_alpha.values()))
    modules = {}
    for name in first:
        per_alpha = {}
        for alpha, results in by_alpha.items():
            r = results[name]
            entry = {"rank": r.factors.rank if r.factors is not None else 0}
            if "svd_rel_error" in r.diagnostics:
                entry["svd_rel_error"] = r.diagnostics["svd_rel_error"]
            per_alpha[f"{alpha:g}"] = entry
        shared = {k: v for k, v in first[name].diagnostics.items() if k not in ("svd_rel_error", "rank")}
        modules[name] = {**shared, "per_alpha": per_alpha}
    return modules


def summary_section(modules: Mapping[str, Mapping]) -> dict:
    """Medians over modules of the SST diagnostics (when present), for a quick read."""
    keys = ("norm_ratio", "energy_retained_fu", "energy_retained_fs", "gevp_residual", "lambda_median")
    out = {}
    for key in keys:
        values = [m[key] for m in modules.values() if key in m]
        if values:
            out[f"median_{key}"] = statistics.median(values)
    tops = [m["lambda_top"][0] for m in modules.values() if m.get("lambda_top")]
    if tops:
        out["median_lambda_top1"] = statistics.median(tops)
    out["modules"] = len(modules)
    return out


def adapters_section(merged: MergedUpdates) -> dict:
    """Per α: the adapter's folder (relative to the method's folder), modules written and ranks."""
    adapters = {}
    for alpha, results in merged.by_alpha.items():
        ranks = [r.factors.rank for r in results.values() if r.factors is not None]
        adapters[f"{alpha:g}"] = {
            "dir": alpha_dirname(alpha),
            "modules": len(ranks),
            "max_rank": max(ranks, default=0),
            "total_rank": sum(ranks),
        }
    return adapters


def build_report(
    *,
    merged: MergedUpdates,
    inputs: Mapping,
    fisher: Mapping | None,
    timings: Mapping[str, float],
    estimated: Mapping[str, float] | None = None,
    recommended: Recommended | None = None,
    evaluated: bool = False,
    created_at: str | None = None,
    spec_file: str | None = None,
) -> dict:
    """The merge_report.json of one method's merge.

    Keys: schema_version, sstmerge_version, created_at, method {name, description, reference}, params, inputs,
    fisher (cache keys and hits, damping; null without data passes), alphas, adapters, summary, timings_s (seconds
    per finished stage), estimated_s (the progress plan's expected seconds per stage), modules, spec_file, when the
    merges were repaired repair {α: the step's report (docs/repair.md)}, and, when the job was evaluated,
    evaluation {recommended}.
    """
    method = merged.method
    modules = module_section(merged.by_alpha)
    report = {
        "schema_version": SCHEMA_VERSION,
        "sstmerge_version": package_version(),
        "created_at": created_at or now_iso(),
        "method": {"name": method.name, "description": method.info.description, "reference": method.info.reference},
        "params": merged.params.model_dump(),
        "inputs": dict(inputs),
        "fisher": dict(fisher) if fisher is not None else None,
        "alphas": [float(a) for a in merged.by_alpha],
        "adapters": adapters_section(merged),
        "summary": summary_section(modules),
        "timings_s": dict(timings),
        "estimated_s": {k: round(v, 3) for k, v in (estimated or {}).items()},
        "modules": modules,
        "spec_file": spec_file,
    }
    if merged.repairs:
        report["repair"] = {f"{alpha:g}": dict(step) for alpha, step in merged.repairs.items()}
    if evaluated:
        report["evaluation"] = {"recommended": recommended.model_dump(mode="json") if recommended is not None else None}
    return report
