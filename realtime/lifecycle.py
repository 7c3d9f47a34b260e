"""Telling the call's durable workflow what happened, without ever blocking the audio loop.

Signals are queued and sent by one background task per call; turns are sent in
batches. The session only calls the non-blocking methods - except ``run_tools``, the
one place the conversation itself waits on the workflow (for tool results), which the
session awaits inside its answer task, never in the audio path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

from temporalio.client import Client, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from workflows.liveness import HEARTBEAT_INTERVAL_S
from workflows.tools import ToolBatch, ToolBatchResult
from workflows.types import CommittedTurn

log = logging.getLogger(__name__)


class CallLifecycle(Protocol):
    def answered(self) -> None: ...

    def commit_turn(self, turn: CommittedTurn) -> None: ...

    def ended(self, reason: str) -> None: ...

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


@dataclass(frozen=True)
class _Signal:
    name: str
    arg: object | None = None


class TemporalCallLifecycle:
    """Signals the call's CallWorkflow (workflow id = call id)."""

    def __init__(
        self,
        client: Client,
        call_id: str,
        *,
        batch_delay_s: float = 0.05,
        heartbeat_s: float | None = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self._handle = client.get_workflow_handle(call_id)
        self._queue: asyncio.Queue[_Signal | None] = asyncio.Queue()
        self._batch_delay_s = batch_delay_s
        self._heartbeat_s = heartbeat_s
        self._heartbeat: asyncio.Task[None] | None = None
        self._heartbeat_queued = False
        self._task = asyncio.create_task(self._deliver(), name=f"lifecycle-{call_id}")

    def answered(self) -> None:
        self._queue.put_nowait(_Signal("answered"))
        if self._heartbeat_s is not None and self._heartbeat is None:
            # From now on the workflow watches this session: it moves the call should the
            # heartbeats stop (this process died).
            self._heartbeat = asyncio.create_task(
                self._beat(self._heartbeat_s), name=f"heartbeat-{self._handle.id}"
            )

    def commit_turn(self, turn: CommittedTurn) -> None:
        self._queue.put_nowait(_Signal("turns_committed", turn))

    def ended(self, reason: str) -> None:
        self._stop_heartbeat()
        self._queue.put_nowait(_Signal("ended", reason))

    async def _beat(self, interval_s: float) -> None:
        while True:
            if not self._heartbeat_queued:  # one waiting is enough
                self._heartbeat_queued = True
                self._queue.put_nowait(_Signal("heartbeat"))
            await asyncio.sleep(interval_s)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()

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

        return await asyncio.wait_for(ask(), timeout_s)

    async def aclose(self) -> None:
        self._stop_heartbeat()
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)
        except TimeoutError:
            log.error("gave up delivering call signals to %s", self._handle.id)
            self._task.cancel()

    async def _deliver(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if item.name == "turns_committed":
                # Turns that come close together travel in one signal.
                await asyncio.sleep(self._batch_delay_s)
                turns = [item.arg]
                while not self._queue.empty():
                    peek = self._queue.get_nowait()
                    if peek is not None and peek.name == "turns_committed":
                        turns.append(peek.arg)
                    else:
                        await self._send("turns_committed", turns)
                        turns = []
                        if peek is None:
                            return
                        await self._send(peek.name, peek.arg)
                        break
                if turns:
                    await self._send("turns_committed", turns)
                continue
            await self._send(item.name, item.arg)

    async def _send(self, name: str, arg: object | None) -> None:
        if name == "heartbeat":
            self._heartbeat_queued = False
        for attempt in range(5):
            try:
                if arg is None:
                    await self._handle.signal(name)
                else:
                    await self._handle.signal(name, arg)
                return
            except Exception as exc:
                log.warning(
                    "signal %s to %s failed (%s), attempt %d",
                    name,
                    self._handle.id,
                    exc,
                    attempt + 1,
                )
                await asyncio.sleep(0.2 * 2**attempt)
