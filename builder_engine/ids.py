"""Prefixed, random identifiers (``agt_3f2a...``): the prefix tells what an id names."""

from __future__ import annotations

import secrets

PREFIXES = {
    "organization": "org",
    "api_key": "key",
    "agent": "agt",
    "agent_version": "agv",
    "phone_number": "pn",
    "call": "call",
    "call_turn": "turn",
    "tool": "tool",
    "webhook_endpoint": "whe",
    "webhook_delivery": "whd",
    "call_event": "evt",
    "tool_execution": "txe",
    "calendar": "cal",
    "appointment": "apt",
}


def new_id(kind: str) -> str:
    return f"{PREFIXES[kind]}_{secrets.token_hex(12)}"
