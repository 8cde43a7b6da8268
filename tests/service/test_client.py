"""`app.client.Client` against a real `sstmerge serve` (embedded mode: SQLite, kombu's SQLite broker, its own
worker) in a subprocess: uploads, submit with idempotency, waiting on the event stream (resumed after a dropped
connection), downloads, and the typed errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from live_server import free_port
from peft import PeftModel
from service_helpers import API_KEYS, merge_body
from transformers import AutoModelForCausalLM

from app.client import ApiError, Client, JobFailed
from tests.helpers.processes import stop_process_group

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):
    """`sstmerge serve` with one worker on a free port; yields its base URL."""
    root = tmp_path_factory.mktemp("client-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSTMERGE_")}
    env.update(
        SSTMERGE_MODEL_DIRS=str(assets.models),
        SSTMERGE_API_KEYS=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        SSTMERGE_DEVICE="cpu",
        SSTMERGE_LOG_LEVEL="WARNING",
        OMP_NUM_THREADS="1",
    )
    log_path = root / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "sstmerge_core.cli", "serve", "--port", str(port), "--data-dir", str(root / "data")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, API_KEYS["acme"]) as probe:
            deadline = time.monotonic() + 120
            while not probe.ready():
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.3)
        yield url
    finally:
        stop_process_group(server, timeout=60)


@pytest.fixture(scope="module")
def client(served):
    with Client(served, API_KEYS["acme"], backoff=0.05) as client:
        yield client


@pytest.fixture(scope="module")
def uploaded(client, assets) -> dict[str, str]:
    """name -> id: the utility adapter uploaded as a folder, the safety adapter as a .tar.gz, the datasets."""
    ids = {
        "utility": client.upload_adapter(assets.adapters["utility"])["id"],
        "safety": client.upload_adapter(assets.archives["safety_tgz"], name="safety")["id"],
    }
    for name, path in assets.data.items():
        ids[f"data:{name}"] = client.upload_dataset(path)["id"]
    return ids


def evaluated_body(ids: dict[str, str]) -> dict:
    evaluation = {
        "harmful_dataset_id": ids["data:harmful"],
        "benign_dataset_id": ids["data:benign"],
        "utility_eval_dataset_id": ids["data:utility_eval"],
        "utility_metric": "exact_match",
        "judge": "keyword",
        "max_new_tokens": 4,
        "limit": 4,
    }
    return merge_body(ids, evaluation=evaluation)


@pytest.fixture(scope="module")
def finished(client, uploaded) -> dict:
    job = client.submit(evaluated_body(uploaded), idempotency_key="client-round-trip")
    return client.wait(job["id"], progress=False)


def test_upload_submit_wait_download(client, uploaded, assets, tmp_path, capsys):
    adapter = client.http.get(f"/adapters/{uploaded['utility']}").json()
    assert adapter["name"] == assets.adapters["utility"].name and adapter["rank"] == 4
    body = evaluated_body(uploaded)
    job = client.submit(body, idempotency_key="client-test-key")
    assert job["status"] in ("queued", "running")
    assert client.submit(body, idempotency_key="client-test-key")["id"] == job["id"]  # a replay, not a new job
    with pytest.raises(ApiError) as conflict:
        client.submit({**body, "params": {**body["params"], "alphas": [0.5]}}, idempotency_key="client-test-key")
    assert conflict.value.code == "idempotency_conflict" and conflict.value.status == 409

    done = client.wait(job["id"])  # stderr is not a terminal here: one line per event
    assert done["id"] == job["id"] and done["status"] == "succeeded"
    assert done["progress"] == {"stage": "done", "percent": 100.0}
    lines = capsys.readouterr().err.splitlines()
    assert any("status: running" in line for line in lines), lines
    assert any(line.endswith("stage: fisher_utility") for line in lines), lines
    assert lines[-1] == f"job {job['id']}  status: succeeded", lines

    archive = client.download_adapter(job["id"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zipfile.ZipFile(io.BytesIO(archive)).namelist())
    folder = client.download_adapter(job["id"], alpha=1.0, dest=tmp_path / "merged")
    assert folder == tmp_path / "merged" and (folder / "adapter_config.json").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.qwen), folder)
    with pytest.raises(FileExistsError):
        client.download_adapter(job["id"], dest=folder)

    metrics = client.metrics(job["id"])
    assert {"before", "merged"} <= {m["kind"] for m in metrics["models"]}
    assert client.plot(job["id"]).startswith(b"\x89PNG")
    assert client.report(job["id"])["method"]["name"] == "sst"
    page = client.report_html(job["id"], dest=tmp_path / "report.html")
    assert page.startswith(b"<!DOCTYPE html>") and (tmp_path / "report.html").read_bytes() == page


def test_errors_carry_the_api_code(served, client, uploaded, finished):
    with pytest.raises(ApiError) as missing:
        client.job("mj_0000")
    assert (missing.value.code, missing.value.status) == ("not_found", 404)
    with pytest.raises(ApiError) as absent:
        client.download_adapter(finished["id"], alpha=0.123)
    assert absent.value.status == 404
    with pytest.raises(ApiError) as unknown:
        client.submit({**merge_body(uploaded), "method": "no-such-method"})
    assert unknown.value.code == "unknown_method" and unknown.value.status == 422
    with Client(served, "not-a-key") as stranger, pytest.raises(ApiError) as denied:
        stranger.job(finished["id"])
    assert (denied.value.code, denied.value.status) == ("unauthorized", 401)
    with Client(served, API_KEYS["globex"]) as other, pytest.raises(ApiError) as hidden:
        other.wait(finished["id"], progress=False)
    assert hidden.value.code == "not_found"  # another tenant's job does not exist for it
    with pytest.raises(ValueError):
        client.upload_adapter(Path(__file__))  # neither a folder nor an archive

    failing = client.submit(merge_body(uploaded, safety_dataset_id=uploaded["data:utility"]))
    with pytest.raises(JobFailed) as failed:
        client.wait(failing["id"], progress=False)
    assert failed.value.code == "invalid_dataset" and failed.value.job["status"] == "failed"
    with pytest.raises(ApiError) as not_ready:
        client.download_adapter(failing["id"])
    assert (not_ready.value.code, not_ready.value.status) == ("not_ready", 409)


class CutFirstStream(httpx.BaseTransport):
    """A transport whose first event stream breaks right after its first event with an id, as when a proxy or
    the server restarts; records the `Last-Event-ID` of every stream request."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.resumed_after: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.params.get("follow") == "true":
            self.resumed_after.append(request.headers.get("last-event-id"))
            if len(self.resumed_after) == 1:
                response.stream = _CutAfterFirstId(response.stream)
        return response

    def close(self) -> None:
        self.inner.close()


