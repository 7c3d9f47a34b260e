"""N concurrent emulated Twilio calls through a real realtime process.

    .venv/bin/python bench/realtime_calls.py --calls 100 [--turns 4] [--soak-s 600]
        [--call-s 30] [--token-interval-ms 10] [--line-noise-dbfs -60]

Runs the platform's processes the way ``builder-engine up`` does - the Temporal dev server
(with its tuning flags, GOMAXPROCS=1 on a small machine, at nice 10), the worker (nice 10)
and the realtime server (nice 0) - the Deepgram / OpenAI / ElevenLabs emulators at fixed
latencies (ASR final 100 ms after the end of speech is decided, LLM first token 200 ms
then a token every ``--token-interval-ms``, TTS first byte 150 ms) in a process of their
own, and N phones in this process (20 ms mu-law frames in real time, marks echoed).

Phases. Every phone connects (spread over 2 s) and hears the greeting. Once all are
connected, each starts talking after a random pause of up to 3 s: ``--turns`` questions,
each asked 0.4 s after the answer ended, then a long question whose answer it interrupts
1 s in (``--soak-s``: questions until the time is up, no interruption; with ``--call-s``
each phone hangs up after that long - at least ``--turns`` questions - and dials a new
call, so calls end and start all through the soak). Once every phone is
done, all hang up and the calls' wrap-up runs (their workflows end, post-call work). The
measurement window runs from the last phone connected to the last phone done: N calls in
conversation at once. Set-up and wrap-up are measured on their own.

What is measured, as the issue defines it, by the realtime process for every turn:
* overhead: voice-to-voice (the caller's last speech frame received -> the answer's first
  frame sent) minus the endpointing window and that turn's provider waits (ASR final, LLM
  first token and first sentence, TTS first byte): the ``platform_ms`` of each answer;
* barge-in: the caller's speech onset (VAD) -> `clear` sent;
* frame: CPU time per inbound frame (decode, VAD);
and by the phones:
* gap: the longest the caller heard nothing in the middle of an answer (the playout's
  lead ran out); the realtime process also reports it from its side (the far end's
  buffer ran dry inside a sentence, or between two);
* the phone-side view of overhead (last speech frame sent -> first answer frame
  received, minus the nominal 650 ms of window and providers).
Also: how often the realtime process's ``GET /readyz`` said it was busy in the window
(polled every 0.5 s; realtime/admission.py), how late the phones' and the emulators'
own event loops ran (a late harness looks like a slow platform), RSS per call of the
realtime process, CPU per process in the window, the wrap-up's cost per call, from the
call workflows' histories: workflow tasks that timed out and how long tasks took, and
from the worker's SDK metrics: workflow task and (local) activity latencies per type
(``BENCH_SHOW_TIMEOUTS=1`` lists each timed-out task; ``BENCH_WORKER_NICE`` runs the
worker at another priority; ``BENCH_DATABASE_URL`` puts the platform's database
elsewhere, e.g. PostgreSQL; ``BENCH_HARNESS_LOOP=asyncio`` runs the phones and emulators
on asyncio's own loop instead of uvloop). The last
line printed is ``calls=N overhead_p50_ms=.. overhead_p95_ms=..
bargein_p95_ms=.. frame_p99_ms=.. max_gap_ms=.. rss_per_call_mb=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.call_start import create_call
from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, session_factory
from builder_engine.db.migrate import upgrade
from builder_engine.db.models import Agent, AgentVersion, CallTurn, Organization
from builder_engine.temporal_setup import ensure_search_attributes
from emulators.deepgram import DeepgramEmulator
from emulators.elevenlabs import ElevenLabsEmulator
from emulators.openai import OpenAIEmulator, Reply
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone
from realtime.media.mulaw import pcm16_to_ulaw
from workers.supervisor import BACKGROUND_NICE, TEMPORAL_SERVER_TUNING, temporal_env

WINDOW_MS = 200.0
ASR_MS = 100.0
LLM_MS = 200.0
TTS_MS = 150.0
PROVIDERS_MS = WINDOW_MS + ASR_MS + LLM_MS + TTS_MS

QUESTION = "What are your opening hours?"
ANSWER = "We are open from nine to five."
LONG_QUESTION = "Tell me about your services."
LONG_ANSWER = (
    "We offer cleanings, fillings, crowns and whitening. Our hygienists see patients "
    "every weekday. We also have an orthodontist on Tuesdays and Thursdays."
)
BARGE_IN = "Sorry, one more thing."
#: Each phone waits up to this long after everyone is connected before its first question.
START_SPREAD_S = 3.0
#: The timer the harness's processes measure their own loop's lateness with.
LOOP_LAG_TICK_S = 0.005
HARNESS_FREEZE_EVERY_S = 5.0


class Phase:
    """A point every call passes (or gives up at): ``wait`` returns once all have."""

    def __init__(self, parties: int) -> None:
        self._left = parties
        self._done = asyncio.Event()
        self.at: float | None = None  # when the last one arrived (monotonic)

    def arrive(self) -> None:
        self._left -= 1
        if self._left <= 0 and not self._done.is_set():
            self.at = time.monotonic()
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()


@dataclass(frozen=True)
class Speech:
    question: npt.NDArray[np.int16]
    long_question: npt.NDArray[np.int16]
    barge_in: npt.NDArray[np.int16]


@dataclass
class CallResult:
    overheads_ms: list[float] = field(default_factory=list)
    bargein_ms: list[float] = field(default_factory=list)
    max_gap_ms: float = 0.0
    calls: int = 1  # calls this phone made (more than one with ``--call-s``)
    error: str | None = None


async def redial_until(
    phone: TwilioPhone,
    *,
    url: str,
    redial: Callable[[], Awaitable[str]],
    speech: Speech,
    turns: int,
    call_s: float,
    soak_until: float,
    line_noise: bytes | None,
    result: CallResult,
) -> list[float]:
    """Calls that end and start again until the soak is over: ``phone``'s call (already
    greeted) lasts ``call_s``, then each new one does. Returns the answers' gaps."""
    loop = asyncio.get_running_loop()
    await converse(phone, speech, turns, min(soak_until, loop.time() + call_s), result)
    await phone.hang_up()
    gaps = list(phone.underruns)
    while loop.time() < soak_until - call_s / 2:
        call_id = await redial()
        async with TwilioPhone(
            url, parameters={"call_id": call_id}, history=2000, line_noise=line_noise
        ) as again:
            await again.wait_for_media_after(0, within=30)
            await again.wait_until_quiet(0.4, within=30)
            await converse(again, speech, turns, min(soak_until, loop.time() + call_s), result)
            gaps.extend(again.underruns)
        result.calls += 1
    return gaps


