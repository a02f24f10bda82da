"""Mirror mode: the EHR owns the schedule and we record what it says.

Overlaps are recorded and flagged, never refused; messages may arrive out of
order; the same message twice changes nothing anyone can see."""
from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import func, select

from engine.errors import InvalidRequest
from engine.models import Appointment, AppointmentSlot, AuditEntry, Reservation, Slot
from engine.requests import Actor, ExternalAppointment
from tests.engine.helpers import (
    audit,
    book,
    count,
    get_slot,
    local,
    make_patient,
    minutes,
    provider_id,
    reservations,
    slot_at,
    slot_ids_of,
)

EHR = Actor("message", "EPIC^HOSP", "inbound message 7")
TUESDAY = "2026-03-03"


def siu(status, start, duration=30, **kw) -> ExternalAppointment:
    return ExternalAppointment(status=status, start=start, end=start + minutes(duration),
                               appointment_type=kw.pop("appointment_type", "general"), **kw)


def visible_state(sch):
    """Everything a user, a plugin or an outbound feed could notice."""
    with sch.sessions() as s:
        appointments = [(a.id, a.status, a.start, a.end, a.provider_id, a.patient_id, a.conflict, a.updated_at,
                         a.placer_id, a.filler_id) for a in s.scalars(select(Appointment).order_by(Appointment.id))]
        slots = sorted(s.execute(select(Slot.id, Slot.booked).where(Slot.booked > 0)).all())
        rows = sorted(tuple(r) for r in s.execute(select(Reservation.subject, Reservation.unit, Reservation.seat,
                                                         Reservation.appointment_id)))
        audit_rows = s.scalar(select(func.count()).select_from(AuditEntry))
        links = sorted(tuple(r) for r in s.execute(select(AppointmentSlot.appointment_id, AppointmentSlot.slot_id)))
    return appointments, slots, rows, audit_rows, links


def test_overlapping_ehr_bookings_are_recorded_and_flagged_not_refused(sch, recorder):
    smith, jones = provider_id(sch, "DRSMITH"), provider_id(sch, "DRJONES")
    ann, bob = make_patient(sch), make_patient(sch)
    first = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "09:00"), placer_id="EHR1", patient_id=ann.id, provider_id=smith), EHR)
    assert (first.status, first.conflict, first.source) == ("booked", "", "mirror")
    # the EHR double-books Smith: recorded, and the overlap is described on the newcomer
    second = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "09:15"), placer_id="EHR2", patient_id=bob.id, provider_id=smith), EHR)
    assert second.status == "booked"
    assert f"provider:{smith} overlaps appointment(s) {first.id}" in second.conflict
    assert recorder.last().detail == {"conflict": second.conflict}
    assert get_slot(sch, slot_at(sch, "DRSMITH", local(TUESDAY, "09:15")).id).booked == 2
    # and Ann with Jones at the same time: the patient overlap is flagged too
    third = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "09:00"), placer_id="EHR3", patient_id=ann.id, provider_id=jones), EHR)
    assert f"patient:{ann.id} overlaps appointment(s) {first.id}" in third.conflict
    assert sch.appointment(first.id).conflict == ""
    assert count(sch, Appointment) == 3
    # the filler (the EHR) cancels the first: its time is freed and plugins hear which slots
    cancelled = sch.record_external_appointment(
        siu("cancelled", local(TUESDAY, "09:00"), placer_id="EHR1", patient_id=ann.id, provider_id=smith), EHR)
    assert cancelled.status == "cancelled" and reservations(sch, appointment_id=first.id) == []
    assert set(recorder.last("cancelled").slot_ids) == {slot_at(sch, "DRSMITH", local(TUESDAY, t)).id
                                                       for t in ("09:00", "09:15")}


def test_a_modification_before_the_booking_creates_the_appointment(sch, recorder):
    smith = provider_id(sch, "DRSMITH")
    patient = make_patient(sch)
    # S14 (modify) for an appointment we never saw booked: it is created as the EHR says
    modified = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "10:00"), filler_id="F-100", patient_id=patient.id, provider_id=smith,
            reason="moved to 10:00"), EHR)
    assert (modified.status, modified.start, modified.filler_id) == ("booked", local(TUESDAY, "10:00"), "F-100")
    assert {r[0] for r in reservations(sch, appointment_id=modified.id)} == {f"provider:{smith}",
                                                                          f"patient:{patient.id}"}
    assert len(slot_ids_of(sch, modified.id)) == 2
    # then the late S12 with the same content: matched by either id, nothing new
    state = visible_state(sch)
    again = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "10:00"), placer_id="P-100", filler_id="F-100", patient_id=patient.id,
            provider_id=smith, reason="moved to 10:00"), EHR)
    assert again.id == modified.id
    assert sch.appointment(modified.id).placer_id == "P-100"  # the other id is learnt
    assert count(sch, Appointment) == 1
    assert visible_state(sch)[2] == state[2]  # the same time held


