"""Twilio's voice webhook and status callbacks, against a real Temporal dev server, the
platform's worker and both databases: signatures, routing to the published version,
retries, failure answers, and how a carrier's final status ends the call."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlmodel import Session, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from twilio.request_validator import RequestValidator

from activities.calls import CallActivities
from api.app import create_app
from builder_engine.apikeys import create_org_api_key
from builder_engine.calls import CallStatus, EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Agent, Call, Organization, PhoneNumber
from builder_engine.temporal_setup import ensure_search_attributes
from conftest import ApiHarness, installed_binary
from workers.temporal_worker import build_worker
from workflows.call import AGENT_ID, DIRECTION, ENDED_REASON, STATUS

TOKEN = "twilio-test-auth-token"
PUBLIC_URL = "https://voice.example.test"
VOICE = "/telephony/twilio/voice"
STATUS_PATH = "/telephony/twilio/status"
STREAM_ENDED = "/telephony/twilio/stream-ended"
CALLER = "+14155550123"
# How long a workflow may take to react to a signal on a loaded machine (it takes ms).
WORKFLOW_WAIT_S = 15.0


def new_number() -> str:
    return "+1415" + "".join(secrets.choice("0123456789") for _ in range(7))


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)


def voice_params(call_sid: str, to_number: str) -> dict[str, str]:
    """What Twilio POSTs to a number's voice URL when someone calls it."""
    return {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": CALLER,
        "To": to_number,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }


def sign(url: str, params: Mapping[str, str], token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, dict(params)))


@dataclass(frozen=True)
class Twiml:
    """The parts of a TwiML answer the tests look at."""

    root: ElementTree.Element

    @classmethod
    def parse(cls, response: httpx.Response) -> Twiml:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/xml")
        root = ElementTree.fromstring(response.text)
        assert root.tag == "Response", response.text
        return cls(root)

    @property
    def stream_url(self) -> str | None:
        stream = self.root.find("Connect/Stream")
        return None if stream is None else stream.get("url")

    @property
    def parameters(self) -> dict[str, str]:
        return {
            p.get("name", ""): p.get("value", "")
            for p in self.root.findall("Connect/Stream/Parameter")
        }

    @property
    def call_id(self) -> str:
        return self.parameters["call_id"]

    @property
    def verbs(self) -> list[str]:
        return [child.tag for child in self.root]

    @property
    def action_path(self) -> str:
        """Where Twilio goes when the stream ends (``<Connect action>``), on our public URL."""
        connect = self.root.find("Connect")
        action = connect.get("action", "") if connect is not None else ""
        assert action.startswith(f"{PUBLIC_URL}{STREAM_ENDED}?"), action
        return action.removeprefix(PUBLIC_URL)

    @property
    def says_sorry_and_hangs_up(self) -> bool:
        verbs = [child.tag for child in self.root]
        return verbs == ["Say", "Hangup"] and "sorry" in (self.root[0].text or "").lower()


@dataclass
class Telephony:
    """An API app wired to Temporal, one organization's key, and the database behind."""

    settings: Settings
    api: httpx.AsyncClient  # the organization's API key, to set agents and numbers up
    twilio: httpx.AsyncClient  # no API key: Twilio only signs
    temporal: Client
    organization_id: str
    db: sa.Engine

    async def agent(self, name: str = "Front desk") -> str:
        response = await self.api.post("/v1/agents", json={"name": name})
        assert response.status_code == 201, response.text
        agent_id: str = response.json()["id"]
        return agent_id

    async def number(self, agent_id: str | None) -> str:
        number = new_number()
        response = await self.api.post(
            "/v1/phone-numbers", json={"number": number, "carrier": "twilio", "agent_id": agent_id}
        )
        assert response.status_code == 201, response.text
        return number

    async def post(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        signature: str | None = None,
        signed_url: str | None = None,
    ) -> httpx.Response:
        """POST a form as Twilio would; signed for the public URL unless told otherwise."""
        headers = {}
        if signature is None and self.settings.twilio_auth_token is not None:
            signature = sign(signed_url or f"{PUBLIC_URL}{path}", params)
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        return await self.twilio.post(path, data=dict(params), headers=headers)

    async def incoming_call(self, to_number: str, call_sid: str | None = None) -> Twiml:
        return Twiml.parse(
            await self.post(VOICE, voice_params(call_sid or new_call_sid(), to_number))
        )

    def calls_with_sid(self, call_sid: str) -> list[Call]:
        with Session(self.db) as session:
            return list(session.exec(select(Call).where(Call.carrier_call_id == call_sid)).all())

    def call(self, call_id: str) -> Call:
        with Session(self.db) as session:
            return session.exec(select(Call).where(Call.id == call_id)).one()


