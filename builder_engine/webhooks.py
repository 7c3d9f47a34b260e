"""Webhook events: the typed body every delivery carries, and its signature.

A delivery is ``POST <endpoint url>`` with the JSON body below and these headers:

- ``Builder-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``
- ``Builder-Event-Id``: the event's id (the same for every endpoint and every retry:
  receivers deduplicate on it), ``Builder-Event-Type``, ``Builder-Delivery-Id``.

docs/webhooks.md documents the payloads and the verification recipe (``verify_signature``
here is that recipe).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from builder_engine.agent_config import WEBHOOK_EVENTS, WebhookEvent
from builder_engine.db.models import Call, CallTurn
from builder_engine.timeutil import as_utc

__all__ = [
    "SIGNATURE_HEADER",
    "WEBHOOK_EVENTS",
    "EventBody",
    "EventCall",
    "EventData",
    "EventTurn",
    "WebhookEvent",
    "encode_body",
    "new_secret",
    "sign",
    "signature_header",
    "verify_signature",
]

SIGNATURE_HEADER = "Builder-Signature"
EVENT_ID_HEADER = "Builder-Event-Id"
EVENT_TYPE_HEADER = "Builder-Event-Type"
DELIVERY_ID_HEADER = "Builder-Delivery-Id"
#: Signatures older (or newer) than this are refused by ``verify_signature``.
DEFAULT_TOLERANCE_S = 300
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    """A signing secret: shown once, used as the HMAC key as is (its UTF-8 bytes)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def encode_body(body: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, UTF-8."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and its timestamp is recent.

    Several ``v1=`` values may be present; any one matching is enough."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# ------------------------------------------------------------------ payload


class EventTurn(BaseModel):
    index: int
    speaker: Literal["caller", "agent"]
    text: str = Field(description="What was said; an interrupted agent turn keeps what played.")
    interrupted: bool
    started_at: datetime | None
    ended_at: datetime | None
    tool_calls: list[dict[str, Any]] = Field(
        default_factory=list, description="Tool calls made during the turn, with their results."
    )


class EventCall(BaseModel):
    id: str
    agent_id: str
    agent_version: int
    direction: str = Field(description="inbound, outbound or web.")
    transport: str
    status: str
    ended_reason: str | None = Field(description="One of the documented ended reasons.")
    from_number: str | None
    to_number: str | None
    phone_number_id: str | None
    campaign_id: str | None
    variables: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None
    answered_at: datetime | None
    ended_at: datetime | None
    duration_s: float | None = Field(description="From answer (or start) to end.")
    recording_url: str | None = Field(
        description="GET it with an API key (streams the WAV; range requests work)."
    )


class EventData(BaseModel):
    call: EventCall
    transcript: list[EventTurn] | None = Field(
        default=None, description="call.ended: every turn as the caller heard it."
    )
    analysis: dict[str, Any] | None = Field(
        default=None,
        description="call.analyzed: summary, structured_data, success_evaluation "
        '(or {"status": "skipped", "reason": ...}).',
    )
    detail: dict[str, Any] = Field(
        default_factory=dict,
        description="Event-specific facts: the tool call of tool.called, the destination "
        "of call.transferred.",
    )


class EventBody(BaseModel):
    """The JSON body of every webhook delivery."""

    id: str = Field(description="Event id; also in the Builder-Event-Id header.")
    object: Literal["event"] = "event"
    type: WebhookEvent
    created_at: datetime = Field(description="When it happened (UTC).")
    organization_id: str
    data: EventData


def event_call(call: Call, public_url: str | None) -> EventCall:
    begun = call.answered_at or call.started_at
    duration = None
    if begun is not None and call.ended_at is not None:
        duration = round((as_utc(call.ended_at) - as_utc(begun)).total_seconds(), 3)
    recording = None
    if call.recording_url:
        recording = f"{(public_url or '').rstrip('/')}/v1/calls/{call.id}/recording"
    variables = call.call_metadata.get("variables") if call.call_metadata else None

    def utc(value: datetime | None) -> datetime | None:
        return as_utc(value) if value is not None else None

    return EventCall(
        id=call.id,
        agent_id=call.agent_id,
        agent_version=call.agent_version,
        direction=call.direction,
        transport=call.transport,
        status=call.status,
        ended_reason=call.ended_reason,
        from_number=call.from_number,
        to_number=call.to_number,
        phone_number_id=call.phone_number_id,
        campaign_id=call.campaign_id,
        variables=dict(variables) if isinstance(variables, dict) else {},
        created_at=as_utc(call.created_at),
        started_at=utc(call.started_at),
        answered_at=utc(call.answered_at),
        ended_at=utc(call.ended_at),
        duration_s=duration,
        recording_url=recording,
    )


def event_turn(turn: CallTurn) -> EventTurn:
    return EventTurn(
        index=turn.index,
        speaker="agent" if turn.speaker == "agent" else "caller",
        text=turn.text,
        interrupted=turn.interrupted,
        started_at=as_utc(turn.started_at) if turn.started_at else None,
        ended_at=as_utc(turn.ended_at) if turn.ended_at else None,
        tool_calls=list(turn.tool_calls),
    )
