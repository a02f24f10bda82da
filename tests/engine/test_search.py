"""Slot search (``free_slots``): who, when, what the patient wants, and in what order."""
from __future__ import annotations

from datetime import time, timedelta

import pytest

from engine.calendar import to_local
from engine.clinic import load_clinic_data
from engine.models import Location
from engine.plugin import hookimpl
from engine.requests import BookingRequest, SlotQuery
from tests.engine.helpers import (
    STAFF,
    book,
    local,
    make_patient,
    provider_id,
    slot_at,
    with_plugins,
)

TUESDAY, WEDNESDAY = "2026-03-03", "2026-03-04"


def week(sch, **kw) -> SlotQuery:
    start = sch.clock.now()
    kw.setdefault("limit", 500)
    return SlotQuery(kw.pop("appointment_type", "new_patient"), start, start + timedelta(days=7), **kw)


def zones(sch) -> dict[int, str]:
    with sch.sessions() as s:
        return {loc.id: loc.timezone for loc in s.query(Location)}


def local_start(sch, candidate):
    return to_local(candidate.start, zones(sch)[candidate.location_id])


def test_search_by_provider_gives_that_providers_free_slots_earliest_first(sch, clock):
    smith = provider_id(sch, "DRSMITH")
    found = sch.free_slots(week(sch, provider_id=smith))
    assert found and {c.provider_id for c in found} == {smith}
    assert [c.start for c in found] == sorted(c.start for c in found)
    assert all(c.start >= clock.now() for c in found)
    assert {c.slot_type for c in found} == {"new_patient"}  # not follow-up, not unreleased emergency
    assert len(found) == 5 * 16  # Mon-Fri 08:00-12:00 in 15-minute slots
    assert found[0].start == local("2026-03-02", "08:00") and found[0].seats_left == 1
    # the limit cuts the same order short
    assert sch.free_slots(week(sch, provider_id=smith, limit=3)) == found[:3]


def test_search_by_specialty_spans_providers(sch):
    smith, jones, lee = (provider_id(sch, c) for c in ("DRSMITH", "DRJONES", "DRLEE"))
    cardiology = sch.free_slots(week(sch, specialty="cardiology"))
    assert {c.provider_id for c in cardiology} == {jones, lee}
    assert [c.start for c in cardiology] == sorted(c.start for c in cardiology)
    family = sch.free_slots(week(sch, specialty="family_medicine", limit=10))
    assert {c.provider_id for c in family} == {smith, jones}
    assert sch.free_slots(week(sch, specialty="dermatology")) == []


def test_patient_preferences_filter_providers_days_and_local_hours(sch):
    smith, lee = provider_id(sch, "DRSMITH"), provider_id(sch, "DRLEE")
    patient = make_patient(sch, preferred_provider_gender="F", preferred_weekdays=[1, 3],
                           preferred_earliest=time(9, 0), preferred_latest=time(11, 0))
    found = sch.free_slots(week(sch, patient_id=patient.id))
    assert found
    assert {c.provider_id for c in found} == {smith, lee}  # the women
    for c in found:
        here = local_start(sch, c)
        assert here.weekday() in (1, 3), here  # Tuesdays and Thursdays, in the clinic's own zone
        assert time(9) <= here.time() < time(11), here
    # Lee works in Los Angeles: 09:00 there is noon in New York, and is offered
    assert local(TUESDAY, "09:00", "America/Los_Angeles") in [c.start for c in found if c.provider_id == lee]
    assert local(TUESDAY, "08:45") not in [c.start for c in found]
    # the query's own criteria override the stored preferences
    mondays = sch.free_slots(week(sch, patient_id=patient.id, weekdays=[0], provider_gender="M"))
    assert mondays and {local_start(sch, c).weekday() for c in mondays} == {0}
    assert {c.provider_id for c in mondays} == {provider_id(sch, "DRJONES")}


def test_search_by_language(sch):
    korean = sch.free_slots(week(sch, language="ko"))
    assert {c.provider_id for c in korean} == {provider_id(sch, "DRLEE")}
    spanish_cardiology = sch.free_slots(week(sch, language="es", specialty="cardiology"))
    assert spanish_cardiology == []


def test_full_blocked_and_busy_times_are_not_offered(sch):
    smith, jones = provider_id(sch, "DRSMITH"), provider_id(sch, "DRJONES")
    patient = make_patient(sch)
    book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(TUESDAY, "08:00")).id)  # full
    sch.block_time(start=local(TUESDAY, "08:15"), end=local(TUESDAY, "08:30"), provider_id=smith, actor=STAFF)
    book(sch, patient.id, slot_at(sch, "DRJONES", local(TUESDAY, "09:00")).id)  # the patient is busy 09:00-09:30
    day = SlotQuery("new_patient", local(TUESDAY, "08:00"), local(TUESDAY, "10:00"), provider_id=smith,
                    patient_id=patient.id, limit=50)
    assert [c.start for c in sch.free_slots(day)] == [local(TUESDAY, t) for t in ("08:30", "08:45", "09:30", "09:45")]
    # somebody else is not busy then
    anyone = SlotQuery("new_patient", local(TUESDAY, "08:00"), local(TUESDAY, "10:00"), provider_id=smith, limit=50)
    assert local(TUESDAY, "09:00") in [c.start for c in sch.free_slots(anyone)]
    # a capacity-2 slot with one booking still has a seat; with two it is gone
    jones_day = SlotQuery("new_patient", local(WEDNESDAY, "09:00"), local(WEDNESDAY, "09:30"), provider_id=jones)
    ten = slot_at(sch, "DRJONES", local(WEDNESDAY, "09:00"))
    book(sch, make_patient(sch).id, ten.id)
    assert [(c.slot_id, c.seats_left) for c in sch.free_slots(jones_day)] == [(ten.id, 1)]
    book(sch, make_patient(sch).id, ten.id)
    assert sch.free_slots(jones_day) == []


