"""PiperLocalTts: formats, streaming per sentence, cancellation, and a round trip to Whisper."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import numpy.typing as npt
import pytest

from builder_engine.agent_config import TtsConfig
from realtime.media.mulaw import ulaw_to_pcm16
from realtime.media.resample import StreamResampler
from realtime.providers.base import (
    MULAW_8K,
    PCM16_16K,
    TranscriptEvent,
    TtsProvider,
    UtteranceEndEvent,
)
from realtime.providers.local_models import LocalModelCache, LocalModelUnavailable
from realtime.providers.piper_local import PiperLocalTts
from realtime.providers.whisper_local import WhisperLocalAsr

GREETING = "Hello, thank you for calling. How can I help you today?"
STORY = " ".join(
    f"This is sentence number {n}, and it is long enough to take a moment to say."
    for n in ("one", "two", "three", "four", "five", "six")
)


@pytest.fixture(scope="module")
def cache() -> Iterator[LocalModelCache]:
    models = LocalModelCache()
    yield models
    models.close()


async def gather(chunks: AsyncIterator[bytes]) -> tuple[list[bytes], float]:
    """All chunks, and seconds until the first one."""
    t0 = time.perf_counter()
    first = float("nan")
    out: list[bytes] = []
    async for chunk in chunks:
        if not out:
            first = time.perf_counter() - t0
        out.append(chunk)
    return out, first


def rms_dbfs(pcm: npt.NDArray[np.int16]) -> float:
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    return float(20 * np.log10(max(rms, 1e-9) / 32768))


async def test_phone_format_streams_per_sentence(cache: LocalModelCache) -> None:
    tts = PiperLocalTts(cache, output_format=MULAW_8K)
    await tts.warm_up()
    chunks, first_s = await gather(tts.synthesize(GREETING))
    audio = b"".join(chunks)
    seconds = len(audio) / MULAW_8K.bytes_per_second
    # 11 words at a normal pace, with a sentence pause: about 3 s.
    assert 2.0 < seconds < 5.0, seconds
    assert len(chunks) >= 2  # two sentences arrive separately, not as one blob
    pcm = ulaw_to_pcm16(audio)
    assert rms_dbfs(pcm) > -35.0  # speech, not silence
    assert first_s < 1.0  # loose: the bench measures the real figure (~75-135 ms)


async def test_web_format_is_pcm16_16k(cache: LocalModelCache) -> None:
    tts = PiperLocalTts(cache, output_format=PCM16_16K)
    chunks, _ = await gather(tts.synthesize("Your appointment is booked."))
    assert all(len(c) % 2 == 0 for c in chunks)
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2")
    assert 1.0 < pcm.size / 16000 < 3.5
    assert rms_dbfs(pcm) > -35.0


async def test_speed_from_config(cache: LocalModelCache) -> None:
    normal: TtsProvider = PiperLocalTts.from_config(TtsConfig(provider="piper-local"), cache)
    fast = PiperLocalTts.from_config(
        TtsConfig(provider="piper-local", voice="joe", speed=2.0), cache
    )
    assert fast.voice_name == "en_US-joe-medium" and normal.name == "piper-local"
    text = "Our opening hours are nine to five."
    slow_len = len(b"".join((await gather(normal.synthesize(text)))[0]))
    fast_len = len(b"".join((await gather(fast.synthesize(text)))[0]))
    assert 0.35 < fast_len / slow_len < 0.7


async def test_round_trip_over_the_phone_path(cache: LocalModelCache) -> None:
    """Piper -> mu-law 8 kHz (what the caller hears) -> 16 kHz -> Whisper."""
    tts = PiperLocalTts(cache, output_format=MULAW_8K)
    chunks, _ = await gather(tts.synthesize("I would like to book an appointment for tomorrow."))
    up = StreamResampler(8000, 16000)
    pcm = ulaw_to_pcm16(b"".join(chunks))
    speech = np.concatenate((up.process(pcm), up.flush(np.int16)))
    padded = np.concatenate((np.zeros(4800, np.int16), speech, np.zeros(16000, np.int16)))

    stream = await WhisperLocalAsr(cache).open_stream(language="en")
    data = padded.astype("<i2").tobytes()
    for i in range(0, len(data), 640):
        await stream.send_audio(data[i : i + 640])
    finals: list[TranscriptEvent] = []
    async with asyncio.timeout(10):
        async for event in stream.events():
            if isinstance(event, TranscriptEvent) and event.is_final:
                finals.append(event)
            if isinstance(event, UtteranceEndEvent):
                break
    await stream.close()
    text = " ".join(f.text for f in finals).lower()
    assert all(w in text for w in ("book", "appointment", "tomorrow")), text


async def _lane_settles(cache: LocalModelCache, timeout: float = 1.0) -> float:
    """Seconds until the piper lane has nothing running or queued."""
    t0 = time.perf_counter()
    while not cache.piper_lane.idle:
        assert time.perf_counter() - t0 < timeout, "synthesis kept running after cancellation"
        await asyncio.sleep(0.005)
    return time.perf_counter() - t0


async def test_aclose_stops_synthesis(cache: LocalModelCache) -> None:
    tts = PiperLocalTts(cache)
    full, _ = await gather(tts.synthesize(STORY))
    chunks = tts.synthesize(STORY)
    first = await anext(chunks)
    assert first
    await chunks.aclose()
    await _lane_settles(cache)
    await asyncio.sleep(0.3)  # nothing starts later either
    assert cache.piper_lane.idle
    assert len(full) >= 6  # the story really had more sentences to make


async def test_cancelling_the_consumer_stops_synthesis(cache: LocalModelCache) -> None:
    tts = PiperLocalTts(cache)
    got: list[bytes] = []

    async def play() -> None:
        async for chunk in tts.synthesize(STORY):
            got.append(chunk)

    task = asyncio.create_task(play())
    async with asyncio.timeout(5):
        while not got:
            await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # At most the sentence already inside ONNX finishes (~0.15 s here).
    await _lane_settles(cache)
    await asyncio.sleep(0.3)
    assert cache.piper_lane.idle
    assert len(got) < 6


async def test_empty_text_gives_no_audio(cache: LocalModelCache) -> None:
    chunks, _ = await gather(PiperLocalTts(cache).synthesize("   "))
    assert chunks == []


def test_unknown_voice_and_format(cache: LocalModelCache) -> None:
    with pytest.raises(LocalModelUnavailable, match="never downloaded"):
        PiperLocalTts(cache, voice="en_GB-alan-low")
    with pytest.raises(ValueError, match="not 'piper-local'"):
        PiperLocalTts.from_config(TtsConfig(provider="elevenlabs"), cache)
    from realtime.providers.base import AudioFormat

    with pytest.raises(ValueError, match="sample rate"):
        PiperLocalTts(cache, output_format=AudioFormat("pcm16", 44100))


async def test_missing_piper_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "piper", None)  # import now raises ImportError
    fresh = LocalModelCache()
    try:
        with pytest.raises(LocalModelUnavailable, match=r"builder-engine\[piper\]"):
            await PiperLocalTts(fresh).warm_up()
    finally:
        fresh.close()
