"""The organization's API keys: create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlmodel import col, select

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS, NOT_FOUND, not_found
from api.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut
from builder_engine.apikeys import generate_key
from builder_engine.db.models import ApiKey
from builder_engine.timeutil import utcnow

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], responses=COMMON_ERRORS)


@router.post("", status_code=201, response_model=ApiKeyCreated, summary="Create an API key")
async def create_api_key(body: ApiKeyCreate, auth: Auth, session: Session) -> ApiKeyCreated:
    new_key = generate_key(auth.organization_id, body.name)
    session.add(new_key.record)
    await session.commit()
    out = ApiKeyOut.model_validate(new_key.record, from_attributes=True)
    return ApiKeyCreated(**out.model_dump(), key=new_key.plaintext)


@router.get("", response_model=list[ApiKeyOut], summary="List API keys (never the keys)")
async def list_api_keys(auth: Auth, session: Session) -> list[ApiKeyOut]:
    rows = (
        await session.exec(
            select(ApiKey)
            .where(ApiKey.organization_id == auth.organization_id)
            .order_by(col(ApiKey.created_at).desc())
        )
    ).all()
    return [ApiKeyOut.model_validate(r, from_attributes=True) for r in rows]


@router.delete(
    "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=NOT_FOUND,
    summary="Revoke an API key",
)
async def revoke_api_key(key_id: str, auth: Auth, session: Session) -> Response:
    row = (
        await session.exec(
            select(ApiKey).where(
                ApiKey.id == key_id, ApiKey.organization_id == auth.organization_id
            )
        )
    ).first()
    if row is None:
        raise not_found("API key", key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        await session.commit()
    return Response(status_code=204)
