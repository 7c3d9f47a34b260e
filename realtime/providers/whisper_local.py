"""Offline speech recognition: faster-whisper (tiny.en, int8, CPU) made to stream.

Whisper is a batch model, so streaming is built around it: Silero VAD watches
the caller's audio as it arrives; speech onset emits ``SpeechStartedEvent`` at
once (barge-in needs it fast); while the caller talks, an interim decode of
the utterance so far runs about every second, but only when no other decode
is waiting (interims are a nicety and must never delay someone's final); when
the VAD hears ``min_silence_ms`` of silence, or the turn manager calls
``finalize()``, the utterance is decoded and a final ``TranscriptEvent``
(``is_final`` and ``speech_final``) is emitted, then ``UtteranceEndEvent``.

Latency. The Whisper encoder always runs on a 30 s window, so a decode costs
about the same for 1 s or 3 s of speech. Measured here (2 cores,
``bench/local_providers.py``): 1.4-2.9 s utterances decode in p50 272 ms,
p95 289 ms one at a time, p50 328 ms with two decoding at once. Fed in real
time, the final arrived 630-650 ms after the caller stopped talking: the
VAD's ``min_silence_ms`` (300) plus one decode.

Decodes run on the shared ``LocalModelCache.whisper_lane`` (2 single-threaded
workers by default), never on the event loop. ``send_audio`` only buffers audio
and runs the VAD (~0.1 ms per 32 ms window), so it returns immediately.

Ordering: transcripts of one stream come out in utterance order. The
``SpeechStartedEvent`` of a new utterance is not held back behind the previous
utterance's final, so it can precede that final, as with hosted recognizers.
Every ``SpeechStartedEvent`` is eventually followed by a final for its audio
(text may be empty when Whisper heard only noise) and an ``UtteranceEndEvent``,
unless the stream is closed first.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt

from builder_engine.agent_config import AsrConfig
from realtime.media.vad import SileroModel, SileroVad, VadConfig, VadEventKind, VadSegmenter
from realtime.providers.base import (
    PCM16_16K,
    AsrEvent,
    AudioFormat,
    ProviderError,
    SpeechStartedEvent,
    TranscriptEvent,
    UtteranceEndEvent,
)
from realtime.providers.local_models import (
    DEFAULT_WHISPER_MODEL,
    CpuLane,
    LocalModelCache,
    LocalModelUnavailable,
    whisper_model_dir,
)

__all__ = ["Transcription", "WhisperLocalAsr", "WhisperLocalStream", "WhisperOptions"]

PROVIDER: Final = "whisper-local"
RATE: Final = 16000
_INSTALL_HINT: Final = "pip install 'builder-engine[local]'"


class _Segment(Protocol):
    """The part of ``faster_whisper.transcribe.Segment`` used here (the package ships no types)."""

    text: str
    avg_logprob: float


class _WhisperModel(Protocol):
    """The part of ``faster_whisper.WhisperModel`` used here."""

    def transcribe(
        self, audio: npt.NDArray[np.float32], **options: Any
    ) -> tuple[Iterable[_Segment], Any]: ...


@dataclass(frozen=True, slots=True)
class WhisperOptions:
    """Streaming behaviour of ``WhisperLocalAsr``.

    ``preroll_ms``: audio kept before the VAD's onset, so a soft first consonant
    is not clipped. ``tail_ms``: audio kept after the first silent window.
    ``interim_interval_s``: seconds of speech between interim decodes (``None``
    disables them). ``max_utterance_s``: a longer monologue is cut into finals
    (``speech_final=False``) so memory and decode time stay bounded.
    """

    vad: VadConfig = field(default_factory=VadConfig)
    interim_interval_s: float | None = 1.0
    preroll_ms: float = 250.0
    tail_ms: float = 150.0
    max_utterance_s: float = 25.0
    beam_size: int = 1

    def __post_init__(self) -> None:
        if self.interim_interval_s is not None and self.interim_interval_s <= 0:
            raise ValueError("interim_interval_s must be positive or None")
        if self.preroll_ms < 0 or self.tail_ms < 0:
            raise ValueError("preroll_ms and tail_ms must be >= 0")
        if not 1.0 <= self.max_utterance_s <= 30.0:
            # Beyond 30 s Whisper would chunk internally and the decode time doubles.
            raise ValueError("max_utterance_s must be within 1..30")
        if self.beam_size < 1:
            raise ValueError("beam_size must be >= 1")


@dataclass(frozen=True, slots=True)
class Transcription:
    text: str
    confidence: float | None  # exp(mean token log-probability) over segments
    audio_s: float
    decode_s: float  # wall time of the decode in its worker thread


class WhisperLocalAsr:
    """``AsrProvider`` running faster-whisper in-process. One per agent; cheap to create.

    The model itself lives in the ``LocalModelCache`` and is shared by every
    stream and every agent of the process.
    """

    name = PROVIDER
    input_format: AudioFormat = PCM16_16K

    def __init__(
        self,
        cache: LocalModelCache,
        *,
        model: str | None = None,
        options: WhisperOptions | None = None,
    ) -> None:
        self._cache = cache
        # Resolved now so a missing package or unknown model fails at configuration
        # time, before a caller is on the line.
        self._model_dir = whisper_model_dir(model)
        self._model_name = model or DEFAULT_WHISPER_MODEL
        self.options: Final = options or WhisperOptions()

    @classmethod
    def from_config(
        cls,
        config: AsrConfig,
        cache: LocalModelCache,
        *,
        options: WhisperOptions | None = None,
    ) -> WhisperLocalAsr:
        """Provider for an agent's ``asr`` section. ``base_url`` does not apply and is ignored."""
        if config.provider != PROVIDER:
            raise ValueError(f"AsrConfig.provider is {config.provider!r}, not {PROVIDER!r}")
        return cls(cache, model=config.model, options=options)

    async def warm_up(self) -> None:
        """Load the model (and one VAD engine) now, e.g. at worker start, not at the first call."""
        await self._model()
        await self._vad_model()

    async def _vad_model(self) -> SileroModel:
        # One Silero session for every stream of the process (each keeps its own state).
        return await self._cache.aget("silero-vad", SileroModel)

    async def open_stream(
        self, *, language: str, keywords: Sequence[str] = ()
    ) -> WhisperLocalStream:
        model = await self._model()
        lang = language.split("-")[0].lower()
        if self._model_name.endswith(".en") and lang != "en":
            raise ProviderError(
                PROVIDER,
                f"model {self._model_name!r} only understands English, agent language is"
                f" {language!r}",
                retryable=False,
            )
        # Keywords become Whisper's text prompt (its way of biasing vocabulary).
        # faster-whisper's ``hotwords`` made tiny.en return nothing on a short phrase here.
        prompt = ", ".join(k.strip() for k in keywords if k.strip()) or None
        lane = self._cache.whisper_lane
        vad = SileroVad(RATE, model=await self._vad_model())
        return WhisperLocalStream(self, model, lane, vad, language=lang, prompt=prompt)

    async def transcribe(
        self,
        audio: npt.NDArray[np.float32],
        *,
        language: str = "en",
        prompt: str | None = None,
    ) -> Transcription:
        """Decode one complete utterance (float32, 16 kHz mono) on the whisper lane."""
        model = await self._model()
        return await self._decode(model, audio, language, prompt)

    async def _decode(
        self,
        model: _WhisperModel,
        audio: npt.NDArray[np.float32],
        language: str,
        prompt: str | None,
    ) -> Transcription:
        beam = self.options.beam_size

        def work() -> Transcription:
            started = time.perf_counter()
            segments, _info = model.transcribe(
                audio,
                language=language,
                beam_size=beam,
                # One temperature: no fallback re-decodes, so latency stays predictable.
                temperature=0.0,
                # The VAD already cut the utterance; Whisper's own VAD would add latency.
                vad_filter=False,
                condition_on_previous_text=False,
                without_timestamps=True,
                initial_prompt=prompt,
            )
            # The decode is lazy: it happens while the segments are iterated, so do
            # that here in the worker thread.
            parts = list(segments)
            text = "".join(s.text for s in parts).strip()
            confidence = math.exp(sum(s.avg_logprob for s in parts) / len(parts)) if parts else None
            return Transcription(text, confidence, audio.size / RATE, time.perf_counter() - started)

        try:
            return await self._cache.whisper_lane.run(work)
        except (asyncio.CancelledError, ProviderError):
            raise
        except Exception as exc:
            raise ProviderError(PROVIDER, f"decode failed: {exc!r}") from exc

    async def _model(self) -> _WhisperModel:
        limits = self._cache.limits
        path = self._model_dir

        def load() -> _WhisperModel:
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise LocalModelUnavailable(
                    PROVIDER, f"faster-whisper is not installed: {_INSTALL_HINT}"
                ) from exc
            model: _WhisperModel = WhisperModel(
                str(path),
                device="cpu",
                compute_type="int8",
                cpu_threads=limits.whisper_cpu_threads,
                # CTranslate2 runs at most num_workers decodes in parallel; match the lane.
                num_workers=limits.whisper_workers,
                local_files_only=True,
            )
            return model

        key = f"whisper:{path}"
        try:
            return await self._cache.aget(key, load)
        except ProviderError:
            raise
        except Exception as exc:
            raise LocalModelUnavailable(PROVIDER, f"cannot load {path}: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class _Job:
    kind: Literal["interim", "final"]
    audio: npt.NDArray[np.float32]
    start: int  # stream sample index of audio[0]
    speech_end: int  # sample index where speech ended (audio may run a little past it)
    speech_final: bool  # the speaker stopped (VAD or finalize), not a max-length cut


class WhisperLocalStream:
    """One call's recognition session (``AsrStream``). Create with ``open_stream``."""

    def __init__(
        self,
        asr: WhisperLocalAsr,
        model: _WhisperModel,
        lane: CpuLane,
        vad: SileroVad,
        *,
        language: str,
        prompt: str | None,
    ) -> None:
        self._asr = asr
        self._model = model
        self._lane = lane
        self._language = language
        self._prompt = prompt
        opts = asr.options
        self._opts = opts
        self._vad = vad
        self._segmenter = VadSegmenter(opts.vad)
        self._preroll = int(opts.preroll_ms * RATE / 1000)
        self._tail = int(opts.tail_ms * RATE / 1000)
        self._max_utterance = int(opts.max_utterance_s * RATE)
        self._interim_every = (
            None if opts.interim_interval_s is None else int(opts.interim_interval_s * RATE)
        )
        # While silent, keep enough audio to cover the preroll plus the speech the
        # segmenter needs before it confirms an onset.
        self._keep_silent = self._preroll + int((opts.vad.min_speech_ms + 100.0) * RATE / 1000)

        self._audio = _PcmBuffer(RATE * 4)
        self._received = 0  # samples received so far (stream time * RATE)
        self._odd = b""  # half a sample left over from an odd-length chunk
        self._utt_start: int | None = None  # sample index of the open utterance
        self._next_interim = 0

        self._events: asyncio.Queue[AsrEvent | BaseException | None] = asyncio.Queue()
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._decoding = False
        self._closed = False
        self._worker = asyncio.create_task(self._run_jobs(), name="whisper-local-stream")

    # ------------------------------------------------------------ AsrStream

    async def send_audio(self, audio: bytes, *, voiced: bool = True) -> None:
        """PCM16 little-endian, 16 kHz mono, any chunk size. Never waits for a decode."""
        if self._closed:
            return
        data = self._odd + audio
        whole = len(data) - len(data) % 2
        self._odd = data[whole:]
        if not whole:
            return
        pcm = np.frombuffer(data[:whole], dtype="<i2").astype(np.int16)
        self._audio.append(pcm)
        self._received += pcm.size
        for probability in self._vad.process_windows(pcm):
            event = self._segmenter.push(probability, self._vad.window_ms)
            if event is None:
                continue
            at = int(event.at_ms * RATE / 1000)
            if event.kind is VadEventKind.SPEECH_START:
                self._open_utterance(at)
            elif self._utt_start is not None:
                self._close_utterance(at, min(self._received, at + self._tail), speech_final=True)
        self._maybe_cut_or_interim()
        self._trim()

    def events(self) -> AsyncIterator[AsrEvent]:
        return self._iterate_events()

    async def finalize(self) -> None:
        """End the open utterance now and decode it. No-op when no speech is open (a
        final already queued by the VAD still arrives)."""
        if self._closed or self._utt_start is None:
            return
        self._segmenter.finish()  # the segmenter must not end this utterance a second time
        self._close_utterance(self._received, self._received, speech_final=True)

    async def close(self) -> None:
        """Stop: queued decodes are dropped and ``events()`` ends."""
        if self._closed:
            return
        self._closed = True
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            # Our own cancellation of the worker, unless close() itself was cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._vad.close()
            self._events.put_nowait(None)

    # ------------------------------------------------------------ segmentation

    def _open_utterance(self, at: int) -> None:
        self._utt_start = max(self._audio.base, at - self._preroll)
        if self._interim_every is not None:
            self._next_interim = self._utt_start + self._preroll + self._interim_every
        self._events.put_nowait(SpeechStartedEvent(at_s=at / RATE))

    def _close_utterance(self, speech_end: int, end: int, *, speech_final: bool) -> None:
        assert self._utt_start is not None
        start = self._utt_start
        job = _Job("final", self._slice(start, end), start, speech_end, speech_final)
        # A final supersedes interims of this stream that have not started.
        kept = [j for j in self._jobs if j.kind == "final"]
        self._jobs.clear()
        self._jobs.extend(kept)
        self._jobs.append(job)
        self._wake.set()
        self._utt_start = None if speech_final else end
        if self._interim_every is not None:
            self._next_interim = end + self._interim_every

    def _maybe_cut_or_interim(self) -> None:
        start = self._utt_start
        if start is None:
            return
        if self._received - start >= self._max_utterance:
            # Still talking: cut here, keep listening (no new SpeechStarted, no UtteranceEnd).
            self._close_utterance(self._received, self._received, speech_final=False)
            return
        if self._interim_every is None or self._received < self._next_interim:
            return
        self._next_interim = self._received + self._interim_every
        if (
            not self._jobs
            and not self._decoding
            and self._lane.idle
            # Mid-word only: when the caller may be stopping, the final is near and an
            # interim decode now would only delay it.
            and self._vad.probability >= self._opts.vad.start_threshold
        ):
            now = self._received
            job = _Job("interim", self._slice(start, now), start, now, False)
            self._jobs.append(job)
            self._wake.set()

    def _slice(self, start: int, end: int) -> npt.NDArray[np.float32]:
        return self._audio.get(start, end).astype(np.float32) / np.float32(32768.0)

    def _trim(self) -> None:
        keep_from = self._received - self._keep_silent
        if self._utt_start is not None:
            keep_from = min(keep_from, self._utt_start)
        if keep_from - self._audio.base > RATE:  # trim in >1 s steps, not per frame
            self._audio.drop_before(keep_from)

    # ------------------------------------------------------------ decoding

    async def _run_jobs(self) -> None:
        try:
            while True:
                while not self._jobs:
                    self._wake.clear()
                    await self._wake.wait()
                job = self._jobs.popleft()
                self._decoding = True
                try:
                    result = await self._asr._decode(
                        self._model, job.audio, self._language, self._prompt
                    )
                finally:
                    self._decoding = False
                self._emit(job, result)
        except ProviderError as exc:
            self._events.put_nowait(exc)

    def _emit(self, job: _Job, result: Transcription) -> None:
        start_s = job.start / RATE
        end_s = start_s + job.audio.size / RATE
        if job.kind == "interim":
            if result.text:
                self._events.put_nowait(
                    TranscriptEvent(result.text, False, False, result.confidence, start_s, end_s)
                )
            return
        self._events.put_nowait(
            TranscriptEvent(result.text, True, job.speech_final, result.confidence, start_s, end_s)
        )
        if job.speech_final:
            self._events.put_nowait(UtteranceEndEvent(last_word_end_s=job.speech_end / RATE))

    async def _iterate_events(self) -> AsyncIterator[AsrEvent]:
        while True:
            item = await self._events.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _PcmBuffer:
    """Recent PCM16 samples addressed by stream sample index.

    Appending a 20 ms frame must not copy the whole utterance (up to 25 s), so
    the storage grows by doubling and only trimming shifts data, in >1 s steps.
    """

    def __init__(self, capacity: int) -> None:
        self._data = np.zeros(capacity, dtype=np.int16)
        self._size = 0
        self.base = 0  # stream index of the oldest sample held

    def append(self, pcm: npt.NDArray[np.int16]) -> None:
        need = self._size + pcm.size
        if need > self._data.size:
            grown = np.zeros(max(need, 2 * self._data.size), dtype=np.int16)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : need] = pcm
        self._size = need

    def get(self, start: int, end: int) -> npt.NDArray[np.int16]:
        """A copy of samples ``start <= i < end`` (clamped to what is held)."""
        lo = min(max(0, start - self.base), self._size)
        hi = min(max(lo, end - self.base), self._size)
        return self._data[lo:hi].copy()

    def drop_before(self, index: int) -> None:
        n = min(max(0, index - self.base), self._size)
        self._data[: self._size - n] = self._data[n : self._size]
        self._size -= n
        self.base += n
