"""Units of the realtime path: state machine, turn decisions, playout pacing, recording,
and the Twilio Media Streams parser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from builder_engine.agent_config import TurnConfig
from realtime.admission import Admission
from realtime.collector import CallGarbageCollector
from realtime.playout import Playout, cut_at_fraction
from realtime.recorder import StereoRecorder
from realtime.state import CallPhase, CallStateMachine, InvalidTransition
from realtime.stats import RealtimeStats
from realtime.transports import twilio_protocol as tp
from realtime.turns import TurnPolicy, VoiceTracker, ends_mid_number, meaningful_words

# ---------------------------------------------------------------- state machine


def test_state_machine_follows_the_turn_cycle() -> None:
    seen: list[tuple[CallPhase, CallPhase]] = []
    machine = CallStateMachine(on_change=lambda a, b: seen.append((a, b)))
    for phase in (
        CallPhase.SPEAKING,  # greeting
        CallPhase.LISTENING,
        CallPhase.PROCESSING,
        CallPhase.SPEAKING,
        CallPhase.LISTENING,  # barge-in
        CallPhase.PROCESSING,
        CallPhase.LISTENING,  # caller went on talking
        CallPhase.ENDED,
    ):
        machine.to(phase)
    assert seen[0] == (CallPhase.IDLE, CallPhase.SPEAKING)
    assert machine.ended and len(seen) == 8
    machine.to(CallPhase.ENDED)  # idempotent
    with pytest.raises(InvalidTransition):
        machine.to(CallPhase.LISTENING)


def test_state_machine_rejects_skipping_processing() -> None:
    machine = CallStateMachine()
    machine.to(CallPhase.LISTENING)
    machine.to(CallPhase.PROCESSING)
    machine.to(CallPhase.SPEAKING)
    with pytest.raises(InvalidTransition):
        machine.to(CallPhase.IDLE)  # nothing goes back to IDLE


# ---------------------------------------------------------------- turn decisions


def test_voice_tracker_confirms_speech_and_measures_pauses() -> None:
    tracker = VoiceTracker(min_speech_ms=96)
    t = 0.0
    # A 32 ms click is not speech.
    assert not tracker.push(0.9, t, 32)
    t += 32
    assert not tracker.push(0.1, t, 32)
    t += 32
    confirmations = []
    for _ in range(5):
        confirmations.append(tracker.push(0.9, t, 32))
        t += 32
    assert confirmations == [False, False, True, False, False]
    assert tracker.onset_ms == 64
    for _ in range(3):
        tracker.push(0.05, t, 32)
        t += 32
    assert tracker.pause_ms(t) == 96
    assert tracker.last_voice_end_ms == 64 + 5 * 32


def test_voiced_time_of_confirmed_speech_counts_the_loud_frames_after_the_last_window() -> None:
    tracker = VoiceTracker(min_speech_ms=96)
    t = 0.0
    for _ in range(4):  # 128 ms of voice: confirmed
        tracker.push_energy(-20.0, t, t + 20)
        tracker.push_energy(-20.0, t + 20, t + 32)
        tracker.push(0.9, t, 32)
        t += 32
    assert tracker.in_speech and tracker.voiced_ms() == 128
    # Two more loud 20 ms frames; the model's next window is not complete yet.
    tracker.push_energy(-20.0, 128, 148)
    tracker.push_energy(-20.0, 148, 168)
    assert tracker.voiced_ms() == 168
    # Before speech is confirmed, loud frames alone count for nothing.
    fresh = VoiceTracker(min_speech_ms=96)
    fresh.push(0.9, 0, 32)
    fresh.push_energy(-20.0, 32, 52)
    assert not fresh.in_speech and fresh.voiced_ms() == 32


def test_the_caller_may_be_speaking_from_the_first_sound_until_a_pause() -> None:
    """What the recognizer is told (voiced audio goes out without waiting)."""
    tracker = VoiceTracker(min_speech_ms=96)
    for t in range(0, 400, 20):  # silence
        tracker.push_energy(-90.0, t, t + 20)
    assert not tracker.maybe_speaking(400)
    tracker.push_energy(-20.0, 400, 420)  # a sound: before any VAD window says so
    assert tracker.maybe_speaking(420)
    tracker.push(0.9, 384, 32)  # a candidate onset keeps it so
    for t in range(420, 800, 20):
        tracker.push_energy(-90.0, t, t + 20)
    assert tracker.maybe_speaking(800)
    tracker.push(0.05, 416, 32)  # a click after all
    assert tracker.onset_ms is None
    assert not tracker.maybe_speaking(800)  # 380 ms since the last sound
    assert tracker.maybe_speaking(600)  # within the 200 ms hangover


def test_numbers_get_more_patience_and_backchannels_do_not_interrupt() -> None:
    policy = TurnPolicy.from_config(
        TurnConfig(
            endpointing_ms=200, digit_patience_ms=900, interrupt_min_ms=250, interrupt_min_words=1
        )
    )
    assert policy.silence_needed_ms("my number is 415 555") == 900
    assert policy.silence_needed_ms("it's four one five, two") == 900
    assert policy.silence_needed_ms("what are your hours") == 200
    assert ends_mid_number("card ending 4242.")
    assert not policy.is_interruption(400, "mm-hm")
    assert not policy.is_interruption(400, "okay")
    assert not policy.is_interruption(100, "wait stop")
    assert policy.is_interruption(300, "wait stop")
    assert meaningful_words("Yeah, but what time?", frozenset({"yeah"})) == 3
    duration_only = TurnPolicy.from_config(TurnConfig(interrupt_min_ms=200, interrupt_min_words=0))
    assert duration_only.is_interruption(200, "")


# ---------------------------------------------------------------- playout


class RecordingTransport:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, bytes | str]] = []

    async def send_audio(self, frame: bytes) -> None:
        self.events.append((asyncio.get_running_loop().time(), "media", frame))

    async def send_mark(self, name: str) -> None:
        self.events.append((asyncio.get_running_loop().time(), "mark", name))

    async def send_clear(self) -> None:
        self.events.append((asyncio.get_running_loop().time(), "clear", ""))


@contextlib.asynccontextmanager
async def _paced(*, lead_ms: float) -> AsyncIterator[tuple[Playout, RecordingTransport]]:
    """A playout on the event loop's clock, its pacer running."""
    transport = RecordingTransport()
    playout = Playout(
        transport, frame_bytes=160, lead_ms=lead_ms, clock=asyncio.get_running_loop().time
    )
    pacer = asyncio.create_task(playout.run())
    try:
        yield playout, transport
    finally:
        pacer.cancel()


