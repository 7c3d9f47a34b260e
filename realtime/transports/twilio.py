"""The `/media/twilio` websocket: Twilio Media Streams in, a call session out.

Bad frames are logged with their reason and dropped; a stream that cannot be tied to
a call ends with a reason. Nothing one connection does reaches another call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from builder_engine.calls import EndedReason
from realtime.admission import TRY_AGAIN_LATER, Admission
from realtime.calls import (
    CallLoader,
    CallNotFound,
    LoadedCall,
    SessionFactory,
    SessionNotCreated,
)
from realtime.providers.base import MULAW_8K
from realtime.session import HANDED_OVER, CallSession
from realtime.transports import SERVER_RESTARTING
from realtime.transports import twilio_protocol as tp
from realtime.transports.twilio_signature import StreamSignature

log = logging.getLogger(__name__)

#: Messages waited for before `start` (Twilio sends `connected` then `start` at once).
START_TIMEOUT_S = 10.0
#: A call whose media stops arriving for this long is considered lost.
MEDIA_TIMEOUT_S = 15.0
#: Bad frames tolerated per call before the stream is considered broken.
MAX_BAD_FRAMES = 50
#: How long a new stream for a call waits for the call's earlier session here to stop.
TAKEOVER_TIMEOUT_S = 10.0
#: Agent audio goes to Twilio in media messages of 40 ms (Twilio takes any length; it
#: plays what it buffers). Twice the audio per message of a 20 ms frame: half the
#: messages to build and send, here and at Twilio, at the same lead.
OUTBOUND_FRAME_MS = 40.0
#: Close codes of a stream that broke rather than hung up: protocol error, unacceptable
#: data, invalid UTF-8, a message over the server's size limit (uvicorn's ws_max_size).
_BROKEN_STREAM_CODES = frozenset({1002, 1003, 1007, 1009})


class TwilioOutbound:
    """What the session sends back to Twilio over the same websocket."""

    def __init__(self, websocket: WebSocket, stream_sid: str) -> None:
        self._ws = websocket
        self._sid = stream_sid

    async def send_audio(self, frame: bytes) -> None:
        await self._send(tp.media_message(self._sid, frame))

    async def send_mark(self, name: str) -> None:
        await self._send(tp.mark_message(self._sid, name))

    async def send_clear(self) -> None:
        await self._send(tp.clear_message(self._sid))

    async def _send(self, text: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            # The socket is gone. The reading side ends the call with the true reason (a
            # hang-up); a failed send must not win that race and record a failed call.
            await self._ws.send_text(text)


class _Stream:
    """A call's media stream in this process, as the next stream for the call sees it."""

    def __init__(self) -> None:
        self.pump: asyncio.Task[str] | None = None
        self.superseded = False
        self.done = asyncio.Event()

    def supersede(self) -> None:
        self.superseded = True
        if self.pump is not None:
            self.pump.cancel()


@dataclass
class StreamStats:
    frames: int = 0
    bad_frames: int = 0
    ignored: int = 0


