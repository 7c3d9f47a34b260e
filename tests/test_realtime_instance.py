"""One liveness beat per realtime process (workflows/instances.py, realtime/instance.py)
against CallWorkflows, on the time-skipping server: a process that stops beating gets
its calls moved, a live one keeps them, and commands reach a process's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from test_call_liveness import _make_call, _move_calls

from activities.call_moves import CallMoveActivities
from activities.calls import CallActivities
from builder_engine.calls import EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine
from realtime.instance import RealtimeInstance
from realtime.lifecycle import TemporalCallLifecycle
from workers.temporal_worker import build_worker
from workflows.instances import InstanceEnd, SessionStarted, instance_workflow_id
from workflows.transfers import HangUpRequest, HangUpResult


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def _instance_calls(instance: RealtimeInstance, client: Any) -> list[str]:
    handle = client.get_workflow_handle(instance_workflow_id(instance.instance_id))
    calls: list[str] = await handle.query("calls", result_type=list[str])
    return calls


async def test_a_dead_process_gets_its_calls_moved_and_a_live_one_keeps_them(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    first = RealtimeInstance(client, task_queue, instance_id=f"a-{uuid.uuid4().hex[:6]}")
    second = RealtimeInstance(client, task_queue, instance_id=f"b-{uuid.uuid4().hex[:6]}")
    try:
        async with build_worker(
            client, task_queue, calls, moves=CallMoveActivities(calls.sessions, None)
        ):
            handle: WorkflowHandle[Any, Any] = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            await first.start()
            first.register(start.call_id, lambda _: None)
            await handle.signal("answered", SessionStarted(first.instance_id))
            # The CallWorkflow itself puts the call on the process's list.
            await _eventually(lambda: _in(start.call_id, lambda: _instance_calls(first, client)))
            await asyncio.sleep(2.5)  # beating in real time: nothing happens
            assert await _move_calls(handle) == 0

            await first.aclose()  # the process dies with its call: no more beats
            lost = client.get_workflow_handle(
                instance_workflow_id(first.instance_id), result_type=InstanceEnd
            )
            end = await lost.result()  # skips time until the beats are overdue
            assert end.outcome == "lost" and end.calls == [start.call_id]
            await _eventually(lambda: _equals(1, lambda: _move_calls(handle)))

            # The web client reconnected to another process, which serves the call now.
            await second.start()
            await handle.signal("answered", SessionStarted(second.instance_id))
            await _eventually(lambda: _in(start.call_id, lambda: _instance_calls(second, client)))
            await asyncio.sleep(2.5)
            assert await _move_calls(handle) == 1
            await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
            result = await handle.result()
            # The ended call is off the second process's list.
            assert await _instance_calls(second, client) == []
    finally:
        await second.aclose()
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def test_a_supervisor_hangup_reaches_the_web_session_through_its_process(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    client = time_skipping_env.client
    start = _make_call(db_settings, "web")
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    instance = RealtimeInstance(client, task_queue, instance_id=f"c-{uuid.uuid4().hex[:6]}")
    told: list[str] = []
    try:
        async with build_worker(client, task_queue, calls):
            handle: WorkflowHandle[Any, Any] = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            await instance.start()
            lifecycle = TemporalCallLifecycle(
                client, start.call_id, instance=instance, on_workflow_closed=told.append
            )
            lifecycle.answered()
            await _eventually(lambda: _in(start.call_id, lambda: _instance_calls(instance, client)))
            hangup = asyncio.create_task(
                handle.execute_update(
                    "supervisor_hangup",
                    HangUpRequest(start.call_id, start.organization_id),
                    result_type=HangUpResult,
                )
            )
            await _eventually(lambda: _truthy(told), within=5)
            assert told == [EndedReason.SUPERVISOR_HANGUP]
            # The session ends the call the way it ends any call: its last signals go.
            lifecycle.ended(told[0])
            await lifecycle.aclose()
            assert (await hangup).status == "ended"
            result = await handle.result()
    finally:
        await instance.aclose()
        await engine.dispose()
    assert result["ended_reason"] == EndedReason.SUPERVISOR_HANGUP


async def test_a_process_that_stops_with_no_calls_is_not_lost(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    client = time_skipping_env.client
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    engine = create_async_db_engine(db_settings)
    instance = RealtimeInstance(client, task_queue, instance_id=f"d-{uuid.uuid4().hex[:6]}")
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            await instance.start()
            await asyncio.sleep(1.5)
            assert instance.beats >= 1
            await instance.aclose()
            handle = client.get_workflow_handle(
                instance_workflow_id(instance.instance_id), result_type=InstanceEnd
            )
            end = await handle.result()
    finally:
        await engine.dispose()
    assert end.outcome == "stopped"


async def _in(item: str, get: Callable[[], Awaitable[list[str]]]) -> bool:
    return item in await get()


async def _equals(expected: int, get: Callable[[], Awaitable[int]]) -> bool:
    return await get() == expected


async def _truthy(values: list[str]) -> bool:
    return bool(values)


async def test_an_instance_continues_as_new_with_its_calls(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """A process beats for hours: its workflow continues as new and keeps its calls and
    the commands not yet delivered."""
    from workflows.instances import HISTORY_LIMIT, InstanceStart, SessionCommand

    client = time_skipping_env.client
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    engine = create_async_db_engine(db_settings)
    workflow_id = instance_workflow_id(f"e-{uuid.uuid4().hex[:6]}")
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            handle = await client.start_workflow(
                "RealtimeInstanceWorkflow",
                InstanceStart(workflow_id),
                id=workflow_id,
                task_queue=task_queue,
            )
            first_run = handle.first_execution_run_id or handle.result_run_id
            for call in ("call_a", "call_b", "call_c"):
                await handle.signal("call_started", call)
            await handle.signal("call_ended", "call_b")
            beats = HISTORY_LIMIT // 2
            for i in range(beats):
                if i == beats - 5:
                    await handle.signal("send_command", SessionCommand("call_c", "end", "x"))
                with contextlib.suppress(RPCError):  # the instant of a continue-as-new
                    await handle.execute_update("beat", result_type=list[SessionCommand])
            latest = client.get_workflow_handle(workflow_id)
            calls_now = await latest.query("calls", result_type=list[str])
            description = await latest.describe()
            await latest.signal("call_ended", "call_a")
            await latest.signal("call_ended", "call_c")
            await latest.signal("stopping")
    finally:
        await engine.dispose()
    assert description.run_id != first_run  # it continued as new at least once
    assert calls_now == ["call_a", "call_c"]


async def test_a_cancelled_update_stops_its_task(time_skipping_env: WorkflowEnvironment) -> None:
    """temporalio reports an Update call cancelled in flight as an ordinary exception (the
    one a timed-out long poll raises), which loops that ask again used to swallow: with
    nobody answering (no worker here), a process's beat outlived its shutdown and a tool
    call its timeout. Both stop now."""
    from workflows.tools import ToolBatch, ToolInvocation

    client = time_skipping_env.client
    task_queue = f"nobody-{uuid.uuid4().hex[:6]}"
    instance = RealtimeInstance(client, task_queue, instance_id=f"f-{uuid.uuid4().hex[:6]}")
    await instance.start()
    await asyncio.sleep(1.0)  # the first beat waits for an answer that never comes
    assert instance.beats == 0
    closing = asyncio.create_task(instance.aclose())
    await asyncio.wait({closing}, timeout=5)
    assert closing.done()

    call_id = f"call_{uuid.uuid4().hex[:8]}"
    await client.start_workflow("CallWorkflow", id=call_id, task_queue=task_queue)
    lifecycle = TemporalCallLifecycle(client, call_id)
    batch = ToolBatch([ToolInvocation("call_1", "check_availability", "{}")])
    asking = asyncio.create_task(lifecycle.run_tools(batch, timeout_s=0.5))
    await asyncio.wait({asking}, timeout=5)
    assert asking.done() and isinstance(asking.exception(), TimeoutError)
    await lifecycle.aclose()
