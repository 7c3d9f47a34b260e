"""A hung test fails the run in minutes, with the evidence, instead of CI's hour and a half.

When a test (its setup, call and teardown together, module fixtures included) runs longer
than ``HUNG_AFTER_S``, every thread's stack and every asyncio task's chain of awaits go to
the real stderr; when it is still running ``EXIT_AFTER_S`` later, the process exits with
status 3. ``BUILDER_TEST_HUNG_S`` and ``BUILDER_TEST_HUNG_EXIT_S`` change them.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from realtime.session import awaiting

HUNG_AFTER_S = float(os.environ.get("BUILDER_TEST_HUNG_S", "300"))
EXIT_AFTER_S = float(os.environ.get("BUILDER_TEST_HUNG_EXIT_S", "60"))


def _running_loops() -> list[asyncio.AbstractEventLoop]:
    # type(), not isinstance(): isinstance asks a proxy for its __class__, and some raise
    # (the Temporal workflow sandbox's, for one).
    # Only asyncio's own loops: a workflow instance is an AbstractEventLoop too.
    return [
        obj
        for obj in gc.get_objects()
        if issubclass(type(obj), asyncio.BaseEventLoop) and obj.is_running()
    ]


def _dump_tasks(loop: asyncio.AbstractEventLoop, done: threading.Event) -> None:
    try:
        tasks = asyncio.all_tasks(loop)
        print(f"--- {len(tasks)} asyncio tasks", file=sys.stderr)
        for task in sorted(tasks, key=lambda t: t.get_name()):
            print(f"{task.get_name()}:{awaiting(task)}", file=sys.stderr)
    finally:
        done.set()


def dump_state(what: str) -> None:
    print(f"\n=== watchdog: {what} still running after {HUNG_AFTER_S:.0f} s", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for loop in _running_loops():
        done = threading.Event()
        loop.call_soon_threadsafe(_dump_tasks, loop, done)
        if not done.wait(10):
            print("--- the event loop did not answer in 10 s (blocked?)", file=sys.stderr)
    sys.stderr.flush()


def _watch(what: str, finished: threading.Event, config: pytest.Config) -> None:
    if finished.wait(HUNG_AFTER_S):
        return
    # Past pytest's output capture (which os._exit would discard), to the real stderr.
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)
    try:
        dump_state(what)
    except Exception as exc:  # the exit below must happen whatever went wrong here
        print(f"--- watchdog: the dump failed: {exc!r}", file=sys.stderr)
    if finished.wait(EXIT_AFTER_S):
        return
    print(f"=== watchdog: {what} is hung; exiting", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
    finished = threading.Event()
    watcher = threading.Thread(
        target=_watch,
        args=(item.nodeid, finished, item.config),
        name="test-watchdog",
        daemon=True,
    )
    watcher.start()
    try:
        yield
    finally:
        finished.set()
