"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 (a thread) that answers each POST as its
script says and verifies every request's signature with `standardwebhooks.Webhook.verify`."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    payload: dict | None  # the verified JSON body; None when the signature did not verify
    error: str | None = None


@dataclass
class Receiver:
    """`script`: what to answer to the 1st, 2nd, … request: an HTTP status, `("redirect", location)` or `"hang"`
    (no answer until `release` is set); requests beyond the script get 200. `port` 0: a free one."""

    secret: str | None = None
    script: list = field(default_factory=list)
    port: int = 0
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                action = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if action == "hang":
                    receiver.release.wait(120)
                    return
                if isinstance(action, tuple):
                    self.send_response(302)
                    self.send_header("Location", action[1])
                else:
                    self.send_response(action)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def free_port() -> int:
        """A port nothing listens on now (for a receiver that is down, started there later)."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def _record(self, path: str, headers: dict[str, str], body: bytes):
        payload, error = None, None
        try:
            payload = Webhook(self.secret).verify(body, headers) if self.secret else None
        except WebhookVerificationError as exc:
            error = str(exc)
        with self._lock:
            self.received.append(Received(path, headers, body, payload, error))
            index = len(self.received) - 1
        return self.script[index] if index < len(self.script) else 200

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} webhooks arrived: {self.received}"
            time.sleep(0.05)
        return list(self.received)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
