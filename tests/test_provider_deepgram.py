"""DeepgramAsr through the real deepgram-sdk against the local Deepgram emulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from builder_engine.agent_config import AsrConfig, TurnConfig
from builder_engine.config import Settings
from emulators._server import speech_like
from emulators.deepgram import DeepgramEmulator
from realtime.media.mulaw import pcm16_to_ulaw
from realtime.providers.base import (
    AsrEvent,
    ProviderError,
    SpeechStartedEvent,
    TranscriptEvent,
    UtteranceEndEvent,
)
from realtime.providers.deepgram_asr import DeepgramAsr, DeepgramStream

KEY = "dg-test-key"
SCRIPT = ["Hello there.", "I need a table for two, please."]
FRAME = 160  # 20 ms of 8 kHz mu-law, what Twilio sends


def speech(*words_s: float) -> bytes:
    return pcm16_to_ulaw(speech_like(words_s, 8000))


def silence(seconds: float) -> bytes:
    return pcm16_to_ulaw(np.zeros(round(seconds * 8000), np.int16))


async def feed(stream: DeepgramStream, audio: bytes) -> None:
    """Phone-sized frames as fast as possible: audio time runs ahead of the clock."""
    for offset in range(0, len(audio), FRAME):
        await stream.send_audio(audio[offset : offset + FRAME])


class Recorder:
    """Drains ``events()`` in the background, stamping each event with its arrival time."""

    def __init__(self, stream: DeepgramStream) -> None:
        self.events: list[tuple[float, AsrEvent]] = []
        self.error: ProviderError | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: DeepgramStream) -> None:
        try:
            async for event in stream.events():
                self.events.append((time.monotonic(), event))
                self._changed.set()
        except ProviderError as exc:
            self.error = exc
        finally:
            self.ended = True
            self._changed.set()

    def finals(self) -> list[TranscriptEvent]:
        return [e for _, e in self.events if isinstance(e, TranscriptEvent) and e.is_final]

    def of(self, kind: type[AsrEvent]) -> list[AsrEvent]:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def wait(self, done: Callable[[Recorder], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not done(self):
                if self.ended:
                    raise AssertionError(f"stream ended early: {self.error!r} {self.events}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def emulator() -> AsyncIterator[DeepgramEmulator]:
    async with DeepgramEmulator(api_key=KEY, script=SCRIPT, final_latency_ms=40) as emu:
        yield emu


def make_asr(
    emu: DeepgramEmulator, *, endpointing_ms: int = 300, keepalive_interval_s: float = 4.0
) -> DeepgramAsr:
    return DeepgramAsr(
        api_key=KEY,
        base_url=emu.url,
        endpointing_ms=endpointing_ms,
        utterance_end_ms=1000,
        keepalive_interval_s=keepalive_interval_s,
    )


async def open_recorded(
    asr: DeepgramAsr, keywords: Sequence[str] = ()
) -> tuple[DeepgramStream, Recorder]:
    stream = await asr.open_stream(language="en", keywords=keywords)
    return stream, Recorder(stream)


async def test_scripted_utterances_arrive_in_deepgram_order(emulator: DeepgramEmulator) -> None:
    stream, rec = await open_recorded(make_asr(emulator), keywords=["table", "booking"])
    await feed(stream, silence(0.2) + speech(0.3, 0.3) + silence(1.2))
    await feed(stream, speech(0.3, 0.3, 0.3, 0.4) + silence(1.2))
    await rec.wait(lambda r: len(r.of(UtteranceEndEvent)) == 2)
    await stream.close()

    # Per utterance: SpeechStarted, interim(s), one final with speech_final, UtteranceEnd.
    kinds: list[str] = []
    for _, event in rec.events:
        if isinstance(event, TranscriptEvent):
            kinds.append("final" if event.is_final else "interim")
        else:
            kinds.append(type(event).__name__)
    for _utterance in SCRIPT:
        end = kinds.index("UtteranceEndEvent")
        turn, kinds = kinds[: end + 1], kinds[end + 1 :]
        assert turn[0] == "SpeechStartedEvent" and turn[-2:] == ["final", "UtteranceEndEvent"]
        assert set(turn[1:-2]) == {"interim"}, turn
    assert kinds == []
    finals = rec.finals()
    assert [f.text for f in finals] == SCRIPT
    assert all(f.speech_final and f.confidence == pytest.approx(0.98) for f in finals)
    interims = [e for _, e in rec.events if isinstance(e, TranscriptEvent) and not e.is_final]
    assert all(any(f.text.startswith(i.text) for f in finals) for i in interims)
    # Audio-time stamps: speech began 0.2 s in and lasted 0.64 s.
    assert finals[0].start_s == pytest.approx(0.2, abs=0.021)
    assert finals[0].end_s == pytest.approx(0.84, abs=0.021)
    started = rec.of(SpeechStartedEvent)
    assert isinstance(started[0], SpeechStartedEvent) and started[0].at_s == pytest.approx(0.2)

    session = emulator.sessions[0]
    assert session.params["model"] == "nova-3"
    assert session.params["encoding"] == "mulaw" and session.params["sample_rate"] == "8000"
    assert session.params["interim_results"] == "true" and session.params["vad_events"] == "true"
    assert session.params["endpointing"] == "300" and session.params["utterance_end_ms"] == "1000"
    assert session.params["language"] == "en"
    assert session.query["keyterm"] == ["table", "booking"]  # nova-3 takes keyterm, not keywords
    assert session.close_stream and session.close_code == 1000
    assert rec.ended and rec.error is None


async def test_final_respects_emulated_latency() -> None:
    async with DeepgramEmulator(api_key=KEY, script=SCRIPT, final_latency_ms=200) as emu:
        stream, rec = await open_recorded(make_asr(emu, endpointing_ms=100))
        await feed(stream, speech(0.3, 0.3))
        await rec.wait(lambda r: bool(r.of(SpeechStartedEvent)))
        speech_end_sent = time.monotonic()
        await feed(stream, silence(0.3))
        await rec.wait(lambda r: bool(r.finals()))
        arrived = next(t for t, e in rec.events if isinstance(e, TranscriptEvent) and e.is_final)
        await stream.close()
    latency = arrived - speech_end_sent
    assert 0.2 - 0.005 <= latency < 0.2 + 0.15, latency


async def test_finalize_flushes_the_open_utterance(emulator: DeepgramEmulator) -> None:
    stream, rec = await open_recorded(make_asr(emulator))
    await feed(stream, speech(0.3, 0.3, 0.3))  # no trailing silence: no endpoint yet
    await rec.wait(lambda r: bool(r.of(SpeechStartedEvent)))
    await stream.finalize()
    await rec.wait(lambda r: bool(r.finals()))
    final = rec.finals()[0]
    assert final.text == SCRIPT[0] and final.is_final and not final.speech_final
    # The caller keeps talking, then stops: that speech belonged to the finalized turn.
    await feed(stream, speech(0.2) + silence(1.2))
    await rec.wait(lambda r: bool(r.of(UtteranceEndEvent)))
    assert len(rec.finals()) == 1
    assert emulator.sessions[0].finalizes == 1
    await stream.close()


async def test_close_flushes_pending_speech_and_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    async with DeepgramEmulator(api_key=KEY, script=SCRIPT, final_latency_ms=20) as emu:
        stream, rec = await open_recorded(make_asr(emu))
        await feed(stream, speech(0.3, 0.3))
        await rec.wait(lambda r: bool(r.of(SpeechStartedEvent)))
        started = time.monotonic()
        await stream.close()
        assert time.monotonic() - started < 0.5
        await rec.wait(lambda r: r.ended)
        assert [f.text for f in rec.finals()] == [SCRIPT[0]]
        assert rec.error is None
        await stream.send_audio(speech(0.1))  # after close: ignored, no error
        await stream.close()  # idempotent
        session = emu.sessions[0]
        await asyncio.wait_for(session.closed.wait(), 1.0)
        assert session.close_stream and session.close_code == 1000
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


async def test_keepalive_keeps_an_idle_stream_open() -> None:
    async with DeepgramEmulator(api_key=KEY, script=SCRIPT, idle_timeout_s=0.3) as emu:
        stream, rec = await open_recorded(make_asr(emu, keepalive_interval_s=0.1))
        await asyncio.sleep(0.8)  # well past the server's idle timeout
        await feed(stream, speech(0.3) + silence(0.5))
        await rec.wait(lambda r: bool(r.finals()))
        assert rec.finals()[0].text == SCRIPT[0]
        assert emu.sessions[0].keepalives >= 4
        await stream.close()
        assert rec.error is None


async def test_idle_stream_without_keepalive_is_lost() -> None:
    async with DeepgramEmulator(api_key=KEY, script=SCRIPT, idle_timeout_s=0.2) as emu:
        stream, rec = await open_recorded(make_asr(emu, keepalive_interval_s=5.0))
        await rec.wait(lambda r: r.ended, timeout=2.0)
        assert rec.error is not None and rec.error.retryable
        assert "1011" in str(rec.error) and "NET-0001" in str(rec.error)
        assert emu.sessions[0].close_code == 1011
        await stream.close()


async def test_bad_key_raises_provider_error_from_events(emulator: DeepgramEmulator) -> None:
    asr = DeepgramAsr(api_key="wrong", base_url=emulator.url)
    stream = await asr.open_stream(language="en")  # connects in the background
    await stream.send_audio(speech(0.1))
    with pytest.raises(ProviderError) as caught:
        async with asyncio.timeout(2):
            async for _ in stream.events():
                pass
    assert caught.value.provider == "deepgram" and not caught.value.retryable
    assert "401" in str(caught.value)
    assert emulator.sessions == []
    await stream.close()


async def test_lost_connection_raises_provider_error(emulator: DeepgramEmulator) -> None:
    stream, rec = await open_recorded(make_asr(emulator))
    await feed(stream, speech(0.2))
    await rec.wait(lambda r: bool(r.of(SpeechStartedEvent)))
    emulator.drop_connections()
    await rec.wait(lambda r: r.ended)
    assert rec.error is not None and rec.error.retryable
    assert "connection lost" in str(rec.error)
    await stream.send_audio(speech(0.1))  # after the failure: ignored
    await stream.close()


async def test_unreachable_server_and_stalled_backlog_fail_cleanly() -> None:
    # A server that accepts TCP but never answers the handshake.
    hung: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        asr = DeepgramAsr(
            api_key=KEY,
            base_url=f"http://127.0.0.1:{port}",
            max_backlog_s=0.2,
            connect_timeout_s=5.0,
        )
        stream, rec = await open_recorded(asr)
        await feed(stream, silence(0.3))  # more than the backlog allows, nowhere to go
        await rec.wait(lambda r: r.ended)
        assert rec.error is not None and "backlog" in str(rec.error)
        await stream.close()

        asr = DeepgramAsr(api_key=KEY, base_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.2)
        stream, rec = await open_recorded(asr)
        await rec.wait(lambda r: r.ended)
        assert rec.error is not None and "no connection" in str(rec.error)
        await stream.close()
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_send_audio_never_waits_on_the_network(emulator: DeepgramEmulator) -> None:
    stream, rec = await open_recorded(make_asr(emulator))
    async with asyncio.timeout(2):
        while not stream.connected:
            await asyncio.sleep(0.005)
    frame = silence(0.02)
    spent = 0.0
    for _batch in range(20):
        started = time.perf_counter()
        for _ in range(100):
            await stream.send_audio(frame)
        spent += time.perf_counter() - started
        await asyncio.sleep(0)  # the audio loop yields between frames; let the sender run
    per_frame = spent / 2000
    assert per_frame < 50e-6, f"{per_frame * 1e6:.1f} us per frame"
    await stream.close()
    assert emulator.sessions[0].audio_bytes == 2000 * FRAME
    await rec.stop()


async def test_silence_goes_out_in_fewer_messages_and_speech_at_once(
    emulator: DeepgramEmulator,
) -> None:
    """Unvoiced audio is held for ~240 ms a message, voiced audio for ~60 ms, and the
    first voiced frame sends what was held, so speech never waits behind silence."""
    asr = make_asr(emulator)
    stream, rec = await open_recorded(asr)
    async with asyncio.timeout(2):
        while not stream.connected:
            await asyncio.sleep(0.005)
    session = emulator.sessions[0]

    async def frames(count: int, *, voiced: bool) -> None:
        for _ in range(count):
            await stream.send_audio(silence(0.02), voiced=voiced)
            await asyncio.sleep(0.001)  # the sender runs between frames, as in a call

    async def messages(count: int) -> list[int]:
        async with asyncio.timeout(2):
            while len(session.audio_messages) < count:
                await asyncio.sleep(0.005)
        return list(session.audio_messages)

    await frames(48, voiced=False)  # 960 ms of silence: four messages of 240 ms
    assert await messages(4) == [asr.idle_send_bytes] * 4
    await frames(5, voiced=False)  # 100 ms held...
    await asyncio.sleep(0.1)
    assert len(session.audio_messages) == 4
    await frames(1, voiced=True)  # ...until the caller may be speaking: sent at once
    assert (await messages(5))[4] == 6 * FRAME
    await frames(30, voiced=True)  # 600 ms of speech: ten messages of 60 ms
    assert (await messages(15))[5:] == [asr.send_bytes] * 10
    assert asr.send_bytes == 3 * FRAME and asr.idle_send_bytes == 12 * FRAME
    await stream.close()
    await rec.stop()


async def test_from_config_prefers_the_agent_base_url(emulator: DeepgramEmulator) -> None:
    settings = Settings(
        deepgram_api_key=KEY,
        deepgram_base_url="http://127.0.0.1:9",  # nothing listens there
        _env_file=None,
    )
    asr = DeepgramAsr.from_config(
        AsrConfig(base_url=emulator.url, keywords=["Zephyr"]),
        TurnConfig(endpointing_ms=450),
        settings,
    )
    stream, rec = await open_recorded(asr, keywords=["Zephyr", "Acme"])
    await feed(stream, speech(0.3) + silence(0.6))
    await rec.wait(lambda r: bool(r.finals()))
    await stream.close()
    assert emulator.sessions[0].query["keyterm"] == ["Zephyr", "Acme"]  # agent's + call's
    assert emulator.sessions[0].params["endpointing"] == "450"
    assert emulator.sessions[0].params["model"] == "nova-3"

    fallback = Settings(deepgram_api_key=KEY, deepgram_base_url=emulator.url, _env_file=None)
    asr = DeepgramAsr.from_config(AsrConfig(model="nova-2"), TurnConfig(), fallback)
    stream, rec = await open_recorded(asr, keywords=["Zephyr"])
    await feed(stream, speech(0.3) + silence(0.6))
    await rec.wait(lambda r: bool(r.finals()))
    await stream.close()
    assert emulator.sessions[1].params["model"] == "nova-2"
    assert emulator.sessions[1].query["keywords"] == ["Zephyr"]  # pre-nova-3 boost

    # The registry builds one per call: that must not block the event loop.
    started = time.perf_counter()
    for _ in range(100):
        DeepgramAsr.from_config(AsrConfig(), TurnConfig(), fallback)
    assert time.perf_counter() - started < 0.1

    with pytest.raises(ProviderError):
        DeepgramAsr.from_config(
            AsrConfig(),
            TurnConfig(),
            Settings(_env_file=None, deepgram_api_key=None),
        )


async def test_emulator_speaks_the_raw_protocol(emulator: DeepgramEmulator) -> None:
    """Wire details an SDK would hide: linear16, handshake errors, malformed messages."""
    headers = {"Authorization": f"Token {KEY}"}
    url = f"{emulator.ws_url}/v1/listen?encoding=linear16&sample_rate=16000&endpointing=100"
    async with ws_connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "Metadata"
        pcm = np.concatenate([speech_like([0.3, 0.2], 16000), np.zeros(4000, np.int16)])
        await ws.send(pcm.astype("<i2").tobytes())
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = [json.loads(m) async for m in ws]
    final = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    assert final[0]["channel"]["alternatives"][0]["transcript"] == "hello there"  # no punctuate
    assert final[0]["speech_final"] is True and messages[-1]["type"] == "Metadata"
    assert not any(m["type"] == "SpeechStarted" for m in messages)  # vad_events not asked

    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(
            f"{emulator.ws_url}/v1/listen?encoding=mulaw&sample_rate=8000",
            additional_headers={"Authorization": "Token nope"},
        ):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(
            f"{emulator.ws_url}/v1/listen?encoding=opus", additional_headers=headers
        ):
            pass
    assert refused.value.response.status_code == 400

    async with ws_connect(
        f"{emulator.ws_url}/v1/listen?encoding=mulaw&sample_rate=8000", additional_headers=headers
    ) as ws:
        await ws.send("not json")
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_close_before_connected_abandons_quietly(emulator: DeepgramEmulator) -> None:
    before = asyncio.all_tasks()
    stream = await make_asr(emulator).open_stream(language="en")
    await stream.send_audio(speech(0.1))
    await stream.close()
    assert [event async for event in stream.events()] == []
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


async def test_script_can_be_a_function_of_call_and_turn() -> None:
    def script(call: int, turn: int) -> str:
        return f"call {call} turn {turn}"

    async with DeepgramEmulator(api_key=KEY, script=script, final_latency_ms=10) as emu:
        asr = make_asr(emu, endpointing_ms=100)
        for call in range(2):
            stream, rec = await open_recorded(asr)
            await feed(stream, (speech(0.3) + silence(0.3)) * 2)
            await rec.wait(lambda r: len(r.finals()) == 2)
            await stream.close()
            assert [f.text for f in rec.finals()] == [f"call {call} turn {t}" for t in (0, 1)]
        assert [s.utterances for s in emu.sessions] == [2, 2]
