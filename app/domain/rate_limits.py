"""Rate limits with the `limits` library: failed authentications per (client address, key prefix) — a key cannot
be guessed at line rate, and one client cannot lock out the others behind the same address — and requests per
tenant. Counters live in Redis when the service has a Redis broker, so every API process shares them, else in
this process's memory (embedded mode). The library's asyncio storages are used, so a check is awaited on the
event loop: no thread hop per request, and no timer thread per expiry (the threaded in-memory storage starts one
every 10 ms under load).

A failed authentication counts against the bucket of the presented key's prefix (`key_bucket`: its first
`KEY_PREFIX_CHARS` characters, hashed), from that address: a client sending wrong keys locks out, for at most the
limit's window, only keys that start like the ones it guessed, from its own address; every other key keeps
working. A guesser who varies the start of its keys gets a fresh bucket each time, but the start of a key is
what an `sst_<id>_<secret>` key names (its id): its 256-bit secret is what the limit protects.

When the shared store (Redis) is unreachable the limits neither vanish nor take the API down: each API process
counts in its own memory until the store answers again (a warning is logged when that starts and when it ends),
so the limits hold per process (N processes: at most N times the limit). An unreachable store is not tried again
for `STORE_RETRY_SECONDS`, so an outage costs a request no waiting.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from .errors import RateLimited
from .settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)
STORE_TIMEOUT = 0.5  # seconds: a Redis that does not answer costs a request at most this much
STORE_RETRY_SECONDS = 5.0  # an unreachable store is tried again after this long (local counting meanwhile)
KEY_PREFIX_CHARS = 12  # `sst_` and the 8-hex key id of a stored key


def _items(spec: str) -> list[RateLimitItem]:
    return parse_many(spec) if spec else []


def key_bucket(presented: str | None) -> str:
    """The failed-authentication bucket of a presented key: a digest of its first `KEY_PREFIX_CHARS` characters
    (no part of a key is stored in the counters); `-` when no key was presented."""
    if not presented:
        return "-"
    return hashlib.sha256(presented[:KEY_PREFIX_CHARS].encode()).hexdigest()[:16]


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        url = settings.resolved_rate_limit_storage_url
        options: dict = {}
        if url.startswith(("redis://", "rediss://")):
            options = {
                "implementation": "redispy",
                "socket_timeout": STORE_TIMEOUT,
                "socket_connect_timeout": STORE_TIMEOUT,
                "key_prefix": f"sstmerge-limits:{settings.queue}",
            }
        self.limiter = SlidingWindowCounterRateLimiter(storage_from_string(f"async+{url}", **options))
        self.local = SlidingWindowCounterRateLimiter(storage_from_string("async+memory://"))
        self.shared = not url.startswith("memory://")
        self._down_until = 0.0  # time.monotonic() before which the shared store is not tried
        self.failed_auth, self.per_tenant = _items(settings.rate_limit_failed_auth), _items(settings.rate_limit_tenant)

    @property
    def store_down(self) -> bool:
        return self.shared and time.monotonic() < self._down_until

    async def _call(
        self, action: Callable[[SlidingWindowCounterRateLimiter, RateLimitItem], Awaitable[T]], item: RateLimitItem
    ) -> T:
        """`action(limiter, item)` on the shared limiter, or on this process's own when the shared store is
        unreachable."""
        if not self.store_down:
            try:
                result = await action(self.limiter, item)
            except Exception:  # noqa: BLE001 - any failure of the store: see the module docstring
                if self._down_until == 0.0:
                    log.warning("rate limit store unreachable; counting in this process", exc_info=True)
                self._down_until = time.monotonic() + STORE_RETRY_SECONDS
            else:
                if self._down_until:
                    log.warning("rate limit store reachable again; shared counting resumed")
                    self._down_until = 0.0
                return result
        return await action(self.local, item)

    async def _retry_after(self, item: RateLimitItem, *keys: str) -> int:
        reset = (await self._call(lambda limiter, item: limiter.get_window_stats(item, *keys), item)).reset_time
        return max(math.ceil(reset - time.time()), 1)

    async def check_client(self, client: str, bucket: str) -> None:
        """`RateLimited` when `client` has used up its failed authentications with keys of `bucket`."""
        for item in self.failed_auth:
            if not await self._call(lambda limiter, item: limiter.test(item, "auth-failed", client, bucket), item):
                raise RateLimited(
                    f"too many failed authentications from this address with this key (limit {item})",
                    retry_after=await self._retry_after(item, "auth-failed", client, bucket),
                )

    async def count_failure(self, client: str, bucket: str) -> None:
        for item in self.failed_auth:
            await self._call(lambda limiter, item: limiter.hit(item, "auth-failed", client, bucket), item)

    async def hit_tenant(self, tenant: str) -> None:
        """Count one request of `tenant`; `RateLimited` past its limit."""
        for item in self.per_tenant:
            if not await self._call(lambda limiter, item: limiter.hit(item, "tenant", tenant), item):
                raise RateLimited(
                    f"too many requests for this tenant (limit {item})",
                    retry_after=await self._retry_after(item, "tenant", tenant),
                )
