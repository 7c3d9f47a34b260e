"""One liveness beat per realtime process (workflows/instances.py, realtime/instance.py)
against CallWorkflows, on the time-skipping server: a process that stops beating gets
its calls moved, a live one keeps them, and commands reach a process's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from test_call_liveness import _make_call, _move_calls

from activities.call_moves import CallMoveActivities
from activities.calls import CallActivities
from builder_engine.calls import EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine
from emulators.twilio_rest import TwilioRestEmulator
from realtime.instance import RealtimeInstance
from realtime.lifecycle import TemporalCallLifecycle
from workers.temporal_worker import build_worker
from workflows.instances import InstanceEnd, SessionStarted, instance_workflow_id
from workflows.transfers import HangUpRequest, HangUpResult
from workflows.types import CallStart


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def _instance_calls(instance: RealtimeInstance, client: Any) -> list[str]:
    handle = client.get_workflow_handle(instance_workflow_id(instance.instance_id))
    calls: list[str] = await handle.query("calls", result_type=list[str])
    return calls


@dataclass
class _Scene:
    """A call's workflow on a worker of its own, and two realtime processes (not started)."""

    client: Client
    start: CallStart
    handle: WorkflowHandle[Any, Any]
    first: RealtimeInstance
    second: RealtimeInstance

    async def answered_on(self, instance: RealtimeInstance, *, session: bool = False) -> None:
        """A session on ``instance`` (registered there with ``session``) says ``answered``;
        returns once the CallWorkflow itself has put the call on that process's list."""
        call_id = self.start.call_id
        if session:
            instance.register(call_id, lambda _: None)
        await self.handle.signal("answered", SessionStarted(instance.instance_id))
        await _eventually(lambda: _in(call_id, lambda: _instance_calls(instance, self.client)))


@contextlib.asynccontextmanager
async def _a_call_and_two_processes(
    env: WorkflowEnvironment,
    db_settings: Settings,
    transport: str,
    *,
    carrier_call_id: str | None = None,
    twilio: Settings | None = None,
) -> AsyncIterator[_Scene]:
    """``twilio``: settings that point the call moves at a Twilio REST emulator."""
    client = env.client
    start = _make_call(db_settings, transport, carrier_call_id=carrier_call_id)
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    moves = CallMoveActivities(calls.sessions, twilio, realtime_url="ws://127.0.0.1:9")
    first = RealtimeInstance(client, task_queue, instance_id=f"a-{uuid.uuid4().hex[:6]}")
    second = RealtimeInstance(client, task_queue, instance_id=f"b-{uuid.uuid4().hex[:6]}")
    try:
        async with build_worker(client, task_queue, calls, moves=moves):
            handle: WorkflowHandle[Any, Any] = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            yield _Scene(client, start, handle, first, second)
    finally:
        await first.aclose()
        await second.aclose()
        await engine.dispose()


