"""`merge_report.json` and the model card (`README.md`) of a merged adapter, generated from the method
registry's metadata and the per-module results."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from .methods.base import MergeMethod, ModuleResult

SCHEMA_VERSION = 1


def package_version() -> str:
    try:
        return version("sstmerge")
    except PackageNotFoundError:
        return "0+local"


def alpha_dirname(alpha: float) -> str:
    """Folder of the adapter merged at α: `alpha-0.5`, `alpha-1`, `alpha-1.5`."""
    return f"alpha-{alpha:g}"


def module_section(by_alpha: dict[float, dict[str, ModuleResult]]) -> dict:
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


def summary_section(modules: dict) -> dict:
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


def build_report(
    *,
    method: MergeMethod,
    params: dict,
    inputs: dict,
    by_alpha: dict[float, dict[str, ModuleResult]],
    timings: dict,
    fisher: dict | None,
) -> dict:
    modules = module_section(by_alpha)
    adapters = {}
    for alpha, results in by_alpha.items():
        ranks = [r.factors.rank for r in results.values() if r.factors is not None]
        adapters[f"{alpha:g}"] = {
            "dir": alpha_dirname(alpha),
            "modules": len(ranks),
            "max_rank": max(ranks, default=0),
            "total_rank": sum(ranks),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "sstmerge_version": package_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": {"name": method.name, "description": method.info.description, "reference": method.info.reference},
        "params": params,
        "inputs": inputs,
        "fisher": fisher,
        "alphas": [float(a) for a in by_alpha],
        "adapters": adapters,
        "summary": summary_section(modules),
        "timings_s": timings,
        "modules": modules,
    }


def model_card(report: dict, alpha: float, metrics_row: dict | None = None) -> str:
    """Markdown model card for the adapter merged at α: recipe, inputs, diagnostics, metrics if any."""
    method = report["method"]
    inputs = report["inputs"]
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {inputs['base_model']}",
        "tags: [lora, merge, sstmerge, " + method["name"] + "]",
        "---",
        "",
        f"# Merged LoRA adapter ({method['name']}, α = {alpha:g})",
        "",
        f"Made with sstmerge {report['sstmerge_version']} on {report['created_at']}.",
        "",
        f"**Method.** {method['description']} Reference: {method['reference']}",
        "",
        "## Recipe",
        "",
        f"- Base model: `{inputs['base_model']}`",
    ]
    for role in ("utility", "safety"):
        for a in inputs.get(f"{role}_adapters", []):
            digest = a["sha256"][:12]
            lines.append(f"- {role} adapter `{a['name']}` (rank {a['rank']}, weight {a['weight']:g}, sha `{digest}`)")
    for role, data in (inputs.get("data") or {}).items():
        lines.append(
            f"- {role} data: {data['n']} examples, sha256 `{data['sha256'][:12]}`, estimator `{data['estimator']}`"
        )
    lines += ["", "Parameters:", "", "```json", json.dumps(report["params"], indent=2, sort_keys=True), "```", ""]
    summary = report["summary"]
    if summary:
        lines += ["## Diagnostics (medians over modules)", ""]
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items()]
        lines.append("")
    if metrics_row:
        lines += ["## Evaluation", ""]
        for key in ("safety", "over_refusal", "utility"):
            value = metrics_row.get(key)
            if isinstance(value, dict):
                rate = value.get("rate", value.get("value"))
                lines.append(
                    f"- {key}: {rate} (n = {value.get('n')}, 95% CI {value.get('ci_low')}–{value.get('ci_high')})"
                )
        lines.append("")
    lines += [
        "Load with:",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'path/to/this/folder')",
        "```",
        "",
    ]
    return "\n".join(lines)
