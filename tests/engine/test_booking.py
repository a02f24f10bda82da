"""Booking rules, each checked in the database afterwards: slot counters,
the reservation rows that guard against double booking, and the audit."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from engine import calendar
from engine.errors import PatientConflict, SlotTypeMismatch, SlotUnavailable
from engine.models import Appointment, AppointmentResource, AuditEntry, Reservation, Slot
from engine.requests import Actor, BookingRequest, SlotQuery
from tests.engine.helpers import (
    STAFF,
    audit,
    book,
    count,
    get_slot,
    local,
    make_patient,
    minutes,
    provider_id,
    reservations,
    reserved_subjects,
    resource_id,
    slot_at,
    slot_ids_of,
)

TUESDAY, WEDNESDAY = "2026-03-03", "2026-03-04"


def units(start, end):
    return list(calendar.units(start, end))


# --- one provider, one time ------------------------------------------------------


def test_a_provider_is_not_booked_twice_for_overlapping_time(sch):
    smith = provider_id(sch, "DRSMITH")
    nine = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    first = book(sch, make_patient(sch).id, nine.id)
    # the same slot, and a start/duration that straddles it, are both refused
    with pytest.raises(SlotUnavailable):
        book(sch, make_patient(sch).id, nine.id)
    with pytest.raises(SlotUnavailable) as caught:
        sch.book(BookingRequest(make_patient(sch).id, "general", provider_id=smith, start=local(TUESDAY, "08:50"),
                                duration_minutes=15), STAFF)
    assert "full" in str(caught.value) or f"provider:{smith}" in str(caught.value)
    # outside any slot (ad hoc time) the reservation rows still refuse the overlap
    sch.book(BookingRequest(make_patient(sch).id, "general", provider_id=smith, start=local(TUESDAY, "12:30"),
                            duration_minutes=30), STAFF)
    with pytest.raises(SlotUnavailable) as caught:
        sch.book(BookingRequest(make_patient(sch).id, "general", provider_id=smith, start=local(TUESDAY, "12:45"),
                                duration_minutes=30), STAFF)
    assert f"provider:{smith} is already booked" in str(caught.value)
    assert get_slot(sch, nine.id).booked == 1
    assert [r[3] for r in reservations(sch, subject=f"provider:{smith}") if r[1] in units(nine.start, nine.end)] \
        == [first.id] * 3
    assert count(sch, Appointment) == 2


def test_a_patient_cannot_hold_two_overlapping_appointments_even_with_two_providers(sch):
    patient = make_patient(sch)
    book(sch, patient.id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:00")).id)  # 09:00-09:15
    jones = slot_at(sch, "DRJONES", local(TUESDAY, "09:00"))  # 09:00-09:30
    with pytest.raises(PatientConflict):
        book(sch, patient.id, jones.id)
    # a different time with another provider is fine; back-to-back is not an overlap
    after = book(sch, patient.id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:15")).id)
    assert after.status == "booked"
    assert get_slot(sch, jones.id).booked == 0
    assert len(reservations(sch, subject=f"patient:{patient.id}")) == 6


def test_capacity_two_takes_a_second_booking_as_overbooked_and_refuses_a_third(sch):
    slot = slot_at(sch, "DRJONES", local(TUESDAY, "10:00"))
    assert slot.capacity == 2
    first = book(sch, make_patient(sch).id, slot.id)
    second = book(sch, make_patient(sch).id, slot.id)
    assert (first.status, second.status) == ("booked", "overbooked")
    with pytest.raises(SlotUnavailable):
        book(sch, make_patient(sch).id, slot.id)
    assert get_slot(sch, slot.id).booked == 2
    seats = {r[3]: r[2] for r in reservations(sch, subject=f"provider:{slot.provider_id}")}
    assert seats == {first.id: 0, second.id: 1}
    # cancelling the first frees one seat: the next booking takes it
    sch.cancel(first.id, STAFF)
    third = book(sch, make_patient(sch).id, slot.id)
    assert third.status == "booked" and get_slot(sch, slot.id).booked == 2


def test_a_booking_longer_than_a_slot_takes_consecutive_slots(sch):
    nine = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    a = book(sch, make_patient(sch).id, nine.id, duration_minutes=45)
    assert (a.start, a.end) == (nine.start, nine.start + minutes(45))
    taken = slot_ids_of(sch, a.id)
    assert len(taken) == 3 and all(get_slot(sch, s).booked == 1 for s in taken)
    assert len(reservations(sch, subject=f"provider:{nine.provider_id}")) == 9


def test_a_booking_may_not_span_a_gap_between_slots(sch):
    """11:45-13:15 on a Monday would run through Smith's lunch (12:00-13:00: no slots)."""
    smith = provider_id(sch, "DRSMITH")
    before = slot_at(sch, "DRSMITH", local("2026-03-02", "11:45"))
    with pytest.raises(SlotUnavailable) as caught:
        sch.book(BookingRequest(make_patient(sch).id, "follow_up", provider_id=smith, start=before.start,
                                duration_minutes=90), STAFF)
    assert "do not fit" in str(caught.value)
    assert count(sch, Appointment) == 0 and count(sch, Reservation) == 0
    assert get_slot(sch, before.id).booked == 0


