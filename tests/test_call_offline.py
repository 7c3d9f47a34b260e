"""The same phone call with the offline providers: Whisper (faster-whisper, tiny.en shipped
in a wheel) for ASR, Piper for TTS, and an OpenAI-compatible endpoint for the LLM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e import running_stack

from emulators.openai import Reply
from emulators.speech import caller_speech

pytestmark = pytest.mark.slow

ANSWER = "We are open from nine to five."


async def test_a_phone_call_with_offline_speech(tmp_path: Path) -> None:
    async with running_stack(
        tmp_path,
        asr_script=[],
        llm_script=[Reply(text=ANSWER)],
    ) as stack:
        agent = await stack.create_agent(
            name="Offline desk",
            first_message="Hello, this is the front desk.",
            asr={"provider": "whisper-local"},
            tts={"provider": "piper-local"},
            turn={"endpointing_ms": 300},
        )
        number = await stack.add_number(agent["id"])
        call_sid, stream_url, call_id = await stack.incoming_call(number)
        async with stack.phone(stream_url, call_id, call_sid) as phone:
            await phone.wait_for_media_after(0, within=15)
            await phone.wait_until_quiet(0.4, within=15)
            question = phone.say(caller_speech("What are your opening hours?"))
            await question.done.wait()
            assert question.ended_at is not None
            await phone.wait_for_media_after(question.ended_at, within=10)
            await phone.wait_until_quiet(0.4, within=15)

        await asyncio.wait_for(stack.temporal.get_workflow_handle(call_id).result(), 15)
        call = (await stack.api.get(f"/v1/calls/{call_id}")).json()
        texts = [(t["speaker"], t["text"]) for t in call["turns"]]
        assert texts[0] == ("agent", "Hello, this is the front desk.")
        # Whisper tiny.en on espeak speech over 8 kHz gets most words, not always all.
        heard = set(texts[1][1].lower().replace("?", "").split())
        assert texts[1][0] == "caller" and heard & {"what", "your", "opening", "hours", "open"}
        assert texts[2] == ("agent", ANSWER)
        latency = call["turns"][2]["latency"]
        assert latency["voice_to_voice_ms"] > latency["asr_final_ms"] > latency["endpoint_ms"]
        # Nothing went to the cloud speech emulators.
        assert not stack.deepgram.sessions and not stack.elevenlabs.requests
