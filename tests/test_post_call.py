"""Post-call processing: the PostCallWorkflow that every CallWorkflow starts as a child.

On a real Temporal dev server with the platform's worker, API and database (SQLite and
PostgreSQL): the recording is checked (a torn WAV header repaired) and streamed with
range requests; the analysis plan runs through the OpenAI-compatible emulator
(non-streaming; the requests carry the transcript and the schema): summary, structured
data validated against the agent's schema (one retry, then the failure is recorded) and
success evaluation; without an LLM it is skipped with the reason; call.ended and
call.analyzed are delivered, signed. Then one call through the whole stack (Twilio
emulator, realtime server, worker) does all of it end to end. S3-compatible storage is
checked against moto's S3 server when boto3 and moto are installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import struct
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e import running_stack
from events_harness import (
    AGENT_CONFIG,
    Platform,
    Receiver,
    allow_loopback,
    create_endpoint,
    dev_server,
    forget_endpoints,
    organization_of,
    running_platform,
    serving,
    verify,
)
from histories import assert_replays_in_sandbox
from ports import free_port
from pydantic import SecretStr
from sqlmodel import Session, select
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.post_call import PostCallActivities, transcript_text
from api.routers.calls import RangeNotSatisfiable, parse_range
from builder_engine import recordings
from builder_engine.calls import EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Call, CallTurn
from emulators.openai import OpenAIEmulator, Reply
from emulators.speech import caller_speech
from workflows.events import WebhookDeliveryWorkflow, WebhookRetry, delivery_workflow_id
from workflows.post_call import PostCallResult, PostCallWorkflow
from workflows.types import CallStart, CommittedTurn, PostCallInput

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "service": {"type": "string", "enum": ["cleaning", "filling", "whitening"]},
        "day": {"type": "string"},
    },
    "required": ["name", "service", "day"],
}
CRITERIA = "The caller booked an appointment."
SUMMARY = "Ann Lee called to book a cleaning and was booked for Tuesday at ten."
ANALYZED_AGENT: dict[str, Any] = {
    **AGENT_CONFIG,
    "analysis": {"summary": True, "structured_data_schema": SCHEMA, "success_criteria": CRITERIA},
}
CONVERSATION = [
    ("agent", "Thanks for calling Acme Dental, how can I help?"),
    ("caller", "Hi, this is Ann Lee, I'd like to book a cleaning."),
    ("agent", "Sure. Tuesday at ten works, shall I book it?"),
    ("caller", "Yes please, Tuesday at ten."),
    ("agent", "Done, you are booked for a cleaning on Tuesday at ten."),
]


def step(body: dict[str, Any]) -> str:
    """Which analysis step a request is (the conversation itself streams)."""
    if body.get("stream"):
        return "conversation"
    json_schema = (body.get("response_format") or {}).get("json_schema") or {}
    return str(json_schema.get("name", "summary"))


def said(body: dict[str, Any], words: str) -> bool:
    return any(words in str(m.get("content")) for m in body["messages"])


LLM_SCRIPT = [
    # Ann's call: the first extraction misses a field, the second validates.
    Reply(
        when=lambda b: step(b) == "structured_data" and said(b, "Ann Lee"),
        times=1,
        text='{"name": "Ann Lee", "service": "cleaning"}',
    ),
    Reply(
        when=lambda b: step(b) == "structured_data" and said(b, "Ann Lee"),
        text='```json\n{"name": "Ann Lee", "service": "cleaning", "day": "Tuesday"}\n```',
    ),
    # Bob's call: never valid.
    Reply(
        when=lambda b: step(b) == "structured_data" and said(b, "Bob"),
        text='{"name": "Bob", "service": "root canal", "day": "Friday"}',
    ),
    Reply(
        when=lambda b: step(b) == "success_evaluation",
        text='{"success": true, "reason": "A cleaning was booked for Tuesday at ten."}',
    ),
    Reply(when=lambda b: step(b) == "summary", text=SUMMARY),
]


@dataclass
class PostCallPlatform:
    platform: Platform
    emulator: OpenAIEmulator
    recordings_dir: Path


@pytest.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    async with dev_server() as env:
        yield env


@pytest.fixture(scope="module")
async def running(
    temporal_env: WorkflowEnvironment, db_settings: Settings
) -> AsyncIterator[PostCallPlatform]:
    async with OpenAIEmulator(LLM_SCRIPT, first_token_latency_ms=20, api_key="sk-post") as emu:
        llm = {"openai_api_key": SecretStr("sk-post"), "openai_base_url": emu.base_url}
        async with running_platform(temporal_env, db_settings, post_call_settings=llm) as platform:
            recordings_dir = platform.settings.effective_recordings_dir
            yield PostCallPlatform(platform, emu, recordings_dir)


@pytest.fixture
async def env(running: PostCallPlatform) -> AsyncIterator[PostCallPlatform]:
    yield running
    await forget_endpoints(running.platform)


def turns(conversation: list[tuple[str, str]]) -> list[CommittedTurn]:
    t0 = datetime.now(UTC)
    return [
        CommittedTurn(
            index=i,
            speaker=speaker,
            text=text,
            interrupted=False,
            started_at=t0 + timedelta(seconds=4 * i),
            ended_at=t0 + timedelta(seconds=4 * i + 3),
            tool_calls=[{"name": "book_appointment", "result": {"ok": True}}] if i == 4 else [],
        )
        for i, (speaker, text) in enumerate(conversation)
    ]


def write_torn_wav(path: Path, seconds: float = 1.0) -> bytes:
    """A stereo 8 kHz WAV whose header still says 0 frames, as a writer killed mid-call
    leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((int(8000 * seconds), 2), dtype="<i2")
    frames[:, 0] = (np.sin(np.arange(len(frames)) / 5) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(frames.tobytes())
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 36)
    data[40:44] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))
    return bytes(data)


