"""Clinic-local time ⇄ UTC, and template expansion into slots.

A template says "Mondays 08:00–17:00 local, 15-minute slots".  Each day's
window is converted to UTC once and then cut in absolute time, so slots never
overlap, even on the night the clocks change: on a spring-forward day a window
that spans the gap is an hour shorter; on a fall-back day an hour longer.  A
local start that does not exist (inside the gap) is read with the offset in
force before the change (PEP 495 ``fold=0``), i.e. it moves forward by the
gap; an ambiguous one (inside the repeated hour) means its first occurrence.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Iterator
from zoneinfo import ZoneInfo

UNIT_MINUTES = 5  # granularity of the double-booking guard; slot lengths are multiples


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_to_utc(day: date, at: time, tz: str) -> datetime:
    return datetime.combine(day, at, tzinfo=zone(tz)).astimezone(timezone.utc)


def to_local(instant: datetime, tz: str) -> datetime:
    return instant.astimezone(zone(tz))


@dataclass(frozen=True)
class SlotTime:
    start: datetime  # UTC
    end: datetime  # UTC
    local_weekday: int
    local_minute: int


def day_slots(day: date, start: time, end: time, slot_minutes: int, tz: str) -> list[SlotTime]:
    """Slots of one local day's window, cut in absolute time (see module doc)."""
    window_start = local_to_utc(day, start, tz)
    # A window ending at 00:00 means midnight at the end of the day.
    end_day = day + timedelta(days=1) if end <= start else day
    window_end = local_to_utc(end_day, end, tz)
    length = timedelta(minutes=slot_minutes)
    slots = []
    cursor = window_start
    while cursor + length <= window_end:
        local = cursor.astimezone(zone(tz))
        slots.append(
            SlotTime(cursor, cursor + length, local.weekday(), local.hour * 60 + local.minute)
        )
        cursor += length
    return slots


def expand(
    weekdays: list[int],
    start: time,
    end: time,
    slot_minutes: int,
    tz: str,
    first_day: date,
    last_day: date,
    effective_from: date,
    effective_to: date | None,
) -> Iterator[SlotTime]:
    """Every slot of a weekly template between two local dates, inclusive."""
    day = max(first_day, effective_from)
    stop = min(last_day, effective_to) if effective_to else last_day
    wanted = set(weekdays)
    while day <= stop:
        if day.weekday() in wanted:
            yield from day_slots(day, start, end, slot_minutes, tz)
        day += timedelta(days=1)


def units(start: datetime, end: datetime) -> range:
    """The 5-minute units an interval touches: [floor(start), ceil(end))."""
    seconds = UNIT_MINUTES * 60
    first = int(start.timestamp()) // seconds
    last = -(-int(end.timestamp()) // seconds)
    return range(first, last)
