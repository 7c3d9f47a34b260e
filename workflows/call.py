"""CallWorkflow: the durable record of one call, from start to end. Workflow id = call id.

The realtime worker signals lifecycle facts (answered, committed turns, ended); the
workflow persists them through local activities and keeps the call findable in the
Temporal UI by search attributes. Turns arrive batched (the realtime side sends what a
few seconds brought in one signal), so a long call's history stays small; each batch is
written in the workflow task that received it.

The call's own database writes (status, turns, events) are local activities: short,
idempotent, run inside the workflow task - a marker in the history instead of a
scheduled/started/completed activity and a second workflow task. On the dev server a
workflow task costs ~15 ms of server CPU and ~5 ms of worker CPU; at 100 concurrent
calls that is the difference between the Temporal side idling and taking a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from builder_engine.calls import CallStatus, EndedReason
    from workflows.events import publish_event
    from workflows.instances import SessionCommand, SessionStarted
    from workflows.liveness import (
        CallCarry,
        Liveness,
        ResumeState,
        history_turn,
    )
    from workflows.tools import ToolBatch, ToolBatchResult, ToolOutcome, ToolRunner
    from workflows.transfers import (
        CallControl,
        HangUpRequest,
        HangUpResult,
        TransferRequest,
        TransferResult,
    )
    from workflows.types import (
        MIN_HISTORY_LIMIT,
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

# After a supervisor's hang-up, how long the media side has to report the end.
SUPERVISOR_GRACE = timedelta(seconds=10)

# How long a workflow task of a call may run on a worker before another worker takes it.
# Tools run as local activities inside a workflow task, so this is also how soon a worker
# that died mid-tool is replaced (a tool that runs longer keeps its task alive: the SDK
# heartbeats it at 80 % of this). Not shorter than Temporal's default: on a saturated
# machine (60 churning calls on 2 cores) a fifth of the tasks of a starved worker took
# over 4 s, the longest 8.7 s, and a task that times out is run again from the start -
# more work for a worker that is already behind (docs/performance.md).
CALL_TASK_TIMEOUT = timedelta(seconds=10)

DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10)
)


# Outside the sandbox: this workflow is on the caller's path (every tool call is an
# Update here) and the sandbox's per-activation cost is ~3 ms of each tool round trip
# (docs/performance.md). Its code only uses the workflow API for time, randomness and
# I/O; tests/test_workflow_story.py replays a whole call's history inside the sandbox,
# which fails on any call the sandbox forbids.
@workflow.defn(name="CallWorkflow", sandboxed=False)
class CallWorkflow:
    @workflow.init
    def __init__(self, start: CallStart) -> None:
        self._status = CallStatus.RINGING
        self._pending: list[CommittedTurn] = []
        self._committed = 0
        self._answered = False
        self._ended_reason: str | None = None
        self._start: CallStart | None = None
        self._control = CallControl()
        self._tools = ToolRunner(self._control)
        self._liveness = Liveness()
        self._history: list[CommittedTurn] = []  # as heard, for a session taking over
        self._runs = 1
        self._history_limit = max(start.history_limit, MIN_HISTORY_LIMIT)
        # A continued call's state is in place before any handler runs: the signals that
        # reach a new run before its first task are handled before ``run`` starts, and
        # restoring the carried state there would overwrite what they brought.
        if start.carried is not None:
            self._restore(start.carried)

    @workflow.run
    async def run(self, start: CallStart) -> CallState:
        start = dataclasses.replace(start, carried=None)
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
            with contextlib.suppress(TimeoutError):  # a flush or heartbeat check is due
                await workflow.wait_condition(
                    functools.partial(self._due, self._liveness.moved_at),
                    timeout=self._wake_in(),
                )
            if self._answered_unrecorded():
                await self._record_status(start, CallStatus.IN_PROGRESS)
                await publish_event(
                    "call.started", call_id=start.call_id, organization_id=start.organization_id
                )
            await self._flush_turns(start)
            await self._tools.publish_pending()
            if self._ended_reason is None:
                await self._liveness.register(start.call_id)
            if self._ended_reason is None and self._liveness.overdue(workflow.now()):
                # The realtime process serving the call died: move the call.
                lost = await self._liveness.recover(start)
                if lost is not None and self._ended_reason is None:
                    self._ended_reason = lost
            if self._ended_reason is None and self._history_is_long():
                await self._continue_as_new()

        # A tool still running when the call ends finishes (and is recorded) first.
        await workflow.wait_condition(workflow.all_handlers_finished)
        # Off its process's watch list while the end is recorded: the signal's answer and
        # the post-call child's start come back together - a workflow task less a call.
        unregistered = asyncio.create_task(self._liveness.unregister(start.call_id))
        # A transfer that was redirecting the caller when the stream ended has finished now.
        self._ended_reason = self._control.ended_reason(self._ended_reason)
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
        await unregistered
        return self.state()

    def _due(self, moved_at: datetime | None) -> bool:
        """Something for the loop to do. ``moved_at``: when the wait began; a move that
        began during it (``restreaming``) needs its grace timed, and the wait's timeout was
        worked out before."""
        return (
            self._answered_unrecorded()
            or bool(self._pending)
            or self._ended_reason is not None
            or self._liveness.needs_attention()
            or self._liveness.moved_at != moved_at
            or self._continue_as_new_due()
        )

    def _wake_in(self) -> timedelta | None:
        return self._liveness.wake_in(workflow.now())

    def _history_is_long(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() >= self._history_limit
            or info.is_continue_as_new_suggested()
        )

    def _may_continue_as_new(self) -> bool:
        """Nothing a fresh run could not take over: the call goes on, and no Update (a tool
        batch, a transfer, a supervisor's hang-up) is running - its caller waits on this
        run, and a transfer's outcome decides the ended reason."""
        return (
            self._ended_reason is None
            and workflow.all_handlers_finished()
            and not self._control.in_progress
        )

    def _continue_as_new_due(self) -> bool:
        return self._history_is_long() and self._may_continue_as_new()

    async def _continue_as_new(self) -> None:
        """A long call goes on in a fresh run (same workflow id) carrying its state.

        The tool events still to publish go first (they are not carried; usually there
        are none). Then nothing is awaited between the last check and the command: what
        a signal changed meanwhile is in the carried state (turns not yet written
        included: the next run writes them), and a call that ended or an Update that
        started meanwhile keeps this run (the main loop sees to it; it continues as new
        later). A signal the server receives while the command is on its way makes the
        server refuse it: the workflow task runs again with that signal handled first,
        so the carried state has it.
        """
        await self._tools.publish_pending()
        if not self._may_continue_as_new():
            return
        assert self._start is not None
        workflow.continue_as_new(
            dataclasses.replace(self._start, carried=self._carry()),
            task_timeout=CALL_TASK_TIMEOUT,
        )

    def _carry(self) -> CallCarry:
        liveness = self._liveness
        return CallCarry(
            status=str(self._status),
            answered=self._answered,
            committed=self._committed,
            history=self._history,
            pending=self._pending,
            tool_outcomes=[dataclasses.asdict(o) for o in self._tools.finished_outcomes()],
            instance=liveness.instance,
            registered=liveness.registered,
            lost=liveness.lost,
            moves=liveness.moves,
            moved_at=liveness.moved_at,
            left=list(liveness.left),
            runs=self._runs,
            forced_reason=self._control.forced_reason,
        )

    def _restore(self, carried: CallCarry) -> None:
        self._status = CallStatus(carried.status)
        self._answered = carried.answered
        self._committed = carried.committed
        self._history = list(carried.history)
        self._pending = list(carried.pending)
        self._tools.restore([ToolOutcome(**o) for o in carried.tool_outcomes])
        self._liveness.restore(carried)
        self._control.forced_reason = carried.forced_reason
        self._runs = carried.runs + 1

    def _answered_unrecorded(self) -> bool:
        return self._answered and self._status == CallStatus.RINGING

    async def _record_status(
        self, start: CallStart, status: CallStatus, ended_reason: str | None = None
    ) -> None:
        self._status = status
        workflow.upsert_search_attributes([STATUS.value_set(str(status))])
        await workflow.execute_local_activity(
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
        await workflow.execute_local_activity(
            "save_call_turns",
            TurnBatch(start.call_id, start.organization_id, batch),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=DB_RETRY,
        )
        self._committed += len(batch)

    @workflow.signal
    def answered(self, session: SessionStarted | None = None) -> None:
        """A realtime session serves the call (again, after a move): from now on the call
        is watched through that process's beats."""
        self._answered = True
        if session is not None and self._ended_reason is None:
            self._liveness.session_started(session.instance_id, workflow.now())

    @workflow.signal
    def session_lost(self, instance_id: str) -> None:
        """The realtime process serving the call stopped beating (workflows/instances.py)."""
        self._liveness.session_lost(instance_id)

    @workflow.signal
    def restreaming(self) -> None:
        """The carrier streams the live call again (the API answered its stream's end):
        the session that serves it next says ``answered``."""
        self._liveness.carrier_restreams(workflow.now())

    @workflow.signal
    def turns_committed(self, turns: list[CommittedTurn]) -> None:
        self._pending.extend(turns)
        self._history.extend(history_turn(t) for t in turns)

    @workflow.query
    def resume_state(self) -> ResumeState:
        """The conversation so far, for a realtime session taking over the live call."""
        return ResumeState(self._call_id(), self._answered, list(self._history))

    @workflow.signal
    def ended(self, reason: str, instance_id: str | None = None) -> None:
        """``instance_id``: the realtime process whose session ended (None: the carrier
        or the API, which speak for the call itself)."""
        if instance_id is not None and self._liveness.moved_on_from(instance_id):
            # A session the call was moved away from (its process was cut off, not dead)
            # saw its stream close when the carrier followed the move. The call goes on.
            workflow.logger.warning(
                "call %s: the end (%s) from realtime process %s ignored: the call moved on",
                self._call_id(),
                reason,
                instance_id,
            )
            return
        if self._ended_reason is None:
            # After a transfer or a supervisor's hang-up, the stream's end is not the caller's.
            self._ended_reason = self._control.ended_reason(reason)

    @workflow.update
    async def supervisor_transfer(self, request: TransferRequest) -> TransferResult:
        """``POST /v1/calls/{id}/transfer``: move the caller to another number."""
        return await self._control.transfer(request)

    @supervisor_transfer.validator
    def _check_transfer(self, request: TransferRequest) -> None:
        if self._ended_reason is not None:
            raise ValueError("the call has ended")

    @workflow.update
    async def supervisor_hangup(self, request: HangUpRequest) -> HangUpResult:
        """``POST /v1/calls/{id}/hangup``: end the call (ended reason supervisor-hangup)."""
        result = await self._control.hang_up(request)
        if result.status == "ended":
            # A web call (no carrier): its session is told through its process, ends the
            # call and reports it (its last turn and audio included).
            told = await self._liveness.send_command(
                SessionCommand(self._call_id(), "end", EndedReason.SUPERVISOR_HANGUP)
            )
            if not told:
                self.ended(EndedReason.SUPERVISOR_HANGUP)
        # The carrier ends the media stream (or the session the call) and the session
        # reports it; should no session be serving the call, end it here after a while.
        try:
            await workflow.wait_condition(
                lambda: self._ended_reason is not None, timeout=SUPERVISOR_GRACE
            )
        except TimeoutError:
            self.ended(EndedReason.SUPERVISOR_HANGUP)
        return result

    def _call_id(self) -> str:
        return self._start.call_id if self._start is not None else workflow.info().workflow_id

    @supervisor_hangup.validator
    def _check_hangup(self, request: HangUpRequest) -> None:
        if self._ended_reason is not None:
            raise ValueError("the call has ended")

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
