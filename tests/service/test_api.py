"""The HTTP API against real PostgreSQL and Redis: uploads, validation, auth, tenant isolation, idempotency,
health, metrics. Jobs submitted here are run by the session worker only where a test waits for them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    OPS_TOKEN,
    auth,
    error_of,
    merge_body,
    settings_env,
    tar_with,
    upload_adapter,
    upload_dataset,
)
from sqlalchemy import func, select

from app.domain.db.models import Adapter, Dataset
from app.domain.db.session import session_scope
from app.main import create_app

pytestmark = pytest.mark.service


def stored_state(settings) -> tuple[int, int, list[str]]:
    """(adapter rows, dataset rows, files under tenants/) — to prove that failed uploads leave nothing."""
    with session_scope(settings.resolved_database_url) as session:
        adapters = session.scalar(select(func.count()).select_from(Adapter))
        datasets = session.scalar(select(func.count()).select_from(Dataset))
    root = settings.resolved_storage_dir
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return adapters, datasets, files


def test_upload_adapter_zip_and_tgz(api, assets, inputs):
    response = upload_adapter(api, "acme", assets.archives["safety_tgz"])
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert set(adapter) == {"id", "name", "rank", "target_modules", "sha256", "base_model_hint", "created_at"}
    assert adapter["name"] == "safety"
    assert adapter["rank"] == 2 and adapter["target_modules"] == ["q_proj", "v_proj"]
    assert adapter["base_model_hint"].endswith("tiny-qwen2")
    from sstmerge_core.adapters import load_adapter

    assert adapter["sha256"] == load_adapter(assets.adapters["safety"]).sha256
    got = api.get(f"/adapters/{adapter['id']}", headers=auth("acme"))
    assert got.status_code == 200 and got.json() == adapter
    listed = api.get("/adapters", headers=auth("acme")).json()
    assert adapter["id"] in [a["id"] for a in listed["items"]]
    assert api.delete(f"/adapters/{adapter['id']}", headers=auth("acme")).status_code == 204
    assert api.get(f"/adapters/{adapter['id']}", headers=auth("acme")).status_code == 404


def test_upload_dataset_counts_rows_and_columns(api, assets, inputs):
    response = upload_dataset(api, "acme", assets.data["utility_eval"], name="capitals")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "capitals" and body["rows"] == 4 and body["columns"] == ["prompt", "response"]
    jsonl = api.get(f"/datasets/{inputs['data:safety']}", headers=auth("acme")).json()
    assert jsonl["rows"] == 6 and jsonl["columns"] == ["prompt", "response"]
    assert api.delete(f"/datasets/{body['id']}", headers=auth("acme")).status_code == 204


def test_models_lists_folders(api):
    body = api.get("/models", headers=auth("acme")).json()
    assert {m["name"]: m["model_type"] for m in body["items"]} == {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
    assert body["hub_enabled"] is False


def test_auth_required_and_cli_keys(api, settings):
    response = api.get("/adapters")
    assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert api.get("/adapters", headers={"Authorization": "Bearer nope"}).status_code == 401
    env = settings_env(settings)
    created = subprocess.run(
        [sys.executable, "-m", "sstmerge_core.cli", "keys", "create", "--tenant", "initech"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    assert api.get("/adapters", headers=headers).json() == {"items": [], "next_cursor": None}
    key_id = key.split("_")[1]
    subprocess.run(
        [sys.executable, "-m", "sstmerge_core.cli", "keys", "revoke", key_id], env=env, check=True, capture_output=True
    )
    # revoked in another process: the API stops trusting its cached check within SSTMERGE_AUTH_CACHE_SECONDS
    deadline = time.monotonic() + settings.auth_cache_seconds + 10
    while api.get("/adapters", headers=headers).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key is still accepted"
        time.sleep(0.2)


def test_bad_adapter_uploads_store_nothing(api, settings, assets, inputs, tmp_path):
    before = stored_state(settings)
    good = assets.adapters["safety"]
    config = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()
    dora_config = json.dumps({**json.loads(config), "use_dora": True}).encode()

    def zip_of(name: str, members: dict[str, bytes]):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as archive:
            for member, payload in members.items():
                archive.writestr(member, payload)
        return path

    def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info

    cases = {
        "traversal": (
            zip_of("t.zip", {"../evil/adapter_config.json": config, "adapter_model.safetensors": weights}),
            422,
            "unsafe_archive",
        ),
        "absolute": (zip_of("a.zip", {"/etc/adapter_config.json": config}), 422, "unsafe_archive"),
        "symlink": (
            tar_with(tmp_path / "s.tar.gz", [link("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd")]),
            422,
            "unsafe_archive",
        ),
        "hardlink": (
            tar_with(tmp_path / "h.tar.gz", [link("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd")]),
            422,
            "unsafe_archive",
        ),
        "device": (
            tar_with(tmp_path / "d.tar.gz", [link("adapter_config.json", tarfile.CHRTYPE, "")]),
            422,
            "unsafe_archive",
        ),
        "pickle": (
            zip_of("p.zip", {"adapter_config.json": config, "adapter_model.bin": b"\x80\x04K\x01."}),
            422,
            "pickle_refused",
        ),
        "missing_weights": (zip_of("m.zip", {"adapter_config.json": config}), 422, "invalid_adapter"),
        "dora": (
            zip_of("do.zip", {"adapter_config.json": dora_config, "adapter_model.safetensors": weights}),
            422,
            "invalid_adapter",
        ),
        "truncated": (
            zip_of("tr.zip", {"adapter_config.json": config, "adapter_model.safetensors": weights[:-10]}),
            422,
            "invalid_adapter",
        ),
        "not_an_archive": (zip_of("x.zip", {}).with_name("x.zip"), 422, "invalid_adapter"),
        "garbage": (tmp_path / "g.zip", 422, "invalid_archive"),
        "too_many_members": (
            zip_of("n.zip", {f"f{i}.txt": b"" for i in range(settings.max_archive_members + 1)}),
            413,
            "archive_too_large",
        ),
    }
    (tmp_path / "g.zip").write_bytes(b"this is not an archive")
    for name, (archive, status, code) in cases.items():
        response = upload_adapter(api, "acme", archive)
        assert response.status_code == status, (name, response.text)
        assert error_of(response)["code"] == code, (name, response.text)
    assert stored_state(settings) == before


def test_oversize_and_zip_bomb_are_413(settings, assets, tmp_path):
    small = settings.model_copy(update={"max_upload_bytes": 4096, "max_extracted_bytes": 1 << 20})
    before = stored_state(settings)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("adapter_config.json", b"{}")
        archive.writestr("adapter_model.safetensors", b"\0" * (2 << 20))  # 2 MiB of zeros, ~2 KiB zipped
    assert bomb.stat().st_size < 4096 < assets.archives["utility"].stat().st_size
    with TestClient(create_app(small)) as client:
        response = upload_adapter(client, "acme", assets.archives["utility"])
        assert response.status_code == 413 and error_of(response)["code"] == "payload_too_large"
        response = upload_dataset(client, "acme", assets.data["utility"].with_name("utility.jsonl"))
        assert response.status_code == 201  # small files still pass
        client.delete(f"/datasets/{response.json()['id']}", headers=auth("acme"))
        chunked = client.post(
            "/datasets",
            headers={**auth("acme"), "Content-Type": "multipart/form-data; boundary=x"},
            content=iter([b"x" * (64 << 10)] * 4),
        )
        assert chunked.status_code == 413
        response = upload_adapter(client, "acme", bomb)
        assert response.status_code == 413 and error_of(response)["code"] == "archive_too_large"
    assert stored_state(settings) == before


def test_bad_datasets_are_422(api, settings, tmp_path):
    before = stored_state(settings)
    cases = {
        "no_prompt.jsonl": b'{"question": "hi"}\n',
        "empty.jsonl": b"",
        "latin1.csv": "prompt\ncaf\xe9\n".encode("latin-1"),
        "broken.jsonl": b'{"prompt": "a"}\n{not json\n',
        "data.txt": b"prompt\nhello\n",
    }
    for name, payload in cases.items():
        response = api.post("/datasets", headers=auth("acme"), files={"file": (name, io.BytesIO(payload))})
        assert response.status_code == 422, (name, response.text)
        assert error_of(response)["code"] == "invalid_dataset", (name, response.text)
    assert stored_state(settings) == before


def test_submit_validation(api, inputs, assets):
    cases = [
        (merge_body(inputs, params={"alphas": [1.0], "bogus": 1}), "invalid_params"),
        (merge_body(inputs, method="nope"), "unknown_method"),
        (merge_body(inputs, compare_with=["linear", "nope"]), "unknown_method"),
        (merge_body(inputs, base_model="no-such-model"), "unknown_base_model"),
        (merge_body(inputs, base_model="org/model"), "unknown_base_model"),  # Hub disabled
        (merge_body(inputs, utility_dataset_id=None), "missing_dataset"),
        (merge_body(inputs, safety_adapter={"adapter_id": "ad_missing"}), "adapter_not_found"),
        (merge_body(inputs, safety_dataset_id="ds_missing"), "dataset_not_found"),
        (merge_body(inputs, base_model="tiny-llama"), "base_model_mismatch"),
    ]
    for body, code in cases:
        response = api.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 422, (code, response.text)
        assert error_of(response)["code"] == code, response.text
    bogus = api.post("/merges", headers=auth("acme"), json=merge_body(inputs, params={"bogus": 1}))
    assert ["body", "params", "bogus"] in [d["loc"] for d in error_of(bogus)["details"]]
    malformed = api.post("/merges", headers=auth("acme"), json={"base_model": 3})
    assert malformed.status_code == 422 and error_of(malformed)["code"] == "validation_error"


def test_wrong_base_model_adapters_are_refused_at_submit(api, inputs, assets):
    llama = upload_adapter(api, "acme", assets.archives["llama"]).json()["id"]
    wide = upload_adapter(api, "acme", assets.archives["wide"]).json()["id"]  # "tiny-qwen2" with hidden 48
    alone = {
        "utility_adapters": [],
        "method": "linear",
        "params": {},
        "utility_dataset_id": None,
        "safety_dataset_id": None,
    }
    cases = [
        (merge_body(inputs, safety_adapter={"adapter_id": llama}), "base_model_mismatch", "tiny-llama"),
        (merge_body(inputs, safety_adapter={"adapter_id": wide}), "adapter_mismatch", "self_attn.q_proj"),
        (
            merge_body(inputs, safety_adapter={"adapter_id": wide}, **alone),
            "base_model_mismatch",
            "model.layers.0.self_attn.q_proj",
        ),
    ]
    for body, code, named in cases:
        response = api.post("/merges", headers=auth("acme"), json=body)
        assert response.status_code == 422 and error_of(response)["code"] == code, response.text
        assert named in error_of(response)["message"]
    for adapter_id in (llama, wide):
        api.delete(f"/adapters/{adapter_id}", headers=auth("acme"))


def test_idempotency(api, inputs, worker):
    body = merge_body(inputs, method="linear", utility_dataset_id=None, safety_dataset_id=None, params={})
    first = api.post("/merges", headers={**auth("acme"), "Idempotency-Key": "k-1"}, json=body)
    assert first.status_code == 202 and first.headers["location"] == f"/merges/{first.json()['id']}"
    again = api.post("/merges", headers={**auth("acme"), "Idempotency-Key": "k-1"}, json=body)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = api.post(
        "/merges", headers={**auth("acme"), "Idempotency-Key": "k-1"}, json={**body, "params": {"alphas": [0.5]}}
    )
    assert other.status_code == 409 and error_of(other)["code"] == "idempotency_conflict"
    fresh = api.post("/merges", headers={**auth("acme"), "Idempotency-Key": "k-2"}, json=body)
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    unkeyed = [api.post("/merges", headers=auth("acme"), json=body).json()["id"] for _ in range(2)]
    assert unkeyed[0] != unkeyed[1]


def test_tenant_isolation(api, inputs, worker):
    from service_helpers import wait_for

    job = api.post(
        "/merges",
        headers=auth("acme"),
        json=merge_body(inputs, method="linear", params={}, utility_dataset_id=None, safety_dataset_id=None),
    )
    job_id = job.json()["id"]
    assert wait_for(api, "acme", job_id)["status"] == "succeeded"
    adapter_id, dataset_id = inputs["safety"], inputs["data:safety"]
    as_globex = auth("globex")
    for method, path in [
        ("GET", f"/adapters/{adapter_id}"),
        ("DELETE", f"/adapters/{adapter_id}"),
        ("GET", f"/datasets/{dataset_id}"),
        ("DELETE", f"/datasets/{dataset_id}"),
        ("GET", f"/merges/{job_id}"),
        ("POST", f"/merges/{job_id}/cancel"),
        ("GET", f"/merges/{job_id}/events"),
        ("GET", f"/merges/{job_id}/metrics"),
        ("GET", f"/merges/{job_id}/adapter"),
        ("GET", f"/merges/{job_id}/plot.png"),
        ("GET", f"/merges/{job_id}/report.html"),
        ("GET", f"/merges/{job_id}/report"),
    ]:
        response = api.request(method, path, headers=as_globex)
        assert response.status_code == 404, (method, path, response.text)
        assert error_of(response)["code"] == "not_found"
    assert api.get(f"/merges/{job_id}/adapter", headers=auth("acme")).status_code == 200
    unevaluated = api.get(f"/merges/{job_id}/report.html", headers=auth("acme"))  # the owner: no evaluation, no page
    assert unevaluated.status_code == 404 and "without evaluation" in error_of(unevaluated)["message"]
    assert api.get(f"/merges/{job_id}/report.html").status_code == 401
    for listing in ("/adapters", "/datasets", "/merges"):
        assert api.get(listing, headers=as_globex).json()["items"] == []
    response = api.post("/merges", headers=as_globex, json=merge_body(inputs))
    assert response.status_code == 422 and error_of(response)["code"] == "adapter_not_found"
    # the same idempotency key in another tenant is another job
    body = merge_body(inputs, method="linear", params={}, utility_dataset_id=None, safety_dataset_id=None)
    a = api.post("/merges", headers={**auth("acme"), "Idempotency-Key": "shared"}, json=body)
    assert a.status_code == 202
    assert api.get("/merges?limit=100", headers=as_globex).json()["items"] == []


def test_list_pagination_and_status_filter(api, inputs):
    body = merge_body(inputs, method="linear", params={}, utility_dataset_id=None, safety_dataset_id=None)
    created = [api.post("/merges", headers=auth("acme"), json=body).json()["id"] for _ in range(3)]
    seen, cursor = [], None
    while True:
        page = api.get("/merges", headers=auth("acme"), params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        seen += [j["id"] for j in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and set(created) <= set(seen)
    assert seen.index(created[2]) < seen.index(created[0])  # newest first
    for status in ("queued", "succeeded"):
        items = api.get("/merges", headers=auth("acme"), params={"status": status, "limit": 100}).json()["items"]
        assert all(j["status"] == status for j in items)
    bad = api.get("/merges", headers=auth("acme"), params={"cursor": "%%%"})
    assert bad.status_code == 422 and error_of(bad)["code"] == "invalid_cursor"


def test_delete_in_use_is_409(api, inputs, settings):
    queued = settings.model_copy(update={"queue": settings.queue + "-idle"})  # nobody consumes this queue
    with TestClient(create_app(queued)) as client:
        job = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()
        response = client.delete(f"/adapters/{inputs['safety']}", headers=auth("acme"))
        assert response.status_code == 409 and error_of(response)["code"] == "in_use"
        assert job["id"] in error_of(response)["details"]["jobs"]
        assert client.post(f"/merges/{job['id']}/cancel", headers=auth("acme")).status_code == 200


def test_health_ready_metrics_docs(api, settings):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}
    metrics = api.get("/metrics", headers={"Authorization": f"Bearer {OPS_TOKEN}"}).text
    assert "sstmerge_http_requests_total" in metrics and 'sstmerge_jobs{status="queued"}' in metrics
    assert 'route="/healthz"' in metrics
    spec = api.get("/openapi.json").json()
    assert {"/models", "/adapters", "/datasets", "/merges", "/merges/{job_id}/adapter", "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/adapters"]["post"]["requestBody"]["content"]
    assert api.get("/docs").status_code == 200
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
        assert response.status_code == 503
        assert response.json()["checks"]["broker"].startswith("error") and response.json()["checks"]["database"] == "ok"


def test_unknown_route_and_method_use_error_format(api):
    assert error_of(api.get("/nope", headers=auth("acme")))["code"] == "not_found"
    assert error_of(api.put("/merges", headers=auth("acme")))["code"] == "method_not_allowed"
    response = api.post("/adapters", headers={**auth("acme"), "Content-Type": "text/plain"}, content=b"x")
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"
    hub = api.post("/adapters", headers=auth("acme"), json={"source": "hf://org/lora@main"})
    assert hub.status_code == 422 and error_of(hub)["code"] == "hub_disabled"
    bad = api.post("/adapters", headers=auth("acme"), json={"source": "http://example.com/x"})
    assert bad.status_code == 422 and error_of(bad)["code"] == "validation_error"
