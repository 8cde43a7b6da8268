"""`sstmerge demo-service`: the whole service path on one machine, as a user would drive it.

Prepares the self-contained example (tiny model, trained utility and safety adapters, disjoint data
sets), starts `sstmerge serve` in embedded mode (SQLite database and broker, one worker), uploads the
adapters and data over HTTP, submits an SST-Merge job with evaluation, polls it to the end, downloads the
merged adapter and prints the metrics. This client process, not the API, is the one that imports torch
(to build the example).
"""

from __future__ import annotations

import io
import os
import secrets
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


def run_job(client: httpx.Client, assets, base_name: str, out: Path) -> dict:
    """Upload, submit, poll, download; returns the final job."""
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
        "method": "sst",
        "params": {
            "selection": "soft",
            "beta": 1.0,
            "alphas": [0.5, 1.0, 2.0],
            "max_length": 64,
            "continuation_tokens": 8,
        },
        "evaluation": {
            "harmful_dataset_id": dataset["harmful_eval"],
            "benign_dataset_id": dataset["benign_eval"],
            "utility_eval_dataset_id": dataset["utility_eval"],
            "utility_metric": "exact_match",
            "judge": "keyword",
            "max_new_tokens": 8,
        },
        "compare_with": ["linear"],
    }
    job = check(client.post("/merges", json=request, headers={"Idempotency-Key": secrets.token_hex(8)}))
    click.echo(f"submitted job {job['id']}")
    last = None
    while job["status"] not in TERMINAL:
        time.sleep(1.0)
        job = check(get(client, f"/merges/{job['id']}"))
        progress = job.get("progress") or {}
        line = f"  {job['status']:<9} {progress.get('stage') or '':<16} {progress.get('percent') or 0:5.1f}%"
        if line != last:
            click.echo(line)
            last = line
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['status']}: {job.get('error')}")
    archive = get(client, f"/merges/{job['id']}/adapter", params={"alpha": 1.0})
    archive.raise_for_status()
    out.mkdir(parents=True, exist_ok=True)
    (out / "merged-alpha-1.zip").write_bytes(archive.content)
    (out / "metrics.json").write_bytes(get(client, f"/merges/{job['id']}/metrics").content)
    (out / "plot.png").write_bytes(get(client, f"/merges/{job['id']}/plot.png").content)
    return job


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
    """Start the embedded service, submit a real merge job on a small example, poll it, download the adapter."""
    import json

    from sstmerge_core.commands.options import metrics_table
    from sstmerge_core.example import prepare_example

    root = Path(workdir).resolve()
    click.echo(f"preparing example assets in {root / 'models'}")
    assets = prepare_example(root / "models")
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
            job = run_job(client, assets, assets.base.name, root / "downloads")
            from rich.console import Console

            Console().print(metrics_table(json.loads((root / "downloads" / "metrics.json").read_text())))
            click.echo(
                f"job {job['id']} succeeded; downloaded {root / 'downloads'}/merged-alpha-1.zip, "
                "metrics.json and plot.png"
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
