"""The caller's own organization: its name and its outbound allowlist (SSRF exceptions)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import select

from api.deps import Auth, Session
from api.errors import COMMON_ERRORS
from api.schemas import UtcDatetime
from builder_engine.db.models import Organization

router = APIRouter(prefix="/v1/organization", tags=["organization"], responses=COMMON_ERRORS)

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$"
)

AllowlistEntry = Annotated[str, Field(min_length=1, max_length=253)]


class OrganizationOut(BaseModel):
    object: Literal["organization"] = "organization"
    id: str
    name: str
    outbound_allowlist: list[str] = Field(
        description="Private, loopback or link-local hosts, addresses or networks (CIDR) that "
        "tools and webhooks may call; every other private destination is refused (SSRF)."
    )
    created_at: UtcDatetime


class OrganizationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outbound_allowlist: list[AllowlistEntry] = Field(max_length=100)

    @field_validator("outbound_allowlist")
    @classmethod
    def _entries(cls, entries: list[str]) -> list[str]:
        cleaned = []
        for raw in entries:
            entry = raw.strip().lower()
            try:
                ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                if not _HOSTNAME.match(entry):
                    raise ValueError(f"{raw!r} is not a host name, address or network") from None
            cleaned.append(entry)
        return cleaned


async def _own(session: Session, auth: Auth) -> Organization:
    return (
        await session.exec(select(Organization).where(Organization.id == auth.organization_id))
    ).one()


@router.get("", response_model=OrganizationOut, summary="Get your organization")
async def get_organization(auth: Auth, session: Session) -> OrganizationOut:
    return OrganizationOut.model_validate(await _own(session, auth), from_attributes=True)


@router.patch("", response_model=OrganizationOut, summary="Update your organization's settings")
async def update_organization(
    body: OrganizationUpdate, auth: Auth, session: Session
) -> OrganizationOut:
    org = await _own(session, auth)
    org.outbound_allowlist = body.outbound_allowlist
    session.add(org)
    await session.commit()
    return OrganizationOut.model_validate(org, from_attributes=True)
