"""What the API's request handlers share, built once per process in the app's lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.ratelimit import RateLimiter
from builder_engine.config import Settings


@dataclass
class TemporalProbe:
    """Connects to Temporal on first use; `readyz` asks it whether Temporal answers."""

    address: str
    namespace: str
    timeout_s: float = 2.0
    _client: Client | None = field(default=None, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.wait_for(
                    Client.connect(self.address, namespace=self.namespace), self.timeout_s
                )
            return self._client

    async def reachable(self) -> bool:
        try:
            client = await self.client()
            return await asyncio.wait_for(client.service_client.check_health(), self.timeout_s)
        except Exception:
            return False


@dataclass
class AppContext:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    limiter: RateLimiter
    temporal: TemporalProbe
