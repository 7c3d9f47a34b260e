"""An in-process emulator of OpenAI's chat-completions endpoint, for tests and benchmarks.

No real LLM is reachable offline, so everything that talks to a model is tested against
this server through the real ``openai`` SDK::

    script = [
        Reply(when_after_tool="book", text="Booked: {tool_result}."),
        CallTool(when_last_user_contains="book", name="book", arguments={"day": "monday"}),
        Reply(when_last_user_contains="hours", text="We open at nine."),
        Reply(text="Sorry, could you repeat that?"),  # no condition: the default
    ]
    async with OpenAIEmulator(script, api_key="sk-test") as emu:
        client = AsyncOpenAI(base_url=emu.base_url, api_key="sk-test")

The first rule whose conditions hold answers. A rule may also be a callable taking the
request JSON and returning a ``Reply``/``CallTool``/``Fail`` (or ``None`` to pass).
Requests are validated like the real API so client bugs (a tool message without the
assistant ``tool_calls`` before it, ``tools=[]``, dict arguments) fail here as they would
in production. Every request is recorded in ``emu.requests``.

The HTTP layer is a small asyncio protocol rather than uvicorn: it is cheap for hundreds of
concurrent streams, it learns about a client disconnect the moment the socket closes (even
while stalling before the first token), and it can drop a connection mid-body on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

# ------------------------------------------------------------------ script


@dataclass(frozen=True, kw_only=True)
class _Rule:
    """Conditions (all given ones must hold) and fault injection shared by every rule."""

    when_last_user_contains: str | None = None  # case-insensitive substring
    when_model: str | None = None
    when_after_tool: str | None = None  # the request ends with this tool's result
    when: Callable[[dict[str, Any]], bool] | None = None
    times: int | None = None  # answer at most this many requests, then stop matching
    stall_ms: int = 0  # extra wait before the first token (first-token timeouts)
    drop_after_chunks: int | None = None  # close the socket after N content/tool chunks


@dataclass(frozen=True, kw_only=True)
class Reply(_Rule):
    """Speak ``text``. ``{tool_result}`` is replaced by the trailing tool results."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"


@dataclass(frozen=True)
class ToolInvocation:
    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)  # str: sent verbatim


@dataclass(frozen=True, kw_only=True)
class CallTool(_Rule):
    """Call ``name``; ``parallel`` adds more calls to the same response. A rule without
    ``when_after_tool`` never answers a request that ends with a tool result (a model
    that just got a result speaks), which keeps scripts from looping."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    parallel: Sequence[ToolInvocation] = ()
    text: str = ""  # spoken before the calls ("One moment.")

    @property
    def invocations(self) -> tuple[ToolInvocation, ...]:
        return (ToolInvocation(self.name, self.arguments), *self.parallel)


@dataclass(frozen=True, kw_only=True)
class Fail(_Rule):
    """Answer with an HTTP error in OpenAI's error JSON shape."""

    status: int = 500
    message: str = "The server had an error while processing your request. Sorry about that!"
    error_type: str = "server_error"
    code: str | None = None
    retry_after_s: float | None = None


Action = Reply | CallTool | Fail
ScriptRule = Action | Callable[[dict[str, Any]], Action | None]

Outcome = Literal["pending", "completed", "rejected", "client_disconnected", "dropped"]


