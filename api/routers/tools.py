"""Tool definitions: functions an agent's model may call, referenced by agents by id."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS, CONFLICT, NOT_FOUND, ApiError, field_error, not_found
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.schemas import ToolCreate, ToolOut, ToolUpdate
from builder_engine.agent_config import check_json_schema
from builder_engine.db.models import ToolDefinition
from builder_engine.timeutil import utcnow

router = APIRouter(prefix="/v1/tools", tags=["tools"], responses=COMMON_ERRORS)


def _out(row: ToolDefinition) -> ToolOut:
    config = dict(row.config)
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
    "", status_code=201, response_model=ToolOut, responses=CONFLICT, summary="Create a tool"
)
async def create_tool(body: ToolCreate, auth: Auth, session: Session) -> ToolOut:
    if body.kind == "webhook" and body.url is None:
        raise field_error("url", "a webhook tool needs the url to call")
    row = ToolDefinition(
        organization_id=auth.organization_id,
        name=body.name,
        kind=body.kind,
        description=body.description,
        parameters=body.parameters,
        config=_stored_config(body.config, body.url),
        timeout_s=body.timeout_s,
        safe_to_retry=body.safe_to_retry,
        filler_message=body.filler_message,
    )
    session.add(row)
    await _commit_unique_name(session, body.name)
    return _out(row)


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
    for key, value in changes.items():
        setattr(row, key, value)
    row.config = _stored_config(config, url)
    row.updated_at = utcnow()
    session.add(row)
    await _commit_unique_name(session, row.name)
    return _out(row)


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
