"""Call control against the whole running platform: silence timeout, time limit, end-call
phrase, keypad input, hang-up mid-answer, backchannels and noise over the agent, a
caller who pauses mid-sentence, and the call's workflow ending first (a supervisor's
hang-up of a browser call, a terminated workflow). Each test makes its own agent, number
and call on one shared stack; the caller is emulated Twilio sending real-time audio, or
a browser on /media/web."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from e2e import TWILIO_TOKEN, Stack, running_stack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emulators.openai import Reply
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone
from realtime.session import REPROMPT, SILENCE_GOODBYE, TIME_LIMIT_GOODBYE

pytestmark = pytest.mark.slow

GREETING = "Hello."
SERVICES_QUESTION = "What services do you offer?"
SERVICES = (
    "We offer cleanings, fillings, crowns and whitening. "
    "Our hygienists see patients every weekday. "
    "We also have an orthodontist on Tuesdays and Thursdays. "
    "New patients get a free consultation with x-rays included."
)
SHORT_SERVICES = "We offer cleanings, fillings and crowns. Our hygienists see patients on weekdays."
STILL_HERE = "Good. How can I help?"
FAREWELL = "Thanks for calling, goodbye!"
DIGITS = "Got it, extension forty-two."
SATURDAY = "Yes, we are open on Saturdays."
BOOKED = "Tuesday works. What time would suit you?"
FRAGMENT = "What would you like to book?"

LLM_SCRIPT = [
    Reply(when_last_user_contains="pressed the keys: 42", text=DIGITS),
    Reply(when_last_user_contains="saturday", text=SATURDAY),
    Reply(when_last_user_contains="briefly", text=SHORT_SERVICES),
    Reply(when_last_user_contains="services", text=SERVICES),
    Reply(when_last_user_contains="tuesday", text=BOOKED),
    # The first half of a sentence: slow enough that the caller goes on before it is heard.
    Reply(when_last_user_contains="book", text=FRAGMENT, stall_ms=1500),
    Reply(when_last_user_contains="that's all", text=FAREWELL),
    Reply(when_last_user_contains="here", text=STILL_HERE),
    Reply(text="Sorry, could you say that again?"),
]


class Phone(TwilioPhone):
    """Emulated Twilio that notes when each mark came back and can play audio late
    (``lag_s``: a deep jitter buffer), so marks return well after the audio was sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lag_s = 0.0
        self.echoed_at: list[tuple[float, str]] = []

    async def _echo_mark(self, name: str) -> None:
        if self.lag_s:
            await asyncio.sleep(self.lag_s)
        await super()._echo_mark(name)
        self.echoed_at.append((asyncio.get_running_loop().time(), name))

    def sent_marks(self) -> list[str]:
        return [r.name for r in self.received if r.event == "mark"]

    def clears(self) -> list[float]:
        return [r.at for r in self.received if r.event == "clear"]

    def audio_s(self, after: float, before: float = float("inf")) -> float:
        """Seconds of agent audio received in [after, before)."""
        media = [r for r in self.media_after(after) if r.at < before]
        return sum(len(r.payload) for r in media) / 8000

    async def all_marks_echoed(self, within: float) -> float:
        """Until every mark sent so far came back; the time the last one did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while set(self.sent_marks()) - {name for _, name in self.echoed_at}:
            assert loop.time() < deadline, "marks did not come back"
            await asyncio.sleep(0.01)
        return self.echoed_at[-1][0]


@dataclass
class Harness:
    stack: Stack

    async def phone(self, asr_script: Sequence[str], **agent: Any) -> tuple[Phone, str]:
        """A new agent, number and incoming call, and the phone for it (not yet connected).
        ``asr_script``: what the recognizer hears in the caller's utterances, in order."""
        config: dict[str, Any] = {
            "name": "Front desk",
            "first_message": GREETING,
            "turn": {"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 0},
            **agent,
        }
        created = await self.stack.create_agent(**config)
        number = await self.stack.add_number(created["id"])
        call_sid, url, call_id = await self.stack.incoming_call(number)
        # One call at a time in this module: the recognizer's script is this call's.
        self.stack.deepgram.script = list(asr_script)
        phone = Phone(
            url, parameters={"call_id": call_id}, call_sid=call_sid, auth_token=TWILIO_TOKEN
        )
        return phone, call_id

    async def ended_call(self, call_id: str) -> dict[str, Any]:
        handle = self.stack.temporal.get_workflow_handle(call_id)
        result = await asyncio.wait_for(handle.result(), 20)
        assert result["status"] == "ended"
        call: dict[str, Any] = (await self.stack.api.get(f"/v1/calls/{call_id}")).json()
        assert call["status"] == "ended" and call["ended_reason"] == result["ended_reason"]
        return call


@pytest.fixture(scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    async with running_stack(
        tmp_path_factory.mktemp("control"), asr_script=[], llm_script=LLM_SCRIPT
    ) as stack:
        yield Harness(stack)


def turns_of(call: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [(t["speaker"], t["text"], t["interrupted"]) for t in call["turns"]]


async def say(phone: TwilioPhone, audio: npt.NDArray[np.int16]) -> float:
    """The caller speaks; returns when their last frame went out."""
    utterance = phone.say(audio)
    await utterance.done.wait()
    assert utterance.ended_at is not None
    return utterance.ended_at


async def greeted(phone: TwilioPhone) -> None:
    await phone.wait_for_media_after(0, within=8)
    await phone.wait_until_quiet(0.3, within=15)


def tts_seconds(stack: Stack, text: str) -> float:
    return stack.elevenlabs.audio_samples(text, 8000) / 8000


# ---------------------------------------------------------------- timers


async def test_silence_reprompts_once_then_says_goodbye_timed_from_playback(
    harness: Harness,
) -> None:
    phone, call_id = await harness.phone(["Yes, I'm still here."], silence_timeout_s=2)
    loop = asyncio.get_running_loop()
    async with phone:
        # The caller's phone plays the greeting 1.5 s after it arrived.
        phone.lag_s = 1.5
        await phone.wait_for_media_after(0, within=8)
        await phone.wait_until_quiet(0.3, within=10)
        greeting_sent = max(r.at for r in phone.received if r.event == "media")
        greeting_heard = await phone.all_marks_echoed(within=10)
        assert greeting_heard - greeting_sent > 1.4
        # The silence timer runs from when the greeting was heard, not when it was sent.
        reprompt_at = await phone.wait_for_media_after(greeting_heard, within=5)
        assert 1.9 < reprompt_at - greeting_heard < 3.5
        phone.lag_s = 0.0
        await phone.wait_until_quiet(0.3, within=10)
        assert abs(phone.audio_s(reprompt_at) - tts_seconds(harness.stack, REPROMPT)) < 0.1

        # The caller answers; the agent does; and the next silence is again a re-prompt.
        spoke = await say(phone, caller_speech("Yes, I'm still here."))
        answer_at = await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_until_quiet(0.3, within=10)
        answer_heard = await phone.all_marks_echoed(within=5)
        second_reprompt = await phone.wait_for_media_after(answer_heard, within=5)
        assert 1.9 < second_reprompt - answer_heard < 3.5
        await phone.wait_until_quiet(0.3, within=10)
        assert abs(phone.audio_s(second_reprompt) - tts_seconds(harness.stack, REPROMPT)) < 0.1

        # Still nothing: goodbye, played in full, then the platform hangs up.
        reprompt_heard = await phone.all_marks_echoed(within=5)
        goodbye_at = await phone.wait_for_media_after(reprompt_heard, within=5)
        assert 1.9 < goodbye_at - reprompt_heard < 3.5
        await phone.wait_closed_by_server(within=15)
        closed_at = loop.time()
        # Every mark had come back before the hang-up (one echoed later would be late).
        assert await phone.all_marks_echoed(within=5) <= closed_at
        assert abs(phone.audio_s(goodbye_at) - tts_seconds(harness.stack, SILENCE_GOODBYE)) < 0.1
        assert answer_at < second_reprompt

    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "silence-timeout"
    assert turns_of(call) == [
        ("agent", GREETING, False),
        ("agent", REPROMPT, False),
        ("caller", "Yes, I'm still here.", False),
        ("agent", STILL_HERE, False),
        ("agent", REPROMPT, False),
        ("agent", SILENCE_GOODBYE, False),
    ]


async def test_the_time_limit_cuts_in_says_goodbye_and_hangs_up(harness: Harness) -> None:
    # 10 s is the shortest limit an agent may have.
    phone, call_id = await harness.phone(
        [SERVICES_QUESTION], max_duration_s=10, silence_timeout_s=60
    )
    loop = asyncio.get_running_loop()
    async with phone:
        connected = loop.time()
        await greeted(phone)
        spoke = await say(phone, caller_speech(SERVICES_QUESTION))
        answer_at = await phone.wait_for_media_after(spoke, within=5)
        # The long answer is still playing when the limit comes: it is cut off...
        await phone.wait_closed_by_server(within=20)
        closed_at = loop.time()
        [clear] = phone.clears()
        assert 9.5 < clear - connected < 11
        # ...and the goodbye follows, played in full before the hang-up.
        assert abs(phone.audio_s(clear) - tts_seconds(harness.stack, TIME_LIMIT_GOODBYE)) < 0.1
        assert await phone.all_marks_echoed(within=5) <= closed_at
        assert answer_at < clear

    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "max-duration"
    turns = turns_of(call)
    assert turns[:2] == [
        ("agent", GREETING, False),
        ("caller", SERVICES_QUESTION, False),
    ]
    assert turns[3] == ("agent", TIME_LIMIT_GOODBYE, False)
    speaker, heard, interrupted = turns[2]
    assert speaker == "agent" and interrupted
    assert heard and SERVICES.startswith(heard) and len(heard) < len(SERVICES)
    assert len(turns) == 4


# ---------------------------------------------------------------- ending and input


async def test_an_end_call_phrase_hangs_up_after_it_has_played(harness: Harness) -> None:
    phone, call_id = await harness.phone(
        ["That's all, thanks."], end_call_phrases=["goodbye", "talk to you later"]
    )
    loop = asyncio.get_running_loop()
    async with phone:
        await greeted(phone)
        spoke = await say(phone, caller_speech("That's all, thanks."))
        farewell_at = await phone.wait_for_media_after(spoke, within=5)
        await phone.wait_closed_by_server(within=15)
        closed_at = loop.time()
        # All of the farewell was sent and heard (its marks came back) before the hang-up.
        assert abs(phone.audio_s(farewell_at) - tts_seconds(harness.stack, FAREWELL)) < 0.1
        assert await phone.all_marks_echoed(within=5) <= closed_at

    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "end-call-phrase"
    assert turns_of(call) == [
        ("agent", GREETING, False),
        ("caller", "That's all, thanks.", False),
        ("agent", FAREWELL, False),
    ]


async def test_keypad_digits_reach_the_conversation(harness: Harness) -> None:
    phone, call_id = await harness.phone([])
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        loop = asyncio.get_running_loop()
        await phone.send_dtmf("4")
        await phone.send_dtmf("2")
        pressed = loop.time()
        # Digits typed together are one entry, taken once the caller stops typing.
        answer_at = await phone.wait_for_media_after(pressed, within=6)
        assert answer_at - pressed > 1.4
        await phone.wait_until_quiet(0.3, within=10)

    [request] = harness.stack.openai.chat_requests[before:]
    last = request.body["messages"][-1]
    assert last["role"] == "user" and "42" in last["content"]
    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"
    turns = turns_of(call)
    assert turns[0] == ("agent", GREETING, False)
    assert turns[1][0] == "caller" and "42" in turns[1][1]
    assert turns[2] == ("agent", DIGITS, False)


async def test_hanging_up_mid_answer_keeps_what_was_heard(harness: Harness) -> None:
    phone, call_id = await harness.phone([SERVICES_QUESTION])
    async with phone:
        await greeted(phone)
        spoke = await say(phone, caller_speech(SERVICES_QUESTION))
        await phone.wait_for_media_after(spoke, within=5)
        await asyncio.sleep(1.5)
        await phone.hang_up()

    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "caller-hangup"
    turns = turns_of(call)
    assert turns[:2] == [
        ("agent", GREETING, False),
        ("caller", SERVICES_QUESTION, False),
    ]
    speaker, heard, interrupted = turns[2]
    assert speaker == "agent" and interrupted
    # About 1.5 s of a 65 ms-per-character voice: 2-5 of the first sentence's 7 words
    # ("We offer cleanings, fillings, crowns and whitening." lasts 3.3 s), not all of it.
    assert SERVICES.startswith(heard) and 2 <= len(heard.split()) <= 5
    assert len(turns) == 3


# ---------------------------------------------------------------- turn taking


async def test_backchannels_do_not_interrupt_and_are_not_answered(harness: Harness) -> None:
    phone, call_id = await harness.phone(
        ["Briefly, what services do you offer?", "Okay."],
        turn={"endpointing_ms": 200, "interrupt_min_ms": 200, "interrupt_min_words": 1},
    )
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        # Spoken without the comma: espeak's pause there is about as long as this agent's
        # 200 ms endpointing window, and a turn ended there (then resumed) is another test.
        spoke = await say(phone, caller_speech("Briefly what services do you offer?"))
        answer_at = await phone.wait_for_media_after(spoke, within=5)
        await asyncio.sleep(1.0)
        await say(phone, caller_speech("okay"))
        # The agent talks on to the end of its answer, and then does not answer "okay".
        answer_end = await phone.wait_until_quiet(0.3, within=15)
        await asyncio.sleep(2.0)
        assert not phone.clears()
        assert phone.media_after(answer_end + 0.1) == []
        assert abs(phone.audio_s(answer_at) - tts_seconds(harness.stack, SHORT_SERVICES)) < 0.15

    assert len(harness.stack.openai.chat_requests[before:]) == 1
    call = await harness.ended_call(call_id)
    assert turns_of(call) == [
        ("agent", GREETING, False),
        ("caller", "Briefly, what services do you offer?", False),
        ("agent", SHORT_SERVICES, False),
    ]


async def test_a_short_sound_over_the_agent_is_not_an_interruption_but_speech_is(
    harness: Harness,
) -> None:
    # Duration alone decides here (no words needed): "hm" (~0.7 s voiced) is too short, a
    # sentence is not. "hm" plus the pause after it would be long enough: only voice counts.
    phone, call_id = await harness.phone(
        [SERVICES_QUESTION, "Hm.", "Wait, are you open on Saturdays?"],
        turn={"endpointing_ms": 400, "interrupt_min_ms": 900, "interrupt_min_words": 0},
    )
    async with phone:
        await greeted(phone)
        spoke = await say(phone, caller_speech(SERVICES_QUESTION))
        await phone.wait_for_media_after(spoke, within=5)
        await asyncio.sleep(1.0)
        await say(phone, caller_speech("hm"))
        # The silence after it does not make "hm" any longer.
        await asyncio.sleep(1.5)
        assert not phone.clears(), "a short sound interrupted the agent"
        barge_in = phone.say(caller_speech("Wait, are you open on Saturdays?"))
        await barge_in.done.wait()
        [clear] = phone.clears()
        assert barge_in.started_at is not None and barge_in.ended_at is not None
        assert 0.7 < clear - barge_in.started_at < 1.8
        await phone.wait_for_media_after(barge_in.ended_at, within=5)
        await phone.wait_until_quiet(0.3, within=10)

    call = await harness.ended_call(call_id)
    turns = turns_of(call)
    assert [(s, i) for s, _, i in turns] == [
        ("agent", False),
        ("caller", False),
        ("agent", True),
        ("caller", False),
        ("agent", False),
    ]
    # The "hm" was forgotten, not glued to the caller's next words.
    assert turns[3][1] == "Wait, are you open on Saturdays?"
    assert turns[4][1] == SATURDAY


async def test_a_pause_mid_sentence_gets_one_answer(harness: Harness) -> None:
    phone, call_id = await harness.phone(["I'd like to book", "an appointment on Tuesday."])
    before = len(harness.stack.openai.chat_requests)
    async with phone:
        await greeted(phone)
        first = caller_speech("I'd like to book")
        pause = np.zeros(int(0.6 * 8000), dtype=np.int16)  # longer than the 200 ms endpoint
        rest = caller_speech("an appointment on Tuesday")
        started = phone.say(np.concatenate([first, pause]))
        await started.done.wait()
        spoke = await say(phone, rest)
        # Nothing was said in the pause: the one answer starts after the whole sentence.
        assert started.started_at is not None
        answer_at = await phone.wait_for_media_after(started.started_at, within=8)
        assert answer_at > spoke
        await phone.wait_until_quiet(0.3, within=10)
        assert abs(phone.audio_s(answer_at) - tts_seconds(harness.stack, BOOKED)) < 0.1

    requests = harness.stack.openai.chat_requests[before:]
    # The endpoint did fire in the pause (the first half went to the model), but that
    # answer was dropped when the caller went on; the model then saw one utterance.
    assert requests[0].body["messages"][-1]["content"] == "I'd like to book"
    assert requests[0].outcome == "client_disconnected"
    assert requests[-1].body["messages"][-1] == {
        "role": "user",
        "content": "I'd like to book an appointment on Tuesday.",
    }
    assert len(requests) == 2
    call = await harness.ended_call(call_id)
    assert [t for t in turns_of(call) if t[0] == "agent"] == [
        ("agent", GREETING, False),
        ("agent", BOOKED, False),
    ]


# ---------------------------------------------------------------- the workflow ends first


@dataclass
class Browser:
    """A browser on /media/web: 20 ms of silence every 20 ms, marks echoed at once;
    notes the agent's audio and the server's control messages, and when the socket
    closed."""

    ws: ClientConnection
    audio_at: list[float] = field(default_factory=list)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed_at: float | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        talking = asyncio.create_task(self._talk())
        try:
            async for message in self.ws:
                now = loop.time()
                if isinstance(message, bytes):
                    self.audio_at.append(now)
                    continue
                event = json.loads(message)
                self.messages.append((now, event))
                if event["type"] == "mark":
                    with contextlib.suppress(ConnectionClosed):
                        await self.ws.send(json.dumps({"type": "mark", "name": event["name"]}))
        finally:
            self.closed_at = loop.time()
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)

    async def _talk(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with contextlib.suppress(ConnectionClosed):
            for n in range(100_000):
                await asyncio.sleep(max(0.0, start + n * 0.02 - loop.time()))
                await self.ws.send(b"\x00" * 640)

    async def greeted(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(15):
            while not self.audio_at or loop.time() - self.audio_at[-1] < 0.5:
                await asyncio.sleep(0.02)


def live_tasks_of(call_id: str) -> list[str]:
    """The realtime server's tasks for the call (it runs in this process)."""
    return [t.get_name() for t in asyncio.all_tasks() if call_id in t.get_name() and not t.done()]


async def test_a_supervisor_hang_up_ends_a_browser_call(harness: Harness) -> None:
    stack = harness.stack
    stack.deepgram.script = []
    agent = await stack.create_agent(name="Web desk", first_message=GREETING)
    created = await stack.api.post("/v1/calls/web", json={"agent_id": agent["id"]})
    assert created.status_code == 201, created.text
    web = created.json()
    call_id = web["call_id"]
    loop = asyncio.get_running_loop()
    async with connect(web["websocket_url"]) as ws:
        await ws.send(json.dumps({"type": "start", "call_id": call_id, "token": web["token"]}))
        assert json.loads(await ws.recv())["type"] == "started"
        browser = Browser(ws)
        listening = asyncio.create_task(browser.run())
        await browser.greeted()

        asked = loop.time()
        response = await stack.api.post(f"/v1/calls/{call_id}/hangup")
        answered = loop.time()
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ended"
        # The session hears it from the workflow at its next heartbeat, says so and
        # closes the socket.
        await asyncio.wait_for(listening, 5)
        assert browser.closed_at is not None
        print(
            f"hang-up answered in {answered - asked:.2f} s; "
            f"socket closed {browser.closed_at - answered:.2f} s later"
        )
        assert browser.closed_at - answered < 3.0
        assert ws.close_code == 1000
        ended = [event for _, event in browser.messages if event["type"] != "mark"]
        assert ended == [{"type": "ended", "reason": "supervisor-hangup"}]

    call = await harness.ended_call(call_id)
    assert call["ended_reason"] == "supervisor-hangup" and call["direction"] == "web"
    assert turns_of(call) == [("agent", GREETING, False)]
    # Nothing of the session is left running (timers, heartbeat, signal delivery).
    await asyncio.sleep(0.2)
    assert live_tasks_of(call_id) == []


async def test_a_phone_call_whose_workflow_was_terminated_is_hung_up(harness: Harness) -> None:
    phone, call_id = await harness.phone([])
    loop = asyncio.get_running_loop()
    async with phone:
        await greeted(phone)
        handle = harness.stack.temporal.get_workflow_handle(call_id)
        await handle.terminate(reason="an operator ended it")
        terminated = loop.time()
        await phone.wait_closed_by_server(within=4)
        print(f"workflow terminated -> stream closed: {loop.time() - terminated:.2f} s")
    await asyncio.sleep(0.2)
    assert live_tasks_of(call_id) == []
