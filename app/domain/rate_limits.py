"""Rate limits with the `limits` library: failed authentications per client address (a key cannot be guessed at
line rate) and requests per tenant. Counters live in Redis when the service has a Redis broker, so every API
process shares them, else in this process's memory (embedded mode). The library's asyncio storages are used, so
a check is awaited on the event loop: no thread hop per request, and no timer thread per expiry (the threaded
in-memory storage starts one every 10 ms under load).

A limiter that cannot reach its store lets the request through (logged): the rate limit is a guard, and an
outage of its store must not become an outage of the API.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable

from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from .errors import RateLimited
from .settings import Settings

log = logging.getLogger(__name__)
STORE_TIMEOUT = 0.5  # seconds: a Redis that does not answer costs a request at most this much


def _items(spec: str) -> list[RateLimitItem]:
    return parse_many(spec) if spec else []


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
        self.failed_auth, self.per_tenant = _items(settings.rate_limit_failed_auth), _items(settings.rate_limit_tenant)

    async def _retry_after(self, item: RateLimitItem, *keys: str) -> int:
        try:
            reset = (await self.limiter.get_window_stats(item, *keys)).reset_time
        except Exception:  # noqa: BLE001 - see the module docstring
            return item.get_expiry()
        return max(math.ceil(reset - time.time()), 1)

    async def _guarded(self, action: Awaitable[bool]) -> bool:
        try:
            return await action
        except Exception:  # noqa: BLE001 - see the module docstring
            log.warning("rate limit store unreachable; request let through", exc_info=True)
            return True

    async def check_client(self, client: str) -> None:
        """`RateLimited` when `client` has used up its failed authentications."""
        for item in self.failed_auth:
            if not await self._guarded(self.limiter.test(item, "auth-failed", client)):
                raise RateLimited(
                    f"too many failed authentications from this address (limit {item})",
                    retry_after=await self._retry_after(item, "auth-failed", client),
                )

    async def count_failure(self, client: str) -> None:
        for item in self.failed_auth:
            await self._guarded(self.limiter.hit(item, "auth-failed", client))

    async def hit_tenant(self, tenant: str) -> None:
        """Count one request of `tenant`; `RateLimited` past its limit."""
        for item in self.per_tenant:
            if not await self._guarded(self.limiter.hit(item, "tenant", tenant)):
                raise RateLimited(
                    f"too many requests for this tenant (limit {item})",
                    retry_after=await self._retry_after(item, "tenant", tenant),
                )
