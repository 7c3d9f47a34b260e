"""Activities of the PostCallWorkflow: the recording, the transcript check and the analysis.

The analysis goes through the agent's LLM endpoint (``brain``: model and base URL, the
key from ``OPENAI_API_KEY``) with the ``openai`` SDK, non-streaming. Each step reads the
transcript and the plan from the database itself; the workflow only sees results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import openai
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from openai import omit
from openai.types.chat import ChatCompletionMessageParam
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from builder_engine import recordings
from builder_engine.agent_config import AgentConfig
from builder_engine.config import Settings
from builder_engine.db.engine import session_factory
from builder_engine.db.models import AgentVersion, Call, CallTurn
from builder_engine.timeutil import as_utc
from realtime.providers.openai_llm import (
    OPENAI_DEFAULT_BASE_URL,
    OpenAIClients,
    resolve_base_url,
)
from workflows.post_call import (
    AnalysisPart,
    AnalysisRecord,
    AnalysisSteps,
    RecordingResult,
    TranscriptCheck,
)
from workflows.types import PostCallInput

log = logging.getLogger(__name__)

# Long calls: keep the beginning and the end of a transcript beyond this many characters.
MAX_TRANSCRIPT_CHARS = 60_000
RAW_OUTPUT_CHARS = 2_000
_NOT_RETRYABLE = frozenset({400, 401, 403, 404, 422})
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)

SUMMARY_PROMPT = (
    "You summarize phone calls handled by an AI voice agent. Write two to four sentences "
    "of plain prose: who called and why, what the agent did or agreed, and any follow-up. "
    "Use only facts stated in the transcript; write in the language of the call."
)
EXTRACTION_PROMPT = (
    "You extract data from the transcript of a phone call handled by an AI voice agent. "
    "Answer with one JSON object that validates against this JSON Schema, and nothing "
    "else. Leave out (or set to null where the schema allows) anything the transcript does "
    "not state; never invent values.\n\nJSON Schema:\n{schema}"
)
SUCCESS_PROMPT = (
    "You evaluate whether a phone call handled by an AI voice agent met its success "
    "criteria, using only the transcript. Answer with one JSON object: "
    '{{"success": true or false, "reason": "one or two sentences"}}.\n\n'
    "Success criteria:\n{criteria}"
)
SUCCESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"success": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["success", "reason"],
    "additionalProperties": False,
}


class PostCallActivities:
    """Bound to one database (an engine or a session factory) and the platform settings
    (recordings storage, LLM endpoint and key)."""

    def __init__(
        self,
        engine: AsyncEngine | async_sessionmaker[AsyncSession],
        settings: Settings | None,
        *,
        clients: OpenAIClients | None = None,
    ) -> None:
        """``settings`` None: a worker without recordings storage or LLM (tests): the
        recording is reported missing and the analysis skipped, saying so."""
        self._sessions: async_sessionmaker[AsyncSession] = (
            session_factory(engine) if isinstance(engine, AsyncEngine) else engine
        )
        self._settings = settings
        self._owns_clients = clients is None
        self._clients = clients or OpenAIClients(read_timeout_s=90.0)

    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.finalize_recording,
            self.check_transcript,
            self.plan_call_analysis,
            self.summarize_call,
            self.extract_structured_data,
            self.evaluate_call_success,
            self.save_call_analysis,
        ]

    async def aclose(self) -> None:
        if self._owns_clients:
            await self._clients.aclose()

    # ------------------------------------------------------------ loading

    async def _call(self, session: AsyncSession, job: PostCallInput) -> Call:
        call = (
            await session.exec(
                select(Call).where(
                    Call.id == job.call_id, Call.organization_id == job.organization_id
                )
            )
        ).first()
        if call is None:
            raise ApplicationError(f"call {job.call_id} does not exist", non_retryable=True)
        return call

    async def _config(self, session: AsyncSession, job: PostCallInput) -> AgentConfig | None:
        raw = (
            await session.exec(
                select(AgentVersion.config).where(
                    AgentVersion.agent_id == job.agent_id,
                    AgentVersion.version == job.agent_version,
                    AgentVersion.organization_id == job.organization_id,
                )
            )
        ).first()
        if raw is None:
            return None
        try:
            return AgentConfig.model_validate(raw)
        except ValidationError:
            log.warning(
                "agent %s v%s: stored config no longer validates", job.agent_id, job.agent_version
            )
            return None

    async def _turns(self, session: AsyncSession, job: PostCallInput) -> list[CallTurn]:
        return list(
            (
                await session.exec(
                    select(CallTurn)
                    .where(
                        CallTurn.call_id == job.call_id,
                        CallTurn.organization_id == job.organization_id,
                    )
                    .order_by(col(CallTurn.index))
                )
            ).all()
        )

    # ------------------------------------------------------------ recording

    @activity.defn(name="finalize_recording")
    async def finalize_recording(self, job: PostCallInput) -> RecordingResult:
        if self._settings is None:
            return RecordingResult("missing", detail="this worker has no recordings storage")
        settings = self._settings
        path = recordings.local_path(settings.effective_recordings_dir, job.call_id)
        # No connection is held across the file work and the upload: the pool is shared
        # with every other activity of the worker.
        async with self._sessions() as session:
            stored_url = (await self._call(session, job)).recording_url
        try:
            # Each realtime session of the call wrote its own segment: one file now.
            info = await asyncio.to_thread(
                recordings.assemble, settings.effective_recordings_dir, job.call_id
            )
        except ValueError as exc:
            return RecordingResult("failed", detail=f"unreadable recording: {exc}")
        if info is None:
            if stored_url:  # a retried attempt after the upload
                stored = await recordings.stat(stored_url)
                if stored is not None:
                    return RecordingResult("stored", stored_url, stored.size)
            return RecordingResult(
                "missing", detail="the call left no recording in the recordings folder"
            )
        if info.repaired:
            log.warning("call %s: repaired the recording's WAV header", job.call_id)
        if info.segments > 1:
            log.info("call %s: joined the recordings of %d sessions", job.call_id, info.segments)
        url = settings.recordings_url
        try:
            if url and url.startswith("s3://"):
                location = await recordings.upload(path, url, job.call_id)
            else:
                location = path.resolve().as_uri()
        except recordings.RecordingStorageError as exc:
            raise ApplicationError(str(exc)) from None
        async with self._sessions() as session:
            call = await self._call(session, job)
            call.recording_url = location
            session.add(call)
            await session.commit()
        if location.startswith("s3://"):
            await asyncio.to_thread(path.unlink, missing_ok=True)
        return RecordingResult("stored", location, info.size_bytes, info.duration_s)

    # ------------------------------------------------------------ transcript

    @activity.defn(name="check_transcript")
    async def check_transcript(self, job: PostCallInput) -> TranscriptCheck:
        """Every turn the CallWorkflow committed is stored, with no gap in the indexes."""
        async with self._sessions() as session:
            indexes = list(
                (
                    await session.exec(
                        select(CallTurn.index).where(
                            CallTurn.call_id == job.call_id,
                            CallTurn.organization_id == job.organization_id,
                        )
                    )
                ).all()
            )
        present = set(indexes)
        top = max(present) + 1 if present else 0
        if job.turns_committed is not None:
            top = max(top, job.turns_committed)
        missing = sorted(set(range(top)) - present)
        if missing:
            log.warning("call %s: transcript is missing turns %s", job.call_id, missing[:20])
        return TranscriptCheck(
            turns=len(present),
            complete=not missing,
            expected=job.turns_committed,
            missing_indexes=missing[:100],
        )

    # ------------------------------------------------------------ analysis

    def _llm_configured(self, config: AgentConfig) -> bool:
        settings = self._settings
        if settings is None:
            return False
        has_key = bool(settings.openai_api_key and settings.openai_api_key.get_secret_value())
        return has_key or config.brain.base_url is not None or bool(settings.openai_base_url)

    @activity.defn(name="plan_call_analysis")
    async def plan_call_analysis(self, job: PostCallInput) -> AnalysisSteps:
        async with self._sessions() as session:
            config = await self._config(session, job)
            turns = await self._turns(session, job)
        if config is None:
            return AnalysisSteps(
                skip_reason=f"agent version {job.agent_version} of {job.agent_id} is not readable"
            )
        plan = config.analysis
        steps = AnalysisSteps(
            summary=plan.summary,
            structured_data=plan.structured_data_schema is not None,
            success_evaluation=bool(plan.success_criteria),
            model=config.brain.model,
        )
        if not (steps.summary or steps.structured_data or steps.success_evaluation):
            return AnalysisSteps(skip_reason="the agent's analysis plan asks for nothing")
        if not self._llm_configured(config):
            return AnalysisSteps(
                skip_reason="no LLM is configured: set OPENAI_API_KEY, OPENAI_BASE_URL or "
                "the agent's brain.base_url"
            )
        if not turns:
            return AnalysisSteps(skip_reason="nothing was said on the call")
        return steps

    async def _inputs(self, job: PostCallInput) -> tuple[AgentConfig, str]:
        async with self._sessions() as session:
            call = await self._call(session, job)
            config = await self._config(session, job)
            turns = await self._turns(session, job)
        if config is None:
            raise ApplicationError("the agent version is not readable", non_retryable=True)
        return config, transcript_text(call, turns)

    @activity.defn(name="summarize_call")
    async def summarize_call(self, job: PostCallInput) -> AnalysisPart:
        config, transcript = await self._inputs(job)
        text = await self._complete(
            config,
            [
                {"role": "system", "content": SUMMARY_PROMPT},
                {"role": "user", "content": transcript},
            ],
            max_tokens=400,
        )
        text = text.strip()
        if not text:
            return AnalysisPart("failed", error="the model returned an empty summary")
        return AnalysisPart("ok", value=text)

    @activity.defn(name="extract_structured_data")
    async def extract_structured_data(self, job: PostCallInput) -> AnalysisPart:
        config, transcript = await self._inputs(job)
        schema = config.analysis.structured_data_schema
        if schema is None:
            return AnalysisPart("failed", error="the agent has no structured_data_schema")
        prompt = EXTRACTION_PROMPT.format(schema=json.dumps(schema, indent=2))
        return await self._json_part(config, prompt, transcript, "structured_data", schema)

    @activity.defn(name="evaluate_call_success")
    async def evaluate_call_success(self, job: PostCallInput) -> AnalysisPart:
        config, transcript = await self._inputs(job)
        criteria = config.analysis.success_criteria or ""
        prompt = SUCCESS_PROMPT.format(criteria=criteria)
        return await self._json_part(
            config, prompt, transcript, "success_evaluation", SUCCESS_SCHEMA, strict=True
        )

    async def _json_part(
        self,
        config: AgentConfig,
        prompt: str,
        transcript: str,
        name: str,
        schema: dict[str, Any],
        *,
        strict: bool = False,
    ) -> AnalysisPart:
        """Ask for JSON that validates against ``schema``; one more try with the error
        shown to the model, then the failure is recorded (never papered over)."""
        json_schema: dict[str, Any] = {"name": name, "schema": schema}
        if strict:
            json_schema["strict"] = True
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": prompt},
            {"role": "user", "content": transcript},
        ]
        validator = Draft202012Validator(schema)
        raw = ""
        problem = ""
        for attempt in (1, 2):
            raw = await self._complete(
                config,
                messages,
                response_format={"type": "json_schema", "json_schema": json_schema},
                max_tokens=2_000,
            )
            value, problem = parse_and_validate(raw, validator)
            if not problem:
                return AnalysisPart("ok", value=value, attempts=attempt)
            log.info("%s: attempt %d did not validate: %s", name, attempt, problem)
            messages = [
                *messages,
                {"role": "assistant", "content": raw},
                {
                    "role": "user",
                    "content": f"That answer is not valid: {problem}. Answer again with only "
                    "a JSON object that validates against the schema.",
                },
            ]
        return AnalysisPart(
            "invalid",
            error=f"the model's output did not validate against the schema: {problem}",
            attempts=2,
            raw_output=raw[:RAW_OUTPUT_CHARS],
        )

    async def _complete(
        self,
        config: AgentConfig,
        messages: list[ChatCompletionMessageParam],
        *,
        max_tokens: int,
        response_format: dict[str, Any] | None = None,
    ) -> str:
        if self._settings is None:
            raise ApplicationError("this worker has no LLM configured", non_retryable=True)
        base_url = resolve_base_url(config.brain, self._settings)
        key = self._settings.openai_api_key
        api_key = key.get_secret_value() if key else ""
        if not api_key:
            if base_url == OPENAI_DEFAULT_BASE_URL:
                raise ApplicationError("no OPENAI_API_KEY for api.openai.com", non_retryable=True)
            api_key = "not-needed"  # local servers ignore it; the SDK requires one
        on_openai = base_url == OPENAI_DEFAULT_BASE_URL
        client = self._clients.get(base_url, api_key)
        try:
            response = await client.chat.completions.create(
                model=config.brain.model,
                messages=messages,
                temperature=0,
                response_format=response_format if response_format else omit,  # type: ignore[arg-type]
                max_completion_tokens=max_tokens if on_openai else omit,
                max_tokens=omit if on_openai else max_tokens,
            )
        except openai.APIStatusError as exc:
            message = f"{base_url} answered {exc.status_code}: {exc.message}"
            raise ApplicationError(
                message, non_retryable=exc.status_code in _NOT_RETRYABLE
            ) from None
        except openai.OpenAIError as exc:
            raise ApplicationError(f"{base_url}: {type(exc).__name__}: {exc}") from None
        if not response.choices:
            raise ApplicationError(f"{base_url} returned no choices")
        return response.choices[0].message.content or ""

    @activity.defn(name="save_call_analysis")
    async def save_call_analysis(self, record: AnalysisRecord) -> None:
        async with self._sessions() as session:
            call = (
                await session.exec(
                    select(Call).where(
                        Call.id == record.call_id, Call.organization_id == record.organization_id
                    )
                )
            ).first()
            if call is None:
                raise ApplicationError(f"call {record.call_id} does not exist", non_retryable=True)
            call.analysis = dict(record.analysis)
            session.add(call)
            await session.commit()


def parse_and_validate(raw: str, validator: Draft202012Validator) -> tuple[Any, str]:
    """(value, "") when ``raw`` is a JSON object valid for the schema, else (None, why)."""
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        return None, f"{where}: {error.message}"
    return value, ""


def _clock(at: datetime | None, origin: datetime | None) -> str:
    if at is None or origin is None:
        return ""
    seconds = max(0, int((as_utc(at) - as_utc(origin)).total_seconds()))
    return f"[{seconds // 60:02d}:{seconds % 60:02d}] "


def transcript_text(call: Call, turns: list[CallTurn]) -> str:
    """The call as the model reads it: a header, then one line per turn (tool calls and
    their results indented under the turn that made them)."""
    origin = call.answered_at or call.started_at or (turns[0].started_at if turns else None)
    header = [f"Call direction: {call.direction}."]
    if call.ended_reason:
        header.append(f"Ended: {call.ended_reason}.")
    if call.ended_at and origin:
        header.append(
            f"Duration: {int((as_utc(call.ended_at) - as_utc(origin)).total_seconds())} s."
        )
    lines = [" ".join(header), "", "Transcript:"]
    for turn in turns:
        who = "Agent" if turn.speaker == "agent" else "Caller"
        cut = " [interrupted by the caller]" if turn.interrupted else ""
        lines.append(f"{_clock(turn.started_at, origin)}{who}: {turn.text}{cut}")
        for tool_call in turn.tool_calls:
            shown = json.dumps(tool_call, ensure_ascii=False, default=str)
            lines.append(f"    (tool call: {shown[:2_000]})")
    text = "\n".join(lines)
    if len(text) > MAX_TRANSCRIPT_CHARS:
        half = MAX_TRANSCRIPT_CHARS // 2
        text = f"{text[:half]}\n[... middle of the call left out ...]\n{text[-half:]}"
    return text
