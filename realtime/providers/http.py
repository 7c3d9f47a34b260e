"""The HTTP connection pools that streaming providers share across the calls of a process."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final

import httpx

#: A connection per concurrent stream, none refused: a pool serves many calls, and
#: httpx's defaults (100 connections, 20 kept alive) would queue the 101st concurrent
#: sentence behind the others, and reconnect (TCP and TLS, on the event loop) for each
#: sentence beyond the 20 that the pool keeps.
STREAMING_LIMITS: Final = httpx.Limits(max_connections=None, max_keepalive_connections=256)

#: Calls that share one connection pool. httpcore walks every connection of its pool when
#: a request starts and again when its response closes (polling each idle socket, and in
#: httpcore 1.0 comparing every idle connection with all the others): a streaming request
#: cost 0.6-0.8 ms of CPU with 1 connection pooled, ~1.6 ms with 25 and 7-9.5 ms with 100
#: (bench/http_pool.py), on the event loop of every call. Calls fill pools of this many
#: in turn, so a few calls share one warm pool as before, and a hundred use thirteen
#: small ones.
CALLS_PER_POOL: Final = 8


def streaming_http_client(
    timeout: httpx.Timeout | None = None, *, tls: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """``tls``: the process's TLS context (``shared_tls_context``); without it the client
    makes its own."""
    return httpx.AsyncClient(
        limits=STREAMING_LIMITS, timeout=timeout or httpx.Timeout(10.0), verify=tls or True
    )


def shared_tls_context() -> ssl.SSLContext:
    """One TLS context for every HTTP client of a process: a client that makes its own
    loads the CA certificates again - ~35 ms of CPU and ~1 MB - and a new connection
    pool is made while calls are live, on their event loop."""
    return httpx.create_ssl_context()


@dataclass
class PoolLease:
    """A call's place in one of the process's connection pools, until ``release``."""

    pool: int
    _pools: CallPools = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pools.release(self.pool)


class CallPools:
    """Which connection pool each call of a process uses: the first one with room for
    another call (``calls_per_pool``), so the pools stay small, and calls that come one
    after another keep using the first, warm one."""

    def __init__(self, calls_per_pool: int = CALLS_PER_POOL) -> None:
        if calls_per_pool < 1:
            raise ValueError("calls_per_pool must be at least 1")
        self.calls_per_pool = calls_per_pool
        self._calls: list[int] = []  # calls holding each pool

    @property
    def calls(self) -> list[int]:
        """Calls in each pool, by pool number."""
        return list(self._calls)

    def snapshot(self) -> dict[str, int]:
        """For the realtime server's /stats: pools made, and calls holding one (as many
        as the calls in progress, unless a call's end failed to give its place back)."""
        return {"http_pools": len(self._calls), "pooled_calls": sum(self._calls)}

    def lease(self) -> PoolLease:
        roomy = (i for i, calls in enumerate(self._calls) if calls < self.calls_per_pool)
        pool = next(roomy, len(self._calls))
        if pool == len(self._calls):
            self._calls.append(0)
        self._calls[pool] += 1
        return PoolLease(pool, self)

    def release(self, pool: int) -> None:
        self._calls[pool] -= 1