# --- several resources at once ----------------------------------------------------


def test_provider_room_and_equipment_are_booked_together_or_not_at_all(sch):
    room, ecg = resource_id(sch, "ROOM1"), resource_id(sch, "ECG1")
    smith_slot = slot_at(sch, "DRSMITH", local(TUESDAY, "10:00"))
    a = book(sch, make_patient(sch).id, smith_slot.id, resource_ids=(room, ecg))
    assert reserved_subjects(sch, a.id) == {f"provider:{smith_slot.provider_id}", f"resource:{room}",
                                            f"resource:{ecg}", f"patient:{a.patient_id}"}
    assert sorted(r.resource_id for r in sch.appointment(a.id).resources) == sorted([room, ecg])

    # Jones is free at 10:00, but the room is not: nothing at all may be kept
    jones_slot = slot_at(sch, "DRJONES", local(TUESDAY, "10:00"))
    patient = make_patient(sch)
    appointments, resources, rows = count(sch, Appointment), count(sch, AppointmentResource), count(sch, Reservation)
    with pytest.raises(SlotUnavailable) as caught:
        book(sch, patient.id, jones_slot.id, resource_ids=(ecg, room))
    assert caught.value.subject in (f"resource:{room}", f"resource:{ecg}")
    assert get_slot(sch, jones_slot.id).booked == 0
    assert (count(sch, Appointment), count(sch, AppointmentResource), count(sch, Reservation)) == \
        (appointments, resources, rows)
    assert reservations(sch, subject=f"patient:{patient.id}") == []
    assert reservations(sch, subject=f"provider:{jones_slot.provider_id}") == []
    # and with only the room free again the same request goes through
    sch.cancel(a.id, STAFF)
    b = book(sch, patient.id, jones_slot.id, resource_ids=(ecg, room))
    assert reserved_subjects(sch, b.id) == {f"provider:{jones_slot.provider_id}", f"resource:{room}",
                                            f"resource:{ecg}", f"patient:{patient.id}"}


# --- slot types --------------------------------------------------------------------


def test_procedure_and_follow_up_slots_take_only_their_own_types(sch):
    procedure = slot_at(sch, "DRJONES", local("2026-03-07", "08:00"))
    follow_up = slot_at(sch, "DRSMITH", local("2026-03-02", "13:00"))
    for slot, wrong in ((procedure, "new_patient"), (procedure, "follow_up"), (procedure, "general"),
                        (follow_up, "new_patient"), (follow_up, "procedure"), (follow_up, "general")):
        with pytest.raises(SlotTypeMismatch):
            book(sch, make_patient(sch).id, slot.id, wrong)
        assert get_slot(sch, slot.id).booked == 0
    assert book(sch, make_patient(sch).id, procedure.id, "procedure").status == "booked"
    assert book(sch, make_patient(sch).id, follow_up.id, "follow_up").status == "booked"
    # a new-patient slot is not exclusive: a follow-up may use it
    assert book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(TUESDAY, "08:00")).id,
                "follow_up").status == "booked"


