"""`sstmerge worker`: a plugin of the `sstmerge` CLI (entry point `sstmerge.commands`), loaded only where the
worker can run (the service and the core extras, torch included)."""

from __future__ import annotations

import importlib.util
import os

import click


@click.command()
@click.option(
    "--concurrency", type=int, default=None, help="Jobs at a time (SSTMERGE_WORKER_CONCURRENCY; keep 1 per GPU)."
)
@click.option("--queues", default=None, help="Comma-separated queues (default SSTMERGE_QUEUE).")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo"]),
    default="prefork",
    show_default=True,
    help="prefork runs jobs in a child process, so a crash or OOM kill is detected and the job re-delivered.",
)
def worker(concurrency: int | None, queues: str | None, pool: str) -> None:
    """Run a job worker against the configured broker (SSTMERGE_BROKER_URL) and database."""
    from app.domain.settings import get_settings

    from .main import create_worker_app

    settings = get_settings()
    argv = [
        "worker",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={queues or settings.queue}",
        f"--pool={pool}",
        f"--loglevel={settings.log_level}",
        f"--hostname=sstmerge-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.embedded_broker:
        argv.append("--without-heartbeat")
    create_worker_app(settings).worker_main(argv)


def register(group: click.Group) -> None:
    """Entry point `sstmerge.commands`: add `worker` where its dependencies are installed."""
    for package in ("celery", "torch"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"sstmerge worker needs {package} (install sstmerge[worker])", name=package)
    group.add_command(worker)
