"""Call events and their webhooks, for workflow code.

``await publish_event("call.started", call_id=..., organization_id=...)`` from any workflow:

1. the ``record_call_event`` local activity writes the ``CallEvent`` row (the event id is made
   here, deterministically, so a retried activity records it once), builds the event's
   complete body from the database and creates one ``WebhookDelivery`` per target: the
   organization's active endpoints subscribed to the event type, plus the agent's own
   ``webhook_url`` when the event is in its ``webhook_events``;
2. each delivery runs as its own ``WebhookDeliveryWorkflow`` child, abandoned by its parent
   (a call's workflow never waits for a customer's server): one ``deliver_webhook``
   activity whose Temporal retry policy is the exponential back-off (by default 2 s
   doubling up to 1 h, for 24 h), so retries survive worker restarts.

No payload here carries a secret or the event body (which holds the transcript): the
activities read both from the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

EVENT_DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10)
)


@dataclass(frozen=True)
class WebhookRetry:
    """When a failed delivery is tried again: ``initial * backoff**(n-1)`` seconds after
    the n-th attempt, at most ``maximum_interval_s`` apart, until ``window_s`` after the
    first attempt (or ``maximum_attempts``, when not 0)."""

    initial_interval_s: float = 2.0
    backoff: float = 2.0
    maximum_interval_s: float = 3600.0
    window_s: float = 86400.0
    maximum_attempts: int = 0

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=timedelta(seconds=self.initial_interval_s),
            backoff_coefficient=self.backoff,
            maximum_interval=timedelta(seconds=self.maximum_interval_s),
            maximum_attempts=self.maximum_attempts,
        )

    def delay_after(self, attempt: int) -> float:
        """Seconds Temporal waits after failed attempt ``attempt`` (1-based)."""
        delay = self.initial_interval_s * self.backoff ** max(attempt - 1, 0)
        return float(min(delay, self.maximum_interval_s))

    def is_last(self, attempt: int) -> bool:
        return self.maximum_attempts > 0 and attempt >= self.maximum_attempts


#: A manual redelivery is one attempt, now.
MANUAL_REDELIVERY = WebhookRetry(maximum_attempts=1, window_s=120.0)


@dataclass(frozen=True)
class CallEventInput:
    event_id: str
    event_type: str
    call_id: str
    organization_id: str
    occurred_at: datetime
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedDelivery:
    delivery_id: str
    endpoint_id: str


@dataclass(frozen=True)
class RecordedEvent:
    event_id: str
    deliveries: list[PlannedDelivery]
    retry: WebhookRetry


@dataclass(frozen=True)
class DeliveryInput:
    delivery_id: str
    organization_id: str
    event_type: str
    retry: WebhookRetry = field(default_factory=WebhookRetry)
    # "event" (published by a workflow) or "manual" (POST .../redeliver).
    trigger: str = "event"
    redelivery_of: str | None = None


@dataclass(frozen=True)
class DeliveryFailure:
    delivery_id: str
    organization_id: str
    reason: str


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery_id: str
    status: str  # delivered | failed
    attempts: int
    reason: str | None = None


def delivery_workflow_id(call_id: str | None, event_type: str, delivery_id: str) -> str:
    return f"{call_id or 'webhook'}-{event_type}-{delivery_id}"


async def publish_event(
    event_type: str,
    *,
    call_id: str,
    organization_id: str,
    detail: dict[str, Any] | None = None,
) -> RecordedEvent:
    """Record a call event and start its webhook deliveries (see the module docstring).

    ``detail`` holds the event's own facts (a tool call, a transfer's destination); it
    appears as ``data.detail`` in the webhook body and in ``GET /v1/calls/{id}/events``.
    Returns once the event is recorded and its deliveries have started (not delivered).
    """
    event = CallEventInput(
        event_id=f"evt_{workflow.uuid4().hex[:24]}",
        event_type=event_type,
        call_id=call_id,
        organization_id=organization_id,
        occurred_at=workflow.now(),
        detail=dict(detail or {}),
    )
    # A local activity: a short database write, idempotent by the event id made above.
    recorded: RecordedEvent = await workflow.execute_local_activity(
        "record_call_event",
        event,
        result_type=RecordedEvent,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=EVENT_DB_RETRY,
        summary=event_type,
    )
    for planned in recorded.deliveries:
        await workflow.start_child_workflow(
            "WebhookDeliveryWorkflow",
            DeliveryInput(
                delivery_id=planned.delivery_id,
                organization_id=organization_id,
                event_type=event_type,
                retry=recorded.retry,
            ),
            id=delivery_workflow_id(call_id, event_type, planned.delivery_id),
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            static_summary=f"{event_type} to webhook endpoint {planned.endpoint_id}",
        )
    return recorded


# Outside the sandbox for the reason PostCallWorkflow is (one run per event and endpoint);
# tests/test_post_call.py replays a delivery's history inside it.
@workflow.defn(name="WebhookDeliveryWorkflow", sandboxed=False)
class WebhookDeliveryWorkflow:
    """One event to one endpoint: attempts (durable activity retries) until it is
    accepted or the retry window closes; every attempt is in the delivery log."""

    @workflow.run
    async def run(self, job: DeliveryInput) -> DeliveryOutcome:
        window = timedelta(seconds=job.retry.window_s)
        try:
            outcome: DeliveryOutcome = await workflow.execute_activity(
                "deliver_webhook",
                job,
                result_type=DeliveryOutcome,
                start_to_close_timeout=min(timedelta(seconds=30), window),
                schedule_to_close_timeout=window,
                retry_policy=job.retry.policy(),
                summary=f"POST {job.event_type}",
            )
            return outcome
        except ActivityError as exc:
            cause = exc.cause
            reason = str(cause) if cause is not None else str(exc)
            if not (isinstance(cause, ApplicationError) and cause.non_retryable):
                # Retries ran out: the window closed (or the attempts were all used).
                limit = (
                    f"{job.retry.maximum_attempts} attempt(s)"
                    if job.retry.maximum_attempts
                    else f"the {job.retry.window_s:g} s retry window"
                )
                reason = f"not accepted within {limit}; last: {reason}"
            attempts: int = await workflow.execute_activity(
                "mark_webhook_failed",
                DeliveryFailure(job.delivery_id, job.organization_id, reason),
                result_type=int,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=EVENT_DB_RETRY,
            )
            return DeliveryOutcome(job.delivery_id, "failed", attempts, reason=reason)