def test_emergency_slots_take_only_urgent_requests_until_released(sch, clock):
    er = slot_at(sch, "DRSMITH", local(TUESDAY, "16:00"))
    assert er.slot_type == "emergency"
    release = er.start - sch.settings.emergency_release
    routine = make_patient(sch)
    query = SlotQuery("new_patient", er.start - timedelta(hours=1), er.end, provider_id=er.provider_id, limit=50)

    clock.set(release - timedelta(seconds=1))
    with pytest.raises(SlotTypeMismatch) as caught:
        book(sch, routine.id, er.id)
    assert "only urgent" in str(caught.value)
    assert er.id not in [c.slot_id for c in sch.free_slots(query)]
    assert er.id in [c.slot_id for c in sch.free_slots(SlotQuery(**{**query.__dict__, "urgency": "urgent"}))]

    urgent = book(sch, make_patient(sch).id, er.id, urgency="urgent")
    assert urgent.status == "booked"
    sch.cancel(urgent.id, STAFF)

    clock.set(release)
    assert er.id in [c.slot_id for c in sch.free_slots(query)]
    assert book(sch, routine.id, er.id).status == "booked"


# --- holds --------------------------------------------------------------------------


def test_a_hold_keeps_the_time_until_it_expires_then_a_colliding_booking_succeeds(sch, clock, recorder):
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "11:00"))
    hold = sch.hold(BookingRequest(make_patient(sch).id, "new_patient", slot_id=slot.id), STAFF)
    assert hold.status == "held" and hold.hold_expires_at == clock.now() + sch.settings.hold_duration
    assert get_slot(sch, slot.id).booked == 1
    other = make_patient(sch)
    with pytest.raises(SlotUnavailable):
        book(sch, other.id, slot.id)

    clock.advance(minutes=10)  # the hold's time is up; nobody swept yet
    booked = book(sch, other.id, slot.id)
    assert booked.status == "booked"
    expired = sch.appointment(hold.id)
    assert expired.status == "cancelled"
    assert reservations(sch, appointment_id=hold.id) == []
    assert get_slot(sch, slot.id).booked == 1
    entry = [e for e in audit(sch, entity="appointment", entity_id=hold.id) if e.action == "hold_expired"]
    assert entry and entry[0].actor == "system:hold-expiry" and entry[0].reason == "hold expired"
    assert (entry[0].from_state, entry[0].to_state) == ("held", "cancelled")


def test_release_expired_holds_frees_their_time(sch, clock, recorder):
    slots = [slot_at(sch, "DRSMITH", local(TUESDAY, t)) for t in ("09:00", "09:15")]
    holds = [sch.hold(BookingRequest(make_patient(sch).id, "new_patient", slot_id=s.id), STAFF) for s in slots]
    clock.advance(minutes=5)
    fresh = sch.hold(BookingRequest(make_patient(sch).id, "new_patient",
                                    slot_id=slot_at(sch, "DRSMITH", local(TUESDAY, "09:30")).id), STAFF)
    assert sch.release_expired_holds() == 0
    clock.advance(minutes=5)
    assert sch.release_expired_holds() == 2
    assert [sch.appointment(h.id).status for h in holds] == ["cancelled", "cancelled"]
    assert all(get_slot(sch, s.id).booked == 0 for s in slots)
    assert all(reservations(sch, appointment_id=h.id) == [] for h in holds)
    freed = {s for c in recorder.committed if c.kind == "hold_expired" for s in c.slot_ids}
    assert freed == {s.id for s in slots}
    # the younger hold is still alive and can be confirmed; an expired one cannot
    assert sch.confirm_hold(fresh.id, STAFF).status == "booked"
    assert sch.appointment(fresh.id).hold_expires_at is None


def test_an_expired_hold_cannot_be_confirmed(sch, clock):
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "11:15"))
    hold = sch.hold(BookingRequest(make_patient(sch).id, "new_patient", slot_id=slot.id), STAFF)
    clock.advance(minutes=10)
    with pytest.raises(SlotUnavailable) as caught:
        sch.confirm_hold(hold.id, STAFF)
    assert "expired" in str(caught.value)
    assert sch.appointment(hold.id).status == "held"


# --- reschedule and cancel ---------------------------------------------------------------


