"""Tool calls inside the CallWorkflow (deterministic code only).

The realtime session asks the call's workflow to run a batch of tool calls through the
``run_tools`` Update. ``ToolRunner`` (held in the workflow's state) loads the agent's
tool definitions once per call (a local activity), validates each call's arguments
against the tool's JSON schema - a bad call becomes an error result for the model, never
an exception - and runs the valid ones in parallel, each as a local activity named after its
kind (``tool.webhook``, ``tool.book_appointment``, ...) with a summary naming the tool.

Every call that ran becomes a ``tool.called`` call event (recorded, and sent to the
organization's webhooks), published by the workflow's main loop with its next turn
flush - never on the model's path.

Every tool runs as a local activity, inside the workflow task that accepted the Update:
the result goes back with that task's completion, no extra round trips to the server. A
worker that dies mid-tool is noticed when the task times out (``CALL_TASK_TIMEOUT``); the
next worker runs the tool again, exactly once by its idempotency key (a webhook's
``Idempotency-Key``, a booking's unique key).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from jsonschema import Draft202012Validator

    from builder_engine.tools import ToolDef
    from workflows.events import publish_event
    from workflows.transfers import (
        CallControl,
        TransferRequest,
        TransferResult,
        tool_transfer,
    )
    from workflows.types import CallStart

MAX_BATCH = 16
EVENT_RESULT_CHARS = 2_000  # of a tool's result in its tool.called event
# A webhook bounds its HTTP exchange by the tool's timeout itself; the margin lets it
# record the failure before Temporal gives up on the attempt.
WEBHOOK_MARGIN = timedelta(seconds=5)
LOAD_TIMEOUT = timedelta(seconds=10)
RETRY_INITIAL = timedelta(milliseconds=200)
RETRY_MAXIMUM = timedelta(seconds=2)


# ------------------------------------------------------------------ payloads


@dataclass(frozen=True)
class ToolInvocation:
    """One tool call as the model made it: ``arguments`` is its raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolBatch:
    """The tool calls of one model response (run in parallel)."""

    calls: list[ToolInvocation]


@dataclass(frozen=True)
class ToolOutcome:
    """A tool call's result. ``content`` is what the model reads (JSON text); ``action``
    tells the realtime session what to do (``end_call``, ``hold``, ``send_dtmf``)."""

    tool_call_id: str
    name: str
    ok: bool
    content: str
    kind: str = ""
    action: str | None = None
    hold_s: float | None = None
    digits: str | None = None


@dataclass(frozen=True)
class ToolBatchResult:
    outcomes: list[ToolOutcome]


@dataclass(frozen=True)
class ToolTask:
    """What a tool activity gets: validated arguments, no secrets."""

    call_id: str
    organization_id: str
    tool_call_id: str
    tool_id: str
    tool_name: str
    kind: str
    arguments: dict[str, Any]
    timeout_s: float
    attempts: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadToolsRequest:
    call_id: str
    organization_id: str
    agent_id: str
    agent_version: int


# ------------------------------------------------------------------ pure helpers


def error_content(message: str) -> str:
    return json.dumps({"error": message})


def error_outcome(call: ToolInvocation, message: str, kind: str = "") -> ToolOutcome:
    return ToolOutcome(call.id, call.name, False, error_content(message), kind=kind)


