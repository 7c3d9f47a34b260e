"""LLM over any OpenAI-compatible chat-completions endpoint (OpenAI, Groq, vLLM, Ollama, ...).

``OpenAILlm`` streams one completion through the ``openai`` SDK and turns the chunks into
``LlmEvent``s. It posts a ready JSON body and reads the chunks as plain dicts (the SDK's
``client.post`` with ``AsyncStream[dict]``), skipping the typed layer of
``chat.completions.create``: that layer walks every message of the history through its
type hints on each request and builds a model object per streamed token - about 12 ms of
CPU per answer with a 40-message history, more than the rest of the answer's path. The
SDK still does the rest: URL, auth, retries, HTTP errors, SSE, error events.

``ResilientLlm`` wraps a primary and an optional fallback endpoint with a
first-token timeout: a phone caller hears silence while we wait, so a slow or failing
endpoint is abandoned early - but only before any output, since words already spoken
cannot be taken back. ``build_llm`` assembles both from an agent's ``BrainConfig``.

Consumers should iterate with ``contextlib.aclosing(llm.stream(...))`` (or cancel the
consuming task): leaving an ``async for`` early does not close an async generator by
itself, and the HTTP stream stays open until it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from builder_engine.agent_config import BrainConfig, LlmEndpoint
from builder_engine.config import Settings
from realtime.providers.base import (
    ChatMessage,
    LlmEvent,
    LlmFinished,
    LlmProvider,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolCallsRequested,
    ToolSpec,
)

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local servers (Ollama, llama.cpp, vLLM without --api-key) ignore the key, but the SDK
# refuses to build a client without one.
_PLACEHOLDER_KEY = "not-needed"
_NOT_RETRYABLE = frozenset({400, 401, 403, 404, 422})


def resolve_base_url(endpoint: LlmEndpoint, settings: Settings) -> str:
    """The agent's endpoint wins, then OPENAI_BASE_URL (via Settings), then OpenAI itself.

    The default is passed explicitly so the SDK never reads ``OPENAI_BASE_URL`` from the
    environment behind ``Settings``' back (Settings is the one source of configuration).
    """
    if endpoint.base_url is not None:
        return str(endpoint.base_url).rstrip("/")
    if settings.openai_base_url:
        return settings.openai_base_url.rstrip("/")
    return OPENAI_DEFAULT_BASE_URL


def _api_key(settings: Settings, base_url: str) -> str:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    if key:
        return key
    if base_url == OPENAI_DEFAULT_BASE_URL:
        raise ProviderError("openai", "no API key configured (OPENAI_API_KEY)", retryable=False)
    return _PLACEHOLDER_KEY


class OpenAIClients:
    """SDK clients shared per (base URL, key) so calls reuse warm HTTP connections.

    A fresh client per call would pay a TCP+TLS handshake on the first request of every
    call (~100 ms or more to a remote endpoint), which lands on the first reply. The
    worker owns one instance and closes it at shutdown.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 15.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: the process's TLS context, shared by the clients (each would otherwise
        load the CA certificates again: ~35 ms and ~1 MB)."""
        self._timeout = openai.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._tls = tls
        self._clients: dict[tuple[str, str, int], AsyncOpenAI] = {}

    def get(self, base_url: str, api_key: str, *, pool: int = 0) -> AsyncOpenAI:
        """The client of ``pool`` (realtime/providers/http.py: a few calls per pool keep
        each connection pool small) for this endpoint and key."""
        client = self._clients.get((base_url, api_key, pool))
        if client is None:
            client = make_client(base_url, api_key, timeout=self._timeout, tls=self._tls)
            self._clients[(base_url, api_key, pool)] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def __aenter__(self) -> OpenAIClients:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def make_client(
    base_url: str,
    api_key: str,
    *,
    timeout: openai.Timeout | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncOpenAI:
    # max_retries=0: retrying is ResilientLlm's decision, under the first-token deadline;
    # the SDK's own back-off (seconds) would blow through it silently.
    return AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout or openai.Timeout(15.0, connect=3.0),
        http_client=openai.DefaultAsyncHttpxClient(verify=tls) if tls is not None else None,
    )


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class OpenAILlm:
    """``LlmProvider`` over one OpenAI-compatible endpoint and model."""

    def __init__(
        self,
        client: AsyncOpenAI,
        model: str,
        *,
        name: str = "openai",
        include_usage: bool = True,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        owns_client: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self._client = client
        self._include_usage = include_usage
        # OpenAI's own reasoning models reject max_tokens; many compatible servers only
        # know max_tokens. from_config picks by endpoint.
        self._max_tokens_field = max_tokens_field
        self._owns_client = owns_client

    @classmethod
    def from_config(
        cls,
        endpoint: LlmEndpoint,
        settings: Settings,
        *,
        clients: OpenAIClients | None = None,
        pool: int = 0,
    ) -> OpenAILlm:
        """Endpoint precedence: ``endpoint.base_url`` > ``settings.openai_base_url`` > OpenAI.

        Without ``clients`` the adapter gets a private SDK client (closed by ``aclose``);
        with them, the client of connection pool ``pool``."""
        if endpoint.provider != "openai":
            raise ValueError(f"unsupported LLM provider {endpoint.provider!r}")
        base_url = resolve_base_url(endpoint, settings)
        key = _api_key(settings, base_url)
        on_openai = base_url == OPENAI_DEFAULT_BASE_URL
        client = clients.get(base_url, key, pool=pool) if clients else make_client(base_url, key)
        return cls(
            client,
            endpoint.model,
            name=f"openai:{endpoint.model}",
            max_tokens_field="max_completion_tokens" if on_openai else "max_tokens",
            owns_client=clients is None,
        )

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.close()

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        temperature: float = 0.7,
        max_tokens: int | None = None,
    ) -> AsyncGenerator[LlmEvent, None]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [to_api_message(m) for m in messages],
            "temperature": temperature,
            "stream": True,
        }
        if tools:  # the API rejects "tools": [], so an agent without tools sends none
            body["tools"] = [to_api_tool(t) for t in tools]
        if max_tokens is not None:
            body[self._max_tokens_field] = max_tokens
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        try:
            response = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=ChatCompletion,
                stream=True,
                stream_cls=AsyncStream[dict[str, Any]],
            )
        except openai.OpenAIError as exc:
            raise _provider_error(self.name, exc) from exc
        assembler = _ToolCallAssembler()
        finish_reason: str | None = None
        usage: tuple[int, int] | None = None
        try:
            async for chunk in response:
                if not isinstance(chunk, dict):
                    continue  # not a chunk at all (a server's keep-alive comment, say)
                if isinstance(counts := chunk.get("usage"), dict):
                    usage = (
                        int(counts.get("prompt_tokens") or 0),
                        int(counts.get("completion_tokens") or 0),
                    )
                choice = _first_choice(chunk)
                if choice is None:
                    continue
                for event in _events_of(choice, assembler):
                    yield event
                if choice.get("finish_reason") is not None:
                    finish_reason = str(choice["finish_reason"])
                    calls = assembler.complete()
                    if calls:
                        # Yielded before the usage chunk: tools can start a moment sooner.
                        yield ToolCallsRequested(calls)
        except openai.OpenAIError as exc:
            raise _provider_error(self.name, exc) from exc
        finally:
            # Runs on cancellation (barge-in) too: closing the response drops the HTTP
            # stream, so the endpoint stops generating (and billing) right away.
            await response.close()
        if finish_reason is None:
            raise ProviderError(self.name, "stream ended without a finish_reason")
        yield LlmFinished(
            finish_reason,
            prompt_tokens=usage[0] if usage else None,
            completion_tokens=usage[1] if usage else None,
        )


def _first_choice(chunk: dict[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice: dict[str, Any] = choices[0]
    return choice


def _events_of(choice: dict[str, Any], assembler: _ToolCallAssembler) -> list[LlmEvent]:
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return []
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        assembler.add(
            int(call.get("index") or 0),
            call.get("id"),
            function.get("name"),
            function.get("arguments"),
        )
    content = delta.get("content")
    return [TextDelta(content)] if isinstance(content, str) and content else []


class _ToolCallAssembler:
    """Joins streamed tool-call fragments by index into complete calls."""

    def __init__(self) -> None:
        self._calls: dict[int, _PendingCall] = {}

    def add(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        pending = self._calls.setdefault(index, _PendingCall())
        if call_id and not pending.id:
            pending.id = call_id
        # OpenAI sends the name once; some compatible servers repeat it in every fragment
        # and a few split it. Equal repeats are ignored, anything else is appended.
        if name and name != pending.name:
            pending.name += name
        if arguments:
            pending.arguments.append(arguments)

    def complete(self) -> tuple[ToolCall, ...]:
        calls = tuple(
            ToolCall(
                # Some local servers omit ids; tool results must still reference one.
                id=pending.id or f"call_{index}",
                name=pending.name,
                arguments="".join(pending.arguments) or "{}",
            )
            for index, pending in sorted(self._calls.items())
        )
        self._calls.clear()
        return calls


def to_api_message(message: ChatMessage) -> ChatCompletionMessageParam:
    """``ChatMessage`` -> the chat-completions message JSON."""
    if message.role == "system":
        return {"role": "system", "content": message.content or ""}
    if message.role == "user":
        return {"role": "user", "content": message.content or ""}
    if message.role == "tool":
        if message.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id,
            "content": message.content or "",
        }
    if message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": "assistant", "content": message.content or ""}


def to_api_tool(tool: ToolSpec) -> ChatCompletionToolParam:
    # An empty parameters dict is not a valid schema for the API; a tool without
    # arguments is an object with no properties.
    parameters = tool.parameters or {"type": "object", "properties": {}}
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": parameters},
    }


def _provider_error(provider: str, exc: openai.OpenAIError) -> ProviderError:
    if isinstance(exc, openai.APIStatusError):
        retryable = exc.status_code not in _NOT_RETRYABLE
        return ProviderError(
            provider, f"HTTP {exc.status_code}: {exc.message}", retryable=retryable
        )
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(provider, "request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause else exc.message
        return ProviderError(provider, f"connection failed ({detail})")
    return ProviderError(provider, f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ fallback


class FirstTokenTimeout(ProviderError):
    def __init__(self, provider: str, timeout_s: float) -> None:
        super().__init__(provider, f"no first token within {timeout_s * 1000:.0f} ms")


class ResilientLlm:
    """Primary endpoint with a first-token deadline, then the fallback (or one retry).

    Before the first event (text, tool calls or finish) arrives, a timeout or any
    ``ProviderError`` abandons the attempt: the request is cancelled and the next one
    starts - the fallback endpoint when configured, otherwise the primary once more if
    the failure is retryable. Once output has started, errors propagate unchanged.
    """

    def __init__(
        self,
        primary: LlmProvider,
        fallback: LlmProvider | None = None,
        *,
        first_token_timeout_s: float,
        retry_primary: bool = True,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.first_token_timeout_s = first_token_timeout_s
        self._retry_primary = retry_primary
        self.name = primary.name if fallback is None else f"{primary.name}|{fallback.name}"

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        temperature: float = 0.7,
        max_tokens: int | None = None,
    ) -> AsyncGenerator[LlmEvent, None]:
        provider: LlmProvider | None = self.primary
        attempt = 0
        while provider is not None:
            attempt += 1
            events = provider.stream(
                messages, tools=tools, temperature=temperature, max_tokens=max_tokens
            )
            try:
                try:
                    # asyncio.timeout (not wait_for): the generator must keep running in
                    # this task, since the HTTP client's cancel scopes are task-bound.
                    async with asyncio.timeout(self.first_token_timeout_s):
                        first = await anext(events)
                except (TimeoutError, ProviderError, StopAsyncIteration) as exc:
                    error = _as_error(exc, provider.name, self.first_token_timeout_s)
                    provider = self._next_provider(provider, attempt, error)
                    if provider is None:
                        raise error from exc
                    log.warning(
                        "LLM attempt %d failed (%s); trying %s", attempt, error, provider.name
                    )
                    continue
                yield first
                async for event in events:
                    yield event
                return
            finally:
                await _close(events)

    async def aclose(self) -> None:
        """Close the wrapped adapters' private clients (no-op for shared ones)."""
        for provider in (self.primary, self.fallback):
            aclose = getattr(provider, "aclose", None)
            if aclose is not None:
                await aclose()

    def _next_provider(
        self, failed: LlmProvider, attempt: int, error: ProviderError
    ) -> LlmProvider | None:
        if failed is self.primary and self.fallback is not None:
            return self.fallback
        if failed is self.primary and self._retry_primary and attempt == 1 and error.retryable:
            return self.primary
        return None


def _as_error(exc: BaseException, provider: str, timeout_s: float) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError):
        return FirstTokenTimeout(provider, timeout_s)
    return ProviderError(provider, "the stream ended without any event")


async def _close(events: AsyncIterator[LlmEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def build_llm(
    brain: BrainConfig,
    settings: Settings,
    *,
    clients: OpenAIClients | None = None,
    pool: int = 0,
) -> LlmProvider:
    """The agent's brain: its endpoint, behind a first-token deadline and its fallback."""
    primary = OpenAILlm.from_config(brain, settings, clients=clients, pool=pool)
    fallback = (
        OpenAILlm.from_config(brain.fallback, settings, clients=clients, pool=pool)
        if brain.fallback is not None
        else None
    )
    return ResilientLlm(
        primary, fallback, first_token_timeout_s=brain.first_token_timeout_ms / 1000
    )