def organization_id(db: sa.Engine, name: str) -> str:
    with Session(db) as session:
        return session.exec(select(Organization).where(Organization.name == name)).one().id


async def insert_calls(
    api: ApiHarness, agent_id: str, statuses: list[CallStatus]
) -> list[tuple[str, str]]:
    """Call rows of the harness's first organization written directly (no workflow), as
    (call id, call sid). In a thread: a blocking write on the event loop would stall the
    workers sharing the loop (and the SQLite file) mid-transaction, then wait out the
    busy timeout on their lock."""

    def insert() -> list[tuple[str, str]]:
        db = create_sync_engine(api.settings)
        try:
            with Session(db) as session:
                org_id = organization_id(db, api.acme.name)
                rows = [
                    Call(
                        organization_id=org_id,
                        agent_id=agent_id,
                        agent_version=1,
                        direction="inbound",
                        status=status,
                        carrier_call_id=new_call_sid(),
                    )
                    for status in statuses
                ]
                session.add_all(rows)
                session.commit()
                return [(row.id, row.carrier_call_id or "") for row in rows]
        finally:
            db.dispose()

    return await asyncio.to_thread(insert)


def read_call(settings: Settings, call_id: str) -> Call:
    db = create_sync_engine(settings)
    try:
        with Session(db) as session:
            return session.exec(select(Call).where(Call.id == call_id)).one()
    finally:
        db.dispose()


@contextlib.asynccontextmanager
async def serve(settings: Settings, temporal: Client) -> AsyncIterator[Telephony]:
    """The API app for `settings`, with a fresh organization and its key."""
    org = f"tel-{secrets.token_hex(4)}"
    key = create_org_api_key(settings, org)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    db = create_sync_engine(settings)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport,
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {key}"},
            ) as api,
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as twilio,
        ):
            yield Telephony(settings, api, twilio, temporal, organization_id(db, org), db)
    finally:
        db.dispose()


def with_temporal(db_settings: Settings, env: WorkflowEnvironment, **changes: Any) -> Settings:
    """The test database's settings, pointed at the dev server and signing with TOKEN."""
    update: dict[str, Any] = {
        "temporal_address": env.client.service_client.config.target_host,
        "temporal_task_queue": f"twilio-{secrets.token_hex(4)}",
        "public_url": PUBLIC_URL,
        "twilio_auth_token": SecretStr(TOKEN),
        **changes,
    }
    return db_settings.model_copy(update=update)


@pytest.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"), dev_server_log_level="error"
    )
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="module")
async def tel(db_settings: Settings, temporal_env: WorkflowEnvironment) -> AsyncIterator[Telephony]:
    """Signed webhooks, public URL set, and a worker running the call workflows."""
    settings = with_temporal(db_settings, temporal_env)
    engine = create_async_db_engine(settings)
    worker = build_worker(temporal_env.client, settings.temporal_task_queue, CallActivities(engine))
    try:
        async with worker, serve(settings, temporal_env.client) as telephony:
            yield telephony
    finally:
        await engine.dispose()


# --- the voice webhook -------------------------------------------------------------------


