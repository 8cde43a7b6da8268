"""Every error leaves the API as `{"error": {"code", "message", "details"}}`.

Domain errors get their status from `STATUS` (the one place where a kind of refusal becomes an HTTP status);
request validation is `validation_error`, HTTP-level refusals (400 of a body that cannot be parsed, 401, 404 of an
unknown route, 405, 415) keep Starlette's status with a code from `HTTP_CODES`, and anything else is a logged 500
`internal_error`. A client that closes its connection before its request is read is logged as 499
`client_disconnected` (its doing, not a 500).

Messages and details are cut to a bounded size (`bounded`), so that an error never echoes a huge input back;
`document_errors` puts every error response of every operation into the OpenAPI document with the `ErrorOut`
schema.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from ..domain.errors import (
    Conflict,
    DomainError,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    RateLimited,
    TooLarge,
    Unavailable,
    UpstreamFailed,
)
from .schemas import ErrorOut

log = logging.getLogger(__name__)

STATUS: dict[type[DomainError], int] = {
    DomainError: 422,
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UpstreamFailed: 502,
    Unavailable: 503,
    RateLimited: 429,
    InsufficientStorage: 507,
    QuotaExceeded: 507,
}
HTTP_CODES = {
    400: "malformed_body",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never received by anyone


def status_of(error: DomainError) -> int:
    """The status of the most specific class of `error` in `STATUS`."""
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


MAX_MESSAGE_CHARS = 1000
MAX_DETAIL_CHARS = 200
MAX_DETAIL_ITEMS = 100
MAX_DETAIL_DEPTH = 8


def bounded(value: Any, chars: int = MAX_DETAIL_CHARS, depth: int = 0) -> Any:
    """A JSON-ready value cut to size: strings to `chars` characters (marked with …), lists and objects to
    `MAX_DETAIL_ITEMS` entries, nesting to `MAX_DETAIL_DEPTH` levels."""
    if isinstance(value, str):
        return value if len(value) <= chars else f"{value[:chars]}… ({len(value)} characters)"
    if depth >= MAX_DETAIL_DEPTH and isinstance(value, dict | list):
        return "…"
    if isinstance(value, list):
        return [bounded(v, chars, depth + 1) for v in value[:MAX_DETAIL_ITEMS]]
    if isinstance(value, dict):
        items = list(value.items())[:MAX_DETAIL_ITEMS]
        return {bounded(str(k), chars, depth): bounded(v, chars, depth + 1) for k, v in items}
    return value


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {
        "error": {
            "code": code,
            "message": bounded(message, MAX_MESSAGE_CHARS),
            "details": bounded(jsonable_encoder(details)),
        }
    }


def error_response(error: DomainError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error_body(error.code, error.message, error.details), status_of(error), headers=headers)


def validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = exc.errors()
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors[:MAX_DETAIL_ITEMS]
    ]


ERROR_DESCRIPTIONS = {
    400: "the body cannot be parsed (`malformed_body`)",
    401: "missing, unknown or revoked API key (`unauthorized`)",
    404: "no such resource for this tenant (`not_found`)",
    409: "the resource's state forbids the operation",
    413: "the body, upload or archive is too large",
    415: "unsupported Content-Type (`unsupported_media_type`)",
    422: "invalid request: `validation_error` or a domain code (README, Errors)",
    429: "too many requests (`rate_limited`, see Retry-After)",
    500: "a bug (`internal_error`)",
    502: "the Hugging Face Hub failed (`hub_unavailable`)",
    503: "a part of the service is down (see Retry-After)",
    507: "the storage is full (`insufficient_storage`) or the tenant's quota is used up (`quota_exceeded`)",
}


def operation_errors(method: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer, from its shape: every one can fail (500) or find a part of the
    service down (503); parameters or a key can be invalid (422); a key can be missing or rate limited (401, 429);
    a path id can be unknown (404) or in the wrong state (409, as can any POST); a body can be malformed, too
    large, of the wrong type (400, 413, 415), need the Hub (502) or the disk (507)."""
    secured = bool(operation.get("security")) and {} not in operation["security"]  # `{}`: the key is optional
    has_path = any(p.get("in") == "path" for p in operation.get("parameters", []))
    has_body = "requestBody" in operation
    statuses = {500, 503}
    if secured or has_body or operation.get("parameters"):
        statuses.add(422)
    if secured:
        statuses |= {401, 429}
    if has_path:
        statuses |= {404, 409}
    if method == "post":
        statuses.add(409)
    if has_body:
        statuses |= {400, 413, 415, 502, 507}
    return statuses


def add_error_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Document `ErrorOut` for every error status of every operation (FastAPI's own 422 schema replaced)."""
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(error_schema.pop("$defs", {}))
    components["ErrorOut"] = error_schema
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for methods in schema.get("paths", {}).values():
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            for status in sorted(operation_errors(method, operation)):
                known = responses.get(str(status), {})
                schema_ref = known.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
                if "content" not in known or schema_ref.endswith("/HTTPValidationError"):
                    responses[str(status)] = {"description": known.get("description") or ERROR_DESCRIPTIONS[status]}
                    responses[str(status)]["content"] = content
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def document_errors(app: FastAPI) -> None:
    """Make `app`'s OpenAPI document carry its error responses (`add_error_responses`), built once."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_error_responses(generate())
        return app.openapi_schema

    # FastAPI's documented way to extend the OpenAPI document is to assign `app.openapi` ("Extending OpenAPI");
    # mypy sees a method being replaced.
    app.openapi = openapi  # type: ignore[method-assign]


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of `app` answers at `path` (Starlette's 405 names only the first route's)."""
    allowed = []
    for method in METHODS:
        probe = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
        if any(route.matches(dict(probe))[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("validation_error", "the request is not valid", validation_details(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.url.path))}
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, _: ClientDisconnect) -> JSONResponse:
        log.info("client disconnected before its request was read", extra={"path": request.url.path})
        return JSONResponse(error_body("client_disconnected", "the client closed the connection"), CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
