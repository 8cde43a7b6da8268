"""Every error leaves the API as `{"error": {"code", "message", "details"}}`.

Domain errors get their status from `STATUS` (the one place where a kind of refusal becomes an HTTP status);
request validation is `validation_error`, HTTP-level refusals (401, 404 of an unknown route, 405, 415) keep
Starlette's status with a code from `HTTP_CODES`, and anything else is a logged 500 `internal_error`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..domain.errors import Conflict, DomainError, InvalidInput, NotFound, TooLarge, Unavailable, UpstreamFailed

log = logging.getLogger(__name__)

STATUS: dict[type[DomainError], int] = {
    DomainError: 422,
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UpstreamFailed: 502,
    Unavailable: 503,
}
HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def status_of(error: DomainError) -> int:
    """The status of the most specific class of `error` in `STATUS`."""
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}


def error_response(error: DomainError) -> JSONResponse:
    return JSONResponse(error_body(error.code, error.message, error.details), status_of(error))


def validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("validation_error", "the request is not valid", validation_details(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
