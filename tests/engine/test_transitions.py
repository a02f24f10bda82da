"""Every pair of states in ``engine.states.TRANSITIONS``, through the service API.

For each state an appointment is brought into it the way the schedule really
gets there (hold, book, overbook, arrive, ... or a mirror message for the
states only the EHR sets), then every other state is asked for with the calls
that lead there: a legal move succeeds, is audited and keeps the time
bookkeeping right; an illegal one raises ``IllegalTransition`` naming the
appointment, its state and the state asked for, and changes nothing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import pytest

from engine.errors import IllegalTransition
from engine.requests import BookingRequest, ExternalAppointment
from engine.states import OCCUPYING, TRANSITIONS, Status
from tests.engine.helpers import (
    STAFF,
    audit,
    get_appointment,
    make_patient,
    provider_id,
    reservations,
    slot_ids_of,
    slots_of,
)

S = Status
ALL = list(Status)


@dataclass
class Desk:
    """Hands out fresh patients and never-used slots, and builds appointments in any state."""

    sch: object
    clock: object

    def __post_init__(self):
        self.single = iter(slots_of(self.sch, "DRLEE"))  # capacity 1
        self.shared = iter(slots_of(self.sch, "DRJONES", slot_type="new_patient"))  # capacity 2
        self.jones = provider_id(self.sch, "DRJONES")
        self.lee = provider_id(self.sch, "DRLEE")
        self.ids = itertools.count(1)

    def patient(self) -> int:
        return make_patient(self.sch).id

    def single_slot(self):
        return next(self.single)

    def half_full_slot(self):
        """A capacity-2 slot that already holds one booking."""
        slot = next(self.shared)
        self.sch.book(BookingRequest(self.patient(), "new_patient", slot_id=slot.id), STAFF)
        return slot

    def external(self, status: str, slot, patient_id: int) -> ExternalAppointment:
        return ExternalAppointment(status=status, start=slot.start, end=slot.end, appointment_type="new_patient",
                                   placer_id=f"PL{next(self.ids)}", patient_id=patient_id,
                                   provider_id=slot.provider_id, location_id=slot.location_id)

    def in_state(self, state: Status, *, shared: bool = False) -> int:
        """An appointment in ``state``; ``shared`` puts it in a capacity-2 slot beside another booking."""
        slot = self.half_full_slot() if shared or state is S.OVERBOOKED else self.single_slot()
        patient = self.patient()
        if state in (S.REQUESTED, S.WAITLISTED):
            appointment = self.sch.record_external_appointment(self.external(state.value, slot, patient), STAFF)
            return appointment.id
        request = BookingRequest(patient, "new_patient", slot_id=slot.id)
        if state is S.HELD:
            return self.sch.hold(request, STAFF).id
        appointment = self.sch.book(request, STAFF)
        expected = S.OVERBOOKED if shared or state is S.OVERBOOKED else S.BOOKED
        assert appointment.status == expected.value
        aid = appointment.id
        if state in (S.BOOKED, S.OVERBOOKED):
            return aid
        if state in (S.ARRIVED, S.CHECKED_IN, S.COMPLETED):
            self.sch.arrive(aid, STAFF)
            if state in (S.CHECKED_IN, S.COMPLETED):
                self.sch.check_in(aid, STAFF)
            if state is S.COMPLETED:
                self.sch.complete(aid, STAFF)
        elif state is S.CANCELLED:
            self.sch.cancel(aid, STAFF)
        elif state is S.DISCONTINUED:
            self.sch.discontinue(aid, STAFF)
        elif state is S.DELETED:
            self.sch.delete(aid, STAFF)
        elif state is S.NO_SHOW:
            self.mark_no_show(aid)
        assert get_appointment(self.sch, aid).status == state.value
        return aid

    def mark_no_show(self, aid: int):
        """A no-show can only be recorded after start + grace: turn the clock there and back."""
        now = self.clock.now()
        appointment = get_appointment(self.sch, aid)
        self.clock.set(appointment.start + self.sch.settings.no_show_grace)
        try:
            return self.sch.mark_no_show(aid, STAFF)
        finally:
            self.clock.set(now)

    def mirror(self, aid: int, status: Status):
        a = get_appointment(self.sch, aid)
        return self.sch.record_external_appointment(
            ExternalAppointment(status=status.value, start=a.start, end=a.end, appointment_type=a.appointment_type,
                                placer_id=a.placer_id, filler_id=a.filler_id, patient_id=a.patient_id,
                                provider_id=a.provider_id, location_id=a.location_id), STAFF)

    def reschedule_to(self, aid: int, slot):
        return self.sch.reschedule(aid, BookingRequest(0, "new_patient", slot_id=slot.id), STAFF)


# The service calls that ask for each target state (besides a mirror message).
def _calls(desk: Desk) -> dict[Status, list[tuple[str, Callable[[int], object]]]]:
    s = desk.sch
    return {
        S.REQUESTED: [],
        S.HELD: [],
        S.WAITLISTED: [],
        S.BOOKED: [
            ("confirm_hold", lambda a: s.confirm_hold(a, STAFF)),
            ("reinstate", lambda a: s.reinstate(a, STAFF)),
            ("undo_no_show", lambda a: s.undo_no_show(a, STAFF)),
            ("undo_arrival", lambda a: s.undo_arrival(a, STAFF)),
            ("reschedule", lambda a: desk.reschedule_to(a, desk.single_slot())),
        ],
        # reschedule asks for "booked"; the seat it lands on makes it overbooked (tested as legal moves)
        S.OVERBOOKED: [],
        S.ARRIVED: [("arrive", lambda a: s.arrive(a, STAFF)), ("undo_check_in", lambda a: s.undo_check_in(a, STAFF))],
        S.CHECKED_IN: [("check_in", lambda a: s.check_in(a, STAFF)),
                       ("undo_completion", lambda a: s.undo_completion(a, STAFF))],
        S.COMPLETED: [("complete", lambda a: s.complete(a, STAFF))],
        S.CANCELLED: [("cancel", lambda a: s.cancel(a, STAFF))],
        S.DISCONTINUED: [("discontinue", lambda a: s.discontinue(a, STAFF))],
        S.NO_SHOW: [("mark_no_show", lambda a: desk.mark_no_show(a))],
        S.DELETED: [("delete", lambda a: s.delete(a, STAFF))],
    }


def _legal_call(desk: Desk, source: Status, target: Status) -> tuple[str, bool, Callable[[int], object]]:
    """How the service makes a legal move: (name, needs a shared slot, call)."""
    s = desk.sch
    if target is S.BOOKED:
        by_source = {
            S.REQUESTED: "confirm_hold", S.WAITLISTED: "confirm_hold", S.HELD: "confirm_hold",
            S.BOOKED: "reschedule", S.OVERBOOKED: "reschedule", S.ARRIVED: "undo_arrival",
            S.CANCELLED: "reinstate", S.NO_SHOW: "undo_no_show",
        }
        name = by_source[source]
        return name, False, dict(_calls(desk)[S.BOOKED])[name]
    if target is S.OVERBOOKED:
        if source in (S.BOOKED, S.OVERBOOKED):
            return "reschedule", False, lambda a: desk.reschedule_to(a, desk.half_full_slot())
        # confirming a hold / request that sits beside another booking in a capacity-2 slot
        return "confirm_hold", True, lambda a: s.confirm_hold(a, STAFF)
    if target in (S.HELD, S.WAITLISTED):
        return "mirror", False, lambda a: desk.mirror(a, target)
    if target is S.ARRIVED and source is S.CHECKED_IN:
        return "undo_check_in", False, lambda a: s.undo_check_in(a, STAFF)
    if target is S.CHECKED_IN and source is S.COMPLETED:
        return "undo_completion", False, lambda a: s.undo_completion(a, STAFF)
    name, call = _calls(desk)[target][0]
    return name, False, call


@pytest.mark.parametrize("source", ALL, ids=[s.value for s in ALL])
def test_every_legal_transition_succeeds_through_the_service(sch, clock, recorder, source):
    desk = Desk(sch, clock)
    failures = []
    for target in sorted(TRANSITIONS[source], key=lambda s: s.value):
        name, shared, call = _legal_call(desk, source, target)
        aid = desk.in_state(source, shared=shared)
        audit_before = len(audit(sch, entity="appointment", entity_id=aid))
        try:
            result = call(aid)
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            failures.append(f"{source.value} -> {target.value} via {name}: {type(exc).__name__}: {exc}")
            continue
        stored = get_appointment(sch, aid)
        problems = []
        if result.status != target.value or stored.status != target.value:
            problems.append(f"status returned {result.status}, stored {stored.status}")
        entries = audit(sch, entity="appointment", entity_id=aid)[audit_before:]
        if [(e.from_state, e.to_state) for e in entries] != [(source.value, target.value)]:
            problems.append(f"audit {[(e.from_state, e.to_state) for e in entries]}")
        elif entries[0].actor != STAFF.label or entries[0].source != STAFF.source:
            problems.append(f"audit actor {entries[0].actor!r} source {entries[0].source!r}")
        change = recorder.committed[-1]
        if (change.appointment_id, change.from_state, change.to_state) != (aid, source.value, target.value):
            problems.append(f"plugins heard {change}")
        held = reservations(sch, appointment_id=aid)
        subjects = {r[0] for r in held}
        if target in OCCUPYING:
            wanted = {f"provider:{stored.provider_id}", f"patient:{stored.patient_id}"}
            if subjects != wanted:
                problems.append(f"{target.value} should hold {wanted}, holds {subjects}")
            if not slot_ids_of(sch, aid):
                problems.append("occupies no slot")
        elif held or slot_ids_of(sch, aid):
            problems.append(f"{target.value} still holds time: {subjects} slots {slot_ids_of(sch, aid)}")
        if problems:
            failures.append(f"{source.value} -> {target.value} via {name}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("source", ALL, ids=[s.value for s in ALL])
def test_every_illegal_transition_is_refused_naming_both_states(sch, clock, recorder, source):
    desk = Desk(sch, clock)
    calls = _calls(desk)
    failures = []
    aid = desk.in_state(source)
    before = get_appointment(sch, aid)
    held_before = reservations(sch, appointment_id=aid)
    slots_before = slot_ids_of(sch, aid)
    audit_before = len(audit(sch, entity="appointment", entity_id=aid))
    illegal = [t for t in ALL if t not in TRANSITIONS[source]]
    for target in illegal:
        attempts = list(calls[target])
        if target is not source:  # a repeated mirror message is idempotent, not a transition
            attempts.append(("mirror", lambda a, t=target: desk.mirror(a, t)))
        for name, call in attempts:
            try:
                call(aid)
            except IllegalTransition as exc:
                if (exc.appointment_id, exc.current, exc.attempted) != (aid, source.value, target.value):
                    failures.append(f"{name}: {source.value} -> {target.value} raised for "
                                    f"({exc.appointment_id}, {exc.current}, {exc.attempted})")
                for part in (f"appointment {aid}", source.value, target.value):
                    if part not in str(exc):
                        failures.append(f"{name}: message {str(exc)!r} does not name {part!r}")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{name}: {source.value} -> {target.value} raised {type(exc).__name__}: {exc}")
            else:
                failures.append(f"{name}: {source.value} -> {target.value} was allowed")
                return pytest.fail("\n".join(failures))  # the appointment moved; later checks would mislead
    after = get_appointment(sch, aid)
    assert (after.status, after.start, after.end) == (before.status, before.start, before.end)
    assert reservations(sch, appointment_id=aid) == held_before
    assert slot_ids_of(sch, aid) == slots_before
    assert len(audit(sch, entity="appointment", entity_id=aid)) == audit_before, "a refused transition must not be audited as a change"
    assert not failures, "\n".join(failures)


def test_transition_table_is_total_and_deleted_is_final():
    assert set(TRANSITIONS) == set(Status)
    assert TRANSITIONS[S.DELETED] == frozenset()
    for source, targets in TRANSITIONS.items():
        if source is not S.DELETED:
            assert S.DELETED in targets, f"{source} cannot be deleted (entered in error)"


def test_no_show_guard_comes_after_the_state_check(sch, clock):
    """A completed appointment asked to become a no-show hears "illegal", not "too early"."""
    desk = Desk(sch, clock)
    aid = desk.in_state(S.COMPLETED)
    with pytest.raises(IllegalTransition):
        sch.mark_no_show(aid, STAFF)


def test_hold_confirmed_beside_another_booking_is_overbooked(sch, clock):
    """The seat decides: a hold on the second seat of a capacity-2 slot confirms as overbooked."""
    desk = Desk(sch, clock)
    slot = desk.half_full_slot()
    held = sch.hold(BookingRequest(desk.patient(), "new_patient", slot_id=slot.id), STAFF)
    assert held.status == "held"
    assert sch.confirm_hold(held.id, STAFF).status == "overbooked"
    # and an overbooked appointment that arrives and is sent back stays overbooked
    sch.arrive(held.id, STAFF)
    assert sch.undo_arrival(held.id, STAFF).status == "overbooked"


def test_rescheduled_appointment_keeps_time_bookkeeping(sch, clock):
    desk = Desk(sch, clock)
    aid = desk.in_state(S.BOOKED)
    old = slot_ids_of(sch, aid)
    new_slot = desk.single_slot()
    desk.reschedule_to(aid, new_slot)
    assert slot_ids_of(sch, aid) == [new_slot.id]
    assert old != [new_slot.id]
    a = get_appointment(sch, aid)
    assert (a.start, a.end) == (new_slot.start, new_slot.end)
    units = {r[1] for r in reservations(sch, appointment_id=aid)}
    from engine.calendar import units as cut

    assert units == set(cut(new_slot.start, new_slot.end))


def test_reinstating_needs_the_time_to_be_free(sch, clock):
    from engine.errors import SlotUnavailable

    desk = Desk(sch, clock)
    aid = desk.in_state(S.CANCELLED)
    a = get_appointment(sch, aid)
    (slot_id,) = [s.id for s in slots_of(sch, "DRLEE") if s.start == a.start]
    sch.book(BookingRequest(desk.patient(), "new_patient", slot_id=slot_id), STAFF)
    with pytest.raises(SlotUnavailable):
        sch.reinstate(aid, STAFF)
    assert get_appointment(sch, aid).status == "cancelled"
    assert reservations(sch, appointment_id=aid) == []


def test_no_show_reversed_after_the_fact_takes_its_time_back(sch, clock):
    desk = Desk(sch, clock)
    aid = desk.in_state(S.NO_SHOW)
    assert reservations(sch, appointment_id=aid) == []
    assert sch.undo_no_show(aid, STAFF).status == "booked"
    assert reservations(sch, appointment_id=aid)
