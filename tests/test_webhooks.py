"""Webhooks: signed deliveries retried (durable activity retries) until the receiver
accepts, the delivery log through the API, manual redelivery, giving up after the retry
window, the SSRF guard, and the endpoints API with tenant isolation.

A real Temporal dev server, the platform's worker and API in process, and a real HTTP
receiver on 127.0.0.1. The worker's back-off is configured short (1 s doubling, for 4 s)
so retries take seconds; the production schedule is checked on its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from events_harness import (
    AGENT_CONFIG,
    Platform,
    Receiver,
    create_endpoint,
    dev_server,
    forget_endpoints,
    running_platform,
    serving,
    verify,
)
from sqlmodel import Session
from temporalio.testing import WorkflowEnvironment

from builder_engine.calls import EndedReason
from builder_engine.config import Settings
from builder_engine.db.engine import create_sync_engine
from builder_engine.db.models import Organization
from builder_engine.webhooks import sign, signature_header, verify_signature
from conftest import ApiHarness
from workflows.events import WebhookRetry


@pytest.fixture(scope="module")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    async with dev_server() as env:
        yield env


@pytest.fixture(scope="module")
async def running(
    temporal_env: WorkflowEnvironment, db_settings: Settings
) -> AsyncIterator[Platform]:
    async with running_platform(temporal_env, db_settings) as platform:
        yield platform


@pytest.fixture
async def platform(running: Platform) -> AsyncIterator[Platform]:
    """The running platform; the endpoints a test made are deleted after it."""
    yield running
    await forget_endpoints(running)


# ------------------------------------------------------------------ delivery


async def test_signed_webhook_is_retried_until_the_receiver_accepts(platform: Platform) -> None:
    async with serving(Receiver(fail_first=2)) as receiver:
        endpoint = await create_endpoint(platform.api, receiver.url, ["call.started"])
        start = platform.add_call()
        call = await platform.start_call(start)
        [delivery] = await platform.deliveries_of(start.call_id, 1)
        outcome = await platform.outcome(start.call_id, delivery)
        await call.signal("ended", str(EndedReason.CALLER_HANGUP))
        await call.result()

    assert outcome.status == "delivered" and outcome.attempts == 3
    assert [r.status for r in receiver.requests] == [500, 500, 200]
    # Every attempt: the same event and body, a fresh valid signature.
    event_ids = {r.headers["builder-event-id"] for r in receiver.requests}
    assert event_ids == {delivery["event_id"]}
    assert len({r.body for r in receiver.requests}) == 1
    for request in receiver.requests:
        assert request.headers["content-type"] == "application/json"
        assert request.headers["builder-event-type"] == "call.started"
        assert request.headers["builder-delivery-id"] == delivery["id"]
        signature = request.headers["builder-signature"]
        assert verify(endpoint["secret"], request.body, signature)
        assert verify_signature(endpoint["secret"], request.body, signature)
        assert not verify(endpoint["secret"], request.body + b" ", signature)
        assert not verify("whsec_wrong", request.body, signature)

    body = receiver.requests[-1].json
    assert body["id"] == delivery["event_id"] and body["type"] == "call.started"
    assert body["object"] == "event" and body["organization_id"] == platform.organization_id
    data_call = body["data"]["call"]
    assert data_call["id"] == start.call_id and data_call["status"] == "in-progress"
    assert data_call["agent_id"] == start.agent_id and data_call["agent_version"] == 1
    assert data_call["from_number"] == "+14155550100" and data_call["to_number"] == "+14155550111"
    assert data_call["answered_at"] is not None and data_call["ended_reason"] is None
    assert body["data"]["transcript"] is None and body["data"]["analysis"] is None

    # The delivery log, through the API.
    log = (await platform.api.get(f"/v1/webhooks/deliveries/{delivery['id']}")).json()
    assert log["status"] == "delivered" and log["delivered_at"] is not None
    assert log["attempt_count"] == 3 and log["next_attempt_at"] is None
    attempts = log["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, 500, 200]
    assert all(a["trigger"] == "event" for a in attempts)
    assert attempts[0]["response_excerpt"] == '{"error": "not now"}'
    assert [a["error"] for a in attempts] == [None, None, None]
    # Exponential back-off: the next retry 1 s, then 2 s after each failure.
    gaps = [
        (datetime.fromisoformat(a["next_attempt_at"]) - datetime.fromisoformat(a["at"]))
        for a in attempts[:2]
    ]
    assert [round(g.total_seconds(), 1) for g in gaps] == [1.0, 2.0]
    sent = [datetime.fromisoformat(a["at"]) for a in attempts]
    waited = [(b - a).total_seconds() for a, b in itertools.pairwise(sent)]
    assert all(w >= g.total_seconds() - 0.05 for w, g in zip(waited, gaps, strict=True))
    assert attempts[2]["next_attempt_at"] is None
    assert log["payload"] == body

    listed = (await platform.api.get(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries")).json()
    assert [d["id"] for d in listed["data"]] == [delivery["id"]]
    delivered = await platform.api.get(
        f"/v1/webhook-endpoints/{endpoint['id']}/deliveries", params={"status": "failed"}
    )
    assert delivered.json()["data"] == []

    # The call's events: started, ended and analyzed (only call.started was subscribed).
    events = (await platform.api.get(f"/v1/calls/{start.call_id}/events")).json()["data"]
    assert events[0]["type"] == "call.started"
    assert [d["id"] for d in events[0]["webhook_deliveries"]] == [delivery["id"]]


async def test_redelivery_sends_the_same_event_again(platform: Platform) -> None:
    async with serving(Receiver()) as receiver:
        endpoint = await create_endpoint(platform.api, receiver.url, ["call.started"])
        start = platform.add_call()
        call = await platform.start_call(start)
        [first] = await platform.deliveries_of(start.call_id, 1)
        assert (await platform.outcome(start.call_id, first)).status == "delivered"

        # Rotated: the redelivery is signed with the new secret.
        rotated = (
            await platform.api.post(f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret")
        ).json()
        assert rotated["secret"] != endpoint["secret"]
        response = await platform.api.post(f"/v1/webhooks/deliveries/{first['id']}/redeliver")
        assert response.status_code == 202, response.text
        again = response.json()
        assert again["id"] != first["id"] and again["event_id"] == first["event_id"]
        assert again["payload"] == receiver.requests[0].json
        assert (await platform.outcome(start.call_id, again)).status == "delivered"
        await call.signal("ended", str(EndedReason.AGENT_HANGUP))
        await call.result()

    assert len(receiver.requests) == 2
    assert receiver.requests[1].body == receiver.requests[0].body
    assert verify(
        rotated["secret"],
        receiver.requests[1].body,
        receiver.requests[1].headers["builder-signature"],
    )
    assert not verify(
        endpoint["secret"],
        receiver.requests[1].body,
        receiver.requests[1].headers["builder-signature"],
    )
    log = (await platform.api.get(f"/v1/webhooks/deliveries/{again['id']}")).json()
    assert log["status"] == "delivered"
    [attempt] = log["attempts"]
    assert attempt["trigger"] == "manual" and attempt["redelivery_of"] == first["id"]
    events = (await platform.api.get(f"/v1/calls/{start.call_id}/events")).json()["data"]
    assert {d["id"] for d in events[0]["webhook_deliveries"]} == {first["id"], again["id"]}


async def test_a_delivery_gives_up_after_the_retry_window_and_can_be_redelivered(
    platform: Platform,
) -> None:
    receiver = Receiver(always_fail=True, fail_status=503)
    async with serving(receiver):
        await create_endpoint(platform.api, receiver.url, ["call.started"])
        start = platform.add_call()
        call = await platform.start_call(start)
        [delivery] = await platform.deliveries_of(start.call_id, 1)
        outcome = await platform.outcome(start.call_id, delivery)
        await call.signal("ended", str(EndedReason.CALLER_HANGUP))
        await call.result()

        assert outcome.status == "failed" and outcome.attempts == 3
        assert (
            outcome.reason
            == "not accepted within the 4 s retry window; last: delivery attempt 3 failed: HTTP 503"
        )
        log = (await platform.api.get(f"/v1/webhooks/deliveries/{delivery['id']}")).json()
        assert log["status"] == "failed" and log["next_attempt_at"] is None
        attempts = log["attempts"]
        # 0, 1, 3 s; the next (5 s) would be past the 4 s window.
        assert len(attempts) == 3
        assert {a["status_code"] for a in attempts} == {503}
        assert len(receiver.requests) == len(attempts)
        assert attempts[-1]["next_attempt_at"] is None

        # The receiver is fixed; a manual redelivery goes through.
        receiver.always_fail = False
        response = await platform.api.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
        assert response.status_code == 202
        assert (await platform.outcome(start.call_id, response.json())).status == "delivered"
    assert receiver.requests[-1].status == 200


async def test_private_destinations_need_the_allowlist(platform: Platform) -> None:
    # Another organization has no allowlist: a loopback literal is refused at creation...
    refused = await platform.other.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["call.ended"]}
    )
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["errors"][0]["field"] == "url"
    # ...and a name that resolves to loopback is refused at delivery, without retries.
    async with serving(Receiver()) as receiver:
        sneaky = receiver.url.replace("127.0.0.1", "localhost")
        engine = create_sync_engine(platform.settings)
        with Session(engine) as session:
            org = session.get(Organization, platform.organization_id)
            assert org is not None
            saved, org.outbound_allowlist = list(org.outbound_allowlist), []
            session.add(org)
            session.commit()
        try:
            endpoint = await create_endpoint(platform.api, sneaky, ["call.started"])
            start = platform.add_call()
            call = await platform.start_call(start)
            [delivery] = await platform.deliveries_of(start.call_id, 1)
            outcome = await platform.outcome(start.call_id, delivery)
            await call.signal("ended", str(EndedReason.CALLER_HANGUP))
            await call.result()
        finally:
            with Session(engine) as session:
                org = session.get(Organization, platform.organization_id)
                assert org is not None
                org.outbound_allowlist = saved
                session.add(org)
                session.commit()
            engine.dispose()
        await platform.api.delete(f"/v1/webhook-endpoints/{endpoint['id']}")
    assert receiver.requests == []
    assert outcome.status == "failed" and "allowlist" in (outcome.reason or "")


async def test_agent_webhook_url_gets_its_events(platform: Platform) -> None:
    async with serving(Receiver()) as receiver:
        config = {**AGENT_CONFIG, "webhook_url": receiver.url, "webhook_events": ["call.started"]}
        start = platform.add_call(config)
        call = await platform.start_call(start)
        [delivery] = await platform.deliveries_of(start.call_id, 1)
        assert (await platform.outcome(start.call_id, delivery)).status == "delivered"
        await call.signal("ended", str(EndedReason.CALLER_HANGUP))
        await call.result()
    # Signed with the organization's endpoint for that URL, made on first use: it
    # subscribes to nothing itself, so other agents' calls do not reach it.
    endpoint = (await platform.api.get(f"/v1/webhook-endpoints/{delivery['endpoint_id']}")).json()
    assert endpoint["url"] == receiver.url and endpoint["events"] == []
    rotated = (
        await platform.api.post(f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret")
    ).json()
    assert rotated["id"] == endpoint["id"]
    assert [r.json["type"] for r in receiver.requests] == ["call.started"]


# ------------------------------------------------------------------ endpoints API


async def test_webhook_endpoints_api(api: ApiHarness) -> None:
    acme, globex = api.acme.client, api.globex.client
    created = await acme.post(
        "/v1/webhook-endpoints",
        json={"url": "https://hooks.example.com/builder", "events": ["call.ended", "call.ended"]},
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and len(endpoint["secret"]) > 40
    assert endpoint["events"] == ["call.ended"] and endpoint["active"] is True
    assert endpoint["secret_hint"] == endpoint["secret"][-4:]
    ident = endpoint["id"]

    got = (await acme.get(f"/v1/webhook-endpoints/{ident}")).json()
    assert "secret" not in got and got["url"] == "https://hooks.example.com/builder"
    default_events = await acme.post(
        "/v1/webhook-endpoints", json={"url": "https://hooks.example.com/all"}
    )
    assert default_events.json()["events"] == [
        "call.started", "call.ended", "call.analyzed", "call.transferred", "tool.called",
    ]  # fmt: skip
    listed = (await acme.get("/v1/webhook-endpoints", params={"limit": 1})).json()
    assert len(listed["data"]) == 1 and listed["next_cursor"]

    patched = await acme.patch(
        f"/v1/webhook-endpoints/{ident}", json={"events": ["call.analyzed"], "active": False}
    )
    assert patched.status_code == 200
    assert patched.json()["events"] == ["call.analyzed"] and patched.json()["active"] is False
    rotated = (await acme.post(f"/v1/webhook-endpoints/{ident}/rotate-secret")).json()
    assert rotated["secret"] != endpoint["secret"]

    for bad in (
        {"url": "https://x.example.com", "events": ["call.exploded"]},
        {"url": "ftp://x.example.com"},
        {"url": "https://x.example.com", "secret": "mine"},
        {"url": "http://169.254.169.254/latest/meta-data"},
    ):
        response = await acme.post("/v1/webhook-endpoints", json=bad)
        assert response.status_code == 422, bad
        assert response.headers["content-type"] == "application/problem+json"
    null = await acme.patch(f"/v1/webhook-endpoints/{ident}", json={"active": None})
    assert null.status_code == 422

    # Another organization sees none of it.
    for method, path in (
        ("GET", f"/v1/webhook-endpoints/{ident}"),
        ("PATCH", f"/v1/webhook-endpoints/{ident}"),
        ("POST", f"/v1/webhook-endpoints/{ident}/rotate-secret"),
        ("GET", f"/v1/webhook-endpoints/{ident}/deliveries"),
        ("DELETE", f"/v1/webhook-endpoints/{ident}"),
        ("GET", "/v1/webhooks/deliveries/whd_0000"),
        ("POST", "/v1/webhooks/deliveries/whd_0000/redeliver"),
    ):
        response = await globex.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path)
        assert response.json()["type"].endswith("/not-found")
    assert ident not in {
        e["id"] for e in (await globex.get("/v1/webhook-endpoints")).json()["data"]
    }

    assert (await acme.delete(f"/v1/webhook-endpoints/{ident}")).status_code == 204
    assert (await acme.get(f"/v1/webhook-endpoints/{ident}")).status_code == 404


async def test_another_tenants_deliveries_are_not_found(platform: Platform) -> None:
    async with serving(Receiver()) as receiver:
        await create_endpoint(platform.api, receiver.url, ["call.started"])
        start = platform.add_call()
        call = await platform.start_call(start)
        [delivery] = await platform.deliveries_of(start.call_id, 1)
        await platform.outcome(start.call_id, delivery)
        await call.signal("ended", str(EndedReason.CALLER_HANGUP))
        await call.result()
    for method, path in (
        ("GET", f"/v1/webhooks/deliveries/{delivery['id']}"),
        ("POST", f"/v1/webhooks/deliveries/{delivery['id']}/redeliver"),
        ("GET", f"/v1/webhook-endpoints/{delivery['endpoint_id']}/deliveries"),
        ("GET", f"/v1/calls/{start.call_id}/events"),
    ):
        assert (await platform.other.request(method, path)).status_code == 404, path


def test_the_production_back_off_retries_for_a_day() -> None:
    retry = WebhookRetry()
    policy = retry.policy()
    assert policy.initial_interval.total_seconds() == 2 and policy.backoff_coefficient == 2
    assert policy.maximum_interval is not None
    assert policy.maximum_interval.total_seconds() == 3600 and policy.maximum_attempts == 0
    # When Temporal starts each attempt (the activity's schedule-to-close is the window).
    at, starts = 0.0, []
    attempt = 1
    while at <= retry.window_s:
        starts.append(at)
        at += retry.delay_after(attempt)
        attempt += 1
    assert starts[:5] == [0, 2, 6, 14, 30]
    assert retry.delay_after(12) == 3600 and retry.delay_after(11) == 2048
    assert len(starts) == 34 and starts[-1] > 23 * 3600


def test_signature_recipe() -> None:
    body = b'{"id":"evt_1","type":"call.ended"}'
    header = signature_header("whsec_test", body, timestamp=int(time.time()))
    assert verify("whsec_test", body, header) and verify_signature("whsec_test", body, header)
    assert not verify_signature("whsec_test", body.replace(b"1", b"2"), header)
    stale = signature_header("whsec_test", body, timestamp=int(time.time()) - 301)
    assert not verify("whsec_test", body, stale) and not verify_signature("whsec_test", body, stale)
    t = header.split(",")[0]
    assert header == f"{t},v1={sign('whsec_test', int(t[2:]), body)}"
