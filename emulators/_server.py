"""Plumbing shared by the vendor emulators: a small HTTP/1.1 server and speech-like audio.

The HTTP server is plain asyncio rather than uvicorn on purpose: it starts and stops in
a millisecond (tests open many emulators), costs one task per connection plus one
while a response streams (benchmarks hold 100 calls), and tells a handler the moment
the client goes away, which is exactly what a test of "cancel closes the stream" needs.
It speaks just enough HTTP/1.1 for SDK clients: ``Content-Length`` request bodies,
keep-alive, and ``Transfer-Encoding: chunked`` or fixed-length responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import numpy.typing as npt

__all__ = [
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "speech_for_text",
    "speech_like",
]

_log = logging.getLogger(__name__)

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 4 * 1024 * 1024
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
}


class _BadRequest(Exception):
    pass


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # without the query string
    query: dict[str, str]  # the last value wins for repeated names
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpResponse:
    """Writes one response; knows when the client disconnects while it streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._chunked = False
        self.started = False
        self.finished = False
        # Set when the connection must not be reused (client gone, stray bytes, errors).
        self.close_connection = False

    @property
    def disconnected(self) -> bool:
        return self._gone.is_set()

    async def send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self._write_head(
            status,
            {"content-type": content_type, "content-length": str(len(body)), **(headers or {})},
        )
        self._writer.write(body)
        self.finished = True
        await self._drain()

    async def send_json(self, status: int, payload: Any) -> None:
        await self.send(status, json.dumps(payload).encode())

    async def start_stream(
        self, status: int, *, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """Send the head of a chunked response and start watching for a disconnect."""
        self._write_head(
            status,
            {"content-type": content_type, "transfer-encoding": "chunked", **(headers or {})},
        )
        self._chunked = True
        self._watcher = asyncio.create_task(self._watch())
        await self._drain()

    async def write(self, data: bytes) -> bool:
        """Send one chunk; False when the client is gone (nothing more should be sent)."""
        if not data:
            return not self.disconnected
        if self.disconnected or self._writer.is_closing():
            self._gone.set()
            return False
        self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        return await self._drain()

    async def end_stream(self) -> None:
        if self._chunked and not self.finished and not self.disconnected:
            self._writer.write(b"0\r\n\r\n")
            await self._drain()
        self.finished = True
        await self.stop_watching()

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early if the client disconnects. True when the client is still there."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._gone.wait()
        return not self.disconnected

    def _write_head(self, status: int, headers: dict[str, str]) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _drain(self) -> bool:
        try:
            await self._writer.drain()
        except ConnectionError:
            self._gone.set()
            self.close_connection = True
            return False
        return True

    async def _watch(self) -> None:
        # A client waiting for a response sends nothing (SDK clients never pipeline), so
        # a read that returns means EOF or a reset: the client went away.
        with contextlib.suppress(ConnectionError):
            if await self._reader.read(1):
                self.close_connection = True  # stray bytes: do not try to reuse the socket
                return
        self.close_connection = True
        self._gone.set()

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None


Handler = Callable[[HttpRequest, HttpResponse], Awaitable[None]]


class HttpServer:
    """``async with HttpServer(handler) as server: server.url`` - an ephemeral port on 127.0.0.1."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.close()
        # Abort the sockets rather than cancel the tasks: every handler then sees its
        # client gone and returns normally (Python 3.11's stream callback logs a spurious
        # error for a cancelled connection task).
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            _, stuck = await asyncio.wait(self._connections, timeout=2.0)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    response = HttpResponse(reader, writer)
                    await response.send_json(400, {"detail": str(exc)})
                    break
                if request is None:
                    break
                response = HttpResponse(reader, writer)
                try:
                    await self._handler(request, response)
                except Exception:
                    # A bug in an emulator: make it loud in the test log, and cut a
                    # streamed response short so the client sees a broken body.
                    _log.exception("emulator handler failed on %s %s", request.method, request.path)
                    if response.started:
                        break
                    await response.send_json(500, {"detail": "emulator handler failed"})
                    break
                finally:
                    await response.stop_watching()
                if not response.started:
                    await response.send_json(500, {"detail": "emulator handler sent nothing"})
                elif not response.finished:
                    await response.end_stream()
                if response.close_connection or request.headers.get("connection") == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away between requests
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("truncated request head") from exc
        return None  # keep-alive connection closed between requests
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("request head too large") from exc
    if len(head) > _MAX_HEAD:
        raise _BadRequest("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise _BadRequest("malformed request line") from exc
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest("chunked request bodies are not supported by this emulator")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest("bad content-length") from exc
    if length < 0 or length > _MAX_BODY:
        raise _BadRequest("bad content-length")
    body = await reader.readexactly(length) if length else b""
    parts = urlsplit(target)
    return HttpRequest(method.upper(), parts.path, dict(parse_qsl(parts.query)), headers, body)


# ---------------------------------------------------------------- speech-like audio

_HARMONICS: Final = np.array([1.0, 0.55, 0.35, 0.22, 0.12, 0.07], dtype=np.float64)


def speech_like(
    word_durations_s: Sequence[float],
    sample_rate: int,
    *,
    gap_s: float = 0.04,
    amplitude: float = 0.3,
    f0_hz: float = 140.0,
    total_samples: int | None = None,
) -> npt.NDArray[np.int16]:
    """Voiced "words": a few harmonics of a gliding pitch under a syllable envelope.

    Not speech, but it has what energy detectors and loudness meters look at: bursts a
    few hundred ms long with a ~4 Hz syllable rhythm, separated by short gaps. Each
    word is followed by ``gap_s`` of silence except the last. ``total_samples`` pads
    with silence or trims to an exact length.
    """
    pieces: list[npt.NDArray[np.float64]] = []
    gap = np.zeros(round(gap_s * sample_rate))
    for index, duration in enumerate(word_durations_s):
        n = max(1, round(duration * sample_rate))
        t = np.arange(n) / sample_rate
        # Each word gets its own pitch and a falling glide, as intonation does.
        start_hz = f0_hz * (1.0 + 0.18 * math.sin(1.7 * index))
        f0 = start_hz * (1.0 - 0.12 * t / max(duration, 1e-3))
        phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate
        voiced = np.zeros(n)
        for k, weight in enumerate(_HARMONICS, start=1):
            if k * start_hz < sample_rate / 2:
                voiced += weight * np.sin(k * phase)
        voiced /= _HARMONICS.sum()
        ramp = min(n // 2, round(0.015 * sample_rate))  # 15 ms attack and release
        envelope = np.ones(n)
        if ramp > 0:
            edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
            envelope[:ramp] = edge
            envelope[n - ramp :] = edge[::-1]
        envelope *= 0.75 + 0.25 * np.cos(2.0 * np.pi * 4.0 * t)  # syllable rhythm
        pieces.append(voiced * envelope)
        if index < len(word_durations_s) - 1 and gap.size:
            pieces.append(gap)
    signal = np.concatenate(pieces) if pieces else np.zeros(0)
    if total_samples is not None:
        signal = np.pad(signal, (0, max(0, total_samples - signal.size)))[:total_samples]
    scaled = np.clip(signal * amplitude * 32767.0, -32768, 32767)
    return scaled.astype(np.int16)


def speech_for_text(
    text: str, total_samples: int, sample_rate: int, *, gap_s: float = 0.04
) -> npt.NDArray[np.int16]:
    """Exactly ``total_samples`` of speech-like audio with one burst per word of ``text``,
    each as long as its share of the characters."""
    words = text.split() or [text]
    gaps = max(0, len(words) - 1) * round(gap_s * sample_rate)
    if gaps >= total_samples // 2:  # too short for gaps: one continuous burst
        words, gaps = [text], 0
    voiced_s = (total_samples - gaps) / sample_rate
    weights = np.array([len(word) + 1 for word in words], dtype=np.float64)
    durations = (voiced_s * weights / weights.sum()).tolist()
    return speech_like(durations, sample_rate, gap_s=gap_s, total_samples=total_samples)
