"""Bad input on /media/twilio and failing providers, against the whole running platform.

Every kind of garbage a Media Streams socket can carry is dropped with a logged reason
while the call goes on (and a second call next to it never notices); streams that cannot
be tied to a call are closed; a dropped, stalled or hopelessly broken stream ends its call
with the reason the call record then shows. A failing language model or speech recognizer
ends the call with a spoken apology rather than dead air, and a configured fallback model
answers instead of a failing one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import e2e
import httpx
import pytest
from e2e import Stack, running_stack
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from builder_engine.config import Settings
from emulators.openai import Fail, Reply
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone, stream_headers
from emulators.twiml import read_twiml
from realtime.app import create_app as create_realtime
from realtime.calls import ProviderFactory
from realtime.resume import RESUME_LINE
from realtime.session import APOLOGY, CallSession
from realtime.transports.twilio import TwilioMediaHandler
from realtime.transports.web import WebMediaHandler

pytestmark = pytest.mark.slow

QUESTION = "What are your opening hours?"
HOURS = "We are open from nine to five, Monday to Friday."
BACKUP_HOURS = "The backup model says: nine to five."
GREETING = "Hello, Acme Dental."
LONG_GREETING = (
    "Hello and welcome to Acme Dental. We offer cleanings, fillings, crowns and whitening, "
    "and our hygienists see patients every weekday from nine to five."
)
SILENCE = b"\xff" * 160  # 20 ms of mu-law silence


@dataclass
class Harness:
    stack: Stack
    twilio: TwilioMediaHandler  # the realtime server's handler (its timeouts are settable)
    web: WebMediaHandler

    async def call(self, **agent: Any) -> tuple[str, str, str]:
        """A new agent, number and incoming call: (call sid, stream URL, call id)."""
        config: dict[str, Any] = {
            "name": "Robust desk",
            "first_message": GREETING,
            "turn": {"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 0},
            **agent,
        }
        created = await self.stack.create_agent(**config)
        number = await self.stack.add_number(created["id"])
        return await self.stack.incoming_call(number)

    async def ended_call(self, call_id: str) -> dict[str, Any]:
        """The call record once its CallWorkflow has completed."""
        handle = self.stack.temporal.get_workflow_handle(call_id)
        result = await asyncio.wait_for(handle.result(), 20)
        assert result["status"] == "ended"
        call: dict[str, Any] = (await self.stack.api.get(f"/v1/calls/{call_id}")).json()
        assert call["status"] == "ended"
        assert call["ended_reason"] == result["ended_reason"]
        return call

    @contextmanager
    def timeouts(self, **values: float) -> Iterator[None]:
        """Shorter transport timeouts for one test (the defaults are 10-15 s)."""
        saved = {name: getattr(self.twilio, name) for name in values}
        for name, value in values.items():
            setattr(self.twilio, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self.twilio, name, value)


@pytest.fixture(scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    apps: list[FastAPI] = []

    def capture(settings: Settings, *, providers: ProviderFactory | None = None) -> FastAPI:
        app = create_realtime(settings, providers=providers)
        apps.append(app)
        return app

    # running_stack builds the realtime app itself; keep a reference to reach its handler.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(e2e, "create_realtime", capture)
        async with running_stack(
            tmp_path_factory.mktemp("robustness"),
            # Every caller of this module asks the same question.
            asr_script=[QUESTION] * 20,
            llm_script=[
                Fail(when_model="broken-model"),
                Reply(when_model="backup-model", text=BACKUP_HOURS),
                Reply(when_last_user_contains="hours", text=HOURS),
            ],
        ) as stack:
            context = apps[0].state.context
            yield Harness(stack, context.twilio, context.web)


class RawStream:
    """A bare Media Streams client that sends exactly what the test says."""

    def __init__(self, url: str, *, auth_token: str | None = e2e.TWILIO_TOKEN) -> None:
        """``auth_token``: sign the handshake as Twilio does (None: unsigned)."""
        self.url = url
        self.auth_token = auth_token
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.received: list[dict[str, Any]] = []
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def ws(self) -> ClientConnection:
        assert self._ws is not None
        return self._ws

    async def __aenter__(self) -> Self:
        self._ws = await connect(
            self.url,
            max_size=2**20,
            compression=None,
            additional_headers=stream_headers(self.url, self.auth_token),
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.received.append(json.loads(message))
        except ConnectionClosed:
            pass

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def start(self, call_id: str | None, call_sid: str | None = None) -> None:
        params = {"call_id": call_id} if call_id is not None else {}
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(start_message(self.stream_sid, call_sid or "CA" + "1" * 32, params))

    async def media(self, frames: int) -> None:
        """``frames`` of silence at real time, as the carrier sends them."""
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for n in range(frames):
            await asyncio.sleep(max(0.0, begin + n * 0.02 - loop.time()))
            await self.send(media_message(self.stream_sid, SILENCE))

    async def closed_by_server(self, within: float) -> int | None:
        """Waits until the server has closed the socket; its close code."""
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), within)
        await asyncio.wait_for(self.ws.wait_closed(), within)
        return self.ws.close_code

    def agent_audio(self) -> int:
        return sum(1 for m in self.received if m.get("event") == "media")


def start_message(stream_sid: str, call_sid: str, params: dict[str, str]) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "streamSid": stream_sid,
            "accountSid": "AC" + "0" * 32,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


def media_message(stream_sid: str, audio: bytes) -> dict[str, Any]:
    payload = base64.b64encode(audio).decode()
    return {
        "event": "media",
        "streamSid": stream_sid,
        "media": {"track": "inbound", "payload": payload},
    }


def garbage(stream_sid: str, call_sid: str) -> list[tuple[str, str | bytes]]:
    """(what the reason logged for it mentions, the message) - each one must be dropped."""
    audio = base64.b64encode(SILENCE).decode()
    other = "MZ" + "0" * 32
    return [
        ("malformed JSON", "{not json"),
        ("malformed JSON", "\x00\x01\x02 not even close"),
        ("not a JSON object", "[1, 2, 3]"),
        ("no 'event'", "{}"),
        ("no 'event'", json.dumps({"event": 42})),
        ("unknown event", json.dumps({"event": "bogus", "streamSid": stream_sid})),
        (
            "not valid base64",
            json.dumps(
                {"event": "media", "streamSid": stream_sid, "media": {"payload": "%%not base64%%"}}
            ),
        ),
        (
            "payload is missing",
            json.dumps({"event": "media", "streamSid": stream_sid, "media": {}}),
        ),
        ("'media' is missing", json.dumps({"event": "media", "streamSid": stream_sid})),
        ("streamSid is missing", json.dumps({"event": "media", "media": {"payload": audio}})),
        (
            "another stream",
            json.dumps({"event": "media", "streamSid": other, "media": {"payload": audio}}),
        ),
        (
            "exceeds",
            json.dumps(
                {"event": "media", "streamSid": stream_sid, "media": {"payload": "A" * 100_000}}
            ),
        ),
        (
            "not a DTMF digit",
            json.dumps({"event": "dtmf", "streamSid": stream_sid, "dtmf": {"digit": "X"}}),
        ),
        ("mark.name", json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {}})),
        # A stop for some other stream must not hang up this call.
        (
            "another stream",
            json.dumps({"event": "stop", "streamSid": other, "stop": {"callSid": call_sid}}),
        ),
        ("binary", b"\x00\x01\x02\x03binary"),
    ]


async def ask(phone: TwilioPhone, text: str = QUESTION) -> float:
    """The caller asks; returns when the answer's first audio arrived (after the question)."""
    question = phone.say(caller_speech(text))
    await question.done.wait()
    assert question.ended_at is not None
    answered = await phone.wait_for_media_after(question.ended_at, within=8)
    await phone.wait_until_quiet(0.3, within=15)
    return answered


