"""Activities that write a call's record and its turns to the SQL database."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from builder_engine.calls import CallStatus
from builder_engine.db.engine import session_factory
from builder_engine.db.models import Call, CallTurn
from workflows.types import CallStatusChange, TurnBatch


class CallActivities:
    """Bound to one database engine; register its methods on a worker."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = session_factory(engine)

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory (shared with the tool activities of the same worker)."""
        return self._sessions

    async def _load_call(self, session: AsyncSession, call_id: str, organization_id: str) -> Call:
        call = (
            await session.exec(
                select(Call).where(Call.id == call_id, Call.organization_id == organization_id)
            )
        ).first()
        if call is None:
            # Retrying cannot make a missing row appear.
            raise ApplicationError(f"call {call_id} does not exist", non_retryable=True)
        return call

    @activity.defn(name="record_call_status")
    async def record_call_status(self, change: CallStatusChange) -> None:
        async with self._sessions() as session:
            call = await self._load_call(session, change.call_id, change.organization_id)
            call.status = change.status
            if change.status == CallStatus.IN_PROGRESS and call.answered_at is None:
                call.answered_at = change.at
            if call.started_at is None:
                call.started_at = change.at
            if change.status == CallStatus.ENDED:
                call.ended_at = call.ended_at or change.at
                call.ended_reason = change.ended_reason
            session.add(call)
            await session.commit()

    @activity.defn(name="save_call_turns")
    async def save_call_turns(self, batch: TurnBatch) -> int:
        """Insert the batch's turns; turns already stored (a retried attempt) are skipped."""
        async with self._sessions() as session:
            await self._load_call(session, batch.call_id, batch.organization_id)
            indexes = [turn.index for turn in batch.turns]
            stored = set(
                (
                    await session.exec(
                        select(CallTurn.index).where(
                            CallTurn.call_id == batch.call_id, col(CallTurn.index).in_(indexes)
                        )
                    )
                ).all()
            )
            new_turns = [turn for turn in batch.turns if turn.index not in stored]
            for turn in new_turns:
                session.add(
                    CallTurn(
                        organization_id=batch.organization_id,
                        call_id=batch.call_id,
                        index=turn.index,
                        speaker=turn.speaker,
                        text=turn.text,
                        interrupted=turn.interrupted,
                        started_at=turn.started_at,
                        ended_at=turn.ended_at,
                        latency=dict(turn.latency),
                        tool_calls=list(turn.tool_calls),
                    )
                )
            await session.commit()
            return len(new_turns)
