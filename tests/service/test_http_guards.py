"""HTTP-side guards against one client harming the others, on the real components: failed-authentication limits
keyed by address and key prefix (Redis, and Redis killed), `X-Forwarded-For` believed from configured proxies
only, and the read timeouts, header size limit and per-client connection limit of the server `sstmerge serve`
runs (a real uvicorn on 127.0.0.1, real slow sockets, every wait bounded)."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from fault_servers import ApiServer, PrivateRedis
from live_server import live_server
from service_helpers import API_KEYS, OPS_TOKEN, auth, merge_body, settings_env

from app.domain.auth import create_key
from app.domain.db.session import session_scope
from app.main import create_app

pytestmark = pytest.mark.service


def _limited(settings, **update):
    return settings.model_copy(
        update={"queue": f"{settings.queue}-guards-{uuid.uuid4().hex[:6]}", "rate_limit_failed_auth": "5/minute"}
        | update
    )


def _statuses(client, key: str, count: int, **headers: str) -> list[int]:
    return [
        client.get("/models", headers={"Authorization": f"Bearer {key}", **headers}).status_code for _ in range(count)
    ]


def test_wrong_keys_lock_out_neither_valid_keys_nor_other_addresses(settings):
    """Behind one address (a NAT), a client sending wrong keys is refused after the limit; valid keys from the
    same address keep working, unless they start like the guessed keys (`sst_<id>` of a stored key): those are
    locked from this address only, for at most the window."""
    limited = _limited(settings)
    acme = API_KEYS["acme"]
    with TestClient(create_app(limited)) as nat, TestClient(create_app(limited), client=("10.1.2.3", 4000)) as other:
        assert _statuses(nat, "not-a-key", 6) == [401] * 5 + [429]
        assert nat.get("/models", headers=auth("acme")).status_code == 200
        assert nat.get("/models", headers=auth("globex")).status_code == 200
        assert _statuses(nat, acme[:12] + "guess", 5) == [401] * 5  # guesses of acme's key (same prefix)
        locked = nat.get("/models", headers=auth("acme"))
        assert locked.status_code == 429 and locked.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(locked.headers["retry-after"]) <= 60
        assert nat.get("/models", headers=auth("globex")).status_code == 200
        assert other.get("/models", headers=auth("acme")).status_code == 200  # another address: its own buckets


def test_forwarded_for_is_believed_from_configured_proxies_only(settings):
    """On the server `serve` runs, a client on 127.0.0.1 rotating `X-Forwarded-For` is still one client; with
    127.0.0.1 a trusted proxy each forwarded address is a client, and what a client prepends is ignored."""
    wrong = "not-a-key"
    app = create_app(_limited(settings))
    with live_server(app, served=True) as url, httpx.Client(base_url=url, timeout=30) as client:
        rotating = [_statuses(client, wrong, 1, **{"X-Forwarded-For": f"192.0.2.{n}"})[0] for n in range(6)]
        assert rotating == [401] * 5 + [429]
    app = create_app(_limited(settings, trusted_proxies=["127.0.0.1"]))
    with live_server(app, served=True) as url, httpx.Client(base_url=url, timeout=30) as client:
        rotating = [_statuses(client, wrong, 1, **{"X-Forwarded-For": f"192.0.2.{n}"})[0] for n in range(6)]
        assert rotating == [401] * 6
        forged = [
            _statuses(client, wrong, 1, **{"X-Forwarded-For": f"198.51.100.{n}, 203.0.113.7"})[0] for n in range(6)
        ]
        assert forged == [401] * 5 + [429]  # the client is 203.0.113.7, whatever it puts on the left


def test_limits_hold_while_their_redis_is_down(settings, tmp_path, caplog):
    """Redis killed: each API process counts in its own memory (logged once), so wrong keys are still refused
    past the limit and valid keys still work; shared counting resumes once Redis answers."""
    from app.domain import rate_limits

    redis = PrivateRedis(tmp_path / "redis")
    try:
        limited = _limited(settings, rate_limit_storage_url=redis.url)
        with TestClient(create_app(limited)) as client:
            assert _statuses(client, "not-a-key", 2) == [401, 401]  # counted in Redis
            redis.kill()
            with caplog.at_level(logging.WARNING, logger=rate_limits.__name__):
                started = time.monotonic()
                assert _statuses(client, "not-a-key", 6) == [401] * 5 + [429]
                assert client.get("/models", headers=auth("acme")).status_code == 200
                assert time.monotonic() - started < 10
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
            redis.start()
            time.sleep(rate_limits.STORE_RETRY_SECONDS + 0.5)
            with caplog.at_level(logging.WARNING, logger=rate_limits.__name__):
                assert client.get("/models", headers=auth("acme")).status_code == 200
            assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        redis.stop()


# the server's read timeouts, header limit and connection limit


def _served(settings, **update):
    fast = {
        "http_header_timeout_seconds": 1.0,
        "http_body_timeout_seconds": 1.0,
        "http_min_body_bytes_per_second": 1024,
        "queue": f"{settings.queue}-slow-{uuid.uuid4().hex[:6]}",
    }
    return create_app(settings.model_copy(update=fast | update))


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(10)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict, float]:
    """Status and JSON body of the server's answer, and when it came (time.monotonic()); the socket is read until
    the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body), time.monotonic()


