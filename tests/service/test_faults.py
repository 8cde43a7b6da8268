"""Fault tests on real servers: the broker loses its messages (`kill -9` of a Redis without persistence), the
database stops for longer than a delivery's retries, the API is SIGKILLed in the middle of an upload. Every job
ends finished, none succeeds twice, nothing is left behind. Private Redis and PostgreSQL servers are started by
the tests (`fault_servers`); the shared ones are never touched."""

from __future__ import annotations

import threading
import time
import uuid
import zipfile

import httpx
import pytest
from fastapi.testclient import TestClient
from fault_servers import ApiServer, PrivatePostgres, PrivateRedis
from service_helpers import (
    API_KEYS,
    OPS_TOKEN,
    SLOW_PARAMS,
    WorkerProcess,
    auth,
    long_data,
    merge_body,
    settings_env,
    upload_adapter,
    upload_dataset,
    upload_merge_inputs,
    wait_for,
)
from sqlalchemy import select

from app.domain.db.models import Adapter, Job
from app.domain.db.session import session_scope
from app.domain.settings import Settings
from app.main import create_app

pytestmark = pytest.mark.service


def status_events(client, job_id: str) -> list[str]:
    items = client.get(f"/merges/{job_id}/events", headers=auth("acme"), params={"limit": 1000}).json()["items"]
    return [e["message"] for e in items if e["kind"] == "status"]


def assert_finished_once(client, job_ids: list[str]) -> list[dict]:
    """Every job succeeded, and recorded exactly one success (a duplicate delivery never ran it to success twice)."""
    jobs = [client.get(f"/merges/{job_id}", headers=auth("acme")).json() for job_id in job_ids]
    for job in jobs:
        assert job["status"] == "succeeded", job
        assert status_events(client, job["id"]).count("succeeded") == 1, status_events(client, job["id"])
    return jobs


def test_jobs_survive_a_redis_crash(api, inputs, settings, tmp_path):
    """Redis is killed (no persistence) with four jobs queued behind a running one, and comes back empty: the
    worker reconnects and the recovery loop sends the four lost jobs again."""
    redis = PrivateRedis(tmp_path / "redis")
    crash = settings.model_copy(
        update={"broker_url": redis.url, "queue": f"{settings.queue}-crash", "job_lease_seconds": 4}
    )
    slow = upload_dataset(api, "acme", long_data(tmp_path, "crash-utility", rows=200)).json()["id"]
    worker = WorkerProcess(crash, tmp_path / "worker.log")
    try:
        with TestClient(create_app(crash)) as client:
            first = client.post(
                "/merges", headers=auth("acme"), json=merge_body(inputs, utility_dataset_id=slow, params=SLOW_PARAMS)
            ).json()["id"]
            wait_for(client, "acme", first, check=lambda j: j["status"] == "running", timeout=120)
            queued = [
                client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"] for _ in range(4)
            ]
            assert {client.get(f"/merges/{j}", headers=auth("acme")).json()["status"] for j in queued} == {"queued"}
            redis.kill()
            redis.start()  # empty: the four messages are gone
            for job_id in [first, *queued]:
                wait_for(client, "acme", job_id, timeout=240)
            assert_finished_once(client, [first, *queued])
    finally:
        worker.stop()
        redis.stop()
    log = (tmp_path / "worker.log").read_text()
    assert "jobs sent to the queue again" in log


@pytest.fixture
def private_postgres():
    server = PrivatePostgres()
    yield server
    server.destroy()


def _down_answers(base_url: str, job_id: str) -> None:
    """With the database stopped, every endpoint that needs it answers 503 with Retry-After (no 500, no reset)."""
    headers = auth("acme")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for method, path in (
            ("GET", "/merges"),
            ("GET", f"/merges/{job_id}"),
            ("GET", f"/merges/{job_id}/events"),
            ("GET", "/adapters"),
            ("GET", "/datasets"),
            ("POST", f"/merges/{job_id}/cancel"),
        ):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 503, (method, path, response.status_code, response.text)
            assert response.json()["error"]["code"] == "database_unavailable", response.text
            assert int(response.headers["retry-after"]) > 0
        ready = client.get("/readyz", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
        assert client.get("/healthz").status_code == 200


def test_jobs_survive_a_database_outage(private_postgres, assets, redis_url, tmp_path):
    """PostgreSQL stops for longer than a delivery's retries right after three jobs are sent: the deliveries give
    up, the recovery loop sends the jobs again once the database is back, and each succeeds once. While it is
    down, the API answers 503 over HTTP."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=private_postgres.url,
        broker_url=redis_url,
        queue=f"sstmerge-outage-{uuid.uuid4().hex[:8]}",
        model_dirs=[assets.models],
        api_keys=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        job_lease_seconds=4,
        heartbeat_seconds=1,
        task_max_retries=1,
        device="cpu",
        ops_token=OPS_TOKEN,
    )
    env = settings_env(settings) | {"SSTMERGE_OPS_TOKEN": OPS_TOKEN}
    server = ApiServer(env, tmp_path / "api.log")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            ids = upload_merge_inputs(client, assets)
            warm = client.post("/merges", headers=auth("acme"), json=merge_body(ids)).json()["id"]
            assert wait_for(client, "acme", warm, timeout=180)["status"] == "succeeded"  # the worker is consuming
            jobs = [client.post("/merges", headers=auth("acme"), json=merge_body(ids)).json()["id"] for _ in range(3)]
            private_postgres.stop()
            _down_answers(server.url, jobs[0])
            time.sleep(12)  # well past the deliveries' retries (task_max_retries=1) and the lease
            private_postgres.start()
            for job_id in jobs:
                wait_for(client, "acme", job_id, timeout=240)
            assert_finished_once(client, jobs)
    finally:
        worker.stop()
        server.stop()


def _big_adapter_zip(assets, path, padding_bytes: int):
    """A valid adapter whose README.md (a kept file) is large, so that storing it takes a while."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for member in ("adapter_config.json", "adapter_model.safetensors"):
            archive.write(assets.adapters["safety"] / member, member)
        with archive.open("README.md", "w") as readme:
            block = b"#" * (1 << 20)
            for _ in range(padding_bytes >> 20):
                readme.write(block)
    return path


def _leftovers(settings: Settings) -> dict[str, list[str]]:
    """Staging folders, temporary files and stored adapters without a row."""
    uploads = settings.resolved_work_dir / "uploads"
    storage = settings.resolved_storage_dir
    stored = sorted(p.name for p in storage.glob("tenants/*/adapters/*"))
    with session_scope(settings.resolved_database_url) as session:
        rows = set(session.scalars(select(Adapter.id).where(Adapter.id.in_(stored)))) if stored else set()
    return {
        "staging": sorted(p.name for p in uploads.iterdir()) if uploads.is_dir() else [],
        "temp": sorted(str(p) for p in storage.rglob("*.tmp")) if storage.is_dir() else [],
        "orphans": [ident for ident in stored if ident not in rows],
    }


def test_api_killed_mid_upload_leaves_nothing(settings, assets, tmp_path):
    """SIGKILL the API while it handles an upload (streamed in chunks, then staged and stored: killed once some of
    its files are stored but its row is not); after a restart there is no staging folder, no temporary file and no
    stored adapter without its row."""
    killed = settings.model_copy(update={"data_dir": tmp_path / "data", "leftover_grace_seconds": 1})
    server = ApiServer(settings_env(killed), tmp_path / "api.log")
    archive = _big_adapter_zip(assets, tmp_path / "big.zip", 160 << 20)
    boundary = uuid.uuid4().hex

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        with archive.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk
                time.sleep(0.005)  # a slow client
        yield f"\r\n--{boundary}--\r\n".encode()

    def upload():
        try:
            httpx.post(
                f"{server.url}/adapters",
                headers={**auth("acme"), "Content-Type": f"multipart/form-data; boundary={boundary}"},
                content=body(),
                timeout=120,
            )
        except httpx.TransportError:
            pass  # the server was killed: expected

    client = threading.Thread(target=upload)
    client.start()
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(killed)["orphans"]:  # the server is storing the adapter's files, before its row
            assert time.monotonic() < deadline and client.is_alive(), "the upload never reached the storage"
            time.sleep(0.005)
        server.kill()
        client.join(60)
        left = _leftovers(killed)
        assert left["staging"] and left["orphans"], left
        time.sleep(1.5)  # older than leftover_grace_seconds
        server.start()
        assert _leftovers(killed) == {"staging": [], "temp": [], "orphans": []}
    finally:
        server.stop()


def test_cancel_is_honoured_inside_a_pass(api, worker, inputs, tmp_path):
    """A cancel during the first Fisher pass stops the job inside that pass (between batches), not at the next
    stage boundary."""
    # A pass many times longer than the worker's cancellation check interval (2 s), whatever the machine's speed:
    # the cancel below must land while the pass still runs.
    slow = upload_dataset(api, "acme", long_data(tmp_path, "cancel-utility", rows=4000)).json()["id"]
    params = {**SLOW_PARAMS, "max_samples": 4000}
    job_id = api.post(
        "/merges", headers=auth("acme"), json=merge_body(inputs, utility_dataset_id=slow, params=params)
    ).json()["id"]
    wait_for(api, "acme", job_id, check=lambda j: j["progress"]["stage"] == "fisher_utility")
    assert api.post(f"/merges/{job_id}/cancel", headers=auth("acme")).status_code == 202
    job = wait_for(api, "acme", job_id)
    assert job["status"] == "cancelled", job
    events = api.get(f"/merges/{job_id}/events", headers=auth("acme")).json()["items"]
    assert "fisher_safety" not in [e["stage"] for e in events if e["kind"] == "stage"]
    assert [e["message"] for e in events if e["kind"] == "status"][
        -1
    ] == "cancelled: cancelled during stage fisher_utility"


def test_job_time_limit(api, inputs, settings, tmp_path):
    """A job running longer than SSTMERGE_JOB_TIME_LIMIT_SECONDS fails with time_limit_exceeded (checked between
    batches, here by a delivery run in this process)."""
    from app.domain.storage import get_storage
    from sstmerge_core.pipeline import ModelCache
    from workers.runner import JobRunner

    limited = settings.model_copy(update={"queue": f"{settings.queue}-idle", "job_time_limit_seconds": 2})
    slow = upload_dataset(api, "acme", long_data(tmp_path, "limit-utility")).json()["id"]
    with TestClient(create_app(limited)) as client:
        job_id = client.post(
            "/merges", headers=auth("acme"), json=merge_body(inputs, utility_dataset_id=slow, params=SLOW_PARAMS)
        ).json()["id"]
        JobRunner(limited, get_storage(limited), ModelCache()).run(job_id)
        job = client.get(f"/merges/{job_id}", headers=auth("acme")).json()
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit_exceeded", job
    assert "time limit of 2 s" in job["error"]["message"]
    assert not (settings.resolved_storage_dir / "tenants" / "acme" / "jobs" / job_id).exists()
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Job, job_id).finished_at is not None


def _one_race(sessions, settings: Settings, kind: str, ident: str, body: dict) -> tuple[str, str]:
    """Submit a job naming input `ident` and delete `ident` at the same instant, from two threads with their own
    sessions; returns the two outcomes ("ok" or the error code)."""
    from app.domain import adapters, datasets, merges
    from app.domain.errors import DomainError
    from app.domain.requests import MergeRequest
    from app.domain.storage import get_storage

    request, storage = MergeRequest.model_validate(body), get_storage(settings)
    remove = adapters.delete_adapter if kind == "adapter" else datasets.delete_dataset
    barrier, result = threading.Barrier(2), {}

    def run(side: str, action) -> None:
        with sessions() as session:
            barrier.wait()
            try:
                action(session)
                result[side] = "ok"
            except DomainError as exc:
                result[side] = exc.code

    sent: list[str] = []  # the broker is not part of this race: the queue only records the sends

    def submit(db) -> None:
        merges.submit(db, settings, sent.append, "acme", request, None)

    threads = [
        threading.Thread(target=run, args=("submit", submit)),
        threading.Thread(target=run, args=("delete", lambda db: remove(db, storage, "acme", ident))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return result.get("submit", "?"), result.get("delete", "?")


def _race(client, settings: Settings, ids: dict[str, str], archive, data_path, tries: int) -> list[tuple[str, str]]:
    """`tries` races on fresh inputs, adapters and datasets in turn."""
    from app.domain.db.session import session_factory

    sessions = session_factory(settings.resolved_database_url)
    outcomes = []
    for n in range(tries):
        if n % 2 == 0:
            fresh = upload_adapter(client, "acme", archive).json()["id"]
            body = merge_body(ids, safety_adapter={"adapter_id": fresh, "weight": 1.0})
            outcomes.append(_one_race(sessions, settings, "adapter", fresh, body))
        else:
            fresh = upload_dataset(client, "acme", data_path).json()["id"]
            outcomes.append(_one_race(sessions, settings, "dataset", fresh, merge_body(ids, safety_dataset_id=fresh)))
    with session_scope(settings.resolved_database_url) as session:  # the jobs of this test, off the queue
        session.execute(Job.__table__.update().where(Job.status == "queued").values(status="cancelled"))
    return outcomes


def _exactly_one_side_wins(outcomes: list[tuple[str, str]]) -> None:
    allowed = {("ok", "in_use"), ("adapter_not_found", "ok"), ("dataset_not_found", "ok")}
    assert set(outcomes) <= allowed, outcomes


def test_delete_and_submit_race_postgres(api, inputs, settings, assets):
    """Delete an input while a job naming it is submitted, 30 times on PostgreSQL: exactly one side wins."""
    racing = settings.model_copy(update={"queue": f"{settings.queue}-idle"})
    _exactly_one_side_wins(_race(api, racing, inputs, assets.archives["safety"], assets.data["safety"], 30))


def test_delete_and_submit_race_sqlite(assets, tmp_path):
    """The same race on SQLite (embedded mode)."""
    sqlite = Settings(
        data_dir=tmp_path / "embedded",
        model_dirs=[assets.models],
        api_keys=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        device="cpu",
    )
    with TestClient(create_app(sqlite)) as client:
        ids = upload_merge_inputs(client, assets)
        _exactly_one_side_wins(_race(client, sqlite, ids, assets.archives["safety"], assets.data["safety"], 30))
