"""Call control through the carrier's REST API (Twilio), with the official ``twilio`` SDK.

``TwilioRest`` wraps ``twilio.rest.Client`` on an async HTTP client of our own
(``httpx``), which also lets the base URL point at the REST emulator in tests
(``BUILDER_TWILIO_API_BASE_URL``): the SDK builds ``https://api.twilio.com/...`` URLs
and the client rewrites their scheme and host. TwiML is built with the SDK's
``VoiceResponse`` (escaped, well-formed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from twilio.twiml.voice_response import Dial, VoiceResponse

from builder_engine.config import Settings

log = logging.getLogger(__name__)

TWILIO_API = "https://api.twilio.com"
REQUEST_TIMEOUT_S = 10.0


class TelephonyNotConfigured(Exception):
    pass


class _HttpxTwilioClient(AsyncHttpClient):  # type: ignore[misc]
    """The SDK's async HTTP interface over httpx, optionally on another base URL."""

    def __init__(self, base_url: str | None = None, timeout: float = REQUEST_TIMEOUT_S) -> None:
        super().__init__(logger=log, is_async=True, timeout=timeout)
        self._base = urlsplit(base_url) if base_url else None
        self._client = httpx.AsyncClient(timeout=timeout)

    def _rewrite(self, url: str) -> str:
        if self._base is None:
            return url
        parts = urlsplit(url)
        if not parts.netloc.endswith("twilio.com"):
            return url
        prefix = self._base.path.rstrip("/")
        return parts._replace(
            scheme=self._base.scheme, netloc=self._base.netloc, path=prefix + parts.path
        ).geturl()

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's interface
        allow_redirects: bool = False,
    ) -> Response:
        response = await self._client.request(
            method,
            self._rewrite(uri),
            params=params,  # type: ignore[arg-type]
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout or self.timeout,
            follow_redirects=allow_redirects,
        )
        return Response(response.status_code, response.text, headers=dict(response.headers))

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class CallInfo:
    sid: str
    status: str


class TwilioRest:
    """The calls we control: update (TwiML / hang up), create (a new leg), fetch."""

    def __init__(self, account_sid: str, auth_token: str, base_url: str | None = None) -> None:
        self._http = _HttpxTwilioClient(base_url)
        self._client = Client(account_sid, auth_token, http_client=self._http)

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioRest | None:
        if not settings.twilio_account_sid or settings.twilio_auth_token is None:
            return None
        return cls(
            settings.twilio_account_sid,
            settings.twilio_auth_token.get_secret_value(),
            settings.twilio_api_base_url,
        )

    async def update_twiml(self, call_sid: str, twiml: str) -> CallInfo:
        call = await self._client.calls(call_sid).update_async(twiml=twiml)
        return CallInfo(str(call.sid), str(call.status))

    async def hang_up(self, call_sid: str, *, ringing: bool = False) -> CallInfo:
        call = await self._client.calls(call_sid).update_async(
            status="canceled" if ringing else "completed"
        )
        return CallInfo(str(call.sid), str(call.status))

    async def create(
        self, *, to: str, from_: str, twiml: str, timeout_s: int, **extra: Any
    ) -> CallInfo:
        call = await self._client.calls.create_async(
            to=to, from_=from_, twiml=twiml, timeout=timeout_s, **extra
        )
        return CallInfo(str(call.sid), str(call.status))

    async def fetch(self, call_sid: str) -> CallInfo:
        call = await self._client.calls(call_sid).fetch_async()
        return CallInfo(str(call.sid), str(call.status))

    async def aclose(self) -> None:
        await self._http.aclose()


# ------------------------------------------------------------------ TwiML

#: The API path Twilio asks, through ``<Connect action>``, once a call's media stream
#: has ended without the caller hanging up (api/routers/twilio_webhooks.py).
STREAM_ENDED_PATH = "/telephony/twilio/stream-ended"


def stream_twiml(
    realtime_url: str,
    call_id: str,
    *,
    public_url: str | None,
    resume: bool = False,
    attempt: int = 0,
    pause_s: int = 0,
) -> str:
    """A live call's bidirectional media stream to the realtime server.

    ``<Connect action>`` matters: when the stream's socket closes (the realtime process
    died, or ended the call) and no verb follows, Twilio hangs up - before the
    CallWorkflow could notice a dead process and move the call. With ``action``, Twilio
    asks the API what next, which answers ``<Hangup/>`` for a call that has ended and
    streams a live one to a healthy worker again. ``resume``: the new session picks the
    conversation up where it was; ``attempt`` counts such reconnections in a row;
    ``pause_s``: seconds of silence before the stream starts (a retry's back-off).
    """
    action = None
    if public_url is not None:
        query = {"call_id": call_id, **({"attempt": str(attempt)} if attempt else {})}
        action = f"{public_url.rstrip('/')}{STREAM_ENDED_PATH}?{urlencode(query)}"
    response = VoiceResponse()
    if pause_s > 0:
        response.pause(length=pause_s)
    connect = response.connect(action=action)
    stream = connect.stream(url=f"{realtime_url.rstrip('/')}/media/twilio")
    stream.parameter(name="call_id", value=call_id)
    if resume:
        stream.parameter(name="resume", value="1")
    return str(response)


def dial_twiml(to: str, *, announcement: str | None = None, timeout_s: int | None = None) -> str:
    """Cold transfer: replaces the media stream; the caller is connected to ``to``."""
    response = VoiceResponse()
    if announcement:
        response.say(announcement)
    dial = Dial(timeout=timeout_s) if timeout_s else Dial()
    dial.number(to)
    response.append(dial)
    return str(response)


def conference_twiml(
    room: str, *, say: str | None = None, end_on_exit: bool = False, beep: bool = False
) -> str:
    """A leg into a conference room (a warm transfer's two legs meet there)."""
    response = VoiceResponse()
    if say:
        response.say(say)
    dial = Dial()
    dial.conference(
        room,
        start_conference_on_enter=True,
        end_conference_on_exit=end_on_exit,
        beep=beep,
    )
    response.append(dial)
    return str(response)
