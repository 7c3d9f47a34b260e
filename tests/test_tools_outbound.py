"""Outbound HTTP for tools: the SSRF guard, signatures, size limits; the webhook tool's
request as a receiver sees it; and the signing secret through the tools API."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlmodel import Session, select
from tools_support import SECRET, ToolReceiver, seed_call, set_allowlist, tool_call_id

from activities.tools import ToolActivities, idempotency_key
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine, session_factory
from builder_engine.db.models import ToolDefinition
from builder_engine.outbound import (
    Allowlist,
    OutboundRefused,
    Resolver,
    check_destination,
    is_public,
    send,
    signature_headers,
)
from builder_engine.webhooks import verify_signature
from conftest import ApiHarness
from workflows.tools import ToolTask


def resolver_of(table: dict[str, list[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://192.168.0.10/",
        "http://172.16.5.4/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "http://0.0.0.0/",
        "http://localhost/",  # a name that resolves to loopback
    ],
)
async def test_private_destinations_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="private, loopback or link-local"):
        await check_destination(url, Allowlist())


async def test_every_address_of_a_name_is_checked() -> None:
    resolve = resolver_of(
        {"mixed.example": ["93.184.216.34", "10.0.0.7"], "public.example": ["93.184.216.34"]}
    )
    with pytest.raises(OutboundRefused, match=r"10\.0\.0\.7"):
        await check_destination("https://mixed.example/x", Allowlist(), resolver=resolve)
    checked = await check_destination("https://public.example/x", Allowlist(), resolver=resolve)
    assert str(checked.address) == "93.184.216.34" and checked.host_header == "public.example"
    assert str(checked.pinned_url) == "https://93.184.216.34/x"


async def test_the_allowlist_names_hosts_addresses_and_networks() -> None:
    resolve = resolver_of({"crm.internal": ["10.1.2.3"], "other.internal": ["10.9.9.9"]})
    allow = Allowlist.parse(["127.0.0.1", "10.1.0.0/16", "CRM.internal", " "])
    await check_destination("http://127.0.0.1:9000/", allow)
    await check_destination("http://10.1.200.1/", allow)
    await check_destination("http://crm.internal/", allow, resolver=resolve)
    for url in ("http://127.0.0.2/", "http://10.2.0.1/", "http://other.internal/"):
        with pytest.raises(OutboundRefused):
            await check_destination(url, allow, resolver=resolve)
    # Naming 127.0.0.1 does not allow every name that resolves to it.
    with pytest.raises(OutboundRefused):
        await check_destination(
            "http://sneaky.example/",
            allow,
            resolver=resolver_of({"sneaky.example": ["127.0.0.1", "::1"]}),
        )


async def test_unusable_urls_are_refused() -> None:
    for url in ("ftp://example.com/", "http://user:pw@example.com/", "file:///etc/passwd", "x"):
        with pytest.raises(OutboundRefused):
            await check_destination(url, Allowlist())
    assert is_public(ipaddress.ip_address("8.8.8.8"))


def test_signatures() -> None:
    body = b'{"a":1}'
    headers = signature_headers("s3cret", body, now=1_700_000_000)
    # The recipe in docs/webhooks.md, spelled out: tools sign like webhook events.
    digest = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert headers == {"Builder-Signature": f"t=1700000000,v1={digest}"}
    fresh = signature_headers("s3cret", body)["Builder-Signature"]
    assert verify_signature("s3cret", body, fresh)
    assert not verify_signature("other", body, fresh)
    assert not verify_signature("s3cret", body, headers["Builder-Signature"])  # too old


async def test_responses_are_size_limited_and_redirects_not_followed() -> None:
    async with ToolReceiver() as receiver:
        big = receiver.on("/big", raw=b"x" * 100_000)
        moved = receiver.on("/moved", status=302, reply={"to": "http://169.254.169.254/"})
        allow = Allowlist.parse(["127.0.0.1"])
        async with httpx.AsyncClient() as client:
            response = await send(
                client,
                "POST",
                big,
                body=b"{}",
                headers={},
                allowlist=allow,
                timeout_s=5,
                max_response_bytes=1000,
            )
            assert response.status == 200 and response.truncated and len(response.body) == 1000
            redirect = await send(
                client, "POST", moved, body=b"{}", headers={}, allowlist=allow, timeout_s=5
            )
            assert redirect.status == 302
        assert [r.path for r in receiver.received] == ["/big", "/moved"]


@pytest.fixture
async def tools(db_settings: Settings) -> AsyncIterator[ToolActivities]:
    engine = create_async_db_engine(db_settings)
    activities = ToolActivities(session_factory(engine))
    try:
        yield activities
    finally:
        await activities.aclose()
        await engine.dispose()


async def test_a_webhook_tool_request_as_the_receiver_sees_it(
    db_settings: Settings, tools: ToolActivities
) -> None:
    async with ToolReceiver() as receiver:
        url = receiver.on("/orders", reply={"status": "shipped"})
        seeded = seed_call(db_settings, [{"name": "lookup_order", "kind": "webhook", "url": url}])
        start = seeded.start
        task = ToolTask(
            call_id=start.call_id,
            organization_id=start.organization_id,
            tool_call_id=tool_call_id(),
            tool_id=seeded.tools["lookup_order"],
            tool_name="lookup_order",
            kind="webhook",
            arguments={"order": "1234"},
            timeout_s=5,
            attempts=3,
        )
        outcome = await tools.webhook(task)
        assert outcome.ok and json.loads(outcome.content) == {"status": "shipped"}
        assert await tools.webhook(task) == outcome  # recorded: not sent again
        (request,) = receiver.received
        assert request.signed and request.headers["content-type"] == "application/json"
        expected_key = hashlib.sha256(f"{start.call_id}{task.tool_call_id}".encode()).hexdigest()
        assert request.key == idempotency_key(start.call_id, task.tool_call_id) == expected_key
        assert request.body == {
            "tool": "lookup_order",
            "arguments": {"order": "1234"},
            "call_id": start.call_id,
            "tool_call_id": task.tool_call_id,
        }
        assert SECRET not in json.dumps(request.body)

        # The organization takes 127.0.0.1 off its allowlist: refused, with a clear error.
        set_allowlist(db_settings, start.organization_id, [])
        refused = await tools.webhook(ToolTask(**{**task.__dict__, "tool_call_id": tool_call_id()}))
        assert not refused.ok and "outbound allowlist" in json.loads(refused.content)["error"]
        assert len(receiver.received) == 1


async def test_webhook_tools_get_a_signing_secret_shown_once(api: ApiHarness) -> None:
    client = api.acme.client
    name = f"lookup_{secrets.token_hex(3)}"
    created = await client.post(
        "/v1/tools",
        json={
            "name": name,
            "kind": "webhook",
            "url": "https://crm.example.com/hook",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
            "config": {"max_attempts": 2},
        },
    )
    assert created.status_code == 201, created.text
    secret = created.json()["signing_secret"]
    assert secret.startswith("bts_") and len(secret) > 30
    tool_id = created.json()["id"]
    shown = await client.get(f"/v1/tools/{tool_id}")
    assert secret not in shown.text and shown.json()["config"] == {"max_attempts": 2}
    assert secret not in (await client.get("/v1/tools", params={"limit": 100})).text
    # A config change keeps the secret (it still signs: see the rotation below).
    patched = await client.patch(f"/v1/tools/{tool_id}", json={"config": {"max_attempts": 1}})
    assert patched.status_code == 200 and secret not in patched.text
    engine = create_sync_engine(api.settings)
    with Session(engine) as session:
        row = session.exec(select(ToolDefinition).where(ToolDefinition.id == tool_id)).one()
        assert row.config == {"max_attempts": 1, "signing_secret": secret, "url": row.config["url"]}
    engine.dispose()
    rotated = await client.post(f"/v1/tools/{tool_id}/signing-secret")
    assert rotated.status_code == 200
    new_secret = rotated.json()["signing_secret"]
    assert new_secret != secret and new_secret.startswith("bts_")
    assert (await api.globex.client.post(f"/v1/tools/{tool_id}/signing-secret")).status_code == 404
    builtin = await client.post(
        "/v1/tools", json={"name": f"bye_{secrets.token_hex(3)}", "kind": "end_call"}
    )
    assert builtin.json()["signing_secret"] is None
    assert builtin.json()["parameters"]["properties"]["reason"]["type"] == "string"
    assert (
        await client.post(f"/v1/tools/{builtin.json()['id']}/signing-secret")
    ).status_code == 409
