"""Search and repair jobs through the service: the request's new fields validated at submit, a search run by a real
worker with its trials streamed as events, its report and the chosen adapter served back."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from service_helpers import auth, evaluation, merge_body, repair_inputs, wait_for

pytestmark = pytest.mark.service


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
    repairs = {r["name"]: r for r in methods["repairs"]}
    assert {"refusal_ablation", "answer_alignment", "calibration"} <= set(repairs)
    assert "strength" in repairs["refusal_ablation"]["params_schema"]["properties"]
    alignment = repairs["answer_alignment"]["params_schema"]["properties"]
    assert {"strength", "ridge", "layers", "targets", "margin"} <= set(alignment)
    assert alignment["strength"]["maximum"] == 1 and alignment["ridge"]["minimum"] == 0
    calibration = repairs["calibration"]["params_schema"]["properties"]
    assert calibration["rank"]["default"] == 8 and calibration["steps"]["minimum"] == 0
    assert {"learning_rate", "batch_size", "max_target_tokens", "seed", "borderline_weight"} <= set(calibration)


@pytest.mark.parametrize(
    "params, named",
    [
        ({"strength": 1.5}, "strength"),
        ({"ridge": -1}, "ridge"),
        ({"layers": [1, 1]}, "layers"),
        ({"targets": "labels"}, "targets"),
        ({"layer": 1}, "layer"),  # refusal_ablation's parameter, not this step's
    ],
)
def test_bad_answer_alignment_params_are_422_naming_the_input(api, inputs, params, named):
    body = merge_body(inputs, repair={"method": "answer_alignment", "params": params}, **repair_inputs(inputs))
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and named in error["details"][0]["loc"]


def test_calibration_inputs_are_validated_at_submit_naming_the_input(api, inputs):
    borderline = {"borderline_dataset_id": inputs["data:borderline"]}
    cases = [
        (merge_body(inputs, repair={"method": "calibration"}), "borderline_dataset_id"),  # no P
        (merge_body(inputs, method="linear", params={}, safety_dataset_id=None, repair={"method": "calibration"},
                    **borderline), "safety_dataset_id"),  # no H
        (merge_body(inputs, repair={"method": "calibration", "params": {"rank": 0}}, **borderline), "rank"),
        (merge_body(inputs, repair={"method": "calibration", "params": {"strength": 1}}, **borderline), "strength"),
        (merge_body(inputs, evaluation=evaluation(inputs), search={"budget": 2},
                    harmless_dataset_id=inputs["data:harmless"]), "needs borderline_dataset_id"),
        (merge_body(inputs, evaluation=evaluation(inputs), search={"repair_methods": ["finetune"]}, **borderline),
         "unknown repair step"),
    ]  # fmt: skip
    for body, named in cases:
        response = api.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 422 and named in response.text, (body, response.text)


def test_calibration_job_runs_with_borderline_data_alone(api, worker, inputs):
    body = merge_body(
        inputs,
        method="linear",
        params={"alphas": [1.0]},
        repair={"method": "calibration", "params": {"steps": 3, "rank": 2, "max_target_tokens": 4}},
        borderline_dataset_id=inputs["data:borderline"],
    )
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 202, response.text
    job = wait_for(api, "acme", response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    adapter = api.get(f"/merges/{job['id']}/adapter", headers=auth("acme"))
    files = zipfile.ZipFile(io.BytesIO(adapter.content))
    report = json.loads(files.read("merge_report.json"))
    step = report["repair"]["1"]
    assert step["step"] == "calibration" and step["trained"] and step["sets"]["borderline"]["rows"] == 6
    assert json.loads(files.read("merge_spec.json"))["repair"]["method"] == "calibration"


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
