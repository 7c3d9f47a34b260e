"""Shared by the tool tests: a webhook receiver on 127.0.0.1 that behaves like a careful
customer endpoint (checks signatures, deduplicates by Idempotency-Key), and rows for a
call with tools written straight to the database."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, select

from builder_engine.config import Settings
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import (
    Agent,
    AgentVersion,
    Calendar,
    Call,
    Organization,
    ToolDefinition,
)
from builder_engine.tools import DEFAULT_PARAMETERS
from builder_engine.webhooks import verify_signature
from emulators._server import HttpRequest, HttpResponse, HttpServer
from workflows.types import CallStart

SECRET = "bts_test-signing-secret"

LOOKUP_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"order": {"type": "string", "pattern": "^[0-9]{4}$"}},
    "required": ["order"],
    "additionalProperties": False,
}


@dataclass
class Received:
    at: float  # loop time
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    signed: bool

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")


@dataclass
class Route:
    delay_s: float = 0.0
    status: int = 200
    reply: Any = field(default_factory=lambda: {"status": "shipped", "eta": "Monday"})
    raw: bytes | None = None  # sent as is (text/plain) instead of ``reply``
    hold: asyncio.Event | None = None  # the first request waits for this


class ToolReceiver:
    """``async with ToolReceiver() as r``: routes by path; every request is recorded.

    Effects happen once per Idempotency-Key (``effects`` counts them); a repeated key
    gets the first answer again, as the docs ask receivers to do.
    """

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.routes: dict[str, Route] = {}
        self.received: list[Received] = []
        self.effects: dict[str, int] = {}
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.arrived = asyncio.Event()
        self._server = HttpServer(self._handle)

    async def __aenter__(self) -> ToolReceiver:
        await self._server.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.__aexit__(None, None, None)

    def url(self, path: str) -> str:
        return f"{self._server.url}{path}"

    def on(self, path: str, **route: Any) -> str:
        self.routes[path] = Route(**route)
        return self.url(path)

    def to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _handle(self, request: HttpRequest, response: HttpResponse) -> None:
        signed = verify_signature(
            self.secret, request.body, request.headers.get("builder-signature", "")
        )
        entry = Received(
            asyncio.get_running_loop().time(),
            request.path,
            dict(request.headers),
            json.loads(request.body or b"{}"),
            signed,
        )
        self.received.append(entry)
        self.arrived.set()
        route = self.routes.get(request.path, Route(status=404, reply={"detail": "no route"}))
        key = entry.key
        if key in self.answers:
            status, body = self.answers[key]
            await response.send(status, body)
            return
        if route.hold is not None and not route.hold.is_set():
            await route.hold.wait()
        if route.delay_s:
            await asyncio.sleep(route.delay_s)
        if route.raw is not None:
            status, body = route.status, route.raw
        else:
            status, body = route.status, json.dumps(route.reply).encode()
        if 200 <= status < 300 and key:
            self.effects[key] = self.effects.get(key, 0) + 1
            self.answers[key] = (status, body)
        content_type = "text/plain" if route.raw is not None else "application/json"
        await response.send(status, body, content_type=content_type)


@dataclass(frozen=True)
class SeededCall:
    start: CallStart
    tools: dict[str, str]  # name -> id
    calendar_id: str | None


def tool_row(
    organization_id: str,
    name: str,
    kind: str,
    *,
    url: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    safe_to_retry: bool = False,
    filler_message: str | None = None,
    **config: Any,
) -> ToolDefinition:
    stored = dict(config)
    if kind == "webhook":
        stored.setdefault("signing_secret", SECRET)
        stored["url"] = url
    return ToolDefinition(
        organization_id=organization_id,
        name=name,
        kind=kind,
        description=f"The {name} tool.",
        parameters=parameters or DEFAULT_PARAMETERS.get(kind, LOOKUP_PARAMETERS),
        config=stored,
        timeout_s=timeout_s,
        safe_to_retry=safe_to_retry,
        filler_message=filler_message,
    )


ALL_WEEK = {day: [["09:00", "17:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def seed_call(
    settings: Settings,
    tools: Sequence[dict[str, Any]],
    *,
    allowlist: Sequence[str] = ("127.0.0.1",),
    calendar: dict[str, Any] | None = None,
) -> SeededCall:
    """An organization, an agent version offering ``tools`` (kwargs of ``tool_row``; a
    calendar tool gets the calendar), and a call of it."""
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            org = Organization(
                name=f"tools-{uuid.uuid4().hex[:8]}", outbound_allowlist=list(allowlist)
            )
            session.add(org)
            session.flush()
            calendar_id = None
            if calendar is not None or any(
                t["kind"] in ("book_appointment", "check_availability") for t in tools
            ):
                row = Calendar(
                    organization_id=org.id,
                    name="Front desk",
                    **({"availability": ALL_WEEK} | (calendar or {})),
                )
                session.add(row)
                session.flush()
                calendar_id = row.id
            rows = []
            for spec in tools:
                spec = dict(spec)
                if spec["kind"] in ("book_appointment", "check_availability"):
                    spec.setdefault("calendar_id", calendar_id)
                rows.append(tool_row(org.id, **spec))
            session.add_all(rows)
            agent = Agent(organization_id=org.id, name="agent", published_version=1)
            session.add(agent)
            session.flush()
            session.add(
                AgentVersion(
                    organization_id=org.id,
                    agent_id=agent.id,
                    version=1,
                    config={"name": "agent", "tools": [r.id for r in rows]},
                )
            )
            call = Call(
                organization_id=org.id,
                agent_id=agent.id,
                agent_version=1,
                direction="inbound",
                from_number="+14155550123",
            )
            session.add(call)
            session.commit()
            start = CallStart(call.id, org.id, agent.id, 1, "inbound")
            return SeededCall(start, {r.name: r.id for r in rows}, calendar_id)
    finally:
        engine.dispose()


def new_call(settings: Settings, seeded: SeededCall) -> CallStart:
    """Another call of the same agent."""
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            call = Call(
                organization_id=seeded.start.organization_id,
                agent_id=seeded.start.agent_id,
                agent_version=1,
                direction="inbound",
            )
            session.add(call)
            session.commit()
            return CallStart(call.id, call.organization_id, call.agent_id, 1, "inbound")
    finally:
        engine.dispose()


def set_allowlist(settings: Settings, organization_id: str, entries: Sequence[str]) -> None:
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            org = session.exec(select(Organization).where(Organization.id == organization_id)).one()
            org.outbound_allowlist = list(entries)
            session.add(org)
            session.commit()
    finally:
        engine.dispose()


def tool_call_id() -> str:
    return f"call_{secrets.token_hex(8)}"
