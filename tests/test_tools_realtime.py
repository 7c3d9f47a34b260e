"""The realtime side of tool calls, without Temporal: the conversation while tools run,
results arriving after the answer was cancelled, a workflow that does not answer, DTMF."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from builder_engine.tools import DEFAULT_FILLER, ToolDef
from realtime.conversation import Conversation
from realtime.providers.base import MULAW_8K, ToolCall
from realtime.tools import (
    DTMF_FREQUENCIES,
    PENDING_RESULT,
    Reply,
    ToolDesk,
    dtmf_audio,
    dtmf_pcm,
)
from workflows.tools import ToolBatch, ToolBatchResult, ToolOutcome
from workflows.types import CommittedTurn


class FakeLifecycle:
    """Answers ``run_tools`` when the test says so (or never)."""

    def __init__(self) -> None:
        self.batches: list[ToolBatch] = []
        self.release = asyncio.Event()
        self.fail: BaseException | None = None

    def answered(self) -> None: ...

    def commit_turn(self, turn: CommittedTurn) -> None: ...

    def ended(self, reason: str) -> None: ...

    def handed_over(self) -> None: ...

    async def aclose(self) -> None: ...

    async def run_tools(self, batch: ToolBatch, *, timeout_s: float) -> ToolBatchResult:
        self.batches.append(batch)
        async with asyncio.timeout(timeout_s):
            await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return ToolBatchResult(
            [
                ToolOutcome(c.id, c.name, True, json.dumps({"echo": c.arguments}))
                for c in batch.calls
            ]
        )


def desk(lifecycle: FakeLifecycle, conversation: Conversation, **tool: object) -> ToolDesk:
    spec = {"id": "tool_1", "name": "lookup", "kind": "webhook", **tool}
    return ToolDesk("call_1", [ToolDef(**spec)], lifecycle, conversation)  # type: ignore[arg-type]


def tool_results(conversation: Conversation) -> dict[str, str | None]:
    return {m.tool_call_id or "": m.content for m in conversation.messages() if m.role == "tool"}


async def test_results_reach_the_history_even_after_the_answer_is_gone() -> None:
    lifecycle, conversation = FakeLifecycle(), Conversation("You help.")
    conversation.add_user("Where is my order?")
    tools = desk(lifecycle, conversation, filler_message="Checking.", filler_after_s=0.8)
    assert [s.name for s in tools.specs] == ["lookup"]
    round_ = tools.start([ToolCall("c1", "lookup", '{"order": "1"}')], "One sec.")
    assert round_.filler == "Checking." and round_.filler_after_s == 0.8
    # While it runs, the model sees a placeholder (a barge-in asks it meanwhile).
    assert tool_results(conversation) == {"c1": PENDING_RESULT}
    conversation.add_user("Hello?")
    messages = conversation.messages()
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[2].content == "One sec." and messages[2].tool_calls[0].id == "c1"
    # The answer that waited for it is gone (cancelled); the result still lands.
    lifecycle.release.set()
    outcomes = await round_.task
    assert outcomes[0].ok
    assert tool_results(conversation) == {"c1": '{"echo": "{\\"order\\": \\"1\\"}"}'}
    assert round_.entries[0]["result"] == outcomes[0].content and round_.entries[0]["ok"]


async def test_a_workflow_that_does_not_answer_gives_the_model_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lifecycle, conversation = FakeLifecycle(), Conversation("You help.")
    conversation.add_user("Book it.")
    tools = desk(lifecycle, conversation, timeout_s=0.05, max_attempts=1)
    monkeypatch.setattr("realtime.tools.TOOL_WAIT_MARGIN_S", 0.05)
    round_ = tools.start([ToolCall("c1", "lookup", "{}"), ToolCall("c2", "other", "{}")], "")
    outcomes = await asyncio.wait_for(round_.task, 2)
    assert [o.ok for o in outcomes] == [False, False]
    assert "did not answer in time" in json.loads(outcomes[0].content)["error"]
    assert round_.filler == DEFAULT_FILLER  # "other" is unknown to the session: defaults
    results = tool_results(conversation)
    assert all("did not answer in time" in (v or "") for v in results.values())


async def test_errors_reaching_the_workflow_become_error_results() -> None:
    lifecycle, conversation = FakeLifecycle(), Conversation("You help.")
    conversation.add_user("Go.")
    lifecycle.fail = RuntimeError("workflow completed")
    lifecycle.release.set()
    round_ = desk(lifecycle, conversation).start([ToolCall("c1", "lookup", "{}")], "")
    (outcome,) = await round_.task
    assert not outcome.ok and "could not be run" in outcome.content


async def test_closing_stops_waiting() -> None:
    lifecycle, conversation = FakeLifecycle(), Conversation("You help.")
    conversation.add_user("Go.")
    tools = desk(lifecycle, conversation)
    round_ = tools.start([ToolCall("c1", "lookup", "{}")], "")
    await asyncio.sleep(0)
    await tools.aclose()
    assert round_.task.cancelled()


def test_reply_counts_the_words_the_history_holds() -> None:
    reply = Reply(round_text=["Let me ", "check."])
    text = reply.take_round_text()
    reply.skip_words(text)
    reply.skip_words("One moment, please.")
    assert text == "Let me check." and reply.round_text == []
    assert reply.unrecorded("Let me check. One moment, please. It shipped") == "It shipped"
    assert reply.unrecorded("Let me") == ""


@pytest.mark.parametrize("digit", sorted(DTMF_FREQUENCIES))
def test_dtmf_tones_carry_their_two_frequencies(digit: str) -> None:
    pcm = dtmf_pcm(digit, 8000).astype(np.float64)
    assert len(pcm) == 800 + 640  # 100 ms tone, 80 ms gap
    spectrum = np.abs(np.fft.rfft(pcm[:800], n=8000))
    peaks = sorted(np.argsort(spectrum)[-2:])
    low, high = DTMF_FREQUENCIES[digit]
    assert peaks == [round(low), round(high)]
    assert np.abs(pcm).max() < 32767 * 0.75


def test_dtmf_audio_in_the_call_format() -> None:
    audio = dtmf_audio("1w#", MULAW_8K)
    assert len(audio) == 2 * (800 + 640) + 4000  # two keys and a 0.5 s pause
    assert dtmf_pcm("", 8000).size == 0
