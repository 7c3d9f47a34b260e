"""Calls: their record, per-turn latencies, transcript, analysis, recording and events."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from api.call_start import create_call
from api.deps import Auth, Context, Session
from api.errors import COMMON_ERRORS, NOT_FOUND, ApiError, field_error, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.routers.agents import load_agent
from api.routers.webhooks import WebhookDeliveryOut, delivery_out
from api.schemas import UtcDatetime
from builder_engine import recordings
from builder_engine.agent_config import VariableValue
from builder_engine.apikeys import hash_key
from builder_engine.db.models import Call, CallEvent, CallTurn, WebhookDelivery
from builder_engine.timeutil import as_utc
from workflows.transfers import HangUpRequest, TransferRequest, TransferResult

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/calls", tags=["calls"], responses=COMMON_ERRORS)


class TurnOut(BaseModel):
    index: int
    speaker: Literal["caller", "agent"]
    text: str
    interrupted: bool
    started_at: UtcDatetime | None = Field(
        description="The caller began to speak (or pressed a key); the agent's first audio "
        "of the turn went out. Null for turns recorded before this was kept."
    )
    ended_at: UtcDatetime | None
    latency: dict[str, float] = Field(
        description="Milliseconds after the caller's speech ended: endpoint_ms, asr_final_ms, "
        "llm_first_token_ms, tts_first_byte_ms, first_audio_ms, voice_to_voice_ms."
    )


class CallOut(BaseModel):
    object: Literal["call"] = "call"
    id: str
    agent_id: str
    agent_version: int
    phone_number_id: str | None
    direction: str
    transport: str
    status: str
    ended_reason: str | None
    from_number: str | None
    to_number: str | None
    campaign_id: str | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    answered_at: UtcDatetime | None
    ended_at: UtcDatetime | None


class CallDetail(CallOut):
    turns: list[TurnOut]
    recording_url: str | None = Field(
        description="`GET` it (with your API key) to stream the WAV; null without one."
    )
    analysis: dict[str, Any] = Field(
        description="Post-call analysis: status, summary, structured_data, "
        'success_evaluation (or {"status": "skipped", "reason": ...}); {} until it ran.'
    )


async def _load(session: AsyncSession, organization_id: str, call_id: str) -> Call:
    call = (
        await session.exec(
            select(Call).where(Call.id == call_id, Call.organization_id == organization_id)
        )
    ).first()
    if call is None:
        raise not_found("Call", call_id)
    return call


async def _turns(session: AsyncSession, call: Call) -> list[TurnOut]:
    rows = (
        await session.exec(
            select(CallTurn)
            .where(CallTurn.call_id == call.id, CallTurn.organization_id == call.organization_id)
            .order_by(col(CallTurn.index))
        )
    ).all()
    return [TurnOut.model_validate(row, from_attributes=True) for row in rows]


@router.get("", response_model=Page[CallOut], summary="List calls")
async def list_calls(
    auth: Auth,
    session: Session,
    limit: Limit = 20,
    cursor: Cursor = None,
    agent_id: Annotated[str | None, Query(max_length=40)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    direction: Annotated[str | None, Query(max_length=10)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> Page[CallOut]:
    query = select(Call).where(
        Call.organization_id == auth.organization_id,
        after_cursor(col(Call.created_at), col(Call.id), cursor),
    )
    filters: dict[str, Any] = {"agent_id": agent_id, "status": status, "direction": direction}
    for name, value in filters.items():
        if value is not None:
            query = query.where(getattr(Call, name) == value)
    # SQLite stores wall-clock UTC and drops a bound value's offset, so a bound like
    # 10:00+02:00 would be compared as 10:00 UTC; naive input is taken as UTC.
    if created_after is not None:
        query = query.where(col(Call.created_at) >= as_utc(created_after))
    if created_before is not None:
        query = query.where(col(Call.created_at) < as_utc(created_before))
    query = query.order_by(col(Call.created_at).desc(), col(Call.id).desc()).limit(limit + 1)
    rows = (await session.exec(query)).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[CallOut](
        data=[CallOut.model_validate(r, from_attributes=True) for r in rows[:limit]],
        next_cursor=next_cursor,
    )


class WebCallCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(max_length=40)
    variables: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], VariableValue] = (
        Field(default_factory=dict, max_length=200)
    )


class WebCallCreated(BaseModel):
    call_id: str
    websocket_url: str = Field(description="Connect here and send the start message.")
    token: str = Field(description="Goes in the start message; valid for this call only.")


@router.post(
    "/web",
    status_code=201,
    response_model=WebCallCreated,
    responses={**NOT_FOUND, 503: {"description": "Temporal is unreachable; retry later."}},
    summary="Start a browser call (no phone number) to an agent's published version",
)
async def create_web_call(
    body: WebCallCreate, auth: Auth, session: Session, context: Context
) -> WebCallCreated:
    agent = await load_agent(session, auth.organization_id, body.agent_id)
    if agent.published_version is None:
        raise field_error("agent_id", "the agent has no published version")
    token = secrets.token_urlsafe(24)
    try:
        temporal = await context.temporal.client()
        call = await create_call(
            session,
            temporal,
            context.settings.temporal_task_queue,
            agent=agent,
            version=agent.published_version,
            direction="web",
            transport="web",
            metadata={"variables": body.variables, "join_token_hash": hash_key(token)},
        )
    except Exception as exc:
        # Temporal down is an outage the client can retry, not a bug of ours (500).
        log.exception("could not start a web call for agent %s", agent.id)
        raise ApiError(
            503, "Calls cannot be started right now; retry later.", kind="unavailable"
        ) from exc
    return WebCallCreated(
        call_id=call.id,
        websocket_url=f"{context.settings.effective_realtime_url}/media/web",
        token=token,
    )


@router.get("/{call_id}", response_model=CallDetail, responses=NOT_FOUND, summary="Get a call")
async def get_call(call_id: str, auth: Auth, session: Session) -> CallDetail:
    """The call record with every turn and its latencies."""
    call = await _load(session, auth.organization_id, call_id)
    base = CallOut.model_validate(call, from_attributes=True)
    return CallDetail(
        **base.model_dump(),
        turns=await _turns(session, call),
        recording_url=f"/v1/calls/{call.id}/recording" if call.recording_url else None,
        analysis=dict(call.analysis),
    )


@router.get(
    "/{call_id}/transcript",
    response_model=list[TurnOut],
    responses=NOT_FOUND,
    summary="A call's transcript: turns as the caller heard them",
)
async def get_transcript(call_id: str, auth: Auth, session: Session) -> list[TurnOut]:
    return await _turns(session, await _load(session, auth.organization_id, call_id))


# ------------------------------------------------------------------ recording


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range (inclusive ends) a ``Range`` header asks for, or None for the
    whole file. Headers this server ignores (other units, several ranges, bad syntax)
    also give None, as RFC 9110 allows; a range past the end raises."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - suffix, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(int(last) if last else size - 1, size - 1)


@router.get(
    "/{call_id}/recording",
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        200: {"content": {"audio/wav": {}}, "description": "The whole recording."},
        206: {"content": {"audio/wav": {}}, "description": "The requested byte range."},
        416: {"description": "The range starts past the end (see Content-Range)."},
    },
    summary="Stream a call's recording (WAV, stereo: caller left, agent right)",
)
async def get_recording(
    call_id: str, request: Request, auth: Auth, session: Session
) -> StreamingResponse:
    """Supports single byte ranges (`Range: bytes=0-1023`, `bytes=1024-`, `bytes=-4096`),
    so players can seek."""
    call = await _load(session, auth.organization_id, call_id)
    if not call.recording_url:
        raise ApiError(404, f"Call '{call_id}' has no recording", kind="not-found")
    try:
        stored = await recordings.stat(call.recording_url)
    except recordings.RecordingStorageError as exc:
        log.error("recording of %s unavailable: %s", call_id, exc)
        raise ApiError(
            503, "The recording storage cannot be reached; retry later.", kind="unavailable"
        ) from None
    if stored is None:
        raise ApiError(404, f"The recording of call '{call_id}' is gone", kind="not-found")
    size = stored.size
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'inline; filename="{call.id}.wav"',
    }
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        raise ApiError(
            416,
            f"The recording has {size} bytes.",
            kind="range-not-satisfiable",
            headers={**headers, "Content-Range": f"bytes */{size}"},
        ) from None
    status = 200
    start, end = 0, size - 1
    if wanted is not None:
        status = 206
        start, end = wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1 if size else 0)
    body = recordings.read_range(stored.location, start, end) if size else _empty()
    return StreamingResponse(body, status_code=status, headers=headers, media_type="audio/wav")


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""


# ------------------------------------------------------------------ events


class CallEventOut(BaseModel):
    object: Literal["call_event"] = "call_event"
    id: str
    type: str = Field(description="call.started, call.ended, call.analyzed, tool.called, ...")
    created_at: UtcDatetime
    detail: dict[str, Any] = Field(description="The event's own facts (a tool call, a transfer).")
    webhook_deliveries: list[WebhookDeliveryOut] = Field(
        description="Every delivery of this event, with its attempts."
    )


class CallEventList(BaseModel):
    data: list[CallEventOut]


@router.get(
    "/{call_id}/events",
    response_model=CallEventList,
    responses=NOT_FOUND,
    summary="A call's events (tool calls, transfers, lifecycle) and their webhook deliveries",
)
async def get_call_events(call_id: str, auth: Auth, session: Session) -> CallEventList:
    """Oldest first."""
    call = await _load(session, auth.organization_id, call_id)
    events = (
        await session.exec(
            select(CallEvent)
            .where(CallEvent.call_id == call.id, CallEvent.organization_id == call.organization_id)
            .order_by(col(CallEvent.created_at), col(CallEvent.id))
        )
    ).all()
    deliveries = (
        await session.exec(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.call_id == call.id,
                WebhookDelivery.organization_id == call.organization_id,
            )
            .order_by(col(WebhookDelivery.created_at), col(WebhookDelivery.id))
        )
    ).all()
    by_event: dict[str, list[WebhookDeliveryOut]] = {}
    for delivery in deliveries:
        by_event.setdefault(delivery.event_id, []).append(delivery_out(delivery))
    return CallEventList(
        data=[
            CallEventOut(
                id=event.id,
                type=event.kind,
                created_at=event.created_at,
                detail=dict(event.data),
                webhook_deliveries=by_event.get(event.id, []),
            )
            for event in events
        ]
    )


# ------------------------------------------------------------------ supervisor control


class TransferIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(pattern=r"^\+[1-9][0-9]{7,14}$", description="E.164 destination.")
    mode: Literal["cold", "warm"] = "cold"
    summary: str | None = Field(
        default=None, max_length=1000, description="Warm: said to the answering party first."
    )
    ring_timeout_s: int = Field(default=20, ge=5, le=120)


class ControlOut(BaseModel):
    call_id: str
    status: str = Field(
        description="transfer: transferred | no-answer | busy | failed | unsupported; "
        "hangup: hung-up | ended."
    )
    detail: str = ""


async def _live(session: AsyncSession, organization_id: str, call_id: str) -> Call:
    call = await _load(session, organization_id, call_id)
    if call.status == "ended":
        raise ApiError(409, f"Call {call_id} has already ended.", kind="conflict")
    return call


async def _control_update(context: Any, call: Call, update: str, payload: Any) -> Any:
    try:
        temporal = await context.temporal.client()
        handle = temporal.get_workflow_handle(call.id)
        return await handle.execute_update(update, payload, result_type=None)
    except (WorkflowUpdateFailedError, RPCError) as exc:
        # The workflow finished or refused (the call ended meanwhile).
        log.info("%s of %s refused: %s", update, call.id, exc)
        raise ApiError(409, f"Call {call.id} has already ended.", kind="conflict") from exc


@router.post(
    "/{call_id}/transfer",
    response_model=ControlOut,
    responses={**NOT_FOUND, 409: {"description": "The call has ended."}},
    summary="Transfer a live phone call to another number (cold or warm)",
)
async def transfer_call(
    call_id: str, body: TransferIn, auth: Auth, session: Session, context: Context
) -> ControlOut:
    call = await _live(session, auth.organization_id, call_id)
    request = TransferRequest(
        call_id=call.id,
        organization_id=call.organization_id,
        to=body.to,
        mode=body.mode,
        summary=body.summary,
        ring_timeout_s=body.ring_timeout_s,
        requested_by="supervisor",
        reference=f"sup-{secrets.token_hex(4)}",
    )
    raw = await _control_update(context, call, "supervisor_transfer", request)
    result = TransferResult(**raw) if isinstance(raw, dict) else raw
    return ControlOut(call_id=call.id, status=result.status, detail=result.detail)


@router.post(
    "/{call_id}/hangup",
    response_model=ControlOut,
    responses={**NOT_FOUND, 409: {"description": "The call has ended."}},
    summary="End a live call (ended reason supervisor-hangup)",
)
async def hang_up_call(call_id: str, auth: Auth, session: Session, context: Context) -> ControlOut:
    call = await _live(session, auth.organization_id, call_id)
    raw = await _control_update(
        context, call, "supervisor_hangup", HangUpRequest(call.id, call.organization_id)
    )
    status = raw.get("status", "") if isinstance(raw, dict) else str(raw.status)
    return ControlOut(call_id=call.id, status=status)