async def converse(
    phone: TwilioPhone,
    speech: Speech,
    turns: int,
    soak_until: float | None,
    result: CallResult,
) -> None:
    """Questions and answers, then (unless soaking) an interrupted answer."""
    loop = asyncio.get_running_loop()
    done = 0
    while done < turns or (soak_until is not None and loop.time() < soak_until):
        done += 1
        utterance = phone.say(speech.question)
        await utterance.done.wait()
        assert utterance.ended_at is not None
        first = await phone.wait_for_media_after(utterance.ended_at, within=20)
        result.overheads_ms.append((first - utterance.ended_at) * 1000.0 - PROVIDERS_MS)
        await phone.wait_until_quiet(0.4, within=30)
    if soak_until is not None:
        return
    utterance = phone.say(speech.long_question)
    await utterance.done.wait()
    assert utterance.ended_at is not None
    await phone.wait_for_media_after(utterance.ended_at, within=20)
    await asyncio.sleep(1.0)
    interruption = phone.say(speech.barge_in)
    await interruption.done.wait()
    clears = [r.at for r in phone.received if r.event == "clear"]
    if clears and interruption.started_at is not None:
        result.bargein_ms.append((clears[-1] - interruption.started_at) * 1000.0)
    await phone.wait_until_quiet(0.4, within=30)