def test_reschedule_is_all_or_nothing(sch, recorder):
    room = resource_id(sch, "ROOM1")
    x = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    y = slot_at(sch, "DRSMITH", local(TUESDAY, "10:00"))
    z = slot_at(sch, "DRSMITH", local(TUESDAY, "11:00"))
    mine = book(sch, make_patient(sch).id, x.id, resource_ids=(room,))
    book(sch, make_patient(sch).id, y.id)
    book(sch, make_patient(sch).id, slot_at(sch, "DRJONES", local(TUESDAY, "11:00")).id, resource_ids=(room,))
    held_before = reservations(sch, appointment_id=mine.id)

    for target, resources in ((y, (room,)), (z, (room,))):  # provider taken; then the room taken
        with pytest.raises(SlotUnavailable):
            sch.reschedule(mine.id, BookingRequest(mine.patient_id, "new_patient", slot_id=target.id,
                                                   resource_ids=resources), STAFF)
        a = sch.appointment(mine.id)
        assert (a.status, a.start, a.end) == ("booked", x.start, x.end)
        assert [r.resource_id for r in a.resources] == [room]
        assert reservations(sch, appointment_id=mine.id) == held_before
        assert slot_ids_of(sch, mine.id) == [x.id]
        assert (get_slot(sch, x.id).booked, get_slot(sch, y.id).booked, get_slot(sch, z.id).booked) == (1, 1, 0)

    # a free time: it moves, and plugins hear which slot was freed
    free = slot_at(sch, "DRSMITH", local(WEDNESDAY, "09:00"))
    moved = sch.reschedule(mine.id, BookingRequest(mine.patient_id, "new_patient", slot_id=free.id,
                                                   resource_ids=(room,)), STAFF, "patient asked")
    assert (moved.status, moved.start) == ("booked", free.start)
    assert (get_slot(sch, x.id).booked, get_slot(sch, free.id).booked) == (0, 1)
    change = recorder.last("rescheduled")
    assert change.slot_ids == (x.id,) and change.detail["previous_start"] == x.start.isoformat()
    assert {r[1] for r in reservations(sch, appointment_id=mine.id)} == set(units(free.start, free.end))


def test_cancel_frees_the_slot_and_tells_plugins_which(sch, recorder):
    slot = slot_at(sch, "DRJONES", local(TUESDAY, "14:00"))
    a = book(sch, make_patient(sch).id, slot.id, duration_minutes=60)
    taken = slot_ids_of(sch, a.id)
    assert len(taken) == 2
    cancelled = sch.cancel(a.id, STAFF, "patient is better")
    assert cancelled.status == "cancelled"
    assert all(get_slot(sch, s).booked == 0 for s in taken)
    assert reservations(sch, appointment_id=a.id) == [] and slot_ids_of(sch, a.id) == []
    change = recorder.last("cancelled")
    assert sorted(change.slot_ids) == sorted(taken)
    assert (change.from_state, change.to_state, change.reason) == ("booked", "cancelled", "patient is better")
    assert recorder.in_transaction[-1] == change  # schedule_changed ran inside the transaction too
    # the time is free for someone else
    assert book(sch, make_patient(sch).id, slot.id).status == "booked"


# --- blocked time -------------------------------------------------------------------


def test_block_time_closes_slots_and_reports_affected_appointments(sch, recorder):
    smith = provider_id(sch, "DRSMITH")
    kept = book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:15")).id)
    outside = book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(TUESDAY, "10:00")).id)
    start, end = local(TUESDAY, "09:00"), local(TUESDAY, "10:00")
    block, affected = sch.block_time(start=start, end=end, provider_id=smith, actor=STAFF, reason="staff meeting")
    assert affected == [kept.id]
    assert sch.appointment(kept.id).status == "booked"  # staff decide what to move
    closed = [s for s in _smith_slots(sch, start, end)]
    assert len(closed) == 4 and all(s.blocked for s in closed)
    change = recorder.last("slots_blocked")
    assert sorted(change.slot_ids) == sorted(s.id for s in closed)
    assert change.detail == {"block_id": block.id, "affected_appointments": [kept.id]}
    assert outside.id not in affected

    query = SlotQuery("new_patient", start, end, provider_id=smith, limit=50)
    assert sch.free_slots(query) == []
    with pytest.raises(SlotUnavailable) as caught:
        book(sch, make_patient(sch).id, closed[0].id)
    assert "blocked" in str(caught.value)
    with pytest.raises(SlotUnavailable):  # by provider and time as well
        sch.book(BookingRequest(make_patient(sch).id, "general", provider_id=smith, start=start,
                                duration_minutes=15), STAFF)

    # two overlapping blocks: lifting one keeps the other's time closed
    second, _ = sch.block_time(start=local(TUESDAY, "09:30"), end=local(TUESDAY, "10:00"), provider_id=smith,
                               actor=STAFF, reason="phone call")
    opened = sch.unblock_time(block.id, STAFF, "meeting moved")
    assert sorted(opened) == [closed[0].id, closed[1].id]  # 09:30 and 09:45 stay under the second block
    assert recorder.last("slots_opened").slot_ids == tuple(opened)
    assert [s.start for s in sch.free_slots(query)] == [local(TUESDAY, "09:00")]  # 09:15 is kept's
    sch.unblock_time(second.id, STAFF)
    assert [s.start for s in sch.free_slots(query)] == [local(TUESDAY, t) for t in ("09:00", "09:30", "09:45")]
    assert book(sch, make_patient(sch).id, closed[0].id).status == "booked"
    entries = audit(sch, entity="time_block", entity_id=block.id)
    assert [e.action for e in entries] == ["slots_blocked", "slots_opened"]
    assert entries[0].reason == "staff meeting" and entries[0].after["provider_id"] == smith


