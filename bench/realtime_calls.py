"""N concurrent emulated Twilio calls through a real realtime process.

    .venv/bin/python bench/realtime_calls.py --calls 100

Starts a Temporal dev server, a Temporal worker and the realtime server as separate
processes, the Deepgram / OpenAI / ElevenLabs emulators at fixed latencies (ASR final
100 ms after the end of speech is decided, LLM first token 200 ms, TTS first byte
150 ms) in a process of their own, and N phones in this process. Each phone waits
for the greeting, asks ``--turns`` questions in real time (20 ms mu-law frames, marks echoed), then
interrupts a long answer. Measured on the phone side:

* overhead: caller's last speech frame -> first frame of the answer, minus the
  endpointing window (200 ms) and the three provider latencies;
* barge-in: caller speech onset -> `clear` received;
* max gap between consecutive frames of one answer;

and from the realtime process: inbound frame cost (``GET /stats``) and RSS per call.
The last line printed is ``calls=N overhead_p50_ms=.. overhead_p95_ms=..
bargein_p95_ms=.. frame_p99_ms=.. max_gap_ms=.. rss_per_call_mb=..``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
from temporalio.testing import WorkflowEnvironment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.call_start import create_call
from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from builder_engine.db.engine import create_async_db_engine, session_factory
from builder_engine.db.migrate import upgrade
from builder_engine.db.models import Agent, AgentVersion, Organization
from builder_engine.temporal_setup import ensure_search_attributes
from emulators.deepgram import DeepgramEmulator
from emulators.elevenlabs import ElevenLabsEmulator
from emulators.openai import OpenAIEmulator, Reply
from emulators.speech import caller_speech
from emulators.twilio_phone import TwilioPhone

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


@dataclass
class CallResult:
    overheads_ms: list[float] = field(default_factory=list)
    bargein_ms: list[float] = field(default_factory=list)
    max_gap_ms: float = 0.0
    error: str | None = None


def answer_gap_ms(phone: TwilioPhone, since: float) -> float:
    times = [r.at for r in phone.received if r.event == "media" and r.at >= since]
    gaps = [b - a for a, b in itertools.pairwise(times) if b - a < 1.0]
    return max(gaps, default=0.0) * 1000.0


async def run_call(
    url: str,
    call_id: str,
    turns: int,
    question: npt.NDArray[np.int16],
    long_question: npt.NDArray[np.int16],
    barge_in: npt.NDArray[np.int16],
    delay: float,
    soak_until: float | None = None,
) -> CallResult:
    result = CallResult()
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    try:
        async with TwilioPhone(url, parameters={"call_id": call_id}, history=2000) as phone:
            await phone.wait_for_media_after(0, within=20)
            await phone.wait_until_quiet(0.4, within=20)
            done = 0
            while done < turns or (soak_until is not None and loop.time() < soak_until):
                done += 1
                utterance = phone.say(question)
                await utterance.done.wait()
                assert utterance.ended_at is not None
                first = await phone.wait_for_media_after(utterance.ended_at, within=10)
                result.overheads_ms.append((first - utterance.ended_at) * 1000.0 - PROVIDERS_MS)
                await phone.wait_until_quiet(0.4, within=20)
                result.max_gap_ms = max(result.max_gap_ms, answer_gap_ms(phone, first))
            if soak_until is not None:
                return result
            utterance = phone.say(long_question)
            await utterance.done.wait()
            assert utterance.ended_at is not None
            await phone.wait_for_media_after(utterance.ended_at, within=10)
            await asyncio.sleep(1.0)
            interruption = phone.say(barge_in)
            await interruption.done.wait()
            clears = [r.at for r in phone.received if r.event == "clear"]
            if clears and interruption.started_at is not None:
                result.bargein_ms.append((clears[0] - interruption.started_at) * 1000.0)
            await phone.wait_until_quiet(0.4, within=20)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_process(argv: list[str], environ: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a platform process (a fork/exec; nothing here waits on it)."""
    return subprocess.Popen(argv, env=environ)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
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


