"""Shared fixtures. DB tests run against SQLite and the real PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi import FastAPI

# A hung test dumps its threads and tasks and ends the run (see hang_watch.py).
from hang_watch import pytest_runtest_protocol  # noqa: F401
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from builder_engine.apikeys import create_org_api_key
from builder_engine.config import Settings
from builder_engine.db.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "BUILDER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # The Temporal SDK can abort the interpreter at exit (sdk-python #300) after every
    # test passed; leave without running the interpreter's finalizers instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def _postgres_url(database: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh database for this test run, dropped afterwards."""
    name = f"builder_test_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _postgres_url(name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    data_dir = tmp_path_factory.mktemp(f"data-{request.param}")
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_database")
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        temporal_address="127.0.0.1:1",  # nothing listens: readyz must say so
        rate_limit_per_minute=100_000,
        rate_limit_burst=10_000,
        _env_file=None,
    )
    upgrade(settings)
    return settings


@dataclass
class Tenant:
    name: str
    key: str
    client: httpx.AsyncClient


@dataclass
class ApiHarness:
    settings: Settings
    app: FastAPI
    acme: Tenant
    globex: Tenant
    anonymous: httpx.AsyncClient


@pytest.fixture(scope="session")
async def api(db_settings: Settings) -> AsyncIterator[ApiHarness]:
    app = create_app(db_settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        clients = []
        tenants = []
        for org in (f"acme-{secrets.token_hex(3)}", f"globex-{secrets.token_hex(3)}"):
            key = create_org_api_key(db_settings, org)
            client = httpx.AsyncClient(
                transport=transport,
                base_url="http://testserver",
                headers={"Authorization": f"Bearer {key}"},
            )
            clients.append(client)
            tenants.append(Tenant(org, key, client))
        anonymous = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        try:
            yield ApiHarness(db_settings, app, tenants[0], tenants[1], anonymous)
        finally:
            for client in [*clients, anonymous]:
                await client.aclose()


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def installed_binary(name: str) -> str:
    """A binary a pip package installed into this venv (temporal, temporal-test-server)."""
    import shutil

    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; run the README's test command")
    return found


@pytest.fixture
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server, with the platform's search attributes; one
    per test.

    The test server (sdk-java's) leaks a time-skipping lock whenever a child workflow
    completes after its parent has closed: the child's completion locks the clock until
    the parent records it, and a closed parent never does. Every call's PostCallWorkflow
    is such a child (abandoned, it outlives its CallWorkflow), so once a call has ended on
    a shared server its clock no longer skips: ``env.sleep`` and every timer pass in real
    time.
    """
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    from builder_engine.config import SEARCH_ATTRIBUTES
    from builder_engine.temporal_setup import INDEXED_VALUE_TYPES

    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=installed_binary("temporal-test-server")
    )
    try:
        # The test server lacks ListSearchAttributes, so register them blindly.
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    name: INDEXED_VALUE_TYPES[kind] for name, kind in SEARCH_ATTRIBUTES.items()
                },
            )
        )
        yield env
    finally:
        await env.shutdown()