def _smith_slots(sch, start, end):
    with sch.sessions() as s:
        return list(s.scalars(select(Slot).where(Slot.provider_id == provider_id(sch, "DRSMITH"), Slot.start < end,
                                                 Slot.end > start).order_by(Slot.start)))


def test_a_long_block_works_on_every_database(sch):
    """A year of leave is ~105,000 five-minute units: more than a query may bind one by one."""
    smith = provider_id(sch, "DRSMITH")
    a = book(sch, make_patient(sch).id, slot_at(sch, "DRSMITH", local(WEDNESDAY, "09:00")).id)
    block, affected = sch.block_time(start=local(TUESDAY, "00:00"), end=local("2027-03-03", "00:00"),
                                     provider_id=smith, actor=STAFF, reason="sabbatical")
    assert affected == [a.id]
    assert all(s.blocked for s in _smith_slots(sch, local(TUESDAY, "00:00"), local("2027-01-01", "00:00")))
    sch.unblock_time(block.id, STAFF)
    assert not any(s.blocked for s in _smith_slots(sch, local(TUESDAY, "00:00"), local("2027-01-01", "00:00")))


# --- audit ------------------------------------------------------------------------------


def test_every_change_is_audited_with_actor_source_reason_before_and_after(sch, clock):
    desk = Actor("operator", "maria", "cli: slotengine appointments cancel")
    hl7 = Actor("message", "EPIC^HOSP", "inbound message 42")
    patient = make_patient(sch)
    nine = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    ten = slot_at(sch, "DRSMITH", local(TUESDAY, "10:00"))
    a = sch.book(BookingRequest(patient.id, "new_patient", slot_id=nine.id, reason="cough"), hl7)
    sch.reschedule(a.id, BookingRequest(patient.id, "new_patient", slot_id=ten.id), hl7, "patient asked")
    clock.advance(minutes=1)
    sch.cancel(a.id, desk, "called to cancel")

    entries = audit(sch, entity="appointment", entity_id=a.id)
    assert [(e.action, e.from_state, e.to_state) for e in entries] == [
        ("booked", "requested", "booked"), ("rescheduled", "booked", "booked"), ("cancelled", "booked", "cancelled")]
    booked, moved, cancelled = entries
    assert (booked.actor, booked.source, booked.reason) == ("message:EPIC^HOSP", "inbound message 42", "cough")
    assert booked.before is None and booked.after["start"] == nine.start.isoformat()
    assert moved.reason == "patient asked"
    assert (moved.before["start"], moved.after["start"]) == (nine.start.isoformat(), ten.start.isoformat())
    assert (cancelled.actor, cancelled.source, cancelled.reason) == (
        "operator:maria", "cli: slotengine appointments cancel", "called to cancel")
    assert (cancelled.before["status"], cancelled.after["status"]) == ("booked", "cancelled")
    assert cancelled.at == clock.now() and booked.at < cancelled.at
    # patients, coverage and blocks are audited too; no entry lacks an actor
    with sch.sessions() as s:
        all_entries = list(s.scalars(select(AuditEntry)))
    assert {e.entity for e in all_entries} >= {"patient", "appointment"}
    assert all(e.actor and e.action for e in all_entries)


