"""Webhook endpoints (where an organization's call events go) and their delivery log.

`/v1/webhook-endpoints`: CRUD; the signing secret is shown once, at creation, and again
only when rotated. `/v1/webhooks/deliveries/{id}`: one delivery with every attempt;
`.../redeliver` sends the same event again (one attempt, now). docs/webhooks.md.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Context, Session
from api.errors import COMMON_ERRORS, NOT_FOUND, ApiError, field_error, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.schemas import UtcDatetime
from builder_engine.db.models import Organization, WebhookDelivery, WebhookEndpoint
from builder_engine.outbound import Allowlist, is_public
from builder_engine.timeutil import utcnow
from builder_engine.webhooks import WEBHOOK_EVENTS, WebhookEvent, new_secret
from workflows.events import MANUAL_REDELIVERY, DeliveryInput, delivery_workflow_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["webhooks"], responses=COMMON_ERRORS)

DeliveryStatus = Literal["pending", "delivered", "failed"]


def _all_events() -> list[WebhookEvent]:
    return list(WEBHOOK_EVENTS)


def _distinct(events: list[WebhookEvent]) -> list[WebhookEvent]:
    return list(dict.fromkeys(events))


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http(s) URL that receives the events as POST requests.")
    events: list[WebhookEvent] = Field(
        default_factory=_all_events,
        max_length=len(WEBHOOK_EVENTS),
        description="Event types to receive; [] receives only what agents whose "
        "`webhook_url` is this URL send to it.",
    )
    active: bool = True

    @field_validator("url")
    @classmethod
    def _short(cls, value: HttpUrl) -> HttpUrl:
        if len(str(value)) > 2048:
            raise ValueError("at most 2048 characters")
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return _distinct(value)


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl | None = None
    events: list[WebhookEvent] | None = Field(default=None, max_length=len(WEBHOOK_EVENTS))
    active: bool | None = None

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[WebhookEvent] | None) -> list[WebhookEvent] | None:
        return None if value is None else _distinct(value)


class WebhookEndpointOut(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    events: list[str]
    active: bool
    secret_hint: str = Field(description="The secret's last four characters.")
    created_at: UtcDatetime
    updated_at: UtcDatetime


class WebhookEndpointWithSecret(WebhookEndpointOut):
    secret: str = Field(
        description="Signs every delivery (Builder-Signature). Shown only now: store it."
    )


class DeliveryAttemptOut(BaseModel):
    model_config = ConfigDict(extra="ignore")

    attempt: int
    at: datetime
    trigger: str = Field(description="event (automatic) or manual (a redelivery).")
    status_code: int | None = Field(description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(description="Why the attempt failed without (or with) an answer.")
    duration_ms: float | None
    response_excerpt: str = Field(description="The start of the receiver's answer.")
    next_attempt_at: datetime | None = Field(description="When the next retry is due.")
    redelivery_of: str | None = None


class WebhookDeliveryOut(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    call_id: str | None
    status: DeliveryStatus
    attempt_count: int
    attempts: list[DeliveryAttemptOut]
    next_attempt_at: UtcDatetime | None
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None


class WebhookDeliveryDetail(WebhookDeliveryOut):
    payload: dict[str, Any] = Field(description="The exact JSON body that is sent.")


def endpoint_out(row: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=row.id,
        url=row.url,
        events=list(row.events),
        active=row.active,
        secret_hint=row.secret[-4:],
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def delivery_out(row: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_id=row.event_id,
        event_type=row.event_type,
        call_id=row.call_id,
        status=row.status,
        attempt_count=len(row.attempts),
        attempts=[DeliveryAttemptOut.model_validate(a) for a in row.attempts],
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )


def _detail(row: WebhookDelivery) -> WebhookDeliveryDetail:
    return WebhookDeliveryDetail(**delivery_out(row).model_dump(), payload=row.payload)


async def _endpoint(session: AsyncSession, organization_id: str, ident: str) -> WebhookEndpoint:
    row = (
        await session.exec(
            select(WebhookEndpoint).where(
                WebhookEndpoint.id == ident, WebhookEndpoint.organization_id == organization_id
            )
        )
    ).first()
    if row is None:
        raise not_found("Webhook endpoint", ident)
    return row


async def _delivery(session: AsyncSession, organization_id: str, ident: str) -> WebhookDelivery:
    row = (
        await session.exec(
            select(WebhookDelivery).where(
                WebhookDelivery.id == ident, WebhookDelivery.organization_id == organization_id
            )
        )
    ).first()
    if row is None:
        raise not_found("Webhook delivery", ident)
    return row


async def _check_url(session: AsyncSession, organization_id: str, url: HttpUrl) -> str:
    """Refuse now what every delivery would refuse: a private address literal that the
    organization's allowlist does not name (host names are checked at each delivery)."""
    host = (url.host or "").strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(url)
    org = await session.get(Organization, organization_id)
    allowlist = Allowlist.parse(org.outbound_allowlist if org else [])
    if not is_public(address) and not allowlist.allows_address(address):
        raise field_error(
            "url",
            f"{host} is a private, loopback or link-local address; add it to the "
            "organization's outbound allowlist to send webhooks there",
        )
    return str(url)


