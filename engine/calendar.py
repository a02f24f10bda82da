"""Clinic-local time ⇄ UTC, and template expansion into slots.

A template says "Mondays 08:00–17:00 local, 15-minute slots".  Each day's
window is converted to UTC once and then cut in absolute time, so slots never
overlap, even on the night the clocks change: on a spring-forward day a window
that spans the gap is an hour shorter; on a fall-back day an hour longer.  A
local start that does not exist (inside the gap) is read with the offset in
force before the change (PEP 495 ``fold=0``), i.e. it moves forward by the
gap; an ambiguous one (inside the repeated hour) means its first occurrence.
Slots whose local start falls outside the window as the wall clock reads it
are left out (see ``day_slots``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Iterator
from zoneinfo import ZoneInfo

UNIT_MINUTES = 5  # granularity of the double-booking guard; slot lengths are multiples

#: The longest a slot can last: ``day_slots`` cuts slots inside one day's window of wall-clock
#: time, 25 hours at most across a fall-back night.  Queries for the slots overlapping a time
#: look no further back than this before it, so they read the slots of about a day, not every
#: slot the calendar ever had.
LONGEST_SLOT = timedelta(hours=25)


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
    # The window as the wall clock reads it: a slot is kept only if its local start
    # lies inside.  Otherwise a window opening inside a fall-back day's repeated
    # hour would get slots before its opening time (01:00 the second time round,
    # for a 01:05 opening), and one closing inside a spring-forward gap would run
    # past the next day's opening.
    opens, closes = datetime.combine(day, start), datetime.combine(end_day, end)
    length = timedelta(minutes=slot_minutes)
    slots = []
    cursor = window_start
    while cursor + length <= window_end:
        local = cursor.astimezone(zone(tz))
        if opens <= local.replace(tzinfo=None) < closes:
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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_UNIT = timedelta(minutes=UNIT_MINUTES)


def units(start: datetime, end: datetime) -> range:
    """The 5-minute units an interval touches: [floor(start), ceil(end)).

    Exact integer arithmetic on timedeltas: truncating to whole seconds first
    would let an end with a fraction of a second past a unit miss that unit."""
    first = (start - _EPOCH) // _UNIT
    last = -((_EPOCH - end) // _UNIT)
    return range(first, last)
