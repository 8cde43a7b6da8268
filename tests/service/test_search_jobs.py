"""Search and repair jobs through the service: the request's new fields validated at submit, a search run by a real
worker with its trials streamed as events, its report and the chosen adapter served back."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from service_helpers import auth, merge_body, wait_for

pytestmark = pytest.mark.service


def evaluation(inputs) -> dict:
    return {
        "harmful_dataset_id": inputs["data:harmful"],
        "benign_dataset_id": inputs["data:benign"],
        "utility_eval_dataset_id": inputs["data:utility_eval"],
        "max_new_tokens": 4,
    }


def repair_inputs(inputs) -> dict:
    return {"harmless_dataset_id": inputs["data:harmless"], "borderline_dataset_id": inputs["data:borderline"]}


def test_search_and_repair_fields_are_validated_at_submit(api, inputs):
    search = {"budget": 2, "sampler": "random"}
    cases = [
        merge_body(inputs, search=search),  # no evaluation
        merge_body(inputs, search=search, evaluation=evaluation(inputs), compare_with=["linear"]),
        merge_body(inputs, search={"budget": 0}, evaluation=evaluation(inputs)),
        merge_body(inputs, search={"methods": ["nope"]}, evaluation=evaluation(inputs)),
        merge_body(inputs, repair={"params": {}}),  # no harmless/borderline data
        merge_body(inputs, repair={"params": {"strength": 2.0}}, **repair_inputs(inputs)),
        merge_body(inputs, repair={"method": "nope"}, **repair_inputs(inputs)),
        merge_body(inputs, harmless_dataset_id=inputs["data:harmless"]),  # without its pair
        merge_body(inputs, **repair_inputs(inputs)),  # repair data without a repair or a search
    ]
    for body in cases:
        response = api.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 422, (body, response.text)
    missing = merge_body(inputs, repair={}, harmless_dataset_id="ds_nope", borderline_dataset_id="ds_nope2")
    response = api.post("/merges", headers=auth("acme"), json=missing)
    assert response.status_code == 422 and response.json()["error"]["code"] == "dataset_not_found"
    methods = api.get("/methods").json()
    assert [r["name"] for r in methods["repairs"]] == ["refusal_ablation"]
    assert "strength" in methods["repairs"][0]["params_schema"]["properties"]


def test_search_job_streams_trials_and_serves_its_report_and_the_chosen_adapter(api, worker, inputs):
    body = merge_body(
        inputs,
        evaluation=evaluation(inputs),
        search={"budget": 3, "sampler": "random", "front_alphas": [0, 1], "report_points": 1, "seed": 1},
        **repair_inputs(inputs),
    )
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 202, response.text
    job = wait_for(api, "acme", response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    events = api.get(f"/merges/{job['id']}/events", headers=auth("acme")).json()["items"]
    trials = [json.loads(e["message"]) for e in events if e["kind"] == "trial"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    stages = [e["stage"] for e in events if e["kind"] == "stage"]
    assert {"references", "searching", "reporting_split"} <= set(stages)

    report = api.get(f"/merges/{job['id']}/search", headers=auth("acme")).json()
    assert "no trial saw" in report["splits"]["statement"] and report["trials"]["count"] == 3
    history = api.get(f"/merges/{job['id']}/trials", headers=auth("acme")).json()
    assert [t["number"] for t in history] == [0, 1, 2]
    page = api.get(f"/merges/{job['id']}/report.html", headers=auth("acme"))
    assert page.status_code == 200 and page.text.count("<tr") > 3 and "Recipe search" in page.text
    assert job["summary"]["search"]["price_list"] == report["price_list"]
    summary = job["summary"]
    if report["chosen"] is None:
        assert summary["recommended"] is None and summary["search"]["reason"]
        return
    chosen = report["chosen"]["recipe"]
    assert summary["recommended"]["method"] == chosen["method"]
    adapter = api.get(f"/merges/{job['id']}/adapter", headers=auth("acme"))
    assert adapter.status_code == 200, adapter.text
    files = zipfile.ZipFile(io.BytesIO(adapter.content))
    spec = json.loads(files.read("merge_spec.json"))
    assert spec["method"] == chosen["method"] and spec["safety"][0]["path"] == inputs["safety"]
    assert "/" not in spec["base_model"] and all("/" not in a["path"] for a in spec["utility"])
