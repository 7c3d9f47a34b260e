"""Shared by the webhook and post-call tests: a customer's webhook receiver on 127.0.0.1
(records every request, fails the first ``fail_first`` with HTTP 500), the signature
recipe of docs/webhooks.md as a customer writes it, and the platform's worker and API
in process against a real Temporal dev server and database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from ports import free_port
from sqlmodel import Session, select
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.calls import CallActivities
from activities.post_call import PostCallActivities
from activities.webhooks import WebhookActivities
from api.app import create_app
from builder_engine.apikeys import create_org_api_key, hash_key
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, create_sync_engine
from builder_engine.db.models import Agent, AgentVersion, ApiKey, Call, Organization
from builder_engine.temporal_setup import ensure_search_attributes
from conftest import installed_binary
from workers.temporal_worker import build_worker
from workflows.events import DeliveryOutcome, WebhookRetry, delivery_workflow_id
from workflows.types import CallStart

AGENT_CONFIG: dict[str, Any] = {"name": "Front desk"}

# Short, so tests take seconds (the dev server's timers tick in whole seconds): attempts
# at 0, 1 and 3 s; the next would be at 5 s, past the 4 s window.
TEST_RETRY = WebhookRetry(initial_interval_s=1, backoff=2, maximum_interval_s=2, window_s=4)


@contextlib.asynccontextmanager
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"), dev_server_log_level="error"
    )
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        yield env
    finally:
        await env.shutdown()


# ------------------------------------------------------------------ receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass
class Receiver:
    fail_first: int = 0
    fail_status: int = 500
    always_fail: bool = False
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        failing = self.always_fail or len(self.requests) < self.fail_first
        status = self.fail_status if failing else 200
        self.requests.append(Received(headers, body, status))
        self.arrived.set()
        answer = b'{"error": "not now"}' if failing else b'{"ok": true}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    def accepted(self) -> list[Received]:
        return [r for r in self.requests if r.status == 200]

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while len(self.requests) < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"{len(self.requests)} of {count} webhook requests arrived")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)


@contextlib.asynccontextmanager
async def serving(receiver: Receiver, path: str = "/hooks/builder") -> AsyncIterator[Receiver]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        receiver.url = f"http://127.0.0.1:{port}{path}"
        yield receiver
    finally:
        server.should_exit = True
        await task


def verify(secret: str, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    """The verification recipe of docs/webhooks.md, as a customer would write it."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = int(parts["t"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


# ------------------------------------------------------------------ platform