async def wait_http(url: str, within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def first_sentence_times(settings: Settings, call_ids: list[str]) -> list[list[float]]:
    """Per call, per answer (greeting excluded, oldest first): how long the emulated LLM
    took from its first token to the end of the first sentence, which is when sentence-
    level TTS can start - provider time that the issue's overhead formula leaves in."""
    from sqlmodel import select

    from builder_engine.db.models import CallTurn

    engine = create_async_db_engine(settings)
    async with session_factory(engine)() as session:
        turns = (await session.exec(select(CallTurn).where(CallTurn.speaker == "agent"))).all()
    await engine.dispose()
    by_call: dict[str, list[CallTurn]] = {}
    for turn in sorted(turns, key=lambda t: t.index):
        by_call.setdefault(turn.call_id, []).append(turn)
    times: list[list[float]] = []
    for call_id in call_ids:
        answers = [t.latency for t in by_call.get(call_id, []) if "llm_first_token_ms" in t.latency]
        times.append(
            [
                a["first_sentence_ms"] - a["llm_first_token_ms"]
                for a in answers
                if "first_sentence_ms" in a
            ]
        )
    return times


async def latency_breakdown(
    settings: Settings,
) -> tuple[dict[str, float], tuple[float, float]]:
    """Medians of the per-turn latencies the realtime process recorded, and the p50/p95
    of the platform's own share of each turn."""
    from sqlmodel import select

    from builder_engine.db.models import CallTurn

    engine = create_async_db_engine(settings)
    async with session_factory(engine)() as session:
        turns = (await session.exec(select(CallTurn).where(CallTurn.speaker == "agent"))).all()
    await engine.dispose()
    names = sorted({name for turn in turns for name in turn.latency})
    medians = {
        name: round(statistics.median(t.latency[name] for t in turns if name in t.latency), 1)
        for name in names
    }
    platform = [t.latency["platform_ms"] for t in turns if "platform_ms" in t.latency]
    return medians, (percentile(platform, 50), percentile(platform, 95))


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
        print(json.dumps(addresses), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


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


async def main(calls: int, turns: int, token_interval_ms: float, soak_s: float) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        dev_server_log_level="error",
    )
    processes: list[subprocess.Popen[bytes]] = []
    emulators, providers = start_emulators(turns, token_interval_ms, bool(soak_s))
    try:
        await ensure_search_attributes(env.client, env.client.namespace)
        data = Path(tempfile.mkdtemp(prefix="bench-realtime-"))
        port = free_port()
        settings = Settings(
            data_dir=data,
            temporal_address=env.client.service_client.config.target_host,
            temporal_task_queue="bench",
            realtime_port=port,
            _env_file=None,
        )
        upgrade(settings)
        environ = {
            **os.environ,
            "BUILDER_DATA_DIR": str(data),
            "BUILDER_TEMPORAL_ADDRESS": settings.effective_temporal_address,
            "BUILDER_TEMPORAL_TASK_QUEUE": "bench",
            "BUILDER_REALTIME_PORT": str(port),
            "BUILDER_LOG_LEVEL": "warning",
            **providers,
        }
        cli = [sys.executable, "-m", "workers.cli"]
        processes.append(start_process([*cli, "worker"], environ))
        processes.append(start_process([*cli, "serve", "realtime"], environ))
        realtime = processes[-1]
        await wait_http(f"http://127.0.0.1:{port}/healthz", 60)

        engine = create_async_db_engine(settings)
        sessions = session_factory(engine)
        config = AgentConfig(
            name="bench",
            first_message="Hello, how can I help?",
            turn={
                "endpointing_ms": WINDOW_MS,
                "interrupt_min_ms": 150,
                "interrupt_min_words": 0,
            },
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
                    env.client,
                    "bench",
                    agent=agent,
                    version=1,
                    direction="inbound",
                    transport="twilio",
                )
                call_ids.append(call.id)
        await engine.dispose()

        question = caller_speech(QUESTION, 1.4)
        long_question = caller_speech(LONG_QUESTION, 1.4)
        barge_in = caller_speech(BARGE_IN, 1.2)
        baseline_rss = rss_mb(realtime.pid)
        others = {
            "emulators": emulators.pid,
            "worker": processes[0].pid,
            "temporal": temporal_server_pid() or 0,
        }
        cpu_before = cpu_seconds(realtime.pid), time.process_time()
        others_before = {name: cpu_seconds(pid) for name, pid in others.items() if pid}
        url = f"ws://127.0.0.1:{port}/media/twilio"
        started = time.monotonic()
        soak_until = asyncio.get_running_loop().time() + soak_s if soak_s else None
        tasks = [
            asyncio.create_task(
                run_call(
                    url,
                    call_id,
                    turns,
                    question,
                    long_question,
                    barge_in,
                    delay=2.0 * i / calls,
                    soak_until=soak_until,
                )
            )
            for i, call_id in enumerate(call_ids)
        ]
        peak_rss = baseline_rss
        samples: list[tuple[float, float]] = []
        while not all(t.done() for t in tasks):
            rss = rss_mb(realtime.pid)
            peak_rss = max(peak_rss, rss)
            samples.append((time.monotonic() - started, rss))
            await asyncio.sleep(0.5)
        results = [t.result() for t in tasks]
        elapsed = time.monotonic() - started
        realtime_cores = (cpu_seconds(realtime.pid) - cpu_before[0]) / elapsed
        harness_cores = (time.process_time() - cpu_before[1]) / elapsed
        other_cores = {
            name: (cpu_seconds(others[name]) - before) / elapsed
            for name, before in others_before.items()
        }
        async with httpx.AsyncClient() as client:
            stats = (await client.get(f"http://127.0.0.1:{port}/stats")).json()
        breakdown, platform = await latency_breakdown(settings)
        sentence_times = await first_sentence_times(settings, call_ids)

        errors = [r.error for r in results if r.error]
        overheads = [o for r in results for o in r.overheads_ms]
        # The same turns, less their first sentence's generation (matched per call, in
        # order; a call whose turns do not line up is left out).
        net = [
            o - g
            for r, gen in zip(results, sentence_times, strict=True)
            if len(gen) >= len(r.overheads_ms)
            for o, g in zip(r.overheads_ms, gen, strict=False)
        ]
        bargeins = [b for r in results for b in r.bargein_ms]
        print(f"calls: {calls} x {turns} turns + barge-in, {elapsed:.1f} s, errors: {len(errors)}")
        for error in errors[:5]:
            print("  error:", error)
        print(
            f"overhead ms: n={len(overheads)} p50={percentile(overheads, 50):.1f} "
            f"p95={percentile(overheads, 95):.1f} max={max(overheads, default=0):.1f}"
        )
        print(
            f"overhead less the first sentence's generation ms: n={len(net)} "
            f"p50={percentile(net, 50):.1f} p95={percentile(net, 95):.1f}"
        )
        print(
            f"barge-in ms: n={len(bargeins)} p50={percentile(bargeins, 50):.1f} "
            f"p95={percentile(bargeins, 95):.1f}"
        )
        print(f"realtime process: {stats}")
        print("server-side medians (ms after the VAD's end of speech):", breakdown)
        print(f"rss: baseline {baseline_rss:.1f} MB, peak {peak_rss:.1f} MB")
        if soak_s:
            second_half = [(t, r) for t, r in samples if t > elapsed / 2]
            slope = float("nan")
            if len(second_half) > 2:
                times = np.array([t for t, _ in second_half])
                rss_values = np.array([r for _, r in second_half])
                slope = float(np.polyfit(times, rss_values, 1)[0]) * 60.0
            print(
                f"soak: {soak_s:.0f} s, rss over the second half grows {slope:.2f} MB/min "
                f"({second_half[0][1]:.1f} -> {second_half[-1][1]:.1f} MB)"
            )
        print(
            f"cpu: realtime process {realtime_cores:.2f} cores, "
            f"phones {harness_cores:.2f}, "
            + ", ".join(f"{name} {cores:.2f}" for name, cores in other_cores.items())
            + " (2 cores on this machine)"
        )
        print(
            f"platform overhead (server-side, provider waits excluded): "
            f"p50={platform[0]:.1f} p95={platform[1]:.1f} ms"
        )
        max_gap = max((r.max_gap_ms for r in results), default=0.0)
        rss_per_call = (peak_rss - baseline_rss) / max(calls, 1)
        print(
            f"calls={calls} overhead_p50_ms={percentile(overheads, 50):.1f} "
            f"overhead_p95_ms={percentile(overheads, 95):.1f} "
            f"bargein_p95_ms={percentile(bargeins, 95):.1f} "
            f"frame_p99_ms={stats.get('frame_p99_ms', float('nan')):.3f} "
            f"max_gap_ms={max_gap:.1f} rss_per_call_mb={rss_per_call:.2f}"
        )
    finally:
        assert emulators.stdin is not None
        emulators.stdin.close()
        emulators.wait(10)
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        await env.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3)
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
    args = parser.parse_args()
    if args.serve_emulators:
        asyncio.run(serve_emulators(args.turns, args.token_interval_ms, bool(args.soak_s)))
        sys.exit(0)
    asyncio.run(main(args.calls, args.turns, args.token_interval_ms, args.soak_s))
    sys.stdout.flush()
    os._exit(0)  # the Temporal SDK can crash at interpreter exit (sdk-python #300)