# ------------------------------------------------------------------ endpoints


@router.post(
    "/v1/webhook-endpoints",
    status_code=201,
    response_model=WebhookEndpointWithSecret,
    summary="Create a webhook endpoint (its secret is shown once)",
)
async def create_endpoint(
    body: WebhookEndpointCreate, auth: Auth, session: Session
) -> WebhookEndpointWithSecret:
    url = await _check_url(session, auth.organization_id, body.url)
    row = WebhookEndpoint(
        organization_id=auth.organization_id,
        url=url,
        events=list(body.events),
        active=body.active,
        secret=new_secret(),
    )
    session.add(row)
    await session.commit()
    return WebhookEndpointWithSecret(**endpoint_out(row).model_dump(), secret=row.secret)


@router.get(
    "/v1/webhook-endpoints",
    response_model=Page[WebhookEndpointOut],
    summary="List webhook endpoints",
)
async def list_endpoints(
    auth: Auth, session: Session, limit: Limit = 20, cursor: Cursor = None
) -> Page[WebhookEndpointOut]:
    rows = (
        await session.exec(
            select(WebhookEndpoint)
            .where(
                WebhookEndpoint.organization_id == auth.organization_id,
                after_cursor(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id), cursor),
            )
            .order_by(col(WebhookEndpoint.created_at).desc(), col(WebhookEndpoint.id).desc())
            .limit(limit + 1)
        )
    ).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[WebhookEndpointOut](
        data=[endpoint_out(r) for r in rows[:limit]], next_cursor=next_cursor
    )


@router.get(
    "/v1/webhook-endpoints/{endpoint_id}",
    response_model=WebhookEndpointOut,
    responses=NOT_FOUND,
    summary="Get a webhook endpoint",
)
async def get_endpoint(endpoint_id: str, auth: Auth, session: Session) -> WebhookEndpointOut:
    return endpoint_out(await _endpoint(session, auth.organization_id, endpoint_id))


@router.patch(
    "/v1/webhook-endpoints/{endpoint_id}",
    response_model=WebhookEndpointOut,
    responses=NOT_FOUND,
    summary="Update a webhook endpoint (url, events, active)",
)
async def update_endpoint(
    endpoint_id: str, body: WebhookEndpointUpdate, auth: Auth, session: Session
) -> WebhookEndpointOut:
    row = await _endpoint(session, auth.organization_id, endpoint_id)
    changes = body.model_dump(exclude_unset=True)
    for key in ("url", "events", "active"):
        if key in changes and changes[key] is None:
            raise field_error(key, f"{key} cannot be null")
    if body.url is not None:
        row.url = await _check_url(session, auth.organization_id, body.url)
    if body.events is not None:
        row.events = list(body.events)
    if body.active is not None:
        row.active = body.active
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    return endpoint_out(row)


@router.post(
    "/v1/webhook-endpoints/{endpoint_id}/rotate-secret",
    response_model=WebhookEndpointWithSecret,
    responses=NOT_FOUND,
    summary="Replace the signing secret (the new one is shown once)",
)
async def rotate_secret(
    endpoint_id: str, auth: Auth, session: Session
) -> WebhookEndpointWithSecret:
    """Deliveries from now on (retries of older events included) are signed with the new
    secret only."""
    row = await _endpoint(session, auth.organization_id, endpoint_id)
    row.secret = new_secret()
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    return WebhookEndpointWithSecret(**endpoint_out(row).model_dump(), secret=row.secret)


