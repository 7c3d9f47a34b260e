"""Deepgram live transcription (``/v1/listen`` websocket) through the official SDK.

Phone audio (8 kHz mu-law) goes to Deepgram untouched. A ``DeepgramAsr``
is cheap to build (microseconds; the registry builds one per call) and each call opens
a ``DeepgramStream`` from it.

A stream connects in the background so a call's first audio is never held up by the
handshake: ``send_audio`` only appends to an in-memory backlog that a sender task drains
into the socket (and coalesces when it fell behind). Results and every failure come out
of ``events()``; once the stream failed or closed, ``send_audio`` is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Final, Self, cast

import httpx
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, WebSocketException

from builder_engine.agent_config import AsrConfig, TurnConfig
from builder_engine.config import Settings
from realtime.providers.base import (
    MULAW_8K,
    AsrEvent,
    AudioFormat,
    ProviderError,
    SpeechStartedEvent,
    TranscriptEvent,
    UtteranceEndEvent,
)

__all__ = ["DEFAULT_MODEL", "DeepgramAsr", "DeepgramStream", "deepgram_environment"]

_log = logging.getLogger(__name__)

NAME: Final = "deepgram"
DEFAULT_MODEL: Final = "nova-3"
_MAX_MESSAGE_BYTES: Final = 8000  # coalesce a backlog into messages of up to 1 s of audio
#: Audio goes out in messages of about this much (Deepgram suggests 20-100 ms): one
#: websocket message per 20 ms frame costs three times the CPU here and at the far end,
#: and a Finalize flushes whatever is waiting, so the final result is not delayed.
SEND_EVERY_MS: Final = 60.0
#: ...and while the caller is silent, in messages of this much: nothing waits on the
#: results of silence, and most of a call's inbound audio is silence. The first voiced
#: frame sends what is held at once.
IDLE_SEND_EVERY_MS: Final = 240.0

SocketFactory = Callable[[], AbstractAsyncContextManager[AsyncV1SocketClient]]


class _Control(enum.Enum):
    FINALIZE = "Finalize"
    CLOSE = "CloseStream"


_END: Final = object()  # marks the end of the events queue


def deepgram_environment(base_url: str) -> DeepgramClientEnvironment:
    """An SDK environment for a self-hosted / regional / emulated Deepgram at ``base_url``.

    Accepts ``http(s)://`` or ``ws(s)://`` with an optional path prefix; the websocket
    scheme follows TLS (https <-> wss).
    """
    url = base_url.rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"not an http(s) or ws(s) URL: {base_url!r}")
    secure = scheme in ("https", "wss")
    http = f"{'https' if secure else 'http'}://{rest}"
    ws = f"{'wss' if secure else 'ws'}://{rest}"
    return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


class _WebsocketOnly(httpx.AsyncBaseTransport):
    """Stands in for the SDK's REST transport, which live transcription never uses."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.UnsupportedProtocol("DeepgramAsr only opens /v1/listen websockets")


