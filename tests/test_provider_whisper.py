"""WhisperLocalAsr on synthetic speech: VAD segmentation, finals, interims, finalize, limits.

Speech comes from espeak-ng, which tiny.en transcribes with ~28% WER, so the
assertions look for 2-3 robust words, never exact text. Audio is fed in 20 ms
frames as fast as possible; trailing silence is fed so the VAD ends utterances.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import shutil
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from builder_engine.agent_config import AsrConfig
from realtime.media.resample import StreamResampler
from realtime.providers.base import (
    PCM16_16K,
    AsrEvent,
    AsrProvider,
    AsrStream,
    ProviderError,
    SpeechStartedEvent,
    TranscriptEvent,
    UtteranceEndEvent,
)
from realtime.providers.local_models import CpuLane, LocalModelCache, LocalModelUnavailable
from realtime.providers.whisper_local import WhisperLocalAsr, WhisperLocalStream, WhisperOptions

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install -y espeak-ng): no speech to recognize",
)

RATE = 16000
FRAME = 640  # 20 ms of PCM16 at 16 kHz
HOURS = "what are your opening hours"
BOOKING = "I would like to book an appointment for tomorrow"


def espeak_16k(text: str) -> npt.NDArray[np.int16]:
    """espeak-ng speech (22.05 kHz WAV on stdout) resampled to 16 kHz PCM16."""
    wav = subprocess.run(
        ["espeak-ng", "--stdout", "-s", "160", text], check=True, capture_output=True, timeout=30
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    resampler = StreamResampler(rate, RATE)
    return np.concatenate((resampler.process(pcm), resampler.flush(np.int16)))


def silence(seconds: float) -> npt.NDArray[np.int16]:
    # A little noise rather than digital zero, like a real line.
    rng = np.random.default_rng(0)
    return rng.normal(0, 30, int(seconds * RATE)).astype(np.int16)


async def feed(stream: WhisperLocalStream, *parts: npt.NDArray[np.int16]) -> None:
    data = np.concatenate(parts).astype("<i2").tobytes()
    for i in range(0, len(data), FRAME):
        await stream.send_audio(data[i : i + FRAME])


async def collect(
    stream: WhisperLocalStream, ends: int = 1, timeout: float = 10.0
) -> list[AsrEvent]:
    """Events until ``ends`` UtteranceEndEvents have arrived."""
    got: list[AsrEvent] = []
    async with asyncio.timeout(timeout):
        async for event in stream.events():
            got.append(event)
            if sum(isinstance(e, UtteranceEndEvent) for e in got) >= ends:
                break
    return got


def words(text: str) -> set[str]:
    return {w.strip(".,?!'\"").lower() for w in text.split()}


def finals(events: Sequence[AsrEvent]) -> list[TranscriptEvent]:
    return [e for e in events if isinstance(e, TranscriptEvent) and e.is_final]


@pytest.fixture(scope="module")
def cache() -> Iterator[LocalModelCache]:
    models = LocalModelCache()
    yield models
    models.close()


@pytest.fixture(scope="module")
def speech() -> dict[str, npt.NDArray[np.int16]]:
    return {HOURS: espeak_16k(HOURS), BOOKING: espeak_16k(BOOKING)}


@pytest.mark.parametrize(
    ("phrase", "key_words"),
    # tiny.en (int8, CTranslate2 4.8) hears espeak's "book" as "welcome", our code aside:
    # faster-whisper on the whole clip says the same.
    [(HOURS, {"opening", "hours"}), (BOOKING, {"appointment", "tomorrow"})],
)
async def test_vad_end_gives_final_with_key_words(
    cache: LocalModelCache,
    speech: dict[str, npt.NDArray[np.int16]],
    phrase: str,
    key_words: set[str],
) -> None:
    asr = WhisperLocalAsr(cache)
    assert asr.input_format == PCM16_16K
    stream = await asr.open_stream(language="en-US")
    conforms: AsrStream = stream
    assert conforms is stream
    lead = 0.4
    await feed(stream, silence(lead), speech[phrase], silence(1.0))
    events = await collect(stream)
    await stream.close()

    kinds = [type(e) for e in events]
    assert kinds == [SpeechStartedEvent, TranscriptEvent, UtteranceEndEvent], events
    started, final, end = events
    assert isinstance(started, SpeechStartedEvent) and isinstance(final, TranscriptEvent)
    assert isinstance(end, UtteranceEndEvent)
    assert final.is_final and final.speech_final
    assert key_words <= words(final.text), final.text
    # Stream-time bounds line up with where the speech really was.
    speech_s = speech[phrase].size / RATE
    assert started.at_s is not None and abs(started.at_s - lead) < 0.2
    assert end.last_word_end_s is not None and abs(end.last_word_end_s - (lead + speech_s)) < 0.35
    assert final.start_s is not None and final.start_s < started.at_s
    assert final.confidence is not None and 0.0 < final.confidence <= 1.0


async def test_two_utterances_in_one_stream(
    cache: LocalModelCache, speech: dict[str, npt.NDArray[np.int16]]
) -> None:
    stream = await WhisperLocalAsr(cache).open_stream(language="en")
    # A long lead-in, so the stream has trimmed old silence before anyone speaks.
    lead, gap = 2.5, 1.0
    await feed(stream, silence(lead), speech[HOURS], silence(gap), speech[BOOKING], silence(1.0))
    events = await collect(stream, ends=2)
    await stream.close()
    first, second = finals(events)
    assert {"opening", "hours"} <= words(first.text), first.text
    assert {"appointment", "tomorrow"} <= words(second.text), second.text
    starts = [e.at_s for e in events if isinstance(e, SpeechStartedEvent)]
    assert len(starts) == 2 and starts[0] is not None and starts[1] is not None
    assert abs(starts[0] - lead) < 0.2
    assert abs(starts[1] - (lead + speech[HOURS].size / RATE + gap)) < 0.2


async def test_finalize_decodes_without_trailing_silence(
    cache: LocalModelCache, speech: dict[str, npt.NDArray[np.int16]]
) -> None:
    stream = await WhisperLocalAsr(cache).open_stream(language="en")
    await feed(stream, silence(0.3), speech[BOOKING])  # no trailing silence: VAD cannot end it
    await stream.finalize()
    events = await collect(stream)
    assert [type(e) for e in events] == [SpeechStartedEvent, TranscriptEvent, UtteranceEndEvent]
    [final] = finals(events)
    assert final.speech_final
    assert {"appointment", "tomorrow"} <= words(final.text), final.text

    # Nothing open any more: finalize is a no-op, and silence afterwards adds nothing.
    await stream.finalize()
    await feed(stream, silence(1.0))
    await stream.close()
    assert [e async for e in stream.events()] == []


async def test_interim_transcript_while_speaking(
    cache: LocalModelCache, speech: dict[str, npt.NDArray[np.int16]]
) -> None:
    asr = WhisperLocalAsr(cache, options=WhisperOptions(interim_interval_s=0.8))
    stream = await asr.open_stream(language="en")
    long = np.concatenate((speech[HOURS], speech[BOOKING]))
    head = int(1.5 * RATE)
    await feed(stream, silence(0.3), long[:head])
    # An interim needs an idle decoder, so wait for it before feeding the rest.
    interim: list[AsrEvent] = []
    async with asyncio.timeout(5.0):
        async for event in stream.events():
            interim.append(event)
            if isinstance(event, TranscriptEvent):
                break
    await feed(stream, long[head:], silence(1.0))
    events = interim + await collect(stream)
    await stream.close()

    assert isinstance(events[0], SpeechStartedEvent)
    partials = [e for e in events if isinstance(e, TranscriptEvent) and not e.is_final]
    assert partials and partials[0].text
    [final] = finals(events)
    assert events.index(partials[0]) < events.index(final)
    assert {"opening", "appointment"} <= words(final.text), final.text
    assert isinstance(events[-1], UtteranceEndEvent)


async def test_long_monologue_is_cut_into_finals(
    cache: LocalModelCache, speech: dict[str, npt.NDArray[np.int16]]
) -> None:
    options = WhisperOptions(max_utterance_s=1.2, interim_interval_s=None)
    stream = await WhisperLocalAsr(cache, options=options).open_stream(language="en")
    await feed(stream, silence(0.3), speech[BOOKING], silence(1.0))
    events = await collect(stream)
    await stream.close()
    *cuts, last = finals(events)
    assert cuts and last.speech_final
    assert not any(c.speech_final for c in cuts)  # a cut is not an end of turn
    assert sum(isinstance(e, SpeechStartedEvent) for e in events) == 1
    assert sum(isinstance(e, UtteranceEndEvent) for e in events) == 1
    bounds = [(f.start_s, f.end_s) for f in (*cuts, last)]
    assert all(b[1] == n[0] for b, n in itertools.pairwise(bounds))  # no audio lost


async def test_silence_gives_no_events(cache: LocalModelCache) -> None:
    stream = await WhisperLocalAsr(cache).open_stream(language="en")
    await feed(stream, silence(2.0))
    await stream.finalize()
    await stream.close()
    assert [e async for e in stream.events()] == []


async def test_decodes_do_not_block_the_event_loop(
    cache: LocalModelCache, speech: dict[str, npt.NDArray[np.int16]]
) -> None:
    asr = WhisperLocalAsr(cache)
    audio = speech[BOOKING].astype(np.float32) / 32768.0
    await asr.warm_up()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(asr.transcribe(audio) for _ in range(3)))
    stop.set()
    await tick
    assert all("appointment" in words(r.text) for r in results)
    assert max(lags) < 0.1, f"event loop stalled {max(lags) * 1000:.0f} ms"


async def test_english_only_model_rejects_other_languages(cache: LocalModelCache) -> None:
    with pytest.raises(ProviderError, match="only understands English") as info:
        await WhisperLocalAsr(cache).open_stream(language="de")
    assert not info.value.retryable


def test_from_config(cache: LocalModelCache) -> None:
    # Typed as the protocols: mypy checks that the adapter and its stream conform.
    asr: AsrProvider = WhisperLocalAsr.from_config(AsrConfig(provider="whisper-local"), cache)
    assert asr.name == "whisper-local"
    asr = WhisperLocalAsr.from_config(AsrConfig(provider="whisper-local", model="tiny.en"), cache)
    # Only packaged models: anything else would mean a download.
    with pytest.raises(LocalModelUnavailable, match="never downloaded"):
        WhisperLocalAsr.from_config(AsrConfig(provider="whisper-local", model="large-v3"), cache)
    with pytest.raises(ValueError, match="not 'whisper-local'"):
        WhisperLocalAsr.from_config(AsrConfig(provider="deepgram"), cache)


async def test_missing_faster_whisper_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now raises ImportError
    fresh = LocalModelCache()
    try:
        with pytest.raises(LocalModelUnavailable, match=r"builder-engine\[local\]"):
            await WhisperLocalAsr(fresh).warm_up()
    finally:
        fresh.close()


# ---------------------------------------------------------------- local_models


async def test_lane_bounds_parallel_calls() -> None:
    lane = CpuLane("test", workers=2)
    running = 0
    peak = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return 1

    try:
        assert sum(await asyncio.gather(*(lane.run(work) for _ in range(6)))) == 6
        assert peak == 2
        assert lane.idle
    finally:
        lane.shutdown()


async def test_cache_loads_once_under_concurrency() -> None:
    models = LocalModelCache()
    loads = 0

    def load() -> object:
        nonlocal loads
        loads += 1
        time.sleep(0.05)
        return object()

    try:
        got = await asyncio.gather(*(models.aget("k", load) for _ in range(5)))
        assert loads == 1 and all(g is got[0] for g in got)
        assert models.loaded() == ["k"]
    finally:
        models.close()
