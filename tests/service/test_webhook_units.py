"""Webhooks without servers beyond a local receiver: the allow-list, the outbox row written with each terminal
change (and only then), and the sender's attempts (signature, backoff, time limit, redirects, exclusive claims)
on a SQLite database."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import Receiver

from app.domain import merges, webhooks
from app.domain.bootstrap import prepare
from app.domain.db.models import Job, JobEvent, WebhookDelivery, utcnow
from app.domain.db.session import session_factory, session_scope
from app.domain.errors import InvalidInput
from app.domain.job_state import JobStore
from app.domain.settings import Settings
from app.domain.webhook_sender import WebhookSender
from tests.helpers.contracts import merge_summary


@pytest.mark.parametrize(
    ("allowed", "url", "ok"),
    [
        ([], "http://127.0.0.1:8000/hook", False),  # the default allows none
        (["127.0.0.1"], "http://127.0.0.1:8000/hook", True),
        (["127.0.0.1"], "https://127.0.0.1/hook?token=x", True),
        (["127.0.0.1"], "http://127.0.0.1.evil.example/hook", False),
        (["hooks.example.com:8443"], "https://HOOKS.example.com:8443/x", True),
        (["hooks.example.com:8443"], "https://hooks.example.com/x", False),
        (["*.example.com"], "https://a.b.example.com/x", True),
        (["*.example.com"], "https://example.com.evil.org/x", False),
        (["[::1]:9000"], "http://[::1]:9000/x", True),
        (["[::1]:9000"], "http://[::1]:9001/x", False),
        (["localhost"], "http://user:pw@localhost/x", False),  # user info refused
        (["localhost"], "ftp://localhost/x", False),
        (["localhost"], "http://localhost:99999/x", False),
    ],
)
def test_allow_list(allowed, url, ok):
    assert webhooks.url_allowed(Settings(webhook_allowed_hosts=allowed), url) is ok


def test_allow_list_codes():
    with pytest.raises(InvalidInput) as outside:
        webhooks.check_url(Settings(), "http://127.0.0.1/hook")
    assert outside.value.code == "webhook_host_not_allowed"
    with pytest.raises(InvalidInput) as malformed:
        webhooks.check_url(Settings(webhook_allowed_hosts=["localhost"]), "file:///etc/passwd")
    assert malformed.value.code == "invalid_webhook_url"


def test_allow_list_from_environment(monkeypatch):
    monkeypatch.setenv("SSTMERGE_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1, hooks.example.com:443")
    assert Settings().webhook_allowed_hosts == ["127.0.0.1", "hooks.example.com:443"]


@pytest.fixture
def hook_settings(tmp_path) -> Settings:
    settings = Settings(
        data_dir=tmp_path,
        api_keys="acme:k1,globex:k2",
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_retry_base_seconds=0.2,
        webhook_retry_max_seconds=0.5,
        webhook_timeout_seconds=1.0,
        webhook_max_attempts=3,
        job_lease_seconds=5,
    )
    prepare(settings)
    return settings


def add_job(settings: Settings, url: str | None, tenant: str = "acme", status: str = "queued") -> str:
    with session_scope(settings.resolved_database_url) as session:
        job = Job(tenant_id=tenant, queue="q", request={"webhook_url": url}, request_sha256="0" * 64, status=status)
        session.add(job)
        session.flush()
        return job.id


def deliveries(settings: Settings, job_id: str) -> list[WebhookDelivery]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


def webhook_events(settings: Settings, job_id: str) -> list[dict]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.kind == "webhook").order_by(JobEvent.id)
        )
        return [json.loads(message) for message in rows]


def test_each_terminal_change_writes_one_event(hook_settings):
    """finish (succeeded, failed, cancelled), the worker_lost and time-limit failures and the cancel of a queued
    job each add the job's webhook in their own transaction; a refused change (a stale claim) adds none."""
    store = JobStore.from_settings(hook_settings)
    url = "http://127.0.0.1:1/hook"
    outcomes = {}
    for status in ("succeeded", "failed", "cancelled"):
        job_id = add_job(hook_settings, url)
        claim = store.claim(job_id)
        assert store.finish(claim, status, error_code="boom" if status == "failed" else None)
        assert not store.finish(claim, status)  # already finished: no second event
        outcomes[status] = job_id
    lost = add_job(hook_settings, url)
    with session_scope(hook_settings.resolved_database_url) as session:
        session.get(Job, lost).attempts = hook_settings.max_attempts
    assert store.claim(lost) is None
    overdue = add_job(hook_settings, url)
    with session_scope(hook_settings.resolved_database_url) as session:
        session.get(Job, overdue).started_at = utcnow() - timedelta(days=1)
    assert store.fail_overdue() == [overdue]
    with session_factory(hook_settings.resolved_database_url)() as session:  # cancel commits itself
        cancelled = merges.cancel(session, "acme", add_job(hook_settings, url)).id
    silent = add_job(hook_settings, None)
    assert store.finish(store.claim(silent), "succeeded")

    expected = {
        outcomes["succeeded"]: "job.succeeded",
        outcomes["failed"]: "job.failed",
        outcomes["cancelled"]: "job.cancelled",
        lost: "job.failed",
        overdue: "job.failed",
        cancelled: "job.cancelled",
    }
    for job_id, event_type in expected.items():
        rows = deliveries(hook_settings, job_id)
        assert [(r.event_type, r.status, r.url) for r in rows] == [(event_type, "pending", url)], job_id
        body = json.loads(rows[0].body)
        assert body["type"] == event_type and body["data"]["id"] == job_id
        assert body["data"]["status"] == event_type.removeprefix("job.")
    assert json.loads(deliveries(hook_settings, lost)[0].body)["data"]["error"]["code"] == "worker_lost"
    assert json.loads(deliveries(hook_settings, overdue)[0].body)["data"]["error"]["code"] == "time_limit_exceeded"
    assert deliveries(hook_settings, silent) == []


