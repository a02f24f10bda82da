"""Same-day emergencies: squeeze in the urgent patient with the least harm to others.

An urgent request reaches ``slotengine_urgent_request`` from the service API
(``Scheduler.request_urgent``), an HL7 SRM whose priority (ARQ-12 S/A) or type
(EMERGENCY/URGENT) marks it urgent and that found no free time, or staff
(``slotengine emergencies request``).  It is recorded (``EmergencyRequest``)
and placed in this order:

1. **Free time and emergency holds** in the clinically required window
   (``earliest`` .. ``latest_start``; the default window when the request
   gives none): emergency holds first — they exist for this and leave routine
   time to the waitlist — then the earliest free slot.
2. **Added capacity**: a configured on-call provider (any start within the
   on-call hours that their calendar leaves free) or overflow room (a room
   with slots of its own), earliest first: no patient is moved.
3. **Moving others**: the minimum-harm set of non-urgent visits to move
   (``plugins.emergency_plan``, an exact search): fewest patients moved,
   then their delays, largest first; each moved patient gets the earliest
   time after their own that their provider has free (``alternatives =
   "same_specialty"``: any provider of the same specialty, of the gender the
   patient prefers), within their preferred weekdays and hours, or — when
   nothing fits within ``alternative_days`` — their visit is cancelled and
   they are put on the waitlist.  Never moved: anyone already arrived,
   checked in or seen, urgent visits, holds, visits starting within
   ``notice_minutes`` (the patient may be on the way), the urgent patient's
   own visits, and patients already moved today (by this plugin, or by staff
   or a plugin in the audit trail).

Steps 2 and 3 make an ``EmergencyProposal`` (with ``EmergencyMove`` rows):
the placement, every visit considered and why it was or was not movable, the
objective values, the alternatives offered.  ``approval`` decides whether it
waits for staff (``approve`` / ``reject``, ``slotengine emergencies
approve|reject``).  Applying it moves each patient with a reason (SCH-6 of
the SIU S13/S15 the outbound feed announces in filler mode), books the
urgent visit, and tells every moved patient through their reminder channel:
the new time and ``offer_alternatives`` other concrete times they may take
instead (reply with the number: ``POST /emergency/reply``).  Where an
outside system owns the calendar (mirror mode) every change goes through
``Scheduler.request_*`` and becomes an SRM to that system; the urgent visit
is booked once it has confirmed every move.

Settings::

    [plugins.emergency]
    approval = "when_moving"       # always | when_moving | never
    default_window_minutes = 240   # a request without a latest start
    notice_minutes = 60            # no visit this close is moved, nor moved to
    max_moves = 3                  # more than this: staff decide (unplaced)
    alternative_days = 7           # how far ahead a moved patient's new time may be
    alternatives = "same_provider" # or "same_specialty"
    offer_alternatives = 2         # other times offered besides the new one
    on_call_providers = []         # provider codes
    on_call_hours = ["08:00", "20:00"]
    overflow_rooms = []            # resource codes (rooms with slots of their own)
    channels = ["sms", "email", "voice"]
    clinic_name = "Main Street Clinic"
    team = "front_desk"            # who hears about proposals and failures
    reply_url = ""
    reply_secret_env = "SLOTENGINE_REPLY_SECRET"
    sweep_seconds = 30
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import partial
from typing import Any, Optional
from urllib.parse import quote

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from engine.calendar import UNIT_MINUTES, local_to_utc, units, zone
from engine.db import write_pending_rows
from engine.errors import InvalidRequest, NotFound, SchedulingError, SlotUnavailable
from engine.jobs import dispatch_outbox, plan_task, sweep_tasks
from engine.messaging import address_for, choose_channel, language_of, local_when
from engine.models import (
    Appointment,
    AppointmentSlot,
    AuditEntry,
    EmergencyMove,
    EmergencyProposal,
    EmergencyRequest,
    Location,
    OutboxItem,
    Patient,
    Provider,
    Reservation,
    Resource,
    Slot,
    TimeBlock,
)
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Change, ChangeOutcome, SlotQuery, UrgentRequest
from engine.service import Scheduler, slot_accepts
from engine.signing import BadToken, make_token, read_token, reply_route, secret_from_settings
from engine.states import OCCUPYING
from plugins.emergency_plan import (
    CANCEL,
    PlanAppointment,
    PlanSlot,
    Preferences,
    Problem,
    alternatives,
    solve,
)

log = logging.getLogger("slotengine.plugins.emergency")

NAME = "emergency"
APPROVAL = ("always", "when_moving", "never")
OPEN = ("proposed", "waiting")
MOVED = ("applied", "requested", "chosen")

TEXTS = {
    "en": {"subject": "Your appointment has changed",
           "moved": "{clinic}: because of an urgent case we had to move your appointment of {old}. "
                    "Your new time is {new}.",
           "cancelled": "{clinic}: because of an urgent case we had to cancel your appointment of {old}. "
                        "You are first in line for the next free time; or call us.",
           "choices": "Or reply with the number of another time: {choices}.",
           "reply": "To choose another time"},
    "es": {"subject": "Su cita ha cambiado",
           "moved": "{clinic}: por un caso urgente tuvimos que mover su cita del {old}. Su nueva hora es el {new}.",
           "cancelled": "{clinic}: por un caso urgente tuvimos que cancelar su cita del {old}. "
                        "Le ofreceremos la próxima hora libre; o llámenos.",
           "choices": "O responda con el número de otra hora: {choices}.",
           "reply": "Para elegir otra hora"},
}


@dataclass(frozen=True)
class Settings:
    approval: str = "when_moving"
    default_window: timedelta = timedelta(minutes=240)
    notice: timedelta = timedelta(minutes=60)
    max_moves: int = 3
    alternative_days: int = 7
    alternatives: str = "same_provider"
    offer_alternatives: int = 2
    on_call_providers: tuple[str, ...] = ()
    on_call_hours: tuple[time, time] = (time(8, 0), time(20, 0))
    overflow_rooms: tuple[str, ...] = ()
    channels: tuple[str, ...] = ("sms", "email", "voice")
    clinic_name: str = "Your clinic"
    team: str = "front_desk"
    reply_url: str = ""
    reply_secret: str = ""
    sweep_seconds: float = 30


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    where = "[plugins.emergency]"
    known = {"approval", "default_window_minutes", "notice_minutes", "max_moves", "alternative_days", "alternatives",
             "offer_alternatives", "on_call_providers", "on_call_hours", "overflow_rooms", "channels", "clinic_name",
             "team", "reply_url", "reply_secret", "reply_secret_env", "sweep_seconds"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    approval = settings.get("approval", "when_moving")
    if approval not in APPROVAL:
        raise ValueError(f"{where}.approval: one of {', '.join(APPROVAL)}, not {approval!r}")
    choice = settings.get("alternatives", "same_provider")
    if choice not in ("same_provider", "same_specialty"):
        raise ValueError(f"{where}.alternatives: same_provider or same_specialty, not {choice!r}")
    hours = settings.get("on_call_hours", ["08:00", "20:00"])
    try:
        on_call_hours = (time.fromisoformat(str(hours[0])), time.fromisoformat(str(hours[1])))
    except (ValueError, IndexError, TypeError):
        raise ValueError(f'{where}.on_call_hours: expected ["08:00", "20:00"], got {hours!r}') from None
    numbers = {}
    for key, default, least in (("default_window_minutes", 240, 5), ("notice_minutes", 60, 0), ("max_moves", 3, 1),
                                ("alternative_days", 7, 0), ("offer_alternatives", 2, 0), ("sweep_seconds", 30, 1)):
        value = settings.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}.{key}: a number of at least {least}, not {value!r}")
        numbers[key] = value
    lists = {}
    for key in ("on_call_providers", "overflow_rooms", "channels"):
        value = settings.get(key, list(Settings.channels) if key == "channels" else [])
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}.{key}: a list of names, not {value!r}")
        lists[key] = tuple(value)
    context.state[NAME] = Settings(
        approval=approval, default_window=timedelta(minutes=numbers["default_window_minutes"]),
        notice=timedelta(minutes=numbers["notice_minutes"]), max_moves=int(numbers["max_moves"]),
        alternative_days=int(numbers["alternative_days"]), alternatives=choice,
        offer_alternatives=int(numbers["offer_alternatives"]), on_call_providers=lists["on_call_providers"],
        on_call_hours=on_call_hours, overflow_rooms=lists["overflow_rooms"], channels=lists["channels"],
        clinic_name=str(settings.get("clinic_name", "Your clinic")), team=str(settings.get("team", "front_desk")),
        reply_url=str(settings.get("reply_url", "")),
        reply_secret=secret_from_settings(settings, "reply_secret", where, default_env="SLOTENGINE_REPLY_SECRET"),
        sweep_seconds=float(numbers["sweep_seconds"]))


# --- the one door to the schedule ----------------------------------------------------------------


def _change(view: Scheduler, actor: Actor, reason: str, *, appointment_id: Optional[int] = None,
            request: Optional[BookingRequest] = None, detail: Optional[dict[str, Any]] = None) -> ChangeOutcome:
    """Every change this plugin makes: a move (``appointment_id`` and ``request``), a
    cancellation (``appointment_id`` alone) or the urgent booking (``request`` alone).
    Through ``request_*``: applied here at once, or asked of the calendar's owner."""
    if appointment_id is None:
        return view.request_booking(request, actor, reason, detail=detail)
    if request is None:
        return view.request_cancellation(appointment_id, actor, reason, detail=detail)
    return view.request_reschedule(appointment_id, request, actor, reason, detail=detail)