@router.delete(
    "/v1/webhook-endpoints/{endpoint_id}",
    status_code=204,
    response_class=Response,
    responses=NOT_FOUND,
    summary="Delete a webhook endpoint and its delivery log",
)
async def delete_endpoint(endpoint_id: str, auth: Auth, session: Session) -> Response:
    """Retries still pending stop at their next attempt. To keep the log, set
    `active: false` instead (that stops deliveries too)."""
    row = await _endpoint(session, auth.organization_id, endpoint_id)
    deliveries = (
        await session.exec(
            select(WebhookDelivery).where(
                WebhookDelivery.endpoint_id == row.id,
                WebhookDelivery.organization_id == auth.organization_id,
            )
        )
    ).all()
    for delivery in deliveries:
        await session.delete(delivery)
    await session.flush()
    await session.delete(row)
    await session.commit()
    return Response(status_code=204)


@router.get(
    "/v1/webhook-endpoints/{endpoint_id}/deliveries",
    response_model=Page[WebhookDeliveryOut],
    responses=NOT_FOUND,
    summary="An endpoint's delivery log, newest first",
)
async def list_deliveries(
    endpoint_id: str,
    auth: Auth,
    session: Session,
    limit: Limit = 20,
    cursor: Cursor = None,
    status: Annotated[DeliveryStatus | None, Query()] = None,
    event_type: Annotated[WebhookEvent | None, Query()] = None,
) -> Page[WebhookDeliveryOut]:
    endpoint = await _endpoint(session, auth.organization_id, endpoint_id)
    query = select(WebhookDelivery).where(
        WebhookDelivery.endpoint_id == endpoint.id,
        WebhookDelivery.organization_id == auth.organization_id,
        after_cursor(col(WebhookDelivery.created_at), col(WebhookDelivery.id), cursor),
    )
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if event_type is not None:
        query = query.where(WebhookDelivery.event_type == event_type)
    rows = (
        await session.exec(
            query.order_by(
                col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id).desc()
            ).limit(limit + 1)
        )
    ).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[WebhookDeliveryOut](
        data=[delivery_out(r) for r in rows[:limit]], next_cursor=next_cursor
    )


# ------------------------------------------------------------------ deliveries


@router.get(
    "/v1/webhooks/deliveries/{delivery_id}",
    response_model=WebhookDeliveryDetail,
    responses=NOT_FOUND,
    summary="A delivery: its body and every attempt",
)
async def get_delivery(delivery_id: str, auth: Auth, session: Session) -> WebhookDeliveryDetail:
    return _detail(await _delivery(session, auth.organization_id, delivery_id))


@router.post(
    "/v1/webhooks/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDeliveryDetail,
    responses={**NOT_FOUND, 503: {"description": "Temporal is unreachable; retry later."}},
    summary="Send a delivery's event again (one attempt, now)",
)
async def redeliver(
    delivery_id: str, auth: Auth, session: Session, context: Context
) -> WebhookDeliveryDetail:
    """A new delivery of the same event (same body, same `Builder-Event-Id`) to the same
    endpoint, signed with its current secret; poll it for the outcome."""
    original = await _delivery(session, auth.organization_id, delivery_id)
    endpoint = await _endpoint(session, auth.organization_id, original.endpoint_id)
    if not endpoint.active:
        raise ApiError(409, "The endpoint is inactive; activate it to redeliver.", kind="conflict")
    copy = WebhookDelivery(
        organization_id=original.organization_id,
        endpoint_id=original.endpoint_id,
        event_id=original.event_id,
        event_type=original.event_type,
        call_id=original.call_id,
        payload=original.payload,
        next_attempt_at=utcnow(),
    )
    session.add(copy)
    await session.commit()
    try:
        temporal = await context.temporal.client()
        await temporal.start_workflow(
            "WebhookDeliveryWorkflow",
            DeliveryInput(
                delivery_id=copy.id,
                organization_id=copy.organization_id,
                event_type=copy.event_type,
                retry=MANUAL_REDELIVERY,
                trigger="manual",
                redelivery_of=original.id,
            ),
            id=delivery_workflow_id(copy.call_id, copy.event_type, copy.id),
            task_queue=context.settings.temporal_task_queue,
            static_summary=f"manual redelivery of {original.id}",
        )
    except Exception as exc:
        log.exception("could not start the redelivery of %s", original.id)
        await session.delete(copy)
        await session.commit()
        raise ApiError(
            503, "Redelivery cannot be started right now; retry later.", kind="unavailable"
        ) from exc
    return _detail(copy)