async def run_call(
    platform: Platform, start: CallStart, conversation: list[tuple[str, str]]
) -> PostCallResult:
    """The call as the realtime worker reports it, then its post-call child's result."""
    call = await platform.temporal.start_workflow(
        "CallWorkflow", start, id=start.call_id, task_queue=platform.settings.temporal_task_queue
    )
    await call.signal("answered")
    await call.signal("turns_committed", turns(conversation))
    await call.signal("ended", str(EndedReason.CALLER_HANGUP))
    await asyncio.wait_for(call.result(), 20)
    post_call = platform.temporal.get_workflow_handle(
        f"{start.call_id}-post-call", result_type=PostCallResult
    )
    return await asyncio.wait_for(post_call.result(), 30)


def call_row(settings: Settings, call_id: str) -> Call:
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        call = session.exec(select(Call).where(Call.id == call_id)).one()
    engine.dispose()
    return call


# ------------------------------------------------------------------ analysis


async def test_post_call_analyzes_stores_and_delivers(env: PostCallPlatform) -> None:
    platform = env.platform
    async with serving(Receiver()) as receiver:
        endpoint = await create_endpoint(
            platform.api, receiver.url, ["call.ended", "call.analyzed"]
        )
        start = platform.add_call(ANALYZED_AGENT)
        wav = write_torn_wav(env.recordings_dir / f"{start.call_id}.wav")
        before = len(env.emulator.chat_requests)
        result = await run_call(platform, start, CONVERSATION)
        await receiver.wait_for(2)

    # The recording: found, its header repaired, kept in the recordings folder.
    assert result.recording.status == "stored" and result.recording.duration_s == 1.0
    assert result.recording.location == (env.recordings_dir / f"{start.call_id}.wav").as_uri()
    assert result.transcript is not None and result.transcript.complete
    assert result.transcript.turns == len(CONVERSATION) == result.transcript.expected
    assert result.analysis_status == "completed" and len(result.events) == 2

    # The analysis, in the call record.
    detail = (await platform.api.get(f"/v1/calls/{start.call_id}")).json()
    analysis = detail["analysis"]
    assert analysis["status"] == "completed" and analysis["model"] == "gpt-4o-mini"
    assert analysis["summary"] == SUMMARY
    assert analysis["structured_data"] == {
        "name": "Ann Lee",
        "service": "cleaning",
        "day": "Tuesday",
    }
    assert analysis["success_evaluation"] == {
        "success": True,
        "reason": "A cleaning was booked for Tuesday at ten.",
    }
    assert "errors" not in analysis and analysis["transcript"] == {"turns": 5, "complete": True}
    assert detail["recording_url"] == f"/v1/calls/{start.call_id}/recording"

    # What the model was asked: non-streaming, the whole transcript, the agent's schema.
    requests = [r.body for r in env.emulator.chat_requests[before:]]
    assert sorted(step(b) for b in requests) == [
        "structured_data", "structured_data", "success_evaluation", "summary",
    ]  # fmt: skip
    for body in requests:
        assert not body.get("stream") and body["temperature"] == 0
        assert body["model"] == "gpt-4o-mini"
        transcript = body["messages"][1]["content"]
        for speaker, text in CONVERSATION:
            assert f"{speaker.capitalize()}: {text}" in transcript
        assert "book_appointment" in transcript
    extraction = [b for b in requests if step(b) == "structured_data"]
    assert extraction[0]["response_format"]["json_schema"]["schema"] == SCHEMA
    prompt = extraction[0]["messages"][0]["content"]
    assert json.loads(prompt.split("JSON Schema:\n", 1)[1]) == SCHEMA
    # The retry shows the model its invalid answer and why it was refused.
    retry = extraction[1]["messages"]
    assert retry[2] == {
        "role": "assistant",
        "content": '{"name": "Ann Lee", "service": "cleaning"}',
    }
    assert "'day' is a required property" in retry[3]["content"]
    success = next(b for b in requests if step(b) == "success_evaluation")
    assert CRITERIA in success["messages"][0]["content"]
    assert success["response_format"]["json_schema"]["strict"] is True

    # call.ended (with the transcript) and call.analyzed (with the analysis), signed.
    ended, analyzed = (r.json for r in receiver.requests)
    assert [ended["type"], analyzed["type"]] == ["call.ended", "call.analyzed"]
    for request in receiver.requests:
        assert verify(endpoint["secret"], request.body, request.headers["builder-signature"])
    data_call = ended["data"]["call"]
    assert data_call["status"] == "ended" and data_call["ended_reason"] == "caller-hangup"
    assert data_call["ended_at"] and data_call["answered_at"] and data_call["duration_s"] >= 0
    assert data_call["recording_url"] == f"https://x.test/v1/calls/{start.call_id}/recording"
    assert [t["text"] for t in ended["data"]["transcript"]] == [t for _, t in CONVERSATION]
    assert ended["data"]["transcript"][4]["tool_calls"] == [
        {"name": "book_appointment", "result": {"ok": True}}
    ]
    assert ended["data"]["analysis"] is None
    assert analyzed["data"]["analysis"] == analysis and analyzed["data"]["transcript"] is None

    events = (await platform.api.get(f"/v1/calls/{start.call_id}/events")).json()["data"]
    assert [e["type"] for e in events] == ["call.started", "call.ended", "call.analyzed"]
    assert [len(e["webhook_deliveries"]) for e in events] == [0, 1, 1]
    assert all(d["status"] == "delivered" for e in events for d in e["webhook_deliveries"])

    # The recording, streamed (its repaired header is what is served).
    repaired = (env.recordings_dir / f"{start.call_id}.wav").read_bytes()
    assert len(repaired) == len(wav) and repaired[44:] == wav[44:]
    assert struct.unpack("<I", repaired[40:44])[0] == len(wav) - 44
    whole = await platform.api.get(f"/v1/calls/{start.call_id}/recording")
    assert whole.status_code == 200 and whole.content == repaired
    assert whole.headers["content-type"] == "audio/wav"
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(len(repaired))
    size = len(repaired)
    for header, (first, last) in (
        ("bytes=0-43", (0, 43)),
        ("bytes=44-", (44, size - 1)),
        ("bytes=-100", (size - 100, size - 1)),
        ("bytes=100-999999", (100, size - 1)),
    ):
        part = await platform.api.get(
            f"/v1/calls/{start.call_id}/recording", headers={"Range": header}
        )
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.content == repaired[first : last + 1]
    beyond = await platform.api.get(
        f"/v1/calls/{start.call_id}/recording", headers={"Range": f"bytes={size}-"}
    )
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.headers["content-type"] == "application/problem+json"
    ignored = await platform.api.get(
        f"/v1/calls/{start.call_id}/recording", headers={"Range": "bytes=0-1,5-9"}
    )
    assert ignored.status_code == 200 and ignored.content == repaired

    # Another organization sees none of it.
    for path in ("", "/recording", "/events", "/transcript"):
        response = await platform.other.get(f"/v1/calls/{start.call_id}{path}")
        assert response.status_code == 404, path

    # The worker runs these outside the sandbox (workflows/post_call.py); replayed inside
    # it, they are deterministic and make no call it forbids.
    await assert_replays_in_sandbox(
        platform.temporal, f"{start.call_id}-post-call", PostCallWorkflow
    )
    for delivery in (d for e in events for d in e["webhook_deliveries"]):
        delivery_id = delivery_workflow_id(start.call_id, delivery["event_type"], delivery["id"])
        await assert_replays_in_sandbox(platform.temporal, delivery_id, WebhookDeliveryWorkflow)


