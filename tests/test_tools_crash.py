"""The Temporal worker process dies (kill -9) while a tool runs mid-call - a webhook, a
booking. Another worker takes over when the dead worker's workflow task times out: the
tool completes exactly once - the webhook's receiver acts once for its Idempotency-Key,
the calendar holds one appointment - and its result reaches the conversation: the model
speaks from it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from e2e import PUBLIC_URL, Stack, running_stack
from histories import local_activities
from sqlmodel import Session, col, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from tools_support import ALL_WEEK, ToolReceiver, set_allowlist

from activities.tools import idempotency_key
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Agent, Appointment, CallTurn, ToolExecution
from builder_engine.timeutil import utcnow
from emulators.openai import CallTool, Reply, ScriptRule
from emulators.speech import caller_speech

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Book the big table."
LLM_SCRIPT: list[ScriptRule] = [
    Reply(when_after_tool="book_table", text="Done: {tool_result}"),
    CallTool(when_last_user_contains="book", name="book_table", arguments={"size": 8}),
    Reply(text="Sorry?"),
]
BOOKING = "Book me in tomorrow at ten."
SLOT = (utcnow() + timedelta(days=1)).strftime("%Y-%m-%dT10:00")  # a UTC calendar, open 9-17
BOOKING_SCRIPT: list[ScriptRule] = [
    Reply(when_after_tool="book", text="You are booked."),
    CallTool(when_last_user_contains="book", name="book", arguments={"start": SLOT, "name": "Ada"}),
    Reply(text="Sorry?"),
]


class WorkerProcess:
    """``builder-engine worker`` as its own process, configured by environment."""

    def __init__(self, stack: Stack) -> None:
        settings = stack.settings
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "BUILDER_DATA_DIR": str(settings.data_dir),
            "BUILDER_TEMPORAL_ADDRESS": str(settings.temporal_address),
            "BUILDER_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
            "BUILDER_PUBLIC_URL": PUBLIC_URL,
            "BUILDER_LOG_LEVEL": "warning",
        }
        if settings.database_url:
            self.env["BUILDER_DATABASE_URL"] = settings.database_url
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers.cli",
            "worker",
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            while b"worker ready" not in (line := await self.process.stdout.readline()):
                assert line, "the worker exited before it was ready"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no shutdown, no goodbye to the server

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path, asr_script=[QUESTION], llm_script=LLM_SCRIPT, in_process_worker=False
    ) as running:
        yield running


@pytest.fixture
async def booking_stack(tmp_path: Path, postgres_database: str) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path,
        asr_script=[BOOKING],
        llm_script=BOOKING_SCRIPT,
        database_url=postgres_database,
        in_process_worker=False,
    ) as running:
        yield running


def call_rows(
    stack: Stack, call_id: str
) -> tuple[list[ToolExecution], list[CallTurn], list[Appointment]]:
    """The call's tool executions, turns (in order) and appointments."""
    engine = create_sync_engine(stack.settings)
    with Session(engine) as session:
        executions = session.exec(select(ToolExecution).where(ToolExecution.call_id == call_id))
        turns = session.exec(
            select(CallTurn).where(CallTurn.call_id == call_id).order_by(col(CallTurn.index))
        )
        booked = session.exec(select(Appointment).where(Appointment.call_id == call_id))
        rows = (list(executions.all()), list(turns.all()), list(booked.all()))
    engine.dispose()
    return rows


def timed_out_tasks(history: WorkflowHistory) -> int:
    timed_out = EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT
    return sum(1 for e in history.events if e.event_type == timed_out)


async def test_a_worker_killed_mid_tool_and_the_tool_still_runs_once(stack: Stack) -> None:
    first, second = WorkerProcess(stack), WorkerProcess(stack)
    async with ToolReceiver() as receiver:
        gate = asyncio.Event()
        url = receiver.on("/book", hold=gate, reply={"booked": "table 7"})
        try:
            await first.start()
            created = await stack.api.post(
                "/v1/tools",
                json={
                    "name": "book_table",
                    "kind": "webhook",
                    "url": url,
                    "timeout_s": 5,
                    "parameters": {
                        "type": "object",
                        "properties": {"size": {"type": "integer", "minimum": 1}},
                    },
                },
            )
            assert created.status_code == 201, created.text
            receiver.secret = created.json()["signing_secret"]
            agent = await stack.create_agent(
                name="Bookings",
                first_message="Hi.",
                turn={"endpointing_ms": 200},
                tools=[created.json()["id"]],
            )
            engine = create_sync_engine(stack.settings)
            with Session(engine) as session:
                org_id = session.exec(select(Agent).where(Agent.id == agent["id"])).one()
            engine.dispose()
            set_allowlist(stack.settings, org_id.organization_id, ["127.0.0.1"])
            number = await stack.add_number(agent["id"])
            call_sid, stream_url, call_id = await stack.incoming_call(number)

            async with stack.phone(stream_url, call_id, call_sid) as phone:
                await phone.wait_for_media_after(0, within=10)
                await phone.wait_until_quiet(0.3, within=10)
                utterance = phone.say(caller_speech(QUESTION))
                await utterance.done.wait()
                # The tool's request is in; the worker running it dies before the answer.
                await asyncio.wait_for(receiver.arrived.wait(), 10)
                first.kill()
                killed_at = asyncio.get_running_loop().time()
                await first.process.wait()  # type: ignore[union-attr]
                gate.set()  # the receiver acts on the request nobody waits for any more
                await second.start()
                # The model speaks from the result (after a filler line meanwhile).
                async with asyncio.timeout(30):
                    while not receiver.effects or len(receiver.to("/book")) < 2:
                        await asyncio.sleep(0.05)
                answered_after = receiver.to("/book")[-1].at
                spoken = await phone.wait_for_media_after(answered_after + 0.2, within=10)
                await phone.wait_until_quiet(0.3, within=10)
                print(f"killed -> answer audio: {spoken - killed_at:.1f} s")

            handle = stack.temporal.get_workflow_handle(call_id)
            result = await asyncio.wait_for(handle.result(), 20)
            assert result["status"] == "ended"
            history = await handle.fetch_history()
        finally:
            await first.stop()
            await second.stop()

    # The receiver saw the request twice (the retry from the new worker), with one key,
    # and acted once.
    requests = receiver.to("/book")
    tool_call_id = requests[0].body["tool_call_id"]
    assert len(requests) == 2 and all(r.signed for r in requests)
    assert {r.key for r in requests} == {idempotency_key(call_id, tool_call_id)}
    assert receiver.effects == {requests[0].key: 1}

    # One execution, finished; the model got the result; the transcript has it.
    executions, turns, _ = call_rows(stack, call_id)
    assert [(e.tool_call_id, e.status) for e in executions] == [(tool_call_id, "succeeded")]
    followup = stack.openai.chat_requests[-1].body["messages"]
    assert followup[-1] == {
        "role": "tool",
        "tool_call_id": tool_call_id,
        "content": '{"booked":"table 7"}',
    }
    last = turns[-1]
    assert last.speaker == "agent" and last.text.endswith('Done: {"booked":"table 7"}')
    assert last.tool_calls[0]["result"] == '{"booked":"table 7"}'

    # The history tells it: the workflow task running the tool (a local activity) timed
    # out with its worker; the next one, on the new worker, recorded the tool once.
    assert timed_out_tasks(history) >= 1
    tools_recorded = [
        e
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
        and b"tool.webhook" in e.marker_recorded_event_attributes.details["data"].payloads[0].data
    ]
    assert len(tools_recorded) == 1


