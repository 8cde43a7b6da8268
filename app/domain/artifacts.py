"""Names of a job's artifacts in storage (written by the worker, served by the API).

A successful attempt's files live under `Job.artifact_prefix` (`tenants/<t>/jobs/<job>/<attempt token>`), and
the summary's `artifacts` lists them (`contracts.summary.MergeArtifacts`, `SearchArtifacts`: the α of every adapter
by method, the other files by name, the recommended α and, for a search, method). An evaluated job also stores
`report.html`; a search job stores the chosen recipe's adapter, `search_report.json` and `trials.json`.
"""

from __future__ import annotations

import math

from pydantic import TypeAdapter

from sstmerge_core.contracts.summary import JobSummary, MergeArtifacts, SearchArtifacts

from .db.models import Job
from .errors import Conflict, InvalidInput, NotFound

METRICS = "metrics.json"
PLOT = "plot.png"
HTML = "report.html"
REPORT = "merge_report.json"
SEARCH_REPORT = "search_report.json"
TRIALS = "trials.json"


def job_root(tenant: str, job_id: str) -> str:
    """The storage prefix of everything a job stores: one folder per attempt below it."""
    return f"tenants/{tenant}/jobs/{job_id}"


def adapter_zip(method: str, alpha: float) -> str:
    return f"adapter-{method}-alpha-{alpha:g}.zip"


_SUMMARY: TypeAdapter[JobSummary] = TypeAdapter(JobSummary)


def _manifest(job: Job) -> MergeArtifacts | SearchArtifacts:
    """The stored files of a succeeded job (409 `not_ready` before it has succeeded)."""
    if job.status != "succeeded" or not job.artifact_prefix or not job.summary:
        raise Conflict(
            f"merge {job.id} is {job.status}; artifacts exist once it has succeeded",
            code="not_ready",
            details={"status": job.status},
        )
    manifest = _SUMMARY.validate_python(job.summary).artifacts
    return manifest if manifest is not None else MergeArtifacts(adapters={}, files=[], recommended_alpha=None)


def _recommended_method(manifest: MergeArtifacts | SearchArtifacts) -> str | None:
    return manifest.recommended_method if isinstance(manifest, SearchArtifacts) else None


def artifact_key(job: Job, name: str) -> str:
    """The storage key of artifact `name` of a succeeded job, or 404 if this job has none such."""
    if name not in _manifest(job).files:
        raise NotFound(
            f"merge {job.id} has no {name}"
            + (" (the job ran without evaluation)" if name in (METRICS, PLOT, HTML) else "")
            + (" (the job was not a search)" if name in (SEARCH_REPORT, TRIALS) else "")
        )
    return f"{job.artifact_prefix}/{name}"


def adapter_key(job: Job, alpha: float | None, method: str | None = None) -> tuple[str, str]:
    """(storage key, download name) of the adapter merged by `method` (default: the recommended model's, else the
    job's) at `alpha` (default: the only α, else the recommended one)."""
    manifest = _manifest(job)
    chosen_method = _recommended_method(manifest) or job.request.get("method", "sst")
    method = method or chosen_method
    if method not in manifest.adapters:
        raise NotFound(
            f"merge {job.id} has no adapter of method {method!r}", details={"methods": sorted(manifest.adapters)}
        )
    alphas = manifest.adapters[method]
    if alpha is None:
        recommended = manifest.recommended_alpha if method == chosen_method else None
        if len(alphas) == 1:
            alpha = alphas[0]
        elif recommended is not None:
            alpha = recommended
        else:
            raise InvalidInput(
                "this job swept several α; pass ?alpha=", code="alpha_required", details={"alphas": alphas}
            )
    match = [a for a in alphas if math.isclose(a, alpha, rel_tol=1e-9, abs_tol=1e-12)]
    if not match:
        raise NotFound(f"merge {job.id} has no {method} adapter for α={alpha:g}", details={"alphas": alphas})
    name = adapter_zip(method, match[0])
    return artifact_key(job, name), f"{job.id}-{name}"
