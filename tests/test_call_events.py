"""Recording a call event is idempotent by event id - also when two attempts of the
activity race: an attempt Temporal gave up on (its timeout passed) can still commit
the event after the retry looked for it and before the retry writes it."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session as SyncSession
from sqlmodel import Session, select
from tools_support import seed_call

from activities.webhooks import WebhookActivities
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine, session_factory
from builder_engine.db.models import CallEvent
from builder_engine.timeutil import utcnow
from workflows.events import CallEventInput


async def test_an_event_an_earlier_attempt_wrote_meanwhile_is_returned(
    db_settings: Settings,
) -> None:
    start = seed_call(db_settings, []).start
    event = CallEventInput(
        event_id=f"evt_{uuid.uuid4().hex}",
        event_type="call.started",
        call_id=start.call_id,
        organization_id=start.organization_id,
        occurred_at=utcnow(),
    )
    other_writer = create_sync_engine(db_settings)

    def earlier_attempt_commits(session: SyncSession, *_: Any) -> None:
        # This attempt has looked for the event (not there) and is about to write it.
        with Session(other_writer) as other:
            other.add(
                CallEvent(
                    id=event.event_id,
                    organization_id=event.organization_id,
                    call_id=event.call_id,
                    kind=event.event_type,
                    data={"attempt": 1},
                    created_at=event.occurred_at,
                )
            )
            other.commit()

    sa.event.listen(SyncSession, "before_flush", earlier_attempt_commits, once=True)
    engine = create_async_db_engine(db_settings)
    try:
        recorded = await WebhookActivities(session_factory(engine)).record_call_event(event)
    finally:
        if sa.event.contains(SyncSession, "before_flush", earlier_attempt_commits):
            sa.event.remove(SyncSession, "before_flush", earlier_attempt_commits)
        await engine.dispose()

    assert recorded.event_id == event.event_id
    with Session(other_writer) as session:
        rows: list[Any] = list(
            session.exec(select(CallEvent).where(CallEvent.id == event.event_id)).all()
        )
    other_writer.dispose()
    assert [row.data for row in rows] == [{"attempt": 1}]  # the earlier attempt's row stands