@dataclass
class Platform:
    settings: Settings
    temporal: Client
    api: httpx.AsyncClient  # organization "acme", which allows 127.0.0.1
    organization_id: str
    other: httpx.AsyncClient  # another organization

    def add_call(self, config: dict[str, Any] | None = None) -> CallStart:
        return add_call(self.settings, self.organization_id, config or AGENT_CONFIG)

    async def start_call(self, start: CallStart, *, answered: bool = True) -> Any:
        handle = await self.temporal.start_workflow(
            "CallWorkflow", start, id=start.call_id, task_queue=self.settings.temporal_task_queue
        )
        if answered:
            await handle.signal("answered")
        return handle

    async def deliveries_of(self, call_id: str, count: int, within: float = 10.0) -> list[Any]:
        """The call's webhook deliveries, once ``count`` exist (from GET .../events)."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            events = (await self.api.get(f"/v1/calls/{call_id}/events")).json()["data"]
            found = [d for e in events for d in e["webhook_deliveries"]]
            if len(found) >= count:
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{len(found)} deliveries of {count} for {call_id}")
            await asyncio.sleep(0.05)

    async def outcome(self, call_id: str, delivery: dict[str, Any]) -> DeliveryOutcome:
        workflow_id = delivery_workflow_id(call_id, delivery["event_type"], delivery["id"])
        handle = self.temporal.get_workflow_handle(workflow_id, result_type=DeliveryOutcome)
        for _ in range(100):  # the row is written just before the workflow starts
            try:
                return await asyncio.wait_for(handle.result(), 30)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{workflow_id} never started")


def organization_of(settings: Settings, api_key: str) -> str:
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        key = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(api_key))).one()
        org_id = key.organization_id
    engine.dispose()
    return org_id


def allow_loopback(settings: Settings, organization_id: str) -> None:
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        org = session.get(Organization, organization_id)
        assert org is not None
        org.outbound_allowlist = ["127.0.0.1"]
        session.add(org)
        session.commit()
    engine.dispose()


def add_call(settings: Settings, organization_id: str, config: dict[str, Any]) -> CallStart:
    """An agent (one version with ``config``) and a ringing inbound call to it."""
    engine = create_sync_engine(settings)
    with Session(engine) as session:
        agent = Agent(organization_id=organization_id, name=config["name"], published_version=1)
        session.add(agent)
        session.flush()
        session.add(
            AgentVersion(
                organization_id=organization_id, agent_id=agent.id, version=1, config=config
            )
        )
        call = Call(
            organization_id=organization_id,
            agent_id=agent.id,
            agent_version=1,
            direction="inbound",
            status="ringing",
            from_number="+14155550100",
            to_number="+14155550111",
            started_at=datetime.now(UTC),
        )
        session.add(call)
        session.commit()
        start = CallStart(
            call_id=call.id,
            organization_id=organization_id,
            agent_id=agent.id,
            agent_version=1,
            direction="inbound",
            from_number=call.from_number,
            to_number=call.to_number,
        )
    engine.dispose()
    return start


@contextlib.asynccontextmanager
async def running_platform(
    env: WorkflowEnvironment,
    db_settings: Settings,
    *,
    post_call_settings: dict[str, Any] | None = None,
    retry: WebhookRetry = TEST_RETRY,
) -> AsyncIterator[Platform]:
    """Worker (CallWorkflow, PostCallWorkflow, deliveries) and API on ``db_settings``'s
    database; organization "acme" allows 127.0.0.1. ``post_call_settings``: settings for
    the post-call activities (None: no recordings storage, no LLM)."""
    settings = db_settings.model_copy(
        update={
            "temporal_address": env.client.service_client.config.target_host,
            "temporal_task_queue": f"events-{uuid.uuid4().hex[:6]}",
        }
    )
    keys = [create_org_api_key(settings, f"{n}-{secrets.token_hex(3)}") for n in ("acme", "globex")]
    org_id = organization_of(settings, keys[0])
    allow_loopback(settings, org_id)
    engine = create_async_db_engine(settings)
    calls = CallActivities(engine)
    webhooks = WebhookActivities(calls.sessions, retry=retry, public_url="https://x.test")
    post_call = PostCallActivities(
        calls.sessions,
        None if post_call_settings is None else settings.model_copy(update=post_call_settings),
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            build_worker(
                env.client,
                settings.temporal_task_queue,
                calls,
                post_call=post_call,
                webhooks=webhooks,
            ),
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport,
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {keys[0]}"},
            ) as api,
            httpx.AsyncClient(
                transport=transport,
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {keys[1]}"},
            ) as other,
        ):
            yield Platform(settings, env.client, api, org_id, other)
    finally:
        await webhooks.aclose()
        await post_call.aclose()
        await engine.dispose()


async def forget_endpoints(platform: Platform) -> None:
    """Delete the organization's endpoints, so later calls do not reach them."""
    for endpoint in (await platform.api.get("/v1/webhook-endpoints?limit=100")).json()["data"]:
        await platform.api.delete(f"/v1/webhook-endpoints/{endpoint['id']}")


async def create_endpoint(api: httpx.AsyncClient, url: str, events: list[str]) -> dict[str, Any]:
    response = await api.post("/v1/webhook-endpoints", json={"url": url, "events": events})
    assert response.status_code == 201, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint
