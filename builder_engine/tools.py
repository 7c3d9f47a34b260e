"""Tool definitions as a call sees them: what the model is offered and how each tool runs.

The realtime session (to offer the tools to the model) and the CallWorkflow (to validate
arguments and run them) load the same definitions: the agent version's ``tools`` (tool
ids), scoped by organization, deleted tools left out. ``ToolDef`` carries no secret: it
travels in Temporal payloads. Secrets (a webhook tool's signing secret) stay in the
tool's stored config and are read by the activity that needs them.
"""

# No ``from __future__ import annotations`` here: ``ToolDef`` is decoded inside the
# workflow sandbox, whose type-hint lookup cannot see this module's globals (it is
# imported through a passed-through module), so its annotations must be real objects.

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from builder_engine.db.models import ToolDefinition

TOOL_KINDS = (
    "end_call",
    "transfer_call",
    "hold",
    "send_dtmf",
    "book_appointment",
    "check_availability",
    "webhook",
)
CALENDAR_KINDS = ("book_appointment", "check_availability")

DEFAULT_FILLER = "One moment, please."
DEFAULT_FILLER_AFTER_S = 1.5
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_HOLD_S = 30.0
# Keys of a tool's stored config that never leave the database (API output, payloads).
SECRET_CONFIG_KEYS = frozenset({"signing_secret"})

_DTMF_PATTERN = "^[0-9A-Da-d*#wW,]{1,64}$"

#: Parameters a built-in tool gets when it is created without its own schema.
DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {
    "end_call": {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "description": "Why the call is ending, briefly."}
        },
        "additionalProperties": False,
    },
    "transfer_call": {
        "type": "object",
        "properties": {
            "destination": {"type": "string", "description": "Who or which number to reach."},
            "summary": {
                "type": "string",
                "maxLength": 1000,
                "description": "For a warm transfer: a short summary of the call for the "
                "person who answers.",
            },
        },
        "additionalProperties": False,
    },
    "hold": {
        "type": "object",
        "properties": {
            "seconds": {
                "type": "integer",
                "minimum": 1,
                "maximum": 600,
                "description": "How long to hold the caller (capped by the tool's limit).",
            }
        },
        "additionalProperties": False,
    },
    "send_dtmf": {
        "type": "object",
        "properties": {
            "digits": {
                "type": "string",
                "pattern": _DTMF_PATTERN,
                "description": "Keypad tones to send: 0-9, *, #, A-D; 'w' or ',' waits 0.5 s.",
            }
        },
        "required": ["digits"],
        "additionalProperties": False,
    },
    "check_availability": {
        "type": "object",
        "properties": {
            "date": {
                "type": "string",
                "format": "date",
                "description": "First day to look at, YYYY-MM-DD in the calendar's time "
                "zone. Default: today.",
            },
            "days": {
                "type": "integer",
                "minimum": 1,
                "maximum": 14,
                "description": "How many days to look at (default 1).",
            },
        },
        "additionalProperties": False,
    },
    "book_appointment": {
        "type": "object",
        "properties": {
            "start": {
                "type": "string",
                "description": "Start of a free slot as check_availability returned it "
                "(YYYY-MM-DDTHH:MM, the calendar's local time).",
            },
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "phone": {"type": "string", "maxLength": 32},
            "notes": {"type": "string", "maxLength": 1000},
        },
        "required": ["start", "name"],
        "additionalProperties": False,
    },
}


@dataclass(frozen=True)
class ToolDef:
    """One tool of a call, without secrets.

    ``attempts``: how often the platform may run it. A tool is retried (up to
    ``max_attempts``) when it is ``safe_to_retry`` or idempotent by key - the built-ins
    record each (call id, tool call id) once and webhook receivers get an
    ``Idempotency-Key`` - otherwise it runs at most once.
    """

    id: str
    name: str
    kind: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 10.0
    safe_to_retry: bool = False
    idempotent: bool = True
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    filler_message: str | None = None
    filler_after_s: float = DEFAULT_FILLER_AFTER_S
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def attempts(self) -> int:
        return max(1, self.max_attempts) if (self.safe_to_retry or self.idempotent) else 1

    @property
    def filler(self) -> str:
        return self.filler_message or DEFAULT_FILLER


# Never copied into payloads either: a URL may carry a token in its query string, and
# the webhook activity reads it from the database anyway.
_NOT_IN_PAYLOADS = SECRET_CONFIG_KEYS | {"url"}


def payload_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _NOT_IN_PAYLOADS}


def _number(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def tool_def(row: ToolDefinition) -> ToolDef:
    config = payload_config(row.config)
    idempotent = row.kind != "webhook" or bool(config.get("honors_idempotency_key", True))
    return ToolDef(
        id=row.id,
        name=row.name,
        kind=row.kind,
        description=row.description,
        parameters=row.parameters or {"type": "object", "properties": {}},
        timeout_s=float(row.timeout_s),
        safe_to_retry=row.safe_to_retry,
        idempotent=idempotent,
        max_attempts=int(_number(config.get("max_attempts"), DEFAULT_MAX_ATTEMPTS)),
        filler_message=row.filler_message,
        filler_after_s=_number(config.get("filler_after_s"), DEFAULT_FILLER_AFTER_S),
        settings=config,
    )


async def load_agent_tools(
    session: AsyncSession, organization_id: str, tool_ids: Sequence[str]
) -> list[ToolDef]:
    """The organization's live tools among ``tool_ids``, in the agent's order."""
    if not tool_ids:
        return []
    rows = (
        await session.exec(
            select(ToolDefinition).where(
                ToolDefinition.organization_id == organization_id,
                col(ToolDefinition.id).in_(list(tool_ids)),
                col(ToolDefinition.deleted_at).is_(None),
            )
        )
    ).all()
    by_id = {row.id: row for row in rows}
    return [tool_def(by_id[i]) for i in tool_ids if i in by_id]
