"""Run one delivery of a job: claim it, resolve its inputs, call `run_merge`, store the artifacts, record the
outcome. Each attempt works in a fresh folder and writes under its own storage prefix; the job row points at
a prefix only once all its files are stored, so a re-run never exposes a partial or mixed set."""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

from app.domain import artifacts, base_models
from app.domain.db.session import session_scope
from app.domain.errors import DomainError
from app.domain.job_spec import build_spec
from app.domain.job_state import Claim, Heartbeat, JobStore, ProgressWriter
from app.domain.requests import MergeRequest
from app.domain.settings import Settings
from app.domain.storage import Storage
from sstmerge_core.errors import Cancelled, InputError
from sstmerge_core.jobspec import MergeSpec
from sstmerge_core.pipeline import MergeOutcome, ModelCache, run_merge

from .inputs import InputCache

log = logging.getLogger(__name__)


def zip_folder(folder: Path, destination: Path) -> None:
    """Zip the files of a PEFT folder at the archive's top level."""
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())


def _adapter_folders(outcome: MergeOutcome, method: str) -> dict[str, dict[float, Path]]:
    folders = {method: dict(outcome.adapter_dirs)}
    baselines = outcome.out_dir / "baselines"
    for name in outcome.summary.get("compare_with", []):
        folders[name] = {
            alpha: baselines / name / path.name
            for alpha, path in outcome.adapter_dirs.items()
            if (baselines / name / path.name).is_dir()
        }
    return folders


def store_artifacts(storage: Storage, outcome: MergeOutcome, method: str, prefix: str, scratch: Path) -> dict:
    """Upload every artifact under `prefix`; returns the manifest that goes into the job's summary."""
    files: list[str] = []
    adapters: dict[str, list[float]] = {}
    for name, by_alpha in _adapter_folders(outcome, method).items():
        adapters[name] = sorted(by_alpha)
        for alpha, folder in by_alpha.items():
            archive = scratch / artifacts.adapter_zip(name, alpha)
            zip_folder(folder, archive)
            storage.put_file(f"{prefix}/{archive.name}", archive)
            files.append(archive.name)
    for path, name in (
        (outcome.report_path, artifacts.REPORT),
        (outcome.metrics_path, artifacts.METRICS),
        (outcome.plot_path, artifacts.PLOT),
    ):
        if path is not None and path.is_file():
            storage.put_file(f"{prefix}/{name}", path)
            files.append(name)
    recommended = outcome.summary.get("recommended") or {}
    return {"adapters": adapters, "files": files, "recommended_alpha": recommended.get("alpha")}


class JobRunner:
    def __init__(self, settings: Settings, storage: Storage, model_cache: ModelCache) -> None:
        self.settings, self.storage, self.model_cache = settings, storage, model_cache
        self.store = JobStore(settings.resolved_database_url, settings.job_lease_seconds, settings.max_attempts)
        self.inputs = InputCache(storage, settings.resolved_work_dir / "inputs")

    def _spec(self, claim: Claim) -> tuple[MergeSpec, dict[str, str]]:
        """The job's `MergeSpec` on its fetched inputs, and the names the written documents use for them (the
        adapter and dataset ids and the base model as requested), so that no server path reaches an artifact."""
        body = MergeRequest.model_validate(claim.request)
        base = base_models.resolve(self.settings, body.base_model)
        names = {base.spec_value: body.base_model}

        def named(path: Path, ident: str) -> str:
            names[str(path)] = ident
            return str(path)

        with session_scope(self.settings.resolved_database_url) as session:
            spec = build_spec(
                body,
                base.spec_value,
                lambda ident: named(self.inputs.adapter(session, claim.tenant, ident), ident),
                lambda ident: named(self.inputs.dataset(session, claim.tenant, ident), ident),
                device=self.settings.device,
                dtype=self.settings.dtype,
                cache_dir=str(self.settings.resolved_cache_dir),
            )
        return spec, names

    def run(self, job_id: str) -> None:
        claim = self.store.claim(job_id)
        if claim is None:
            return
        jobs_dir = self.settings.resolved_work_dir / "jobs"
        for old in jobs_dir.glob(f"{job_id}-*"):  # folders of earlier, dead attempts
            shutil.rmtree(old, ignore_errors=True)
        work = jobs_dir / f"{job_id}-{claim.token}"
        work.mkdir(parents=True)
        prefix = f"tenants/{claim.tenant}/jobs/{job_id}/{claim.token}"
        log.info("job started", extra={"job_id": job_id, "attempt": claim.attempt})
        try:
            with Heartbeat(self.store, claim, self.settings.heartbeat_seconds) as heartbeat:
                self._execute(claim, heartbeat, work, prefix)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _execute(self, claim: Claim, heartbeat: Heartbeat, work: Path, prefix: str) -> None:
        try:
            spec, names = self._spec(claim)
            outcome = run_merge(
                spec,
                work / "out",
                progress=ProgressWriter(self.store, claim),
                should_cancel=heartbeat.should_cancel,
                model_cache=self.model_cache,
                names=names,
            )
            if heartbeat.should_cancel():
                raise Cancelled("cancelled after the last stage")
            manifest = store_artifacts(self.storage, outcome, spec.method, prefix, work)
        except Cancelled:
            self.storage.delete_prefix(prefix)
            self.store.finish(claim, "cancelled")
            return
        except (InputError, DomainError) as exc:  # the job's inputs are wrong (a base model no longer offered, …)
            self.storage.delete_prefix(prefix)
            self.store.finish(claim, "failed", error_code=exc.code, error_message=str(exc))
            return
        except Exception as exc:
            log.exception("job crashed", extra={"job_id": claim.job_id})
            self.storage.delete_prefix(prefix)
            self.store.finish(
                claim, "failed", error_code="internal_error", error_message=f"{type(exc).__name__}: {exc}"[:2000]
            )
            return
        if self.store.finish(
            claim, "succeeded", summary={**outcome.summary, "artifacts": manifest}, artifact_prefix=prefix
        ):
            parent = prefix.rsplit("/", 1)[0]
            for key in self.storage.list(parent):  # artifacts of earlier attempts
                if not key.startswith(prefix + "/"):
                    self.storage.delete_prefix(key.rsplit("/", 1)[0])
        else:
            self.storage.delete_prefix(prefix)
