"""Every domain error in ``engine.errors``: raised where the scheduling rule
says, carrying what a caller needs to answer (code, subject, names), and
leaving nothing behind."""
from __future__ import annotations

from datetime import timedelta

import pytest

from engine import errors
from engine.errors import (
    BookingVetoed,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    PatientConflict,
    SchedulingError,
    SlotTypeMismatch,
    SlotUnavailable,
    TooEarly,
)
from engine.models import Appointment, Reservation
from engine.plugin import hookimpl
from engine.requests import BookingRequest, CoverageRecord, ExternalAppointment, PatientRecord, SlotQuery
from tests.engine.helpers import (
    STAFF,
    audit,
    book,
    count,
    get_slot,
    local,
    make_patient,
    provider_id,
    reservations,
    resource_id,
    slot_at,
    with_plugins,
)

MONDAY, TUESDAY = "2026-03-02", "2026-03-03"


def test_every_error_is_a_scheduling_error_with_its_own_code():
    classes = [NotFound, IllegalTransition, SlotUnavailable, PatientConflict, SlotTypeMismatch, TooEarly,
               InvalidRequest, BookingVetoed]
    assert {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SchedulingError)} \
        == set(classes) | {SchedulingError}
    assert len({c.code for c in classes}) == len(classes)
    # a caller that only knows "the time is taken" catches the finer refusals too
    assert issubclass(PatientConflict, SlotUnavailable) and issubclass(SlotTypeMismatch, SlotUnavailable)


# --- NotFound ----------------------------------------------------------------------


def test_not_found_names_the_entity_and_key(sch):
    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    cases = [
        (lambda: book(sch, 9999, slot.id), "patient", 9999),
        (lambda: book(sch, patient.id, 999999), "slot", 999999),
        (lambda: sch.book(BookingRequest(patient.id, "general", provider_id=4242, start=slot.start,
                                         duration_minutes=15), STAFF), "provider", 4242),
        (lambda: book(sch, patient.id, slot.id, resource_ids=(777,)), "resource", 777),
        (lambda: sch.cancel(31337, STAFF), "appointment", 31337),
        (lambda: sch.appointment(31337), "appointment", 31337),
        (lambda: sch.unblock_time(555, STAFF), "time block", 555),
        (lambda: sch.record_coverage(9999, CoverageRecord("AETNA", "M1"), STAFF), "patient", 9999),
        (lambda: sch.merge_patients(patient.id, 9999, STAFF), "patient", 9999),
        (lambda: sch.free_slots(SlotQuery("new_patient", slot.start, slot.end, patient_id=9999)), "patient", 9999),
        (lambda: sch.add_to_waitlist(patient_id=9999, appointment_type="new_patient", duration_minutes=15,
                                     actor=STAFF), "patient", 9999),
    ]
    for call, entity, key in cases:
        with pytest.raises(NotFound) as caught:
            call()
        assert (caught.value.entity, caught.value.key) == (entity, key)
        assert entity in str(caught.value) and str(key) in str(caught.value)
        assert caught.value.code == "not_found"
    assert count(sch, Appointment) == 0
    assert count(sch, Reservation) == 0
    assert get_slot(sch, slot.id).booked == 0


# --- IllegalTransition ----------------------------------------------------------------