def test_secrets_are_per_tenant_and_stable(hook_settings):
    with session_scope(hook_settings.resolved_database_url) as session:
        acme, globex = webhooks.tenant_secret(session, "acme"), webhooks.tenant_secret(session, "globex")
        assert webhooks.tenant_secret(session, "acme") == acme
        assert acme.startswith("whsec_") and acme != globex
        rotated = webhooks.rotate_secret(session, "acme")
        assert rotated != acme and webhooks.tenant_secret(session, "acme") == rotated


def finished_job(settings: Settings, url: str) -> str:
    store = JobStore.from_settings(settings)
    job_id = add_job(settings, url)
    assert store.finish(store.claim(job_id), "succeeded", summary=merge_summary(alpha=1.0))
    return job_id


def secret_of(settings: Settings, tenant: str = "acme") -> str:
    with session_scope(settings.resolved_database_url) as session:
        return webhooks.tenant_secret(session, tenant)


def run_until_done(sender: WebhookSender, job_id: str, settings: Settings, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while deliveries(settings, job_id)[0].status == "pending":
        assert time.monotonic() < deadline, webhook_events(settings, job_id)
        sender.run_once()
        time.sleep(0.05)


def test_retries_back_off_and_keep_the_id(hook_settings):
    """503, 500, then 200: three signed attempts of the same id and body, waits of base then 2·base between them,
    and each attempt in the job's events."""
    receiver = Receiver(secret=secret_of(hook_settings), script=[503, 500])
    try:
        job_id = finished_job(hook_settings, f"{receiver.url}/hook")
        run_until_done(WebhookSender(hook_settings), job_id, hook_settings)
        got = receiver.wait_for(3)
    finally:
        receiver.close()
    assert [r.error for r in got] == [None] * 3
    assert len({r.headers["webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
    assert got[0].payload["type"] == "job.succeeded" and got[0].payload["data"]["summary"]["recommended"]
    events = webhook_events(hook_settings, job_id)
    assert [(e["attempt"], e["outcome"], e["status_code"]) for e in events] == [
        (1, "retrying", 503),
        (2, "retrying", 500),
        (3, "delivered", 200),
    ]
    assert events[0]["next_attempt_at"] and events[2]["next_attempt_at"] is None
    assert events[0]["webhook_id"] == got[0].headers["webhook-id"]
    sender = WebhookSender(hook_settings)
    assert [sender.backoff(n).total_seconds() for n in (1, 2, 3)] == [0.2, 0.4, 0.5]
    stamps = [int(r.headers["webhook-timestamp"]) for r in got]
    assert stamps == sorted(stamps)


def test_the_signature_is_the_tenants(hook_settings):
    """The body verifies with acme's secret, not with globex's, and not once altered."""
    receiver = Receiver(secret=secret_of(hook_settings))
    try:
        job_id = finished_job(hook_settings, f"{receiver.url}/hook")
        run_until_done(WebhookSender(hook_settings), job_id, hook_settings)
        (got,) = receiver.wait_for(1)
    finally:
        receiver.close()
    assert got.payload["data"]["id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_of(hook_settings, "globex")).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_of(hook_settings)).verify(got.body.replace(b"succeeded", b"failed"), got.headers)


def test_redirects_are_not_followed_and_attempts_end(hook_settings):
    """A 302 is a failed attempt: its Location is never requested; after `webhook_max_attempts` it is given up."""
    receiver = Receiver(secret=secret_of(hook_settings), script=[("redirect", "/stolen")] * 5)
    try:
        job_id = finished_job(hook_settings, f"{receiver.url}/hook")
        run_until_done(WebhookSender(hook_settings), job_id, hook_settings)
        time.sleep(0.3)
    finally:
        receiver.close()
    assert [r.path for r in receiver.received] == ["/hook"] * 3
    events = webhook_events(hook_settings, job_id)
    assert [(e["outcome"], e["status_code"]) for e in events] == [("retrying", 302), ("retrying", 302), ("failed", 302)]
    assert deliveries(hook_settings, job_id)[0].status == "failed"


def test_an_attempt_is_bounded_in_time(hook_settings):
    receiver = Receiver(secret=secret_of(hook_settings), script=["hang"])
    try:
        job_id = finished_job(hook_settings, f"{receiver.url}/hook")
        sender = WebhookSender(hook_settings)
        started = time.monotonic()
        assert sender.run_once() == 1
        elapsed = time.monotonic() - started
    finally:
        receiver.close()
    # the receiver would hold the request for 120 s; the 1 s limit ended it (the bound is loose: no timing is
    # asserted tightly on a loaded machine, and the event below names the limit as the cause)
    assert elapsed < 30, elapsed
    (event,) = webhook_events(hook_settings, job_id)
    assert event["outcome"] == "retrying" and event["error"] == "no answer within 1 s"


def test_a_host_removed_from_the_allow_list_is_not_contacted(hook_settings):
    receiver = Receiver()
    try:
        job_id = finished_job(hook_settings, f"{receiver.url}/hook")
        WebhookSender(hook_settings.model_copy(update={"webhook_allowed_hosts": []})).run_once()
    finally:
        receiver.close()
    assert receiver.received == []
    (event,) = webhook_events(hook_settings, job_id)
    assert event["outcome"] == "failed" and "no longer allowed" in event["error"]


def test_one_claim_per_attempt(hook_settings):
    """Two senders claiming at once get disjoint attempts; a claimed attempt is not due again within its lease."""
    for _ in range(6):
        finished_job(hook_settings, "http://127.0.0.1:1/hook")
    first, second = WebhookSender(hook_settings), WebhookSender(hook_settings)

    async def both():
        return await asyncio.gather(asyncio.to_thread(first.claim_due), asyncio.to_thread(second.claim_due))

    a, b = asyncio.run(both())
    assert len(a) + len(b) == 6 and not {d.id for d in a} & {d.id for d in b}
    assert first.claim_due() == [] and "whsec_" not in repr(a + b)
