"""Tool activities: each kind of tool as an activity named ``tool.<kind>``.

Exactly once: every tool call of a call is one ``tool_execution`` row, unique on
(call id, tool call id). An attempt first claims the row; a retried attempt (a worker
died, a timeout) finds it and returns the stored result when the call finished, or acts
again - safely, because what it acts on is idempotent by the same key: a booking's
``idempotency_key`` is unique in the database, and webhook receivers get an
``Idempotency-Key`` header. Tools that only touch the database do it all in one
transaction: the booking and its execution row commit together or not at all. (The
``tool.called`` call event is published by the workflow once the result is in.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.unit_of_work import finishes_when_cancelled
from builder_engine import outbound
from builder_engine.calendars import CalendarRules, local_iso, local_label
from builder_engine.db.models import (
    AgentVersion,
    Appointment,
    Calendar,
    Call,
    Organization,
    ToolDefinition,
    ToolExecution,
)
from builder_engine.timeutil import as_utc, utcnow
from builder_engine.tools import DEFAULT_MAX_HOLD_S, ToolDef, load_agent_tools
from workflows.tools import LoadToolsRequest, ToolOutcome, ToolTask, error_content

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
MAX_SLOTS_PER_DAY = 24
DEFAULT_HOLD_S = 10.0
SQLITE_LOCK_RETRIES = 5

T = TypeVar("T")
Body = Callable[[AsyncSession], Awaitable[ToolOutcome]]

# A transfer_call tool without a destination number in its config answers this.
TRANSFER_UNAVAILABLE = (
    "Transferring calls is not set up (the tool has no destination number). Tell the "
    "caller you cannot transfer them right now, and offer to help them yourself or to "
    "take a message."
)


def idempotency_key(call_id: str, tool_call_id: str) -> str:
    """What a webhook receiver gets as ``Idempotency-Key``: sha256(call id + tool call id)."""
    return hashlib.sha256(f"{call_id}{tool_call_id}".encode()).hexdigest()


def _ok(task: ToolTask, payload: Any, **action: Any) -> ToolOutcome:
    return ToolOutcome(
        task.tool_call_id, task.tool_name, True, json.dumps(payload), kind=task.kind, **action
    )


def _failed(task: ToolTask, message: str) -> ToolOutcome:
    return ToolOutcome(task.tool_call_id, task.tool_name, False, error_content(message), task.kind)


def _stored_outcome(row: ToolExecution | None) -> ToolOutcome | None:
    if row is None or row.status == "running" or not row.result:
        return None
    return ToolOutcome(**row.result)


def _attempt() -> int:
    return activity.info().attempt if activity.in_activity() else 1


class _Transient(Exception):
    """A failure worth another attempt (the receiver was down, slow, overloaded)."""


class ToolActivities:
    """Bound to one database (and one HTTP client); register ``activities()`` on a worker."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        http: httpx.AsyncClient | None = None,
        resolver: outbound.Resolver = outbound.system_resolver,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._sessions = sessions
        self._http = http
        self._resolver = resolver
        self._max_response_bytes = max_response_bytes

    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.load_call_tools,
            self.webhook,
            self.check_availability,
            self.book_appointment,
            self.end_call,
            self.hold,
            self.send_dtmf,
            self.transfer_call,
        ]

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = outbound.new_client()
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ------------------------------------------------------------ definitions

    @activity.defn(name="load_call_tools")
    @finishes_when_cancelled
    async def load_call_tools(self, request: LoadToolsRequest) -> list[ToolDef]:
        """The call's agent version's tools (no secrets), once per call."""
        async with self._sessions() as session:
            version = (
                await session.exec(
                    select(AgentVersion).where(
                        AgentVersion.agent_id == request.agent_id,
                        AgentVersion.version == request.agent_version,
                        AgentVersion.organization_id == request.organization_id,
                    )
                )
            ).first()
            if version is None:
                raise ApplicationError(
                    f"agent {request.agent_id} v{request.agent_version} does not exist",
                    non_retryable=True,
                )
            tool_ids = [str(t) for t in version.config.get("tools") or []]
            return await load_agent_tools(session, request.organization_id, tool_ids)

    # ------------------------------------------------------------ records

    async def _stored(self, session: AsyncSession, task: ToolTask) -> ToolExecution | None:
        return (
            await session.exec(
                select(ToolExecution).where(
                    ToolExecution.call_id == task.call_id,
                    ToolExecution.tool_call_id == task.tool_call_id,
                )
            )
        ).first()

    def _new_execution(self, task: ToolTask) -> ToolExecution:
        return ToolExecution(
            organization_id=task.organization_id,
            call_id=task.call_id,
            tool_call_id=task.tool_call_id,
            tool_name=task.tool_name,
            arguments=dict(task.arguments),
            status="running",
        )

    def _complete(
        self,
        session: AsyncSession,
        execution: ToolExecution,
        outcome: ToolOutcome,
    ) -> None:
        execution.status = "succeeded" if outcome.ok else "failed"
        execution.result = dataclasses.asdict(outcome)
        execution.completed_at = utcnow()
        session.add(execution)

    async def _locked_retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        """SQLite answers "database is locked" to a writer that lost a race: try again."""
        for attempt in range(SQLITE_LOCK_RETRIES):
            try:
                return await finishes_when_cancelled(operation)()
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc) or attempt == SQLITE_LOCK_RETRIES - 1:
                    raise
                await asyncio.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    async def _run_in_db(self, task: ToolTask, body: Body) -> ToolOutcome:
        """Run a database-only tool once: the execution row and what ``body`` writes
        commit in one transaction; a repeated tool call gets the stored result."""

        async def once() -> ToolOutcome:
            async with self._sessions() as session:
                stored = _stored_outcome(await self._stored(session, task))
                if stored is not None:
                    return stored
                execution = self._new_execution(task)
                try:
                    # Claimed first: the same tool call running concurrently waits here.
                    session.add(execution)
                    await session.flush()
                    outcome = await body(session)
                    self._complete(session, execution, outcome)
                    await session.commit()
                    return outcome
                except sa.exc.IntegrityError:
                    await session.rollback()
                    stored = _stored_outcome(await self._stored(session, task))
                    if stored is not None:
                        return stored
                    raise

        return await self._locked_retry(once)

    async def _claim(self, task: ToolTask) -> ToolOutcome | None:
        """Two-phase tools: record the call as running. The stored outcome when an earlier
        attempt finished; None to go ahead (first attempt, or an earlier one was lost)."""

        async def claim() -> ToolOutcome | None:
            async with self._sessions() as session:
                session.add(self._new_execution(task))
                try:
                    await session.commit()
                    return None
                except sa.exc.IntegrityError:
                    await session.rollback()
                row = await self._stored(session, task)
                if row is None:
                    raise ApplicationError(
                        f"call {task.call_id} does not exist", non_retryable=True
                    )
                return _stored_outcome(row)

        return await self._locked_retry(claim)

    async def _finish(self, task: ToolTask, outcome: ToolOutcome) -> ToolOutcome:
        async def finish() -> ToolOutcome:
            async with self._sessions() as session:
                row = await self._stored(session, task)
                if row is None:
                    row = self._new_execution(task)
                elif row.status != "running":
                    return _stored_outcome(row) or outcome  # a concurrent attempt finished
                self._complete(session, row, outcome)
                await session.commit()
                return outcome

        return await self._locked_retry(finish)

    # ------------------------------------------------------------ webhook

    @activity.defn(name="tool.webhook")
    async def webhook(self, task: ToolTask) -> ToolOutcome:
        """POST the validated arguments to the tool's URL, signed, with an idempotency key."""
        stored = await self._claim(task)
        if stored is not None:
            return stored
        try:
            outcome = await self._post(task)
        except _Transient as exc:
            if _attempt() < task.attempts:
                raise ApplicationError(str(exc), type="ToolUnavailable") from None
            outcome = _failed(
                task,
                f"{exc} Tell the caller you could not complete this right now.",
            )
        return await self._finish(task, outcome)

    async def _webhook_target(self, task: ToolTask) -> tuple[str, str, outbound.Allowlist]:
        async with self._sessions() as session:
            row = (
                await session.exec(
                    select(ToolDefinition, Organization)
                    .join(Organization, Organization.id == ToolDefinition.organization_id)  # type: ignore[arg-type]
                    .where(
                        ToolDefinition.id == task.tool_id,
                        ToolDefinition.organization_id == task.organization_id,
                    )
                )
            ).first()
        if row is None:
            raise ApplicationError(f"tool {task.tool_id} does not exist", non_retryable=True)
        tool, organization = row
        url = str(tool.config.get("url") or "")
        secret = str(tool.config.get("signing_secret") or "")
        return url, secret, outbound.Allowlist.parse(organization.outbound_allowlist)

    async def _post(self, task: ToolTask) -> ToolOutcome:
        url, secret, allowlist = await self._webhook_target(task)
        if not url:
            return _failed(task, f"The tool {task.tool_name} has no URL configured.")
        body = json.dumps(
            {
                "tool": task.tool_name,
                "arguments": task.arguments,
                "call_id": task.call_id,
                "tool_call_id": task.tool_call_id,
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(task.call_id, task.tool_call_id),
            **(outbound.signature_headers(secret, body) if secret else {}),
        }
        try:
            response = await outbound.send(
                self.http,
                "POST",
                url,
                body=body,
                headers=headers,
                allowlist=allowlist,
                timeout_s=task.timeout_s,
                max_response_bytes=self._max_response_bytes,
                resolver=self._resolver,
            )
        except outbound.OutboundRefused as exc:
            log.warning("tool %s refused: %s", task.tool_name, exc)
            return _failed(task, f"The tool {task.tool_name} may not be called: {exc}.")
        except TimeoutError:
            raise _Transient(
                f"The tool {task.tool_name} did not answer within {task.timeout_s:g} s."
            ) from None
        except httpx.HTTPError as exc:
            raise _Transient(
                f"The tool {task.tool_name} could not be reached ({type(exc).__name__})."
            ) from None
        text = response.body.decode("utf-8", errors="replace")
        if response.status in (408, 429) or response.status >= 500:
            raise _Transient(f"The tool {task.tool_name} answered HTTP {response.status}.")
        if not 200 <= response.status < 300:
            snippet = text[:500]
            return _failed(
                task, f"The tool {task.tool_name} answered HTTP {response.status}: {snippet}"
            )
        content = text
        if response.truncated:
            content = f"{text}\n(The response was cut at {self._max_response_bytes} bytes.)"
        elif response.content_type.endswith("json") or text.lstrip()[:1] in ("{", "["):
            try:
                content = json.dumps(json.loads(text), separators=(",", ":"))
            except ValueError:
                content = text
        return ToolOutcome(
            task.tool_call_id, task.tool_name, True, content or '{"ok":true}', kind=task.kind
        )

    # ------------------------------------------------------------ calendar

    async def _calendar(self, session: AsyncSession, task: ToolTask) -> Calendar | None:
        calendar_id = task.settings.get("calendar_id")
        if not calendar_id:
            return None
        return (
            await session.exec(
                select(Calendar).where(
                    Calendar.id == str(calendar_id),
                    Calendar.organization_id == task.organization_id,
                )
            )
        ).first()

    @staticmethod
    def _rules(calendar: Calendar) -> CalendarRules:
        return CalendarRules(calendar.timezone, calendar.slot_minutes, calendar.availability)

    async def _booked(
        self, session: AsyncSession, calendar_id: str, start: datetime, end: datetime
    ) -> set[datetime]:
        rows = (
            await session.exec(
                select(Appointment.starts_at).where(
                    Appointment.calendar_id == calendar_id,
                    Appointment.status == "booked",
                    col(Appointment.starts_at) >= start,
                    col(Appointment.starts_at) < end,
                )
            )
        ).all()
        return {as_utc(r) for r in rows}

    @activity.defn(name="tool.check_availability")
    async def check_availability(self, task: ToolTask) -> ToolOutcome:
        async def body(session: AsyncSession) -> ToolOutcome:
            calendar = await self._calendar(session, task)
            if calendar is None:
                return _failed(task, "No calendar is set up for this tool.")
            rules = self._rules(calendar)
            zone = rules.zone
            now = utcnow()
            first = (
                date.fromisoformat(task.arguments["date"])
                if task.arguments.get("date")
                else now.astimezone(zone).date()
            )
            days = [first + timedelta(days=i) for i in range(int(task.arguments.get("days", 1)))]
            slots = {day: rules.local_slots(day) for day in days}
            every = [s for day_slots in slots.values() for s in day_slots]
            booked = (
                await self._booked(
                    session,
                    calendar.id,
                    min(every).astimezone(UTC),
                    max(every).astimezone(UTC) + timedelta(seconds=1),
                )
                if every
                else set()
            )
            listing = []
            for day, day_slots in slots.items():
                free = [s for s in day_slots if s > now and s.astimezone(UTC) not in booked]
                listing.append(
                    {
                        "date": day.isoformat(),
                        "weekday": day.strftime("%A"),
                        "free": [local_iso(s, zone) for s in free[:MAX_SLOTS_PER_DAY]],
                        "more": max(0, len(free) - MAX_SLOTS_PER_DAY),
                    }
                )
            return _ok(
                task,
                {
                    "calendar": calendar.name,
                    "timezone": calendar.timezone,
                    "slot_minutes": calendar.slot_minutes,
                    "days": listing,
                },
            )

        return await self._run_in_db(task, body)

    @activity.defn(name="tool.book_appointment")
    async def book_appointment(self, task: ToolTask) -> ToolOutcome:
        """Book a slot. The unique (calendar, start) constraint is what prevents double
        booking, also between concurrent calls; the idempotency key makes it once per
        tool call."""

        async def body(session: AsyncSession) -> ToolOutcome:
            calendar = await self._calendar(session, task)
            if calendar is None:
                return _failed(task, "No calendar is set up for this tool.")
            rules = self._rules(calendar)
            try:
                start = rules.parse_local(str(task.arguments["start"]))
            except ValueError:
                return _failed(task, "start must look like 2025-03-04T09:30 (the local time).")
            label = local_label(start, rules.zone)
            if not rules.is_slot(start):
                return _failed(
                    task,
                    f"{label} is not a bookable slot. Check availability and offer a free slot.",
                )
            if start <= utcnow():
                return _failed(task, f"{label} is in the past. Offer a later slot.")
            call = (await session.exec(select(Call).where(Call.id == task.call_id))).first()
            phone = task.arguments.get("phone") or (call.from_number if call else None)
            appointment = Appointment(
                organization_id=task.organization_id,
                calendar_id=calendar.id,
                starts_at=start,
                ends_at=start + timedelta(minutes=calendar.slot_minutes),
                call_id=task.call_id,
                idempotency_key=f"{task.call_id}:{task.tool_call_id}",
                attendee_name=str(task.arguments["name"]),
                attendee_phone=phone,
                notes=task.arguments.get("notes"),
            )
            nested = await session.begin_nested()
            session.add(appointment)
            try:
                await session.flush()
            except sa.exc.IntegrityError:
                await nested.rollback()
                return _failed(
                    task,
                    f"{label} was just taken by someone else. Offer the caller another slot.",
                )
            await nested.commit()
            return _ok(
                task,
                {
                    "booked": True,
                    "appointment_id": appointment.id,
                    "start": local_iso(start, rules.zone),
                    "when": label,
                    "timezone": calendar.timezone,
                    "name": appointment.attendee_name,
                },
            )

        return await self._run_in_db(task, body)

    # ------------------------------------------------------------ call control

    @activity.defn(name="tool.end_call")
    async def end_call(self, task: ToolTask) -> ToolOutcome:
        async def body(_session: AsyncSession) -> ToolOutcome:
            return _ok(
                task,
                {"ok": True, "note": "The call ends after your next words: say goodbye now."},
                action="end_call",
            )

        return await self._run_in_db(task, body)

    @activity.defn(name="tool.hold")
    async def hold(self, task: ToolTask) -> ToolOutcome:
        async def body(_session: AsyncSession) -> ToolOutcome:
            limit = float(task.settings.get("max_hold_s", DEFAULT_MAX_HOLD_S))
            default = task.settings.get("hold_s", DEFAULT_HOLD_S)
            wanted = float(task.arguments.get("seconds", default))
            seconds = max(0.0, min(wanted, limit))
            return _ok(
                task,
                {
                    "ok": True,
                    "held_seconds": seconds,
                    "note": "The caller is on hold until you speak again; thank them for waiting.",
                },
                action="hold",
                hold_s=seconds,
            )

        return await self._run_in_db(task, body)

    @activity.defn(name="tool.send_dtmf")
    async def send_dtmf(self, task: ToolTask) -> ToolOutcome:
        async def body(_session: AsyncSession) -> ToolOutcome:
            digits = str(task.arguments.get("digits", ""))
            return _ok(task, {"ok": True, "sent": digits}, action="send_dtmf", digits=digits)

        return await self._run_in_db(task, body)

    @activity.defn(name="tool.transfer_call")
    async def transfer_call(self, task: ToolTask) -> ToolOutcome:
        async def body(_session: AsyncSession) -> ToolOutcome:
            return _failed(task, TRANSFER_UNAVAILABLE)

        return await self._run_in_db(task, body)