def _dribble(sock: socket.socket, data: bytes, rate: float, limit: float) -> None:
    """Send `data` at `rate` bytes per second until it is sent, the server closes, or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    step = max(1, int(rate / 5))
    for start in range(0, len(data), step):
        if time.monotonic() > deadline:
            return
        try:
            sock.sendall(data[start : start + step])
        except OSError:
            return
        time.sleep(step / rate)


def _slow_headers(url: str) -> tuple[int, dict, float]:
    with _connect(url) as sock:
        request = f"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEYS['acme']}\r\n\r\n".encode()
        _dribble(sock, request, rate=1, limit=6)
        return _answer(sock)


def _slow_body(url: str) -> tuple[int, dict, float]:
    boundary = "slowboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'.encode()
        + b'{"prompt": "tea"}\n' * 2000
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEYS['acme']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _connect(url) as sock:
        sock.sendall(head)
        _dribble(sock, body, rate=38, limit=6)
        return _answer(sock)


def test_slow_connections_are_cut_and_others_served(settings):
    """Eight slow clients (headers at 1 byte/s, bodies at 38 B/s, as in the probe) are each answered 408 in the
    JSON error shape within a few seconds of their timeout (1 s here), while a normal request is served."""
    app = _served(settings)
    with live_server(app, served=True) as url, ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        slow = [pool.submit(_slow_headers, url) for _ in range(4)] + [pool.submit(_slow_body, url) for _ in range(4)]
        time.sleep(0.3)
        assert httpx.get(f"{url}/models", headers=auth("acme"), timeout=10).status_code == 200
        answers = [future.result(timeout=30) for future in slow]
    for status, body, at in answers:
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert at - started < 5, at - started


def test_idle_greedy_and_garbled_connections(settings):
    """A connection that sends nothing is closed (408) after the header timeout; headers beyond the limit are
    431; a fifth open connection of a client limited to four is 429 while a client's four are open, and served
    once they close; a request that is not HTTP gets uvicorn's 400 in the JSON error shape."""
    app = _served(settings, http_max_connections_per_client=4, http_header_timeout_seconds=3.0)
    with live_server(app, served=True) as url:
        with _connect(url) as idle:
            started = time.monotonic()
            status, body, at = _answer(idle)
            assert status == 408 and body["error"]["code"] == "request_timeout" and 2.5 < at - started < 6
        with _connect(url) as greedy:
            greedy.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (80 << 10) + b"\r\n\r\n")
            status, body, _ = _answer(greedy)
            assert status == 431 and body["error"]["code"] == "headers_too_large"
        held = [_connect(url) for _ in range(4)]
        try:
            time.sleep(0.2)
            with _connect(url) as fifth:
                status, body, _ = _answer(fifth)
                assert status == 429 and body["error"]["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        with _connect(url) as garbled:
            garbled.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            status, body, _ = _answer(garbled)
            assert status == 400 and body["error"]["code"] == "malformed_request", body


# what an error tells the client


def test_a_crashed_job_names_no_exception(api, inputs, settings, monkeypatch, caplog):
    """A job whose merge raises an unexpected exception fails as internal_error with a message that names no
    exception (class or text); the worker's log has both."""
    import numpy as np

    from app.domain.storage import get_storage
    from sstmerge_core.pipeline import ModelCache
    from workers import runner

    def broken(*_args, **_kwargs):
        raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")

    monkeypatch.setattr(runner, "run_merge", broken)  # fault injection: the real runner, a failing merge
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    with TestClient(create_app(idle)) as client:  # a queue no worker reads: the runner below is the only one
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
    with caplog.at_level(logging.ERROR, logger=runner.__name__):
        runner.JobRunner(idle, get_storage(idle), ModelCache()).run(job_id)
    job = api.get(f"/merges/{job_id}", headers=auth("acme")).json()
    assert job["status"] == "failed" and job["error"]["code"] == "internal_error", job
    assert "LinAlgError" not in job["error"]["message"] and "SVD" not in job["error"]["message"], job
    crashed = [r for r in caplog.records if r.getMessage() == "job crashed"]
    assert crashed and crashed[0].exc_info and "SVD did not converge" in str(crashed[0].exc_info[1])


def test_openapi_says_readyz_is_open_and_405_lists_the_right_methods(api):
    """/readyz is documented as open (the operator token optional, no 401/429) and answers without a key; a 405
    answers `Allow` with exactly the methods the OpenAPI document gives the path, in the JSON error shape."""
    doc = api.get("/openapi.json").json()
    ready = doc["paths"]["/readyz"]["get"]
    assert {} in ready["security"] and not {"401", "429"} & set(ready["responses"]), ready
    assert api.get("/readyz").status_code == 200
    assert doc["paths"]["/merges"]["get"]["security"] == [{"HTTPBearer": []}]  # a tenant's key stays required
    checked = 0
    for path, operations in doc["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x1", path)
        documented = sorted(method.upper() for method in operations)
        for method in sorted({"DELETE", "GET", "PATCH", "POST", "PUT"} - set(documented)):
            response = api.request(method, concrete, headers=auth("acme"))
            assert response.status_code == 405, (method, concrete, response.status_code)
            assert sorted(response.headers["allow"].split(", ")) == documented, (method, concrete)
            assert response.json()["error"]["code"] == "method_not_allowed"
            checked += 1
    assert checked > 40


def _drop_upload(url: str, path: str) -> None:
    """Send the headers and a tenth of a 1 MB multipart body, then close the connection."""
    boundary = "dropboundary"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEYS['acme']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {1 << 20}\r\n\r\n"
    ).encode()
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'.encode()
    with _connect(url) as sock:
        sock.sendall(head + part + b'{"prompt": "tea"}\n' * 6000)
        time.sleep(0.3)


