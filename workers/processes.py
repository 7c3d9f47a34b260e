"""Child processes of ``builder-engine up``: start, prefix their output, stop them.

Each child runs in its own session (``start_new_session=True``), so it is the leader of
its own process group: stopping it signals the whole group and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

_COLOURS = ("36", "35", "33", "32", "34", "31")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec (Linux): SIGTERM it if the supervisor dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _before_exec(nice: int) -> Callable[[], None]:
    def prepare() -> None:
        if sys.platform == "linux":
            _die_with_parent()
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)

    return prepare


class Output:
    """Writes lines prefixed with a padded process name, coloured on a terminal."""

    def __init__(self, width: int, stream: TextIO | None = None) -> None:
        self._width = width
        self._stream = stream or sys.stdout
        self._colour = self._stream.isatty() and "NO_COLOR" not in os.environ
        self._colours: dict[str, str] = {}

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self._width}} |"
        if self._colour:
            code = self._colours.setdefault(name, _COLOURS[len(self._colours) % len(_COLOURS)])
            prefix = f"\x1b[{code}m{prefix}\x1b[0m"
        # A closed terminal or pipe must not stop the supervisor from draining children.
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(f"{prefix} {text}\n")
            self._stream.flush()


class Child:
    """One supervised child process whose output is copied line by line, prefixed."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        output: Output,
        *,
        env: Mapping[str, str] | None = None,
        ready_line: str | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        self.argv = list(argv)
        self._output = output
        self._env = dict(env) if env is not None else None
        self._ready_line = ready_line.lower() if ready_line else None
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.on_exit: Callable[[Child], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
            preexec_fn=_before_exec(self.nice),
        )
        self._pump = asyncio.create_task(self._copy_output(), name=f"output of {self.name}")
        self._watcher = asyncio.create_task(self._watch(), name=f"exit of {self.name}")

    async def _copy_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw)
        if pending:
            self._emit(pending)

    async def _watch(self) -> None:
        assert self._proc is not None and self._pump is not None
        await self._proc.wait()
        # Print its last lines first (unless something it left behind holds the pipe).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit(self)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self._output.line(self.name, text)
        if self._ready_line and self._ready_line in text.lower():
            self.ready.set()

    async def wait(self) -> int:
        await self.exited.wait()
        assert self._proc is not None and self._proc.returncode is not None
        return self._proc.returncode

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        if self._proc is None:
            return
        pgid = self._proc.pid
        if self._proc.returncode is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace)
            except TimeoutError:
                self._output.line(self.name, f"did not stop within {grace:g} s: killing it")
                _signal_group(pgid, signal.SIGKILL)
        # Whatever the leader left in its group (it should be nothing) goes too.
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), grace)

    def kill(self) -> None:
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
