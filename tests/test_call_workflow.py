"""CallWorkflow on the time-skipping test server, writing to a real database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from histories import activities_run
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from activities.calls import CallActivities
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Agent, Call, CallTurn, Organization
from workers.temporal_worker import build_worker
from workflows.types import CallStart, CommittedTurn


def _make_call(settings: Settings) -> CallStart:
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        org = Organization(name=f"org-{uuid.uuid4().hex[:8]}")
        agent = Agent(organization_id=org.id, name="a", published_version=1)
        call = Call(
            organization_id=org.id,
            agent_id=agent.id,
            agent_version=1,
            direction="inbound",
            from_number="+14155550100",
            to_number="+14155550111",
        )
        session.add(org)
        session.flush()
        session.add(agent)
        session.flush()
        session.add(call)
        session.commit()
        start = CallStart(
            call_id=call.id,
            organization_id=org.id,
            agent_id=agent.id,
            agent_version=1,
            direction="inbound",
        )
    engine.dispose()
    return start


def _turn(index: int) -> CommittedTurn:
    speaker = "caller" if index % 2 == 0 else "agent"
    return CommittedTurn(
        index=index,
        speaker=speaker,
        text=f"turn {index}",
        interrupted=index == 3,
        started_at=datetime.now(UTC),
        latency={"voice_to_voice_ms": 412.0} if index % 2 else {},
    )


BIG_BATCH = 20


async def _call_through_a_worker(
    client: Client, settings: Settings, signals: list[tuple[Any, ...]]
) -> tuple[CallStart, Any, WorkflowHistory]:
    """A call's workflow on the platform's worker, sent ``signals`` (name, args...) in
    order; its start, result and history once it has ended."""
    start = _make_call(settings)
    engine = create_async_db_engine(settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    try:
        async with build_worker(client, task_queue, CallActivities(engine)):
            handle = await client.start_workflow(
                "CallWorkflow", start, id=start.call_id, task_queue=task_queue
            )
            for name, *args in signals:
                await handle.signal(name, *args)
            return start, await handle.result(), await handle.fetch_history()
    finally:
        await engine.dispose()


async def test_call_workflow_records_the_call_and_its_turn_batches(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    start, result, history = await _call_through_a_worker(
        time_skipping_env.client,
        db_settings,
        [
            ("answered",),
            ("turns_committed", [_turn(0), _turn(1)]),
            ("turns_committed", [_turn(i) for i in range(2, 2 + BIG_BATCH)]),
            ("ended", str(EndedReason.CALLER_HANGUP)),
            ("ended", str(EndedReason.MAX_DURATION)),  # the first reason wins
        ],
    )

    assert result["status"] == CallStatus.ENDED
    assert result["turns_committed"] == 2 + BIG_BATCH
    sync = create_sync_engine(db_settings)
    with Session(sync) as session:
        call = session.exec(select(Call).where(Call.id == start.call_id)).one()
        turns = session.exec(
            select(CallTurn).where(CallTurn.call_id == start.call_id).order_by(col(CallTurn.index))
        ).all()
    sync.dispose()
    assert call.status == CallStatus.ENDED
    assert call.ended_reason == EndedReason.CALLER_HANGUP
    assert call.answered_at is not None and call.ended_at is not None
    assert [t.index for t in turns] == list(range(2 + BIG_BATCH))
    assert turns[3].interrupted and turns[1].latency == {"voice_to_voice_ms": 412.0}
    # The call's writes are local activities: status twice (answered, ended), the
    # call.started event, and one write per signalled batch (signals that reach one
    # workflow task together make one write), never one per turn.
    activities = activities_run(history)
    assert activities_run(history, local=False) == []
    assert activities.count("record_call_status") == 2
    assert activities.count("record_call_event") == 1
    assert 1 <= activities.count("save_call_turns") <= 2


async def test_saving_a_batch_twice_stores_each_turn_once(db_settings: Settings) -> None:
    start = _make_call(db_settings)
    engine = create_async_db_engine(db_settings)
    activities = CallActivities(engine)
    from workflows.types import TurnBatch

    batch = TurnBatch(start.call_id, start.organization_id, [_turn(0), _turn(1)])
    try:
        assert await activities.save_call_turns(batch) == 2
        assert await activities.save_call_turns(batch) == 0
    finally:
        await engine.dispose()


async def test_turns_for_an_unknown_call_or_another_organization_are_refused(
    db_settings: Settings,
) -> None:
    from temporalio.exceptions import ApplicationError

    from workflows.types import TurnBatch

    start = _make_call(db_settings)
    engine = create_async_db_engine(db_settings)
    activities = CallActivities(engine)
    try:
        for call_id, organization_id in [
            ("call_unknown", start.organization_id),
            (start.call_id, "org_someone_else"),
        ]:
            with pytest.raises(ApplicationError, match="does not exist") as refused:
                await activities.save_call_turns(TurnBatch(call_id, organization_id, [_turn(0)]))
            assert refused.value.non_retryable
        assert (
            await activities.save_call_turns(
                TurnBatch(start.call_id, start.organization_id, [_turn(0)])
            )
            == 1
        )  # nothing of the refused batches was stored
    finally:
        await engine.dispose()


async def test_a_burst_of_writes_with_cancellations_leaves_the_database_writable(
    db_settings: Settings,
) -> None:
    """A hundred calls ending at once: their turn and status writes all land, writes
    cancelled mid-flight (an activity timing out) neither lose the others nor leave the
    database locked, and the next write goes through at once."""
    import asyncio
    import time

    from workflows.types import CallStatusChange, TurnBatch

    starts = [_make_call(db_settings) for _ in range(40)]
    engine = create_async_db_engine(db_settings)
    activities = CallActivities(engine)
    try:

        async def wrap_up(start: CallStart) -> int:
            batch = TurnBatch(start.call_id, start.organization_id, [_turn(0), _turn(1)])
            saved = await activities.save_call_turns(batch)
            await activities.record_call_status(
                CallStatusChange(
                    start.call_id,
                    start.organization_id,
                    CallStatus.ENDED,
                    datetime.now(UTC),
                    EndedReason.CALLER_HANGUP,
                )
            )
            return saved

        doomed = [asyncio.create_task(wrap_up(start)) for start in starts[:20]]
        kept = [asyncio.create_task(wrap_up(start)) for start in starts[20:]]
        await asyncio.sleep(0.005)
        for task in doomed:
            task.cancel()
        async with asyncio.timeout(30):
            assert await asyncio.gather(*kept) == [2] * 20
            await asyncio.gather(*doomed, return_exceptions=True)
        began = time.monotonic()
        async with asyncio.timeout(10):
            again = TurnBatch(starts[0].call_id, starts[0].organization_id, [_turn(2)])
            assert await activities.save_call_turns(again) == 1
        assert time.monotonic() - began < 2.0
    finally:
        await engine.dispose()
    sync = create_sync_engine(db_settings)
    with Session(sync) as session:
        ids = [start.call_id for start in starts[20:]]
        ended = session.exec(select(Call).where(col(Call.id).in_(ids))).all()
        assert len(ended) == 20 and all(c.status == CallStatus.ENDED for c in ended)
    sync.dispose()


async def test_the_worker_serves_its_task_and_activity_latencies_as_prometheus_metrics(
    time_skipping_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """``BUILDER_WORKER_METRICS_ADDRESS``: the SDK's histograms, with buckets fine enough
    to tell a millisecond write from a queued one."""
    import httpx
    from ports import free_port

    from builder_engine.db.migrate import upgrade
    from builder_engine.temporal_setup import connect, metrics_runtime

    address = f"127.0.0.1:{free_port()}"
    target = time_skipping_env.client.service_client.config.target_host
    settings = Settings(data_dir=tmp_path, temporal_address=target, _env_file=None)
    upgrade(settings)
    client = await connect(settings, runtime=metrics_runtime(address))
    await _call_through_a_worker(
        client,
        settings,
        [
            ("answered",),
            ("turns_committed", [_turn(0), _turn(1)]),
            ("ended", str(EndedReason.CALLER_HANGUP)),
        ],
    )
    async with httpx.AsyncClient() as http:  # the runtime serves them, worker or not
        metrics = (await http.get(f"http://{address}/metrics")).text

    buckets = [
        line
        for line in metrics.splitlines()
        if line.startswith("temporal_local_activity_execution_latency_bucket{")
        and 'activity_type="save_call_turns"' in line
    ]
    assert any('le="2"' in line for line in buckets), buckets  # ours, not the SDK's default
    assert any(line.endswith(" 1") for line in buckets if 'le="+Inf"' in line), buckets
    assert 'workflow_type="CallWorkflow"' in metrics
