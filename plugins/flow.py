"""Even patient flow: arrival smoothing in the slot search, and telling patients when a provider runs late.

Arrival smoothing.  A location may allow only so many patients to be
scheduled to arrive in the same window (15 minutes of clinic-local wall-clock
time by default: 09:00–09:15, 09:15–09:30…).  For every candidate of
``Scheduler.free_slots`` at such a location the plugin counts the
appointments already starting in the candidate's window there
(``slotengine_exclude_slot``, ``slotengine_score_slot``):

* a candidate that would exceed the limit is left out of the search
  (``over_limit = "exclude"``, the default; ``slotengine slots find
  --explain`` shows it with the count), or kept but ranked below every
  candidate within the limit (``over_limit = "rank"``: the score drops by
  ``over_limit_penalty``).  Urgent requests are never left out, only ranked;
* every candidate at a limited location gets the score ``-smoothing_weight ×
  arrivals already in its window ÷ limit``, so among the near-term candidates
  the search prefers quieter windows (visible per plugin in ``slotengine
  slots find --json`` under ``scores.flow``).

Bookings made directly (a slot named by staff or by an HL7 request, the
EHR's own schedule in mirror mode) are not refused: the limit shapes what the
search offers, and ``slotengine report flow`` shows windows above it.

Running late.  A provider is behind when one of their patients is checked in
(visit started: ``checked_in``, HL7 SCH-25 "Started") or arrives (ADT
A04/A01) at least ``late_after_minutes`` after the booked time, or when staff
say so (``report_running_late`` / ``slotengine flow late --provider CODE
--minutes N`` / ``POST /flow/late``).  The rest of that provider's clinic day
is then estimated (``estimate_day``): visits in progress end their booked
length after they started; the provider then sees the waiting and the
still-to-come patients in booked order, each for their booked length, never
before their booked time, so free time in the day absorbs the delay.  Patients
more than the engine's no-show grace past their time and not arrived are not
counted (a likely no-show); staff saying "N minutes late" moves the next
patient to N minutes after their time.

Each estimate is stored (``FlowDelay``: the explanation and, per remaining
appointment, the estimate and what was decided and why).  Patients not yet
arrived whose estimated delay is at least ``notify_after_minutes`` are told
a new suggested arrival time (estimated start less ``arrival_lead_minutes``,
rounded down to 5 minutes, never before the booked time) in clinic-local
time, through their channel (``FlowNotice`` + an outbox row, sent by the
``flow.send`` sweep and right after the change); a patient already told is
told again only when the suggestion moves later by ``renotify_minutes`` —
never earlier, since a patient who was told to come later cannot be called
back in.  The worst affected (delay of ``reschedule_after_minutes`` or more,
up to ``max_reschedule_offers`` per estimate) are offered a concrete other
time with the same provider (the earliest free slot from the next clinic day
on): reply ``Y`` through the signed token (``reply_to_notice`` / ``POST
/flow/reply``) moves the appointment there.  Patients no channel reaches (or
who opted out of reminders or of that channel) are left to the front desk:
a staff notice names them, and a summary notice describes every estimate.

Settings::

    [plugins.flow]
    window_minutes = 15                  # arrival windows (a divisor of 60)
    max_arrivals = { MAIN = 3 }          # per location code; "*" for every other location
    over_limit = "exclude"               # or "rank"
    smoothing_weight = 1.0
    over_limit_penalty = 100.0
    running_late = true
    signals = ["checked_in", "arrived"]  # which changes can reveal a provider running late
    late_after_minutes = 15
    notify_after_minutes = 20
    arrival_lead_minutes = 10
    renotify_minutes = 15
    reschedule_after_minutes = 45
    max_reschedule_offers = 3
    reschedule_horizon_days = 14
    channels = ["sms", "email", "voice"]
    clinic_name = "Main Street Clinic"
    reply_url = ""
    reply_secret_env = "SLOTENGINE_REPLY_SECRET"   # or reply_secret = "..."
    sweep_seconds = 30
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from functools import partial
from typing import Any, Optional
from urllib.parse import quote

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from engine.calendar import local_to_utc, zone
from engine.db import write_pending_rows
from engine.errors import InvalidRequest, NotFound, SchedulingError
from engine.jobs import dispatch_outbox
from engine.messaging import address_for, choose_channel, describe_for_staff, language_of, local_when, opt_outs
from engine.models import (
    Appointment,
    AuditEntry,
    FlowDelay,
    FlowNotice,
    Location,
    OutboxItem,
    Patient,
    Provider,
    Slot,
)
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Change, SlotQuery
from engine.signing import BadToken, make_token, read_token, reply_route, secret_from_settings
from engine.states import OCCUPYING, Status

log = logging.getLogger("slotengine.plugins.flow")

NAME = "flow"
KIND = "running_late"
SIGNALS = ("checked_in", "arrived")
BOOKED = (Status.BOOKED.value, Status.OVERBOOKED.value)
#: Appointments that still need the provider's time today.
WAITING_OR_TO_COME = (Status.HELD.value, Status.BOOKED.value, Status.OVERBOOKED.value, Status.ARRIVED.value)
_OCCUPYING = [s.value for s in OCCUPYING]

TEXTS = {
    "en": {
        "subject": "Your appointment today: please come at {arrive}",
        "short": "{clinic}: we are running about {minutes} min late. For your {booked} appointment today, "
                 "please arrive at {arrive} instead.",
        "offer_short": " Or reply Y to move to {offer} instead.",
        "offer_long": "If you would rather come another time, we can move you to {offer}. To take it: {link}",
        "hello": "Hello",
    },
    "es": {
        "subject": "Su cita de hoy: por favor venga a las {arrive}",
        "short": "{clinic}: vamos con unos {minutes} min de retraso. Para su cita de hoy a las {booked}, "
                 "por favor llegue a las {arrive}.",
        "offer_short": " O responda S para cambiarla al {offer}.",
        "offer_long": "Si prefiere venir en otro momento, podemos cambiar su cita al {offer}. Para aceptarlo: {link}",
        "hello": "Hola",
    },
}
YES = {"y", "yes", "s", "si", "sí", "accept", "1", "ok"}
NO = {"n", "no", "decline", "2", "pass"}


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    window_minutes: int = 15
    max_arrivals: dict[str, int] = field(default_factory=dict)
    over_limit: str = "exclude"
    smoothing_weight: float = 1.0
    over_limit_penalty: float = 100.0
    running_late: bool = True
    signals: tuple[str, ...] = SIGNALS
    late_after_minutes: float = 15
    notify_after_minutes: float = 20
    arrival_lead_minutes: float = 10
    renotify_minutes: float = 15
    reschedule_after_minutes: float = 45
    max_reschedule_offers: int = 3
    reschedule_horizon_days: int = 14
    channels: tuple[str, ...] = ("sms", "email", "voice")
    clinic_name: str = "Your clinic"
    reply_url: str = ""
    reply_secret: str = ""
    sweep_seconds: float = 30

    def limit_for(self, location_code: str) -> Optional[int]:
        return self.max_arrivals.get(location_code, self.max_arrivals.get("*"))


def parse_settings(raw: dict[str, Any]) -> Settings:
    """The ``[plugins.flow]`` section, checked; raises ``ValueError`` naming the key.
    The reply secret is left empty (``slotengine_configure`` reads it)."""
    where = "[plugins.flow]"
    known = set(Settings.__dataclass_fields__) | {"reply_secret_env"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    values = {k: v for k, v in raw.items() if k not in ("reply_secret", "reply_secret_env")}
    window = values.get("window_minutes", 15)
    if not isinstance(window, int) or isinstance(window, bool) or window < 5 or 60 % window:
        raise ValueError(f"{where}.window_minutes: a whole number of minutes dividing an hour "
                         f"(5, 10, 15, 20, 30, 60), got {window!r}")
    limits = values.get("max_arrivals", {})
    if not isinstance(limits, dict):
        raise ValueError(f"{where}.max_arrivals: a table of location code = number, got {limits!r}")
    for code, limit in limits.items():
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"{where}.max_arrivals.{code}: a whole number of patients, at least 1, got {limit!r}")
    values["max_arrivals"] = dict(limits)
    if values.get("over_limit", "exclude") not in ("exclude", "rank"):
        raise ValueError(f"{where}.over_limit: \"exclude\" or \"rank\", got {values['over_limit']!r}")
    signals = values.get("signals", SIGNALS)
    if not isinstance(signals, (list, tuple)) or not set(signals) <= set(SIGNALS):
        raise ValueError(f"{where}.signals: a list of {', '.join(SIGNALS)}, got {signals!r}")
    values["signals"] = tuple(signals)
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    for key in ("late_after_minutes", "notify_after_minutes", "arrival_lead_minutes", "renotify_minutes",
                "reschedule_after_minutes", "smoothing_weight", "over_limit_penalty", "sweep_seconds"):
        value = values.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}.{key}: a number, at least 0, got {value!r}")
    for key in ("max_reschedule_offers", "reschedule_horizon_days"):
        value = values.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}.{key}: a whole number, at least 0, got {value!r}")
    return Settings(**values)


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    parsed = parse_settings(settings)
    context.state[NAME] = replace(parsed, reply_secret=secret_from_settings(
        settings, "reply_secret", "[plugins.flow]", default_env="SLOTENGINE_REPLY_SECRET"))


# --- arrival smoothing --------------------------------------------------------------------


def arrival_window(instant: datetime, tz: str, minutes: int) -> tuple[datetime, datetime]:
    """The window of clinic-local wall-clock time ``instant`` falls in, as UTC.

    Cut from local midnight by the wall clock, so 09:00–09:15 is a window in
    every zone (also those half or three quarters of an hour off UTC).  Clocks
    change on a whole hour and windows divide an hour, so no window spans a
    change; on a fall-back night the repeated hour has windows of its own."""
    local = instant.astimezone(zone(tz))
    into = timedelta(minutes=(local.hour * 60 + local.minute) % minutes, seconds=local.second,
                     microseconds=local.microsecond)
    start = instant - into
    return start, start + timedelta(minutes=minutes)


_APPOINTMENTS = Appointment.__table__
# Asked for every search candidate: built once (compiled and cache-keyed once), run as Core
_ARRIVALS = (select(func.count()).select_from(_APPOINTMENTS)
             .where(_APPOINTMENTS.c.location_id == bindparam("location_id"),
                    _APPOINTMENTS.c.start >= bindparam("start"), _APPOINTMENTS.c.start < bindparam("end"),
                    _APPOINTMENTS.c.status.in_(_OCCUPYING)))


def arrivals_between(session: Session, location_id: int, start: datetime, end: datetime) -> int:
    """Appointments on the schedule (held, booked, in the clinic or done) starting in [start, end) at a location."""
    return session.connection().execute(
        _ARRIVALS, {"location_id": location_id, "start": start, "end": end}).scalar_one()


@dataclass(frozen=True)
class WindowLoad:
    location_code: str
    timezone: str
    start: datetime
    end: datetime
    booked: int
    limit: int

    @property
    def over_limit(self) -> bool:
        return self.booked + 1 > self.limit

    def describe(self) -> str:
        tz = zone(self.timezone)
        return (f"{self.booked} of {self.limit} arrivals already booked at {self.location_code} "
                f"{self.start.astimezone(tz):%H:%M}–{self.end.astimezone(tz):%H:%M}")


def window_load(session: Session, context, location_id: int, instant: datetime) -> Optional[WindowLoad]:
    """How full the arrival window of ``instant`` is at a location, or None when it has no limit."""
    settings = _settings(context)
    if settings is None or not settings.max_arrivals:
        return None
    # code and zone by location id, kept: the session's identity map would load the row for every candidate
    known = context.state.setdefault(f"{NAME}.locations", {})
    if location_id not in known:
        known[location_id] = session.execute(select(Location.code, Location.timezone)
                                             .where(Location.id == location_id)).first()
    if known[location_id] is None:
        return None
    code, tz = known[location_id]
    limit = settings.limit_for(code)
    if limit is None:
        return None
    start, end = arrival_window(instant, tz, settings.window_minutes)
    return WindowLoad(code, tz, start, end, arrivals_between(session, location_id, start, end), limit)


@hookimpl(trylast=True)
def slotengine_exclude_slot(session: Session, candidate, query: SlotQuery, context) -> Optional[str]:
    settings = _settings(context)
    if settings is None or session is None or settings.over_limit != "exclude" or query.urgency == "urgent":
        return None
    load = window_load(session, context, candidate.location_id, candidate.start)
    if load is None or not load.over_limit:
        return None
    return f"arrival limit: {load.describe()}"


@hookimpl(trylast=True)
def slotengine_score_slot(session: Session, candidate, query: SlotQuery, context) -> Optional[float]:
    settings = _settings(context)
    if settings is None or session is None:
        return None
    load = window_load(session, context, candidate.location_id, candidate.start)
    if load is None:
        return None
    score = 0.0 - settings.smoothing_weight * load.booked / load.limit  # 0.0, never -0.0, for an empty window
    if load.over_limit:
        score -= settings.over_limit_penalty
    return round(score, 4)


# --- running late: the estimate ------------------------------------------------------------------


@dataclass
class Estimate:
    appointment_id: int
    patient_id: Optional[int]
    status: str
    scheduled: datetime
    duration: timedelta
    estimated: datetime

    @property
    def delay(self) -> timedelta:
        return self.estimated - self.scheduled

    @property
    def delay_minutes(self) -> int:
        return int(self.delay.total_seconds() // 60)


@dataclass
class DayEstimate:
    estimates: list[Estimate]
    reasons: list[str]
    uncounted: list[tuple[int, int]]  # (appointment id, minutes past its time) not arrived: left out


def _minutes(delta: timedelta) -> int:
    return int(delta.total_seconds() // 60)


def _hhmm(instant: datetime, tz: str) -> str:
    return f"{instant.astimezone(zone(tz)):%H:%M}"


def local_day_bounds(day: date, tz: str) -> tuple[datetime, datetime]:
    """[local midnight, next local midnight) in UTC: 23 or 25 hours on the nights clocks change."""
    return local_to_utc(day, time(0), tz), local_to_utc(day + timedelta(days=1), time(0), tz)


def estimate_day(session: Session, provider_id: int, tz: str, now: datetime, *, grace: timedelta,
                 stated_minutes: Optional[int] = None) -> DayEstimate:
    """When each of the provider's remaining visits today will start (see the module doc)."""
    day = now.astimezone(zone(tz)).date()
    day_start, day_end = local_day_bounds(day, tz)
    rows = list(session.scalars(select(Appointment).where(
        Appointment.provider_id == provider_id, Appointment.start >= day_start, Appointment.start < day_end,
        Appointment.status.in_(WAITING_OR_TO_COME + (Status.CHECKED_IN.value,)),
    ).order_by(Appointment.start, Appointment.id)))
    reasons: list[str] = []
    in_progress = [a for a in rows if a.status == Status.CHECKED_IN.value]
    write_pending_rows(session)  # the audit entries of this transaction's check-ins
    started_at = dict(session.execute(
        select(AuditEntry.entity_id, func.max(AuditEntry.at)).where(
            AuditEntry.entity == "appointment", AuditEntry.action == "checked_in",
            AuditEntry.entity_id.in_([a.id for a in in_progress])).group_by(AuditEntry.entity_id)).all()
    ) if in_progress else {}
    # A provider whose slots seat several patients at once (capacity 2: a nurse
    # works up one while the doctor sees the other) sees that many in parallel.
    seats = max(1, session.scalar(select(func.max(Slot.capacity)).where(
        Slot.provider_id == provider_id, Slot.start >= day_start, Slot.start < day_end)) or 1)
    free_at = [now] * seats
    for visit in in_progress:
        began = started_at.get(visit.id) or visit.start
        ends = began + (visit.end - visit.start)
        seat = free_at.index(min(free_at))
        free_at[seat] = max(free_at[seat], ends)
        reasons.append(f"the visit booked for {_hhmm(visit.start, tz)} started at {_hhmm(began, tz)} "
                       f"({_minutes(began - visit.start)} min after its time) and is expected to run its booked "
                       f"{_minutes(visit.end - visit.start)} min, to {_hhmm(ends, tz)}")
    queue, uncounted = [], []
    for appointment in rows:
        if appointment.status == Status.CHECKED_IN.value:
            continue
        if appointment.status != Status.ARRIVED.value and appointment.start < now - grace:
            uncounted.append((appointment.id, _minutes(now - appointment.start)))
            continue
        queue.append(appointment)
    if stated_minutes is not None and queue:
        stated_start = queue[0].start + timedelta(minutes=stated_minutes)
        free_at = [max(free, stated_start) for free in free_at]
        reasons.append(f"staff say the provider is {stated_minutes} min behind: the next patient "
                       f"(booked {_hhmm(queue[0].start, tz)}) is seen at {_hhmm(stated_start, tz)}")
    estimates = []
    absorbed_at: Optional[datetime] = None
    for appointment in queue:
        duration = appointment.end - appointment.start
        seat = free_at.index(min(free_at))
        begins = max(appointment.start, free_at[seat])
        if absorbed_at is None and begins == appointment.start and estimates and estimates[-1].delay > timedelta(0):
            absorbed_at = appointment.start
        estimates.append(Estimate(appointment.id, appointment.patient_id, appointment.status, appointment.start,
                                  duration, begins))
        free_at[seat] = begins + duration
    reasons.append("later patients are seen in booked order, each for their booked length and never before "
                   "their booked time, so free time in the day absorbs the delay"
                   + (f"; {seats} patients are seen at once, as the slots seat them" if seats > 1 else "")
                   + (f" (caught up by {_hhmm(absorbed_at, tz)})" if absorbed_at else ""))
    if uncounted:
        reasons.append(f"{len(uncounted)} patient(s) more than {_minutes(grace)} min past their time and not "
                       "arrived are not counted (a likely no-show)")
    return DayEstimate(estimates, reasons, uncounted)