async def test_a_dead_process_gets_its_calls_moved_and_a_live_one_keeps_them(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    async with _a_call_and_two_processes(time_skipping_env, db_settings, "web") as scene:
        client, call_id, handle = scene.client, scene.start.call_id, scene.handle
        first, second = scene.first, scene.second
        await first.start()
        await scene.answered_on(first, session=True)
        await asyncio.sleep(2.5)  # beating in real time: nothing happens
        assert await _move_calls(handle) == 0

        await first.aclose()  # the process dies with its call: no more beats
        lost = client.get_workflow_handle(
            instance_workflow_id(first.instance_id), result_type=InstanceEnd
        )
        end = await lost.result()  # skips time until the beats are overdue
        assert end.outcome == "lost" and end.calls == [call_id]
        await _eventually(lambda: _equals(1, lambda: _move_calls(handle)))

        # The web client reconnected to another process, which serves the call now.
        await second.start()
        await scene.answered_on(second)
        await asyncio.sleep(2.5)
        assert await _move_calls(handle) == 1
        await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
        result = await handle.result()
        # The ended call is off the second process's list.
        assert await _instance_calls(second, client) == []
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def test_a_call_the_carrier_streams_again_is_not_moved_a_second_time(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """The process serving a Twilio call dies; Twilio, seeing the stream close, asks the
    API, which streams the call again and tells the workflow (``restreaming``). The dead
    process's loss reaches the call before the new session says ``answered`` (a slow
    reconnection): the call is not moved again - that would cut the new stream."""
    async with _a_call_and_two_processes(
        time_skipping_env, db_settings, "twilio", carrier_call_id=f"CA{uuid.uuid4().hex}"
    ) as scene:
        client, handle, first, second = scene.client, scene.handle, scene.first, scene.second
        await first.start()
        await scene.answered_on(first, session=True)

        await first.aclose()  # killed: its stream closes, Twilio asks the API
        await handle.signal("restreaming")
        lost = client.get_workflow_handle(
            instance_workflow_id(first.instance_id), result_type=InstanceEnd
        )
        assert (await lost.result()).outcome == "lost"
        await _eventually(lambda: _handled(handle, "session_lost"))
        assert await _move_calls(handle) == 0

        await second.start()
        await scene.answered_on(second)
        await asyncio.sleep(2.5)  # beating in real time: nothing happens
        assert await _move_calls(handle) == 0
        await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
        result = await handle.result()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def test_a_call_streamed_again_to_another_live_process_leaves_the_first_s_list(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """The network drops a Twilio call's stream; its process lives on. Twilio streams the
    call again and another process takes it: the call moves to that process's watch list
    and off the first one's, which would otherwise keep it for the process's life."""
    async with _a_call_and_two_processes(
        time_skipping_env, db_settings, "twilio", carrier_call_id=f"CA{uuid.uuid4().hex}"
    ) as scene:
        client, handle, first, second = scene.client, scene.handle, scene.first, scene.second
        await first.start()
        await second.start()
        await scene.answered_on(first)

        await handle.signal("restreaming")
        await scene.answered_on(second)
        await _eventually(lambda: _equals(0, lambda: _count(first, client)))
        assert await _move_calls(handle) == 0
        await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
        result = await handle.result()
        assert await _instance_calls(second, client) == []
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def _count(instance: RealtimeInstance, client: Any) -> int:
    return len(await _instance_calls(instance, client))


async def test_a_session_that_answers_while_the_call_is_being_moved_keeps_it(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """The call's process is lost and the workflow moves the call (a Twilio REST update).
    Twilio redirects the call at once and the new session says ``answered`` before the
    update's own answer is back: the call has arrived, so the workflow does not wait for
    it (a grace timer) and never moves it again."""
    call_sid = f"CA{uuid.uuid4().hex}"
    async with TwilioRestEmulator() as rest:
        rest.update_latency_s = 1.0
        twilio = db_settings.model_copy(
            update={
                "twilio_account_sid": rest.account_sid,
                "twilio_auth_token": SecretStr(rest.auth_token),
                "twilio_api_base_url": rest.url,
            }
        )
        async with _a_call_and_two_processes(
            time_skipping_env, db_settings, "twilio", carrier_call_id=call_sid, twilio=twilio
        ) as scene:
            handle, second = scene.handle, scene.second
            # A process that is gone already: the call is moved at once.
            await handle.signal("answered", SessionStarted(f"gone-{uuid.uuid4().hex[:6]}"))
            async with asyncio.timeout(10):
                while not rest.updates(call_sid):
                    await asyncio.sleep(0.02)
            await second.start()
            await handle.signal("answered", SessionStarted(second.instance_id))
            await _eventually(lambda: _moved(handle), within=15)
            assert await _timers_after_the_move(handle) == [0]
            await asyncio.sleep(2.5)  # the second process beats: nothing happens
            assert await _move_calls(handle) == 1
            await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
            result = await handle.result()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP
    assert len(rest.updates(call_sid)) == 1


async def _moved(handle: WorkflowHandle[Any, Any]) -> bool:
    return bool(await _timers_after_the_move(handle))


async def _timers_after_the_move(handle: WorkflowHandle[Any, Any]) -> list[int]:
    """Once the move has completed and the workflow has acted on it: how many timers it
    started since (empty until then)."""
    completed = acted = False
    timers = 0
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_completed_event_attributes"):
            completed = True
        elif completed and event.HasField("workflow_task_completed_event_attributes"):
            acted = True
        elif completed and event.HasField("timer_started_event_attributes"):
            timers += 1
    return [timers] if acted else []


async def test_a_call_streamed_again_that_no_session_takes_is_moved_after_the_grace(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """``restreaming``, and then no new session says ``answered``: the workflow moves the
    call itself once the grace period is over (it does not wait forever)."""
    async with _a_call_and_two_processes(time_skipping_env, db_settings, "web") as scene:
        handle, first = scene.handle, scene.first
        await first.start()
        await scene.answered_on(first, session=True)
        await first.aclose()
        await handle.signal("restreaming")
        await _eventually(lambda: _handled(handle, "restreaming"))
        await time_skipping_env.sleep(30)  # past the 20 s grace, short of a second
        assert await _move_calls(handle) == 1
        await handle.signal("ended", str(EndedReason.CALLER_HANGUP))
        result = await handle.result()
    assert result["ended_reason"] == EndedReason.CALLER_HANGUP


async def _handled(handle: WorkflowHandle[Any, Any], signal: str) -> bool:
    """The workflow has received ``signal`` and finished a workflow task since."""
    seen = False
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_execution_signaled_event_attributes"):
            seen = seen or event.workflow_execution_signaled_event_attributes.signal_name == signal
        elif seen and event.HasField("workflow_task_completed_event_attributes"):
            return True
    return False


async def test_a_supervisor_hangup_reaches_the_web_session_through_its_process(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    told: list[str] = []
    async with _a_call_and_two_processes(time_skipping_env, db_settings, "web") as scene:
        client, start, handle, instance = scene.client, scene.start, scene.handle, scene.first
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


@pytest.mark.parametrize("lost_after_s", [3.0, 12.0])
async def test_how_long_beats_may_stop_is_the_process_s_own_setting(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings, lost_after_s: float
) -> None:
    """BUILDER_REALTIME_LOST_AFTER_S: the instance workflow declares its process lost
    that long after the last beat (here a process that dies with a call)."""
    client = time_skipping_env.client
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    engine = create_async_db_engine(db_settings)
    instance = RealtimeInstance(
        client, task_queue, instance_id=f"e-{uuid.uuid4().hex[:6]}", lost_after_s=lost_after_s
    )
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            await instance.start()
            instance.register("call_1", lambda _: None)
            await asyncio.sleep(1.5)
            assert instance.beats >= 1
            await instance.aclose()
            handle = client.get_workflow_handle(
                instance_workflow_id(instance.instance_id), result_type=InstanceEnd
            )
            end = await handle.result()  # skips time until the beats are overdue
            beats = [
                event.event_time.ToDatetime()
                async for event in handle.fetch_history_events()
                if event.HasField("workflow_execution_update_completed_event_attributes")
            ]
            ended_at = (await handle.describe()).close_time
    finally:
        await engine.dispose()
    assert end.outcome == "lost"
    assert ended_at is not None
    silent_s = (ended_at.replace(tzinfo=None) - beats[-1]).total_seconds()
    assert lost_after_s <= silent_s < lost_after_s + 1.5


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
