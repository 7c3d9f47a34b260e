"""Outbound audio for one call: paced at real time with a small lead, tracked to what was heard.

The pacer keeps ``lead_ms`` of audio buffered at the far end and otherwise sends each
frame when its playback time comes, measured from one absolute clock per talk spurt,
so there is no drift and no gap from per-chunk sleeps. A mark follows every spoken
segment (sentence); the far end echoes it when that audio has played, which is how
the session learns what the caller actually heard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

#: Audio kept buffered at the far end. The pacer's loop can be held up by anything the
#: process does - at 100 calls the cyclic garbage collector's middle generation alone
#: took 65-111 ms a pass - and a hold-up longer than the lead is a gap the caller hears.
#: The far end plays what it has and a `clear` drops it all, so a longer lead costs
#: neither latency nor barge-in: 100 ms covers most of those passes (60 ms covered none).
LEAD_MS = 100.0
#: Silence at the far end longer than this is the end of an answer, not a gap in one.
ANSWER_BREAK_S = 1.0


class OutboundMedia(Protocol):
    async def send_audio(self, frame: bytes) -> None: ...

    async def send_mark(self, name: str) -> None: ...

    async def send_clear(self) -> None: ...


@dataclass
class SpokenSegment:
    """A piece of the agent's answer (a sentence) and what became of its audio."""

    id: int
    text: str
    #: The talk spurt it belongs to: after a barge-in, audio of an older one is dropped,
    #: even if its producer adds some before it has stopped.
    generation: int = 0
    queued_bytes: int = 0
    sent_bytes: int = 0
    complete: bool = False
    played: bool = False
    first_sent_at: float | None = None
    played_at: float | None = None

    @property
    def mark_name(self) -> str:
        return f"seg-{self.id}"


@dataclass(frozen=True)
class _Frame:
    generation: int
    segment: SpokenSegment
    audio: bytes


@dataclass(frozen=True)
class _MarkItem:
    generation: int
    segment: SpokenSegment


@dataclass
class PlayoutStats:
    frames_sent: int = 0
    #: How late a frame went out after the one before it, beyond one frame's duration:
    #: the largest, and how many were over 40 ms (the far end's buffer is the lead).
    max_late_ms: float = 0.0
    late_over_40ms: int = 0
    #: The far end ran out of audio in the middle of an answer (it is silence the caller
    #: hears): the longest such gap inside a segment - the pacer was held up past its
    #: lead, or the segment's audio came in late - and between two segments - the next
    #: sentence's audio came too late (a tool call or a hold in mid-answer counts here).
    max_gap_in_segment_ms: float = 0.0
    max_gap_between_segments_ms: float = 0.0
    _last_send: float | None = field(default=None, repr=False)


def cut_at_fraction(text: str, fraction: float) -> str:
    """The words of ``text`` spoken in the first ``fraction`` of its audio (whole words)."""
    words = text.split()
    keep = int(len(words) * max(0.0, min(1.0, fraction)))
    return " ".join(words[:keep])