# --- running late: deciding and telling ----------------------------------------------------------------


def _floor_five(instant: datetime) -> datetime:
    """Down to a 5-minute mark (every zone's offset is a whole number of 5 minutes)."""
    return instant - timedelta(minutes=instant.minute % 5, seconds=instant.second, microseconds=instant.microsecond)


def _channel_for(session: Session, context, settings: Settings, patient: Optional[Patient]) -> tuple[str, str]:
    """(channel, "") or ("", why no message can be sent)."""
    if patient is None:
        return "", "the appointment has no patient"
    opted_out = opt_outs(session, patient.id)
    if "reminder" in opted_out:
        return "", "the patient opted out of appointment messages"
    available = [c for c in settings.channels if c in context.channels and c not in opted_out]
    chosen = choose_channel(patient, available, settings.channels)
    if chosen is None:
        return "", "no message channel reaches the patient"
    return chosen[0], ""


def _alternative(session: Session, context, settings: Settings, appointment: Appointment, tz: str, now: datetime):
    """The earliest free time with the same provider from the next clinic day on, or None."""
    if settings.reschedule_horizon_days <= 0:
        return None
    next_day = now.astimezone(zone(tz)).date() + timedelta(days=1)
    start = local_to_utc(next_day, time(0), tz)
    found = context.scheduler.within(session).free_slots(SlotQuery(
        appointment_type=appointment.appointment_type, start=start,
        end=start + timedelta(days=settings.reschedule_horizon_days),
        duration_minutes=_minutes(appointment.end - appointment.start), provider_id=appointment.provider_id,
        patient_id=appointment.patient_id, urgency=appointment.urgency, limit=1))
    return found[0] if found else None


