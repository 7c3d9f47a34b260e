"""`/media/web`: the same call session over a small websocket protocol for browsers and SDKs.

Protocol (docs/web-protocol.md):

client -> server
  text   {"type": "start", "call_id": "...", "token": "...", "resume": false}   first message
         (after a dropped socket: the same call_id + token again resumes the call - on this
         server within the reconnect grace period, or with "resume": true on another one
         when this one died or closed the socket with 1012 - it is shutting down)
  binary PCM16 little-endian mono 16 kHz audio, any length (20 ms = 640 bytes is best)
  text   {"type": "mark", "name": "..."}    echo each mark once the audio before it played
  text   {"type": "dtmf", "digit": "5"}     keypad input
  text   {"type": "hangup"}
server -> client
  text   {"type": "started", "call_id": "...", "sample_rate": 16000}
  binary PCM16 little-endian mono 16 kHz agent audio, 20 ms per message, paced at real time
  text   {"type": "mark", "name": "..."}    echo it back when played
  text   {"type": "clear"}                  stop playing and drop buffered agent audio now
  text   {"type": "ended", "reason": "..."}
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from builder_engine.calls import EndedReason
from realtime.admission import TRY_AGAIN_LATER, Admission
from realtime.calls import CallLoader, CallNotFound, SessionFactory, SessionNotCreated
from realtime.providers.base import PCM16_16K
from realtime.session import HANDED_OVER, CallSession
from realtime.transports import SERVER_RESTARTING

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
MEDIA_TIMEOUT_S = 30.0
MAX_TEXT_BYTES = 4096
#: Close code of a socket whose call moved to a newer connection of the same client.
REPLACED = 4000
MAX_AUDIO_BYTES = 64_000  # 2 s of audio in one message is already more than anyone sends


#: A dropped socket (no hangup message) keeps the call for this long, for the client to
#: reconnect with the same call id and token; then the call ends as a caller hang-up.
RECONNECT_GRACE_S = 10.0
_DROPPED = "dropped"  # the pump's word for a socket gone without a hangup


class WebOutbound:
    """The attached socket of a call; while none is (a dropped socket), output is dropped."""

    def __init__(self, websocket: WebSocket) -> None:
        self.ws: WebSocket | None = websocket

    async def send_audio(self, frame: bytes) -> None:
        await self._send(frame)

    async def send_mark(self, name: str) -> None:
        await self._send(json.dumps({"type": "mark", "name": name}))

    async def send_clear(self) -> None:
        await self._send('{"type":"clear"}')

    async def _send(self, message: str | bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            # Gone: the reading side notices and waits for the client to come back.
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_text(message)


class _LiveCall:
    def __init__(self, session: CallSession, outbound: WebOutbound, runner: asyncio.Task[str]):
        self.session = session
        self.outbound = outbound
        self.runner = runner
        self.attached = True
        self.grace: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[str] | None = None  # reading the current socket


def _json(text: str) -> dict[str, Any] | None:
    if len(text) > MAX_TEXT_BYTES:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class WebMediaHandler:
    def __init__(
        self,
        loader: CallLoader,
        sessions: SessionFactory,
        *,
        reconnect_grace_s: float = RECONNECT_GRACE_S,
        admission: Admission | None = None,
    ) -> None:
        """``admission``: the process's call cap (none by default)."""
        self._loader = loader
        self._sessions = sessions
        self.admission = admission or Admission(sessions.stats)
        self.reconnect_grace_s = reconnect_grace_s
        self._live: dict[str, _LiveCall] = {}  # calls with a session in this process

    async def handle(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                start = _json(await websocket.receive_text())
        except (TimeoutError, WebSocketDisconnect, KeyError, RuntimeError):
            await _close(websocket, 1008, "expected a start message")
            return
        if start is None or start.get("type") != "start":
            await _close(websocket, 1008, 'the first message must be {"type": "start"}')
            return
        try:
            call = await self._loader.load(str(start.get("call_id", "")))
        except CallNotFound:
            await _close(websocket, 1008, "unknown call")
            return
        expected = call.join_token_hash
        token = str(start.get("token", ""))
        if expected is None or not hmac.compare_digest(expected, _hash(token)):
            await _close(websocket, 1008, "bad token")
            return
        live = self._live.get(call.call_id)
        if live is not None:
            if live.attached and live.pump is not None:
                # The client is back while its old socket still looks open here (a
                # network change leaves it half-open until the media timeout): the call's
                # token holder moved to this socket, the old one is let go.
                log.info("call %s: a new connection takes the call over", call.call_id)
                live.pump.cancel()
            # The client is back: the same session goes on, on this socket.
            if live.grace is not None:
                live.grace.cancel()
            live.outbound.ws = websocket
            live.attached = True
            await self._started(websocket, call.call_id, resumed=True)
            await self._serve(websocket, live)
            return
        if not self.admission.admit():
            log.warning("call %s: refused, this process is full", call.call_id)
            await _close(websocket, TRY_AGAIN_LATER, "this server is full, try again")
            return
        # "resume": the call's session was on a realtime server that died; this one
        # restores the conversation from the CallWorkflow.
        resume = start.get("resume") is True
        outbound = WebOutbound(websocket)
        try:
            # "started" goes first, so that no await comes between making the session
            # and running it: a session that never runs never gives back what it holds.
            await self._started(websocket, call.call_id, resumed=resume)
            session = await self._sessions.create(call, outbound, PCM16_16K, resume=resume)
        except SessionNotCreated as exc:
            self.admission.release()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.send_text(json.dumps({"type": "ended", "reason": exc.reason}))
            await _close(websocket, 1011, "the call could not be set up")
            return
        except BaseException:
            self.admission.release()
            raise
        runner = asyncio.create_task(session.run(), name=f"{call.call_id}:session")
        runner.add_done_callback(lambda _: self.admission.release())
        live = self._live[call.call_id] = _LiveCall(session, outbound, runner)
        runner.add_done_callback(lambda _: self._live.pop(call.call_id, None))
        await self._serve(websocket, live)

    async def _started(self, websocket: WebSocket, call_id: str, *, resumed: bool) -> None:
        message = {"type": "started", "call_id": call_id, "sample_rate": 16000}
        if resumed:
            message["resumed"] = True
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.send_text(json.dumps(message))

    async def _serve(self, websocket: WebSocket, live: _LiveCall) -> None:
        """Feed the call from this socket until the call ends or the socket drops."""
        session, runner = live.session, live.runner
        pump = live.pump = asyncio.create_task(self._pump(websocket, session))
        try:
            await asyncio.wait({pump, runner}, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                if pump.cancelled():  # a newer connection took the call over
                    await _close(websocket, REPLACED, "the call moved to a newer connection")
                    return
                reason = pump.result()
                if reason == _DROPPED:
                    # Keep the call for the client to come back (same call id and token).
                    live.outbound.ws = None
                    live.attached = False
                    live.grace = asyncio.get_running_loop().call_later(
                        self.reconnect_grace_s, session.end, EndedReason.CALLER_HANGUP
                    )
                    call_id = session.setup.call_id
                    log.info("call %s: the socket dropped, waiting for a reconnect", call_id)
                    return
                session.end(reason)
        except asyncio.CancelledError:
            if not runner.done():
                session.end(EndedReason.FAILED)
            raise
        finally:
            pump.cancel()
        ended = await runner
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.send_text(json.dumps({"type": "ended", "reason": ended}))
        await _close(websocket, 1000, "call ended")

    async def _pump(self, websocket: WebSocket, session: CallSession) -> str:
        bad = 0
        try:
            while True:
                async with asyncio.timeout(MEDIA_TIMEOUT_S):
                    message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return _dropped(message.get("code"))
                audio = message.get("bytes")
                if audio is not None:
                    if len(audio) > MAX_AUDIO_BYTES or len(audio) % 2:
                        bad += 1
                        log.warning(
                            "call %s: dropped an audio message of %d bytes",
                            session.setup.call_id,
                            len(audio),
                        )
                    else:
                        await session.on_audio(audio)
                    continue
                control = _json(message.get("text") or "")
                kind = control.get("type") if control else None
                if kind == "mark" and control is not None:
                    session.on_mark(str(control.get("name", "")))
                elif kind == "dtmf" and control is not None:
                    digit = str(control.get("digit", ""))
                    if len(digit) == 1 and digit in "0123456789*#":
                        session.on_dtmf(digit)
                elif kind == "hangup":
                    return EndedReason.CALLER_HANGUP
                else:
                    bad += 1
                    log.warning("call %s: dropped a bad control message", session.setup.call_id)
                if bad > 50:
                    return EndedReason.MEDIA_ERROR
        except TimeoutError:
            return EndedReason.LOST
        except WebSocketDisconnect as exc:
            return _dropped(exc.code)
        except RuntimeError:
            return _DROPPED


def _dropped(code: object) -> str:
    """A socket gone without a hangup: the client may come back - unless our own server
    is shutting down, when the client reconnects to another one and resumes there."""
    return HANDED_OVER if code == SERVER_RESTARTING else _DROPPED


def _hash(token: str) -> str:
    from builder_engine.apikeys import hash_key

    return hash_key(token)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code, reason)