async def greeted(phone: TwilioPhone) -> None:
    await phone.wait_for_media_after(0, within=8)
    await phone.wait_until_quiet(0.3, within=15)


# ---------------------------------------------------------------- bad input


async def test_garbage_is_dropped_and_the_call_and_its_neighbour_go_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="realtime.transports.twilio")
    stack = harness.stack
    sid_a, url_a, call_a = await harness.call()
    sid_b, url_b, call_b = await harness.call()
    async with (
        stack.phone(url_a, call_a, sid_a) as phone_a,
        stack.phone(url_b, call_b, sid_b) as phone_b,
    ):
        await asyncio.gather(greeted(phone_a), greeted(phone_b))
        bad = garbage(phone_a.stream_sid, phone_a.call_sid)
        # While call A gets every kind of garbage, call B has its conversation.
        neighbour = asyncio.create_task(ask(phone_b))
        for _, message in bad:
            if isinstance(message, str):
                await phone_a.send_raw(message)
            else:
                assert phone_a._ws is not None  # a binary frame needs the socket itself
                await phone_a._ws.send(message)
            await asyncio.sleep(0.01)
        # Streams that are not Twilio's for call A are refused while A goes on: one
        # without Twilio's signature at the handshake, one from another call sid.
        with pytest.raises(InvalidStatus) as refused:
            async with RawStream(url_a, auth_token=None):
                pass
        assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            async with RawStream(url_a, auth_token="not-the-account-token"):
                pass
        async with RawStream(url_a) as intruder:
            await intruder.start(call_a, "CA" + "9" * 32)
            assert await intruder.closed_by_server(within=5) == 1008
        # Call A still answers a question.
        await ask(phone_a)
        await neighbour

    for expected, _ in bad:
        assert any(expected in r.getMessage() for r in caplog.records), expected
    for call_id in (call_a, call_b):
        call = await harness.ended_call(call_id)
        assert call["ended_reason"] == "caller-hangup"
        assert [(t["speaker"], t["text"]) for t in call["turns"]] == [
            ("agent", GREETING),
            ("caller", QUESTION),
            ("agent", HOURS),
        ]


