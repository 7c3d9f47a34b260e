"""Per-organization rate limits (GCRA), kept in process or shared through Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Rate:
    per_minute: int
    burst: int

    @property
    def interval_s(self) -> float:
        return 60.0 / self.per_minute

    @property
    def tolerance_s(self) -> float:
        return self.interval_s * self.burst


class RateLimiter(Protocol):
    async def hit(self, key: str) -> Decision: ...

    async def close(self) -> None: ...


class InProcessRateLimiter:
    """GCRA over a dict of theoretical arrival times; one per API process."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tat: dict[str, float] = {}

    async def hit(self, key: str) -> Decision:
        now = self._clock()
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + self._rate.interval_s
        allow_at = new_tat - self._rate.tolerance_s
        if now < allow_at:
            return Decision(False, allow_at - now)
        self._tat[key] = new_tat
        if len(self._tat) > 10_000:
            self._forget_idle(now)
        return Decision(True)

    def _forget_idle(self, now: float) -> None:
        # A key whose arrival time is in the past is indistinguishable from a new key.
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]

    async def close(self) -> None:
        return None


# GCRA in one round trip; Redis' own clock keeps replicas consistent.
_GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, tostring(allow_at - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, '0'}
"""


class RedisRateLimiter:
    """The same GCRA shared by every API replica through Redis."""

    def __init__(self, url: str, rate: Rate, prefix: str = "builder:ratelimit:") -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._rate = rate
        self._prefix = prefix
        self._script = self._redis.register_script(_GCRA_SCRIPT)

    async def hit(self, key: str) -> Decision:
        allowed, retry_after = await self._script(
            keys=[self._prefix + key],
            args=[self._rate.interval_s, self._rate.tolerance_s],
        )
        return Decision(bool(int(allowed)), float(retry_after))

    async def close(self) -> None:
        await self._redis.aclose()
