"""GET /methods and the per-method `params` of POST /merges, both read from the method catalogue
(`sstmerge_core.methods.catalog.CATALOG`): every method is served with its JSON Schema, the OpenAPI document
ties each method to its parameter model, and a bad parameter of any method is a 422 `invalid_params` naming
it. Runs on the embedded setup (SQLite), no Redis or PostgreSQL needed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from app.domain.settings import Settings
from app.main import create_app
from sstmerge_core.evaluation.judges import JUDGES, judge_spec_pattern
from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.methods.catalog import CATALOG, MethodInfo

AUTH = {"Authorization": "Bearer key-acme"}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    settings = Settings(data_dir=tmp_path_factory.mktemp("methods"), api_keys="acme:key-acme")
    with TestClient(create_app(settings)) as client:
        yield client


def job(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A request that is valid but for its method and params (its base model is not offered: a valid one
    gets `unknown_base_model`, after the params were accepted)."""
    return {
        "base_model": "none",
        "safety_adapter": {"adapter_id": "ad_x"},
        "utility_dataset_id": "ds_u",
        "safety_dataset_id": "ds_s",
        "method": method,
        "params": params,
    }


def without_null_defaults(schema: Any) -> Any:
    """FastAPI leaves `"default": null` out of the OpenAPI document; compare schemas without it."""
    if isinstance(schema, dict):
        return {k: without_null_defaults(v) for k, v in schema.items() if not (k == "default" and v is None)}
    if isinstance(schema, list):
        return [without_null_defaults(v) for v in schema]
    return schema


def out_of_range(prop: dict[str, Any]) -> Any:
    """A value just outside the bounds of a numeric or list property, or None if it has no bound."""
    for option in [prop, *prop.get("anyOf", [])]:
        if option.get("type") in ("integer", "number"):
            for key, value in (
                ("minimum", lambda b: b - 1),
                ("exclusiveMinimum", lambda b: b),
                ("maximum", lambda b: b + 1),
                ("exclusiveMaximum", lambda b: b),
            ):
                if key in option:
                    return value(option[key])
        if option.get("type") == "array" and option.get("minItems", 0) > 0:
            return []
    return None


BOUNDED = [
    (name, param, bad)
    for name, info in CATALOG.items()
    for param, prop in info.params_schema()["properties"].items()
    if (bad := out_of_range(prop)) is not None
]


def test_every_catalogue_method_is_served_with_its_schema(client):
    response = client.get("/methods")  # public, like /openapi.json that carries the same schemas
    assert response.status_code == 200
    assert response.json()["items"] == [
        {
            "name": name,
            "description": info.description,
            "reference": info.reference,
            "needs_fisher": info.needs_fisher,
            "params_schema": info.params_schema(),
        }
        for name, info in CATALOG.items()
    ]


def test_openapi_ties_each_method_to_its_parameter_model(client):
    components = client.get("/openapi.json").json()["components"]["schemas"]
    request = components["MergeRequest"]

    def resolve(ref: dict[str, str]) -> dict[str, Any]:
        return components[ref["$ref"].rsplit("/", 1)[-1]]

    assert request["properties"]["method"]["enum"] == list(CATALOG)
    assert request["properties"]["compare_with"]["items"]["enum"] == list(CATALOG)
    by_method = {
        rule["if"]["properties"]["method"]["const"]: rule["then"]["properties"]["params"] for rule in request["allOf"]
    }
    assert list(by_method) == list(CATALOG)
    for name, info in CATALOG.items():
        assert resolve(by_method[name]) == without_null_defaults(info.params_schema()), name
    listed = [resolve(ref) for ref in request["properties"]["params"]["anyOf"]]
    assert listed == [without_null_defaults(info.params_schema()) for info in CATALOG.values()]


