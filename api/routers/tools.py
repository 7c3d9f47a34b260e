"""Tool definitions: functions an agent's model may call, referenced by agents by id.

A webhook tool gets a signing secret when it is created (unless its config brings one
as ``signing_secret``): the create response shows it once, like an API key; it never
appears in reads afterwards. ``POST /v1/tools/{id}/signing-secret`` replaces it and
shows the new one once. Built-in kinds get a default parameter schema when created
without one; calendar tools name a calendar of the organization (``config.calendar_id``).
"""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from pydantic import Field
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS, CONFLICT, NOT_FOUND, ApiError, field_error, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.schemas import ToolCreate, ToolOut, ToolUpdate
from builder_engine.agent_config import check_json_schema
from builder_engine.db.models import Calendar, ToolDefinition
from builder_engine.timeutil import utcnow
from builder_engine.tools import CALENDAR_KINDS, DEFAULT_PARAMETERS, SECRET_CONFIG_KEYS

router = APIRouter(prefix="/v1/tools", tags=["tools"], responses=COMMON_ERRORS)


class ToolCreated(ToolOut):
    signing_secret: str | None = Field(
        default=None,
        description="Webhook tools: the secret that signs each request (`Builder-Signature`). "
        "Shown once: store it now.",
    )


class SigningSecret(ToolOut):
    signing_secret: str = Field(description="The new signing secret. Shown once.")


def new_signing_secret() -> str:
    return "bts_" + secrets.token_urlsafe(32)


async def _check_calendar(
    session: AsyncSession, organization_id: str, kind: str, config: dict[str, Any]
) -> None:
    if kind not in CALENDAR_KINDS:
        return
    calendar_id = config.get("calendar_id")
    found = None
    if isinstance(calendar_id, str):
        found = (
            await session.exec(
                select(Calendar.id).where(
                    Calendar.id == calendar_id, Calendar.organization_id == organization_id
                )
            )
        ).first()
    if found is None:
        raise field_error("config.calendar_id", f"a {kind} tool needs one of your calendars' ids")