async def test_a_newer_stream_for_a_live_call_takes_the_call_over(harness: Harness) -> None:
    """Twilio gave up on a stream the server still thinks is open (the network path
    broke, no close came) and, through the stream's ``<Connect action>``, opened a new
    one for the call: the new stream takes the call over, history and all, and the old
    socket is closed - where it used to be refused until the old one timed out."""
    call_sid, url, call_id = await harness.call()
    async with harness.stack.phone(url, call_id, call_sid) as old:
        await greeted(old)
        await ask(old)
        old.go_silent()
        new = TwilioPhone(
            url,
            parameters={"call_id": call_id, "resume": "1"},
            call_sid=call_sid,
            auth_token=e2e.TWILIO_TOKEN,
        )
        async with new:
            await old.wait_closed_by_server(within=10)
            await greeted(new)
            await ask(new)
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"
    assert [(t["speaker"], t["text"]) for t in call["turns"]] == [
        ("agent", GREETING),
        ("caller", QUESTION),
        ("agent", HOURS),
        ("agent", RESUME_LINE),
        ("caller", QUESTION),
        ("agent", HOURS),
    ]
    assert [t["index"] for t in call["turns"]] == list(range(6))


async def test_an_ended_call_is_freed_without_waiting_for_the_cycle_collector(
    harness: Harness,
) -> None:
    """The realtime process runs the cyclic collector rarely (workers/cli.py): a call's
    session - its audio buffers, recording, conversation - must be freed by reference
    counting the moment the call ends, not left in a reference cycle until a full pass."""
    gc.collect()
    gc.disable()
    try:
        call_sid, url, call_id = await harness.call()
        async with harness.stack.phone(url, call_id, call_sid) as phone:
            await greeted(phone)
            await ask(phone)
        await harness.ended_call(call_id)
        await asyncio.sleep(0.5)  # the session's last deliveries
        left = [o for o in gc.get_objects() if type(o) is CallSession]
        assert [o.setup.call_id for o in left] == []
    finally:
        gc.enable()


async def test_a_stream_that_never_starts_is_closed(harness: Harness) -> None:
    with harness.timeouts(start_timeout_s=1.0):
        async with RawStream(f"{harness.stack.realtime_url}/media/twilio") as stream:
            await stream.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            # Frames before `start` belong to no call; they are ignored, not fatal...
            await stream.send(media_message(stream.stream_sid, SILENCE))
            await stream.send("{garbage")
            # ...but a stream that never says which call it is gets closed.
            loop = asyncio.get_running_loop()
            opened = loop.time()
            assert await stream.closed_by_server(within=5) == 1008
            assert loop.time() - opened < 3
            assert stream.agent_audio() == 0


