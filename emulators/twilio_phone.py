"""Twilio's side of a Media Streams websocket, for tests and benchmarks.

``TwilioPhone`` connects to a `/media/twilio` endpoint the way Twilio does after
``<Connect><Stream>``: ``connected``, ``start`` (with the TwiML parameters), then one
20 ms mu-law frame every 20 ms for the whole call - digital silence when the caller says
nothing (or ``line_noise``, looped). The agent's audio is "played" on a clock: marks come
back when the audio sent before them has played, and ``clear`` drops the buffer and
returns every pending mark at once, as Twilio does. Whenever the buffer runs dry in the
middle of an answer, the caller hears a gap: ``underruns`` keeps their lengths.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import secrets
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime.media.mulaw import pcm16_to_ulaw

FRAME_MS = 20
FRAME_BYTES = 160
SILENCE = b"\xff" * FRAME_BYTES
#: Audio arriving this long after the last is the start of another answer, not a gap.
ANSWER_BREAK_S = 1.0


@dataclass(frozen=True)
class Received:
    at: float
    event: str  # media | mark | clear
    payload: bytes = b""
    name: str = ""


@dataclass
class Utterance:
    """When the caller's words went out: ``ended_at`` is the send time of the last frame."""

    frames: int
    started_at: float | None = None
    ended_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TwilioPhone:
    def __init__(
        self,
        url: str,
        *,
        parameters: dict[str, str],
        call_sid: str | None = None,
        stream_sid: str | None = None,
        history: int | None = None,
        line_noise: bytes | None = None,
        auth_token: str | None = None,
    ) -> None:
        """``auth_token``: sign the websocket handshake as Twilio does (X-Twilio-Signature)."""
        self.url = url
        self.auth_token = auth_token
        self.parameters = parameters
        self.call_sid = call_sid or "CA" + secrets.token_hex(16)
        self.stream_sid = stream_sid or "MZ" + secrets.token_hex(16)
        # ``history`` bounds what is kept (long soaks); None keeps everything.
        self.received: collections.deque[Received] = collections.deque(maxlen=history)
        self.marks_echoed: list[str] = []
        #: Each time the agent's audio ran out mid-answer: how long the caller heard nothing (s).
        self.underruns: list[float] = []
        idle = [SILENCE] if not line_noise else _frames(line_noise)
        self._idle_payloads = [base64.b64encode(frame).decode() for frame in idle]
        self.closed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._outgoing: asyncio.Queue[tuple[bytes, Utterance | None]] = asyncio.Queue()
        # Marks waiting for the audio before them to play: (when it will have played, name).
        self._marks: collections.deque[tuple[float, str]] = collections.deque()
        self._play_until = 0.0  # when the buffered agent audio will have played
        self._last_media_at: float | None = None
        self._answer_media_at: float | None = None  # the last frame of the current answer
        self._media_waiters: list[tuple[float, asyncio.Future[float]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sequence = 0
        self._marks_changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ connection

    async def __aenter__(self) -> Self:
        self._ws = await connect(
            self.url,
            max_size=2**20,
            compression=None,
            additional_headers=stream_headers(self.url, self.auth_token),
        )
        await self._send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send_json(
            {
                "event": "start",
                "sequenceNumber": str(self._next_sequence()),
                "streamSid": self.stream_sid,
                "start": {
                    "streamSid": self.stream_sid,
                    "accountSid": "AC" + "0" * 32,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.parameters,
                    "mediaFormat": {
                        "encoding": "audio/x-mulaw",
                        "sampleRate": 8000,
                        "channels": 1,
                    },
                },
            }
        )
        self._tasks = [
            asyncio.create_task(self._send_frames()),
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._play()),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.hang_up()

    async def hang_up(self) -> None:
        """The caller hangs up: Twilio sends `stop` and closes the socket."""
        await self._stop(wait_for_close=True)

    async def move_on(self) -> None:
        """Twilio runs new TwiML (a REST call update): it sends `stop` and drops the socket,
        without waiting for a server that may not answer any more (a frozen process)."""
        await self._stop(wait_for_close=False)

    def go_silent(self) -> None:
        """The path to the server breaks without a close: nothing this phone says
        arrives any more, and the server sees a socket that is still open."""
        for task in self._tasks[:1]:
            task.cancel()

    async def _stop(self, *, wait_for_close: bool) -> None:
        if self._ws is None:
            return
        ws, self._ws = self._ws, None
        for task in self._tasks[:1]:
            task.cancel()
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(
                ws.send(
                    json.dumps(
                        {
                            "event": "stop",
                            "sequenceNumber": str(self._next_sequence()),
                            "streamSid": self.stream_sid,
                            "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid},
                        }
                    )
                ),
                None if wait_for_close else 1.0,
            )
        if wait_for_close:
            await ws.close()
        else:
            ws.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closed.set()

    async def wait_closed_by_server(self, within: float) -> None:
        await asyncio.wait_for(self.closed.wait(), within)

    # ------------------------------------------------------------ the caller

    def say(self, pcm8k: npt.NDArray[np.int16]) -> Utterance:
        """Queue caller audio (8 kHz PCM); it goes out in real time after what is queued."""
        frames = _frames(pcm16_to_ulaw(pcm8k))
        utterance = Utterance(frames=len(frames))
        for frame in frames:
            self._outgoing.put_nowait((frame, utterance))
        if not frames:
            utterance.done.set()
        return utterance

    async def send_raw(self, text: str) -> None:
        """Anything at all on the socket (malformed-input tests)."""
        assert self._ws is not None
        await self._ws.send(text)

    async def send_dtmf(self, digit: str) -> None:
        await self._send_json(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "dtmf": {"digit": digit, "track": "inbound_track"},
            }
        )

    async def _send_frames(self) -> None:
        """One frame every 20 ms on an absolute clock, like the carrier's RTP."""
        start = self._loop.time()
        sent = 0
        chunk = 0
        while self._ws is not None:
            due = start + sent * FRAME_MS / 1000
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                frame, utterance = self._outgoing.get_nowait()
                payload = base64.b64encode(frame).decode()
            except asyncio.QueueEmpty:
                utterance = None
                payload = self._idle_payloads[sent % len(self._idle_payloads)]
            chunk += 1
            message = (
                f'{{"event":"media","sequenceNumber":"{self._next_sequence()}",'
                f'"streamSid":"{self.stream_sid}","media":{{"track":"inbound",'
                f'"chunk":"{chunk}","timestamp":"{sent * FRAME_MS}","payload":"{payload}"}}}}'
            )
            try:
                await self._ws.send(message)
            except (ConnectionClosed, AttributeError):
                return
            now = self._loop.time()
            if utterance is not None:
                utterance.frames -= 1
                if utterance.started_at is None:
                    utterance.started_at = now
                if utterance.frames == 0:
                    utterance.ended_at = now
                    utterance.done.set()
            sent += 1

    # ------------------------------------------------------------ the agent

    async def _receive(self) -> None:
        assert self._ws is not None
        ws = self._ws
        try:
            async for raw in ws:
                message = json.loads(raw)
                now = self._loop.time()
                event = message.get("event")
                if event == "media":
                    audio = base64.b64decode(message["media"]["payload"])
                    self.received.append(Received(now, "media", payload=audio))
                    last = self._answer_media_at
                    if last is not None and now - last < ANSWER_BREAK_S and now > self._play_until:
                        self.underruns.append(now - self._play_until)
                    self._answer_media_at = now
                    self._play_until = max(self._play_until, now) + len(audio) / 8000
                    self._last_media_at = now
                    self._wake_media_waiters(now)
                elif event == "mark":
                    name = message["mark"]["name"]
                    self.received.append(Received(now, "mark", name=name))
                    self._marks.append((self._play_until, name))
                    self._marks_changed.set()
                elif event == "clear":
                    self.received.append(Received(now, "clear"))
                    pending = [name for _, name in self._marks]
                    self._marks.clear()
                    self._marks_changed.set()
                    self._play_until = now
                    self._answer_media_at = None  # what comes next is another answer
                    for name in pending:
                        await self._echo_mark(name)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def _play(self) -> None:
        """Marks come back when the audio before them has played."""
        while True:
            self._marks_changed.clear()
            if not self._marks:
                await self._marks_changed.wait()
                continue
            due, name = self._marks[0]
            delay = due - self._loop.time()
            if delay > 0:
                # Woken early by a `clear` (which echoes the marks itself) or a new mark.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._marks_changed.wait(), delay)
                continue
            self._marks.popleft()
            await self._echo_mark(name)

    def _wake_media_waiters(self, now: float) -> None:
        if not self._media_waiters:
            return
        waiting = []
        for since, future in self._media_waiters:
            if future.done():
                continue
            if now >= since:
                future.set_result(now)
            else:
                waiting.append((since, future))
        self._media_waiters = waiting

    async def _echo_mark(self, name: str) -> None:
        self.marks_echoed.append(name)
        with contextlib.suppress(ConnectionClosed, AssertionError):
            await self._send_json(
                {
                    "event": "mark",
                    "sequenceNumber": str(self._next_sequence()),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )

    # ------------------------------------------------------------ helpers

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    async def _send_json(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(message))

    def media_after(self, t: float) -> list[Received]:
        return [r for r in self.received if r.event == "media" and r.at >= t]

    def first_media_after(self, t: float) -> float | None:
        first = None
        for r in reversed(self.received):  # newest first: stop at the first one before t
            if r.at < t:
                break
            if r.event == "media":
                first = r.at
        return first

    async def wait_for_media_after(self, t: float, within: float) -> float:
        first = self.first_media_after(t)
        if first is not None:
            return first
        future: asyncio.Future[float] = self._loop.create_future()
        self._media_waiters.append((t, future))
        try:
            return await asyncio.wait_for(future, within)
        except TimeoutError:
            raise TimeoutError("no agent audio arrived") from None

    async def wait_until_quiet(self, quiet_s: float, within: float) -> float:
        """Until no agent audio has arrived for ``quiet_s`` and playback finished."""
        deadline = self._loop.time() + within
        while True:
            now = self._loop.time()
            last = self._last_media_at
            if last is not None and now - last >= quiet_s and now >= self._play_until:
                return last
            if now >= deadline:
                raise TimeoutError("the agent kept talking")
            quiet_at = (last if last is not None else now) + quiet_s
            await asyncio.sleep(min(max(quiet_at, self._play_until) - now, deadline - now) + 0.001)


def stream_headers(url: str, auth_token: str | None) -> dict[str, str]:
    """The handshake headers of a media stream Twilio opens: signed with the account's
    auth token over the stream URL (a GET: no parameters)."""
    if auth_token is None:
        return {}
    return {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(url, {})}


def _frames(audio: bytes) -> list[bytes]:
    """20 ms frames of mu-law audio, the last one padded with silence."""
    frames = [audio[i : i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)]
    if frames and len(frames[-1]) < FRAME_BYTES:
        frames[-1] = frames[-1] + SILENCE[len(frames[-1]) :]
    return frames
