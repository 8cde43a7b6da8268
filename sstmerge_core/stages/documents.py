"""Reporting: once every adapter is written and evaluated, the documents beside them — metrics.json, plot.png and
report.html, and in every adapter folder its model card (README.md), its merge_spec.json and its method's
merge_report.json; at the top, the job's merge_report.json and merge_spec.json."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..card import model_card
from ..contracts.metrics import Metrics
from ..htmlreport import REPORT_HTML, merge_view, render_page
from ..jobspec import DATA_INPUTS
from ..methods.catalog import REPAIRS
from ..report import build_report, package_version
from ..specfile import SPEC_FILE, InputNames, base_model_name, display_name, input_hashes, write_spec_file
from .evaluation import EvaluationResult
from .fisher import FisherResult
from .inputs import LoadedInputs, fisher_params
from .writing import WrittenAdapters

REPORT_FILE = "merge_report.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "plot.png"


@dataclass(frozen=True)
class JobDocuments:
    """The job's top-level documents, relative to its folder (metrics and plot only when evaluated)."""

    report: Mapping
    report_file: str = REPORT_FILE
    spec_file: str = SPEC_FILE
    metrics_file: str | None = None
    plot_file: str | None = None
    html_file: str | None = None


def inputs_section(loaded: LoadedInputs, names: InputNames | None) -> dict:
    """The report's `inputs`: base model and adapters as the caller named them, adapter hashes, data summaries."""

    def adapter(given, weighted) -> dict:
        factors = weighted.adapter.modules.values()
        return {
            "name": weighted.adapter.name,
            "source": display_name(given.path, names),
            "sha256": weighted.adapter.sha256,
            "weight": weighted.weight,
            "rank": max(f.rank for f in factors),
            "modules": len(weighted.adapter.modules),
        }

    spec = loaded.spec
    return {
        "base_model": display_name(spec.base_model, names),
        "utility_adapters": [adapter(g, w) for g, w in zip(spec.utility, loaded.utility, strict=True)],
        "safety_adapters": [adapter(g, w) for g, w in zip(spec.safety, loaded.safety, strict=True)],
        "data": {role: data.summary() for role, data in loaded.fisher_data.items()},
    }


def known_hashes(loaded: LoadedInputs) -> dict[str, str]:
    """The sha256 of every input read at loading, by its value in the spec."""
    spec = loaded.spec
    hashes = {given.path: weighted.adapter.sha256 for _, given, weighted in loaded.adapters}
    for role, data in loaded.fisher_data.items():
        path = spec.utility_data if role == "utility" else spec.safety_data
        if path is not None:  # None when the spec (a search's chosen recipe) no longer reads it
            hashes[path] = data.file_sha256
    if loaded.evaluation is not None:
        for key, digest in loaded.evaluation.file_sha256.items():
            hashes[getattr(spec.evaluation, key)] = digest
    if loaded.ref.is_local:
        hashes[spec.base_model] = loaded.model_fingerprint
    return hashes


def input_rows(spec, hashes: Mapping[str, str], names: InputNames | None) -> list[dict]:
    """Every input of `spec` as the report lists it: {"role", "name" (as the caller named it), "sha256"}."""
    rows = [("base model", spec.base_model)]
    rows += [("utility adapter", a.path) for a in spec.utility] + [("safety adapter", a.path) for a in spec.safety]
    for role in DATA_INPUTS:
        rows.append((role.replace("_", " "), getattr(spec, role)))
    if spec.evaluation is not None:
        rows += [
            (f"evaluation file: {key}", getattr(spec.evaluation, key)) for key in ("harmful", "benign", "utility_eval")
        ]
    return [
        {"role": role, "name": display_name(value, names), "sha256": hashes.get(value, "")}
        for role, value in rows
        if value is not None
    ]


