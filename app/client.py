"""A small Python client of the sstmerge HTTP API: upload, submit, wait, download.

    from app.client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        utility = client.upload_adapter("chem-adapter/")            # a PEFT folder or a .zip/.tar.gz of one
        safety = client.upload_adapter("refusal-adapter.zip")
        data = client.upload_dataset("harmful_with_refusals.jsonl")
        job = client.submit({"base_model": "SmolLM2-135M-Instruct", ...})
        job = client.wait(job["id"])                                 # one streaming request; a bar on a terminal
        folder = client.download_adapter(job["id"], dest="merged/")  # the recommended α, unpacked
        print(client.metrics(job["id"])["recommended"])

Every error answer raises `ApiError` with the API's machine-readable `code` (`not_found`, `invalid_params`,
`idempotency_conflict`, …) and the HTTP `status`; `wait` raises `JobFailed` (an `ApiError` with the job's own
error code) when the job fails or is cancelled.

Waiting is one request at a time: `GET /merges/{id}/events?follow=true`, a stream of server-sent events that
the server ends when the job is finished. A dropped connection is resumed from the last event received
(`Last-Event-ID`), after a short back-off. Requests that are safe to repeat (reads, and `submit`, which always
sends an `Idempotency-Key`) are retried on connection errors; uploads only when the connection could not be
opened at all.

This module needs only httpx and rich: it imports nothing else of sstmerge, so it works without torch or the
server's packages (import-linter checks it).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, overload

import httpx

__all__ = ["ApiError", "Client", "JobFailed", "SseEvent"]

log = logging.getLogger(__name__)
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
T = TypeVar("T")


class ApiError(Exception):
    """An error answer of the API (or no answer at all: `code` `unreachable`, `status` None)."""

    def __init__(self, code: str, message: str, status: int | None = None, details: Any = None) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.code, self.message, self.status, self.details = code, message, status, details

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """The `{"error": {"code", "message", "details"}}` body of an error answer, whatever the answer was."""
        response.read()
        try:
            error = response.json()["error"]
            return cls(str(error["code"]), str(error["message"]), response.status_code, error.get("details"))
        except (ValueError, KeyError, TypeError):
            return cls(
                f"http_{response.status_code}", response.text[:500] or response.reason_phrase, response.status_code
            )


class JobFailed(ApiError):
    """`Client.wait` saw the job end `failed` or `cancelled`; `code` is the job's error code (`cancelled` for a
    cancelled job) and `job` its last state."""

    def __init__(self, job: dict) -> None:
        error = job.get("error") or {}
        code = error.get("code") or job["status"]
        super().__init__(code, error.get("message") or f"job {job['id']} {job['status']}", None, job.get("error"))
        self.job = job


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: `event` its type, `data` its payload, `id` its id (None when it has none)."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Server-sent events from the lines of a `text/event-stream` (the WHATWG parsing rules: `data` lines joined
    with newlines, comments and unknown fields ignored, an event dispatched at a blank line)."""
    event, event_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data), event_id)
            event, data, event_id = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            event_id = value


