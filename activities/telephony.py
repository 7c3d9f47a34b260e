"""Carrier call control as activities: transfers (cold, warm) and hang-ups over Twilio REST.

The platform owns every leg: a leg dialed for a warm transfer is hung up here whenever
it is not bridged (nobody answered in time, the caller left meanwhile, the bridge
failed), so no stray leg outlives the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError
from twilio.base.exceptions import TwilioRestException

from builder_engine.config import Settings
from builder_engine.db.models import Call
from builder_engine.telephony import TwilioRest, conference_twiml, dial_twiml
from workflows.transfers import HangUpRequest, HangUpResult, TransferRequest, TransferResult

log = logging.getLogger(__name__)

POLL_EVERY_S = 0.25
ANSWERED = "in-progress"
UNANSWERED = ("busy", "no-answer", "failed", "canceled", "completed")


def _heartbeat(*details: Any) -> None:
    if activity.in_activity():
        activity.heartbeat(*details)


class TelephonyActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        rest: TwilioRest | None = None,
        *,
        poll_every_s: float = POLL_EVERY_S,
    ) -> None:
        self._sessions = sessions
        self._rest = rest
        self._poll_every_s = poll_every_s

    @classmethod
    def from_settings(
        cls, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> TelephonyActivities:
        return cls(sessions, TwilioRest.from_settings(settings))

    def activities(self) -> list[Callable[..., Any]]:
        return [self.transfer_call, self.hang_up_call]

    async def aclose(self) -> None:
        if self._rest is not None:
            await self._rest.aclose()

    @property
    def rest(self) -> TwilioRest:
        if self._rest is None:
            raise ApplicationError(
                "Twilio REST is not configured (BUILDER_TWILIO_ACCOUNT_SID, "
                "BUILDER_TWILIO_AUTH_TOKEN)",
                type="TelephonyNotConfigured",
                non_retryable=True,
            )
        return self._rest

    async def _call(self, call_id: str, organization_id: str) -> Call:
        async with self._sessions() as session:
            call = (
                await session.exec(
                    select(Call).where(Call.id == call_id, Call.organization_id == organization_id)
                )
            ).first()
        if call is None:
            raise ApplicationError(f"call {call_id} does not exist", non_retryable=True)
        return call

    # ------------------------------------------------------------ transfers

    @activity.defn(name="transfer_call")
    async def transfer_call(self, request: TransferRequest) -> TransferResult:
        call = await self._call(request.call_id, request.organization_id)
        if call.transport != "twilio" or not call.carrier_call_id:
            return TransferResult(
                "unsupported",
                request.to,
                request.mode,
                detail="only phone calls can be transferred",
            )
        sid = call.carrier_call_id
        if request.mode == "warm":
            return await self._warm(request, call, sid)
        try:
            await self.rest.update_twiml(
                sid,
                dial_twiml(
                    request.to,
                    announcement=request.announcement,
                    timeout_s=request.ring_timeout_s,
                ),
            )
        except TwilioRestException as exc:
            if exc.status and 400 <= exc.status < 500:
                raise ApplicationError(
                    f"Twilio refused the transfer: {exc.msg}", type="CallGone", non_retryable=True
                ) from None
            raise
        return TransferResult("transferred", request.to, request.mode, caller_call_sid=sid)

    async def _warm(self, request: TransferRequest, call: Call, sid: str) -> TransferResult:
        rest = self.rest
        room = f"transfer-{call.id}-{request.reference or 'supervisor'}"
        # Our own number calls the destination: the one the caller dialed (inbound) or
        # the one we called from (outbound).
        from_ = (call.to_number if call.direction == "inbound" else call.from_number) or ""
        leg = await rest.create(
            to=request.to,
            from_=from_,
            twiml=conference_twiml(room, say=request.summary, end_on_exit=True),
            timeout_s=request.ring_timeout_s,
        )
        _heartbeat(leg.sid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.ring_timeout_s + 5
        status = leg.status
        bridged = False
        try:
            while status != ANSWERED:
                if status in UNANSWERED:
                    return TransferResult(
                        "busy" if status == "busy" else "no-answer",
                        request.to,
                        request.mode,
                        caller_call_sid=sid,
                        leg_call_sid=leg.sid,
                        detail=f"the destination's line ended as {status}",
                    )
                if loop.time() > deadline:
                    return TransferResult(
                        "no-answer",
                        request.to,
                        request.mode,
                        caller_call_sid=sid,
                        leg_call_sid=leg.sid,
                        detail=f"nobody answered within {request.ring_timeout_s} s",
                    )
                await asyncio.sleep(self._poll_every_s)
                _heartbeat(leg.sid)
                status = (await rest.fetch(leg.sid)).status
            # Answered (and told the summary by the leg's TwiML): bring the caller over.
            try:
                await rest.update_twiml(sid, conference_twiml(room))
            except TwilioRestException as exc:
                return TransferResult(
                    "failed",
                    request.to,
                    request.mode,
                    caller_call_sid=sid,
                    leg_call_sid=leg.sid,
                    detail=f"the caller could not be moved: {exc.msg}",
                )
            bridged = True
            return TransferResult(
                "transferred",
                request.to,
                request.mode,
                caller_call_sid=sid,
                leg_call_sid=leg.sid,
                conference=room,
            )
        finally:
            if not bridged:
                await self._end_leg(leg.sid)

    async def _end_leg(self, sid: str) -> None:
        """A leg we dialed and did not bridge ends now (whatever its state)."""
        try:
            info = await self.rest.fetch(sid)
            if info.status in UNANSWERED:
                return
            await self.rest.hang_up(sid, ringing=info.status in ("queued", "ringing"))
        except Exception as exc:  # the leg ends on its own at its ring timeout
            log.warning("could not end leg %s: %s", sid, exc)

    # ------------------------------------------------------------ hang-up

    @activity.defn(name="hang_up_call")
    async def hang_up_call(self, request: HangUpRequest) -> HangUpResult:
        call = await self._call(request.call_id, request.organization_id)
        if call.transport != "twilio" or not call.carrier_call_id:
            return HangUpResult("ended")
        try:
            await self.rest.hang_up(call.carrier_call_id)
        except TwilioRestException as exc:
            if exc.status and 400 <= exc.status < 500:  # already over at Twilio
                return HangUpResult("hung-up", call.carrier_call_id)
            raise
        return HangUpResult("hung-up", call.carrier_call_id)