def test_a_cancellation_before_the_booking_holds_no_time(sch, recorder):
    smith = provider_id(sch, "DRSMITH")
    patient = make_patient(sch)
    cancel = siu("cancelled", local(TUESDAY, "11:00"), placer_id="EHR-C", patient_id=patient.id, provider_id=smith)
    first = sch.record_external_appointment(cancel, EHR)
    assert first.status == "cancelled" and first.source == "mirror"
    assert reservations(sch, appointment_id=first.id) == [] and slot_ids_of(sch, first.id) == []
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "11:00"))
    assert get_slot(sch, slot.id).booked == 0
    entries = audit(sch, entity="appointment", entity_id=first.id)
    assert [(e.to_state, e.actor, e.source) for e in entries] == [("cancelled", EHR.label, EHR.source)]
    # the same cancel again changes nothing; the time is free for anyone
    state = visible_state(sch)
    sch.record_external_appointment(cancel, EHR)
    assert visible_state(sch) == state
    assert book(sch, make_patient(sch).id, slot.id).status == "booked"


def test_the_same_message_twice_changes_nothing_visible(sch, recorder):
    smith = provider_id(sch, "DRSMITH")
    ann, bob = make_patient(sch), make_patient(sch)
    messages = [
        siu("booked", local(TUESDAY, "13:00"), placer_id="EHR1", patient_id=ann.id, provider_id=smith,
            reason="checkup", notes="bring list of medicines"),
        # an overlapping one, flagged with a conflict
        siu("booked", local(TUESDAY, "13:15"), placer_id="EHR2", patient_id=bob.id, provider_id=smith),
        siu("arrived", local(TUESDAY, "13:00"), placer_id="EHR1", patient_id=ann.id, provider_id=smith),
        siu("cancelled", local(TUESDAY, "13:15"), placer_id="EHR2", patient_id=bob.id, provider_id=smith),
    ]
    for message in messages:
        sch.record_external_appointment(message, EHR)
        state, heard = visible_state(sch), len(recorder.committed)
        sch.record_external_appointment(message, EHR)
        sch.record_external_appointment(replace(message), EHR)
        assert visible_state(sch) == state, f"repeating {message.status} {message.placer_id} changed something"
        assert len(recorder.committed) == heard, "plugins must not hear of a repeated message"


def test_a_moved_appointment_gives_back_its_old_time(sch, recorder):
    smith = provider_id(sch, "DRSMITH")
    patient = make_patient(sch)
    booked = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "08:00"), duration=15, placer_id="EHR5", patient_id=patient.id,
            provider_id=smith), EHR)
    old_slot = slot_at(sch, "DRSMITH", local(TUESDAY, "08:00"))
    moved = sch.record_external_appointment(
        siu("booked", local(TUESDAY, "08:30"), duration=15, placer_id="EHR5", patient_id=patient.id,
            provider_id=smith), EHR)
    assert moved.id == booked.id and moved.start == local(TUESDAY, "08:30")
    change = recorder.last()
    assert change.kind == "rescheduled" and change.slot_ids == (old_slot.id,)
    assert get_slot(sch, old_slot.id).booked == 0
    assert slot_ids_of(sch, moved.id) == [slot_at(sch, "DRSMITH", local(TUESDAY, "08:30")).id]
    entry = audit(sch, entity="appointment", entity_id=moved.id)[-1]
    assert (entry.before["start"], entry.after["start"]) == (local(TUESDAY, "08:00").isoformat(),
                                                             local(TUESDAY, "08:30").isoformat())


def test_a_wholly_overlapping_appointment_survives_later_messages(sch, recorder):
    """Every minute of it overlaps another booking of the same patient and provider:
    it holds no reservations, and a modification or cancellation must still apply."""
    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "10:00"))
    book(sch, patient.id, slot.id)
    twin = siu("booked", slot.start, 15, filler_id="EHR-TWIN", patient_id=patient.id,
               provider_id=provider_id(sch, "DRSMITH"))
    first = sch.record_external_appointment(twin, EHR)
    assert first.conflict and reservations(sch, appointment_id=first.id) == []
    sch.record_external_appointment(replace(twin, notes="bring films"), EHR)
    assert get_slot(sch, slot.id).booked == 2
    cancelled = sch.record_external_appointment(replace(twin, status="cancelled"), EHR)
    assert cancelled.status == "cancelled" and get_slot(sch, slot.id).booked == 1


def test_ids_naming_two_appointments_are_refused_not_merged(sch):
    smith = provider_id(sch, "DRSMITH")
    first = sch.record_external_appointment(siu("booked", local(TUESDAY, "09:00"), placer_id="EHR1",
                                                provider_id=smith), EHR)
    second = sch.record_external_appointment(siu("booked", local(TUESDAY, "10:00"), filler_id="FILL2",
                                                 provider_id=smith), EHR)
    before = visible_state(sch)
    with pytest.raises(InvalidRequest, match="two appointments"):
        sch.record_external_appointment(siu("booked", local(TUESDAY, "09:00"), placer_id="EHR1", filler_id="FILL2",
                                            provider_id=smith), EHR, found=first.id)
    assert visible_state(sch) == before and second.filler_id == "FILL2"
