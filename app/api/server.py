"""How `sstmerge serve` runs the API under uvicorn: `server_config` (one place for the server's options) and
`GuardedHttpProtocol`, uvicorn's httptools protocol with the guards uvicorn lacks against slow or greedy clients.

uvicorn has a keep-alive timeout but no read timeout: a connection that sends its headers a byte a second, or its
body a few bytes a second, is held for as long as it likes. The protocol, per connection:
- the request line and headers must arrive within `http_header_timeout_seconds` of the connection (or of the
  first byte of a later request on it), and be at most `http_max_header_bytes` long (else 408 / 431);
- a body must deliver at least `http_min_body_bytes_per_second` × `http_body_timeout_seconds` bytes in every
  period of `http_body_timeout_seconds` while the application waits for it (periods in which the application is
  not reading, or a client waits for `100 Continue`, do not count): else 408 and the connection is closed;
- one client address holds at most `http_max_connections_per_client` open connections per API process (429
  beyond; trusted proxies are exempt), so slow connections of one client cannot use up the server.
Its own refusals, and uvicorn's 400 of a request that is not HTTP, leave in the JSON error shape of the API.
Forwarded headers are not uvicorn's business here (`proxy_headers=False`): the application reads
`X-Forwarded-For` from `SSTMERGE_TRUSTED_PROXIES` only (`app.api.deps.client_address`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..domain.settings import Settings, get_settings
from .deps import Network, is_trusted, trusted_networks
from .errors import error_body

log = logging.getLogger(__name__)


class HeadersTooLarge(Exception):
    pass


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float
    body_period: float
    min_body_rate: int
    max_header_bytes: int
    max_connections_per_client: int
    trusted: tuple[Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            header_timeout=settings.http_header_timeout_seconds,
            body_period=settings.http_body_timeout_seconds,
            min_body_rate=settings.http_min_body_bytes_per_second,
            max_header_bytes=settings.http_max_header_bytes,
            max_connections_per_client=settings.http_max_connections_per_client,
            trusted=trusted_networks(settings),
        )


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read timeouts, a header size limit and a per-client connection limit
    (see the module docstring). `limits` unset: read from the environment's settings (the processes of
    `serve --workers N`); `protocol_class` makes a class with its own limits and connection counts."""

    limits: HttpLimits | None = None
    open_connections: dict[str, int] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.limits is None:
            cls.limits = HttpLimits.from_settings(get_settings())
        self.guard: HttpLimits = cls.limits
        self._peer: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._reading_headers = True
        self._header_size = 0  # request line and headers as parsed
        self._oversized = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0

    # connections per client
    # The ignore below: uvicorn's HttpToolsProtocol already narrows asyncio's BaseTransport to Transport (what the
    # event loop passes a stream protocol); this override keeps uvicorn's signature.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        if peer is not None and not is_trusted(peer, self.guard.trusted):
            counts = type(self).open_connections
            if counts.get(peer, 0) >= self.guard.max_connections_per_client:
                log.warning("too many connections from one client; refused", extra={"client": peer})
                self._refuse(429, "too_many_connections", "too many open connections from this address")
                return
            counts[peer] = counts.get(peer, 0) + 1
            self._peer = peer
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._peer is not None:
            counts = type(self).open_connections
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
            self._peer = None
        super().connection_lost(exc)

    # headers
    def data_received(self, data: bytes) -> None:
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._reading_headers and self._header_bytes > self.guard.max_header_bytes + (1 << 16):
            self._refuse_oversized()  # headers that never end

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers, self._header_size = True, 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_size > self.guard.max_header_bytes:
            self._oversized = True
            raise HeadersTooLarge  # ends the parsing: httptools raises it out of feed_data as a parser error
        self._reading_headers, self._header_bytes, self._header_size = False, 0, 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(self.guard.body_period, self._check_body, self.cycle)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            log.warning("request headers too slow; connection closed", extra={"client": self._peer})
            self._refuse(408, "request_timeout", "the request headers did not arrive in time")

    # body
    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body(self, cycle: Any) -> None:
        """Every `body_period` while the body of `cycle` is unread: enough bytes, or the waiting was not the
        client's doing (the application was not reading, or the client waits for `100 Continue`)."""
        self._body_timer = None
        if self.transport.is_closing() or cycle is not self.cycle or not cycle.more_body:
            return
        waiting_on_us = self.flow.read_paused or cycle.waiting_for_100_continue
        if waiting_on_us or self._body_bytes >= self.guard.min_body_rate * self.guard.body_period:
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(self.guard.body_period, self._check_body, cycle)
            return
        log.warning("request body too slow; connection closed", extra={"client": self._peer})
        if not cycle.response_started:
            self._refuse(408, "request_timeout", "the request body did not arrive in time")
        else:
            self.transport.close()
        cycle.disconnected = True  # the application's receive() answers http.disconnect, its sends are dropped
        cycle.message_event.set()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # answers of the server itself, in the API's error shape
    def send_400_response(self, msg: str) -> None:
        if self._oversized:
            self._refuse_oversized()
            return
        self._refuse(400, "malformed_request", "the request is not valid HTTP/1.1")

    def _refuse_oversized(self) -> None:
        self._refuse(431, "headers_too_large", f"the request headers exceed {self.guard.max_header_bytes} bytes")

    def _refuse(self, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message)).encode()
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % (name, value) for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + body)
            self.transport.close()


def protocol_class(limits: HttpLimits) -> type[GuardedHttpProtocol]:
    """A `GuardedHttpProtocol` with `limits` and connection counts of its own (one per server)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "open_connections": {}})


def server_options(settings: Settings | None) -> dict[str, Any]:
    """uvicorn's options as `serve` uses them. Without `settings` (several processes, each building its app from
    the environment) the protocol reads its limits from the environment too."""
    http = GuardedHttpProtocol if settings is None else protocol_class(HttpLimits.from_settings(settings))
    # no WebSocket routes: an upgrade request stays HTTP (and its connection is counted to the end)
    return {"http": http, "ws": "none", "proxy_headers": False, "log_config": None, "access_log": False}


def server_config(app: Any, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration of `serve` for `app` (used by the tests that need a real server)."""
    return uvicorn.Config(app, host=host, port=port, **server_options(settings))