def test_illegal_transition_names_appointment_and_both_states(sch):
    patient = make_patient(sch)
    a = book(sch, patient.id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:00")).id)
    sch.cancel(a.id, STAFF)
    with pytest.raises(IllegalTransition) as caught:
        sch.check_in(a.id, STAFF)
    e = caught.value
    assert (e.appointment_id, e.current, e.attempted, e.code) == (a.id, "cancelled", "checked_in", "illegal_transition")
    assert str(e) == f"appointment {a.id} is cancelled; it cannot become checked_in"


# --- SlotUnavailable, PatientConflict, SlotTypeMismatch ------------------------------


def test_slot_unavailable_when_the_slot_is_taken(sch):
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    first = book(sch, make_patient(sch).id, slot.id)
    with pytest.raises(SlotUnavailable) as caught:
        book(sch, make_patient(sch).id, slot.id)
    assert type(caught.value) is SlotUnavailable and caught.value.code == "slot_unavailable"
    assert f"slot {slot.id}" in str(caught.value) and "full" in str(caught.value)
    assert get_slot(sch, slot.id).booked == 1
    assert {r[3] for r in reservations(sch)} == {first.id}


def test_patient_conflict_names_the_patient_and_the_other_appointment(sch):
    patient = make_patient(sch)
    first = book(sch, patient.id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:00")).id)
    jones_slot = slot_at(sch, "DRJONES", local(TUESDAY, "09:00"))
    with pytest.raises(PatientConflict) as caught:
        book(sch, patient.id, jones_slot.id)
    e = caught.value
    assert e.subject == f"patient:{patient.id}" and e.code == "patient_conflict"
    assert f"patient:{patient.id} is already booked" in str(e) and f"appointment {first.id}" in str(e)
    assert get_slot(sch, jones_slot.id).booked == 0


def test_slot_type_mismatch_says_what_the_slot_takes(sch):
    procedure = slot_at(sch, "DRJONES", local("2026-03-07", "08:00"))
    with pytest.raises(SlotTypeMismatch) as caught:
        book(sch, make_patient(sch).id, procedure.id, "new_patient")
    assert "a procedure slot takes only procedure appointments" in str(caught.value)
    assert caught.value.subject == f"slot:{procedure.id}" and caught.value.code == "slot_type_mismatch"
    assert get_slot(sch, procedure.id).booked == 0


# --- TooEarly ---------------------------------------------------------------------------


def test_no_show_is_too_early_before_start_plus_grace(sch, clock):
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    a = book(sch, make_patient(sch).id, slot.id)
    grace = sch.settings.no_show_grace
    for when in (clock.now(), slot.start, slot.start + grace - timedelta(seconds=1)):
        clock.set(when)
        with pytest.raises(TooEarly) as caught:
            sch.mark_no_show(a.id, STAFF)
        assert caught.value.code == "too_early"
        assert (slot.start + grace).isoformat() in str(caught.value)
        assert sch.appointment(a.id).status == "booked"
    clock.set(slot.start + grace)
    no_show = sch.mark_no_show(a.id, STAFF, "did not come")
    assert no_show.status == "no_show"
    assert get_slot(sch, slot.id).booked == 0 and reservations(sch, appointment_id=a.id) == []


# --- InvalidRequest ---------------------------------------------------------------------


def test_invalid_requests_say_what_is_wrong(sch):
    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    smith = provider_id(sch, "DRSMITH")
    cases = [
        (lambda: book(sch, patient.id, slot.id, "massage"), "unknown appointment type"),
        (lambda: sch.book(BookingRequest(patient.id, "general"), STAFF), "needs a slot, or a provider and a start"),
        (lambda: sch.book(BookingRequest(patient.id, "general", provider_id=smith, start=local(TUESDAY, "13:00"),
                                         duration_minutes=0), STAFF), "duration must be positive"),
        (lambda: sch.register_patient(PatientRecord(family_name="Nobody"), STAFF), "at least one identifier"),
        (lambda: sch.block_time(start=slot.start, end=slot.end, actor=STAFF), "block either a provider or a resource"),
        (lambda: sch.block_time(start=slot.start, end=slot.end, actor=STAFF, provider_id=smith,
                                resource_id=resource_id(sch, "ROOM1")), "block either a provider or a resource"),
        (lambda: sch.block_time(start=slot.end, end=slot.start, actor=STAFF, provider_id=smith), "end after it starts"),
        (lambda: sch.merge_patients(patient.id, patient.id, STAFF), "cannot be merged into itself"),
        (lambda: sch.record_external_appointment(ExternalAppointment("booked", slot.start, slot.end), STAFF),
         "needs a placer or a filler id"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidRequest) as caught:
            call()
        assert words in str(caught.value), str(caught.value)
        assert caught.value.code == "invalid_request"
    assert count(sch, Appointment) == 0 and count(sch, Reservation) == 0


# --- BookingVetoed ----------------------------------------------------------------------


class NoMondays:
    """A business rule: no bookings on Mondays (clinic-local)."""

    def __init__(self):
        self.asked = []

    @hookimpl
    def slotengine_check_booking(self, appointment, patient, action):
        self.asked.append((appointment.id, patient.id if patient else None, action))
        from engine.calendar import to_local

        if to_local(appointment.start, "America/New_York").weekday() == 0:
            return {"decision": "veto", "reason": "no bookings on Mondays"}
        return None


def test_a_vetoing_plugin_refuses_the_booking_and_nothing_is_kept(sch):
    rule = NoMondays()
    vetoing = with_plugins(sch, ("no_mondays", rule))
    patient = make_patient(sch)
    monday = slot_at(sch, "DRSMITH", local(MONDAY, "09:00"))
    audit_before = len(audit(sch))
    for call in (lambda: vetoing.book(BookingRequest(patient.id, "new_patient", slot_id=monday.id), STAFF),
                 lambda: vetoing.hold(BookingRequest(patient.id, "new_patient", slot_id=monday.id), STAFF)):
        with pytest.raises(BookingVetoed) as caught:
            call()
        e = caught.value
        assert (e.plugin, e.reason, e.code) == ("no_mondays", "no bookings on Mondays", "vetoed")
        assert str(e) == "no_mondays: no bookings on Mondays"
    assert [a[2] for a in rule.asked] == ["book", "hold"]
    assert count(sch, Appointment) == 0 and count(sch, Reservation) == 0
    assert get_slot(sch, monday.id).booked == 0
    assert len(audit(sch)) == audit_before
    # Tuesday is fine; moving it to a Monday is vetoed and leaves it where it was
    tuesday = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    a = vetoing.book(BookingRequest(patient.id, "new_patient", slot_id=tuesday.id), STAFF)
    with pytest.raises(BookingVetoed):
        vetoing.reschedule(a.id, BookingRequest(patient.id, "new_patient", slot_id=monday.id), STAFF)
    assert rule.asked[-1][2] == "reschedule"
    assert sch.appointment(a.id).start == tuesday.start
    assert get_slot(sch, tuesday.id).booked == 1 and get_slot(sch, monday.id).booked == 0


class Unreliable:
    @hookimpl
    def slotengine_check_booking(self, appointment):
        raise RuntimeError("eligibility service down")


def test_a_failing_judge_fails_closed_into_review_not_a_booking(sch):
    judged = with_plugins(sch, ("eligibility_x", Unreliable()))
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    a = judged.book(BookingRequest(make_patient(sch).id, "new_patient", slot_id=slot.id), STAFF)
    assert a.status == "held" and a.hold_expires_at is None
    assert "eligibility_x" in a.review_reason
    assert get_slot(sch, slot.id).booked == 1  # the time is kept while staff review
