"""An in-process Deepgram live-transcription emulator speaking the real websocket protocol.

``GET /v1/listen?model=..&encoding=mulaw|linear16&sample_rate=..&interim_results=..
&endpointing=..&utterance_end_ms=..&vad_events=..`` upgraded to a websocket, with header
``Authorization: Token <key>`` (401 otherwise, 400 for audio it cannot decode). Binary
frames are audio; text frames are ``KeepAlive``, ``Finalize`` and ``CloseStream``.

What it "hears": an energy detector on 20 ms frames of the decoded audio. A frame whose
RMS exceeds ``speech_threshold_dbfs`` is speech. Speech after silence opens an
utterance; the Nth utterance on a connection is transcribed as ``script`` says (a list
of texts, or ``script(connection_index, utterance_index) -> text``; an exhausted list
gives empty transcripts). Word timings spread the words evenly over the speech.

Timing model (exact, for benchmarks) - everything is measured in *audio* time, the way
Deepgram does, and results leave after a fixed processing latency:

* ``SpeechStarted`` (``vad_events=true``) as soon as the first speech frame arrives.
* interim ``Results`` (``interim_results=true``) every ``interim_every_ms`` of speech,
  ``interim_latency_ms`` after the audio that triggered them arrived, revealing one more
  word per ``word_ms`` of speech.
* the final ``Results`` (``is_final`` and ``speech_final`` true) once the audio holds
  ``endpointing`` ms of silence after the last speech frame (Deepgram's default of 10 ms
  when the parameter is absent), sent ``final_latency_ms`` after the arrival of the
  frame that completed that silence. A caller streaming in real time therefore gets the
  final ``endpointing + final_latency_ms`` after it stopped speaking. ``endpointing=false``
  gives ``is_final`` results (``speech_final`` false) after 500 ms of silence instead.
* ``UtteranceEnd`` (``utterance_end_ms`` set) when the audio holds that much silence
  after the last word, never before the utterance's final.
* ``Finalize``: the open utterance is finalized now (``from_finalize`` true, also after
  ``final_latency_ms``); speech that continues past it adds no words. With nothing open
  the answer is an empty final with ``from_finalize`` true.
* ``CloseStream``: the open utterance's final, then ``Metadata``, then close 1000.
* No message for ``idle_timeout_s``: close 1011 ``NET-0001``, as Deepgram does after 10 s.
* A text frame that is not one of the control messages: close 1008 ``DATA-0000``.

Messages leave in the order they were produced. ``Metadata`` is also sent when the
connection opens (``metadata_on_open``); real Deepgram sends it when the stream closes,
so clients should not depend on the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from realtime.media.mulaw import ULAW_DECODE_TABLE

__all__ = ["DeepgramEmulator", "DeepgramSession", "Script"]

Script = Sequence[str] | Callable[[int, int], str]

_FRAME_S: Final = 0.02
_DEFAULT_ENDPOINTING_MS: Final = 10.0  # what Deepgram uses when the parameter is absent
_NO_ENDPOINTING_FINAL_MS: Final = 500.0
_MODEL_UUID: Final = "1dbdfb4d-85b2-4659-9831-16b3c76229aa"
# Squared amplitude of every mu-law code: frame power is one table lookup and a mean.
_ULAW_POWER: Final = ULAW_DECODE_TABLE.astype(np.float64) ** 2
_WORD_PUNCTUATION: Final = re.compile(r"[^\w'-]+")


@dataclass
class DeepgramSession:
    """One websocket connection as the emulator saw it (for assertions)."""

    index: int
    request_id: str
    params: dict[str, str]  # query parameters (last value of repeated ones)
    query: dict[str, list[str]]  # all of them
    audio_bytes: int = 0
    audio_messages: list[int] = field(default_factory=list)  # each audio message's size
    keepalives: int = 0
    finalizes: int = 0
    close_stream: bool = False
    utterances: int = 0
    close_code: int | None = None  # the code the emulator closed with, if it did
    closed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass(frozen=True)
class _Listen:
    """The query parameters that change what the emulator does."""

    encoding: str
    sample_rate: int
    model: str
    interim_results: bool
    vad_events: bool
    endpointing_ms: float | None  # None: endpointing=false
    utterance_end_ms: float | None
    punctuate: bool

    @classmethod
    def parse(cls, params: dict[str, str]) -> _Listen:
        encoding = params.get("encoding", "")
        if encoding not in ("mulaw", "linear16"):
            raise ValueError("the emulator decodes encoding=mulaw or encoding=linear16 only")
        try:
            sample_rate = int(params.get("sample_rate", ""))
        except ValueError:
            raise ValueError("sample_rate is required with encoding") from None
        if not 4000 <= sample_rate <= 48000:
            raise ValueError("sample_rate out of range")
        endpointing = params.get("endpointing")
        if endpointing is None or endpointing.lower() == "true":
            endpointing_ms: float | None = _DEFAULT_ENDPOINTING_MS
        elif endpointing.lower() == "false":
            endpointing_ms = None
        else:
            endpointing_ms = float(_positive_int(endpointing, "endpointing"))
        utterance_end = params.get("utterance_end_ms")
        return cls(
            encoding=encoding,
            sample_rate=sample_rate,
            model=params.get("model", "base"),
            interim_results=_flag(params, "interim_results"),
            vad_events=_flag(params, "vad_events"),
            endpointing_ms=endpointing_ms,
            utterance_end_ms=None
            if utterance_end is None
            else float(_positive_int(utterance_end, "utterance_end_ms")),
            punctuate=_flag(params, "punctuate") or _flag(params, "smart_format"),
        )


@dataclass(frozen=True)
class _Emit:
    """A message the recognizer produced, with the processing latency it ships after."""

    message: dict[str, Any]
    latency_s: float


class _Recognizer:
    """Audio in, Deepgram messages out; no I/O, so it is cheap and easy to reason about."""

    def __init__(
        self,
        listen: _Listen,
        emulator: DeepgramEmulator,
        transcript_for: Callable[[int], str],
        request_id: str,
    ) -> None:
        self._listen = listen
        self._emu = emulator
        self._transcript_for = transcript_for
        self._request_id = request_id
        self._bytes_per_sample = 1 if listen.encoding == "mulaw" else 2
        self._frame = max(1, round(listen.sample_rate * _FRAME_S))
        self._threshold_power = (32768.0 * 10.0 ** (emulator.speech_threshold_dbfs / 20.0)) ** 2
        self._pending = b""
        self._pos = 0  # samples analysed so far
        self.utterance_count = 0
        self._in_speech = False  # the detector's state
        self._silence = 0  # samples of silence since the last speech frame
        self._open = False  # an utterance whose final has not been sent
        self._words: list[str] = []
        self._start_s = 0.0
        self._speech_end_s = 0.0
        self._speech_samples = 0
        self._last_interim = 0
        self._had_words = False  # the last closed utterance had words (UtteranceEnd due)
        self._utterance_end_at: float | None = None  # audio time to send UtteranceEnd

    @property
    def audio_s(self) -> float:
        return self._pos / self._listen.sample_rate

    def feed(self, audio: bytes) -> list[_Emit]:
        data = self._pending + audio
        frame_bytes = self._frame * self._bytes_per_sample
        whole = len(data) // frame_bytes * frame_bytes
        self._pending = data[whole:]
        if not whole:
            return []
        if self._bytes_per_sample == 1:
            codes = np.frombuffer(data, dtype=np.uint8, count=whole)
            power = _ULAW_POWER[codes].reshape(-1, self._frame).mean(axis=1)
        else:
            samples = np.frombuffer(data, dtype="<i2", count=whole // 2).astype(np.float64)
            power = (samples * samples).reshape(-1, self._frame).mean(axis=1)
        out: list[_Emit] = []
        for is_speech in (power > self._threshold_power).tolist():
            self._step(bool(is_speech), out)
        return out

    def finalize(self) -> list[_Emit]:
        if not self._open:
            return [self._result([], self._pos_s(), final=True, speech_final=False, finalize=True)]
        return [self._close_utterance(speech_final=False, finalize=True)]

    def flush(self) -> list[_Emit]:
        """End of stream: whatever is open becomes final."""
        if not self._open:
            return []
        return [self._close_utterance(speech_final=False, finalize=False)]

    def _pos_s(self) -> float:
        return self._pos / self._listen.sample_rate

    def _step(self, is_speech: bool, out: list[_Emit]) -> None:
        frame_start = self._pos_s()
        self._pos += self._frame
        frame_end = self._pos_s()
        listen = self._listen
        if is_speech:
            self._silence = 0
            if not self._in_speech:
                self._in_speech = True
                if not self._open:
                    self._open_utterance(frame_start, out)
            self._speech_end_s = frame_end
            if self._open:
                self._speech_samples += self._frame
                every = self._emu.interim_every_ms / 1000.0 * listen.sample_rate
                if listen.interim_results and self._pos - self._last_interim >= every:
                    self._last_interim = self._pos
                    self._interim(out)
            return
        if self._in_speech:
            self._silence += self._frame
            silence_ms = self._silence * 1000.0 / listen.sample_rate
            wait_ms = listen.endpointing_ms or _NO_ENDPOINTING_FINAL_MS
            if silence_ms >= wait_ms:
                self._in_speech = False
                if self._open:
                    out.append(self._close_utterance(listen.endpointing_ms is not None, False))
                if self._had_words and listen.utterance_end_ms is not None:
                    self._utterance_end_at = self._speech_end_s + listen.utterance_end_ms / 1000.0
        if self._utterance_end_at is not None and frame_end >= self._utterance_end_at - 1e-9:
            self._utterance_end_at = None
            self._had_words = False
            message = {
                "type": "UtteranceEnd",
                "channel": [0, 1],
                "last_word_end": _r(self._speech_end_s),
            }
            out.append(_Emit(message, 0.0))

    def _open_utterance(self, at_s: float, out: list[_Emit]) -> None:
        self._open = True
        self._utterance_end_at = None  # speech resumed: the earlier gap was not an end
        self._words = self._transcript_for(self.utterance_count).split()
        self.utterance_count += 1
        self._start_s = at_s
        self._speech_samples = 0
        self._last_interim = self._pos
        if self._listen.vad_events:
            message = {"type": "SpeechStarted", "channel": [0], "timestamp": _r(at_s)}
            out.append(_Emit(message, 0.0))

    def _interim(self, out: list[_Emit]) -> None:
        speech_ms = self._speech_samples * 1000.0 / self._listen.sample_rate
        shown = min(len(self._words), 1 + int(speech_ms // self._emu.word_ms))
        if shown:
            out.append(
                self._result(
                    self._words[:shown],
                    self._pos_s(),
                    final=False,
                    speech_final=False,
                    finalize=False,
                )
            )

    def _close_utterance(self, speech_final: bool, finalize: bool) -> _Emit:
        self._open = False
        self._had_words = self._had_words or bool(self._words)
        return self._result(
            self._words, self._pos_s(), final=True, speech_final=speech_final, finalize=finalize
        )

    def _result(
        self, words: list[str], end_s: float, *, final: bool, speech_final: bool, finalize: bool
    ) -> _Emit:
        confidence = self._emu.confidence
        start = self._start_s if (words or self._open) else end_s
        speech_end = max(start, min(self._speech_end_s, end_s))
        step = (speech_end - start) / max(1, len(words))
        word_items = [
            {
                "word": _WORD_PUNCTUATION.sub("", word).lower() or word.lower(),
                "start": _r(start + i * step),
                "end": _r(start + (i + 1) * step),
                "confidence": confidence,
                "punctuated_word": word,
            }
            for i, word in enumerate(words)
        ]
        if self._listen.punctuate:
            transcript = " ".join(words)
        else:
            transcript = " ".join(str(item["word"]) for item in word_items)
        message = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": _r(end_s - start),
            "start": _r(start),
            "is_final": final,
            "speech_final": speech_final,
            "from_finalize": finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": transcript,
                        "confidence": confidence if words else 0.0,
                        "words": word_items,
                    }
                ]
            },
            "metadata": {
                "request_id": self._request_id,
                "model_info": {"name": "general", "version": "emulator", "arch": "nova-3"},
                "model_uuid": _MODEL_UUID,
            },
        }
        latency = self._emu.final_latency_ms if final else self._emu.interim_latency_ms
        return _Emit(message, latency / 1000.0)


class _Outbox:
    """Sends messages in order, each no earlier than its due time: one task per connection."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[float, str | tuple[int, str]]] = deque()
        self._wake = asyncio.Event()
        self._last_due = 0.0
        self._task = asyncio.create_task(self._run())

    def send(self, message: dict[str, Any], latency_s: float = 0.0) -> None:
        self._put(self._loop.time() + latency_s, json.dumps(message))

    def close(self, code: int, reason: str) -> None:
        self._put(self._loop.time(), (code, reason))

    async def wait_closed(self) -> None:
        await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await self._task

    def _put(self, due: float, item: str | tuple[int, str]) -> None:
        # Never before an earlier message: a final must not overtake an interim.
        self._last_due = max(due, self._last_due)
        self._queue.append((self._last_due, item))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            due, item = self._queue.popleft()
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if isinstance(item, str):
                await self._ws.send(item)
            else:
                await self._ws.close(*item)
                return


