"""One call's conversation loop: caller audio in, turn taking, answer out, barge-in.

The transport feeds caller audio, marks and DTMF into the session; the session sends
paced audio back through the transport's outbound side. It owns its tasks and timers:
``run()`` is the one place a call is torn down, whatever ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from builder_engine.agent_config import AgentConfig, VariableValue, render_template
from builder_engine.calls import EndedReason, Speaker
from builder_engine.timeutil import utcnow
from builder_engine.tools import ToolDef
from realtime.conversation import Conversation
from realtime.lifecycle import CallLifecycle
from realtime.media.convert import AudioConverter, decode
from realtime.media.vad import SileroVad, VadBatcher
from realtime.metrics import TurnMetrics
from realtime.playout import LEAD_MS, OutboundMedia, Playout, SpokenSegment
from realtime.providers.base import (
    AsrProvider,
    AsrStream,
    AudioFormat,
    LlmProvider,
    ProviderError,
    TextDelta,
    ToolCall,
    ToolCallsRequested,
    TranscriptEvent,
    TtsProvider,
)
from realtime.recorder import StereoRecorder
from realtime.sentences import SentenceChunker
from realtime.state import CallPhase, CallStateMachine
from realtime.stats import FrameMeter, RealtimeStats
from realtime.tools import (
    FILLER_REPEAT_S,
    FLUSH,
    MAX_TOOL_ROUNDS,
    STILL_WORKING,
    TOOL_LIMIT_REPLY,
    Pause,
    Reply,
    SpeechItem,
    Tones,
    ToolDesk,
    dtmf_audio,
)
from realtime.turns import TurnPolicy, VoiceTracker
from workflows.types import CommittedTurn

log = logging.getLogger(__name__)

APOLOGY = "I'm sorry, I'm having trouble right now. Please call back in a little while."
REPROMPT = "Are you still there?"
SILENCE_GOODBYE = "I haven't heard anything, so I'll hang up now. Goodbye."
TIME_LIMIT_GOODBYE = "We've reached the time limit for this call. Thank you, goodbye."

TRANSCRIPT_WAIT_S = 1.5  # longest wait for the recognizer's final after the endpoint
CLOSING_PLAYBACK_S = 15.0  # longest wait for a goodbye to play before hanging up
DTMF_COLLECT_S = 1.5  # digits typed within this of each other are one entry
TEARDOWN_WAIT_S = 5.0  # longest wait for the call's own tasks to stop when it ends
#: Not an ended reason: the session stops and the call goes on in another session, which
#: resumes it - on another server (this one is shutting down) or on a newer stream here.
HANDED_OVER = "handed-over"


@dataclass(frozen=True)
class CallSetup:
    call_id: str
    config: AgentConfig
    media_format: AudioFormat
    variables: dict[str, VariableValue] = field(default_factory=dict)
    #: Agent audio kept buffered at the far end ahead of real time (see ``Playout``).
    lead_ms: float = LEAD_MS
    #: Agent audio goes out in messages of this much (the transport's choice).
    frame_ms: float = 20.0
    tools: tuple[ToolDef, ...] = ()  # the agent's tools, offered to the model


@dataclass(frozen=True)
class Providers:
    asr: AsrProvider
    llm: LlmProvider
    tts: TtsProvider
    #: Called once the call has ended (its place in a shared connection pool).
    release: Callable[[], None] = lambda: None


def rms_dbfs(pcm: npt.NDArray[np.int16]) -> float:
    if pcm.size == 0:
        return -120.0
    samples = pcm.astype(np.float32)
    power = float(np.dot(samples, samples)) / pcm.size
    return 10.0 * math.log10(power / (32768.0 * 32768.0) + 1e-12)


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended: its chain of awaits, outermost first."""
    lines = []
    node: Any = task.get_coro()
    while node is not None:
        frame = getattr(node, "cr_frame", None) or getattr(node, "ag_frame", None)
        frame = frame or getattr(node, "gi_frame", None)
        if frame is None:
            lines.append(f"\n  {node!r}")
            break
        lines.append(f"\n  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        node = (
            getattr(node, "cr_await", None)
            or getattr(node, "ag_await", None)
            or getattr(node, "gi_yieldfrom", None)
        )
    return "".join(lines)


