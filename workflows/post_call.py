"""PostCallWorkflow: a call's paperwork, a child of its CallWorkflow (id ``{call_id}-post-call``).

1. ``finalize_recording``: check (and repair) the WAV the realtime worker wrote, keep it in
   the recordings folder or upload it to S3-compatible storage, record where it is;
2. ``check_transcript``: the turns the CallWorkflow committed are all stored;
3. publish ``call.ended`` (with the transcript);
4. ``plan_call_analysis``, then the agent version's analysis plan through the LLM, in
   parallel: ``summarize_call``, ``extract_structured_data`` (validated against the
   agent's JSON schema), ``evaluate_call_success``; ``save_call_analysis`` stores it in
   ``Call.analysis``. Without a configured LLM the analysis is skipped with the reason;
5. publish ``call.analyzed``.

A step that fails for good is recorded and the next one still runs: the events always go
out. Activities read the transcript and the agent's plan from the database, so neither
(nor any credential) travels through the workflow's history.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.events import publish_event
    from workflows.types import PostCallInput

DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=20,
)
# Recording storage (S3 may be briefly unreachable): a few minutes, then give up.
STORAGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)  # fmt: skip
# The LLM: transient errors (429, 5xx, timeouts) are retried; 4xx answers are not.
LLM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
)  # fmt: skip


@dataclass(frozen=True)
class RecordingResult:
    status: str  # stored | missing | failed
    location: str | None = None  # file:///... or s3://bucket/key
    size_bytes: int = 0
    duration_s: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class TranscriptCheck:
    turns: int
    complete: bool
    expected: int | None = None
    missing_indexes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AnalysisSteps:
    """What the agent's plan asks for, or why nothing is analyzed."""

    summary: bool = False
    structured_data: bool = False
    success_evaluation: bool = False
    model: str | None = None
    skip_reason: str | None = None


@dataclass(frozen=True)
class AnalysisPart:
    """One LLM step's outcome. ``status``: ok | invalid (the output never validated) | failed."""

    status: str
    value: Any = None
    error: str | None = None
    attempts: int = 1
    raw_output: str | None = None


@dataclass(frozen=True)
class AnalysisRecord:
    call_id: str
    organization_id: str
    analysis: dict[str, Any]


@dataclass(frozen=True)
class PostCallResult:
    recording: RecordingResult
    transcript: TranscriptCheck | None
    analysis_status: str
    events: list[str]


PART_ACTIVITIES = {
    "summary": "summarize_call",
    "structured_data": "extract_structured_data",
    "success_evaluation": "evaluate_call_success",
}


# Outside the sandbox: a new run per call, and building a sandboxed instance re-imports
# this module - ~40 ms of worker CPU per call, a third of the worker's cost of a call's
# wrap-up (docs/performance.md). tests/test_post_call.py replays a post-call history
# inside the sandbox, which fails on any call the sandbox forbids.
@workflow.defn(name="PostCallWorkflow", sandboxed=False)
class PostCallWorkflow:
    @workflow.run
    async def run(self, job: PostCallInput) -> PostCallResult:
        recording = await self._finalize_recording(job)
        transcript = await self._check_transcript(job)
        events = []
        ended = await publish_event(
            "call.ended", call_id=job.call_id, organization_id=job.organization_id
        )
        events.append(ended.event_id)

        analysis = await self._analyze(job, transcript)
        await workflow.execute_local_activity(
            "save_call_analysis",
            AnalysisRecord(job.call_id, job.organization_id, analysis),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )
        analyzed = await publish_event(
            "call.analyzed", call_id=job.call_id, organization_id=job.organization_id
        )
        events.append(analyzed.event_id)
        return PostCallResult(recording, transcript, str(analysis["status"]), events)

    async def _finalize_recording(self, job: PostCallInput) -> RecordingResult:
        try:
            result: RecordingResult = await workflow.execute_activity(
                "finalize_recording",
                job,
                result_type=RecordingResult,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=STORAGE_RETRY,
            )
            return result
        except ActivityError as exc:
            return RecordingResult("failed", detail=_reason(exc))

    async def _check_transcript(self, job: PostCallInput) -> TranscriptCheck | None:
        try:
            check: TranscriptCheck = await workflow.execute_local_activity(
                "check_transcript",
                job,
                result_type=TranscriptCheck,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=DB_RETRY,
            )
            return check
        except ActivityError:
            return None

    async def _analyze(
        self, job: PostCallInput, transcript: TranscriptCheck | None
    ) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        if transcript is not None:
            checked = {"turns": transcript.turns, "complete": transcript.complete}
        try:
            steps: AnalysisSteps = await workflow.execute_local_activity(
                "plan_call_analysis",
                job,
                result_type=AnalysisSteps,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=DB_RETRY,
            )
        except ActivityError as exc:
            steps = AnalysisSteps(
                skip_reason=f"the analysis plan could not be read: {_reason(exc)}"
            )
        if steps.skip_reason is not None:
            return {"status": "skipped", "reason": steps.skip_reason, "transcript": checked}

        wanted = [
            name
            for name, on in (
                ("summary", steps.summary),
                ("structured_data", steps.structured_data),
                ("success_evaluation", steps.success_evaluation),
            )
            if on
        ]
        parts = await asyncio.gather(*(self._part(job, name) for name in wanted))
        analysis: dict[str, Any] = {"status": "", "model": steps.model}
        errors: dict[str, Any] = {}
        for name, part in zip(wanted, parts, strict=True):
            analysis[name] = part.value if part.status == "ok" else None
            if part.status != "ok":
                errors[name] = {
                    "status": part.status,
                    "message": part.error,
                    "attempts": part.attempts,
                    **({"raw_output": part.raw_output} if part.raw_output else {}),
                }
        ok = len(wanted) - len(errors)
        analysis["status"] = "completed" if not errors else ("partial" if ok else "failed")
        if errors:
            analysis["errors"] = errors
        analysis["transcript"] = checked
        analysis["analyzed_at"] = workflow.now().isoformat()
        return analysis

    async def _part(self, job: PostCallInput, name: str) -> AnalysisPart:
        try:
            part: AnalysisPart = await workflow.execute_activity(
                PART_ACTIVITIES[name],
                job,
                result_type=AnalysisPart,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=LLM_RETRY,
            )
            return part
        except ActivityError as exc:
            return AnalysisPart("failed", error=_reason(exc))


def _reason(exc: ActivityError) -> str:
    return str(exc.cause) if exc.cause is not None else str(exc)
