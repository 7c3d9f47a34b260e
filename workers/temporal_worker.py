"""The platform's Temporal worker: every workflow and activity, on one task queue."""

from __future__ import annotations

import asyncio

from temporalio.client import Client
from temporalio.worker import Worker

from activities.calls import CallActivities
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine
from builder_engine.temporal_setup import connect, ensure_search_attributes
from workflows.call import CallWorkflow

WORKFLOWS: list[type] = [CallWorkflow]


def build_worker(client: Client, task_queue: str, calls: CallActivities) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=[calls.record_call_status, calls.save_call_turns],
    )


async def run_worker(settings: Settings) -> None:
    """Connect, register search attributes, and poll until cancelled."""
    client = await connect(settings)
    await ensure_search_attributes(client, settings.temporal_namespace)
    engine = create_async_db_engine(settings)
    try:
        worker = build_worker(client, settings.temporal_task_queue, CallActivities(engine))
        async with worker:
            # The supervisor waits for this line before it reports the stack ready.
            print(f"worker ready on task queue {settings.temporal_task_queue}", flush=True)
            await asyncio.Event().wait()
    finally:
        await engine.dispose()
