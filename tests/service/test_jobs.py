"""Jobs end to end on real workers: merge + evaluation, failure codes, cancellation (queued and running), and
re-delivery after a worker is SIGKILLed mid-job."""

from __future__ import annotations

import io
import time
import uuid
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from service_helpers import (
    SLOW_PARAMS,
    WorkerProcess,
    auth,
    long_data,
    merge_body,
    upload_dataset,
    wait_for,
)
from transformers import AutoModelForCausalLM

from app.domain.job_state import JobStore
from app.main import create_app

pytestmark = pytest.mark.service


def load_merged(api, base, job_id: str, tmp_path, **params):
    """Download the merged adapter and load it with PEFT on the tiny base model; returns the PEFT model."""
    response = api.get(f"/merges/{job_id}/adapter", headers=auth("acme"), params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    folder = tmp_path / f"merged-{uuid.uuid4().hex[:6]}"
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(folder)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "merge_report.json"} <= {
        p.name for p in folder.iterdir()
    }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    return model


def test_merge_and_evaluate(api, worker, inputs, assets, tmp_path):
    evaluation = {
        "harmful_dataset_id": inputs["data:harmful"],
        "benign_dataset_id": inputs["data:benign"],
        "utility_eval_dataset_id": inputs["data:utility_eval"],
        "utility_metric": "exact_match",
        "judge": "keyword",
        "max_new_tokens": 4,
        "limit": 4,
    }
    params = {"alphas": [0.5, 1.0], "max_samples": 4, "max_length": 32, "batch_size": 4, "continuation_tokens": 4}
    response = api.post(
        "/merges",
        headers=auth("acme"),
        json=merge_body(inputs, params=params, evaluation=evaluation, compare_with=["linear"]),
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/merges/{job_id}"
    job = wait_for(api, "acme", job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"stage": "done", "percent": 100.0} and job["error"] is None
    assert job["started_at"] and job["finished_at"] and job["attempts"] == 1
    assert job["request"]["params"] == params
    assert job["summary"]["artifacts"]["adapters"] == {"sst": [0.5, 1.0], "linear": [0.5, 1.0]}

    for alpha in (0.5, 1.0):
        load_merged(api, assets.qwen, job_id, tmp_path, alpha=alpha)
    load_merged(api, assets.qwen, job_id, tmp_path, alpha=1, method="linear")
    missing = api.get(f"/merges/{job_id}/adapter", headers=auth("acme"), params={"alpha": 0.7})
    assert missing.status_code == 404
    default = api.get(f"/merges/{job_id}/adapter", headers=auth("acme"))
    recommended = job["summary"]["artifacts"]["recommended_alpha"]
    assert default.status_code == (200 if recommended is not None else 422)

    metrics = api.get(f"/merges/{job_id}/metrics", headers=auth("acme"))
    assert metrics.status_code == 200 and metrics.headers["content-type"] == "application/json"
    labels = {m["kind"] for m in metrics.json()["models"]}
    assert {"before", "merged"} <= labels
    plot = api.get(f"/merges/{job_id}/plot.png", headers=auth("acme"))
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    report = api.get(f"/merges/{job_id}/report", headers=auth("acme"))
    assert report.status_code == 200 and report.json()["method"]["name"] == "sst"
    page = api.get(f"/merges/{job_id}/report.html", headers=auth("acme"))
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.text.startswith("<!DOCTYPE html>") and "Price of safety" in page.text and "<script" not in page.text
    assert "report.html" in job["summary"]["artifacts"]["files"]
    prices = job["summary"]["recommended"]["price_list"]
    assert prices == metrics.json()["recommended"]["price_list"] and len(prices["targets"]) == 4

    events = api.get(f"/merges/{job_id}/events", headers=auth("acme")).json()["items"]
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert stages[:4] == ["loading", "fisher_utility", "fisher_safety", "merging"] and "evaluating" in stages
    assert [e["message"] for e in events if e["kind"] == "status"][-1] == "succeeded"
    page = api.get(f"/merges/{job_id}/events", headers=auth("acme"), params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_cursor"] == str(page["items"][-1]["id"])


def test_input_error_fails_job_with_its_code(api, worker, inputs, settings):
    """Prompts without responses pass the upload (a response column is optional there), but the empirical safety
    Fisher needs them: the worker fails the job with invalid_dataset, naming the dataset by id, not by a path."""
    body = merge_body(inputs, safety_dataset_id=inputs["data:utility"])
    job = wait_for(api, "acme", api.post("/merges", headers=auth("acme"), json=body).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_dataset", job
    message = job["error"]["message"]
    assert inputs["data:utility"] in message and "response" in message, message
    assert str(settings.data_dir) not in message and "/inputs/" not in message, message
    response = api.get(f"/merges/{job['id']}/adapter", headers=auth("acme"))
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_ready"


def test_cancel_queued_job(api, inputs, settings):
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})  # no worker consumes this queue
    with TestClient(create_app(idle)) as client:
        job = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()
        assert job["status"] == "queued"
        cancelled = client.post(f"/merges/{job['id']}/cancel", headers=auth("acme"))
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
        again = client.post(f"/merges/{job['id']}/cancel", headers=auth("acme"))
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
    store = JobStore(settings.resolved_database_url, settings.job_lease_seconds, settings.max_attempts)
    assert store.claim(job["id"]) is None  # a late delivery of the message does not run it
    assert api.get(f"/merges/{job['id']}", headers=auth("acme")).json()["started_at"] is None


def test_cancel_running_job(api, worker, inputs, tmp_path):
    slow = upload_dataset(api, "acme", long_data(tmp_path, "slow-utility")).json()["id"]
    body = merge_body(inputs, utility_dataset_id=slow, params=SLOW_PARAMS)
    job_id = api.post("/merges", headers=auth("acme"), json=body).json()["id"]
    wait_for(api, "acme", job_id, check=lambda j: j["progress"]["stage"] == "fisher_utility")
    response = api.post(f"/merges/{job_id}/cancel", headers=auth("acme"))
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = wait_for(api, "acme", job_id)
    assert job["status"] == "cancelled", job
    stages = [
        e["stage"]
        for e in api.get(f"/merges/{job_id}/events", headers=auth("acme")).json()["items"]
        if e["kind"] == "stage"
    ]
    assert "merging" not in stages
    done = api.post(f"/merges/{job_id}/cancel", headers=auth("acme"))
    assert done.status_code == 200 and done.json()["status"] == "cancelled"


def test_worker_killed_mid_job_is_redelivered(api, inputs, settings, assets, tmp_path):
    """SIGKILL the worker (and its pool child) during the Fisher pass; a new worker runs the job again from a
    fresh folder and the artifacts are complete."""
    private = settings.model_copy(update={"queue": f"{settings.queue}-kill"})
    slow = upload_dataset(api, "acme", long_data(tmp_path, "kill-utility")).json()["id"]
    body = merge_body(inputs, utility_dataset_id=slow, params=SLOW_PARAMS)
    with TestClient(create_app(private)) as client:
        job_id = client.post("/merges", headers=auth("acme"), json=body).json()["id"]
        first = WorkerProcess(private, tmp_path / "worker-1.log")
        try:
            wait_for(client, "acme", job_id, check=lambda j: j["progress"]["stage"] == "fisher_utility", timeout=120)
        finally:
            first.kill()
        killed_at = time.monotonic()
        assert client.get(f"/merges/{job_id}", headers=auth("acme")).json()["status"] == "running"
        second = WorkerProcess(private, tmp_path / "worker-2.log")
        try:
            job = wait_for(client, "acme", job_id, timeout=240)
        finally:
            second.stop()
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2, job
    assert time.monotonic() - killed_at < 200
    events = [
        e["message"]
        for e in api.get(f"/merges/{job_id}/events", headers=auth("acme")).json()["items"]
        if e["kind"] == "status"
    ]
    assert any("attempt 2" in m for m in events), events
    assert job["summary"]["artifacts"]["files"] == [
        "adapter-sst-alpha-0.5.zip",
        "adapter-sst-alpha-1.zip",
        "merge_report.json",
    ]
    prefix = settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / job_id
    assert len(list(prefix.iterdir())) == 1  # only the successful attempt's folder remains
    for alpha in (0.5, 1.0):
        load_merged(api, assets.qwen, job_id, tmp_path, alpha=alpha)