async def run_call(
    url: str,
    call_id: str,
    *,
    speech: Speech,
    turns: int,
    connect_delay: float,
    start_delay: float,
    connected: Phase,
    finished: Phase,
    soak_s: float,
    line_noise: bytes | None,
    call_s: float = 0.0,
    redial: Callable[[], Awaitable[str]] | None = None,
) -> CallResult:
    result = CallResult()
    phases = [connected, finished]
    await asyncio.sleep(connect_delay)
    try:
        async with TwilioPhone(
            url, parameters={"call_id": call_id}, history=2000, line_noise=line_noise
        ) as phone:
            await phone.wait_for_media_after(0, within=30)
            await phone.wait_until_quiet(0.4, within=30)
            phases.pop(0).arrive()
            await connected.wait()
            await asyncio.sleep(start_delay)
            loop = asyncio.get_running_loop()
            soak_until = loop.time() + soak_s if soak_s else None
            if soak_until is not None and call_s and redial is not None:
                gaps = await redial_until(
                    phone,
                    url=url,
                    redial=redial,
                    speech=speech,
                    turns=turns,
                    call_s=call_s,
                    soak_until=soak_until,
                    line_noise=line_noise,
                    result=result,
                )
            else:
                await converse(phone, speech, turns, soak_until, result)
                gaps = list(phone.underruns)
            result.max_gap_ms = 1000.0 * max(gaps, default=0.0)
            phases.pop(0).arrive()
            await finished.wait()  # everyone hangs up together: wrap-up is measured apart
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for phase in phases:
            phase.arrive()
    return result


def harness_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The phones and the emulators stand in for Twilio and the vendors, whose CPU is not
    on this machine in production: they run on uvloop, the cheapest loop there is, so
    that they take as little as they can from the processes under test."""
    if os.environ.get("BENCH_HARNESS_LOOP", "uvloop") == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_process(
    argv: list[str], environ: dict[str, str], *, nice: int = 0
) -> subprocess.Popen[bytes]:
    """Start a platform process (a fork/exec; nothing here waits on it)."""
    return subprocess.Popen(argv, env=environ, preexec_fn=(lambda: os.nice(nice)) if nice else None)


def cpu_seconds(pid: int, *, thread: int | None = None) -> float:
    """User + system CPU time a process (or one of its threads) has used."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def temporal_server_pid() -> int | None:
    """The Temporal dev server this process started (a child named ``temporal``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            name, rest = stat.read_text().split(") ", 1)
            if name.endswith("(temporal") and int(rest.split()[1]) == os.getpid():
                return int(stat.parent.name)
    return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


class CpuMeter:
    """CPU time of several processes (and this one) between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int], *, loop_of: str | None = None) -> None:
        """``loop_of``: also the main thread of that process (``{name} loop``): the event
        loop's thread, which every call of the realtime process shares."""
        self.pids = pids
        self._loop_of = loop_of
        self._before: dict[str, float] = {}
        self._at = 0.0
        self.cores: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {"phones": time.process_time()} | {n: cpu_seconds(p) for n, p in self.pids.items()}
        if self._loop_of is not None:
            pid = self.pids[self._loop_of]
            now[f"{self._loop_of} loop"] = cpu_seconds(pid, thread=pid)
        return now

    def start(self) -> None:
        self._before, self._at = self._now(), time.monotonic()

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._at
        now = self._now()
        self.cores = {name: (now[name] - self._before[name]) / elapsed for name in now}
        return self.cores

    def seconds(self) -> dict[str, float]:
        """CPU seconds since ``start``."""
        now = self._now()
        return {name: now[name] - self._before[name] for name in now}