async def test_a_signed_call_gets_a_stream_and_a_workflow_on_the_published_version(
    tel: Telephony,
) -> None:
    agent_id = await tel.agent()
    # v2 published, then a v3 draft: the call must run v2, neither the first nor the latest.
    published = await tel.api.patch(f"/v1/agents/{agent_id}?publish=true", json={"name": "v2"})
    assert published.json()["published_version"] == 2, published.text
    draft = await tel.api.patch(f"/v1/agents/{agent_id}", json={"name": "v3 draft"})
    assert draft.json()["version"] == 3 and draft.json()["published_version"] == 2
    number = await tel.number(agent_id)
    call_sid = new_call_sid()

    twiml = await tel.incoming_call(number, call_sid)

    # The realtime URL is derived from the public URL (https -> wss) when not set.
    assert twiml.stream_url == "wss://voice.example.test/media/twilio"
    assert list(twiml.parameters) == ["call_id"]  # the Stream URL carries no query string
    [call] = tel.calls_with_sid(call_sid)
    assert twiml.call_id == call.id
    # Should the stream end with the caller still there, Twilio asks us what next.
    assert parse_qs(urlsplit(twiml.action_path).query) == {"call_id": [call.id]}
    assert call.organization_id == tel.organization_id
    assert (call.status, call.direction, call.transport) == ("ringing", "inbound", "twilio")
    assert (call.agent_id, call.agent_version) == (agent_id, 2)
    assert (call.from_number, call.to_number) == (CALLER, number)
    assert call.phone_number_id is not None and call.started_at is not None
    assert call.ended_at is None

    description = await tel.temporal.get_workflow_handle(call.id).describe()
    assert description.id == call.id
    assert description.workflow_type == "CallWorkflow"
    assert description.task_queue == tel.settings.temporal_task_queue
    assert description.status == WorkflowExecutionStatus.RUNNING
    attributes = description.typed_search_attributes
    assert attributes.get(AGENT_ID) == agent_id
    assert attributes.get(DIRECTION) == "inbound"
    # Set at start ("ringing"); the workflow's first task upserts its own pre-answer status.
    assert attributes.get(STATUS) in {CallStatus.RINGING, CallStatus.QUEUED}

    # The call API agrees with the row.
    detail = (await tel.api.get(f"/v1/calls/{call.id}")).json()
    assert detail["agent_version"] == 2 and detail["status"] == "ringing"


async def test_twilio_retrying_a_call_sid_gets_the_same_call(tel: Telephony) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    first = await tel.incoming_call(number, call_sid)
    handle = tel.temporal.get_workflow_handle(first.call_id)
    run_id = (await handle.describe()).run_id

    again = await tel.incoming_call(number, call_sid)

    assert again.call_id == first.call_id and again.stream_url == first.stream_url
    assert len(tel.calls_with_sid(call_sid)) == 1
    description = await handle.describe()
    assert description.run_id == run_id  # the same run, not a restarted workflow
    assert description.status == WorkflowExecutionStatus.RUNNING


async def test_the_same_call_sid_delivered_at_once_makes_one_call(tel: Telephony) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    answers = await asyncio.gather(*(tel.incoming_call(number, call_sid) for _ in range(3)))
    assert len({answer.call_id for answer in answers}) == 1
    assert len(tel.calls_with_sid(call_sid)) == 1


async def test_unsigned_or_badly_signed_webhooks_are_403_and_create_nothing(
    tel: Telephony,
) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    params = voice_params(call_sid, number)
    tampered = {**params, "From": "+19995550000"}
    attempts = {
        "no signature": await tel.twilio.post(VOICE, data=params),
        "garbage": await tel.post(VOICE, params, signature="bm9wZQ=="),
        "another token": await tel.post(
            VOICE, params, signature=sign(f"{PUBLIC_URL}{VOICE}", params, "not-the-token")
        ),
        # What reached us (http://testserver/...) is not what Twilio signed.
        "internal URL": await tel.post(VOICE, params, signed_url=f"http://testserver{VOICE}"),
        "another path": await tel.post(VOICE, params, signed_url=f"{PUBLIC_URL}{STATUS_PATH}"),
        "params changed": await tel.post(
            VOICE, tampered, signature=sign(f"{PUBLIC_URL}{VOICE}", params)
        ),
    }
    for what, response in attempts.items():
        assert response.status_code == 403, (what, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), what
        problem = response.json()
        assert problem["status"] == 403 and problem["type"].endswith("/forbidden"), what
    assert tel.calls_with_sid(call_sid) == []

    # The same request signed for the public URL is accepted.
    assert (await tel.incoming_call(number, call_sid)).stream_url is not None


