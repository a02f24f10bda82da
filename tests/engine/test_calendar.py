"""Time: templates in clinic-local time, slots in UTC, across daylight-saving changes.

Property tests (hypothesis) over New York, London, Sydney (southern
hemisphere: clocks go back in April, forward in October) and zones with odd
offsets, biased towards the days the clocks change; explicit examples pin the
exact UTC instants of an 08:00-17:00 day around each change; the database
tests check that expansion is idempotent and that the server's own time zone
never leaks in.
"""
from __future__ import annotations

import os
import time as _time
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from engine import calendar
from engine.calendar import UNIT_MINUTES, day_slots, expand, units
from engine.clinic import load_clinic_data
from engine.models import Slot
from tests.engine.helpers import utc

UTC = timezone.utc
DST_ZONES = ["America/New_York", "Europe/London", "Australia/Sydney"]
OTHER_ZONES = ["Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns"]  # +5:30, +5:45, +12:45/13:45, -3:30/-2:30
ZONES = DST_ZONES + OTHER_ZONES

# CI-friendly by default; SLOTENGINE_HYPOTHESIS_EXAMPLES=5000 for a thorough run (set per test, so
# other packages' hypothesis settings are left alone)
CI = settings(max_examples=int(os.environ.get("SLOTENGINE_HYPOTHESIS_EXAMPLES", "120")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])


def transition_days(tz: str, years=range(2024, 2031)) -> list[date]:
    """Local dates on which the zone's UTC offset changes (found by scanning, not by rule)."""
    zone = ZoneInfo(tz)
    days = []
    for year in years:
        day = date(year, 1, 1)
        while day.year == year:
            start = datetime.combine(day, time(0), tzinfo=zone)
            end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
            if start.utcoffset() != end.utcoffset():
                days.append(day)
            day += timedelta(days=1)
    return days


TRANSITIONS = {tz: transition_days(tz) for tz in ZONES}


@st.composite
def zone_and_day(draw):
    tz = draw(st.sampled_from(ZONES))
    near_change = TRANSITIONS[tz] and draw(st.booleans())
    if near_change:
        day = draw(st.sampled_from(TRANSITIONS[tz])) + timedelta(days=draw(st.integers(-1, 1)))
    else:
        day = draw(st.dates(date(2024, 1, 1), date(2030, 12, 31)))
    return tz, day


