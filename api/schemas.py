"""Response bodies shared by the routers. Request bodies are the domain models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, PlainSerializer, field_validator

from builder_engine.agent_config import AgentConfig
from builder_engine.timeutil import as_utc

UtcDatetime = Annotated[datetime, PlainSerializer(lambda v: as_utc(v).isoformat(), return_type=str)]
E164 = Annotated[
    str,
    Field(pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164 number, e.g. +14155550100."),
]
Carrier = Literal["twilio", "telnyx"]


class AgentOut(AgentConfig):
    """An agent: its latest configuration plus its identity and versions."""

    model_config = ConfigDict(extra="ignore")

    id: str
    object: Literal["agent"] = "agent"
    version: int = Field(description="The latest version number.")
    published_version: int | None = Field(description="The version new calls run with.")
    created_at: UtcDatetime
    updated_at: UtcDatetime


class AgentVersionOut(BaseModel):
    object: Literal["agent_version"] = "agent_version"
    agent_id: str
    version: int
    published: bool
    created_at: UtcDatetime
    config: AgentConfig


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        default=None, ge=1, description="Version to publish; the latest when omitted."
    )


class PhoneNumberCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: E164
    carrier: Carrier = "twilio"
    agent_id: str | None = Field(default=None, max_length=40)
    label: str | None = Field(default=None, max_length=200)


class PhoneNumberUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: Carrier | None = None
    agent_id: str | None = Field(default=None, max_length=40)
    label: str | None = Field(default=None, max_length=200)


class PhoneNumberOut(BaseModel):
    object: Literal["phone_number"] = "phone_number"
    id: str
    number: str
    carrier: str
    agent_id: str | None
    label: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


ToolKind = Literal[
    "end_call",
    "transfer_call",
    "hold",
    "send_dtmf",
    "book_appointment",
    "check_availability",
    "webhook",
]


class ToolBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=2_000)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of the arguments the model must pass.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Kind-specific settings, e.g. a transfer's destination."
    )
    url: HttpUrl | None = Field(default=None, description="Endpoint of a `webhook` tool.")
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    safe_to_retry: bool = False
    filler_message: str | None = Field(
        default=None, max_length=500, description="Spoken while a slow tool runs."
    )

    @field_validator("parameters")
    @classmethod
    def _valid_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        from builder_engine.agent_config import check_json_schema

        check_json_schema(value)
        return value


class ToolCreate(ToolBase):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Function name the model sees.")
    kind: ToolKind


class ToolUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=2_000)
    parameters: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    url: HttpUrl | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    safe_to_retry: bool | None = None
    filler_message: str | None = Field(default=None, max_length=500)


class ToolOut(BaseModel):
    object: Literal["tool"] = "tool"
    id: str
    name: str
    kind: str
    description: str
    parameters: dict[str, Any]
    config: dict[str, Any]
    url: str | None
    timeout_s: float
    safe_to_retry: bool
    filler_message: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="default", min_length=1, max_length=200)


class ApiKeyOut(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    prefix: str = Field(description="First characters of the key, to tell keys apart.")
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None
    revoked_at: UtcDatetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself. Shown once: store it now.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = Field(default_factory=dict)
