"""An in-process ElevenLabs text-to-speech emulator speaking the real HTTP streaming API.

``POST /v1/text-to-speech/{voice_id}/stream?output_format=...`` (and the non-streaming
path without ``/stream``, which real ElevenLabs also answers chunked) with header
``xi-api-key`` and a JSON body ``{"text", "model_id", "voice_settings"}``. The answer is
raw audio in the requested format (``ulaw_8000``, ``pcm_8000``, ``pcm_16000``,
``pcm_22050``, ``pcm_24000``, ``pcm_44100``), streamed chunked:

* the first chunk leaves ``first_byte_latency_ms`` after the request arrived;
* the rest follows ``speedup`` times faster than real time (``math.inf``: at once);
* the audio lasts ``ms_per_char * len(text) / voice_settings.speed`` and is a
  speech-like signal with one burst per word (see ``_server.speech_like``).

Every request is recorded in ``requests`` (text, voice, model, format, and whether the
client read it to the end or disconnected) for assertions. Errors look like the real
service's: 401 ``invalid_api_key``, 422 for a body without ``text``, 400 for a format the
emulator cannot produce (mp3/opus need an encoder; use the pcm or ulaw formats).

The input-streaming websocket (``/stream-input``) is not emulated: the SDK's helper for it
forces ``wss://``, so nothing here could drive it against a plain local socket.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

from emulators._server import HttpRequest, HttpResponse, HttpServer, speech_for_text
from realtime.media.mulaw import pcm16_to_ulaw

__all__ = ["OUTPUT_FORMATS", "ElevenLabsEmulator", "TtsRequest"]

#: Formats the emulator produces: name -> (encoding, sample rate).
OUTPUT_FORMATS: Final[dict[str, tuple[Literal["ulaw", "pcm"], int]]] = {
    "ulaw_8000": ("ulaw", 8000),
    "pcm_8000": ("pcm", 8000),
    "pcm_16000": ("pcm", 16000),
    "pcm_22050": ("pcm", 22050),
    "pcm_24000": ("pcm", 24000),
    "pcm_44100": ("pcm", 44100),
}
_DEFAULT_FORMAT: Final = "mp3_44100_128"  # the real API's default, which we cannot produce
_CACHE_SIZE: Final = 64  # benchmarks repeat a few sentences: render each once
_ROUTE: Final = re.compile(r"^/v1/text-to-speech/(?P<voice>[^/]+)(?P<stream>/stream)?$")

Outcome = Literal["pending", "completed", "disconnected", "rejected"]


@dataclass
class TtsRequest:
    """One synthesis request as the emulator saw it."""

    voice_id: str
    text: str
    model_id: str | None
    output_format: str
    voice_settings: dict[str, Any] | None
    received_at: float  # time.monotonic()
    audio_bytes: int = 0  # size of the whole answer
    bytes_sent: int = 0
    first_byte_at: float | None = None
    outcome: Outcome = "pending"
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class ElevenLabsEmulator:
    """``async with ElevenLabsEmulator(api_key="k") as emu:`` then point the SDK at ``emu.url``."""

    def __init__(
        self,
        *,
        api_key: str = "test-elevenlabs-key",
        first_byte_latency_ms: float = 120.0,
        speedup: float = 4.0,
        ms_per_char: float = 65.0,
        chunk_ms: float = 100.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if speedup <= 0 or chunk_ms <= 0 or ms_per_char <= 0 or first_byte_latency_ms < 0:
            raise ValueError("latency must be >= 0; speedup, chunk_ms and ms_per_char > 0")
        self.api_key = api_key
        self.first_byte_latency_ms = first_byte_latency_ms
        self.speedup = speedup
        self.ms_per_char = ms_per_char
        self.chunk_ms = chunk_ms
        self.requests: list[TtsRequest] = []
        self._rendered: dict[tuple[str, str, float], bytes] = {}
        self._server = HttpServer(self._handle, host=host, port=port)

    @property
    def url(self) -> str:
        """Base URL for ``AsyncElevenLabs(base_url=...)``."""
        return self._server.url

    def audio_samples(self, text: str, sample_rate: int, speed: float = 1.0) -> int:
        """How many samples the answer to ``text`` has (tests check byte counts with it)."""
        return max(1, round(len(text) * self.ms_per_char / 1000.0 / speed * sample_rate))

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------ HTTP

    async def _handle(self, request: HttpRequest, response: HttpResponse) -> None:
        route = _ROUTE.match(request.path)
        if route is None:
            await response.send_json(404, {"detail": "Not Found"})
            return
        if request.method != "POST":
            await response.send_json(405, {"detail": "Method Not Allowed"})
            return
        if request.headers.get("xi-api-key") != self.api_key:
            await response.send_json(401, _detail("invalid_api_key", "Invalid API key"))
            return
        try:
            body = request.json()
        except ValueError:
            await response.send_json(400, _detail("invalid_json", "Body is not valid JSON"))
            return
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            await response.send_json(
                422,
                {"detail": [{"loc": ["body", "text"], "msg": "Field required", "type": "missing"}]},
            )
            return
        output_format = request.query.get("output_format", _DEFAULT_FORMAT)
        settings = (
            body.get("voice_settings") if isinstance(body.get("voice_settings"), dict) else None
        )
        record = TtsRequest(
            voice_id=route["voice"],
            text=text,
            model_id=body.get("model_id"),
            output_format=output_format,
            voice_settings=settings,
            received_at=time.monotonic(),
        )
        self.requests.append(record)
        try:
            await self._answer(record, response)
        finally:
            if record.outcome == "pending":
                record.outcome = "disconnected"
            record.done.set()

    async def _answer(self, record: TtsRequest, response: HttpResponse) -> None:
        if not record.text.strip():
            record.outcome = "rejected"
            await response.send_json(400, _detail("invalid_text", "Text must not be empty"))
            return
        if record.output_format not in OUTPUT_FORMATS:
            record.outcome = "rejected"
            await response.send_json(
                400,
                _detail(
                    "invalid_output_format",
                    f"{record.output_format} is not one of {', '.join(OUTPUT_FORMATS)}",
                ),
            )
            return
        speed = _speed(record.voice_settings)
        audio = self._render(record.text, record.output_format, speed)
        record.audio_bytes = len(audio)
        encoding, rate = OUTPUT_FORMATS[record.output_format]
        bytes_per_second = rate * (1 if encoding == "ulaw" else 2)
        chunk = max(2, round(self.chunk_ms / 1000.0 * bytes_per_second) // 2 * 2)
        loop = asyncio.get_running_loop()
        # Chunks leave on an absolute schedule so pacing does not drift with handler overhead.
        first_at = loop.time() + self.first_byte_latency_ms / 1000.0
        per_chunk = 0.0 if math.isinf(self.speedup) else self.chunk_ms / 1000.0 / self.speedup
        if not await response.pause(first_at - loop.time()):
            return
        await response.start_stream(
            200,
            content_type=_content_type(encoding),
            headers={"request-id": uuid.uuid4().hex, "history-item-id": uuid.uuid4().hex},
        )
        for index, offset in enumerate(range(0, len(audio), chunk)):
            if not await response.pause(first_at + index * per_chunk - loop.time()):
                return
            if not await response.write(audio[offset : offset + chunk]):
                return
            if record.first_byte_at is None:
                record.first_byte_at = time.monotonic()
            record.bytes_sent += min(chunk, len(audio) - offset)
        await response.end_stream()
        record.outcome = "completed"

    def _render(self, text: str, output_format: str, speed: float) -> bytes:
        key = (text, output_format, speed)
        audio = self._rendered.get(key)
        if audio is None:
            encoding, rate = OUTPUT_FORMATS[output_format]
            samples = speech_for_text(text, self.audio_samples(text, rate, speed), rate)
            audio = (
                pcm16_to_ulaw(samples) if encoding == "ulaw" else samples.astype("<i2").tobytes()
            )
            if len(self._rendered) >= _CACHE_SIZE:
                self._rendered.pop(next(iter(self._rendered)))
            self._rendered[key] = audio
        return audio


def _speed(settings: dict[str, Any] | None) -> float:
    value = (settings or {}).get("speed")
    return float(value) if isinstance(value, int | float) and value > 0 else 1.0


def _content_type(encoding: str) -> str:
    return "audio/basic" if encoding == "ulaw" else "audio/pcm"


def _detail(status: str, message: str) -> dict[str, Any]:
    return {"detail": {"status": status, "message": message}}
