"""Workflow Updates from a task that may be cancelled.

temporalio raises ``WorkflowUpdateRPCTimeoutOrCancelledError`` - an ordinary
``Exception`` - both when an update's long poll runs out and when the task awaiting it
is cancelled. A loop that asks again after a timed-out poll would then also swallow its
own cancellation and run on: a process's beat loop outlived its shutdown that way (and
with it the process), and an answer waiting on its tools outlived a barge-in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError

__all__ = ["cancellation_kept"]


@contextlib.contextmanager
def cancellation_kept() -> Iterator[None]:
    """Turn the SDK's "timed out or cancelled" back into the cancellation it was."""
    try:
        yield
    except WorkflowUpdateRPCTimeoutOrCancelledError as exc:
        if isinstance(exc.__cause__, asyncio.CancelledError):
            raise exc.__cause__ from None
        raise
