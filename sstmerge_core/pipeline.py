"""One merge job end to end, as a short sequence of stages with typed results (`sstmerge_core.stages`):

    loading → Fisher factors (cached) → merges (every method and α, in memory) → adapter folders → evaluation
    → documents (metrics, plot, model cards, merge_spec.json, merge_report.json)

Shared by the CLI, the Python API and the service's workers. Output is written to a staging folder and moved
into place at the end; progress is weighted by each stage's expected cost (`sstmerge_core.progress`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contracts.summary import MergeJobSummary
from .jobspec import MergeSpec
from .modeling import num_layers
from .progress import JobProgress, MergeRun, ProgressFn, constants_for, merge_cost, stage_costs
from .report import now_iso
from .specfile import InputNames
from .stages.documents import JobDocuments, write_documents
from .stages.evaluation import evaluate_adapters
from .stages.fisher import FisherResult, compute_fisher
from .stages.inputs import LoadedInputs, ModelCache, load_inputs
from .stages.merging import MergedUpdates, merge_plan, merge_updates
from .stages.repair import repair_updates
from .stages.sizes import job_sizes
from .stages.writing import AdapterTarget, WrittenAdapters, adapter_target, write_adapter_weights

__all__ = ["MergeOutcome", "ModelCache", "ProgressFn", "run_merge"]


@dataclass
class MergeOutcome:
    summary: MergeJobSummary
    out_dir: Path
    adapter_dirs: dict[float, Path]
    report_path: Path
    metrics_path: Path | None = None
    plot_path: Path | None = None
    spec_path: Path | None = None
    html_path: Path | None = None
    baseline_dirs: dict[str, dict[float, Path]] | None = None


def run_merge(
    spec: MergeSpec,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    model_cache: ModelCache | None = None,
    names: InputNames | None = None,
) -> MergeOutcome:
    """Run the job described by `spec`, writing into `out_dir` atomically; returns where everything is.

    Layout: `alpha-{α}/` (PEFT adapter + README.md + merge_report.json + merge_spec.json per α),
    `merge_report.json`, `merge_spec.json`, `baselines/{method}/alpha-{α}/` for `compare_with`, and `metrics.json`,
    `plot.png` and `report.html` when evaluated. `names` maps input paths of `spec` to the names written into the
    documents (the service's ids); unnamed inputs are written as given. Raises `InputError` for bad inputs and
    `Cancelled` when `should_cancel()` turns true (checked between stages and every few seconds within one).
    """
    out_dir = Path(out_dir).resolve()
    track = JobProgress(progress, should_cancel)
    created_at = now_iso()
    with staging_folder(out_dir) as staging:
        track.begin("loading")
        loaded = load(spec, model_cache, track, names)
        fisher = compute_fisher(loaded, progress=track) if loaded.fisher_data else None
        merges = merge_and_repair(loaded, fisher, track)
        fisher = fisher.without_factors() if fisher is not None else None
        track.begin("writing")
        written = write_all(staging, merges, adapter_target(loaded, names), track)
        del merges  # `written` keeps each merge's shapes and diagnostics; evaluation reads the values back from disk
        evaluation = None
        if loaded.evaluation is not None:
            track.begin("evaluating")
            evaluation = evaluate_adapters(loaded, staging, written, progress=track.advance)
        track.begin("reporting")
        documents = write_documents(
            staging,
            loaded=loaded,
            written=written,
            fisher=fisher,
            evaluation=evaluation,
            timings=track.timings,
            estimated={stage: cost.total for stage, cost in track.costs.items()},
            created_at=created_at,
            names=names,
            final_root=out_dir,
            progress=track.advance,
        )
        track.finish()
    return outcome(out_dir, documents, written, track.timings)


def load(
    spec: MergeSpec, model_cache: ModelCache | None, track: JobProgress, names: InputNames | None = None
) -> LoadedInputs:
    """The loading stage; once the inputs are known, the progress plan is set from the job's sizes."""
    loaded = load_inputs(spec, model_cache=model_cache, names=names)
    track.plan(stage_costs(job_sizes(loaded), constants_for(loaded.device)))
    return loaded


def merge_and_repair(loaded: LoadedInputs, fisher: FisherResult | None, track: JobProgress) -> list[MergedUpdates]:
    """The merging stage, then the repair stage when the job asks for it."""
    track.begin("merging")
    merges = merge_all(loaded, fisher, track)
    if loaded.repair is None:
        return merges
    track.begin("repairing")
    return repair_all(loaded, merges, track)


def merge_all(loaded: LoadedInputs, fisher: FisherResult | None, track: JobProgress) -> list[MergedUpdates]:
    """The job's method, then each compare_with method; progress weighted by each method's expected cost."""
    plan = merge_plan(loaded.spec)
    shapes = [m.shape for m in loaded.modules.values()]
    k = constants_for(loaded.device)
    weights = [merge_cost(shapes, [MergeRun(len(p.alphas), m.info.dense)], k).total for m, p, _ in plan]
    total = sum(weights) or 1.0
    merges, layers = [], num_layers(loaded.model)
    for i, (method, params, role) in enumerate(plan):
        before, weight = sum(weights[:i]), weights[i]

        def advance(done: int, count: int, before: float = before, weight: float = weight) -> None:
            track.advance(before + weight * done / max(count, 1), total)

        factors = fisher.factors if fisher is not None and method.needs_fisher else None
        merges.append(
            merge_updates(loaded.modules, method, params, factors, role=role, num_layers=layers, progress=advance)
        )
    return merges


def repair_all(loaded: LoadedInputs, merges: list[MergedUpdates], track: JobProgress) -> list[MergedUpdates]:
    """The repair step on every method's merged models; progress counts the models repaired."""
    total = sum(len(m.alphas) for m in merges)
    repaired: list[MergedUpdates] = []
    for merged in merges:
        before = sum(len(m.alphas) for m in repaired)

        def advance(done: float, _count: float, before: int = before) -> None:
            track.advance(before + done, total)

        repaired.append(repair_updates(loaded.model, loaded.tokenizer, merged, loaded.repair, progress=advance))
    return repaired


def write_all(
    root: Path, merges: list[MergedUpdates], target: AdapterTarget, track: JobProgress
) -> list[WrittenAdapters]:
    """Every method's adapter folders; progress counts the folders written over all methods."""
    total = sum(len(m.alphas) for m in merges)
    written: list[WrittenAdapters] = []
    for merged in merges:
        before = sum(len(w.dirs) for w in written)

        def advance(done: int, _count: int, before: int = before) -> None:
            track.advance(before + done, total)

        written.append(write_adapter_weights(root, merged, target, progress=advance))
    return written


def outcome(out_dir: Path, documents: JobDocuments, written: list[WrittenAdapters], timings: dict) -> MergeOutcome:
    """Where everything is, and the summary a service stores with the job."""
    main, baselines = written[0], written[1:]
    report = documents.report
    summary: dict[str, Any] = {
        "method": main.merged.name,
        "alphas": main.merged.alphas,
        "modules": report["summary"].get("modules"),
        "adapters": {f"{a:g}": str(d) for a, d in main.dirs.items()},
        "timings_s": timings,
        "diagnostics": report["summary"],
        "compare_with": [w.merged.name for w in baselines],
    }
    if "evaluation" in report:
        summary["recommended"] = report["evaluation"]["recommended"]
    return MergeOutcome(
        summary=MergeJobSummary.model_validate(summary),
        out_dir=out_dir,
        adapter_dirs={a: out_dir / d for a, d in main.dirs.items()},
        report_path=out_dir / documents.report_file,
        metrics_path=out_dir / documents.metrics_file if documents.metrics_file else None,
        plot_path=out_dir / documents.plot_file if documents.plot_file else None,
        spec_path=out_dir / documents.spec_file,
        html_path=out_dir / documents.html_file if documents.html_file else None,
        baseline_dirs={w.merged.name: {a: out_dir / d for a, d in w.dirs.items()} for w in baselines},
    )


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside `out_dir`, moved onto it when the block succeeds and removed when it fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to out_dir; an older out_dir is swapped away, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
