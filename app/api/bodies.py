"""Endpoints that take either a multipart upload (`file`, optional `name`) or a JSON body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")


def upload_or_json_openapi(json_model: type[BaseModel], file_help: str) -> dict[str, Any]:
    """OpenAPI `requestBody` documenting both forms."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": file_help},
                            "name": {"type": "string", "description": "display name (default: the file name)"},
                        },
                    }
                },
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


async def upload_or_json(
    request: Request,
    json_model: type[T],
    on_upload: Callable[[IO[bytes], str | None, str | None], Awaitable[R]],
    on_json: Callable[[T], Awaitable[R]],
) -> R:
    """Dispatch on Content-Type; the form's temporary files are removed when done."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=8) as form:
            upload, name = form.get("file"), form.get("name")
            if not isinstance(upload, UploadFile):
                raise RequestValidationError([{"loc": ("body", "file"), "msg": "Field required", "type": "missing"}])
            return await on_upload(upload.file, upload.filename, name if isinstance(name, str) and name else None)
    if content_type.startswith("application/json"):
        try:
            body = json_model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        return await on_json(body)
    raise HTTPException(415, "send multipart/form-data (field `file`) or application/json")
