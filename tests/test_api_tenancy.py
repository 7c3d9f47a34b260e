"""Authentication, tenant isolation, API keys, phone numbers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import httpx

from conftest import ApiHarness


def _number() -> str:
    return "+1415" + "".join(secrets.choice("0123456789") for _ in range(7))


async def test_requests_without_or_with_a_bad_key_are_401(api: ApiHarness) -> None:
    for headers in ({}, {"Authorization": "Bearer be_nope"}, {"Authorization": "Basic abc"}):
        response = await api.anonymous.get("/v1/agents", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["www-authenticate"] == "Bearer"
        problem = response.json()
        assert set(problem) >= {"type", "title", "status", "detail"}


async def test_another_tenants_ids_are_404(api: ApiHarness) -> None:
    agent = (await api.acme.client.post("/v1/agents", json={"name": "Private"})).json()
    agent_id = agent["id"]
    other = api.globex.client
    for method, path, body in [
        ("GET", f"/v1/agents/{agent_id}", None),
        ("PATCH", f"/v1/agents/{agent_id}", {"name": "stolen"}),
        ("PUT", f"/v1/agents/{agent_id}", {"name": "stolen"}),
        ("DELETE", f"/v1/agents/{agent_id}", None),
        ("GET", f"/v1/agents/{agent_id}/versions", None),
        ("GET", f"/v1/agents/{agent_id}/versions/1", None),
        ("POST", f"/v1/agents/{agent_id}/publish", None),
    ]:
        response = await other.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["type"].endswith("/not-found")
    listed = (await other.get("/v1/agents", params={"limit": 100})).json()
    assert agent_id not in [a["id"] for a in listed["data"]]
    # Nothing changed for the owner.
    mine = (await api.acme.client.get(f"/v1/agents/{agent_id}")).json()
    assert mine["name"] == "Private" and mine["version"] == 1


async def test_api_keys_are_shown_once_tracked_and_revocable(api: ApiHarness) -> None:
    created = await api.acme.client.post("/v1/api-keys", json={"name": "ci"})
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("be_")
    listed = (await api.acme.client.get("/v1/api-keys")).text
    assert key not in listed and created.json()["prefix"] in listed

    second = httpx.AsyncClient(
        transport=api.acme.client._transport,
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {key}"},
    )
    async with second:
        assert (await second.get("/v1/agents")).status_code == 200
        keys = (await second.get("/v1/api-keys")).json()
        used = next(k for k in keys if k["id"] == created.json()["id"])
        assert used["last_used_at"] is not None
        # Another organization cannot revoke it.
        assert (await api.globex.client.delete(f"/v1/api-keys/{used['id']}")).status_code == 404
        assert (await api.acme.client.delete(f"/v1/api-keys/{used['id']}")).status_code == 204
        assert (await second.get("/v1/agents")).status_code == 401


async def test_phone_numbers_crud_and_assignment(api: ApiHarness) -> None:
    client = api.acme.client
    agent = (await client.post("/v1/agents", json={"name": "Receptionist"})).json()
    number = _number()
    created = await client.post(
        "/v1/phone-numbers", json={"number": number, "carrier": "twilio", "agent_id": agent["id"]}
    )
    assert created.status_code == 201, created.text
    row = created.json()
    assert row["number"] == number and row["agent_id"] == agent["id"]

    # The number belongs to one organization platform-wide.
    clash = await api.globex.client.post(
        "/v1/phone-numbers", json={"number": number, "carrier": "twilio"}
    )
    assert clash.status_code == 409

    # An assigned agent cannot be deleted out from under its number.
    assert (await client.delete(f"/v1/agents/{agent['id']}")).status_code == 409

    unassigned = await client.patch(f"/v1/phone-numbers/{row['id']}", json={"agent_id": None})
    assert unassigned.json()["agent_id"] is None
    assert (await client.delete(f"/v1/agents/{agent['id']}")).status_code == 204

    # Deleted agents and other tenants' agents cannot be assigned.
    gone = await client.patch(f"/v1/phone-numbers/{row['id']}", json={"agent_id": agent["id"]})
    assert gone.status_code == 422 and gone.json()["errors"][0]["field"] == "agent_id"
    theirs = (await api.globex.client.post("/v1/agents", json={"name": "Theirs"})).json()
    stolen = await client.patch(f"/v1/phone-numbers/{row['id']}", json={"agent_id": theirs["id"]})
    assert stolen.status_code == 422

    assert (await api.globex.client.get(f"/v1/phone-numbers/{row['id']}")).status_code == 404
    listed = (await client.get("/v1/phone-numbers", params={"limit": 100})).json()
    assert row["id"] in [n["id"] for n in listed["data"]]
    assert (await client.delete(f"/v1/phone-numbers/{row['id']}")).status_code == 204
    assert (await client.get(f"/v1/phone-numbers/{row['id']}")).status_code == 404


async def test_phone_numbers_must_be_e164(api: ApiHarness) -> None:
    for bad in ["4155550100", "+0123456789", "+1 415 555 0100", "+1234", "+1234567890123456"]:
        response = await api.acme.client.post(
            "/v1/phone-numbers", json={"number": bad, "carrier": "twilio"}
        )
        assert response.status_code == 422, bad
        assert response.json()["errors"][0]["field"] == "number"
    carrier = await api.acme.client.post(
        "/v1/phone-numbers", json={"number": _number(), "carrier": "pigeon"}
    )
    assert carrier.json()["errors"][0]["field"] == "carrier"


async def test_oversized_bodies_are_413(api: ApiHarness) -> None:
    big = {"name": "x", "brain": {"system_prompt": "a" * (api.settings.max_body_bytes + 10)}}
    response = await api.acme.client.post("/v1/agents", json=big)
    assert response.status_code == 413
    assert response.json()["status"] == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 100_000

    streamed = await api.acme.client.post(
        "/v1/agents", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


async def test_unknown_routes_and_methods_use_the_problem_shape(api: ApiHarness) -> None:
    missing = await api.acme.client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    wrong = await api.acme.client.delete("/v1/agents")
    assert wrong.status_code == 405 and wrong.json()["status"] == 405


async def test_the_outbound_allowlist_is_the_organizations_own(api: ApiHarness) -> None:
    mine = (await api.acme.client.get("/v1/organization")).json()
    assert mine["name"] == api.acme.name and mine["outbound_allowlist"] == []
    updated = await api.acme.client.patch(
        "/v1/organization",
        json={"outbound_allowlist": ["127.0.0.1", "10.1.0.0/16", "CRM.internal", "[::1]"]},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["outbound_allowlist"] == [
        "127.0.0.1",
        "10.1.0.0/16",
        "crm.internal",
        "[::1]",
    ]
    theirs = (await api.globex.client.get("/v1/organization")).json()
    assert theirs["outbound_allowlist"] == []
    bad = await api.acme.client.patch(
        "/v1/organization", json={"outbound_allowlist": ["not a host!"]}
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "outbound_allowlist"
    reset = await api.acme.client.patch("/v1/organization", json={"outbound_allowlist": []})
    assert reset.json()["outbound_allowlist"] == []
