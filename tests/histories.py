"""Reading a workflow's history in tests: which activities ran, regular and local; whether
it replays inside the SDK's sandbox."""

from __future__ import annotations

import json
from typing import Any

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

LOCAL_ACTIVITY_MARKER = "core_local_activity"


def activities_run(history: WorkflowHistory, *, local: bool | None = None) -> list[str]:
    """Activity types in history order: a regular activity when it was scheduled, a local
    one by the marker that records its result. ``local``: only local (True) or only
    regular (False) ones."""
    names: list[str] = []
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes") and local is not True:
            names.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        elif local is not False and (data := _local_activity(event)) is not None:
            names.append(str(data["activity_type"]))
    return names


def _local_activity(event: HistoryEvent) -> dict[str, Any] | None:
    """A local activity's marker data, or None for any other event."""
    marker = event.marker_recorded_event_attributes
    if not event.HasField("marker_recorded_event_attributes"):
        return None
    if marker.marker_name != LOCAL_ACTIVITY_MARKER:
        return None
    data: dict[str, Any] = json.loads(marker.details["data"].payloads[0].data)
    return data


def local_activities(history: WorkflowHistory) -> list[dict[str, Any]]:
    """The markers of the local activities run, in history order: their recorded data
    (``activity_type``, ``activity_id``, ``attempt``...) and ``summary``."""
    found: list[dict[str, Any]] = []
    for event in history.events:
        if (data := _local_activity(event)) is not None:
            summary = event.user_metadata.summary.data
            found.append({**data, "summary": json.loads(summary) if summary else None})
    return found


def signals_received(history: WorkflowHistory, name: str) -> int:
    """How many ``name`` signals the workflow has received."""
    return sum(
        1
        for event in history.events
        if event.HasField("workflow_execution_signaled_event_attributes")
        and event.workflow_execution_signaled_event_attributes.signal_name == name
    )


async def assert_replays_in_sandbox(client: Client, workflow_id: str, workflow: type) -> None:
    """The workflow's history replays inside the SDK's sandbox. The worker runs the
    per-call workflows outside it (each module says why); this keeps them honest: the
    clock, randomness or I/O outside the workflow API fail the replay here."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    # Given as the runner for unsandboxed workflows, the sandbox runs them too.
    replayer = Replayer(workflows=[workflow], unsandboxed_workflow_runner=SandboxedWorkflowRunner())
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None, f"{workflow_id}: {replayed.replay_failure}"
