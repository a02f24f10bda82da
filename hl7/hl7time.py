"""HL7 v2 dates and times (DT, DTM, and the TS of older versions).

Format: ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``. The precision is
whatever the sender wrote; missing parts mean the start of the period
(``202401`` is 2024-01-01 00:00). A TS's second component (degree of
precision, v2.3–2.5) is not read here: callers pass component 1.

Tolerated beyond the standard, because real senders do it:

* surrounding spaces (``"200803061000 "``);
* more than four fractional digits (kept to the microsecond);
* ISO 8601 dates and date-times (``1928-01-01``, ``2024-01-01T10:00:00+01:00``,
  ``Z``) - seen in PID-7 of a UK feed.

Without an offset, a DTM is wall-clock time somewhere: ``to_utc`` reads it
in the zone it is given (the appointment location's, or the clinic's). A
local time that does not exist (inside a spring-forward gap) or exists twice
(the repeated hour in autumn) is read with ``fold=0``, as ``engine.calendar``
does: the gap moves it forward by the gap's length, the repeated hour means
its first occurrence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo

__all__ = ["DTMError", "HL7DateTime", "format_dtm", "parse_date", "parse_dtm"]

_DTM_RE = re.compile(
    r"(?P<year>\d{4})"
    r"(?:(?P<month>\d{2})"
    r"(?:(?P<day>\d{2})"
    r"(?:(?P<hour>\d{2})"
    r"(?:(?P<minute>\d{2})"
    r"(?:(?P<second>\d{2})"
    r"(?:\.(?P<fraction>\d+))?"
    r")?)?)?)?)?"
    r"(?P<offset>[+-]\d{4})?",
    re.ASCII,
)
_ISO_RE = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
    r"(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?)?"
    r"(?P<offset>Z|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)

#: Number of characters of the date/time part for each precision name.
PRECISIONS = {"year": 4, "month": 6, "day": 8, "hour": 10, "minute": 12, "second": 14}


class DTMError(ValueError):
    """Text that is not an HL7 date/time. The message never repeats the value
    (it may be a birth date)."""


@dataclass(frozen=True)
class HL7DateTime:
    """A parsed DTM: wall-clock value as written, its UTC offset if given,
    and how precise the sender was (``"year"`` … ``"second"``; fractions of
    a second count as ``"second"``)."""

    local: datetime  # naive
    offset: timedelta | None = None
    precision: str = "second"

    @property
    def has_time(self) -> bool:
        return self.precision in ("hour", "minute", "second")

    def date(self) -> date:
        """The calendar date as written (no zone conversion)."""
        return self.local.date()

    def to_utc(self, tz: str) -> datetime:
        """The instant, aware in UTC: the offset when given, else ``tz``."""
        if self.offset is not None:
            return (self.local - self.offset).replace(tzinfo=timezone.utc)
        return self.local.replace(tzinfo=_zone(tz), fold=0).astimezone(timezone.utc)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=256)  # a feed writes the same few offsets
def _offset(text: str) -> timedelta:
    if text == "Z":
        return timedelta(0)
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise DTMError("the time zone offset is out of range")
    return sign * timedelta(hours=hours, minutes=minutes)


def parse_dtm(text: str) -> HL7DateTime:
    """Parse an HL7 DT/DTM/TS value (component 1); raises ``DTMError``."""
    text = (text or "").strip()
    if not text:
        raise DTMError("empty date/time")
    match = _DTM_RE.fullmatch(text) or _ISO_RE.fullmatch(text)
    if match is None:
        raise DTMError("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    # both patterns have these groups in this order, each part nested in the one before
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    precision = ("second" if second else "minute" if minute else "hour" if hour else "day" if day
                 else "month" if month else "year")
    microsecond = int((fraction + "000000")[:6]) if fraction else 0
    try:
        value = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            microsecond,
        )
    except ValueError:
        raise DTMError("the date/time names a day or time that does not exist") from None
    if value.year < 1:
        raise DTMError("the year is out of range")
    return HL7DateTime(value, _offset(offset) if offset else None, precision)


def parse_date(text: str) -> date:
    """The date part of an HL7 DT/DTM/TS (or ISO) value; raises ``DTMError``."""
    return parse_dtm(text).date()


def format_dtm(value: datetime, *, precision: str = "second", fraction_digits: int = 0,
               offset: timedelta | None = None) -> str:
    """Write a DTM. An aware ``value`` is written in its own offset unless
    ``offset`` is given; a naive one gets the offset only when ``offset`` is
    given."""
    if value.tzinfo is not None:
        use = offset if offset is not None else value.utcoffset()
        value = (value.astimezone(timezone(use)) if use is not None else value).replace(tzinfo=None)
        offset = use
    text = value.strftime("%Y%m%d%H%M%S")[: PRECISIONS[precision]]
    if precision == "second" and fraction_digits:
        text += "." + f"{value.microsecond:06d}"[:fraction_digits]
    if offset is not None:
        minutes = int(offset.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        minutes = abs(minutes)
        text += f"{sign}{minutes // 60:02d}{minutes % 60:02d}"
    return text