def _out(row: ToolDefinition) -> ToolOut:
    config = {k: v for k, v in row.config.items() if k not in SECRET_CONFIG_KEYS}
    url = config.pop("url", None)
    return ToolOut(
        id=row.id,
        name=row.name,
        kind=row.kind,
        description=row.description,
        parameters=row.parameters,
        config=config,
        url=url,
        timeout_s=row.timeout_s,
        safe_to_retry=row.safe_to_retry,
        filler_message=row.filler_message,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _stored_config(config: dict[str, Any], url: Any) -> dict[str, Any]:
    return {**config, "url": str(url)} if url is not None else dict(config)


async def _load(session: AsyncSession, organization_id: str, tool_id: str) -> ToolDefinition:
    row = (
        await session.exec(
            select(ToolDefinition).where(
                ToolDefinition.id == tool_id,
                ToolDefinition.organization_id == organization_id,
                col(ToolDefinition.deleted_at).is_(None),
            )
        )
    ).first()
    if row is None:
        raise not_found("Tool", tool_id)
    return row


async def _commit_unique_name(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        raise ApiError(409, f"A tool named '{name}' already exists.", kind="conflict") from None


@router.post(
    "", status_code=201, response_model=ToolCreated, responses=CONFLICT, summary="Create a tool"
)
async def create_tool(body: ToolCreate, auth: Auth, session: Session) -> ToolCreated:
    if body.kind == "webhook" and body.url is None:
        raise field_error("url", "a webhook tool needs the url to call")
    await _check_calendar(session, auth.organization_id, body.kind, body.config)
    config = _stored_config(body.config, body.url)
    if body.kind == "webhook" and not config.get("signing_secret"):
        config["signing_secret"] = new_signing_secret()
    parameters = body.parameters
    if "parameters" not in body.model_fields_set and body.kind in DEFAULT_PARAMETERS:
        parameters = DEFAULT_PARAMETERS[body.kind]
    row = ToolDefinition(
        organization_id=auth.organization_id,
        name=body.name,
        kind=body.kind,
        description=body.description,
        parameters=parameters,
        config=config,
        timeout_s=body.timeout_s,
        safe_to_retry=body.safe_to_retry,
        filler_message=body.filler_message,
    )
    session.add(row)
    await _commit_unique_name(session, body.name)
    secret = row.config.get("signing_secret")
    return ToolCreated(**_out(row).model_dump(), signing_secret=secret)


@router.get("", response_model=Page[ToolOut], summary="List tools")
async def list_tools(
    auth: Auth, session: Session, limit: Limit = 20, cursor: Cursor = None
) -> Page[ToolOut]:
    query = (
        select(ToolDefinition)
        .where(
            ToolDefinition.organization_id == auth.organization_id,
            col(ToolDefinition.deleted_at).is_(None),
            after_cursor(col(ToolDefinition.created_at), col(ToolDefinition.id), cursor),
        )
        .order_by(col(ToolDefinition.created_at).desc(), col(ToolDefinition.id).desc())
        .limit(limit + 1)
    )
    rows = (await session.exec(query)).all()
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
    return Page[ToolOut](data=[_out(r) for r in rows[:limit]], next_cursor=next_cursor)


@router.get("/{tool_id}", response_model=ToolOut, responses=NOT_FOUND, summary="Get a tool")
async def get_tool(tool_id: str, auth: Auth, session: Session) -> ToolOut:
    return _out(await _load(session, auth.organization_id, tool_id))


@router.patch(
    "/{tool_id}",
    response_model=ToolOut,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Update a tool",
)
async def update_tool(tool_id: str, body: ToolUpdate, auth: Auth, session: Session) -> ToolOut:
    row = await _load(session, auth.organization_id, tool_id)
    changes = body.model_dump(exclude_unset=True)
    for key in ("name", "description", "timeout_s", "safe_to_retry", "config", "parameters"):
        if key in changes and changes[key] is None:
            raise field_error(key, f"{key} cannot be null")
    if "parameters" in changes:
        try:
            check_json_schema(changes["parameters"])
        except ValueError as exc:
            raise field_error("parameters", str(exc)) from None
    url = changes.pop("url", row.config.get("url"))
    config = changes.pop("config", {k: v for k, v in row.config.items() if k != "url"})
    if row.kind == "webhook" and url is None:
        raise field_error("url", "a webhook tool needs the url to call")
    await _check_calendar(session, auth.organization_id, row.kind, config)
    # Secrets are kept unless the new config brings its own.
    kept = {k: row.config[k] for k in SECRET_CONFIG_KEYS if k in row.config}
    for key, value in changes.items():
        setattr(row, key, value)
    row.config = {**kept, **_stored_config(config, url)}
    row.updated_at = utcnow()
    session.add(row)
    await _commit_unique_name(session, row.name)
    return _out(row)


@router.post(
    "/{tool_id}/signing-secret",
    response_model=SigningSecret,
    responses=NOT_FOUND,
    summary="Replace a webhook tool's signing secret",
)
async def rotate_signing_secret(tool_id: str, auth: Auth, session: Session) -> SigningSecret:
    """Requests are signed with the new secret from now on; it is shown once."""
    row = await _load(session, auth.organization_id, tool_id)
    if row.kind != "webhook":
        raise ApiError(409, "Only webhook tools sign their requests.", kind="conflict")
    secret = new_signing_secret()
    row.config = {**row.config, "signing_secret": secret}
    row.updated_at = utcnow()
    session.add(row)
    await session.commit()
    return SigningSecret(**_out(row).model_dump(), signing_secret=secret)


@router.delete(
    "/{tool_id}",
    status_code=204,
    response_class=Response,
    responses=NOT_FOUND,
    summary="Delete a tool",
)
async def delete_tool(tool_id: str, auth: Auth, session: Session) -> Response:
    """Soft delete: agent versions that referenced it keep their history."""
    row = await _load(session, auth.organization_id, tool_id)
    row.deleted_at = utcnow()
    # Free the name for a new tool.
    row.name = f"{row.name[:40]}~deleted~{row.id[-8:]}"
    session.add(row)
    await session.commit()
    return Response(status_code=204)
