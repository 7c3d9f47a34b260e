"""The calendar tools against the real database (SQLite and PostgreSQL): slots from
opening hours, booking exactly once per tool call, no double booking under concurrency;
and the calendars API."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session, select
from tools_support import SeededCall, new_call, seed_call, tool_call_id

from activities.tools import ToolActivities
from builder_engine.apikeys import create_org_api_key
from builder_engine.calendars import CalendarRules, normalize_availability
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine, session_factory
from builder_engine.db.migrate import upgrade
from builder_engine.db.models import Appointment, Organization, ToolExecution
from conftest import ApiHarness
from workflows.tools import ToolOutcome, ToolTask
from workflows.types import CallStart

NEW_YORK = "America/New_York"


def next_weekday(weekday: int, weeks_ahead: int = 1) -> date:
    today = datetime.now(UTC).date()
    return today + timedelta(days=(weekday - today.weekday()) % 7 + 7 * weeks_ahead)


@pytest.fixture
async def tools(db_settings: Settings) -> AsyncIterator[ToolActivities]:
    engine = create_async_db_engine(db_settings)
    try:
        yield ToolActivities(session_factory(engine))
    finally:
        await engine.dispose()


def booking_call(settings: Settings) -> SeededCall:
    return seed_call(
        settings,
        [
            {"name": "book", "kind": "book_appointment"},
            {"name": "availability", "kind": "check_availability"},
        ],
        calendar={
            "timezone": NEW_YORK,
            "slot_minutes": 30,
            "availability": {"mon": [["09:00", "12:00"], ["13:00", "15:00"]]},
        },
    )


def task(
    call: CallStart, seeded: SeededCall, name: str, arguments: dict[str, Any], call_id: str = ""
) -> ToolTask:
    return ToolTask(
        call_id=call.call_id,
        organization_id=call.organization_id,
        tool_call_id=call_id or tool_call_id(),
        tool_id=seeded.tools[name],
        tool_name=name,
        kind="book_appointment" if name == "book" else "check_availability",
        arguments=arguments,
        timeout_s=5.0,
        attempts=3,
        settings={"calendar_id": seeded.calendar_id},
    )


def appointments(settings: Settings, calendar_id: str | None) -> list[Appointment]:
    engine = create_sync_engine(settings)
    try:
        with Session(engine) as session:
            return list(
                session.exec(select(Appointment).where(Appointment.calendar_id == calendar_id))
            )
    finally:
        engine.dispose()


def content(outcome: ToolOutcome) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(outcome.content)
    return parsed


# ------------------------------------------------------------------ rules


def test_slots_follow_opening_hours_in_the_calendar_time_zone() -> None:
    rules = CalendarRules(NEW_YORK, 45, normalize_availability({"tue": [["09:00", "11:00"]]}))
    tuesday = date(2025, 3, 4)
    slots = rules.local_slots(tuesday)
    assert [s.strftime("%H:%M") for s in slots] == ["09:00", "09:45"]  # 10:30 would end late
    assert slots[0].astimezone(UTC).hour == 14  # EST, UTC-5
    assert rules.local_slots(date(2025, 3, 5)) == []  # closed on Wednesday
    assert rules.is_slot(slots[1]) and not rules.is_slot(slots[1] + timedelta(minutes=15))
    assert rules.parse_local("2025-03-04T09:45") == slots[1].astimezone(UTC)
    # Summer time: the same local hours, an hour earlier in UTC.
    assert rules.local_slots(date(2025, 7, 1))[0].astimezone(UTC).hour == 13
    # 02:30 does not exist on the night the clocks go forward: it is no slot.
    night = CalendarRules(NEW_YORK, 30, {"sun": [["02:00", "03:00"]]})
    assert night.local_slots(date(2025, 3, 9)) == []


def test_opening_hours_are_validated() -> None:
    for bad in (
        {"monday": [["09:00", "10:00"]]},
        {"mon": [["10:00", "09:00"]]},
        {"mon": [["09:00", "11:00"], ["10:00", "12:00"]]},
        {"mon": [["9am", "10:00"]]},
        {"mon": "09:00-10:00"},
    ):
        with pytest.raises(ValueError):
            normalize_availability(bad)


# ------------------------------------------------------------------ tools


async def test_booking_happens_once_per_tool_call_and_never_twice_per_slot(
    db_settings: Settings, tools: ToolActivities
) -> None:
    seeded = booking_call(db_settings)
    monday = next_weekday(0)
    slot = f"{monday.isoformat()}T09:30"
    first = task(seeded.start, seeded, "book", {"start": slot, "name": "Ada"})
    booked = await tools.book_appointment(first)
    assert booked.ok, booked.content
    assert content(booked)["start"] == slot and "Monday" in content(booked)["when"]
    # The same tool call again (a retried activity): the stored result, no second booking.
    assert await tools.book_appointment(first) == booked
    # Another call wants the same slot: refused with words the model can use.
    other = new_call(db_settings, seeded)
    taken = await tools.book_appointment(task(other, seeded, "book", {"start": slot, "name": "Bo"}))
    assert not taken.ok and "just taken" in content(taken)["error"]
    rows = appointments(db_settings, seeded.calendar_id)
    assert len(rows) == 1 and rows[0].attendee_name == "Ada"
    assert rows[0].attendee_phone == "+14155550123"  # the caller's number by default
    assert rows[0].idempotency_key == f"{seeded.start.call_id}:{first.tool_call_id}"

    # Not a slot, closed, in the past: refused, nothing booked.
    for start, phrase in [
        (f"{monday.isoformat()}T09:10", "not a bookable slot"),
        (f"{monday.isoformat()}T12:00", "not a bookable slot"),
        (f"{(monday + timedelta(days=1)).isoformat()}T09:00", "not a bookable slot"),
        (f"{next_weekday(0, weeks_ahead=-2).isoformat()}T09:00", "in the past"),
        ("next monday", "must look like"),
    ]:
        refused = await tools.book_appointment(
            task(seeded.start, seeded, "book", {"start": start, "name": "Cy"})
        )
        assert not refused.ok and phrase in content(refused)["error"], (start, refused)
    assert len(appointments(db_settings, seeded.calendar_id)) == 1

    # Availability leaves the booked slot out.
    listing = await tools.check_availability(
        task(seeded.start, seeded, "availability", {"date": monday.isoformat(), "days": 2})
    )
    days = content(listing)["days"]
    assert days[0]["free"][:2] == [f"{monday.isoformat()}T09:00", f"{monday.isoformat()}T10:00"]
    assert len(days[0]["free"]) == 6 + 4 - 1 and days[1]["free"] == []

    engine = create_sync_engine(db_settings)
    with Session(engine) as session:
        executions = session.exec(
            select(ToolExecution).where(ToolExecution.call_id == seeded.start.call_id)
        ).all()
    engine.dispose()
    assert sum(1 for e in executions if e.status == "succeeded") == 2  # booking + listing


@pytest.fixture(scope="module")
def postgres_settings(postgres_database: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("pg-booking"),
        database_url=postgres_database,
        _env_file=None,
    )
    upgrade(settings)
    return settings


async def test_concurrent_bookings_on_postgresql(postgres_settings: Settings) -> None:
    seeded = booking_call(postgres_settings)
    slot = f"{next_weekday(0).isoformat()}T13:00"
    engine = create_async_db_engine(postgres_settings)
    try:
        tools = ToolActivities(session_factory(engine))
        # Ten calls race for one slot: exactly one wins.
        calls = [new_call(postgres_settings, seeded) for _ in range(10)]
        results = await asyncio.gather(
            *(
                tools.book_appointment(task(c, seeded, "book", {"start": slot, "name": f"p{i}"}))
                for i, c in enumerate(calls)
            )
        )
        assert sum(r.ok for r in results) == 1
        assert all("just taken" in content(r)["error"] for r in results if not r.ok)
        # One tool call delivered five times at once (retries racing): one booking, one answer.
        same = task(
            seeded.start, seeded, "book", {"start": slot.replace("13:00", "13:30"), "name": "Q"}
        )
        repeated = await asyncio.gather(*(tools.book_appointment(same) for _ in range(5)))
        assert repeated[0].ok and all(r == repeated[0] for r in repeated)
    finally:
        await engine.dispose()
    rows = appointments(postgres_settings, seeded.calendar_id)
    assert sorted(r.starts_at.astimezone(UTC).strftime("%H:%M") for r in rows) in (
        ["18:00", "18:30"],  # EST
        ["17:00", "17:30"],  # EDT
    )


# ------------------------------------------------------------------ calendars API


async def test_calendars_api(api: ApiHarness) -> None:
    client = api.acme.client
    created = await client.post(
        "/v1/calendars",
        json={
            "name": "Dr. Who",
            "timezone": "Europe/London",
            "slot_minutes": 20,
            "availability": {"fri": [["13:00", "17:00"], ["09:00", "12:00"]]},
        },
    )
    assert created.status_code == 201, created.text
    calendar = created.json()
    assert calendar["availability"] == {"fri": [["09:00", "12:00"], ["13:00", "17:00"]]}
    calendar_id = calendar["id"]

    for body, field in [
        ({"name": "x", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "x", "availability": {"fri": [["12:00", "09:00"]]}}, "availability"),
        ({"name": "x", "slot_minutes": 1}, "slot_minutes"),
    ]:
        bad = await client.post("/v1/calendars", json=body)
        assert bad.status_code == 422, body
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["errors"][0]["field"].startswith(field)

    patched = await client.patch(f"/v1/calendars/{calendar_id}", json={"slot_minutes": 30})
    assert patched.json()["slot_minutes"] == 30 and patched.json()["name"] == "Dr. Who"
    listed = (await client.get("/v1/calendars", params={"limit": 100})).json()
    assert calendar_id in [c["id"] for c in listed["data"]]

    # Another organization sees nothing of it.
    other = api.globex.client
    for method, path in [
        ("GET", f"/v1/calendars/{calendar_id}"),
        ("PATCH", f"/v1/calendars/{calendar_id}"),
        ("DELETE", f"/v1/calendars/{calendar_id}"),
        ("GET", f"/v1/calendars/{calendar_id}/appointments"),
    ]:
        response = await other.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path)
        assert response.json()["type"].endswith("/not-found")
    theirs = (await other.get("/v1/calendars", params={"limit": 100})).json()["data"]
    assert calendar_id not in [c["id"] for c in theirs]
    # ...and cannot point a booking tool at it.
    stolen = await other.post(
        "/v1/tools",
        json={
            "name": f"book_{secrets.token_hex(3)}",
            "kind": "book_appointment",
            "config": {"calendar_id": calendar_id},
        },
    )
    assert stolen.status_code == 422 and stolen.json()["errors"][0]["field"] == "config.calendar_id"

    # A booking tool on it: default schema; the calendar cannot go while the tool uses it.
    tool = await client.post(
        "/v1/tools",
        json={
            "name": f"book_{secrets.token_hex(3)}",
            "kind": "book_appointment",
            "config": {"calendar_id": calendar_id},
        },
    )
    assert tool.status_code == 201, tool.text
    assert tool.json()["parameters"]["required"] == ["start", "name"]
    assert tool.json()["signing_secret"] is None
    blocked = await client.delete(f"/v1/calendars/{calendar_id}")
    assert blocked.status_code == 409 and tool.json()["name"] in blocked.json()["detail"]
    assert (await client.delete(f"/v1/tools/{tool.json()['id']}")).status_code == 204

    empty = (await client.get(f"/v1/calendars/{calendar_id}/appointments")).json()
    assert empty == {"data": [], "next_cursor": None}
    assert (await client.delete(f"/v1/calendars/{calendar_id}")).status_code == 204
    assert (await client.get(f"/v1/calendars/{calendar_id}")).status_code == 404


async def test_appointments_are_listed_per_calendar(api: ApiHarness, tools: ToolActivities) -> None:
    seeded = booking_call(api.settings)
    monday = next_weekday(0)
    for hour in ("09:00", "09:30", "10:00"):
        booked = await tools.book_appointment(
            task(seeded.start, seeded, "book", {"start": f"{monday}T{hour}", "name": hour})
        )
        assert booked.ok
    # The booking's organization is a fresh one: read it through a key of its own.
    engine = create_sync_engine(api.settings)
    with Session(engine) as session:
        org = session.exec(
            select(Organization).where(Organization.id == seeded.start.organization_id)
        ).one()
        org_name = org.name
    engine.dispose()
    key = create_org_api_key(api.settings, org_name)
    client = api.acme.client
    headers = {"Authorization": f"Bearer {key}"}
    path = f"/v1/calendars/{seeded.calendar_id}/appointments"
    page = (await client.get(path, params={"limit": 2}, headers=headers)).json()
    assert len(page["data"]) == 2 and page["next_cursor"]
    rest = (
        await client.get(path, params={"limit": 2, "cursor": page["next_cursor"]}, headers=headers)
    ).json()
    names = {a["attendee_name"] for a in page["data"] + rest["data"]}
    assert names == {"09:00", "09:30", "10:00"}
    first = page["data"][0]
    assert first["call_id"] == seeded.start.call_id and first["status"] == "booked"
    ten = CalendarRules(NEW_YORK, 30, {}).parse_local(f"{monday}T10:00")
    later = (
        await client.get(path, params={"starts_after": ten.isoformat()}, headers=headers)
    ).json()["data"]
    assert [a["attendee_name"] for a in later] == ["10:00"]
    # Acme's key sees none of it.
    assert (await client.get(path)).status_code == 404
