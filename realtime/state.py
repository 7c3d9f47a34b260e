"""The per-call state machine: IDLE -> LISTENING -> PROCESSING -> SPEAKING -> LISTENING."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class CallPhase(StrEnum):
    IDLE = "idle"  # connected, nothing said yet
    LISTENING = "listening"  # the caller has the floor
    PROCESSING = "processing"  # the caller's turn ended; the answer is being prepared
    SPEAKING = "speaking"  # the agent's audio is going out
    ENDED = "ended"


ALLOWED: dict[CallPhase, frozenset[CallPhase]] = {
    # IDLE -> PROCESSING: the greeting is being prepared.
    CallPhase.IDLE: frozenset(
        {CallPhase.LISTENING, CallPhase.PROCESSING, CallPhase.SPEAKING, CallPhase.ENDED}
    ),
    CallPhase.LISTENING: frozenset({CallPhase.PROCESSING, CallPhase.SPEAKING, CallPhase.ENDED}),
    # PROCESSING -> LISTENING: the caller went on talking before the answer began.
    CallPhase.PROCESSING: frozenset({CallPhase.SPEAKING, CallPhase.LISTENING, CallPhase.ENDED}),
    # SPEAKING -> PROCESSING: a tool call in the middle of an answer.
    CallPhase.SPEAKING: frozenset({CallPhase.LISTENING, CallPhase.PROCESSING, CallPhase.ENDED}),
    CallPhase.ENDED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


class CallStateMachine:
    def __init__(self, on_change: Callable[[CallPhase, CallPhase], None] | None = None) -> None:
        self.phase = CallPhase.IDLE
        self._on_change = on_change

    def to(self, phase: CallPhase) -> None:
        if phase == self.phase:
            return
        if phase not in ALLOWED[self.phase]:
            raise InvalidTransition(f"{self.phase} -> {phase} is not allowed")
        previous, self.phase = self.phase, phase
        if self._on_change is not None:
            self._on_change(previous, phase)

    @property
    def ended(self) -> bool:
        return self.phase == CallPhase.ENDED
