"""Payloads exchanged between the realtime worker, the workflows and the activities.

Plain dataclasses so Temporal's default converter serializes them and the Temporal UI
shows them as readable JSON. No payload carries a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: A CallWorkflow run continues as new once its history holds this many events (Temporal
#: warns from 10,240 and refuses from 51,200; a run this short replays quickly too).
HISTORY_LIMIT = 1_500
#: Runs shorter than this would do little more than carry the call on to the next one.
MIN_HISTORY_LIMIT = 100


@dataclass(frozen=True)
class CallStart:
    call_id: str
    organization_id: str
    agent_id: str
    agent_version: int
    direction: str
    from_number: str | None = None
    to_number: str | None = None
    campaign_id: str | None = None
    # A long call's state, when its workflow continued as new (None on the first run).
    carried: CallCarry | None = None
    # Events per run before the call goes on in a fresh run (at least MIN_HISTORY_LIMIT).
    history_limit: int = HISTORY_LIMIT


@dataclass(frozen=True)
class CommittedTurn:
    """One turn as the caller heard it (an interrupted agent turn keeps only what played)."""

    index: int
    speaker: str
    text: str
    interrupted: bool = False
    started_at: datetime | None = None
    ended_at: datetime | None = None
    latency: dict[str, float] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class CallStatusChange:
    call_id: str
    organization_id: str
    status: str
    at: datetime
    ended_reason: str | None = None


@dataclass(frozen=True)
class TurnBatch:
    call_id: str
    organization_id: str
    turns: list[CommittedTurn]


@dataclass
class CallState:
    """What a query on a CallWorkflow returns."""

    status: str
    turns_committed: int
    ended_reason: str | None


@dataclass(frozen=True)
class PostCallInput:
    """What the PostCallWorkflow (a child of CallWorkflow) needs to finish a call's paperwork."""

    call_id: str
    organization_id: str
    agent_id: str
    agent_version: int
    ended_reason: str
    # Turns the CallWorkflow committed: the post-call transcript check expects as many.
    turns_committed: int | None = None


@dataclass(frozen=True)
class CallCarry:
    """The CallWorkflow's state across continue-as-new (see workflows/liveness.py)."""

    status: str
    answered: bool
    committed: int
    history: list[CommittedTurn]
    pending: list[CommittedTurn]
    tool_outcomes: list[dict[str, Any]]  # workflows.tools.ToolOutcome, as plain dicts
    instance: str | None  # the realtime process serving the call (workflows/liveness.py)
    registered: bool
    lost: bool
    moves: int
    moved_at: datetime | None
    runs: int
    # Why the call ends whatever the media side reports, once a transfer bridged the
    # caller elsewhere or a supervisor hung up (workflows/transfers.py CallControl).
    forced_reason: str | None = None
    # Processes the call moved away from whose watch lists still hold it (liveness.py).
    left: list[str] = field(default_factory=list)
