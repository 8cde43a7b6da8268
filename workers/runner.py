"""Run one delivery of a job: claim it, resolve its inputs, call `run_merge`, store the artifacts, record the
outcome. Each attempt works in a fresh folder and writes under its own storage prefix; the job row points at
a prefix only once all its files are stored, so a re-run never exposes a partial or mixed set.

A job stops (between batches of every pass) when it is cancelled, when another delivery took it over, or when its
time limit passes (failed: `time_limit_exceeded`); a full disk fails it with `insufficient_storage`. A database
that is briefly unreachable does not fail the job: progress is best effort, and the outcome is recorded once the
database answers again (else the delivery gives up and the job is re-run after its lease)."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy.exc import OperationalError

from app.domain import artifacts, base_models
from app.domain.db.session import session_scope
from app.domain.errors import DomainError
from app.domain.health import space_shortfall
from app.domain.job_spec import build_spec, public_message
from app.domain.job_state import NON_FINITE, TIME_LIMIT, Claim, Heartbeat, JobStore, ProgressWriter, non_finite_at
from app.domain.requests import MergeRequest
from app.domain.settings import Settings
from app.domain.storage import Storage, StorageFull
from sstmerge_core.cache import FisherCache
from sstmerge_core.contracts.search_report import SearchReport
from sstmerge_core.contracts.summary import (
    MergeArtifacts,
    MergeJobSummary,
    SearchArtifacts,
    SearchChoice,
    SearchJobSummary,
    SearchRecommendation,
    SearchResult,
)
from sstmerge_core.errors import Cancelled, InputError
from sstmerge_core.jobspec import MergeSpec
from sstmerge_core.pipeline import MergeOutcome, ModelCache, run_merge
from sstmerge_core.progress import ProgressFn
from sstmerge_core.search.runner import SearchOutcome, run_search
from sstmerge_core.specfile import InputNames

from .inputs import InputCache

log = logging.getLogger(__name__)
INTERNAL_MESSAGE = "the job failed on an internal error of the service (logged with the job's id)"


def zip_folder(folder: Path, destination: Path) -> None:
    """Zip the files of a PEFT folder at the archive's top level."""
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())


def _adapter_folders(outcome: MergeOutcome, method: str) -> dict[str, dict[float, Path]]:
    folders = {method: dict(outcome.adapter_dirs)}
    baselines = outcome.out_dir / "baselines"
    for name in outcome.summary.compare_with:
        folders[name] = {
            alpha: baselines / name / path.name
            for alpha, path in outcome.adapter_dirs.items()
            if (baselines / name / path.name).is_dir()
        }
    return folders


def store_artifacts(storage: Storage, outcome: MergeOutcome, method: str, prefix: str, scratch: Path) -> MergeArtifacts:
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
        (outcome.html_path, artifacts.HTML),
    ):
        if path is not None and path.is_file():
            storage.put_file(f"{prefix}/{name}", path)
            files.append(name)
    recommended = outcome.summary.recommended
    chosen_alpha = recommended.alpha if recommended is not None else None
    return MergeArtifacts(adapters=adapters, files=files, recommended_alpha=chosen_alpha)


def store_search_artifacts(storage: Storage, outcome: SearchOutcome, prefix: str, scratch: Path) -> SearchArtifacts:
    """Upload a search's files and the chosen recipe's adapter (if any) under `prefix`; returns the manifest."""
    files: list[str] = []
    adapters: dict[str, list[float]] = {}
    chosen = outcome.chosen
    if chosen is not None and outcome.adapter_dir is not None:
        method, alpha = chosen.recipe.method, chosen.recipe.alpha
        archive = scratch / artifacts.adapter_zip(method, alpha)
        zip_folder(outcome.adapter_dir, archive)
        storage.put_file(f"{prefix}/{archive.name}", archive)
        files.append(archive.name)
        adapters[method] = [alpha]
    for name in (artifacts.SEARCH_REPORT, artifacts.TRIALS, artifacts.PLOT, artifacts.REPORT, artifacts.HTML):
        path = outcome.out_dir / name
        if path.is_file():
            storage.put_file(f"{prefix}/{name}", path)
            files.append(name)
    return SearchArtifacts(
        adapters=adapters,
        files=files,
        recommended_alpha=chosen.recipe.alpha if chosen else None,
        recommended_method=chosen.recipe.method if chosen else None,
    )


