"""Tool calls through the CallWorkflow's ``run_tools`` Update on a real Temporal dev server,
with the real tool activities, a real database and a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import pytest
from histories import activities_run, local_activities
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from tools_support import ToolReceiver, seed_call, tool_call_id

from activities.calls import CallActivities
from activities.tools import idempotency_key
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.migrate import upgrade
from builder_engine.db.models import CallEvent, ToolExecution
from builder_engine.temporal_setup import ensure_search_attributes
from conftest import installed_binary
from workers.temporal_worker import build_worker
from workflows.tools import ToolBatch, ToolBatchResult, ToolInvocation
from workflows.types import CallStart


@pytest.fixture(scope="module")
async def temporal() -> AsyncIterator[Client]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"), dev_server_log_level="error"
    )
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        yield env.client
    finally:
        await env.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(data_dir=tmp_path_factory.mktemp("tools-wf"), _env_file=None)
    upgrade(settings)
    return settings


@pytest.fixture(scope="module")
async def worker(temporal: Client, settings: Settings) -> AsyncIterator[str]:
    engine = create_async_db_engine(settings)
    queue = f"tools-{secrets.token_hex(4)}"
    try:
        async with build_worker(temporal, queue, CallActivities(engine)):
            yield queue
    finally:
        await engine.dispose()


@pytest.fixture
async def receiver() -> AsyncIterator[ToolReceiver]:
    async with ToolReceiver() as r:
        yield r


async def start(temporal: Client, queue: str, call: CallStart) -> WorkflowHandle[object, object]:
    return await temporal.start_workflow("CallWorkflow", call, id=call.call_id, task_queue=queue)


async def run_tools(
    handle: WorkflowHandle[object, object], *calls: ToolInvocation
) -> ToolBatchResult:
    result: ToolBatchResult = await handle.execute_update(
        "run_tools", ToolBatch(list(calls)), result_type=ToolBatchResult
    )
    return result


def rows(settings: Settings, call_id: str) -> tuple[list[ToolExecution], list[CallEvent]]:
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            executions = session.exec(
                select(ToolExecution)
                .where(ToolExecution.call_id == call_id)
                .order_by(col(ToolExecution.tool_call_id))
            ).all()
            events = session.exec(select(CallEvent).where(CallEvent.call_id == call_id)).all()
            return list(executions), list(events)
    finally:
        engine.dispose()


async def test_parallel_calls_validated_arguments_and_errors_for_the_model(
    temporal: Client, worker: str, settings: Settings, receiver: ToolReceiver
) -> None:
    url = receiver.on("/orders", delay_s=0.6)
    seeded = seed_call(
        settings,
        [
            {"name": "lookup_order", "kind": "webhook", "url": url},
            {"name": "check_availability", "kind": "check_availability"},
            {"name": "transfer", "kind": "transfer_call"},
        ],
    )
    handle = await start(temporal, worker, seeded.start)
    ids = [tool_call_id() for _ in range(7)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await run_tools(
        handle,
        ToolInvocation(ids[0], "lookup_order", json.dumps({"order": "1234"})),
        ToolInvocation(ids[1], "lookup_order", json.dumps({"order": "5678"})),
        ToolInvocation(ids[2], "lookup_order", json.dumps({"order": "12"})),  # pattern
        ToolInvocation(ids[3], "lookup_order", '{"order": '),  # not JSON
        ToolInvocation(ids[4], "check_availability", json.dumps({"date": "next tuesday"})),
        ToolInvocation(ids[5], "fly_to_moon", "{}"),
        ToolInvocation(ids[6], "transfer", "{}"),
    )
    elapsed = loop.time() - began
    outcomes = {o.tool_call_id: o for o in result.outcomes}
    assert [o.tool_call_id for o in result.outcomes] == ids  # in the model's order

    # The two valid webhook calls ran in parallel: one delay, not two.
    assert outcomes[ids[0]].ok and outcomes[ids[1]].ok
    assert json.loads(outcomes[ids[0]].content) == {"status": "shipped", "eta": "Monday"}
    assert elapsed < 1.1, elapsed
    starts = sorted(r.at for r in receiver.to("/orders"))
    assert len(starts) == 2 and starts[1] - starts[0] < 0.3
    assert {r.body["arguments"]["order"] for r in receiver.received} == {"1234", "5678"}
    assert all(r.signed for r in receiver.received)

    # Bad calls are answered, not raised: the model reads what to fix.
    for bad, phrase in [
        (ids[2], "does not match"),
        (ids[3], "not valid JSON"),
        (ids[4], "is not a 'date'"),
        (ids[5], "no tool named 'fly_to_moon'"),
        (ids[6], "not set up"),
    ]:
        assert not outcomes[bad].ok
        assert phrase in json.loads(outcomes[bad].content)["error"], outcomes[bad].content

    executions, _ = rows(settings, seeded.start.call_id)
    # Invalid calls never reach an activity; the rest are recorded once each.
    assert sorted(e.tool_call_id for e in executions) == sorted([ids[0], ids[1], ids[6]])
    assert {e.status for e in executions} == {"succeeded", "failed"}

    await handle.signal("ended", "caller-hangup")
    await handle.result()
    # Each call that ran is a tool.called event (published in the background).
    _, events = rows(settings, seeded.start.call_id)
    called = {e.data["tool_call_id"]: e.data for e in events if e.kind == "tool.called"}
    assert sorted(called) == sorted([ids[0], ids[1], ids[6]])
    assert called[ids[0]]["ok"] and called[ids[0]]["arguments"] == {"order": "1234"}
    assert not called[ids[6]]["ok"]
    history = await handle.fetch_history()
    # Every tool is a local activity named after its kind, its id the tool call's, the
    # tool's name in its summary; load_call_tools ran once (the call's own writes are
    # local activities too); nothing ran as a regular activity.
    local = local_activities(history)
    assert [m["activity_type"] for m in local].count("load_call_tools") == 1
    assert sorted(
        (m["activity_type"], m["activity_id"], m["summary"])
        for m in local
        if m["activity_type"].startswith("tool.")
    ) == sorted(
        [
            ("tool.webhook", f"tool:{ids[0]}", "lookup_order (webhook)"),
            ("tool.webhook", f"tool:{ids[1]}", "lookup_order (webhook)"),
            ("tool.transfer_call", f"tool:{ids[6]}", "transfer (transfer_call)"),
        ]
    )
    assert activities_run(history, local=False) == []


async def test_a_tool_call_runs_once_however_often_it_is_asked(
    temporal: Client, worker: str, settings: Settings, receiver: ToolReceiver
) -> None:
    url = receiver.on("/orders")
    seeded = seed_call(settings, [{"name": "lookup_order", "kind": "webhook", "url": url}])
    handle = await start(temporal, worker, seeded.start)
    call = ToolInvocation(tool_call_id(), "lookup_order", json.dumps({"order": "1234"}))
    first = await run_tools(handle, call)
    again = await handle.execute_update(
        "run_tools", ToolBatch([call]), id="asked-again", result_type=ToolBatchResult
    )
    assert first == again
    assert len(receiver.received) == 1
    assert receiver.received[0].key == idempotency_key(seeded.start.call_id, call.id)
    await handle.signal("ended", "caller-hangup")
    await handle.result()


async def test_the_call_ends_only_after_its_running_tools(
    temporal: Client, worker: str, settings: Settings, receiver: ToolReceiver
) -> None:
    url = receiver.on("/slow", delay_s=1.0)
    seeded = seed_call(settings, [{"name": "slow", "kind": "webhook", "url": url}])
    handle = await start(temporal, worker, seeded.start)
    call = ToolInvocation(tool_call_id(), "slow", json.dumps({"order": "1234"}))
    update = asyncio.create_task(run_tools(handle, call))
    await receiver.arrived.wait()
    await handle.signal("ended", "caller-hangup")  # the caller hangs up mid-tool
    await handle.result()
    executions, _ = rows(settings, seeded.start.call_id)
    assert [e.status for e in executions] == ["succeeded"]
    assert (await update).outcomes[0].ok
    # A tool asked for after the end is refused before it reaches the history.
    with pytest.raises(Exception, match=r"ended|completed"):
        await run_tools(handle, ToolInvocation(tool_call_id(), "slow", '{"order": "1"}'))


async def test_failing_slow_and_refused_webhooks_give_clear_errors(
    temporal: Client, worker: str, settings: Settings, receiver: ToolReceiver
) -> None:
    seeded = seed_call(
        settings,
        [
            # Idempotent by key: retried (3 attempts), then an error result.
            {"name": "flaky", "kind": "webhook", "url": receiver.on("/flaky", status=503)},
            # Neither safe to retry nor deduplicating: one attempt only.
            {
                "name": "slow",
                "kind": "webhook",
                "url": receiver.on("/slow", delay_s=2.0),
                "timeout_s": 0.5,
                "honors_idempotency_key": False,
            },
            {"name": "metadata", "kind": "webhook", "url": "http://169.254.169.254/latest/"},
            {"name": "rejected", "kind": "webhook", "url": receiver.on("/reject", status=400)},
        ],
    )
    handle = await start(temporal, worker, seeded.start)
    ids = [tool_call_id() for _ in range(4)]
    args = json.dumps({"order": "1234"})
    result = await run_tools(
        handle,
        ToolInvocation(ids[0], "flaky", args),
        ToolInvocation(ids[1], "slow", args),
        ToolInvocation(ids[2], "metadata", args),
        ToolInvocation(ids[3], "rejected", args),
    )
    errors = [json.loads(o.content)["error"] for o in result.outcomes]
    assert not any(o.ok for o in result.outcomes)
    assert "answered HTTP 503" in errors[0]
    assert len(receiver.to("/flaky")) == 3  # all with the same key
    assert len({r.key for r in receiver.to("/flaky")}) == 1
    assert "did not answer within 0.5 s" in errors[1]
    assert len(receiver.to("/slow")) == 1
    assert "private, loopback or link-local" in errors[2]
    assert "answered HTTP 400" in errors[3] and len(receiver.to("/reject")) == 1
    executions, _ = rows(settings, seeded.start.call_id)
    assert [e.status for e in executions] == ["failed"] * 4
    await handle.signal("ended", "caller-hangup")
    await handle.result()
