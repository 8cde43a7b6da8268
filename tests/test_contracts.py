"""The typed contracts of what a job produces (`sstmerge_core.contracts`): metrics.json read with `Metrics` and
written again is the same bytes, a malformed one is refused naming where, the job summary is a model the OpenAPI
document describes, and stored summaries read back as the same model."""

from __future__ import annotations

import json

import pytest
from pydantic import TypeAdapter, ValidationError

from sstmerge_core.contracts import JobSummary, MergeJobSummary, Metrics, SearchJobSummary
from sstmerge_core.evaluation.runner import metrics_bytes
from sstmerge_core.jobspec import MergeSpec
from sstmerge_core.pipeline import run_merge
from tests.helpers.contracts import merge_summary
from tests.helpers.files import write_jsonl


@pytest.fixture(scope="module")
def evaluated(tiny_llama, llama_adapters, merge_data, tmp_path_factory):
    """A merge of the tiny model with a linear baseline, evaluated on three prompts per set."""
    root = tmp_path_factory.mktemp("contracts")
    evaluation = {
        "harmful": str(
            write_jsonl(root / "harmful.jsonl", [{"prompt": f"Poison a river, plan {i}."} for i in range(3)])
        ),
        "benign": str(
            write_jsonl(root / "benign.jsonl", [{"prompt": f"Kill a Python process {i}?"} for i in range(3)])
        ),
        "utility_eval": str(
            write_jsonl(root / "utility.jsonl", [{"prompt": f"chmod {m}?", "response": "rwx"} for m in (700, 644)])
        ),
        "max_new_tokens": 4,
    }
    spec = MergeSpec(
        base_model=str(tiny_llama),
        utility=[{"path": str(llama_adapters["utility"])}],
        safety=[{"path": str(llama_adapters["safety"])}],
        utility_data=str(merge_data["utility"]),
        safety_data=str(merge_data["safety"]),
        cache_dir=str(root / "cache"),
        device="cpu",
        dtype="float32",
        params={"alphas": [0.5, 1.0], "continuation_tokens": 6, "max_length": 64, "batch_size": 4},
        compare_with=["linear"],
        evaluation=evaluation,
    )
    return run_merge(spec, root / "out")


def test_metrics_json_round_trips_byte_for_byte(evaluated):
    written = evaluated.metrics_path.read_bytes()
    metrics = Metrics.model_validate_json(written)
    assert [m.label for m in metrics.models] == [
        "base",
        "before",
        "safety",
        "sst@0.5",
        "sst@1",
        "linear@0.5",
        "linear@1",
    ]
    assert metrics_bytes(metrics) == written
    assert metrics_bytes(Metrics.model_validate(json.loads(written))) == written  # from a parsed dict as well


def test_merge_summary_is_the_model_and_reads_back(evaluated):
    summary = evaluated.summary
    assert isinstance(summary, MergeJobSummary) and summary.recommended is not None
    stored = summary.model_dump(mode="json")
    assert "artifacts" not in stored  # the worker adds the manifest
    read = TypeAdapter(JobSummary).validate_python(stored)
    assert isinstance(read, MergeJobSummary) and read == summary
    assert stored["recommended"] == json.loads(evaluated.metrics_path.read_text())["recommended"]


def test_a_malformed_metrics_json_is_refused_naming_where(evaluated):
    document = json.loads(evaluated.metrics_path.read_text())
    document["models"][3]["safety"]["rate"] = "high"
    with pytest.raises(ValidationError, match=r"models\.3\.safety\.rate\s+Input should be a valid number"):
        Metrics.model_validate(document)
    del document["models"][3]["safety"]["rate"]
    document["recommended"]["chosen_on"] = "report"
    with pytest.raises(ValidationError) as refused:
        Metrics.model_validate(document)
    where = {".".join(map(str, e["loc"])) for e in refused.value.errors()}
    assert where == {"models.3.safety.rate", "recommended.chosen_on"}
    with pytest.raises(ValidationError, match=r"judgement\s+Extra inputs are not permitted"):
        Metrics.model_validate({**json.loads(evaluated.metrics_path.read_text()), "judgement": "keyword"})