def test_slots_generated_after_a_block_are_born_blocked(sch):
    """Leave entered before the nightly roll-out reaches those weeks: the new slots are closed too."""
    from datetime import date

    smith = provider_id(sch, "DRSMITH")
    start, end = local("2026-03-17", "00:00"), local("2026-03-19", "00:00")  # beyond the generated fortnight
    assert _smith_slots(sch, start, end) == []
    block, _ = sch.block_time(start=start, end=end, provider_id=smith, actor=STAFF, reason="leave")
    lifted, _ = sch.block_time(start=local("2026-03-19", "09:00"), end=local("2026-03-19", "10:00"),
                               provider_id=smith, actor=STAFF)
    sch.unblock_time(lifted.id, STAFF)
    assert sch.expand_templates(date(2026, 3, 16), date(2026, 3, 20)) > 0
    inside = _smith_slots(sch, start, end)
    assert inside and all(s.blocked for s in inside)
    assert not any(s.blocked for s in _smith_slots(sch, end, local("2026-03-21", "00:00")))
    query = SlotQuery("new_patient", local("2026-03-16", "00:00"), local("2026-03-21", "00:00"), provider_id=smith,
                      limit=200)
    offered = {c.start.astimezone(inside[0].start.tzinfo).date() for c in sch.free_slots(query)}
    assert offered == {date(2026, 3, 16), date(2026, 3, 19), date(2026, 3, 20)}
    sch.unblock_time(block.id, STAFF)
    assert not any(s.blocked for s in _smith_slots(sch, start, end))


def test_bookings_sharing_one_transaction_undo_only_themselves_when_refused(sch, recorder):
    """``Scheduler.within(session)``: several bookings in one transaction (one fsync), each in a
    savepoint -- the HL7 listener's group commit.  A refusal in the middle leaves the others."""
    ann, bob = make_patient(sch), make_patient(sch)
    nine, ten = (slot_at(sch, "DRSMITH", local(TUESDAY, t)) for t in ("09:00", "10:00"))
    jones_nine = slot_at(sch, "DRJONES", local(TUESDAY, "09:00"))
    outcomes, heard = [], len(recorder.committed)
    with sch.sessions() as session, session.begin():
        view = sch.within(session)
        for patient, slot in ((ann, nine), (ann, jones_nine), (bob, nine), (bob, ten)):
            try:
                outcomes.append(view.book(BookingRequest(patient.id, "new_patient", slot_id=slot.id), STAFF).id)
            except SlotUnavailable as exc:
                outcomes.append(type(exc).__name__)
    assert len(recorder.committed) == heard  # nothing announced before the caller's commit
    view.notify_committed()
    first, conflict, taken, last = outcomes
    assert (conflict, taken) == ("PatientConflict", "SlotUnavailable")
    assert [sch.appointment(a).status for a in (first, last)] == ["booked", "booked"]
    assert count(sch, Appointment) == 2
    assert (get_slot(sch, nine.id).booked, get_slot(sch, jones_nine.id).booked, get_slot(sch, ten.id).booked) == (1, 0, 1)
    assert {r[3] for r in reservations(sch)} == {first, last}
    assert recorder.kinds()[heard:] == ["booked", "booked"]


def test_modify_changes_reason_and_notes_only_and_records_it_once(sch, recorder):
    from engine.errors import InvalidRequest

    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local("2026-03-03", "09:00"))
    appointment = book(sch, patient.id, slot.id, reason="cough")
    modified = sch.modify(appointment.id, STAFF, reason="cough and fever", notes="bring inhaler", why="placer S03")
    assert (modified.reason, modified.notes, modified.start) == ("cough and fever", "bring inhaler", slot.start)
    [entry] = [a for a in audit(sch, entity_id=appointment.id) if a.action == "modified"]
    assert (entry.before["reason"], entry.after["reason"], entry.reason) == ("cough", "cough and fever", "placer S03")
    sch.modify(appointment.id, STAFF, reason="cough and fever")  # the same again: nothing recorded
    assert [c.kind for c in recorder.committed].count("modified") == 1
    sch.cancel(appointment.id, STAFF)
    with pytest.raises(InvalidRequest, match="cancelled"):
        sch.modify(appointment.id, STAFF, notes="too late")
