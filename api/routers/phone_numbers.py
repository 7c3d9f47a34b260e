"""Phone numbers: which carrier brings the calls and which agent answers them."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Response
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS, CONFLICT, NOT_FOUND, ApiError, field_error, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.routers.agents import load_agent
from api.schemas import PhoneNumberCreate, PhoneNumberOut, PhoneNumberUpdate
from builder_engine.db.models import PhoneNumber
from builder_engine.timeutil import utcnow

router = APIRouter(prefix="/v1/phone-numbers", tags=["phone numbers"], responses=COMMON_ERRORS)


def _out(row: PhoneNumber) -> PhoneNumberOut:
    return PhoneNumberOut.model_validate(row, from_attributes=True)


async def _load(session: AsyncSession, organization_id: str, number_id: str) -> PhoneNumber:
    row = (
        await session.exec(
            select(PhoneNumber).where(
                PhoneNumber.id == number_id, PhoneNumber.organization_id == organization_id
            )
        )
    ).first()
    if row is None:
        raise not_found("Phone number", number_id)
    return row


async def _check_agent(session: AsyncSession, organization_id: str, agent_id: str) -> None:
    try:
        await load_agent(session, organization_id, agent_id)
    except ApiError:
        raise field_error("agent_id", f"no agent '{agent_id}' exists") from None


@router.post(
    "",
    status_code=201,
    response_model=PhoneNumberOut,
    responses=CONFLICT,
    summary="Add a phone number",
)
async def create_phone_number(
    body: PhoneNumberCreate, auth: Auth, session: Session
) -> PhoneNumberOut:
    if body.agent_id is not None:
        await _check_agent(session, auth.organization_id, body.agent_id)
    row = PhoneNumber(organization_id=auth.organization_id, **body.model_dump())
    session.add(row)
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        raise ApiError(409, f"{body.number} is already registered.", kind="conflict") from None
    return _out(row)


@router.get("", response_model=Page[PhoneNumberOut], summary="List phone numbers")
async def list_phone_numbers(
    auth: Auth,
    session: Session,
    limit: Limit = 20,
    cursor: Cursor = None,
    agent_id: str | None = None,
) -> Page[PhoneNumberOut]:
    query = select(PhoneNumber).where(
        PhoneNumber.organization_id == auth.organization_id,
        after_cursor(col(PhoneNumber.created_at), col(PhoneNumber.id), cursor),
    )
    if agent_id is not None:
        query = query.where(PhoneNumber.agent_id == agent_id)
    query = query.order_by(col(PhoneNumber.created_at).desc(), col(PhoneNumber.id).desc())
    rows = (await session.exec(query.limit(limit + 1))).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[PhoneNumberOut](data=[_out(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get(
    "/{number_id}", response_model=PhoneNumberOut, responses=NOT_FOUND, summary="Get a phone number"
)
async def get_phone_number(number_id: str, auth: Auth, session: Session) -> PhoneNumberOut:
    return _out(await _load(session, auth.organization_id, number_id))


@router.patch(
    "/{number_id}",
    response_model=PhoneNumberOut,
    responses=NOT_FOUND,
    summary="Update a phone number (assign an agent; null unassigns)",
)
async def update_phone_number(
    number_id: str, body: PhoneNumberUpdate, auth: Auth, session: Session
) -> PhoneNumberOut:
    row = await _load(session, auth.organization_id, number_id)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("agent_id") is not None:
        await _check_agent(session, auth.organization_id, changes["agent_id"])
    if "carrier" in changes and changes["carrier"] is None:
        raise field_error("carrier", "carrier cannot be null")
    for key, value in changes.items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    return _out(row)


@router.delete(
    "/{number_id}",
    status_code=204,
    response_class=Response,
    responses=NOT_FOUND,
    summary="Remove a phone number",
)
async def delete_phone_number(number_id: str, auth: Auth, session: Session) -> Response:
    row = await _load(session, auth.organization_id, number_id)
    await session.delete(row)
    await session.commit()
    return Response(status_code=204)
