"""Full garbage collections in the realtime process, after calls end, on a schedule.

The realtime process raises the cyclic collector's thresholds and freezes its start-up
objects (workers/cli.py), so the audio path is not interrupted hundreds of times a second.
The price: full passes come minutes apart, and further apart as live calls grow the heap,
while every finished call leaves reference cycles behind (its provider clients, HTTP and
websocket stacks, tasks). In a churn soak (calls ending and starting all the time) that
garbage grew the process by ~17 KB per call; a full collection now and then keeps it flat.

A pass walks every object the collector tracks, about 1 us each on the test machine
(``/stats`` reports how long the passes took): one pass at most every ``interval_s``, and
only when a call has ended since the last one. The first pass also freezes what it leaves
(as workers/cli.py does after the imports): the objects the first calls created to stay -
the provider SDKs' lazily imported modules, their models and caches, most of what a pass
would walk - are not walked again. The price: cycles among objects of the calls live at
that moment are never collected (a few KB per call, once).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

#: At most one full collection this often (s).
COLLECT_EVERY_S = 60.0


class CallGarbageCollector:
    """``calls_ended``: how many calls have ended in this process so far."""

    def __init__(
        self, calls_ended: Callable[[], int], *, interval_s: float = COLLECT_EVERY_S
    ) -> None:
        self._calls_ended = calls_ended
        self._interval_s = interval_s
        self._collected_after = calls_ended()
        self.passes = 0
        self.freed = 0  # unreachable objects found
        self.last_ms = 0.0
        self.max_ms = 0.0

    def collect_if_calls_ended(self) -> bool:
        ended = self._calls_ended()
        if ended == self._collected_after:
            return False
        self._collected_after = ended
        started = time.perf_counter()
        self.freed += gc.collect()
        if self.passes == 0:
            gc.freeze()
        self.last_ms = (time.perf_counter() - started) * 1000.0
        self.max_ms = max(self.max_ms, self.last_ms)
        self.passes += 1
        return True

    async def run(self) -> None:
        """For the life of the process."""
        while True:
            await asyncio.sleep(self._interval_s)
            self.collect_if_calls_ended()

    def snapshot(self) -> dict[str, float | int]:
        return {
            "full_gc_passes": self.passes,
            "full_gc_freed": self.freed,
            "full_gc_last_ms": round(self.last_ms, 2),
            "full_gc_max_ms": round(self.max_ms, 2),
        }
