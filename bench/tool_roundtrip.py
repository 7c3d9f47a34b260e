"""What the durable path adds to a tool call, over running the tool in process.

    .venv/bin/python bench/tool_roundtrip.py --calls 200 [--tool check_availability|webhook]
        [--worker-process] [--gap-ms 100] [--timeline] [--server-defaults]

Starts a Temporal dev server (SQLite file) with the flags ``builder-engine up`` gives it
(``TEMPORAL_SERVER_TUNING`` in workers/supervisor.py; ``--server-defaults`` leaves them
out, ``BENCH_TEMPORAL_ARGS`` adds more), the platform's worker (in this process, or
with ``--worker-process`` as ``builder-engine worker`` in its own) and a CallWorkflow for
one call whose agent has the tool. Then, one after the other:

* durable: the realtime side's path - ``TemporalCallLifecycle.run_tools`` (the
  ``run_tools`` Update: argument validation in the workflow, the tool as a local
  activity inside that workflow task, its execution row);
* direct: the same tool implementation called in process (same database work, same
  HTTP request for a webhook), no Temporal.

Every call has a new tool call id, so every one really runs. ``--timeline`` also prints
where the durable path's time goes, stage by stage, from the workflow's history. The
last line printed is
``calls=N durable_p50_ms=.. durable_p95_ms=.. direct_p50_ms=.. added_p50_ms=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from tools_support import ToolReceiver, seed_call

from activities.calls import CallActivities
from activities.tools import ToolActivities
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, session_factory
from builder_engine.db.migrate import upgrade
from builder_engine.temporal_setup import ensure_search_attributes
from realtime.lifecycle import TemporalCallLifecycle
from workers.supervisor import TEMPORAL_SERVER_TUNING
from workers.temporal_worker import build_worker
from workflows.call import CALL_TASK_TIMEOUT
from workflows.tools import ToolBatch, ToolInvocation, ToolTask

ROOT = Path(__file__).resolve().parents[1]
EXTRA: list[str] = os.environ.get("BENCH_TEMPORAL_ARGS", "").split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def worker_running(
    client: Client, settings: Settings, in_process: bool
) -> AsyncIterator[None]:
    if in_process:
        engine = create_async_db_engine(settings)
        try:
            async with build_worker(client, settings.temporal_task_queue, CallActivities(engine)):
                yield
        finally:
            await engine.dispose()
        return
    env = {
        **os.environ,
        "BUILDER_DATA_DIR": str(settings.data_dir),
        "BUILDER_TEMPORAL_ADDRESS": str(settings.temporal_address),
        "BUILDER_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "BUILDER_LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.cli",
        "worker",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode()
        if "worker ready" not in line:
            raise RuntimeError(f"worker did not start: {line!r}")
        yield
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def all_runs(client: Client, workflow_id: str) -> list[list[HistoryEvent]]:
    """The events of each run of a workflow (a long call continues as new), oldest first."""
    runs = [r async for r in client.list_workflows(f'WorkflowId="{workflow_id}"')]
    histories = []
    for run in sorted(runs, key=lambda r: r.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        histories.append(list((await handle.fetch_history()).events))
    return histories


STAGES = (
    "client -> workflow task scheduled",
    "workflow task: scheduled -> started",
    "workflow task: started -> completed",
    "  worker: task started -> tool scheduled",
    "  worker: the tool's own runtime",
    "  worker: the rest (activation 2, the answer)",
    "activity: scheduled -> completed",
    "workflow task 2: scheduled -> started",
    "workflow task 2: started -> completed",
    "update completed -> client",
    "total (client)",
)


def _ms(timestamp: dict[str, int]) -> float:
    """A local activity marker's time (``{"seconds": .., "nanos": ..}``) in ms."""
    return timestamp["seconds"] * 1000 + timestamp.get("nanos", 0) / 1e6


