"""Filler mode: slotengine owns the schedule; placers ask, we answer.

``apply_request(scheduler, message, message_id=..., settings=...)`` applies one
SRM (S01–S11) through the ``Scheduler`` — every rule of the engine and every
plugin veto applies — and answers it with an SRR; an SQM^S25 availability
query is answered with an SQR. The answer is ``ApplyResult.response`` (ER7
bytes, v2.5.1, checked against hl7apy's structures in the tests); the status
is ``"applied"`` whether the answer is AA or AE: the request was handled,
and what the placer gets to know is in the answer (the inbound message is
not parked, so a refused booking never stops a feed).

The scheduler must be bound to the caller's transaction
(``Scheduler.within(session)``, as ``hl7.processor`` does); an unbound one
gets its own transaction. A request that is refused leaves nothing behind
(its savepoint is rolled back: no patient registered, no waitlist entry) —
except a booking held for staff review, whose time stays held.

What the answer says
--------------------
* **AA** with the appointment as it now is: SCH (SCH-1 placer id, SCH-2 our
  filler id ``SE<n>^<application>``, SCH-11 and TQ1 times in the location's
  wall-clock time with offset, SCH-25 filler status from
  ``engine.states.HL7_FILLER_STATUS``), PID, RGS with AIS (type), AIG
  (resources), AIL (location), AIP (provider).
* **AE** with one ERR per problem: ERR-2 where (``AIP^1^3^1^1``…), ERR-3 the
  table 0357 code, ERR-5 our reason code (``not_found``, ``slot_unavailable``,
  ``patient_conflict``, ``vetoed``, ``held_for_review``,
  ``illegal_transition``, ``duplicate``, ``invalid_request``,
  ``unsupported``), ERR-8 the explanation. Unknown provider (AIP-3.1),
  location (AIL-3.1, or the room in AIL-3.2) or resource (AIG-3.1): 204
  naming the field — in filler mode they must exist in our clinic. Unknown
  appointment (ARQ-1 / ARQ-2): 204. No free time: 207 ``slot_unavailable``
  and, per ``FillerSettings.when_taken``, either the nearest free
  alternatives (NTE in the SCH group) or — S01 only — a waitlist entry
  (then the answer is **AA** with SCH-25 ``Waitlist`` and filler id
  ``SEWL<n>``). An *urgent* S01 (ARQ-12 S/A, or an EMERGENCY/URGENT type)
  with no free time takes the urgent path (``Scheduler.request_urgent``,
  the ``emergency`` plugin): AA once room is made (others moved, or on-call
  capacity), or AE 207 ``pending_approval`` while staff decide on the
  proposal (an SIU S12 follows the booking). A plugin veto (eligibility): 207 ``vetoed``. A booking a
  plugin held for review: 207 ``held_for_review`` *with* the SCH (filler id,
  SCH-25 ``Pending``), because the time is held and the placer will hear an
  SIU S12 when staff confirm it.
* **AR**: a message we cannot handle at all (not SRM/SQM, unknown trigger).

Requests
--------
* ARQ-1 placer appointment id (EI, kept as ``id^namespace``), ARQ-2 our
  filler id (with or without its namespace). ARQ-6 request reason (→ the
  audit reason of cancellations), ARQ-7/8 and AIS-3 appointment type
  (``hl7.mapping.APPOINTMENT_TYPE_CODES``), ARQ-12 priority S/A → urgent,
  ARQ-9/10 duration (else AIS-7/8, AIG-11/12, AIL-9/10, AIP-9/10; else the
  slot's length). ARQ-11 requested start range, every repetition: ``start``
  alone asks for that start, ``start^end`` for any start in that range (the
  earliest free one is booked). DTMs without an offset are wall-clock time
  at the requested location (else the provider's, else the clinic's).
  APR-1 (message-level) PREFSTART/PREFEND=HHMM and MON…SUN=OK/NO narrow a
  range. ARQ-13/14 (repeating series) is refused: one SRM per occurrence.
* PID: S01 registers the patient or finds them (``hl7.mapping``'s PID
  reading, ``Scheduler.register_patient``); a PID on other triggers only
  has to name the appointment's patient (else 205).
* AIP-3.1 provider code (one provider per appointment), AIL-3.1 location
  code (PL-2 a room: a resource), AIG-3.1 resource codes.
* S01 new booking · S02 reschedule (ARQ-11 required) · S03/S08 modify
  (provider, resources, duration, type, or time when ARQ-11 moves it; a
  change of reason (ARQ-7.2) or notes (NTE) alone is
  ``Scheduler.modify``) · S04 cancel · S05 discontinue · S06 delete (a
  waitlisted request is taken off the waitlist) · S07 add the AIG/AIL
  resources · S09/S10/S11 take them off. Services (AIS) are not held
  apart from the appointment: AIS on S07–S11 is ignored with a warning.

Idempotence: a resend with the same control id never reaches us (the store
answers it with the stored SRR). A new control id for the same placer id
finds the appointment and answers with its current state: S01 never books
twice; S04 on a cancelled appointment answers AA; S02 to where the
appointment already is answers AA without moving it.

SQM^S25: QRD-4 query tag, QRD-7.1 how many (else ``query_limit``), time
range from ARQ-11 (else QRF-2/QRF-3), AIP/AIL/AIG, ARQ-7/8/9 as for SRM →
SQR: MSA, QAK (``OK`` / ``NF`` / ``AE``), one SCH group per free slot (TQ1
times, NTE with the slot id and places left, RGS, AIS type, AIG resource,
AIP provider, AIL location).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from typing import Any, Callable, Optional

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.errors import (
    BookingVetoed,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    PatientConflict,
    SchedulingError,
    SlotUnavailable,
)
from engine.models import Appointment, AppointmentResource, AppointmentSlot, Location, Provider, Resource, Slot, \
    WaitlistEntry
from engine.requests import BookingRequest, Candidate, SlotQuery, UrgentRequest
from engine.service import Scheduler
from engine.states import Status
from hl7.ack import Raw, build_message
from hl7.mapping import (
    ApplyResult,
    MappingError,
    _AI,
    _Context,
    _ai_segments,
    _appointment_type,
    _dtm,
    _duration,
    _ei,
    _norm,
    _patient_record,
    _patient_segments,
    _register,
    _val,
)
from hl7.message import ErrorDetail, Message, Segment
from hl7.outbound import (
    TYPE_CODES,
    OutboundSettings,
    PartyView,
    Segments,
    appointment_view,
    ei,
    event_reason,
    local_dtm,
    msh,
    new_control_id,
    nte_segments,
    patient_segment,
    resource_segments,
    schedule_segments,
    tq1_segment,
)
from hl7.outbound import _patient_view

__all__ = ["FillerSettings", "SRM_TRIGGERS", "apply_request", "is_filler_request"]

log = logging.getLogger("slotengine.hl7.filler")

SRM_TRIGGERS = frozenset(f"S{n:02d}" for n in range(1, 12))
WHEN_TAKEN = ("alternatives", "waitlist")
_WEEKDAYS = {"MON": 0, "TUE": 1, "WED": 2, "THU": 3, "FRI": 4, "SAT": 5, "SUN": 6}
_CANCELLING = {"S04": Status.CANCELLED, "S05": Status.DISCONTINUED, "S06": Status.DELETED}
_WAITLIST_MARK = "[SRM placer {}]"


@dataclass(frozen=True)
class FillerSettings:
    when_taken: str = "alternatives"
    """A taken time: ``alternatives`` (AE + the nearest free times in NTE) or
    ``waitlist`` (S01: AA with a waitlist entry; S02: AE + alternatives + a waitlist entry)."""
    alternatives: int = 3
    alternatives_days: int = 14
    """How far before/after the requested time alternatives are looked for."""
    candidates: int = 5
    """Free slots tried, in order, when the first one is taken meanwhile."""
    query_limit: int = 20
    query_limit_max: int = 200
    outbound: OutboundSettings = OutboundSettings()
    """MSH-3/4, version and namespace of what we write (shared with the SIU feed)."""

    def __post_init__(self) -> None:
        if self.when_taken not in WHEN_TAKEN:
            raise ValueError(f"when_taken must be one of {', '.join(WHEN_TAKEN)}, not {self.when_taken!r}")


def is_filler_request(message_type: str, trigger: str) -> bool:
    """SRM^S01..S11 and SQM^S25: what filler mode answers with SRR / SQR."""
    message_type = (message_type or "").strip().upper()
    trigger = (trigger or "").strip().upper()
    return (message_type == "SRM" and trigger in SRM_TRIGGERS) or (message_type == "SQM" and trigger == "S25")


# --- answers -----------------------------------------------------------------------------------------


@dataclass
class _Err:
    detail: ErrorDetail
    app_code: str = ""


class _Refused(Exception):
    """The request is answered with AE/AR; ``keep`` keeps what was done (held for review)."""

    def __init__(self, errors: list[_Err], *, code: str = "AE", appointment_id: Optional[int] = None,
                 notes: Optional[list[str]] = None, keep: bool = False):
        self.errors, self.code, self.appointment_id = errors, code, appointment_id
        self.notes, self.keep = notes or [], keep
        super().__init__("; ".join(e.detail.message for e in errors))


@dataclass
class _Waitlisted:
    entry_id: int
    minutes: int
    earliest: Optional[datetime]
    provider: Optional[PartyView]
    location: Optional[PartyView]
    timezone: str
    status: str = "Waitlist"


@dataclass
class _Answer:
    code: str = "AA"
    errors: list[_Err] = field(default_factory=list)
    appointment_id: Optional[int] = None
    waitlisted: Optional[_Waitlisted] = None
    notes: list[str] = field(default_factory=list)
    keep: bool = True
    slots: list[Candidate] = field(default_factory=list)  # SQR


def _err(code: int, text: str, segment: Optional[str] = None, sequence: Optional[int] = None,
         field_: Optional[int] = None, component: Optional[int] = None, *, app: str = "",
         severity: str = "E") -> _Err:
    return _Err(ErrorDetail(segment, sequence, field_, component, str(code), severity, text[:2000]), app)


def _engine_err(exc: SchedulingError, segment: str = "ARQ", sequence: int = 1, field_: Optional[int] = None) -> _Err:
    code = 204 if isinstance(exc, NotFound) else 207
    app = {BookingVetoed: "vetoed", PatientConflict: "patient_conflict", IllegalTransition: "illegal_transition",
           InvalidRequest: "invalid_request", NotFound: "not_found"}.get(type(exc))
    if app is None:
        app = "slot_unavailable" if isinstance(exc, SlotUnavailable) else getattr(exc, "code", "scheduling_error")
    text = f"refused by plugin {exc.plugin}: {exc.reason}" if isinstance(exc, BookingVetoed) else str(exc)
    return _err(code, text, segment, sequence, field_, app=app)


# --- the request as we read it --------------------------------------------------------------------


class _Request:
    def __init__(self, scheduler: Scheduler, message: Message, message_id: int, settings: FillerSettings):
        self.scheduler = scheduler
        self.message = message
        self.settings = settings
        self.trigger = message.trigger_event.upper()
        self.ctx = _Context(scheduler, message, self.trigger, message_id)
        self.actor = self.ctx.actor
        self.arq = message.first("ARQ")
        self.ais: list[_AI] = [a for a in _ai_segments(self.ctx) if not a.deleted]
        self.errors: list[_Err] = []
        self.provider: Optional[Provider] = None
        self.location: Optional[Location] = None
        self.resources: list[Resource] = []
        self.named_resources = False
        self.provider_named = False
        self.patient_id: Optional[int] = None

    # --- where -----------------------------------------------------------------

    def session(self):
        return self.scheduler.sessions()

    def where(self, seg: Segment) -> tuple[str, int]:
        return seg.name, self.message.occurrence(seg)

    def resolve(self) -> None:
        """Provider, location and resources by code; each unknown one is an error naming its field."""
        with self.session() as session:
            for ai in self.ais:
                name, seq = self.where(ai.seg)
                if name == "AIP":
                    code = ai.value(3, 1)
                    if not code:
                        if ai.value(3, 2):
                            self.errors.append(_err(101, "AIP-3.1 (provider id) is empty: the provider cannot be "
                                                         "identified by name", name, seq, ai.field(3), 1,
                                                    app="not_found"))
                        continue
                    provider = session.scalars(select(Provider).where(Provider.code == code)).one_or_none()
                    self.provider_named = True
                    if provider is None or not provider.active:
                        self.errors.append(_err(204, f"AIP-3: provider {code!r} is not "
                                                     f"{'active' if provider else 'known'} in this clinic",
                                                name, seq, ai.field(3), 1, app="not_found"))
                    elif self.provider is None:
                        self.provider = provider
                    elif provider.id != self.provider.id:
                        self.errors.append(_err(207, "this schedule books one provider per appointment: "
                                                     f"AIP-3 names {self.provider.code!r} and {code!r}",
                                                name, seq, ai.field(3), 1, app="unsupported"))
                elif name == "AIL":
                    self._location(session, ai, name, seq)
                elif name == "AIG":
                    code = ai.value(3, 1) or ai.value(3, 2)
                    if not code:
                        continue
                    self.named_resources = True
                    resource = session.scalars(select(Resource).where(Resource.code == code)).one_or_none()
                    if resource is None or not resource.active:
                        self.errors.append(_err(204, f"AIG-3: resource {code!r} is not known in this clinic",
                                                name, seq, ai.field(3), 1, app="not_found"))
                    elif resource.id not in {r.id for r in self.resources}:
                        self.resources.append(resource)

    def _location(self, session: Session, ai: _AI, name: str, seq: int) -> None:
        point, room = ai.value(3, 1), ai.value(3, 2)
        facility = ai.value(3, 4, 1)
        code = point or facility
        location = None
        if code:
            location = session.scalars(select(Location).where(Location.code == code)).one_or_none()
            if location is None:
                # a room or other resource named where the location goes (AIL-3.1 = "ROOM1")
                resource = session.scalars(select(Resource).where(Resource.code == code)).one_or_none()
                if resource is not None:
                    self._add_room(resource)
                    location = session.get(Location, resource.location_id) if resource.location_id else None
                    if location is None:
                        return
                else:
                    self.errors.append(_err(204, f"AIL-3: location {code!r} is not known in this clinic",
                                            name, seq, ai.field(3), 1, app="not_found"))
                    return
        if room:
            candidates = [room] + ([f"{location.code}^{room}"] if location is not None else [])
            resource = session.scalars(select(Resource).where(Resource.code.in_(candidates))).first()
            if resource is None:
                self.errors.append(_err(204, f"AIL-3.2: room {room!r} is not known in this clinic",
                                        name, seq, ai.field(3), 2, app="not_found"))
                return
            self._add_room(resource)
            if location is None and resource.location_id is not None:
                location = session.get(Location, resource.location_id)
        if location is None:
            return
        if self.location is not None and self.location.id != location.id:
            self.errors.append(_err(207, f"AIL-3 names two locations ({self.location.code!r}, {location.code!r})",
                                    name, seq, ai.field(3), 1, app="invalid_request"))
            return
        self.location = location

    def _add_room(self, resource: Resource) -> None:
        self.named_resources = True
        if resource.id not in {r.id for r in self.resources}:
            self.resources.append(resource)

    # --- what, when ---------------------------------------------------------------

    @property
    def resource_ids(self) -> tuple[int, ...]:
        return tuple(sorted(r.id for r in self.resources))

    def timezone(self) -> str:
        with self.session() as session:
            if self.location is not None:
                return self.location.timezone
            if self.provider is not None and self.provider.location_id is not None:
                tz = session.scalar(select(Location.timezone).where(Location.id == self.provider.location_id))
                if tz:
                    return tz
        return self.scheduler.settings.default_timezone

    def type_and_urgency(self) -> tuple[str, str, bool]:
        """(type, urgency, whether the message said anything about the type)."""
        said = bool(self.arq is not None and (_val(self.arq, 7) or _val(self.arq, 8))) or \
            any(a.seg.name == "AIS" and a.value(3) for a in self.ais)
        appointment_type, urgency = _appointment_type(self.ctx, self.arq, self.ais) if self.arq is not None \
            else ("general", "routine")
        if self.arq is not None and _norm(_val(self.arq, 12)) in ("S", "A", "STAT", "ASAP"):
            urgency = "urgent"
        return appointment_type, urgency, said

    def reason(self) -> str:
        """ARQ-7 text, else AIS-3 text: the appointment's reason."""
        if self.arq is None:
            return ""
        texts = [_val(self.arq, 7, 2)] + [a.value(3, 2) for a in self.ais if a.seg.name == "AIS"]
        return "; ".join(t for t in texts if t)[:400]

    def request_reason(self) -> str:
        """ARQ-6: why the placer asks (a cancellation's reason)."""
        if self.arq is None:
            return ""
        return (_val(self.arq, 6, 2) or _val(self.arq, 6, 1))[:400]

    def notes(self) -> str:
        lines = []
        for nte in self.message.segments_named("NTE"):
            text = _val(nte, 3)
            if text:
                lines.append(text)
        return "\n".join(lines)

    def duration(self) -> Optional[int]:
        """Minutes: ARQ-9/10, else the first AIx duration; None when not said."""
        sources = []
        if self.arq is not None:
            sources.append((_val(self.arq, 9), _val(self.arq, 10, 1), _val(self.arq, 10, 2), self.arq, 9))
        fields = {"AIS": 7, "AIG": 11, "AIL": 9, "AIP": 9}
        for ai in self.ais:
            f = fields[ai.seg.name]
            sources.append((ai.value(f), ai.value(f + 1, 1), ai.value(f + 1, 2), ai.seg, ai.field(f)))
        for quantity, units, units_text, seg, field_ in sources:
            if not quantity:
                continue
            found = _duration(quantity, units, units_text)
            if found is None or found < timedelta(minutes=1) or found > timedelta(hours=24):
                name, seq = self.where(seg)
                self.errors.append(_err(102, f"{name}-{field_}/{field_ + 1}: duration or units not understood",
                                        name, seq, field_, app="invalid_request"))
                return None
            return int(found.total_seconds() // 60)
        return None

    def windows(self, tz: str, *, required: bool) -> list[tuple[datetime, Optional[datetime]]]:
        """ARQ-11 repetitions as (start, end or None for an exact start), in UTC;
        else the first AIx start as an exact start."""
        found: list[tuple[datetime, Optional[datetime]]] = []
        arq = self.arq
        if arq is not None:
            for rep in range(1, len(arq.repetitions(11)) + 1):
                start = self._dtm(arq, 11, 1, rep)
                end = self._dtm(arq, 11, 2, rep)
                if start is None:
                    continue
                found.append((start.to_utc(tz), end.to_utc(tz) if end is not None else None))
        if not found:
            starts = {"AIS": 4, "AIG": 8, "AIL": 6, "AIP": 6}
            for ai in self.ais:
                value = _dtm(self.ctx, ai.seg, starts[ai.seg.name], essential=True,
                             physical=ai.field(starts[ai.seg.name]))
                if value is not None:
                    found.append((value.to_utc(tz), None))
                    break
        windows = [(s, e if e is not None and e > s else None) for s, e in found]
        unreadable = any(e.detail.segment == "ARQ" and e.detail.field == 11 for e in self.errors)
        if required and not windows and not unreadable:
            self.errors.append(_err(101, "ARQ-11 (requested start date/time range) is empty: no time to book",
                                    "ARQ", 1, 11, app="invalid_request"))
        return windows

    def _dtm(self, seg: Segment, field_: int, component: int, rep: int):
        from hl7.hl7time import DTMError, parse_dtm  # noqa: PLC0415 - small, local

        text = seg.value(field_, component, 1, rep).strip()
        if not text:
            return None
        try:
            return parse_dtm(text)
        except DTMError as exc:
            self.errors.append(_err(102, f"ARQ-11.{component} is not an HL7 date/time: {exc}", "ARQ", 1, field_,
                                    component, app="invalid_request"))
            return None

    def preferences(self) -> tuple[Optional[list[int]], Optional[time], Optional[time]]:
        """APR-1 (the message-level APR): allowed weekdays, earliest and latest start of day."""
        apr = None
        for seg in self.message.segments:
            if seg.name in ("RGS", "PID"):
                break
            if seg.name == "APR":
                apr = seg
                break
        if apr is None:
            return None, None, None
        weekdays = set(range(7))
        earliest = latest = None
        for rep in range(1, len(apr.repetitions(1)) + 1):
            key, value = _val(apr, 1, 1, 1, rep).upper(), _val(apr, 1, 2, 1, rep).upper()
            if key in _WEEKDAYS and value == "NO":
                weekdays.discard(_WEEKDAYS[key])
            elif key in ("PREFSTART", "PREFEND") and len(value) >= 4 and value[:4].isdigit():
                hours, minutes = int(value[:2]), int(value[2:4])
                if hours < 24 and minutes < 60:
                    if key == "PREFSTART":
                        earliest = time(hours, minutes)
                    else:
                        latest = time(hours, minutes)
        return (sorted(weekdays) if len(weekdays) < 7 else None), earliest, latest

    def series(self) -> bool:
        """Whether ARQ-13/14 asks for a repeating series."""
        if self.arq is None:
            return False
        interval = _norm(_val(self.arq, 13))
        return bool(interval) and interval not in ("ONCE", "1")

    def patient_id_of_pid(self) -> Optional[int]:
        """The patient the PID names, if we hold them (no registration)."""
        pid = self.message.first("PID")
        if pid is None:
            return None
        if self.patient_id is None:
            pd1, pv1 = _patient_segments(self.message, pid)
            record = _patient_record(self.ctx, pid, pd1, pv1)
            patient = self.scheduler.find_patient(record.identifiers)
            self.patient_id = patient.id if patient else None
        return self.patient_id

    def register_patient(self) -> int:
        pid = self.message.first("PID")
        if pid is None:
            raise _Refused([_err(100, "SRM^S01 without a PID segment: whom to book is not said", "PID", 1,
                                 app="invalid_request")])
        pd1, pv1 = _patient_segments(self.message, pid)
        self.patient_id = _register(self.ctx, pid, _patient_record(self.ctx, pid, pd1, pv1))
        return self.patient_id

    def refuse_if_errors(self) -> None:
        if self.errors:
            raise _Refused(list(self.errors))


# --- the entry point ---------------------------------------------------------------------------------


def apply_request(scheduler: Scheduler, message: Message, *, message_id: int,
                  settings: FillerSettings = FillerSettings()) -> ApplyResult:
    """Apply one SRM / SQM and answer it (see the module doc)."""
    session = getattr(scheduler, "_bound", None)
    if session is None:  # not bound to a caller's transaction: make one
        with scheduler.sessions() as own, own.begin():
            view = scheduler.within(own)
            result = apply_request(view, message, message_id=message_id, settings=settings)
        view.notify_committed()
        return result
    message_type, trigger = message.message_type.upper(), message.trigger_event.upper()
    request = _Request(scheduler, message, message_id, settings)
    deferred = getattr(scheduler, "_deferred", [])
    mark = len(deferred)
    savepoint = session.begin_nested()
    try:
        if not is_filler_request(message_type, trigger):
            raise _Refused([_err(200 if message_type not in ("SRM", "SQM") else 201,
                                 f"{message_type}^{trigger} is not a filler request", "MSH", 1, 9,
                                 1 if message_type not in ("SRM", "SQM") else 2, app="unsupported")], code="AR")
        if message_type == "SQM":
            answer = _query(request)
        else:
            if request.arq is None:
                raise _Refused([_err(100, f"SRM^{trigger} without an ARQ segment", "ARQ", 1, app="invalid_request")])
            answer = _HANDLERS[trigger](request)
    except _Refused as refusal:
        answer = _Answer(refusal.code, refusal.errors, refusal.appointment_id, notes=refusal.notes,
                         keep=refusal.keep)
    except MappingError as exc:
        answer = _Answer("AE", [_Err(e, "invalid_request") for e in exc.errors], keep=False)
    except SchedulingError as exc:
        answer = _Answer("AE", [_engine_err(exc)], keep=False)
    except BaseException:
        savepoint.rollback()
        del deferred[mark:]
        raise
    if answer.keep:
        savepoint.commit()
    else:
        savepoint.rollback()
        del deferred[mark:]  # rolled back: nothing to announce
    answer.errors = request_warnings(request) + answer.errors
    with scheduler.sessions() as reader:
        if message_type == "SQM":
            response = _sqr(reader, request, answer)
        else:
            response = _srr(reader, request, answer)
    log.info("filler request answered", extra={"message_id": message_id, "control_id": message.control_id,
                                               "message_type": f"{message_type}^{trigger}", "code": answer.code,
                                               "appointment_id": answer.appointment_id})
    return ApplyResult("applied", [e.detail for e in answer.errors], response)


def request_warnings(request: _Request) -> list[_Err]:
    """Warnings the PID/AIx reading collected (W severity), as ERR entries."""
    return [_Err(w, "") for w in request.ctx.warnings]


# --- finding what a request is about -----------------------------------------------------------


@dataclass
class _Found:
    appointment: Optional[Appointment] = None
    waitlist: Optional[WaitlistEntry] = None


def _find(request: _Request) -> _Found:
    arq = request.arq
    placer, filler = _ei(arq, 1), _ei(arq, 2)
    with request.session() as session:
        by_filler = by_placer = None
        waitlist = None
        if filler:
            bare = filler.split("^")[0]
            if bare.startswith("SEWL") and bare[4:].isdigit():
                waitlist = session.get(WaitlistEntry, int(bare[4:]))
            else:
                by_filler = session.scalars(select(Appointment).where(
                    Appointment.filler_id.in_({filler, bare}))).first()
                if by_filler is None:
                    raise _Refused([_err(204, f"ARQ-2: no appointment with filler id {filler!r}", "ARQ", 1, 2,
                                         app="not_found")])
        if placer:
            by_placer = session.scalars(select(Appointment).where(Appointment.placer_id == placer)).first()
            if by_placer is None and waitlist is None:
                waitlist = session.scalars(select(WaitlistEntry).where(
                    WaitlistEntry.reason.startswith(_WAITLIST_MARK.format(placer), autoescape=True))
                    .order_by(WaitlistEntry.id.desc())).first()
        if by_filler is not None and by_placer is not None and by_filler.id != by_placer.id:
            raise _Refused([_err(205, f"ARQ-1 (placer id) and ARQ-2 (filler id) name different appointments "
                                      f"({by_placer.id} and {by_filler.id})", "ARQ", 1, 2, app="duplicate")])
        return _Found(by_filler or by_placer, waitlist)


def _existing(request: _Request) -> _Found:
    """S02–S11: the appointment (or waitlisted request) named; 204 when none."""
    arq = request.arq
    if not (_ei(arq, 1) or _ei(arq, 2)):
        raise _Refused([_err(101, "ARQ-1 (placer appointment id) and ARQ-2 (filler appointment id) are both empty",
                             "ARQ", 1, 1, app="invalid_request")])
    found = _find(request)
    if found.appointment is None and found.waitlist is None:
        raise _Refused([_err(204, f"ARQ-1: no appointment with placer id {_ei(arq, 1)!r}", "ARQ", 1, 1,
                             app="not_found")])
    if found.appointment is not None and request.message.first("PID") is not None:
        # a patient we do not hold is not the appointment's patient either: S01 registered them by this PID
        if request.patient_id_of_pid() != found.appointment.patient_id:
            raise _Refused([_err(205, f"PID-3 does not name the patient of appointment {found.appointment.id}",
                                 "PID", 1, 3, app="duplicate")])
    return found


def _state_answer(request: _Request, appointment_id: int) -> _Answer:
    """The answer an appointment's current state gives (the same for a resend)."""
    with request.session() as session:
        appointment = session.get(Appointment, appointment_id)
        if appointment.status == Status.HELD.value and appointment.review_reason:
            return _Answer("AE", [_err(207, f"held for staff review ({appointment.review_reason}); the time is "
                                            f"kept and an SIU follows when it is confirmed", "ARQ", 1, 1,
                                       app="held_for_review")], appointment_id, keep=True)
    return _Answer("AA", [], appointment_id)


# --- booking -----------------------------------------------------------------------------------------


@dataclass
class _Want:
    """What a booking or a move asks for."""

    windows: list[tuple[datetime, Optional[datetime]]]
    appointment_type: str
    urgency: str
    minutes: Optional[int]
    provider_id: Optional[int]
    location_id: Optional[int]
    resource_ids: tuple[int, ...]
    weekdays: Optional[list[int]] = None
    earliest: Optional[time] = None
    latest: Optional[time] = None


def _search(request: _Request, want: _Want, limit: int) -> list[Candidate]:
    found: list[Candidate] = []
    seen: set[int] = set()
    for start, end in want.windows:
        exact = end is None
        query = SlotQuery(
            appointment_type=want.appointment_type, start=start,
            end=start + timedelta(minutes=1) if exact else end + timedelta(seconds=1),
            duration_minutes=want.minutes, provider_id=want.provider_id, location_id=want.location_id,
            urgency=want.urgency, weekdays=None if exact else want.weekdays,
            earliest=None if exact else want.earliest, latest=None if exact else want.latest, limit=limit)
        for candidate in request.scheduler.free_slots(query):
            if candidate.slot_id not in seen:
                seen.add(candidate.slot_id)
                found.append(candidate)
    return found


def _slot_location(request: _Request, provider_id: int, start: datetime) -> Optional[int]:
    with request.session() as session:
        # the slot holding the instant ``start``: one overlapping [start, start + 1 µs)
        return session.scalar(select(Slot.location_id).where(
            Slot.provider_id == provider_id, *Slot.overlapping(start, start + timedelta(microseconds=1))).limit(1))


def _attempts(request: _Request, want: _Want, *, in_place: bool = False) -> list[dict[str, Any]]:
    """BookingRequest arguments to try, best first: an exact start with a known
    provider is asked of the engine directly (it may start inside a slot; with
    ``in_place`` and no provider, the appointment's own slot is reused);
    otherwise the free slots the search finds."""
    tries: list[dict[str, Any]] = []
    for start, end in want.windows:
        if end is None and want.provider_id is None and in_place:
            tries.append({"start": start, "duration_minutes": want.minutes})
        elif end is None and want.provider_id is not None:
            if want.location_id is not None and _slot_location(request, want.provider_id, start) not in \
                    (None, want.location_id):
                continue
            tries.append({"provider_id": want.provider_id, "start": start, "duration_minutes": want.minutes})
    for candidate in _search(request, want, request.settings.candidates):
        tries.append({"slot_id": candidate.slot_id, "start": candidate.start,
                      "duration_minutes": want.minutes})
    return tries[: request.settings.candidates + len(want.windows)]


def _book_first(request: _Request, want: _Want, book: Callable[[dict[str, Any]], Appointment], *,
                in_place: bool = False) -> tuple[Optional[Appointment], list[str]]:
    """Try each way in turn; the first that the engine takes wins. A veto or an
    invalid request stops at once (raised); taken time moves on to the next."""
    reasons: list[str] = []
    for arguments in _attempts(request, want, in_place=in_place):
        try:
            return book(arguments), reasons
        except SlotUnavailable as exc:
            reasons.append(str(exc))
    return None, reasons


def _taken(request: _Request, want: _Want, reasons: list[str], *, appointment_id: Optional[int] = None,
           patient_id: Optional[int] = None, placer: Optional[str] = None, allow_waitlist: bool = True) -> _Answer:
    """No free time: alternatives (AE) or a waitlist entry, per ``when_taken``."""
    settings = request.settings
    first = want.windows[0][0]
    tz = request.timezone()
    described = ", ".join(local_dtm(s, tz) + (f" to {local_dtm(e, tz)}" if e else "") for s, e in want.windows)
    why = f"no free time for the request ({described})" + (f": {reasons[-1]}" if reasons else "")
    app = "patient_conflict" if reasons and all("patient:" in r for r in reasons) else "slot_unavailable"
    waitlisting = settings.when_taken == "waitlist" and patient_id is not None
    notes = [] if waitlisting and allow_waitlist else _alternatives(request, want, tz)
    if waitlisting:
        entry = request.scheduler.add_to_waitlist(
            patient_id=patient_id, appointment_type=want.appointment_type, duration_minutes=want.minutes or 15,
            actor=request.actor, urgency=want.urgency, provider_id=want.provider_id, location_id=want.location_id,
            earliest=first, latest=want.windows[0][1], current_appointment_id=appointment_id,
            reason=((_WAITLIST_MARK.format(placer) + " ") if placer else "") + request.reason())
        if allow_waitlist:
            provider = PartyView(request.provider.code, request.provider.family_name, request.provider.given_name) \
                if request.provider else None
            location = PartyView(request.location.code, request.location.name) if request.location else None
            return _Answer("AA", [_err(0, f"{why}; waitlisted (entry {entry.id})", "ARQ", 1, 11, app="waitlisted",
                                       severity="I")],
                           waitlisted=_Waitlisted(entry.id, want.minutes or 15, first, provider, location, tz))
        return _Answer("AE", [_err(207, f"{why}; waitlisted for it (entry {entry.id})", "ARQ", 1, 11,
                                   app=app)], appointment_id, notes=notes, keep=True)
    return _Answer("AE", [_err(207, why + ("" if notes else "; no free time nearby either"), "ARQ", 1, 11, app=app)],
                   appointment_id, notes=notes, keep=False)


def _alternatives(request: _Request, want: _Want, tz: str) -> list[str]:
    settings = request.settings
    if settings.alternatives <= 0:
        return []
    first = want.windows[0][0]
    now = request.scheduler.clock.now()
    span = timedelta(days=settings.alternatives_days)
    around = replace(want, windows=[(max(now, first - span), first + span)])
    found = _search(request, around, 50)
    found.sort(key=lambda c: (abs((c.start - first).total_seconds()), c.start))
    lines = []
    with request.session() as session:
        for number, candidate in enumerate(found[: settings.alternatives], 1):
            provider = session.scalar(select(Provider.code).where(Provider.id == candidate.provider_id)) \
                if candidate.provider_id else None
            location = session.get(Location, candidate.location_id)
            zone_name = location.timezone if location else tz
            end = candidate.start + timedelta(minutes=want.minutes) if want.minutes else candidate.end
            lines.append(f"alternative {number}: {local_dtm(candidate.start, zone_name)} to "
                         f"{local_dtm(end, zone_name)}"
                         + (f", provider {provider}" if provider else "")
                         + (f", location {location.code}" if location else ""))
    return lines


def _new_booking(request: _Request) -> _Answer:
    arq = request.arq
    placer = _ei(arq, 1)
    if not placer:
        raise _Refused([_err(101, "ARQ-1 (placer appointment id) is empty", "ARQ", 1, 1, app="invalid_request")])
    if len(placer) > 100:
        raise _Refused([_err(104, "ARQ-1 placer appointment id is longer than 100 characters", "ARQ", 1, 1,
                             app="invalid_request")])
    if request.message.first("PID") is None:
        raise _Refused([_err(100, "SRM^S01 without a PID segment: whom to book is not said", "PID", 1,
                             app="invalid_request")])
    found = _find(request)
    if found.appointment is not None:
        if request.patient_id_of_pid() != found.appointment.patient_id:
            raise _Refused([_err(205, f"ARQ-1: placer id {placer!r} is appointment {found.appointment.id} of "
                                      f"another patient", "ARQ", 1, 1, app="duplicate")])
        return _state_answer(request, found.appointment.id)  # a repeated request: the same answer
    if found.waitlist is not None and found.waitlist.status == "waiting":
        return _waitlist_answer(request, found.waitlist)
    request.resolve()
    if request.series():
        request.errors.append(_err(207, "ARQ-13/14: repeating appointments are not booked as a series here; "
                                        "send one SRM^S01 per occurrence", "ARQ", 1, 13, app="unsupported"))
    tz = request.timezone()
    windows = request.windows(tz, required=True)
    minutes = request.duration()
    appointment_type, urgency, _said = request.type_and_urgency()
    request.refuse_if_errors()
    weekdays, earliest, latest = request.preferences()
    patient_id = request.register_patient()
    want = _Want(windows, appointment_type, urgency, minutes, request.provider.id if request.provider else None,
                 request.location.id if request.location else None, request.resource_ids, weekdays, earliest, latest)

    def book(arguments: dict[str, Any]) -> Appointment:
        return request.scheduler.book(BookingRequest(
            patient_id=patient_id, appointment_type=appointment_type, resource_ids=want.resource_ids,
            urgency=urgency, reason=request.reason(), notes=request.notes(), placer_id=placer, **arguments),
            request.actor)

    try:
        appointment, reasons = _book_first(request, want, book)
    except IntegrityError:  # the same placer id booked by a concurrent request meanwhile
        found = _find(request)
        if found.appointment is None:
            raise
        return _state_answer(request, found.appointment.id)
    except (BookingVetoed, InvalidRequest, NotFound) as exc:
        raise _Refused([_engine_err(exc, "ARQ", 1, 1)]) from None
    if appointment is None:
        if urgency == "urgent":
            made_room = _urgent(request, want, patient_id, placer)
            if made_room is not None:
                return made_room
        return _taken(request, want, reasons, patient_id=patient_id, placer=placer)
    return _state_answer(request, appointment.id)


def _urgent(request: _Request, want: _Want, patient_id: int, placer: str) -> Optional[_Answer]:
    """An urgent S01 that found no free time takes the urgent path (``Scheduler.request_urgent``):
    booked once room is made, or AE ``pending_approval`` while staff decide (an SIU S12
    follows the booking); None when no room can be made (answered as any taken time)."""
    outcome = request.scheduler.request_urgent(UrgentRequest(
        patient_id=patient_id, duration_minutes=want.minutes or 15, earliest=min(s for s, _e in want.windows),
        # exact starts only: the urgent path's own default window
        latest_start=max((e for _s, e in want.windows if e is not None), default=None),
        appointment_type=want.appointment_type,
        provider_id=want.provider_id, location_id=want.location_id, reason=request.reason(), notes=request.notes(),
        placer_id=placer), request.actor)
    if outcome["appointment_id"] is not None:
        return _state_answer(request, outcome["appointment_id"])
    if outcome["outcome"] in ("proposed", "waiting"):
        return _Answer("AE", [_err(207, f"urgent request {outcome['request_id']}: {outcome['explanation']}; "
                                        "an SIU S12 follows when it is booked", "ARQ", 1, 11,
                                   app="pending_approval")], keep=True)
    return None


def _waitlist_answer(request: _Request, entry: WaitlistEntry, status: str = "Waitlist") -> _Answer:
    with request.session() as session:
        provider = session.get(Provider, entry.provider_id) if entry.provider_id else None
        location = session.get(Location, entry.location_id) if entry.location_id else None
        tz = location.timezone if location else request.scheduler.settings.default_timezone
        return _Answer("AA", [], waitlisted=_Waitlisted(
            entry.id, entry.duration_minutes, entry.earliest,
            PartyView(provider.code, provider.family_name, provider.given_name) if provider else None,
            PartyView(location.code, location.name) if location else None, tz, status))


def _current(request: _Request, appointment_id: int) -> tuple[Appointment, tuple[int, ...], Optional[int]]:
    """The appointment, its resource ids and its first slot."""
    with request.session() as session:
        appointment = session.get(Appointment, appointment_id)
        resources = tuple(sorted(session.scalars(select(AppointmentResource.resource_id).where(
            AppointmentResource.appointment_id == appointment_id))))
        first_slot = session.scalar(select(AppointmentSlot.slot_id).join(Slot, Slot.id == AppointmentSlot.slot_id)
                                    .where(AppointmentSlot.appointment_id == appointment_id)
                                    .order_by(Slot.start).limit(1))
        return appointment, resources, first_slot


def _move(request: _Request, appointment_id: int, want: _Want, *, reason: str) -> _Answer:
    """Reschedule (or change in place) through the engine; taken time → alternatives."""
    appointment, _resources, first_slot = _current(request, appointment_id)

    def move(arguments: dict[str, Any]) -> Appointment:
        if "provider_id" not in arguments and "slot_id" not in arguments and first_slot is not None:
            arguments = {**arguments, "slot_id": first_slot}
        return request.scheduler.reschedule(appointment_id, BookingRequest(
            patient_id=appointment.patient_id, appointment_type=want.appointment_type,
            resource_ids=want.resource_ids, urgency=want.urgency, **arguments), request.actor, reason)

    try:
        moved, reasons = _book_first(request, want, move, in_place=True)
    except (BookingVetoed, InvalidRequest, NotFound, IllegalTransition) as exc:
        raise _Refused([_engine_err(exc, "ARQ", 1, 1)], appointment_id=appointment_id) from None
    if moved is None:
        return _taken(request, want, reasons, appointment_id=appointment_id, patient_id=appointment.patient_id,
                      allow_waitlist=False)
    return _state_answer(request, moved.id)


def _in_windows(start: datetime, windows: list[tuple[datetime, Optional[datetime]]]) -> bool:
    return any(start == s if e is None else s <= start <= e for s, e in windows)


def _booked_request(request: _Request, refusal: str, *, window_required: bool):
    """The appointment a reschedule or modification names, with the request's
    windows (clinic time) and durations; refuses a waitlisted request."""
    found = _existing(request)
    if found.appointment is None:
        raise _Refused([_err(207, refusal, "ARQ", 1, 1, app="invalid_request")])
    appointment, resources, _slot = _current(request, found.appointment.id)
    request.resolve()
    tz = request.timezone() if (request.location or request.provider) else _appointment_tz(request, appointment)
    windows = request.windows(tz, required=window_required)
    minutes = request.duration()
    request.refuse_if_errors()
    current_minutes = int((appointment.end - appointment.start).total_seconds() // 60)
    return appointment, resources, windows, minutes, current_minutes


def _reschedule(request: _Request) -> _Answer:
    appointment, resources, windows, minutes, current_minutes = _booked_request(
        request, "a waitlisted request has no time to reschedule; cancel it (S04) and book (S01)",
        window_required=True)
    want = _want_for(request, appointment, resources, windows, minutes or current_minutes)
    if _in_windows(appointment.start, windows) and _unchanged(appointment, resources, want, current_minutes):
        return _state_answer(request, appointment.id)
    return _move(request, appointment.id, want, reason=request.request_reason())


def _appointment_tz(request: _Request, appointment: Appointment) -> str:
    with request.session() as session:
        if appointment.location_id is not None:
            tz = session.scalar(select(Location.timezone).where(Location.id == appointment.location_id))
            if tz:
                return tz
    return request.scheduler.settings.default_timezone


def _want_for(request: _Request, appointment: Appointment, resources: tuple[int, ...],
              windows: list[tuple[datetime, Optional[datetime]]], minutes: int,
              resource_ids: Optional[tuple[int, ...]] = None) -> _Want:
    appointment_type, urgency, said = request.type_and_urgency()
    weekdays, earliest, latest = request.preferences()
    return _Want(
        windows=windows,
        appointment_type=appointment_type if said else appointment.appointment_type,
        urgency=urgency if said or urgency == "urgent" else appointment.urgency,
        minutes=minutes,
        provider_id=request.provider.id if request.provider else appointment.provider_id,
        location_id=request.location.id if request.location else None,
        resource_ids=resource_ids if resource_ids is not None else
        (request.resource_ids if request.named_resources else resources),
        weekdays=weekdays, earliest=earliest, latest=latest,
    )


def _unchanged(appointment: Appointment, resources: tuple[int, ...], want: _Want, current_minutes: int) -> bool:
    return (want.provider_id == appointment.provider_id
            and (want.location_id is None or want.location_id == appointment.location_id)
            and tuple(sorted(want.resource_ids)) == resources
            and want.minutes == current_minutes
            and want.appointment_type == appointment.appointment_type)


def _modify(request: _Request) -> _Answer:
    """S03 / S08: provider, resources, duration, type; the time when ARQ-11 moves it."""
    appointment, resources, windows, minutes, current_minutes = _booked_request(
        request, "a waitlisted request cannot be modified; cancel it (S04) and book (S01)", window_required=False)
    stay = [(appointment.start, None)]
    want = _want_for(request, appointment, resources,
                     windows if windows and not _in_windows(appointment.start, windows) else stay,
                     minutes or current_minutes)
    if want.windows == stay and _unchanged(appointment, resources, want, current_minutes):
        reason, notes = request.reason(), request.notes()
        if (reason and reason != appointment.reason) or (notes and notes != appointment.notes):
            try:
                request.scheduler.modify(appointment.id, request.actor, reason=reason or None, notes=notes or None,
                                         why=request.request_reason())
            except InvalidRequest as exc:
                raise _Refused([_engine_err(exc, "ARQ", 1, 1)], appointment_id=appointment.id) from None
        return _state_answer(request, appointment.id)
    return _move(request, appointment.id, want, reason=request.request_reason())


def _cancelling(request: _Request) -> _Answer:
    """S04 cancel, S05 discontinue, S06 delete."""
    found = _existing(request)
    target = _CANCELLING[request.trigger]
    reason = request.request_reason()
    if found.appointment is None:
        entry = found.waitlist
        if entry.status == "waiting":
            request.scheduler.remove_from_waitlist(entry.id, request.actor, reason,
                                                   status="removed" if target is Status.DELETED else "cancelled")
        return _waitlist_answer(request, entry, "Deleted" if target is Status.DELETED else "Cancelled")
    appointment = found.appointment
    if appointment.status == target.value:
        return _state_answer(request, appointment.id)  # a repeated request
    call = {Status.CANCELLED: request.scheduler.cancel, Status.DISCONTINUED: request.scheduler.discontinue,
            Status.DELETED: request.scheduler.delete}[target]
    try:
        call(appointment.id, request.actor, reason)
    except (IllegalTransition, InvalidRequest) as exc:
        raise _Refused([_engine_err(exc, "ARQ", 1, 1)], appointment_id=appointment.id) from None
    return _Answer("AA", [], appointment.id)


def _resources(request: _Request) -> _Answer:
    """S07 add, S09/S10/S11 take off: the AIG resources and AIL rooms named."""
    found = _existing(request)
    if found.appointment is None:
        raise _Refused([_err(207, "a waitlisted request holds no resources", "ARQ", 1, 1, app="invalid_request")])
    appointment, resources, _slot = _current(request, found.appointment.id)
    request.resolve()
    warnings = []
    for ai in request.ais:
        if ai.seg.name == "AIS":
            name, seq = request.where(ai.seg)
            warnings.append(_err(207, "services are not held apart from the appointment: AIS ignored",
                                 name, seq, ai.field(3), app="unsupported", severity="W"))
    adding = request.trigger == "S07"
    if request.provider_named and request.provider is not None and request.provider.id != appointment.provider_id:
        seg = next(a for a in request.ais if a.seg.name == "AIP")
        name, seq = request.where(seg.seg)
        request.errors.append(_err(207, "an appointment has one provider, which stays: reschedule (S02/S03) to "
                                        "change it", name, seq, seg.field(3), 1, app="unsupported"))
    request.refuse_if_errors()
    named = set(request.resource_ids)
    wanted = tuple(sorted(set(resources) | named)) if adding else tuple(sorted(set(resources) - named))
    current_minutes = int((appointment.end - appointment.start).total_seconds() // 60)
    want = _Want([(appointment.start, None)], appointment.appointment_type, appointment.urgency, current_minutes,
                 appointment.provider_id, None, wanted)
    if wanted == resources:
        answer = _state_answer(request, appointment.id)
    else:
        answer = _move(request, appointment.id, want, reason=request.request_reason())
    answer.errors = warnings + answer.errors
    return answer


_HANDLERS: dict[str, Callable[[_Request], _Answer]] = {
    "S01": _new_booking, "S02": _reschedule, "S03": _modify, "S04": _cancelling, "S05": _cancelling,
    "S06": _cancelling, "S07": _resources, "S08": _modify, "S09": _resources, "S10": _resources,
    "S11": _resources,
}


# --- availability queries -----------------------------------------------------------------------------


def _query(request: _Request) -> _Answer:
    message = request.message
    qrd = message.first("QRD")
    if qrd is None:
        raise _Refused([_err(100, "SQM^S25 without a QRD segment", "QRD", 1, app="invalid_request")])
    request.resolve()
    tz = request.timezone()
    windows = request.windows(tz, required=False) if request.arq is not None else []
    if not windows:
        qrf = message.first("QRF")
        start = _dtm(request.ctx, qrf, 2, essential=True) if qrf is not None else None
        end = _dtm(request.ctx, qrf, 3, essential=True) if qrf is not None else None
        if start is not None:
            windows = [(start.to_utc(tz), end.to_utc(tz) if end is not None else None)]
    if not windows:
        request.errors.append(_err(101, "no time range to search: ARQ-11 (or QRF-2/QRF-3) is empty",
                                   "ARQ" if request.arq is not None else "QRF", 1, 11 if request.arq else 2,
                                   app="invalid_request"))
    minutes = request.duration()
    appointment_type, urgency, _said = request.type_and_urgency()
    request.refuse_if_errors()
    limit = request.settings.query_limit
    quantity = _val(qrd, 7, 1)
    if quantity.isdigit() and int(quantity) > 0:
        limit = min(int(quantity), request.settings.query_limit_max)
    weekdays, earliest, latest = request.preferences()
    windows = [(s, e if e is not None else s + timedelta(days=1)) for s, e in windows]
    want = _Want(windows, appointment_type, urgency, minutes, request.provider.id if request.provider else None,
                 request.location.id if request.location else None, request.resource_ids, weekdays, earliest, latest)
    slots = sorted(_search(request, want, limit), key=lambda c: (c.start, c.slot_id))[:limit]
    return _Answer("AA", [], slots=slots, keep=False)


# --- writing the answers -----------------------------------------------------------------------------


def _hd(message: Message, field_: int) -> Any:
    parts = [message.msh.value(field_, c) for c in (1, 2, 3)]
    while parts and not parts[-1]:
        parts.pop()
    return parts or None


def _err_segment(err: _Err) -> tuple[str, dict[int, Any]]:
    detail = err.detail
    fields: dict[int, Any] = {2: Raw(detail.location_er7()) if detail.segment else None, 3: Raw(detail.code_er7()),
                              4: detail.severity, 8: detail.message}
    if err.app_code:
        fields[5] = [err.app_code, None, "99SE"]
    return ("ERR", fields)


def _head(request: _Request, answer: _Answer, structure: tuple[str, str, str]) -> Segments:
    settings = request.settings.outbound
    message = request.message
    return [msh(settings, structure, new_control_id(), request.scheduler.clock.now(),
                receiving_application=_hd(message, 3), receiving_facility=_hd(message, 4)),
            ("MSA", {1: answer.code, 2: message.control_id})] + [_err_segment(e) for e in answer.errors]


def _srr(session: Session, request: _Request, answer: _Answer) -> bytes:
    settings = request.settings.outbound
    trigger = request.trigger if request.trigger in SRM_TRIGGERS else "S01"
    segments = _head(request, answer, ("SRR", trigger, "SRR_S01"))
    entered_by = request.actor.label
    if answer.appointment_id is not None:
        view = appointment_view(session, answer.appointment_id,
                                default_timezone=request.scheduler.settings.default_timezone)
        segments += schedule_segments(view, settings, event=trigger, entered_by=entered_by, structure="SRR",
                                      notes=answer.notes)
    elif answer.waitlisted is not None:
        segments += _waitlist_segments(request, answer)
    elif answer.notes and request.arq is not None:
        segments += _echo_segments(request, answer)
    return build_message(segments)


def _placer_of(request: _Request) -> Any:
    return ei(_ei(request.arq, 1)) if request.arq is not None else None


def _waitlist_segments(request: _Request, answer: _Answer) -> Segments:
    settings = request.settings.outbound
    waitlisted = answer.waitlisted
    sch = {1: _placer_of(request), 2: [f"SEWL{waitlisted.entry_id}", settings.application],
           6: event_reason(request.trigger), 9: str(waitlisted.minutes), 10: "min",
           16: [settings.application], 20: [request.actor.label], 25: [waitlisted.status]}
    if waitlisted.earliest is not None:
        sch[11] = [None, None, f"M{waitlisted.minutes}", local_dtm(waitlisted.earliest, waitlisted.timezone)]
    segments: Segments = [("SCH", sch)] + nte_segments(answer.notes)
    patient_id = request.patient_id
    if patient_id is not None:
        with request.session() as session:
            patient = _patient_view(session, patient_id)
        if patient is not None:
            segments.append(patient_segment(patient))
    start = waitlisted.earliest or request.scheduler.clock.now()
    segments += resource_segments(start=start, end=start + timedelta(minutes=waitlisted.minutes),
                                  tz=waitlisted.timezone, status=waitlisted.status, provider=waitlisted.provider,
                                  location=waitlisted.location)
    return segments


def _echo_segments(request: _Request, answer: _Answer) -> Segments:
    """A refused request's SCH group: its ids and the alternatives (NTE)."""
    settings = request.settings.outbound
    sch = {1: _placer_of(request), 2: ei(_ei(request.arq, 2)), 6: event_reason(request.trigger),
           16: [settings.application], 20: [request.actor.label]}
    return [("SCH", sch)] + nte_segments(answer.notes, comment_type=["RE", "Remark", "HL70364"]) + \
        [("RGS", {1: "1"})]


def _sqr(session: Session, request: _Request, answer: _Answer) -> bytes:
    settings = request.settings.outbound
    qrd = request.message.first("QRD")
    tag = _val(qrd, 4) if qrd is not None else ""
    status = "AE" if answer.code != "AA" else ("OK" if answer.slots else "NF")
    segments = _head(request, answer, ("SQR", "S25", "SQR_S25"))
    segments.append(("QAK", {1: tag or None, 2: status}))
    default_tz = request.scheduler.settings.default_timezone
    names: dict[tuple[type, int], Any] = {}

    def get(model, ident):
        if ident is None:
            return None
        if (model, ident) not in names:
            names[(model, ident)] = session.get(model, ident)
        return names[(model, ident)]

    appointment_type, _urgency, _said = request.type_and_urgency()
    service = TYPE_CODES.get(appointment_type, (appointment_type.upper(), appointment_type))
    for candidate in answer.slots:
        location = get(Location, candidate.location_id)
        tz = location.timezone if location else default_tz
        provider = get(Provider, candidate.provider_id)
        resource = get(Resource, candidate.resource_id)
        start, end = candidate.start, candidate.end
        minutes = int((end - start).total_seconds() // 60)
        segments.append(("SCH", {6: ["S25", "Available", "HL70003"], 9: str(minutes), 10: "min",
                                 11: [None, None, f"M{minutes}", local_dtm(start, tz), local_dtm(end, tz)],
                                 16: [settings.application], 20: [settings.application]}))
        segments.append(tq1_segment(start, end, tz))
        segments += nte_segments([f"slot {candidate.slot_id}: {candidate.seats_left} place(s) free"])
        segments += resource_segments(
            start=start, end=end, tz=tz, status=None, service=service,
            provider=PartyView(provider.code, provider.family_name, provider.given_name) if provider else None,
            location=PartyView(location.code, location.name) if location else None,
            resources=[PartyView(resource.code, resource.name, kind=resource.kind)] if resource else [],
            order="SQR")
    return build_message(segments)
