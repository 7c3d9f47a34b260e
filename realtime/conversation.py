"""One call's conversation: history, prompt assembly and the context budget.

The history records what was *heard*: an assistant turn cut off by the caller keeps only
the prefix that was played, so the model does not believe it said things the caller never
heard. ``messages()`` builds the next LLM request from the system prompt and as many of
the newest turns as fit the budget. Everything serializes to plain dicts, because the
history is restored from the Temporal workflow when a call moves to another worker.

Token counts are estimates - no tokenizer is bundled (tiktoken downloads its vocabulary
at run time, which fails offline, and local models use other vocabularies anyway):

* ASCII text: 1 token per 4 characters, rounded up - the usual figure for English BPE
  vocabularies (cl100k/o200k average ~4.0-4.5 characters per token on prose).
* Other characters: 1 token each. Exact for CJK, pessimistic for accented Latin - the
  estimate errs on the side of trimming a little early rather than overflowing.
* 4 tokens of framing per message (role markers, separators), 3 to prime the reply.
* A tool call: its name and JSON arguments as text plus 8; a tool definition: its JSON
  schema as text plus 8.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from builder_engine.agent_config import AgentConfig, VariableValue
from realtime.providers.base import ChatMessage, ToolCall, ToolSpec

MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
TOOL_OVERHEAD_TOKENS = 8
# Said in place of a result the history never got (the call moved workers mid-tool, or
# the tool was cancelled): the API rejects tool calls without a result message.
MISSING_TOOL_RESULT = '{"error": "no result: the tool call did not complete"}'
# Appended to what an interrupted turn said, so the model knows it was cut off. A dash
# reads naturally; bracketed markers tend to be copied into later replies (and spoken).
INTERRUPTION_MARK = "\u2014"
_FORMAT_VERSION = 1


def estimate_tokens(text: str) -> int:
    """Approximate token count of ``text`` (see the module docstring)."""
    ascii_chars = sum(1 for ch in text if ch < "\x80")
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


# ------------------------------------------------------------------ turns


@dataclass(frozen=True)
class UserTurn:
    text: str
    kind: Literal["user"] = "user"


@dataclass(frozen=True)
class AssistantTurn:
    text: str  # what the caller heard
    interrupted: bool = False
    kind: Literal["assistant"] = "assistant"


@dataclass(frozen=True)
class ToolResult:
    call_id: str
    content: str


@dataclass(frozen=True)
class ToolTurn:
    """Assistant tool calls (and any words spoken with them) plus their results.

    One unit for the budget: the API rejects a call without its result and vice versa.
    """

    calls: tuple[ToolCall, ...]
    text: str = ""
    results: tuple[ToolResult, ...] = ()
    kind: Literal["tool"] = "tool"

    def with_result(self, result: ToolResult) -> ToolTurn:
        kept = tuple(r for r in self.results if r.call_id != result.call_id)
        return ToolTurn(self.calls, self.text, (*kept, result))

    def result_for(self, call_id: str) -> str:
        for result in self.results:
            if result.call_id == call_id:
                return result.content
        return MISSING_TOOL_RESULT


Turn = UserTurn | AssistantTurn | ToolTurn


def turn_messages(turn: Turn) -> list[ChatMessage]:
    """The chat messages one turn becomes (none for an assistant turn nobody heard)."""
    if isinstance(turn, UserTurn):
        return [ChatMessage("user", turn.text)]
    if isinstance(turn, AssistantTurn):
        if not turn.text.strip():
            return []
        text = turn.text.rstrip() + INTERRUPTION_MARK if turn.interrupted else turn.text
        return [ChatMessage("assistant", text)]
    spoken = ChatMessage("assistant", turn.text or None, tool_calls=turn.calls)
    results = [ChatMessage("tool", turn.result_for(c.id), tool_call_id=c.id) for c in turn.calls]
    return [spoken, *results]


def message_tokens(message: ChatMessage) -> int:
    tokens = MESSAGE_OVERHEAD_TOKENS + estimate_tokens(message.content or "")
    for call in message.tool_calls:
        tokens += TOOL_OVERHEAD_TOKENS + estimate_tokens(call.name + call.arguments)
    return tokens


def tool_tokens(tools: Iterable[ToolSpec]) -> int:
    return sum(
        TOOL_OVERHEAD_TOKENS
        + estimate_tokens(t.name + t.description + json.dumps(t.parameters, separators=(",", ":")))
        for t in tools
    )


# ------------------------------------------------------------------ budget


@dataclass(frozen=True)
class ContextBudget:
    """How much prompt the model may get.

    ``max_prompt_tokens`` covers system prompt, tool definitions and history (leave the
    model's context window minus the reply's ``max_tokens``). When the history overflows,
    old turns are dropped until the prompt fits in ``trim_to`` of the budget: dropping
    a batch at once keeps the prompt's beginning stable for the next several turns, which
    keeps providers' prompt caches (and so first-token latency) warm.
    """

    max_prompt_tokens: int = 16_000
    trim_to: float = 0.75

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1 or not 0 < self.trim_to <= 1:
            raise ValueError("max_prompt_tokens must be >= 1 and 0 < trim_to <= 1")


def trimmed_note(count: int) -> str:
    return (
        f"\n\n(Note: the first {count} turns of this call were left out to save space. "
        "Do not assume they never happened.)"
    )


# ------------------------------------------------------------------ conversation


@dataclass
class Conversation:
    """History and prompt assembly for one call. Not thread-safe; one per call session."""

    system_prompt: str
    budget: ContextBudget = field(default_factory=ContextBudget)
    turns: list[Turn] = field(default_factory=list)
    first_kept: int = 0  # turns before this index are no longer sent (see ContextBudget)

    @classmethod
    def for_agent(
        cls,
        agent: AgentConfig,
        call_variables: Mapping[str, VariableValue] | None = None,
        *,
        budget: ContextBudget | None = None,
    ) -> Conversation:
        prompt = agent.system_prompt(dict(call_variables or {}))
        return cls(prompt, budget or ContextBudget())

    # --------------------------------------------------------- recording

    def add_user(self, text: str) -> None:
        """Record what the caller said. Directly after another user turn (the agent said
        nothing in between, e.g. its reply was cancelled before any audio) the text joins
        that turn: the model should see one utterance, not two."""
        text = text.strip()
        if not text:
            return
        if self.turns and isinstance(self.turns[-1], UserTurn):
            self.turns[-1] = UserTurn(f"{self.turns[-1].text} {text}")
        else:
            self.turns.append(UserTurn(text))

    def add_assistant(self, heard: str, *, interrupted: bool = False) -> None:
        """Record what the caller heard of the agent's reply (the played prefix if cut off).

        A reply cut off before any of it was heard is not a turn: the caller's next words
        then join their previous ones (see ``add_user``)."""
        if heard.strip():
            self.turns.append(AssistantTurn(heard, interrupted))

    def add_tool_calls(self, calls: Sequence[ToolCall], *, text: str = "") -> None:
        """Record tool calls the model made, with whatever it said alongside them."""
        if not calls:
            raise ValueError("no tool calls")
        self.turns.append(ToolTurn(tuple(calls), text))

    def add_tool_result(self, call_id: str, content: str) -> None:
        for index in range(len(self.turns) - 1, -1, -1):
            turn = self.turns[index]
            if isinstance(turn, ToolTurn) and any(c.id == call_id for c in turn.calls):
                self.turns[index] = turn.with_result(ToolResult(call_id, content))
                return
        raise KeyError(f"no tool call {call_id!r} in this conversation")

    # --------------------------------------------------------- prompt

    def messages(self, tools: Sequence[ToolSpec] = ()) -> list[ChatMessage]:
        """The next request's messages: system prompt, then the newest turns that fit.

        Advances ``first_kept`` when the history outgrew the budget (so this method changes
        state); the newest turn is always sent, even alone over budget.
        """
        rendered = [turn_messages(t) for t in self.turns]
        costs = [sum(message_tokens(m) for m in ms) for ms in rendered]
        fixed = (
            REPLY_PRIMING_TOKENS
            + tool_tokens(tools)
            + message_tokens(ChatMessage("system", self.system_prompt + trimmed_note(99)))
        )
        start = min(self.first_kept, max(len(self.turns) - 1, 0))
        if fixed + sum(costs[start:]) > self.budget.max_prompt_tokens:
            target = self.budget.max_prompt_tokens * self.budget.trim_to
            while start < len(self.turns) - 1 and fixed + sum(costs[start:]) > target:
                start += 1
        self.first_kept = start
        system = self.system_prompt + (trimmed_note(start) if start else "")
        kept = [m for ms in rendered[start:] for m in ms]
        return [ChatMessage("system", system), *kept]

    def prompt_tokens(self, tools: Sequence[ToolSpec] = ()) -> int:
        """Estimated prompt size of ``messages(tools)`` (without trimming anything)."""
        everything = [ChatMessage("system", self.system_prompt)]
        everything += [m for t in self.turns[self.first_kept :] for m in turn_messages(t)]
        return REPLY_PRIMING_TOKENS + tool_tokens(tools) + sum(map(message_tokens, everything))

    # --------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (Temporal payloads, DB rows)."""
        return {
            "version": _FORMAT_VERSION,
            "system_prompt": self.system_prompt,
            "budget": {
                "max_prompt_tokens": self.budget.max_prompt_tokens,
                "trim_to": self.budget.trim_to,
            },
            "first_kept": self.first_kept,
            "turns": [_turn_to_dict(t) for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conversation:
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unknown conversation format version {data.get('version')!r}")
        budget = data.get("budget") or {}
        return cls(
            system_prompt=str(data["system_prompt"]),
            budget=ContextBudget(
                int(budget.get("max_prompt_tokens", ContextBudget.max_prompt_tokens)),
                float(budget.get("trim_to", ContextBudget.trim_to)),
            ),
            turns=[_turn_from_dict(t) for t in data.get("turns", [])],
            first_kept=int(data.get("first_kept", 0)),
        )


def _turn_to_dict(turn: Turn) -> dict[str, Any]:
    if isinstance(turn, UserTurn):
        return {"kind": "user", "text": turn.text}
    if isinstance(turn, AssistantTurn):
        return {"kind": "assistant", "text": turn.text, "interrupted": turn.interrupted}
    return {
        "kind": "tool",
        "text": turn.text,
        "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls],
        "results": [{"call_id": r.call_id, "content": r.content} for r in turn.results],
    }


def _turn_from_dict(data: Mapping[str, Any]) -> Turn:
    kind = data.get("kind")
    if kind == "user":
        return UserTurn(str(data["text"]))
    if kind == "assistant":
        return AssistantTurn(str(data["text"]), bool(data.get("interrupted", False)))
    if kind == "tool":
        return ToolTurn(
            calls=tuple(
                ToolCall(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in data["calls"]
            ),
            text=str(data.get("text", "")),
            results=tuple(
                ToolResult(str(r["call_id"]), str(r["content"])) for r in data.get("results", [])
            ),
        )
    raise ValueError(f"unknown turn kind {kind!r}")
