"""Twilio's webhooks: the number's voice URL (answer with a media stream) and status callbacks."""

from __future__ import annotations

import logging
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Request, Response
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from api.call_start import create_call, find_call_by_carrier_id, route_inbound
from api.deps import Context, Session
from api.errors import ApiError
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.logs import redact_phone
from builder_engine.timeutil import utcnow

log = logging.getLogger(__name__)
router = APIRouter(prefix="/telephony/twilio", tags=["telephony"])

TWIML = "application/xml"
SORRY = "Sorry, we cannot take your call right now. Please try again later."

#: Twilio's final CallStatus values and the ended reason each means.
FINAL_STATUSES = {
    "completed": EndedReason.CALLER_HANGUP,
    "busy": EndedReason.BUSY,
    "no-answer": EndedReason.NO_ANSWER,
    "failed": EndedReason.FAILED,
    "canceled": EndedReason.CANCELED,
}


async def _signed_form(request: Request, context: Context, signature: str | None) -> dict[str, str]:
    """The POSTed form, after checking X-Twilio-Signature when an auth token is configured."""
    body = (await request.body()).decode("utf-8", errors="replace")
    params = dict(parse_qsl(body, keep_blank_values=True))
    token = context.settings.twilio_auth_token
    if token is not None:
        url = _public_url(request, context)
        validator = RequestValidator(token.get_secret_value())
        if not signature or not validator.validate(url, params, signature):
            log.warning("rejected Twilio webhook with a bad signature (%s)", request.url.path)
            raise ApiError(403, "Invalid X-Twilio-Signature.", kind="forbidden")
    return params


def _public_url(request: Request, context: Context) -> str:
    """The URL Twilio signed: ours as the world sees it, not as the proxy hands it to us."""
    if context.settings.public_url is None:
        return str(request.url)
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{context.settings.effective_public_url}{request.url.path}{query}"


def _twiml(response: VoiceResponse) -> Response:
    return Response(content=str(response), media_type=TWIML)


def _say_and_hang_up(text: str) -> Response:
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return _twiml(response)


@router.post(
    "/voice",
    summary="Twilio voice webhook: answer a call with a media stream to the agent",
    response_class=Response,
    responses={
        200: {"content": {TWIML: {}}, "description": "TwiML"},
        403: {"description": "Bad X-Twilio-Signature."},
    },
)
async def voice(
    request: Request,
    context: Context,
    session: Session,
    x_twilio_signature: Annotated[str | None, Header()] = None,
) -> Response:
    form = await _signed_form(request, context, x_twilio_signature)
    call_sid = form.get("CallSid", "")
    to_number = form.get("To", "")
    if not call_sid or not to_number:
        raise ApiError(400, "CallSid and To are required.", kind="bad-request")
    call = await find_call_by_carrier_id(session, call_sid)
    if call is None:
        route = await route_inbound(session, to_number, "twilio")
        if route is None:
            log.info("call to unassigned number %s", redact_phone(to_number))
            return _say_and_hang_up("Sorry, this number is not in service. Goodbye.")
        try:
            temporal = await context.temporal.client()
            call = await create_call(
                session,
                temporal,
                context.settings.temporal_task_queue,
                agent=route.agent,
                version=route.version,
                phone_number_id=route.number.id,
                direction="inbound",
                transport="twilio",
                from_number=form.get("From"),
                to_number=to_number,
                carrier_call_id=call_sid,
            )
        except Exception:
            log.exception("could not start the call workflow for %s", call_sid)
            return _say_and_hang_up(SORRY)
    elif call.status == CallStatus.ENDED:
        # A retry for a call that already ended (or never got its workflow): the
        # media server refuses ended calls, so a stream would only be dead air.
        return _say_and_hang_up(SORRY)
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=f"{context.settings.effective_realtime_url}/media/twilio")
    stream.parameter(name="call_id", value=call.id)
    return _twiml(response)


@router.post(
    "/status",
    summary="Twilio status callback: record the carrier's view of the call",
    status_code=204,
    response_class=Response,
    responses={403: {"description": "Bad X-Twilio-Signature."}},
)
async def status(
    request: Request,
    context: Context,
    session: Session,
    x_twilio_signature: Annotated[str | None, Header()] = None,
) -> Response:
    form = await _signed_form(request, context, x_twilio_signature)
    call = await find_call_by_carrier_id(session, form.get("CallSid", ""))
    if call is None:
        return Response(status_code=204)  # not ours (or already gone): nothing to do
    carrier_status = form.get("CallStatus", "")
    call.call_metadata = {**call.call_metadata, "carrier_status": carrier_status}
    reason = FINAL_STATUSES.get(carrier_status)
    if reason is not None and call.status != CallStatus.ENDED:
        try:
            temporal = await context.temporal.client()
            await temporal.get_workflow_handle(call.id).signal("ended", str(reason))
        except Exception:
            # The workflow may have ended already; the DB still records what Twilio said.
            log.warning("could not signal the end of call %s", call.id)
            call.status = CallStatus.ENDED
            call.ended_reason = call.ended_reason or str(reason)
            call.ended_at = call.ended_at or utcnow()
    session.add(call)
    await session.commit()
    return Response(status_code=204)
