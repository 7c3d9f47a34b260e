"""A browser call over /media/web: PCM16 at 16 kHz both ways, marks echoed, same session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from e2e import running_stack
from websockets.asyncio.client import connect

from emulators.openai import Reply
from emulators.speech import caller_speech
from realtime.media.resample import StreamResampler

pytestmark = pytest.mark.slow


def _to_16k(pcm8k: np.ndarray) -> bytes:
    resampler = StreamResampler(8000, 16000)
    audio = np.concatenate([resampler.process(pcm8k), resampler.flush(np.int16)])
    return audio.astype("<i2").tobytes()


async def test_a_browser_call(tmp_path: Path) -> None:
    async with running_stack(
        tmp_path,
        asr_script=["Do you open on Saturdays?"],
        llm_script=[Reply(when_last_user_contains="saturday", text="Yes, from ten to two.")],
    ) as stack:
        agent = await stack.create_agent(
            name="Web agent",
            first_message="Hi there!",
            turn={"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 0},
        )
        created = await stack.api.post(
            "/v1/calls/web", json={"agent_id": agent["id"], "variables": {"name": "Ann"}}
        )
        assert created.status_code == 201, created.text
        call = created.json()

        async with connect(call["websocket_url"]) as bad:
            await bad.send(
                json.dumps({"type": "start", "call_id": call["call_id"], "token": "wrong"})
            )
            await asyncio.wait_for(bad.wait_closed(), 5)
            assert bad.close_code == 1008

        received: list[tuple[float, bytes]] = []
        loop = asyncio.get_running_loop()
        async with connect(call["websocket_url"]) as ws:
            await ws.send(
                json.dumps({"type": "start", "call_id": call["call_id"], "token": call["token"]})
            )
            started = json.loads(await ws.recv())
            assert started == {"type": "started", "call_id": call["call_id"], "sample_rate": 16000}

            async def listen() -> None:
                async for message in ws:
                    if isinstance(message, bytes):
                        received.append((loop.time(), message))
                    else:
                        event = json.loads(message)
                        if event["type"] == "mark":  # "played" at once
                            await ws.send(json.dumps({"type": "mark", "name": event["name"]}))

            listener = asyncio.create_task(listen())
            silence = b"\x00" * 640
            speech = _to_16k(caller_speech("Do you open on Saturdays?"))
            frames = [silence] * 50 + [
                speech[i : i + 640].ljust(640, b"\x00") for i in range(0, len(speech), 640)
            ]
            start = loop.time()
            spoken_at = start + len(frames) * 0.02
            for n in range(len(frames) + 500):  # then silence until the answer has played
                await asyncio.sleep(max(0.0, start + n * 0.02 - loop.time()))
                await ws.send(frames[n] if n < len(frames) else silence)
                answer = [t for t, _ in received if t > spoken_at]
                if answer and loop.time() - answer[-1] > 0.5:
                    break
            await ws.send(json.dumps({"type": "hangup"}))
            await asyncio.wait_for(listener, 5)

        assert received and all(len(frame) == 640 for _, frame in received)
        handle = stack.temporal.get_workflow_handle(call["call_id"])
        await asyncio.wait_for(handle.result(), 15)
        detail = (await stack.api.get(f"/v1/calls/{call['call_id']}")).json()
        assert detail["direction"] == "web" and detail["ended_reason"] == "caller-hangup"
        assert [t["text"] for t in detail["turns"]] == [
            "Hi there!",
            "Do you open on Saturdays?",
            "Yes, from ten to two.",
        ]
