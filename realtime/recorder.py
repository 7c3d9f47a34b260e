"""Per-call stereo recording (caller left, agent right) written to a WAV file as the call goes.

The caller's frames arrive continuously (carriers send silence too), so the count of
caller samples is the recording's clock; agent audio is placed at the caller-clock
position when it was sent. Audio is written every second, so memory stays flat
however long the call lasts.

A recording that cannot be written (a full disk) is given up with one logged error; the
call goes on without it.

One file per session: a call that moved here from a realtime worker that died has the
first session's recording already, so this session writes the next segment beside it
(``{call_id}.part2.wav``, ...; builder_engine/recordings.py), and the post-call
finalization joins them.
"""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from builder_engine.recordings import create_segment

FLUSH_SECONDS = 1.0

log = logging.getLogger(__name__)


class StereoRecorder:
    def __init__(self, path: Path, sample_rate: int = 8000) -> None:
        """``path``: the call's recording (``{call_id}.wav``). When it is there already
        (an earlier session of the call), this session's audio goes to the next free
        segment instead; ``self.path`` is the file written."""
        self.path, self._file = create_segment(path)
        self.sample_rate = sample_rate
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._written = 0  # samples per channel already on disk
        self._caller: list[npt.NDArray[np.int16]] = []
        self._caller_len = 0  # samples per channel pending, caller side
        self._agent = np.zeros(0, dtype=np.int16)  # pending agent samples from _written on
        self._closed = False
        self.failed = False  # a write failed: the rest of the call is not recorded

    @property
    def caller_samples(self) -> int:
        return self._written + self._caller_len

    def add_caller(self, pcm: npt.NDArray[np.int16]) -> None:
        if self._closed or self.failed:
            return
        self._caller.append(pcm)
        self._caller_len += len(pcm)
        if self._caller_len >= self.sample_rate * FLUSH_SECONDS:
            self._flush(self._caller_len)

    def add_agent(self, pcm: npt.NDArray[np.int16], at_sample: int | None = None) -> None:
        """Agent audio that started playing at caller-clock ``at_sample`` (default: now)."""
        if self._closed or self.failed:
            return
        start = (self.caller_samples if at_sample is None else at_sample) - self._written
        start = max(start, 0)
        end = start + len(pcm)
        if end > len(self._agent):
            grown = np.zeros(end, dtype=np.int16)
            grown[: len(self._agent)] = self._agent
            self._agent = grown
        # Overlapping agent audio (a cleared answer, then a new one) is overwritten.
        self._agent[start:end] = pcm

    def _flush(self, samples: int) -> None:
        caller = np.concatenate(self._caller) if self._caller else np.zeros(0, dtype=np.int16)
        samples = min(samples, len(caller))
        left = caller[:samples]
        right = np.zeros(samples, dtype=np.int16)
        agent_part = self._agent[:samples]
        right[: len(agent_part)] = agent_part
        frames = np.empty(samples * 2, dtype="<i2")
        frames[0::2] = left
        frames[1::2] = right
        try:
            self._wav.writeframes(frames.tobytes())
        except OSError as exc:
            self._give_up(exc)
            return
        self._written += samples
        rest = caller[samples:]
        self._caller = [rest] if len(rest) else []
        self._caller_len = len(rest)
        self._agent = self._agent[samples:].copy()

    def close(self) -> Path:
        if not self._closed:
            if not self.failed:
                # Keep the agent's last words even when the caller's audio stopped first.
                pending = max(self._caller_len, len(self._agent))
                if pending > self._caller_len:
                    self._caller.append(np.zeros(pending - self._caller_len, dtype=np.int16))
                    self._caller_len = pending
                self._flush(self._caller_len)
            try:
                self._wav.close()
            except OSError as exc:  # the header's final sizes
                self._give_up(exc)
            try:
                self._file.close()  # wave closes only the files it opened itself
            except OSError as exc:  # buffered bytes that could not be written
                self._give_up(exc)
            self._closed = True
        return self.path

    def _give_up(self, exc: OSError) -> None:
        if not self.failed:
            self.failed = True
            log.error(
                "recording %s: writing failed, not recording any more: %s", self.path.name, exc
            )
        self._caller, self._caller_len = [], 0
        self._agent = np.zeros(0, dtype=np.int16)

    @property
    def duration_s(self) -> float:
        return self.caller_samples / self.sample_rate
