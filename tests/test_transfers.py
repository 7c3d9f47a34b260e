"""A transfer and continue-as-new, on the time-skipping server: the carrier's side is the
Twilio REST emulator (real wire protocol, driven by the real ``twilio`` SDK)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

from sqlmodel import Session, select
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from test_call_liveness import _ended_call, _make_call, _next_run, _signal, _turn

from activities.calls import CallActivities
from activities.telephony import TelephonyActivities
from builder_engine.calls import EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import CallEvent
from builder_engine.telephony import TwilioRest
from emulators.twilio_rest import TwilioRestEmulator
from workers.temporal_worker import build_worker
from workflows.transfers import TransferRequest, TransferResult
from workflows.types import MIN_HISTORY_LIMIT

DESK = "+15550001111"
UPDATE_ACCEPTED = "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED"
UPDATE_COMPLETED = "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED"


async def _turns(handle: WorkflowHandle[Any, Any], indexes: range) -> None:
    for index in indexes:
        await _signal(handle, "turns_committed", [_turn(index)])


async def test_a_transfer_is_not_cut_by_continue_as_new_and_its_reason_survives_it(
    time_skipping_env: WorkflowEnvironment, db_settings: Settings
) -> None:
    """A supervisor's warm transfer rings while the conversation's turns push the run past
    its history limit: the run does not continue as new until the transfer is done (its
    Update, and the ended reason it decides, belong to that run). Then it does, and when
    the media stream ends - which the realtime session reports as the caller leaving -
    the next run still records the call as ``transferred``. (Nothing here waits on the
    server's clock.)"""
    client = time_skipping_env.client
    sid = "CA" + secrets.token_hex(16)
    start = _make_call(db_settings, "twilio", carrier_call_id=sid, history_limit=MIN_HISTORY_LIMIT)
    engine = create_async_db_engine(db_settings)
    task_queue = f"calls-{uuid.uuid4().hex[:6]}"
    calls = CallActivities(engine)
    async with TwilioRestEmulator() as rest:
        rest.fate(DESK, "answered", after_ms=1_500)
        telephony = TelephonyActivities(
            calls.sessions, TwilioRest(rest.account_sid, rest.auth_token, rest.url)
        )
        try:
            async with build_worker(client, task_queue, calls, telephony=telephony):
                handle = await client.start_workflow(
                    "CallWorkflow", start, id=start.call_id, task_queue=task_queue
                )
                first_run_id = handle.first_execution_run_id or handle.result_run_id
                assert first_run_id
                await handle.signal("answered")
                async with asyncio.timeout(60):
                    transfer = asyncio.create_task(
                        handle.execute_update(
                            "supervisor_transfer",
                            TransferRequest(
                                start.call_id,
                                start.organization_id,
                                DESK,
                                mode="warm",
                                summary="Caller wants the front desk.",
                                ring_timeout_s=10,
                                requested_by="supervisor",
                            ),
                            result_type=TransferResult,
                        )
                    )
                    # While the desk's phone rings, the conversation goes on.
                    await _turns(handle, range(0, 120))
                    assert not transfer.done()
                    result = await transfer
                    assert result.status == "transferred", result
                    await _next_run(client, start.call_id, first_run_id)
                    await _turns(handle, range(120, 125))
                    # The caller is bridged to the desk: the stream ends.
                    await _signal(handle, "ended", str(EndedReason.CALLER_HANGUP))
                    ended = await _ended_call(client, start.call_id, first_run_id, db_settings)
        finally:
            await telephony.aclose()
            await engine.dispose()

    runs = ended.runs
    print(f"runs={len(runs)} events={[len(r) for r in runs]}")
    assert len(runs) >= 2
    first = runs[0]
    # The Update was accepted and completed in the first run, which grew past its limit
    # while the transfer rang rather than leave it behind.
    assert first.count(UPDATE_ACCEPTED) == first.count(UPDATE_COMPLETED) == 1
    assert first.count("transfer_call") == 1 and len(first) > MIN_HISTORY_LIMIT
    assert not any(UPDATE_ACCEPTED in run for run in runs[1:])
    assert ended.result["ended_reason"] == EndedReason.TRANSFERRED
    assert ended.result["turns_committed"] == 125
    assert ended.row.ended_reason == EndedReason.TRANSFERRED
    sync = create_sync_engine(db_settings)
    with Session(sync) as session:
        kinds = [
            e.kind
            for e in session.exec(select(CallEvent).where(CallEvent.call_id == start.call_id))
        ]
    sync.dispose()
    assert kinds.count("call.transferred") == 1
    (leg,) = [c for c in rest.created() if c.to == DESK]
    assert leg.status == "in-progress"  # bridged
