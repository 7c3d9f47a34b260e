"""Transfers and supervisor hang-ups inside the CallWorkflow (deterministic code only).

``CallControl`` (held in the workflow's state) runs the carrier activities
(``transfer_call``, ``hang_up_call`` in ``activities/telephony.py``) and remembers why the
call is ending: once a transfer bridged the caller elsewhere, or a supervisor hung up,
the media stream's end (which the realtime session may see as the caller leaving) is
recorded with that reason (``transferred``, ``supervisor-hangup``), not as a caller
hang-up. A successful transfer is published as ``call.transferred``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from builder_engine.calls import EndedReason
    from workflows.events import publish_event

TRANSFER_MODES = ("cold", "warm")
DEFAULT_RING_TIMEOUT_S = 20
MAX_RING_TIMEOUT_S = 120
CONTROL_HEARTBEAT = timedelta(seconds=5)


@dataclass(frozen=True)
class TransferRequest:
    """``to``: E.164. ``summary``: said to the answering party first (warm).
    ``announcement``: said to the caller before a cold transfer dials."""

    call_id: str
    organization_id: str
    to: str
    mode: str = "cold"
    summary: str | None = None
    announcement: str | None = None
    ring_timeout_s: int = DEFAULT_RING_TIMEOUT_S
    requested_by: str = "tool"  # tool | supervisor
    reference: str = ""  # the tool call id, or a supervisor request id


@dataclass(frozen=True)
class TransferResult:
    """``status``: transferred | no-answer | busy | failed | unsupported."""

    status: str
    to: str
    mode: str
    caller_call_sid: str | None = None
    leg_call_sid: str | None = None
    conference: str | None = None
    detail: str = ""

    @property
    def transferred(self) -> bool:
        return self.status == "transferred"


@dataclass(frozen=True)
class HangUpRequest:
    call_id: str
    organization_id: str


@dataclass(frozen=True)
class HangUpResult:
    """``status``: hung-up (the carrier ends the call) | ended (a web call, ended here)."""

    status: str
    call_sid: str | None = None


class CallControl:
    def __init__(self) -> None:
        #: Why the call ends, whatever the media side reports (set by a transfer/hang-up).
        #: Carried across continue-as-new (``CallCarry.forced_reason``).
        self.forced_reason: str | None = None
        self._transferring = False
        self._hanging_up = False

    def ended_reason(self, reported: str) -> str:
        return self.forced_reason or reported

    @property
    def in_progress(self) -> bool:
        """A transfer or a hang-up is under way: its carrier activity has not answered."""
        return self._transferring or self._hanging_up

    async def transfer(self, request: TransferRequest) -> TransferResult:
        if self.forced_reason is not None:
            return TransferResult("failed", request.to, request.mode, detail="the call is ending")
        if self._transferring:
            return TransferResult(
                "failed", request.to, request.mode, detail="another transfer is in progress"
            )
        self._transferring = True
        try:
            warm = request.mode == "warm"
            result: TransferResult = await workflow.execute_activity(
                "transfer_call",
                request,
                result_type=TransferResult,
                start_to_close_timeout=timedelta(seconds=request.ring_timeout_s + 30),
                heartbeat_timeout=CONTROL_HEARTBEAT if warm else None,
                # A warm transfer dials a new leg: never twice. A cold one redirects the
                # caller's call to the same TwiML: safe to repeat.
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=300),
                    maximum_attempts=1 if warm else 3,
                    non_retryable_error_types=["TelephonyNotConfigured", "CallGone"],
                ),
                summary=f"{request.mode} transfer to {request.to}",
            )
        except ActivityError as exc:
            cause = exc.cause
            detail = cause.message if isinstance(cause, ApplicationError) else str(cause)
            workflow.logger.warning("transfer of %s failed: %s", request.call_id, detail)
            result = TransferResult("failed", request.to, request.mode, detail=detail)
        finally:
            self._transferring = False
        if result.transferred:
            self.forced_reason = EndedReason.TRANSFERRED
            await publish_event(
                "call.transferred",
                call_id=request.call_id,
                organization_id=request.organization_id,
                detail={
                    "to": request.to,
                    "mode": request.mode,
                    "requested_by": request.requested_by,
                    "reference": request.reference,
                    "caller_call_sid": result.caller_call_sid,
                    "leg_call_sid": result.leg_call_sid,
                    "conference": result.conference,
                },
            )
        return result

    async def hang_up(self, request: HangUpRequest) -> HangUpResult:
        self.forced_reason = self.forced_reason or EndedReason.SUPERVISOR_HANGUP
        self._hanging_up = True
        try:
            result: HangUpResult = await workflow.execute_activity(
                "hang_up_call",
                request,
                result_type=HangUpResult,
                start_to_close_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=300),
                    maximum_attempts=5,
                    non_retryable_error_types=["TelephonyNotConfigured"],
                ),
                summary="supervisor hang-up",
            )
        finally:
            self._hanging_up = False
        return result


def _e164(value: object) -> str | None:
    text = str(value or "").strip()
    digits = text[1:]
    if text.startswith("+") and digits.isdigit() and 8 <= len(digits) <= 15:
        return text
    return None


def tool_transfer(
    call_id: str,
    organization_id: str,
    reference: str,
    settings: dict[str, object],
    arguments: dict[str, object],
) -> TransferRequest | str | None:
    """A ``transfer_call`` tool's request from its config (``destination`` number or
    ``destinations`` by name, ``mode``, ``summary``, ``announcement``,
    ``ring_timeout_s``) and the model's arguments (``destination`` name, ``summary``) -
    or a message for the model, or None when the tool has no destination configured. The
    model never dials a number the config does not name."""
    named = settings.get("destinations")
    wanted = str(arguments.get("destination") or "").strip()
    to: str | None = None
    if isinstance(named, dict) and named:
        lookup = {str(k).lower(): v for k, v in named.items()}
        if wanted.lower() in lookup:
            to = _e164(lookup[wanted.lower()])
        elif not settings.get("destination"):
            return f"Unknown destination {wanted!r}; choose one of: {', '.join(map(str, named))}."
    if to is None:
        to = _e164(settings.get("destination"))
    if to is None:
        return None
    mode = str(settings.get("mode") or "cold")
    if mode not in TRANSFER_MODES:
        mode = "cold"
    timeout = settings.get("ring_timeout_s", DEFAULT_RING_TIMEOUT_S)
    ring = int(timeout) if isinstance(timeout, int | float) else DEFAULT_RING_TIMEOUT_S
    summary = str(arguments.get("summary") or settings.get("summary") or "") or None
    announcement = settings.get("announcement")
    return TransferRequest(
        call_id=call_id,
        organization_id=organization_id,
        to=to,
        mode=mode,
        summary=summary,
        announcement=str(announcement) if announcement else None,
        ring_timeout_s=max(5, min(ring, MAX_RING_TIMEOUT_S)),
        requested_by="tool",
        reference=reference,
    )