async def test_frames_before_start_do_not_stop_the_call(harness: Harness) -> None:
    call_sid, url, call_id = await harness.call()
    async with RawStream(url) as stream:
        await stream.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await stream.send(media_message(stream.stream_sid, SILENCE))
        await stream.send({"event": "mark", "streamSid": stream.stream_sid, "mark": {"name": "x"}})
        await stream.send("{garbage")
        await stream.send(start_message(stream.stream_sid, call_sid, {"call_id": call_id}))
        # The call is set up: the greeting comes.
        sender = asyncio.create_task(stream.media(250))
        for _ in range(400):
            if stream.agent_audio() > 0:
                break
            await asyncio.sleep(0.02)
        assert stream.agent_audio() > 0
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await stream.send({"event": "stop", "streamSid": stream.stream_sid, "stop": {}})
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"


async def test_a_start_for_an_unknown_or_ended_call_is_refused(harness: Harness) -> None:
    url = f"{harness.stack.realtime_url}/media/twilio"
    for call_id in ("call_doesnotexist", None, ""):
        async with RawStream(url) as stream:
            await stream.start(call_id)
            assert await stream.closed_by_server(within=5) == 1008
            assert stream.agent_audio() == 0

    # A call that has ended cannot be joined again.
    call_sid, url, call_id = await harness.call()
    async with harness.stack.phone(url, call_id, call_sid) as phone:
        await phone.wait_for_media_after(0, within=8)
    await harness.ended_call(call_id)
    async with RawStream(url) as stream:
        await stream.start(call_id, call_sid)
        assert await stream.closed_by_server(within=5) == 1008
        assert stream.agent_audio() == 0


async def test_a_dropped_socket_ends_the_call_as_a_caller_hangup(harness: Harness) -> None:
    call_sid, url, call_id = await harness.call(first_message=LONG_GREETING)
    phone = harness.stack.phone(url, call_id, call_sid)
    async with phone:
        first = await phone.wait_for_media_after(0, within=8)
        await asyncio.sleep(1.5)
        assert phone._ws is not None
        # The network goes away mid-greeting: no `stop`, no close frame.
        phone._ws.transport.abort()
        assert first > 0
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"
    # The greeting was cut off: the record keeps what was heard of it.
    [greeting] = call["turns"]
    assert greeting["interrupted"] and greeting["speaker"] == "agent"
    assert greeting["text"] and LONG_GREETING.startswith(greeting["text"])
    assert len(greeting["text"]) < len(LONG_GREETING) / 2


async def test_a_stalled_stream_ends_the_call_as_lost(harness: Harness) -> None:
    call_sid, url, call_id = await harness.call()
    with harness.timeouts(media_timeout_s=1.0):
        async with RawStream(url) as stream:
            await stream.start(call_id, call_sid)
            await stream.media(50)
            # The carrier stops sending media but the socket stays open.
            loop = asyncio.get_running_loop()
            stalled = loop.time()
            assert await stream.closed_by_server(within=6) == 1000
            assert 0.9 < loop.time() - stalled < 4
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "lost"


async def test_too_many_bad_messages_end_the_call_with_a_media_error(harness: Harness) -> None:
    call_sid, url, call_id = await harness.call()
    async with RawStream(url) as stream:
        await stream.start(call_id, call_sid)
        await stream.media(10)
        for n in range(harness.twilio.max_bad_frames):
            await stream.send(f"{{broken {n}")
        await stream.media(10)  # a few more bad ones are still tolerated
        assert not stream.ws.close_code
        for n in range(5):
            await stream.send(f"{{broken {n}")
        assert await stream.closed_by_server(within=5) == 1000
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "media-error"