@pytest.mark.parametrize("method", list(CATALOG))
def test_defaults_are_valid_and_an_unknown_key_is_named(client, method):
    accepted = client.post("/merges", headers=AUTH, json=job(method, {}))
    assert accepted.status_code == 422 and accepted.json()["error"]["code"] == "unknown_base_model", accepted.text

    response = client.post("/merges", headers=AUTH, json=job(method, {"no_such_parameter": 1}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_params" and repr(method) in error["message"]
    assert [d["loc"] for d in error["details"]] == [["body", "params", "no_such_parameter"]]


@pytest.mark.parametrize(("method", "param", "bad"), BOUNDED, ids=[f"{m}.{p}={b!r}" for m, p, b in BOUNDED])
def test_an_out_of_range_value_is_named(client, method, param, bad):
    response = client.post("/merges", headers=AUTH, json=job(method, {param: bad}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_params", error
    assert [d["loc"][:3] for d in error["details"]] == [["body", "params", param]], error


def test_every_method_has_a_bounded_parameter():
    """The out-of-range test above covers every method (each has at least the common bounded ones)."""
    assert {method for method, _, _ in BOUNDED} == set(CATALOG)


def test_unknown_method_and_malformed_bodies_keep_their_codes(client):
    cases = [
        (job("no_such_method", {}), "unknown_method"),
        ({**job("linear", {}), "compare_with": ["ties", "nope"]}, "unknown_method"),
        ({**job("linear", {"bogus": 1}), "compare_with": ["nope"]}, "unknown_method"),  # the method first, as before
        ({**job("linear", {"bogus": 1}), "base_model": 3}, "validation_error"),
        ({**job("linear", {}), "extra_field": 1}, "validation_error"),
        ({**job("linear", {}), "params": 3}, "validation_error"),
    ]
    for body, code in cases:
        response = client.post("/merges", headers=AUTH, json=body)
        assert response.status_code == 422 and response.json()["error"]["code"] == code, (body, response.text)
    unknown = client.post("/merges", headers=AUTH, json=job("no_such_method", {})).json()["error"]
    assert unknown["message"] == "unknown method 'no_such_method'" and unknown["details"] == {
        "methods": sorted(CATALOG)
    }


class ScaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=1.0, gt=0, le=4, description="how much of the safety update is added")


def test_a_method_added_to_the_catalogue_is_served_without_touching_app(tmp_path):
    """A method declared in the catalogue after this package was written is listed, documented and validated."""
    CATALOG["scaled_test"] = MethodInfo(
        name="scaled_test", params=ScaleParams, description="test method", reference="none", needs_fisher=False
    )
    try:
        settings = Settings(data_dir=tmp_path, api_keys="acme:key-acme")
        with TestClient(create_app(settings)) as client:
            served = {m["name"]: m for m in client.get("/methods").json()["items"]}
            assert served["scaled_test"]["params_schema"] == ScaleParams.model_json_schema()
            request = client.get("/openapi.json").json()["components"]["schemas"]["MergeRequest"]
            assert "scaled_test" in request["properties"]["method"]["enum"]
            bad = client.post("/merges", headers=AUTH, json=job("scaled_test", {"scale": 5}))
            assert bad.json()["error"]["code"] == "invalid_params", bad.text
            assert bad.json()["error"]["details"][0]["loc"] == ["body", "params", "scale"]
            good = client.post("/merges", headers=AUTH, json=job("scaled_test", {"scale": 2}))
            assert good.json()["error"]["code"] == "unknown_base_model", good.text
    finally:
        del CATALOG["scaled_test"]


def test_utility_metrics_and_judges_are_served_from_their_registries(client):
    """GET /methods lists every registered utility metric and judge; the request schema's choices are theirs."""
    body = client.get("/methods").json()
    assert body["utility_metrics"] == [
        {
            "name": name,
            "description": metric.description,
            "binary": metric.binary,
            "higher_is_better": metric.higher_is_better,
            "needs_generation": metric.needs_generation,
        }
        for name, metric in UTILITY_METRICS.items()
    ]
    assert body["judges"] == [
        {"name": name, "syntax": info.syntax, "description": info.description, "takes_model": info.takes_model}
        for name, info in JUDGES.items()
    ]
    assert {"keyword", "classifier"} <= set(JUDGES) and {"exact_match", "nll"} <= set(UTILITY_METRICS)
    evaluation = client.get("/openapi.json").json()["components"]["schemas"]["EvaluationRequest"]["properties"]
    assert evaluation["utility_metric"]["enum"] == list(UTILITY_METRICS)
    assert evaluation["judge"]["pattern"] == judge_spec_pattern()
    for judge, code in (("keyword", "unknown_base_model"), ("regex", "validation_error")):
        sets = {"harmful_dataset_id": "ds_h", "benign_dataset_id": "ds_b", "utility_eval_dataset_id": "ds_e"}
        request = {**job("linear", {}), "evaluation": {**sets, "judge": judge}}
        response = client.post("/merges", headers=AUTH, json=request)
        assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text
