"""Process-wide realtime figures (served at ``GET /stats``): load and per-frame cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FrameTimes:
    """The most recent inbound-frame processing times, in a fixed-size ring (bounded memory)."""

    capacity: int = 200_000
    _values: np.ndarray = field(init=False, repr=False)
    _next: int = field(default=0, init=False)
    _filled: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        # Written now, not zero-filled on demand (calloc): the ring's memory is taken at
        # start-up instead of showing as slow growth while it fills.
        self._values = np.full(self.capacity, 0.0, dtype=np.float32)

    def add(self, seconds: float) -> None:
        self._values[self._next] = seconds
        self._next += 1
        if self._next == self.capacity:
            self._next = 0
            self._filled = True

    def percentiles_ms(self, prefix: str) -> dict[str, float]:
        values = self._values if self._filled else self._values[: self._next]
        if values.size == 0:
            return {}
        p50, p99, top = np.percentile(values, [50, 99, 100]) * 1000.0
        return {
            f"{prefix}_p50_ms": round(float(p50), 4),
            f"{prefix}_p99_ms": round(float(p99), 4),
            f"{prefix}_max_ms": round(float(top), 4),
        }


@dataclass
class RealtimeStats:
    #: CPU time the process spent on each inbound frame (decode, resample, VAD)...
    frame_cpu: FrameTimes = field(default_factory=FrameTimes)
    #: ...and the wall time, which also counts time the OS gave to other processes.
    frame_wall: FrameTimes = field(default_factory=FrameTimes)
    frames: int = 0
    #: Caller speech onset (VAD) -> `clear` sent, per barge-in.
    bargein: FrameTimes = field(default_factory=lambda: FrameTimes(capacity=10_000))
    active_calls: int = 0
    calls_started: int = 0
    max_outbound_gap_ms: float = 0.0
    outbound_gaps_over_40ms: int = 0

    def frame_processed(self, cpu_s: float, wall_s: float) -> None:
        self.frames += 1
        self.frame_cpu.add(cpu_s)
        self.frame_wall.add(wall_s)

    def call_started(self) -> None:
        self.active_calls += 1
        self.calls_started += 1

    def call_ended(self, max_gap_ms: float, gaps_over_40ms: int) -> None:
        self.active_calls -= 1
        self.max_outbound_gap_ms = max(self.max_outbound_gap_ms, max_gap_ms)
        self.outbound_gaps_over_40ms += gaps_over_40ms

    def snapshot(self) -> dict[str, float | int]:
        return {
            "active_calls": self.active_calls,
            "calls_started": self.calls_started,
            "max_outbound_gap_ms": round(self.max_outbound_gap_ms, 2),
            "outbound_gaps_over_40ms": self.outbound_gaps_over_40ms,
            "frames": self.frames,
            **self.frame_cpu.percentiles_ms("frame"),
            **self.frame_wall.percentiles_ms("frame_wall"),
            **self.bargein.percentiles_ms("bargein"),
        }