def act_on_delay(session: Session, context, *, provider_id: int, trigger: str, actor: Actor,
                 observed_minutes: int, trigger_appointment_id: Optional[int] = None,
                 stated_minutes: Optional[int] = None) -> Optional[FlowDelay]:
    """Estimate the provider's day, decide for each remaining patient, store it all
    (``FlowDelay``, ``FlowNotice``, outbox rows, staff notices) in the caller's transaction."""
    settings = _settings(context)
    now = context.clock.now()
    provider = session.get(Provider, provider_id)
    if provider is None:
        raise NotFound("provider", provider_id)
    default_tz = context.scheduler.settings.default_timezone
    location = session.get(Location, provider.location_id) if provider.location_id else None
    if trigger_appointment_id is not None:
        trigger_location = session.get(Appointment, trigger_appointment_id).location_id
        location = session.get(Location, trigger_location) if trigger_location else location
    tz = location.timezone if location else default_tz
    day = estimate_day(session, provider_id, tz, now, grace=context.scheduler.settings.no_show_grace,
                       stated_minutes=stated_minutes)
    who = f"{provider.display_name} ({provider.code})"
    worst = max((e.delay_minutes for e in day.estimates), default=0)
    explanation = (f"{who} is running about {worst} min late at {_hhmm(now, tz)}: " + "; ".join(day.reasons) + ".")
    delay = FlowDelay(provider_id=provider_id, location_id=location.id if location else None,
                      local_day=now.astimezone(zone(tz)).date(), trigger=trigger,
                      trigger_appointment_id=trigger_appointment_id, observed_minutes=observed_minutes,
                      actor=actor.label, explanation=explanation, estimates=[], created_at=now)
    session.add(delay)
    session.flush()

    appointments = {a.id: a for a in session.scalars(select(Appointment).where(
        Appointment.id.in_([e.appointment_id for e in day.estimates])))}
    last_told = {}
    for notice in session.scalars(select(FlowNotice).where(
            FlowNotice.appointment_id.in_(list(appointments))).order_by(FlowNotice.id)):
        last_told[notice.appointment_id] = notice  # the latest one wins
    records, notices = [], []
    for estimate in day.estimates:
        record = {"appointment_id": estimate.appointment_id, "status": estimate.status,
                  "scheduled": estimate.scheduled.isoformat(), "scheduled_local": _hhmm(estimate.scheduled, tz),
                  "estimated": estimate.estimated.isoformat(), "estimated_local": _hhmm(estimate.estimated, tz),
                  "delay_minutes": estimate.delay_minutes}
        records.append(record)
        suggested = max(estimate.scheduled,
                        _floor_five(estimate.estimated - timedelta(minutes=settings.arrival_lead_minutes)))
        previous = last_told.get(estimate.appointment_id)
        if estimate.status == Status.ARRIVED.value:
            record.update(decision="none", why="already in the clinic")
        elif estimate.status not in BOOKED:
            record.update(decision="none", why=f"the appointment is {estimate.status}, not booked")
        elif estimate.scheduled <= now:
            record.update(decision="none", why="due now and not arrived yet: told nothing new")
        elif estimate.delay < timedelta(minutes=settings.notify_after_minutes):
            record.update(decision="none", why=f"estimated {estimate.delay_minutes} min late, under the "
                                               f"{settings.notify_after_minutes:g}-min threshold for telling patients")
        elif previous is not None and suggested < previous.suggested_arrival + timedelta(minutes=settings.renotify_minutes):
            record.update(decision="none", why=f"already told to arrive at {_hhmm(previous.suggested_arrival, tz)}; "
                                               f"the new suggestion {_hhmm(suggested, tz)} is not "
                                               f"{settings.renotify_minutes:g} min later (never call a patient "
                                               "in earlier than told)")
        else:
            notice = FlowNotice(delay_id=delay.id, appointment_id=estimate.appointment_id,
                                patient_id=estimate.patient_id, scheduled_start=estimate.scheduled,
                                estimated_start=estimate.estimated, suggested_arrival=suggested,
                                delay_minutes=estimate.delay_minutes, channel="", reason="", offer_status="",
                                created_at=now)
            notices.append((notice, record, previous))
            record.update(decision="tell", suggested_arrival=suggested.isoformat(),
                          suggested_arrival_local=_hhmm(suggested, tz),
                          why=f"estimated {estimate.delay_minutes} min late: asked to arrive at {_hhmm(suggested, tz)} "
                              f"({settings.arrival_lead_minutes:g} min before the estimated start, never before "
                              "the booked time)")

    already_offered = {n.appointment_id for n in session.scalars(select(FlowNotice).where(
        FlowNotice.appointment_id.in_(list(appointments)), FlowNotice.offer_status.in_(("offered", "declined"))))}
    worst_first = sorted((n for n in notices if n[0].delay_minutes >= settings.reschedule_after_minutes),
                         key=lambda n: (-n[0].delay_minutes, n[0].scheduled_start))
    to_offer = [n for n in worst_first if n[0].appointment_id not in already_offered][:settings.max_reschedule_offers]
    staff_calls = []
    for notice, record, _previous in notices:
        appointment = appointments[notice.appointment_id]
        patient = session.get(Patient, appointment.patient_id) if appointment.patient_id else None
        channel, why_not = _channel_for(session, context, settings, patient)
        notice.channel = channel
        reasons = [record["why"]]
        if any(notice is n[0] for n in to_offer):
            alternative = _alternative(session, context, settings, appointment, tz, now)
            if alternative is not None:
                notice.offer_slot_id, notice.offer_start, notice.offer_end = (
                    alternative.slot_id, alternative.start, alternative.end)
                notice.offer_status = "offered"
                reasons.append(f"among the worst affected ({notice.delay_minutes} min, threshold "
                               f"{settings.reschedule_after_minutes:g}): offered {local_when(alternative.start, tz)} "
                               "with the same provider instead")
                record.update(decision="tell_and_offer", offer_start=alternative.start.isoformat(),
                              offer_slot_id=alternative.slot_id)
            else:
                reasons.append(f"among the worst affected, but no free time with the provider in the next "
                               f"{settings.reschedule_horizon_days} days: the front desk is asked to offer one")
                staff_calls.append((appointment, "offer another day (no free slot found)"))
        if not channel:
            reasons.append(f"{why_not}: the front desk is asked to call")
            offer = f", or offer them {local_when(notice.offer_start, tz)} instead" if notice.offer_start else ""
            staff_calls.append((appointment, f"tell them to arrive at {_hhmm(notice.suggested_arrival, tz)}{offer}"))
        notice.reason = "; ".join(reasons)
        record["why"] = notice.reason
        session.add(notice)
        session.flush()
        record["notice_id"] = notice.id
        if channel:
            session.add(OutboxItem(channel=channel, kind=KIND, due_at=now, status="pending",
                                   appointment_id=appointment.id, payload={"notice_id": notice.id},
                                   attempts=0, last_error="", created_at=now))
    delay.estimates = records
    for appointment, what in staff_calls:
        context.plugins.staff_notice(session, {
            "team": "front_desk", "subject": f"Running late: please call about appointment {appointment.id}",
            "text": f"{who} is running late. Please call the patient of "
                    f"{describe_for_staff(session, appointment)} and {what}.",
            "appointment_id": appointment.id, "patient_id": appointment.patient_id})
    if notices:
        told = sum(1 for n in notices if n[0].channel)
        offered = sum(1 for n in notices if n[0].offer_status == "offered")
        context.plugins.staff_notice(session, {
            "team": "front_desk", "subject": f"{who} is running about {worst} min late",
            "text": f"{explanation}\n\n{told} patient(s) told a new arrival time, {offered} offered another "
                    f"time, {len(staff_calls)} to call. Details: slotengine flow delays --date "
                    f"{delay.local_day.isoformat()} --provider {provider.code}"})
    log.info("running late estimated", extra={"flow_delay": delay.id, "provider_id": provider_id,
                                              "trigger": trigger, "worst_minutes": worst, "notices": len(notices)})
    return delay


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    settings = _settings(context)
    if settings is None or not settings.running_late or change.kind not in settings.signals \
            or change.appointment_id is None:
        return
    appointment = session.get(Appointment, change.appointment_id)
    if appointment is None or appointment.provider_id is None:
        return
    now = context.clock.now()
    late = now - appointment.start
    if late < timedelta(minutes=settings.late_after_minutes):
        return
    location = session.get(Location, appointment.location_id) if appointment.location_id else None
    tz = location.timezone if location else context.scheduler.settings.default_timezone
    if appointment.start.astimezone(zone(tz)).date() != now.astimezone(zone(tz)).date():
        return  # recorded after the day: bookkeeping, not a provider running late now
    act_on_delay(session, context, provider_id=appointment.provider_id, trigger=change.kind, actor=change.actor,
                 observed_minutes=_minutes(late), trigger_appointment_id=appointment.id)


