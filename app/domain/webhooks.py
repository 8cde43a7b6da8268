"""Webhooks of job events (Standard Webhooks, https://www.standardwebhooks.com): where they may go, how they are
signed, and the outbox row written with a job's terminal change.

A job names a `webhook_url`; it must be `http(s)` on a host of `Settings.webhook_allowed_hosts` (empty by default:
no webhooks), checked at submit (422) and again before every attempt. When the job ends (`job.succeeded`,
`job.failed`, `job.cancelled`) a `WebhookDelivery` row is added in the same transaction as the status change
(`record_terminal`), so the event exists exactly when the change does; the workers' loop
(`app.domain.webhook_sender`) sends it. Each tenant has one signing secret (`whsec_…`, made on first use, shown to
that tenant only by `GET /webhooks/secret`); the signature is HMAC-SHA256 over `id.timestamp.body`.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from .db.models import TERMINAL_STATUSES, Job, Tenant, WebhookDelivery
from .errors import InvalidInput
from .settings import Settings

SECRET_PREFIX = "whsec_"
EVENT_TYPES = {status: f"job.{status}" for status in TERMINAL_STATUSES}


def _host_port(url: str) -> tuple[str, int]:
    """(lower-case host, port) of an http(s) URL without user info; `InvalidInput` (`invalid_webhook_url`) else."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
    except ValueError:  # a port that is not a number, an unbalanced [
        host = None
    if host is None or parts.scheme not in ("http", "https") or "@" in parts.netloc:
        raise InvalidInput(
            "webhook_url must be an http:// or https:// URL with a host and no user info",
            code="invalid_webhook_url",
        )
    return host.lower(), port


def _entry(entry: str) -> tuple[str, int | None]:
    """(host pattern, port or None for any) of an allow-list entry: `host`, `host:port`, `[v6]`, `[v6]:port`."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return host, int(port) if port.isdigit() else None


def _allows(entry: str, host: str, port: int) -> bool:
    """Whether one allow-list entry admits `host:port` (`*` in an entry matches any characters: `*.example.com`)."""
    pattern, entry_port = _entry(entry)
    return (entry_port is None or entry_port == port) and fnmatchcase(host, pattern)


def check_url(settings: Settings, url: str) -> None:
    """`InvalidInput` unless `url` may receive webhooks: `invalid_webhook_url` (not http(s)),
    `webhook_host_not_allowed` (its host is not in `webhook_allowed_hosts`; the default allows none)."""
    host, port = _host_port(url)
    if not any(_allows(entry, host, port) for entry in settings.webhook_allowed_hosts):
        raise InvalidInput(
            f"webhook host {host!r} is not allowed on this service",
            code="webhook_host_not_allowed",
            details={"host": host, "allowed": "SSTMERGE_WEBHOOK_ALLOWED_HOSTS"},
        )


def url_allowed(settings: Settings, url: str) -> bool:
    try:
        check_url(settings, url)
    except InvalidInput:
        return False
    return True


def host_of(url: str) -> str:
    """`host:port` of a webhook URL, for logs and events (never the path or query, which may hold a token)."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2]


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def tenant_secret(session: Session, tenant: str) -> str:
    """The tenant's signing secret, made on first use (one conditional UPDATE: concurrent callers get the same)."""
    session.execute(
        update(Tenant).where(Tenant.id == tenant, Tenant.webhook_secret.is_(None)).values(webhook_secret=new_secret())
    )
    secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant))
    if secret is None:
        raise LookupError(f"tenant {tenant} does not exist")
    return secret


def rotate_secret(session: Session, tenant: str) -> str:
    """A new signing secret for the tenant; webhooks sent from now on are signed with it only."""
    secret = new_secret()
    session.execute(update(Tenant).where(Tenant.id == tenant).values(webhook_secret=secret))
    return secret


def signed_headers(secret: str, msg_id: str, at: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: `webhook-signature` is `v1,` base64 HMAC-SHA256 of
    `{msg_id}.{unix seconds}.{body}` under the secret."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def payload(job: Job, event_type: str) -> str:
    """The event's body: `{"type", "timestamp", "data": {the job's id, status, error, times, summary}}` (the
    request is left out: the receiver asked for it, and it may be large)."""
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    data = {
        "id": job.id,
        "status": job.status,
        "error": error,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "summary": job.summary,
    }
    body = {"type": event_type, "timestamp": _iso(job.finished_at), "data": data}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def record_terminal(session: Session, job_id: str) -> WebhookDelivery | None:
    """In the transaction that just made job `job_id` terminal: add its webhook to the outbox if it names a
    `webhook_url` (the job is re-read, so the payload carries the new status)."""
    job = session.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar()
    url = (job.request or {}).get("webhook_url") if job is not None else None
    if job is None or not url or job.status not in EVENT_TYPES:
        return None
    event_type = EVENT_TYPES[job.status]
    delivery = WebhookDelivery(
        job_id=job.id, tenant_id=job.tenant_id, event_type=event_type, url=url, body=payload(job, event_type)
    )
    session.add(delivery)
    return delivery