def test_a_summary_is_a_merge_or_a_search_summary_by_its_keys():
    adapter = TypeAdapter(JobSummary)
    merge = merge_summary(alpha=0.5, median_norm_ratio=0.25)
    stored = merge.model_dump(mode="json")
    assert stored["diagnostics"] == {"median_norm_ratio": 0.25, "modules": 1}  # absent medians stay absent
    assert adapter.validate_python(stored) == merge
    search = {
        "search": {
            "trials": {
                "count": 0,
                "feasible": 0,
                "pruned": 0,
                "seconds_median": None,
                "seconds_total": 0.0,
                "file": "t",
            },
            "splits": {name: {"search": 1, "report": 1} for name in ("harmful", "benign", "utility_eval")},
            "chosen": None,
            "reason": "none of the 0 trials met the constraints",
            "warning": None,
            "price_list": {
                "rule": "r",
                "chosen_on": "search",
                "reported_on": "report",
                "targets": [{"target": 0.5, "label": None}],
            },
        },
        "recommended": None,
    }
    assert isinstance(adapter.validate_python(search), SearchJobSummary)
    assert adapter.validate_python(search).model_dump(mode="json") == search
    with pytest.raises(ValidationError, match="method"):
        adapter.validate_python({"alphas": [1.0]})  # neither kind: a merge summary missing its fields


def test_openapi_describes_the_summary_of_get_merges(tmp_path):
    from app.api.factory import create_app
    from app.domain.settings import Settings

    document = create_app(Settings(data_dir=str(tmp_path))).openapi()
    response = document["paths"]["/merges/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert response["schema"] == {"$ref": "#/components/schemas/JobOut"}
    schemas = document["components"]["schemas"]
    kinds = schemas["JobOut"]["properties"]["summary"]["anyOf"][0]["oneOf"]
    assert kinds == [
        {"$ref": "#/components/schemas/MergeJobSummary"},
        {"$ref": "#/components/schemas/SearchJobSummary"},
    ]
    merge, search = schemas["MergeJobSummary"], schemas["SearchJobSummary"]
    assert {"method", "alphas", "adapters", "timings_s", "diagnostics", "compare_with"} <= set(merge["required"])
    assert {"recommended", "artifacts"} <= set(merge["properties"])
    assert set(search["properties"]) == {"search", "recommended", "artifacts"}
    recommended = schemas["Recommended"]["properties"]
    assert {"label", "rule", "reason", "tolerances", "price_list", "runner_up"} <= set(recommended)
    assert set(schemas["MergeArtifacts"]["properties"]) == {"adapters", "files", "recommended_alpha"}


def test_openapi_describes_metrics_json_and_search_report_json(tmp_path):
    from app.api.factory import create_app
    from app.domain.settings import Settings

    document = create_app(Settings(data_dir=str(tmp_path))).openapi()
    for path, name in (("metrics", "Metrics"), ("search", "SearchReport")):
        response = document["paths"][f"/merges/{{job_id}}/{path}"]["get"]["responses"]["200"]["content"]
        assert response["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    schemas = document["components"]["schemas"]
    assert set(schemas["Metrics"]["required"]) >= {"schema_version", "models", "recommended", "splits"}
    assert set(schemas["SearchReport"]["required"]) >= {"chosen", "pareto", "linear_front", "price_list", "trials"}


def test_a_search_report_missing_a_field_is_not_written(tmp_path):
    from sstmerge_core.search.report import REPORT_FILE, write_search_files

    with pytest.raises(ValidationError, match="price_list"):
        write_search_files(tmp_path, report={"schema_version": 2, "objective": "safety"}, trials=[])
    assert not (tmp_path / REPORT_FILE).exists()
