"""`sstmerge serve`: the embedded mode (SQLite database, kombu's SQLite broker, local storage) in a subprocess,
driven over HTTP. Same code path as production; needs neither Redis nor PostgreSQL."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import httpx
import pytest
from peft import PeftModel
from service_helpers import (
    API_KEYS,
    auth,
    merge_body,
    upload_adapter,
    upload_dataset,
    wait_for,
)
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_serve_embedded(assets, tmp_path):
    port, data_dir = free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
    env.update(
        SSTMERGE_MODEL_DIRS=str(assets.models),
        SSTMERGE_API_KEYS=f"acme:{API_KEYS['acme']}",
        SSTMERGE_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "sstmerge_core.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.3)
            ready = client.get("/readyz").json()
            assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}

            ids = {
                name: upload_adapter(client, "acme", assets.archives[key]).json()["id"]
                for name, key in (("utility", "utility"), ("safety", "safety_tgz"))
            }
            for name in ("utility", "safety"):
                ids[f"data:{name}"] = upload_dataset(client, "acme", assets.data[name]).json()["id"]
            response = client.post("/merges", headers=auth("acme"), json=merge_body(ids))
            assert response.status_code == 202, response.text
            job = wait_for(client, "acme", response.json()["id"], timeout=180)
            assert job["status"] == "succeeded", job

            archive = client.get(f"/merges/{job['id']}/adapter", headers=auth("acme"))
            assert archive.status_code == 200
            zipfile.ZipFile(io.BytesIO(archive.content)).extractall(tmp_path / "merged")
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.qwen), tmp_path / "merged")
            assert client.get(f"/merges/{job['id']}/metrics", headers=auth("acme")).status_code == 404
    finally:
        server.send_signal(signal.SIGTERM)  # the server stops its worker before exiting
        server.wait(60)
        log.close()
    deadline = time.monotonic() + 30
    while group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(server.pid), "the worker outlived `sstmerge serve`"
    assert {"sstmerge.db", "broker.db"} <= {p.name for p in data_dir.iterdir()}
    assert (data_dir / "artifacts" / "tenants" / "acme" / "jobs" / job["id"]).is_dir()