async def test_the_signature_covers_the_public_url_with_its_query_string(tel: Telephony) -> None:
    number = await tel.number(await tel.agent())
    params = voice_params(new_call_sid(), number)
    path = f"{VOICE}?region=eu&x=a%20b"
    accepted = await tel.post(path, params, signed_url=f"{PUBLIC_URL}{path}")
    assert Twiml.parse(accepted).stream_url is not None
    without_query = await tel.post(path, params, signed_url=f"{PUBLIC_URL}{VOICE}")
    assert without_query.status_code == 403


async def test_calls_that_cannot_be_routed_hear_a_message_and_create_nothing(
    tel: Telephony,
) -> None:
    unassigned = await tel.number(None)
    agent_id = await tel.agent("Retired")
    orphaned = await tel.number(agent_id)
    foreign = await tel.number(None)

    # The API refuses both of these; the router must not rely on that alone. A deleted
    # agent behind a number (an operator's edit in the database)...
    def edit_database() -> None:
        with Session(tel.db) as session:
            agent = session.exec(select(Agent).where(Agent.id == agent_id)).one()
            agent.deleted_at = datetime.now(UTC)
            session.add(agent)
            # ...and a number pointing at another organization's agent.
            stranger = Organization(name=f"stranger-{secrets.token_hex(4)}")
            session.add(stranger)
            session.flush()
            theirs = Agent(organization_id=stranger.id, name="Theirs", published_version=1)
            session.add(theirs)
            session.flush()
            phone = session.exec(select(PhoneNumber).where(PhoneNumber.number == foreign)).one()
            phone.agent_id = theirs.id
            session.add(phone)
            session.commit()

    await asyncio.to_thread(edit_database)

    for to_number in (new_number(), unassigned, orphaned, foreign):
        call_sid = new_call_sid()
        twiml = await tel.incoming_call(to_number, call_sid)
        verbs = [child.tag for child in twiml.root]
        assert verbs == ["Say", "Hangup"], (to_number, verbs)
        assert "not in service" in (twiml.root[0].text or "")
        assert tel.calls_with_sid(call_sid) == []


