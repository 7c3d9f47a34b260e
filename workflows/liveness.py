"""Is the call's realtime session alive? The CallWorkflow's side of surviving a crash.

Liveness is watched per realtime process, not per call (workflows/instances.py): the
session's ``answered`` signal names the process serving the call, and the CallWorkflow
puts the call on that process's RealtimeInstanceWorkflow (``call_started``). When the
process stops beating, that workflow signals ``session_lost`` here, and the call is
moved with the ``move_call`` activity: a Twilio call is pointed (REST call update, new
stream TwiML) at a healthy realtime worker, whose new session restores the conversation
from the ``resume_state`` query and says ``answered`` again; a web call needs nothing
(its client reconnects to the same call id). No new session within ``MOVE_GRACE``, tried
``MAX_MOVES`` times, ends the call ``lost``.

Deterministic code only: this runs inside the workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.instances import SessionCommand, instance_workflow_id
    from workflows.types import HISTORY_LIMIT, CallCarry, CallStart, CommittedTurn

__all__ = ["HISTORY_LIMIT", "CallCarry"]

#: After a move, how long the new session has to say ``answered``.
MOVE_GRACE = timedelta(seconds=20)
#: Moves tried before the call is given up as lost.
MAX_MOVES = 3
#: ``workflow.patched`` id: a call that moves on takes itself off its old process's list.
UNREGISTER_LEFT_PATCH = "unregister-left-instances"

MOVE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=300),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=4,
)


async def _take_off(instance_id: str, call_id: str) -> None:
    """Take the call off that process's watch list."""
    handle = workflow.get_external_workflow_handle(instance_workflow_id(instance_id))
    # That process may be gone already: then there is nothing to take the call off.
    with contextlib.suppress(Exception):
        await handle.signal("call_ended", call_id)


@dataclass(frozen=True)
class MoveCallRequest:
    call_id: str
    organization_id: str
    attempt: int


@dataclass(frozen=True)
class MoveCallResult:
    """``moved``: the carrier was told to stream the call to a healthy worker. Not moved:
    a web call (its client reconnects), or a call the carrier no longer has (``gone``)."""

    moved: bool
    transport: str
    gone: bool = False
    detail: str = ""


@dataclass(frozen=True)
class ResumeState:
    """What a session taking over a live call needs: the turns as heard (with tool calls
    and results), oldest first."""

    call_id: str
    answered: bool
    turns: list[CommittedTurn] = field(default_factory=list)


def history_turn(turn: CommittedTurn) -> CommittedTurn:
    """The part of a turn a resumed conversation needs (latencies stay in SQL)."""
    return CommittedTurn(
        index=turn.index,
        speaker=turn.speaker,
        text=turn.text,
        interrupted=turn.interrupted,
        tool_calls=turn.tool_calls,
    )