@dataclass
class RecordedRequest:
    """One request the emulator received, updated while it is answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float  # loop.time()
    status: int | None = None
    outcome: Outcome = "pending"
    chunks_sent: int = 0  # content/tool chunks (not role, finish or usage)
    first_chunk_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, outcome: Outcome) -> None:
        if self.outcome == "pending":
            self.outcome = outcome
        self.ended.set()


class _InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ------------------------------------------------------------------ emulator


class OpenAIEmulator:
    """``async with OpenAIEmulator(script) as emu``: serves ``emu.base_url`` (ends in /v1)."""

    def __init__(
        self,
        script: Sequence[ScriptRule],
        *,
        first_token_latency_ms: float = 200,
        token_interval_ms: float = 10,
        api_key: str | None = "sk-emulator",
        argument_fragment_chars: int = 6,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.script = list(script)
        self.first_token_latency_ms = first_token_latency_ms
        self.token_interval_ms = token_interval_ms
        self.api_key = api_key  # None: accept any key
        self.argument_fragment_chars = max(1, argument_fragment_chars)
        self.requests: list[RecordedRequest] = []
        self._host = host
        self._port = port
        self._uses: dict[int, int] = {}  # script index -> times answered
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def __aenter__(self) -> OpenAIEmulator:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self._host, self._port, backlog=1024
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        for connection in list(self._connections):
            connection.abort()
        await self._server.wait_closed()
        self._server = None
        self._closing = False

    # ------------------------------------------------------------ dispatch

    async def handle(self, request: _HttpRequest, conn: _Connection) -> None:
        """Answer one request on ``conn``; records it in ``self.requests``."""
        body: Any = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=request.headers,
            body=body,
            received_at=asyncio.get_running_loop().time(),
        )
        self.requests.append(record)
        try:
            await self._route(request, record, conn)
        except (asyncio.CancelledError, ConnectionError):
            record.finish("dropped" if self._closing or not conn.lost else "client_disconnected")
            raise
        except Exception as exc:
            # A bug in a script callable: say so to the client instead of hanging it.
            if record.status is None:
                message = f"emulator: {type(exc).__name__}: {exc}"
                await _send_error(conn, record, 500, message, "emulator_error")
            else:
                conn.abort()
                record.finish("dropped")
            return
        record.finish("completed")

    async def _route(
        self, request: _HttpRequest, record: RecordedRequest, conn: _Connection
    ) -> None:
        if not self._authorized(request.headers.get("authorization", "")):
            return await _send_error(
                conn, record, 401, _INVALID_KEY, "invalid_request_error", code="invalid_api_key"
            )
        if request.path == "/v1/models" and request.method == "GET":
            models = {"object": "list", "data": [_model_entry("emulator")]}
            return await conn.send_json(record, 200, models)
        if request.path != "/v1/chat/completions":
            message = f"Invalid URL ({request.method} {request.path})"
            return await _send_error(conn, record, 404, message, "invalid_request_error")
        if request.method != "POST":
            message = f"Invalid method for URL ({request.method} {request.path})"
            return await _send_error(conn, record, 405, message, "invalid_request_error")
        if not isinstance(record.body, dict):
            message = "We could not parse the JSON body of your request."
            return await _send_error(conn, record, 400, message, "invalid_request_error")
        try:
            validate_chat_request(record.body)
        except _InvalidRequest as exc:
            return await _send_error(
                conn, record, 400, exc.message, "invalid_request_error", param=exc.param
            )
        action = self._choose(record.body)
        if action is None:
            message = "emulator: no script rule matched this request"
            return await _send_error(conn, record, 500, message, "emulator_error")
        await self._answer(action, record, conn)

    def _authorized(self, header: str) -> bool:
        if self.api_key is None:
            return header.startswith("Bearer ")
        return header == f"Bearer {self.api_key}"

    def _choose(self, body: dict[str, Any]) -> Action | None:
        for index, rule in enumerate(self.script):
            if isinstance(rule, Reply | CallTool | Fail):
                action: Action | None = rule if _matches(rule, body) else None
                limit = rule.times
            else:
                action = rule(body)
                limit = None
            if action is None:
                continue
            used = self._uses.get(index, 0)
            if limit is not None and used >= limit:
                continue
            self._uses[index] = used + 1
            return action
        return None

    async def _answer(self, action: Action, record: RecordedRequest, conn: _Connection) -> None:
        body: dict[str, Any] = record.body
        loop = asyncio.get_running_loop()
        first_at = record.received_at + (self.first_token_latency_ms + action.stall_ms) / 1000
        if isinstance(action, Fail):
            await asyncio.sleep(max(0.0, action.stall_ms / 1000))
            headers = {}
            if action.retry_after_s is not None:
                headers["retry-after"] = f"{action.retry_after_s:g}"
            return await _send_error(
                conn,
                record,
                action.status,
                action.message,
                action.error_type,
                code=action.code,
                headers=headers,
            )
        answer = self._render(action, body)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            await _stream_answer(
                conn,
                record,
                answer,
                action,
                first_at,
                self.token_interval_ms / 1000,
                include_usage,
            )
        else:
            await asyncio.sleep(max(0.0, first_at - loop.time()))
            if action.drop_after_chunks is not None:
                record.finish("dropped")
                conn.abort()
                return
            await conn.send_json(record, 200, answer.completion())

    def _render(self, action: Reply | CallTool, body: dict[str, Any]) -> _Answer:
        number = next(self._ids)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(action, Reply):
            text = action.text.replace("{tool_result}", _trailing_tool_results(body))
            pieces = split_tokens(text)
            finish = action.finish_reason
            if isinstance(limit, int) and len(pieces) > limit:
                pieces, finish = pieces[:limit], "length"
            return _Answer(number, body["model"], pieces, (), finish, _prompt_tokens(body))
        calls = tuple(
            _RenderedCall(
                id=f"call_emu{number:04d}x{i}",
                name=call.name,
                arguments=call.arguments
                if isinstance(call.arguments, str)
                else json.dumps(call.arguments),
                fragment_chars=self.argument_fragment_chars,
            )
            for i, call in enumerate(action.invocations)
        )
        pieces = split_tokens(action.text)
        return _Answer(number, body["model"], pieces, calls, "tool_calls", _prompt_tokens(body))


_INVALID_KEY = (
    "Incorrect API key provided. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)


def _matches(rule: Action, body: dict[str, Any]) -> bool:
    messages: list[dict[str, Any]] = body["messages"]
    last = messages[-1]
    after_tool = _tool_name_of_result(messages) if last.get("role") == "tool" else None
    if rule.when_after_tool is not None and rule.when_after_tool != after_tool:
        return False
    if isinstance(rule, CallTool) and after_tool is not None and rule.when_after_tool is None:
        return False
    if rule.when_model is not None and body.get("model") != rule.when_model:
        return False
    if rule.when_last_user_contains is not None:
        users = [m for m in messages if m.get("role") == "user"]
        said = _text_of(users[-1].get("content")) if users else ""
        if rule.when_last_user_contains.lower() not in said.lower():
            return False
    return rule.when is None or rule.when(body)


def _tool_name_of_result(messages: list[dict[str, Any]]) -> str | None:
    call_id = messages[-1].get("tool_call_id")
    for message in reversed(messages):
        for call in message.get("tool_calls") or ():
            if call.get("id") == call_id:
                name: str = call["function"]["name"]
                return name
    return None


def _trailing_tool_results(body: dict[str, Any]) -> str:
    results: list[str] = []
    for message in reversed(body["messages"]):
        if message.get("role") != "tool":
            break
        results.insert(0, _text_of(message.get("content")))
    return " ".join(results)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    # Same rough rule the platform's context budget uses: ~4 characters per token plus
    # a few tokens of framing per message. The emulator only needs plausible numbers.
    total = 3
    for message in body["messages"]:
        total += 4 + len(_text_of(message.get("content"))) // 4
        for call in message.get("tool_calls") or ():
            total += 8 + len(json.dumps(call)) // 4
    return total


def _model_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "emulator"}


# ------------------------------------------------------------------ tokens

# GPT-2-style pre-tokenization: a word with its leading space, short digit runs,
# punctuation runs, whitespace. Close enough to real token boundaries for streaming tests.
_TOKEN = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|\s+(?!\S)|\s+|.", re.DOTALL)


def split_tokens(text: str) -> list[str]:
    """Token-sized pieces of ``text`` (long words split in ~6-character parts)."""
    pieces: list[str] = []
    for match in _TOKEN.finditer(text):
        piece = match.group(0)
        while len(piece) > 8:
            pieces.append(piece[:6])
            piece = piece[6:]
        pieces.append(piece)
    return pieces


# ------------------------------------------------------------------ answers


@dataclass(frozen=True)
class _RenderedCall:
    id: str
    name: str
    arguments: str
    fragment_chars: int

    def fragments(self) -> list[str]:
        step = self.fragment_chars
        return [self.arguments[i : i + step] for i in range(0, len(self.arguments), step)]


@dataclass(frozen=True)
class _Answer:
    number: int
    model: str
    pieces: list[str]
    calls: tuple[_RenderedCall, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def id(self) -> str:
        return f"chatcmpl-emu{self.number:08d}"

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces) + sum(len(c.fragments()) + 4 for c in self.calls)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.pieces) or (None if self.calls else ""),
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.calls
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_emulator",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }

    def chunk_meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_emulator",
        }

    def chunk_prefix(self, include_usage: bool) -> str:
        """JSON text of a chunk up to its delta: built once, the per-token cost is one dumps."""
        head = json.dumps(self.chunk_meta())[:-1]
        usage = ',"usage":null' if include_usage else ""
        return head + usage + ',"choices":[{"index":0,"delta":'


async def _stream_answer(
    conn: _Connection,
    record: RecordedRequest,
    answer: _Answer,
    action: Reply | CallTool,
    first_at: float,
    interval: float,
    include_usage: bool,
) -> None:
    loop = asyncio.get_running_loop()
    prefix = answer.chunk_prefix(include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        tail = f',"logprobs":null,"finish_reason":{json.dumps(finish)}}}]}}'
        return f"{prefix}{json.dumps(delta)}{tail}"

    # Real endpoints send headers once the request is accepted and the tokens later,
    # so a client's first-token timeout has to cover the body, not just the headers.
    conn.start_stream(record)
    deltas: list[dict[str, Any]] = [{"content": p} for p in answer.pieces]
    for index, call in enumerate(answer.calls):
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
            for fragment in call.fragments()
        )
    due = first_at
    await asyncio.sleep(max(0.0, due - loop.time()))
    role: dict[str, Any] = {"role": "assistant", "content": "" if answer.pieces else None}
    role["refusal"] = None
    await conn.send_event(chunk(role))
    for sent, delta in enumerate(deltas):
        if action.drop_after_chunks is not None and sent >= action.drop_after_chunks:
            conn.abort()
            record.finish("dropped")
            return
        if sent:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
        await conn.send_event(chunk(delta))
        record.chunks_sent += 1
        if record.first_chunk_at is None:
            record.first_chunk_at = loop.time()
    await conn.send_event(chunk({}, answer.finish_reason))
    if include_usage:
        usage = {**answer.chunk_meta(), "choices": [], "usage": answer.usage()}
        await conn.send_event(json.dumps(usage))
    await conn.send_event("[DONE]")
    await conn.end_stream()


async def _send_error(
    conn: _Connection,
    record: RecordedRequest,
    status: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    error = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    await conn.send_json(record, status, error, headers)
    record.finish("rejected")


# ------------------------------------------------------------------ validation

_KNOWN_PARAMS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "tools", "tool_choice",
        "parallel_tool_calls", "temperature", "top_p", "max_tokens", "max_completion_tokens",
        "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_logprobs", "response_format", "seed", "user", "metadata", "store",
        "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
        "verbosity", "safety_identifier", "prompt_cache_key", "web_search_options",
    }
)  # fmt: skip
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def validate_chat_request(body: dict[str, Any]) -> None:
    """Raise ``_InvalidRequest`` where the real API would answer 400."""
    for key in body:
        if key not in _KNOWN_PARAMS:
            raise _InvalidRequest(f"Unrecognized request argument supplied: {key}", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _InvalidRequest("you must provide a model parameter", "model")
    _validate_messages(body.get("messages"))
    tools = body.get("tools")
    if tools is not None:
        _validate_tools(tools)
    for key in ("tool_choice", "parallel_tool_calls"):
        if key in body and tools is None:
            raise _InvalidRequest(
                f"Invalid value for '{key}': '{key}' is only allowed when 'tools' are specified.",
                key,
            )
    if "stream_options" in body and body["stream_options"] is not None and not body.get("stream"):
        raise _InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise _InvalidRequest("temperature must be a number between 0 and 2", "temperature")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise _InvalidRequest(f"Invalid '{key}': integer below minimum value 1.", key)
    if body.get("n", 1) not in (1, None):
        raise _InvalidRequest("emulator: only n=1 is supported", "n")
    _validate_response_format(body)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _InvalidRequest("[] is too short - 'messages'", "messages")
    pending: set[str] = set()  # tool_call ids still waiting for a tool message
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _InvalidRequest(f"Invalid value for '{where}.role'.", f"{where}.role")
        role = message["role"]
        if role != "tool" and pending:
            raise _InvalidRequest(
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(sorted(pending))}",
                "messages",
            )
        content = message.get("content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _InvalidRequest(
                    f"Missing required parameter: '{where}.tool_call_id'.", f"{where}.tool_call_id"
                )
            if call_id not in pending:
                raise _InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"{where}.role",
                )
            pending.discard(call_id)
            _check_content(content, where)
        elif role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None:
                pending = _validate_tool_calls(calls, where)
            if content is None and not calls:
                raise _InvalidRequest(
                    f"Invalid value for '{where}.content': expected a string, got null.",
                    f"{where}.content",
                )
            if content is not None:
                _check_content(content, where)
        else:
            _check_content(content, where)
    if pending:
        raise _InvalidRequest(
            "An assistant message with 'tool_calls' must be followed by tool messages "
            f"responding to each 'tool_call_id'. Missing: {', '.join(sorted(pending))}",
            "messages",
        )


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return
    raise _InvalidRequest(
        f"Invalid value for '{where}.content': expected a string or an array of text parts.",
        f"{where}.content",
    )


def _validate_tool_calls(calls: Any, where: str) -> set[str]:
    if not isinstance(calls, list) or not calls:
        raise _InvalidRequest(f"[] is too short - '{where}.tool_calls'", f"{where}.tool_calls")
    ids: set[str] = set()
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise _InvalidRequest(f"Invalid value for '{at}'.", at)
        if not isinstance(function.get("arguments"), str):
            raise _InvalidRequest(
                f"Invalid type for '{at}.function.arguments': expected a string.",
                f"{at}.function.arguments",
            )
        ids.add(call["id"])
    return ids


def _validate_tools(tools: Any) -> None:
    if not isinstance(tools, list) or not tools:
        raise _InvalidRequest("[] is too short - 'tools'", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise _InvalidRequest(f"Invalid value for '{at}'.", at)
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _InvalidRequest(
                f"Invalid '{at}.function.name': string does not match pattern "
                "'^[a-zA-Z0-9_-]{1,64}$'.",
                f"{at}.function.name",
            )
        if name in names:
            raise _InvalidRequest(f"Duplicate tool name: '{name}'.", "tools")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise _InvalidRequest(f"Invalid '{at}.function.description'.", at)
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type") != "object"
        ):
            raise _InvalidRequest(
                f"Invalid schema for function '{name}': schema must be a JSON Schema of "
                "'type: \"object\"'.",
                f"{at}.function.parameters",
            )


def _validate_response_format(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _InvalidRequest("Invalid value for 'response_format.type'.", "response_format.type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or not isinstance(spec.get("schema", {}), dict)
        ):
            raise _InvalidRequest(
                "Missing required parameter: 'response_format.json_schema'.",
                "response_format.json_schema",
            )
    if kind == "json_object":
        said = " ".join(_text_of(m.get("content")) for m in body["messages"])
        if "json" not in said.lower():
            raise _InvalidRequest(
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
                "messages",
            )


# ------------------------------------------------------------------ HTTP/1.1


@dataclass(frozen=True)
class _HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
_MAX_HEAD = 64 * 1024


class _Connection(asyncio.Protocol):
    """One client connection: parses keep-alive requests and answers them in order."""

    def __init__(self, emulator: OpenAIEmulator) -> None:
        self._emulator = emulator
        self._buffer = bytearray()
        self._more = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self.lost = False
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = cast(asyncio.Transport, transport)
        self._emulator._connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._more.set()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._more.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._eof = True
        self._more.set()
        self._writable.set()
        self._emulator._connections.discard(self)
        # The response in progress (possibly stalling before its first token) learns
        # about the disconnect now, not at its next write.
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # request loop
    async def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while True:
                request = await self._next_request()
                if request is None:
                    break
                await self._emulator.handle(request, self)
                if request.headers.get("connection", "").lower() == "close":
                    break
        if self._transport is not None and not self.lost:
            self._transport.close()

    async def _next_request(self) -> _HttpRequest | None:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if self._eof or len(self._buffer) > _MAX_HEAD:
                return None
            await self._wait_data()
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._read_exactly(int(headers.get("content-length", "0") or 0))
        return _HttpRequest(method, target.split("?", 1)[0], headers, body)

    async def _wait_data(self) -> None:
        self._more.clear()
        await self._more.wait()

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if self._eof:
                raise ConnectionError("body cut short")
            await self._wait_data()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if self._eof:
                raise ConnectionError("body cut short")
            await self._wait_data()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while size := int((await self._read_line()).split(b";")[0], 16):
            body += await self._read_exactly(size)
            await self._read_line()
        while await self._read_line():  # trailers
            pass
        return bytes(body)

    # responses
    async def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("connection closed")
        self._transport.write(data)
        if not self._writable.is_set():
            await self._writable.wait()

    async def send_json(
        self,
        record: RecordedRequest,
        status: int,
        payload: Any,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        record.status = status
        fields = {"content-type": "application/json", "content-length": str(len(body))}
        head = self._head(status, {**fields, **(headers or {})})
        await self._write(head + body)

    def start_stream(self, record: RecordedRequest) -> None:
        record.status = 200
        head = self._head(
            200,
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "transfer-encoding": "chunked",
            },
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(head)

    async def send_event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        await self._write(b"%x\r\n%s\r\n" % (len(payload), payload))

    async def end_stream(self) -> None:
        await self._write(b"0\r\n\r\n")

    def _head(self, status: int, headers: Mapping[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"x-request-id: req_emu{len(self._emulator.requests):06d}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
