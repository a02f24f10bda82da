"""HL7 DTM/TS parsing (hl7.hl7time): formats, precision, offsets, zones, DST."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7.hl7time import PRECISIONS, DTMError, format_dtm, parse_date, parse_dtm

UTC = timezone.utc


@pytest.mark.parametrize(
    "text, local, offset, precision",
    [
        ("2024", datetime(2024, 1, 1), None, "year"),
        ("202402", datetime(2024, 2, 1), None, "month"),
        ("20240229", datetime(2024, 2, 29), None, "day"),
        ("2024022913", datetime(2024, 2, 29, 13), None, "hour"),
        ("202402291305", datetime(2024, 2, 29, 13, 5), None, "minute"),
        ("20240229130559", datetime(2024, 2, 29, 13, 5, 59), None, "second"),
        ("20240229130559.1", datetime(2024, 2, 29, 13, 5, 59, 100000), None, "second"),
        ("20240229130559.1234", datetime(2024, 2, 29, 13, 5, 59, 123400), None, "second"),
        ("20240229130559.1234567", datetime(2024, 2, 29, 13, 5, 59, 123456), None, "second"),
        ("202010011126+0215", datetime(2020, 10, 1, 11, 26), timedelta(hours=2, minutes=15), "minute"),
        ("199003141304-0500", datetime(1990, 3, 14, 13, 4), timedelta(hours=-5), "minute"),
        ("20210817151943.4+0200", datetime(2021, 8, 17, 15, 19, 43, 400000), timedelta(hours=2), "second"),
        ("20080101+0000", datetime(2008, 1, 1), timedelta(0), "day"),
        (" 200803061000 ", datetime(2008, 3, 6, 10, 0), None, "minute"),  # nodehl7c SCH-11.4
        ("1928-01-01", datetime(1928, 1, 1), None, "day"),  # renalware PID-7
        ("2024-01-01T10:00:00+01:00", datetime(2024, 1, 1, 10), timedelta(hours=1), "second"),
        ("2024-01-01T10:00Z", datetime(2024, 1, 1, 10), timedelta(0), "minute"),
    ],
)
def test_parse_dtm_formats(text, local, offset, precision):
    parsed = parse_dtm(text)
    assert parsed.local == local
    assert parsed.offset == offset
    assert parsed.precision == precision


@pytest.mark.parametrize(
    "text",
    ["", "   ", "20241", "2024133", "20240230", "2024022925", "20240229136000", "2024-02-30",
     "20240229+2400", "20240229+0160", "2024x", "abc", "2024022913.5", "0000", "1928/01/01", "+0100"],
)
def test_parse_dtm_rejects(text):
    with pytest.raises(DTMError):
        parse_dtm(text)


def test_offsets_are_read_alike_every_time():
    """Offsets are remembered (a feed writes a few): one out of range still raises each time."""
    assert parse_dtm("20240229+0130").offset == parse_dtm("2024030110+0130").offset == timedelta(hours=1, minutes=30)
    for _ in range(2):
        with pytest.raises(DTMError):
            parse_dtm("20240229+2400")


def test_parse_date_takes_the_date_as_written():
    assert parse_date("198808181126+0215") == date(1988, 8, 18)
    assert parse_date("20241104144000") == date(2024, 11, 4)
    assert parse_date("1928-01-01") == date(1928, 1, 1)


def test_error_message_never_repeats_the_value():
    with pytest.raises(DTMError) as info:
        parse_dtm("19800231")
    assert "19800231" not in str(info.value)


def test_to_utc_with_offset_ignores_the_zone():
    parsed = parse_dtm("20210924093000+0215")
    assert parsed.to_utc("America/New_York") == datetime(2021, 9, 24, 7, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    "text, tz, utc",
    [
        ("20260307100000", "America/New_York", datetime(2026, 3, 7, 15, 0, tzinfo=UTC)),  # EST, day before
        ("20260308100000", "America/New_York", datetime(2026, 3, 8, 14, 0, tzinfo=UTC)),  # EDT, change day
        # 02:30 does not exist on 2026-03-08 in New York: read with the offset before the change (fold=0)
        ("20260308023000", "America/New_York", datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        # 01:30 exists twice on 2026-11-01: the first occurrence (EDT)
        ("20261101013000", "America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
        ("20261101100000", "America/New_York", datetime(2026, 11, 1, 15, 0, tzinfo=UTC)),
        ("20260308100000", "America/Los_Angeles", datetime(2026, 3, 8, 17, 0, tzinfo=UTC)),
        ("20260329013000", "Europe/London", datetime(2026, 3, 29, 1, 30, tzinfo=UTC)),  # gap in London
    ],
)
def test_to_utc_naive_local_time_across_dst(text, tz, utc):
    assert parse_dtm(text).to_utc(tz) == utc


def test_format_dtm_examples():
    moment = datetime(2021, 9, 24, 9, 30, 5, 123400)
    assert format_dtm(moment) == "20210924093005"
    assert format_dtm(moment, precision="minute") == "202109240930"
    assert format_dtm(moment, fraction_digits=4, offset=timedelta(hours=2, minutes=15)) == "20210924093005.1234+0215"
    aware = datetime(2021, 9, 24, 7, 15, tzinfo=UTC)
    assert format_dtm(aware, precision="minute", offset=timedelta(hours=-5)) == "202109240215-0500"


# --- properties -----------------------------------------------------------------------------------

offsets = st.one_of(st.none(), st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)
                    .map(lambda minutes: timedelta(minutes=minutes)))


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1800, 1, 1), max_value=datetime(2200, 12, 31)),
       digits=st.sampled_from([0, 1, 2, 3, 4, 6]), offset=offsets)
def test_round_trip_seconds_and_fractions(moment, digits, offset):
    scale = 10 ** (6 - digits)
    expected = moment.replace(microsecond=moment.microsecond // scale * scale if digits else 0)
    text = format_dtm(expected, fraction_digits=digits, offset=offset)
    parsed = parse_dtm(text)
    assert parsed.local == expected
    assert parsed.offset == offset
    assert parsed.precision == "second"
    if offset is not None:
        assert parsed.to_utc("America/New_York") == (expected - offset).replace(tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 12, 31)),
       precision=st.sampled_from(sorted(PRECISIONS)), offset=offsets)
def test_round_trip_every_precision(moment, precision, offset):
    text = format_dtm(moment, precision=precision, offset=offset)
    parsed = parse_dtm(text)
    assert parsed.precision == precision
    assert parsed.offset == offset
    assert format_dtm(parsed.local, precision=precision, offset=offset) == text
    assert parsed.local <= moment


@settings(max_examples=200, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2090, 12, 31)),
       tz=st.sampled_from(["America/New_York", "America/Los_Angeles", "Europe/London", "Asia/Kolkata", "UTC"]))
def test_naive_local_time_round_trips_through_utc(moment, tz):
    moment = moment.replace(microsecond=0)
    utc = parse_dtm(format_dtm(moment)).to_utc(tz)
    back = utc.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    # Equal, except a time inside a spring-forward gap, which moves forward by the gap.
    assert back == moment or back - moment == timedelta(hours=1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_parse_dtm_raises_only_dtm_error(text):
    try:
        parse_dtm(text)
    except DTMError:
        pass
