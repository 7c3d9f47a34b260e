"""Process-wide realtime figures (served at ``GET /stats``): load and per-frame cost."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from realtime.playout import PlayoutStats

#: One inbound frame in this many is timed (per call). The CPU clock is a system call
#: (~0.6 us idle, several under load): timing every frame of 100 calls cost more than
#: the codec. A sample of one in eight still gives thousands of frames a second.
FRAME_SAMPLE_EVERY = 8

#: Weight of each new loop-lag sample (one per ~20 ms) in the smoothed lag: ~2 s of memory.
LAG_SMOOTHING = 0.01


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
        p50, p95, p99, top = np.percentile(values, [50, 95, 99, 100]) * 1000.0
        return {
            f"{prefix}_p50_ms": round(float(p50), 4),
            f"{prefix}_p95_ms": round(float(p95), 4),
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
    #: Outbound frames sent late (beyond their frame's duration after the one before).
    max_outbound_late_ms: float = 0.0
    outbound_late_over_40ms: int = 0
    #: The far end ran out of the agent's audio mid-answer (see ``PlayoutStats``).
    max_outbound_gap_in_segment_ms: float = 0.0
    max_outbound_gap_between_segments_ms: float = 0.0

    #: How late the event loop ran a 20 ms timer, and of the late ones (over 20 ms late),
    #: how much of the lateness this thread spent running code rather than waiting for
    #: the CPU: busy means our code held the loop, idle means the OS ran something else.
    loop_lag: FrameTimes = field(default_factory=lambda: FrameTimes(capacity=50_000))
    late_loop_busy_s: float = 0.0
    late_loop_waiting_s: float = 0.0
    #: The loop's lag, smoothed over about the last two seconds (what ``GET /readyz``
    #: judges the process's load by).
    recent_loop_lag_s: float = 0.0

    async def watch_loop(self, interval_s: float = 0.02) -> None:
        """Run for the life of the process: measures ``loop_lag``."""
        loop = asyncio.get_running_loop()
        while True:
            due, cpu = loop.time() + interval_s, time.thread_time()
            await asyncio.sleep(interval_s)
            late = loop.time() - due
            self.loop_lag.add(late)
            self.recent_loop_lag_s += LAG_SMOOTHING * (late - self.recent_loop_lag_s)
            if late > interval_s:
                busy = min(time.thread_time() - cpu, late + interval_s)
                self.late_loop_busy_s += busy
                self.late_loop_waiting_s += max(0.0, late + interval_s - busy)

    def frame_processed(self, cpu_s: float, wall_s: float) -> None:
        """A timed frame's cost (``frames`` counts every frame, timed or not)."""
        self.frame_cpu.add(cpu_s)
        self.frame_wall.add(wall_s)

    def call_started(self) -> None:
        self.active_calls += 1
        self.calls_started += 1

    def call_ended(self, outbound: PlayoutStats) -> None:
        self.active_calls -= 1
        self.max_outbound_late_ms = max(self.max_outbound_late_ms, outbound.max_late_ms)
        self.outbound_late_over_40ms += outbound.late_over_40ms
        self.max_outbound_gap_in_segment_ms = max(
            self.max_outbound_gap_in_segment_ms, outbound.max_gap_in_segment_ms
        )
        self.max_outbound_gap_between_segments_ms = max(
            self.max_outbound_gap_between_segments_ms, outbound.max_gap_between_segments_ms
        )

    def snapshot(self) -> dict[str, float | int]:
        return {
            "active_calls": self.active_calls,
            "calls_started": self.calls_started,
            "max_outbound_late_ms": round(self.max_outbound_late_ms, 2),
            "outbound_late_over_40ms": self.outbound_late_over_40ms,
            "max_outbound_gap_in_segment_ms": round(self.max_outbound_gap_in_segment_ms, 2),
            "max_outbound_gap_between_segments_ms": round(
                self.max_outbound_gap_between_segments_ms, 2
            ),
            "frames": self.frames,
            **self.frame_cpu.percentiles_ms("frame"),
            **self.frame_wall.percentiles_ms("frame_wall"),
            **self.bargein.percentiles_ms("bargein"),
            **self.loop_lag.percentiles_ms("loop_lag"),
            "late_loop_busy_s": round(self.late_loop_busy_s, 3),
            "late_loop_waiting_s": round(self.late_loop_waiting_s, 3),
        }


class FrameMeter:
    """Times one inbound frame in ``every`` of one call, CPU and wall, into the process's
    stats; the other frames cost a counter. ``pause``/``resume`` leave out a wait inside
    the frame (the batched VAD run) and charge the frame its share of it instead."""

    def __init__(self, stats: RealtimeStats, every: int = FRAME_SAMPLE_EVERY) -> None:
        self._stats = stats
        self._every = every
        self._count = 0
        self._cpu_s = 0.0
        self._wall_s = 0.0
        self._timing = False

    def begin(self) -> None:
        self._stats.frames += 1
        self._timing = self._count % self._every == 0
        self._count += 1
        if self._timing:
            self._cpu_s, self._wall_s = -time.thread_time(), -time.perf_counter()

    def pause(self) -> None:
        if self._timing:
            self._cpu_s += time.thread_time()
            self._wall_s += time.perf_counter()

    def resume(self, charged_s: float) -> None:
        if self._timing:
            self._cpu_s += charged_s - time.thread_time()
            self._wall_s += charged_s - time.perf_counter()

    def end(self) -> None:
        if self._timing:
            self._timing = False
            self._stats.frame_processed(
                self._cpu_s + time.thread_time(), self._wall_s + time.perf_counter()
            )