async def test_a_cancelled_stream_handler_ends_its_call_at_once(harness: Harness) -> None:
    """The server cancels a stream's handler (uvicorn does, past its shutdown grace): the
    call ends then, as failed - not whenever its silence timeout would have ended it."""
    call_sid, url, call_id = await harness.call(first_message=LONG_GREETING)
    async with harness.stack.phone(url, call_id, call_sid) as phone:
        await phone.wait_for_media_after(0, within=8)
        handlers = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").endswith("run_asgi")
        ]
        assert len(handlers) == 1, handlers  # this call's media stream
        handlers[0].cancel()
        call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "failed"


# ---------------------------------------------------------------- a full process


async def test_a_full_process_refuses_new_calls_which_twilio_then_streams_again(
    harness: Harness,
) -> None:
    """At its call cap the realtime process says so on ``GET /readyz`` (503) and refuses a
    new call's stream with 1013; the refused call is not over: Twilio asks the stream's
    ``<Connect action>``, which streams it again, and once there is room it is taken."""
    stack = harness.stack
    admission = harness.twilio.admission
    assert admission is harness.web.admission  # one count for both transports
    saved = admission.max_calls, admission.max_loop_lag_ms
    admission.max_calls, admission.max_loop_lag_ms = 1, None  # the lag is a unit test's
    readyz = stack.realtime_url.replace("ws://", "http://", 1) + "/readyz"
    try:
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(readyz)).status_code == 200
            first_sid, first_url, first_id = await harness.call()
            second_sid, second_url, second_id = await harness.call()
            async with stack.phone(first_url, first_id, first_sid) as first:
                await first.wait_for_media_after(0, within=8)
                busy = await plain.get(readyz)
                assert busy.status_code == 503
                assert busy.json()["status"] == "busy" and "cap of 1" in busy.json()["reason"]

                async with RawStream(second_url) as refused:
                    await refused.start(second_id, second_sid)
                    assert await refused.closed_by_server(within=5) == 1013
                    assert refused.agent_audio() == 0
                # Twilio asks what next: the call goes on, so it is streamed again.
                answer = read_twiml(stack.answers[second_sid])
                assert answer.stream is not None and answer.stream.action is not None
                again = await stack.stream_ended(answer.stream.action, second_sid)
                assert again.stream is not None and not again.hangs_up
                await first.hang_up()
            await harness.ended_call(first_id)

            async with asyncio.timeout(5):
                while (await plain.get(readyz)).status_code != 200:
                    await asyncio.sleep(0.05)
            # There is room again: the second stream is taken and the caller greeted.
            retried = stack.phone(again.stream.url, second_id, second_sid)
            async with retried as phone:
                await greeted(phone)
                await phone.hang_up()
            assert (await harness.ended_call(second_id))["ended_reason"] == "caller-hangup"
    finally:
        admission.max_calls, admission.max_loop_lag_ms = saved


# ---------------------------------------------------------------- failing providers


async def test_a_call_whose_providers_cannot_be_made_here_ends_at_once(harness: Harness) -> None:
    """An agent whose voice this server does not have: the call ends as a provider error
    at the start - its workflow hears it, the socket closes with 1011 - and holds nothing
    of the server's (a pool place) afterwards. Over Twilio and over the web protocol."""
    stack = harness.stack
    no_voice = {"tts": {"provider": "piper-local", "voice": "no-such-voice"}}
    call_sid, url, call_id = await harness.call(**no_voice)
    async with RawStream(url) as stream:
        await stream.start(call_id, call_sid)
        assert await stream.closed_by_server(within=10) == 1011
        assert stream.agent_audio() == 0
    assert (await harness.ended_call(call_id))["ended_reason"] == "provider-error"

    agent = await stack.create_agent(name="Voiceless web agent", **no_voice)
    created = await stack.api.post("/v1/calls/web", json={"agent_id": agent["id"]})
    assert created.status_code == 201, created.text
    web = created.json()
    async with connect(web["websocket_url"]) as ws:
        await ws.send(
            json.dumps({"type": "start", "call_id": web["call_id"], "token": web["token"]})
        )
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(json.loads(await ws.recv()))
        assert ws.close_code == 1011
    assert [m["type"] for m in messages] == ["started", "ended"]
    assert messages[1]["reason"] == "provider-error"
    assert (await harness.ended_call(web["call_id"]))["ended_reason"] == "provider-error"

    stats_url = stack.realtime_url.replace("ws://", "http://", 1) + "/stats"
    async with httpx.AsyncClient() as plain:
        stats = (await plain.get(stats_url)).json()
    assert stats["pooled_calls"] == 0


