"""Calendars for the booking tools, and the appointments booked in them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS, CONFLICT, NOT_FOUND, ApiError, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.schemas import UtcDatetime
from builder_engine.calendars import check_timezone, normalize_availability
from builder_engine.db.models import Appointment, Calendar, ToolDefinition
from builder_engine.timeutil import as_utc, utcnow
from builder_engine.tools import CALENDAR_KINDS

router = APIRouter(prefix="/v1/calendars", tags=["calendars"], responses=COMMON_ERRORS)

Availability = dict[str, list[list[str]]]
_AVAILABILITY_DOC = (
    'Weekly opening hours in the calendar\'s time zone: {"mon": [["09:00", "12:00"], '
    '["13:00", "17:00"]], ...}; days left out are closed.'
)


def _timezone(value: str) -> str:
    check_timezone(value)
    return value


class CalendarCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    timezone: str = Field(default="UTC", max_length=64, description="IANA zone, e.g. Europe/Paris.")
    slot_minutes: int = Field(default=30, ge=5, le=480, description="Length of every slot.")
    availability: Availability = Field(default_factory=dict, description=_AVAILABILITY_DOC)

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        return _timezone(value)

    @field_validator("availability", mode="before")
    @classmethod
    def _valid_availability(cls, value: Any) -> Availability:
        return normalize_availability(value)


class CalendarUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = Field(default=None, max_length=64)
    slot_minutes: int | None = Field(default=None, ge=5, le=480)
    availability: Availability | None = Field(default=None, description=_AVAILABILITY_DOC)

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str | None) -> str | None:
        return None if value is None else _timezone(value)

    @field_validator("availability", mode="before")
    @classmethod
    def _valid_availability(cls, value: Any) -> Availability | None:
        return None if value is None else normalize_availability(value)


class CalendarOut(BaseModel):
    object: Literal["calendar"] = "calendar"
    id: str
    name: str
    timezone: str
    slot_minutes: int
    availability: Availability
    created_at: UtcDatetime
    updated_at: UtcDatetime


class AppointmentOut(BaseModel):
    object: Literal["appointment"] = "appointment"
    id: str
    calendar_id: str
    starts_at: UtcDatetime
    ends_at: UtcDatetime
    status: str
    attendee_name: str | None
    attendee_phone: str | None
    notes: str | None
    call_id: str | None = Field(description="The call that booked it, if a call did.")
    created_at: UtcDatetime


def _out(row: Calendar) -> CalendarOut:
    return CalendarOut.model_validate(row, from_attributes=True)


async def _load(session: AsyncSession, organization_id: str, calendar_id: str) -> Calendar:
    row = (
        await session.exec(
            select(Calendar).where(
                Calendar.id == calendar_id, Calendar.organization_id == organization_id
            )
        )
    ).first()
    if row is None:
        raise not_found("Calendar", calendar_id)
    return row


@router.post("", status_code=201, response_model=CalendarOut, summary="Create a calendar")
async def create_calendar(body: CalendarCreate, auth: Auth, session: Session) -> CalendarOut:
    row = Calendar(organization_id=auth.organization_id, **body.model_dump())
    session.add(row)
    await session.commit()
    return _out(row)


@router.get("", response_model=Page[CalendarOut], summary="List calendars")
async def list_calendars(
    auth: Auth, session: Session, limit: Limit = 20, cursor: Cursor = None
) -> Page[CalendarOut]:
    rows = (
        await session.exec(
            select(Calendar)
            .where(
                Calendar.organization_id == auth.organization_id,
                after_cursor(col(Calendar.created_at), col(Calendar.id), cursor),
            )
            .order_by(col(Calendar.created_at).desc(), col(Calendar.id).desc())
            .limit(limit + 1)
        )
    ).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[CalendarOut](data=[_out(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get(
    "/{calendar_id}", response_model=CalendarOut, responses=NOT_FOUND, summary="Get a calendar"
)
async def get_calendar(calendar_id: str, auth: Auth, session: Session) -> CalendarOut:
    return _out(await _load(session, auth.organization_id, calendar_id))


@router.patch(
    "/{calendar_id}",
    response_model=CalendarOut,
    responses=NOT_FOUND,
    summary="Update a calendar",
)
async def update_calendar(
    calendar_id: str, body: CalendarUpdate, auth: Auth, session: Session
) -> CalendarOut:
    """Changing hours or slot length leaves existing appointments as they are."""
    row = await _load(session, auth.organization_id, calendar_id)
    for key, value in body.model_dump(exclude_unset=True).items():
        if value is None:
            raise ApiError(422, f"{key} cannot be null", kind="validation-error")
        setattr(row, key, value)
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    return _out(row)


@router.delete(
    "/{calendar_id}",
    status_code=204,
    response_class=Response,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Delete a calendar",
)
async def delete_calendar(calendar_id: str, auth: Auth, session: Session) -> Response:
    """Refused (409) while it holds appointments or a tool books into it."""
    row = await _load(session, auth.organization_id, calendar_id)
    booked = (
        await session.exec(select(sa.func.count()).where(Appointment.calendar_id == row.id))
    ).one()
    if booked:
        raise ApiError(409, "The calendar has appointments.", kind="conflict")
    tools = (
        await session.exec(
            select(ToolDefinition).where(
                ToolDefinition.organization_id == auth.organization_id,
                col(ToolDefinition.kind).in_(CALENDAR_KINDS),
                col(ToolDefinition.deleted_at).is_(None),
            )
        )
    ).all()
    users = sorted(t.name for t in tools if t.config.get("calendar_id") == row.id)
    if users:
        raise ApiError(409, f"Tools book into this calendar: {', '.join(users)}.", kind="conflict")
    await session.delete(row)
    await session.commit()
    return Response(status_code=204)


@router.get(
    "/{calendar_id}/appointments",
    response_model=Page[AppointmentOut],
    responses=NOT_FOUND,
    summary="List a calendar's appointments",
)
async def list_appointments(
    calendar_id: str,
    auth: Auth,
    session: Session,
    starts_after: Annotated[
        datetime | None, Query(description="Only appointments starting at or after this.")
    ] = None,
    starts_before: Annotated[
        datetime | None, Query(description="Only appointments starting before this.")
    ] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[AppointmentOut]:
    """Newest booking first."""
    calendar = await _load(session, auth.organization_id, calendar_id)
    query = select(Appointment).where(
        Appointment.calendar_id == calendar.id,
        Appointment.organization_id == auth.organization_id,
        after_cursor(col(Appointment.created_at), col(Appointment.id), cursor),
    )
    if starts_after is not None:
        query = query.where(col(Appointment.starts_at) >= as_utc(starts_after))
    if starts_before is not None:
        query = query.where(col(Appointment.starts_at) < as_utc(starts_before))
    rows = (
        await session.exec(
            query.order_by(col(Appointment.created_at).desc(), col(Appointment.id).desc()).limit(
                limit + 1
            )
        )
    ).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    data = [AppointmentOut.model_validate(r, from_attributes=True) for r in rows[:limit]]
    return Page[AppointmentOut](data=data, next_cursor=next_cursor)