class _RecordingOutbound:
    """Passes frames to the transport and copies what was sent into the recording."""

    def __init__(
        self, inner: OutboundMedia, recorder: StereoRecorder | None, fmt: AudioFormat
    ) -> None:
        self._inner = inner
        self._recorder = recorder
        self._format = fmt

    async def send_audio(self, frame: bytes) -> None:
        await self._inner.send_audio(frame)
        if self._recorder is not None:
            self._recorder.add_agent(decode(frame, self._format))

    async def send_mark(self, name: str) -> None:
        await self._inner.send_mark(name)

    async def send_clear(self) -> None:
        await self._inner.send_clear()


class CallSession:
    def __init__(
        self,
        setup: CallSetup,
        providers: Providers,
        outbound: OutboundMedia,
        lifecycle: CallLifecycle,
        *,
        vad: SileroVad,
        vad_batcher: VadBatcher | None = None,
        recorder: StereoRecorder | None = None,
        stats: RealtimeStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.setup = setup
        self.config = setup.config
        self.providers = providers
        self.lifecycle = lifecycle
        self.recorder = recorder
        self.stats = stats or RealtimeStats()
        self._frame_meter = FrameMeter(self.stats)
        self.clock = clock
        self.state = CallStateMachine()
        self.policy = TurnPolicy.from_config(setup.config.turn)
        self.tracker = VoiceTracker()
        variables = {**setup.config.variables, **setup.variables}
        self.variables = variables
        self.conversation = Conversation(self.config.system_prompt(setup.variables))
        self.tools = ToolDesk(setup.call_id, setup.tools, lifecycle, self.conversation)
        self._reply: Reply | None = None  # the answer in progress, across its tool rounds
        fmt = setup.media_format
        frame_bytes = round(fmt.bytes_per_second * setup.frame_ms / 1000.0)
        self.playout = Playout(
            _RecordingOutbound(outbound, recorder, fmt),
            frame_bytes=frame_bytes,
            frame_ms=setup.frame_ms,
            lead_ms=setup.lead_ms,
            silence_byte=0xFF if fmt.encoding == "mulaw" else 0x00,
            clock=clock,
            on_first_frame=self._on_first_frame,
        )
        self._vad = vad
        self._vad_batcher = vad_batcher
        vad_format = AudioFormat("pcm16", vad.sample_rate)
        self._to_vad = AudioConverter(fmt, vad_format)
        self._to_asr = AudioConverter(fmt, providers.asr.input_format)
        self._from_tts = AudioConverter(providers.tts.output_format, fmt)
        self._asr: AsrStream | None = None
        self._ended = asyncio.Event()
        self.ended_reason: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._response: asyncio.Task[None] | None = None
        self._metrics: TurnMetrics | None = None
        self._turn_index = 0
        # Caller-audio clock: stream time of the audio received (and of the audio the VAD
        # has seen), and the wall time the latest frame arrived.
        self._audio_ms = 0.0
        self._vad_ms = 0.0
        self._audio_wall = clock()
        self._endpoint_timer: asyncio.TimerHandle | None = None
        self._endpoint_deadline: float | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._max_timer: asyncio.TimerHandle | None = None
        self._dtmf_timer: asyncio.TimerHandle | None = None
        self._dtmf_digits = ""
        self._reprompted = False
        self._finishing = False
        self._unanswered = False  # an answer was dropped because the caller went on
        # Transcript of the caller's current turn.
        self._final_parts: list[str] = []
        self._interim = ""
        self._finals_seen = 0
        self._transcript_changed = asyncio.Event()
        self._resumed: str | None = None  # a call taken over mid-way: what to say first

    def resume(self, next_turn_index: int, line: str) -> None:
        """This call moved here mid-conversation (its history is in ``conversation``
        already, see realtime.resume): no greeting, ``line`` (may be empty) first."""
        self._turn_index = next_turn_index
        self._resumed = line

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> str:
        """Run the call until it ends; returns the ended reason."""
        loop = asyncio.get_running_loop()
        self.stats.call_started()
        try:
            self._asr = await self.providers.asr.open_stream(
                language=self.config.language, keywords=self.config.asr.keywords
            )
            self._spawn(self.playout.run(), "playout")
            self._spawn(self._consume_transcripts(self._asr), "asr-events")
            self._max_timer = loop.call_later(self.config.max_duration_s, self._on_max_duration)
            # The call's workflow ending first (a supervisor's hang-up) ends the session.
            self.lifecycle.on_workflow_closed(self.end)
            self.lifecycle.answered()
            if self._resumed:
                self.state.to(CallPhase.PROCESSING)
                self._start_response(self._say(self._resumed, TurnMetrics()))
            elif self._resumed is not None:
                self.state.to(CallPhase.LISTENING)
                self._arm_silence_timer()
            elif self.config.first_speaker == "agent" and self.config.first_message:
                greeting = render_template(self.config.first_message, self.variables)
                self.state.to(CallPhase.PROCESSING)
                self._start_response(self._say(greeting, TurnMetrics()))
            else:
                self.state.to(CallPhase.LISTENING)
                self._arm_silence_timer()
            await self._ended.wait()
        except ProviderError as exc:
            log.error("call %s: %s", self.setup.call_id, exc)
            self.ended_reason = self.ended_reason or EndedReason.PROVIDER_ERROR
        finally:
            await self._teardown()
        return self.ended_reason or EndedReason.FAILED

    def end(self, reason: str) -> None:
        """End the call now (the caller hung up, the transport failed, ...). Idempotent."""
        if self.ended_reason is None:
            self.ended_reason = reason
        self._ended.set()

    async def _teardown(self) -> None:
        for timer in (self._endpoint_timer, self._silence_timer, self._max_timer, self._dtmf_timer):
            if timer is not None:
                timer.cancel()
        if self._response is not None and not self._response.done():
            # The call ended mid-answer: the history keeps what the caller heard of it.
            heard = self.playout.heard_text(self.clock())
            reply = self._reply
            if heard or (reply is not None and reply.tool_calls):
                metrics = self._metrics
                self._commit(
                    Speaker.AGENT,
                    heard,
                    interrupted=True,
                    latency=metrics.as_latency_ms() if metrics else {},
                    tool_calls=reply.transcript_calls() if reply else None,
                    started=metrics.first_audio if metrics else None,
                )
        if self.ended_reason == HANDED_OVER:
            # The workflow must not hear of an end: the call is resuming elsewhere. What
            # was committed here still reaches it (``lifecycle.aclose`` below).
            log.info("call %s: handed over to another session", self.setup.call_id)
            self.lifecycle.handed_over()
        else:
            # The workflow hears of the end before anything below can get stuck.
            self.lifecycle.ended(self.ended_reason or EndedReason.FAILED)
        tasks = [t for t in (self._response, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        self.playout.close()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=TEARDOWN_WAIT_S)
            for task in stuck:  # a bug: say where it hangs, and go on without it
                log.error(
                    "call %s: task %s ignored its cancellation at:%s",
                    self.setup.call_id,
                    task.get_name(),
                    awaiting(task)
                    + f" waiter={getattr(task, '_fut_waiter', None)!r}"
                    + f" cancelling={task.cancelling()}"
                    + f" must_cancel={getattr(task, '_must_cancel', None)}"
                    + f" idle={self.playout._idle.is_set()} same={task is self._response}",
                )
        # Tools still running finish in the workflow (which records them); stop waiting.
        await self.tools.aclose()
        if self._asr is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._asr.close()
            except Exception as exc:
                log.warning("call %s: closing ASR failed: %s", self.setup.call_id, exc)
        self._vad.close()
        self.providers.release()
        if self.recorder is not None:
            self.recorder.close()
        self.state.to(CallPhase.ENDED)
        self.stats.call_ended(self.playout.stats)
        await self.lifecycle.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.setup.call_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("call %s: task %s failed: %r", self.setup.call_id, task.get_name(), exc)
            if isinstance(exc, ProviderError) and not (self._finishing or self._ended.is_set()):
                # A provider failed outside the LLM's own apology path (the recognizer's
                # stream, a synthesis): never hang up on dead air, apologize first. Should
                # the apology fail as well, _finishing makes the next failure end the call.
                self._spawn(self._close_with(EndedReason.PROVIDER_ERROR, APOLOGY), "apology")
                return
            self.end(
                EndedReason.PROVIDER_ERROR if isinstance(exc, ProviderError) else EndedReason.FAILED
            )

    # ------------------------------------------------------------ caller input

    async def on_audio(self, audio: bytes) -> None:
        """One frame of caller audio in the transport's format."""
        if self._ended.is_set():
            return
        now = self.clock()
        meter = self._frame_meter
        meter.begin()
        to_asr = self._to_asr.convert(audio)
        pcm = self._to_vad.convert_to_pcm(audio)
        if self._vad_batcher is None:
            probabilities = self._vad.process_windows(pcm)
        else:
            # The model runs once for the windows of every call of this loop turn; the
            # frame is charged its share of that run, not the wait for the turn to end.
            meter.pause()
            probabilities = await self._vad.process_windows_batched(pcm, self._vad_batcher)
            if self._ended.is_set():
                return
            meter.resume(self._vad.model_share_s)
        window_ms = self._vad.window_ms
        for probability in probabilities:
            start = self._vad_ms
            self._vad_ms += window_ms
            if self.tracker.push(probability, start, window_ms):
                self._on_speech_onset()
        frame_start_ms = self._audio_ms
        self._audio_ms += 1000.0 * len(pcm) / self._vad.sample_rate
        self.tracker.push_energy(rms_dbfs(pcm), frame_start_ms, self._audio_ms)
        self._audio_wall = now
        meter.end()
        if self.recorder is not None:
            self.recorder.add_caller(self._recording_samples(audio, pcm))
        self._follow_turn()
        if self._asr is not None:
            await self._asr.send_audio(to_asr, voiced=self.tracker.maybe_speaking(self._audio_ms))

    def _recording_samples(self, audio: bytes, vad_pcm: npt.NDArray[np.int16]) -> Any:
        if self._vad.sample_rate == self.setup.media_format.sample_rate:
            return vad_pcm
        return decode(audio, self.setup.media_format)

    def on_mark(self, name: str) -> None:
        self.playout.on_mark(name)

    def on_dtmf(self, digit: str) -> None:
        if self._ended.is_set():
            return
        self._cancel_silence_timer()
        self._dtmf_digits += digit
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if digit == "#":
            self._commit_dtmf()
        else:
            self._dtmf_timer = asyncio.get_running_loop().call_later(
                DTMF_COLLECT_S, self._commit_dtmf
            )

    def _commit_dtmf(self) -> None:
        digits, self._dtmf_digits = self._dtmf_digits.rstrip("#"), ""
        self._dtmf_timer = None
        if not digits or self._finishing:
            return
        self._spawn(self._take_dtmf(digits), "dtmf")

    async def _take_dtmf(self, digits: str) -> None:
        if self.state.phase in (CallPhase.SPEAKING, CallPhase.PROCESSING):
            await self._interrupt()
        self.state.to(CallPhase.PROCESSING)
        now = self.clock()
        self._caller_said(f"(The caller pressed the keys: {digits})", started=now)
        metrics = TurnMetrics(speech_start=now, speech_end=now, endpoint=now)
        self._start_response(self._answer_with_llm(metrics))

    # ------------------------------------------------------------ turn taking

    def _wall(self, stream_ms: float) -> float:
        return self._audio_wall - (self._audio_ms - stream_ms) / 1000.0

    def _on_speech_onset(self) -> None:
        self._cancel_silence_timer()

    def _caller_text(self) -> str:
        return " ".join([*self._final_parts, self._interim]).strip()

    def _follow_turn(self) -> None:
        phase = self.state.phase
        if not self.tracker.in_speech or self._finishing:
            return
        # Voiced time, not time since the onset: a short sound followed by silence must
        # not become "long enough" just by waiting.
        speech_ms = self.tracker.voiced_ms()
        if phase == CallPhase.SPEAKING or (phase == CallPhase.PROCESSING and self.playout.playing):
            if self.policy.is_interruption(speech_ms, self._caller_text()):
                self._spawn(self._interrupt(), "interrupt")
            elif self._over_agent_ended():
                # A backchannel or a noise over the agent, over now and no interruption:
                # forget it, so it neither adds to the length and words of the caller's
                # next sound nor becomes a turn of its own when the agent stops.
                self.tracker.end_speech()
                self._final_parts = []
                self._interim = ""
            return
        if phase == CallPhase.PROCESSING and self._response is not None:
            # The caller only paused: they go on before the answer has started playing.
            if speech_ms >= self.policy.interrupt_min_ms:
                self._spawn(self._resume_listening(), "resume-listening")
            return
        if phase not in (CallPhase.LISTENING, CallPhase.IDLE):
            return
        speech_end = self.tracker.speech_end_ms
        if self.tracker.pause_ms(self._vad_ms) <= 0 or speech_end is None:
            self._disarm_endpoint()
            return
        needed = self.policy.silence_needed_ms(self._caller_text())
        deadline = self._wall(speech_end) + needed / 1000.0
        if self._endpoint_deadline is not None and abs(deadline - self._endpoint_deadline) < 1e-4:
            return
        self._disarm_endpoint()
        self._endpoint_deadline = deadline
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.clock())
        self._endpoint_timer = loop.call_later(delay, self._on_endpoint)

    def _over_agent_ended(self) -> bool:
        """The caller's sound over the agent has paused as long as an endpoint needs, and
        the recognizer has finalized its words (or had time enough to)."""
        pause_ms = self.tracker.pause_ms(self._vad_ms)
        if pause_ms < self.policy.endpointing_ms:
            return False
        return not self._interim or pause_ms >= self.policy.endpointing_ms + TRANSCRIPT_WAIT_S * 1e3

    def _disarm_endpoint(self) -> None:
        if self._endpoint_timer is not None:
            self._endpoint_timer.cancel()
        self._endpoint_timer = None
        self._endpoint_deadline = None

    def _on_endpoint(self) -> None:
        self._endpoint_timer = None
        self._endpoint_deadline = None
        if self.state.phase not in (CallPhase.LISTENING, CallPhase.IDLE) or self._ended.is_set():
            return
        speech_end = self.tracker.speech_end_ms
        if speech_end is None:
            return
        speech_end_at, now = self._wall(speech_end), self.clock()
        onset = self.tracker.speech_onset_ms
        metrics = TurnMetrics(
            speech_start=self._wall(onset) if onset is not None else None,
            speech_end=speech_end_at,
            endpoint=now,
            window_s=self.policy.silence_needed_ms(self._caller_text()) / 1000.0,
        )
        # The caller's words stay out of the log (PII).
        log.debug(
            "call %s: end of turn after %.0f ms of silence",
            self.setup.call_id,
            (now - speech_end_at) * 1e3,
        )
        self.tracker.end_speech()
        self.state.to(CallPhase.PROCESSING)
        finals_before = self._finals_seen
        pending = bool(self._interim)
        if self._asr is not None:
            self._spawn(self._asr.finalize(), "asr-finalize")
        self._start_response(self._answer_turn(metrics, finals_before, pending))

    async def _consume_transcripts(self, stream: AsrStream) -> None:
        async for event in stream.events():
            if not isinstance(event, TranscriptEvent):
                continue
            if event.is_final:
                if event.text.strip():
                    self._final_parts.append(event.text.strip())
                self._interim = ""
                self._finals_seen += 1
            else:
                self._interim = event.text.strip()
            self._transcript_changed.set()
            self._follow_turn()

    async def _caller_turn_text(self, finals_before: int, pending: bool) -> str:
        """The caller's words once the recognizer has finalized them (or waited enough)."""
        deadline = self.clock() + TRANSCRIPT_WAIT_S
        while True:
            finalized = self._finals_seen > finals_before and not self._interim
            if finalized or (not pending and self._final_parts and not self._interim):
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                log.warning("call %s: no final transcript in time", self.setup.call_id)
                break
            self._transcript_changed.clear()
            # asyncio.timeout, never wait_for, in a task that can be cancelled: on Python
            # 3.11 wait_for returns normally when its inner wait completes as the task is
            # cancelled, and the cancellation is lost - an answer cancelled by a barge-in
            # went on speaking, and a call's end waited on it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._transcript_changed.wait()
        text = self._caller_text()
        self._final_parts = []
        self._interim = ""
        return text

    # ------------------------------------------------------------ answering

    def _start_response(self, coro: Coroutine[Any, Any, None]) -> None:
        self._response = asyncio.create_task(coro, name=f"{self.setup.call_id}:response")
        self._response.add_done_callback(self._task_done)

    async def _answer_turn(self, metrics: TurnMetrics, finals_before: int, pending: bool) -> None:
        text = await self._caller_turn_text(finals_before, pending)
        metrics.asr_final = self.clock()
        if not text and not self._unanswered:
            # Noise, a cough: nothing to answer. The floor goes back to the caller.
            self.state.to(CallPhase.LISTENING)
            self._arm_silence_timer()
            return
        if text:
            self._caller_said(text, started=metrics.speech_start)
        self._unanswered = False
        await self._answer_with_llm(metrics)

    def _caller_said(self, text: str, *, started: float | None) -> None:
        self._commit(Speaker.CALLER, text, started=started)
        self.conversation.add_user(text)
        # The caller is there: the next silence gets its "are you still there?" again.
        self._reprompted = False

    async def _answer_with_llm(self, metrics: TurnMetrics) -> None:
        self._metrics = metrics
        self._reply = Reply()
        brain = self.config.brain
        deltas = self._llm_text(metrics, brain.temperature, brain.max_tokens)
        await self._speak(deltas, metrics)

    async def _llm_text(
        self, metrics: TurnMetrics, temperature: float, max_tokens: int | None
    ) -> AsyncIterator[SpeechItem]:
        """The model's words; tool calls run in between (rounds) until it answers in text."""
        metrics.llm_request = self.clock()
        reply = self._reply or Reply()
        specs = self.tools.specs
        try:
            for round_number in range(MAX_TOOL_ROUNDS + 1):
                calls: tuple[ToolCall, ...] = ()
                separator = " " if round_number else ""
                async for event in self.providers.llm.stream(
                    self.conversation.messages(specs),
                    tools=specs,
                    temperature=temperature,
                    max_tokens=max_tokens,
                ):
                    if isinstance(event, TextDelta):
                        if metrics.llm_first_token is None:
                            metrics.llm_first_token = self.clock()
                        reply.round_text.append(event.text)
                        yield separator + event.text
                        separator = ""
                    elif isinstance(event, ToolCallsRequested):
                        calls = event.calls
                if not calls:
                    return
                if round_number == MAX_TOOL_ROUNDS:
                    log.warning("call %s: too many tool rounds in one answer", self.setup.call_id)
                    self.tools.refuse(calls, reply.take_round_text(), "Too many tool calls.")
                    reply.skip_words(TOOL_LIMIT_REPLY)
                    yield " " + TOOL_LIMIT_REPLY
                    return
                async for item in self._run_tool_round(reply, calls):
                    yield item
        except ProviderError as exc:
            log.error("call %s: language model failed: %s", self.setup.call_id, exc)
            yield (" " if metrics.llm_first_token else "") + APOLOGY
            self._finishing = True
            self.ended_reason = self.ended_reason or EndedReason.PROVIDER_ERROR

    async def _run_tool_round(
        self, reply: Reply, calls: tuple[ToolCall, ...]
    ) -> AsyncIterator[SpeechItem]:
        """Have the workflow run the model's tool calls. What the model said before them is
        spoken meanwhile, then a filler line if they take long; their results go into the
        conversation (also when a barge-in cancels this answer), then their actions."""
        text = reply.take_round_text()
        reply.skip_words(text)
        round_ = self.tools.start(calls, text)
        reply.tool_calls.extend(round_.entries)
        yield FLUSH
        filler_at = self.clock() + round_.filler_after_s
        fillers = 0
        while not round_.task.done():
            wait = filler_at - self.clock()
            if wait > 0:
                await asyncio.wait({round_.task}, timeout=wait)
                continue
            if self.playout.playing:
                filler_at = self.clock() + 0.2  # no filler over words still playing
                continue
            line = round_.filler if fillers == 0 else STILL_WORKING
            fillers += 1
            reply.skip_words(line)  # spoken, but not part of the model's history
            yield " " + line
            yield FLUSH
            filler_at = self.clock() + FILLER_REPEAT_S
        for outcome in round_.task.result():
            if outcome.action == "end_call":
                # The model says its goodbye (the next round), then the call ends.
                self._finishing = True
                self.ended_reason = self.ended_reason or EndedReason.AGENT_HANGUP
            elif outcome.action == "transferred":
                # The carrier has moved the caller: this (agent) leg is over.
                self.end(EndedReason.TRANSFERRED)
                return
            elif outcome.action == "hold" and outcome.hold_s:
                yield Pause(outcome.hold_s)
            elif outcome.action == "send_dtmf" and outcome.digits:
                yield Tones(dtmf_audio(outcome.digits, self.setup.media_format), outcome.digits)

    async def _say(self, text: str, metrics: TurnMetrics) -> None:
        async def fixed() -> AsyncIterator[str]:
            yield text

        self._metrics = metrics
        await self._speak(fixed(), metrics)

    async def _speak(self, deltas: AsyncIterator[SpeechItem], metrics: TurnMetrics) -> None:
        """Stream text through TTS sentence by sentence, then wait until it has been heard."""
        sentences: asyncio.Queue[str | Tones | Pause | None] = asyncio.Queue()
        synthesis = asyncio.create_task(self._synthesize(sentences, metrics))
        spoken: list[str] = []
        chunker = SentenceChunker()
        try:
            async for delta in deltas:
                if not isinstance(delta, str):
                    # Flush (a tool starts), tones or a hold: what is pending is said first.
                    rest = chunker.flush()
                    if rest:
                        sentences.put_nowait(rest)
                    if isinstance(delta, Tones | Pause):
                        sentences.put_nowait(delta)
                    continue
                spoken.append(delta)
                for sentence in chunker.push(delta):
                    sentences.put_nowait(sentence)
            rest = chunker.flush()
            if rest:
                sentences.put_nowait(rest)
            sentences.put_nowait(None)
            await synthesis
            await self.playout.wait_played()
        finally:
            if not synthesis.done():
                synthesis.cancel()
                await asyncio.gather(synthesis, return_exceptions=True)
        answer = "".join(spoken).strip()
        reply, self._reply = self._reply, None
        self._commit(
            Speaker.AGENT,
            answer,
            latency=metrics.as_latency_ms(),
            tool_calls=reply.transcript_calls() if reply else None,
            started=metrics.first_audio,
        )
        # With tools, the words before each round are in the conversation already.
        self.conversation.add_assistant(reply.take_round_text() if reply else answer)
        self.playout.forget_played()
        self._metrics = None
        self._response = None
        if self._finishing:
            self.end(self.ended_reason or EndedReason.AGENT_HANGUP)
            return
        if self._says_goodbye(answer):
            self.end(EndedReason.END_CALL_PHRASE)
            return
        self.state.to(CallPhase.LISTENING)
        self._arm_silence_timer()

    async def _synthesize(
        self, sentences: asyncio.Queue[str | Tones | Pause | None], metrics: TurnMetrics
    ) -> None:
        while (sentence := await sentences.get()) is not None:
            if isinstance(sentence, Pause):
                # On hold: silence after what was said; a caller who speaks ends it.
                await self.playout.wait_played()
                await asyncio.sleep(sentence.seconds)
                continue
            if isinstance(sentence, Tones):
                tones = self.playout.start_segment("")
                self.playout.add_audio(tones, sentence.audio)
                self.playout.end_segment(tones)
                continue
            if metrics.first_sentence is None:
                metrics.first_sentence = self.clock()
            segment: SpokenSegment = self.playout.start_segment(sentence)
            try:
                async for audio in self.providers.tts.synthesize(sentence):
                    if metrics.tts_first_byte is None:
                        metrics.tts_first_byte = self.clock()
                    self.playout.add_audio(segment, self._from_tts.convert(audio))
            finally:
                self.playout.end_segment(segment)

    def _on_first_frame(self, segment: SpokenSegment, sent_at: float) -> None:
        metrics = self._metrics
        if metrics is not None and metrics.first_audio is None:
            metrics.first_audio = sent_at
        if self.state.phase in (CallPhase.PROCESSING, CallPhase.IDLE):
            self.state.to(CallPhase.SPEAKING)

    def _says_goodbye(self, answer: str) -> bool:
        lowered = answer.lower()
        return any(phrase.lower() in lowered for phrase in self.config.end_call_phrases)

    async def _resume_listening(self) -> None:
        """Drop the answer being prepared; the caller's next words join the same turn."""
        response, self._response = self._response, None
        if response is None or response.done() or self._finishing:
            return
        log.debug(
            "call %s: the caller went on; the answer in the making is dropped", self.setup.call_id
        )
        response.remove_done_callback(self._task_done)
        response.cancel()
        await asyncio.gather(response, return_exceptions=True)
        self._metrics = None
        reply, self._reply = self._reply, None
        if reply is not None and reply.tool_calls:
            # Tools ran for the dropped answer: the transcript keeps them.
            self._commit(Speaker.AGENT, "", interrupted=True, tool_calls=reply.transcript_calls())
        self._unanswered = True
        self.state.to(CallPhase.LISTENING)
        self._follow_turn()

    async def _interrupt(self) -> None:
        """Barge-in: stop talking now; keep in the history only what the caller heard."""
        response, self._response = self._response, None
        if response is None or response.done():
            return
        response.remove_done_callback(self._task_done)
        onset_ms = self.tracker.speech_onset_ms
        response.cancel()
        # `clear` first: the answer's task may take a while to wind down (closing its
        # provider streams), and whatever audio it still adds belongs to the interrupted
        # talk spurt, which the playout drops.
        heard = await self.playout.interrupt()
        if onset_ms is not None:
            self.stats.bargein.add(self.clock() - self._wall(onset_ms))
        await asyncio.gather(response, return_exceptions=True)
        metrics, self._metrics = self._metrics, None
        reply, self._reply = self._reply, None
        if heard or (reply is not None and reply.tool_calls):
            self._commit(
                Speaker.AGENT,
                heard,
                interrupted=True,
                latency=metrics.as_latency_ms() if metrics else {},
                tool_calls=reply.transcript_calls() if reply else None,
                started=metrics.first_audio if metrics else None,
            )
            # Running tools go on; their results reach the conversation when they arrive.
            new_words = reply.unrecorded(heard) if reply else heard
            self.conversation.add_assistant(new_words, interrupted=True)
        self.state.to(CallPhase.LISTENING)
        self._follow_turn()

    # ------------------------------------------------------------ timers

    def _arm_silence_timer(self) -> None:
        self._cancel_silence_timer()
        loop = asyncio.get_running_loop()
        self._silence_timer = loop.call_later(self.config.silence_timeout_s, self._on_silence)

    def _cancel_silence_timer(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    def _on_silence(self) -> None:
        self._silence_timer = None
        if self.state.phase != CallPhase.LISTENING or self.tracker.in_speech:
            return
        self.state.to(CallPhase.PROCESSING)
        if not self._reprompted:
            self._reprompted = True
            self._start_response(self._say(REPROMPT, TurnMetrics()))
        else:
            self._finish(EndedReason.SILENCE_TIMEOUT, SILENCE_GOODBYE)

    def _on_max_duration(self) -> None:
        self._max_timer = None
        self._spawn(self._close_with(EndedReason.MAX_DURATION, TIME_LIMIT_GOODBYE), "max-duration")

    async def _close_with(self, reason: str, goodbye: str) -> None:
        """Stop what is being said now, say ``goodbye``, then end with ``reason``."""
        if self.state.phase in (CallPhase.SPEAKING, CallPhase.PROCESSING):
            await self._interrupt()
        if self.state.phase == CallPhase.LISTENING:
            self.state.to(CallPhase.PROCESSING)
        self._finish(reason, goodbye)

    def _finish(self, reason: str, goodbye: str) -> None:
        """Say goodbye, wait for it to play (bounded), then end with ``reason``."""
        self._finishing = True
        if self.ended_reason is None:
            self.ended_reason = reason

        async def goodbye_then_end() -> None:
            try:
                async with asyncio.timeout(CLOSING_PLAYBACK_S):
                    await self._say(goodbye, TurnMetrics())
            finally:
                self.end(reason)

        self._start_response(goodbye_then_end())

    # ------------------------------------------------------------ history

    def _commit(
        self,
        speaker: Speaker,
        text: str,
        *,
        interrupted: bool = False,
        latency: dict[str, float] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        started: float | None = None,
    ) -> None:
        """``started``: when the turn began, on the session's clock (the caller's voice;
        the answer's first frame sent)."""
        ended_at = utcnow()
        turn = CommittedTurn(
            index=self._turn_index,
            speaker=str(speaker),
            text=text,
            interrupted=interrupted,
            started_at=(
                None
                if started is None
                else ended_at - timedelta(seconds=max(0.0, self.clock() - started))
            ),
            ended_at=ended_at,
            latency=latency or {},
            tool_calls=tool_calls or [],
        )
        self._turn_index += 1
        self.lifecycle.commit_turn(turn)