async def test_a_failing_language_model_apologizes_and_hangs_up(harness: Harness) -> None:
    stack = harness.stack
    call_sid, url, call_id = await harness.call(brain={"model": "broken-model"})
    before = len(stack.openai.chat_requests)
    async with stack.phone(url, call_id, call_sid) as phone:
        await greeted(phone)
        question = phone.say(caller_speech(QUESTION))
        await question.done.wait()
        assert question.ended_at is not None
        # Not dead air: the apology is spoken...
        apology_at = await phone.wait_for_media_after(question.ended_at, within=8)
        assert apology_at - question.ended_at < 3
        # ...all of it, and then the platform hangs up.
        await phone.wait_closed_by_server(within=20)
        apology_s = sum(len(r.payload) for r in phone.media_after(apology_at)) / 8000
        expected_s = stack.elevenlabs.audio_samples(APOLOGY, 8000) / 8000
        assert abs(apology_s - expected_s) < 0.1
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "provider-error"
    assert [(t["speaker"], t["text"]) for t in call["turns"]] == [
        ("agent", GREETING),
        ("caller", QUESTION),
        ("agent", APOLOGY),
    ]
    # The platform retried the model once before giving up.
    failed = stack.openai.chat_requests[before:]
    assert [r.status for r in failed] == [500, 500]


async def test_a_fallback_model_answers_when_the_primary_fails(harness: Harness) -> None:
    stack = harness.stack
    call_sid, url, call_id = await harness.call(
        brain={"model": "broken-model", "fallback": {"model": "backup-model"}}
    )
    before = len(stack.openai.chat_requests)
    async with stack.phone(url, call_id, call_sid) as phone:
        await greeted(phone)
        await ask(phone)
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"
    assert [(t["speaker"], t["text"]) for t in call["turns"]] == [
        ("agent", GREETING),
        ("caller", QUESTION),
        ("agent", BACKUP_HOURS),
    ]
    requests = stack.openai.chat_requests[before:]
    assert [(r.body["model"], r.status) for r in requests] == [
        ("broken-model", 500),
        ("backup-model", 200),
    ]


async def test_a_recognizer_that_fails_mid_call_gets_an_apology_not_dead_air(
    harness: Harness,
) -> None:
    stack = harness.stack
    call_sid, url, call_id = await harness.call()
    async with stack.phone(url, call_id, call_sid) as phone:
        await greeted(phone)
        loop = asyncio.get_running_loop()
        # The speech recognizer's connection breaks: the agent can no longer hear.
        stack.deepgram.drop_connections()
        dropped = loop.time()
        apology_at = await phone.wait_for_media_after(dropped, within=5)
        assert apology_at - dropped < 2
        await phone.wait_closed_by_server(within=20)
        apology_s = sum(len(r.payload) for r in phone.media_after(apology_at)) / 8000
        assert abs(apology_s - stack.elevenlabs.audio_samples(APOLOGY, 8000) / 8000) < 0.15
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "provider-error"
    assert [(t["speaker"], t["text"]) for t in call["turns"]] == [
        ("agent", GREETING),
        ("agent", APOLOGY),
    ]


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"x" * (17 * 2**20), id="over-the-server-limit"),  # uvicorn's is 16 MiB
        pytest.param(b'{"event": "media", "x": "\xff\xfe"}', id="invalid-utf8"),
    ],
)
async def test_a_frame_the_websocket_layer_rejects_ends_the_call_with_a_media_error(
    harness: Harness, frame: bytes
) -> None:
    call_sid, url, call_id = await harness.call()
    async with RawStream(url) as stream:
        await stream.start(call_id, call_sid)
        await stream.media(10)
        # Sent as a text frame, whatever its bytes. The server may close while it is sent.
        with contextlib.suppress(ConnectionClosed):
            await stream.ws.send(frame, text=True)
        assert await stream.closed_by_server(within=10) in (1007, 1009)
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "media-error"