# --- an urgent request ------------------------------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_urgent_request(session: Session, request: UrgentRequest, actor: Actor, scheduler: Scheduler,
                              context) -> Optional[dict[str, Any]]:
    if _settings(context) is None:
        return None
    return handle(context, session, scheduler, request, actor)


def handle(context, session: Session, view: Scheduler, request: UrgentRequest, actor: Actor) -> dict[str, Any]:
    """Record and place one urgent request in the caller's transaction (see the module doc)."""
    settings = _settings(context)
    now = context.clock.now()
    if request.placer_id:
        earlier = session.scalars(select(EmergencyRequest).where(EmergencyRequest.placer_id == request.placer_id)
                                  .order_by(EmergencyRequest.id.desc()).limit(1)).first()
        if earlier is not None and earlier.status in OPEN + ("booked", "applied"):
            return answer(session, earlier)  # the same request again (a resend under a new control id)
    if session.get(Patient, request.patient_id) is None:
        raise NotFound("patient", request.patient_id)
    earliest = max(request.earliest, now)
    latest = request.latest_start or request.earliest + settings.default_window
    if latest < earliest:
        raise InvalidRequest(f"the window for the urgent visit ended at {latest.isoformat()}")
    row = EmergencyRequest(
        patient_id=request.patient_id, appointment_type=request.appointment_type,
        duration_minutes=request.duration_minutes, earliest=earliest, latest_start=latest,
        provider_id=request.provider_id, specialty=request.specialty or "", location_id=request.location_id,
        reason=request.reason[:400], notes=request.notes, placer_id=request.placer_id, requested_by=actor.label,
        source=actor.source[:200], status="received", explanation=[], created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    steps: list[dict[str, Any]] = []
    booked = _book_free_time(context, session, view, row, actor, steps)
    if booked is not None:
        # asked of the calendar's owner (mirror mode): settled when it confirms
        _set(row, "booked" if booked.applied else "waiting", steps, now, appointment_id=booked.appointment_id)
        log.info("urgent request booked into free time", extra={"request_id": row.id})
        return answer(session, row)
    return _propose(context, session, view, row, actor, steps)


def answer(session: Session, row: EmergencyRequest) -> dict[str, Any]:
    proposal = _latest_proposal(session, row.id)
    last = row.explanation[-1]["what"] if row.explanation else ""
    return {"outcome": row.status, "request_id": row.id, "appointment_id": row.appointment_id,
            "proposal_id": proposal.id if proposal else None,
            "patients_moved": proposal.patients_moved if proposal else 0, "explanation": last}


def _set(row: EmergencyRequest, status: str, steps: list[dict[str, Any]], now: datetime, **values: Any) -> None:
    row.status, row.updated_at, row.explanation = status, now, list(row.explanation or []) + steps
    steps.clear()
    for key, value in values.items():
        setattr(row, key, value)


def _latest_proposal(session: Session, request_id: int) -> Optional[EmergencyProposal]:
    return session.scalars(select(EmergencyProposal).where(EmergencyProposal.request_id == request_id)
                           .order_by(EmergencyProposal.id.desc()).limit(1)).first()


def _extra_capacity_ids(session: Session, settings: Settings) -> tuple[set[int], set[int]]:
    providers = set(session.scalars(select(Provider.id).where(Provider.code.in_(settings.on_call_providers))))
    rooms = set(session.scalars(select(Resource.id).where(Resource.code.in_(settings.overflow_rooms))))
    return providers, rooms


def _urgent_booking(row: EmergencyRequest, **where: Any) -> BookingRequest:
    return BookingRequest(patient_id=row.patient_id, appointment_type=row.appointment_type,
                          duration_minutes=row.duration_minutes, urgency="urgent", reason=row.reason,
                          notes=row.notes, placer_id=row.placer_id, **where)


def _book_free_time(context, session: Session, view: Scheduler, row: EmergencyRequest, actor: Actor,
                    steps: list[dict[str, Any]]) -> Optional[ChangeOutcome]:
    """Step 1: an emergency hold, else the earliest free slot, in the window."""
    on_call, rooms = _extra_capacity_ids(session, _settings(context))
    candidates = [c for c in view.free_slots(SlotQuery(
        appointment_type=row.appointment_type, start=row.earliest, end=row.latest_start + timedelta(seconds=1),
        duration_minutes=row.duration_minutes, provider_id=row.provider_id, specialty=row.specialty or None,
        location_id=row.location_id, urgency="urgent", limit=50))
        if c.provider_id not in on_call and c.resource_id not in rooms]
    candidates.sort(key=lambda c: (c.slot_type != "emergency", c.start, c.slot_id))
    for candidate in candidates:
        try:
            outcome = _change(view, actor, row.reason, request=_urgent_booking(row, slot_id=candidate.slot_id),
                              detail={"emergency_request": row.id})
        except SlotUnavailable as exc:
            steps.append({"step": "free_time", "what": f"slot {candidate.slot_id} not taken: {exc}"})
            continue
        why = "an emergency hold" if candidate.slot_type == "emergency" else "the earliest free time"
        steps.append({"step": "free_time", "what": f"booked into {why} at {candidate.start.isoformat()}",
                      "slot_id": candidate.slot_id, "provider_id": candidate.provider_id})
        return outcome
    steps.append({"step": "free_time", "what": "no emergency hold or free time fits the window "
                                               f"{row.earliest.isoformat()} .. {row.latest_start.isoformat()}"})
    return None


# --- proposals ------------------------------------------------------------------------------------------


def _zone_of(session: Session, row: EmergencyRequest, context) -> str:
    location_id = row.location_id
    if location_id is None and row.provider_id is not None:
        location_id = session.scalar(select(Provider.location_id).where(Provider.id == row.provider_id))
    location = session.get(Location, location_id) if location_id else None
    return location.timezone if location else context.scheduler.settings.default_timezone


def _owner_id(owner: str) -> int:
    return int(owner.split(":", 1)[1])


def _problem(context, session: Session, row: EmergencyRequest, now: datetime) -> tuple[Problem, list[dict[str, Any]]]:
    """The urgent need and the calendars around it, as ``plugins.emergency_plan`` reads them;
    and the visits considered, each with why it may or may not be moved."""
    settings = _settings(context)
    engine_settings = context.scheduler.settings
    tz = _zone_of(session, row, context)
    on_call, _rooms = _extra_capacity_ids(session, settings)
    providers = {p.id: p for p in session.scalars(select(Provider).where(Provider.active.is_(True)))}
    if row.provider_id is not None:
        urgent_providers = {row.provider_id}
    else:
        urgent_providers = {pid for pid, p in providers.items() if pid not in on_call
                            and (not row.specialty or row.specialty in (p.specialties or []))
                            and (row.location_id is None or p.location_id == row.location_id)}
    last_day = row.latest_start.astimezone(zone(tz)).date() + timedelta(days=settings.alternative_days + 1)
    horizon = local_to_utc(last_day, time(0), tz)
    if settings.alternatives == "same_specialty":
        specialties = {s for pid in urgent_providers if pid in providers for s in providers[pid].specialties or []}
        calendar = {pid for pid, p in providers.items() if pid not in on_call
                    and (pid in urgent_providers or specialties & set(p.specialties or []))}
    else:
        calendar = set(urgent_providers)
    slots = list(session.scalars(select(Slot).where(Slot.provider_id.in_(calendar), *Slot.overlapping(now, horizon))))
    plan_slots = [PlanSlot(s.id, f"provider:{s.provider_id}", s.start, s.end, s.slot_type, s.capacity, s.booked,
                           s.blocked or s.slot_type == "blocked", s.local_weekday, s.local_minute) for s in slots]
    links: dict[int, list[int]] = {}
    for appointment_id, slot_id in session.execute(
            select(AppointmentSlot.appointment_id, AppointmentSlot.slot_id)
            .join(Slot, Slot.id == AppointmentSlot.slot_id)
            .join(Appointment, Appointment.id == AppointmentSlot.appointment_id)
            .where(Slot.provider_id.in_(calendar), *Slot.overlapping(now, horizon),
                   Appointment.status.in_([s.value for s in OCCUPYING]))):
        links.setdefault(appointment_id, []).append(slot_id)
    appointments = {a.id: a for a in session.scalars(select(Appointment).where(Appointment.id.in_(list(links))))}
    in_window = {s.id for s in slots if s.provider_id in urgent_providers
                 and row.earliest <= s.start < row.latest_start + timedelta(minutes=row.duration_minutes)}
    considered = sorted({a for a, ids in links.items() if in_window & set(ids)},
                        key=lambda a: (appointments[a].start, a))
    patient_ids = {appointments[a].patient_id for a in considered if appointments[a].patient_id}
    moved_today = _moved_today(session, patient_ids, now, tz)
    why_not: dict[int, str] = {}
    for appointment_id in considered:
        why_not[appointment_id] = _why_not_movable(appointments[appointment_id], row, now, settings, moved_today)
    plan_appointments = [
        PlanAppointment(a.id, a.patient_id or 0, f"provider:{a.provider_id}", a.start, a.end, a.appointment_type,
                        tuple(sorted(links[a.id])), why_not.get(a.id, "not in the urgent window"))
        for a in appointments.values()]
    patients = {p.id: p for p in session.scalars(select(Patient).where(Patient.id.in_(patient_ids)))}
    busy: dict[int, list[tuple[datetime, datetime, int]]] = {}
    for a_id, patient_id, start, end in session.execute(
            select(Appointment.id, Appointment.patient_id, Appointment.start, Appointment.end).where(
                Appointment.patient_id.in_(patient_ids | {row.patient_id}),
                Appointment.status.in_([s.value for s in OCCUPYING]), Appointment.end > now,
                Appointment.start < horizon)):
        busy.setdefault(patient_id, []).append((start, end, a_id))
    allowed = {}
    for appointment_id in considered:
        appointment = appointments[appointment_id]
        patient = patients.get(appointment.patient_id)
        owners = {appointment.provider_id}
        if settings.alternatives == "same_specialty":
            mine = set(providers[appointment.provider_id].specialties or []) if appointment.provider_id in providers \
                else set()
            owners |= {pid for pid in calendar if mine & set(providers[pid].specialties or [])
                       and (not patient or not patient.preferred_provider_gender
                            or providers[pid].gender == patient.preferred_provider_gender)}
        allowed[appointment_id] = frozenset(f"provider:{pid}" for pid in owners)
    preferences = {pid: Preferences(tuple(p.preferred_weekdays or ()),
                                    _minute(p.preferred_earliest), _minute(p.preferred_latest))
                   for pid, p in patients.items()}
    problem = Problem(
        slots=plan_slots, appointments=plan_appointments,
        accepts=lambda slot, kind, urgency: slot_accepts(slot, kind, urgency, now, engine_settings) is None,
        urgent_type=row.appointment_type, urgent_duration=timedelta(minutes=row.duration_minutes),
        urgent_owners=frozenset(f"provider:{pid}" for pid in urgent_providers), earliest=row.earliest,
        latest_start=row.latest_start, min_start=now + settings.notice,
        urgent_busy=tuple((s, e) for s, e, _a in busy.get(row.patient_id, ())), allowed_owners=allowed,
        preferences=preferences, patient_busy={pid: tuple(v) for pid, v in busy.items() if pid != row.patient_id},
        max_moves=settings.max_moves)
    candidates = [{"appointment_id": a, "patient_id": appointments[a].patient_id,
                   "provider_id": appointments[a].provider_id, "start": appointments[a].start.isoformat(),
                   "status": appointments[a].status, "movable": not why_not[a],
                   "why_not": why_not[a] or None} for a in considered]
    return problem, candidates


def _minute(value: Optional[time]) -> Optional[int]:
    return value.hour * 60 + value.minute if value is not None else None


def _moved_today(session: Session, patient_ids: set[int], now: datetime, tz: str) -> dict[int, str]:
    """Patients moved since local midnight: by this plugin, or by staff or a plugin (audit trail)."""
    if not patient_ids:
        return {}
    midnight = local_to_utc(now.astimezone(zone(tz)).date(), time(0), tz)
    moved = {}
    for patient_id, proposal_id in session.execute(
            select(EmergencyMove.patient_id, EmergencyMove.proposal_id).where(
                EmergencyMove.patient_id.in_(patient_ids), EmergencyMove.status.in_(MOVED),
                EmergencyMove.applied_at >= midnight)):
        moved[patient_id] = f"already moved today for an urgent request (proposal {proposal_id})"
    write_pending_rows(session)  # the audit entries of this transaction's moves
    for patient_id, actor, at in session.execute(
            select(Appointment.patient_id, AuditEntry.actor, AuditEntry.at)
            .join(Appointment, Appointment.id == AuditEntry.entity_id)
            .where(AuditEntry.entity == "appointment", AuditEntry.action == "rescheduled", AuditEntry.at >= midnight,
                   Appointment.patient_id.in_(patient_ids),
                   or_(AuditEntry.actor.startswith("operator:"), AuditEntry.actor.startswith("plugin:"),
                       AuditEntry.actor.startswith("system:")))):
        moved.setdefault(patient_id, f"already moved today ({actor} at {at.isoformat()})")
    return moved


def _why_not_movable(appointment: Appointment, row: EmergencyRequest, now: datetime, settings: Settings,
                     moved_today: dict[int, str]) -> str:
    if appointment.status in ("arrived", "checked_in", "completed"):
        return f"the patient has {'arrived' if appointment.status == 'arrived' else 'been seen or is being seen'}"
    if appointment.status not in ("booked", "overbooked"):
        return f"a {appointment.status} appointment, not a booking"
    if appointment.urgency == "urgent":
        return "an urgent visit"
    if appointment.patient_id is None:
        return "no patient to tell"
    if appointment.patient_id == row.patient_id:
        return "the urgent patient's own visit"
    if appointment.start < now + settings.notice:
        return f"starts within {int(settings.notice.total_seconds() // 60)} minutes: the patient may be on the way"
    return moved_today.get(appointment.patient_id, "")


def _added_capacity(context, session: Session, row: EmergencyRequest,
                    busy: tuple[tuple[datetime, datetime], ...]) -> Optional[dict[str, Any]]:
    """Step 2: the earliest start an on-call provider or an overflow room leaves free in the window."""
    settings = _settings(context)
    on_call, rooms = _extra_capacity_ids(session, settings)
    duration = timedelta(minutes=row.duration_minutes)
    tz = _zone_of(session, row, context)
    options = []
    for provider_id in sorted(on_call):
        start = _first_free_start(session, provider_id, row, duration, tz, settings.on_call_hours, busy)
        if start is not None:
            options.append({"kind": "on_call", "provider_id": provider_id, "start": start.isoformat(),
                            "end": (start + duration).isoformat(), "owner": f"provider:{provider_id}"})
    for room_id in sorted(rooms):
        for slot in session.scalars(select(Slot).where(
                Slot.resource_id == room_id, Slot.start >= row.earliest, Slot.start <= row.latest_start,
                Slot.booked < Slot.capacity, Slot.blocked.is_(False)).order_by(Slot.start)):
            if slot_accepts(slot, row.appointment_type, "urgent", context.clock.now(), context.scheduler.settings):
                continue
            if not _room_free(session, room_id, slot.start, slot.start + duration) \
                    or any(s < slot.start + duration and slot.start < e for s, e in busy):
                continue
            options.append({"kind": "overflow", "resource_id": room_id, "slot_id": slot.id,
                            "start": slot.start.isoformat(), "end": (slot.start + duration).isoformat(),
                            "owner": f"resource:{room_id}"})
            break
    options.sort(key=lambda o: (o["start"], o["kind"]))
    return options[0] if options else None


def _room_free(session: Session, room_id: int, start: datetime, end: datetime) -> bool:
    """Whether the room's own slots cover [start, end) back to back, each with a seat free."""
    cursor = start
    for s_start, s_end, booked, capacity, blocked in session.execute(
            select(Slot.start, Slot.end, Slot.booked, Slot.capacity, Slot.blocked)
            .where(Slot.resource_id == room_id, *Slot.overlapping(start, end)).order_by(Slot.start)):
        if s_start != cursor or booked >= capacity or blocked:
            return False
        cursor = s_end
    return cursor >= end


def _first_free_start(session: Session, provider_id: int, row: EmergencyRequest, duration: timedelta, tz: str,
                      hours: tuple[time, time], busy) -> Optional[datetime]:
    """The on-call provider's first start in the window (5-minute steps) within their
    on-call hours, clear of their reservations, time blocks and slots that are full."""
    step = timedelta(minutes=UNIT_MINUTES)
    start = row.earliest + (-(row.earliest - datetime(1970, 1, 1, tzinfo=row.earliest.tzinfo)) % step)
    end_of_window = row.latest_start + duration
    taken = set(session.scalars(select(Reservation.unit).where(
        Reservation.subject == f"provider:{provider_id}",
        Reservation.unit.in_(list(units(start, end_of_window))))))
    blocks = list(session.execute(select(TimeBlock.start, TimeBlock.end).where(
        TimeBlock.provider_id == provider_id, TimeBlock.active.is_(True), TimeBlock.start < end_of_window,
        TimeBlock.end > start)))
    full = list(session.execute(select(Slot.start, Slot.end).where(
        Slot.provider_id == provider_id, *Slot.overlapping(start, end_of_window),
        or_(Slot.booked >= Slot.capacity, Slot.blocked.is_(True)))))
    while start <= row.latest_start:
        local = start.astimezone(zone(tz))
        end = start + duration
        local_end = end.astimezone(zone(tz))
        if hours[0] <= local.time() and local_end.time() <= hours[1] and local_end.date() == local.date() \
                and not taken & set(units(start, end)) \
                and not any(s < end and start < e for s, e in list(blocks) + list(full) + list(busy)):
            return start
        start += step
    return None


def _propose(context, session: Session, view: Scheduler, row: EmergencyRequest, actor: Actor,
             steps: list[dict[str, Any]], *, attempt: int = 1) -> dict[str, Any]:
    settings = _settings(context)
    now = context.clock.now()
    problem, candidates = _problem(context, session, row, now)
    plan = solve(problem)
    extra = _added_capacity(context, session, row, problem.urgent_busy) \
        if plan is None or plan.moves else None
    avoided = None
    if plan is not None:
        avoided = {"patients_moved": len(plan.moves), "delays_minutes": _delays(plan.delays),
                   "urgent": _placement(plan.urgent)}
    if extra is not None:
        kind, urgent, moves = extra["kind"], extra, ()
        steps.append({"step": "added_capacity", "what": f"{'an on-call provider' if kind == 'on_call' else 'an overflow room'}"
                                                      f" is free at {extra['start']}: nobody is moved",
                      "instead_of": avoided})
    elif plan is not None:
        kind, urgent, moves = "moves", _placement(plan.urgent), plan.moves
        steps.append({"step": "moves", "what": f"moving {len(plan.moves)} patient(s) makes room at "
                                               f"{plan.urgent.start.isoformat()}",
                      "objective": {"patients_moved": len(plan.moves), "delays_minutes": _delays(plan.delays)}})
    else:
        movable = sum(1 for c in candidates if c["movable"])
        steps.append({"step": "moves", "what": f"no way to make room by moving at most {settings.max_moves} patient(s) "
                                               f"({movable} of {len(candidates)} visits in the window may be moved)"})
        _set(row, "unplaced", steps, now)
        _tell_staff(context, session, row, f"Urgent request {row.id}: no room found",
                    f"Urgent request {row.id} could not be placed between {row.earliest.isoformat()} and "
                    f"{row.latest_start.isoformat()} (UTC): {row.explanation[-1]['what']}. Please arrange it by hand.")
        return answer(session, row)
    needs_approval = settings.approval == "always" or (settings.approval == "when_moving" and kind == "moves"
                                                        and bool(moves))
    proposal = EmergencyProposal(
        request_id=row.id, kind=kind, status="pending", urgent=urgent, patients_moved=len(moves),
        delays_minutes=_delays(tuple(sorted((m.delay_minutes for m in moves), reverse=True))),
        candidates=candidates, explanation={"objective": "fewest patients moved, then their delays largest first "
                                                         "(a cancellation counts as the longest), then the earliest "
                                                         "urgent start", "instead_of": avoided if extra else None,
                                            "attempt": attempt},
        needs_approval=needs_approval, decided_by="", decision_reason="", created_at=now)
    session.add(proposal)
    session.flush()
    _record_moves(context, session, problem, plan if kind == "moves" else None, proposal)
    if needs_approval:
        _set(row, "proposed", steps, now)
        _tell_staff(context, session, row, f"Urgent request {row.id}: approve moving {len(moves)} patient(s)?",
                    f"Urgent request {row.id} fits at {urgent['start']} (UTC) if {len(moves)} patient(s) are moved "
                    f"(largest delay {proposal.delays_minutes[0] if proposal.delays_minutes else 0} minutes). "
                    f"Review: slotengine emergencies show {row.id}; then approve or reject it.")
        return answer(session, row)
    proposal.decided_by, proposal.decided_at = "automatic", now
    proposal.decision_reason = f"approval = {settings.approval!r}"
    return _apply(context, session, view, row, proposal, actor, steps, attempt=attempt)


def _delays(delays) -> list[Optional[float]]:
    return [None if d == CANCEL else d for d in delays]


def _placement(placement) -> dict[str, Any]:
    return {"kind": "moves", "owner": placement.owner, "provider_id": _owner_id(placement.owner),
            "start": placement.start.isoformat(), "end": placement.end.isoformat(),
            "slot_ids": list(placement.slot_ids)}


def _record_moves(context, session: Session, problem: Problem, plan, proposal: EmergencyProposal) -> None:
    """One ``EmergencyMove`` per moved patient, with the other times they are offered."""
    if plan is None:
        return
    settings = _settings(context)
    seats = Counter(plan.urgent.slot_ids)
    for move in plan.moves:
        if move.to is not None:
            seats.update(move.to.slot_ids)
    removed = Counter(s for m in plan.moves for s in problem.by_appointment[m.appointment_id].slot_ids)
    moved_ids = frozenset(m.appointment_id for m in plan.moves)
    for move in plan.moves:
        appointment = problem.by_appointment[move.appointment_id]
        others = [{"start": p.start.isoformat(), "end": p.end.isoformat(), "provider_id": _owner_id(p.owner),
                   "slot_id": p.slot_ids[0], "delay_minutes": d}
                  for d, p in alternatives(problem, appointment, removed, seats, moved_ids)
                  if move.to is None or p.start != move.to.start or p.owner != move.to.owner]
        if move.to is None:
            why = (f"no free time fits (type, the patient's preferred days and hours, not before the visit) within "
                   f"{settings.alternative_days} days: cancelled and put first on the waitlist")
        else:
            why = (f"the earliest free time after the visit that fits its type and the patient's preferences; "
                   f"{int(move.delay_minutes)} minutes later")
        session.add(EmergencyMove(
            proposal_id=proposal.id, appointment_id=move.appointment_id, patient_id=move.patient_id,
            action="cancel" if move.to is None else "reschedule", from_start=appointment.start,
            from_provider_id=_owner_id(appointment.owner), to_start=move.to.start if move.to else None,
            to_provider_id=_owner_id(move.to.owner) if move.to else None,
            to_slot_id=move.to.slot_ids[0] if move.to else None,
            delay_minutes=None if move.to is None else move.delay_minutes,
            alternatives=others[: settings.offer_alternatives], why=why, status="planned"))
    session.flush()


def _moves(session: Session, proposal_id: int) -> list[EmergencyMove]:
    return list(session.scalars(select(EmergencyMove).where(EmergencyMove.proposal_id == proposal_id)
                                .order_by(EmergencyMove.id)))


def _apply(context, session: Session, view: Scheduler, row: EmergencyRequest, proposal: EmergencyProposal,
           actor: Actor, steps: list[dict[str, Any]], *, attempt: int = 1) -> dict[str, Any]:
    """Move the patients and book the urgent visit, all or nothing; if the schedule
    changed since the proposal was made, plan again (once)."""
    now = context.clock.now()
    mover = Actor("plugin", NAME, f"urgent request {row.id} ({actor.label})")
    reason = f"moved for an urgent patient (urgent request {row.id})"
    moves = _moves(session, proposal.id)
    mark = len(view._deferred)
    savepoint = session.begin_nested()
    try:
        waiting = False
        for move in moves:
            appointment = session.get(Appointment, move.appointment_id)
            if appointment.status not in ("booked", "overbooked") or appointment.start != move.from_start:
                raise SlotUnavailable(f"appointment {appointment.id} changed since the proposal "
                                      f"({appointment.status} at {appointment.start.isoformat()})")
            request = None if move.action == "cancel" else BookingRequest(
                patient_id=move.patient_id, appointment_type="", slot_id=move.to_slot_id,
                duration_minutes=int((appointment.end - appointment.start).total_seconds() // 60))
            # our own message tells them why, the new time and other times: no second "moved" message
            outcome = _change(view, mover, reason, appointment_id=move.appointment_id, request=request,
                              detail={"emergency_move": move.id, "patient_told": True})
            move.status = "applied" if outcome.applied else "requested"
            move.applied_at = now
            waiting = waiting or not outcome.applied
        appointment_id = None
        if not waiting:
            appointment_id = _book_urgent(view, row, proposal, actor)
    except SchedulingError as exc:
        savepoint.rollback()
        del view._deferred[mark:]
        proposal.status = "failed"
        proposal.explanation = {**proposal.explanation, "failed": str(exc)}
        for move in moves:
            move.status = "failed"
        steps.append({"step": "apply", "what": f"proposal {proposal.id} could not be applied: {exc}"})
        if attempt >= 2:
            _set(row, "unplaced", steps, now)
            _tell_staff(context, session, row, f"Urgent request {row.id}: could not be applied",
                        f"Urgent request {row.id}: the schedule keeps changing under the proposal ({exc}). "
                        "Please arrange it by hand.")
            return answer(session, row)
        return _propose(context, session, view, row, actor, steps, attempt=attempt + 1)
    savepoint.commit()
    proposal.status, proposal.applied_at = ("approved" if appointment_id is None else "applied"), now
    if appointment_id is None:
        steps.append({"step": "apply", "what": "asked of the calendar's owner; settled when it confirms"})
        _set(row, "waiting", steps, now)
    else:
        steps.append({"step": "apply", "what": f"proposal {proposal.id} applied: {len(moves)} patient(s) moved"})
        _set(row, "applied", steps, now, appointment_id=appointment_id)
    for move in moves:
        if move.status == "applied":
            _tell_moved_patient(context, session, view, row, move, mover, now)
    log.info("urgent request proposal applied", extra={"request_id": row.id, "proposal_id": proposal.id,
                                                       "moved": len(moves), "waiting": appointment_id is None})
    return answer(session, row)


def _book_urgent(view: Scheduler, row: EmergencyRequest, proposal: EmergencyProposal, actor: Actor) -> Optional[int]:
    urgent = proposal.urgent
    if proposal.kind == "on_call":
        request = _urgent_booking(row, provider_id=urgent["provider_id"], start=datetime.fromisoformat(urgent["start"]))
    elif proposal.kind == "overflow":
        request = _urgent_booking(row, slot_id=urgent["slot_id"], resource_ids=(urgent["resource_id"],))
    else:
        request = _urgent_booking(row, slot_id=urgent["slot_ids"][0])
    outcome = _change(view, actor, row.reason, request=request, detail={"emergency_request": row.id})
    return outcome.appointment_id if outcome.applied else None


def _tell_moved_patient(context, session: Session, view: Scheduler, row: EmergencyRequest, move: EmergencyMove,
                        mover: Actor, now: datetime) -> None:
    settings = _settings(context)
    if move.action == "cancel":
        appointment = session.get(Appointment, move.appointment_id)
        view.add_to_waitlist(patient_id=move.patient_id, appointment_type=appointment.appointment_type,
                             duration_minutes=int((appointment.end - appointment.start).total_seconds() // 60),
                             actor=mover, provider_id=appointment.provider_id, earliest=now,
                             reason=f"cancelled for urgent request {row.id}")
        _tell_staff(context, session, row, f"Call a patient: visit cancelled for urgent request {row.id}",
                    f"Appointment {move.appointment_id} was cancelled to make room for urgent request {row.id}; "
                    "the patient is on the waitlist. Please call them.", patient_id=move.patient_id,
                    appointment_id=move.appointment_id)
    patient = session.get(Patient, move.patient_id)
    available = [c for c in settings.channels if c in context.channels]
    chosen = choose_channel(patient, available, settings.channels) if patient else None
    if chosen is None:
        _tell_staff(context, session, row, f"Call a patient moved for urgent request {row.id}",
                    f"Appointment {move.appointment_id} was {'cancelled' if move.action == 'cancel' else 'moved'} "
                    "for an urgent patient and no message channel reaches the patient.",
                    patient_id=move.patient_id, appointment_id=move.appointment_id)
        return
    session.add(OutboxItem(channel=chosen[0], kind="emergency_move", due_at=now, status="pending",
                           appointment_id=move.appointment_id, payload={"move_id": move.id}, attempts=0,
                           last_error="", created_at=now))


def _tell_staff(context, session: Session, row: EmergencyRequest, subject: str, text: str, **extra: Any) -> None:
    context.plugins.staff_notice(session, {"team": _settings(context).team, "subject": subject, "text": text,
                                           **extra})


# --- staff decisions -------------------------------------------------------------------------------------


def approve(context, request_id: int, actor: Actor, reason: str = "") -> dict[str, Any]:
    """Apply the pending proposal of an urgent request (re-planned if the schedule moved meanwhile)."""
    return _decide(context, request_id, actor, reason, approve=True)


def reject(context, request_id: int, actor: Actor, reason: str = "") -> dict[str, Any]:
    """Turn the pending proposal down: nobody is moved; the urgent patient is left to staff."""
    return _decide(context, request_id, actor, reason, approve=False)


def _decide(context, request_id: int, actor: Actor, reason: str, *, approve: bool) -> dict[str, Any]:
    now = context.clock.now()
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            row = session.get(EmergencyRequest, request_id, with_for_update=True)
            if row is None:
                raise NotFound("urgent request", request_id)
            proposal = _latest_proposal(session, row.id)
            if row.status != "proposed" or proposal is None or proposal.status != "pending":
                raise InvalidRequest(f"urgent request {row.id} is {row.status}: no proposal waits for a decision")
            proposal.decided_by, proposal.decided_at, proposal.decision_reason = actor.label, now, reason
            if approve:
                proposal.status = "approved"
                result = _apply(context, session, view, row, proposal, actor,
                                [{"step": "decision", "what": f"approved by {actor.label}" + (f": {reason}" if reason else "")}])
            else:
                proposal.status = "rejected"
                _set(row, "rejected", [{"step": "decision", "what": f"rejected by {actor.label}"
                                                                    + (f": {reason}" if reason else "")}], now)
                result = answer(session, row)
        view.notify_committed()
    return result


# --- the calendar's owner answers (mirror mode) -------------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    if _settings(context) is None or not change.kind.startswith("change_"):
        return
    requester = (change.detail or {}).get("requester") or {}
    if change.kind in ("change_confirmed", "change_refused", "change_expired") and \
            ("emergency_move" in requester or "emergency_request" in requester):
        now = context.clock.now()
        plan_task(session, plugin=NAME, kind="settle", due_at=now, now=now, appointment_id=change.appointment_id,
                  payload={**requester, "verdict": change.kind.removeprefix("change_")})


@hookimpl(trylast=True)
def slotengine_after_change(change: Change, context) -> None:
    if _settings(context) is not None and change.kind in ("change_confirmed", "change_refused", "change_expired"):
        settle_pending(context)


def settle_pending(context) -> str:
    """The sweep ``emergency.settle``: the owner's answers to the moves and bookings we asked for."""
    return f"{sweep_tasks(context, plugin=NAME, kinds=('settle',), handle=partial(_settle, context))} answers settled"


def _settle(context, session: Session, task, view: Scheduler) -> None:
    now = context.clock.now()
    verdict = task.payload["verdict"]
    if "emergency_move" in task.payload:
        move = session.get(EmergencyMove, task.payload["emergency_move"])
        proposal = session.get(EmergencyProposal, move.proposal_id)
        row = session.get(EmergencyRequest, proposal.request_id, with_for_update=True)
        move.status = "applied" if verdict == "confirmed" else "failed"
        if verdict == "confirmed":
            move.applied_at = now
            _tell_moved_patient(context, session, view, row, move, Actor("plugin", NAME, f"urgent request {row.id}"),
                                now)
        else:
            proposal.status = "failed"
            _set(row, "unplaced", [{"step": "owner", "what": f"the calendar's owner {verdict} moving appointment "
                                                             f"{move.appointment_id}"}], now)
            _tell_staff(context, session, row, f"Urgent request {row.id}: a move was {verdict}",
                        f"The calendar's owner {verdict} moving appointment {move.appointment_id} for urgent request "
                        f"{row.id}. Please arrange the urgent visit by hand.")
            return
        if row.status == "waiting" and all(m.status == "applied" for m in _moves(session, proposal.id)):
            actor = Actor("plugin", NAME, f"urgent request {row.id}")
            appointment_id = _book_urgent(view, row, proposal, actor)
            if appointment_id is not None:
                proposal.status, proposal.applied_at = "applied", now
                _set(row, "applied", [{"step": "owner", "what": "every move confirmed; urgent visit booked"}], now,
                     appointment_id=appointment_id)
    elif "emergency_request" in task.payload:
        row = session.get(EmergencyRequest, task.payload["emergency_request"], with_for_update=True)
        proposal = _latest_proposal(session, row.id)
        if verdict == "confirmed":
            if proposal is not None and proposal.status == "approved":
                proposal.status, proposal.applied_at = "applied", now
            _set(row, "applied" if proposal is not None else "booked",
                 [{"step": "owner", "what": "the calendar's owner confirmed the urgent visit"}], now,
                 appointment_id=task.appointment_id)
        else:
            _set(row, "unplaced", [{"step": "owner", "what": f"the calendar's owner {verdict} the urgent visit"}], now)
            _tell_staff(context, session, row, f"Urgent request {row.id}: the booking was {verdict}",
                        f"The calendar's owner {verdict} the urgent visit of request {row.id}. Please arrange it by hand.")


# --- expiry -----------------------------------------------------------------------------------------------


def expire_proposals(context) -> str:
    """Proposals still waiting for staff when the urgent window has passed."""
    now = context.clock.now()
    expired = 0
    with context.session_factory() as session, session.begin():
        for row in session.scalars(select(EmergencyRequest).where(EmergencyRequest.status == "proposed",
                                                                  EmergencyRequest.latest_start < now)):
            proposal = _latest_proposal(session, row.id)
            if proposal is not None and proposal.status == "pending":
                proposal.status = "expired"
            _set(row, "expired", [{"step": "expiry", "what": "no decision before the window closed"}], now)
            _tell_staff(context, session, row, f"Urgent request {row.id}: the window passed",
                        f"No decision was taken on urgent request {row.id} before {row.latest_start.isoformat()} "
                        "(UTC); its proposal expired.")
            expired += 1
    return f"{expired} proposals expired"


# --- telling moved patients, and their choice ---------------------------------------------------------------


def _render(context, session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    settings = _settings(context)
    now = context.clock.now()
    messages = {}
    for item in items:
        move = session.get(EmergencyMove, item.payload.get("move_id"))
        if move is None or move.status != "applied":
            messages[item.id] = {"skip": "the move did not happen"}
            continue
        patient = session.get(Patient, move.patient_id)
        address = address_for(patient, item.channel)
        if not address:
            messages[item.id] = {"skip": f"the patient has no address for {item.channel}"}
            continue
        language = language_of(patient, TEXTS)
        words = TEXTS[language]
        appointment = session.get(Appointment, move.appointment_id)
        location = session.get(Location, appointment.location_id) if appointment.location_id else None
        tz = location.timezone if location else context.scheduler.settings.default_timezone
        fields = {"clinic": settings.clinic_name, "old": local_when(move.from_start, tz, language),
                  "new": local_when(move.to_start, tz, language) if move.to_start else ""}
        text = words["moved" if move.action == "reschedule" else "cancelled"].format(**fields)
        open_choices = [a for a in move.alternatives if datetime.fromisoformat(a["start"]) > now]
        token = ""
        if open_choices:
            choices = ", ".join(f"{n}) {local_when(datetime.fromisoformat(a['start']), tz, language)}"
                                for n, a in enumerate(open_choices, 1))
            text += " " + words["choices"].format(choices=choices)
            token = make_token(settings.reply_secret, {"m": move.id},
                               expires=max(datetime.fromisoformat(a["start"]) for a in open_choices))
            if item.channel == "email":
                link = f"{settings.reply_url}?token={quote(token)}" if settings.reply_url else token
                text += f"\n\n{words['reply']}: {link}\n"
        messages[item.id] = {"id": f"outbox-{item.id}", "to": address, "subject": words["subject"], "text": text,
                             "kind": item.kind, "language": language, "reply_token": token}
    return messages


def send_messages(context) -> str:
    return f"{dispatch_outbox(context, kinds=('emergency_move',), render=partial(_render, context))} messages sent"


def choose_alternative(context, move_id: int, number: int) -> dict[str, Any]:
    """The moved patient takes alternative ``number`` (1-based) instead of their new time."""
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            move = session.get(EmergencyMove, move_id, with_for_update=True)
            if move is None:
                raise NotFound("emergency move", move_id)
            if move.status not in ("applied",):
                return {"move_id": move.id, "result": move.status}
            if not 1 <= number <= len(move.alternatives):
                raise InvalidRequest(f"choose 1 to {len(move.alternatives)}, not {number}")
            chosen = move.alternatives[number - 1]
            appointment = session.get(Appointment, move.appointment_id)
            actor = Actor("patient", str(move.patient_id), f"emergency move {move.id}")
            request = BookingRequest(patient_id=move.patient_id, appointment_type=appointment.appointment_type,
                                     slot_id=chosen["slot_id"],
                                     duration_minutes=int((appointment.end - appointment.start).total_seconds() // 60))
            try:
                if move.action == "cancel":
                    outcome = _change(view, actor, f"chosen after emergency move {move.id}", request=request)
                else:
                    outcome = _change(view, actor, f"chosen after emergency move {move.id}",
                                      appointment_id=move.appointment_id, request=request)
            except SlotUnavailable as exc:
                return {"move_id": move.id, "result": "taken", "reason": str(exc)}
            move.status = "chosen"
            result = {"move_id": move.id, "result": "chosen" if outcome.applied else "requested",
                      "appointment_id": outcome.appointment_id, "start": chosen["start"]}
        view.notify_committed()
    return result


def reply(context, token: str, answer_text: str) -> dict[str, Any]:
    claims = read_token(_settings(context).reply_secret, token or "", now=context.clock.now())
    if "m" not in claims:
        raise BadToken("not an emergency move token")
    word = str(answer_text or "").strip().rstrip(".!)")
    if not word.isdigit():
        raise ValueError(f"unknown answer {answer_text!r}; expected the number of a time")
    return choose_alternative(context, int(claims["m"]), int(word))




# --- reading them back (``slotengine emergencies list|show``) -------------------------------------------------


def _iso(value: Optional[datetime]) -> Optional[str]:
    return value.isoformat() if value else None


def request_row(row: EmergencyRequest) -> dict[str, Any]:
    return {"id": row.id, "status": row.status, "patient_id": row.patient_id, "type": row.appointment_type,
            "duration_minutes": row.duration_minutes, "earliest": _iso(row.earliest),
            "latest_start": _iso(row.latest_start), "provider_id": row.provider_id, "specialty": row.specialty,
            "placer_id": row.placer_id, "appointment_id": row.appointment_id, "requested_by": row.requested_by,
            "created_at": _iso(row.created_at)}


def list_requests(session: Session, *, status: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
    stmt = select(EmergencyRequest).order_by(EmergencyRequest.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(EmergencyRequest.status == status)
    rows = []
    for row in session.scalars(stmt):
        proposal = _latest_proposal(session, row.id)
        rows.append({**request_row(row), "proposal_id": proposal.id if proposal else None,
                     "proposal_status": proposal.status if proposal else None,
                     "patients_moved": proposal.patients_moved if proposal else 0})
    return rows


def describe(session: Session, request_id: int) -> dict[str, Any]:
    """The request, every step tried, and each proposal with the visits it considered,
    the moves chosen (and why), the alternatives offered and the decision."""
    row = session.get(EmergencyRequest, request_id)
    if row is None:
        raise NotFound("urgent request", request_id)
    proposals = []
    for proposal in session.scalars(select(EmergencyProposal).where(EmergencyProposal.request_id == row.id)
                                    .order_by(EmergencyProposal.id)):
        proposals.append({
            "id": proposal.id, "kind": proposal.kind, "status": proposal.status, "urgent": proposal.urgent,
            "objective": {"patients_moved": proposal.patients_moved, "delays_minutes": proposal.delays_minutes},
            "explanation": proposal.explanation, "needs_approval": proposal.needs_approval,
            "decided_by": proposal.decided_by, "decided_at": _iso(proposal.decided_at),
            "decision_reason": proposal.decision_reason, "applied_at": _iso(proposal.applied_at),
            "candidates": proposal.candidates,
            "moves": [{"id": m.id, "appointment_id": m.appointment_id, "patient_id": m.patient_id,
                       "action": m.action, "from_start": _iso(m.from_start), "from_provider_id": m.from_provider_id,
                       "to_start": _iso(m.to_start), "to_provider_id": m.to_provider_id,
                       "delay_minutes": m.delay_minutes, "why": m.why, "alternatives_offered": m.alternatives,
                       "status": m.status} for m in _moves(session, proposal.id)],
        })
    return {**request_row(row), "reason": row.reason, "source": row.source, "steps": row.explanation,
            "proposals": proposals}


# --- jobs and routes --------------------------------------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("emergency.send", send_messages, seconds=settings.sweep_seconds)
    register("emergency.settle", settle_pending, seconds=settings.sweep_seconds)
    register("emergency.expire", expire_proposals, seconds=max(settings.sweep_seconds, 60))


@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    if _settings(context) is not None:
        register("POST", "/emergency/reply", reply_route(partial(reply, context)))