def test_a_dropped_upload_is_the_clients_doing(settings, caplog):
    """A client that closes its connection in the middle of an upload is logged and counted as 499
    `client_disconnected`, never as an unhandled error or a 500; nothing of the upload stays behind."""
    app = _served(settings, http_header_timeout_seconds=10.0, http_body_timeout_seconds=10.0)
    uploads = settings.resolved_work_dir / "uploads"
    with caplog.at_level(logging.INFO), live_server(app, served=True) as url:
        for path in ("/datasets", "/adapters"):
            _drop_upload(url, path)
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if r.getMessage() == "request" and r.method == "POST"]) < 2:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.1)
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {OPS_TOKEN}"}, timeout=10).text
    logged = [(r.path, r.status) for r in caplog.records if r.getMessage() == "request" and r.method == "POST"]
    assert sorted(logged) == [("/adapters", 499), ("/datasets", 499)], logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert 'route="/datasets",status="499"' in metrics and 'status="500"' not in metrics
    assert not any(uploads.iterdir()) if uploads.exists() else True


def _new_tenant(settings) -> dict[str, str]:
    """A fresh tenant with a stored key: its Authorization header."""
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_key(session, f"t-{uuid.uuid4().hex[:10]}")
    return {"Authorization": f"Bearer {key}"}


def _upload(client, headers: dict, path: str, file: Path, name: str | None = None, filename: str | None = None):
    with file.open("rb") as handle:
        files = {"file": (filename or file.name, handle)}
        return client.post(path, headers=headers, files=files, data={"name": name} if name is not None else {})


INVISIBLE = ["\u202e", "\u202d", "\u2066", "\u2069", "\u200e", "\u061c"]  # bidi controls
INVISIBLE += ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]  # zero-width


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_display_names_refuse_bidi_and_zero_width_characters(api, assets, settings, char):
    """A name with a bidi control or a zero-width character is 422 (`invalid_name` in a form, `validation_error`
    in JSON) for adapters and datasets; a file name loses such characters; other scripts are welcome."""
    tenant = _new_tenant(settings)
    adapter = _upload(api, tenant, "/adapters", assets.archives["safety"], name=f"safe{char}ty")
    assert adapter.status_code == 422 and adapter.json()["error"]["code"] == "invalid_name", adapter.text
    dataset = _upload(api, tenant, "/datasets", assets.data["safety"], name=f"{char}data")
    assert dataset.status_code == 422 and dataset.json()["error"]["code"] == "invalid_name", dataset.text
    for path in ("/adapters", "/datasets"):
        hub = api.post(path, headers=tenant, json={"source": "hf://org/name", "name": f"x{char}y"})
        assert hub.status_code == 422 and hub.json()["error"]["code"] == "validation_error", hub.text
    cleaned = _upload(api, tenant, "/datasets", assets.data["safety"], filename=f"ev{char}il.jsonl")
    assert cleaned.status_code == 201 and cleaned.json()["name"] == "evil", cleaned.text
    if char == INVISIBLE[0]:
        named = _upload(api, tenant, "/datasets", assets.data["safety"], name="données 数据 بيانات")
        assert named.status_code == 201 and named.json()["name"] == "données 数据 بيانات"
    assert [a["name"] for a in api.get("/adapters", headers=tenant).json()["items"]] == []


