"""SQLModel tables. Every tenant-owned row carries ``organization_id``.

Schema changes go through an Alembic migration in ``migrations/versions``; a test
compares these models with the migrated schema so the two cannot drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from builder_engine.ids import new_id
from builder_engine.timeutil import utcnow

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default_factory=utcnow if not nullable else None,
        sa_type=sa.DateTime(timezone=True),
        nullable=nullable,
        index=index,
    )


def _optional_ts() -> Any:
    return Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=True)


def _org_fk() -> Any:
    return Field(foreign_key="organization.id", index=True, max_length=40)


class Organization(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("organization"), primary_key=True, max_length=40)
    name: str = Field(max_length=200, sa_column_kwargs={"unique": True})
    # Private, loopback or link-local hosts/networks its tools and webhooks may call
    # (everything else private is refused: SSRF). Entries: "10.0.0.5", "10.1.0.0/16", "host".
    outbound_allowlist: list[str] = Field(default_factory=list, sa_type=JSONType)
    created_at: datetime = _ts()


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(default_factory=lambda: new_id("api_key"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    name: str = Field(default="default", max_length=200)
    # Only a SHA-256 of the key is kept; the prefix lets people tell keys apart.
    key_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    prefix: str = Field(max_length=16)
    created_at: datetime = _ts()
    last_used_at: datetime | None = _optional_ts()
    revoked_at: datetime | None = _optional_ts()


class Agent(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("agent"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    name: str = Field(max_length=200, index=True)
    latest_version: int = Field(default=1)
    published_version: int | None = Field(default=None)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    deleted_at: datetime | None = _optional_ts()


class AgentVersion(SQLModel, table=True):
    """An immutable snapshot of an agent's configuration."""

    __tablename__ = "agent_version"
    __table_args__ = (sa.UniqueConstraint("agent_id", "version", name="uq_agent_version"),)

    id: str = Field(
        default_factory=lambda: new_id("agent_version"), primary_key=True, max_length=40
    )
    organization_id: str = _org_fk()
    agent_id: str = Field(foreign_key="agent.id", index=True, max_length=40)
    version: int
    config: dict[str, Any] = Field(sa_type=JSONType)
    created_at: datetime = _ts()