async def test_invalid_structured_data_is_recorded_not_faked(env: PostCallPlatform) -> None:
    platform = env.platform
    start = platform.add_call(ANALYZED_AGENT)
    conversation = [("agent", "Hello!"), ("caller", "It's Bob, I need a root canal on Friday.")]
    result = await run_call(platform, start, conversation)

    assert result.recording.status == "missing"
    assert result.analysis_status == "partial"
    analysis = call_row(platform.settings, start.call_id).analysis
    assert analysis["structured_data"] is None
    error = analysis["errors"]["structured_data"]
    assert error["status"] == "invalid" and error["attempts"] == 2
    assert "'root canal' is not one of" in error["message"]
    assert error["raw_output"] == '{"name": "Bob", "service": "root canal", "day": "Friday"}'
    assert analysis["summary"] == SUMMARY and analysis["success_evaluation"]["success"] is True
    assert (await platform.api.get(f"/v1/calls/{start.call_id}/recording")).status_code == 404


async def test_analysis_is_skipped_with_a_reason(
    temporal_env: WorkflowEnvironment, env: PostCallPlatform, db_settings: Settings
) -> None:
    # A worker with no LLM (no key, no base URL anywhere): skipped, and says why.
    before = len(env.emulator.requests)
    no_llm = {"openai_api_key": None, "openai_base_url": None}
    async with running_platform(temporal_env, db_settings, post_call_settings=no_llm) as bare:
        assert bare.settings.openai_api_key is None and bare.settings.openai_base_url is None
        start = bare.add_call(ANALYZED_AGENT)
        result = await run_call(bare, start, CONVERSATION)
        nothing_asked = bare.add_call({**AGENT_CONFIG, "analysis": {"summary": False}})
        quiet = await run_call(bare, nothing_asked, CONVERSATION)
    assert result.analysis_status == "skipped"
    analysis = call_row(bare.settings, start.call_id).analysis
    assert analysis == {
        "status": "skipped",
        "reason": "no LLM is configured: set OPENAI_API_KEY, OPENAI_BASE_URL or the agent's "
        "brain.base_url",
        "transcript": {"turns": 5, "complete": True},
    }
    assert quiet.analysis_status == "skipped"
    assert call_row(bare.settings, nothing_asked.call_id).analysis["reason"] == (
        "the agent's analysis plan asks for nothing"
    )
    assert len(env.emulator.requests) == before  # nothing was asked, nothing invented


