"""A browser call whose socket drops: the client reconnects with the same call id and
token within the grace period and the same call goes on - no second greeting, one
session (also while the old socket still looks open: the newer connection wins); a
client that never comes back ends the call as a caller hang-up; a server that shuts
down closes the socket with 1012 and the call goes on on another server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from e2e import Stack, running_stack
from test_call_move import RealtimeProcess
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emulators.openai import Reply
from realtime.resume import RESUME_LINE

pytestmark = pytest.mark.slow


async def _start(stack: Stack) -> dict[str, Any]:
    agent = await stack.create_agent(
        name="Web agent", first_message="Hi there!", turn={"endpointing_ms": 200}
    )
    created = await stack.api.post("/v1/calls/web", json={"agent_id": agent["id"]})
    assert created.status_code == 201, created.text
    call: dict[str, Any] = created.json()
    return call


async def _join(
    call: dict[str, Any], *, url: str | None = None, resume: bool = False
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url or call["websocket_url"])
    start = {"type": "start", "call_id": call["call_id"], "token": call["token"]}
    await ws.send(json.dumps({**start, "resume": resume}))
    started: dict[str, Any] = json.loads(await ws.recv())
    return ws, started


async def _hang_up(ws: ClientConnection) -> dict[str, Any] | None:
    await ws.send(b"\x00" * 640)
    await ws.send(json.dumps({"type": "hangup"}))
    ended = None
    async for message in ws:
        if isinstance(message, str) and json.loads(message)["type"] == "ended":
            ended = json.loads(message)
    return ended


async def _listen(ws: ClientConnection, seconds: float) -> int:
    """Audio frames received in ``seconds`` (marks echoed as played)."""
    frames = 0
    try:
        async with asyncio.timeout(seconds):
            async for message in ws:
                if isinstance(message, bytes):
                    frames += 1
                elif json.loads(message)["type"] == "mark":
                    await ws.send(message)
    except TimeoutError:
        pass
    return frames


async def test_a_dropped_web_socket_reconnects_to_the_same_call(tmp_path: Path) -> None:
    async with running_stack(tmp_path, asr_script=[], llm_script=[Reply(text="Hello.")]) as stack:
        call = await _start(stack)
        ws, started = await _join(call)
        assert "resumed" not in started
        assert await _listen(ws, 2.0) > 0  # the greeting
        await ws.close()  # the network dropped: no hangup message

        await asyncio.sleep(1.0)
        ws, started = await _join(call)
        assert started["resumed"] is True and started["call_id"] == call["call_id"]

        # The network changes again, and the server never hears the old socket close (it
        # looks open): the client's new connection takes the call over at once.
        newer, started = await _join(call)
        assert started["resumed"] is True
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                async for _ in ws:
                    pass
        assert ws.close_code == 4000
        assert await _hang_up(newer) == {"type": "ended", "reason": "caller-hangup"}

        handle = stack.temporal.get_workflow_handle(call["call_id"])
        await asyncio.wait_for(handle.result(), 15)
        detail = (await stack.api.get(f"/v1/calls/{call['call_id']}")).json()
        assert detail["ended_reason"] == "caller-hangup"
        assert [t["text"] for t in detail["turns"]] == ["Hi there!"]  # greeted once


async def test_a_client_that_never_comes_back_ends_the_call(tmp_path: Path) -> None:
    async with running_stack(tmp_path, asr_script=[], llm_script=[Reply(text="Hello.")]) as stack:
        call = await _start(stack)
        ws, _ = await _join(call)
        await _listen(ws, 1.0)
        await ws.close()
        handle = stack.temporal.get_workflow_handle(call["call_id"])
        # The default grace period (10 s), then the end.
        result = await asyncio.wait_for(handle.result(), 30)
        assert result["ended_reason"] == "caller-hangup"


async def test_a_server_shutting_down_hands_the_call_over_to_another(tmp_path: Path) -> None:
    """SIGTERM (a deploy): the server closes the socket with 1012 instead of ending the
    call; the client reconnects - here to the stack's own realtime server - with
    ``"resume": true``, and the call goes on there with its history."""
    async with running_stack(tmp_path, asr_script=[], llm_script=[Reply(text="Hello.")]) as stack:
        leaving = RealtimeProcess(stack)
        await leaving.start()
        assert leaving.process is not None
        try:
            call = await _start(stack)
            ws, started = await _join(call, url=f"{leaving.url}/media/web")
            assert await _listen(ws, 2.0) > 0  # the greeting, played and marked
            leaving.process.terminate()
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            async with asyncio.timeout(20):
                assert await leaving.process.wait() == 0

            ws, started = await _join(call, resume=True)
            assert started["resumed"] is True
            assert await _listen(ws, 3.0) > 0  # "Sorry about that, where were we?"
            assert await _hang_up(ws) == {"type": "ended", "reason": "caller-hangup"}
        finally:
            await leaving.stop()
        handle = stack.temporal.get_workflow_handle(call["call_id"])
        await asyncio.wait_for(handle.result(), 15)
        detail = (await stack.api.get(f"/v1/calls/{call['call_id']}")).json()
        assert detail["ended_reason"] == "caller-hangup"
        assert [t["text"] for t in detail["turns"]] == ["Hi there!", RESUME_LINE]
