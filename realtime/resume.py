"""A live call taking over on this realtime worker after the one serving it died.

The CallWorkflow holds the turns as heard (``resume_state`` query); the new session
rebuilds its Conversation from them - caller words, what the caller heard of the agent,
tool calls with their results - and goes on without greeting again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from builder_engine.calls import Speaker
from realtime.conversation import MISSING_TOOL_RESULT, Conversation
from realtime.providers.base import ToolCall
from workflows.types import CommittedTurn

log = logging.getLogger(__name__)

#: Said first on a call that moved workers mid-conversation.
RESUME_LINE = "Sorry about that, where were we?"


def rebuild(conversation: Conversation, turns: Sequence[CommittedTurn]) -> int:
    """Replay ``turns`` into ``conversation``; the index the next committed turn takes."""
    next_index = 0
    for turn in turns:
        next_index = max(next_index, turn.index + 1)
        if turn.speaker == Speaker.CALLER:
            conversation.add_user(turn.text)
            continue
        calls = [
            ToolCall(str(c.get("id", "")), str(c.get("name", "")), str(c.get("arguments", "{}")))
            for c in turn.tool_calls
            if c.get("id")
        ]
        if calls:
            conversation.add_tool_calls(calls)
            by_id = {str(c.get("id")): c for c in turn.tool_calls}
            for call in calls:
                result = by_id[call.id].get("result")
                conversation.add_tool_result(
                    call.id, str(result) if result is not None else MISSING_TOOL_RESULT
                )
        conversation.add_assistant(turn.text, interrupted=turn.interrupted)
    return next_index
