"""Keyset pagination over (created_at, id), newest first, with an opaque cursor."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import sqlalchemy as sa
from fastapi import Query
from pydantic import BaseModel, Field

from api.errors import field_error
from builder_engine.timeutil import as_utc

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Query(max_length=200, description="`next_cursor` of the previous page."),
]


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([as_utc(created_at).isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        return as_utc(datetime.fromisoformat(created)), str(ident)
    except (ValueError, TypeError) as exc:
        raise field_error("cursor", "The cursor is not one this API gave out.") from exc


def after_cursor(created_col: Any, id_col: Any, cursor: str | None) -> sa.ColumnElement[bool]:
    """WHERE clause selecting rows after the cursor in (created_at desc, id desc) order."""
    if cursor is None:
        return sa.true()
    created, ident = decode_cursor(cursor)
    return sa.or_(created_col < created, sa.and_(created_col == created, id_col < ident))
