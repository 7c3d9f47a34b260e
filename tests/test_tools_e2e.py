"""Tool calls in phone calls on the whole running platform: the OpenAI emulator asks for
tools, the realtime session has the CallWorkflow run them (Temporal Update), a webhook
receiver on 127.0.0.1 (allowlisted) answers, and the model speaks from the results.

Each test makes its own tools, agent, number and call on one shared stack; the caller is
emulated Twilio sending real-time audio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from e2e import TWILIO_TOKEN, Stack, running_stack
from histories import activities_run
from sqlmodel import Session, col, select
from tools_support import ToolReceiver, set_allowlist

from activities.tools import idempotency_key
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Agent, CallEvent, CallTurn, ToolExecution
from emulators.openai import CallTool, Reply, ScriptRule, ToolInvocation
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone
from realtime.media.mulaw import ulaw_to_pcm16
from realtime.tools import DTMF_FREQUENCIES, PENDING_RESULT

pytestmark = pytest.mark.slow

GREETING = "Hi."
ORDER_QUESTION = "Where's order 1234?"
TWO_ORDERS = "Check two orders."
RESERVE = "Reserve a table."
WAIT = "Actually wait."
IS_IT_DONE = "Is it done?"
EXTENSION = "Dial extension 42."
HOLD = "Hold on."
GOODBYE = "Goodbye."

LOOKING = "Let me check."
RESERVING = (
    "Sure, I am reserving that table for you right now, this can take a little while, "
    "so please bear with me for a few seconds."
)
FILLER = "Let me look."
HOLD_LINE = "Please hold."

LLM_SCRIPT: list[ScriptRule] = [
    Reply(when_after_tool="lookup_order", text="Order: {tool_result}"),
    Reply(when_after_tool="check_availability", text="Found them."),
    Reply(when_after_tool="reserve_table", text="Reserved."),
    Reply(when_after_tool="press_keys", text="Dialed."),
    Reply(when_after_tool="hold_on", text="Thanks."),
    Reply(when_after_tool="hang_up", text="Bye now."),
    CallTool(
        when_last_user_contains="order 1234",
        name="lookup_order",
        arguments={"order": "1234"},
        text=LOOKING,
    ),
    CallTool(
        when_last_user_contains="two orders",
        name="slow_lookup",
        arguments={"order": "1111"},
        parallel=[
            ToolInvocation("slow_lookup", {"order": "2222"}),
            ToolInvocation("check_availability", {"date": "soon"}),
        ],
    ),
    CallTool(
        when_last_user_contains="reserve",
        name="reserve_table",
        arguments={"order": "7777"},
        text=RESERVING,
    ),
    CallTool(when_last_user_contains="extension", name="press_keys", arguments={"digits": "42#"}),
    CallTool(
        when_last_user_contains="hold on", name="hold_on", arguments={"seconds": 9}, text=HOLD_LINE
    ),
    CallTool(when_last_user_contains="goodbye", name="hang_up", arguments={"reason": "done"}),
    Reply(when_last_user_contains="wait", text="Okay, I'm listening."),
    Reply(when_last_user_contains="done", text="Let me see what I know."),
    Reply(text="Sorry, could you say that again?"),
]

ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string", "pattern": "^[0-9]{4}$"}},
    "required": ["order"],
}


@dataclass
class Harness:
    stack: Stack
    receiver: ToolReceiver

    async def tool(self, **body: Any) -> dict[str, Any]:
        response = await self.stack.api.post("/v1/tools", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        if created.get("signing_secret"):
            self.receiver.secret = created["signing_secret"]
        return created

    async def phone(self, asr_script: Sequence[str], tools: Sequence[dict[str, Any]]) -> Phone:
        agent = await self.stack.create_agent(
            name="Front desk",
            first_message=GREETING,
            turn={"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 0},
            tools=[t["id"] for t in tools],
        )
        engine = create_sync_engine(self.stack.settings)
        with Session(engine) as session:
            org_id = (
                session.exec(select(Agent).where(Agent.id == agent["id"])).one().organization_id
            )
        engine.dispose()
        set_allowlist(self.stack.settings, org_id, ["127.0.0.1"])
        number = await self.stack.add_number(agent["id"])
        call_sid, url, call_id = await self.stack.incoming_call(number)
        self.stack.deepgram.script = list(asr_script)
        return Phone(
            call_id,
            url,
            parameters={"call_id": call_id},
            call_sid=call_sid,
            auth_token=TWILIO_TOKEN,
        )

    def rows(self, call_id: str) -> tuple[list[CallTurn], list[ToolExecution], list[CallEvent]]:
        engine = create_sync_engine(self.stack.settings)
        try:
            with Session(engine) as session:
                turns = session.exec(
                    select(CallTurn)
                    .where(CallTurn.call_id == call_id)
                    .order_by(col(CallTurn.index))
                ).all()
                executions = session.exec(
                    select(ToolExecution).where(ToolExecution.call_id == call_id)
                ).all()
                events = session.exec(select(CallEvent).where(CallEvent.call_id == call_id)).all()
                return list(turns), list(executions), list(events)
        finally:
            engine.dispose()

    async def ended(self, call_id: str) -> dict[str, Any]:
        handle = self.stack.temporal.get_workflow_handle(call_id)
        result: dict[str, Any] = await asyncio.wait_for(handle.result(), 20)
        return result


class Phone(TwilioPhone):
    def __init__(self, call_id: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.call_id = call_id


@pytest.fixture(scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    async with (
        ToolReceiver() as receiver,
        running_stack(tmp_path_factory.mktemp("tools"), asr_script=[], llm_script=LLM_SCRIPT) as st,
    ):
        yield Harness(st, receiver)


async def greeted(phone: TwilioPhone) -> None:
    await phone.wait_for_media_after(0, within=8)
    await phone.wait_until_quiet(0.3, within=15)


async def say(phone: TwilioPhone, text: str) -> float:
    utterance = phone.say(caller_speech(text))
    await utterance.done.wait()
    assert utterance.ended_at is not None
    return utterance.ended_at


def tool_messages(messages: list[dict[str, Any]]) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}


async def test_a_webhook_tool_answers_and_the_model_speaks_from_it(harness: Harness) -> None:
    url = harness.receiver.on("/orders", delay_s=0.3, reply={"status": "shipped"})
    tool = await harness.tool(
        name="lookup_order",
        kind="webhook",
        url=url,
        description="Look up an order by its number.",
        parameters=ORDER_SCHEMA,
    )
    phone = await harness.phone([ORDER_QUESTION], [tool])
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        spoke = await say(phone, ORDER_QUESTION)
        await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_until_quiet(0.3, within=15)
    await harness.ended(phone.call_id)

    # The receiver got one signed request with the idempotency key of this tool call.
    (request,) = harness.receiver.to("/orders")
    assert request.signed and request.body["arguments"] == {"order": "1234"}
    tool_call_id = request.body["tool_call_id"]
    assert request.body["call_id"] == phone.call_id
    assert request.key == idempotency_key(phone.call_id, tool_call_id)

    # The model was offered the tool, and got its result back in the next request.
    requests = [r.body for r in harness.stack.openai.chat_requests[before:]]
    offered = requests[0]["tools"]
    assert [t["function"]["name"] for t in offered] == ["lookup_order"]
    assert offered[0]["function"]["parameters"] == ORDER_SCHEMA
    followup = requests[1]["messages"]
    calling = [m for m in followup if m.get("tool_calls")]
    assert calling[-1]["content"] == LOOKING
    assert tool_messages(followup)[tool_call_id] == '{"status":"shipped"}'

    turns, executions, events = harness.rows(phone.call_id)
    agent_turn = turns[-1]
    assert agent_turn.speaker == "agent"
    assert agent_turn.text == f'{LOOKING} Order: {{"status":"shipped"}}'
    assert agent_turn.tool_calls == [
        {
            "id": tool_call_id,
            "name": "lookup_order",
            "arguments": '{"order": "1234"}',
            "ok": True,
            "result": '{"status":"shipped"}',
        }
    ]
    assert [(e.tool_call_id, e.status) for e in executions] == [(tool_call_id, "succeeded")]
    assert [e.data["tool_call_id"] for e in events if e.kind == "tool.called"] == [tool_call_id]

    history = await harness.stack.temporal.get_workflow_handle(phone.call_id).fetch_history()
    updates = [
        e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert updates == ["run_tools"]
    assert "tool.webhook" in activities_run(history, local=True)


async def test_parallel_calls_a_bad_one_and_a_filler_while_they_run(harness: Harness) -> None:
    url = harness.receiver.on("/slow", delay_s=2.0, reply={"status": "packed"})
    slow = await harness.tool(
        name="slow_lookup",
        kind="webhook",
        url=url,
        parameters=ORDER_SCHEMA,
        filler_message=FILLER,
    )
    calendar = (await harness.stack.api.post("/v1/calendars", json={"name": "Desk"})).json()
    availability = await harness.tool(
        name="check_availability",
        kind="check_availability",
        config={"calendar_id": calendar["id"]},
    )
    phone = await harness.phone([TWO_ORDERS], [slow, availability])
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        spoke = await say(phone, TWO_ORDERS)
        await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_until_quiet(0.3, within=15)
    await harness.ended(phone.call_id)

    first, second = harness.receiver.to("/slow")
    assert abs(second.at - first.at) < 0.3  # in parallel
    assert {first.body["arguments"]["order"], second.body["arguments"]["order"]} == {
        "1111",
        "2222",
    }
    # No dead air: the filler plays while the webhooks are still working (2 s).
    filler_at = phone.first_media_after(spoke)
    assert filler_at is not None and first.at + 1.3 < filler_at < first.at + 2.0

    results = tool_messages(harness.stack.openai.chat_requests[before + 1].body["messages"])
    assert [v for v in results.values() if "packed" in v] == ['{"status":"packed"}'] * 2
    (error,) = [json.loads(v)["error"] for v in results.values() if v.startswith('{"error"')]
    assert "Invalid arguments for check_availability" in error and "date" in error

    turns, executions, _ = harness.rows(phone.call_id)
    assert turns[-1].text == f"{FILLER} Found them."
    assert len(turns[-1].tool_calls) == 3
    assert sorted(e.status for e in executions) == ["succeeded", "succeeded"]


async def test_barge_in_during_a_slow_tool_keeps_the_tool_and_its_result(
    harness: Harness,
) -> None:
    url = harness.receiver.on("/reserve", delay_s=3.0, reply={"reserved": True})
    tool = await harness.tool(
        name="reserve_table", kind="webhook", url=url, parameters=ORDER_SCHEMA
    )
    phone = await harness.phone([RESERVE, WAIT, IS_IT_DONE], [tool])
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        spoke = await say(phone, RESERVE)
        talking = await phone.wait_for_media_after(spoke, within=5)
        await asyncio.sleep(max(0.0, talking + 1.0 - asyncio.get_running_loop().time()))
        # The caller cuts in while the agent talks and the tool runs.
        interrupted = await say(phone, WAIT)
        assert [r for r in phone.received if r.event == "clear"], "the agent did not stop"
        await phone.wait_for_media_after(interrupted, within=5)
        await phone.wait_until_quiet(0.3, within=10)
        (request,) = harness.receiver.to("/reserve")
        # After the tool finished (3 s), the caller asks again.
        await asyncio.sleep(max(0.0, request.at + 3.3 - asyncio.get_running_loop().time()))
        asked = await say(phone, IS_IT_DONE)
        await phone.wait_for_media_after(asked, within=5)
        await phone.wait_until_quiet(0.3, within=10)
    await harness.ended(phone.call_id)

    tool_call_id = request.body["tool_call_id"]
    bodies = [r.body["messages"] for r in harness.stack.openai.chat_requests[before:]]
    # The answer to "wait" was asked while the tool still ran: a pending result...
    assert tool_messages(bodies[1])[tool_call_id] == PENDING_RESULT
    # ...and the real result reached the history when it arrived, the barge-in not
    # withstanding: the next request carries it.
    assert tool_messages(bodies[-1])[tool_call_id] == '{"reserved":true}'
    assert len(harness.receiver.to("/reserve")) == 1
    turns, executions, _ = harness.rows(phone.call_id)
    assert [(e.tool_call_id, e.status) for e in executions] == [(tool_call_id, "succeeded")]
    cut = [t for t in turns if t.interrupted]
    assert len(cut) == 1 and cut[0].tool_calls[0]["id"] == tool_call_id
    assert RESERVING.startswith(cut[0].text) and len(cut[0].text) < len(RESERVING)


def dtmf_digits(audio: bytes) -> str:
    """Keys heard in mu-law 8 kHz audio (Goertzel on 40 ms windows)."""
    pcm = ulaw_to_pcm16(audio).astype(np.float64)
    window = 320
    freqs = sorted({f for pair in DTMF_FREQUENCIES.values() for f in pair})
    t = np.arange(window) / 8000
    probes = {f: np.exp(-2j * np.pi * f * t) for f in freqs}
    heard: list[str] = []
    for start in range(0, len(pcm) - window, window // 2):
        chunk = pcm[start : start + window]
        energy = float(np.dot(chunk, chunk)) + 1e-9
        power = {f: abs(np.dot(chunk, p)) ** 2 / (window / 2) for f, p in probes.items()}
        low = max((f for f in freqs if f < 1000), key=lambda f: power[f])
        high = max((f for f in freqs if f > 1000), key=lambda f: power[f])
        digit = None
        if (power[low] + power[high]) / energy > 0.8:
            digit = next(k for k, v in DTMF_FREQUENCIES.items() if v == (low, high))
        if digit and (not heard or heard[-1] != digit):
            heard.append(digit)
        elif not digit and heard and heard[-1] != "-":
            heard.append("-")
    return "".join(heard).replace("-", "")


async def test_call_control_tools_dtmf_hold_and_end_call(harness: Harness) -> None:
    keys = await harness.tool(name="press_keys", kind="send_dtmf")
    hold = await harness.tool(name="hold_on", kind="hold", config={"max_hold_s": 1.5})
    hang_up = await harness.tool(name="hang_up", kind="end_call")
    phone = await harness.phone([EXTENSION, HOLD, GOODBYE], [keys, hold, hang_up])
    async with phone:
        await greeted(phone)
        spoke = await say(phone, EXTENSION)
        dialed = await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_until_quiet(0.3, within=10)
        tones = b"".join(r.payload for r in phone.media_after(dialed))
        assert dtmf_digits(tones).startswith("42#")

        spoke = await say(phone, HOLD)
        await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_until_quiet(1.0, within=10)  # "Sure, please hold." then silence
        hold_ended = await phone.wait_for_media_after(asyncio.get_running_loop().time(), within=5)
        await phone.wait_until_quiet(0.3, within=10)
        said_hold = [r.at for r in phone.media_after(spoke) if r.at < hold_ended]
        assert 1.3 < hold_ended - said_hold[-1] < 2.2  # the hold: 1.5 s, capped by the tool

        spoke = await say(phone, GOODBYE)
        # The model says goodbye, then the platform hangs up.
        await phone.wait_closed_by_server(within=10)
    result = await harness.ended(phone.call_id)
    assert result["ended_reason"] == "agent-hangup"
    turns, executions, _ = harness.rows(phone.call_id)
    assert [t.text for t in turns if t.speaker == "agent"][1:] == [
        "Dialed.",
        f"{HOLD_LINE} Thanks.",
        "Bye now.",
    ]
    assert sorted(e.tool_name for e in executions) == ["hang_up", "hold_on", "press_keys"]
    held = next(e for e in executions if e.tool_name == "hold_on")
    assert held.result is not None and held.result["hold_s"] == 1.5