def test_a_long_visit_is_offered_only_where_consecutive_slots_are_free(sch):
    smith = provider_id(sch, "DRSMITH")
    book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:00")).id)
    query = SlotQuery("new_patient", local(TUESDAY, "08:00"), local(TUESDAY, "12:00"), provider_id=smith,
                      duration_minutes=45, limit=50)
    found = sch.free_slots(query)
    starts = [c.start for c in found]
    # 08:00 and 08:15 fit before the 09:00 booking; nothing that would touch it; none running past noon
    assert starts == [local(TUESDAY, t) for t in ("08:00", "08:15", "09:15", "09:30", "09:45", "10:00",
                                                   "10:15", "10:30", "10:45", "11:00", "11:15")]
    for c in found:
        assert c.end == c.start + timedelta(minutes=45)
        assert len(c.slot_ids) == 3 and c.slot_ids[0] == c.slot_id
    # what is offered can be booked
    a = sch.book(BookingRequest(make_patient(sch).id, "new_patient", slot_id=found[0].slot_id,
                                duration_minutes=45), STAFF)
    assert (a.start, a.end) == (found[0].start, found[0].end)


def test_every_offer_can_be_booked(sch, clock):
    """Search and booking agree: whatever free_slots offers, book accepts (then we give it back)."""
    clock.set(local(TUESDAY, "13:00"))  # Smith's emergency slots at 16:00 are released from 14:00
    smith = provider_id(sch, "DRSMITH")
    load_clinic_data_in(sch, {
        "providers": [{"code": "DRKIM", "family_name": "Kim", "gender": "M", "specialties": ["urgent_care"],
                       "location": "MAIN"}],
        "templates": [
            {"code": "KIM-AM", "provider": "DRKIM", "location": "MAIN", "days": ["wed"], "start": "08:00",
             "end": "09:00", "slot_minutes": 15, "slot_type": "new_patient"},
            {"code": "KIM-ER", "provider": "DRKIM", "location": "MAIN", "days": ["wed"], "start": "09:00",
             "end": "10:00", "slot_minutes": 15, "slot_type": "emergency"},
        ],
    })
    kim = provider_id(sch, "DRKIM")
    queries = [
        SlotQuery("new_patient", clock.now(), clock.now() + timedelta(days=2), limit=40),
        SlotQuery("follow_up", clock.now(), clock.now() + timedelta(days=2), provider_id=smith, limit=40),
        SlotQuery("general", clock.now(), clock.now() + timedelta(days=2), provider_id=smith, limit=40),
        SlotQuery("new_patient", clock.now(), clock.now() + timedelta(days=2), provider_id=kim,
                  duration_minutes=45, limit=40),
        SlotQuery("new_patient", clock.now(), clock.now() + timedelta(days=2), provider_id=kim,
                  duration_minutes=30, urgency="urgent", limit=40),
    ]
    patient = make_patient(sch)
    for query in queries:
        offers = sch.free_slots(query)
        assert offers, query
        for c in offers:
            minutes = int((c.end - c.start).total_seconds() // 60)
            a = sch.book(BookingRequest(patient.id, query.appointment_type, slot_id=c.slot_id,
                                        duration_minutes=minutes, urgency=query.urgency), STAFF)
            sch.cancel(a.id, STAFF)
    # a routine 45 minutes at Kim's must not run into his unreleased emergency hour
    routine = sch.free_slots(queries[3])
    assert [c.start for c in routine] == [local(WEDNESDAY, t) for t in ("08:00", "08:15")]


def load_clinic_data_in(sch, data):
    with sch.sessions() as s, s.begin():
        load_clinic_data(s, data)
    day = sch.clock.now().date()
    sch.expand_templates(day, day + timedelta(days=7))


class PrefersLee:
    def __init__(self, lee):
        self.lee = lee

    @hookimpl
    def slotengine_score_slot(self, candidate, query):
        return 10.0 if candidate.provider_id == self.lee else 0.0


class PrefersAfternoons:
    @hookimpl
    def slotengine_score_slot(self, candidate):
        return candidate.start.hour / 100  # UTC hour: a gentle nudge later in the day


def test_ranking_is_earliest_first_unless_a_scorer_plugin_says_otherwise(sch):
    lee = provider_id(sch, "DRLEE")
    query = week(sch, specialty="cardiology", limit=10)
    plain = sch.free_slots(query)
    assert plain[0].provider_id != lee  # Jones starts at 09:00 New York, before Lee's 08:00 Los Angeles
    assert all(c.score == 0.0 for c in plain)

    scored = with_plugins(sch, ("prefers_lee", PrefersLee(lee)), ("afternoons", PrefersAfternoons()))
    ranked = scored.free_slots(query)
    assert len(ranked) == 10
    assert all(c.provider_id == lee for c in ranked)
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    for a, b in zip(ranked, ranked[1:]):
        assert a.score > b.score or (a.score == b.score and a.start <= b.start)
    assert ranked[0].score == pytest.approx(10 + ranked[0].start.hour / 100)