async def booking_waits_for_lock(database_url: str) -> None:
    """Until PostgreSQL says a booking's insert waits for a lock. (Asked on a connection
    of its own: within a transaction, pg_stat_activity is a snapshot.)"""
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watcher,
        asyncio.timeout(20),
    ):
        while True:
            waiting = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO appointment%'"
            )
            row = await waiting.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.05)


async def test_a_worker_killed_mid_booking_and_the_slot_is_booked_once(
    booking_stack: Stack, postgres_database: str
) -> None:
    stack = booking_stack
    first, second = WorkerProcess(stack), WorkerProcess(stack)
    lock = await psycopg.AsyncConnection.connect(postgres_database, autocommit=True)
    try:
        await first.start()
        calendar = await stack.api.post(
            "/v1/calendars", json={"name": "Desk", "timezone": "UTC", "availability": ALL_WEEK}
        )
        assert calendar.status_code == 201, calendar.text
        created = await stack.api.post(
            "/v1/tools",
            json={
                "name": "book",
                "kind": "book_appointment",
                "config": {"calendar_id": calendar.json()["id"]},
                "timeout_s": 10,
            },
        )
        assert created.status_code == 201, created.text
        agent = await stack.create_agent(
            name="Bookings",
            first_message="Hi.",
            turn={"endpointing_ms": 200},
            tools=[created.json()["id"]],
        )
        number = await stack.add_number(agent["id"])
        call_sid, stream_url, call_id = await stack.incoming_call(number)

        async with stack.phone(stream_url, call_id, call_sid) as phone:
            await phone.wait_for_media_after(0, within=10)
            await phone.wait_until_quiet(0.3, within=10)
            # The test holds the appointments: the booking will wait mid-transaction.
            await lock.execute("BEGIN")
            await lock.execute("LOCK TABLE appointment IN EXCLUSIVE MODE")
            utterance = phone.say(caller_speech(BOOKING))
            await utterance.done.wait()
            await booking_waits_for_lock(postgres_database)
            first.kill()  # the worker dies in the middle of the booking
            killed_at = asyncio.get_running_loop().time()
            await first.process.wait()  # type: ignore[union-attr]
            await lock.execute("ROLLBACK")
            await second.start()
            # The model speaks from the result (after a filler line meanwhile).
            async with asyncio.timeout(30):
                while stack.openai.chat_requests[-1].body["messages"][-1]["role"] != "tool":
                    await asyncio.sleep(0.05)
            result_at = asyncio.get_running_loop().time()
            answered = await phone.wait_for_media_after(result_at, within=15)
            await phone.wait_until_quiet(0.3, within=10)
            print(f"killed -> answer audio: {answered - killed_at:.1f} s")

        handle = stack.temporal.get_workflow_handle(call_id)
        assert (await asyncio.wait_for(handle.result(), 20))["status"] == "ended"
        history = await handle.fetch_history()
    finally:
        await lock.close()
        await first.stop()
        await second.stop()

    executions, turns, booked = call_rows(stack, call_id)
    # One appointment, one finished execution, under the tool call's key.
    ((execution_id, status),) = [(e.tool_call_id, e.status) for e in executions]
    assert status == "succeeded"
    assert [(a.idempotency_key, a.attendee_name) for a in booked] == [
        (f"{call_id}:{execution_id}", "Ada")
    ]
    result = stack.openai.chat_requests[-1].body["messages"][-1]
    assert result["role"] == "tool" and json.loads(result["content"])["booked"] is True
    assert turns[-1].speaker == "agent" and turns[-1].text.endswith("You are booked.")
    # The history: the dead worker's task timed out, the booking recorded once.
    assert timed_out_tasks(history) >= 1
    markers = [
        m for m in local_activities(history) if m["activity_type"] == "tool.book_appointment"
    ]
    assert len(markers) == 1