@st.composite
def windows(draw):
    """(start, end, slot minutes): times on the 5-minute grid; end <= start wraps past midnight."""
    start = draw(st.integers(0, 24 * 12 - 1)) * 5
    length = draw(st.integers(1, 24 * 12)) * 5
    end = (start + length) % (24 * 60)
    slot = draw(st.sampled_from([5, 10, 15, 20, 30, 45, 60, 90]))
    as_time = lambda m: time(m // 60, m % 60)  # noqa: E731
    return as_time(start), as_time(end), slot


def wall(day: date, at: time, tz: str) -> datetime:
    """Where a wall time lands once normalised (a time inside a gap moves forward by the gap)."""
    return datetime.combine(day, at, tzinfo=ZoneInfo(tz)).astimezone(UTC).astimezone(ZoneInfo(tz))


@CI
@given(zone_and_day(), windows())
def test_one_days_slots_never_overlap_and_start_inside_the_window(zd, window):
    tz, day = zd
    start, end, minutes = window
    slots = day_slots(day, start, end, minutes, tz)
    length = timedelta(minutes=minutes)
    end_day = day + timedelta(days=1) if end <= start else day
    w0, w1 = calendar.local_to_utc(day, start, tz), calendar.local_to_utc(end_day, end, tz)
    opens, closes = datetime.combine(day, start), datetime.combine(end_day, end)  # the wall-clock window
    for a, b in zip(slots, slots[1:]):
        assert a.end <= b.start  # never overlapping
    for s in slots:
        assert s.start.utcoffset() == timedelta(0)
        assert s.end - s.start == length
        assert w0 <= s.start and s.end <= w1 and (s.start - w0) % length == timedelta(0)
        here = s.start.astimezone(ZoneInfo(tz))
        # the local start lies inside the template window, as the wall clock reads it
        assert opens <= here.replace(tzinfo=None) < closes, here
        assert (s.local_weekday, s.local_minute) == (here.weekday(), here.hour * 60 + here.minute)
        # 5-minute arithmetic covers exactly the slot
        cut = units(s.start, s.end)
        assert len(cut) == minutes // UNIT_MINUTES
        assert cut.start * 300 == s.start.timestamp() and cut.stop * 300 == s.end.timestamp()
    # and nothing is missing: every place on the grid whose wall-clock start is inside has its slot
    grid = [w0 + k * length for k in range(max(0, (w1 - w0) // length))]
    wanted = [u for u in grid if opens <= u.astimezone(ZoneInfo(tz)).replace(tzinfo=None) < closes]
    assert [s.start for s in slots] == wanted
    if not TRANSITIONS[tz] or all(abs((day - t).days) > 1 for t in TRANSITIONS[tz]):
        # on an ordinary day that is simply every slot that fits, back to back
        assert len(slots) == len(grid)
        assert all(a.end == b.start for a, b in zip(slots, slots[1:]))


@CI
@given(st.sampled_from(ZONES), st.data())
def test_a_template_never_overlaps_itself_across_days_and_changes(tz, data):
    """Several weeks of one template, across the zone's changes: no two slots overlap."""
    around = data.draw(st.sampled_from(TRANSITIONS[tz] or [date(2026, 3, 29)]))
    first = around - timedelta(days=data.draw(st.integers(0, 6)))
    last = around + timedelta(days=data.draw(st.integers(0, 6)))
    weekdays = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True))
    start, end, minutes = data.draw(windows())
    slots = list(expand(weekdays, start, end, minutes, tz, first, last, date(2000, 1, 1), None))
    ordered = sorted(slots, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        assert a.end <= b.start, f"{a} overlaps {b}"
    assert len({s.start for s in slots}) == len(slots)
    for s in slots:
        local_day = s.start.astimezone(ZoneInfo(tz)).date()
        assert first <= local_day <= last + timedelta(days=1)


@CI
@given(st.datetimes(datetime(2020, 1, 1), datetime(2035, 1, 1)), st.integers(0, 10**9),
       st.datetimes(datetime(2020, 1, 1), datetime(2035, 1, 1)))
def test_units_cover_exactly_the_interval(start, micros, other):
    start = start.replace(tzinfo=UTC)
    end = start + timedelta(microseconds=micros)
    cut = units(start, end)
    unit = timedelta(minutes=UNIT_MINUTES)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    lo, hi = epoch + cut.start * unit, epoch + cut.stop * unit
    # the smallest run of whole units that covers [start, end)
    assert lo <= start < lo + unit
    assert hi - unit < end <= hi or (end == start and cut.start == cut.stop)
    # two intervals share a unit exactly when they come within the same 5 minutes
    other = other.replace(tzinfo=UTC)
    a, b = sorted([(start, end), (other, other + unit)])
    shared = set(units(*a)) & set(units(*b))
    if a[1] <= b[0] and (b[0] - epoch) % unit == timedelta(0) and (a[1] - epoch) % unit == timedelta(0):
        assert not shared  # back-to-back on the grid: no unit in common


# --- explicit examples: an 08:00-17:00 day around each change ------------------------------


def instants(tz: str, day: str) -> tuple[datetime, datetime, int]:
    slots = day_slots(date.fromisoformat(day), time(8), time(17), 15, tz)
    return slots[0].start, slots[-1].end, len(slots)


@pytest.mark.parametrize("tz, day, first, last", [
    # New York: clocks forward 2026-03-08 02:00 EST -> 03:00 EDT; back 2026-11-01 02:00 EDT -> 01:00 EST
    ("America/New_York", "2026-03-07", utc(2026, 3, 7, 13), utc(2026, 3, 7, 22)),
    ("America/New_York", "2026-03-08", utc(2026, 3, 8, 12), utc(2026, 3, 8, 21)),
    ("America/New_York", "2026-03-09", utc(2026, 3, 9, 12), utc(2026, 3, 9, 21)),
    ("America/New_York", "2026-10-31", utc(2026, 10, 31, 12), utc(2026, 10, 31, 21)),
    ("America/New_York", "2026-11-01", utc(2026, 11, 1, 13), utc(2026, 11, 1, 22)),
    ("America/New_York", "2026-11-02", utc(2026, 11, 2, 13), utc(2026, 11, 2, 22)),
    # London: forward 2026-03-29 01:00 GMT -> 02:00 BST; back 2026-10-25 02:00 BST -> 01:00 GMT
    ("Europe/London", "2026-03-28", utc(2026, 3, 28, 8), utc(2026, 3, 28, 17)),
    ("Europe/London", "2026-03-29", utc(2026, 3, 29, 7), utc(2026, 3, 29, 16)),
    ("Europe/London", "2026-03-30", utc(2026, 3, 30, 7), utc(2026, 3, 30, 16)),
    ("Europe/London", "2026-10-24", utc(2026, 10, 24, 7), utc(2026, 10, 24, 16)),
    ("Europe/London", "2026-10-25", utc(2026, 10, 25, 8), utc(2026, 10, 25, 17)),
    ("Europe/London", "2026-10-26", utc(2026, 10, 26, 8), utc(2026, 10, 26, 17)),
    # Sydney (southern hemisphere): back 2026-04-05 03:00 AEDT -> 02:00 AEST; forward 2026-10-04 02:00 -> 03:00
    ("Australia/Sydney", "2026-04-04", utc(2026, 4, 3, 21), utc(2026, 4, 4, 6)),
    ("Australia/Sydney", "2026-04-05", utc(2026, 4, 4, 22), utc(2026, 4, 5, 7)),
    ("Australia/Sydney", "2026-10-03", utc(2026, 10, 2, 22), utc(2026, 10, 3, 7)),
    ("Australia/Sydney", "2026-10-04", utc(2026, 10, 3, 21), utc(2026, 10, 4, 6)),
    # no daylight saving, half-hour offset
    ("Asia/Kolkata", "2026-03-08", utc(2026, 3, 8, 2, 30), utc(2026, 3, 8, 11, 30)),
])
def test_an_eight_to_five_day_lands_on_the_right_utc_instants(tz, day, first, last):
    assert instants(tz, day) == (first, last, 36)
    slots = day_slots(date.fromisoformat(day), time(8), time(17), 15, tz)
    assert [s.start for s in slots] == [first + timedelta(minutes=15 * i) for i in range(36)]
    assert [s.local_minute for s in slots] == [8 * 60 + 15 * i for i in range(36)]


def test_a_window_opening_inside_the_repeated_hour_has_no_slot_before_its_opening():
    """01:05-02:00 on 2026-11-01 in New York: 01:05-01:59 happens twice; 01:00-01:05 EST is not open."""
    slots = day_slots(date(2026, 11, 1), time(1, 5), time(2, 0), 15, "America/New_York")
    assert [s.start for s in slots] == [utc(2026, 11, 1, 5, m) for m in (5, 20, 35, 50)] + \
        [utc(2026, 11, 1, 6, m) for m in (5, 20, 35)]
    assert [s.local_minute for s in slots] == [65, 80, 95, 110, 65, 80, 95]


@pytest.mark.parametrize("tz, day, hours, repeated", [
    ("America/New_York", "2026-03-08", 5, False),  # 00:00-06:00 loses the hour 02:00-03:00
    ("America/New_York", "2026-11-01", 7, True),   # ... and gains 01:00-02:00 twice
    ("Europe/London", "2026-03-29", 5, False),
    ("Europe/London", "2026-10-25", 7, True),
    ("Australia/Sydney", "2026-10-04", 5, False),
    ("Australia/Sydney", "2026-04-05", 7, True),
])
def test_a_window_across_the_change_is_an_hour_shorter_or_longer(tz, day, hours, repeated):
    slots = day_slots(date.fromisoformat(day), time(0), time(6), 15, tz)
    assert len(slots) == hours * 4
    assert slots[-1].end - slots[0].start == timedelta(hours=hours)
    minutes = [s.local_minute for s in slots]
    assert (len(set(minutes)) < len(minutes)) is repeated  # the repeated hour's wall times occur twice
    for a, b in zip(slots, slots[1:]):
        assert a.end == b.start


# --- the database: expansion, idempotence, the server's zone ---------------------------------


CLINICS = {
    "locations": [{"code": code, "name": code, "timezone": tz} for code, tz in
                  (("NYC", "America/New_York"), ("LON", "Europe/London"), ("SYD", "Australia/Sydney"),
                   ("DEL", "Asia/Kolkata"))],
    "providers": [{"code": f"DR-{code}", "family_name": code, "location": code}
                  for code in ("NYC", "LON", "SYD", "DEL")],
    "templates": [{"code": f"T-{code}", "provider": f"DR-{code}", "location": code,
                   "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "08:00", "end": "17:00",
                   "slot_minutes": 15} for code in ("NYC", "LON", "SYD", "DEL")],
}


@pytest.fixture
def clinic(slotengine_session_factory, slotengine_clock):
    from engine.service import Scheduler

    with slotengine_session_factory() as s, s.begin():
        load_clinic_data(s, CLINICS)
    return Scheduler(slotengine_session_factory, clock=slotengine_clock)


def starts(scheduler, code: str, day_from: datetime, day_to: datetime) -> list[datetime]:
    from tests.engine.helpers import provider_id

    with scheduler.sessions() as s:
        return list(s.scalars(select(Slot.start).where(Slot.provider_id == provider_id(scheduler, f"DR-{code}"),
                                                       Slot.start >= day_from, Slot.start < day_to)
                              .order_by(Slot.start)))


def total(scheduler) -> int:
    with scheduler.sessions() as s:
        return s.scalar(select(func.count()).select_from(Slot))


@contextmanager
def server_zone(name: str):
    """Pretend the server runs in another zone (TZ + tzset): it must not matter."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = name
    _time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        _time.tzset()


def test_expansion_around_the_changes_is_exact_and_idempotent(clinic):
    spring, autumn = (date(2026, 3, 5), date(2026, 4, 7)), (date(2026, 10, 1), date(2026, 11, 3))
    with server_zone("Pacific/Auckland"):  # neither UTC nor any clinic's zone
        created = clinic.expand_templates(*spring) + clinic.expand_templates(*autumn)
    days = (spring[1] - spring[0]).days + 1 + (autumn[1] - autumn[0]).days + 1
    assert created == total(clinic) == 4 * 36 * days
    # again, and again over an overlapping range: nothing new
    assert clinic.expand_templates(*spring) == 0
    assert clinic.expand_templates(spring[0], autumn[1]) == 4 * 36 * ((autumn[0] - spring[1]).days - 1)
    assert clinic.expand_templates(spring[0], autumn[1]) == 0
    expected_first = {
        ("NYC", "2026-03-07"): utc(2026, 3, 7, 13), ("NYC", "2026-03-08"): utc(2026, 3, 8, 12),
        ("NYC", "2026-10-31"): utc(2026, 10, 31, 12), ("NYC", "2026-11-01"): utc(2026, 11, 1, 13),
        ("LON", "2026-03-28"): utc(2026, 3, 28, 8), ("LON", "2026-03-29"): utc(2026, 3, 29, 7),
        ("LON", "2026-10-24"): utc(2026, 10, 24, 7), ("LON", "2026-10-25"): utc(2026, 10, 25, 8),
        ("SYD", "2026-04-04"): utc(2026, 4, 3, 21), ("SYD", "2026-04-05"): utc(2026, 4, 4, 22),
        ("SYD", "2026-10-03"): utc(2026, 10, 2, 22), ("SYD", "2026-10-04"): utc(2026, 10, 3, 21),
        ("DEL", "2026-03-08"): utc(2026, 3, 8, 2, 30),
    }
    for (code, day), first in expected_first.items():
        got = starts(clinic, code, first - timedelta(hours=1), first + timedelta(hours=12))
        assert got == [first + timedelta(minutes=15 * i) for i in range(36)], (code, day)
    with clinic.sessions() as s:
        rows = s.execute(select(Slot.provider_id, Slot.start, Slot.end).order_by(Slot.provider_id, Slot.start)).all()
    for a, b in zip(rows, rows[1:]):
        if a.provider_id == b.provider_id:
            assert a.end <= b.start


def test_a_second_template_over_the_same_hours_is_skipped_not_overlapped(clinic):
    with clinic.sessions() as s, s.begin():
        load_clinic_data(s, {"templates": [{"code": "T-NYC-2", "provider": "DR-NYC", "location": "NYC",
                                             "days": ["mon"], "start": "07:00", "end": "09:00",
                                             "slot_minutes": 20}]})
    monday = date(2026, 3, 9)
    clinic.expand_templates(monday, monday)
    from tests.engine.helpers import provider_id

    with clinic.sessions() as s:
        rows = s.execute(select(Slot.start, Slot.end).where(Slot.provider_id == provider_id(clinic, "DR-NYC"))
                         .order_by(Slot.start)).all()
    for a, b in zip(rows, rows[1:]):
        assert a.end <= b.start
    # 07:00, 07:20 and 07:40 EDT from the second template; 08:00 onwards from the first
    assert [r.start for r in rows[:4]] == [utc(2026, 3, 9, 11), utc(2026, 3, 9, 11, 20), utc(2026, 3, 9, 11, 40),
                                           utc(2026, 3, 9, 12)]
    assert len(rows) == 3 + 36


def test_an_overnight_window_ending_in_the_gap_does_not_run_into_the_next_day(clinic):
    """03:00 -> 02:30 overnight: on 2026-03-08 "02:30" does not exist in New York and reads as 03:30 EDT,
    half an hour after the next window opened at 03:00 EDT.  The slots must still not overlap (and the
    database's one-slot-per-template-start key must not refuse the expansion)."""
    slots = sorted(expand(list(range(7)), time(3), time(2, 30), 30, "America/New_York", date(2026, 3, 6),
                          date(2026, 3, 9), date(2000, 1, 1), None), key=lambda s: s.start)
    for a, b in zip(slots, slots[1:]):
        assert a.end <= b.start, (a, b)
    with clinic.sessions() as s, s.begin():
        load_clinic_data(s, {"templates": [{"code": "T-NIGHT", "provider": "DR-LON", "location": "NYC",
                                             "days": ["sat", "sun"], "start": "03:00", "end": "02:30",
                                             "slot_minutes": 30}]})
    assert clinic.expand_templates(date(2026, 3, 7), date(2026, 3, 8)) > 0


# --- the longest slot: what bounds every query for the slots overlapping a time -------------------


@CI
@given(zone_and_day(), windows(), st.integers(1, 26 * 12))
def test_no_slot_lasts_longer_than_the_longest_slot(zd, window, units_long):
    tz, day = zd
    start, end, _minutes = window
    for s in day_slots(day, start, end, units_long * UNIT_MINUTES, tz):
        assert s.end - s.start <= calendar.LONGEST_SLOT


@settings(CI, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_slots_overlapping_a_time_are_found_as_by_the_plain_rule(clinic, data):
    """``Slot.overlapping`` reads from LONGEST_SLOT before the start only; it finds what
    ``start < end and end > start`` over every slot finds, among slots of any allowed length."""
    from sqlalchemy import delete, insert

    from tests.engine.helpers import provider_id

    doctor = provider_id(clinic, "DR-NYC")
    base = utc(2026, 11, 1)
    minutes = st.integers(0, 4 * 24 * 12).map(lambda n: base + timedelta(minutes=5 * n))
    slots = data.draw(st.lists(st.tuples(minutes, st.integers(1, 25 * 12)), max_size=30))
    with clinic.sessions() as s, s.begin():
        s.execute(delete(Slot))
        location = s.scalar(select(func.min(Slot.location_id)).select_from(Slot)) or 1
        if slots:
            s.execute(insert(Slot), [
                {"provider_id": doctor, "location_id": location, "start": start, "end": start + timedelta(minutes=5 * n),
                 "local_weekday": 0, "local_minute": 0, "slot_type": "routine", "capacity": 1, "booked": 0,
                 "blocked": False} for start, n in slots])
    for _ in range(5):
        a, b = sorted([data.draw(minutes), data.draw(minutes)])
        b += timedelta(minutes=5)
        with clinic.sessions() as s:
            found = set(s.scalars(select(Slot.start).where(Slot.provider_id == doctor, *Slot.overlapping(a, b))))
            every = s.execute(select(Slot.start, Slot.end).where(Slot.provider_id == doctor)).all()
        assert found == {start for start, end in every if start < b and end > a}


def test_the_overlap_query_reads_the_index_from_a_day_before(clinic):
    with clinic.sessions() as s:
        if s.get_bind().dialect.name != "sqlite":
            pytest.skip("the plan read is SQLite's")
        query = select(Slot.id).where(Slot.provider_id == 1, *Slot.overlapping(utc(2026, 3, 3, 15), utc(2026, 3, 3, 16)))
        compiled = query.compile(s.get_bind())  # the values do not change the plan
        plan = " ".join(row[-1] for row in s.connection().exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled.string}", ("1",) * len(compiled.positiontup)))
    assert "ix_slots_provider_start (provider_id=? AND start>? AND start<?)" in plan, plan