class PhoneNumber(SQLModel, table=True):
    __tablename__ = "phone_number"

    id: str = Field(default_factory=lambda: new_id("phone_number"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    # A number routes to exactly one organization, so it is unique platform-wide.
    number: str = Field(max_length=16, sa_column_kwargs={"unique": True})
    carrier: str = Field(max_length=20)
    agent_id: str | None = Field(default=None, foreign_key="agent.id", index=True, max_length=40)
    label: str | None = Field(default=None, max_length=200)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Call(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("call"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    agent_id: str = Field(foreign_key="agent.id", index=True, max_length=40)
    agent_version: int
    # A number removed later must not erase or block the history of its calls.
    phone_number_id: str | None = Field(
        default=None,
        foreign_key="phone_number.id",
        ondelete="SET NULL",
        index=True,
        max_length=40,
    )
    direction: str = Field(max_length=10)
    status: str = Field(default="queued", max_length=20, index=True)
    transport: str = Field(default="twilio", max_length=20)
    from_number: str | None = Field(default=None, max_length=32)
    to_number: str | None = Field(default=None, max_length=32)
    # Unique: a carrier retrying its webhook for the same call must find that call.
    carrier_call_id: str | None = Field(default=None, max_length=64, index=True, unique=True)
    campaign_id: str | None = Field(default=None, max_length=40, index=True)
    ended_reason: str | None = Field(default=None, max_length=40)
    created_at: datetime = _ts(index=True)
    started_at: datetime | None = _optional_ts()
    answered_at: datetime | None = _optional_ts()
    ended_at: datetime | None = _optional_ts()
    call_metadata: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    recording_url: str | None = Field(default=None, max_length=2048)
    # Post-call analysis: summary, structured_data, success_evaluation, or skipped + why.
    analysis: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)


class CallTurn(SQLModel, table=True):
    __tablename__ = "call_turn"
    __table_args__ = (sa.UniqueConstraint("call_id", "index", name="uq_call_turn_index"),)

    id: str = Field(default_factory=lambda: new_id("call_turn"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    call_id: str = Field(foreign_key="call.id", index=True, max_length=40)
    index: int
    speaker: str = Field(max_length=10)
    text: str
    interrupted: bool = Field(default=False)
    started_at: datetime | None = _optional_ts()
    ended_at: datetime | None = _optional_ts()
    latency: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)


class ToolDefinition(SQLModel, table=True):
    __tablename__ = "tool_definition"
    __table_args__ = (
        sa.UniqueConstraint("organization_id", "name", name="uq_tool_definition_org_name"),
    )

    id: str = Field(default_factory=lambda: new_id("tool"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    name: str = Field(max_length=64)
    description: str = Field(default="")
    kind: str = Field(max_length=32)
    parameters: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    config: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    timeout_s: float = Field(default=10.0)
    safe_to_retry: bool = Field(default=False)
    filler_message: str | None = Field(default=None)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    deleted_at: datetime | None = _optional_ts()


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"

    id: str = Field(
        default_factory=lambda: new_id("webhook_endpoint"), primary_key=True, max_length=40
    )
    organization_id: str = _org_fk()
    url: str = Field(max_length=2048)
    events: list[str] = Field(default_factory=list, sa_type=JSONType)
    # The signing secret must be readable to sign deliveries, so it is stored as is.
    secret: str = Field(max_length=128)
    active: bool = Field(default=True)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class CallEvent(SQLModel, table=True):
    """Something that happened on a call besides speech: a tool call, a transfer, a
    webhook delivery. Read through `GET /v1/calls/{id}/events`."""

    __tablename__ = "call_event"

    id: str = Field(default_factory=lambda: new_id("call_event"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    call_id: str = Field(foreign_key="call.id", index=True, max_length=40)
    kind: str = Field(max_length=40)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: datetime = _ts(index=True)


class ToolExecution(SQLModel, table=True):
    """One tool call of one call, recorded so a retried activity returns the first result."""

    __tablename__ = "tool_execution"
    __table_args__ = (
        sa.UniqueConstraint("call_id", "tool_call_id", name="uq_tool_execution_call_tool_call"),
    )

    id: str = Field(
        default_factory=lambda: new_id("tool_execution"), primary_key=True, max_length=40
    )
    organization_id: str = _org_fk()
    call_id: str = Field(foreign_key="call.id", index=True, max_length=40)
    tool_call_id: str = Field(max_length=100)
    tool_name: str = Field(max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(default="running", max_length=20)
    result: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    created_at: datetime = _ts()
    completed_at: datetime | None = _optional_ts()


class Calendar(SQLModel, table=True):
    """Bookable time for the `book_appointment` / `check_availability` tools."""

    id: str = Field(default_factory=lambda: new_id("calendar"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    name: str = Field(max_length=200)
    timezone: str = Field(default="UTC", max_length=64)
    slot_minutes: int = Field(default=30)
    # Weekly opening hours: {"mon": [["09:00", "17:00"]], ...} in the calendar's timezone.
    availability: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Appointment(SQLModel, table=True):
    __table_args__ = (
        # One booking per slot: the database, not the application, prevents double booking.
        sa.UniqueConstraint("calendar_id", "starts_at", name="uq_appointment_slot"),
        sa.UniqueConstraint("idempotency_key", name="uq_appointment_idempotency_key"),
    )

    id: str = Field(default_factory=lambda: new_id("appointment"), primary_key=True, max_length=40)
    organization_id: str = _org_fk()
    calendar_id: str = Field(foreign_key="calendar.id", index=True, max_length=40)
    starts_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    ends_at: datetime = Field(sa_type=sa.DateTime(timezone=True))
    call_id: str | None = Field(default=None, foreign_key="call.id", max_length=40)
    idempotency_key: str | None = Field(default=None, max_length=200)
    attendee_name: str | None = Field(default=None, max_length=200)
    attendee_phone: str | None = Field(default=None, max_length=32)
    notes: str | None = Field(default=None)
    status: str = Field(default="booked", max_length=20)
    created_at: datetime = _ts()


class WebhookDelivery(SQLModel, table=True):
    """One event sent to one endpoint, with every attempt."""

    __tablename__ = "webhook_delivery"

    id: str = Field(
        default_factory=lambda: new_id("webhook_delivery"), primary_key=True, max_length=40
    )
    organization_id: str = _org_fk()
    endpoint_id: str = Field(foreign_key="webhook_endpoint.id", index=True, max_length=40)
    event_id: str = Field(max_length=40, index=True)
    event_type: str = Field(max_length=40)
    call_id: str | None = Field(default=None, max_length=40, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(default="pending", max_length=20)  # pending | delivered | failed
    attempts: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)
    next_attempt_at: datetime | None = _optional_ts()
    created_at: datetime = _ts(index=True)
    delivered_at: datetime | None = _optional_ts()
