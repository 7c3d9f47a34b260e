"""Agents and their immutable versions. Every change is a new version; one is published."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import ValidationError
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Auth, Session
from api.errors import (
    COMMON_ERRORS,
    CONFLICT,
    NOT_FOUND,
    ApiError,
    FieldError,
    field_error,
    not_found,
)
from api.pagination import Cursor, Limit, Page, after_cursor, encode_cursor
from api.schemas import AgentOut, AgentVersionOut, PublishRequest
from builder_engine.agent_config import AgentConfig
from builder_engine.db.models import Agent, AgentVersion, PhoneNumber, ToolDefinition
from builder_engine.timeutil import utcnow

router = APIRouter(prefix="/v1/agents", tags=["agents"], responses=COMMON_ERRORS)


async def load_agent(session: AsyncSession, organization_id: str, agent_id: str) -> Agent:
    agent = (
        await session.exec(
            select(Agent).where(
                Agent.id == agent_id,
                Agent.organization_id == organization_id,
                col(Agent.deleted_at).is_(None),
            )
        )
    ).first()
    if agent is None:
        raise not_found("Agent", agent_id)
    return agent


async def _load_version(session: AsyncSession, agent: Agent, version: int) -> AgentVersion:
    row = (
        await session.exec(
            select(AgentVersion).where(
                AgentVersion.agent_id == agent.id, AgentVersion.version == version
            )
        )
    ).first()
    if row is None:
        raise not_found("Version", f"{agent.id}/{version}")
    return row


async def _check_tools(session: AsyncSession, organization_id: str, config: AgentConfig) -> None:
    if not config.tools:
        return
    found = set(
        (
            await session.exec(
                select(ToolDefinition.id).where(
                    col(ToolDefinition.id).in_(config.tools),
                    ToolDefinition.organization_id == organization_id,
                    col(ToolDefinition.deleted_at).is_(None),
                )
            )
        ).all()
    )
    errors = [
        FieldError(field=f"tools.{i}", message=f"no tool '{tool_id}' exists", type="not_found")
        for i, tool_id in enumerate(config.tools)
        if tool_id not in found
    ]
    if errors:
        raise ApiError(
            422, "The agent refers to unknown tools.", kind="validation-error", errors=errors
        )


def _agent_out(agent: Agent, version: AgentVersion) -> AgentOut:
    return AgentOut(
        **version.config,
        id=agent.id,
        version=agent.latest_version,
        published_version=agent.published_version,
        created_at=agent.created_at,
        updated_at=agent.updated_at,
    )


def _version_out(agent: Agent, version: AgentVersion) -> AgentVersionOut:
    return AgentVersionOut(
        agent_id=agent.id,
        version=version.version,
        published=agent.published_version == version.version,
        created_at=version.created_at,
        config=AgentConfig.model_validate(version.config),
    )


async def _add_version(
    session: AsyncSession, agent: Agent, config: AgentConfig, publish: bool
) -> AgentVersion:
    await _check_tools(session, agent.organization_id, config)
    agent.latest_version += 1
    agent.name = config.name
    agent.updated_at = utcnow()
    if publish:
        agent.published_version = agent.latest_version
    version = AgentVersion(
        organization_id=agent.organization_id,
        agent_id=agent.id,
        version=agent.latest_version,
        config=config.model_dump(mode="json"),
    )
    session.add(agent)
    session.add(version)
    await session.commit()
    return version


@router.post("", status_code=201, response_model=AgentOut, summary="Create an agent")
async def create_agent(config: AgentConfig, auth: Auth, session: Session) -> AgentOut:
    """Creates the agent with version 1, published, so a number assigned to it answers."""
    await _check_tools(session, auth.organization_id, config)
    agent = Agent(
        organization_id=auth.organization_id,
        name=config.name,
        latest_version=1,
        published_version=1,
    )
    version = AgentVersion(
        organization_id=auth.organization_id,
        agent_id=agent.id,
        version=1,
        config=config.model_dump(mode="json"),
    )
    session.add(agent)
    await session.flush()
    session.add(version)
    await session.commit()
    return _agent_out(agent, version)


@router.get("", response_model=Page[AgentOut], summary="List agents")
async def list_agents(
    auth: Auth,
    session: Session,
    limit: Limit = 20,
    cursor: Cursor = None,
    name: Annotated[
        str | None, Query(max_length=200, description="Only agents whose name contains this.")
    ] = None,
    published: Annotated[
        bool | None,
        Query(description="Only agents with (true) or without (false) a published version."),
    ] = None,
) -> Page[AgentOut]:
    query = (
        select(Agent, AgentVersion)
        .join(
            AgentVersion,
            (col(AgentVersion.agent_id) == col(Agent.id))
            & (col(AgentVersion.version) == col(Agent.latest_version)),
        )
        .where(
            Agent.organization_id == auth.organization_id,
            col(Agent.deleted_at).is_(None),
            after_cursor(col(Agent.created_at), col(Agent.id), cursor),
        )
    )
    if name:
        query = query.where(func.lower(col(Agent.name)).contains(name.lower(), autoescape=True))
    if published is not None:
        published_col = col(Agent.published_version)
        query = query.where(published_col.is_not(None) if published else published_col.is_(None))
    query = query.order_by(col(Agent.created_at).desc(), col(Agent.id).desc()).limit(limit + 1)
    rows = (await session.exec(query)).all()
    items = [_agent_out(agent, version) for agent, version in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        next_cursor = encode_cursor(last.created_at, last.id)
    return Page[AgentOut](data=items, next_cursor=next_cursor)


@router.get("/{agent_id}", response_model=AgentOut, responses=NOT_FOUND, summary="Get an agent")
async def get_agent(agent_id: str, auth: Auth, session: Session) -> AgentOut:
    agent = await load_agent(session, auth.organization_id, agent_id)
    return _agent_out(agent, await _load_version(session, agent, agent.latest_version))


@router.put(
    "/{agent_id}", response_model=AgentOut, responses=NOT_FOUND, summary="Replace an agent's config"
)
async def replace_agent(
    agent_id: str,
    config: AgentConfig,
    auth: Auth,
    session: Session,
    publish: Annotated[bool, Query(description="Publish the new version at once.")] = False,
) -> AgentOut:
    """Stores the whole config as a new version. Unset fields take their defaults."""
    agent = await load_agent(session, auth.organization_id, agent_id)
    version = await _add_version(session, agent, config, publish)
    return _agent_out(agent, version)


@router.patch(
    "/{agent_id}", response_model=AgentOut, responses=NOT_FOUND, summary="Update an agent"
)
async def update_agent(
    agent_id: str,
    auth: Auth,
    session: Session,
    changes: Annotated[
        dict[str, Any],
        Body(
            description="Fields of the agent config to change; nested objects are merged.",
            examples=[{"brain": {"temperature": 0.3}}],
        ),
    ],
    publish: Annotated[bool, Query(description="Publish the new version at once.")] = False,
) -> AgentOut:
    """Merges the changes into the latest version and stores the result as a new version."""
    agent = await load_agent(session, auth.organization_id, agent_id)
    latest = await _load_version(session, agent, agent.latest_version)
    merged = _merge(latest.config, changes)
    try:
        config = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ApiError(
            422,
            "The updated agent config is invalid.",
            kind="validation-error",
            errors=[
                FieldError(
                    field=".".join(str(p) for p in err["loc"]) or "body",
                    message=str(err["msg"]).removeprefix("Value error, "),
                    type=str(err["type"]),
                )
                for err in exc.errors()
            ],
        ) from None
    version = await _add_version(session, agent, config, publish)
    return _agent_out(agent, version)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "variables":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@router.delete(
    "/{agent_id}",
    status_code=204,
    response_class=Response,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Delete an agent",
)
async def delete_agent(agent_id: str, auth: Auth, session: Session) -> Response:
    """Soft delete: versions and past calls stay; the agent disappears from the API."""
    agent = await load_agent(session, auth.organization_id, agent_id)
    numbers = (
        await session.exec(
            select(PhoneNumber.number).where(
                PhoneNumber.agent_id == agent.id,
                PhoneNumber.organization_id == auth.organization_id,
            )
        )
    ).all()
    if numbers:
        raise ApiError(
            409,
            f"The agent answers {len(numbers)} phone number(s); assign them another agent first.",
            kind="conflict",
        )
    agent.deleted_at = utcnow()
    session.add(agent)
    await session.commit()
    return Response(status_code=204)


@router.get(
    "/{agent_id}/versions",
    response_model=Page[AgentVersionOut],
    responses=NOT_FOUND,
    summary="List an agent's versions",
)
async def list_versions(
    agent_id: str,
    auth: Auth,
    session: Session,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[AgentVersionOut]:
    """Newest first."""
    agent = await load_agent(session, auth.organization_id, agent_id)
    query = select(AgentVersion).where(AgentVersion.agent_id == agent.id)
    if cursor is not None:
        if not cursor.isdigit():
            raise field_error("cursor", "The cursor is not one this API gave out.")
        query = query.where(AgentVersion.version < int(cursor))
    query = query.order_by(col(AgentVersion.version).desc()).limit(limit + 1)
    rows = (await session.exec(query)).all()
    next_cursor = str(rows[limit - 1].version) if len(rows) > limit else None
    return Page[AgentVersionOut](
        data=[_version_out(agent, row) for row in rows[:limit]], next_cursor=next_cursor
    )


@router.get(
    "/{agent_id}/versions/{version}",
    response_model=AgentVersionOut,
    responses=NOT_FOUND,
    summary="Get one version of an agent",
)
async def get_version(agent_id: str, version: int, auth: Auth, session: Session) -> AgentVersionOut:
    agent = await load_agent(session, auth.organization_id, agent_id)
    return _version_out(agent, await _load_version(session, agent, version))


@router.post(
    "/{agent_id}/publish",
    response_model=AgentOut,
    responses=NOT_FOUND,
    summary="Publish a version (rollback = publish an older one)",
)
async def publish_version(
    agent_id: str,
    auth: Auth,
    session: Session,
    body: Annotated[PublishRequest | None, Body()] = None,
) -> AgentOut:
    agent = await load_agent(session, auth.organization_id, agent_id)
    number = body.version if body and body.version is not None else agent.latest_version
    await _load_version(session, agent, number)
    agent.published_version = number
    agent.updated_at = utcnow()
    session.add(agent)
    await session.commit()
    return _agent_out(agent, await _load_version(session, agent, agent.latest_version))
