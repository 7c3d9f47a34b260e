"""The realtime process serving a live call is lost mid-call - killed (kill -9), or frozen
with its sockets open (and thawed after the move). Killed: Twilio sees the stream close
and asks the API (the stream's ``<Connect action>``), which streams the call to a healthy
worker at once. Frozen: the CallWorkflow misses the process's heartbeats within seconds
and moves the call (a Twilio REST call update with new stream TwiML, to the emulator);
the thawed process's session then reports its stream's end, which the call, live
elsewhere, ignores. Either way the phone follows the TwiML like Twilio would, to another
realtime server, and the call goes on there with its history - the model's next request
holds the earlier turns - and ends normally. Each process recorded its part of the call
(its own segment); the recording the API serves holds both, one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from e2e import TWILIO_TOKEN, Stack, running_stack
from histories import signals_received
from ports import free_port
from pydantic import SecretStr
from sqlmodel import Session, col, select
from test_tools_crash import WorkerProcess

from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import CallTurn
from emulators.openai import Reply, ScriptRule
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone
from emulators.twilio_rest import TwilioRestEmulator
from emulators.twiml import read_twiml
from realtime.resume import RESUME_LINE
from workflows.post_call import PostCallResult

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GREETING = "Hi, this is Sam from the bakery."
FIRST = "I would like a chocolate cake."
FIRST_ANSWER = "Sure, a chocolate cake. For which day?"
SECOND = "For Saturday please."
SECOND_ANSWER = "Saturday it is. Goodbye for now."
LLM_SCRIPT: list[ScriptRule] = [
    Reply(when_last_user_contains="cake", text=FIRST_ANSWER),
    Reply(when_last_user_contains="saturday", text=SECOND_ANSWER),
    Reply(text="Sorry?"),
]


class RealtimeProcess:
    """``builder-engine serve realtime`` as its own process, configured by environment."""

    def __init__(self, stack: Stack) -> None:
        settings = stack.settings
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        secret = SecretStr.get_secret_value
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "BUILDER_DATA_DIR": str(settings.data_dir),
            "BUILDER_TEMPORAL_ADDRESS": str(settings.temporal_address),
            "BUILDER_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
            "BUILDER_HOST": "127.0.0.1",
            "BUILDER_REALTIME_PORT": str(self.port),
            "BUILDER_LOG_LEVEL": "warning",
            "BUILDER_OPENAI_API_KEY": secret(settings.openai_api_key),  # type: ignore[arg-type]
            "BUILDER_OPENAI_BASE_URL": str(settings.openai_base_url),
            "BUILDER_DEEPGRAM_API_KEY": secret(settings.deepgram_api_key),  # type: ignore[arg-type]
            "BUILDER_DEEPGRAM_BASE_URL": str(settings.deepgram_base_url),
            "BUILDER_ELEVENLABS_API_KEY": secret(settings.elevenlabs_api_key),  # type: ignore[arg-type]
            "BUILDER_ELEVENLABS_BASE_URL": str(settings.elevenlabs_base_url),
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers.cli",
            "serve",
            "realtime",
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with httpx.AsyncClient() as client, asyncio.timeout(60):
            while True:
                assert self.process.returncode is None, "the realtime server exited"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{self.port}/healthz")).is_success:
                        return
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path, asr_script=[], llm_script=LLM_SCRIPT, in_process_worker=False
    ) as running:
        # Each realtime process opens its own recognizer connection: the first hears the
        # first question, the second (after the move) the second.
        def transcript(connection: int, utterance: int) -> str:
            return (FIRST, SECOND)[min(connection, 1)] if utterance == 0 else ""

        running.deepgram.script = transcript
        yield running


@pytest.mark.parametrize("failure", ["killed", "killed-late", "stopped", "frozen"])
async def test_a_realtime_worker_lost_mid_call_and_the_call_goes_on(
    stack: Stack, failure: str
) -> None:
    """``killed``: the process dies and its sockets close with it; Twilio asks the
    stream's ``<Connect action>`` what next, and the API streams the call at once to a
    healthy worker (here the stack's own realtime server). ``stopped``: the same after a
    graceful shutdown (SIGTERM, a deploy): the process hands its calls over rather than
    ending them, and exits cleanly. ``frozen``: the process stops
    (SIGSTOP) with its sockets open, so Twilio notices nothing; the CallWorkflow misses
    the process's beats and moves the call with a REST call update (to a second process);
    then it wakes up - cut off for a while, not dead - and its session reports the end of
    its stream (Twilio closed it for the move): the call goes on regardless.
    ``killed-late``: killed, and the new stream comes only after the dead process's
    loss has reached the call (a slow reconnection): the carrier's move is not repeated.
    """
    first = RealtimeProcess(stack)
    second = RealtimeProcess(stack) if failure == "frozen" else None
    async with TwilioRestEmulator(auth_token=TWILIO_TOKEN) as rest:
        worker = WorkerProcess(stack)
        worker.env.update(
            {
                "BUILDER_TWILIO_ACCOUNT_SID": rest.account_sid,
                "BUILDER_TWILIO_AUTH_TOKEN": rest.auth_token,
                "BUILDER_TWILIO_API_BASE_URL": rest.url,
                # Where a moved call goes: in production a load balancer in front of the
                # healthy replicas; here the second process.
                "BUILDER_REALTIME_PUBLIC_URL": second.url if second else stack.realtime_url,
            }
        )
        try:
            await asyncio.gather(
                first.start(), worker.start(), *([second.start()] if second else [])
            )
            agent = await stack.create_agent(
                name="Bakery", first_message=GREETING, turn={"endpointing_ms": 200}
            )
            number = await stack.add_number(agent["id"])
            call_sid, _, call_id = await stack.incoming_call(number)
            answer = read_twiml(stack.answers[call_sid])
            assert answer.stream is not None and answer.stream.action is not None

            phone = TwilioPhone(
                f"{first.url}/media/twilio",
                parameters={"call_id": call_id},
                call_sid=call_sid,
                auth_token=TWILIO_TOKEN,
            )
            loop = asyncio.get_running_loop()
            async with phone:
                first_connected = loop.time()
                await phone.wait_for_media_after(0, within=15)
                await phone.wait_until_quiet(0.4, within=15)
                utterance = phone.say(caller_speech(FIRST))
                await utterance.done.wait()
                answered = await phone.wait_for_media_after(utterance.ended_at or 0.0, within=15)
                await phone.wait_until_quiet(0.4, within=15)
                assert answered

                assert first.process is not None
                lost_at = first_ended = loop.time()
                if failure != "frozen":
                    # The process goes with the call live; its socket closes, and Twilio
                    # goes to the stream's action URL.
                    if failure != "stopped":
                        first.process.kill()
                    else:
                        first.process.terminate()
                    await phone.wait_closed_by_server(within=5)
                    follow = await stack.stream_ended(answer.stream.action, call_sid)
                    async with asyncio.timeout(20):
                        exit_code = await first.process.wait()
                    assert exit_code == (0 if failure == "stopped" else -signal.SIGKILL)
                    if failure == "killed-late":
                        handle = stack.temporal.get_workflow_handle(call_id)
                        async with asyncio.timeout(15):
                            while not signals_received(
                                await handle.fetch_history(), "session_lost"
                            ):
                                await asyncio.sleep(0.1)
                else:
                    os.kill(first.process.pid, signal.SIGSTOP)
                    async with asyncio.timeout(20):
                        while not rest.updates(call_sid):
                            await asyncio.sleep(0.02)
                    follow = read_twiml(rest.updates(call_sid)[-1]["Twiml"])
                    await phone.move_on()  # Twilio runs the new TwiML
                    # The process comes back (it was cut off, not dead): its session
                    # finds its stream closed and reports an end - which must not end
                    # the call that goes on elsewhere.
                    os.kill(first.process.pid, signal.SIGCONT)
                    handle = stack.temporal.get_workflow_handle(call_id)
                    async with asyncio.timeout(15):
                        while not signals_received(await handle.fetch_history(), "ended"):
                            await asyncio.sleep(0.1)
                    # Its recording segment ran on through the freeze to this end.
                    first_ended = loop.time()
                moved_after = loop.time() - lost_at
            print(f"{failure} -> call streamed to a healthy worker: {moved_after:.2f} s")
            assert moved_after < {"frozen": 6.0, "killed-late": 10.0}.get(failure, 3.0)

            healthy = second.url if second else stack.realtime_url
            assert follow.stream is not None
            assert follow.stream.url == f"{healthy}/media/twilio"
            assert follow.stream.parameters == {"call_id": call_id, "resume": "1"}
            assert follow.stream.action is not None  # a second loss is survived the same way

            # Twilio follows the new TwiML: a new stream, same call, to the other worker.
            requests_before = len(stack.openai.chat_requests)
            phone = TwilioPhone(
                follow.stream.url,
                parameters=follow.stream.parameters,
                call_sid=call_sid,
                auth_token=TWILIO_TOKEN,
            )
            async with phone:
                second_connected = loop.time()
                # "Sorry about that, where were we?" - not the greeting again.
                await phone.wait_for_media_after(0, within=15)
                await phone.wait_until_quiet(0.4, within=15)
                utterance = phone.say(caller_speech(SECOND))
                await utterance.done.wait()
                await phone.wait_for_media_after(utterance.ended_at or 0.0, within=15)
                await phone.wait_until_quiet(0.4, within=15)
            second_s = loop.time() - second_connected

            handle = stack.temporal.get_workflow_handle(call_id)
            result = await asyncio.wait_for(handle.result(), 30)
            # The post-call workflow (on the worker process) finalizes the recording.
            post_call = stack.temporal.get_workflow_handle(
                f"{call_id}-post-call", result_type=PostCallResult
            )
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(Exception):  # not started yet
                        post_call_result = await post_call.result()
                        break
                    await asyncio.sleep(0.1)
        finally:
            await first.stop()
            if second is not None:
                await second.stop()
            await worker.stop()
        if failure != "frozen":
            # Twilio streamed the call again itself: the workflow, told so, does not move
            # it a second time (which would cut the new stream) - however late the loss.
            assert rest.updates(call_sid) == []

    assert result["status"] == "ended"
    # The model's request on the second worker holds the conversation from the first.
    request = stack.openai.chat_requests[requests_before].body["messages"]
    said = [(m["role"], m.get("content")) for m in request if m["role"] != "system"]
    assert said == [
        ("assistant", GREETING),
        ("user", FIRST),
        ("assistant", FIRST_ANSWER),
        ("assistant", RESUME_LINE),
        ("user", SECOND),
    ]

    sync_engine = create_sync_engine(stack.settings)
    with Session(sync_engine) as session:
        turns = session.exec(
            select(CallTurn).where(CallTurn.call_id == call_id).order_by(col(CallTurn.index))
        ).all()
    sync_engine.dispose()
    assert [(t.index, t.speaker, t.text) for t in turns] == [
        (0, "agent", GREETING),
        (1, "caller", FIRST),
        (2, "agent", FIRST_ANSWER),
        (3, "agent", RESUME_LINE),
        (4, "caller", SECOND),
        (5, "agent", SECOND_ANSWER),
    ]

    # The recording: the first process's segment (up to its last flush before the kill,
    # at most a second lost) and then the second's, joined into one.
    first_s = first_ended - first_connected
    recording = post_call_result.recording
    assert recording.status == "stored" and recording.duration_s is not None
    print(f"recording {recording.duration_s:.2f} s; sessions {first_s:.2f} s + {second_s:.2f} s")
    assert first_s + second_s - 1.5 < recording.duration_s < first_s + second_s + 0.5
    assert not list(stack.settings.effective_recordings_dir.glob(f"{call_id}.*.wav"))
    served = await stack.api.get(f"/v1/calls/{call_id}/recording")
    assert served.status_code == 200
    with wave.open(io.BytesIO(served.content)) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == 8000
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    assert abs(len(frames) / 8000 - recording.duration_s) < 0.01
    # Caller (left) and agent (right) are heard in both sessions' parts: the greeting,
    # the first question and its answer before the kill; the resume line, the second
    # question and its answer after it.
    split = round((first_s - 1.2) * 8000)
    tail = len(frames) - round((second_s - 0.3) * 8000)
    for side in (0, 1):
        assert voiced_s(frames[:split, side]) > 0.5, f"channel {side} of the first session"
        assert voiced_s(frames[tail:, side]) > 0.5, f"channel {side} of the second session"


def voiced_s(samples: npt.NDArray[np.int16]) -> float:
    """Seconds of 20 ms windows with audible sound (above -40 dBFS)."""
    usable = len(samples) // 160 * 160
    windows = samples[:usable].astype(np.float64).reshape(-1, 160)
    rms = np.sqrt((windows**2).mean(axis=1))
    return float((rms > 328).sum()) * 0.02
