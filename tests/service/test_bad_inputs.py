"""Bad input against the real API on PostgreSQL, one test per class of the hardening review:

1. numbers out of range or non-finite are refused at submit (never stored as null, never a 500), and a merge whose
   result is not finite fails its job with `non_finite_result` naming the module — it never succeeds;
2. crafted ids, names, cursors, configs, safetensors headers, archives and rows are 4xx, never 500, and leave
   nothing stored (the `target_modules: [1, 2]` upload used to commit its row and break the tenant's listing);
3. what the worker refuses, the upload refuses (same rules: `sstmerge_core.adapter_format`, `sstmerge_core.data`);
4. error responses stay small whatever the input, and the OpenAPI document lists them with the error schema.

(Job error messages naming inputs by id instead of server paths: tests/service/test_jobs.py.)
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save
from service_helpers import auth, error_of, merge_body, wait_for
from sqlalchemy import func, select

from app.domain.db.models import Adapter, Dataset, Job
from app.domain.db.session import session_scope
from tests.helpers.files import safetensors_bytes

pytestmark = pytest.mark.service

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}


def stored_state(settings) -> tuple[int, int, int, list[str]]:
    """(adapter rows, dataset rows, job rows, stored inputs): a refused request changes none of them. (Artifacts of
    jobs that other tests submitted may appear meanwhile; they are not inputs.)"""
    with session_scope(settings.resolved_database_url) as session:
        counts = [session.scalar(select(func.count()).select_from(m)) for m in (Adapter, Dataset, Job)]
    root = settings.resolved_storage_dir
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return (*counts, [f for f in files if "/jobs/" not in f])


def lora(rank: int = 2, dtype: str = "F32", np_dtype=np.float32) -> dict[str, tuple[str, np.ndarray]]:
    return {
        f"{MODULE}.lora_A.weight": (dtype, np.ones((rank, 8), np_dtype)),
        f"{MODULE}.lora_B.weight": (dtype, np.ones((8, rank), np_dtype)),
    }


def zip_bytes(members: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def adapter_zip(config: dict | str = CONFIG, weights: bytes | None = None) -> bytes:
    raw = config if isinstance(config, str) else json.dumps(config)
    return zip_bytes({"adapter_config.json": raw, "adapter_model.safetensors": weights or safetensors_bytes(lora())})


def encrypted_zip() -> bytes:
    """A zip whose entries are flagged encrypted (general purpose bit 0, local and central headers)."""
    raw = bytearray(adapter_zip())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := raw.find(signature, start)) != -1:
            raw[start + flag_at] |= 0x01
            start += 4
    return bytes(raw)


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def tar_file_and_folder() -> bytes:
    folder = tarfile.TarInfo("adapter_config.json")
    folder.type = tarfile.DIRTYPE
    return tar_bytes([(tarfile.TarInfo("adapter_config.json"), json.dumps(CONFIG).encode()), (folder, None)])


def post_file(api, kind: str, filename: str, payload: bytes, tenant: str = "acme", **data):
    return api.post(f"/{kind}", headers=auth(tenant), files={"file": (filename, io.BytesIO(payload))}, data=data)


def cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def raw_json(api, path: str, text: str, **headers):
    return api.post(path, headers={**auth("acme"), "Content-Type": "application/json", **headers}, content=text)


def test_out_of_range_numbers_are_refused_at_submit(api, settings, inputs):
    """Class 1: every number has a range; ±1e308, 2⁶⁴, 1e9 tokens, NaN and 1e400 (±inf once parsed) are 422 and
    create no job (before: a job, a null in the stored request, or a 500 on PostgreSQL)."""
    before = stored_state(settings)
    base = merge_body(inputs)
    params = base["params"]
    evaluation = {
        "harmful_dataset_id": inputs["data:harmful"],
        "benign_dataset_id": inputs["data:benign"],
        "utility_eval_dataset_id": inputs["data:utility_eval"],
    }
    bodies = [
        {**base, "params": {**params, "alphas": [1e308]}},
        {**base, "params": {**params, "alphas": [0.5, -1e308]}},
        {**base, "params": {**params, "alphas": [100.5]}},
        {**base, "params": {**params, "seed": 2**64}},
        {**base, "params": {**params, "seed": -1}},
        {**base, "params": {**params, "continuation_tokens": 10**9}},
        {**base, "params": {**params, "label_samples": 10**6}},
        {**base, "params": {**params, "max_samples": 10**9}},
        {**base, "params": {**params, "k": 2**40}},
        {**base, "safety_adapter": {"adapter_id": inputs["safety"], "weight": 1e308}},
        {**base, "evaluation": {**evaluation, "utility_tolerance": 5.0}},
        {**base, "evaluation": {**evaluation, "split_seed": 2**40}},
        {**base, "evaluation": {**evaluation, "limit": 10**12}},
    ]
    responses = [api.post("/merges", headers=auth("acme"), json=body) for body in bodies]
    text = json.dumps({**base, "params": "PARAMS", "evaluation": "EVALUATION"})
    for params_text, evaluation_text in [
        ('{"alphas": [1.0], "beta": 1e400}', "null"),
        ('{"alphas": [1.0], "damping": 1e400}', "null"),
        ('{"alphas": [NaN]}', "null"),
        ('{"alphas": [-Infinity]}', "null"),
        ("{}", json.dumps({**evaluation, "utility_tolerance": "TOL"}).replace('"TOL"', "1e400")),
        ("{}", json.dumps({**evaluation, "over_refusal_tolerance": "TOL"}).replace('"TOL"', "-1e400")),
        ("{}", json.dumps({**evaluation, "report_fraction": "TOL"}).replace('"TOL"', "NaN")),
    ]:
        body = text.replace('"PARAMS"', params_text).replace('"EVALUATION"', evaluation_text)
        responses.append(raw_json(api, "/merges", body))
    for response in responses:
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] in {"invalid_params", "validation_error"}, response.text
    assert stored_state(settings) == before


def test_non_finite_merge_fails_the_job_naming_the_module(api, worker, inputs, assets):
    """Class 1: finite factors whose product overflows float32 (PEFT would load infs) fail the job with
    non_finite_result naming the module; nothing is served (before: the job succeeded)."""
    tensors = load_file(str(assets.adapters["safety"] / "adapter_model.safetensors"))
    huge = {name: np.full_like(value, 1e19) for name, value in tensors.items()}
    config = (assets.adapters["safety"] / "adapter_config.json").read_text()
    response = post_file(api, "adapters", "huge.zip", adapter_zip(config, save(huge)), name="huge-but-finite")
    assert response.status_code == 201, response.text  # every value is finite: a valid upload
    body = merge_body(
        inputs,
        safety_adapter={"adapter_id": response.json()["id"]},
        method="linear",
        params={"alphas": [100]},
        utility_dataset_id=None,
        safety_dataset_id=None,
    )
    job = wait_for(api, "acme", api.post("/merges", headers=auth("acme"), json=body).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "non_finite_result", job
    assert "module model.layers." in job["error"]["message"] and "linear@100" in job["error"]["message"]
    served = api.get(f"/merges/{job['id']}/adapter", headers=auth("acme"))
    assert served.status_code == 409 and error_of(served)["code"] == "not_ready"


def test_crafted_requests_are_4xx_and_store_nothing(api, settings, inputs):
    """Class 2: NUL bytes and over-long values in ids, names, bodies and headers; crafted cursors; crafted configs,
    safetensors headers, archives and rows: each a 4xx with the error schema (never 500), nothing stored."""
    acme = auth("acme")
    job_id = api.post("/merges", headers=acme, json=merge_body(inputs)).json()["id"]  # a real job's sub-resources
    before = stored_state(settings)
    long_id = "ad_" + "0" * 2000
    checks: list[tuple[str, object, int, str | None]] = []

    def check(label: str, response, status: int, code: str | None = None) -> None:
        checks.append((label, response, status, code))

    for method, path in [
        ("GET", "/adapters/ad_%00x"),
        ("DELETE", "/adapters/ad_%00x"),
        ("GET", "/datasets/ds_%00x"),
        ("DELETE", "/datasets/ds_%00x"),
        ("GET", f"/merges/{job_id}%00"),
        ("POST", "/merges/mj_%00/cancel"),
        ("GET", "/merges/mj_%00/events"),
        ("GET", "/merges/mj_%00/adapter"),
        ("GET", "/merges/mj_%00/report"),
        ("GET", f"/adapters/{long_id}"),
        ("GET", f"/merges/{long_id}/metrics"),
    ]:
        check(f"{method} {path[:40]}", api.request(method, path, headers=acme), 404, "not_found")
    for bad in [
        cursor(["2026-01-01T00:00:00", "ad_1"]),  # naive time
        cursor(["2026-01-01T00:00:00+00:00", "ad_\u0000"]),  # NUL id
        cursor([["2026-01-01T00:00:00+00:00"], {"id": 1}]),  # nested
        cursor(["0001-01-01T00:00:00+14:00", "ad_1"]),  # out of range once in UTC
        cursor({"a": 1}),
        cursor("x" * 100),
        "%%%",
        "A" * 5000,
    ]:
        for listing in ("/adapters", "/datasets", "/merges"):
            check(f"cursor {listing}", api.get(listing, headers=acme, params={"cursor": bad}), 422, "invalid_cursor")
    for value in (2**31, 2**63, 10**30):
        response = api.get(f"/merges/{job_id}/events", headers=acme, params={"cursor": value})
        check(f"events cursor {value}", response, 422, "validation_error")
    body = merge_body(inputs)
    for label, mutated in [
        ("NUL base_model", {**body, "base_model": "tiny-qwen2\x00"}),
        ("NUL adapter id", {**body, "safety_adapter": {"adapter_id": "ad_\x00"}}),
        ("long adapter id", {**body, "safety_adapter": {"adapter_id": long_id}}),
        ("NUL dataset id", {**body, "utility_dataset_id": "ds\x00"}),
        (
            "NUL judge",
            {
                **body,
                "evaluation": {
                    "harmful_dataset_id": "a",
                    "benign_dataset_id": "b",
                    "utility_eval_dataset_id": "c",
                    "judge": "classifier:x\x00",
                },
            },
        ),
        ("NUL params key", {**body, "params": {"al\x00phas": [1.0]}}),
    ]:
        check(label, api.post("/merges", headers=acme, json=mutated), 422)
    check("idempotency key", api.post("/merges", headers={**acme, "Idempotency-Key": "k\x01"}, json=body), 422)
    check("deep JSON body", raw_json(api, "/merges", '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400)
    check("5000-digit int body", raw_json(api, "/merges", '{"params": {"seed": ' + "9" * 5000 + "}}"), 400)
    check("hub name NUL", api.post("/adapters", headers=acme, json={"source": "hf://o/n", "name": "a\x00"}), 422)
    check(
        "hub dataset column",
        api.post("/datasets", headers=acme, json={"source": "hf://o/n", "prompt_column": "a\x00"}),
        422,
    )
    jsonl = b'{"prompt": "hi"}\n'
    check("name NUL", post_file(api, "datasets", "d.jsonl", jsonl, name="a\x00b"), 422, "invalid_name")
    check("name 201", post_file(api, "datasets", "d.jsonl", jsonl, name="n" * 201), 422, "invalid_name")
    check("adapter name 201", post_file(api, "adapters", "a.zip", adapter_zip(), name="n" * 201), 422, "invalid_name")
    for label, payload in [
        ("r 2^31", adapter_zip({**CONFIG, "r": 2**31})),
        ("target_modules ints", adapter_zip({**CONFIG, "target_modules": [1, 2]})),
        ("huge nested config", adapter_zip('{"peft_type": "LORA", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")),
        ("huge int config", adapter_zip('{"peft_type": "LORA", "r": ' + "7" * 5000 + "}")),
        (
            "float offsets",
            adapter_zip(weights=safetensors_bytes(lora(), lambda h: h[next(iter(h))].update(data_offsets=[0.5, 64]))),
        ),
        (
            "text offsets",
            adapter_zip(weights=safetensors_bytes(lora(), lambda h: h[next(iter(h))].update(data_offsets="0-64"))),
        ),
        (
            "text dtype list",
            adapter_zip(weights=safetensors_bytes(lora(), lambda h: h[next(iter(h))].update(dtype=["F32"]))),
        ),
    ]:
        check(label, post_file(api, "adapters", "a.zip", payload), 422, "invalid_adapter")
    check("encrypted zip", post_file(api, "adapters", "a.zip", encrypted_zip()), 422, "invalid_archive")
    check("tar file + folder", post_file(api, "adapters", "a.tar.gz", tar_file_and_folder()), 422, "unsafe_archive")
    check("zip NUL member", post_file(api, "adapters", "a.zip", zip_bytes({"a\x00/adapter_config.json": "{}"})), 422)
    for label, payload in [
        ("5000-digit int row", b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}\n"),
        ("deep row", b'{"prompt": "hi", "n": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"),
        ("NaN row", b'{"prompt": "hi", "n": NaN}\n'),
        ("NUL column", b'{"prompt": "hi", "a\\u0000": 1}\n'),
    ]:
        check(label, post_file(api, "datasets", "d.jsonl", payload), 422, "invalid_dataset")

    failures = []
    for label, response, status, code in checks:
        body = response.json()
        if response.status_code != status or set(body) != {"error"} or (code and body["error"]["code"] != code):
            failures.append((label, response.status_code, response.text[:200]))
    assert not failures, failures
    for listing in ("/adapters", "/datasets", "/merges"):
        assert api.get(listing, headers=acme).status_code == 200
    assert stored_state(settings) == before


def test_upload_refuses_what_the_worker_would_refuse(api, settings, assets):
    """Class 3: r ≤ 0, wrong or mis-sized dtypes, overlapping or float offsets, bad rank_pattern, NaN values, rows
    with lone surrogates — accepted before (201) and refused by the worker's loader; now 422 at upload."""
    before = stored_state(settings)
    zero_rank = {
        f"{MODULE}.lora_A.weight": ("F32", np.ones((0, 8), np.float32)),
        f"{MODULE}.lora_B.weight": ("F32", np.ones((8, 0), np.float32)),
    }
    cases = {
        "r = 0": adapter_zip({**CONFIG, "r": 0}),
        "r = -2": adapter_zip({**CONFIG, "r": -2}),
        "rank-0 tensors": adapter_zip(weights=safetensors_bytes(zero_rank)),
        "int dtype": adapter_zip(weights=safetensors_bytes(lora(dtype="I32", np_dtype=np.int32))),
        "F16 declared, F32 bytes": adapter_zip(weights=safetensors_bytes(lora(dtype="F16", np_dtype=np.float32))),
        "overlapping offsets": adapter_zip(
            weights=safetensors_bytes(lora(), lambda h: h[f"{MODULE}.lora_B.weight"].update(data_offsets=[0, 64]))
        ),
        "float offsets": adapter_zip(
            weights=safetensors_bytes(lora(), lambda h: h[f"{MODULE}.lora_A.weight"].update(data_offsets=[0.0, 64.0]))
        ),
        "rank_pattern text": adapter_zip({**CONFIG, "rank_pattern": {"q_proj": "four"}}),
        "rank_pattern mismatch": adapter_zip({**CONFIG, "rank_pattern": {"q_proj": 4}}),
        "lora_alpha NaN": adapter_zip(json.dumps(CONFIG).replace('"lora_alpha": 4', '"lora_alpha": NaN')),
        "lora_alpha 1e300": adapter_zip({**CONFIG, "lora_alpha": 1e300}),
        "NaN weights": assets.archives["nan"].read_bytes(),
    }
    for label, payload in cases.items():
        response = post_file(api, "adapters", "a.zip", payload)
        assert response.status_code == 422 and error_of(response)["code"] == "invalid_adapter", (label, response.text)
    nan = post_file(api, "adapters", "a.zip", cases["NaN weights"])
    assert "non-finite" in error_of(nan)["message"]
    for rows in (b'{"prompt": "hi \\ud800"}\n', b'{"prompt": "hi", "response": "\\udc00 no"}\n'):
        response = post_file(api, "datasets", "d.jsonl", rows)
        assert response.status_code == 422 and "surrogate" in error_of(response)["message"], response.text
    assert stored_state(settings) == before


