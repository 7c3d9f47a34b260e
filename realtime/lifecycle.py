"""Telling the call's durable workflow what happened, without ever blocking the audio loop.

Signals are queued and sent by one background task per call. Committed turns travel
by exchange: a caller's turn waits for the agent's answer (up to ``TURN_BATCH_S``), and
the answer's turn takes it along - one signal per exchange instead of one per turn
(every signal costs the Temporal side a workflow task; a signal per turn was most of its
load at 100 calls). Any other signal - the end above all - takes waiting turns along
first. A process that dies loses at most the exchange in progress; the call resumes
from every exchange before it.
The session only calls the non-blocking methods - except ``run_tools``, the
one place the conversation itself waits on the workflow (for tool results), which the
session awaits inside its answer task, never in the audio path.

The other way round: the call's workflow can end the session. A supervisor who hangs up
a web call (no carrier to tell) has the workflow send an ``end`` command through this
process's RealtimeInstanceWorkflow (realtime/instance.py); it arrives with the next
beat, within about a second, and the lifecycle calls the session's
``on_workflow_closed`` callback with the reason. And should the workflow have closed
anyway (terminated, given up as lost), signals to it fail with NOT_FOUND ("workflow
execution already completed"); the lifecycle then describes the workflow and, once it
is really closed - not a transient error, not a workflow that does not exist (yet), not
a continue-as-new - reads the ended reason from its result and calls the same
callback, once.

Liveness is not per call: the process beats once for all of its calls (see
workflows/instances.py); ``answered`` tells the CallWorkflow which process serves it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from builder_engine.calls import EndedReason
from realtime.instance import WORKFLOW_CLOSED, RealtimeInstance
from realtime.updates import cancellation_kept
from workflows.instances import SessionCommand, SessionStarted
from workflows.tools import ToolBatch, ToolBatchResult
from workflows.types import CallState, CommittedTurn

log = logging.getLogger(__name__)


class CallLifecycle(Protocol):
    def answered(self) -> None: ...

    def commit_turn(self, turn: CommittedTurn) -> None: ...

    def ended(self, reason: str) -> None: ...

    def handed_over(self) -> None:
        """The session stops and the call goes on, elsewhere (this process shuts down):
        instead of ``ended``. What was committed is still delivered by ``aclose``."""

    def on_workflow_closed(self, callback: Callable[[str], None]) -> None:
        """Have ``callback(ended_reason)`` called (once) should the call's workflow close
        while the session is live - before the session reported its own end."""
        ...

    async def run_tools(self, batch: ToolBatch, *, timeout_s: float) -> ToolBatchResult:
        """Have the workflow run the tool calls; their results (raises ``TimeoutError``)."""
        ...

    async def aclose(self) -> None:
        """Deliver everything queued (the end included), then stop."""


_TRANSIENT = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.INTERNAL,
    }
)


_CLOSED = frozenset(
    {
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.CANCELED,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.TIMED_OUT,
    }
)
#: Longest a caller's committed turn waits for the agent's answer to share its signal.
TURN_BATCH_S = 5.0
#: How long the end of a call is retried (the workflow waits for it: without it the call
#: stays open). Other signals give up after a few attempts.
ENDED_DELIVERY_S = 600.0
#: How long ``aclose`` waits for the queue to drain before leaving the rest to the
#: process (``RealtimeInstance.keep``).
CLOSE_WAIT_S = 10.0
#: Longest wait for the describe and result calls that tell whether the workflow closed.
CLOSED_CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Signal:
    name: str
    args: tuple[object, ...] = ()


class TemporalCallLifecycle:
    """Signals the call's CallWorkflow (workflow id = call id)."""

    def __init__(
        self,
        client: Client,
        call_id: str,
        *,
        batch_delay_s: float = TURN_BATCH_S,
        instance: RealtimeInstance | None = None,
        on_workflow_closed: Callable[[str], None] | None = None,
    ) -> None:
        self._handle = client.get_workflow_handle(call_id, result_type=CallState)
        self._on_closed = on_workflow_closed
        #: The call's ended reason once its workflow is known to have closed.
        self.workflow_closed: str | None = None
        self._session_ended = False
        self._queue: asyncio.Queue[_Signal | None] = asyncio.Queue()
        self._batch_delay_s = batch_delay_s
        self._instance = instance
        self._closing_check: asyncio.Task[bool] | None = None
        self._task = asyncio.create_task(self._deliver(), name=f"lifecycle-{call_id}")

    def answered(self) -> None:
        instance = self._instance
        if instance is None:
            self._queue.put_nowait(_Signal("answered"))
            return
        # From now on the workflow watches this process's beats for the call, and this
        # session hears the commands its workflow sends.
        instance.register(self._handle.id, self._on_command)
        self._queue.put_nowait(_Signal("answered", (SessionStarted(instance.instance_id),)))

    def commit_turn(self, turn: CommittedTurn) -> None:
        self._queue.put_nowait(_Signal("turns_committed", (turn,)))

    def ended(self, reason: str) -> None:
        self._session_ended = True
        self._leave_instance()
        # Which process says so: a call moved away from this one ignores its end.
        instance = self._instance.instance_id if self._instance is not None else None
        self._queue.put_nowait(_Signal("ended", (reason, instance)))

    def handed_over(self) -> None:
        self._session_ended = True
        if self._instance is not None:
            self._instance.hand_over(self._handle.id)

    def on_workflow_closed(self, callback: Callable[[str], None]) -> None:
        self._on_closed = callback

    def _leave_instance(self) -> None:
        if self._instance is not None:
            self._instance.unregister(self._handle.id)

    def _on_command(self, command: SessionCommand) -> None:
        if command.action == WORKFLOW_CLOSED:
            # Its run closed: for good (terminated, say), or continued as new? Ask.
            if self._closing_check is None or self._closing_check.done():
                self._closing_check = asyncio.create_task(self._check_closed())
            return
        if command.action != "end":
            log.warning("call %s: unknown command %r ignored", self._handle.id, command.action)
            return
        log.info("call %s: its workflow ends the call (%s)", self._handle.id, command.reason)
        self._tell_session(command.reason)

    def _tell_session(self, reason: str) -> None:
        if self._on_closed is not None and not self._session_ended:
            self._session_ended = True
            try:
                self._on_closed(reason)
            except Exception:
                log.exception("call %s: the end callback failed", self._handle.id)

    async def run_tools(self, batch: ToolBatch, *, timeout_s: float) -> ToolBatchResult:
        """The ``run_tools`` Update, asked again with the same update id until it answers:
        Temporal runs an update id once per workflow, so asking again (a lost connection,
        a restarting worker) never runs the tools twice."""
        ids = ",".join(call.id for call in batch.calls)
        update_id = "tools-" + hashlib.sha256(ids.encode()).hexdigest()[:24]

        async def ask() -> ToolBatchResult:
            attempt = 0
            while True:
                try:
                    with cancellation_kept():  # a barge-in or the timeout below
                        result: ToolBatchResult = await self._handle.execute_update(
                            "run_tools", batch, id=update_id, result_type=ToolBatchResult
                        )
                    return result
                except WorkflowUpdateRPCTimeoutOrCancelledError:
                    pass  # the long poll ran out; the update goes on
                except RPCError as exc:
                    if exc.status not in _TRANSIENT:
                        raise
                    log.warning("run_tools on %s: %s; asking again", self._handle.id, exc)
                attempt += 1
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))

        async with asyncio.timeout(timeout_s):
            return await ask()

    async def aclose(self) -> None:
        self._leave_instance()
        self._queue.put_nowait(None)
        await asyncio.wait({self._task}, timeout=CLOSE_WAIT_S)
        if not self._task.done():
            if self._instance is not None:
                # The session goes; its end is still on its way, retried in the background.
                log.warning("call %s: its end is still being delivered", self._handle.id)
                self._instance.keep(self._task)
            else:
                log.error("gave up delivering call signals to %s", self._handle.id)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._closing_check is not None:
            await asyncio.gather(self._closing_check, return_exceptions=True)
        # The session is done: let go of its method (a cycle through the session
        # otherwise, freed only by a full GC pass - see realtime/collector.py).
        self._on_closed = None

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        turns: list[object] = []
        due: float | None = None  # when the oldest held turn must go
        while True:
            try:
                async with asyncio.timeout_at(due):
                    item = await self._queue.get()
            except TimeoutError:
                await self._send("turns_committed", turns)
                turns, due = [], None
                continue
            if item is not None and item.name == "turns_committed":
                [turn] = item.args
                turns.append(turn)
                if isinstance(turn, CommittedTurn) and turn.speaker == "agent":
                    await self._send("turns_committed", turns)  # an exchange is complete
                    turns, due = [], None
                elif due is None:
                    due = loop.time() + self._batch_delay_s
                continue
            if turns:  # in order: the turns before what came after them
                await self._send("turns_committed", turns)
                turns, due = [], None
            if item is None:
                return
            await self._send(item.name, *item.args)

    async def _send(self, name: str, *args: object) -> None:
        loop = asyncio.get_running_loop()
        # The end must arrive: the workflow waits for it.
        give_up_at = loop.time() + ENDED_DELIVERY_S if name == "ended" else None
        attempt = 0
        while attempt < 5 or (give_up_at is not None and loop.time() < give_up_at):
            if self.workflow_closed is not None:
                return  # nobody listens any more
            try:
                await self._handle.signal(name, args=list(args))
                return
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND and await self._check_closed():
                    log.info(
                        "signal %s to %s dropped: its workflow has closed", name, self._handle.id
                    )
                    return
                error: Exception = exc
            except Exception as exc:
                error = exc
            attempt += 1
            log.warning(
                "signal %s to %s failed (%s), attempt %d", name, self._handle.id, error, attempt
            )
            await asyncio.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        log.error("signal %s to %s not delivered: gave up", name, self._handle.id)

    async def _check_closed(self) -> bool:
        """Has the call's workflow closed (for good)? If so, tell the session, once.

        NOT_FOUND also means a workflow that does not exist (yet), and a closed run may
        have continued as new: only a closed latest run counts. Errors asking are
        transient: the next signal asks again."""
        try:
            async with asyncio.timeout(CLOSED_CHECK_TIMEOUT_S):
                status = (await self._handle.describe()).status
                if status not in _CLOSED:
                    return False
                reason: str = EndedReason.FAILED
                if status == WorkflowExecutionStatus.COMPLETED:
                    state = await self._handle.result()
                    reason = state.ended_reason or EndedReason.FAILED
                elif status == WorkflowExecutionStatus.CANCELED:
                    reason = EndedReason.CANCELED
        except Exception as exc:  # RPCError, TimeoutError, a result that does not decode
            log.warning(
                "call %s: could not tell whether its workflow closed: %s", self._handle.id, exc
            )
            return False
        if self.workflow_closed is not None:
            return True
        self.workflow_closed = reason
        self._leave_instance()
        log.info("call %s: its workflow has closed (%s)", self._handle.id, reason)
        self._tell_session(reason)
        return True
