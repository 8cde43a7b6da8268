"""Service commands of the `sstmerge` CLI: `serve`, `keys`, `demo-service` (registered through the
`sstmerge.commands` entry point, so the core CLI never imports web or queue code; `sstmerge worker` is the
worker's own plugin, `workers.cli`)."""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .domain.settings import TENANT_PATTERN, Settings, get_settings

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from fastapi import FastAPI
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


def _use_data_dir(data_dir: Path | None) -> None:
    """Point every setting derived from the data folder (and child processes) at `data_dir`."""
    if data_dir is not None:
        os.environ["SSTMERGE_DATA_DIR"] = str(data_dir.resolve())
        get_settings.cache_clear()


def _require_worker_command() -> None:
    """`serve` runs its worker as `sstmerge worker`, which needs the worker extras (torch, the core)."""
    root = click.get_current_context().find_root()
    if not isinstance(root.command, click.Group) or root.command.get_command(root, "worker") is None:
        raise click.UsageError(
            "this installation has no `sstmerge worker` (install sstmerge[worker]); run the API alone with --no-worker"
        )


class WorkerProcess:
    """One `sstmerge worker` child, restarted if it dies while the API is up."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def _spawn(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "sstmerge_core.cli", "worker"])
        log.info("worker started", extra={"pid": self._proc.pid})

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            assert self._proc is not None  # start() spawns the child before it starts this thread
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            log.error("worker exited; restarting", extra={"returncode": code})
            if self._stopping.wait(2.0):
                return
            self._spawn()

    def start(self) -> WorkerProcess:
        self._spawn()
        self._thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM lets the running job finish), then a hard stop after `timeout` seconds."""
        self._stopping.set()
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker did not stop in time; killing it (its job is re-queued on next start)")
            self._proc.kill()
            self._proc.wait()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the database, broker, artifacts and scratch (SSTMERGE_DATA_DIR; default ~/.sstmerge).",
)
@click.option(
    "--worker/--no-worker",
    default=True,
    show_default=True,
    help="Also run one job worker (embedded mode); --no-worker runs the API only (workers elsewhere).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    envvar="SSTMERGE_API_WORKERS",
    help="API processes (SSTMERGE_API_WORKERS). Default: 1 in embedded mode (a SQLite database, or with the "
    "embedded worker); otherwise the number of CPUs, at most 4.",
)
def serve(host: str, port: int, data_dir: Path | None, worker: bool, workers: int | None) -> None:
    """Run the HTTP API, and by default one worker: with no configuration this is the embedded mode (SQLite
    database, SQLite-backed Celery broker, local artifact folder) on this machine."""
    import uvicorn

    from .api.factory import create_app
    from .api.server import server_options
    from .domain.bootstrap import prepare
    from .domain.logging_setup import configure_logging

    if worker:
        _require_worker_command()
    _use_data_dir(data_dir)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    prepare(settings)
    processes = workers or api_processes(settings, embedded_worker=worker)
    supervisor = WorkerProcess().start() if worker else None
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through `finally` so the worker is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run = functools.partial(uvicorn.run, host=host, port=port)
    metrics_dir = None
    try:
        if processes == 1:
            run(frozen(create_app(settings)), **server_options(settings))
        else:  # each process builds the app from the environment; Prometheus counters are summed over them
            metrics_dir = multiprocess_metrics_dir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            log.info("starting API processes", extra={"processes": processes})
            run("app.cli:process_app", factory=True, workers=processes, **server_options(None))
    finally:
        if supervisor is not None:
            supervisor.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def multiprocess_metrics_dir() -> str:
    """A fresh folder for the Prometheus counters of several API processes, named after this process; folders
    left by `serve` processes that no longer exist (killed before their clean-up) are removed first."""
    prefix = "sstmerge-metrics-"
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = stale.name.removeprefix(prefix).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def api_processes(settings: Settings, embedded_worker: bool) -> int:
    """1 in embedded mode (SQLite serialises writers; the embedded worker wants the CPU), else one process per
    CPU up to 4 (each keeps its own database pool: see app.domain.db.session)."""
    if embedded_worker or settings.resolved_database_url.startswith("sqlite"):
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def process_app() -> FastAPI:
    """The app of one of several API processes (`serve --workers N`): settings and logging from the environment
    that `serve` prepared."""
    from .api.factory import create_app
    from .domain.logging_setup import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return frozen(create_app(settings))


def frozen(app: FastAPI) -> FastAPI:
    """`app`, with everything allocated so far moved out of the garbage collector's sight (`gc.freeze`): the
    ~150k long-lived objects of the application and its libraries otherwise make every full collection a pause
    of tens of milliseconds in the middle of requests."""
    gc.collect()
    gc.freeze()
    return app


@click.group()
def keys() -> None:
    """Manage API keys (stored as SHA-256 hashes; a key is shown once, at creation)."""


def _session() -> AbstractContextManager[Session]:
    from .domain.bootstrap import prepare
    from .domain.db.session import session_scope

    settings = get_settings()
    prepare(settings)
    return session_scope(settings.resolved_database_url)


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key belongs to (created if new).")
def keys_create(tenant: str) -> None:
    """Create a key and print it (only this once)."""
    from .domain.auth import create_key

    if not TENANT_PATTERN.match(tenant):
        raise click.BadParameter("letters, digits, '_', '.', '-' (at most 64)", param_hint="--tenant")
    with _session() as session:
        key_id, key = create_key(session, tenant)
    click.echo(key)
    click.echo(f"key id {key_id} for tenant {tenant}; store the key now, it is not shown again", err=True)


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
def keys_list(tenant: str | None) -> None:
    """List key ids (never the keys)."""
    from .domain.auth import list_keys

    with _session() as session:
        for key in list_keys(session, tenant):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            click.echo(f"{key.id}\t{key.tenant_id}\t{key.created_at:%Y-%m-%d %H:%M}\t{state}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke the key with id KEY_ID."""
    from .domain.auth import revoke_key

    with _session() as session:
        if not revoke_key(session, key_id):
            raise click.BadParameter(f"no active key with id {key_id}", param_hint="KEY_ID")
    click.echo(f"revoked {key_id}")


def register(group: click.Group) -> None:
    """Entry point `sstmerge.commands`: add the service commands to the main group."""
    from .demo import demo_service

    for command in (serve, keys, demo_service):
        group.add_command(command)
