"""The Temporal worker process dies (kill -9) while a webhook tool runs mid-call. Another
worker takes over when the dead worker's workflow task times out: the tool completes
exactly once - the receiver acts once for its Idempotency-Key - and its result reaches
the conversation: the model speaks from it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from e2e import PUBLIC_URL, Stack, running_stack
from sqlmodel import Session, col, select
from temporalio.api.enums.v1 import EventType
from tools_support import ToolReceiver, set_allowlist

from activities.tools import idempotency_key
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Agent, CallTurn, ToolExecution
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
    engine = create_sync_engine(stack.settings)
    with Session(engine) as session:
        executions = session.exec(
            select(ToolExecution).where(ToolExecution.call_id == call_id)
        ).all()
        turns = session.exec(
            select(CallTurn).where(CallTurn.call_id == call_id).order_by(col(CallTurn.index))
        ).all()
    engine.dispose()
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
    kinds = [EventType.Name(e.event_type) for e in history.events]
    assert "EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT" in kinds
    tools_recorded = [
        e
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
        and b"tool.webhook" in e.marker_recorded_event_attributes.details["data"].payloads[0].data
    ]
    assert len(tools_recorded) == 1
