"""Guards of the API and of job recovery: operator-only health details and metrics, empty idempotency keys, rate
limits (in memory and shared through Redis), 507 on a full disk, a submit whose broker is down, and the recovery
loop (one send per due job across processes, backing off; the embedded broker; time limits of stuck workers)."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from service_helpers import (
    API_KEYS,
    OPS_TOKEN,
    auth,
    empty_postgres_database,
    merge_body,
    upload_adapter,
    upload_dataset,
    upload_merge_inputs,
)
from sqlalchemy import update

from app.domain.db.models import Job, utcnow
from app.domain.db.session import session_scope
from app.domain.job_state import JobStore
from app.domain.queue import JobQueue
from app.domain.settings import Settings
from app.domain.storage import get_storage
from app.main import create_app
from tests.helpers.contracts import merge_summary

pytestmark = pytest.mark.service
OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_readyz_details_and_metrics_need_the_operator_token(api, settings):
    assert api.get("/healthz").json() == {"status": "ok"}
    open_ready = api.get("/readyz")
    assert open_ready.status_code == 200
    assert open_ready.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get("/metrics", headers=auth("acme")).status_code == 401  # a tenant key is not the operator's
    assert "sstmerge_jobs" in api.get("/metrics", headers=OPS).text
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        hidden = client.get("/readyz")
        assert hidden.status_code == 503 and hidden.json()["checks"]["broker"] == "error"
        assert "127.0.0.1" not in hidden.text and hidden.headers["retry-after"]
        shown = client.get("/readyz", headers=OPS)
        assert shown.json()["checks"]["broker"].startswith("error: ")
    unset = settings.model_copy(update={"ops_token": None})
    with TestClient(create_app(unset)) as client:
        assert client.get("/metrics", headers=OPS).status_code == 401  # no token configured: refused
        assert client.get("/readyz", headers={"Authorization": "Bearer "}).json()["checks"]["database"] == "ok"


def test_empty_idempotency_key_is_refused(api, inputs):
    for key in ("", "   "):
        response = api.post("/merges", headers={**auth("acme"), "Idempotency-Key": key}, json=merge_body(inputs))
        assert response.status_code == 422 and error_code(response) == "invalid_idempotency_key", response.text


def _hammer(client, headers: dict, count: int) -> list[int]:
    return [client.get("/models", headers=headers).status_code for _ in range(count)]


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_failed_authentication_is_rate_limited(settings, store):
    limited = settings.model_copy(
        update={
            "queue": f"{settings.queue}-limits-{uuid.uuid4().hex[:6]}",
            "rate_limit_failed_auth": "5/minute",
            "rate_limit_storage_url": "memory://" if store == "memory" else None,  # default: the Redis broker
        }
    )
    wrong = {"Authorization": "Bearer not-a-key"}
    with TestClient(create_app(limited)) as first, TestClient(create_app(limited)) as second:
        statuses = _hammer(first, wrong, 3) + _hammer(second, wrong, 3)
        if store == "redis":  # two API processes share the counter
            assert statuses == [401] * 5 + [429], statuses
        else:  # each process counts its own
            assert statuses == [401] * 6, statuses
            statuses = _hammer(first, wrong, 3)
            assert statuses == [401, 401, 429], statuses
        blocked = first.get("/models", headers=wrong)
        assert blocked.status_code == 429 and error_code(blocked) == "rate_limited"
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert first.get("/models", headers=auth("acme")).status_code == 200  # other keys are not locked out


def test_tenant_requests_are_rate_limited(settings):
    limited = settings.model_copy(
        update={"queue": f"{settings.queue}-limits-{uuid.uuid4().hex[:6]}", "rate_limit_tenant": "10/minute"}
    )
    with TestClient(create_app(limited)) as client:
        assert _hammer(client, auth("acme"), 11) == [200] * 10 + [429]
        assert int(client.get("/models", headers=auth("acme")).headers["retry-after"]) >= 1
        assert client.get("/models", headers=auth("globex")).status_code == 200  # another tenant's budget


def test_full_disk_is_507(api, inputs, settings, assets):
    """Below SSTMERGE_MIN_FREE_BYTES uploads are refused with 507 before anything is written, /readyz reports the
    storage, reads still work, and a job fails with insufficient_storage instead of filling the disk."""
    from sstmerge_core.pipeline import ModelCache
    from workers.runner import JobRunner

    full = settings.model_copy(update={"min_free_bytes": 1 << 62, "queue": f"{settings.queue}-idle"})
    with TestClient(create_app(full)) as client:
        before = sorted(full.resolved_storage_dir.rglob("*"))
        response = upload_adapter(client, "acme", assets.archives["safety"])
        assert response.status_code == 507 and error_code(response) == "insufficient_storage", response.text
        assert int(response.headers["retry-after"]) > 0
        assert upload_dataset(client, "acme", assets.data["safety"]).status_code == 507
        assert sorted(full.resolved_storage_dir.rglob("*")) == before
        ready = client.get("/readyz", headers=OPS)
        assert ready.status_code == 503 and "must stay free" in ready.json()["checks"]["storage"]
        assert client.get("/adapters", headers=auth("acme")).status_code == 200
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"]
        JobRunner(full, get_storage(full), ModelCache()).run(job_id)
        job = client.get(f"/merges/{job_id}", headers=auth("acme")).json()
    assert job["status"] == "failed" and job["error"]["code"] == "insufficient_storage", job


def test_submit_with_the_broker_down_keeps_the_job(api, inputs, settings):
    """The broker refuses the send: the job is accepted (202) and stays queued, due for the recovery loop, which
    sends it once the broker answers."""
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "queue": f"{settings.queue}-idle"})
    with TestClient(create_app(down)) as client:
        response = client.post("/merges", headers=auth("acme"), json=merge_body(inputs))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert client.get(f"/merges/{job_id}", headers=auth("acme")).json()["status"] == "queued"
    store = JobStore.from_settings(settings)
    assert job_id in {due[0] for due in store.due_to_send()}
    sent: list[tuple[str, str]] = []
    store.send_due(lambda job, queue: sent.append((job, queue)))
    assert (job_id, f"{settings.queue}-idle") in sent
    assert job_id not in {due[0] for due in store.due_to_send()}  # sent: not due again within a lease
    api.post(f"/merges/{job_id}/cancel", headers=auth("acme"))


def _queued_jobs(client, inputs, count: int) -> list[str]:
    return [client.post("/merges", headers=auth("acme"), json=merge_body(inputs)).json()["id"] for _ in range(count)]


@pytest.fixture
def unworked(settings, postgres_url, tmp_path):
    """Settings on a database of their own that no worker's recovery loop reads (the session's workers would
    otherwise send the test's lost jobs too), with a queue no worker consumes."""
    with empty_postgres_database(postgres_url, "sstmerge_recovery") as url:
        yield settings.model_copy(
            update={"database_url": url, "data_dir": tmp_path / "data", "queue": f"{settings.queue}-idle"}
        )


