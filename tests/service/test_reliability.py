"""Reliability classes of issue 18 (item 5) and two bugs of issue 17, against the real API on PostgreSQL, Redis and
a real worker:

1. the judge's classifier obeys the Hub switch and the model folders as a base model does (422 `unknown_judge` at
   submit; a stored job naming one fails `unknown_judge` in the worker without loading anything);
2. a delete of any dataset a queued repair or search job reads (harmless and borderline included) is 409 `in_use`;
3. a search takes its splits and tolerances from `evaluation` (one place) and refuses a contradiction with 422;
4. adapter values are checked in float32 at upload; a merge that loses its safety adapter, overflows, or yields a
   non-finite summary fails with a code (`safety_update_lost`, `non_finite_result`), on PostgreSQL and SQLite.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save
from service_helpers import (
    API_KEYS,
    WorkerProcess,
    auth,
    error_of,
    evaluation,
    merge_body,
    repair_inputs,
    upload_dataset,
    upload_merge_inputs,
    wait_for,
)

from app.domain.job_state import JobStore
from app.domain.settings import Settings
from app.main import create_app
from tests.helpers.contracts import merge_summary

pytestmark = pytest.mark.service


@pytest.mark.parametrize(
    "judge",
    ["classifier:org/refusal-model", "classifier:org/refusal-model#REFUSAL", "classifier:/etc", "classifier:../models"],
)
def test_a_judge_outside_the_offered_models_is_refused_at_submit(api, inputs, judge):
    """Hub disabled: a Hub id is refused as a base model's is; a path is never a model name (before: 202, and the
    worker connected to the Hub or loaded the folder)."""
    body = merge_body(inputs, evaluation=evaluation(inputs, judge=judge))
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "unknown_judge" and "Hub ids are disabled" in error_of(response)["message"]


def test_a_judge_among_the_offered_models_runs_and_is_named_as_given(api, worker, inputs):
    """A folder of the model roots, named as GET /models names it, is a valid classifier: the job loads it from
    that folder and its metrics name the judge as the client did (no server path)."""
    judge = "classifier:tiny-qwen2#LABEL_1"
    body = merge_body(inputs, evaluation=evaluation(inputs, judge=judge))
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 202, response.text
    job = wait_for(api, "acme", response.json()["id"])
    assert job["status"] == "succeeded", job
    metrics = api.get(f"/merges/{job['id']}/metrics", headers=auth("acme")).json()
    assert metrics["judge"] == judge, metrics["judge"]


def test_the_worker_refuses_a_hub_judge_when_its_hub_is_off(api, worker, inputs, settings):
    """A job accepted by an API with the Hub on, run by a worker with the Hub off: it fails `unknown_judge` before
    anything is loaded (before: the worker connected to the Hub; a load failure would say `invalid_judge`)."""
    hub = settings.model_copy(update={"hub_enabled": True, "hub_models": []})
    with TestClient(create_app(hub)) as client:
        body = merge_body(inputs, evaluation=evaluation(inputs, judge="classifier:org/refusal-model"))
        response = client.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 202, response.text
    job = wait_for(api, "acme", response.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "unknown_judge", job


REPAIR_DATASETS = ["utility", "safety", "harmless", "borderline", "harmful", "benign", "utility_eval"]


@pytest.mark.parametrize("kind", ["repair", "search"])
def test_deleting_any_input_of_a_queued_repair_or_search_job_is_in_use(api, assets, settings, kind):
    """Every adapter and dataset the job reads, harmless and borderline sets included (before: those two were
    deleted under the queued job), is 409 `in_use` naming the job. (Inputs of its own: a failure deletes them.)"""
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    inputs = upload_merge_inputs(api, assets)
    for name in REPAIR_DATASETS[2:]:
        inputs[f"data:{name}"] = upload_dataset(api, "acme", assets.data[name]).json()["id"]
    extra = {"repair": {}} if kind == "repair" else {"search": {"budget": 1, "sampler": "random"}}
    body = merge_body(inputs, evaluation=evaluation(inputs), **repair_inputs(inputs), **extra)
    with TestClient(create_app(idle)) as client:
        response = client.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        try:
            targets = [f"/datasets/{inputs[f'data:{name}']}" for name in REPAIR_DATASETS]
            targets += [f"/adapters/{inputs[name]}" for name in ("utility", "safety")]
            for target in targets:
                refused = client.delete(target, headers=auth("acme"))
                assert refused.status_code == 409, (target, refused.text)
                assert error_of(refused)["code"] == "in_use" and job_id in error_of(refused)["details"]["jobs"]
        finally:
            assert client.post(f"/merges/{job_id}/cancel", headers=auth("acme")).status_code == 200


def scaled_adapter(assets, scale: float, dtype) -> bytes:
    """The session's safety adapter with every factor value times `scale`, stored as `dtype`, zipped."""
    tensors = load_file(str(assets.adapters["safety"] / "adapter_model.safetensors"))
    with np.errstate(over="ignore", under="ignore"):
        scaled = {name: (value.astype(np.float64) * scale).astype(dtype) for name, value in tensors.items()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", (assets.adapters["safety"] / "adapter_config.json").read_text())
        archive.writestr("adapter_model.safetensors", save(scaled))
    return buffer.getvalue()


def upload_bytes(api, payload: bytes):
    return api.post("/adapters", headers=auth("acme"), files={"file": ("a.zip", io.BytesIO(payload))})


def test_float64_values_beyond_float32_are_refused_at_upload(api, assets):
    """Finite as stored, infinite once cast to the float32 the merges use: 422 `adapter_out_of_range` (before: stored,
    then SST lost the safety adapter on SQLite and crashed the task on PostgreSQL until `worker_lost`)."""
    response = upload_bytes(api, scaled_adapter(assets, 1e300, np.float64))
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "adapter_out_of_range" and "float32" in error_of(response)["message"]
    assert upload_bytes(api, scaled_adapter(assets, 1e30, np.float64)).status_code == 201  # within range: fine


def test_a_merge_that_loses_the_safety_adapter_fails(api, worker, inputs, assets):
    """Float64 factors of 1e-200 (valid: finite, and zero in float32) make SST's projection of ΔS vanish: the job
    fails `safety_update_lost` instead of succeeding with the utility adapters alone."""
    response = upload_bytes(api, scaled_adapter(assets, 1e-200, np.float64))
    assert response.status_code == 201, response.text
    body = merge_body(inputs, safety_adapter={"adapter_id": response.json()["id"]})
    job = wait_for(api, "acme", api.post("/merges", headers=auth("acme"), json=body).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "safety_update_lost", job
    assert "sst@1" in job["error"]["message"]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_dense_merges_of_overflowing_values_fail_as_non_finite(api, worker, inputs, assets, method):
    """Finite float32 factors whose products overflow: `non_finite_result` naming the module (before:
    `internal_error` with torch's SVD message)."""
    response = upload_bytes(api, scaled_adapter(assets, 1e19 / 0.05, np.float32))
    assert response.status_code == 201, response.text
    body = merge_body(
        inputs,
        safety_adapter={"adapter_id": response.json()["id"]},
        method=method,
        params={"alphas": [1.0]},
        utility_dataset_id=None,
        safety_dataset_id=None,
    )
    job = wait_for(api, "acme", api.post("/merges", headers=auth("acme"), json=body).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "non_finite_result", job
    assert "module model.layers." in job["error"]["message"] and "svd" not in job["error"]["message"].lower()


def embedded_settings(tmp_path, assets) -> Settings:
    return Settings(
        data_dir=tmp_path / "embedded",
        model_dirs=[assets.models],
        api_keys=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        device="cpu",
    )


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_non_finite_summary_fails_the_job_on_either_database(settings, assets, inputs, tmp_path, database):
    """The last guard, in the store: a success whose summary holds NaN is recorded as failed `non_finite_result` and
    served as JSON (before: PostgreSQL refused the row, so the delivery crashed and was re-run until `worker_lost`;
    SQLite stored a "succeeded" job whose summary no client can parse)."""
    if database == "postgresql":
        chosen = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    else:
        chosen = embedded_settings(tmp_path, assets)
    with TestClient(create_app(chosen)) as client:
        ids = inputs if database == "postgresql" else upload_merge_inputs(client, assets)
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(ids)).json()["id"]
        store = JobStore.from_settings(chosen)
        claim = store.claim(job_id)
        assert claim is not None
        summary = merge_summary(median_energy_retained_fu=float("nan"))
        assert store.finish(claim, "succeeded", summary=summary, artifact_prefix="p") is True
        response = client.get(f"/merges/{job_id}", headers=auth("acme"))
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "failed" and job["error"]["code"] == "non_finite_result", job
        assert "summary.diagnostics.median_energy_retained_fu" in job["error"]["message"] and job["summary"] is None


SEARCH = {"budget": 1, "sampler": "random", "warm_start": False, "front_alphas": [0, 1], "report_points": 1}


def test_a_search_refuses_settings_its_evaluation_contradicts(api, inputs):
    """Two values for one concept: 422 `conflicting_settings` naming the pair (before: the evaluation's tolerances
    were ignored and its split overwritten, silently)."""
    cases = [
        ({"max_utility_drop": 0.1}, {"utility_tolerance": 0.3}, "max_utility_drop"),
        ({"max_over_refusal_increase": 0.2}, {"over_refusal_tolerance": None}, "max_over_refusal_increase"),
        ({"split_seed": 1}, {"split_seed": 2}, "split_seed"),
        ({"report_fraction": 0.5}, {"report_fraction": 0.25}, "report_fraction"),
    ]
    for search, settings, named in cases:
        body = merge_body(inputs, evaluation=evaluation(inputs, **settings), search={**SEARCH, **search})
        response = api.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] == "conflicting_settings" and named in error_of(response)["message"]


def test_a_search_takes_its_splits_and_tolerances_from_its_evaluation(api, worker, inputs):
    """The evaluation's split seed, report fraction and tolerances are the ones the search runs with (its report's
    settings and split sizes), and the stored request states each once; the same values given twice are fine."""
    given = {"split_seed": 7, "report_fraction": 0.25, "utility_tolerance": 0.3, "over_refusal_tolerance": 0.2}
    body = merge_body(inputs, evaluation=evaluation(inputs, **given), search={**SEARCH, "split_seed": 7})
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 202, response.text
    stored = response.json()["request"]
    expected = {"split_seed": 7, "report_fraction": 0.25, "max_utility_drop": 0.3, "max_over_refusal_increase": 0.2}
    assert {k: stored["search"][k] for k in expected} == expected
    assert {k: stored["evaluation"][k] for k in given} == given
    job = wait_for(api, "acme", response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    report = api.get(f"/merges/{job['id']}/search", headers=auth("acme")).json()
    assert {k: report["settings"][k] for k in expected} == expected
    assert report["splits"]["seed"] == 7
    assert report["splits"]["sizes"]["harmful"] == {"search": 3, "report": 1}  # ⌊4 · 0.25⌋ report prompts


def test_a_merge_that_loses_the_safety_adapter_fails_on_sqlite_too(assets, tmp_path):
    """The embedded mode (SQLite database and broker) with a real worker: the same job fails the same way (before:
    it succeeded there, the safety adapter silently gone and NaN in its report)."""
    embedded = embedded_settings(tmp_path, assets)
    with TestClient(create_app(embedded)) as client:
        worker = WorkerProcess(embedded, tmp_path / "worker.log")
        try:
            ids = upload_merge_inputs(client, assets)
            response = upload_bytes(client, scaled_adapter(assets, 1e-200, np.float64))
            assert response.status_code == 201, response.text
            body = merge_body(ids, safety_adapter={"adapter_id": response.json()["id"]})
            job = wait_for(client, "acme", client.post("/merges", headers=auth("acme"), json=body).json()["id"])
            assert job["status"] == "failed" and job["error"]["code"] == "safety_update_lost", job
        finally:
            worker.stop()