class TwilioMediaHandler:
    def __init__(
        self,
        loader: CallLoader,
        sessions: SessionFactory,
        *,
        start_timeout_s: float = START_TIMEOUT_S,
        media_timeout_s: float = MEDIA_TIMEOUT_S,
        max_bad_frames: int = MAX_BAD_FRAMES,
        takeover_timeout_s: float = TAKEOVER_TIMEOUT_S,
        signature: StreamSignature | None = None,
        admission: Admission | None = None,
    ) -> None:
        """``signature``: check Twilio's handshake signature (a Twilio auth token is set).
        ``admission``: the process's call cap (none by default)."""
        self._loader = loader
        self._sessions = sessions
        self.admission = admission or Admission(sessions.stats)
        self.start_timeout_s = start_timeout_s
        self.media_timeout_s = media_timeout_s
        self.max_bad_frames = max_bad_frames
        self.takeover_timeout_s = takeover_timeout_s
        self._signature = signature
        # The stream of each call with a session in this process. One session per call:
        # a newer stream for the call takes over from the one before (see ``_take_over``).
        self._streams: dict[str, _Stream] = {}

    async def handle(self, websocket: WebSocket) -> None:
        if self._signature is not None and not self._signature.valid(websocket):
            log.warning("refused a twilio media stream without a valid X-Twilio-Signature")
            await _close(websocket, 1008)  # before accept: the handshake gets a 403
            return
        await websocket.accept()
        stats = StreamStats()
        try:
            async with asyncio.timeout(self.start_timeout_s):
                start = await self._wait_for_start(websocket, stats)
        except (TimeoutError, WebSocketDisconnect):
            log.warning("twilio stream closed or silent before 'start'")
            await _close(websocket, 1008)
            return
        call_id = start.custom_parameters.get("call_id", "")
        try:
            call = await self._loader.load(call_id)
        except CallNotFound:
            log.warning("twilio stream for unknown call %r (call sid %s)", call_id, start.call_sid)
            await _close(websocket, 1008)
            return
        if call.carrier_call_id is not None and start.call_sid != call.carrier_call_id:
            log.warning(
                "a twilio stream for call %s came from another call sid (%s)",
                call.call_id,
                start.call_sid,
            )
            await _close(websocket, 1008)
            return
        stream = _Stream()
        earlier = self._streams.get(call.call_id)
        self._streams[call.call_id] = stream
        try:
            resume = start.custom_parameters.get("resume") == "1"
            if earlier is not None:
                if not await self._take_over(call.call_id, earlier, stream):
                    await _close(websocket, 1008)
                    return
                resume = True  # the call was live here: no second greeting
            # A call that was live here already adds no load: it is always taken.
            if not self.admission.admit(always=earlier is not None):
                log.warning("call %s: refused, this process is full", call.call_id)
                await _close(websocket, TRY_AGAIN_LATER)
                return
            await self._run_call(websocket, start, call, stats, stream, resume=resume)
        finally:
            if self._streams.get(call.call_id) is stream:
                del self._streams[call.call_id]
            stream.done.set()

    async def _take_over(self, call_id: str, earlier: _Stream, stream: _Stream) -> bool:
        """A new stream for a call whose stream here still looks open. Twilio runs one
        stream per call: it has given up on the earlier socket (half-open, say: the
        network path broke and no close ever came) and asked our ``<Connect action>``
        what next. The earlier session hands the call over - its committed turns reach
        the workflow, no end - and this stream's session resumes from there."""
        log.warning("call %s: a new twilio stream replaces the one still open", call_id)
        earlier.supersede()
        try:
            async with asyncio.timeout(self.takeover_timeout_s):
                await earlier.done.wait()
        except TimeoutError:
            log.error("call %s: the replaced session did not stop in time", call_id)
            return False
        return not stream.superseded  # an even newer stream may have come meanwhile

    async def _run_call(
        self,
        websocket: WebSocket,
        start: tp.Start,
        call: LoadedCall,
        stats: StreamStats,
        stream: _Stream,
        *,
        resume: bool,
    ) -> None:
        """``resume``: the call was live on another realtime process (or on an earlier
        stream here); the session restores the conversation from the CallWorkflow."""
        outbound = TwilioOutbound(websocket, start.stream_sid)
        try:
            session = await self._sessions.create(
                call, outbound, MULAW_8K, resume=resume, frame_ms=OUTBOUND_FRAME_MS
            )
        except SessionNotCreated:
            self.admission.release()
            await _close(websocket, 1011)
            return
        except BaseException:
            self.admission.release()
            raise
        runner = asyncio.create_task(session.run(), name=f"{call.call_id}:session")
        runner.add_done_callback(lambda _: self.admission.release())
        pump = stream.pump = asyncio.create_task(
            self._pump(websocket, start.stream_sid, session, stats)
        )
        if stream.superseded:
            pump.cancel()  # replaced while the session was being set up
        # When the session ends by itself (the agent hung up), stop reading the socket.
        runner.add_done_callback(lambda _: pump.cancel())
        try:
            session.end(await pump)
        except asyncio.CancelledError:
            if stream.superseded and not runner.done():
                session.end(HANDED_OVER)
            elif not runner.done():
                # This handler was cancelled (a server past its shutdown grace): the
                # session must end too, or the wait for it below lasts as long as the
                # call could have.
                session.end(EndedReason.FAILED)
                raise
        except Exception:
            # A bug while handling one message must still end this call (with a reason),
            # not leave its session running with nobody feeding it.
            log.exception("call %s: the media stream failed", call.call_id)
            session.end(EndedReason.FAILED)
        finally:
            pump.cancel()
            ended = await runner
            log.info(
                "call %s ended (%s): %d frames, %d bad, %d ignored",
                call.call_id,
                ended,
                stats.frames,
                stats.bad_frames,
                stats.ignored,
            )
            await _close(websocket)

    async def _wait_for_start(self, websocket: WebSocket, stats: StreamStats) -> tp.Start:
        while True:
            text = await _receive(websocket)
            try:
                event = _parse(text)
            except tp.ProtocolError as exc:
                stats.bad_frames += 1
                log.warning("twilio: dropped a bad message before start: %s", exc)
                continue
            if isinstance(event, tp.Start):
                return event
            if not isinstance(event, tp.Connected):
                stats.ignored += 1  # media before start has no call to belong to

    async def _pump(
        self, websocket: WebSocket, stream_sid: str, session: CallSession, stats: StreamStats
    ) -> str:
        """Feed the session until Twilio stops, the socket drops or media stops coming."""
        watchdog = _Watchdog(self.media_timeout_s)
        try:
            while True:
                text = await _receive(websocket)
                watchdog.touch()
                reason = await self._dispatch(text, stream_sid, session, stats)
                if reason is not None:
                    return reason
        except asyncio.CancelledError:
            if not watchdog.fired:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own timeout, not a cancellation from outside
            log.warning(
                "call %s: no message for %.1f s, the stream is lost",
                session.setup.call_id,
                self.media_timeout_s,
            )
            return EndedReason.LOST
        except WebSocketDisconnect as exc:
            if exc.code == SERVER_RESTARTING:
                # Our own server is shutting down (it closes every socket with 1012). The
                # caller is still there: Twilio asks the stream's action URL what next,
                # and the call resumes on another server.
                return HANDED_OVER
            if exc.code in _BROKEN_STREAM_CODES:
                # The websocket layer gave up on what the peer sent: not a hang-up.
                log.warning("call %s: stream closed with %d", session.setup.call_id, exc.code)
                return EndedReason.MEDIA_ERROR
            return EndedReason.CALLER_HANGUP
        except RuntimeError:
            return EndedReason.CALLER_HANGUP
        finally:
            watchdog.stop()

    async def _dispatch(
        self, text: str | bytes, stream_sid: str, session: CallSession, stats: StreamStats
    ) -> str | None:
        call_id = session.setup.call_id
        try:
            event = _parse(text)
            if not isinstance(event, tp.Connected | tp.Unknown) and event.stream_sid != stream_sid:
                # Not ours: above all, a `stop` for another stream must not end this call.
                raise tp.ProtocolError(f"{type(event).__name__.lower()} for another stream sid")
        except tp.ProtocolError as exc:
            stats.bad_frames += 1
            log.warning("call %s: dropped a bad message: %s", call_id, exc)
            if stats.bad_frames > self.max_bad_frames:
                log.warning("call %s: more than %d bad messages", call_id, self.max_bad_frames)
                return EndedReason.MEDIA_ERROR
            return None
        if isinstance(event, tp.Media):
            stats.frames += 1
            await session.on_audio(event.payload)
        elif isinstance(event, tp.Mark):
            session.on_mark(event.name)
        elif isinstance(event, tp.Dtmf):
            session.on_dtmf(event.digit)
        elif isinstance(event, tp.Stop):
            return EndedReason.CALLER_HANGUP
        else:
            stats.ignored += 1
            if isinstance(event, tp.Unknown):
                log.info("call %s: ignored an unknown event %r", call_id, event.event)
        return None


class _Watchdog:
    """Cancels the task that made it when ``touch`` has not been called for ``timeout_s``
    - like wrapping each receive in ``asyncio.timeout``, without arming and cancelling a
    timer for each of the 50 messages a second: one timer re-arms itself lazily."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout_s, self._check)
        self.fired = False

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout_s and self._task is not None:
            self.fired = True
            self._timer = None
            self._task.cancel()
            return
        self._timer = self._loop.call_later(self._timeout_s - idle, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _receive(websocket: WebSocket) -> str | bytes:
    """The next message. Unlike ``receive_text``, which raises KeyError on a binary
    message and so takes the whole stream down, this hands binary ones on to be dropped."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    return text if text is not None else bytes(message.get("bytes") or b"")


def _parse(message: str | bytes) -> tp.TwilioEvent:
    if isinstance(message, bytes):
        raise tp.ProtocolError(f"binary message of {len(message)} bytes (Twilio sends text)")
    return tp.parse_message(message)


async def _close(websocket: WebSocket, code: int = 1000) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # closed by the peer
        await websocket.close(code)
