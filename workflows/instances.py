"""RealtimeInstanceWorkflow: is a realtime process alive? One heartbeat per process.

Each realtime process beats on its own workflow (id ``realtime-<instance id>``) about
every second with the ``beat`` Update. CallWorkflows tell it which calls the process
serves (``call_started`` / ``call_ended`` signals, sent from the CallWorkflow itself, so
a process that dies right after a call began still has that call on its list). When
the beats stop for ``lost_after_s`` (BUILDER_REALTIME_LOST_AFTER_S, 3 s by default), it
signals ``session_lost`` to every CallWorkflow on its list and ends: each of them moves
its call to a healthy process.

A heartbeat per call would cost a workflow task per call per second (at 100 calls,
most of a CPU core of Temporal server and worker); one per process costs one.

The answer to a beat carries commands for the process's sessions: a supervisor who
hangs up a web call (no carrier to tell) reaches its session this way within a beat.
Deterministic code only: this runs inside the workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio import workflow

#: How often a realtime process beats (the realtime side).
BEAT_INTERVAL_S = 1.0
#: Beats missing this long: the process is presumed dead and its calls are moved.
LOST_AFTER_S = 3.0
#: Continue-as-new once a run's history holds this many events.
HISTORY_LIMIT = 1_500


def instance_workflow_id(instance_id: str) -> str:
    return f"realtime-{instance_id}"


@dataclass(frozen=True)
class SessionStarted:
    """Sent with the CallWorkflow's ``answered`` signal: the process now serving the call."""

    instance_id: str


@dataclass(frozen=True)
class SessionCommand:
    """Something a call's session must do, sent to it by its process. ``end``: end the
    call with ``reason`` (its workflow has already closed the call)."""

    call_id: str
    action: str
    reason: str = ""


@dataclass(frozen=True)
class InstanceStart:
    instance_id: str
    # Carried across continue-as-new.
    calls: list[str] = field(default_factory=list)
    commands: list[SessionCommand] = field(default_factory=list)
    lost_after_s: float = LOST_AFTER_S


@dataclass(frozen=True)
class InstanceEnd:
    """``lost``: beats stopped and ``calls`` were told; ``stopped``: the process left."""

    outcome: str
    calls: list[str] = field(default_factory=list)


@workflow.defn(name="RealtimeInstanceWorkflow")
class RealtimeInstanceWorkflow:
    @workflow.init
    def __init__(self, start: InstanceStart) -> None:
        # From the input here, not in run(): signals that reached a continued run before
        # its first task are handled before run() starts and must not be overwritten.
        self._calls: dict[str, None] = dict.fromkeys(start.calls)  # an ordered set
        self._commands: list[SessionCommand] = list(start.commands)
        self._last_beat: datetime | None = None
        self._beats = 0
        self._beaten = False  # a beat came since the loop last looked
        self._stopping = False
        self._lost_after = timedelta(seconds=start.lost_after_s)

    @workflow.run
    async def run(self, start: InstanceStart) -> InstanceEnd:
        # Started by the process's first beat (or carried on): that counts as one.
        self._last_beat = workflow.now()
        while True:
            self._beaten = False
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._stopping or self._beaten, timeout=self._wake_in()
                )
            if self._stopping:
                return InstanceEnd("stopped", list(self._calls))
            if self._overdue():
                return await self._declare_lost(start.instance_id)
            if self._history_is_long() and workflow.all_handlers_finished():
                workflow.continue_as_new(
                    dataclasses.replace(
                        start, calls=list(self._calls), commands=list(self._commands)
                    )
                )

    def _wake_in(self) -> timedelta:
        assert self._last_beat is not None
        return max(self._last_beat + self._lost_after - workflow.now(), timedelta(milliseconds=1))

    def _overdue(self) -> bool:
        assert self._last_beat is not None
        return workflow.now() >= self._last_beat + self._lost_after

    def _history_is_long(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() >= HISTORY_LIMIT
            or info.is_continue_as_new_suggested()
        )

    async def _declare_lost(self, instance_id: str) -> InstanceEnd:
        calls = list(self._calls)
        workflow.logger.warning(
            "realtime instance %s: no beat since %s; %d call(s) to move",
            instance_id,
            self._last_beat,
            len(calls),
        )

        async def tell(call_id: str) -> None:
            handle = workflow.get_external_workflow_handle(call_id)
            try:
                await handle.signal("session_lost", instance_id)
            except Exception as exc:  # the call has ended meanwhile: nothing to move
                workflow.logger.info("call %s not told (%s)", call_id, exc)

        await asyncio.gather(*(tell(call_id) for call_id in calls))
        return InstanceEnd("lost", calls)

    @workflow.update
    def beat(self) -> list[SessionCommand]:
        """The process is alive; the commands waiting for its sessions."""
        self._last_beat = workflow.now()
        self._beats += 1
        self._beaten = True
        commands, self._commands = self._commands, []
        return commands

    @workflow.signal
    def call_started(self, call_id: str) -> None:
        self._calls[call_id] = None

    @workflow.signal
    def call_ended(self, call_id: str) -> None:
        # A command for it stays until the next beat takes it: a supervisor's hang-up
        # ends the call's workflow (this signal) before its session has heard.
        self._calls.pop(call_id, None)

    @workflow.signal
    def send_command(self, command: SessionCommand) -> None:
        self._commands.append(command)

    @workflow.signal
    def stopping(self) -> None:
        """The process shuts down with no call left: not a loss."""
        self._stopping = True

    @workflow.query
    def calls(self) -> list[str]:
        return list(self._calls)
