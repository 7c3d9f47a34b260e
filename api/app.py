"""The REST API application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.context import AppContext, TemporalProbe
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit
from api.ratelimit import InProcessRateLimiter, Rate, RateLimiter, RedisRateLimiter
from api.routers import (
    agents,
    api_keys,
    calendars,
    calls,
    health,
    organization,
    phone_numbers,
    tools,
    twilio_webhooks,
    webhooks,
)
from builder_engine import __version__
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, session_factory

DESCRIPTION = """
Builder Engine's REST API. Authenticate with an API key:
`Authorization: Bearer be_...` (create one with `builder-engine api-key create --org NAME`).
Errors are problem documents (`application/problem+json`) with `type`, `title`,
`status`, `detail` and, for invalid input, `errors` naming each field.
"""


def _rate_limiter(settings: Settings) -> RateLimiter:
    rate = Rate(per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst)
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, rate)
    return InProcessRateLimiter(rate)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_db_engine(settings)
        context = AppContext(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            limiter=_rate_limiter(settings),
            temporal=TemporalProbe(
                settings.effective_temporal_address, settings.temporal_namespace
            ),
        )
        app.state.context = context
        try:
            yield
        finally:
            await context.limiter.close()
            await engine.dispose()

    app = FastAPI(
        title="Builder Engine API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (health, agents, phone_numbers, tools, api_keys, calls, twilio_webhooks):
        app.include_router(module.router)
    app.include_router(calendars.router)
    app.include_router(webhooks.router)
    app.include_router(organization.router)
    return app
