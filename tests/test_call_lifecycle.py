"""The realtime lifecycle hears when the call's workflow ends the call or has closed, on a
real Temporal dev server: an ``end`` command through the process's instance workflow,
and a closed workflow (completed with an ended reason, or terminated) found by the
process's periodic check, are reported once through the session's callback; a workflow
that does not exist yet, or one that continued as new, is no end. Signals to a closed
workflow are dropped at once (no retries holding up the session's teardown).

The workflow here is a stand-in with the CallWorkflow's signal names and result type
(the real one needs the database and activities; tests/test_call_control.py runs it
end to end with a supervisor's hang-up)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from events_harness import dev_server
from temporalio import workflow
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from builder_engine.calls import EndedReason
from realtime.instance import RealtimeInstance
from realtime.lifecycle import TemporalCallLifecycle
from workflows.instances import (
    RealtimeInstanceWorkflow,
    SessionCommand,
    SessionStarted,
    instance_workflow_id,
)
from workflows.types import CallState, CommittedTurn

CHECK_S = 0.3


@workflow.defn(name="LifecycleProbe")
class LifecycleProbe:
    """Counts ``answered`` signals; ``close`` ends it with a reason (as a CallWorkflow ends),
    ``renew`` makes it continue as new."""

    def __init__(self) -> None:
        self._beats = 0
        self._closed: str | None = None
        self._renew = False
        self._batches: list[list[str]] = []
        self._ended_by: str | None = None

    @workflow.run
    async def run(self, runs: int) -> CallState:
        await workflow.wait_condition(lambda: self._closed is not None or self._renew)
        if self._closed is None:
            workflow.continue_as_new(runs + 1)
        return CallState(status="ended", turns_committed=0, ended_reason=self._closed)

    @workflow.signal
    def answered(self, session: SessionStarted | None = None) -> None:
        self._beats += 1

    @workflow.signal
    def turns_committed(self, turns: list[CommittedTurn]) -> None:
        self._batches.append([t.text for t in turns])

    @workflow.signal
    def ended(self, reason: str, instance_id: str | None = None) -> None:
        self._closed = self._closed or reason
        self._ended_by = instance_id

    @workflow.query
    def ended_by(self) -> str | None:
        return self._ended_by

    @workflow.signal
    def close(self, reason: str) -> None:
        self._closed = reason

    @workflow.signal
    def renew(self) -> None:
        self._renew = True

    @workflow.query
    def beats(self) -> int:
        return self._beats

    @workflow.query
    def batches(self) -> list[list[str]]:
        """The turns of each ``turns_committed`` signal, by text."""
        return self._batches


@dataclass
class Temporal:
    client: Client
    task_queue: str
    instance: RealtimeInstance

    async def start(self, call_id: str) -> None:
        await self.client.start_workflow(
            "LifecycleProbe", 1, id=call_id, task_queue=self.task_queue
        )

    async def beats(self, call_id: str) -> int:
        count: int = await self.client.get_workflow_handle(call_id).query("beats")
        return count


@pytest.fixture(scope="module")
async def temporal() -> AsyncIterator[Temporal]:
    env: WorkflowEnvironment
    async with dev_server() as env:
        queue = f"lifecycle-{secrets.token_hex(4)}"
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[LifecycleProbe, RealtimeInstanceWorkflow],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ):
            instance = RealtimeInstance(env.client, queue, closed_check_s=CHECK_S)
            await instance.start()
            try:
                yield Temporal(env.client, queue, instance)
            finally:
                await instance.aclose()


class Told:
    """The session's side: what the lifecycle reported, and when."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = asyncio.Event()
        self.at = 0.0

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.at = asyncio.get_running_loop().time()
        self.event.set()


def call_id() -> str:
    return f"call_{secrets.token_hex(8)}"


def lifecycle_tasks(call: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if call in t.get_name() and not t.done()]


async def beats_arrive(temporal: Temporal, call: str, more_than: int = 0) -> int:
    async with asyncio.timeout(5):
        while (count := await temporal.beats(call)) <= more_than:
            await asyncio.sleep(0.05)
    return count


async def test_a_closed_workflow_ends_the_session_once_with_its_reason(
    temporal: Temporal,
) -> None:
    call = call_id()
    await temporal.start(call)
    told = Told()
    lifecycle = TemporalCallLifecycle(temporal.client, call, instance=temporal.instance)
    lifecycle.on_workflow_closed(told)
    lifecycle.answered()
    await beats_arrive(temporal, call)

    loop = asyncio.get_running_loop()
    await temporal.client.get_workflow_handle(call).signal("close", "supervisor-hangup")
    closed_at = loop.time()
    await asyncio.wait_for(told.event.wait(), 3)
    print(f"workflow closed -> session told: {told.at - closed_at:.2f} s")
    assert told.reasons == ["supervisor-hangup"]
    assert told.at - closed_at < CHECK_S + 1.5
    assert lifecycle.workflow_closed == "supervisor-hangup"

    # The session ends: its last turn and its end go nowhere, at once, and nothing of
    # the lifecycle is left running.
    lifecycle.commit_turn(CommittedTurn(index=3, speaker="agent", text="So-", interrupted=True))
    lifecycle.ended("supervisor-hangup")
    started = loop.time()
    await lifecycle.aclose()
    assert loop.time() - started < 0.5
    assert told.reasons == ["supervisor-hangup"]
    assert lifecycle_tasks(call) == []


