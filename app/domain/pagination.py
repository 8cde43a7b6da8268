"""Keyset pagination on (created_at, id), newest first, with an opaque cursor."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from sqlalchemy import Select, and_, or_

from .errors import InvalidInput


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        return datetime.fromisoformat(created), str(ident)
    except (ValueError, TypeError):
        raise InvalidInput("the cursor is not valid; start again without it", code="invalid_cursor") from None


def paginate(query: Select, model, limit: int, cursor: str | None) -> Select:
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
