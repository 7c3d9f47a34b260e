"""A phone call end to end: Twilio's signed webhook, Media Streams at real time, the
emulated Deepgram / OpenAI / ElevenLabs behind, the CallWorkflow in a real Temporal dev
server, and what the call API, the recording and the workflow history say afterwards."""

from __future__ import annotations

import asyncio
import itertools
import wave
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e import running_stack
from histories import activities_run

from emulators.openai import Reply
from emulators.speech import caller_speech

pytestmark = pytest.mark.slow

GREETING = "Thanks for calling Acme Dental, how can I help?"
HOURS = "We are open from nine to five, Monday to Friday."
SERVICES = (
    "We offer cleanings, fillings, crowns and whitening. "
    "Our hygienists see patients every weekday. "
    "We also have an orthodontist on Tuesdays and Thursdays. "
    "New patients get a free consultation with x-rays included. "
    "We accept most insurance plans and offer payment plans."
)
WALK_INS = "Yes, we take walk-ins every morning."

AGENT: dict[str, Any] = {
    "name": "Front desk",
    "first_message": GREETING,
    "brain": {"model": "gpt-4o-mini", "system_prompt": "You answer calls for {{business}}."},
    "asr": {"provider": "deepgram"},
    "tts": {"provider": "elevenlabs", "voice": "rachel"},
    "turn": {"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 0},
    "variables": {"business": "Acme Dental"},
}


async def test_a_phone_call_end_to_end(tmp_path: Path) -> None:
    async with running_stack(
        tmp_path,
        asr_script=[
            "What are your opening hours?",
            "What services do you offer?",
            "Wait, do you take walk-ins?",
        ],
        llm_script=[
            Reply(when_last_user_contains="hours", text=HOURS),
            Reply(when_last_user_contains="services", text=SERVICES),
            Reply(when_last_user_contains="walk-ins", text=WALK_INS),
        ],
    ) as stack:
        agent = await stack.create_agent(**AGENT)
        number = await stack.add_number(agent["id"])
        call_sid, stream_url, call_id = await stack.incoming_call(number)
        assert stream_url == f"{stack.realtime_url}/media/twilio"

        async with stack.phone(stream_url, call_id, call_sid) as phone:
            loop = asyncio.get_running_loop()
            # The agent speaks first.
            await phone.wait_for_media_after(0, within=5)
            await phone.wait_until_quiet(0.3, within=10)

            # A question, and its answer.
            question = phone.say(caller_speech("What are your opening hours?"))
            await question.done.wait()
            assert question.ended_at is not None
            first_answer_at = await phone.wait_for_media_after(question.ended_at, within=5)
            await phone.wait_until_quiet(0.3, within=10)

            # A long answer, interrupted by the caller.
            long_question = phone.say(caller_speech("What services do you offer?"))
            await long_question.done.wait()
            assert long_question.ended_at is not None
            await phone.wait_for_media_after(long_question.ended_at, within=5)
            await asyncio.sleep(1.5)
            barge_in = phone.say(caller_speech("Wait, do you take walk-ins?"))
            await barge_in.done.wait()
            clears = [r for r in phone.received if r.event == "clear"]
            assert len(clears) == 1, "the agent did not stop talking"
            assert barge_in.started_at is not None and barge_in.ended_at is not None
            clear_delay = clears[0].at - barge_in.started_at
            assert 0 < clear_delay < 0.6
            # Nothing of the interrupted answer after `clear`: the next audio is the new
            # answer, which only starts once the caller has finished.
            after_clear = phone.media_after(clears[0].at)
            assert not after_clear or after_clear[0].at > barge_in.ended_at
            await phone.wait_for_media_after(barge_in.ended_at, within=5)
            await phone.wait_until_quiet(0.3, within=10)
            hung_up_at = loop.time()

        assert first_answer_at - question.ended_at < 1.5
        handle = stack.temporal.get_workflow_handle(call_id)
        result = await asyncio.wait_for(handle.result(), 15)
        assert result["status"] == "ended"
        # Once its session has ended, the call has given back its place in the providers'
        # connection pools.
        stats_url = stack.realtime_url.replace("ws://", "http://", 1) + "/stats"
        async with httpx.AsyncClient() as plain, asyncio.timeout(5):
            while (stats := (await plain.get(stats_url)).json())["active_calls"]:
                await asyncio.sleep(0.05)
        assert (stats["pooled_calls"], stats["http_pools"]) == (0, 1)

        call = (await stack.api.get(f"/v1/calls/{call_id}")).json()
        assert call["status"] == "ended" and call["ended_reason"] == "caller-hangup"
        assert call["agent_version"] == agent["version"] and call["direction"] == "inbound"
        turns = call["turns"]
        assert [(t["speaker"], t["interrupted"]) for t in turns] == [
            ("agent", False),
            ("caller", False),
            ("agent", False),
            ("caller", False),
            ("agent", True),
            ("caller", False),
            ("agent", False),
        ]
        assert turns[0]["text"] == GREETING
        assert turns[1]["text"] == "What are your opening hours?"
        assert turns[2]["text"] == HOURS
        heard = turns[4]["text"]
        assert heard and SERVICES.startswith(heard) and len(heard) < len(SERVICES) / 2
        assert turns[6]["text"] == WALK_INS
        # Each turn's time: from the caller's first word (the agent's first audio sent) to
        # its commit; one after the other.
        spans = [(_at(t["started_at"]), _at(t["ended_at"])) for t in turns]
        assert all(start <= end for start, end in spans), spans
        assert all(a[0] < b[0] for a, b in itertools.pairwise(spans)), spans
        asked, answered = spans[1], spans[2]
        assert 0.8 < (asked[1] - asked[0]).total_seconds() < 4  # ~1.4 s of speech, ASR
        assert asked[1] <= answered[0]
        latency = turns[2]["latency"]
        for name in (
            "endpoint_ms",
            "asr_final_ms",
            "llm_first_token_ms",
            "tts_first_byte_ms",
            "voice_to_voice_ms",
        ):
            assert name in latency, latency
        assert (
            latency["endpoint_ms"]
            < latency["asr_final_ms"]
            < latency["llm_first_token_ms"]
            < latency["tts_first_byte_ms"]
            <= latency["voice_to_voice_ms"]
        )
        # Providers at 100 / 200 / 150 ms and a 200 ms window: ~650 ms plus our overhead.
        assert 600 < latency["voice_to_voice_ms"] < 1100

        # The model saw only what the caller heard of the interrupted answer.
        last_request = stack.openai.requests[-1].body["messages"]
        assistant_texts = [m["content"] for m in last_request if m["role"] == "assistant"]
        interrupted = [t for t in assistant_texts if t.startswith(heard)]
        assert len(interrupted) == 1 and len(interrupted[0]) <= len(heard) + 1  # "..." mark
        assert SERVICES not in assistant_texts

        # The recording: stereo, caller left, agent right, as long as the call.
        recording = stack.settings.effective_recordings_dir / f"{call_id}.wav"
        with wave.open(str(recording)) as wav:
            assert wav.getnchannels() == 2 and wav.getframerate() == 8000
            frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
        assert abs(len(frames) / 8000 - (hung_up_at - phone_started(phone))) < 2.0
        assert np.abs(frames[:, 0]).max() > 1000 and np.abs(frames[:, 1]).max() > 1000

        # The workflow's history tells the story of the call.
        history = await handle.fetch_history()
        signals = [
            e.workflow_execution_signaled_event_attributes.signal_name
            for e in history.events
            if e.HasField("workflow_execution_signaled_event_attributes")
        ]
        assert signals[0] == "answered" and signals[-1] == "ended"
        assert "turns_committed" in signals
        # The call's own writes, as local activities (markers; no activity tasks).
        assert set(activities_run(history, local=True)) == {
            "record_call_status",
            "save_call_turns",
            "record_call_event",
        }
        assert activities_run(history, local=False) == []


def phone_started(phone: Any) -> float:
    return float(min(r.at for r in phone.received))


def _at(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)
