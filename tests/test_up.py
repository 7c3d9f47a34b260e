"""``builder-engine up`` end to end: the whole stack as real processes, twice on one folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
SECRET_ENV = ("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "ELEVENLABS_API_KEY")
SUMMARY_END = "Press Ctrl+C to stop."  # the summary's last line

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BUILDER_") and key not in SECRET_ENV
    }


def niceness(pid: int) -> int:
    """The nice value of a running process (field 19 of /proc/<pid>/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_mentioning(text: str) -> set[int]:
    """Pids whose command line or environment contains ``text`` (our own processes)."""
    found: set[int] = set()
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle in (entry / part).read_bytes():
                    found.add(int(entry.name))
                    break
            except OSError:
                continue
    return {pid for pid in found if alive(pid)}


class Up:
    """A running ``builder-engine up`` whose output is collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "up", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if SUMMARY_END in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, within: float = 90) -> None:
        deadline = time.monotonic() + within
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"`up` did not get ready (exit {self.proc.poll()}):\n{self.output}")

    def child_pids(self) -> dict[str, int]:
        started = (re.search(r"started (\w+) \(pid (\d+)\)", line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in started if m}

    def interrupt(self, within: float = 30) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"`up` did not stop within {within} s:\n{self.output}")
        self.reader.join(5)
        return code


def test_up_runs_the_stack_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = (tmp_path / "data").resolve()
    api_port, realtime_port, temporal_port, ui_port = free_ports(4)
    args = [
        "--data-dir", str(data_dir),
        "--api-port", str(api_port),
        "--realtime-port", str(realtime_port),
        "--temporal-port", str(temporal_port),
        "--temporal-ui-port", str(ui_port),
    ]  # fmt: skip
    env = clean_env()
    api = f"http://127.0.0.1:{api_port}"
    http = httpx.Client(timeout=10, trust_env=False)
    started = time.monotonic()

    first = Up(args, env)
    try:
        first.wait_ready()
        assert "Builder Engine is up" in first.output
        assert f"API          {api}" in first.output
        assert f"Temporal UI  http://127.0.0.1:{ui_port}" in first.output
        assert f"Data folder  {data_dir}" in first.output
        health = http.get(f"{api}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert http.get(f"{api}/readyz").status_code == 200
        assert http.get(f"{api}/docs").status_code == 200
        assert http.get(f"http://127.0.0.1:{realtime_port}/healthz").status_code == 200
        assert http.get(f"http://127.0.0.1:{ui_port}/").status_code == 200
        children = first.child_pids()
        assert {"temporal", "api", "realtime", "worker"} <= set(children)
        running = processes_mentioning(str(data_dir))
        assert {children[name] for name in ("temporal", "api", "realtime", "worker")} <= running
        # The realtime process gets the CPU first; Temporal and the worker can wait.
        priorities = {name: niceness(pid) for name, pid in children.items() if name != "migrate"}
        assert priorities == {"temporal": 10, "worker": 10, "api": 0, "realtime": 0}
    finally:
        code = first.interrupt()
    assert code == 0, first.output
    survivors = {pid for pid in first.child_pids().values() if alive(pid)}
    survivors |= processes_mentioning(str(data_dir))
    assert not survivors, f"processes left behind: {survivors}\n{first.output}"
    assert (data_dir / "temporal.db").exists()

    created = subprocess.run(
        [sys.executable, "-m", "workers.cli", "api-key", "create", "--org", "persisted"],
        cwd=REPO,
        env={**env, "BUILDER_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    key = created.stdout.strip().splitlines()[-1]

    second = Up(args, env)
    try:
        second.wait_ready()
        assert http.get(f"{api}/v1/agents").status_code == 401
        authed = http.get(f"{api}/v1/agents", headers={"Authorization": f"Bearer {key}"})
        assert authed.status_code == 200, authed.text
    finally:
        code = second.interrupt()
    assert code == 0, second.output
    assert not processes_mentioning(str(data_dir))
    http.close()
    assert time.monotonic() - started < 120