async def test_an_llm_that_refuses_is_recorded_as_failed(env: PostCallPlatform) -> None:
    platform = env.platform
    # The agent's own endpoint answers 404: not worth retrying, recorded as it is.
    wrong = env.emulator.base_url.replace("/v1", "/v2")
    config = {**AGENT_CONFIG, "brain": {"base_url": wrong}, "analysis": {"summary": True}}
    start = platform.add_call(config)
    result = await run_call(platform, start, CONVERSATION)
    analysis = call_row(platform.settings, start.call_id).analysis
    assert result.analysis_status == "failed" and analysis["summary"] is None
    assert analysis["errors"]["summary"]["status"] == "failed"
    assert f"{wrong} answered 404" in analysis["errors"]["summary"]["message"]


# ------------------------------------------------------------------ pieces


def test_range_header_parsing() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=50-5000", 100) == (50, 99)
    for ignored in ("items=0-9", "bytes=0-1,3-4", "bytes=9-0", "bytes=a-b", "bytes=-", "bytes"):
        assert parse_range(ignored, 100) is None, ignored
    for unsatisfiable in ("bytes=100-", "bytes=-0", "bytes=200-300"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(unsatisfiable, 100)


def test_wav_check_repairs_a_torn_header(tmp_path: Path) -> None:
    path = tmp_path / "torn.wav"
    original = write_torn_wav(path, seconds=0.5)
    info = recordings.check_wav(path)
    assert info.repaired and info.duration_s == 0.5 and info.size_bytes == len(original)
    with wave.open(str(path)) as wav:
        assert wav.getnframes() == 4000
    assert not recordings.check_wav(path).repaired
    (tmp_path / "junk.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError):
        recordings.check_wav(tmp_path / "junk.wav")
    with pytest.raises(ValueError):
        recordings.local_path(tmp_path, "../etc/passwd")


async def test_a_moved_calls_segments_are_joined_into_one_recording(
    env: PostCallPlatform,
) -> None:
    """The call moved to another realtime worker mid-call: two sessions, two segments
    (the first torn by the kill); the post-call workflow serves them as one recording."""
    platform = env.platform
    start = platform.add_call()
    first = write_torn_wav(env.recordings_dir / f"{start.call_id}.wav", seconds=1.0)
    part2 = env.recordings_dir / f"{start.call_id}.part2.wav"
    second = write_torn_wav(part2, seconds=0.5)
    result = await run_call(platform, start, CONVERSATION[:2])

    assert result.recording.status == "stored" and result.recording.duration_s == 1.5
    assert result.recording.location == (env.recordings_dir / f"{start.call_id}.wav").as_uri()
    assert not part2.exists()
    assert not list(env.recordings_dir.glob(f"{start.call_id}.*.wav"))
    whole = await platform.api.get(f"/v1/calls/{start.call_id}/recording")
    assert whole.status_code == 200 and whole.content[:4] == b"RIFF"
    assert whole.content[44:] == first[44:] + second[44:]
    assert struct.unpack("<I", whole.content[40:44])[0] == 12000 * 4


def test_transcript_text_marks_interruptions_and_tools() -> None:
    t0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    call = Call(
        organization_id="org_1",
        agent_id="agt_1",
        agent_version=1,
        direction="outbound",
        ended_reason="agent-hangup",
        answered_at=t0,
        ended_at=t0 + timedelta(seconds=75),
    )
    rows = [
        CallTurn(organization_id="org_1", call_id="c", index=0, speaker="agent",
                 text="We open at nine and", interrupted=True, started_at=t0),
        CallTurn(organization_id="org_1", call_id="c", index=1, speaker="caller",
                 text="Book me in.", started_at=t0 + timedelta(seconds=65),
                 tool_calls=[{"name": "book", "arguments": {"day": "mon"}}]),
    ]  # fmt: skip
    text = transcript_text(call, rows)
    assert text.splitlines() == [
        "Call direction: outbound. Ended: agent-hangup. Duration: 75 s.",
        "",
        "Transcript:",
        "[00:00] Agent: We open at nine and [interrupted by the caller]",
        "[01:05] Caller: Book me in.",
        '    (tool call: {"name": "book", "arguments": {"day": "mon"}})',
    ]


# ------------------------------------------------------------------ S3


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield endpoint
    finally:
        server.stop()


async def test_recordings_go_to_s3_compatible_storage(
    s3_server: str, env: PostCallPlatform
) -> None:
    import boto3  # type: ignore[import-untyped,import-not-found,unused-ignore]

    platform = env.platform
    bucket = f"recordings-{secrets.token_hex(4)}"
    await asyncio.to_thread(boto3.client("s3").create_bucket, Bucket=bucket)
    settings = platform.settings.model_copy(update={"recordings_url": f"s3://{bucket}/calls"})
    start = platform.add_call()
    local = env.recordings_dir / f"{start.call_id}.wav"
    wav = write_torn_wav(local)
    engine = create_async_db_engine(settings)
    activities = PostCallActivities(engine, settings)
    job = PostCallInput(start.call_id, start.organization_id, start.agent_id, 1, "caller-hangup")
    try:
        result = await activities.finalize_recording(job)
        again = await activities.finalize_recording(job)  # a retried attempt
    finally:
        await activities.aclose()
        await engine.dispose()

    assert (
        result.status == "stored" and result.location == f"s3://{bucket}/calls/{start.call_id}.wav"
    )
    assert again.status == "stored" and again.location == result.location
    assert not local.exists()
    stored = await asyncio.to_thread(
        lambda: boto3.client("s3").get_object(Bucket=bucket, Key=f"calls/{start.call_id}.wav")
    )
    body = stored["Body"].read()
    assert stored["ContentType"] == "audio/wav" and body[44:] == wav[44:]
    assert call_row(platform.settings, start.call_id).recording_url == result.location

    # The API streams it from the bucket, ranges included.
    whole = await platform.api.get(f"/v1/calls/{start.call_id}/recording")
    assert whole.status_code == 200 and whole.content == body
    part = await platform.api.get(
        f"/v1/calls/{start.call_id}/recording", headers={"Range": "bytes=40-47"}
    )
    assert part.status_code == 206 and part.content == body[40:48]
    assert part.headers["content-range"] == f"bytes 40-47/{len(body)}"


# ------------------------------------------------------------------ the whole stack

GREETING = "Thanks for calling Acme Dental, how can I help?"


async def post_call_result(
    handle: WorkflowHandle[Any, PostCallResult], *, within: float
) -> PostCallResult:
    """The post-call workflow's result; it starts only when the call's workflow ends."""
    async with asyncio.timeout(within):
        while True:
            try:
                return await handle.result()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.1)


BOOKED = "You are booked for a cleaning on Tuesday at ten."


@pytest.mark.slow
async def test_a_phone_call_ends_with_its_analysis_and_webhooks(tmp_path: Path) -> None:
    async with (
        running_stack(
            tmp_path,
            asr_script=["Hi, this is Ann Lee, I'd like to book a cleaning on Tuesday."],
            llm_script=[*LLM_SCRIPT, Reply(when_last_user_contains="cleaning", text=BOOKED)],
            analysis=True,
            webhook_retry=WebhookRetry(initial_interval_s=1, maximum_interval_s=1, window_s=30),
        ) as stack,
        serving(Receiver(fail_first=1)) as receiver,
    ):
        allow_loopback(stack.settings, organization_of(stack.settings, stack.api_key))
        endpoint = await create_endpoint(stack.api, receiver.url, [])
        agent = await stack.create_agent(
            name="Front desk",
            first_message=GREETING,
            asr={"provider": "deepgram"},
            tts={"provider": "elevenlabs", "voice": "rachel"},
            turn={"endpointing_ms": 200},
            analysis={"structured_data_schema": SCHEMA, "success_criteria": CRITERIA},
            webhook_url=receiver.url,
        )
        number = await stack.add_number(agent["id"])
        call_sid, stream_url, call_id = await stack.incoming_call(number)
        async with stack.phone(stream_url, call_id, call_sid) as phone:
            await phone.wait_for_media_after(0, within=5)
            await phone.wait_until_quiet(0.3, within=10)
            question = phone.say(
                caller_speech("Hi, this is Ann Lee, I'd like to book a cleaning on Tuesday.")
            )
            await question.done.wait()
            assert question.ended_at is not None
            await phone.wait_for_media_after(question.ended_at, within=5)
            await phone.wait_until_quiet(0.3, within=10)

        post_call = stack.temporal.get_workflow_handle(
            f"{call_id}-post-call", result_type=PostCallResult
        )
        result = await post_call_result(post_call, within=60)
        # call.started, call.ended, call.analyzed; the first attempt of call.started fails.
        await receiver.wait_for(4, within=15)

        assert result.recording.status == "stored" and result.analysis_status == "completed"
        call = (await stack.api.get(f"/v1/calls/{call_id}")).json()
        assert call["analysis"]["summary"] == SUMMARY
        assert call["analysis"]["structured_data"]["day"] == "Tuesday"
        assert call["analysis"]["success_evaluation"]["success"] is True
        assert [t["text"] for t in call["turns"]] == [
            GREETING, "Hi, this is Ann Lee, I'd like to book a cleaning on Tuesday.", BOOKED,
        ]  # fmt: skip
        # The agent's webhook_url used the organization's endpoint for that URL (its secret).
        accepted = receiver.accepted()
        assert [r.json["type"] for r in accepted] == ["call.started", "call.ended", "call.analyzed"]
        for request in receiver.requests:
            assert verify(endpoint["secret"], request.body, request.headers["builder-signature"])
        assert accepted[1].json["data"]["transcript"][1]["speaker"] == "caller"
        assert accepted[2].json["data"]["analysis"] == call["analysis"]
        recording = await stack.api.get(
            f"/v1/calls/{call_id}/recording", headers={"Range": "bytes=0-11"}
        )
        assert recording.status_code == 206 and recording.content[:4] == b"RIFF"
        events = (await stack.api.get(f"/v1/calls/{call_id}/events")).json()["data"]
        started = events[0]["webhook_deliveries"][0]
        assert [a["status_code"] for a in started["attempts"]] == [500, 200]
        assert os.path.exists(stack.settings.effective_recordings_dir / f"{call_id}.wav")