async def test_playout_paces_at_real_time_with_a_lead() -> None:
    async with _paced(lead_ms=60) as (playout, transport):
        segment = playout.start_segment("Hello there, how can I help?")
        playout.add_audio(segment, b"\x01" * 160 * 15 + b"\x02" * 50)  # 15 frames + a tail
        playout.end_segment(segment)
        await asyncio.sleep(0.38)
        media = [e for e in transport.events if e[1] == "media"]
        assert len(media) == 16
        assert media[-1][2] == b"\x02" * 50 + b"\xff" * 110  # tail padded with silence
        # The first 60 ms go at once; then one frame per 20 ms, on a clock (no drift).
        # Measured from the first frame: a busy machine may start the pacer late.
        offsets = [round((t - media[0][0]) * 1000) for t, _, _ in media]
        assert offsets[2] < 10
        assert abs(offsets[15] - (15 * 20 - 60)) <= 12
        assert transport.events[-1][1:] == ("mark", "seg-0")
        assert playout.playing
        assert playout.on_mark("seg-0") is segment
        await asyncio.wait_for(playout.wait_played(), 0.1)
        assert playout.stats.max_late_ms < 20


async def test_interrupt_clears_and_keeps_only_what_was_heard() -> None:
    async with _paced(lead_ms=0) as (playout, transport):
        first = playout.start_segment("We open at nine.")
        playout.add_audio(first, b"\x01" * 160 * 5)  # 100 ms
        playout.end_segment(first)
        second = playout.start_segment("one two three four five six seven eight nine ten")
        playout.add_audio(second, b"\x01" * 160 * 50)  # 1 s
        playout.end_segment(second)
        await asyncio.sleep(0.11)
        playout.on_mark("seg-0")  # the far end played the first sentence
        await asyncio.sleep(0.5)  # about half of the second sentence played
        heard = await playout.interrupt()
        cleared_at = len(transport.events)
        assert transport.events[-1][1] == "clear"
        assert heard.startswith("We open at nine. one two three four")
        assert "eight nine ten" not in heard
        # The interrupted answer's producer, still winding down, adds more of it.
        playout.add_audio(second, b"\x03" * 160 * 10)
        playout.end_segment(second)
        await asyncio.sleep(0.1)
        assert len(transport.events) == cleared_at  # nothing of the answer after clear
        assert playout.on_mark("seg-1") is None  # its echo after clear is not "played"
        assert not playout.playing
        # The next answer plays.
        third = playout.start_segment("Sure.")
        playout.add_audio(third, b"\x04" * 160 * 2)
        playout.end_segment(third)
        await asyncio.sleep(0.1)
        after = [e[2] for e in transport.events[cleared_at:] if e[1] == "media"]
        assert after == [b"\x04" * 160] * 2