def write_html_report(root: Path, metrics: Metrics, inputs: list[dict], *, method: str, created_at: str) -> None:
    """report.html of an evaluated job, with its plot inlined (`htmlreport`)."""
    from ..files import write_atomic

    plot = root / PLOT_FILE
    view = merge_view(
        metrics,
        plot_png=plot.read_bytes() if plot.is_file() else None,
        inputs=inputs,
        title=f"sstmerge report: {method} merge",
        subtitle=f"Written {created_at} by sstmerge {package_version()}. The recommendation is chosen on the search "
        "split and reported on the report split, which it never saw.",
    )
    write_atomic(root / REPORT_HTML, render_page(view).encode("utf-8"))


def data_unread_by(spec) -> dict:
    """The data inputs a re-run of one adapter of a method without data passes does not read (those the repair step
    reads are kept)."""
    kept = REPAIRS[spec.repair.method].inputs if spec.repair is not None else ()
    return {key: None for key in ("utility_data", "safety_data") if key not in kept}


def _model_dtype(loaded: LoadedInputs) -> str:
    return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")


def write_documents(
    root: Path,
    *,
    loaded: LoadedInputs,
    written: Sequence[WrittenAdapters],
    fisher: FisherResult | None,
    evaluation: EvaluationResult | None,
    timings: Mapping[str, float],
    estimated: Mapping[str, float],
    created_at: str,
    names: InputNames | None = None,
    final_root: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> JobDocuments:
    """Write every document into `root` (which will be moved to `final_root`: relative input paths in the spec
    files are written from there). The first of `written` is the job's own method."""
    final_root = final_root or root
    spec = loaded.spec
    metrics = evaluation.metrics if evaluation is not None else None
    if metrics is not None:
        from ..evaluation.runner import write_outputs

        write_outputs(metrics, root / METRICS_FILE, root / PLOT_FILE)
    inputs = inputs_section(loaded, names)
    hashes = input_hashes(spec, known=known_hashes(loaded))
    pass_params = fisher_params(spec)
    spec_options: dict[str, Any] = dict(
        names=names, version=package_version(), dtype=_model_dtype(loaded), hashes=hashes
    )
    base_model = base_model_name(spec.base_model, names)

    reports = []
    for done, adapters in enumerate(written, start=1):
        merged = adapters.merged
        report = build_report(
            merged=merged,
            inputs=inputs,
            fisher=fisher.summary(pass_params.damping)
            if fisher is not None and pass_params is not None and merged.method.needs_fisher
            else None,
            timings=timings,
            estimated=estimated,
            recommended=evaluation.recommended if evaluation is not None else None,
            evaluated=evaluation is not None,
            created_at=created_at,
            spec_file=SPEC_FILE,
        )
        reports.append(report)
        for alpha, folder in adapters.dirs.items():
            (root / folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
            one = spec.model_copy(
                update={
                    "method": merged.name,
                    "params": {**merged.params.model_dump(), "alphas": [alpha]},
                    "compare_with": [],
                    **({} if merged.method.needs_fisher else data_unread_by(spec)),
                }
            )
            write_spec_file(root / folder / SPEC_FILE, one, folder=final_root / folder, **spec_options)
            card = model_card(
                report=report,
                alpha=alpha,
                base_model=base_model,
                label=merged.label(alpha),
                metrics=metrics,
                spec_file=SPEC_FILE,
            )
            (root / folder / "README.md").write_text(card, encoding="utf-8")
        if progress is not None:
            progress(done, len(written))

    if metrics is not None:
        rows = input_rows(spec, hashes, names)
        write_html_report(root, metrics, rows, method=written[0].merged.name, created_at=created_at)
    job = spec.model_copy(update={"params": written[0].merged.params.model_dump()})
    write_spec_file(root / SPEC_FILE, job, folder=final_root, **spec_options)
    (root / REPORT_FILE).write_text(json.dumps(reports[0], indent=2))
    return JobDocuments(
        report=reports[0],
        metrics_file=METRICS_FILE if metrics is not None else None,
        plot_file=PLOT_FILE if metrics is not None and (root / PLOT_FILE).is_file() else None,
        html_file=REPORT_HTML if metrics is not None else None,
    )
