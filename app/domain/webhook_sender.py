"""The webhook loop: send the outbox's due webhooks (`WebhookDelivery`), at least once, and log each attempt in the
job's events.

A pass *claims* the due rows with one conditional UPDATE each (pending, due, still at the attempt count it read):
the attempt count goes up and the row is not due again for a lease (`timeout + LEASE_MARGIN`), so that however
many workers run the loop, one sends each attempt; a process that dies mid-attempt leaves the row to be claimed
again after the lease, under the same `webhook-id`. Each attempt is one POST of the stored body, signed afresh
(`webhook-timestamp` is the attempt's time), with a whole-attempt time limit, no redirects followed, no proxy or
netrc from the environment, and the response body never read. A 2xx delivers it; anything else waits
`base · 2^(attempt-1)` (at most `webhook_retry_max_seconds`) and is tried again, up to `webhook_max_attempts`. A
URL whose host is no longer allowed is given up without a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select, update

from .db.models import JobEvent, WebhookDelivery, utcnow
from .db.session import rows_changed, session_scope
from .settings import Settings
from .webhooks import host_of, signed_headers, tenant_secret, url_allowed

log = logging.getLogger(__name__)
LEASE_MARGIN = timedelta(seconds=10)
"""Beyond the attempt's time limit, before a claimed attempt whose process died may be made again."""
BATCH = 32
USER_AGENT = "sstmerge-webhooks/0.1"


@dataclass(frozen=True)
class Due:
    """One claimed attempt of a webhook."""

    id: str
    job_id: str
    event_type: str
    url: str
    body: str
    attempt: int
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    error: str | None = None
    give_up: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


THREAD = "webhooks"


class _QuietRequests(logging.Filter):
    """Drops httpx's `HTTP Request: POST <url>` lines of the webhook thread: a URL's query may hold the receiver's
    token (the sender logs the host only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != THREAD


_QUIET = _QuietRequests()


class WebhookSender:
    def __init__(self, settings: Settings) -> None:
        self.settings, self.url = settings, settings.resolved_database_url
        self.timeout = settings.webhook_timeout_seconds
        self.lease = timedelta(seconds=self.timeout) + LEASE_MARGIN
        self._stop = threading.Event()

    def backoff(self, attempt: int) -> timedelta:
        """Wait after failed attempt `attempt` (1-based): base, doubling, at most the maximum."""
        s = self.settings
        seconds = s.webhook_retry_base_seconds * 2 ** min(attempt - 1, 40)
        return timedelta(seconds=min(seconds, s.webhook_retry_max_seconds))

    def claim_due(self, limit: int = BATCH) -> list[Due]:
        """Take the attempts due now (oldest first) for this process."""
        now = utcnow()
        claimed = []
        with session_scope(self.url) as session:
            rows = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.attempts)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            ).all()
            for delivery_id, attempts in rows:
                taken = rows_changed(
                    session,
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id == delivery_id,
                        WebhookDelivery.status == "pending",
                        WebhookDelivery.attempts == attempts,
                    )
                    .values(attempts=attempts + 1, next_attempt_at=now + self.lease),
                )
                if not taken:
                    continue
                row = session.get(WebhookDelivery, delivery_id)
                assert row is not None
                secret = tenant_secret(session, row.tenant_id)
                claimed.append(Due(row.id, row.job_id, row.event_type, row.url, row.body, attempts + 1, secret))
        return claimed

    async def _post(self, client: httpx.AsyncClient, due: Due) -> int:
        headers = signed_headers(due.secret, due.id, utcnow(), due.body)
        headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
        async with client.stream("POST", due.url, content=due.body.encode(), headers=headers) as response:
            return response.status_code  # the body is never read

    async def send(self, client: httpx.AsyncClient, due: Due) -> Outcome:
        """One attempt, within the time limit."""
        if not url_allowed(self.settings, due.url):
            return Outcome(error="the webhook's host is no longer allowed", give_up=True)
        try:
            return Outcome(status_code=await asyncio.wait_for(self._post(client, due), self.timeout))
        except asyncio.TimeoutError:
            return Outcome(error=f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}"[:300])

    async def send_all(self, due: list[Due]) -> list[Outcome]:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout) as client:
            return list(await asyncio.gather(*(self.send(client, d) for d in due)))

    def record(self, due: Due, outcome: Outcome) -> bool:
        """Store the attempt's outcome and log it in the job's events, if no later attempt was claimed meanwhile."""
        now = utcnow()
        values: dict[str, object] = {"last_status_code": outcome.status_code, "last_error": outcome.error}
        next_at: datetime | None = None
        if outcome.delivered:
            result = "delivered"
            values |= {"status": "delivered", "delivered_at": now}
        elif outcome.give_up or due.attempt >= self.settings.webhook_max_attempts:
            result = "failed"
            values |= {"status": "failed"}
        else:
            result, next_at = "retrying", now + self.backoff(due.attempt)
            values |= {"next_attempt_at": next_at}
        event = {
            "webhook_id": due.id,
            "type": due.event_type,
            "host": host_of(due.url),
            "attempt": due.attempt,
            "outcome": result,
            "status_code": outcome.status_code,
            "error": outcome.error,
            "next_attempt_at": next_at.isoformat() if next_at else None,
        }
        with session_scope(self.url) as session:
            updated = rows_changed(
                session,
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == due.id,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.attempts == due.attempt,
                )
                .values(**values),
            )
            if updated:
                session.add(JobEvent(job_id=due.job_id, kind="webhook", message=json.dumps(event)))
        level = logging.INFO if result == "delivered" else logging.WARNING
        extra = {k: v for k, v in event.items() if v is not None} | {"job_id": due.job_id}
        log.log(level, f"webhook {result}", extra=extra)
        return bool(updated)

    def run_once(self) -> int:
        """One pass: claim, send (concurrently), record; returns how many attempts it made."""
        due = self.claim_due()
        if due:
            for item, outcome in zip(due, asyncio.run(self.send_all(due))):
                self.record(item, outcome)
        return len(due)

    def run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                log.warning("webhook pass failed", exc_info=True)
            if self._stop.wait(self.settings.webhook_poll_seconds):
                return

    def start(self) -> None:
        logging.getLogger("httpx").addFilter(_QUIET)  # once: a filter is kept once however often it is added
        threading.Thread(target=self.run, name=THREAD, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