def test_error_bodies_stay_small(api):
    """Class 4: a 100 MB string is refused before it is parsed (413, the JSON body limit); values that do reach
    validation come back as a short prefix."""
    huge = api.post("/merges", headers=auth("acme"), json={"base_model": "x" * (100 << 20)})
    assert huge.status_code == 413 and len(huge.content) < 1000 and error_of(huge)["code"] == "payload_too_large"
    body = {"base_model": "b" * 400_000, "safety_adapter": {"adapter_id": "a"}, "method": "m" * 400_000}
    body["params"] = {"k" * 100_000: 1}
    response = api.post("/merges", headers=auth("acme"), json=body)
    assert response.status_code == 422 and len(response.content) < 20_000, len(response.content)
    named = api.post(
        "/merges",
        headers=auth("acme"),
        json={"base_model": "x", "safety_adapter": {"adapter_id": "a"}, "method": "m" * 400_000},
    )
    assert named.status_code == 422 and len(named.content) < 5_000, len(named.content)
    assert error_of(named)["code"] == "unknown_method"


def test_openapi_documents_every_error_response(api):
    """Every error status of every operation has the error schema (FastAPI's own 422 schema replaced)."""
    spec = api.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorOut"
    assert set(spec["components"]["schemas"]["ErrorOut"]["properties"]) == {"error"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            secured = operation.get("security") and {} not in operation["security"]  # `{}`: a key is optional
            assert {"422", "500"} <= set(responses) or not (operation.get("parameters") or secured)
            if secured:
                assert {"401", "429"} <= set(responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400 and not (path == "/readyz" and status == "503"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, status)


def test_embedding_lora_upload_and_submit(api, settings, inputs, assets, tmp_path):
    """PEFT embedding LoRA (`lora_embedding_A` (r × V), `lora_embedding_B` (d × r)) passes the upload rules, and the
    submit-time shape check compares it with the base model's (V × d) embedding table."""
    import torch
    from fastapi.testclient import TestClient
    from safetensors.torch import load_file as load_torch

    from app.main import create_app
    from sstmerge_core.adapters import LoraFactors, save_adapter

    table = next(v for k, v in load_torch(str(assets.qwen / "model.safetensors")).items() if "embed_tokens" in k)
    vocab, hidden = table.shape
    modules = {"model.embed_tokens": LoraFactors(torch.randn(hidden, 2) * 0.01, torch.randn(2, vocab) * 0.01)}
    folder = tmp_path / "embedding-lora"
    save_adapter(folder, modules, base_model=str(assets.qwen), embedding_modules=frozenset(modules))
    payload = zip_bytes({p.name: p.read_bytes() for p in folder.iterdir()})
    response = post_file(api, "adapters", "embedding.zip", payload, name="embedding")
    assert response.status_code == 201, response.text
    body = merge_body(
        inputs,
        safety_adapter={"adapter_id": response.json()["id"]},
        utility_adapters=[],
        method="linear",
        params={},
        utility_dataset_id=None,
        safety_dataset_id=None,
    )
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle-embedding"})  # no worker reads it
    with TestClient(create_app(idle)) as client:
        submitted = client.post("/merges", headers=auth("acme"), json=body)
        assert submitted.status_code == 202, submitted.text
        client.post(f"/merges/{submitted.json()['id']}/cancel", headers=auth("acme"))


def test_sizes_beyond_the_catalogue_columns_are_413(settings, api, tmp_path):
    """A file whose size does not fit the 32-bit `size_bytes` column is refused (413) before anything is read or
    stored, instead of failing the database write (sparse file: no disk used)."""
    from app.domain import datasets
    from app.domain.errors import TooLarge
    from app.domain.storage import get_storage

    before = stored_state(settings)
    path = tmp_path / "data.jsonl"
    with path.open("wb") as handle:
        handle.truncate(2**31)
    with session_scope(settings.resolved_database_url) as session, pytest.raises(TooLarge) as error:
        datasets._store(session, get_storage(settings), settings, "acme", path, name="big", source="upload:big")
    assert error.value.details == {"limit": 2**31 - 1}
    assert stored_state(settings) == before
