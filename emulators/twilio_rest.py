"""Twilio's REST API for calls, on 127.0.0.1, speaking the real wire protocol.

What the platform (through the ``twilio`` SDK) does to calls: ``POST
/2010-04-01/Accounts/{AccountSid}/Calls.json`` (form: To, From, Twiml or Url,
StatusCallback, Timeout) creates an outbound leg, ``POST .../Calls/{CallSid}.json``
(Twiml, Url or Status=completed|canceled) changes a live call, ``GET
.../Calls/{CallSid}.json`` reads one. HTTP Basic auth with the account SID and auth
token; JSON bodies shaped like Twilio's (``sid``, ``status``, ``to``, ``from``, ...);
errors as Twilio's ``{"code", "message", "more_info", "status"}``.

Everything is recorded (``requests``) for assertions, and a test scripts the fate of a
dialed leg by destination number: ``emulator.fate("+1555...", "answered", after_ms=300)``
(or ``no-answer``, ``busy``, ``failed``). Calls the emulator does not know (the inbound
caller's leg) are created on first sight of their SID as in-progress.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

from emulators._server import HttpRequest, HttpResponse, HttpServer

API_PREFIX = "/2010-04-01/Accounts/"
FINAL = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})


@dataclass(frozen=True)
class RestRequest:
    method: str
    call_sid: str | None  # None: Calls.json (create)
    form: dict[str, str]
    at: float


@dataclass
class Fate:
    outcome: str  # answered | no-answer | busy | failed
    after_ms: float = 200.0


@dataclass
class EmulatedCall:
    sid: str
    to: str
    from_: str
    status: str
    direction: str
    twiml: str | None = None
    twimls: list[str] = field(default_factory=list)
    timeout_s: float = 60.0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def resource(self, account_sid: str) -> dict[str, Any]:
        stamp = format_datetime(self.created_at)
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "status": self.status,
            "direction": self.direction,
            "api_version": "2010-04-01",
            "date_created": stamp,
            "date_updated": stamp,
            "start_time": None,
            "end_time": None,
            "duration": None,
            "answered_by": None,
            "parent_call_sid": None,
            "price": None,
            "price_unit": "USD",
            "uri": f"/2010-04-01/Accounts/{account_sid}/Calls/{self.sid}.json",
            "subresource_uris": {},
        }


class TwilioRestEmulator:
    def __init__(self, account_sid: str | None = None, auth_token: str = "rest-token") -> None:  # noqa: S107
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token
        self.requests: list[RestRequest] = []
        self.calls: dict[str, EmulatedCall] = {}
        self.fates: dict[str, Fate] = {}
        self._server = HttpServer(self._handle)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Called after each change of a call through the API (new TwiML or Status): a
        #: test ends the caller's media stream there, as Twilio does.
        self.on_change: Callable[[EmulatedCall, dict[str, str]], None] | None = None
        #: How long an update of a live call takes to be answered, after it has taken
        #: effect (Twilio's own answers take a few hundred milliseconds).
        self.update_latency_s = 0.0

    @property
    def url(self) -> str:
        return self._server.url

    def fate(self, to: str, outcome: str, after_ms: float = 200.0) -> None:
        """What happens to the next legs dialed to ``to``."""
        self.fates[to] = Fate(outcome, after_ms)

    def updates(self, call_sid: str) -> list[dict[str, str]]:
        return [r.form for r in self.requests if r.method == "POST" and r.call_sid == call_sid]

    def created(self) -> list[EmulatedCall]:
        return [c for c in self.calls.values() if c.direction == "outbound-api"]

    async def __aenter__(self) -> Self:
        await self._server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------ HTTP

    async def _error(self, response: HttpResponse, status: int, code: int, message: str) -> None:
        await response.send_json(
            status,
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
        )

    def _authorized(self, request: HttpRequest) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and password == self.auth_token

    async def _handle(self, request: HttpRequest, response: HttpResponse) -> None:
        path = request.path
        if not path.startswith(API_PREFIX) or not path.endswith(".json"):
            await self._error(response, 404, 20404, "The requested resource was not found")
            return
        parts = path[len(API_PREFIX) : -len(".json")].split("/")
        if not self._authorized(request) or parts[0] != self.account_sid:
            await self._error(response, 401, 20003, "Authenticate")
            return
        form = dict(parse_qsl(request.body.decode(), keep_blank_values=True))
        loop = asyncio.get_running_loop()
        if parts[1:] == ["Calls"] and request.method == "POST":
            self.requests.append(RestRequest("POST", None, form, loop.time()))
            await self._create(form, response)
        elif len(parts) == 3 and parts[1] == "Calls" and request.method in ("GET", "POST"):
            sid = parts[2]
            self.requests.append(RestRequest(request.method, sid, form, loop.time()))
            call = self.calls.get(sid)
            if call is None:
                # The inbound caller's leg: known to Twilio, not created here.
                call = self.calls[sid] = EmulatedCall(sid, "", "", "in-progress", "inbound")
            if request.method == "POST":
                if call.status in FINAL:
                    await self._error(
                        response, 400, 21220, "Call is not in-progress. Cannot redirect."
                    )
                    return
                self._update(call, form)
                if self.on_change is not None:
                    self.on_change(call, form)
                await asyncio.sleep(self.update_latency_s)
            await response.send_json(200, call.resource(self.account_sid))
        else:
            await self._error(response, 405, 20004, "Method not allowed")

    async def _create(self, form: dict[str, str], response: HttpResponse) -> None:
        to, from_ = form.get("To", ""), form.get("From", "")
        if not to or not from_ or not (form.get("Twiml") or form.get("Url")):
            await self._error(response, 400, 21205, "To, From and Twiml or Url are required")
            return
        call = EmulatedCall(
            "CA" + secrets.token_hex(16),
            to,
            from_,
            "queued",
            "outbound-api",
            twiml=form.get("Twiml"),
            timeout_s=float(form.get("Timeout", "60")),
        )
        if call.twiml:
            call.twimls.append(call.twiml)
        self.calls[call.sid] = call
        task = asyncio.create_task(self._ring(call, self.fates.get(to, Fate("no-answer"))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await response.send_json(201, call.resource(self.account_sid))

    def _update(self, call: EmulatedCall, form: dict[str, str]) -> None:
        status = form.get("Status")
        if status in ("completed", "canceled"):
            ringing = call.status in ("queued", "ringing")
            call.status = "canceled" if ringing else "completed"
        if form.get("Twiml"):
            call.twiml = form["Twiml"]
            call.twimls.append(form["Twiml"])

    async def _ring(self, call: EmulatedCall, fate: Fate) -> None:
        call.status = "ringing"
        delay = fate.after_ms / 1000
        if fate.outcome != "answered" or delay > call.timeout_s:
            # Unanswered: the leg rings out after its own Timeout (or fails/busy sooner).
            delay = min(delay, call.timeout_s) if fate.outcome != "no-answer" else call.timeout_s
        await asyncio.sleep(delay)
        if call.status != "ringing":
            return  # canceled meanwhile
        if fate.outcome == "answered" and fate.after_ms / 1000 <= call.timeout_s:
            call.status = "in-progress"
        else:
            call.status = fate.outcome if fate.outcome != "answered" else "no-answer"
