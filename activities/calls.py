"""Activities that write a call's record and its turns to the SQL database."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.unit_of_work import finishes_when_cancelled
from builder_engine.calls import CallStatus
from builder_engine.db.engine import session_factory
from builder_engine.db.models import Call, CallTurn
from builder_engine.ids import new_id
from workflows.types import CallStatusChange, TurnBatch

_CALLS = SQLModel.metadata.tables[str(Call.__tablename__)]
_TURNS = SQLModel.metadata.tables[str(CallTurn.__tablename__)]


class CallActivities:
    """Bound to one database engine; register its methods on a worker."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = session_factory(engine)

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory (shared with the tool activities of the same worker)."""
        return self._sessions

    async def _check_call(self, session: AsyncSession, call_id: str, organization_id: str) -> None:
        """The call exists, in this organization (retrying cannot make a missing row
        appear); one SELECT of its id, not its whole row."""
        statement = sa.select(_CALLS.c.id).where(
            _CALLS.c.id == call_id, _CALLS.c.organization_id == organization_id
        )
        if (await (await session.connection()).execute(statement)).first() is None:
            raise ApplicationError(f"call {call_id} does not exist", non_retryable=True)

    @activity.defn(name="record_call_status")
    @finishes_when_cancelled
    async def record_call_status(self, change: CallStatusChange) -> None:
        """One UPDATE: the first answer and start times stay, the end is set once."""
        values: dict[str, Any] = {
            "status": change.status,
            "started_at": sa.func.coalesce(_CALLS.c.started_at, change.at),
        }
        if change.status == CallStatus.IN_PROGRESS:
            values["answered_at"] = sa.func.coalesce(_CALLS.c.answered_at, change.at)
        if change.status == CallStatus.ENDED:
            values["ended_at"] = sa.func.coalesce(_CALLS.c.ended_at, change.at)
            values["ended_reason"] = change.ended_reason
        statement = (
            sa.update(_CALLS)
            .where(
                _CALLS.c.id == change.call_id, _CALLS.c.organization_id == change.organization_id
            )
            .values(values)
            .returning(_CALLS.c.id)
        )
        async with self._sessions() as session:
            updated = (await (await session.connection()).execute(statement)).all()
            await session.commit()
        if not updated:
            # Retrying cannot make a missing row appear.
            raise ApplicationError(f"call {change.call_id} does not exist", non_retryable=True)

    @activity.defn(name="save_call_turns")
    @finishes_when_cancelled
    async def save_call_turns(self, batch: TurnBatch) -> int:
        """Insert the batch's turns; turns already stored (a retried attempt) are skipped.

        One statement (``INSERT ... ON CONFLICT DO NOTHING`` on the call and turn index)
        and one commit: it runs for every exchange of every call, and SQLite has one
        writer at a time."""
        if not batch.turns:
            return 0
        rows = [
            {
                "id": new_id("call_turn"),
                "organization_id": batch.organization_id,
                "call_id": batch.call_id,
                "index": turn.index,
                "speaker": turn.speaker,
                "text": turn.text,
                "interrupted": turn.interrupted,
                "started_at": turn.started_at,
                "ended_at": turn.ended_at,
                "latency": dict(turn.latency),
                "tool_calls": list(turn.tool_calls),
            }
            for turn in batch.turns
        ]
        async with self._sessions() as session:
            await self._check_call(session, batch.call_id, batch.organization_id)
            dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
            insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
            statement = (
                insert(_TURNS)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["call_id", "index"])
                .returning(_TURNS.c.index)
            )
            inserted = (await (await session.connection()).execute(statement)).all()
            await session.commit()
            return len(inserted)
