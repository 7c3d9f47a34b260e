"""`/media/web`: the same call session over a small websocket protocol for browsers and SDKs.

Protocol (docs/web-protocol.md):

client -> server
  text   {"type": "start", "call_id": "...", "token": "..."}   first message
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
from realtime.calls import CallLoader, CallNotFound, SessionFactory
from realtime.providers.base import PCM16_16K
from realtime.session import CallSession

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
MEDIA_TIMEOUT_S = 30.0
MAX_TEXT_BYTES = 4096
MAX_AUDIO_BYTES = 64_000  # 2 s of audio in one message is already more than anyone sends


class WebOutbound:
    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def send_audio(self, frame: bytes) -> None:
        await self._ws.send_bytes(frame)

    async def send_mark(self, name: str) -> None:
        await self._ws.send_text(json.dumps({"type": "mark", "name": name}))

    async def send_clear(self) -> None:
        await self._ws.send_text('{"type":"clear"}')


def _json(text: str) -> dict[str, Any] | None:
    if len(text) > MAX_TEXT_BYTES:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class WebMediaHandler:
    def __init__(self, loader: CallLoader, sessions: SessionFactory) -> None:
        self._loader = loader
        self._sessions = sessions

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
        await websocket.send_text(
            json.dumps({"type": "started", "call_id": call.call_id, "sample_rate": 16000})
        )
        session = await self._sessions.create(call, WebOutbound(websocket), PCM16_16K)
        runner = asyncio.create_task(session.run(), name=f"{call.call_id}:session")
        pump = asyncio.create_task(self._pump(websocket, session))
        runner.add_done_callback(lambda _: pump.cancel())
        try:
            session.end(await pump)
        except asyncio.CancelledError:
            if not runner.done():
                raise
        finally:
            pump.cancel()
            reason = await runner
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.send_text(json.dumps({"type": "ended", "reason": reason}))
            await _close(websocket, 1000, "call ended")

    async def _pump(self, websocket: WebSocket, session: CallSession) -> str:
        bad = 0
        try:
            while True:
                async with asyncio.timeout(MEDIA_TIMEOUT_S):
                    message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return EndedReason.CALLER_HANGUP
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
        except (WebSocketDisconnect, RuntimeError):
            return EndedReason.CALLER_HANGUP


def _hash(token: str) -> str:
    from builder_engine.apikeys import hash_key

    return hash_key(token)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code, reason)
