"""The platform's Temporal worker: every workflow and activity, on one task queue."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities.call_moves import CallMoveActivities
from activities.calls import CallActivities
from activities.post_call import PostCallActivities
from activities.telephony import TelephonyActivities
from activities.tools import ToolActivities
from activities.webhooks import WebhookActivities
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine
from builder_engine.temporal_setup import connect, ensure_search_attributes, metrics_runtime
from workflows.call import CallWorkflow
from workflows.events import WebhookDeliveryWorkflow
from workflows.instances import RealtimeInstanceWorkflow
from workflows.post_call import PostCallWorkflow

WORKFLOWS: list[type] = [
    CallWorkflow,
    PostCallWorkflow,
    WebhookDeliveryWorkflow,
    RealtimeInstanceWorkflow,
]

# How long a workflow task waits for the worker that ran the workflow last (its cached
# state) before any worker takes it. Short: after a worker dies, the call's next step
# (a tool result, say) reaches a healthy worker within this.
STICKY_TIMEOUT = timedelta(seconds=2)


def build_worker(
    client: Client,
    task_queue: str,
    calls: CallActivities,
    tools: ToolActivities | None = None,
    *,
    post_call: PostCallActivities | None = None,
    webhooks: WebhookActivities | None = None,
    moves: CallMoveActivities | None = None,
    telephony: TelephonyActivities | None = None,
) -> Worker:
    tools = tools or ToolActivities(calls.sessions)
    # Without them: events are recorded and delivered with the default back-off, and the
    # post-call work runs without recordings storage or LLM (it says so in the call).
    post_call = post_call or PostCallActivities(calls.sessions, None)
    webhooks = webhooks or WebhookActivities(calls.sessions)
    # Without settings a Twilio call cannot be moved (no credentials); web calls can.
    moves = moves or CallMoveActivities(calls.sessions, None)
    # Without Twilio credentials transfers and phone hang-ups fail (and say so).
    telephony = telephony or TelephonyActivities(calls.sessions)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=[
            calls.record_call_status,
            calls.save_call_turns,
            *tools.activities(),
            *post_call.activities(),
            *webhooks.activities(),
            *moves.activities(),
            *telephony.activities(),
        ],
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        # Activities the workflows schedule here (a webhook tool, say) come back with the
        # workflow task's completion when the server allows it (docs/temporal-ui.md,
        # "Eager activity execution"). The SDK's default, spelled out: the server
        # setting does nothing without it.
        disable_eager_activity_execution=False,
    )


async def run_worker(settings: Settings) -> None:
    """Connect, register search attributes, and poll until cancelled."""
    runtime = None
    if settings.worker_metrics_address:
        runtime = metrics_runtime(settings.worker_metrics_address)
    client = await connect(settings, runtime=runtime)
    await ensure_search_attributes(client, settings.temporal_namespace)
    engine = create_async_db_engine(settings)
    calls = CallActivities(engine)
    tools = ToolActivities(calls.sessions)
    post_call = PostCallActivities(calls.sessions, settings)
    webhooks = WebhookActivities(calls.sessions, public_url=settings.effective_public_url)
    telephony = TelephonyActivities.from_settings(calls.sessions, settings)
    try:
        worker = build_worker(
            client,
            settings.temporal_task_queue,
            calls,
            tools,
            post_call=post_call,
            webhooks=webhooks,
            moves=CallMoveActivities(calls.sessions, settings),
            telephony=telephony,
        )
        async with worker:
            # The supervisor waits for this line before it reports the stack ready.
            print(f"worker ready on task queue {settings.temporal_task_queue}", flush=True)
            await asyncio.Event().wait()
    finally:
        await tools.aclose()
        await post_call.aclose()
        await webhooks.aclose()
        await telephony.aclose()
        await engine.dispose()
