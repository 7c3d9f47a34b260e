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
from realtime.calls import CallLoader, CallNotFound, SessionFactory
from realtime.providers.base import MULAW_8K
from realtime.session import CallSession
from realtime.transports import twilio_protocol as tp

log = logging.getLogger(__name__)

#: Messages waited for before `start` (Twilio sends `connected` then `start` at once).
START_TIMEOUT_S = 10.0
#: A call whose media stops arriving for this long is considered lost.
MEDIA_TIMEOUT_S = 15.0
#: Bad frames tolerated per call before the stream is considered broken.
MAX_BAD_FRAMES = 50


class TwilioOutbound:
    """What the session sends back to Twilio over the same websocket."""

    def __init__(self, websocket: WebSocket, stream_sid: str) -> None:
        self._ws = websocket
        self._sid = stream_sid

    async def send_audio(self, frame: bytes) -> None:
        await self._ws.send_text(tp.media_message(self._sid, frame))

    async def send_mark(self, name: str) -> None:
        await self._ws.send_text(tp.mark_message(self._sid, name))

    async def send_clear(self) -> None:
        await self._ws.send_text(tp.clear_message(self._sid))


@dataclass
class StreamStats:
    frames: int = 0
    bad_frames: int = 0
    ignored: int = 0


class TwilioMediaHandler:
    def __init__(self, loader: CallLoader, sessions: SessionFactory) -> None:
        self._loader = loader
        self._sessions = sessions

    async def handle(self, websocket: WebSocket) -> None:
        await websocket.accept()
        stats = StreamStats()
        try:
            start = await asyncio.wait_for(self._wait_for_start(websocket, stats), START_TIMEOUT_S)
        except (TimeoutError, WebSocketDisconnect):
            log.warning("twilio stream closed or silent before 'start'")
            await _close(websocket)
            return
        call_id = start.custom_parameters.get("call_id", "")
        try:
            call = await self._loader.load(call_id)
        except CallNotFound:
            log.warning("twilio stream for unknown call %r (call sid %s)", call_id, start.call_sid)
            await _close(websocket, 1008)
            return
        outbound = TwilioOutbound(websocket, start.stream_sid)
        session = await self._sessions.create(call, outbound, MULAW_8K)
        runner = asyncio.create_task(session.run(), name=f"{call.call_id}:session")
        pump = asyncio.create_task(self._pump(websocket, start.stream_sid, session, stats))
        # When the session ends by itself (the agent hung up), stop reading the socket.
        runner.add_done_callback(lambda _: pump.cancel())
        try:
            session.end(await pump)
        except asyncio.CancelledError:
            if not runner.done():
                raise
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
            text = await websocket.receive_text()
            try:
                event = tp.parse_message(text)
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
        try:
            while True:
                async with asyncio.timeout(MEDIA_TIMEOUT_S):
                    text = await websocket.receive_text()
                reason = await self._dispatch(text, stream_sid, session, stats)
                if reason is not None:
                    return reason
        except TimeoutError:
            log.warning("call %s: no media for %.0f s", session.setup.call_id, MEDIA_TIMEOUT_S)
            return EndedReason.LOST
        except (WebSocketDisconnect, RuntimeError):
            return EndedReason.CALLER_HANGUP

    async def _dispatch(
        self, text: str, stream_sid: str, session: CallSession, stats: StreamStats
    ) -> str | None:
        try:
            event = tp.parse_message(text)
        except tp.ProtocolError as exc:
            stats.bad_frames += 1
            log.warning("call %s: dropped a bad message: %s", session.setup.call_id, exc)
            if stats.bad_frames > MAX_BAD_FRAMES:
                return EndedReason.MEDIA_ERROR
            return None
        if isinstance(event, tp.Media):
            if event.stream_sid != stream_sid:
                stats.bad_frames += 1
                log.warning("call %s: media for another stream sid", session.setup.call_id)
                return None
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
        return None


async def _close(websocket: WebSocket, code: int = 1000) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # closed by the peer
        await websocket.close(code)