def _stored_files(settings) -> list[Path]:
    return sorted(p for p in settings.resolved_storage_dir.rglob("*") if p.is_file())


def test_tenant_quotas_on_stored_inputs(api, settings, assets):
    """Past `tenant_max_inputs` adapters and datasets, or `tenant_max_input_bytes` bytes, an upload is 507
    `quota_exceeded` (details say which quota; no Retry-After: waiting does not help, deleting does) and
    nothing is stored; a quota lowered below what a tenant has leaves its inputs readable."""
    tenant, data = _new_tenant(settings), assets.data["safety"]
    counted = settings.model_copy(update={"tenant_max_inputs": 2, "queue": f"{settings.queue}-idle"})
    with TestClient(create_app(counted)) as client:
        first = _upload(client, tenant, "/datasets", data)
        assert (
            first.status_code == 201
            and _upload(client, tenant, "/adapters", assets.archives["safety"]).status_code == 201
        )
        before = _stored_files(settings)
        for path, file in (("/datasets", data), ("/adapters", assets.archives["utility"])):
            refused = _upload(client, tenant, path, file)
            assert refused.status_code == 507, refused.text
            error = refused.json()["error"]
            assert error["code"] == "quota_exceeded" and error["details"] == {"quota": "inputs", "limit": 2, "used": 2}
            assert "retry-after" not in refused.headers
        assert _stored_files(settings) == before
        assert _upload(client, _new_tenant(settings), "/datasets", data).status_code == 201  # another tenant's quota
        assert client.delete(f"/datasets/{first.json()['id']}", headers=tenant).status_code == 204
        assert _upload(client, tenant, "/datasets", data).status_code == 201
    tenant, size = _new_tenant(settings), data.stat().st_size
    sized = settings.model_copy(update={"tenant_max_input_bytes": 2 * size + 10, "queue": f"{settings.queue}-idle"})
    with TestClient(create_app(sized)) as client:
        stored = [_upload(client, tenant, "/datasets", data).status_code for _ in range(2)]
        assert stored == [201, 201]
        refused = _upload(client, tenant, "/datasets", data)
        assert refused.status_code == 507 and refused.json()["error"]["details"]["quota"] == "bytes", refused.text
        assert refused.json()["error"]["details"]["used"] == 2 * size
    lowered = settings.model_copy(update={"tenant_max_inputs": 1, "queue": f"{settings.queue}-idle"})
    with TestClient(create_app(lowered)) as client:
        items = client.get("/datasets", headers=tenant).json()["items"]
        assert len(items) == 2 and all(
            client.get(f"/datasets/{d['id']}", headers=tenant).status_code == 200 for d in items
        )
        assert _upload(client, tenant, "/datasets", data).json()["error"]["code"] == "quota_exceeded"


def test_serve_runs_the_guarded_server(settings, tmp_path):
    """`sstmerge serve` with two API processes (each reads its limits from the environment): an idle connection
    is cut with 408 after SSTMERGE_HTTP_HEADER_TIMEOUT_SECONDS, and a rotating X-Forwarded-For from 127.0.0.1 does
    not escape the failed-authentication limit (no proxy is trusted by default)."""
    env = settings_env(settings) | {
        "SSTMERGE_API_WORKERS": "2",
        "SSTMERGE_QUEUE": f"{settings.queue}-serve-{uuid.uuid4().hex[:6]}",
        "SSTMERGE_HTTP_HEADER_TIMEOUT_SECONDS": "1",
        "SSTMERGE_RATE_LIMIT_FAILED_AUTH": "3/minute",
    }
    server = ApiServer(env, tmp_path / "api.log")
    try:
        with _connect(server.url) as idle:
            started = time.monotonic()
            status, body, at = _answer(idle)
            assert status == 408 and body["error"]["code"] == "request_timeout" and at - started < 4
        with httpx.Client(base_url=server.url, timeout=30) as client:
            rotating = [_statuses(client, "not-a-key", 1, **{"X-Forwarded-For": f"192.0.2.{n}"})[0] for n in range(4)]
        assert rotating == [401] * 3 + [429]
    finally:
        server.stop()
