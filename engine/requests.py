"""The service API's vocabulary: what callers ask for and what they get back.

Plain dataclasses, no ORM objects, so the HL7 side, the CLI and plugins can
build requests without a session, and results can cross thread boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Optional


@dataclass(frozen=True)
class Actor:
    """Who or what caused a change: recorded in every audit entry.

    kind: operator | plugin | message | system | api;  source: e.g. the stored
    message id or the CLI command line.
    """

    kind: str
    name: str
    source: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


SYSTEM = Actor("system", "slotengine")


@dataclass(frozen=True)
class Identifier:
    value: str
    authority: str = ""
    type_code: str = ""


@dataclass
class PatientRecord:
    """Demographics as a source knows them; ``None`` means "not said", so an
    update from a sparse message does not erase what another message said."""

    identifiers: list[Identifier] = field(default_factory=list)
    family_name: Optional[str] = None
    given_name: Optional[str] = None
    birth_date: Optional[date] = None
    sex: Optional[str] = None
    language: Optional[str] = None
    email: Optional[str] = None
    phones: Optional[list[dict[str, str]]] = None
    address: Optional[dict[str, str]] = None
    needs_interpreter: Optional[bool] = None
    mobility: Optional[str] = None
    other_needs: Optional[str] = None
    preferred_provider_gender: Optional[str] = None
    preferred_weekdays: Optional[list[int]] = None
    preferred_earliest: Optional[time] = None
    preferred_latest: Optional[time] = None
    preferred_channel: Optional[str] = None
    confidential: Optional[bool] = None
    deceased: Optional[bool] = None
    deceased_at: Optional[datetime] = None


@dataclass
class CoverageRecord:
    payer_id: str
    member_id: str = ""
    payer_name: str = ""
    plan_id: str = ""
    group_number: str = ""
    priority: int = 1
    effective_date: Optional[date] = None
    expiry_date: Optional[date] = None
    verification_status: str = "unverified"
    verified_at: Optional[datetime] = None


@dataclass
class BookingRequest:
    """Book (or hold) a patient into a slot, or at a start time with a provider.

    Several resources (room, equipment) are booked with the provider in one
    transaction: all or nothing.
    """

    patient_id: int
    appointment_type: str
    slot_id: Optional[int] = None
    provider_id: Optional[int] = None
    start: Optional[datetime] = None
    duration_minutes: Optional[int] = None
    resource_ids: tuple[int, ...] = ()
    urgency: str = "routine"
    reason: str = ""
    notes: str = ""
    placer_id: Optional[str] = None
    filler_id: Optional[str] = None
    # a full slot may take one more patient if a plugin allows it (slotengine_allow_overbook)
    overbook: bool = False


@dataclass
class ExternalAppointment:
    """An appointment as the EHR (the filler, in mirror mode) says it is."""

    status: str
    start: datetime
    end: datetime
    appointment_type: str = "general"
    placer_id: Optional[str] = None
    filler_id: Optional[str] = None
    patient_id: Optional[int] = None
    provider_id: Optional[int] = None
    location_id: Optional[int] = None
    resource_ids: tuple[int, ...] = ()
    reason: str = ""
    urgency: str = "routine"
    notes: str = ""


@dataclass
class SlotQuery:
    appointment_type: str
    start: datetime
    end: datetime
    duration_minutes: Optional[int] = None
    provider_id: Optional[int] = None
    specialty: Optional[str] = None
    location_id: Optional[int] = None
    patient_id: Optional[int] = None  # brings the patient's own preferences
    urgency: str = "routine"
    provider_gender: Optional[str] = None
    language: Optional[str] = None
    weekdays: Optional[list[int]] = None
    earliest: Optional[time] = None
    latest: Optional[time] = None
    limit: int = 10
    # when fewer free slots than ``limit`` fit, also offer seats in full slots that a
    # plugin allows (slotengine_allow_overbook), ranked after every free slot
    overbook: bool = False


@dataclass
class Candidate:
    slot_id: int
    start: datetime
    end: datetime
    provider_id: Optional[int]
    resource_id: Optional[int]
    location_id: int
    slot_type: str
    seats_left: int
    score: float = 0.0
    slot_ids: tuple[int, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)  # each scoring plugin's share of ``score``
    excluded: str = ""  # "<plugin>: <reason>" when a plugin left it out of the search
    overbook: Optional[dict[str, Any]] = None  # a seat above a full slot's capacity: the plugins' verdict

    def as_dict(self) -> dict[str, Any]:
        row = {
            "slot_id": self.slot_id,
            "slot_ids": list(self.slot_ids or (self.slot_id,)),
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "provider_id": self.provider_id,
            "resource_id": self.resource_id,
            "location_id": self.location_id,
            "slot_type": self.slot_type,
            "seats_left": self.seats_left,
            "score": self.score,
            "scores": dict(self.scores),
        }
        if self.excluded:
            row["excluded"] = self.excluded
        if self.overbook is not None:
            row["overbook"] = self.overbook
        return row


@dataclass(frozen=True)
class ChangeOutcome:
    """What ``Scheduler.request_*`` did: ``applied`` here at once (slotengine
    owns the calendar), or ``requested`` of ``owner`` (change request
    ``request_id``), counting only once the owner confirms it."""

    status: str  # applied | requested
    appointment_id: int
    appointment_status: str
    owner: Optional[str] = None
    request_id: Optional[int] = None

    @property
    def applied(self) -> bool:
        return self.status == "applied"


@dataclass
class UrgentRequest:
    """A patient who must be seen soon (``Scheduler.request_urgent``): the visit
    must start between ``earliest`` and ``latest_start`` (UTC; ``None``: the
    handling plugin's default window), the clinically required window.
    ``provider_id`` / ``specialty`` / ``location_id`` narrow who may see them;
    ``placer_id`` is the placer's appointment id of an HL7 request."""

    patient_id: int
    duration_minutes: int
    earliest: datetime
    latest_start: Optional[datetime] = None
    appointment_type: str = "general"
    provider_id: Optional[int] = None
    specialty: Optional[str] = None
    location_id: Optional[int] = None
    reason: str = ""
    notes: str = ""
    placer_id: Optional[str] = None


@dataclass(frozen=True)
class Change:
    """One committed change to the schedule, as plugins and outbound feeds see it."""

    kind: str  # booked, held, rescheduled, modified, cancelled, ... slots_blocked, slots_opened
    appointment_id: Optional[int]
    from_state: str
    to_state: str
    actor: Actor
    reason: str = ""
    slot_ids: tuple[int, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)