def check_arguments(
    tool: ToolDef, raw: str, validator: Draft202012Validator | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Parse and validate ``raw`` against the tool's schema: (arguments, None) or
    (None, a message the model can act on)."""
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        return None, f"The arguments for {tool.name} are not valid JSON ({exc.msg}). Call it again."
    if not isinstance(arguments, dict):
        return None, f"The arguments for {tool.name} must be a JSON object."
    checker = validator or Draft202012Validator(
        tool.parameters, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    problems = sorted(checker.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if problems:
        described = "; ".join(
            (f"{'.'.join(str(p) for p in e.absolute_path)}: " if e.absolute_path else "")
            + e.message
            for e in problems[:5]
        )
        return None, (
            f"Invalid arguments for {tool.name}: {described}. "
            "Fix them, or ask the caller for what is missing."
        )
    return arguments, None


def retry_policy(tool: ToolDef) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=RETRY_INITIAL,
        maximum_interval=RETRY_MAXIMUM,
        maximum_attempts=tool.attempts,
    )


def failure_message(tool: ToolDef, error: BaseException) -> str:
    cause = error.cause if isinstance(error, ActivityError) else error
    if isinstance(cause, TimeoutError):
        return (
            f"The tool {tool.name} did not answer in time ({tool.timeout_s:g} s). "
            "Tell the caller you could not complete this right now."
        )
    detail = cause.message if isinstance(cause, ApplicationError) else str(cause)
    return (
        f"The tool {tool.name} failed: {detail or type(cause).__name__}. "
        "Tell the caller you could not complete this right now."
    )


# ------------------------------------------------------------------ the runner


class ToolRunner:
    """The CallWorkflow's tool state: cached definitions and finished results."""

    def __init__(self, control: CallControl | None = None) -> None:
        self._control = control
        self._tools: dict[str, ToolDef] | None = None
        self._validators: dict[str, Draft202012Validator] = {}
        self._loading = asyncio.Lock()
        self._finished: dict[str, ToolOutcome] = {}
        self._running: dict[str, asyncio.Future[ToolOutcome]] = {}
        self._unpublished: list[tuple[CallStart, dict[str, Any]]] = []

    async def publish_pending(self) -> None:
        """Publish the ``tool.called`` events of the calls finished so far. The workflow's
        main loop does this with its turn flushes, never in the Update itself: events are
        not on the model's path, and an Update whose workflow task schedules nothing more
        answers sooner."""
        while self._unpublished:
            start, detail = self._unpublished.pop(0)
            try:
                await publish_event(
                    "tool.called",
                    call_id=start.call_id,
                    organization_id=start.organization_id,
                    detail=detail,
                )
            except ActivityError as exc:  # the tool's own record (tool_execution) stands
                workflow.logger.error(
                    "tool.called for %s not recorded: %s", detail["tool_call_id"], exc
                )

    async def drain(self) -> None:
        """Before the workflow ends: every event published."""
        await self.publish_pending()

    def finished_outcomes(self) -> list[ToolOutcome]:
        """Results of the finished tool calls (carried across continue-as-new)."""
        return list(self._finished.values())

    def restore(self, outcomes: list[ToolOutcome]) -> None:
        self._finished.update((o.tool_call_id, o) for o in outcomes)

    @staticmethod
    def check_batch(batch: ToolBatch) -> None:
        """Update validator: reject malformed batches before they reach the history."""
        if not batch.calls or len(batch.calls) > MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} tool calls")
        ids = [c.id for c in batch.calls]
        if len(set(ids)) != len(ids) or not all(ids):
            raise ValueError("tool call ids must be present and distinct")

    async def run(self, start: CallStart, batch: ToolBatch) -> ToolBatchResult:
        tools = await self._definitions(start)
        outcomes = await asyncio.gather(*(self._once(start, tools, c) for c in batch.calls))
        return ToolBatchResult(list(outcomes))

    async def _definitions(self, start: CallStart) -> dict[str, ToolDef]:
        async with self._loading:
            if self._tools is None:
                loaded: list[ToolDef] = await workflow.execute_local_activity(
                    "load_call_tools",
                    LoadToolsRequest(
                        start.call_id, start.organization_id, start.agent_id, start.agent_version
                    ),
                    result_type=list[ToolDef],
                    start_to_close_timeout=LOAD_TIMEOUT,
                    retry_policy=RetryPolicy(initial_interval=RETRY_INITIAL, maximum_attempts=5),
                    summary="load the agent's tools",
                )
                self._tools = {t.name: t for t in loaded}
            return self._tools

    async def _once(
        self, start: CallStart, tools: dict[str, ToolDef], call: ToolInvocation
    ) -> ToolOutcome:
        """Each tool call id runs once per call, however often it is asked for."""
        if call.id in self._finished:
            return self._finished[call.id]
        if call.id in self._running:
            return await self._running[call.id]
        future: asyncio.Future[ToolOutcome] = asyncio.get_running_loop().create_future()
        self._running[call.id] = future
        try:
            outcome = await self._run_one(start, tools, call)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            self._running.pop(call.id, None)
        self._finished[call.id] = outcome
        future.set_result(outcome)
        return outcome

    async def _run_one(
        self, start: CallStart, tools: dict[str, ToolDef], call: ToolInvocation
    ) -> ToolOutcome:
        began = workflow.now()
        tool = tools.get(call.name)
        if tool is None:
            offered = ", ".join(sorted(tools)) or "none"
            return error_outcome(
                call, f"There is no tool named {call.name!r} (available: {offered})."
            )
        validator = self._validators.get(tool.name)
        if validator is None:
            validator = Draft202012Validator(
                tool.parameters, format_checker=Draft202012Validator.FORMAT_CHECKER
            )
            self._validators[tool.name] = validator
        arguments, problem = check_arguments(tool, call.arguments, validator)
        if arguments is None:
            return error_outcome(call, problem or "invalid arguments", tool.kind)
        task = ToolTask(
            call_id=start.call_id,
            organization_id=start.organization_id,
            tool_call_id=call.id,
            tool_id=tool.id,
            tool_name=tool.name,
            kind=tool.kind,
            arguments=arguments,
            timeout_s=tool.timeout_s,
            attempts=tool.attempts,
            settings=tool.settings,
        )
        activity = f"tool.{tool.kind}"
        summary = f"{tool.name} ({tool.kind})" if tool.name != tool.kind else tool.name
        timeout = timedelta(seconds=tool.timeout_s)
        try:
            transfer = (
                tool_transfer(task.call_id, task.organization_id, call.id, tool.settings, arguments)
                if tool.kind == "transfer_call" and self._control is not None
                else None
            )
            if isinstance(transfer, TransferRequest) and self._control is not None:
                outcome: ToolOutcome = await self._transfer(self._control, task, transfer)
            elif isinstance(transfer, str):
                outcome = error_outcome(call, transfer, tool.kind)
            else:
                # Every tool kind is a local activity: it runs inside the workflow task
                # that received the Update, so the result needs no second workflow task
                # (a webhook: 17 ms added at p50 instead of 27). A worker that dies
                # mid-tool is noticed when that task times out; the new worker runs the
                # tool again and its idempotency key makes that exactly once.
                outcome = await workflow.execute_local_activity(
                    activity,
                    task,
                    result_type=ToolOutcome,
                    start_to_close_timeout=(
                        timeout + WEBHOOK_MARGIN if tool.kind == "webhook" else timeout
                    ),
                    retry_policy=retry_policy(tool),
                    activity_id=f"tool:{call.id}",
                    summary=summary,
                )
        except ActivityError as exc:
            workflow.logger.warning("tool %s (%s) failed: %s", tool.name, call.id, exc.cause)
            outcome = error_outcome(call, failure_message(tool, exc), tool.kind)
        elapsed_ms = (workflow.now() - began).total_seconds() * 1000
        detail = {
            "tool_call_id": task.tool_call_id,
            "tool": tool.name,
            "tool_id": tool.id,
            "kind": tool.kind,
            "arguments": task.arguments,
            "ok": outcome.ok,
            "result": outcome.content[:EVENT_RESULT_CHARS],
            "called_at": began.isoformat(),
            "duration_ms": round(elapsed_ms, 1),
        }
        self._unpublished.append((start, detail))
        return outcome

    async def _transfer(
        self, control: CallControl, task: ToolTask, request: TransferRequest
    ) -> ToolOutcome:
        """``transfer_call``: the carrier moves the caller (see workflows/transfers.py)."""
        result: TransferResult = await control.transfer(request)
        if result.transferred:
            content = {"transferred": True, "note": "The caller is now connected elsewhere."}
            return ToolOutcome(
                task.tool_call_id,
                task.tool_name,
                True,
                json.dumps(content),
                kind=task.kind,
                action="transferred",
            )
        if result.status in ("no-answer", "busy"):
            note = (
                "Nobody answered at the transfer destination"
                if result.status == "no-answer"
                else "The transfer destination is busy"
            )
            content = {
                "transferred": False,
                "reason": result.status,
                "note": f"{note}. Tell the caller, and offer to help or to take a message.",
            }
            return ToolOutcome(
                task.tool_call_id, task.tool_name, True, json.dumps(content), kind=task.kind
            )
        return ToolOutcome(
            task.tool_call_id,
            task.tool_name,
            False,
            error_content(
                f"The transfer did not work ({result.detail or result.status}). Tell the "
                "caller you cannot transfer them right now, and offer to help yourself."
            ),
            task.kind,
        )
