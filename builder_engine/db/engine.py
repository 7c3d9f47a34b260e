"""Database engines for the configured URL (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from builder_engine.config import Settings


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API, the worker and the CLI use one SQLite file at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # One writer at a time: a burst of calls starting together queues its writes (each
    # commit is synced to disk), and a writer at the back of the queue must wait, not fail.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _ensure_sqlite_folder(url: str) -> None:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from pathlib import Path

        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def _is_sqlite(url: str) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


def create_sync_engine(settings: Settings) -> sa.Engine:
    url = settings.sync_database_url
    _ensure_sqlite_folder(url)
    # A server connection may have been dropped while pooled (checked on checkout); a
    # SQLite file cannot, and the check was a query per session.
    engine = sa.create_engine(url, pool_pre_ping=not _is_sqlite(url))
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_async_db_engine(settings: Settings) -> AsyncEngine:
    url = settings.async_database_url
    _ensure_sqlite_folder(url)
    engine = create_async_engine(url, pool_pre_ping=not _is_sqlite(url))
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
