"""Reliability classes of issue 18 (item 5) and two bugs of issue 17, against the real API on PostgreSQL, Redis and
a real worker:

1. the judge's classifier obeys the Hub switch and the model folders as a base model does (422 `unknown_judge` at
   submit; a stored job naming one fails `unknown_judge` in the worker without loading anything);
2. a delete of any dataset a queued repair or search job reads (harmless and borderline included) is 409 `in_use`;
3. a search takes its splits and tolerances from `evaluation` (one place) and refuses a contradiction with 422.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from service_helpers import auth, merge_body, upload_dataset, upload_merge_inputs, wait_for

from app.main import create_app

pytestmark = pytest.mark.service


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def evaluation(inputs, **settings) -> dict:
    return {
        "harmful_dataset_id": inputs["data:harmful"],
        "benign_dataset_id": inputs["data:benign"],
        "utility_eval_dataset_id": inputs["data:utility_eval"],
        "max_new_tokens": 4,
        **settings,
    }


def repair_inputs(inputs) -> dict:
    return {"harmless_dataset_id": inputs["data:harmless"], "borderline_dataset_id": inputs["data:borderline"]}


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


def test_a_judge_among_the_offered_models_is_accepted(api, inputs, settings):
    """A folder of the model roots, named as GET /models names it, is a valid classifier (the job is accepted)."""
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    with TestClient(create_app(idle)) as client:
        body = merge_body(inputs, evaluation=evaluation(inputs, judge="classifier:tiny-qwen2#LABEL_1"))
        response = client.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 202, response.text
        assert client.post(f"/merges/{response.json()['id']}/cancel", headers=auth("acme")).status_code == 200


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
