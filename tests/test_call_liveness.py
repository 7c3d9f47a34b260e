"""CallWorkflow heartbeats, call moves and continue-as-new, on the time-skipping server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.call_moves import CallMoveActivities, resume_twiml
from activities.calls import CallActivities
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Agent, Call, CallTurn, Organization
from workers.temporal_worker import build_worker
from workflows import liveness
from workflows.liveness import HISTORY_LIMIT, MAX_MOVES, ResumeState
from workflows.types import CallStart, CommittedTurn


def _make_call(settings: Settings, transport: str) -> CallStart:
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        org = Organization(name=f"org-{uuid.uuid4().hex[:8]}")
        agent = Agent(organization_id=org.id, name="a", published_version=1)
        call = Call(
            organization_id=org.id,
            agent_id=agent.id,
            agent_version=1,
            direction="inbound" if transport == "twilio" else "web",
            transport=transport,
        )
        session.add(org)
        session.flush()
        session.add(agent)
        session.flush()
        session.add(call)
        session.commit()
        start = CallStart(call.id, org.id, agent.id, 1, call.direction)
    engine.dispose()
    return start


def _turn(index: int) -> CommittedTurn:
    speaker = "caller" if index % 2 == 0 else "agent"
    return CommittedTurn(
        index=index,
        speaker=speaker,
        text=f"turn {index}",
        latency={"voice_to_voice_ms": 480.0},
        tool_calls=[{"id": f"t{index}", "name": "x", "arguments": "{}", "result": "{}"}]
        if index % 10 == 5
        else [],
    )


async def _runs(client: Client, call_id: str, first_run_id: str) -> list[list[str]]:
    """Each run's events (activity names for scheduled activities), following
    continue-as-new from the first run."""
    runs: list[list[str]] = []
    run_id: str | None = first_run_id
    while run_id:
        history = await client.get_workflow_handle(call_id, run_id=run_id).fetch_history()
        runs.append(
            [
                e.activity_task_scheduled_event_attributes.activity_type.name
                if e.HasField("activity_task_scheduled_event_attributes")
                else EventType.Name(e.event_type)
                for e in history.events
            ]
        )
        last = history.events[-1]
        run_id = None
        if last.HasField("workflow_execution_continued_as_new_event_attributes"):
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return runs


async def _signal(handle: WorkflowHandle[Any, Any], name: str, *args: Any) -> None:
    """Signal the latest run. The test server answers "Completed workflow" in the instant a
    run continues as new (the realtime lifecycle retries the same way)."""
    for attempt in range(5):
        try:
            await handle.signal(name, *args)
            return
        except RPCError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.skip(
    reason="flaky on the time-skipping test server: a signal racing continue-as-new, and "
    "once a hang (issue 5 follow-up; passes when run alone)"
)
async def test_a_30_minute_call_continues_as_new_and_every_run_stays_small(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """Heartbeats every second and a turn every 6 s for 30 minutes (one signal each,
    as the realtime session sends them): over 7,000 events in all, in runs of fewer than
    2,000, with the turns, the counters and the history carried over."""
    client = time_skipping_env.client
    start = _make_call(db_settings, "twilio")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    seconds, turn_every = 30 * 60, 6
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            first_run_id = handle.first_execution_run_id or handle.result_run_id
            assert first_run_id
            await handle.signal("answered")
            turns = 0
            async with asyncio.timeout(180):  # fail, never hang
                for second in range(seconds):
                    await _signal(handle, "heartbeat")
                    if second % turn_every == 0:
                        await _signal(handle, "turns_committed", [_turn(turns)])
                        turns += 1
                    await time_skipping_env.sleep(1)
            latest = client.get_workflow_handle(start.call_id)
            state = await latest.query("resume_state", result_type=ResumeState)
            await latest.signal("ended", str(EndedReason.CALLER_HANGUP))
            result = await latest.result()
            runs = await _runs(client, start.call_id, first_run_id)
    finally:
        await engine.dispose()

    print(f"runs={len(runs)} events={[len(r) for r in runs]}")
    assert len(runs) >= 3
    assert all(len(run) < 2_000 for run in runs)
    assert all(len(run) < HISTORY_LIMIT + 100 for run in runs)
    # Nobody was moved: heartbeats never stopped, across every continue-as-new.
    assert not any("move_call" in run for run in runs)
    assert result["status"] == CallStatus.ENDED and result["turns_committed"] == turns
    assert [t.index for t in state.turns] == list(range(turns))
    assert state.turns[5].tool_calls[0]["result"] == "{}" and state.answered
    sync = create_sync_engine(db_settings)
    with Session(sync) as session:
        call = session.exec(select(Call).where(Call.id == start.call_id)).one()
        saved = session.exec(select(CallTurn).where(CallTurn.call_id == start.call_id)).all()
    sync.dispose()
    assert call.status == CallStatus.ENDED and call.ended_reason == EndedReason.CALLER_HANGUP
    assert sorted(t.index for t in saved) == list(range(turns))


async def _move_calls(handle: WorkflowHandle[object, object]) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "move_call"
    )


async def test_missing_heartbeats_move_the_call_and_it_goes_on(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    try:
        async with build_worker(
            client, task_queue, calls, moves=CallMoveActivities(calls.sessions, None)
        ):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            await handle.signal("answered")
            for _ in range(3):
                await handle.signal("heartbeat")
                await time_skipping_env.sleep(1)
            assert await _move_calls(handle) == 0
            await time_skipping_env.sleep(5)  # the session died: no heartbeats
            assert await _move_calls(handle) == 1
            # The web client reconnected; the new session beats.
            for _ in range(5):
                await handle.signal("heartbeat")
                await time_skipping_env.sleep(1)
            assert await _move_calls(handle) == 1
            await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
            result = await handle.result()
    finally:
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def test_a_call_whose_session_never_comes_back_ends_lost(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The time-skipping server does not skip these waits (they pass in real time): short.
    monkeypatch.setattr(liveness, "MOVE_GRACE", timedelta(seconds=1))
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    try:
        async with build_worker(client, task_queue, calls):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            await handle.signal("answered")
            await handle.signal("heartbeat")
            result = await handle.result()
            moves = await _move_calls(handle)
    finally:
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.LOST
    assert moves == MAX_MOVES


def test_the_resume_twiml_streams_the_call_back_with_resume() -> None:
    twiml = resume_twiml("wss://rt.example.test/", "call_1")
    assert '<Stream url="wss://rt.example.test/media/twilio">' in twiml
    assert '<Parameter name="call_id" value="call_1" />' in twiml
    assert '<Parameter name="resume" value="1" />' in twiml
