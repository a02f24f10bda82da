"""Domain errors: each says what was refused and why, in the scheduler's words.

Callers (the HL7 side, the CLI, plugins) map them to their own answers: an
HL7 AE with an ERR segment, a CLI message on stderr, an HTTP 409.
"""
from __future__ import annotations


class SchedulingError(Exception):
    """Base class: a request the schedule cannot honour."""

    code = "scheduling_error"


class NotFound(SchedulingError):
    code = "not_found"

    def __init__(self, entity: str, key: object):
        self.entity, self.key = entity, key
        super().__init__(f"{entity} {key!r} not found")


class IllegalTransition(SchedulingError):
    code = "illegal_transition"

    def __init__(self, appointment_id: int, current: str, attempted: str):
        self.appointment_id, self.current, self.attempted = appointment_id, current, attempted
        super().__init__(
            f"appointment {appointment_id} is {current}; it cannot become {attempted}"
        )


class SlotUnavailable(SchedulingError):
    """The time is taken (or blocked, or of the wrong type) for one of the participants."""

    code = "slot_unavailable"

    def __init__(self, message: str, *, subject: str = ""):
        self.subject = subject
        super().__init__(message)


class PatientConflict(SlotUnavailable):
    code = "patient_conflict"


class SlotTypeMismatch(SlotUnavailable):
    code = "slot_type_mismatch"


class TooEarly(SchedulingError):
    code = "too_early"


class InvalidRequest(SchedulingError):
    code = "invalid_request"


class BookingVetoed(SchedulingError):
    """A plugin refused the booking (eligibility, business rule)."""

    code = "vetoed"

    def __init__(self, plugin: str, reason: str):
        self.plugin, self.reason = plugin, reason
        super().__init__(f"{plugin}: {reason}")