class DeepgramEmulator:
    """``async with DeepgramEmulator(script=["hello there"]) as emu:`` - see the module doc."""

    def __init__(
        self,
        *,
        api_key: str = "test-deepgram-key",
        script: Script = (),
        final_latency_ms: float = 150.0,
        interim_latency_ms: float = 50.0,
        interim_every_ms: float = 250.0,
        word_ms: float = 250.0,
        confidence: float = 0.98,
        speech_threshold_dbfs: float = -40.0,
        idle_timeout_s: float = 10.0,
        metadata_on_open: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.script = script
        self.final_latency_ms = final_latency_ms
        self.interim_latency_ms = interim_latency_ms
        self.interim_every_ms = interim_every_ms
        self.word_ms = word_ms
        self.confidence = confidence
        self.speech_threshold_dbfs = speech_threshold_dbfs
        self.idle_timeout_s = idle_timeout_s
        self.metadata_on_open = metadata_on_open
        self.sessions: list[DeepgramSession] = []
        self._host = host
        self._port = port
        self._server: Server | None = None
        self._connections: set[ServerConnection] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        """REST base (``DeepgramClientEnvironment.base``); the SDK derives nothing from it."""
        return f"http://{self._host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Websocket base (``DeepgramClientEnvironment.production``)."""
        return f"ws://{self._host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            self._host,
            self._port,
            process_request=self._check_request,
            compression=None,  # Deepgram's audio frames do not compress; save the CPU
            ping_interval=None,  # clients keep the stream alive with KeepAlive messages
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def drop_connections(self) -> None:
        """Cut every open connection without a close frame, like a network failure."""
        for ws in list(self._connections):
            ws.transport.abort()

    def _transcript(self, connection: int, utterance: int) -> str:
        if callable(self.script):
            return self.script(connection, utterance)
        return self.script[utterance] if utterance < len(self.script) else ""

    # ------------------------------------------------------------ websocket

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path.rstrip("/") != "/v1/listen":
            return _json_response(HTTPStatus.NOT_FOUND, "NOT_FOUND", "Not Found")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "token" or key.strip() != self.api_key:
            return _json_response(HTTPStatus.UNAUTHORIZED, "INVALID_AUTH", "Invalid credentials.")
        try:
            _Listen.parse(_last_values(parse_qs(parts.query)))
        except ValueError as exc:
            return _json_response(HTTPStatus.BAD_REQUEST, "Bad Request", str(exc))
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        params = _last_values(query)
        listen = _Listen.parse(params)  # validated in _check_request
        index = len(self.sessions)
        session = DeepgramSession(index, str(uuid.uuid4()), params, query)
        self.sessions.append(session)
        self._connections.add(ws)
        recognizer = _Recognizer(
            listen, self, lambda n: self._transcript(index, n), session.request_id
        )
        outbox = _Outbox(ws)
        try:
            if self.metadata_on_open:
                outbox.send(_metadata(session, 0.0))
            await self._serve(ws, session, recognizer, outbox)
        except ConnectionClosed:
            pass  # the client left; nothing to answer
        finally:
            session.utterances = recognizer.utterance_count
            await outbox.cancel()
            self._connections.discard(ws)
            session.closed.set()

    async def _serve(
        self,
        ws: ServerConnection,
        session: DeepgramSession,
        recognizer: _Recognizer,
        outbox: _Outbox,
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    message = await ws.recv()
            except TimeoutError:
                session.close_code = 1011
                outbox.close(
                    1011,
                    "NET-0001: did not receive audio data or a text message "
                    "within the timeout window",
                )
                await outbox.wait_closed()
                return
            if isinstance(message, bytes):
                session.audio_bytes += len(message)
                session.audio_messages.append(len(message))
                emits = recognizer.feed(message)
                session.utterances = recognizer.utterance_count
            else:
                kind = _control_type(message)
                if kind == "KeepAlive":
                    session.keepalives += 1
                    continue
                if kind == "Finalize":
                    session.finalizes += 1
                    emits = recognizer.finalize()
                elif kind == "CloseStream":
                    session.close_stream = True
                    for emit in recognizer.flush():
                        outbox.send(emit.message, emit.latency_s)
                    outbox.send(_metadata(session, recognizer.audio_s))
                    session.close_code = 1000
                    outbox.close(1000, "")
                    await outbox.wait_closed()
                    return
                else:
                    session.close_code = 1008
                    outbox.close(
                        1008,
                        "DATA-0000: the text message is not a valid control "
                        "message (KeepAlive, Finalize, CloseStream)",
                    )
                    await outbox.wait_closed()
                    return
            for emit in emits:
                outbox.send(emit.message, emit.latency_s)


def _control_type(message: str) -> str | None:
    try:
        payload = json.loads(message)
    except ValueError:
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def _metadata(session: DeepgramSession, duration_s: float) -> dict[str, Any]:
    return {
        "type": "Metadata",
        "transaction_key": "deprecated",
        "request_id": session.request_id,
        "sha256": "0" * 64,
        "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration": _r(duration_s),
        "channels": 1,
        "models": [_MODEL_UUID],
        "model_info": {_MODEL_UUID: {"name": "general", "version": "emulator", "arch": "nova-3"}},
    }


def _json_response(status: HTTPStatus, code: str, message: str) -> Response:
    body = json.dumps(
        {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
    ).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)


def _last_values(query: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[-1] for name, values in query.items()}


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "false").lower() == "true"


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    return number


def _r(seconds: float) -> float:
    return round(seconds, 3)
