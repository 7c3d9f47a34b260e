"""CallWorkflow: the durable record of one call, from start to end. Workflow id = call id.

The realtime worker signals lifecycle facts (answered, committed turns, ended); the
workflow persists them through activities, batching turns so a long call's history
stays small, and keeps the call findable in the Temporal UI by search attributes.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from builder_engine.calls import CallStatus
    from workflows.events import publish_event
    from workflows.tools import ToolBatch, ToolBatchResult, ToolRunner
    from workflows.types import (
        CallStart,
        CallState,
        CallStatusChange,
        CommittedTurn,
        PostCallInput,
        TurnBatch,
    )

STATUS = SearchAttributeKey.for_keyword("BuilderCallStatus")
AGENT_ID = SearchAttributeKey.for_keyword("BuilderAgentId")
DIRECTION = SearchAttributeKey.for_keyword("BuilderDirection")
CAMPAIGN_ID = SearchAttributeKey.for_keyword("BuilderCampaignId")
ENDED_REASON = SearchAttributeKey.for_keyword("BuilderEndedReason")

# Turns are written at most this often (or when this many are waiting).
TURN_FLUSH_INTERVAL = timedelta(seconds=5)
TURN_FLUSH_SIZE = 20

DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10)
)


@workflow.defn(name="CallWorkflow")
class CallWorkflow:
    def __init__(self) -> None:
        self._status = CallStatus.RINGING
        self._pending: list[CommittedTurn] = []
        self._committed = 0
        self._answered = False
        self._ended_reason: str | None = None
        self._start: CallStart | None = None
        self._tools = ToolRunner()

    @workflow.run
    async def run(self, start: CallStart) -> CallState:
        self._start = start
        updates = [
            STATUS.value_set(str(self._status)),
            AGENT_ID.value_set(start.agent_id),
            DIRECTION.value_set(start.direction),
        ]
        if start.campaign_id:
            updates.append(CAMPAIGN_ID.value_set(start.campaign_id))
        workflow.upsert_search_attributes(updates)

        while self._ended_reason is None:
            await workflow.wait_condition(
                lambda: (
                    self._answered_unrecorded()
                    or len(self._pending) >= TURN_FLUSH_SIZE
                    or self._ended_reason is not None
                ),
                timeout=TURN_FLUSH_INTERVAL if self._pending else None,
            )
            if self._answered_unrecorded():
                await self._record_status(start, CallStatus.IN_PROGRESS)
                await publish_event(
                    "call.started", call_id=start.call_id, organization_id=start.organization_id
                )
            await self._flush_turns(start)
            await self._tools.publish_pending()

        # A tool still running when the call ends finishes (and is recorded) first.
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._tools.drain()
        await self._flush_turns(start)
        await self._record_status(start, CallStatus.ENDED, self._ended_reason)
        workflow.upsert_search_attributes([ENDED_REASON.value_set(self._ended_reason)])
        # The paperwork (recording, analysis, call.ended/call.analyzed webhooks) runs on
        # after the call's own workflow has closed.
        await workflow.start_child_workflow(
            "PostCallWorkflow",
            PostCallInput(
                call_id=start.call_id,
                organization_id=start.organization_id,
                agent_id=start.agent_id,
                agent_version=start.agent_version,
                ended_reason=self._ended_reason,
                turns_committed=self._committed,
            ),
            id=f"{start.call_id}-post-call",
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            static_summary="recording, transcript check, analysis, call.ended + call.analyzed",
        )
        return self.state()

    def _answered_unrecorded(self) -> bool:
        return self._answered and self._status == CallStatus.RINGING

    async def _record_status(
        self, start: CallStart, status: CallStatus, ended_reason: str | None = None
    ) -> None:
        self._status = status
        workflow.upsert_search_attributes([STATUS.value_set(str(status))])
        await workflow.execute_activity(
            "record_call_status",
            CallStatusChange(
                start.call_id, start.organization_id, str(status), workflow.now(), ended_reason
            ),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=DB_RETRY,
        )

    async def _flush_turns(self, start: CallStart) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        await workflow.execute_activity(
            "save_call_turns",
            TurnBatch(start.call_id, start.organization_id, batch),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=DB_RETRY,
        )
        self._committed += len(batch)

    @workflow.signal
    def answered(self) -> None:
        self._answered = True

    @workflow.signal
    def turns_committed(self, turns: list[CommittedTurn]) -> None:
        self._pending.extend(turns)

    @workflow.signal
    def ended(self, reason: str) -> None:
        if self._ended_reason is None:
            self._ended_reason = reason

    @workflow.update
    async def run_tools(self, batch: ToolBatch) -> ToolBatchResult:
        """Run the model's tool calls (validated, in parallel) and return their results."""
        await workflow.wait_condition(lambda: self._start is not None)
        assert self._start is not None
        return await self._tools.run(self._start, batch)

    @run_tools.validator
    def _check_tools(self, batch: ToolBatch) -> None:
        if self._ended_reason is not None:
            raise ValueError("the call has ended")
        ToolRunner.check_batch(batch)

    @workflow.query
    def state(self) -> CallState:
        return CallState(
            status=str(self._status),
            turns_committed=self._committed + len(self._pending),
            ended_reason=self._ended_reason,
        )
