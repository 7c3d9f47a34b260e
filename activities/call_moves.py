"""``move_call``: point a live call at a healthy realtime worker after its own one died.

For a Twilio call: a REST call update (through the ``twilio`` SDK) with new stream
TwiML - ``<Connect><Stream url="{realtime}/media/twilio">`` carrying the call id and
``resume=1`` - so Twilio opens a new media stream; in production the realtime URL is a
load balancer that picks a healthy replica. A web call needs nothing: its client
reconnects to the same call id.

Usually Twilio is quicker: a process that dies closes its sockets, and Twilio asks the
``<Connect action>`` URL what next (api/routers/twilio_webhooks.py, ``stream_ended``),
which streams the call to a healthy worker at once. This move is for a process that
stops beating with its sockets still open (frozen, or cut off from Temporal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client as TwilioClient

from builder_engine.calls import CallStatus
from builder_engine.config import Settings
from builder_engine.db.models import Call
from builder_engine.telephony import stream_twiml
from workflows.liveness import MoveCallRequest, MoveCallResult

log = logging.getLogger(__name__)


class CallMoveActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings | None,
        *,
        realtime_url: str | None = None,
        public_url: str | None = None,
    ) -> None:
        self.sessions = sessions
        self._settings = settings
        self._realtime_url = realtime_url or (settings.effective_realtime_url if settings else "")
        self._public_url = public_url or (settings.effective_public_url if settings else None)

    def activities(self) -> list[Callable[..., Any]]:
        return [self.move_call]

    @activity.defn(name="move_call")
    async def move_call(self, request: MoveCallRequest) -> MoveCallResult:
        async with self.sessions() as session:
            call = await session.get(Call, request.call_id)
        if call is None or call.organization_id != request.organization_id:
            return MoveCallResult(False, "", gone=True, detail="no such call")
        if call.status == CallStatus.ENDED:
            return MoveCallResult(False, call.transport, gone=True, detail="the call has ended")
        if call.transport != "twilio":
            return MoveCallResult(False, call.transport, detail="the client reconnects")
        if not call.carrier_call_id:
            return MoveCallResult(False, "twilio", gone=True, detail="no Twilio call sid")
        twiml = stream_twiml(self._realtime_url, call.id, public_url=self._public_url, resume=True)
        try:
            await asyncio.to_thread(self._update, call.carrier_call_id, twiml)
        except TwilioRestException as exc:
            if exc.status in (400, 404):  # not in progress any more (21220) or unknown
                log.warning("call %s: Twilio cannot move it: %s", call.id, exc.msg)
                return MoveCallResult(False, "twilio", gone=True, detail=str(exc.msg))
            raise
        log.info("call %s moved to %s", call.id, self._realtime_url)
        return MoveCallResult(True, "twilio", detail=self._realtime_url)

    def _update(self, call_sid: str, twiml: str) -> None:
        settings = self._settings
        if settings is None or not settings.twilio_account_sid or not settings.twilio_auth_token:
            raise RuntimeError("Twilio credentials are not configured: cannot move the call")
        client = TwilioClient(
            settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value()
        )
        if settings.twilio_api_base_url:
            client.api.base_url = settings.twilio_api_base_url.rstrip("/")
        client.calls(call_sid).update(twiml=twiml)
