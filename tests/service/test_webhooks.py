"""Webhooks end to end on PostgreSQL and Redis with real Celery workers and a real receiver on 127.0.0.1 that
verifies every signature with `standardwebhooks`: a job's end is delivered signed with the tenant's secret; a
receiver that is down, then failing, then up gets the event once it is up, under one webhook-id; redirects are
not followed; a worker killed in the middle of an attempt leaves the event in the database, and the next worker
sends it; a URL outside the allow-list is a 422 at submit.

The module has a database of its own, so that only its workers send its webhooks."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from service_helpers import WorkerProcess, auth, empty_postgres_database, merge_body, upload_merge_inputs, wait_for
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import Receiver

from app.domain.db.models import WebhookDelivery
from app.domain.db.session import session_scope
from app.domain.settings import Settings
from app.domain.webhook_sender import LEASE_MARGIN
from app.main import create_app

pytestmark = pytest.mark.service
LINEAR = {"method": "linear", "params": {"alphas": [1.0]}}


@pytest.fixture(scope="module")
def hook_settings(settings, postgres_url, tmp_path_factory) -> Settings:
    with empty_postgres_database(postgres_url, "sstmerge_hooks") as url:
        yield settings.model_copy(
            update={
                "data_dir": tmp_path_factory.mktemp("hooks-data"),
                "database_url": url,
                "queue": f"{settings.queue}-hooks",
                "webhook_allowed_hosts": ["127.0.0.1"],
                "webhook_retry_base_seconds": 1.0,
                "webhook_retry_max_seconds": 2.0,
                "webhook_timeout_seconds": 2.0,
                "webhook_max_attempts": 3,
                "webhook_poll_seconds": 0.2,
            }
        )


@pytest.fixture(scope="module")
def hook_api(hook_settings) -> TestClient:
    with TestClient(create_app(hook_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def idle_api(hook_settings, hook_api) -> TestClient:
    """The same service sending its jobs to a queue no worker reads: they stay queued until cancelled."""
    with TestClient(create_app(hook_settings.model_copy(update={"queue": f"{hook_settings.queue}-idle"}))) as client:
        yield client


@pytest.fixture(scope="module")
def hook_ids(hook_api, assets) -> dict[str, str]:
    return upload_merge_inputs(hook_api, assets)


class Workers:
    """The module's worker, which a test may SIGKILL and start again."""

    def __init__(self, settings: Settings, folder) -> None:
        self.settings, self.folder, self.started = settings, folder, 0
        self.process: WorkerProcess | None = None

    def start(self) -> WorkerProcess:
        self.started += 1
        self.process = WorkerProcess(self.settings, self.folder / f"worker-{self.started}.log")
        return self.process

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.folder.glob("worker-*.log")))


@pytest.fixture(scope="module")
def workers(hook_settings, hook_api, tmp_path_factory) -> Workers:
    pool = Workers(hook_settings, tmp_path_factory.mktemp("hook-logs"))
    pool.start()
    yield pool
    if pool.process is not None:
        pool.process.stop()


def secret(client, tenant: str = "acme") -> str:
    response = client.get("/webhooks/secret", headers=auth(tenant))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store", response.text
    return response.json()["secret"]


def webhook_events(client, job_id: str) -> list[dict]:
    items = client.get(f"/merges/{job_id}/events", headers=auth("acme"), params={"limit": 1000}).json()["items"]
    return [json.loads(e["message"]) for e in items if e["kind"] == "webhook"]


def wait_for_outcome(client, job_id: str, outcome: str, timeout: float = 90.0) -> list[dict]:
    """The job's webhook events once one has `outcome` (`delivered`, `failed`, `retrying`)."""
    deadline = time.monotonic() + timeout
    while True:
        events = webhook_events(client, job_id)
        if any(e["outcome"] == outcome for e in events):
            return events
        assert time.monotonic() < deadline, events
        time.sleep(0.1)


def cancelled_job(idle_api, hook_ids, url: str) -> str:
    response = idle_api.post("/merges", headers=auth("acme"), json=merge_body(hook_ids, **LINEAR, webhook_url=url))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert idle_api.post(f"/merges/{job_id}/cancel", headers=auth("acme")).json()["status"] == "cancelled"
    return job_id


def delivery_row(settings: Settings, job_id: str) -> WebhookDelivery:
    with session_scope(settings.resolved_database_url) as session:
        (row,) = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        return row


def test_a_url_outside_the_allow_list_is_refused(hook_api, hook_ids, api, inputs):
    """422 with a code at submit, and no job: a host the list does not name, a look-alike host, a scheme that is
    not http(s); and on a service left at the default (no allowed host) even loopback."""
    for url, code in (
        ("http://example.com/hook", "webhook_host_not_allowed"),
        ("http://127.0.0.1.nip.io/hook", "webhook_host_not_allowed"),
        ("ftp://127.0.0.1/hook", "invalid_webhook_url"),
    ):
        response = hook_api.post("/merges", headers=auth("acme"), json=merge_body(hook_ids, webhook_url=url))
        assert response.status_code == 422 and response.json()["error"]["code"] == code, (url, response.text)
    assert hook_api.get("/merges", headers=auth("acme")).json()["items"] == []
    default = api.post("/merges", headers=auth("acme"), json=merge_body(inputs, webhook_url="http://127.0.0.1:9/x"))
    assert default.status_code == 422 and default.json()["error"]["code"] == "webhook_host_not_allowed"


