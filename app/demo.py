"""`sstmerge demo-service`: the whole service path on one machine, as a user would drive it.

Prepares the self-contained example (tiny model, trained utility and safety adapters, disjoint data
sets), starts `sstmerge serve` in embedded mode (SQLite database and broker, one worker), uploads the
adapters and data over HTTP, submits the demo job (`sstmerge_core.example.DEMO_*`: an SST-Merge α sweep
compared with linear, evaluated), follows it to the end, downloads the recommended adapter, metrics.json and
plot.png, and prints the table and the recommendation. Every request goes through the Python client
(`app.client`); this process, not the API, is the one that imports torch (to build the example).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sstmerge_core.contracts.metrics import Metrics

from .client import ApiError, Client, JobFailed

if TYPE_CHECKING:
    from sstmerge_core.example import ExampleAssets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: Client, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(f"sstmerge serve exited with code {server.returncode}")
        if client.ready():
            return
        time.sleep(0.5)
    raise click.ClickException("the service did not become ready in time")


def run_job(client: Client, assets: ExampleAssets, base_name: str) -> dict:
    """Upload the example, submit the demo job (`sstmerge_core.example`), follow it to the end (a progress bar on
    a terminal, a line per stage otherwise); returns the job."""
    from sstmerge_core.example import DEMO_COMPARE_WITH, DEMO_EVALUATION, DEMO_METHOD, DEMO_PARAMS

    adapter = {}
    for role, folder in (("utility", assets.utility_adapter), ("safety", assets.safety_adapter)):
        body = client.upload_adapter(folder, name=role)
        adapter[role] = body["id"]
        click.echo(f"uploaded {role} adapter {body['id']} (rank {body['rank']}, {len(body['target_modules'])} modules)")
    dataset = {}
    for role in ("utility_data", "safety_data", "harmful_eval", "benign_eval", "utility_eval"):
        dataset[role] = client.upload_dataset(getattr(assets, role))["id"]
    request = {
        "base_model": base_name,
        "utility_adapters": [{"adapter_id": adapter["utility"], "weight": 1.0}],
        "safety_adapter": {"adapter_id": adapter["safety"], "weight": 1.0},
        "utility_dataset_id": dataset["utility_data"],
        "safety_dataset_id": dataset["safety_data"],
        "method": DEMO_METHOD,
        "params": DEMO_PARAMS,
        "evaluation": {
            "harmful_dataset_id": dataset["harmful_eval"],
            "benign_dataset_id": dataset["benign_eval"],
            "utility_eval_dataset_id": dataset["utility_eval"],
            **DEMO_EVALUATION,
        },
        "compare_with": DEMO_COMPARE_WITH,
    }
    job = client.submit(request)
    click.echo(f"submitted job {job['id']}")
    try:
        return client.wait(job["id"])
    except JobFailed as failed:
        raise click.ClickException(f"job {job['id']} {failed.job['status']}: {failed.job.get('error')}") from None


def download_results(client: Client, job: dict, out: Path) -> tuple[Metrics, Path | None]:
    """metrics.json, plot.png, report.html and the recommended adapter (unpacked) into a fresh `out`; returns the
    metrics and the adapter folder (None when nothing was recommended: then no adapter is downloaded)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    document = client.metrics(job["id"])
    (out / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    metrics = Metrics.model_validate(document)
    (out / "plot.png").write_bytes(client.plot(job["id"]))
    client.report_html(job["id"], dest=out / "report.html")
    method, alpha = metrics.recommended.method, metrics.recommended.alpha
    if metrics.recommended.label is None or method is None or alpha is None:
        return metrics, None
    folder = out / f"{method}-alpha-{alpha:g}"
    return metrics, client.download_adapter(job["id"], method=method, alpha=alpha, dest=folder)


@click.command("demo-service")
@click.option(
    "--workdir",
    default="runs/demo-service",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the example assets, the service's data and the downloads go.",
)
@click.option("--port", type=int, default=None, help="Port of the embedded service (default: a free one).")
def demo_service(workdir: str, port: int | None) -> None:
    """Start the embedded service, submit the demo job (SST α sweep against linear, evaluated) on the example
    over HTTP, follow it, and download the recommended adapter, metrics.json and plot.png."""
    from sstmerge_core.commands.demo import echo_step, show_results
    from sstmerge_core.example import describe_job, prepare_example

    root = Path(workdir).resolve()
    click.echo(f"preparing the example in {root / 'models'}")
    assets = prepare_example(root / "models", progress=echo_step)
    port = port or free_port()
    key = secrets.token_hex(16)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")},  # embedded, whatever is set
        "SSTMERGE_MODEL_DIRS": str(root / "models"),
        "SSTMERGE_API_KEYS": f"demo:{key}",
        "SSTMERGE_DEVICE": "cpu",
        "SSTMERGE_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # a model this small runs best on one thread
    }
    command = [
        sys.executable,
        "-m",
        "sstmerge_core.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(root / "service"),
    ]
    service_log = root / "serve.log"
    click.echo(f"starting the embedded service on 127.0.0.1:{port} (its log: {service_log})")
    with service_log.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(f"http://127.0.0.1:{port}", key) as client:
            wait_ready(client, server)
            click.echo(describe_job(assets))
            job = run_job(client, assets, assets.base.name)
            metrics, adapter = download_results(client, job, root / "downloads")
    except ApiError as exc:
        raise click.ClickException(f"{exc} (the service's log: {service_log})") from None
    except click.ClickException as exc:  # the same failure (all plain ClickExceptions), naming the log
        raise click.ClickException(f"{exc.message} (the service's log: {service_log})") from exc
    finally:
        server.terminate()
        server.wait(timeout=60)
    click.echo("")
    show_results(metrics)
    click.echo("")
    if adapter is None:
        click.echo("recommended adapter: none (nothing qualified), so no adapter was downloaded")
    else:
        click.echo(f"recommended adapter: {adapter}  (PeftModel.from_pretrained(base, this folder))")
    click.echo(f"base model: {assets.base}")
    click.echo(f"metrics.json, plot.png: {root / 'downloads'}  (job {job['id']})")
    click.echo(f"the report (open it in a browser): {root / 'downloads' / 'report.html'}")
