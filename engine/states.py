"""The appointment state machine (HL7 table 0278 / FHIR Appointment.status).

``TRANSITIONS`` is the whole law: a service call that asks for a move not in
it raises ``IllegalTransition`` naming the appointment and both states.
"""
from __future__ import annotations

from enum import StrEnum

from engine.errors import IllegalTransition


class Status(StrEnum):
    REQUESTED = "requested"
    HELD = "held"
    WAITLISTED = "waitlisted"
    BOOKED = "booked"
    OVERBOOKED = "overbooked"
    ARRIVED = "arrived"
    CHECKED_IN = "checked_in"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    DISCONTINUED = "discontinued"
    NO_SHOW = "no_show"
    DELETED = "deleted"


S = Status
_BOOKED_LIKE = {S.BOOKED, S.OVERBOOKED}

TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.REQUESTED: frozenset({S.HELD, S.WAITLISTED, S.BOOKED, S.OVERBOOKED, S.CANCELLED, S.DELETED}),
    S.HELD: frozenset({S.BOOKED, S.OVERBOOKED, S.CANCELLED, S.DELETED}),
    S.WAITLISTED: frozenset({S.HELD, S.BOOKED, S.OVERBOOKED, S.CANCELLED, S.DELETED}),
    # booked -> booked is a reschedule or a modification
    S.BOOKED: frozenset(
        {S.BOOKED, S.OVERBOOKED, S.ARRIVED, S.CHECKED_IN, S.CANCELLED, S.DISCONTINUED, S.NO_SHOW, S.DELETED}
    ),
    S.OVERBOOKED: frozenset(
        {S.BOOKED, S.OVERBOOKED, S.ARRIVED, S.CHECKED_IN, S.CANCELLED, S.DISCONTINUED, S.NO_SHOW, S.DELETED}
    ),
    S.ARRIVED: frozenset({S.BOOKED, S.CHECKED_IN, S.COMPLETED, S.DELETED}),  # -> booked: A11
    S.CHECKED_IN: frozenset({S.ARRIVED, S.COMPLETED, S.DELETED}),
    S.COMPLETED: frozenset({S.CHECKED_IN, S.DELETED}),  # -> checked_in: A13
    S.CANCELLED: frozenset({S.BOOKED, S.DELETED}),  # -> booked: reinstated
    S.DISCONTINUED: frozenset({S.DELETED}),
    S.NO_SHOW: frozenset({S.BOOKED, S.DELETED}),  # -> booked: no-show recorded in error
    S.DELETED: frozenset(),
}

#: States in which the appointment occupies its time (reservations held).
OCCUPYING = frozenset({S.HELD, S.BOOKED, S.OVERBOOKED, S.ARRIVED, S.CHECKED_IN, S.COMPLETED})
#: States after which the slot is free again.
RELEASING = frozenset({S.CANCELLED, S.DISCONTINUED, S.NO_SHOW, S.DELETED})

#: HL7 SCH-25 filler status (table 0278) for each state.
HL7_FILLER_STATUS = {
    S.REQUESTED: "Pending",
    S.HELD: "Pending",
    S.WAITLISTED: "Waitlist",
    S.BOOKED: "Booked",
    S.OVERBOOKED: "Overbook",
    S.ARRIVED: "Booked",
    S.CHECKED_IN: "Started",
    S.COMPLETED: "Complete",
    S.CANCELLED: "Cancelled",
    S.DISCONTINUED: "Dc",
    S.NO_SHOW: "Noshow",
    S.DELETED: "Deleted",
}


def check_transition(appointment_id: int, current: str, target: str) -> None:
    if Status(target) not in TRANSITIONS[Status(current)]:
        raise IllegalTransition(appointment_id, current, target)