async def test_bad_webhook_bodies_are_400_and_oversized_ones_413(tel: Telephony) -> None:
    number = await tel.number(await tel.agent())
    for missing in ("CallSid", "To"):
        params = voice_params(new_call_sid(), number)
        del params[missing]
        response = await tel.post(VOICE, params)  # correctly signed, but incomplete
        assert response.status_code == 400, (missing, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 400

    call_sid = new_call_sid()
    big = {**voice_params(call_sid, number), "Pad": "x" * tel.settings.max_body_bytes}
    oversized = await tel.post(VOICE, big)
    assert oversized.status_code == 413 and oversized.json()["status"] == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield f"CallSid={call_sid}&To={number}&Pad=".encode()
        for _ in range(tel.settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    streamed = await tel.twilio.post(
        VOICE,
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"},
    )
    assert streamed.status_code == 413
    assert tel.calls_with_sid(call_sid) == []


async def test_without_an_auth_token_unsigned_webhooks_are_accepted(
    db_settings: Settings, temporal_env: WorkflowEnvironment
) -> None:
    """Development: no BUILDER_TWILIO_AUTH_TOKEN, no public URL, an explicit realtime URL."""
    settings = with_temporal(
        db_settings,
        temporal_env,
        twilio_auth_token=None,
        public_url=None,
        realtime_public_url="wss://media.example.test/",
    )
    async with serve(settings, temporal_env.client) as dev:
        number = await dev.number(await dev.agent())
        call_sid = new_call_sid()
        twiml = Twiml.parse(await dev.twilio.post(VOICE, data=voice_params(call_sid, number)))
        assert twiml.stream_url == "wss://media.example.test/media/twilio"
        [call] = dev.calls_with_sid(call_sid)
        assert twiml.call_id == call.id
        # A signature that is there but wrong does not matter either: nothing checks it.
        resigned = await dev.twilio.post(
            VOICE, data=voice_params(call_sid, number), headers={"X-Twilio-Signature": "bad"}
        )
        assert Twiml.parse(resigned).call_id == call.id

        # Bodies that are no form at all name no CallSid: 400, not a crash.
        for body, content_type in [
            (b"\xff\xfe\x00garbage%%%", "application/x-www-form-urlencoded"),
            (b'{"CallSid": "CA1", "To": "+14155550100"}', "application/json"),
            (b"", "application/x-www-form-urlencoded"),
        ]:
            response = await dev.twilio.post(
                VOICE, content=body, headers={"content-type": content_type}
            )
            assert response.status_code == 400, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")


async def test_temporal_unreachable_gets_an_apology_not_a_500(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """The shared harness has no auth token and Temporal on a port nothing listens on."""
    client = api.acme.client
    agent = (await client.post("/v1/agents", json={"name": "Offline"})).json()
    number = new_number()
    created = await client.post(
        "/v1/phone-numbers", json={"number": number, "carrier": "twilio", "agent_id": agent["id"]}
    )
    assert created.status_code == 201, created.text
    call_sid = new_call_sid()
    response = await api.anonymous.post(VOICE, data=voice_params(call_sid, number))
    assert Twiml.parse(response).says_sorry_and_hangs_up
    # The caller hears an apology; the operator gets the reason in the log.
    assert any(
        r.name == "api.routers.twilio_webhooks" and r.exc_info and call_sid in r.getMessage()
        for r in caplog.records
    )
    db = create_sync_engine(api.settings)
    try:
        with Session(db) as session:
            rows = session.exec(select(Call).where(Call.carrier_call_id == call_sid)).all()
    finally:
        db.dispose()
    assert rows == []


async def test_a_workflow_that_cannot_start_leaves_an_ended_call_not_a_ringing_one(
    db_settings: Settings, temporal_env: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """Temporal answers, but refuses the start (a namespace that does not exist)."""
    settings = with_temporal(db_settings, temporal_env, temporal_namespace="no-such-namespace")
    async with serve(settings, temporal_env.client) as broken:
        number = await broken.number(await broken.agent())
        call_sid = new_call_sid()
        twiml = await broken.incoming_call(number, call_sid)
        assert twiml.says_sorry_and_hangs_up
        assert "no-such-namespace" in caplog.text  # why, for the operator
        # The record says what happened; nothing is left "ringing" forever.
        [call] = broken.calls_with_sid(call_sid)
        assert (call.status, call.ended_reason) == ("ended", "failed")
        assert call.ended_at is not None
        # Twilio retrying must not be streamed to a call nothing will ever run.
        assert (await broken.incoming_call(number, call_sid)).says_sorry_and_hangs_up
        assert len(broken.calls_with_sid(call_sid)) == 1


# --- status callbacks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("carrier_status", "reason"),
    [
        ("completed", EndedReason.CALLER_HANGUP),
        ("busy", EndedReason.BUSY),
        ("no-answer", EndedReason.NO_ANSWER),
    ],
)
async def test_a_final_status_ends_the_call_through_its_workflow(
    tel: Telephony, carrier_status: str, reason: EndedReason
) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    call_id = (await tel.incoming_call(number, call_sid)).call_id
    handle = tel.temporal.get_workflow_handle(call_id)

    params = {**voice_params(call_sid, number), "CallStatus": carrier_status, "CallDuration": "0"}
    response = await tel.post(STATUS_PATH, params)
    assert response.status_code == 204, response.text

    state = await asyncio.wait_for(handle.result(), WORKFLOW_WAIT_S)
    assert state["status"] == CallStatus.ENDED and state["ended_reason"] == reason
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(ENDED_REASON) == reason
    assert description.typed_search_attributes.get(STATUS) == CallStatus.ENDED
    call = tel.call(call_id)
    assert (call.status, call.ended_reason) == (CallStatus.ENDED, reason)
    assert call.ended_at is not None
    assert call.call_metadata["carrier_status"] == carrier_status

    # Twilio delivering the callback again, after the workflow has finished, is harmless.
    again = await tel.post(STATUS_PATH, {**params, "CallStatus": "completed"})
    assert again.status_code == 204
    after = tel.call(call_id)
    assert (after.status, after.ended_reason, after.ended_at) == (
        call.status,
        call.ended_reason,
        call.ended_at,
    )


async def test_status_callbacks_that_are_not_final_or_not_ours_change_nothing(
    tel: Telephony,
) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    call_id = (await tel.incoming_call(number, call_sid)).call_id
    handle = tel.temporal.get_workflow_handle(call_id)

    progress = {**voice_params(call_sid, number), "CallStatus": "in-progress"}
    assert (await tel.post(STATUS_PATH, progress)).status_code == 204
    assert tel.call(call_id).call_metadata["carrier_status"] == "in-progress"

    stranger_sid = new_call_sid()
    stranger = {**voice_params(stranger_sid, number), "CallStatus": "completed"}
    response = await tel.post(STATUS_PATH, stranger)
    assert response.status_code == 204 and response.content == b""
    assert tel.calls_with_sid(stranger_sid) == []

    ended = {**voice_params(call_sid, number), "CallStatus": "completed"}
    for bad in (
        await tel.twilio.post(STATUS_PATH, data=ended),
        await tel.post(STATUS_PATH, ended, signed_url=f"http://testserver{STATUS_PATH}"),
        await tel.post(STATUS_PATH, ended, signature=sign(f"{PUBLIC_URL}{STATUS_PATH}", progress)),
    ):
        assert bad.status_code == 403, bad.text
        assert bad.headers["content-type"].startswith("application/problem+json")

    # None of that ended the call: its workflow still runs and the row still rings.
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    call = tel.call(call_id)
    assert call.status == CallStatus.RINGING and call.ended_reason is None
    assert call.call_metadata["carrier_status"] == "in-progress"


async def test_a_final_status_while_temporal_is_down_still_ends_the_record(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """No workflow can be told, so the callback records the end itself (harness: no
    auth token, Temporal on a port nothing listens on)."""
    agent_id = (await api.acme.client.post("/v1/agents", json={"name": "Lonely"})).json()["id"]
    [(call_id, call_sid)] = await insert_calls(api, agent_id, [CallStatus.IN_PROGRESS])
    params = {**voice_params(call_sid, new_number()), "CallStatus": "busy"}
    response = await api.anonymous.post(STATUS_PATH, data=params)
    assert response.status_code == 204, response.text
    assert call_id in caplog.text  # the operator learns the workflow was not told
    ended = await asyncio.to_thread(read_call, api.settings, call_id)
    assert (ended.status, ended.ended_reason) == (CallStatus.ENDED, EndedReason.BUSY)
    assert ended.ended_at is not None and ended.call_metadata == {"carrier_status": "busy"}


# --- the stream ended, the caller is still there -----------------------------------------


def in_progress(call_sid: str, to_number: str) -> dict[str, str]:
    """What Twilio POSTs to ``<Connect action>`` (its standard parameters)."""
    return {**voice_params(call_sid, to_number), "CallStatus": "in-progress"}


async def test_a_stream_lost_mid_call_is_streamed_again_and_one_ended_on_purpose_hangs_up(
    tel: Telephony,
) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    answer = await tel.incoming_call(number, call_sid)
    handle = tel.temporal.get_workflow_handle(answer.call_id)
    params = in_progress(call_sid, number)

    # The realtime process serving the call died: its socket closed, the call goes on.
    again = Twiml.parse(await tel.post(answer.action_path, params))
    assert again.stream_url == answer.stream_url
    assert again.parameters == {"call_id": answer.call_id, "resume": "1"}
    assert parse_qs(urlsplit(again.action_path).query) == {
        "call_id": [answer.call_id],
        "attempt": ["1"],
    }
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    # The agent hung up: the session reports the end, then closes its stream.
    await handle.signal("ended", EndedReason.AGENT_HANGUP)
    assert Twiml.parse(await tel.post(again.action_path, params)).verbs == ["Hangup"]
    # Asked again once the workflow has closed and the row says so: the same answer.
    state = await asyncio.wait_for(handle.result(), WORKFLOW_WAIT_S)
    assert state["ended_reason"] == EndedReason.AGENT_HANGUP
    assert tel.call(answer.call_id).status == CallStatus.ENDED
    assert Twiml.parse(await tel.post(answer.action_path, params)).verbs == ["Hangup"]


async def test_a_stream_that_keeps_ending_or_is_not_this_calls_is_not_streamed_again(
    tel: Telephony,
) -> None:
    number = await tel.number(await tel.agent())
    call_sid = new_call_sid()
    answer = await tel.incoming_call(number, call_sid)
    params = in_progress(call_sid, number)
    call_id = answer.call_id

    # Dropped over and over (every realtime process refusing it, say): no endless loop.
    # No session ever took the call: the caller is asked to try again later (a call
    # that was answered says the connection was lost: below).
    looping = Twiml.parse(await tel.post(f"{STREAM_ENDED}?call_id={call_id}&attempt=5", params))
    assert looping.verbs == ["Say", "Hangup"]
    assert "try again later" in (looping.root[0].text or "")
    # Before that, each retry streams it again: the first at once, the later ones after
    # a pause (asked again at once, a full process would most likely refuse it again).
    for attempt, verbs in [(0, ["Connect"]), (1, ["Pause", "Connect"]), (4, ["Pause", "Connect"])]:
        retry = Twiml.parse(
            await tel.post(f"{STREAM_ENDED}?call_id={call_id}&attempt={attempt}", params)
        )
        assert retry.verbs == verbs, attempt
        assert retry.parameters["resume"] == "1"
        if "Pause" in verbs:
            assert retry.root[0].get("length") == "1"
    # Another call's sid, an unknown call id, or none: nothing to stream.
    stranger = in_progress(new_call_sid(), number)
    for path, form in [
        (answer.action_path, stranger),
        (f"{STREAM_ENDED}?call_id=call_unknown", params),
        (STREAM_ENDED, params),
    ]:
        assert Twiml.parse(await tel.post(path, form)).verbs == ["Hangup"], path
    # Not Twilio: refused before anything is looked at.
    forged = await tel.post(answer.action_path, params, signed_url=f"{PUBLIC_URL}{STREAM_ENDED}")
    assert forged.status_code == 403
    bad_attempt = await tel.post(f"{STREAM_ENDED}?call_id={call_id}&attempt=-1", params)
    assert bad_attempt.status_code == 422

    # None of it touched the call itself.
    handle = tel.temporal.get_workflow_handle(call_id)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert tel.call(call_id).status == CallStatus.RINGING

    # ...while a call that was answered and then lost its stream again and again says so.
    answered_sid = new_call_sid()
    answered = await tel.incoming_call(number, answered_sid)
    await tel.temporal.get_workflow_handle(answered.call_id).signal("answered")
    async with asyncio.timeout(WORKFLOW_WAIT_S):
        while tel.call(answered.call_id).status != CallStatus.IN_PROGRESS:
            await asyncio.sleep(0.05)
    looping = Twiml.parse(
        await tel.post(
            f"{STREAM_ENDED}?call_id={answered.call_id}&attempt=5",
            in_progress(answered_sid, number),
        )
    )
    assert looping.verbs == ["Say", "Hangup"]
    assert "lost the connection" in (looping.root[0].text or "")
    # A live call's retries never wait: the caller is mid-conversation.
    live_retry = await tel.post(
        f"{STREAM_ENDED}?call_id={answered.call_id}&attempt=3", in_progress(answered_sid, number)
    )
    assert Twiml.parse(live_retry).verbs == ["Connect"]


async def test_a_stream_ended_while_temporal_is_down_hangs_up_with_a_reason(
    api: ApiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """No session could restore the conversation: the caller hears why (harness: no auth
    token, Temporal on a port nothing listens on). A call the row says ended just ends."""
    agent_id = (await api.acme.client.post("/v1/agents", json={"name": "Cut off"})).json()["id"]
    statuses = [CallStatus.IN_PROGRESS, CallStatus.ENDED]
    calls = dict(zip(statuses, await insert_calls(api, agent_id, statuses), strict=True))

    async def stream_ended(status: CallStatus) -> Twiml:
        call_id, call_sid = calls[status]
        params = in_progress(call_sid, new_number())
        return Twiml.parse(
            await api.anonymous.post(f"{STREAM_ENDED}?call_id={call_id}", data=params)
        )

    cut_off = await stream_ended(CallStatus.IN_PROGRESS)
    assert cut_off.verbs == ["Say", "Hangup"]
    assert calls[CallStatus.IN_PROGRESS][0] in caplog.text
    assert (await stream_ended(CallStatus.ENDED)).verbs == ["Hangup"]