@hookimpl(trylast=True)
def slotengine_after_change(change: Change, context) -> None:
    settings = _settings(context)
    if settings is not None and settings.running_late and change.kind in settings.signals:
        send_due(context)  # a delay is news now, not at the next sweep


def report_running_late(context, provider_code: str, minutes: int, actor: Actor) -> dict[str, Any]:
    """Staff say a provider is ``minutes`` behind: estimate, tell, store; returns the decision."""
    settings = _settings(context)
    if settings is None:
        raise InvalidRequest("the flow plugin is not configured")
    if minutes < 0:
        raise InvalidRequest("minutes late must be 0 or more")
    with context.session_factory() as session, session.begin():
        provider_id = session.scalar(select(Provider.id).where(Provider.code == provider_code))
        if provider_id is None:
            raise NotFound("provider", provider_code)
        delay = act_on_delay(session, context, provider_id=provider_id, trigger="staff", actor=actor,
                             observed_minutes=minutes, stated_minutes=minutes)
        return describe_delay(session, delay)


def describe_delay(session: Session, delay: FlowDelay) -> dict[str, Any]:
    """A stored estimate and its notices, for ``--json`` and the HTTP answer (no patient details)."""
    provider = session.get(Provider, delay.provider_id)
    notices = list(session.scalars(select(FlowNotice).where(FlowNotice.delay_id == delay.id).order_by(FlowNotice.id)))
    return {
        "id": delay.id, "provider": provider.code if provider else None, "local_day": delay.local_day.isoformat(),
        "trigger": delay.trigger, "trigger_appointment_id": delay.trigger_appointment_id,
        "observed_minutes": delay.observed_minutes, "actor": delay.actor, "at": delay.created_at.isoformat(),
        "explanation": delay.explanation, "estimates": delay.estimates,
        "notices": [{"id": n.id, "appointment_id": n.appointment_id, "delay_minutes": n.delay_minutes,
                     "suggested_arrival": n.suggested_arrival.isoformat(), "channel": n.channel,
                     "offer_start": n.offer_start.isoformat() if n.offer_start else None,
                     "offer_status": n.offer_status, "reason": n.reason} for n in notices],
    }


