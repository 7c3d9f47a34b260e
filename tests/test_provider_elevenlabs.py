"""ElevenLabsTts through the real elevenlabs SDK against the local ElevenLabs emulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from builder_engine.agent_config import TtsConfig
from builder_engine.config import Settings
from emulators.elevenlabs import ElevenLabsEmulator
from realtime.media.mulaw import ulaw_to_pcm16
from realtime.providers.base import MULAW_8K, PCM16_16K, AudioFormat, ProviderError
from realtime.providers.elevenlabs_tts import DEFAULT_MODEL, DEFAULT_VOICE, ElevenLabsTts
from realtime.providers.registry import ProviderResources

KEY = "xi-test-key"
SENTENCE = "Thanks for calling. Your table for two is booked at seven."
# ~300 characters: 19.5 s of audio, streamed in ~0.5 s at 40x real time.
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog."] * 7)


@pytest.fixture
async def emulator() -> AsyncIterator[ElevenLabsEmulator]:
    async with ElevenLabsEmulator(api_key=KEY, first_byte_latency_ms=50, speedup=40) as emu:
        yield emu


@pytest.fixture
async def tts(emulator: ElevenLabsEmulator) -> AsyncIterator[ElevenLabsTts]:
    async with ElevenLabsTts(api_key=KEY, base_url=emulator.url) as provider:
        yield provider


def rms(audio: bytes, fmt: AudioFormat) -> float:
    if fmt.encoding == "mulaw":
        samples = ulaw_to_pcm16(audio).astype(np.float64)
    else:
        samples = np.frombuffer(audio, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples * samples)))


async def test_audio_streams_before_the_answer_is_complete(
    emulator: ElevenLabsEmulator, tts: ElevenLabsTts
) -> None:
    started = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    pending_at_first_chunk = None
    async for chunk in tts.synthesize(LONG_TEXT):
        if not arrivals:
            pending_at_first_chunk = emulator.requests[0].outcome
        arrivals.append((time.monotonic() - started, len(chunk)))
    first, total = arrivals[0][0], arrivals[-1][0]
    assert pending_at_first_chunk == "pending"  # the emulator was still sending
    assert first < 0.3 < total, (first, total)
    # 20 ms pieces (160 bytes of 8 kHz mu-law) so a consumer can pace them directly.
    assert {size for _, size in arrivals[:-1]} == {160}


@pytest.mark.parametrize("fmt", [MULAW_8K, PCM16_16K], ids=["ulaw_8000", "pcm_16000"])
async def test_output_format_is_honoured(emulator: ElevenLabsEmulator, fmt: AudioFormat) -> None:
    async with ElevenLabsTts(api_key=KEY, base_url=emulator.url, output=fmt) as provider:
        audio = b"".join([chunk async for chunk in provider.synthesize(SENTENCE)])
    samples = emulator.audio_samples(SENTENCE, fmt.sample_rate)
    assert len(audio) == samples * (1 if fmt.encoding == "mulaw" else 2)
    assert len(audio) / fmt.bytes_per_second == pytest.approx(len(SENTENCE) * 0.065, abs=0.001)
    assert rms(audio, fmt) > 1000  # speech-like, not silence
    request = emulator.requests[0]
    assert request.output_format == ("ulaw_8000" if fmt.encoding == "mulaw" else "pcm_16000")
    assert (request.text, request.voice_id, request.model_id) == (
        SENTENCE,
        DEFAULT_VOICE,
        DEFAULT_MODEL,
    )
    assert request.outcome == "completed" and request.voice_settings is None


async def test_bad_key_raises_provider_error(emulator: ElevenLabsEmulator) -> None:
    async with ElevenLabsTts(api_key="wrong", base_url=emulator.url) as provider:
        with pytest.raises(ProviderError) as caught:
            async for _ in provider.synthesize(SENTENCE):
                pass
    assert caught.value.provider == "elevenlabs" and not caught.value.retryable
    assert "401" in str(caught.value) and "Invalid API key" in str(caught.value)
    assert emulator.requests == []


async def test_cancelling_mid_stream_closes_the_connection(
    emulator: ElevenLabsEmulator, tts: ElevenLabsTts
) -> None:
    got_audio = asyncio.Event()

    async def speak() -> None:
        async for _ in tts.synthesize(LONG_TEXT):
            got_audio.set()

    task = asyncio.create_task(speak())
    await asyncio.wait_for(got_audio.wait(), 1.0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    request = emulator.requests[0]
    await asyncio.wait_for(request.done.wait(), 0.5)
    assert request.outcome == "disconnected"
    assert 0 < request.bytes_sent < request.audio_bytes


async def test_leaving_the_loop_early_closes_the_connection(
    emulator: ElevenLabsEmulator, tts: ElevenLabsTts
) -> None:
    stream = tts.synthesize(LONG_TEXT)
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for _ in stream:
            break
    request = emulator.requests[0]
    await asyncio.wait_for(request.done.wait(), 0.5)
    assert request.outcome == "disconnected"
    # The pool is still usable afterwards.
    audio = b"".join([chunk async for chunk in tts.synthesize("Goodbye.")])
    assert len(audio) == emulator.audio_samples("Goodbye.", 8000)


async def test_the_shared_client_streams_for_more_than_a_hundred_calls_at_once() -> None:
    """The realtime process's one HTTP client serves every call's synthesis: the 101st
    concurrent sentence must go out at once, not wait for a connection to come free."""
    concurrent = 120
    async with ElevenLabsEmulator(api_key=KEY, first_byte_latency_ms=1500, speedup=40) as emu:
        resources = ProviderResources(Settings(_env_file=None))
        tts = ElevenLabsTts(api_key=KEY, base_url=emu.url, http_client=resources.http())

        async def speak() -> int:
            return sum([len(chunk) async for chunk in tts.synthesize("Hello.")])

        try:
            speaking = [asyncio.create_task(speak()) for _ in range(concurrent)]
            async with asyncio.timeout(1.2):  # every request arrives before any first byte
                while len(emu.requests) < concurrent:
                    await asyncio.sleep(0.01)
            assert set(await asyncio.gather(*speaking)) == {emu.audio_samples("Hello.", 8000)}
        finally:
            await tts.aclose()
            await resources.aclose()


async def test_from_config_uses_agent_settings(emulator: ElevenLabsEmulator) -> None:
    settings = Settings(
        elevenlabs_api_key=KEY,
        elevenlabs_base_url="http://127.0.0.1:9",  # the agent's base_url must win
        _env_file=None,
    )
    config = TtsConfig(voice="pNInz6obpgDQGcFmaJgB", model="eleven_turbo_v2_5", speed=1.25)
    config = config.model_copy(update={"base_url": emulator.url})
    provider = ElevenLabsTts.from_config(config, settings, PCM16_16K)
    async with provider:
        audio = b"".join([chunk async for chunk in provider.synthesize(SENTENCE)])
    request = emulator.requests[0]
    assert (request.voice_id, request.model_id) == ("pNInz6obpgDQGcFmaJgB", "eleven_turbo_v2_5")
    assert request.voice_settings is not None and request.voice_settings["speed"] == 1.25
    assert len(audio) == 2 * emulator.audio_samples(SENTENCE, 16000, speed=1.25)

    # Built per call with the process's shared HTTP client: cheap, and it owns nothing.
    fallback = Settings(elevenlabs_api_key=KEY, elevenlabs_base_url=emulator.url, _env_file=None)
    async with httpx.AsyncClient() as shared:
        started = time.perf_counter()
        providers = [
            ElevenLabsTts.from_config(TtsConfig(), fallback, MULAW_8K, http_client=shared)
            for _ in range(100)
        ]
        assert time.perf_counter() - started < 0.1
        for provider in providers[:2]:
            async with provider:
                assert b"".join([chunk async for chunk in provider.synthesize("Hi.")])
        assert not shared.is_closed
    with pytest.raises(ProviderError):
        ElevenLabsTts.from_config(TtsConfig(), Settings(_env_file=None), MULAW_8K)


async def test_unreachable_server_raises_provider_error() -> None:
    async with ElevenLabsTts(api_key=KEY, base_url="http://127.0.0.1:9") as provider:
        with pytest.raises(ProviderError) as caught:
            async for _ in provider.synthesize(SENTENCE):
                pass
    assert caught.value.retryable


async def test_emulator_rejects_what_elevenlabs_rejects(emulator: ElevenLabsEmulator) -> None:
    headers = {"xi-api-key": KEY}
    async with httpx.AsyncClient(base_url=emulator.url) as client:
        url = "/v1/text-to-speech/voice/stream"
        missing = await client.post(url, headers=headers, json={"model_id": "m"})
        assert missing.status_code == 422
        mp3 = await client.post(url, headers=headers, json={"text": "hi"})  # mp3 by default
        assert mp3.status_code == 400
        assert mp3.json()["detail"]["status"] == "invalid_output_format"
        assert (await client.get(url, headers=headers)).status_code == 405
        assert (await client.post("/v1/voices", headers=headers)).status_code == 404
        # The non-streaming path answers the same audio.
        whole = await client.post(
            "/v1/text-to-speech/voice?output_format=pcm_24000",
            headers=headers,
            json={"text": "Hi."},
        )
        assert whole.status_code == 200
        assert len(whole.content) == 2 * emulator.audio_samples("Hi.", 24000)
    assert ElevenLabsTts(api_key=KEY).output_format == MULAW_8K
    with pytest.raises(ValueError):
        ElevenLabsTts(api_key=KEY, output=AudioFormat("mulaw", 16000))