class Liveness:
    """Which process serves the call, whether it is lost, and the move decision."""

    def __init__(self) -> None:
        self.instance: str | None = None  # the realtime process serving the call
        self.registered = False  # the call is on that process's instance workflow
        self.lost = False  # that process stopped beating
        self.moves = 0
        self.moved_at: datetime | None = None
        #: Processes the call moved away from while it was on their watch lists: a stream
        #: the network dropped leaves its process alive, and that process's list would
        #: keep the call (and tell it of a loss that no longer concerns it) for good.
        self.left: list[str] = []

    def restore(self, carried: CallCarry) -> None:
        self.instance = carried.instance
        self.registered = carried.registered
        self.lost = carried.lost
        self.moves = carried.moves
        self.moved_at = carried.moved_at
        self.left = list(carried.left)

    def session_started(self, instance_id: str, now: datetime) -> None:
        if self.moved_at is not None:
            workflow.logger.info(
                "call resumed %.1f s after the move", (now - self.moved_at).total_seconds()
            )
            self.moved_at = None
            self.moves = 0
        if instance_id != self.instance:
            self._leave()
            self.instance = instance_id
            # Back on a process it left: that list holds the call still, and keeps it.
            self.left = [left for left in self.left if left != instance_id]
        self.lost = False

    def _leave(self) -> None:
        """The call is done with its current process. A lost one's instance workflow has
        ended with its list: nothing to take the call off."""
        if self.instance is not None and self.registered and not self.lost:
            self.left.append(self.instance)
        self.registered = False

    def moved_on_from(self, instance_id: str) -> bool:
        """Has the call been moved away from that process (to another, or on its way)?"""
        if instance_id == self.instance:
            return False
        return self.instance is not None or self.moved_at is not None

    def session_lost(self, instance_id: str) -> None:
        # While a move is under way (the carrier's own, see ``carrier_restreams``) the
        # new session is due within the grace period: moving the call again would cut it.
        if instance_id == self.instance and self.moved_at is None:
            self.lost = True

    def carrier_restreams(self, now: datetime) -> None:
        """The carrier streams the live call again on its own (the stream closed under the
        call: its process died, or the connection dropped): a move this workflow did not
        start, due to end like one with the new session's ``answered``."""
        if self.instance is not None and self.moved_at is None:
            self.moved_at = now

    def needs_attention(self) -> bool:
        # Not ``left``: the lists it names are seen to when the call registers with its
        # next process (always a wake-up of its own) or ends.
        return self.lost or (self.instance is not None and not self.registered)

    def wake_in(self, now: datetime) -> timedelta | None:
        if self.moved_at is None:
            return None
        return max(self.moved_at + MOVE_GRACE - now, timedelta(milliseconds=1))

    def overdue(self, now: datetime) -> bool:
        """The session is gone: its process was lost, or a moved call never came back."""
        return self.lost or (self.moved_at is not None and now >= self.moved_at + MOVE_GRACE)

    async def register(self, call_id: str) -> None:
        """Put the call on its process's watch list (and off those of processes it left).
        A process whose instance workflow is not running (it was declared lost a moment
        ago) counts as lost."""
        taking_off = self._take_off_left(call_id)
        await self._register(call_id)
        if taking_off:
            await asyncio.wait(taking_off)

    async def _register(self, call_id: str) -> None:
        if self.instance is None or self.registered:
            return
        handle = workflow.get_external_workflow_handle(instance_workflow_id(self.instance))
        try:
            await handle.signal("call_started", call_id)
            self.registered = True
        except Exception as exc:
            workflow.logger.warning(
                "call %s: realtime instance %s is not watched (%s)", call_id, self.instance, exc
            )
            self.lost = True

    async def unregister(self, call_id: str) -> None:
        taking_off = self._take_off_left(call_id)
        if self.instance is not None and self.registered:
            await _take_off(self.instance, call_id)
            self.registered = False
        if taking_off:
            await asyncio.wait(taking_off)

    def _take_off_left(self, call_id: str) -> list[asyncio.Task[None]]:
        """Start taking the call off the lists of the processes it left. Without any, the
        caller's commands are the same as before this existed, in the same order (a
        history from then replays); with some, only new histories send them."""
        left, self.left = self.left, []
        if not left or not workflow.patched(UNREGISTER_LEFT_PATCH):
            return []
        return [asyncio.create_task(_take_off(instance, call_id)) for instance in left]

    async def send_command(self, command: SessionCommand) -> bool:
        """Have the session serving the call do something (it hears within a beat)."""
        if self.instance is None or self.lost:
            return False
        handle = workflow.get_external_workflow_handle(instance_workflow_id(self.instance))
        try:
            await handle.signal("send_command", command)
        except Exception:
            return False
        return True

    async def recover(self, start: CallStart) -> str | None:
        """Move the call to a healthy realtime worker; an ended reason if it cannot go on."""
        if self.moves >= MAX_MOVES:
            return "lost"
        self.moves += 1
        workflow.logger.warning(
            "call %s: realtime instance %s lost, moving the call (attempt %d)",
            start.call_id,
            self.instance,
            self.moves,
        )
        self._leave()
        self.instance, self.lost = None, False
        try:
            result: MoveCallResult = await workflow.execute_activity(
                "move_call",
                MoveCallRequest(start.call_id, start.organization_id, self.moves),
                result_type=MoveCallResult,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=MOVE_RETRY,
                summary="point the live call at a healthy realtime worker",
            )
        except Exception as exc:  # an ActivityError: no move this time
            workflow.logger.error("call %s: move failed: %s", start.call_id, exc)
            result = MoveCallResult(False, "", detail=str(exc))
        if result.gone:
            return "lost"
        if self.instance is not None:
            # A new session said ``answered`` while the move was being made (the carrier
            # had streamed the call again already): the call is back.
            self.moves = 0
            return None
        # Moved (a Twilio call) or waiting for the web client: the new session's
        # ``answered`` is due within the grace period.
        self.moved_at = workflow.now()
        return None
