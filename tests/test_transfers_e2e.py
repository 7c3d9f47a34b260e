"""Transfers and supervisor call control on the whole running platform, against the
Twilio REST emulator (real wire protocol, driven by the real ``twilio`` SDK).

When the platform changes the caller's call (new TwiML, Status=completed), the emulator
ends that call's media stream as Twilio does (the emulated phone sends ``stop``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from e2e import TWILIO_TOKEN, running_stack
from sqlmodel import Session, select
from test_tools_e2e import Harness, Phone, greeted, say, tool_messages
from tools_support import ToolReceiver

from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import CallEvent
from emulators.openai import CallTool, Reply, ScriptRule
from emulators.twilio_rest import EmulatedCall, TwilioRestEmulator

pytestmark = pytest.mark.slow

DESK = "+15550001111"
NOBODY = "+15550002222"
SUPERVISOR_TARGET = "+15550003333"
TRANSFER_ME = "Transfer me please."
NOBODY_ANSWERS = "Get me sales."
WARM = "Get me the front desk."
NO_ANSWER_LINE = "Sorry, nobody answered."

SCRIPT: list[ScriptRule] = [
    Reply(when_after_tool="to_sales", text=NO_ANSWER_LINE),
    Reply(when_after_tool="to_desk", text="Connected."),
    Reply(when_after_tool="warm_desk", text="Connected."),
    CallTool(
        when_last_user_contains="transfer me",
        name="to_desk",
        arguments={"summary": "Caller wants the front desk."},
        text="Transferring you.",
    ),
    CallTool(
        when_last_user_contains="front desk",
        name="warm_desk",
        arguments={"summary": "Caller wants the front desk."},
    ),
    CallTool(when_last_user_contains="sales", name="to_sales", arguments={}),
    Reply(text="Sure."),
]


class Control:
    def __init__(self, harness: Harness, rest: TwilioRestEmulator) -> None:
        self.harness = harness
        self.rest = rest
        self.phones: dict[str, Phone] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        rest.on_change = self._changed

    def _changed(self, call: EmulatedCall, form: dict[str, str]) -> None:
        phone = self.phones.get(call.sid)
        if phone is not None and (form.get("Twiml") or form.get("Status")):
            task = asyncio.get_running_loop().create_task(phone.hang_up())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def phone(self, asr: list[str], tools: list[dict[str, Any]]) -> Phone:
        phone = await self.harness.phone(asr, tools)
        self.phones[phone.call_sid] = phone
        return phone

    def events(self, call_id: str) -> list[CallEvent]:
        engine = create_sync_engine(self.harness.stack.settings)
        try:
            with Session(engine) as session:
                return list(session.exec(select(CallEvent).where(CallEvent.call_id == call_id)))
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
async def control(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Control]:
    async with (
        TwilioRestEmulator(auth_token=TWILIO_TOKEN) as rest,
        ToolReceiver() as receiver,
        running_stack(
            tmp_path_factory.mktemp("transfers"),
            asr_script=[],
            llm_script=SCRIPT,
            twilio_rest=(rest.url, rest.account_sid),
        ) as stack,
    ):
        yield Control(Harness(stack, receiver), rest)


def dial_of(form: dict[str, str]) -> str:
    return form.get("Twiml", "")


async def test_cold_transfer_by_the_tool(control: Control) -> None:
    tool = await control.harness.tool(
        name="to_desk", kind="transfer_call", config={"destination": DESK, "mode": "cold"}
    )
    phone = await control.phone([TRANSFER_ME], [tool])
    async with phone:
        await greeted(phone)
        await say(phone, TRANSFER_ME)
        await phone.wait_closed_by_server(within=10)
    result = await control.harness.ended(phone.call_id)
    assert result["ended_reason"] == "transferred"
    (update,) = control.rest.updates(phone.call_sid)
    assert f'<Dial timeout="20"><Number>{DESK}</Number></Dial>' in dial_of(update)
    assert control.rest.created() == []
    (event,) = [e for e in control.events(phone.call_id) if e.kind == "call.transferred"]
    assert event.data["to"] == DESK and event.data["mode"] == "cold"
    assert event.data["requested_by"] == "tool"


async def test_cold_transfer_by_a_supervisor_and_tenant_isolation(control: Control) -> None:
    stack = control.harness.stack
    phone = await control.phone([], [])
    async with phone:
        await greeted(phone)
        # Another organization cannot see or touch the call.
        from builder_engine.apikeys import create_org_api_key

        other = create_org_api_key(stack.settings, "other-org")
        headers = {"Authorization": f"Bearer {other}"}
        for action in ("transfer", "hangup"):
            refused = await stack.api.post(
                f"/v1/calls/{phone.call_id}/{action}",
                json={"to": SUPERVISOR_TARGET},
                headers=headers,
            )
            assert refused.status_code == 404, refused.text
        response = await stack.api.post(
            f"/v1/calls/{phone.call_id}/transfer", json={"to": SUPERVISOR_TARGET, "mode": "cold"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "transferred"
        await phone.wait_closed_by_server(within=10)
    result = await control.harness.ended(phone.call_id)
    assert result["ended_reason"] == "transferred"
    (update,) = control.rest.updates(phone.call_sid)
    assert f"<Number>{SUPERVISOR_TARGET}</Number>" in dial_of(update)
    (event,) = [e for e in control.events(phone.call_id) if e.kind == "call.transferred"]
    assert event.data["requested_by"] == "supervisor"
    # Over: 409 for both actions.
    for action in ("transfer", "hangup"):
        late = await stack.api.post(
            f"/v1/calls/{phone.call_id}/{action}", json={"to": SUPERVISOR_TARGET}
        )
        assert late.status_code == 409, late.text


async def test_warm_transfer_answered_bridges_the_legs(control: Control) -> None:
    control.rest.fate(DESK, "answered", after_ms=400)
    tool = await control.harness.tool(
        name="warm_desk",
        kind="transfer_call",
        config={"destination": DESK, "mode": "warm", "ring_timeout_s": 10},
    )
    phone = await control.phone([WARM], [tool])
    async with phone:
        await greeted(phone)
        await say(phone, WARM)
        await phone.wait_closed_by_server(within=15)
    result = await control.harness.ended(phone.call_id)
    assert result["ended_reason"] == "transferred"
    (leg,) = [c for c in control.rest.created() if c.to == DESK]
    assert leg.status == "in-progress"  # bridged: not hung up by the platform
    room = f"transfer-{phone.call_id}-"
    assert "Caller wants the front desk." in leg.twimls[0] and room in leg.twimls[0]
    (update,) = control.rest.updates(phone.call_sid)
    assert "<Conference" in dial_of(update) and room in dial_of(update)
    (event,) = [e for e in control.events(phone.call_id) if e.kind == "call.transferred"]
    assert event.data["mode"] == "warm" and event.data["leg_call_sid"] == leg.sid


async def test_warm_transfer_nobody_answers_and_the_call_goes_on(control: Control) -> None:
    control.rest.fate(NOBODY, "no-answer")
    tool = await control.harness.tool(
        name="to_sales",
        kind="transfer_call",
        config={"destination": NOBODY, "mode": "warm", "ring_timeout_s": 5},
        timeout_s=30,
    )
    phone = await control.phone([NOBODY_ANSWERS], [tool])
    before = len(control.harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        spoke = await say(phone, NOBODY_ANSWERS)
        # The model speaks again once the ring timeout (5 s) has passed.
        await phone.wait_for_media_after(spoke + 4.5, within=15)
        await phone.wait_until_quiet(0.3, within=10)
        assert not phone.closed.is_set()
        # The supervisor ends the call.
        response = await control.harness.stack.api.post(f"/v1/calls/{phone.call_id}/hangup")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "hung-up"
        await phone.wait_closed_by_server(within=10)
    result = await control.harness.ended(phone.call_id)
    assert result["ended_reason"] == "supervisor-hangup"
    (leg,) = [c for c in control.rest.created() if c.to == NOBODY]
    assert leg.status in ("no-answer", "canceled")
    assert control.rest.updates(phone.call_sid) == [{"Status": "completed"}]
    results = tool_messages(control.harness.stack.openai.chat_requests[-1].body["messages"])
    (content,) = results.values()
    assert json.loads(content)["transferred"] is False
    turns, _, _ = control.harness.rows(phone.call_id)
    assert turns[-1].text.endswith(NO_ANSWER_LINE)
    assert len(control.harness.stack.openai.chat_requests) > before
    assert not [e for e in control.events(phone.call_id) if e.kind == "call.transferred"]