async def wait_http(url: str, within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def wait_wrapped_up(client: Client, within: float) -> None:
    """Until no call or post-call workflow is running any more."""
    query = 'WorkflowType IN ("CallWorkflow", "PostCallWorkflow") AND ExecutionStatus="Running"'
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (await client.count_workflows(query)).count == 0:
            return
        await asyncio.sleep(0.5)
    running = [w async for w in client.list_workflows(query)]
    if running:  # what the first one is waiting for
        from temporalio.api.enums.v1 import EventType

        stuck = client.get_workflow_handle(running[0].id)
        history = await stuck.fetch_history()
        print(f"{running[0].workflow_type} {running[0].id}, its last events:")
        for event in history.events[-12:]:
            print("   ", event.event_id, EventType.Name(event.event_type))
        pending = (await stuck.describe()).raw_description.pending_activities
        for activity in pending:
            name, attempt = activity.activity_type.name, activity.attempt
            print(f"    pending: {name} attempt {attempt}: {activity.last_failure.message}")
    names = [f"{w.workflow_type} {w.id}" for w in running]
    raise TimeoutError(f"{len(running)} calls still wrapping up: {names[:5]}")


async def workflow_task_timeouts(client: Client) -> tuple[int, int, int, list[float]]:
    """(call workflow runs, workflow tasks that ran out of time on a worker, tasks that
    waited too long for their sticky worker, how long completed tasks ran - started to
    completed, s, sorted). A call's workflow tasks may run for
    ``CALL_TASK_TIMEOUT`` (workflows/call.py): a starved worker shows in the first count.
    The second is stickiness at work: a task that waited 2 s for the worker holding the
    workflow goes to any worker. ``BENCH_SHOW_TIMEOUTS=1`` prints each one."""
    from temporalio.api.enums.v1 import EventType, TimeoutType

    timed_out = EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT
    runs = [w async for w in client.list_workflows('WorkflowType = "CallWorkflow"')]
    ran_out = waited = 0
    durations: list[float] = []  # started -> completed, s
    for run in runs:
        history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        events = list(history.events)
        started_at = {
            e.event_id: e.event_time.ToMilliseconds()
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
        }
        durations += [
            (e.event_time.ToMilliseconds() - started_at[a.started_event_id]) / 1000
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
            and (a := e.workflow_task_completed_event_attributes).started_event_id in started_at
        ]
        for i, event in enumerate(events):
            if event.event_type != timed_out:
                continue
            kind = event.workflow_task_timed_out_event_attributes.timeout_type
            if kind == TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE:
                ran_out += 1
            else:
                waited += 1
            if os.environ.get("BENCH_SHOW_TIMEOUTS"):
                before = [EventType.Name(e.event_type)[11:] for e in events[max(0, i - 4) : i]]
                print(f"  {run.id} event {event.event_id} {TimeoutType.Name(kind)} after {before}")
    return len(runs), ran_out, waited, sorted(durations)


#: The worker's SDK histograms worth reading after a run, and the label they split by.
WORKER_HISTOGRAMS = {
    "temporal_workflow_task_schedule_to_start_latency": "workflow_type",
    "temporal_workflow_task_execution_latency": "workflow_type",
    "temporal_local_activity_execution_latency": "activity_type",
    "temporal_activity_schedule_to_start_latency": "activity_type",
    "temporal_activity_execution_latency": "activity_type",
}


def worker_latencies(metrics: str) -> list[str]:
    """The worker's latency histograms (Prometheus text from its SDK) as one line of
    count, p50, p95 and p99 per workflow or activity type; a quantile is the upper bound
    of the bucket it falls in (ms)."""
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for line in metrics.splitlines():
        name, _, rest = line.partition("_bucket{")
        if not rest or name not in WORKER_HISTOGRAMS:
            continue
        labels_text, _, value = rest.rpartition("} ")
        labels = dict(
            (k, v.strip('"')) for k, _, v in (p.partition("=") for p in labels_text.split(","))
        )
        bound = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        key = (name, labels.get(WORKER_HISTOGRAMS[name], "?"))
        counts = buckets.setdefault(key, {})
        counts[bound] = counts.get(bound, 0.0) + float(value)
    lines = []
    for (name, kind), counts in sorted(buckets.items()):
        cumulative = sorted(counts.items())  # (upper bound, observations at or below it)
        total = cumulative[-1][1]
        if not total:
            continue
        p50, p95, p99 = (
            next(bound for bound, seen in cumulative if seen >= q * total)
            for q in (0.5, 0.95, 0.99)
        )
        short = name.removeprefix("temporal_").removesuffix("_latency")
        lines.append(
            f"worker {short} {kind}: n={total:.0f} p50<={p50:g} p95<={p95:g} p99<={p99:g} ms"
        )
    return lines


async def agent_turns(settings: Settings) -> list[CallTurn]:
    from sqlmodel import select

    engine = create_async_db_engine(settings)
    async with session_factory(engine)() as session:
        turns = (await session.exec(select(CallTurn).where(CallTurn.speaker == "agent"))).all()
    await engine.dispose()
    return list(turns)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def emulator_script(turns: int, soak: bool) -> list[str] | Callable[[int, int], str]:
    if soak:
        return lambda _connection, _utterance: QUESTION
    return [QUESTION] * turns + [LONG_QUESTION, BARGE_IN]


async def serve_emulators(turns: int, token_interval_ms: float, soak: bool) -> None:
    """The three provider emulators (``--serve-emulators``): their addresses as one JSON
    line on stdout, then serve until stdin closes (the benchmark ended)."""
    async with (
        DeepgramEmulator(script=emulator_script(turns, soak), final_latency_ms=ASR_MS) as dg,
        OpenAIEmulator(
            [
                Reply(when_last_user_contains="hours", text=ANSWER),
                Reply(when_last_user_contains="services", text=LONG_ANSWER),
                Reply(text="Of course."),
            ],
            first_token_latency_ms=LLM_MS,
            token_interval_ms=token_interval_ms,
        ) as oa,
        ElevenLabsEmulator(first_byte_latency_ms=TTS_MS) as el,
    ):
        addresses = {
            "OPENAI_API_KEY": oa.api_key or "x",
            "OPENAI_BASE_URL": oa.base_url,
            "DEEPGRAM_API_KEY": dg.api_key,
            "DEEPGRAM_BASE_URL": dg.url,
            "ELEVENLABS_API_KEY": el.api_key,
            "ELEVENLABS_BASE_URL": el.url,
        }
        freezing = asyncio.create_task(keep_collector_passes_short())
        print(json.dumps(addresses), flush=True)
        lag = LoopLag()
        loop = asyncio.get_running_loop()
        while command := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if command == "window-start":
                lag.start()
            elif command == "window-end":
                lag.stop()
                print(lag.summary(), flush=True)
        freezing.cancel()


class LoopLag:
    """How late this process's event loop runs a 5 ms timer. The harness must not be what
    is slow: a phone that reads late hears a gap the platform did not make, and an emulator
    that writes late is a provider slower than its fixed latency."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> str:
        late = [1000.0 * s for s in self.samples]
        return f"p99 {percentile(late, 99):.1f} ms, max {max(late, default=0.0):.1f} ms"

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_LAG_TICK_S
            await asyncio.sleep(LOOP_LAG_TICK_S)
            self.samples.append(loop.time() - due)


async def keep_collector_passes_short() -> None:
    """Keep the objects this harness process holds out of the cyclic collector's sight.
    A full pass walks every object: in the emulators' process, one (~185 ms, all that the
    imports made) stalled the three emulated providers at once in the middle of a 100-call
    run, which the realtime process then showed as gaps of 50-70 ms in answers - a hold-up
    of the harness, not of the platform. The harness also keeps what it records (every
    frame a phone heard, every request an emulator served) to the end, so over a soak its
    passes would grow with it: what has piled up is frozen again every few seconds (the
    few garbage cycles frozen with it are a harness's to keep)."""
    gc.collect()
    while True:
        gc.freeze()
        await asyncio.sleep(HARNESS_FREEZE_EVERY_S)


def start_emulators(
    turns: int, token_interval_ms: float, soak: bool
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    argv = [sys.executable, __file__, "--serve-emulators", "--turns", str(turns)]
    argv += ["--token-interval-ms", str(token_interval_ms)]
    if soak:
        argv += ["--soak-s", "1"]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("the emulator process did not start")
    addresses: dict[str, str] = json.loads(line)
    return process, addresses


def tell_emulators(emulators: subprocess.Popen[str], command: str) -> None:
    assert emulators.stdin is not None
    emulators.stdin.write(command + "\n")
    emulators.stdin.flush()


def line_noise(dbfs: float | None) -> bytes | None:
    """Ten seconds of white noise at ``dbfs`` (RMS), mu-law: a line that is never silent."""
    if dbfs is None:
        return None
    rng = np.random.default_rng(7)
    level = 32768.0 * 10.0 ** (dbfs / 20.0)
    noise = np.clip(rng.standard_normal(80_000) * level, -32768, 32767).astype(np.int16)
    return pcm16_to_ulaw(noise)


async def start_temporal() -> WorkflowEnvironment:
    """The dev server as ``builder-engine up`` runs it (flags, environment, priority)."""
    saved = {name: os.environ.get(name) for name in temporal_env()}
    os.environ.update(temporal_env())
    try:
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
            dev_server_log_level="error",
            dev_server_extra_args=list(TEMPORAL_SERVER_TUNING),
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    pid = temporal_server_pid()
    if pid is not None:
        os.setpriority(os.PRIO_PROCESS, pid, BACKGROUND_NICE)
    return env


async def create_calls(settings: Settings, client: Client, calls: int) -> list[str]:
    engine = create_async_db_engine(settings)
    sessions = session_factory(engine)
    config = AgentConfig(
        name="bench",
        first_message="Hello, how can I help?",
        turn={"endpointing_ms": WINDOW_MS, "interrupt_min_ms": 150, "interrupt_min_words": 0},
        silence_timeout_s=120,
    )
    call_ids: list[str] = []
    async with sessions() as session:
        org = Organization(name=f"bench-{secrets.token_hex(3)}")
        session.add(org)
        await session.flush()
        agent = Agent(organization_id=org.id, name="bench", published_version=1)
        session.add(agent)
        await session.flush()
        session.add(
            AgentVersion(
                organization_id=org.id,
                agent_id=agent.id,
                version=1,
                config=config.model_dump(mode="json"),
            )
        )
        await session.commit()
        for _ in range(calls):
            call = await create_call(
                session,
                client,
                "bench",
                agent=agent,
                version=1,
                direction="inbound",
                transport="twilio",
            )
            call_ids.append(call.id)
    await engine.dispose()
    return call_ids


def report(
    calls: int,
    results: list[CallResult],
    turns: list[CallTurn],
    stats: dict[str, float],
    cpu: dict[str, float],
    rss: tuple[float, float, list[tuple[float, float]]],
    window_s: float,
    wrap_up: tuple[float, dict[str, float]],
    soak_s: float,
) -> str:
    errors = [r.error for r in results if r.error]
    answers = [t.latency for t in turns if "platform_ms" in t.latency]
    platform = [a["platform_ms"] for a in answers]
    phone = [o for r in results for o in r.overheads_ms]
    first_sentence = [
        a["first_sentence_ms"] - a["llm_first_token_ms"]
        for a in answers
        if "first_sentence_ms" in a and "llm_first_token_ms" in a
    ]
    bargein_phone = [b for r in results for b in r.bargein_ms]
    names = sorted({name for a in answers for name in a})
    medians = {n: round(statistics.median(a[n] for a in answers if n in a), 1) for n in names}
    baseline, peak, samples = rss
    made = sum(r.calls for r in results)
    print(
        f"calls: {calls} in conversation for {window_s:.1f} s ({made} calls made), "
        f"errors: {len(errors)}"
    )
    for error in errors[:5]:
        print("  error:", error)
    print(
        f"overhead (server, per answer) ms: n={len(platform)} p50={percentile(platform, 50):.1f} "
        f"p95={percentile(platform, 95):.1f} max={max(platform, default=0):.1f}"
    )
    print(
        f"overhead (phone side, minus the nominal {PROVIDERS_MS:.0f} ms) ms: n={len(phone)} "
        f"p50={percentile(phone, 50):.1f} p95={percentile(phone, 95):.1f}; the LLM streamed "
        f"the first sentence in p50={percentile(first_sentence, 50):.1f} ms"
    )
    print("server-side medians, ms after the caller's speech ended:", medians)
    print(
        f"barge-in ms: server (onset -> clear sent) p50={stats.get('bargein_p50_ms', 0):.1f} "
        f"p95={stats.get('bargein_p95_ms', 0):.1f} max={stats.get('bargein_max_ms', 0):.1f}; "
        f"phone (first frame -> clear received) p50={percentile(bargein_phone, 50):.1f} "
        f"p95={percentile(bargein_phone, 95):.1f}"
    )
    gaps = [r.max_gap_ms for r in results]
    print(
        f"gaps in answers at the phones: calls with one {sum(g > 0 for g in gaps)}, "
        f"longest {max(gaps, default=0):.1f} ms; frames sent late by the realtime process "
        f"(beyond their duration): {stats.get('outbound_late_over_40ms', 0)} over 40 ms, "
        f"the latest {stats.get('max_outbound_late_ms', 0):.1f} ms; the far end ran dry "
        f"(realtime process's view) for up to "
        f"{stats.get('max_outbound_gap_in_segment_ms', 0):.1f} ms inside a sentence, "
        f"{stats.get('max_outbound_gap_between_segments_ms', 0):.1f} ms between sentences"
    )
    print(f"realtime process /stats: {stats}")
    realtime_ms = 1000.0 * cpu["realtime"] / calls
    loop_ms = 1000.0 * cpu.get("realtime loop", 0.0) / calls
    print(
        "cpu in the window (cores): "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in cpu.items())
        + f" (this machine: {os.cpu_count()}); realtime {realtime_ms:.1f} ms per call-second"
        + f", its event loop's thread {loop_ms:.1f}"
    )
    wrap_s, wrap_cpu = wrap_up
    print(
        f"wrap-up (calls end, post-call work): {wrap_s:.1f} s; per call "
        + ", ".join(f"{name} {1000.0 * sec / calls:.0f} ms" for name, sec in wrap_cpu.items())
        + " of CPU"
    )
    print(f"rss: baseline {baseline:.1f} MB, peak {peak:.1f} MB")
    if soak_s:
        second_half = [(t, r) for t, r in samples if t > window_s / 2]
        slope = float("nan")
        if len(second_half) > 2:
            times = np.array([t for t, _ in second_half])
            values = np.array([r for _, r in second_half])
            slope = float(np.polyfit(times, values, 1)[0]) * 60.0
        print(
            f"soak: {soak_s:.0f} s, rss over the second half grows {slope:.2f} MB/min "
            f"({second_half[0][1]:.1f} -> {second_half[-1][1]:.1f} MB)"
        )
    bargein = stats.get("bargein_p95_ms", float("nan"))
    return (
        f"calls={calls} overhead_p50_ms={percentile(platform, 50):.1f} "
        f"overhead_p95_ms={percentile(platform, 95):.1f} "
        f"bargein_p95_ms={bargein:.1f} "
        f"frame_p99_ms={stats.get('frame_p99_ms', float('nan')):.3f} "
        f"max_gap_ms={max(gaps, default=0.0):.1f} "
        f"rss_per_call_mb={(peak - baseline) / max(calls, 1):.2f}"
    )


async def main(
    calls: int,
    turns: int,
    token_interval_ms: float,
    soak_s: float,
    noise_dbfs: float | None,
    call_s: float = 0.0,
) -> None:
    env = await start_temporal()
    processes: list[subprocess.Popen[bytes]] = []
    emulators, providers = start_emulators(turns, token_interval_ms, bool(soak_s))
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        data = Path(tempfile.mkdtemp(prefix="bench-realtime-"))
        port = free_port()
        database_url = os.environ.get("BENCH_DATABASE_URL")  # default: SQLite in ``data``
        settings = Settings(
            data_dir=data,
            database_url=database_url,
            temporal_address=env.client.service_client.config.target_host,
            temporal_task_queue="bench",
            realtime_port=port,
            _env_file=None,
        )
        upgrade(settings)
        environ = {
            **os.environ,
            **({"BUILDER_DATABASE_URL": database_url} if database_url else {}),
            "BUILDER_DATA_DIR": str(data),
            "BUILDER_TEMPORAL_ADDRESS": settings.effective_temporal_address,
            "BUILDER_TEMPORAL_TASK_QUEUE": "bench",
            "BUILDER_REALTIME_PORT": str(port),
            "BUILDER_LOG_LEVEL": "warning",
            **providers,
        }
        cli = [sys.executable, "-m", "workers.cli"]
        metrics_port = free_port()
        worker = start_process(
            [*cli, "worker"],
            {**environ, "BUILDER_WORKER_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"},
            nice=int(os.environ.get("BENCH_WORKER_NICE", BACKGROUND_NICE)),
        )
        realtime = start_process([*cli, "serve", "realtime"], environ)
        processes += [worker, realtime]
        await wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        call_ids = await create_calls(settings, env.client, calls)

        speech = Speech(
            caller_speech(QUESTION, 1.4),
            caller_speech(LONG_QUESTION, 1.4),
            caller_speech(BARGE_IN, 1.2),
        )
        noise = line_noise(noise_dbfs)
        baseline_rss = rss_mb(realtime.pid)
        meter = CpuMeter(
            {
                "realtime": realtime.pid,
                "emulators": emulators.pid,
                "worker": worker.pid,
                "temporal": temporal_server_pid() or os.getpid(),
            },
            loop_of="realtime",
        )
        connected, finished = Phase(calls), Phase(calls)
        url = f"ws://127.0.0.1:{port}/media/twilio"

        async def redial() -> str:
            [call_id] = await create_calls(settings, env.client, 1)
            return call_id

        spread = random.Random(1)
        freezing = asyncio.create_task(keep_collector_passes_short())
        tasks = [
            asyncio.create_task(
                run_call(
                    url,
                    call_id,
                    speech=speech,
                    turns=turns,
                    connect_delay=2.0 * i / calls,
                    start_delay=spread.uniform(0.0, START_SPREAD_S),
                    connected=connected,
                    finished=finished,
                    soak_s=soak_s,
                    line_noise=noise,
                    call_s=call_s,
                    redial=redial,
                )
            )
            for i, call_id in enumerate(call_ids)
        ]
        await connected.wait()
        meter.start()
        phones_lag = LoopLag()
        phones_lag.start()
        tell_emulators(emulators, "window-start")
        peak_rss = baseline_rss
        samples: list[tuple[float, float]] = []
        readiness: list[tuple[bool, float]] = []  # (busy, smoothed loop lag ms) per poll
        async with httpx.AsyncClient() as client:
            while finished.at is None:
                rss = rss_mb(realtime.pid)
                peak_rss = max(peak_rss, rss)
                assert connected.at is not None
                samples.append((time.monotonic() - connected.at, rss))
                ready = await client.get(f"http://127.0.0.1:{port}/readyz")
                readiness.append((ready.status_code == 503, ready.json()["recent_loop_lag_ms"]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), 0.5)
        cpu = meter.stop()
        phones_lag.stop()
        tell_emulators(emulators, "window-end")
        assert emulators.stdout is not None
        emulators_lag = (await asyncio.to_thread(emulators.stdout.readline)).strip()
        print(
            f"the harness's own event loops, late in the window: phones {phones_lag.summary()}, "
            f"emulators {emulators_lag}"
        )
        lags = [lag for _, lag in readiness]
        print(
            f"readiness: GET /readyz said busy in {sum(b for b, _ in readiness)} of "
            f"{len(readiness)} polls; smoothed loop lag p50={percentile(lags, 50):.1f} "
            f"max={max(lags, default=0):.1f} ms"
        )
        assert connected.at is not None and finished.at is not None
        window_s = finished.at - connected.at
        async with httpx.AsyncClient() as client:
            stats = (await client.get(f"http://127.0.0.1:{port}/stats")).json()
        meter.start()
        wrap_started = time.monotonic()
        results = await asyncio.gather(*tasks)
        freezing.cancel()
        await wait_wrapped_up(env.client, float(os.environ.get("BENCH_WRAP_UP_S", "300")))
        wrap_up = (time.monotonic() - wrap_started, meter.seconds())
        async with httpx.AsyncClient() as client:  # the outbound figures come at each call's end
            ended = (await client.get(f"http://127.0.0.1:{port}/stats")).json()
        stats |= {k: v for k, v in ended.items() if k.startswith("max_outbound") or "late" in k}
        turns_done = await agent_turns(settings)
        runs, ran_out, waited, durations = await workflow_task_timeouts(env.client)
        print(
            f"call workflow runs: {runs}; workflow tasks timed out on a worker: {ran_out},"
            f" waited out their sticky worker: {waited}; completed tasks: {len(durations)},"
            f" p99 {percentile(durations, 99):.2f} s, longest {max(durations, default=0):.2f} s,"
            f" over 4 s: {sum(1 for d in durations if d > 4)}"
        )
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        for line in worker_latencies(metrics):
            print(line)
        print(
            report(
                calls,
                results,
                turns_done,
                stats,
                cpu,
                (baseline_rss, peak_rss, samples),
                window_s,
                wrap_up,
                soak_s,
            ),
            flush=True,
        )
    finally:
        assert emulators.stdin is not None
        emulators.stdin.close()  # its cue to stop; terminated below if it has not
        with contextlib.suppress(subprocess.TimeoutExpired):
            emulators.wait(10)
        stop_processes([emulators, *processes])
        await env.shutdown()


def stop_processes(processes: list[subprocess.Popen[Any]], timeout_s: float = 10.0) -> None:
    """Terminate every process still running, then kill whichever has not exited within
    ``timeout_s``: a bench that ends, however it ends, leaves nothing running."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=10.0,
        help="time between the emulated LLM's tokens (the first sentence waits for them)",
    )
    parser.add_argument("--serve-emulators", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--soak-s",
        type=float,
        default=0.0,
        help="keep every call asking questions for this long (memory soak); no barge-in",
    )
    parser.add_argument(
        "--call-s",
        type=float,
        default=0.0,
        help="with --soak-s: each call lasts this long, then the phone dials a new one",
    )
    parser.add_argument(
        "--line-noise-dbfs",
        type=float,
        default=None,
        help="the phones send white noise at this level (RMS dBFS) instead of digital "
        "silence when the caller is not talking: a line that is never quiet",
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=harness_loop()) as runner:
        if args.serve_emulators:
            runner.run(serve_emulators(args.turns, args.token_interval_ms, bool(args.soak_s)))
            sys.exit(0)
        runner.run(
            main(
                args.calls,
                args.turns,
                args.token_interval_ms,
                args.soak_s,
                args.line_noise_dbfs,
                args.call_s,
            )
        )
    sys.stdout.flush()
    os._exit(0)  # the Temporal SDK can crash at interpreter exit (sdk-python #300)
