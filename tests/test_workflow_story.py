"""``temporal workflow show`` tells the story of a call.

A real phone call with one webhook tool call runs on the whole stack (tests/e2e.py: the
Temporal dev server, the worker, the API, the realtime server and the vendor emulators).
Then the real Temporal CLI - what an operator types - reads the call's workflow back: the
history reads like the call (started with its search attributes, answered, turns, the
``run_tools`` update and the tool's activity by name, the turns saved, ended, the
post-call workflow started), no payload in it holds a secret, and the call is found by
its search attributes. docs/temporal-ui.md walks through the same output.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e import TWILIO_TOKEN, Stack, running_stack
from histories import assert_replays_in_sandbox
from pydantic import SecretStr
from sqlmodel import Session, select
from tools_support import ToolReceiver, set_allowlist

from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Agent
from conftest import installed_binary
from emulators.openai import CallTool, Reply, ScriptRule
from emulators.speech import caller_speech
from workflows.call import CallWorkflow

pytestmark = pytest.mark.slow

#: The name the histories of this call are recorded under (BUILDER_RECORD_HISTORIES).
RECORDED_AS = "call-with-a-tool"
GREETING = "Hi, this is the order desk."
QUESTION = "Where's order 1234?"
LOOKING = "Let me check."
LLM_SCRIPT: list[ScriptRule] = [
    Reply(when_after_tool="lookup_order", text="It is {tool_result}."),
    CallTool(
        when_last_user_contains="order 1234",
        name="lookup_order",
        arguments={"order": "1234"},
        text=LOOKING,
    ),
    Reply(text="Sorry?"),
]
ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "string", "pattern": "^[0-9]{4}$"}},
    "required": ["order"],
}


# ------------------------------------------------------------------ reading the CLI


async def temporal(stack: Stack, *args: str) -> str:
    """The Temporal CLI against the stack's dev server; its standard output."""
    process = await asyncio.create_subprocess_exec(
        installed_binary("temporal"),
        *args,
        "--address",
        str(stack.settings.temporal_address),
        "--namespace",
        stack.settings.temporal_namespace,
        "--color",
        "never",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"temporal {' '.join(args)}: {err.decode()}"
    return out.decode()


@dataclass(frozen=True)
class Payload:
    """A payload of the history, decoded: what the server stores and the UI shows."""

    where: str  # its path: ".events[0].workflowExecutionStartedEventAttributes.input..."
    metadata: dict[str, str]
    data: str


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", errors="replace")
    except binascii.Error:
        return text


def payloads(node: Any, where: str = "") -> Iterator[Payload]:
    """Every payload in the CLI's JSON (``{"metadata": {...}, "data": "<base64>"}``)."""
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and set(node) <= {"metadata", "data"}:
            yield Payload(
                where,
                {k: _b64(v) for k, v in node["metadata"].items()},
                _b64(node.get("data", "")),
            )
            return
        for key, value in node.items():
            yield from payloads(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from payloads(value, f"{where}[{i}]")


def attributes(event: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(v for k, v in event.items() if k.endswith("EventAttributes"))
    return found


def decoded(payload: dict[str, Any]) -> Any:
    (one,) = payloads(payload)
    return json.loads(one.data)


def story(events: Sequence[dict[str, Any]]) -> list[str]:
    """The history as one line per step that means something for the call."""
    lines: list[str] = []
    for event in events:
        kind = event["eventType"].removeprefix("EVENT_TYPE_")
        attrs = attributes(event)
        summary = event.get("userMetadata", {}).get("summary")
        named = f" ({decoded(summary)})" if summary else ""
        if kind == "WORKFLOW_EXECUTION_STARTED":
            lines.append(f"started {attrs['workflowType']['name']}")
        elif kind == "WORKFLOW_EXECUTION_SIGNALED":
            lines.append(f"signal {attrs['signalName']}")
        elif kind == "WORKFLOW_EXECUTION_UPDATE_ACCEPTED":
            lines.append(f"update {attrs['acceptedRequest']['input']['name']}")
        elif kind == "WORKFLOW_EXECUTION_UPDATE_COMPLETED":
            lines.append("update completed")
        elif kind == "ACTIVITY_TASK_SCHEDULED":
            lines.append(f"activity {attrs['activityType']['name']}{named}")
        elif kind == "MARKER_RECORDED" and attrs["markerName"] == "core_local_activity":
            data = decoded({"payloads": attrs["details"]["data"]["payloads"]})
            lines.append(f"local activity {data['activity_type']}{named}")
        elif kind == "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES":
            fields = attrs["searchAttributes"]["indexedFields"]
            lines.extend(f"search attribute {k}={decoded(v)}" for k, v in sorted(fields.items()))
        elif kind == "START_CHILD_WORKFLOW_EXECUTION_INITIATED":
            lines.append(f"child {attrs['workflowType']['name']} {attrs['workflowId']}{named}")
        elif kind == "CHILD_WORKFLOW_EXECUTION_STARTED":
            lines.append(f"child started {attrs['workflowType']['name']}")
        elif kind == "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED":
            lines.append(f"signal out {attrs['signalName']}")
        elif kind == "WORKFLOW_TASK_COMPLETED":
            lines.append("task completed")
        elif kind == "WORKFLOW_EXECUTION_COMPLETED":
            lines.append("completed")
    return lines


def in_order(lines: Sequence[str], expected: Sequence[str]) -> list[int]:
    """Where each expected line is, in order (each one after the previous)."""
    at: list[int] = []
    start = 0
    for want in expected:
        found = next((i for i in range(start, len(lines)) if lines[i] == want), None)
        assert found is not None, f"{want!r} not after {lines[start - 1 if start else 0]!r}:\n" + (
            "\n".join(lines)
        )
        at.append(found)
        start = found + 1
    return at


def secrets_of(stack: Stack, *more: str) -> dict[str, str]:
    """Every secret the stack knows: the settings' secrets, keys and tokens, the org API key."""
    found = {
        name: value.get_secret_value()
        for name, value in stack.settings
        if isinstance(value, SecretStr) and value.get_secret_value()
    }
    found |= {
        "organization API key": stack.api_key,
        "twilio auth token": TWILIO_TOKEN,
        "openai emulator key": str(stack.openai.api_key),
        "deepgram emulator key": stack.deepgram.api_key,
        "elevenlabs emulator key": stack.elevenlabs.api_key,
    }
    found |= {f"secret {i}": value for i, value in enumerate(more)}
    assert all(len(v) >= 8 for v in found.values()), found  # long enough to mean something
    return found


def leaks(texts: dict[str, str], secrets: dict[str, str]) -> list[str]:
    return [
        f"{name} in {where}"
        for where, text in texts.items()
        for name, secret in secrets.items()
        if secret in text
    ]


# ------------------------------------------------------------------ the call


async def make_call(stack: Stack, receiver: ToolReceiver) -> tuple[str, str, str]:
    """A call where the caller asks for an order and the agent looks it up (webhook
    tool); the caller hangs up. Returns (call id, agent id, the tool's signing secret)."""
    created = await stack.api.post(
        "/v1/tools",
        json={
            "name": "lookup_order",
            "kind": "webhook",
            "url": receiver.on("/orders", reply={"status": "shipped"}),
            "description": "Look up an order by its number.",
            "parameters": ORDER_SCHEMA,
        },
    )
    assert created.status_code == 201, created.text
    tool = created.json()
    receiver.secret = tool["signing_secret"]
    agent = await stack.create_agent(
        name="Order desk",
        first_message=GREETING,
        turn={"endpointing_ms": 200},
        tools=[tool["id"]],
    )
    engine = create_sync_engine(stack.settings)
    with Session(engine) as session:
        organization_id = session.exec(select(Agent).where(Agent.id == agent["id"])).one()
    engine.dispose()
    set_allowlist(stack.settings, organization_id.organization_id, ["127.0.0.1"])
    number = await stack.add_number(agent["id"])
    call_sid, stream_url, call_id = await stack.incoming_call(number)
    async with stack.phone(stream_url, call_id, call_sid) as phone:
        await phone.wait_for_media_after(0, within=10)
        await phone.wait_until_quiet(0.3, within=15)
        utterance = phone.say(caller_speech(QUESTION))
        await utterance.done.wait()
        assert utterance.ended_at is not None
        await phone.wait_for_media_after(utterance.ended_at, within=5)
        await phone.wait_until_quiet(0.3, within=15)
    # The caller hung up; the call's workflow ends, the post-call workflow finishes.
    await asyncio.wait_for(stack.temporal.get_workflow_handle(call_id).result(), 20)
    await asyncio.wait_for(stack.temporal.get_workflow_handle(f"{call_id}-post-call").result(), 30)
    assert len(receiver.to("/orders")) == 1
    return call_id, agent["id"], str(tool["signing_secret"])


async def found_by(stack: Stack, query: str) -> list[str]:
    """Workflow ids ``temporal workflow list --query`` finds (visibility lags a little)."""
    ids: list[str] = []
    for _ in range(50):
        listed = await temporal(stack, "workflow", "list", "--query", query, "--output", "json")
        ids = [w["execution"]["workflowId"] for w in json.loads(listed or "[]")]
        if ids:
            break
        await asyncio.sleep(0.2)
    return ids


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    async with running_stack(
        tmp_path_factory.mktemp("story"), asr_script=[QUESTION], llm_script=LLM_SCRIPT
    ) as running:
        yield running


async def test_temporal_workflow_show_tells_the_story_of_a_call(
    stack: Stack, tmp_path: Path
) -> None:
    async with ToolReceiver() as receiver:
        call_id, agent_id, signing_secret = await make_call(stack, receiver)

    shown = await temporal(stack, "workflow", "show", "--workflow-id", call_id, "--output", "json")
    table = await temporal(stack, "workflow", "show", "--workflow-id", call_id)
    detailed = await temporal(stack, "workflow", "show", "--workflow-id", call_id, "--detailed")
    post_call = await temporal(
        stack, "workflow", "show", "--workflow-id", f"{call_id}-post-call", "--output", "json"
    )
    outputs = {
        "show.json": shown,
        "show.txt": table,
        "detailed.txt": detailed,
        "post-call.json": post_call,
    }
    for name, text in outputs.items():
        (tmp_path / name).write_text(text)
    print(f"temporal workflow show outputs: {tmp_path}")
    if record := os.environ.get("BUILDER_RECORD_HISTORIES"):
        # New fixtures for tests/test_replay.py (docs/ARCHITECTURE.md, "Changing a workflow").
        folder, day = Path(record), f"{datetime.date.today():%Y%m%d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{RECORDED_AS}-{day}.json").write_text(shown)
        (folder / f"{RECORDED_AS}-post-call-{day}.json").write_text(post_call)
    events: list[dict[str, Any]] = json.loads(shown)["events"]
    lines = story(events)

    # Started with the search attributes that find it.
    first = attributes(events[0])
    assert first["workflowType"]["name"] == "CallWorkflow"
    assert first["workflowId"] == call_id
    indexed = {k: decoded(v) for k, v in first["searchAttributes"]["indexedFields"].items()}
    assert indexed == {
        "BuilderCallStatus": "ringing",
        "BuilderAgentId": agent_id,
        "BuilderDirection": "inbound",
    }
    start_input = decoded(first["input"])
    assert start_input["call_id"] == call_id and start_input["agent_id"] == agent_id

    # The call, step by step.
    at = in_order(
        lines,
        [
            "started CallWorkflow",
            "signal answered",
            "search attribute BuilderCallStatus=in-progress",
            "local activity record_call_status",
            "local activity record_call_event (call.started)",
            "signal turns_committed",  # the greeting
            "update run_tools",
            "local activity load_call_tools (load the agent's tools)",
            "local activity tool.webhook (lookup_order (webhook))",
            "update completed",
            "signal turns_committed",  # the question and its answer, heard
            "search attribute BuilderCallStatus=ended",
            "local activity record_call_status",
            "search attribute BuilderEndedReason=caller-hangup",
            "child PostCallWorkflow "
            f"{call_id}-post-call "
            "(recording, transcript check, analysis, call.ended + call.analyzed)",
            "child started PostCallWorkflow",
            "completed",
        ],
    )
    # The turns are saved as their batches arrive and the tool's call event is
    # recorded after the tool ran, before the call's end is recorded; "ended" comes
    # from the realtime side when the caller hangs up.
    tool_done, status_ended = at[9], at[11]
    for step in (
        "local activity save_call_turns",
        "local activity record_call_event (tool.called)",
        "signal ended",
    ):
        assert step in lines[tool_done:status_ended], step
    # On the realtime process's watch list once answered, off it in the workflow task that
    # records the end: the signal's answer comes back with the post-call child's start.
    answered, ended = lines.index("signal answered"), lines.index("signal ended")
    assert lines.count("signal out call_started") == 1
    assert lines.index("signal out call_started") > answered
    leaving = lines.index("signal out call_ended")
    recorded = lines.index("local activity record_call_status", ended)
    assert leaving > ended and "task completed" not in lines[leaving:recorded]
    assert lines.count("update run_tools") == 1
    assert lines.count("local activity tool.webhook (lookup_order (webhook))") == 1
    assert lines.count("signal ended") == 1
    # Three turns (greeting; question and answer): a signal per exchange, not per turn.
    assert lines.count("signal turns_committed") == 2

    # The paperwork after the call, in its own workflow.
    in_order(
        story(json.loads(post_call)["events"]),
        [
            "started PostCallWorkflow",
            "activity finalize_recording",
            "local activity check_transcript",
            "local activity record_call_event (call.ended)",
            "local activity plan_call_analysis",
            "local activity save_call_analysis",
            "local activity record_call_event (call.analyzed)",
            "completed",
        ],
    )

    # What the model asked for (the Update's input) and what it got (the local
    # activity's result); no URL, no secret (below).
    (asked,) = [
        decoded({"payloads": attributes(e)["acceptedRequest"]["input"]["args"]["payloads"]})
        for e in events
        if e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED"
    ]
    assert [(c["name"], json.loads(c["arguments"])) for c in asked["calls"]] == [
        ("lookup_order", {"order": "1234"})
    ]
    (outcome,) = [
        decoded({"payloads": attributes(e)["details"]["result"]["payloads"]})
        for e in events
        if e["eventType"] == "EVENT_TYPE_MARKER_RECORDED"
        and decoded({"payloads": attributes(e)["details"]["data"]["payloads"]})["activity_type"]
        == "tool.webhook"
    ]
    assert outcome["ok"] and json.loads(outcome["content"]) == {"status": "shipped"}

    # The plain text is a table of event types; --detailed names every step.
    for kind in (
        "WorkflowExecutionStarted",
        "WorkflowExecutionSignaled",
        "WorkflowExecutionUpdateAccepted",
        "MarkerRecorded",
        "StartChildWorkflowExecutionInitiated",
        "ChildWorkflowExecutionStarted",
        "WorkflowExecutionCompleted",
    ):
        assert kind in table, kind
    for line in (
        "signalName: answered",
        "signalName: turns_committed",
        "signalName: ended",
        "acceptedRequest.input.name: run_tools",
        "details.data[0].activity_type: tool.webhook",
        "userMetadata.summary: lookup_order (webhook)",
        "details.data[0].activity_type: save_call_turns",
        "details.data[0].activity_type: record_call_status",
        "workflowType.name: PostCallWorkflow",
    ):
        assert line in detailed, line

    # No secret anywhere: not in the JSON, not in any payload (decoded), not in the text
    # the CLI prints (which decodes them too) - the post-call workflow's history included.
    secrets = secrets_of(stack, signing_secret)
    texts = {"show --output json": shown, "show": table, "show --detailed": detailed}
    texts["post-call show --output json"] = post_call
    for where, raw in (("call", shown), ("post-call", post_call)):
        found = list(payloads(json.loads(raw)))
        texts |= {f"{where} payload {p.where}": p.data + json.dumps(p.metadata) for p in found}
    # (The scan reads the payloads: the tool's arguments are in one of them.)
    assert any('"order":"1234"' in t.replace(" ", "") for t in texts.values())
    assert leaks(texts, secrets) == []

    # Found by its search attributes.
    assert call_id in await found_by(stack, f'BuilderAgentId="{agent_id}"')
    query = (
        f'BuilderAgentId="{agent_id}" AND BuilderCallStatus="ended" '
        'AND BuilderEndedReason="caller-hangup" AND BuilderDirection="inbound"'
    )
    assert await found_by(stack, query) == [call_id]

    # The worker runs the call's workflow outside the sandbox (workflows/call.py);
    # replayed inside it, the whole call's history is deterministic and makes no call
    # the sandbox forbids (the clock, randomness, I/O outside the workflow API).
    await assert_replays_in_sandbox(stack.temporal, call_id, CallWorkflow)
