"""Request-body size limits enforced while the body streams in (Content-Length or chunked), before parsing: a
multipart upload may be up to `limit` bytes, any other body (JSON) up to `json_limit`, so that a request is never
held in memory (nor parsed into objects) beyond what its kind needs."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sstmerge_core.untrusted import control_free

from .errors import error_body

_SLACK = 1 << 16  # multipart framing around the file
DEFAULT_JSON_LIMIT = 1 << 20


class BodyTooLarge(Exception):
    pass


def _is_multipart(scope: Scope) -> bool:
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    return content_type.lower().startswith(b"multipart/form-data")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, json_limit: int = DEFAULT_JSON_LIMIT) -> None:
        self.app, self.upload_limit, self.json_limit = app, limit, json_limit

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(
            error_body("payload_too_large", f"the request body exceeds the limit of {limit} bytes", {"limit": limit})
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        multipart = _is_multipart(scope)
        limit = self.upload_limit if multipart else self.json_limit
        allowed = limit + _SLACK if multipart else limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            await self._reject(send, limit)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > allowed:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, limit)


class PrintablePathMiddleware:
    """A request path with control characters (NUL included) or over `max_chars` names no resource: 404 before
    routing, so that such ids never reach a database query."""

    def __init__(self, app: ASGIApp, max_chars: int = 2048) -> None:
        self.app, self.max_chars = app, max_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if len(path) <= self.max_chars and control_free(path):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("not_found", "no such resource (the path has control characters)")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