def update_stages(
    events: list[HistoryEvent], accepted: int, completed: int
) -> tuple[float, float, dict[str, float]]:
    """One ``run_tools`` update from the events of its run (``accepted``, ``completed``:
    the positions of its two update events): when its first workflow task was scheduled,
    when it completed (ms, server clock), and its stages in between (ms)."""
    at = [e.event_time.ToNanoseconds() / 1e6 for e in events]

    def last(kind: str, before: int) -> int:
        wanted = EventType.Value(f"EVENT_TYPE_{kind}")
        return max(j for j in range(before) if events[j].event_type == wanted)

    # The workflow task that accepted the update (and ran a local activity)...
    done = last("WORKFLOW_TASK_COMPLETED", accepted)
    started = last("WORKFLOW_TASK_STARTED", done)
    scheduled = last("WORKFLOW_TASK_SCHEDULED", started)
    began = at[scheduled]
    stages = {
        "workflow task: scheduled -> started": at[started] - at[scheduled],
        "workflow task: started -> completed": at[done] - at[started],
    }
    tool_runs = [
        json.loads(events[j].marker_recorded_event_attributes.details["data"].payloads[0].data)
        for j in range(done, completed)  # the task's commands follow its completion
        if events[j].event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and events[j].marker_recorded_event_attributes.marker_name == "core_local_activity"
    ]
    tool_runs = [r for r in tool_runs if str(r["activity_type"]).startswith("tool.")]
    if tool_runs:  # ...a local activity: its marker has the worker's own times
        # The SDK writes `original_schedule_time` from the wall clock and `complete_time`
        # as the workflow's time (the task's start) plus the activity's own runtime.
        run = tool_runs[0]
        activation = _ms(run["original_schedule_time"]) - at[started]
        runtime = _ms(run["complete_time"]) - at[started]
        stages["  worker: task started -> tool scheduled"] = activation
        stages["  worker: the tool's own runtime"] = runtime
        stages["  worker: the rest (activation 2, the answer)"] = (
            at[done] - at[started] - activation - runtime
        )
    activity = [
        j
        for j in range(accepted, completed)
        if events[j].event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    if activity:  # ...a regular activity, and the workflow task that completed the update
        finished = last("ACTIVITY_TASK_COMPLETED", completed)
        done = last("WORKFLOW_TASK_COMPLETED", completed)
        started = last("WORKFLOW_TASK_STARTED", done)
        scheduled = last("WORKFLOW_TASK_SCHEDULED", started)
        stages["activity: scheduled -> completed"] = at[finished] - at[activity[0]]
        stages["workflow task 2: scheduled -> started"] = at[started] - at[scheduled]
        stages["workflow task 2: started -> completed"] = at[done] - at[started]
    return began, at[completed], stages


def print_timeline(runs: list[list[HistoryEvent]], spans: list[tuple[float, float]]) -> None:
    """Where a durable call's time goes: medians of the gaps between its history events
    (server clock) and the client's own send and receive (same machine, same clock)."""
    rounds: list[tuple[float, float, dict[str, float]]] = []
    for events in runs:
        position = {e.event_id: i for i, e in enumerate(events)}  # ids restart per run
        rounds += [
            update_stages(
                events,
                position[e.workflow_execution_update_completed_event_attributes.accepted_event_id],
                i,
            )
            for i, e in enumerate(events)
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED
        ]
    values: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for (began, ended, stages), (sent, received) in zip(rounds[-len(spans) :], spans, strict=True):
        stages["client -> workflow task scheduled"] = began - sent * 1000
        stages["update completed -> client"] = received * 1000 - ended
        stages["total (client)"] = (received - sent) * 1000
        for stage, ms in stages.items():
            values[stage].append(ms)
    for stage, measured in values.items():
        if measured:
            p50, p95 = statistics.median(measured), percentile(measured, 0.95)
            print(f"  {stage:<40} p50 {p50:6.1f}  p95 {p95:6.1f} ms")


async def run(
    calls: int,
    tool: str,
    worker_in_process: bool,
    gap_ms: float,
    timeline: bool = False,
    tuned: bool = True,
) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            dev_server_log_level="error",
            dev_server_extra_args=[
                "--db-filename",
                f"{tmp}/temporal.db",
                *(TEMPORAL_SERVER_TUNING if tuned else ()),
                *EXTRA,
            ],
        )
        try:
            await ensure_search_attributes(env.client, env.client.namespace)
            settings = Settings(
                data_dir=Path(tmp),
                temporal_address=env.client.service_client.config.target_host,
                temporal_task_queue=f"bench-{secrets.token_hex(4)}",
                _env_file=None,
            )
            upgrade(settings)
            async with ToolReceiver() as receiver:
                arguments: dict[str, Any]
                if tool == "webhook":
                    spec = {"name": "lookup_order", "kind": "webhook", "url": receiver.on("/o")}
                    arguments = {"order": "1234"}
                else:
                    spec = {"name": "check_availability", "kind": "check_availability"}
                    arguments = {"days": 1}
                seeded = seed_call(settings, [spec])
                start = seeded.start
                async with worker_running(env.client, settings, worker_in_process):
                    await env.client.start_workflow(
                        "CallWorkflow",
                        start,
                        id=start.call_id,
                        task_queue=settings.temporal_task_queue,
                        task_timeout=CALL_TASK_TIMEOUT,
                    )
                    lifecycle = TemporalCallLifecycle(env.client, start.call_id)
                    name = str(spec["name"])

                    async def durable_once() -> float:
                        call = ToolInvocation(
                            f"call_{secrets.token_hex(8)}", name, json.dumps(arguments)
                        )
                        began = time.perf_counter()
                        result = await lifecycle.run_tools(ToolBatch([call]), timeout_s=30)
                        elapsed = (time.perf_counter() - began) * 1000
                        assert result.outcomes[0].ok, result.outcomes[0].content
                        return elapsed

                    for _ in range(10):  # warm up: definitions cached, connections open
                        await durable_once()
                    durable = []
                    spans: list[tuple[float, float]] = []
                    for _ in range(calls):
                        began_at = time.time()
                        durable.append(await durable_once())
                        spans.append((began_at, time.time()))
                        # In a call, tool rounds are an LLM request apart at least.
                        await asyncio.sleep(gap_ms / 1000)
                    if timeline:
                        print_timeline(await all_runs(env.client, start.call_id), spans)
                    lifecycle.ended("caller-hangup")
                    await lifecycle.aclose()

                engine = create_async_db_engine(settings)
                tools = ToolActivities(session_factory(engine))
                run_tool = tools.webhook if tool == "webhook" else tools.check_availability

                async def direct_once() -> float:
                    task = ToolTask(
                        call_id=start.call_id,
                        organization_id=start.organization_id,
                        tool_call_id=f"call_{secrets.token_hex(8)}",
                        tool_id=seeded.tools[name],
                        tool_name=name,
                        kind=tool,
                        arguments=arguments,
                        timeout_s=5.0,
                        attempts=1,
                        settings={"calendar_id": seeded.calendar_id},
                    )
                    began = time.perf_counter()
                    outcome = await run_tool(task)
                    elapsed = (time.perf_counter() - began) * 1000
                    assert outcome.ok, outcome.content
                    return elapsed

                try:
                    for _ in range(10):
                        await direct_once()
                    direct = [await direct_once() for _ in range(calls)]
                finally:
                    await tools.aclose()
                    await engine.dispose()
        finally:
            await env.shutdown()
    d50, d95 = statistics.median(durable), percentile(durable, 0.95)
    x50 = statistics.median(direct)
    where = "in-process" if worker_in_process else "separate process"
    server = "platform settings" if tuned else "start-dev defaults"
    print(f"tool={tool} worker={where} gap={gap_ms:g} ms server={server} {' '.join(EXTRA)}")
    print(f"durable ms: p50 {d50:.1f}  p95 {d95:.1f}  max {max(durable):.1f}")
    print(f"direct  ms: p50 {x50:.1f}  p95 {percentile(direct, 0.95):.1f}")
    return (
        f"calls={calls} durable_p50_ms={d50:.1f} durable_p95_ms={d95:.1f} "
        f"direct_p50_ms={x50:.1f} added_p50_ms={d50 - x50:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument(
        "--tool", choices=["check_availability", "webhook"], default="check_availability"
    )
    parser.add_argument(
        "--worker-process", action="store_true", help="run the worker as its own process"
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=100.0,
        help="pause between durable calls (0: back to back, the workflow still busy "
        "publishing the previous call's tool.called event)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also print where the durable path's time goes (from the workflow history)",
    )
    parser.add_argument(
        "--server-defaults",
        action="store_true",
        help="run the dev server without the platform's settings (TEMPORAL_SERVER_TUNING "
        "in workers/supervisor.py), to compare; BENCH_TEMPORAL_ARGS adds flags either way",
    )
    args = parser.parse_args()
    line = asyncio.run(
        run(
            args.calls,
            args.tool,
            not args.worker_process,
            args.gap_ms,
            args.timeline,
            not args.server_defaults,
        )
    )
    print(line, flush=True)
    # The Temporal SDK can abort at interpreter exit (sdk-python #300): leave directly.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
