"""The HTTP client that streaming providers share across the calls of a process."""

from __future__ import annotations

from typing import Final

import httpx

#: A connection per concurrent stream, none refused: one client serves every call of a
#: process, and httpx's defaults (100 connections, 20 kept alive) would queue the 101st
#: call's sentence behind the others, and reconnect (TCP and TLS, on the event loop) for
#: each sentence beyond the 20 that the pool keeps.
STREAMING_LIMITS: Final = httpx.Limits(max_connections=None, max_keepalive_connections=256)


def streaming_http_client(timeout: httpx.Timeout | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=STREAMING_LIMITS, timeout=timeout or httpx.Timeout(10.0))
