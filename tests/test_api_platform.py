"""Health probes, rate limits, OpenAPI, and the schema as migrated."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import builder_engine.db.models  # noqa: F401
from api.app import create_app
from api.ratelimit import InProcessRateLimiter, Rate, RedisRateLimiter
from builder_engine.apikeys import create_org_api_key
from builder_engine.config import Settings
from builder_engine.db.engine import create_sync_engine
from conftest import ApiHarness


async def test_healthz_and_readyz_say_what_is_missing(api: ApiHarness) -> None:
    assert (await api.anonymous.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = await api.anonymous.get("/readyz")
    assert ready.status_code == 503  # the fixture points Temporal at a closed port
    assert ready.json()["checks"] == {"database": True, "temporal": False}


def test_migrations_match_the_models(db_settings: Settings) -> None:
    engine = create_sync_engine(db_settings)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_every_tenant_table_carries_the_organization(db_settings: Settings) -> None:
    tenant_free = {"organization", "alembic_version"}
    engine = create_sync_engine(db_settings)
    inspector = sa.inspect(engine)
    for table in inspector.get_table_names():
        if table in tenant_free:
            continue
        columns = {c["name"] for c in inspector.get_columns(table)}
        assert "organization_id" in columns, table
    engine.dispose()


async def test_gcra_allows_the_burst_then_limits() -> None:
    now = [1000.0]
    limiter = InProcessRateLimiter(Rate(per_minute=60, burst=3), clock=lambda: now[0])
    results = [(await limiter.hit("org")).allowed for _ in range(5)]
    assert results == [True, True, True, False, False]  # the burst, then the rate
    denied = await limiter.hit("org")
    assert 0 < denied.retry_after_s <= 1.0
    assert (await limiter.hit("other-org")).allowed
    now[0] += 1.0
    assert (await limiter.hit("org")).allowed


async def test_redis_limiter_is_shared_between_replicas() -> None:
    rate = Rate(per_minute=60, burst=2)
    key = f"org-{secrets.token_hex(4)}"
    first = RedisRateLimiter("redis://127.0.0.1:6379/0", rate)
    second = RedisRateLimiter("redis://127.0.0.1:6379/0", rate)
    try:
        decisions = [(await limiter.hit(key)).allowed for limiter in (first, second, first, second)]
        assert decisions == [True, True, False, False]
        assert (await second.hit(key)).retry_after_s > 0
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("redis_url", [None, "redis://127.0.0.1:6379/0"])
async def test_rate_limited_requests_get_429_with_retry_after(
    tmp_path: Any, redis_url: str | None
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        temporal_address="127.0.0.1:1",
        redis_url=redis_url,
        rate_limit_per_minute=60,
        rate_limit_burst=2,
        _env_file=None,
    )
    key = create_org_api_key(settings, f"busy-{secrets.token_hex(3)}")
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {key}"},
        ) as client,
    ):
        codes = [(await client.get("/v1/agents")).status_code for _ in range(5)]
        assert codes == [200, 200, 429, 429, 429]
        limited = await client.get("/v1/agents")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["type"].endswith("/rate-limited")


async def test_openapi_documents_every_operation(api: ApiHarness) -> None:
    assert (await api.anonymous.get("/docs")).status_code == 200
    spec = (await api.anonymous.get("/openapi.json")).json()
    assert "Problem" in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), (method, path)
            if path.startswith("/v1/"):
                for status in ("401", "422", "429"):
                    assert status in operation["responses"], (method, path, status)
            if "{" in path:
                assert "404" in operation["responses"], (method, path)