def test_recovery_sends_each_due_job_once_across_processes(unworked, assets):
    """Four recovery loops (threads with their own connections, as in four workers) pass over the same lost jobs
    at once: each job is sent exactly once. A job still queued is sent again after a lease, then after twice
    that, and so on (its duplicates stay few)."""
    with TestClient(create_app(unworked)) as client:
        jobs = _queued_jobs(client, upload_merge_inputs(client, assets), 6)
    lost = utcnow() - timedelta(hours=1)
    with session_scope(unworked.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id.in_(jobs)).values(enqueued_at=lost))
    sent: list[str] = []
    lock, barrier = threading.Lock(), threading.Barrier(4)

    def send(job_id: str, _queue: str) -> None:
        with lock:
            sent.append(job_id)

    def loop() -> None:
        store = JobStore.from_settings(unworked)
        barrier.wait()
        store.send_due(send)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(sent) == sorted(jobs)

    store = JobStore.from_settings(unworked)  # lease 6 s in these tests
    assert [store.send_interval(n).total_seconds() for n in (1, 2, 3, 4)] == [6, 12, 24, 48]
    assert store.send_interval(60) == store.republish_max
    with session_scope(unworked.resolved_database_url) as session:  # sent twice so far: next after 2 leases
        session.execute(update(Job).where(Job.id == jobs[0]).values(enqueued_at=utcnow() - timedelta(seconds=9)))
    assert jobs[0] not in {due[0] for due in store.due_to_send()}
    with session_scope(unworked.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == jobs[0]).values(enqueued_at=utcnow() - timedelta(seconds=13)))
    assert jobs[0] in {due[0] for due in store.due_to_send()}


def test_recovery_in_embedded_mode(assets, tmp_path):
    """SQLite database and kombu's SQLite broker: a queued job whose message was lost is sent again by the
    recovery loop, into the embedded broker's queue."""
    from workers.tasks import Recovery

    embedded = Settings(
        data_dir=tmp_path / "embedded",
        model_dirs=[assets.models],
        api_keys=",".join(f"{t}:{k}" for t, k in API_KEYS.items()),
        job_lease_seconds=5,
        device="cpu",
    )
    with TestClient(create_app(embedded)) as client:
        ids = upload_merge_inputs(client, assets)
        job_id = client.post("/merges", headers=auth("acme"), json=merge_body(ids)).json()["id"]
    broker = sqlite3.connect(embedded.data_dir / "broker.db")

    def messages() -> int:
        return sum(job_id in str(payload) for (payload,) in broker.execute("SELECT payload FROM kombu_message"))

    assert messages() == 1
    broker.execute("DELETE FROM kombu_message")  # the message is lost
    broker.commit()
    with session_scope(embedded.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(seconds=30)))
    queue = JobQueue(embedded)
    Recovery(JobStore.from_settings(embedded), queue, embedded, interval=1).run_once()
    assert messages() == 1
    Recovery(JobStore.from_settings(embedded), queue, embedded, interval=1).run_once()  # not due again yet
    assert messages() == 1
    broker.close()


def test_stuck_job_fails_at_its_time_limit(api, inputs, settings):
    """A worker stuck inside one call keeps beating; the recovery loop fails its job once the time limit (plus a
    lease) has passed, and the stuck delivery's late outcome is discarded."""
    idle = settings.model_copy(update={"queue": f"{settings.queue}-idle", "job_time_limit_seconds": 60})
    with TestClient(create_app(idle)) as client:
        job_id = _queued_jobs(client, inputs, 1)[0]
    store = JobStore.from_settings(idle)
    claim = store.claim(job_id)
    assert claim is not None and store.beat(claim) == (True, False)
    assert store.recover(lambda *_: None).timed_out == []
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(started_at=utcnow() - timedelta(seconds=90)))
    assert store.recover(lambda *_: None).timed_out == [job_id]
    assert store.beat(claim) == (False, False)  # the stuck delivery has lost the job
    assert store.finish(claim, "succeeded", summary=merge_summary(), artifact_prefix="x") is False
    job = api.get(f"/merges/{job_id}", headers=auth("acme")).json()
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit_exceeded"
