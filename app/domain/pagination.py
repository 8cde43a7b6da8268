"""Keyset pagination on (created_at, id), newest first, with an opaque cursor.

A cursor is base64url of the JSON pair `["<ISO-8601 time with offset>", "<id>"]`; anything else — not base64,
not JSON, another shape, a naive or out-of-range time, an id that no row can have — is `invalid_cursor`, before
the database sees it.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone

from sqlalchemy import Select, and_, or_

from .db.models import Adapter, Dataset, Job
from .errors import InvalidInput
from .requests import well_formed_id

MAX_CURSOR_CHARS = 256


def invalid_cursor() -> InvalidInput:
    return InvalidInput("the cursor is not valid; start again without it", code="invalid_cursor")


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor made by `encode_cursor`; `InvalidInput` (invalid_cursor) for anything else."""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        pair = json.loads(raw)
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise ValueError("not a pair of strings")
        created = datetime.fromisoformat(pair[0])
    except (ValueError, TypeError, UnicodeError, binascii.Error, RecursionError):
        raise invalid_cursor() from None
    if created.tzinfo is None or not well_formed_id(pair[1]) or not 1970 <= created.year <= 9998:
        raise invalid_cursor()
    return created.astimezone(timezone.utc), pair[1]


def paginate(query: Select, model: type[Adapter] | type[Dataset] | type[Job], limit: int, cursor: str | None) -> Select:
    """`query` restricted to the page after `cursor`, ordered newest first, one extra row to detect more."""
    if cursor:
        created, ident = decode_cursor(cursor)
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < ident)))
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)


def page_of(rows: list, limit: int) -> tuple[list, str | None]:
    """Split the `limit + 1` rows of `paginate` into the page and the next cursor."""
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)