class DeepgramAsr:
    """``AsrProvider`` for Deepgram streaming recognition."""

    name = NAME
    input_format: AudioFormat = MULAW_8K

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        endpointing_ms: int = 300,
        utterance_end_ms: int | None = 1000,
        punctuate: bool = True,
        smart_format: bool = False,
        keepalive_interval_s: float = 4.0,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = 2.0,
        max_backlog_s: float = 10.0,
        send_every_ms: float = SEND_EVERY_MS,
        idle_send_every_ms: float = IDLE_SEND_EVERY_MS,
        keywords: Sequence[str] = (),
        client: AsyncDeepgramClient | None = None,
    ) -> None:
        if not api_key:
            raise ProviderError(NAME, "no API key configured", retryable=False)
        self.model = model
        self.endpointing_ms = endpointing_ms
        self.utterance_end_ms = utterance_end_ms
        self.punctuate = punctuate
        self.smart_format = smart_format
        self.keepalive_interval_s = keepalive_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_backlog_bytes = round(max_backlog_s * self.input_format.bytes_per_second)
        bytes_per_second = self.input_format.bytes_per_second
        self.send_bytes = max(1, round(send_every_ms / 1000 * bytes_per_second))
        self.idle_send_bytes = round(idle_send_every_ms / 1000 * bytes_per_second)
        self.keywords = tuple(keywords)  # the agent's; each stream may add its own
        # The registry builds providers per call, so construction must be cheap: the SDK's
        # default REST client would load TLS certificates (~15 ms of blocked event loop)
        # for an HTTP API this adapter never calls.
        self._client = client or AsyncDeepgramClient(
            api_key=api_key,
            environment=deepgram_environment(base_url)
            if base_url
            else DeepgramClientEnvironment.PRODUCTION,
            httpx_client=httpx.AsyncClient(transport=_WebsocketOnly(), trust_env=False),
        )

    @classmethod
    def from_config(cls, asr: AsrConfig, turn: TurnConfig, settings: Settings) -> DeepgramAsr:
        """The agent's ASR settings; its ``base_url`` wins over ``DEEPGRAM_BASE_URL``."""
        key = settings.deepgram_api_key.get_secret_value() if settings.deepgram_api_key else ""
        if not key:
            raise ProviderError(NAME, "DEEPGRAM_API_KEY is not set", retryable=False)
        base_url = str(asr.base_url) if asr.base_url else settings.deepgram_base_url
        return cls(
            api_key=key,
            base_url=base_url,
            model=asr.model or DEFAULT_MODEL,
            endpointing_ms=turn.endpointing_ms,
            keywords=asr.keywords,
        )

    async def open_stream(self, *, language: str, keywords: Sequence[str] = ()) -> DeepgramStream:
        """Start a stream; it connects in the background (failures come out of ``events()``)."""
        client = self._client
        terms = list(dict.fromkeys(w.strip() for w in (*self.keywords, *keywords) if w.strip()))
        # nova-3 takes plain key terms; older models take the legacy ``keywords`` boost.
        nova3 = self.model.startswith("nova-3")
        session_headers = {"x-deepgram-session-id": str(uuid.uuid4())}

        def connect() -> AbstractAsyncContextManager[AsyncV1SocketClient]:
            # The SDK's lazily built sub-clients are typed Any; this is what connect returns.
            return cast(
                AbstractAsyncContextManager[AsyncV1SocketClient],
                client.listen.v1.connect(
                    model=self.model,
                    language=language,
                    encoding="mulaw",
                    sample_rate=self.input_format.sample_rate,
                    channels=1,
                    interim_results="true",
                    vad_events="true",
                    endpointing=self.endpointing_ms,
                    utterance_end_ms=self.utterance_end_ms,
                    punctuate="true" if self.punctuate else "false",
                    smart_format="true" if self.smart_format else "false",
                    keyterm=terms if (terms and nova3) else None,
                    keywords=terms if (terms and not nova3) else None,
                    request_options={"additional_headers": session_headers},
                ),
            )

        return DeepgramStream(
            connect,
            keepalive_interval_s=self.keepalive_interval_s,
            connect_timeout_s=self.connect_timeout_s,
            close_timeout_s=self.close_timeout_s,
            max_backlog_bytes=self.max_backlog_bytes,
            send_bytes=self.send_bytes,
            idle_send_bytes=self.idle_send_bytes,
        )