def test_a_finished_job_is_delivered_signed(hook_api, hook_ids, workers, hook_settings):
    """A worker runs the job and POSTs `job.succeeded` once, signed with acme's secret (not globex's); the
    attempt is in the job's events; neither the secret nor the URL's query reaches the events or the logs."""
    acme, globex = secret(hook_api), secret(hook_api, "globex")
    assert acme != globex and secret(hook_api) == acme
    receiver = Receiver(secret=acme)
    try:
        url = f"{receiver.url}/hooks/acme?token=t0k3n-{uuid.uuid4().hex[:6]}"
        body = merge_body(hook_ids, **LINEAR, webhook_url=url)
        job_id = hook_api.post("/merges", headers=auth("acme"), json=body).json()["id"]
        assert wait_for(hook_api, "acme", job_id, timeout=180)["status"] == "succeeded"
        events = wait_for_outcome(hook_api, job_id, "delivered")
        (got,) = receiver.wait_for(1)
    finally:
        receiver.close()
    assert got.error is None and got.path.startswith("/hooks/acme?token=")
    assert got.payload["type"] == "job.succeeded" and got.headers["content-type"] == "application/json"
    assert got.payload["data"]["id"] == job_id and got.payload["data"]["status"] == "succeeded"
    assert got.payload["data"]["summary"]["artifacts"]["adapters"] == {"linear": [1.0]}
    assert got.headers["webhook-id"].startswith("msg_")
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(globex).verify(got.body, got.headers)
    assert [(e["attempt"], e["outcome"], e["status_code"], e["host"]) for e in events] == [
        (1, "delivered", 200, receiver.url.removeprefix("http://"))
    ]
    shown = json.dumps(hook_api.get(f"/merges/{job_id}/events", headers=auth("acme")).json())
    assert "t0k3n" not in shown and acme not in shown
    logs = workers.logs()
    assert "webhook delivered" in logs and acme not in logs and "t0k3n" not in logs


def test_a_receiver_down_then_failing_gets_the_event_once_up(idle_api, hook_ids, workers, hook_settings):
    """The receiver is down for attempt 1 (connection refused) and answers 503 to attempt 2: attempt 3, once
    it is up, delivers `job.cancelled`, with the same webhook-id and body as attempt 2, and the waits between
    attempts are the configured backoff."""
    port = Receiver.free_port()
    job_id = cancelled_job(idle_api, hook_ids, f"http://127.0.0.1:{port}/hook")
    first = wait_for_outcome(idle_api, job_id, "retrying")
    receiver = Receiver(secret=secret(idle_api), script=[503], port=port)
    try:
        events = wait_for_outcome(idle_api, job_id, "delivered")
        got = receiver.wait_for(2)
    finally:
        receiver.close()
    assert first[0]["status_code"] is None and "ConnectError" in first[0]["error"]
    assert [(e["attempt"], e["outcome"], e["status_code"]) for e in events] == [
        (1, "retrying", None),
        (2, "retrying", 503),
        (3, "delivered", 200),
    ]
    assert [r.error for r in got] == [None, None]
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == events[0]["webhook_id"]
    assert got[0].body == got[1].body and got[1].payload["type"] == "job.cancelled"
    row = delivery_row(hook_settings, job_id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 3, 200)
    assert (row.delivered_at - row.created_at).total_seconds() >= 1.0 + 2.0  # waited base, then 2·base


def test_redirects_are_not_followed(idle_api, hook_ids, workers, hook_settings):
    """A receiver answering 302 to another host's URL: that URL never gets a request; each 302 is a failed attempt,
    and the event is given up after `webhook_max_attempts`."""
    elsewhere = Receiver()
    receiver = Receiver(secret=secret(idle_api), script=[("redirect", f"{elsewhere.url}/stolen")] * 5)
    try:
        job_id = cancelled_job(idle_api, hook_ids, f"{receiver.url}/hook")
        events = wait_for_outcome(idle_api, job_id, "failed")
    finally:
        receiver.close()
        elsewhere.close()
    assert [r.path for r in receiver.received] == ["/hook"] * 3 and elsewhere.received == []
    assert [(e["outcome"], e["status_code"]) for e in events] == [("retrying", 302)] * 2 + [("failed", 302)]
    assert delivery_row(hook_settings, job_id).status == "failed"


def test_a_worker_killed_mid_attempt_leaves_the_event_to_the_next(idle_api, hook_ids, workers, hook_settings):
    """The receiver holds attempt 1 unanswered and the worker is SIGKILLed meanwhile: the event stays pending in
    the database; a worker started afterwards sends it again after the attempt's lease, under the same
    webhook-id, and it is delivered (attempt 2; attempt 1 died with its process and left no log)."""
    receiver = Receiver(secret=secret(idle_api), script=["hang"])
    try:
        job_id = cancelled_job(idle_api, hook_ids, f"{receiver.url}/hook")
        receiver.wait_for(1)
        workers.process.kill()
        receiver.release.set()
        pending = delivery_row(hook_settings, job_id)
        assert (pending.status, pending.attempts) == ("pending", 1)
        workers.start()
        lease = hook_settings.webhook_timeout_seconds + LEASE_MARGIN.total_seconds()
        events = wait_for_outcome(idle_api, job_id, "delivered", timeout=lease + 120)
        got = receiver.wait_for(2)
    finally:
        receiver.close()
    assert [(e["attempt"], e["outcome"]) for e in events] == [(2, "delivered")]
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] and got[0].body == got[1].body
    assert got[1].error is None and got[1].payload["data"]["id"] == job_id
    assert delivery_row(hook_settings, job_id).status == "delivered"
