"""Names of a job's artifacts in storage (written by the worker, served by the API).

A successful attempt's files live under `Job.artifact_prefix` (`tenants/<t>/jobs/<job>/<attempt token>`), and
`Job.summary["artifacts"]` lists them:
`{"adapters": {"sst": [0.5, 1.0], "linear": [...]}, "files": [...], "recommended_alpha": 1.0 | null,
"recommended_method": "sst" | null}` (an evaluated job also stores `report.html`; a search job stores the chosen
recipe's adapter, `search_report.json` and `trials.json`).
"""

from __future__ import annotations

import math

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


def _manifest(job: Job) -> dict:
    if job.status != "succeeded" or not job.artifact_prefix:
        raise Conflict(
            f"merge {job.id} is {job.status}; artifacts exist once it has succeeded",
            code="not_ready",
            details={"status": job.status},
        )
    return (job.summary or {}).get("artifacts", {})


def artifact_key(job: Job, name: str) -> str:
    """The storage key of artifact `name` of a succeeded job, or 404 if this job has none such."""
    if name not in _manifest(job).get("files", []):
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
    method = method or manifest.get("recommended_method") or job.request.get("method", "sst")
    by_method: dict[str, list[float]] = manifest.get("adapters", {})
    if method not in by_method:
        raise NotFound(f"merge {job.id} has no adapter of method {method!r}", details={"methods": sorted(by_method)})
    alphas = by_method[method]
    if alpha is None:
        chosen_method = manifest.get("recommended_method") or job.request.get("method")
        recommended = manifest.get("recommended_alpha") if method == chosen_method else None
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
