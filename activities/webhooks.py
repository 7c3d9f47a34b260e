"""Activities behind call events and webhook deliveries (see workflows/events.py).

``record_call_event`` writes the event and its deliveries; ``deliver_webhook`` makes one
signed attempt and logs it on the delivery row (raising, so Temporal retries it with
the delivery's back-off); ``mark_webhook_failed`` closes a delivery that ran out of time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from builder_engine.agent_config import WEBHOOK_EVENTS
from builder_engine.db.engine import session_factory
from builder_engine.db.models import (
    AgentVersion,
    Call,
    CallEvent,
    CallTurn,
    Organization,
    WebhookDelivery,
    WebhookEndpoint,
)
from builder_engine.outbound import Allowlist, OutboundRefused, new_client, send
from builder_engine.timeutil import as_utc, utcnow
from builder_engine.webhooks import (
    DELIVERY_ID_HEADER,
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    EventBody,
    EventData,
    encode_body,
    event_call,
    event_turn,
    new_secret,
    signature_header,
)
from workflows.events import (
    CallEventInput,
    DeliveryFailure,
    DeliveryInput,
    DeliveryOutcome,
    PlannedDelivery,
    RecordedEvent,
    WebhookRetry,
)

log = logging.getLogger(__name__)

#: How much of a receiver's answer the delivery log keeps.
RESPONSE_EXCERPT_BYTES = 1024


class WebhookActivities:
    """Bound to one database (an engine or a session factory); register its methods on a
    worker.

    ``retry`` is the back-off of deliveries made from events (tests shorten it);
    ``public_url`` prefixes the recording links in event bodies."""

    def __init__(
        self,
        engine: AsyncEngine | async_sessionmaker[AsyncSession],
        *,
        retry: WebhookRetry | None = None,
        public_url: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = (
            session_factory(engine) if isinstance(engine, AsyncEngine) else engine
        )
        self.retry = retry or WebhookRetry()
        self._public_url = public_url
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    def activities(self) -> list[Callable[..., Any]]:
        return [self.record_call_event, self.deliver_webhook, self.mark_webhook_failed]

    @property
    def _http(self) -> httpx.AsyncClient:
        # No redirects, no proxies from the environment; every request is SSRF-checked.
        if self._client is None:
            self._client = new_client()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ events

    @activity.defn(name="record_call_event")
    async def record_call_event(self, event: CallEventInput) -> RecordedEvent:
        """Store the event and one pending delivery per target. Idempotent by event id."""
        if event.event_type not in WEBHOOK_EVENTS:
            raise ApplicationError(f"unknown event type {event.event_type}", non_retryable=True)
        async with self._sessions() as session:
            stored = (
                await session.exec(
                    select(CallEvent).where(
                        CallEvent.id == event.event_id,
                        CallEvent.organization_id == event.organization_id,
                    )
                )
            ).first()
            if stored is not None:  # a retried attempt: the first one committed
                return await self._recorded(session, event.event_id)
            call = (
                await session.exec(
                    select(Call).where(
                        Call.id == event.call_id, Call.organization_id == event.organization_id
                    )
                )
            ).first()
            if call is None:
                raise ApplicationError(f"call {event.call_id} does not exist", non_retryable=True)
            session.add(
                CallEvent(
                    id=event.event_id,
                    organization_id=event.organization_id,
                    call_id=event.call_id,
                    kind=event.event_type,
                    data=dict(event.detail),
                    created_at=event.occurred_at,
                )
            )
            try:
                await session.flush()
            except sa.exc.IntegrityError:
                # An earlier attempt of this activity (one its timeout gave up on) wrote the
                # same event between this attempt's read and its write: that one stands.
                await session.rollback()
                if await session.get(CallEvent, event.event_id) is None:
                    raise
                return await self._recorded(session, event.event_id)
            endpoints = await self._targets(session, call, event.event_type)
            if endpoints:
                body = await self._body(session, call, event)
                now = utcnow()
                for endpoint in endpoints:
                    session.add(
                        WebhookDelivery(
                            organization_id=call.organization_id,
                            endpoint_id=endpoint.id,
                            event_id=event.event_id,
                            event_type=event.event_type,
                            call_id=call.id,
                            payload=body,
                            next_attempt_at=now,
                        )
                    )
            await session.commit()
            return await self._recorded(session, event.event_id)

    async def _recorded(self, session: AsyncSession, event_id: str) -> RecordedEvent:
        rows = (
            await session.exec(
                select(WebhookDelivery)
                .where(WebhookDelivery.event_id == event_id)
                .order_by(col(WebhookDelivery.created_at), col(WebhookDelivery.id))
            )
        ).all()
        return RecordedEvent(
            event_id=event_id,
            deliveries=[PlannedDelivery(r.id, r.endpoint_id) for r in rows],
            retry=self.retry,
        )

    async def _targets(
        self, session: AsyncSession, call: Call, event_type: str
    ) -> list[WebhookEndpoint]:
        endpoints = list(
            (
                await session.exec(
                    select(WebhookEndpoint)
                    .where(WebhookEndpoint.organization_id == call.organization_id)
                    .order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))
                )
            ).all()
        )
        targets = [e for e in endpoints if e.active and event_type in e.events]
        config = (
            await session.exec(
                select(AgentVersion.config).where(
                    AgentVersion.agent_id == call.agent_id,
                    AgentVersion.version == call.agent_version,
                    AgentVersion.organization_id == call.organization_id,
                )
            )
        ).first()
        agent_url = (config or {}).get("webhook_url")
        agent_events = (config or {}).get("webhook_events", list(WEBHOOK_EVENTS))
        if agent_url and event_type in agent_events:
            # The agent's URL is signed with (and logged under) the organization's endpoint
            # for that URL; the first event creates one that subscribes to nothing itself.
            same_url = [e for e in endpoints if e.url == agent_url]
            if not same_url:
                endpoint = WebhookEndpoint(
                    organization_id=call.organization_id,
                    url=agent_url,
                    events=[],
                    secret=new_secret(),
                )
                session.add(endpoint)
                await session.flush()
                same_url = [endpoint]
            chosen = same_url[0]
            if chosen.active and chosen not in targets:
                targets.append(chosen)
        return targets

    async def _body(
        self, session: AsyncSession, call: Call, event: CallEventInput
    ) -> dict[str, Any]:
        data = EventData(call=event_call(call, self._public_url), detail=dict(event.detail))
        if event.event_type == "call.ended":
            turns = (
                await session.exec(
                    select(CallTurn)
                    .where(
                        CallTurn.call_id == call.id,
                        CallTurn.organization_id == call.organization_id,
                    )
                    .order_by(col(CallTurn.index))
                )
            ).all()
            data.transcript = [event_turn(t) for t in turns]
        if event.event_type == "call.analyzed":
            data.analysis = dict(call.analysis)
        body = EventBody(
            id=event.event_id,
            type=event.event_type,
            created_at=as_utc(event.occurred_at),
            organization_id=call.organization_id,
            data=data,
        )
        return body.model_dump(mode="json")

    # ------------------------------------------------------------ deliveries

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, job: DeliveryInput) -> DeliveryOutcome:
        """One signed POST. 2xx: delivered. Anything else raises, and Temporal retries."""
        info = activity.info()
        async with self._sessions() as session:
            delivery = await self._delivery(session, job)
            if delivery.status == "delivered":
                # The previous attempt succeeded but its completion was lost.
                return DeliveryOutcome(delivery.id, "delivered", len(delivery.attempts))
            endpoint = await session.get(WebhookEndpoint, delivery.endpoint_id)
            org = await session.get(Organization, delivery.organization_id)
            allowlist = list(org.outbound_allowlist) if org else []
        if endpoint is None or not endpoint.active:
            reason = "the endpoint was deleted" if endpoint is None else "the endpoint is inactive"
            await self._log_attempt(job, info.attempt, error=reason, final=True)
            raise ApplicationError(reason, type="EndpointUnavailable", non_retryable=True)

        body = encode_body(delivery.payload)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(endpoint.secret, body),
            EVENT_ID_HEADER: delivery.event_id,
            EVENT_TYPE_HEADER: delivery.event_type,
            DELIVERY_ID_HEADER: delivery.id,
        }
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        excerpt = ""
        try:
            response = await send(
                self._http,
                "POST",
                endpoint.url,
                body=body,
                headers=headers,
                allowlist=Allowlist.parse(allowlist),
                timeout_s=self._timeout_s,
                max_response_bytes=RESPONSE_EXCERPT_BYTES,
            )
            status_code = response.status
            excerpt = response.body.decode("utf-8", errors="replace")
        except OutboundRefused as exc:
            if not str(exc).startswith("cannot resolve"):  # DNS may come back; SSRF won't
                await self._log_attempt(job, info.attempt, error=str(exc), final=True)
                raise ApplicationError(
                    str(exc), type="OutboundRefused", non_retryable=True
                ) from None
            error = str(exc)
        except TimeoutError:
            error = f"no answer within {self._timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        duration_ms = round((time.monotonic() - started) * 1000, 1)

        if status_code is not None and 200 <= status_code < 300:
            await self._log_attempt(
                job,
                info.attempt,
                status_code=status_code,
                duration_ms=duration_ms,
                response=excerpt,
                delivered=True,
            )
            return DeliveryOutcome(delivery.id, "delivered", info.attempt)

        reason = error or f"HTTP {status_code}"
        next_at = self._next_attempt(job.retry, info)
        await self._log_attempt(
            job,
            info.attempt,
            status_code=status_code,
            error=error,
            duration_ms=duration_ms,
            response=excerpt,
            next_attempt_at=next_at,
            final=next_at is None,
        )
        raise ApplicationError(f"delivery attempt {info.attempt} failed: {reason}")

    @staticmethod
    def _next_attempt(retry: WebhookRetry, info: activity.Info) -> datetime | None:
        if retry.is_last(info.attempt):
            return None
        next_at = utcnow() + timedelta(seconds=retry.delay_after(info.attempt))
        deadline = as_utc(info.scheduled_time) + timedelta(seconds=retry.window_s)
        return next_at if next_at < deadline else None

    @activity.defn(name="mark_webhook_failed")
    async def mark_webhook_failed(self, failure: DeliveryFailure) -> int:
        """Close a delivery that will not be attempted again; returns its attempt count."""
        async with self._sessions() as session:
            delivery = (
                await session.exec(
                    select(WebhookDelivery).where(
                        WebhookDelivery.id == failure.delivery_id,
                        WebhookDelivery.organization_id == failure.organization_id,
                    )
                )
            ).first()
            if delivery is None:
                return 0
            if delivery.status != "delivered":
                delivery.status = "failed"
                delivery.next_attempt_at = None
                session.add(delivery)
                await session.commit()
            return len(delivery.attempts)

    async def _delivery(self, session: AsyncSession, job: DeliveryInput) -> WebhookDelivery:
        delivery = (
            await session.exec(
                select(WebhookDelivery).where(
                    WebhookDelivery.id == job.delivery_id,
                    WebhookDelivery.organization_id == job.organization_id,
                )
            )
        ).first()
        if delivery is None:
            # Its endpoint was deleted (with its log): nothing left to deliver.
            raise ApplicationError(
                f"delivery {job.delivery_id} no longer exists",
                type="DeliveryGone",
                non_retryable=True,
            )
        return delivery

    async def _log_attempt(
        self,
        job: DeliveryInput,
        attempt: int,
        *,
        status_code: int | None = None,
        error: str | None = None,
        duration_ms: float | None = None,
        response: str = "",
        next_attempt_at: datetime | None = None,
        delivered: bool = False,
        final: bool = False,
    ) -> None:
        now = utcnow()
        entry: dict[str, Any] = {
            "attempt": attempt,
            "at": now.isoformat(),
            "trigger": job.trigger,
            "status_code": status_code,
            "error": error,
            "duration_ms": duration_ms,
            "response_excerpt": response,
            "next_attempt_at": next_attempt_at.isoformat() if next_attempt_at else None,
        }
        if job.redelivery_of:
            entry["redelivery_of"] = job.redelivery_of
        async with self._sessions() as session:
            delivery = await self._delivery(session, job)
            # A retried activity whose log write was lost must not log the attempt twice.
            attempts = [a for a in delivery.attempts if a.get("attempt") != attempt]
            delivery.attempts = [*attempts, entry]
            if delivered:
                delivery.status = "delivered"
                delivery.delivered_at = now
                delivery.next_attempt_at = None
            else:
                delivery.status = "failed" if final else "pending"
                delivery.next_attempt_at = next_attempt_at
            session.add(delivery)
            await session.commit()
