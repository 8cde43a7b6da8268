"""The S3-compatible storage backend against a real S3 endpoint: moto's server in a subprocess (from any
interpreter on this machine that has it). Skips, saying so, when none does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    WorkerProcess,
    auth,
    merge_body,
    upload_merge_inputs,
    wait_for,
)

from app.domain.storage import StorageError
from app.domain.storage.s3 import S3Storage
from app.main import create_app

pytestmark = pytest.mark.service


def _moto_python() -> str | None:
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        probe = [candidate, "-c", "import moto.server"] if candidate else None
        if probe and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory, monkeypatch_module):
    python = _moto_python()
    if python is None:
        pytest.skip("no S3-compatible endpoint: moto (with its server extra) is not installed in any interpreter")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    server = subprocess.Popen(
        [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch_module.setenv(key, value)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(10)
    log.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    name = f"sstmerge-{uuid.uuid4().hex[:8]}"
    S3Storage(name, endpoint_url=s3_endpoint, region="us-east-1").client.create_bucket(Bucket=name)
    return name


def test_s3_backend_operations(s3_endpoint, bucket, tmp_path):
    storage = S3Storage(bucket, prefix="run", endpoint_url=s3_endpoint, region="us-east-1")
    storage.check()
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 1000)
    storage.put_file("a/b/blob", source)
    storage.put_file("a/c", source)
    assert storage.size("a/b/blob") == 1000 and storage.size("a/missing") is None
    assert storage.list("a") == ["a/b/blob", "a/c"]
    assert storage.children("a") == ["b", "c"] and storage.children("nothing") == []
    newest = storage.newest("a")
    assert newest is not None and newest.tzinfo is not None and storage.newest("nothing") is None
    assert storage.free_bytes() is None  # no free-space limit on S3
    assert b"".join(storage.iter_bytes("a/b/blob", chunk_size=100)) == b"x" * 1000
    storage.get_file("a/c", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"x" * 1000
    storage.delete_prefix("a/b")
    assert storage.list("a") == ["a/c"]
    with pytest.raises(StorageError):
        S3Storage("no-such-bucket", endpoint_url=s3_endpoint, region="us-east-1").check()


def test_job_with_s3_storage(settings, s3_endpoint, bucket, assets, tmp_path):
    """API and worker share only the bucket: inputs go up at upload, the worker fetches them and stores the
    artifacts there, and the API streams them back."""
    s3 = settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_bucket": bucket,
            "s3_prefix": "svc",
            "s3_endpoint_url": s3_endpoint,
            "s3_region": "us-east-1",
            "queue": f"{settings.queue}-s3",
            "data_dir": tmp_path / "api-data",
        }
    )
    with TestClient(create_app(s3)) as client:
        ids = upload_merge_inputs(client, assets)
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(ids)).json()["id"]
        worker = WorkerProcess(s3.model_copy(update={"data_dir": tmp_path / "worker-data"}), tmp_path / "worker.log")
        try:
            job = wait_for(client, "acme", job_id, timeout=180)
        finally:
            worker.stop()
        assert job["status"] == "succeeded", job
        response = client.get(f"/merges/{job_id}/adapter", headers=auth("acme"))
        assert response.status_code == 200 and response.content[:2] == b"PK"
        assert int(response.headers["content-length"]) == len(response.content)
        keys = S3Storage(bucket, prefix="svc", endpoint_url=s3_endpoint).list(f"tenants/acme/jobs/{job_id}")
        assert [k.rsplit("/", 1)[-1] for k in keys] == ["adapter-sst-alpha-1.zip", "merge_report.json"]
        assert not (tmp_path / "api-data" / "artifacts").exists()