def test_cut_at_fraction_keeps_whole_words() -> None:
    assert cut_at_fraction("a b c d", 0.5) == "a b"
    assert cut_at_fraction("a b c d", 0.0) == ""
    assert cut_at_fraction("a b c d", 1.7) == "a b c d"


# ---------------------------------------------------------------- recording


def test_recorder_writes_stereo_caller_left_agent_right(tmp_path: Path) -> None:
    recorder = StereoRecorder(tmp_path / "call.wav", sample_rate=8000)
    caller = np.full(160, 1000, dtype=np.int16)
    for _ in range(100):  # 2 s of caller audio, flushed to disk every second
        recorder.add_caller(caller)
    recorder.add_agent(np.full(800, -2000, dtype=np.int16))  # starts now, at 2 s
    for _ in range(100):
        recorder.add_caller(caller)
    recorder.add_agent(np.full(400, 3000, dtype=np.int16))  # the caller hangs up meanwhile
    path = recorder.close()
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 2 and wav.getframerate() == 8000
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    assert len(frames) == 32400
    assert (frames[:32000, 0] == 1000).all() and (frames[32000:, 0] == 0).all()
    assert (frames[16000:16800, 1] == -2000).all()
    assert (frames[:16000, 1] == 0).all() and (frames[16800:32000, 1] == 0).all()
    assert (frames[32000:, 1] == 3000).all()


RECORD_ON_A_FULL_DISK = """
import logging, resource, signal, sys
from pathlib import Path
import numpy as np
from realtime.recorder import StereoRecorder

logging.basicConfig(level=logging.ERROR)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # a disk full at 20 KB
recorder = StereoRecorder(Path(sys.argv[1]) / "call.wav")
for _ in range(300):  # 6 s of caller audio: 192 KB of stereo
    recorder.add_caller(np.full(160, 1000, dtype=np.int16))
    recorder.add_agent(np.full(160, 2000, dtype=np.int16))
path = recorder.close()
print(recorder.failed, path.stat().st_size)
"""


def test_a_recording_that_cannot_be_written_is_given_up_not_the_call(tmp_path: Path) -> None:
    """A full disk (here: a process whose files may not grow past 20 KB) fails the
    recording's writes: the recorder says so once and stops recording; adding audio and
    closing go on without an exception (which would end the call)."""
    done = subprocess.run(
        [sys.executable, "-c", RECORD_ON_A_FULL_DISK, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    failed, size = done.stdout.split()
    assert failed == "True" and int(size) <= 20_000
    assert done.stderr.count("writing failed, not recording any more") == 1, done.stderr


# ---------------------------------------------------------------- Twilio protocol


def _media(payload: str, sid: str = "MZ1") -> str:
    return json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})


def test_twilio_parser_reads_every_event() -> None:
    start = tp.parse_message(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": "MZ1",
                "start": {
                    "streamSid": "MZ1",
                    "accountSid": "AC1",
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "customParameters": {"call_id": "call_1"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
    )
    assert isinstance(start, tp.Start)
    assert start.custom_parameters == {"call_id": "call_1"} and start.call_sid == "CA1"
    media = tp.parse_message(_media(base64.b64encode(b"\xff" * 160).decode()))
    assert isinstance(media, tp.Media) and media.payload == b"\xff" * 160
    dtmf = tp.parse_message('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"7"}}')
    assert dtmf == tp.Dtmf("MZ1", "7")
    mark = tp.parse_message('{"event":"mark","streamSid":"MZ1","mark":{"name":"seg-3"}}')
    assert mark == tp.Mark("MZ1", "seg-3")
    assert isinstance(tp.parse_message('{"event":"stop","streamSid":"MZ1"}'), tp.Stop)
    assert isinstance(tp.parse_message('{"event":"connected","protocol":"Call"}'), tp.Connected)
    assert isinstance(tp.parse_message('{"event":"surprise"}'), tp.Unknown)


@pytest.mark.parametrize(
    "message",
    [
        _media("//8="),
        _media(""),
        _media("AAAA===="),  # b64decode takes extra padding; the fast path leaves it
        _media("AAAA", sid=""),
        '{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA","track":"outbound",'
        '"chunk":"7","timestamp":120},"sequenceNumber":"9"}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA","chunk":"x","track":3}}',
        '{"event":"media","streamSid":7,"media":{"payload":"AAAA"}}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":5}}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":"AA AA"}}',
        '{"event":"mark","streamSid":"MZ1","mark":{"name":"seg-3"},"media":{"payload":""}}',
    ],
)
def test_twilio_media_fast_path_parses_as_the_full_parser(message: str) -> None:
    def outcome(parse: Callable[[str], tp.TwilioEvent]) -> object:
        try:
            return parse(message)
        except tp.ProtocolError as exc:
            return str(exc)

    assert outcome(tp.parse_message) == outcome(tp._parse_any)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"streamSid": "MZ1"}', "no 'event'"),
        (_media("%%%notbase64"), "not valid base64"),
        ('{"event":"media","streamSid":"MZ1"}', "'media' is missing"),
        ('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"x"}}', "not a DTMF digit"),
        ('{"event":"start","start":{}}', "start.streamSid"),
        ("x" * (tp.MAX_MESSAGE_BYTES + 1), "exceeds"),
    ],
)
def test_twilio_parser_explains_bad_input(message: str, reason: str) -> None:
    with pytest.raises(tp.ProtocolError, match=reason):
        tp.parse_message(message)


