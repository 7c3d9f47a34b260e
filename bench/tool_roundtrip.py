"""What the durable path adds to a tool call, over running the tool in process.

    .venv/bin/python bench/tool_roundtrip.py --calls 200 [--tool check_availability|webhook]

Starts a Temporal dev server (SQLite), the platform's worker (in this process, or with
``--worker-process`` as ``builder-engine worker`` in its own) and a CallWorkflow for one
call whose agent has the tool. Then, one after the other:

* durable: the realtime side's path - ``TemporalCallLifecycle.run_tools`` (the
  ``run_tools`` Update: argument validation in the workflow, the tool as an activity -
  local for the built-ins, regular for webhooks - its execution row and call event);
* direct: the same tool implementation called in process (same database work, same
  HTTP request for a webhook), no Temporal.

Every call has a new tool call id, so every one really runs. The last line printed is
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
from workers.temporal_worker import build_worker
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


async def run(calls: int, tool: str, worker_in_process: bool, gap_ms: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            dev_server_log_level="error",
            dev_server_extra_args=["--db-filename", f"{tmp}/temporal.db", *EXTRA],
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
                    for _ in range(calls):
                        durable.append(await durable_once())
                        # In a call, tool rounds are an LLM request apart at least.
                        await asyncio.sleep(gap_ms / 1000)
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
    print(f"tool={tool} worker={where} gap={gap_ms:g} ms")
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
    args = parser.parse_args()
    line = asyncio.run(run(args.calls, args.tool, not args.worker_process, args.gap_ms))
    print(line, flush=True)
    # The Temporal SDK can abort at interpreter exit (sdk-python #300): leave directly.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