class Playout:
    def __init__(
        self,
        transport: OutboundMedia,
        *,
        frame_bytes: int,
        frame_ms: float = 20.0,
        lead_ms: float = LEAD_MS,
        silence_byte: int = 0xFF,
        clock: Callable[[], float] = time.monotonic,
        on_first_frame: Callable[[SpokenSegment, float], None] | None = None,
    ) -> None:
        self._transport = transport
        self._frame_bytes = frame_bytes
        self._frame_s = frame_ms / 1000.0
        self._lead_s = lead_ms / 1000.0
        self._silence = bytes([silence_byte]) * frame_bytes
        self._bytes_per_s = frame_bytes / self._frame_s
        self._clock = clock
        self._on_first_frame = on_first_frame
        self._queue: asyncio.Queue[_Frame | _MarkItem] = asyncio.Queue()
        self._generation = 0
        self._segments: list[SpokenSegment] = []
        self._next_id = 0
        self._remainder: dict[int, bytes] = {}
        self._spurt_start: float | None = None
        self._spurt_sent_s = 0.0
        self._pending_marks = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.stats = PlayoutStats()

    # ------------------------------------------------------------ producing

    def start_segment(self, text: str) -> SpokenSegment:
        segment = SpokenSegment(id=self._next_id, text=text, generation=self._generation)
        self._next_id += 1
        self._segments.append(segment)
        return segment

    def add_audio(self, segment: SpokenSegment, audio: bytes) -> None:
        data = self._remainder.pop(segment.id, b"") + audio
        usable = len(data) - len(data) % self._frame_bytes
        step = self._frame_bytes
        for offset in range(0, usable, step):
            self._put(_Frame(segment.generation, segment, data[offset : offset + step]))
        if usable < len(data):
            self._remainder[segment.id] = data[usable:]
        segment.queued_bytes += len(audio)

    def end_segment(self, segment: SpokenSegment) -> None:
        tail = self._remainder.pop(segment.id, b"")
        if tail:
            padded = tail + self._silence[len(tail) :]
            self._put(_Frame(segment.generation, segment, padded))
        segment.complete = True
        if segment.generation != self._generation:
            return  # interrupted: no mark will come back for it
        self._pending_marks += 1
        self._put(_MarkItem(segment.generation, segment))

    def _put(self, item: _Frame | _MarkItem) -> None:
        if item.generation != self._generation or self._closed:
            return  # audio of an interrupted talk spurt, or of a call that has ended
        self._idle.clear()
        self._queue.put_nowait(item)

    # ------------------------------------------------------------ far end

    def on_mark(self, name: str) -> SpokenSegment | None:
        """A mark came back: the segment's audio has been played. Returns that segment."""
        for segment in self._segments:
            if segment.mark_name == name and not segment.played:
                segment.played = True
                segment.played_at = self._clock()
                self._pending_marks = max(0, self._pending_marks - 1)
                if self._pending_marks == 0 and self._queue.empty():
                    self._idle.set()
                return segment
        return None

    @property
    def playing(self) -> bool:
        """Audio queued, in flight, or not yet confirmed played."""
        return not self._idle.is_set()

    async def wait_played(self) -> None:
        """Until everything queued has been sent and confirmed played by its mark. Once the
        playout is closed (the call ended) this raises ``CancelledError``: nothing more
        will be played, and nobody may be left waiting for it."""
        await self._idle.wait()
        if self._closed:
            raise asyncio.CancelledError("the call's playout is closed")

    def close(self) -> None:
        """The call has ended: wake whoever waits for audio to be played."""
        self._closed = True
        self._idle.set()
        # The callback is the session's method: holding it past the call would keep the
        # session and everything it holds in a cycle, waiting for a full GC pass.
        self._on_first_frame = None

    async def interrupt(self) -> str:
        """Barge-in: drop what is queued, tell the far end to drop its buffer, and
        return the text the caller heard of the unfinished answer."""
        now = self._clock()
        self._generation += 1
        while not self._queue.empty():
            self._queue.get_nowait()
        self._remainder.clear()
        await self._transport.send_clear()
        heard = self.heard_text(now)
        # Marks of cleared audio come back now; they must not count as played.
        self._segments = []
        self._pending_marks = 0
        self._spurt_start = None
        self._idle.set()
        return heard

    def heard_text(self, at: float) -> str:
        """What of the current segments had been played at time ``at``."""
        parts: list[str] = []
        previous_played_at: float | None = None
        for segment in self._segments:
            if segment.played:
                parts.append(segment.text)
                previous_played_at = segment.played_at
                continue
            if segment.first_sent_at is None or segment.sent_bytes == 0:
                break
            started = max(segment.first_sent_at, previous_played_at or segment.first_sent_at)
            # The words are spread over all of the segment's audio, not just the part sent
            # so far (measured against that, most of a sentence counted as heard a moment
            # after it began); and audio not yet sent cannot have been heard.
            sent_s = segment.sent_bytes / self._bytes_per_s
            total_s = max(segment.queued_bytes / self._bytes_per_s, sent_s)
            played_s = min(at - started, sent_s)
            fraction = played_s / total_s if total_s > 0 else 0.0
            partial = cut_at_fraction(segment.text, fraction)
            if partial:
                parts.append(partial)
            break
        return " ".join(parts)

    def forget_played(self) -> None:
        """Drop bookkeeping of segments already played (a new answer begins)."""
        self._segments = [s for s in self._segments if not s.played]

    # ------------------------------------------------------------ pacing

    async def run(self) -> None:
        """The pacer; runs for the whole call."""
        while True:
            item = await self._queue.get()
            if item.generation != self._generation:
                continue
            if isinstance(item, _MarkItem):
                await self._transport.send_mark(item.segment.mark_name)
                continue
            now = self._clock()
            if self._spurt_start is None or now > self._spurt_start + self._spurt_sent_s:
                # Nothing buffered at the far end any more: a new talk spurt starts now.
                if self._spurt_start is not None:
                    self._count_gap(item.segment, now - self._spurt_start - self._spurt_sent_s)
                self._spurt_start = now
                self._spurt_sent_s = 0.0
            due = self._spurt_start + self._spurt_sent_s - self._lead_s
            if due > now:
                await asyncio.sleep(due - now)
                if item.generation != self._generation:
                    continue  # interrupted while waiting
            await self._transport.send_audio(item.audio)
            sent_at = self._clock()
            self._spurt_sent_s += self._frame_s
            self._account(item.segment, sent_at)

    def _count_gap(self, segment: SpokenSegment, gap_s: float) -> None:
        if gap_s >= ANSWER_BREAK_S:
            return  # the answer had ended: this is the next one
        gap_ms = gap_s * 1000.0
        stats = self.stats
        if segment.sent_bytes:
            stats.max_gap_in_segment_ms = max(stats.max_gap_in_segment_ms, gap_ms)
        else:
            stats.max_gap_between_segments_ms = max(stats.max_gap_between_segments_ms, gap_ms)

    def _account(self, segment: SpokenSegment, sent_at: float) -> None:
        first = segment.first_sent_at is None
        if first:
            segment.first_sent_at = sent_at
        segment.sent_bytes += self._frame_bytes
        stats = self.stats
        if stats._last_send is not None and self._spurt_sent_s > self._frame_s:
            late_ms = (sent_at - stats._last_send - self._frame_s) * 1000.0
            stats.max_late_ms = max(stats.max_late_ms, late_ms)
            if late_ms > 40.0:
                stats.late_over_40ms += 1
        stats._last_send = sent_at
        stats.frames_sent += 1
        if first and self._on_first_frame is not None:
            self._on_first_frame(segment, sent_at)
