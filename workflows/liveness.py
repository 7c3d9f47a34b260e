"""Is the call's realtime session alive? The CallWorkflow's side of surviving a crash.

The realtime session signals ``heartbeat`` about every second while the call is live.
When heartbeats stop for ``LOST_AFTER`` while the call has not ended, the realtime
process serving it is presumed dead and the workflow runs the ``move_call`` activity:
a Twilio call is pointed (REST call update, new stream TwiML) at a healthy realtime
worker, whose new session restores the conversation from the ``resume_state`` query; a
web call needs nothing (its client reconnects to the same call id). Heartbeats that do
not come back after a move (``MOVE_GRACE``, ``MAX_MOVES`` times) end the call ``lost``.

The clock is the workflow's (``workflow.now()`` when a heartbeat is handled), so a
Temporal worker that was down itself never mistakes the backlog for a dead session.
Deterministic code only: this runs inside the workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.types import CallCarry, CallStart, CommittedTurn

__all__ = ["CallCarry"]

#: How often a live session signals (the realtime side).
HEARTBEAT_INTERVAL_S = 1.0
#: Heartbeats missing this long: the session serving the call is presumed dead.
LOST_AFTER = timedelta(seconds=3)
#: After a move, how long the new session has to send its first heartbeat.
MOVE_GRACE = timedelta(seconds=20)
#: Moves tried before the call is given up as lost.
MAX_MOVES = 3
#: Continue-as-new once a run's history holds this many events (the target: < 2,000).
HISTORY_LIMIT = 1_500

MOVE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=300),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=4,
)


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
    """Heartbeat bookkeeping and the move decision."""

    def __init__(self) -> None:
        self.last_heartbeat: datetime | None = None
        self.moves = 0
        self.moved_at: datetime | None = None

    def beat(self, now: datetime) -> None:
        self.last_heartbeat = now
        if self.moved_at is not None:
            workflow.logger.info(
                "call resumed %.1f s after the move", (now - self.moved_at).total_seconds()
            )
            self.moved_at = None
            self.moves = 0

    def deadline(self) -> datetime | None:
        """When the call counts as lost if no heartbeat comes (None: not watched yet)."""
        if self.moved_at is not None:
            return self.moved_at + MOVE_GRACE
        if self.last_heartbeat is None:
            return None
        return self.last_heartbeat + LOST_AFTER

    def wake_in(self, now: datetime) -> timedelta | None:
        deadline = self.deadline()
        if deadline is None:
            return None
        return max(deadline - now, timedelta(milliseconds=1))

    def overdue(self, now: datetime) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    async def recover(self, start: CallStart) -> str | None:
        """Move the call to a healthy realtime worker; an ended reason if it cannot go on."""
        if self.moves >= MAX_MOVES:
            return "lost"
        self.moves += 1
        silent = self.last_heartbeat
        workflow.logger.warning(
            "call %s: no heartbeat since %s, moving it (attempt %d)",
            start.call_id,
            silent,
            self.moves,
        )
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
        # Moved (a Twilio call) or waiting for the web client: the new session's first
        # heartbeat is due within the grace period.
        self.moved_at = workflow.now()
        return None
