"""Conversation history, prompt assembly and the context budget (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from builder_engine.agent_config import AgentConfig, BrainConfig
from realtime.conversation import (
    INTERRUPTION_MARK,
    MISSING_TOOL_RESULT,
    AssistantTurn,
    ContextBudget,
    Conversation,
    ToolTurn,
    UserTurn,
    estimate_tokens,
    message_tokens,
)
from realtime.providers.base import ChatMessage, ToolCall, ToolSpec

CALL = ToolCall("call_1", "book", '{"day":"monday"}')
BOOK = ToolSpec(
    "book", "Book a slot", {"type": "object", "properties": {"day": {"type": "string"}}}
)


def roles(messages: list[ChatMessage]) -> list[str]:
    return [m.role for m in messages]


def test_system_prompt_is_rendered_from_agent_and_call_variables() -> None:
    agent = AgentConfig(
        name="Front desk",
        brain=BrainConfig(system_prompt="You work for {{company}}. The caller is {{caller}}."),
        variables={"company": "Acme", "caller": "someone"},
    )
    conversation = Conversation.for_agent(agent, {"caller": "Ana"})
    assert conversation.messages() == [
        ChatMessage("system", "You work for Acme. The caller is Ana.")
    ]


def test_turns_become_messages_in_order() -> None:
    conversation = Conversation("Be helpful.")
    conversation.add_assistant("Hi, this is Acme. How can I help?")
    conversation.add_user("  I'd like to book Monday.  ")
    conversation.add_tool_calls([CALL], text="Let me check.")
    conversation.add_tool_result("call_1", '{"ok": true}')
    conversation.add_assistant("You're booked for Monday.")
    assert conversation.messages([BOOK]) == [
        ChatMessage("system", "Be helpful."),
        ChatMessage("assistant", "Hi, this is Acme. How can I help?"),
        ChatMessage("user", "I'd like to book Monday."),
        ChatMessage("assistant", "Let me check.", tool_calls=(CALL,)),
        ChatMessage("tool", '{"ok": true}', tool_call_id="call_1"),
        ChatMessage("assistant", "You're booked for Monday."),
    ]


def test_an_interrupted_turn_keeps_only_what_was_heard() -> None:
    conversation = Conversation("S")
    conversation.add_user("What are the hours?")
    conversation.add_assistant("We open at nine and", interrupted=True)
    conversation.add_user("Sorry, on Sunday?")
    assert conversation.turns[1] == AssistantTurn("We open at nine and", interrupted=True)
    assert conversation.messages()[2] == ChatMessage(
        "assistant", "We open at nine and" + INTERRUPTION_MARK
    )


def test_a_reply_nobody_heard_is_not_a_turn_and_caller_fragments_join() -> None:
    conversation = Conversation("S")
    conversation.add_user("I want to book")
    conversation.add_assistant("", interrupted=True)  # cut off before any audio played
    conversation.add_user("for tomorrow at five")
    conversation.add_user("   ")
    assert conversation.turns == [UserTurn("I want to book for tomorrow at five")]


def test_parallel_tool_calls_get_results_in_call_order_and_missing_ones_are_filled() -> None:
    second = ToolCall("call_2", "notify", "{}")
    conversation = Conversation("S")
    conversation.add_user("Book and text me.")
    conversation.add_tool_calls([CALL, second])
    conversation.add_tool_result("call_2", "sent")  # results may arrive out of order
    messages = conversation.messages()
    assert messages[2] == ChatMessage("assistant", None, tool_calls=(CALL, second))
    assert messages[3:] == [
        ChatMessage("tool", MISSING_TOOL_RESULT, tool_call_id="call_1"),
        ChatMessage("tool", "sent", tool_call_id="call_2"),
    ]
    conversation.add_tool_result("call_1", "booked")
    assert conversation.messages()[3] == ChatMessage("tool", "booked", tool_call_id="call_1")
    with pytest.raises(KeyError):
        conversation.add_tool_result("call_unknown", "x")
    with pytest.raises(ValueError):
        conversation.add_tool_calls([])


def test_token_estimate_heuristic() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("a" * 400) == 100
    assert estimate_tokens("こんにちは") == 5  # CJK: a token per character
    assert message_tokens(ChatMessage("user", "abcd")) == 5  # content + framing
    with_call = message_tokens(ChatMessage("assistant", None, tool_calls=(CALL,)))
    assert with_call > message_tokens(ChatMessage("assistant", ""))


def _long_call(turns: int, budget: ContextBudget) -> Conversation:
    conversation = Conversation("You are the front desk.", budget)
    for n in range(turns):
        conversation.add_user(f"question {n} " + "words " * 40)
        conversation.add_assistant(f"answer {n} " + "words " * 40)
    return conversation


def test_over_budget_drops_oldest_turns_and_notes_it() -> None:
    budget = ContextBudget(max_prompt_tokens=1_000, trim_to=0.75)
    conversation = _long_call(20, budget)
    messages = conversation.messages()
    total = sum(map(message_tokens, messages)) + 3
    assert total <= budget.max_prompt_tokens * budget.trim_to
    assert messages[0].role == "system"
    assert messages[0].content is not None
    assert messages[0].content.startswith("You are the front desk.")
    assert f"first {conversation.first_kept} turns" in messages[0].content
    assert messages[-1].content is not None and messages[-1].content.startswith("answer 19")
    # Newest kept, oldest dropped, order preserved.
    kept = [m.content.split()[1] for m in messages[1:] if m.content]
    assert kept == sorted(kept, key=int) and kept[-1] == "19"


def test_trimming_is_batched_so_the_prompt_prefix_stays_stable() -> None:
    budget = ContextBudget(max_prompt_tokens=1_000, trim_to=0.6)
    conversation = _long_call(20, budget)
    first = conversation.messages()
    conversation.add_user("one more short question")
    second = conversation.messages()
    # Room was left: the next turn did not trim again, so the earlier messages are
    # byte-identical (providers' prompt caches stay valid).
    assert second[: len(first)] == first


def test_tools_count_against_the_budget() -> None:
    budget = ContextBudget(max_prompt_tokens=1_000, trim_to=1.0)
    big_tool = ToolSpec("lookup", "x" * 1_600, {"type": "object"})  # ~400 tokens
    without = _long_call(20, budget).messages()
    with_tools = _long_call(20, budget).messages([big_tool])
    assert len(with_tools) < len(without)


def test_a_tool_call_is_never_separated_from_its_result() -> None:
    budget = ContextBudget(max_prompt_tokens=400, trim_to=1.0)
    conversation = Conversation("S", budget)
    conversation.add_user("first " * 100)
    conversation.add_tool_calls([CALL])
    conversation.add_tool_result("call_1", "result " * 50)
    conversation.add_user("next " * 100)
    conversation.add_assistant("ok")
    for extra in range(6):
        messages = conversation.messages()
        for i, message in enumerate(messages):
            if message.role == "tool":
                assert messages[i - 1].tool_calls, roles(messages)
            if message.tool_calls:
                assert messages[i + 1].role == "tool", roles(messages)
        conversation.add_user(f"more {extra} " + "x " * 60)


def test_the_newest_turn_is_sent_even_when_it_alone_is_over_budget() -> None:
    conversation = Conversation("S", ContextBudget(max_prompt_tokens=50))
    conversation.add_user("hello")
    conversation.add_assistant("word " * 500)
    messages = conversation.messages()
    assert roles(messages) == ["system", "assistant"]


def test_round_trips_through_plain_json() -> None:
    conversation = Conversation("Be brief.", ContextBudget(max_prompt_tokens=900, trim_to=0.5))
    conversation.add_user("Book Monday please")
    conversation.add_tool_calls([CALL], text="One moment.")
    conversation.add_tool_result("call_1", "booked")
    conversation.add_assistant("Done, see you Mon", interrupted=True)
    conversation.first_kept = 1
    data = json.loads(json.dumps(conversation.to_dict()))
    restored = Conversation.from_dict(data)
    assert restored == conversation
    assert isinstance(restored.turns[1], ToolTurn)
    assert restored.messages() == conversation.messages()
    with pytest.raises(ValueError):
        Conversation.from_dict({**data, "version": 99})
    with pytest.raises(ValueError):
        Conversation.from_dict({**data, "turns": [{"kind": "robot", "text": "?"}]})


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ContextBudget(max_prompt_tokens=0)
    with pytest.raises(ValueError):
        ContextBudget(trim_to=0)