class Client:
    """The sstmerge API at `base_url`, authenticated with `api_key`. `retries`: attempts after the first for a
    request that failed to connect (or, when it is safe to repeat, failed in any transport way), and reconnections
    in a row for `wait`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retries, self.backoff = retries, backoff
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "sstmerge-client"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------------------------

    def _pause(self, attempt: int) -> None:
        time.sleep(min(self.backoff * 2**attempt, 10.0))

    def _retrying(self, send: Callable[[], T], repeatable: bool) -> T:
        """`send()`, again after a back-off when the connection failed: any transport error when the request is
        `repeatable`, else only when it could not be opened (nothing reached the server)."""
        for attempt in range(self.retries + 1):
            try:
                return send()
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error: httpx.TransportError = exc
            except httpx.TransportError as exc:
                if not repeatable:
                    raise ApiError("connection_lost", f"{type(exc).__name__}: {exc}") from exc
                error = exc
            if attempt == self.retries:
                raise ApiError("unreachable", f"{type(error).__name__}: {error}") from error
            log.info("request failed; retrying", extra={"error": repr(error), "attempt": attempt + 1})
            self._pause(attempt)
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, *, repeatable: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request; an error answer raises `ApiError`. Reads are repeatable unless said otherwise."""
        repeatable = method in ("GET", "HEAD") if repeatable is None else repeatable
        response = self._retrying(lambda: self.http.request(method, path, **kwargs), repeatable)
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _get_json(self, path: str, **kwargs: Any) -> Any:
        return self._request("GET", path, **kwargs).json()

    # --- inputs ---------------------------------------------------------------------------------------------

    def _upload(self, path: str, file_path: Path, payload: IO[bytes], filename: str, name: str | None) -> dict:
        def send() -> httpx.Response:
            payload.seek(0)
            data = {"name": name} if name else {}
            return self.http.post(path, files={"file": (filename, payload)}, data=data)

        response = self._retrying(send, repeatable=False)
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        log.info("uploaded", extra={"path": str(file_path), "id": response.json().get("id")})
        return response.json()

    def upload_adapter(self, path: str | Path, name: str | None = None) -> dict:
        """Upload a PEFT LoRA adapter: a folder (its files are zipped on the fly; sub-folders are left out) or an
        archive of one (.zip, .tar, .tar.gz, .tgz). Returns the stored adapter (`id`, `rank`, …)."""
        path = Path(path)
        if path.is_dir():
            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
                zip_folder(path, spool)
                return self._upload("/adapters", path, spool, f"{path.name}.zip", name or path.name)
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        with path.open("rb") as handle:
            return self._upload("/adapters", path, handle, path.name, name)

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict:
        """Upload a JSONL or CSV prompt set (a `prompt` column, an optional `response`). Returns the stored
        dataset (`id`, `rows`, …)."""
        path = Path(path)
        with path.open("rb") as handle:
            return self._upload("/datasets", path, handle, path.name, name)

    # --- jobs -----------------------------------------------------------------------------------------------

    def submit(self, request: dict, idempotency_key: str | None = None) -> dict:
        """Submit a merge job (the body of `POST /merges`); returns the job. An `Idempotency-Key` is always sent
        (a fresh one unless given), so a retry after a lost answer never creates a second job; the same key
        with another body raises `ApiError` `idempotency_conflict`."""
        key = idempotency_key or uuid.uuid4().hex
        return self._request("POST", "/merges", json=request, headers={"Idempotency-Key": key}, repeatable=True).json()

    def job(self, job_id: str) -> dict:
        """The job as it is now."""
        return self._get_json(f"/merges/{job_id}")

    def cancel(self, job_id: str) -> dict:
        """Ask the job to stop (at once when queued, at its next stage boundary when running)."""
        return self._request("POST", f"/merges/{job_id}/cancel", repeatable=True).json()

    def follow(
        self, job_id: str, after: int = 0, timeout: float | None = None, read_timeout: float = 60.0
    ) -> Iterator[SseEvent]:
        """The job's server-sent events from event id `after` until the stream's `end` event (included): the
        recorded events (`status`, `stage`, `log`, each once), `progress` snapshots and `end` with the job. A
        dropped connection is resumed after the last event received; `retries` reconnections in a row without an
        event raise `ApiError` `unreachable`. An `error` event raises `ApiError`; `TimeoutError` after `timeout`
        seconds (checked at every line, so at least every 15 s: the server's heartbeat)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id, failures = after, 0
        http_timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout)

        def lines(response: httpx.Response) -> Iterator[str]:
            for line in response.iter_lines():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                yield line

        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last_id)}
            try:
                with self.http.stream(
                    "GET", f"/merges/{job_id}/events", params={"follow": "true"}, headers=headers, timeout=http_timeout
                ) as response:
                    if 400 <= response.status_code < 500:
                        raise ApiError.from_response(response)
                    problem = f"status {response.status_code}"
                    if response.status_code < 400:
                        for event in parse_sse(lines(response)):
                            failures = 0
                            if event.id is not None:
                                last_id = int(event.id)
                            if event.event == "error":
                                error = event.json()["error"]
                                raise ApiError(error["code"], error["message"], None, error.get("details"))
                            yield event
                            if event.event == "end":
                                return
                        problem = "the stream ended before the job did (server restarting?)"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if failures >= self.retries:
                raise ApiError("unreachable", f"lost the event stream of job {job_id}: {problem}")
            log.info("event stream interrupted; resuming", extra={"job_id": job_id, "after": last_id, "why": problem})
            self._pause(failures)
            failures += 1

    def wait(self, job_id: str, progress: bool = True, timeout: float | None = None) -> dict:
        """Wait for the job to finish, with one streaming request at a time, and return it; `JobFailed` when it
        failed or was cancelled, `TimeoutError` after `timeout` seconds. With `progress`, a bar on a terminal
        (stderr), else one line per event on stderr."""
        with _Display(job_id, progress) as show:
            for event in self.follow(job_id, timeout=timeout):
                show(event)
                if event.event == "end":
                    job = event.json()
                    if job["status"] != "succeeded":
                        raise JobFailed(job)
                    return job
        raise AssertionError("unreachable")  # follow() ends with `end` or raises

    # --- results --------------------------------------------------------------------------------------------

    @overload
    def download_adapter(
        self, job_id: str, method: str | None = None, alpha: float | None = None, dest: None = None
    ) -> bytes: ...

    @overload
    def download_adapter(
        self, job_id: str, method: str | None = None, alpha: float | None = None, *, dest: str | Path
    ) -> Path: ...

    def download_adapter(
        self, job_id: str, method: str | None = None, alpha: float | None = None, dest: str | Path | None = None
    ) -> bytes | Path:
        """The merged adapter of a finished job: by default the job's only α or its recommended one; `method`
        picks a `compare_with` baseline, `alpha` an α of the sweep. Returns the zip, or with `dest` unpacks it
        into that (new or empty) folder and returns the folder, ready for `PeftModel.from_pretrained`."""
        params = {k: v for k, v in (("method", method), ("alpha", alpha)) if v is not None}
        archive = self._request("GET", f"/merges/{job_id}/adapter", params=params).content
        if dest is None:
            return archive
        folder = Path(dest)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
                bundle.extractall(staging)  # member names are made safe by zipfile (no absolute paths, no `..`)
            if folder.exists():
                folder.rmdir()
            shutil.move(str(staging), folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def metrics(self, job_id: str) -> dict:
        """metrics.json of an evaluated job (every evaluated model, intervals, the recommendation)."""
        return self._get_json(f"/merges/{job_id}/metrics")

    def report(self, job_id: str) -> dict:
        """merge_report.json (per-module spectra and retained energy)."""
        return self._get_json(f"/merges/{job_id}/report")

    def plot(self, job_id: str) -> bytes:
        """plot.png: safety against utility for every evaluated point."""
        return self._request("GET", f"/merges/{job_id}/plot.png").content

    def report_html(self, job_id: str, dest: str | Path | None = None) -> bytes:
        """report.html: the job's self-contained report page (UTF-8); also written to `dest` when given."""
        content = self._request("GET", f"/merges/{job_id}/report.html").content
        if dest is not None:
            Path(dest).write_bytes(content)
        return content

    def ready(self) -> bool:
        """Whether the service answers `GET /readyz` with 200 (False when it does not answer at all)."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


def zip_folder(folder: Path, into: IO[bytes]) -> None:
    """The files directly in `folder` (sorted), as a zip written to `into`."""
    with zipfile.ZipFile(into, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, path.name)


class _Display:
    """What `wait` shows on stderr: a rich bar on a terminal; otherwise a line per recorded event (status, stage)
    and, while the job runs, a progress line every `LINE_INTERVAL` seconds at most; nothing without `progress`."""

    LINE_INTERVAL = 10.0

    def __init__(self, job_id: str, progress: bool) -> None:
        self.job_id, self.enabled = job_id, progress
        self.bar: Any = None
        self.task: Any = None
        self.last_line = time.monotonic()  # the first progress line comes after LINE_INTERVAL seconds

    def __enter__(self) -> Callable[[SseEvent], None]:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn(f"{self.job_id[:11]} {{task.description:<24}}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("waiting", total=100.0)
        return self.show

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def show(self, event: SseEvent) -> None:
        if not self.enabled or event.event == "end":
            return
        payload = event.json()
        if self.bar is not None:
            if event.event == "progress":
                label = payload["status"] if payload["status"] != "running" else payload["stage"] or "running"
                self.bar.update(self.task, description=label, completed=payload["percent"])
            return
        if event.event == "progress":  # between the recorded events: how far the running job is
            now = time.monotonic()
            if payload["status"] != "running" or now - self.last_line < self.LINE_INTERVAL:
                return
            self.last_line = now
            line = f"progress: {payload['stage'] or ''} {payload['percent']:.1f}%"
        elif event.event == "stage":
            line = f"stage: {payload['stage']}"
        else:
            line = f"{event.event}: {payload['message']}"
        print(f"job {self.job_id}  {' '.join(line.split())}", file=sys.stderr, flush=True)
