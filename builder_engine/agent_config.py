"""An agent's configuration: what one immutable agent version holds.

These models are the API's request bodies and what the realtime worker runs a call
with. Unknown fields are rejected so a typo is a 422 naming the field, not a silently
ignored setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator

ASR_PROVIDERS = ("deepgram", "whisper-local")
LLM_PROVIDERS = ("openai",)
TTS_PROVIDERS = ("elevenlabs", "piper-local")

AsrProvider = Literal["deepgram", "whisper-local"]
LlmProvider = Literal["openai"]
TtsProvider = Literal["elevenlabs", "piper-local"]
WebhookEvent = Literal[
    "call.started", "call.ended", "call.analyzed", "call.transferred", "tool.called"
]

WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)


def _all_webhook_events() -> list[WebhookEvent]:
    return list(WEBHOOK_EVENTS)


_TEMPLATE_TAG = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VariableValue = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def template_variables(template: str) -> list[str]:
    """Names used as ``{{name}}`` in a template; raises ValueError on a malformed tag."""
    names = []
    for match in _TEMPLATE_TAG.finditer(template):
        name = match.group(1)
        if not _IDENTIFIER.match(name):
            raise ValueError(f"'{{{{{name}}}}}' is not a valid variable name")
        names.append(name)
    leftover = _TEMPLATE_TAG.sub("", template)
    if "{{" in leftover or "}}" in leftover:
        raise ValueError("unbalanced '{{' or '}}' in template")
    return names


def render_template(template: str, variables: dict[str, VariableValue]) -> str:
    """Fill ``{{name}}`` tags; unknown names stay as written so a prompt never loses text."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(variables[name]) if name in variables else match.group(0)

    return _TEMPLATE_TAG.sub(fill, template)


class LlmEndpoint(_Strict):
    provider: LlmProvider = "openai"
    model: str = Field(default="gpt-4o-mini", min_length=1, max_length=200)
    base_url: HttpUrl | None = Field(
        default=None, description="Any OpenAI-compatible endpoint (Groq, vLLM, Ollama, ...)."
    )


class BrainConfig(LlmEndpoint):
    kind: Literal["llm"] = "llm"
    system_prompt: str = Field(
        default="You are a helpful voice assistant. Keep answers short and spoken.",
        max_length=100_000,
        description="Template: `{{variable}}` is filled from the agent's and the call's variables.",
    )
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    first_token_timeout_ms: int = Field(default=2_000, ge=100, le=30_000)
    fallback: LlmEndpoint | None = Field(
        default=None, description="Used when the primary fails or misses its first-token timeout."
    )

    @field_validator("system_prompt")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        template_variables(value)
        return value


class AsrConfig(_Strict):
    provider: AsrProvider = "deepgram"
    model: str | None = Field(default=None, max_length=200)
    base_url: HttpUrl | None = None
    keywords: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=100
    )


class TtsConfig(_Strict):
    provider: TtsProvider = "elevenlabs"
    voice: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    base_url: HttpUrl | None = None
    speed: float = Field(default=1.0, ge=0.5, le=2.0)


class TurnConfig(_Strict):
    endpointing_ms: int = Field(
        default=300,
        ge=50,
        le=5_000,
        description="Silence after speech that ends the caller's turn.",
    )
    digit_patience_ms: int = Field(
        default=1_000,
        ge=0,
        le=10_000,
        description="Silence to wait instead when the caller stopped mid-number.",
    )
    interrupt_min_ms: int = Field(
        default=300, ge=0, le=5_000, description="Caller speech needed to interrupt the agent."
    )
    interrupt_min_words: int = Field(
        default=1, ge=0, le=20, description="Words needed to interrupt; 0 = duration alone."
    )
    backchannel_phrases: list[Annotated[str, Field(max_length=50)]] = Field(
        default_factory=lambda: ["mm-hm", "uh-huh", "ok", "okay", "yeah", "right", "sure"],
        max_length=100,
        description="Short acknowledgements that never interrupt the agent.",
    )


class AnalysisPlan(_Strict):
    summary: bool = True
    structured_data_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema the extracted data must validate against."
    )
    success_criteria: str | None = Field(default=None, max_length=10_000)

    @field_validator("structured_data_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


def check_json_schema(schema: dict[str, Any]) -> None:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
    if schema.get("type") != "object":
        raise ValueError('the schema\'s top level must be {"type": "object", ...}')


class AgentConfig(_Strict):
    name: str = Field(min_length=1, max_length=200)
    first_speaker: Literal["agent", "caller"] = "agent"
    first_message: str | None = Field(default=None, max_length=5_000)
    language: str = Field(default="en", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    brain: BrainConfig = Field(default_factory=BrainConfig)
    asr: AsrConfig = Field(default_factory=AsrConfig)
    tts: TtsConfig = Field(default_factory=TtsConfig)
    turn: TurnConfig = Field(default_factory=TurnConfig)
    silence_timeout_s: int = Field(default=20, ge=1, le=600)
    max_duration_s: int = Field(default=1_800, ge=10, le=14_400)
    end_call_phrases: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=50
    )
    tools: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list, max_length=64, description="Ids of the organization's tools."
    )
    analysis: AnalysisPlan = Field(default_factory=AnalysisPlan)
    webhook_url: HttpUrl | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=_all_webhook_events)
    variables: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], VariableValue] = (
        Field(default_factory=dict, max_length=200)
    )

    @field_validator("first_message")
    @classmethod
    def _first_message_for_agent(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("first_speaker") == "caller":
            raise ValueError("first_message is only spoken when first_speaker is 'agent'")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_tools(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("the same tool is listed twice")
        return value

    def system_prompt(self, call_variables: dict[str, VariableValue] | None = None) -> str:
        return render_template(
            self.brain.system_prompt, {**self.variables, **(call_variables or {})}
        )
