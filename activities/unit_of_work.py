"""Database work that ends the way it began, even when its activity is cancelled.

A local activity is cancelled when it outlives its timeout (or the worker stops). Cancelled
in the middle of a statement, SQLAlchemy's asyncio adapter throws the connection away
rather than return it to the pool, and the pool does not tell the tasks queued for a
connection that a slot came free: they wait out the whole pool timeout. Under a burst
(a hundred calls ending together) that turned a few slow writes into a storm - queued
writes timed out, their cancellations threw away more connections, and the worker
retried for minutes. So a unit of work runs in a task of its own that the cancellation
does not reach: it commits or rolls back, its connection goes back to the pool, and only
then does the activity report the cancellation. Only for writes that are idempotent in
one statement (an UPDATE, an INSERT ... ON CONFLICT DO NOTHING) or that handle the
conflict: a cancelled attempt may still be writing when the next attempt starts (a
second cancellation does not wait), and a read-then-insert would race it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

__all__ = ["finishes_when_cancelled"]

P = ParamSpec("P")
T = TypeVar("T")


def finishes_when_cancelled(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        async def unit() -> T:
            return await fn(*args, **kwargs)

        work = asyncio.ensure_future(unit())
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work})  # cancelled again here: the work still finishes
            raise

    return run
