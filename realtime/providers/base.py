"""The interfaces every provider adapter implements.

A call session only ever talks to these. Adding a provider is one module that
implements one of them plus one line in ``realtime/providers/registry.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

AudioEncoding = Literal["mulaw", "pcm16"]


@dataclass(frozen=True)
class AudioFormat:
    encoding: AudioEncoding
    sample_rate: int
    channels: int = 1

    @property
    def bytes_per_second(self) -> int:
        per_sample = 1 if self.encoding == "mulaw" else 2
        return self.sample_rate * per_sample * self.channels


MULAW_8K = AudioFormat("mulaw", 8000)
PCM16_16K = AudioFormat("pcm16", 16000)


class ProviderError(Exception):
    """A provider failed (connection, protocol, quota). The session apologizes or falls back."""

    def __init__(self, provider: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.retryable = retryable


# ---------------------------------------------------------------- ASR


@dataclass(frozen=True)
class TranscriptEvent:
    """A transcription result. ``is_final``: this text will not change. ``speech_final``:
    the recognizer also thinks the speaker finished (endpoint)."""

    text: str
    is_final: bool
    speech_final: bool = False
    confidence: float | None = None
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class SpeechStartedEvent:
    at_s: float | None = None


@dataclass(frozen=True)
class UtteranceEndEvent:
    last_word_end_s: float | None = None


AsrEvent = TranscriptEvent | SpeechStartedEvent | UtteranceEndEvent


class AsrStream(Protocol):
    """One call's streaming recognition session."""

    async def send_audio(self, audio: bytes, *, voiced: bool = True) -> None:
        """Audio in the provider's ``input_format``; returns quickly (never waits on results).

        ``voiced``: whether the caller may be speaking in it (the session's VAD and frame
        energy). A provider may hold unvoiced audio a little longer before sending it, in
        fewer and larger messages; voiced audio goes out at the usual pace."""

    def events(self) -> AsyncIterator[AsrEvent]:
        """Results as they come; ends when the stream is closed."""

    async def finalize(self) -> None:
        """Ask for a final result of what was sent so far (end of the caller's turn)."""

    async def close(self) -> None: ...


class AsrProvider(Protocol):
    name: str
    input_format: AudioFormat

    async def open_stream(self, *, language: str, keywords: Sequence[str] = ()) -> AsrStream: ...


# ---------------------------------------------------------------- LLM


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model produced it


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallsRequested:
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class LlmFinished:
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


LlmEvent = TextDelta | ToolCallsRequested | LlmFinished


class LlmProvider(Protocol):
    name: str

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        temperature: float = 0.7,
        max_tokens: int | None = None,
    ) -> AsyncIterator[LlmEvent]:
        """Stream one completion. Text arrives as ``TextDelta``; complete tool calls (arguments
        fully assembled) as one ``ToolCallsRequested``; ``LlmFinished`` comes last.
        Raises ``ProviderError``. Cancelling the iteration stops the request."""


# ---------------------------------------------------------------- TTS


class TtsProvider(Protocol):
    name: str
    output_format: AudioFormat

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Audio for ``text`` in ``output_format``, streamed as it is produced.
        Raises ``ProviderError``. Cancelling the iteration stops synthesis."""