class DeepgramStream:
    """One call's recognition session (``AsrStream``). Use one consumer of ``events()``."""

    def __init__(
        self,
        connect: SocketFactory,
        *,
        keepalive_interval_s: float,
        connect_timeout_s: float,
        close_timeout_s: float,
        max_backlog_bytes: int,
        send_bytes: int = 1,
        idle_send_bytes: int | None = None,
    ) -> None:
        self._connect = connect
        self._keepalive_s = keepalive_interval_s
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._max_backlog = max_backlog_bytes
        self._send_bytes = send_bytes
        self._idle_send_bytes = max(send_bytes, idle_send_bytes or send_bytes)
        self._controls = 0  # Finalize / CloseStream waiting in the outbox
        self._outbox: deque[bytes | _Control] = deque()
        self._backlog = 0  # audio bytes waiting in the outbox
        self._wake = asyncio.Event()
        self._events: asyncio.Queue[AsrEvent | ProviderError | object] = asyncio.Queue()
        self._connected = False
        self._closing = False  # close() was called: the end of the socket is expected
        self._failed = False
        self._runner = asyncio.create_task(self._run(), name="deepgram-stream")
        # A callback, not a finally: a runner cancelled before its first step never runs.
        self._runner.add_done_callback(lambda _: self._events.put_nowait(_END))

    # ------------------------------------------------------------ AsrStream

    @property
    def connected(self) -> bool:
        """The websocket is open (the handshake finished and the stream has not ended)."""
        return self._connected and not self._runner.done()

    async def send_audio(self, audio: bytes, *, voiced: bool = True) -> None:
        if self._closing or self._failed or not audio:
            return
        self._backlog += len(audio)
        if self._backlog > self._max_backlog:
            self._abort(ProviderError(NAME, "audio backlog: the connection is not keeping up"))
            return
        self._outbox.append(audio)
        if self._backlog >= (self._send_bytes if voiced else self._idle_send_bytes):
            self._wake.set()

    async def events(self) -> AsyncIterator[AsrEvent]:
        while True:
            item = await self._events.get()
            if item is _END:
                self._events.put_nowait(_END)  # a later events() call ends at once too
                return
            if isinstance(item, ProviderError):
                raise item
            if isinstance(item, TranscriptEvent | SpeechStartedEvent | UtteranceEndEvent):
                yield item

    async def finalize(self) -> None:
        if not (self._closing or self._failed):
            self._push_control(_Control.FINALIZE)

    async def close(self) -> None:
        """Send CloseStream, let the last results arrive (up to ``close_timeout_s``), close.

        Before the connection is up there is nothing to flush: the attempt is abandoned.
        """
        first = not self._closing
        self._closing = True
        graceful = self._connected and not self._failed
        if first and graceful:
            self._push_control(_Control.CLOSE)
        await self._stop_runner(wait=graceful)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ internals

    def _push_control(self, control: _Control) -> None:
        # Audio queued before it goes first (Finalize must cover every sample so far).
        self._controls += 1
        self._outbox.append(control)
        self._wake.set()

    def _ready(self) -> bool:
        return self._controls > 0 or self._backlog >= self._send_bytes

    async def _stop_runner(self, *, wait: bool) -> None:
        # asyncio.wait neither cancels the runner on timeout nor re-raises its outcome, so
        # a CancelledError here is always our caller's, and it still stops the runner.
        try:
            if wait:
                await asyncio.wait({self._runner}, timeout=self._close_timeout_s)
        finally:
            if not self._runner.done():
                self._runner.cancel()
        await asyncio.wait({self._runner})

    def _abort(self, error: ProviderError) -> None:
        self._fail(error)
        self._runner.cancel()

    def _fail(self, error: ProviderError) -> None:
        if not self._failed and not self._closing:
            self._failed = True
            self._events.put_nowait(error)

    async def _run(self) -> None:
        try:
            socket_cm, socket = await self._open()
            try:
                self._connected = True
                await self._talk(socket)
            finally:
                await socket_cm.__aexit__(None, None, None)
        except asyncio.CancelledError:
            pass  # close() or an abort ends the stream; nothing to report
        except ProviderError as exc:
            self._fail(exc)
        except ApiError as exc:
            status = exc.status_code or 0
            message = f"handshake refused ({status}): {exc.body}"
            self._fail(ProviderError(NAME, message, retryable=status >= 500 or status == 429))
        except TimeoutError:
            self._fail(ProviderError(NAME, f"no connection within {self._connect_timeout_s} s"))
        except (WebSocketException, OSError) as exc:
            self._fail(ProviderError(NAME, f"connection failed: {exc!r}"))
        except Exception as exc:
            _log.exception("deepgram stream failed unexpectedly")
            self._fail(ProviderError(NAME, f"unexpected failure: {exc!r}"))
        finally:
            self._outbox.clear()

    async def _open(
        self,
    ) -> tuple[AbstractAsyncContextManager[AsyncV1SocketClient], AsyncV1SocketClient]:
        socket_cm = self._connect()
        entering = asyncio.ensure_future(socket_cm.__aenter__())
        try:
            await asyncio.wait({entering}, timeout=self._connect_timeout_s)
        except asyncio.CancelledError:
            if entering.done() and not entering.cancelled() and entering.exception() is None:
                await socket_cm.__aexit__(None, None, None)  # connected just as we were closed
            raise
        finally:
            if not entering.done():
                # Timed out or closed while connecting. Once cancelled, the SDK's websockets
                # client waits (up to its 10 s close timeout) for a server that never
                # answered to close the socket: nobody needs to wait for that.
                entering.cancel()
                entering.add_done_callback(_discard_outcome)
        if not entering.done():
            raise TimeoutError
        return socket_cm, entering.result()

    async def _talk(self, socket: AsyncV1SocketClient) -> None:
        sender = asyncio.create_task(self._send_loop(socket), name="deepgram-sender")
        sender.add_done_callback(self._sender_done)
        try:
            await self._receive_loop(socket)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        # A closed socket is reported by the receive loop, which sees why it closed.
        if exc is not None and not isinstance(exc, ConnectionClosed):
            _log.error("deepgram sender failed", exc_info=exc)
            self._abort(ProviderError(NAME, f"sending failed: {exc!r}"))

    async def _send_loop(self, socket: AsyncV1SocketClient) -> None:
        while True:
            if not self._ready():
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._keepalive_s):
                        await self._wake.wait()
                except TimeoutError:
                    # Deepgram closes a stream that hears nothing for 10 s (NET-0001).
                    await socket.send_keep_alive()
                    continue
            if not self._outbox:
                continue  # a keep-alive went out; nothing else is waiting
            item = self._outbox.popleft()
            if isinstance(item, bytes):
                await socket.send_media(self._coalesce(item))
                continue
            self._controls -= 1
            if item is _Control.FINALIZE:
                await socket.send_finalize()
            else:
                await socket.send_close_stream()
                return

    def _coalesce(self, first: bytes) -> bytes:
        """Join audio that queued up while the socket was busy into fewer messages."""
        parts = [first]
        size = len(first)
        while self._outbox and isinstance(self._outbox[0], bytes):
            if size + len(self._outbox[0]) > _MAX_MESSAGE_BYTES:
                break
            chunk = self._outbox.popleft()
            assert isinstance(chunk, bytes)
            parts.append(chunk)
            size += len(chunk)
        self._backlog -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _receive_loop(self, socket: AsyncV1SocketClient) -> None:
        try:
            async for message in socket:
                event = _to_event(message)
                if event is not None:
                    self._events.put_nowait(event)
        except ConnectionClosedOK:
            pass
        except ConnectionClosed as exc:
            raise ProviderError(NAME, f"connection lost: {_close_reason(exc)}") from exc
        if not self._closing:
            raise ProviderError(NAME, "the server ended the stream")


def _discard_outcome(task: asyncio.Future[AsyncV1SocketClient]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _to_event(message: object) -> AsrEvent | None:
    if isinstance(message, ListenV1Results):
        alternatives = message.channel.alternatives
        if not alternatives:
            return None
        best = alternatives[0]
        text = best.transcript.strip()
        # Empty interim and final results arrive on every stretch of silence; only an
        # endpoint carries meaning without words.
        if not text and not message.speech_final:
            return None
        words = best.words
        return TranscriptEvent(
            text=text,
            is_final=bool(message.is_final),
            speech_final=bool(message.speech_final),
            confidence=best.confidence,
            start_s=words[0].start if words else message.start,
            end_s=words[-1].end if words else message.start + message.duration,
        )
    if isinstance(message, ListenV1SpeechStarted):
        return SpeechStartedEvent(at_s=message.timestamp)
    if isinstance(message, ListenV1UtteranceEnd):
        return UtteranceEndEvent(last_word_end_s=message.last_word_end)
    if isinstance(message, ListenV1Error):
        raise ProviderError(NAME, f"{message.variant}: {message.description}")
    return None  # Metadata and anything newer than this adapter


def _close_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame (network failure)"
    return f"{frame.code} {frame.reason}".strip()