def search_summary(outcome: SearchOutcome) -> SearchJobSummary:
    """What a search job's summary says: the choice (recipe, search and report numbers, against linear at the same
    safety), or why there is none."""
    report = SearchReport.model_validate(outcome.report)
    chosen, choice, recommended = report.chosen, None, None
    if chosen is not None:
        choice = SearchChoice.model_validate(chosen.model_dump(include=set(SearchChoice.model_fields)))
        recommended = SearchRecommendation(
            label=chosen.label, method=chosen.recipe["method"], alpha=chosen.recipe["params"]["alphas"][0]
        )
    return SearchJobSummary(
        search=SearchResult(
            trials=report.trials,
            splits=report.splits.sizes,
            chosen=choice,
            reason=report.reason,
            warning=report.warning,
            price_list=report.price_list,
        ),
        recommended=recommended,
    )


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))


class RunHooks(TypedDict):
    """What `run_merge` and `run_search` take from the worker besides the job: progress, cancellation, the warm
    model and the inputs' public names."""

    progress: ProgressFn
    should_cancel: Callable[[], bool]
    model_cache: ModelCache
    names: InputNames


class JobRunner:
    def __init__(self, settings: Settings, storage: Storage, model_cache: ModelCache) -> None:
        self.settings, self.storage, self.model_cache = settings, storage, model_cache
        self.store = JobStore.from_settings(settings)
        self.inputs = InputCache(storage, settings.resolved_work_dir / "inputs", settings.input_cache_max_bytes)
        self.fisher_cache = FisherCache(settings.resolved_cache_dir / "fisher")

    def _spec(self, claim: Claim) -> tuple[MergeSpec, dict[str, str]]:
        """The job's `MergeSpec` on its fetched inputs, and the names the written documents use for them (the
        adapter and dataset ids and the base model as requested), so that no server path reaches an artifact."""
        body = MergeRequest.model_validate(claim.request)
        base = base_models.resolve(self.settings, body.base_model)
        names = {base.spec_value: body.base_model}
        judge = None
        if body.evaluation is not None:  # the judge's classifier obeys the Hub switch and the model folders
            judge, classifier = base_models.resolve_judge(self.settings, body.evaluation.judge)
            if classifier is not None:
                names[classifier.spec_value] = classifier.name

        def named(path: Path, ident: str) -> str:
            names[str(path)] = ident
            return str(path)

        with session_scope(self.settings.resolved_database_url) as session:
            spec = build_spec(
                body,
                base.spec_value,
                lambda ident: named(self.inputs.adapter(session, claim.tenant, ident), ident),
                lambda ident: named(self.inputs.dataset(session, claim.tenant, ident), ident),
                judge=judge,
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
        prefix = f"{artifacts.job_root(claim.tenant, job_id)}/{claim.token}"
        log.info("job started", extra={"job_id": job_id, "attempt": claim.attempt})
        try:
            with self.inputs.in_use(), Heartbeat(self.store, claim, self.settings.heartbeat_seconds) as heartbeat:
                self._execute(claim, heartbeat, work, prefix)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.trim_caches()

    def trim_caches(self) -> None:
        """Keep the input and Fisher caches under their caps, and drop inputs deleted since they were fetched."""
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                self.inputs.prune_deleted(session)
            self.inputs.trim()
            self.fisher_cache.trim(self.settings.fisher_cache_max_bytes)
        except Exception:  # noqa: BLE001 - housekeeping never fails a job
            log.warning("cache trim failed", exc_info=True)

    def _finish(self, claim: Claim, status: str, **outcome: Any) -> bool:
        """`JobStore.finish`, retried while the database is unreachable (for up to a lease or 30 s)."""
        deadline = time.monotonic() + max(self.settings.job_lease_seconds, 30.0)
        delay = 0.5
        while True:
            try:
                return self.store.finish(claim, status, **outcome)
            except OperationalError:
                if time.monotonic() > deadline:
                    raise
                log.warning("outcome not recorded yet: database unreachable", extra={"job_id": claim.job_id})
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _fail(self, claim: Claim, prefix: str, code: str, message: str) -> None:
        self.storage.delete_prefix(prefix)
        self._finish(claim, "failed", error_code=code, error_message=message[:2000])

    def _public(self, message: str, names: dict[str, str]) -> str:
        """An error message without server paths: inputs named by their ids, other paths cut to their file name."""
        s = self.settings
        dirs = [s.data_dir, s.resolved_work_dir, s.resolved_storage_dir, s.resolved_cache_dir, *s.model_dirs]
        return public_message(message, names, dirs)

    def _run(
        self, claim: Claim, heartbeat: Heartbeat, spec: MergeSpec, names: dict[str, str], work: Path, prefix: str
    ) -> MergeJobSummary | SearchJobSummary:
        """The merge (or the search) of the job, its artifacts stored: its summary, with their manifest."""
        common = RunHooks(
            progress=ProgressWriter(self.store, claim),
            should_cancel=heartbeat.should_cancel,
            model_cache=self.model_cache,
            names=names,
        )
        search = MergeRequest.model_validate(claim.request).search
        if search is not None:

            def on_trial(trial: dict) -> None:
                brief = {k: v for k, v in trial.items() if k not in ("recipe", "repair")}
                self.store.record_event(claim, "trial", json.dumps(brief, ensure_ascii=False))

            found = run_search(spec, search, work / "out", on_trial=on_trial, **common)
            if heartbeat.should_cancel():
                raise Cancelled("cancelled after the last stage")
            manifest = store_search_artifacts(self.storage, found, prefix, work)
            return search_summary(found).model_copy(update={"artifacts": manifest})
        outcome = run_merge(spec, work / "out", **common)
        if heartbeat.should_cancel():
            raise Cancelled("cancelled after the last stage")
        stored = store_artifacts(self.storage, outcome, spec.method, prefix, work)
        return outcome.summary.model_copy(update={"artifacts": stored})

    def _execute(self, claim: Claim, heartbeat: Heartbeat, work: Path, prefix: str) -> None:
        names: dict[str, str] = {}
        if (reason := space_shortfall(self.settings, self.storage)) is not None:
            self._fail(claim, prefix, "insufficient_storage", f"the job was not started: {reason}")
            return
        try:
            spec, names = self._spec(claim)
            summary = self._run(claim, heartbeat, spec, names, work, prefix)
        except Cancelled as exc:
            if heartbeat.timed_out:
                self._fail(claim, prefix, TIME_LIMIT, f"{self.store.time_limit_message()} ({exc})")
                return
            self.storage.delete_prefix(prefix)
            self._finish(claim, "cancelled", reason=str(exc))
            return
        except (InputError, DomainError) as exc:  # the job's inputs are wrong (a base model no longer offered, …)
            self._fail(claim, prefix, exc.code, self._public(str(exc), names))
            return
        except OperationalError:  # the database, not the job: the delivery is retried, or the job re-run
            self.storage.delete_prefix(prefix)
            raise
        except Exception as exc:
            if disk_full(exc):
                self._fail(claim, prefix, "insufficient_storage", self._public(f"the disk is full: {exc}", names))
                return
            log.exception("job crashed", extra={"job_id": claim.job_id, "error": type(exc).__name__})
            self._fail(claim, prefix, "internal_error", INTERNAL_MESSAGE)  # the exception is logged, not served
            return
        if (where := non_finite_at(summary.model_dump(mode="json"))) is not None:  # before anything is recorded
            self._fail(claim, prefix, NON_FINITE, f"the job's result holds a non-finite value ({where})")
            return
        if self._finish(claim, "succeeded", summary=summary, artifact_prefix=prefix):
            parent = prefix.rsplit("/", 1)[0]
            for key in self.storage.list(parent):  # artifacts of earlier attempts
                if not key.startswith(prefix + "/"):
                    self.storage.delete_prefix(key.rsplit("/", 1)[0])
        else:
            self.storage.delete_prefix(prefix)
