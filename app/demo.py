"""`sstmerge demo-service`: the whole service path on one machine, as a user would drive it.

Prepares the self-contained example (tiny model, trained utility and safety adapters, disjoint data
sets), starts `sstmerge serve` in embedded mode (SQLite database and broker, one worker), uploads the
adapters and data over HTTP, submits the demo job (`sstmerge_core.example.DEMO_*`: an SST-Merge α sweep
compared with linear, evaluated), polls it to the end, downloads the recommended adapter, metrics.json and
plot.png, and prints the table and the recommendation. This client process, not the API, is the one that
imports torch (to build the example).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import click
import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, path.name)
    return buffer.getvalue()


def wait_ready(client: httpx.Client, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(f"sstmerge serve exited with code {server.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise click.ClickException("the service did not become ready in time")


def check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise click.ClickException(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
        )
    return response.json()


def check_bytes(response: httpx.Response) -> bytes:
    """The body of a successful response; a ClickException naming the request otherwise."""
    if response.status_code >= 400:
        raise click.ClickException(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}"
        )
    return response.content


def get(client: httpx.Client, path: str, attempts: int = 3, **kwargs) -> httpx.Response:
    """GET with a retry on a dropped connection (an idle keep-alive socket the server closed meanwhile)."""
    for attempt in range(attempts):
        try:
            return client.get(path, **kwargs)
        except httpx.TransportError:
            if attempt + 1 == attempts:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def run_job(client: httpx.Client, assets, base_name: str) -> dict:
    """Upload the example, submit the demo job (`sstmerge_core.example`), poll it to the end; returns the job."""
    from sstmerge_core.example import DEMO_COMPARE_WITH, DEMO_EVALUATION, DEMO_METHOD, DEMO_PARAMS

    adapter = {}
    for role, folder in (("utility", assets.utility_adapter), ("safety", assets.safety_adapter)):
        body = check(client.post("/adapters", files={"file": (f"{role}.zip", zip_folder(folder))}, data={"name": role}))
        adapter[role] = body["id"]
        click.echo(f"uploaded {role} adapter {body['id']} (rank {body['rank']}, {len(body['target_modules'])} modules)")
    dataset = {}
    for role in ("utility_data", "safety_data", "harmful_eval", "benign_eval", "utility_eval"):
        path = getattr(assets, role)
        dataset[role] = check(client.post("/datasets", files={"file": (path.name, path.read_bytes())}))["id"]
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
    job = check(client.post("/merges", json=request, headers={"Idempotency-Key": secrets.token_hex(8)}))
    click.echo(f"submitted job {job['id']}")
    last = None
    while job["status"] not in TERMINAL:
        time.sleep(1.0)
        job = check(get(client, f"/merges/{job['id']}"))
        stage = (job["status"], (job.get("progress") or {}).get("stage"))
        if stage != last:  # one line per stage, not per percent
            click.echo(f"  {job['status']:<9} {stage[1] or ''}")
            last = stage
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['status']}: {job.get('error')}")
    return job


def download_results(client: httpx.Client, job: dict, out: Path) -> tuple[dict, Path | None]:
    """metrics.json, plot.png and the recommended adapter (unpacked) into a fresh `out`; returns the metrics and
    the adapter folder (None when nothing was recommended: then no adapter is downloaded)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    metrics_bytes = check_bytes(get(client, f"/merges/{job['id']}/metrics"))
    (out / "metrics.json").write_bytes(metrics_bytes)
    (out / "plot.png").write_bytes(check_bytes(get(client, f"/merges/{job['id']}/plot.png")))
    metrics = json.loads(metrics_bytes)
    recommended = metrics.get("recommended") or {}
    if recommended.get("label") is None:
        return metrics, None
    method, alpha = recommended["method"], recommended["alpha"]
    archive = check_bytes(get(client, f"/merges/{job['id']}/adapter", params={"alpha": alpha, "method": method}))
    folder = out / f"{method}-alpha-{alpha:g}"
    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        bundle.extractall(folder)
    return metrics, folder


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
    over HTTP, poll it, and download the recommended adapter, metrics.json and plot.png."""
    from sstmerge_core.commands.demo import echo_step, show_results
    from sstmerge_core.example import describe_job, prepare_example

    root = Path(workdir).resolve()
    click.echo(f"preparing the example in {root / 'models'}")
    assets = prepare_example(root / "models", progress=echo_step)
    port = port or free_port()
    key = secrets.token_hex(16)
    env = {
        **os.environ,
        "SSTMERGE_MODEL_DIRS": str(root / "models"),
        "SSTMERGE_API_KEYS": f"demo:{key}",
        "SSTMERGE_DEVICE": "cpu",
        "SSTMERGE_LOG_LEVEL": "WARNING",
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
    click.echo(f"starting the embedded service on 127.0.0.1:{port}")
    server = subprocess.Popen(command, env=env)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            wait_ready(client, server)
            click.echo(describe_job(assets))
            job = run_job(client, assets, assets.base.name)
            metrics, adapter = download_results(client, job, root / "downloads")
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