async def test_a_terminated_workflow_ends_the_session_as_failed(temporal: Temporal) -> None:
    call = call_id()
    await temporal.start(call)
    told = Told()
    lifecycle = TemporalCallLifecycle(
        temporal.client, call, instance=temporal.instance, on_workflow_closed=told
    )
    lifecycle.answered()
    await beats_arrive(temporal, call)
    await temporal.client.get_workflow_handle(call).terminate(reason="operator")
    await asyncio.wait_for(told.event.wait(), 3)
    assert told.reasons == [EndedReason.FAILED]
    lifecycle.ended(EndedReason.FAILED)
    await lifecycle.aclose()
    assert lifecycle_tasks(call) == []


async def test_the_session_that_ended_itself_is_not_told(temporal: Temporal) -> None:
    call = call_id()
    await temporal.start(call)
    told = Told()
    lifecycle = TemporalCallLifecycle(
        temporal.client, call, instance=temporal.instance, on_workflow_closed=told
    )
    lifecycle.answered()
    await beats_arrive(temporal, call)
    lifecycle.ended(EndedReason.CALLER_HANGUP)
    await lifecycle.aclose()
    handle = temporal.client.get_workflow_handle(call, result_type=CallState)
    result = await handle.result()
    assert result.ended_reason == EndedReason.CALLER_HANGUP
    assert told.reasons == [] and lifecycle.workflow_closed is None
    # The end names the process whose session ended (a moved call ignores a stale one).
    assert await handle.query("ended_by") == temporal.instance.instance_id


async def test_continue_as_new_and_a_workflow_not_started_yet_are_no_end(
    temporal: Temporal,
) -> None:
    # A long call's workflow continues as new: its closed first run is no end.
    call = call_id()
    await temporal.start(call)
    told = Told()
    lifecycle = TemporalCallLifecycle(
        temporal.client, call, instance=temporal.instance, on_workflow_closed=told
    )
    lifecycle.answered()
    await beats_arrive(temporal, call)
    handle = temporal.client.get_workflow_handle(call)
    for _ in range(3):
        await handle.signal("renew")
        lifecycle.answered()  # a signal to the latest run (its count starts at 0)
        await beats_arrive(temporal, call)
    await asyncio.sleep(3 * CHECK_S)  # the process's closed check ran meanwhile
    assert told.reasons == []

    # A session whose workflow is not there (yet): NOT_FOUND, but no end.
    early = call_id()
    told_early = Told()
    waiting = TemporalCallLifecycle(
        temporal.client, early, instance=temporal.instance, on_workflow_closed=told_early
    )
    waiting.answered()
    await asyncio.sleep(1.0)
    await temporal.start(early)
    await beats_arrive(temporal, early)
    assert told_early.reasons == [] and waiting.workflow_closed is None

    for lc, cid in ((lifecycle, call), (waiting, early)):
        lc.ended(EndedReason.CALLER_HANGUP)
        await lc.aclose()
        assert lifecycle_tasks(cid) == []
    assert told.reasons == [] and told_early.reasons == []


async def test_an_end_command_through_the_process_ends_the_session(temporal: Temporal) -> None:
    """What a CallWorkflow does for a supervisor's hang-up of a web call."""
    call = call_id()
    await temporal.start(call)
    told = Told()
    lifecycle = TemporalCallLifecycle(
        temporal.client, call, instance=temporal.instance, on_workflow_closed=told
    )
    lifecycle.answered()
    await beats_arrive(temporal, call)
    loop = asyncio.get_running_loop()
    process = temporal.client.get_workflow_handle(
        instance_workflow_id(temporal.instance.instance_id)
    )
    await process.signal("send_command", SessionCommand(call, "end", "supervisor-hangup"))
    sent_at = loop.time()
    await asyncio.wait_for(told.event.wait(), 3)
    print(f"command sent -> session told: {told.at - sent_at:.2f} s")
    assert told.reasons == ["supervisor-hangup"]
    lifecycle.ended("supervisor-hangup")
    await lifecycle.aclose()
    result = await temporal.client.get_workflow_handle(call, result_type=CallState).result()
    assert result.ended_reason == "supervisor-hangup"
    assert lifecycle_tasks(call) == []


def turn(index: int, speaker: str) -> CommittedTurn:
    return CommittedTurn(index=index, speaker=speaker, text=f"{speaker} {index}")


async def test_turns_travel_by_exchange(temporal: Temporal) -> None:
    """A caller's turn waits for the answer (one signal per exchange); one that gets no
    answer goes on its own after the batch window; the end takes waiting turns first."""
    call = call_id()
    await temporal.start(call)
    lifecycle = TemporalCallLifecycle(temporal.client, call, batch_delay_s=0.5)
    handle = temporal.client.get_workflow_handle(call)
    loop = asyncio.get_running_loop()

    async def batches(count: int) -> list[list[str]]:
        async with asyncio.timeout(5):
            while len(found := await handle.query("batches")) < count:
                await asyncio.sleep(0.02)
        return list(found)

    lifecycle.commit_turn(turn(0, "agent"))  # the greeting: goes at once
    assert await batches(1) == [["agent 0"]]
    lifecycle.commit_turn(turn(1, "caller"))
    await asyncio.sleep(0.2)
    lifecycle.commit_turn(turn(2, "agent"))
    assert await batches(2) == [["agent 0"], ["caller 1", "agent 2"]]

    held_at = loop.time()
    lifecycle.commit_turn(turn(3, "caller"))  # no answer: the window sends it
    assert (await batches(3))[-1] == ["caller 3"]
    assert 0.45 <= loop.time() - held_at < 1.5

    lifecycle.commit_turn(turn(4, "caller"))  # the caller hangs up before the answer
    lifecycle.ended(EndedReason.CALLER_HANGUP)
    await lifecycle.aclose()
    assert (await batches(4))[-1] == ["caller 4"]
    result = await temporal.client.get_workflow_handle(call, result_type=CallState).result()
    assert result.ended_reason == EndedReason.CALLER_HANGUP
    assert lifecycle_tasks(call) == []