class _CutAfterFirstId(httpx.SyncByteStream):
    def __init__(self, inner) -> None:
        self.inner = inner

    def __iter__(self):
        buffer = b""
        for chunk in self.inner:
            buffer += chunk.replace(b"\r\n", b"\n")
            start = buffer.find(b"id: ")
            end = buffer.find(b"\n\n", start) if start >= 0 else -1
            if end >= 0:
                yield buffer[: end + 2]
                raise httpx.ReadError("connection reset (test)")
        yield buffer

    def close(self) -> None:
        self.inner.close()


def test_wait_resumes_a_dropped_stream_without_repeating_events(served, finished):
    transport = CutFirstStream()
    with Client(served, API_KEYS["acme"], transport=transport, backoff=0.05) as client:
        events = list(client.follow(finished["id"]))
        assert client.wait(finished["id"], progress=False)["status"] == "succeeded"
        recorded = [int(e.id) for e in events if e.id is not None]
        all_events = client.http.get(f"/merges/{finished['id']}/events").json()["items"]
    assert recorded == [e["id"] for e in all_events]  # each once, in order, across the reconnection
    assert transport.resumed_after[:2] == ["0", str(recorded[0])]
    assert events[-1].event == "end" and events[-1].json()["status"] == "succeeded"


def test_an_unreachable_service_is_a_typed_error():
    with Client(f"http://127.0.0.1:{free_port()}", "key", retries=1, backoff=0.01) as client:
        with pytest.raises(ApiError) as unreachable:
            client.job("mj_x")
        assert unreachable.value.code == "unreachable" and unreachable.value.status is None
        with pytest.raises(ApiError) as lost:
            client.wait("mj_x", progress=False)
        assert lost.value.code == "unreachable"
        assert client.ready() is False
