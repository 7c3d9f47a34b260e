"""Tool calls on the realtime side: what the model is offered, and waiting for results.

The session never runs a tool itself. When the model asks for tools, ``ToolDesk.start``
records the calls in the conversation (with a "still running" placeholder result each)
and asks the call's workflow to run them (a Temporal Update) in a task of its own, so
a barge-in that cancels the answer never cancels the tools: their results land in the
conversation history whenever they arrive. ``Reply`` tracks one answer across its tool
rounds: which words the conversation already holds, and the tool calls for the
transcript. DTMF tones for ``send_dtmf`` are generated here (Twilio Media Streams cannot
send DTMF events, so the tones go out as audio).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from builder_engine.tools import DEFAULT_FILLER, DEFAULT_FILLER_AFTER_S, ToolDef
from realtime.conversation import Conversation
from realtime.lifecycle import CallLifecycle
from realtime.media.convert import encode
from realtime.providers.base import AudioFormat, ToolCall, ToolSpec
from workflows.tools import ToolBatch, ToolInvocation, ToolOutcome, error_content

log = logging.getLogger(__name__)

PENDING_RESULT = json.dumps(
    {"status": "running", "note": "This tool has not finished yet; its result will follow."}
)
STILL_WORKING = "Still working on it, thanks for waiting."
TOOL_LIMIT_REPLY = "I'm sorry, I couldn't finish that. Is there anything else I can help with?"
MAX_TOOL_ROUNDS = 5  # model responses with tool calls per answer
FILLER_REPEAT_S = 8.0  # after the filler, reassure this often while a tool still runs
TOOL_WAIT_MARGIN_S = 30.0  # beyond the tools' own timeouts (a worker restarting, say)
DEFAULT_TOOL_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ speech pipeline items


class Flush:
    """Speak what the sentence chunker holds now (before waiting on a tool)."""


FLUSH = Flush()


@dataclass(frozen=True)
class Tones:
    """Audio to play as is, in order with the speech around it (DTMF)."""

    audio: bytes
    digits: str


@dataclass(frozen=True)
class Pause:
    """Hold: silence once everything before has played (a caller who speaks ends it)."""

    seconds: float


SpeechItem = str | Flush | Tones | Pause


# ------------------------------------------------------------------ DTMF

_ROWS = (697.0, 770.0, 852.0, 941.0)
_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
_KEYPAD = ("123A", "456B", "789C", "*0#D")
DTMF_FREQUENCIES: dict[str, tuple[float, float]] = {
    key: (_ROWS[r], _COLS[c]) for r, keys in enumerate(_KEYPAD) for c, key in enumerate(keys)
}


def dtmf_pcm(
    digits: str,
    sample_rate: int,
    *,
    tone_ms: float = 100.0,
    gap_ms: float = 80.0,
    pause_ms: float = 500.0,
) -> npt.NDArray[np.int16]:
    """Dual-tone keypad signals (ITU-T Q.23 frequencies), ``w`` or ``,`` a pause."""
    pieces: list[npt.NDArray[np.float64]] = []
    tone_n = int(sample_rate * tone_ms / 1000)
    gap = np.zeros(int(sample_rate * gap_ms / 1000))
    t = np.arange(tone_n) / sample_rate
    # A short fade in and out keeps the tones free of clicks.
    ramp_n = max(1, int(sample_rate * 0.005))
    envelope = np.ones(tone_n)
    envelope[:ramp_n] = np.linspace(0.0, 1.0, ramp_n)
    envelope[-ramp_n:] = np.linspace(1.0, 0.0, ramp_n)
    for digit in digits.upper():
        if digit in ("W", ","):
            pieces.append(np.zeros(int(sample_rate * pause_ms / 1000)))
            continue
        low, high = DTMF_FREQUENCIES[digit]
        tone = 0.35 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)) * envelope
        pieces += [tone, gap]
    if not pieces:
        return np.zeros(0, dtype=np.int16)
    return (np.concatenate(pieces) * 32767).astype(np.int16)


def dtmf_audio(digits: str, fmt: AudioFormat) -> bytes:
    return encode(dtmf_pcm(digits, fmt.sample_rate), fmt)


# ------------------------------------------------------------------ one answer


@dataclass
class Reply:
    """One answer of the agent across its tool rounds."""

    round_text: list[str] = field(default_factory=list)  # the model's text since the last round
    recorded_words: int = 0  # leading words of the spoken answer the conversation holds
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def take_round_text(self) -> str:
        text = "".join(self.round_text).strip()
        self.round_text = []
        return text

    def skip_words(self, text: str) -> None:
        self.recorded_words += len(text.split())

    def unrecorded(self, heard: str) -> str:
        """What the caller heard beyond the words already in the conversation."""
        return " ".join(heard.split()[self.recorded_words :])

    def transcript_calls(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.tool_calls)


@dataclass
class ToolRound:
    """One batch of tool calls being run by the workflow."""

    calls: tuple[ToolCall, ...]
    entries: list[dict[str, Any]]
    task: asyncio.Task[list[ToolOutcome]]
    filler: str
    filler_after_s: float


class ToolDesk:
    """A call's tools: the specs offered to the model and the rounds in flight."""

    def __init__(
        self,
        call_id: str,
        tools: Sequence[ToolDef],
        lifecycle: CallLifecycle,
        conversation: Conversation,
    ) -> None:
        self.call_id = call_id
        self.tools = {t.name: t for t in tools}
        self.specs = [ToolSpec(t.name, t.description, t.parameters) for t in tools]
        self._lifecycle = lifecycle
        self._conversation = conversation
        self._waits: set[asyncio.Task[list[ToolOutcome]]] = set()

    def start(self, calls: Sequence[ToolCall], text: str) -> ToolRound:
        """Record the calls (and what the model said with them) and have them run."""
        calls = tuple(calls)
        self._conversation.add_tool_calls(calls, text=text)
        for call in calls:
            self._conversation.add_tool_result(call.id, PENDING_RESULT)
        entries = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
        known = [self.tools[c.name] for c in calls if c.name in self.tools]
        timeout = max((t.timeout_s * t.attempts for t in known), default=DEFAULT_TOOL_TIMEOUT_S)
        batch = ToolBatch([ToolInvocation(c.id, c.name, c.arguments) for c in calls])
        task = asyncio.create_task(
            self._run(batch, entries, timeout + TOOL_WAIT_MARGIN_S),
            name=f"{self.call_id}:tools:{calls[0].id}",
        )
        self._waits.add(task)
        task.add_done_callback(self._waits.discard)
        fillers = [t.filler_message for t in known if t.filler_message]
        return ToolRound(
            calls=calls,
            entries=entries,
            task=task,
            filler=fillers[0] if fillers else DEFAULT_FILLER,
            filler_after_s=min((t.filler_after_s for t in known), default=DEFAULT_FILLER_AFTER_S),
        )

    def refuse(self, calls: Sequence[ToolCall], text: str, reason: str) -> None:
        """Record calls that will not run, each answered with ``reason``."""
        self._conversation.add_tool_calls(tuple(calls), text=text)
        for call in calls:
            self._conversation.add_tool_result(call.id, error_content(reason))

    async def _run(
        self, batch: ToolBatch, entries: list[dict[str, Any]], timeout_s: float
    ) -> list[ToolOutcome]:
        try:
            result = await self._lifecycle.run_tools(batch, timeout_s=timeout_s)
            outcomes = list(result.outcomes)
        except TimeoutError:
            log.error("call %s: tools %s gave no result in time", self.call_id, _names(batch))
            outcomes = _errors(batch, "The tool did not answer in time. Apologize to the caller.")
        except Exception as exc:
            log.error("call %s: tools %s could not run: %r", self.call_id, _names(batch), exc)
            outcomes = _errors(batch, "The tool could not be run. Apologize to the caller.")
        self._record(outcomes, entries)
        return outcomes

    def _record(self, outcomes: list[ToolOutcome], entries: list[dict[str, Any]]) -> None:
        by_id = {e["id"]: e for e in entries}
        for outcome in outcomes:
            try:
                self._conversation.add_tool_result(outcome.tool_call_id, outcome.content)
            except KeyError:
                log.warning("call %s: result for unknown %s", self.call_id, outcome.tool_call_id)
            entry = by_id.get(outcome.tool_call_id)
            if entry is not None:
                entry["ok"] = outcome.ok
                entry["result"] = outcome.content

    async def aclose(self) -> None:
        """The call ended: stop waiting (the workflow still finishes and records them)."""
        waits = list(self._waits)
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _names(batch: ToolBatch) -> str:
    return ", ".join(c.name for c in batch.calls)


def _errors(batch: ToolBatch, message: str) -> list[ToolOutcome]:
    return [ToolOutcome(c.id, c.name, False, error_content(message)) for c in batch.calls]
