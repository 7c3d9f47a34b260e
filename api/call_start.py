"""Creating a call: its SQL record and its CallWorkflow (workflow id = call id)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy

from builder_engine.calls import CallStatus, EndedReason
from builder_engine.db.models import Agent, Call, PhoneNumber
from builder_engine.timeutil import utcnow
from workflows.call import AGENT_ID, CALL_TASK_TIMEOUT, DIRECTION, STATUS
from workflows.types import CallStart


@dataclass(frozen=True)
class Route:
    """Where an inbound call to a number goes."""

    number: PhoneNumber
    agent: Agent
    version: int


async def route_inbound(session: AsyncSession, number: str, carrier: str) -> Route | None:
    row = (
        await session.exec(
            select(PhoneNumber, Agent)
            .join(Agent, col(Agent.id) == col(PhoneNumber.agent_id))
            .where(
                PhoneNumber.number == number,
                PhoneNumber.carrier == carrier,
                # The API never assigns another organization's agent; routing must not
                # trust that alone, or a bad row would put a call in the wrong tenant.
                col(Agent.organization_id) == col(PhoneNumber.organization_id),
                col(Agent.deleted_at).is_(None),
                col(Agent.published_version).is_not(None),
            )
        )
    ).first()
    if row is None:
        return None
    phone, agent = row
    assert agent.published_version is not None
    return Route(phone, agent, agent.published_version)


async def find_call_by_carrier_id(session: AsyncSession, carrier_call_id: str) -> Call | None:
    return (await session.exec(select(Call).where(Call.carrier_call_id == carrier_call_id))).first()


async def create_call(
    session: AsyncSession,
    temporal: Client,
    task_queue: str,
    *,
    agent: Agent,
    version: int,
    direction: str,
    transport: str,
    phone_number_id: str | None = None,
    from_number: str | None = None,
    to_number: str | None = None,
    carrier_call_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Call:
    call = Call(
        organization_id=agent.organization_id,
        agent_id=agent.id,
        agent_version=version,
        phone_number_id=phone_number_id,
        direction=direction,
        status=CallStatus.RINGING,
        transport=transport,
        from_number=from_number,
        to_number=to_number,
        carrier_call_id=carrier_call_id,
        started_at=utcnow(),
        call_metadata=metadata or {},
    )
    session.add(call)
    try:
        await session.commit()
    except sa.exc.IntegrityError:
        # The carrier delivered the same webhook twice at once: the other one created it.
        await session.rollback()
        existing = (
            await find_call_by_carrier_id(session, carrier_call_id) if carrier_call_id else None
        )
        if existing is None:
            raise
        return existing
    try:
        await temporal.start_workflow(
            "CallWorkflow",
            CallStart(
                call_id=call.id,
                organization_id=call.organization_id,
                agent_id=call.agent_id,
                agent_version=call.agent_version,
                direction=direction,
                from_number=from_number,
                to_number=to_number,
            ),
            id=call.id,
            task_queue=task_queue,
            task_timeout=CALL_TASK_TIMEOUT,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            # Set at start, not only when a worker first runs the workflow: a call must
            # be findable in the Temporal UI even while every worker is busy or down.
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(STATUS, str(call.status)),
                    SearchAttributePair(AGENT_ID, call.agent_id),
                    SearchAttributePair(DIRECTION, direction),
                ]
            ),
        )
    except Exception:
        # Without its workflow nothing would ever end this call: it would stay
        # "ringing" forever and a carrier retry would connect media to it.
        call.status = CallStatus.ENDED
        call.ended_reason = str(EndedReason.FAILED)
        call.ended_at = utcnow()
        session.add(call)
        await session.commit()
        raise
    return call