def delays_on(session: Session, day: date, provider_code: Optional[str] = None) -> list[dict[str, Any]]:
    stmt = select(FlowDelay).where(FlowDelay.local_day == day).order_by(FlowDelay.id)
    if provider_code:
        stmt = stmt.join(Provider, Provider.id == FlowDelay.provider_id).where(Provider.code == provider_code)
    return [describe_delay(session, delay) for delay in session.scalars(stmt)]


# --- sending ---------------------------------------------------------------------------------------


def _render(context, session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    settings = _settings(context)
    now = context.clock.now()
    messages: dict[int, dict[str, Any]] = {}
    for item in items:
        notice = session.get(FlowNotice, item.payload.get("notice_id"))
        appointment = session.get(Appointment, notice.appointment_id) if notice else None
        if notice is None or appointment is None:
            messages[item.id] = {"skip": "the notice is gone"}
            continue
        newer = session.scalar(select(FlowNotice.id).where(FlowNotice.appointment_id == notice.appointment_id,
                                                          FlowNotice.id > notice.id).limit(1))
        if appointment.status not in BOOKED:
            why = f"the appointment is {appointment.status}"
        elif appointment.start != notice.scheduled_start:
            why = "the appointment moved"
        elif newer is not None:
            why = "superseded by a later estimate"
        elif now >= notice.suggested_arrival:
            why = "too late: the suggested arrival time has passed"
        else:
            why = ""
        patient = session.get(Patient, appointment.patient_id) if appointment.patient_id else None
        address = address_for(patient, item.channel) if patient else ""
        if not why and not address:
            why = f"the patient has no address for {item.channel}"
        if why:
            messages[item.id] = {"skip": why}
            continue
        location = session.get(Location, appointment.location_id) if appointment.location_id else None
        tz = location.timezone if location else context.scheduler.settings.default_timezone
        language = language_of(patient, TEXTS)
        words = TEXTS[language]
        minutes = max(notice.delay_minutes, 0)
        fields = {"clinic": settings.clinic_name, "minutes": minutes, "booked": _hhmm(notice.scheduled_start, tz),
                  "arrive": _hhmm(notice.suggested_arrival, tz)}
        text = words["short"].format(**fields)
        message = {"id": f"outbox-{item.id}", "to": address, "kind": item.kind, "language": language,
                   "subject": words["subject"].format(**fields)}
        if notice.offer_status == "offered":
            token = make_token(settings.reply_secret, {"l": notice.id}, expires=notice.scheduled_start)
            message["reply_token"] = token
            offer = local_when(notice.offer_start, tz, language)
            if item.channel == "email":
                link = f"{settings.reply_url}?token={quote(token)}" if settings.reply_url else token
                text = (f"{words['hello']} {patient.given_name},\n\n{text}\n\n"
                        f"{words['offer_long'].format(offer=offer, link=link)}\n\n{settings.clinic_name}")
            else:
                text += words["offer_short"].format(offer=offer)
        message["text"] = text
        messages[item.id] = message
    return messages


def send_due(context) -> str:
    return f"{dispatch_outbox(context, kinds=(KIND,), render=partial(_render, context))} running-late messages sent"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("flow.send", send_due, seconds=settings.sweep_seconds)


# --- answers to a reschedule offer ---------------------------------------------------------------


def accept_offer(context, notice_id: int, actor: Optional[Actor] = None) -> dict[str, Any]:
    """Move the appointment to the offered time; if it was taken meanwhile the front desk is asked to call."""
    now = context.clock.now()
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            notice = session.get(FlowNotice, notice_id, with_for_update=True)
            if notice is None:
                raise NotFound("flow notice", notice_id)
            result: dict[str, Any] = {"notice_id": notice.id, "appointment_id": notice.appointment_id}
            if notice.offer_status != "offered":
                return {**result, "result": notice.offer_status or "nothing was offered"}
            appointment = session.get(Appointment, notice.appointment_id)
            actor = actor or Actor("patient", str(appointment.patient_id), f"flow notice {notice.id}")
            notice.responded_at = now
            try:
                # where the EHR owns the calendar this asks it (an SRM); its SIU then moves our copy
                moved = view.request_reschedule(appointment.id, BookingRequest(
                    patient_id=appointment.patient_id, appointment_type="", slot_id=notice.offer_slot_id,
                    duration_minutes=_minutes(notice.offer_end - notice.offer_start)),
                    actor, f"provider running late (flow notice {notice.id}): the patient took the offered time",
                    detail={"flow_notice_id": notice.id})
            except SchedulingError as exc:
                notice.offer_status = "taken"
                context.plugins.staff_notice(session, {
                    "team": "front_desk", "subject": f"Running late: please call about appointment {appointment.id}",
                    "text": f"The patient of {describe_for_staff(session, appointment)} accepted the other time "
                            f"offered, but it was taken meanwhile ({exc}). Please call them.",
                    "appointment_id": appointment.id, "patient_id": appointment.patient_id})
                return {**result, "result": "taken", "reason": str(exc)}
            if not moved.applied:
                notice.offer_status = "requested"
                result.update(result="requested", owner=moved.owner, request_id=moved.request_id)
                return result
            notice.offer_status = "accepted"
            result.update(result="accepted", start=notice.offer_start.isoformat(), status=moved.appointment_status)
        view.notify_committed()
    return result


def decline_offer(context, notice_id: int) -> dict[str, Any]:
    with context.session_factory() as session, session.begin():
        notice = session.get(FlowNotice, notice_id, with_for_update=True)
        if notice is None:
            raise NotFound("flow notice", notice_id)
        if notice.offer_status != "offered":
            return {"notice_id": notice.id, "result": notice.offer_status or "nothing was offered"}
        notice.offer_status, notice.responded_at = "declined", context.clock.now()
        return {"notice_id": notice.id, "result": "declined"}


def reply_to_notice(context, token: str, answer: str) -> dict[str, Any]:
    settings = _settings(context)
    claims = read_token(settings.reply_secret, token or "", now=context.clock.now())
    if "l" not in claims:
        raise BadToken("not a running-late token")
    word = str(answer or "").strip().lower().rstrip(".!")
    if word in YES:
        return accept_offer(context, int(claims["l"]))
    if word in NO:
        return decline_offer(context, int(claims["l"]))
    raise ValueError(f"unknown answer {answer!r}; expected yes or no")


def _json_body(body: bytes) -> dict[str, Any]:
    data = json.loads(body or b"{}")
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data




def _late_handler(context):
    def handle(body: bytes, headers: dict[str, str], query: dict[str, str]) -> tuple[int, dict]:
        try:
            data = _json_body(body)
            minutes = data.get("minutes")
            if not isinstance(minutes, int) or isinstance(minutes, bool):
                raise ValueError("minutes: a whole number of minutes")
            actor = Actor("operator", str(data.get("operator") or "http"), "POST /flow/late")
            return 200, report_running_late(context, str(data.get("provider", "")), minutes, actor)
        except SchedulingError as exc:
            return (404 if isinstance(exc, NotFound) else 409), {"error": str(exc), "code": exc.code}
        except ValueError as exc:
            return 400, {"error": str(exc)}
    return handle


@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    settings = _settings(context)
    if settings is not None and settings.running_late:
        register("POST", "/flow/reply", reply_route(partial(reply_to_notice, context)))
        register("POST", "/flow/late", _late_handler(context))
