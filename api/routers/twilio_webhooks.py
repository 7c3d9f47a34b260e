"""Twilio's webhooks: the number's voice URL (answer with a media stream), what to do
when that stream ends (``<Connect action>``), and status callbacks."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Query, Request, Response
from temporalio.client import WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from api.call_start import create_call, find_call_by_carrier_id, route_inbound
from api.deps import Context, Session
from api.errors import ApiError
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.db.models import Call
from builder_engine.logs import redact_phone
from builder_engine.telephony import stream_twiml
from builder_engine.timeutil import utcnow
from workflows.types import CallState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/telephony/twilio", tags=["telephony"])

TWIML = "application/xml"
SORRY = "Sorry, we cannot take your call right now. Please try again later."
#: The OpenAPI description of a webhook that answers TwiML.
TWIML_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {TWIML: {}}, "description": "TwiML"},
    403: {"description": "Bad X-Twilio-Signature."},
}
LOST = "Sorry, we lost the connection to your call. Please call us again."
#: Streams of one call restarted in a row through ``<Connect action>``: a stream that is
#: refused or dropped again and again ends the call rather than loop forever.
MAX_STREAM_RECONNECTS = 5
#: Silence before streaming again a call no session has taken yet, from the second retry
#: on: its stream was refused (every realtime process full, say), and asking again at
#: once would most likely be refused again, the retries spent within a second.
UNTAKEN_RETRY_PAUSE_S = 1
#: Longest wait for the call's workflow to say whether the call goes on (Twilio waits
#: 15 s for a webhook's answer).
WORKFLOW_CHECK_TIMEOUT = timedelta(seconds=5)

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


def _twiml(twiml: VoiceResponse | str) -> Response:
    return Response(content=str(twiml), media_type=TWIML)


def _stream(context: Context, call_id: str, *, attempt: int = 0, pause_s: int = 0) -> Response:
    """The call's media stream to the realtime server; ``attempt`` > 0: the stream ended
    with the call live, and this one resumes it (the ``attempt``-th time in a row)."""
    settings = context.settings
    return _twiml(
        stream_twiml(
            settings.effective_realtime_url,
            call_id,
            public_url=settings.effective_public_url,
            resume=attempt > 0,
            attempt=attempt,
            pause_s=pause_s,
        )
    )


def _say_and_hang_up(text: str) -> Response:
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return _twiml(response)


def _hang_up() -> Response:
    response = VoiceResponse()
    response.hangup()
    return _twiml(response)


@router.post(
    "/voice",
    summary="Twilio voice webhook: answer a call with a media stream to the agent",
    response_class=Response,
    responses=TWIML_RESPONSES,
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
    return _stream(context, call.id)


@router.post(
    "/stream-ended",
    summary="Twilio <Connect action>: a call's media stream ended; hang up or stream again",
    response_class=Response,
    responses=TWIML_RESPONSES,
)
async def stream_ended(
    request: Request,
    context: Context,
    session: Session,
    call_id: Annotated[str, Query(max_length=64)] = "",
    attempt: Annotated[int, Query(ge=0)] = 0,
    x_twilio_signature: Annotated[str | None, Header()] = None,
) -> Response:
    """The media stream closed and the caller is still on the line. The realtime side
    closes it on purpose once the call has ended (the agent hung up, a timeout): the
    call's workflow has heard of the end by then, and the answer is ``<Hangup/>``. A
    stream that closed with the call still going on lost its realtime process: the call
    is streamed again, to a healthy worker, where it resumes."""
    form = await _signed_form(request, context, x_twilio_signature)
    call = await session.get(Call, call_id) if call_id else None
    if call is None or not call.carrier_call_id or call.carrier_call_id != form.get("CallSid"):
        log.warning("stream ended for a call that is not this Twilio call (%r)", call_id)
        return _hang_up()
    if call.status == CallStatus.ENDED:
        return _hang_up()
    live = await _call_goes_on(context, call.id)
    if live is None:
        # Nobody can resume it (a new session restores the conversation from the
        # workflow): the caller hears why, and the status callback records the end.
        log.error("call %s: its stream ended and Temporal cannot say how it goes on", call.id)
        return _say_and_hang_up(LOST)
    if not live:
        return _hang_up()
    # No session ever took the call (every realtime process was full, say).
    untaken = call.status in (CallStatus.QUEUED, CallStatus.RINGING)
    if attempt >= MAX_STREAM_RECONNECTS:
        log.error("call %s: its stream ended %d times in a row; hanging up", call.id, attempt)
        # An untaken call's caller lost nothing yet and may try again later.
        return _say_and_hang_up(SORRY if untaken else LOST)
    log.warning("call %s: its media stream ended with the call live; streaming it again", call.id)
    await _tell_restreaming(context, call.id)
    # The first retry goes at once: behind a load balancer it reaches another process.
    pause_s = UNTAKEN_RETRY_PAUSE_S if untaken and attempt >= 1 else 0
    return _stream(context, call.id, attempt=attempt + 1, pause_s=pause_s)


async def _call_goes_on(context: Context, call_id: str) -> bool | None:
    """Whether the call's workflow still runs a call that has not ended; None when
    Temporal cannot tell. A query sees every signal delivered before it: the end a
    realtime session reported before closing its stream included."""
    try:
        temporal = await context.temporal.client()
    except Exception as exc:  # the SDK's connect raises RuntimeError, or it timed out
        log.warning("call %s: Temporal is unreachable: %s", call_id, exc)
        return None
    try:
        handle = temporal.get_workflow_handle(call_id)
        description = await handle.describe(rpc_timeout=WORKFLOW_CHECK_TIMEOUT)
        if description.status != WorkflowExecutionStatus.RUNNING:
            return False
        state = await handle.query(
            "state", result_type=CallState, rpc_timeout=WORKFLOW_CHECK_TIMEOUT
        )
    except (RPCError, WorkflowQueryFailedError, TimeoutError) as exc:
        if isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
            return False
        log.warning("call %s: could not ask its workflow: %s", call_id, exc)
        return None
    return state.ended_reason is None


async def _tell_restreaming(context: Context, call_id: str) -> None:
    """The call's workflow learns that its session is coming back on a new stream, so
    that the loss of the old session's process (its beats stop a moment later) does not
    make it move the call a second time, cutting the new stream."""
    try:
        temporal = await context.temporal.client()
        await temporal.get_workflow_handle(call_id).signal(
            "restreaming", rpc_timeout=WORKFLOW_CHECK_TIMEOUT
        )
    except Exception as exc:  # the call goes on either way; at worst it is moved twice
        log.warning("call %s: could not tell its workflow it streams again: %s", call_id, exc)


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
