"""Call lifecycle vocabulary shared by the API, the realtime worker and the workflows."""

from __future__ import annotations

from enum import StrEnum


class CallStatus(StrEnum):
    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in-progress"
    FORWARDING = "forwarding"
    ENDED = "ended"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    WEB = "web"


class EndedReason(StrEnum):
    """Why a call ended: one fixed, documented set (docs/ARCHITECTURE.md)."""

    CALLER_HANGUP = "caller-hangup"
    AGENT_HANGUP = "agent-hangup"
    END_CALL_PHRASE = "end-call-phrase"
    SILENCE_TIMEOUT = "silence-timeout"
    MAX_DURATION = "max-duration"
    TRANSFERRED = "transferred"
    VOICEMAIL = "voicemail"
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    FAILED = "failed"
    CANCELED = "canceled"
    SUPERVISOR_HANGUP = "supervisor-hangup"
    PROVIDER_ERROR = "provider-error"
    MEDIA_ERROR = "media-error"
    LOST = "lost"


class Speaker(StrEnum):
    CALLER = "caller"
    AGENT = "agent"
