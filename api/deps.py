"""Request dependencies: the app context, a database session, the caller's organization."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.context import AppContext
from api.errors import ApiError
from builder_engine.apikeys import hash_key
from builder_engine.db.models import ApiKey
from builder_engine.timeutil import as_utc, utcnow

# Writing last_used_at on every request would turn reads into writes; a minute is
# precise enough to tell which keys are in use.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer be_...`")


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Context = Annotated[AppContext, Depends(get_context)]


async def get_session(context: Context) -> AsyncIterator[AsyncSession]:
    async with context.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: every query a handler makes is scoped by `organization_id`."""

    organization_id: str
    api_key_id: str


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def authenticate(
    context: Context,
    session: Session,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("An API key is required: send 'Authorization: Bearer <key>'.")
    key = (
        await session.exec(
            select(ApiKey).where(
                ApiKey.key_hash == hash_key(credentials.credentials),
                col(ApiKey.revoked_at).is_(None),
            )
        )
    ).first()
    if key is None:
        raise _unauthorized("The API key is unknown or revoked.")
    decision = await context.limiter.hit(key.organization_id)
    if not decision.allowed:
        retry_after = max(1, int(decision.retry_after_s + 0.999))
        raise ApiError(
            429,
            f"Rate limit exceeded for this organization; retry in {retry_after} s.",
            kind="rate-limited",
            headers={"Retry-After": str(retry_after)},
        )
    now = utcnow()
    if key.last_used_at is None or now - as_utc(key.last_used_at) > LAST_USED_RESOLUTION:
        await session.exec(
            sa.update(ApiKey).where(col(ApiKey.id) == key.id).values(last_used_at=now)
        )
        await session.commit()
    return Principal(organization_id=key.organization_id, api_key_id=key.id)


Auth = Annotated[Principal, Depends(authenticate)]
