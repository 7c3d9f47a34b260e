"""Workflow histories recorded by earlier versions of the platform replay on this code.

A call's workflow lives as long as the call: a deploy restarts the worker mid-call and
the new code takes over by replaying the call's history so far. A change to what a
workflow does - which commands it issues, in what order - fails that replay for every
call in flight, unless the change is guarded (``workflow.patched``) or goes into a new
workflow type. The histories in ``recorded_histories/`` were recorded by earlier
versions (``BUILDER_RECORD_HISTORIES=<folder>`` with tests/test_workflow_story.py); this
test replays each on the current workflows, the way the worker runs them (the per-call
workflows outside the sandbox). See docs/ARCHITECTURE.md, "Changing a workflow".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workers.temporal_worker import WORKFLOWS

RECORDED = sorted((Path(__file__).parent / "recorded_histories").glob("*.json"))


def test_there_are_recorded_histories_of_each_per_call_workflow() -> None:
    types = {_workflow_type(json.loads(path.read_text())) for path in RECORDED}
    assert {"CallWorkflow", "PostCallWorkflow"} <= types


@pytest.mark.parametrize("path", RECORDED, ids=[path.stem for path in RECORDED])
async def test_a_recorded_history_replays_on_this_code(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    replayed = await Replayer(workflows=WORKFLOWS).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert replayed.replay_failure is None, f"{path.name}: {replayed.replay_failure}"


def _workflow_type(history: dict[str, object]) -> str:
    events = history["events"]
    assert isinstance(events, list)
    started = events[0]["workflowExecutionStartedEventAttributes"]
    return str(started["workflowType"]["name"])
