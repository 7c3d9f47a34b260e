"""Calendar arithmetic for the booking tools: weekly opening hours -> bookable slots.

A calendar has a time zone, a fixed slot length and weekly opening hours in its own
local time: ``{"mon": [["09:00", "12:00"], ["13:00", "17:00"]], ...}``. Slots start at
each window's opening and follow each other without gaps; a slot must end by the
window's close. Local times are converted with the zone's rules for that date, so
daylight-saving changes move the UTC times, not the local ones. A local time that does
not exist (skipped by a DST change) is not a slot.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


def parse_clock(text: str) -> int:
    """ "HH:MM" -> minutes after midnight ("24:00" is the end of the day)."""
    if not isinstance(text, str) or not _CLOCK.match(text):
        raise ValueError(f"{text!r} is not a time of day as HH:MM")
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def normalize_availability(value: Any) -> dict[str, list[list[str]]]:
    """Validate weekly opening hours; windows sorted, none overlapping. Raises ValueError."""
    if not isinstance(value, dict):
        raise ValueError("availability must be an object keyed by weekday (mon ... sun)")
    result: dict[str, list[list[str]]] = {}
    for day, windows in value.items():
        if day not in WEEKDAYS:
            raise ValueError(f"{day!r} is not a weekday; use {', '.join(WEEKDAYS)}")
        if not isinstance(windows, list):
            raise ValueError(f"{day}: a list of [start, end] windows is needed")
        spans: list[tuple[int, int]] = []
        for window in windows:
            if not isinstance(window, list | tuple) or len(window) != 2:
                raise ValueError(f'{day}: each window is ["HH:MM", "HH:MM"]')
            start, end = parse_clock(window[0]), parse_clock(window[1])
            if start >= end:
                raise ValueError(f"{day}: a window must end after it starts ({window})")
            spans.append((start, end))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"{day}: windows overlap")
        result[day] = [[_clock(s), _clock(e)] for s, e in spans]
    return result


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class CalendarRules:
    timezone: str
    slot_minutes: int
    availability: dict[str, Any]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local_slots(self, day: date) -> list[datetime]:
        """Slot starts on ``day`` as aware local datetimes, earliest first."""
        zone = self.zone
        slots = []
        for window in self.availability.get(WEEKDAYS[day.weekday()], []):
            start, end = parse_clock(window[0]), parse_clock(window[1])
            minute = start
            while minute + self.slot_minutes <= end:
                naive = datetime.combine(day, time()) + timedelta(minutes=minute)
                local = naive.replace(tzinfo=zone)
                # A time skipped by a DST change does not survive the round trip.
                if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive:
                    slots.append(local)
                minute += self.slot_minutes
        return slots

    def is_slot(self, start: datetime) -> bool:
        """``start`` (aware) is the beginning of one of the calendar's slots."""
        local = start.astimezone(self.zone)
        return any(s == local for s in self.local_slots(local.date()))

    def parse_local(self, text: str) -> datetime:
        """ "YYYY-MM-DDTHH:MM" in the calendar's zone (or an ISO time with an offset) -> UTC."""
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)
        return value.astimezone(UTC)


def local_label(moment: datetime, zone: ZoneInfo) -> str:
    """ "Tuesday, March 4 at 9:30 AM" in the calendar's zone."""
    local = moment.astimezone(zone)
    clock = local.strftime("%I:%M %p").lstrip("0")
    return f"{local.strftime('%A, %B')} {local.day} at {clock}"


def local_iso(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M")
