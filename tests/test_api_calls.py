"""The calls API: tenant isolation, list filters and paging, turns and transcript, and
browser calls started against a real Temporal dev server. Rows are real database rows
(SQLite and PostgreSQL) written the way the call workflow's activities write them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from test_telephony_twilio import Telephony, serve, with_temporal

from builder_engine.config import Settings
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Agent, AgentVersion, Call, CallTurn, Organization
from builder_engine.temporal_setup import ensure_search_attributes
from conftest import ApiHarness, Tenant, installed_binary
from workflows.call import AGENT_ID, DIRECTION

# Far from "now", so no call another test creates falls into these windows.
T0 = datetime(2001, 2, 3, 4, 5, 6, 123456, tzinfo=UTC)


@pytest.fixture(scope="module")
def db(api: ApiHarness) -> Iterator[sa.Engine]:
    engine = create_sync_engine(api.settings)
    try:
        yield engine
    finally:
        engine.dispose()


def org_id(db: sa.Engine, tenant: Tenant) -> str:
    with Session(db) as session:
        return session.exec(select(Organization).where(Organization.name == tenant.name)).one().id


async def new_agent(client: httpx.AsyncClient, name: str = "Agent") -> str:
    response = await client.post("/v1/agents", json={"name": name})
    assert response.status_code == 201, response.text
    agent_id: str = response.json()["id"]
    return agent_id


def seed_call(
    db: sa.Engine,
    organization_id: str,
    agent_id: str,
    *,
    created_at: datetime,
    direction: str = "inbound",
    status: str = "ended",
    turns: Sequence[tuple[int, str, str]] = (),
) -> str:
    """A call row (and its turns, stored in the given order) as the activities write them."""
    call = Call(
        organization_id=organization_id,
        agent_id=agent_id,
        agent_version=1,
        direction=direction,
        status=status,
        transport="web" if direction == "web" else "twilio",
        created_at=created_at,
        started_at=created_at,
    )
    with Session(db) as session:
        session.add(call)
        session.flush()
        for index, speaker, text in turns:
            session.add(
                CallTurn(
                    organization_id=organization_id,
                    call_id=call.id,
                    index=index,
                    speaker=speaker,
                    text=text,
                    interrupted=index == 3,
                    ended_at=created_at + timedelta(seconds=index),
                    latency={"voice_to_voice_ms": 400.0 + index} if speaker == "agent" else {},
                )
            )
        session.commit()
        return call.id


async def list_ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/v1/calls", params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["next_cursor"] is None  # the tests' windows fit on one page
    return [call["id"] for call in page["data"]]


# --- tenancy, listing, transcript --------------------------------------------------------


async def test_another_organizations_call_is_404_and_never_listed(
    api: ApiHarness, db: sa.Engine
) -> None:
    theirs_agent = await new_agent(api.globex.client, "Globex agent")
    theirs = seed_call(
        db,
        org_id(db, api.globex),
        theirs_agent,
        created_at=T0 - timedelta(days=1),
        turns=[(0, "caller", "my secret account number")],
    )
    acme = api.acme.client
    for path in (f"/v1/calls/{theirs}", f"/v1/calls/{theirs}/transcript"):
        response = await acme.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("/not-found")
        # Exactly the answer an id that does not exist gets.
        missing = await acme.get(path.replace(theirs, "call_" + "0" * 24))
        assert missing.status_code == 404
        assert missing.json()["type"] == response.json()["type"]

    # Not in any page of the list, not even when asked for by its agent.
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = (await acme.get("/v1/calls", params=params)).json()
        seen += [call["id"] for call in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert theirs not in seen
    assert await list_ids(acme, agent_id=theirs_agent) == []
    # Its owner sees it.
    assert await list_ids(api.globex.client, agent_id=theirs_agent) == [theirs]
    assert (await api.globex.client.get(f"/v1/calls/{theirs}/transcript")).status_code == 200


async def test_list_filters_and_pages_newest_first(api: ApiHarness, db: sa.Engine) -> None:
    client = api.acme.client
    org = org_id(db, api.acme)
    agent_a = await new_agent(client, "A")
    agent_b = await new_agent(client, "B")
    minute = timedelta(minutes=1)
    c0 = seed_call(db, org, agent_a, created_at=T0, direction="inbound")
    c1 = seed_call(db, org, agent_a, created_at=T0 + minute, direction="outbound")
    c2 = seed_call(db, org, agent_b, created_at=T0 + 2 * minute, status="in-progress")
    # Two calls created in the same microsecond: the id breaks the tie.
    c3 = seed_call(db, org, agent_a, created_at=T0 + 3 * minute, direction="web", status="ringing")
    c4 = seed_call(db, org, agent_a, created_at=T0 + 3 * minute)
    c5 = seed_call(db, org, agent_a, created_at=T0 + 4 * minute)
    tied = sorted([c3, c4], reverse=True)
    everything_a = [c5, *tied, c1, c0]

    assert await list_ids(client, agent_id=agent_a) == everything_a
    assert await list_ids(client, agent_id=agent_b) == [c2]
    assert await list_ids(client, agent_id=agent_a, status="ended") == [
        i for i in everything_a if i in {c0, c1, c4, c5}
    ]
    assert await list_ids(client, agent_id=agent_a, direction="inbound") == [
        i for i in everything_a if i in {c0, c4, c5}
    ]
    # (Bounded above too: other tests' calls in this organization are of today.)
    in_progress = await list_ids(
        client,
        status="in-progress",
        created_after=T0.isoformat(),
        created_before=(T0 + 5 * minute).isoformat(),
    )
    assert in_progress == [c2]
    assert await list_ids(client, agent_id=agent_a, direction="web", status="ringing") == [c3]

    # created_after is inclusive, created_before exclusive; the same instants written in
    # another offset, or naive (read as UTC), select the same calls.
    window = [*tied, c1]
    after, before = T0 + minute, T0 + 4 * minute
    plus_two = timezone(timedelta(hours=2))
    for low, high in [
        (after.isoformat(), before.isoformat()),
        (after.astimezone(plus_two).isoformat(), before.astimezone(plus_two).isoformat()),
        (after.replace(tzinfo=None).isoformat(), before.replace(tzinfo=None).isoformat()),
        (after.isoformat().replace("+00:00", "Z"), before.isoformat().replace("+00:00", "Z")),
    ]:
        ids = await list_ids(client, agent_id=agent_a, created_after=low, created_before=high)
        assert ids == window, (low, high)
    assert (
        await list_ids(client, created_after=T0 + 5 * minute, created_before=T0 + 6 * minute) == []
    )

    # Paging: every call once, in order, whatever the page size (ties split across pages).
    for limit in (1, 2, 3, 5):
        collected: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"agent_id": agent_a, "limit": limit}
            if cursor is not None:
                params["cursor"] = cursor
            page = (await client.get("/v1/calls", params=params)).json()
            assert len(page["data"]) <= limit
            collected += [call["id"] for call in page["data"]]
            cursor = page["next_cursor"]
            pages += 1
            if cursor is None:
                break
        assert collected == everything_a, limit
        assert pages == -(-len(everything_a) // limit), limit  # no empty trailing page

    # Filters hold across pages too.
    first = (
        await client.get("/v1/calls", params={"agent_id": agent_a, "status": "ended", "limit": 2})
    ).json()
    rest = (
        await client.get(
            "/v1/calls",
            params={
                "agent_id": agent_a,
                "status": "ended",
                "limit": 2,
                "cursor": first["next_cursor"],
            },
        )
    ).json()
    assert [c["id"] for c in first["data"] + rest["data"]] == [
        i for i in everything_a if i in {c0, c1, c4, c5}
    ]
    assert rest["next_cursor"] is None

    for bad in (
        {"cursor": "not-a-cursor"},
        {"limit": 0},
        {"limit": 101},
        {"created_after": "soon"},
    ):
        response = await client.get("/v1/calls", params=bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["field"] == next(iter(bad))


async def test_a_call_with_its_turns_and_transcript_in_order(
    api: ApiHarness, db: sa.Engine
) -> None:
    client = api.acme.client
    agent_id = await new_agent(client, "Talker")
    spoken = [
        (0, "agent", "Hello, Acme Dental."),
        (1, "caller", "Are you open on Saturday?"),
        (2, "agent", "Yes, from ten to"),
        (3, "caller", "Great, thanks."),
    ]
    # Stored out of order (batches from retried activities do arrive so).
    call_id = seed_call(
        db, org_id(db, api.acme), agent_id, created_at=T0, turns=[spoken[i] for i in (2, 0, 3, 1)]
    )

    detail = await client.get(f"/v1/calls/{call_id}")
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["object"] == "call" and body["id"] == call_id and body["agent_id"] == agent_id
    assert [(t["index"], t["speaker"], t["text"]) for t in body["turns"]] == spoken
    assert [t["interrupted"] for t in body["turns"]] == [False, False, False, True]
    assert body["turns"][0]["latency"] == {"voice_to_voice_ms": 400.0}
    assert body["turns"][1]["latency"] == {}
    assert body["turns"][3]["ended_at"].endswith("Z") or "+00:00" in body["turns"][3]["ended_at"]

    transcript = await client.get(f"/v1/calls/{call_id}/transcript")
    assert transcript.status_code == 200
    assert transcript.json() == body["turns"]

    silent = seed_call(db, org_id(db, api.acme), agent_id, created_at=T0)
    assert (await client.get(f"/v1/calls/{silent}/transcript")).json() == []
    assert (await client.get(f"/v1/calls/{silent}")).json()["turns"] == []


# --- browser calls -----------------------------------------------------------------------


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
async def web(db_settings: Settings, temporal_env: WorkflowEnvironment) -> AsyncIterator[Telephony]:
    async with serve(with_temporal(db_settings, temporal_env), temporal_env.client) as stack:
        yield stack


async def test_a_web_call_starts_on_the_published_version_with_a_hashed_token(
    web: Telephony,
) -> None:
    agent_id = await web.agent("Web agent")
    draft = await web.api.patch(f"/v1/agents/{agent_id}", json={"name": "draft"})
    assert draft.json()["version"] == 2 and draft.json()["published_version"] == 1
    variables = {"name": "Ann", "vip": True, "visits": 3}

    created = await web.api.post(
        "/v1/calls/web", json={"agent_id": agent_id, "variables": variables}
    )

    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"call_id", "websocket_url", "token"}
    assert body["websocket_url"] == "wss://voice.example.test/media/web"
    token = body["token"]
    assert len(token) >= 32  # 24 random bytes, URL-safe base64

    call = web.call(body["call_id"])
    assert call.organization_id == web.organization_id
    assert (call.agent_id, call.agent_version) == (agent_id, 1)
    assert (call.direction, call.transport, call.status) == ("web", "web", "ringing")
    assert call.phone_number_id is None and call.carrier_call_id is None
    # Only a hash of the token is kept: the row cannot be used to join the call.
    assert call.call_metadata == {
        "variables": variables,
        "join_token_hash": hashlib.sha256(token.encode()).hexdigest(),
    }
    with web.db.connect() as connection:
        table = SQLModel.metadata.tables["call"]
        raw = connection.execute(sa.select(table).where(table.c.id == call.id)).one()
    assert token not in json.dumps(raw._asdict(), default=str)

    handle = web.temporal.get_workflow_handle(call.id)
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert description.typed_search_attributes.get(DIRECTION) == "web"
    assert description.typed_search_attributes.get(AGENT_ID) == agent_id
    # Nor does the workflow's input (its history is visible to every Temporal UI user).
    history = await handle.fetch_history()
    assert token.encode() not in history.to_json().encode()

    again = (await web.api.post("/v1/calls/web", json={"agent_id": agent_id})).json()
    assert again["call_id"] != call.id and again["token"] != token
    assert web.call(again["call_id"]).call_metadata["variables"] == {}
    listed = (await web.api.get("/v1/calls", params={"agent_id": agent_id})).json()
    assert [c["id"] for c in listed["data"]] == [again["call_id"], call.id]


async def test_web_calls_need_an_agent_of_ours_with_a_published_version(
    web: Telephony, db_settings: Settings, temporal_env: WorkflowEnvironment
) -> None:
    unknown = await web.api.post("/v1/calls/web", json={"agent_id": "agt_" + "0" * 24})
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("/not-found")

    async with serve(web.settings, temporal_env.client) as other:
        theirs = await other.agent("Someone else's")
    stolen = await web.api.post("/v1/calls/web", json={"agent_id": theirs})
    assert stolen.status_code == 404, stolen.text

    deleted = await web.agent("Deleted")
    assert (await web.api.delete(f"/v1/agents/{deleted}")).status_code == 204
    assert (await web.api.post("/v1/calls/web", json={"agent_id": deleted})).status_code == 404

    # The API always publishes version 1; an agent whose versions were never published
    # (imported, or made by an older release) exists only in the database.
    with Session(web.db) as session:
        unpublished = Agent(organization_id=web.organization_id, name="Draft only")
        session.add(unpublished)
        session.flush()
        session.add(
            AgentVersion(
                organization_id=web.organization_id,
                agent_id=unpublished.id,
                version=1,
                config={"name": "Draft only"},
            )
        )
        session.commit()
        unpublished_id = unpublished.id
    response = await web.api.post("/v1/calls/web", json={"agent_id": unpublished_id})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "agent_id"

    mine = await web.agent("Strict")
    for bad, field in [
        ({"agent_id": mine, "variables": {"1bad": "x"}}, "variables.1bad"),
        ({"agent_id": mine, "token": "mine"}, "token"),
        ({}, "agent_id"),
    ]:
        invalid = await web.api.post("/v1/calls/web", json=bad)
        assert invalid.status_code == 422, (bad, invalid.text)
        fields = [e["field"] for e in invalid.json()["errors"]]
        assert any(f.startswith(field) for f in fields), (bad, fields)

    # None of these created a call.
    with Session(web.db) as session:
        made = session.exec(
            select(Call).where(
                Call.organization_id == web.organization_id,
                sa.or_(Call.agent_id == unpublished_id, Call.agent_id == mine),  # type: ignore[arg-type]
            )
        ).all()
    assert made == []


async def test_a_web_call_while_temporal_is_down_is_503(api: ApiHarness, db: sa.Engine) -> None:
    """The shared harness points Temporal at a port nothing listens on."""
    agent_id = await new_agent(api.acme.client, "Unlucky")
    response = await api.acme.client.post("/v1/calls/web", json={"agent_id": agent_id})
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 503
    with Session(db) as session:
        assert session.exec(select(Call).where(Call.agent_id == agent_id)).all() == []
