"""The OpenAI LLM adapter and its fallback wrapper, through the real SDK, against the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
import pytest

from builder_engine.agent_config import BrainConfig, LlmEndpoint
from builder_engine.config import Settings
from emulators.openai import CallTool, Fail, OpenAIEmulator, Reply, ToolInvocation
from realtime.conversation import Conversation
from realtime.providers.base import (
    ChatMessage,
    LlmEvent,
    LlmFinished,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolCallsRequested,
    ToolSpec,
)
from realtime.providers.openai_llm import (
    OPENAI_DEFAULT_BASE_URL,
    FirstTokenTimeout,
    OpenAIClients,
    OpenAILlm,
    ResilientLlm,
    build_llm,
    make_client,
)

KEY = "sk-test-key"
HELLO = [ChatMessage("system", "Be brief."), ChatMessage("user", "What are your hours?")]
BOOK = ToolSpec(
    "book",
    "Book an appointment",
    {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
)
NOTIFY = ToolSpec("notify", "Send an SMS confirmation")


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@contextlib.asynccontextmanager
async def emulator(script: Sequence[Any], **options: Any) -> AsyncIterator[OpenAIEmulator]:
    options = {"first_token_latency_ms": 20, "token_interval_ms": 1, "api_key": KEY, **options}
    async with OpenAIEmulator(script, **options) as emu:
        yield emu


@contextlib.asynccontextmanager
async def adapter(emu: OpenAIEmulator, model: str = "test-model") -> AsyncIterator[OpenAILlm]:
    llm = OpenAILlm(make_client(emu.base_url, KEY), model, owns_client=True)
    try:
        yield llm
    finally:
        await llm.aclose()


async def collect(
    llm: OpenAILlm | ResilientLlm, messages: Sequence[ChatMessage], **kw: Any
) -> list[LlmEvent]:
    async with contextlib.aclosing(llm.stream(messages, **kw)) as events:
        return [event async for event in events]


def text_of(events: Sequence[LlmEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def first_event_after(
    llm: OpenAILlm | ResilientLlm, messages: Sequence[ChatMessage]
) -> float:
    started = time.perf_counter()
    async with contextlib.aclosing(llm.stream(messages)) as events:
        async for _ in events:
            return time.perf_counter() - started
    raise AssertionError("no event")


# ------------------------------------------------------------------ streaming


async def test_streamed_text_equals_the_script() -> None:
    text = "We open at nine, Monday to Friday. On weekends, it's 10:30 a.m. until 4 p.m."
    async with (
        emulator([Reply(when_last_user_contains="hours", text=text)]) as emu,
        adapter(emu) as llm,
    ):
        events = await collect(llm, HELLO, temperature=0.2, max_tokens=200)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 10  # streamed in token-sized pieces, not one blob
    assert text_of(events) == text
    finished = events[-1]
    assert isinstance(finished, LlmFinished) and finished.finish_reason == "stop"
    assert finished.completion_tokens == len(deltas) and finished.prompt_tokens
    sent = emu.chat_requests[0].body
    assert sent["model"] == "test-model" and sent["stream"] is True
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 200
    assert sent["stream_options"] == {"include_usage": True}
    assert "tools" not in sent  # the API rejects an empty tools list
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What are your hours?"},
    ]


async def test_max_tokens_cuts_the_reply_with_finish_reason_length() -> None:
    async with (
        emulator([Reply(text="one two three four five six seven")]) as emu,
        adapter(emu) as llm,
    ):
        events = await collect(llm, HELLO, max_tokens=3)
    assert text_of(events) == "one two three"
    finished = events[-1]
    assert isinstance(finished, LlmFinished)
    assert (finished.finish_reason, finished.completion_tokens) == ("length", 3)


async def test_a_tool_call_is_assembled_from_fragments() -> None:
    arguments = {"day": "monday", "time": "9:30", "note": 'first visit, "urgent"'}
    script = [CallTool(when_last_user_contains="hours", name="book", arguments=arguments)]
    async with emulator(script, argument_fragment_chars=3) as emu, adapter(emu) as llm:
        events = await collect(llm, HELLO, tools=[BOOK, NOTIFY])
    requested = [e for e in events if isinstance(e, ToolCallsRequested)]
    assert len(requested) == 1 and len(requested[0].calls) == 1
    call = requested[0].calls[0]
    assert call.name == "book" and call.id.startswith("call_")
    assert json.loads(call.arguments) == arguments
    assert isinstance(events[-1], LlmFinished) and events[-1].finish_reason == "tool_calls"
    assert events.index(requested[0]) == len(events) - 2  # once, just before the finish
    assert emu.chat_requests[0].chunks_sent > 10  # the arguments really came in pieces
    tools = emu.chat_requests[0].body["tools"]
    assert tools[0]["function"]["parameters"] == BOOK.parameters
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}


async def test_parallel_tool_calls_with_spoken_text() -> None:
    script = [
        CallTool(
            name="book",
            arguments={"day": "friday"},
            parallel=[ToolInvocation("notify", {"sms": True}), ToolInvocation("notify", "{}")],
            text="One moment.",
        )
    ]
    async with emulator(script) as emu, adapter(emu) as llm:
        events = await collect(llm, HELLO, tools=[BOOK, NOTIFY])
    assert text_of(events) == "One moment."
    (requested,) = [e for e in events if isinstance(e, ToolCallsRequested)]
    assert [c.name for c in requested.calls] == ["book", "notify", "notify"]
    assert [json.loads(c.arguments) for c in requested.calls] == [
        {"day": "friday"},
        {"sms": True},
        {},
    ]
    assert len({c.id for c in requested.calls}) == 3


async def test_tool_result_continuation_round_trip() -> None:
    script = [
        Reply(when_after_tool="book", text="You're booked: {tool_result}."),
        CallTool(when_last_user_contains="book", name="book", arguments={"day": "monday"}),
    ]
    conversation = Conversation("You book appointments.")
    conversation.add_user("Can I book Monday?")
    async with emulator(script) as emu, adapter(emu) as llm:
        events = await collect(llm, conversation.messages([BOOK]), tools=[BOOK])
        (requested,) = [e for e in events if isinstance(e, ToolCallsRequested)]
        conversation.add_tool_calls(requested.calls)
        conversation.add_tool_result(requested.calls[0].id, "Monday at 9 a.m.")
        events = await collect(llm, conversation.messages([BOOK]), tools=[BOOK])
    assert text_of(events) == "You're booked: Monday at 9 a.m.."
    second = emu.chat_requests[1]
    assert second.status == 200  # the emulator validated assistant tool_calls + tool message
    assert [m["role"] for m in second.body["messages"]] == ["system", "user", "assistant", "tool"]
    assistant = second.body["messages"][2]
    assert assistant["content"] is None
    assert assistant["tool_calls"][0]["function"] == {
        "name": "book",
        "arguments": '{"day": "monday"}',
    }


# ------------------------------------------------------------------ errors


async def test_a_wrong_key_is_a_non_retryable_provider_error() -> None:
    async with emulator([Reply(text="never")]) as emu:
        llm = OpenAILlm(make_client(emu.base_url, "sk-wrong"), "m", owns_client=True)
        with pytest.raises(ProviderError) as caught:
            await collect(llm, HELLO)
        await llm.aclose()
    assert not caught.value.retryable and "401" in str(caught.value)
    assert emu.requests[0].status == 401


async def test_an_invalid_request_is_rejected_like_the_real_api() -> None:
    orphan = [ChatMessage("user", "hi"), ChatMessage("tool", "result", tool_call_id="call_x")]
    async with emulator([Reply(text="never")]) as emu, adapter(emu) as llm:
        with pytest.raises(ProviderError) as caught:
            await collect(llm, orphan)
        client = openai.AsyncOpenAI(base_url=emu.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="tools"):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], tools=[]
            )
        unanswered: Any = [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
                ],
            },
        ]
        with pytest.raises(openai.BadRequestError, match="arguments"):
            await client.chat.completions.create(model="m", messages=unanswered)
        await client.close()
    assert not caught.value.retryable and "preceeding message with 'tool_calls'" in str(
        caught.value
    )


async def test_a_server_error_switches_to_the_fallback() -> None:
    script = [
        Fail(when_model="primary", status=500),
        Reply(when_model="backup", text="Backup here."),
    ]
    async with (
        emulator(script) as emu,
        adapter(emu, "primary") as primary,
        adapter(emu, "backup") as backup,
    ):
        llm = ResilientLlm(primary, backup, first_token_timeout_s=1.0)
        events = await collect(llm, HELLO)
    assert text_of(events) == "Backup here."
    assert [r.body["model"] for r in emu.chat_requests] == ["primary", "backup"]


async def test_a_rate_limit_without_fallback_retries_the_primary_once() -> None:
    script = [Fail(status=429, times=1, retry_after_s=20), Reply(text="Second time lucky.")]
    async with emulator(script) as emu, adapter(emu) as primary:
        llm = ResilientLlm(primary, first_token_timeout_s=1.0)
        started = time.perf_counter()
        events = await collect(llm, HELLO)
        elapsed = time.perf_counter() - started
    assert text_of(events) == "Second time lucky."
    assert [r.status for r in emu.chat_requests] == [429, 200]
    assert elapsed < 1.0  # no SDK back-off honouring retry-after: 20 s


async def test_an_unauthorized_primary_is_not_retried_without_fallback() -> None:
    async with emulator([Reply(text="never")]) as emu:
        llm = ResilientLlm(
            OpenAILlm(make_client(emu.base_url, "sk-wrong"), "m", owns_client=True),
            first_token_timeout_s=1.0,
        )
        with pytest.raises(ProviderError):
            await collect(llm, HELLO)
        await llm.aclose()
    assert len(emu.requests) == 1


async def test_a_first_token_stall_switches_to_the_fallback_within_the_timeout() -> None:
    timeout_s = 0.3
    script = [
        Reply(when_model="primary", text="Too late.", stall_ms=5_000),
        Reply(when_model="backup", text="Fallback answer."),
    ]
    async with (
        emulator(script, first_token_latency_ms=30) as emu,
        adapter(emu, "primary") as primary,
        adapter(emu, "backup") as backup,
    ):
        llm = ResilientLlm(primary, backup, first_token_timeout_s=timeout_s)
        started = time.perf_counter()
        async with contextlib.aclosing(llm.stream(HELLO)) as events:
            first = await anext(events)
            first_after = time.perf_counter() - started
            rest = [e async for e in events]
    assert isinstance(first, TextDelta)
    assert text_of([first, *rest]) == "Fallback answer."
    # Deadline, then the fallback's own latency (30 ms) plus overhead.
    assert timeout_s + 0.03 <= first_after < timeout_s + 0.03 + 0.15, first_after
    stalled = emu.chat_requests[0]
    await asyncio.wait_for(stalled.ended.wait(), 1.0)
    assert stalled.outcome == "client_disconnected" and stalled.chunks_sent == 0


async def test_a_stalling_endpoint_without_fallback_is_retried_once_then_gives_up() -> None:
    async with emulator([Reply(text="Too late.", stall_ms=5_000)]) as emu, adapter(emu) as primary:
        llm = ResilientLlm(primary, first_token_timeout_s=0.15)
        started = time.perf_counter()
        with pytest.raises(FirstTokenTimeout) as caught:
            await collect(llm, HELLO)
        elapsed = time.perf_counter() - started
    assert caught.value.retryable
    assert 0.3 <= elapsed < 0.5
    assert len(emu.chat_requests) == 2


async def test_an_error_after_the_first_token_is_raised_not_retried() -> None:
    script = [
        Reply(when_model="primary", text="We open at nine in the morning.", drop_after_chunks=2),
        Reply(when_model="backup", text="Never heard."),
    ]
    async with (
        emulator(script) as emu,
        adapter(emu, "primary") as primary,
        adapter(emu, "backup") as backup,
    ):
        llm = ResilientLlm(primary, backup, first_token_timeout_s=1.0)
        received: list[LlmEvent] = []
        with pytest.raises(ProviderError, match="connection"):
            async with contextlib.aclosing(llm.stream(HELLO)) as events:
                async for event in events:
                    received.append(event)
    assert text_of(received) == "We open"  # what was already streamed stays said
    assert [r.body["model"] for r in emu.chat_requests] == ["primary"]
    assert emu.chat_requests[0].outcome == "dropped"


# ------------------------------------------------------------------ cancellation


async def test_leaving_the_stream_closes_the_http_stream() -> None:
    async with (
        emulator([Reply(text="word " * 500)], token_interval_ms=10) as emu,
        adapter(emu) as llm,
    ):
        async with contextlib.aclosing(llm.stream(HELLO)) as events:
            async for _ in events:
                break
        record = emu.chat_requests[0]
        await asyncio.wait_for(record.ended.wait(), 0.5)
    assert record.outcome == "client_disconnected"
    assert record.chunks_sent < 10


async def test_cancelling_the_consumer_task_closes_the_stream_promptly() -> None:
    async with (
        emulator([Reply(text="word " * 500)], token_interval_ms=10) as emu,
        adapter(emu) as primary,
    ):
        llm = ResilientLlm(primary, first_token_timeout_s=1.0)
        heard = asyncio.Event()

        async def speak() -> None:
            async for _ in llm.stream(HELLO):
                heard.set()

        task = asyncio.create_task(speak())
        await asyncio.wait_for(heard.wait(), 1.0)
        task.cancel()
        cancelled_at = time.perf_counter()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = emu.chat_requests[0]
        await asyncio.wait_for(record.ended.wait(), 0.5)
        closed_after = time.perf_counter() - cancelled_at
    assert record.outcome == "client_disconnected"
    assert closed_after < 0.1


async def test_cancelling_while_waiting_for_the_first_token_closes_the_request() -> None:
    async with emulator([Reply(text="late", stall_ms=5_000)]) as emu, adapter(emu) as llm:
        # Through the wrapper: a barge-in inside its first-token deadline is a
        # cancellation, not a timeout, and must not start a retry.
        wrapped = ResilientLlm(llm, first_token_timeout_s=2.0)
        task = asyncio.create_task(collect(wrapped, HELLO))
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = emu.chat_requests[0]
        await asyncio.wait_for(record.ended.wait(), 0.5)
        await asyncio.sleep(0.05)
    assert record.outcome == "client_disconnected"
    assert len(emu.chat_requests) == 1


# ------------------------------------------------------------------ configuration


async def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        emulator([Reply(text="agent")]) as agent_emu,
        emulator([Reply(text="env")]) as env_emu,
    ):
        monkeypatch.setenv("OPENAI_BASE_URL", env_emu.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        from_env = settings()
        assert from_env.openai_base_url == env_emu.base_url
        agent_llm = OpenAILlm.from_config(LlmEndpoint(base_url=agent_emu.base_url), from_env)
        env_llm = OpenAILlm.from_config(LlmEndpoint(), from_env)
        assert text_of(await collect(agent_llm, HELLO)) == "agent"
        assert text_of(await collect(env_llm, HELLO)) == "env"
        await agent_llm.aclose()
        await env_llm.aclose()
        # Settings is the source of truth: the SDK must not re-read OPENAI_BASE_URL.
        default_llm = OpenAILlm.from_config(LlmEndpoint(), settings(openai_base_url=None))
        assert default_llm.base_url == OPENAI_DEFAULT_BASE_URL
        await default_llm.aclose()
    assert len(agent_emu.requests) == 1 and len(env_emu.requests) == 1


def test_the_openai_endpoint_needs_a_key_but_a_local_server_does_not() -> None:
    with pytest.raises(ProviderError) as caught:
        OpenAILlm.from_config(LlmEndpoint(), settings(openai_api_key=None, openai_base_url=None))
    assert not caught.value.retryable
    local = OpenAILlm.from_config(
        LlmEndpoint(base_url="http://127.0.0.1:11434/v1"),
        settings(openai_api_key=None),
    )
    assert local.base_url == "http://127.0.0.1:11434/v1"


async def test_build_llm_from_brain_config_uses_timeout_and_fallback() -> None:
    script = [
        Reply(when_model="main", text="slow", stall_ms=5_000),
        Reply(when_model="spare", text="Spare speaking."),
    ]
    async with emulator(script) as emu:
        brain = BrainConfig(
            model="main",
            base_url=emu.base_url,
            first_token_timeout_ms=200,
            fallback=LlmEndpoint(model="spare", base_url=emu.base_url),
        )
        async with OpenAIClients() as clients:
            llm = build_llm(brain, settings(openai_api_key=KEY), clients=clients)
            assert isinstance(llm, ResilientLlm) and llm.first_token_timeout_s == 0.2
            events = await collect(llm, HELLO)
            assert text_of(events) == "Spare speaking."
            # Both endpoints share one base URL and key: one SDK client, warm connections.
            assert isinstance(llm.primary, OpenAILlm) and isinstance(llm.fallback, OpenAILlm)
            assert llm.primary._client is llm.fallback._client


# ------------------------------------------------------------------ emulator extras


async def test_non_streaming_json_schema_answer_for_post_call_analysis() -> None:
    verdict = json.dumps({"booked": True, "day": "monday"})
    async with emulator([Reply(text=verdict)]) as emu:
        client = openai.AsyncOpenAI(base_url=emu.base_url, api_key=KEY, max_retries=0)
        completion = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Summarize the call."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "analysis", "schema": {"type": "object"}},
            },
        )
        await client.close()
    assert json.loads(completion.choices[0].message.content or "") == json.loads(verdict)
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None


async def test_many_concurrent_streams_and_first_token_overhead() -> None:
    latency_ms = 50
    async with (
        emulator([Reply(text="Hello there. " * 5)], first_token_latency_ms=latency_ms) as emu,
        adapter(emu) as llm,
    ):
        results = await asyncio.gather(*(collect(llm, HELLO) for _ in range(50)))
        assert all(text_of(r) == "Hello there. " * 5 for r in results)
        waits = [await first_event_after(llm, HELLO) for _ in range(15)]
    overhead_ms = statistics.median(waits) * 1000 - latency_ms
    assert 0 <= overhead_ms < 30, overhead_ms


def test_tool_call_conversion_shapes() -> None:
    from realtime.providers.openai_llm import to_api_message

    call = ToolCall("call_1", "book", '{"day":"monday"}')
    assert to_api_message(ChatMessage("assistant", "One moment.", tool_calls=(call,))) == {
        "role": "assistant",
        "content": "One moment.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "book", "arguments": call.arguments},
            }
        ],
    }
    assert to_api_message(ChatMessage("tool", "ok", tool_call_id="call_1")) == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "ok",
    }
    with pytest.raises(ValueError):
        to_api_message(ChatMessage("tool", "ok"))


async def test_script_callables_answer_from_the_request_and_report_their_bugs() -> None:
    def echo(body: dict[str, Any]) -> Reply | None:
        said = body["messages"][-1]["content"]
        return Reply(text=f"You said {said}.") if "echo" in said else None

    def broken(body: dict[str, Any]) -> Reply | None:
        raise RuntimeError("bad rule")

    async with emulator([echo, broken]) as emu, adapter(emu) as llm:
        events = await collect(llm, [ChatMessage("user", "echo this")])
        with pytest.raises(ProviderError, match="bad rule"):
            await collect(llm, [ChatMessage("user", "something else")])
    assert text_of(events) == "You said echo this."
