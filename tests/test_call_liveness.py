"""CallWorkflow continue-as-new and call moves, on the time-skipping server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import Any

from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.call_moves import CallMoveActivities
from activities.calls import CallActivities
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Agent, Call, CallTurn, Organization
from builder_engine.telephony import stream_twiml
from workers.temporal_worker import build_worker
from workflows.instances import SessionStarted
from workflows.liveness import HISTORY_LIMIT, MAX_MOVES, CallCarry, ResumeState, history_turn
from workflows.types import MIN_HISTORY_LIMIT, CallStart, CommittedTurn


def _make_call(
    settings: Settings,
    transport: str,
    *,
    carrier_call_id: str | None = None,
    history_limit: int = HISTORY_LIMIT,
) -> CallStart:
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
            carrier_call_id=carrier_call_id,
            from_number="+14155550100" if transport == "twilio" else None,
            to_number="+14155550111" if transport == "twilio" else None,
        )
        session.add(org)
        session.flush()
        session.add(agent)
        session.flush()
        session.add(call)
        session.commit()
        start = CallStart(call.id, org.id, agent.id, 1, call.direction, history_limit=history_limit)
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
    """Signal the call's latest run. In the instant a run continues as new, the test server
    may still resolve the workflow id to the closing run and answer NOT_FOUND ("workflow
    execution already completed"); asked again, it reaches the new run. (The real server
    switches atomically; the realtime lifecycle retries failed signals anyway.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            await handle.signal(name, *args)
            return
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND or loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


@dataclasses.dataclass
class EndedCall:
    result: dict[str, Any]
    state: ResumeState  # what a session taking over would have read at the end
    runs: list[list[str]]
    row: Call
    turns: list[CallTurn]


async def _ended_call(
    client: Client, call_id: str, first_run_id: str, settings: Settings
) -> EndedCall:
    """The call's result (following its runs) and the rest, read once it has ended. (The
    resume state is asked of the closed last run: on the test server, a query that
    reaches a run in the instant it continues as new is lost.)"""
    handle = client.get_workflow_handle(call_id)
    result: dict[str, Any] = await handle.result()
    state = await handle.query("resume_state", result_type=ResumeState)
    runs = await _runs(client, call_id, first_run_id)
    sync = create_sync_engine(settings)
    with Session(sync) as session:
        row = session.exec(select(Call).where(Call.id == call_id)).one()
        turns = list(session.exec(select(CallTurn).where(CallTurn.call_id == call_id)).all())
    sync.dispose()
    return EndedCall(result, state, runs, row, turns)


async def test_a_long_call_continues_as_new_and_every_run_stays_small(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """A turn every 6 s for 30 minutes of the server's clock (one signal each, as the
    realtime session sends them), the call's turn flushes in between: over 1,300 events,
    in runs that stay within the history limit (a quarter of the production one here,
    for several runs in a short call: liveness beats no longer go to the call's own
    workflow), with the turns, the counters and the history carried over."""
    client = time_skipping_env.client
    limit = HISTORY_LIMIT // 4
    start = _make_call(db_settings, "twilio", history_limit=limit)
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    minutes, turn_every = 30, 6
    turns = minutes * 60 // turn_every
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            first_run_id = handle.first_execution_run_id or handle.result_run_id
            assert first_run_id
            await handle.signal("answered")
            async with asyncio.timeout(120):  # fail, never hang
                for index in range(turns):
                    await _signal(handle, "turns_committed", [_turn(index)])
                    await time_skipping_env.sleep(turn_every)
                await _signal(handle, "ended", str(EndedReason.CALLER_HANGUP))
                ended = await _ended_call(client, start.call_id, first_run_id, db_settings)
    finally:
        await engine.dispose()

    runs = ended.runs
    print(f"runs={len(runs)} events={[len(r) for r in runs]}")
    assert len(runs) >= 3
    assert all(run[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW" for run in runs[:-1])
    # A run ends within a loop's worth of events past the limit: at the production limit,
    # far below 2,000.
    assert all(len(run) < limit + 50 for run in runs)
    assert CallStart("c", "o", "a", 1, "web").history_limit == HISTORY_LIMIT <= 2_000 - 100
    assert not any("move_call" in run for run in runs)
    assert ended.result["status"] == CallStatus.ENDED
    assert ended.result["turns_committed"] == turns
    assert [t.index for t in ended.state.turns] == list(range(turns))
    assert ended.state.turns[5].tool_calls[0]["result"] == "{}" and ended.state.answered
    assert ended.row.status == CallStatus.ENDED
    assert ended.row.ended_reason == EndedReason.CALLER_HANGUP
    assert sorted(t.index for t in ended.turns) == list(range(turns))


async def _next_run(client: Client, call_id: str, run_id: str) -> str:
    """Until the call has continued as new after ``run_id``: its latest run's id."""
    async with asyncio.timeout(20):
        while True:
            with contextlib.suppress(RPCError):  # the instant of a continue-as-new
                latest = (await client.get_workflow_handle(call_id).describe()).run_id
                if latest != run_id:
                    return latest
            await asyncio.sleep(0.02)


async def test_signals_racing_continue_as_new_are_neither_lost_nor_doubled(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """Turns sent in quick waves of eight at once into a call that continues as new at
    about a hundred events: signals reach the server while a run's continue-as-new is on
    its way (the server refuses it, the workflow task runs again with them), and the
    call's end comes right after the last wave. Each third of the turns is more than a
    run holds: a pause after it lets the run continue as new, so there are several runs
    whatever the machine's speed. Every turn lands once (SQL, the workflow's count, the
    history a resumed session reads), and so does the end."""
    client = time_skipping_env.client
    start = _make_call(db_settings, "web", history_limit=MIN_HISTORY_LIMIT)
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    parts, per_part, at_once = 3, 120, 8
    turns = parts * per_part
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            run_id = first_run_id = handle.first_execution_run_id or handle.result_run_id
            assert first_run_id and run_id
            await handle.signal("answered")
            async with asyncio.timeout(120):
                for part in range(parts):
                    for wave in range(part * per_part, (part + 1) * per_part, at_once):
                        await asyncio.gather(
                            *(
                                _signal(handle, "turns_committed", [_turn(index)])
                                for index in range(wave, wave + at_once)
                            )
                        )
                        await asyncio.sleep(0.02)
                    if part < parts - 1:
                        run_id = await _next_run(client, start.call_id, run_id)
                await _signal(handle, "ended", str(EndedReason.CALLER_HANGUP))
                ended = await _ended_call(client, start.call_id, first_run_id, db_settings)
    finally:
        await engine.dispose()

    runs = ended.runs
    # Continue-as-new commands the server refused (signals came meanwhile), then redone.
    refused = sum(run.count("EVENT_TYPE_WORKFLOW_TASK_FAILED") for run in runs)
    print(f"runs={len(runs)} events={[len(r) for r in runs]} refused={refused}")
    assert len(runs) >= parts
    assert all(run[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW" for run in runs[:-1])
    assert ended.result["turns_committed"] == turns
    assert sorted(t.index for t in ended.state.turns) == list(range(turns))
    assert ended.row.status == CallStatus.ENDED
    assert ended.row.ended_reason == EndedReason.CALLER_HANGUP
    assert sorted(t.index for t in ended.turns) == list(range(turns))


async def test_signals_that_reach_a_new_run_before_its_first_task_are_kept(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """A run that continued as new, with turns, the answer and the call's end waiting for
    its first workflow task (no worker was polling): their handlers run before ``run``
    does, and the state carried over must not overwrite what they brought."""
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    heard = [history_turn(_turn(0)), history_turn(_turn(1)), history_turn(_turn(2))]
    carried = CallCarry(
        status=str(CallStatus.IN_PROGRESS),
        answered=True,
        committed=2,  # turns 0 and 1 were written by the run before
        history=heard,
        pending=[_turn(2)],
        tool_outcomes=[],
        instance=None,
        registered=False,
        lost=False,
        moves=0,
        moved_at=None,
        runs=1,
    )
    try:
        handle = await client.start_workflow(
            "CallWorkflow",
            dataclasses.replace(start, carried=carried),
            id=start.call_id,
            task_queue=task_queue,
        )
        await handle.signal("turns_committed", [_turn(3), _turn(4)])
        await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
        async with build_worker(client, task_queue, CallActivities(engine)):
            ended = await _ended_call(
                client, start.call_id, handle.result_run_id or "", db_settings
            )
    finally:
        await engine.dispose()
    assert ended.result["turns_committed"] == 5
    assert [t.index for t in ended.state.turns] == [0, 1, 2, 3, 4]
    assert ended.row.ended_reason == EndedReason.CALLER_HANGUP
    assert sorted(t.index for t in ended.turns) == [2, 3, 4]  # this run's to write


async def _move_calls(handle: WorkflowHandle[object, object]) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "move_call"
    )


async def test_a_call_whose_realtime_process_is_gone_and_never_comes_back_ends_lost(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """The process named by ``answered`` is not watched (its instance workflow is gone):
    the call is moved, no session takes it over within the grace period, MAX_MOVES
    times, and it ends ``lost``. (A move that works: tests/test_realtime_instance.py.)"""
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
            await handle.signal("answered", SessionStarted(f"gone-{uuid.uuid4().hex[:6]}"))
            async with asyncio.timeout(60):
                result = await handle.result()  # skips the grace periods
            moves = await _move_calls(handle)
    finally:
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.LOST
    assert moves == MAX_MOVES


async def test_the_end_reported_by_a_process_the_call_moved_away_from_is_ignored(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """Split brain: the process serving the call was cut off (not dead), the call was
    moved, then that process's session reports its stream's end. The call goes on; the
    carrier's word (no process named) still ends it."""
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    cut_off = f"cut-off-{uuid.uuid4().hex[:6]}"
    try:
        async with build_worker(
            client, task_queue, calls, moves=CallMoveActivities(calls.sessions, None)
        ):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            await handle.signal("answered", SessionStarted(cut_off))
            async with asyncio.timeout(30):
                while not await _move_completed(handle):
                    await asyncio.sleep(0.05)
            await handle.signal("ended", args=[EndedReason.AGENT_HANGUP, cut_off])
            await handle.signal("ended", EndedReason.CALLER_HANGUP)
            async with asyncio.timeout(60):
                result = await handle.result()
    finally:
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def _move_completed(handle: WorkflowHandle[object, object]) -> bool:
    history = await handle.fetch_history()
    scheduled = {
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "move_call"
    }
    return any(
        e.HasField("activity_task_completed_event_attributes")
        and e.activity_task_completed_event_attributes.scheduled_event_id in scheduled
        for e in history.events
    )


def test_the_resume_twiml_streams_the_call_back_with_resume() -> None:
    twiml = stream_twiml(
        "wss://rt.example.test/", "call_1", public_url="https://api.example.test/", resume=True
    )
    assert '<Stream url="wss://rt.example.test/media/twilio">' in twiml
    assert '<Parameter name="call_id" value="call_1" />' in twiml
    assert '<Parameter name="resume" value="1" />' in twiml
    # Should this stream end too, Twilio asks the API what next instead of hanging up.
    action = "https://api.example.test/telephony/twilio/stream-ended?call_id=call_1"
    assert f'<Connect action="{action}">' in twiml