def test_outbound_messages_are_valid_json() -> None:
    media = json.loads(tp.media_message('MZ"x', b"\x00\x01"))
    assert media == {"event": "media", "streamSid": 'MZ"x', "media": {"payload": "AAE="}}
    assert json.loads(tp.clear_message("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
    assert json.loads(tp.mark_message("MZ1", "seg-1"))["mark"] == {"name": "seg-1"}


def test_the_garbage_collector_runs_a_full_pass_only_after_calls_ended() -> None:
    assert gc.get_freeze_count() == 0  # nothing in the test process is frozen
    ended = [0]
    collector = CallGarbageCollector(lambda: ended[0])
    gc.disable()  # the cycle below must wait for the collector's own pass
    try:
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert not collector.collect_if_calls_ended()  # no call has ended
        ended[0] += 2
        assert collector.collect_if_calls_ended()
        assert collector.freed >= 1 and collector.passes == 1
        assert gc.get_freeze_count() > 0  # the first pass froze what it left
        assert not collector.collect_if_calls_ended()  # nothing ended since
    finally:
        gc.unfreeze()
        gc.enable()
    assert collector.snapshot()["full_gc_passes"] == 1


# ---------------------------------------------------------------- admission


def test_admission_caps_new_calls_but_always_takes_a_call_live_here() -> None:
    admission = Admission(RealtimeStats(), max_calls=2)
    assert admission.admit() and admission.admit()
    assert not admission.admit()  # the third new call is refused
    assert admission.busy() == "at its cap of 2 calls"
    assert admission.admit(always=True)  # a call that was live here a moment ago
    assert admission.calls == 3
    admission.release()
    admission.release()
    assert admission.busy() is None and admission.admit()
    unlimited = Admission(RealtimeStats())
    assert all(unlimited.admit() for _ in range(1000)) and unlimited.busy() is None


async def test_a_late_event_loop_makes_the_process_busy_but_refuses_no_stream() -> None:
    stats = RealtimeStats()
    admission = Admission(stats, max_calls=10, max_loop_lag_ms=5.0)
    watcher = asyncio.create_task(stats.watch_loop(interval_s=0.005))
    try:
        await asyncio.sleep(0.05)
        assert admission.busy() is None
        for _ in range(10):  # a loop held for 0.1 s at a time, ten times over
            time.sleep(0.1)
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        busy = admission.busy()
        assert busy is not None and "event loop runs" in busy
        assert admission.admit()  # lag alone never turns a caller away
    finally:
        watcher.cancel()


async def test_playout_tells_a_gap_inside_a_sentence_from_one_between_sentences() -> None:
    async with _paced(lead_ms=0) as (playout, _):
        first = playout.start_segment("We open at nine.")
        playout.add_audio(first, b"\x01" * 160 * 2)  # 40 ms, then its audio is late
        await asyncio.sleep(0.12)
        playout.add_audio(first, b"\x01" * 160 * 2)  # the far end was dry for ~80 ms
        playout.end_segment(first)
        await asyncio.sleep(0.18)
        second = playout.start_segment("And close at five.")  # ~140 ms after the first
        playout.add_audio(second, b"\x01" * 160)
        playout.end_segment(second)
        await asyncio.sleep(1.1)
        answer = playout.start_segment("Anything else?")  # a new answer: not a gap
        playout.add_audio(answer, b"\x01" * 160)
        await asyncio.sleep(0.05)
        assert 60 <= playout.stats.max_gap_in_segment_ms < 130
        assert 110 <= playout.stats.max_gap_between_segments_ms < 400
