"""This realtime process as Temporal sees it: one liveness beat for all of its calls, and
the commands that come back for its sessions (see workflows/instances.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from datetime import timedelta

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from realtime.updates import cancellation_kept
from workflows.instances import (
    BEAT_INTERVAL_S,
    LOST_AFTER_S,
    InstanceStart,
    SessionCommand,
    instance_workflow_id,
)

log = logging.getLogger(__name__)

#: A beat that has not been answered by then is given up (the next one is due anyway).
BEAT_TIMEOUT_S = 5.0
#: How often the process looks for calls whose workflow closed under it (an operator
#: terminated it, say): one visibility query for all of its calls.
CLOSED_CHECK_EVERY_S = 2.0
#: Command given to a session whose call's workflow is no longer running.
WORKFLOW_CLOSED = "workflow-closed"

CommandHandler = Callable[[SessionCommand], None]


def new_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RealtimeInstance:
    """Start with ``start()`` before taking calls; ``aclose()`` when the process stops."""

    def __init__(
        self,
        client: Client,
        task_queue: str,
        *,
        instance_id: str | None = None,
        interval_s: float = BEAT_INTERVAL_S,
        closed_check_s: float = CLOSED_CHECK_EVERY_S,
        lost_after_s: float = LOST_AFTER_S,
    ) -> None:
        self.instance_id = instance_id or new_instance_id()
        self._lost_after_s = lost_after_s
        self._client = client
        self._task_queue = task_queue
        self._interval_s = interval_s
        self._closed_check_s = closed_check_s
        self._workflow_id = instance_workflow_id(self.instance_id)
        self._handle = client.get_workflow_handle(self._workflow_id)
        self._sessions: dict[str, CommandHandler] = {}
        # Calls whose session stopped with the call going on (this process shuts down):
        # until the process is gone they keep it from leaving as if it had no calls.
        self._handed_over: set[str] = set()
        self._leftovers: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed_check: asyncio.Task[None] | None = None
        self.beats = 0

    async def start(self) -> None:
        """Make sure the instance's workflow runs (a call may be told about it at once)."""
        await self._ensure_running()
        self._task = asyncio.create_task(self._beat_loop(), name="realtime-instance-beat")

    def register(self, call_id: str, on_command: CommandHandler) -> None:
        self._sessions[call_id] = on_command
        self._handed_over.discard(call_id)  # it came back to this process

    def unregister(self, call_id: str) -> None:
        self._sessions.pop(call_id, None)

    def hand_over(self, call_id: str) -> None:
        """The call's session stopped, the call goes on elsewhere. It stays on this
        process's watch list: should it not resume elsewhere, the process's missing
        beats get it moved, or ended as lost, instead of left waiting forever."""
        self._sessions.pop(call_id, None)
        self._handed_over.add(call_id)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold on to a call's last deliveries (its ``ended`` signal) until they are done,
        after the session itself has gone; process shutdown cancels them."""
        self._leftovers.add(task)
        task.add_done_callback(self._leftovers.discard)

    async def aclose(self) -> None:
        for task in (self._task, self._closed_check, *self._leftovers):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not self._sessions and not self._handed_over:
            # Leaving with no call: not a loss. (With calls, the missing beats get them
            # moved to another process, which is what a stopping process wants.)
            with contextlib.suppress(RPCError):
                await self._handle.signal("stopping")

    async def _ensure_running(self) -> None:
        await self._client.start_workflow(
            "RealtimeInstanceWorkflow",
            InstanceStart(self.instance_id, lost_after_s=self._lost_after_s),
            id=self._workflow_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"realtime process {self.instance_id}: liveness of its calls",
        )

    async def _beat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        next_check_at = next_at + self._closed_check_s
        failures = 0
        while True:
            if loop.time() >= next_check_at and self._sessions:
                next_check_at = loop.time() + self._closed_check_s
                if self._closed_check is None or self._closed_check.done():
                    self._closed_check = asyncio.create_task(self._check_closed_calls())
            try:
                async with asyncio.timeout(BEAT_TIMEOUT_S):
                    await self._beat()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("realtime instance beat failed (%d in a row): %s", failures, exc)
            next_at = max(next_at + self._interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())

    async def _beat(self) -> None:
        try:
            with cancellation_kept():  # the loop above catches every Exception
                commands: list[SessionCommand] = await self._handle.execute_update(
                    "beat",
                    result_type=list[SessionCommand],
                    rpc_timeout=timedelta(seconds=BEAT_TIMEOUT_S),
                )
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # Our workflow ended: declared lost (beats stopped for too long, and our
            # calls were moved) or never started. A new run watches us from now on.
            log.warning("realtime instance %s: workflow not running; starting it", self.instance_id)
            await self._ensure_running()
            return
        self.beats += 1
        self._dispatch(commands)

    async def _check_closed_calls(self) -> None:
        ids = ", ".join(f'"{call_id}"' for call_id in self._sessions)
        query = f'WorkflowId IN ({ids}) AND ExecutionStatus != "Running"'
        closed: list[SessionCommand] = []
        try:
            async with asyncio.timeout(BEAT_TIMEOUT_S):
                async for execution in self._client.list_workflows(query):
                    closed.append(SessionCommand(execution.id, WORKFLOW_CLOSED))
        except Exception as exc:
            log.warning("could not look for closed call workflows: %s", exc)
            return
        self._dispatch(closed)

    def _dispatch(self, commands: list[SessionCommand]) -> None:
        for command in commands:
            handler = self._sessions.get(command.call_id)
            if handler is None:
                continue  # that session has ended already
            try:
                handler(command)
            except Exception:
                log.exception("call %s: command %s failed", command.call_id, command.action)
