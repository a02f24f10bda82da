"""No-show-aware overbooking: each appointment's show probability, and one
more patient in a full slot only where the block can absorb it.

Estimate.  At booking (``slotengine_schedule_changed``: booked, held,
rescheduled, reinstated…) the appointment gets a ``ShowEstimate``: the show
probability from the model of ``plugins/showmodel.py`` (the patient's earlier
no-shows and late cancellations, lead time, type, clinic-local weekday and
time of day) and the terms that moved it most, in words.  The job
``noshow.refit`` (daily) fits the model again on the site's own history
(``ShowModel``: coefficients, standard errors, fit date, sample size) and
refreshes the estimates of every future appointment; a site without history
uses the prior, pulled towards its own data as visits accumulate.

Overbook.  ``slotengine_allow_overbook`` judges a seat above a full slot's
capacity: the provider's clinic-local block around the slot (``block_minutes``)
may expect no more patient-minutes than its seat-minutes times ``max_load``,
no more than ``max_overtime_minutes`` of expected overtime (the exact
distribution of who comes, each patient independently), and the slot itself
no more than ``max_expected_in_slot`` expected patients -- so the slots whose
patients are least likely to come are doubled first, and the search
(``SlotQuery.overbook``) ranks them so (``slotengine_score_slot``).  The
decision, with every number, is stored (``OverbookDecision``), audited, and
shown by ``slotengine appointments risk --json``; the appointment is
``overbooked`` (SCH-25 ``Overbook``).

High risk.  A booked appointment whose show probability is under
``high_risk_below`` and that the patient has not confirmed gets, at
``escalate_hours_before``, an extra reminder (a call through the ``voice``
channel when the patient has a phone; ``plugins.reminders.plan_escalation``)
and a call task for the front desk; and at ``early_fill_hours_before`` its
slot is offered to the waitlist as an overbooking seat (a ``waitlist_fill``
task), if the budget allows one.  Either step is skipped, with why, when the
patient confirmed, cancelled, moved, or is no longer at high risk.

Settings::

    [plugins.noshow]
    prior = { intercept = 2.2 }      # override prior coefficients (names: showmodel.FEATURES)
    prior_weight = 10                # the pull towards the prior
    history_days = 730               # the visits the model learns from
    late_cancel_hours = 24           # a cancellation this close to the visit is late
    refit_cron = { hour = 3, minute = 30 }
    high_risk_below = 0.7
    block_minutes = 60
    max_load = 1.0
    max_overtime_minutes = 15
    max_expected_in_slot = 1.5
    max_extra_per_slot = 1
    escalate = ["reminder", "call"]  # what high risk brings; [] for nothing
    escalate_hours_before = 48
    escalation_channel = "voice"     # the extra reminder's channel when the patient has it
    call_team = "front_desk"
    early_fill_hours_before = 24     # 0: never offer a likely no-show's slot early
    sweep_seconds = 60
"""
from __future__ import annotations

import logging
import time as monotonic_time
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any, Collection, Iterable, Iterator, Optional, Sequence

from sqlalchemy import bindparam, or_, select
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from engine.calendar import local_to_utc, zone
from engine.db import Direct
from engine.jobs import plan_task, sweep_tasks
from engine.messaging import describe_for_staff, follow_registrations
from engine.models import (
    Appointment,
    AppointmentSlot,
    Location,
    OverbookDecision,
    PluginTask,
    Provider,
    ShowEstimate,
    ShowModel,
    Slot,
)
from engine.plugin import hookimpl
from engine.requests import Candidate, Change
from engine.states import OCCUPYING
from plugins import reminders
from plugins.showmodel import FEATURES, PRIOR, Attendee, Budget, Estimate, Visit, estimate, fit, judge_overbook, \
    reasons_text

log = logging.getLogger("slotengine.plugins.noshow")

NAME = "noshow"
BOOKED = ("booked", "overbooked")
SHOWED = ("arrived", "checked_in", "completed")
#: Changes after which an appointment's estimate is (re)computed.
ESTIMATE_ON = ("booked", "held", "rescheduled", "reinstated", "no_show_reversed", "modified")
#: The statuses of a patient's history that the estimate counts.
COUNTED = ("no_show", "cancelled")
MODEL_CACHE_SECONDS = 60.0  # another daemon's refit is seen within this
_ESTIMATES = ShowEstimate.__table__
_APPOINTMENTS = Appointment.__table__
# ``status = … OR …``, and ``patient_id = …`` for the one patient a booking asks about: an IN
# list's expanding parameter is rendered into the SQL again at every execution
_COUNTED_EVENTS = select(_APPOINTMENTS.c.patient_id, _APPOINTMENTS.c.start, _APPOINTMENTS.c.status,
                         _APPOINTMENTS.c.updated_at).where(or_(*(_APPOINTMENTS.c.status == s for s in COUNTED)))
_EVENTS_OF_ONE = Direct(_COUNTED_EVENTS.where(_APPOINTMENTS.c.patient_id == bindparam("patient_id")))
_EVENTS = _COUNTED_EVENTS.where(_APPOINTMENTS.c.patient_id.in_(bindparam("patient_ids", expanding=True)))


def _upsert(dialect) -> Any:
    insert = dialect.insert(_ESTIMATES)
    return insert.on_conflict_do_update(index_elements=[_ESTIMATES.c.appointment_id],
                                        set_={c.name: insert.excluded[c.name] for c in _ESTIMATES.c
                                              if not c.primary_key})


_STORE = {"postgresql": Direct(_upsert(pg_dialect)), "sqlite": Direct(_upsert(sqlite_dialect))}


@dataclass(frozen=True)
class Settings:
    prior: dict[str, float] = field(default_factory=lambda: dict(PRIOR))
    prior_weight: float = 10.0
    history_days: int = 730
    late_cancel: timedelta = timedelta(hours=24)
    refit_cron: dict[str, Any] = field(default_factory=lambda: {"hour": 3, "minute": 30})
    high_risk_below: float = 0.7
    block_minutes: int = 60
    budget: Budget = Budget()
    escalate: tuple[str, ...] = ("reminder", "call")
    escalate_before: timedelta = timedelta(hours=48)
    escalation_channel: str = "voice"
    call_team: str = "front_desk"
    early_fill_before: timedelta = timedelta(hours=24)
    sweep_seconds: float = 60.0


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


def _number(settings: dict[str, Any], key: str, default: float, *, low: float = 0.0, high: float = float("inf"),
            whole: bool = False) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"[plugins.noshow].{key}: expected {kind} from {low:g} to {high:g}, got {value!r}")
    return int(value) if whole else float(value)


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    known = {"prior", "prior_weight", "history_days", "late_cancel_hours", "refit_cron", "high_risk_below",
             "block_minutes", "max_load", "max_overtime_minutes", "max_expected_in_slot", "max_extra_per_slot",
             "escalate", "escalate_hours_before", "escalation_channel", "call_team", "early_fill_hours_before",
             "sweep_seconds"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"[plugins.noshow]: unknown settings {', '.join(sorted(unknown))}")
    prior = dict(PRIOR)
    for name, value in (settings.get("prior") or {}).items():
        if name not in FEATURES:
            raise ValueError(f"[plugins.noshow].prior.{name}: not a feature; expected one of {', '.join(FEATURES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"[plugins.noshow].prior.{name}: expected a number, got {value!r}")
        prior[name] = float(value)
    escalate = tuple(settings.get("escalate", ("reminder", "call")))
    if not set(escalate) <= {"reminder", "call"}:
        raise ValueError(f"[plugins.noshow].escalate: expected a list of reminder and call, got {list(escalate)!r}")
    block = _number(settings, "block_minutes", 60, low=15, high=480, whole=True)
    if block % 5:
        raise ValueError(f"[plugins.noshow].block_minutes: a multiple of 5 minutes, got {block}")
    cron = settings.get("refit_cron", {"hour": 3, "minute": 30})
    if not isinstance(cron, dict) or not cron:
        raise ValueError(f"[plugins.noshow].refit_cron: expected a table of cron fields, got {cron!r}")
    context.state[NAME] = Settings(
        prior=prior,
        prior_weight=_number(settings, "prior_weight", 10.0, low=1e-6),
        history_days=_number(settings, "history_days", 730, low=1, whole=True),
        late_cancel=timedelta(hours=_number(settings, "late_cancel_hours", 24)),
        refit_cron=dict(cron),
        high_risk_below=_number(settings, "high_risk_below", 0.7, high=1.0),
        block_minutes=block,
        budget=Budget(
            max_load=_number(settings, "max_load", 1.0, low=0.1, high=3.0),
            max_overtime_minutes=_number(settings, "max_overtime_minutes", 15.0),
            max_expected_in_slot=_number(settings, "max_expected_in_slot", 1.5, low=1.0, high=5.0),
            max_extra_per_slot=_number(settings, "max_extra_per_slot", 1, high=10, whole=True),
        ),
        escalate=escalate,
        escalate_before=timedelta(hours=_number(settings, "escalate_hours_before", 48)),
        escalation_channel=str(settings.get("escalation_channel", "voice")),
        call_team=str(settings.get("call_team", "front_desk")),
        early_fill_before=timedelta(hours=_number(settings, "early_fill_hours_before", 24)),
        sweep_seconds=_number(settings, "sweep_seconds", 60.0, low=1.0),
    )


# --- the model in use and the facts it needs ------------------------------------------------


def current_model(session: Session, context) -> tuple[Optional[int], dict[str, float]]:
    """``(model id, coefficients)`` of the latest fit, or ``(None, the prior)`` before any."""
    cached = context.state.get(f"{NAME}.model")
    if cached is not None and monotonic_time.monotonic() - cached[2] < MODEL_CACHE_SECONDS:
        return cached[0], cached[1]
    row = session.execute(select(ShowModel.id, ShowModel.coefficients).order_by(ShowModel.id.desc()).limit(1)).first()
    model = (row.id, dict(row.coefficients)) if row is not None else (None, dict(_settings(context).prior))
    context.state[f"{NAME}.model"] = (*model, monotonic_time.monotonic())
    return model


def _zone_name(session: Session, location_id: Optional[int], context) -> str:
    zones = context.state.setdefault(f"{NAME}.zones", {})
    if location_id not in zones:
        location = session.get(Location, location_id) if location_id else None
        zones[location_id] = location.timezone if location else context.scheduler.settings.default_timezone
    return zones[location_id]


def _patient_events(session: Session, patient_ids: Iterable[int]) -> dict[int, list[tuple[datetime, str, datetime]]]:
    """Each patient's no-shows and cancellations: (start, status, when last changed)."""
    ids = sorted(set(patient_ids))
    events: dict[int, list[tuple[datetime, str, datetime]]] = {p: [] for p in ids}
    # straight on the session's connection: every booking pays for this query, and the
    # ORM's own overhead would be most of it (the change is flushed before plugins run)
    connection = session.connection()
    rows = _EVENTS_OF_ONE.rows(connection, {"patient_id": ids[0]}) if len(ids) == 1 else \
        [row for i in range(0, len(ids), 500) for row in connection.execute(_EVENTS, {"patient_ids": ids[i:i + 500]})]
    for patient_id, start, status, updated_at in rows:
        events[patient_id].append((start, status, updated_at))
    return events


def _counts(events: Sequence[tuple[datetime, str, datetime]], before: datetime, late: timedelta) -> tuple[int, int]:
    """(no-shows, late cancellations) among events before ``before``.  A cancellation
    is late when it was last changed (cancelled) within ``late`` of its start."""
    no_shows = late_cancellations = 0
    for start, status, changed in events:
        if start >= before:
            continue
        if status == "no_show":
            no_shows += 1
        elif changed >= start - late:
            late_cancellations += 1
    return no_shows, late_cancellations


def visit_of(appointment_type: str, start: datetime, booked_at: datetime, tz: str, counts: tuple[int, int]) -> Visit:
    local = start.astimezone(zone(tz))
    return Visit(appointment_type, max((start - booked_at).days, 0), local.weekday(), local.hour * 60 + local.minute,
                 *counts)


def estimate_appointments(session: Session, context, appointments: Sequence[Any], *,
                          without_history: Collection[int] = ()) -> dict[int, Estimate]:
    """Estimates for appointment rows (``id``, ``patient_id``, ``start``,
    ``created_at``, ``appointment_type``, ``location_id``), with one query for
    the patients' histories -- none for the patients ``without_history`` (no
    no-shows or cancellations, as the caller knows)."""
    settings = _settings(context)
    _model_id, coefficients = current_model(session, context)
    events = _patient_events(session, (a.patient_id for a in appointments
                                       if a.patient_id is not None and a.patient_id not in without_history))
    result = {}
    for a in appointments:
        counts = _counts(events.get(a.patient_id, ()), a.start, settings.late_cancel)
        visit = visit_of(a.appointment_type, a.start, a.created_at, _zone_name(session, a.location_id, context), counts)
        result[a.id] = estimate(coefficients, visit)
    return result


def _store(session: Session, appointment_id: int, found: Estimate, model_id: Optional[int], now: datetime) -> None:
    """Write the estimate: one INSERT, or UPDATE of the one there was; through the
    session's own copy of that row when it holds one, so that it does not go stale."""
    values = {"probability": round(found.probability, 6), "reasons": found.reasons, "features": found.features,
              "model_id": model_id, "estimated_at": now}
    row = session.identity_map.get(ShowEstimate.__mapper__.identity_key_from_primary_key((appointment_id,)))
    if row is None:
        connection = session.connection()
        _STORE[connection.dialect.name].run(connection, {"appointment_id": appointment_id, **values})
    else:
        for key, value in values.items():
            setattr(row, key, value)


# --- at booking ----------------------------------------------------------------------------


@hookimpl
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    settings = _settings(context)
    if settings is None:
        return
    without_history = _registered_without_history(session, change)
    if change.appointment_id is None:
        return
    now = context.clock.now()
    for verdict in change.detail.get("overbook") or ():
        if verdict.get("plugin") == NAME:
            session.add(OverbookDecision(
                appointment_id=change.appointment_id, slot_id=verdict["slot_id"], provider_id=verdict["provider_id"],
                block_start=datetime.fromisoformat(verdict["block_start"]),
                block_end=datetime.fromisoformat(verdict["block_end"]),
                expected_present=verdict["expected_present_after"],
                expected_overtime_minutes=verdict["expected_overtime_minutes"], decision=verdict, decided_at=now))
    if change.kind not in ESTIMATE_ON or change.to_state not in ("held", *BOOKED):
        return
    appointment = session.get(Appointment, change.appointment_id)
    if appointment is None or appointment.patient_id is None:
        return
    model_id, _coefficients = current_model(session, context)
    found = estimate_appointments(session, context, [appointment], without_history=without_history)[appointment.id]
    _store(session, appointment.id, found, model_id, now)
    if appointment.status in BOOKED and found.probability < settings.high_risk_below:
        _plan_high_risk(session, appointment, settings, now)


def _registered_without_history(session: Session, change: Change) -> set[int]:
    """The patients registered in this transaction none of whose appointments it has
    cancelled or marked a no-show (every change of status passes here): they have no
    history to count."""
    registered = follow_registrations(session, NAME, change)
    if registered and change.appointment_id is not None and change.to_state in COUNTED:
        registered.discard(session.get(Appointment, change.appointment_id).patient_id)
    return registered


def _plan_high_risk(session: Session, appointment: Appointment, settings: Settings, now: datetime) -> None:
    """Plan the escalation and the early waitlist fill, once per appointment time.  An
    escalation that would fall before now is not planned: the booking's own
    confirmation is that fresh."""
    start = appointment.start.isoformat()
    if settings.escalate:
        due = appointment.start - settings.escalate_before
        if due > now:
            plan_task(session, plugin=NAME, kind="escalate", due_at=due, now=now, appointment_id=appointment.id,
                      payload={"start": start}, dedupe_key=f"{NAME}:escalate:{appointment.id}:{start}")
    if settings.early_fill_before:
        plan_task(session, plugin=NAME, kind="early_fill", due_at=max(appointment.start - settings.early_fill_before, now),
                  now=now, appointment_id=appointment.id, payload={"start": start},
                  dedupe_key=f"{NAME}:early_fill:{appointment.id}:{start}")


# --- overbooking --------------------------------------------------------------------------------


def block_of(start: datetime, tz: str, block_minutes: int) -> tuple[datetime, datetime]:
    """The clinic-local block (``block_minutes`` from local midnight) ``start`` falls in, in UTC."""
    local = start.astimezone(zone(tz))
    first = (local.hour * 60 + local.minute) // block_minutes * block_minutes
    last = first + block_minutes
    begin = local_to_utc(local.date(), time(first // 60, first % 60), tz)
    end = local_to_utc(local.date() + timedelta(days=1), time(0), tz) if last >= 24 * 60 else \
        local_to_utc(local.date(), time(last // 60, last % 60), tz)
    return begin, end


def _minutes(start: datetime, end: datetime) -> int:
    return int((end - start).total_seconds() // 60)


def judge(session: Session, context, candidate: Candidate, patient_id: Optional[int], appointment_type: str,
          *, lock: bool = False) -> dict[str, Any]:
    """The verdict on one more patient in ``candidate``'s full slot, with its arithmetic.

    ``lock`` (a booking): serialise with other overbookings of the provider and read
    everything afresh.  Otherwise (a search judging one slot after another) what was
    read about a block is reused while its slots' counts are unchanged."""
    settings = _settings(context)
    now = context.clock.now()
    tz = _zone_name(session, candidate.location_id, context)
    block_start, block_end = block_of(candidate.start, tz, settings.block_minutes)
    if lock:
        # Two overbookings of one provider in parallel would each see room for one: the
        # provider's row serialises them.  Its holder waits for no slot lock afterwards, so
        # two of them (each holding its own slot, locked by the engine) cannot deadlock.
        session.execute(select(Provider.id).where(Provider.id == candidate.provider_id).with_for_update())
    slots = session.execute(
        select(Slot.id, Slot.start, Slot.end, Slot.capacity, Slot.booked, Slot.blocked, Slot.slot_type)
        .where(Slot.provider_id == candidate.provider_id, Slot.start >= block_start, Slot.start < block_end)
        .order_by(Slot.start, Slot.id)).all()
    target = next((s for s in slots if s.id == candidate.slot_id), None)
    if target is None:
        return {"allow": False, "reason": f"slot {candidate.slot_id} is not in the provider's block"}
    # free emergency holds are not seats for routine patients; patients booked into them still count below
    seat_minutes = sum(s.capacity * _minutes(s.start, s.end) for s in slots
                       if not s.blocked and s.slot_type not in ("emergency", "blocked"))
    cache = None if lock else session.info.setdefault(f"{NAME}.blocks", {})
    key = (candidate.provider_id, block_start, tuple((s.id, s.booked) for s in slots))
    if cache is not None and key in cache:
        block, members = cache[key]
    else:
        block, members = _block_attendees(session, context, candidate.provider_id, block_start, block_end,
                                          [s.id for s in slots])
        if cache is not None:
            cache[key] = block, members
    model_id, coefficients = current_model(session, context)
    events = _patient_events(session, [patient_id]) if patient_id is not None else {}
    visit = visit_of(appointment_type, candidate.start, now, tz,
                     _counts(events.get(patient_id, ()), candidate.start, settings.late_cancel))
    new = estimate(coefficients, visit)
    in_slot = members.get(candidate.slot_id, set())
    decision = judge_overbook(
        block=block, seat_minutes=seat_minutes, slot_occupants=[a for a in block if a.appointment_id in in_slot],
        extra_seat=target.booked - target.capacity + 1,
        new=Attendee(new.probability, _minutes(candidate.start, candidate.end)), budget=settings.budget)
    local_start, local_end = block_start.astimezone(zone(tz)), block_end.astimezone(zone(tz))
    decision.update(
        provider_id=candidate.provider_id, slot_id=candidate.slot_id, block_start=block_start.isoformat(),
        block_end=block_end.isoformat(), block_local=f"{local_start:%a %Y-%m-%d %H:%M}-{local_end:%H:%M} {tz}",
        new_reasons=new.reasons, model_id=model_id)
    return {"allow": decision.pop("allowed"), **decision}


def _block_attendees(session: Session, context, provider_id: int, block_start: datetime, block_end: datetime,
                     slot_ids: Sequence[int]) -> tuple[list[Attendee], dict[int, set[int]]]:
    """The appointments in a provider's block with their show probabilities, and
    which of them sit in each slot."""
    appointments = session.execute(
        select(Appointment.id, Appointment.patient_id, Appointment.start, Appointment.end, Appointment.status,
               Appointment.created_at, Appointment.appointment_type, Appointment.location_id)
        .where(Appointment.provider_id == provider_id, Appointment.start >= block_start,
               Appointment.start < block_end, Appointment.status.in_([s.value for s in OCCUPYING]))
        .order_by(Appointment.start, Appointment.id)).all()
    members: dict[int, set[int]] = {}
    for slot_id, appointment_id in session.execute(select(AppointmentSlot.slot_id, AppointmentSlot.appointment_id)
                                                   .where(AppointmentSlot.slot_id.in_(list(slot_ids)))):
        members.setdefault(slot_id, set()).add(appointment_id)
    probabilities = _probabilities(session, context, appointments)
    return [Attendee(probabilities[a.id], _minutes(a.start, a.end), a.id) for a in appointments], members


def _probabilities(session: Session, context, appointments: Sequence[Any]) -> dict[int, float]:
    """Arrived patients are there; the others' stored estimates, computed now for those without."""
    probabilities = {a.id: 1.0 for a in appointments if a.status in SHOWED}
    waiting = [a.id for a in appointments if a.id not in probabilities]
    if waiting:
        probabilities.update(session.execute(select(ShowEstimate.appointment_id, ShowEstimate.probability)
                                             .where(ShowEstimate.appointment_id.in_(waiting))).all())
    missing = [a for a in appointments if a.id not in probabilities]
    if missing:
        probabilities.update({i: e.probability for i, e in estimate_appointments(session, context, missing).items()})
    return probabilities


@hookimpl
def slotengine_allow_overbook(session: Session, candidate: Candidate, patient_id: Optional[int],
                              appointment_type: str, action: str, context) -> Optional[dict[str, Any]]:
    if _settings(context) is None or candidate.provider_id is None:
        return None
    return judge(session, context, candidate, patient_id, appointment_type, lock=action == "book")


@hookimpl
def slotengine_score_slot(candidate: Candidate) -> Optional[float]:
    """Among seats above capacity, the slot whose patients are least likely to come first."""
    verdict = candidate.overbook
    if not verdict or verdict.get("plugin") != NAME:
        return None
    return -10.0 * verdict["slot_expected_before"] - verdict["expected_overtime_minutes"] / 10


# --- high-risk follow-ups -----------------------------------------------------------------------


def _still_at_risk(session: Session, task: PluginTask, settings: Settings) -> tuple[Optional[Appointment], str]:
    """The appointment if it still needs the step, else why not."""
    appointment = session.get(Appointment, task.appointment_id)
    if appointment is None or appointment.status not in BOOKED:
        return None, f"the appointment is {appointment.status if appointment else 'gone'}"
    if appointment.start.isoformat() != task.payload.get("start"):
        return None, "the appointment moved"
    if appointment.confirmed_at is not None:
        return None, "the patient confirmed"
    found = session.get(ShowEstimate, appointment.id)
    if found is None or found.probability >= settings.high_risk_below:
        return None, "no longer at high risk"
    return appointment, ""


def _done(task: PluginTask, outcome: str) -> None:
    task.payload = {**task.payload, "outcome": outcome}


def _escalate(context, session: Session, task: PluginTask, scheduler) -> None:
    settings = _settings(context)
    appointment, why = _still_at_risk(session, task, settings)
    if appointment is None:
        return _done(task, f"skipped: {why}")
    found = session.get(ShowEstimate, appointment.id)
    done = []
    if "reminder" in settings.escalate:
        channel = reminders.plan_escalation(session, appointment, context, channel=settings.escalation_channel)
        done.append(f"extra reminder by {channel}" if channel else "no extra reminder (no channel or too late)")
    if "call" in settings.escalate:
        context.plugins.staff_notice(session, {
            "team": settings.call_team,
            "subject": f"Please call about appointment {appointment.id}: likely no-show",
            "text": f"{describe_for_staff(session, appointment)} has a {found.probability:.0%} chance of being kept "
                    f"({reasons_text(found.reasons)}) and is not confirmed. Please call to confirm, or rebook.",
            "appointment_id": appointment.id, "patient_id": appointment.patient_id})
        done.append(f"call task for {settings.call_team}")
    _done(task, "; ".join(done))
    log.info("likely no-show escalated", extra={"appointment_id": appointment.id, "actions": done})


def _early_fill(context, session: Session, task: PluginTask, scheduler) -> None:
    settings = _settings(context)
    appointment, why = _still_at_risk(session, task, settings)
    if appointment is None:
        return _done(task, f"skipped: {why}")
    if context.plugins.get("waitlist_fill") is None:
        return _done(task, "skipped: the waitlist_fill plugin is not enabled")
    slot_ids = sorted(session.scalars(select(AppointmentSlot.slot_id)
                                      .where(AppointmentSlot.appointment_id == appointment.id)))
    if not slot_ids:
        return _done(task, "skipped: the appointment holds no slot")
    slot = session.get(Slot, slot_ids[0])
    if slot.booked < slot.capacity:
        seat = {"allow": True, "reason": "the slot has a free seat"}
    else:  # the waitlist patient is not known yet: judged as one without history
        seat = context.plugins.allow_overbook(
            session, Candidate(slot.id, slot.start, slot.end, slot.provider_id, slot.resource_id, slot.location_id,
                               slot.slot_type, 0, slot_ids=(slot.id,)),
            None, appointment.appointment_type, "search")
    if not seat["allow"]:
        return _done(task, f"skipped: no overbooking seat ({seat.get('reason', '')})")
    now = context.clock.now()
    plan_task(session, plugin="waitlist_fill", kind="fill", due_at=now, now=now, appointment_id=appointment.id,
              payload={"slot_ids": [slot.id], "why": "likely_no_show", "overbook": True},
              dedupe_key=f"{NAME}:fill:{appointment.id}:{task.payload['start']}")
    _done(task, f"slot {slot.id} offered to the waitlist early ({seat.get('reason', '')})")


def run_tasks(context) -> str:
    escalated = sweep_tasks(context, plugin=NAME, kinds=("escalate",),
                            handle=lambda session, task, scheduler: _escalate(context, session, task, scheduler))
    filled = sweep_tasks(context, plugin=NAME, kinds=("early_fill",),
                         handle=lambda session, task, scheduler: _early_fill(context, session, task, scheduler))
    return f"{escalated} escalations, {filled} early waitlist fills"


# --- fitting -----------------------------------------------------------------------------------


def history(session: Session, context, since: datetime, until: datetime) -> Iterator[tuple[Visit, bool]]:
    """``(visit, showed)`` for every visit with an outcome between ``since`` and
    ``until``, its features as they stood at its start (earlier no-shows and
    late cancellations counted from up to ``history_days`` before ``since``)."""
    settings = _settings(context)
    zones = {location.id: location.timezone for location in session.scalars(select(Location))}
    default_zone = context.scheduler.settings.default_timezone
    rows = session.execute(
        select(Appointment.patient_id, Appointment.start, Appointment.created_at, Appointment.updated_at,
               Appointment.status, Appointment.appointment_type, Appointment.location_id)
        .where(Appointment.patient_id.is_not(None), Appointment.start < until,
               Appointment.start >= since - timedelta(days=settings.history_days),
               Appointment.status.in_((*SHOWED, "no_show", "cancelled")))
        .order_by(Appointment.patient_id, Appointment.start, Appointment.id)
        .execution_options(yield_per=5000))
    patient, no_shows, late_cancellations = None, 0, 0
    for patient_id, start, created_at, updated_at, status, appointment_type, location_id in rows:
        if patient_id != patient:
            patient, no_shows, late_cancellations = patient_id, 0, 0
        if start >= since and status != "cancelled":
            visit = visit_of(appointment_type, start, created_at, zones.get(location_id, default_zone),
                             (no_shows, late_cancellations))
            yield visit, status in SHOWED
        if status == "no_show":
            no_shows += 1
        elif status == "cancelled" and updated_at >= start - settings.late_cancel:
            late_cancellations += 1


def refit(context, *, force: bool = False) -> str:
    """Fit the model on the site's history, store it, refresh future estimates.
    Without ``force`` a fit less than 12 hours old stands (several daemons run
    this job)."""
    settings = _settings(context)
    now = context.clock.now()
    since = now - timedelta(days=settings.history_days)
    with context.session_factory() as session:
        last = session.scalar(select(ShowModel.fitted_at).order_by(ShowModel.id.desc()).limit(1))
        if last is not None and not force and now - last < timedelta(hours=12):
            return f"a fit from {last.isoformat()} stands"
        found = fit(history(session, context, since, now), prior=settings.prior, prior_weight=settings.prior_weight)
    if not found.sample_size:
        context.state.pop(f"{NAME}.model", None)
        return f"no visits with an outcome since {since.date().isoformat()}: the prior stands; " \
               f"{refresh(context)} estimates refreshed"
    with context.session_factory() as session, session.begin():
        row = ShowModel(fitted_at=now, history_from=since, history_to=now, sample_size=found.sample_size,
                        no_shows=found.no_shows, coefficients=found.coefficients,
                        standard_errors=found.standard_errors, prior=settings.prior,
                        prior_weight=settings.prior_weight, iterations=found.iterations,
                        converged=found.converged, log_loss=found.log_loss)
        session.add(row)
        session.flush()
        model_id = row.id
    context.state[f"{NAME}.model"] = (model_id, dict(found.coefficients), monotonic_time.monotonic())
    log.info("show model fitted", extra={"model_id": model_id, "sample_size": found.sample_size,
                                         "no_shows": found.no_shows, "iterations": found.iterations})
    return (f"model {model_id} fitted on {found.sample_size} visits ({found.no_shows} no-shows) in "
            f"{found.iterations} iterations; {refresh(context)} estimates refreshed")


def refresh(context, batch_size: int = 500) -> int:
    """Estimate every future held or booked appointment again (a new fit, history since booking)."""
    settings = _settings(context)
    now = context.clock.now()
    last_id, total = 0, 0
    while True:
        with context.session_factory() as session, session.begin():
            batch = list(session.scalars(select(Appointment).where(
                Appointment.id > last_id, Appointment.start > now, Appointment.patient_id.is_not(None),
                Appointment.status.in_(("held", *BOOKED))).order_by(Appointment.id).limit(batch_size)))
            if not batch:
                return total
            model_id, _coefficients = current_model(session, context)
            for appointment_id, found in estimate_appointments(session, context, batch).items():
                _store(session, appointment_id, found, model_id, now)
            for appointment in batch:
                if appointment.status in BOOKED and \
                        session.get(ShowEstimate, appointment.id).probability < settings.high_risk_below:
                    _plan_high_risk(session, appointment, settings, now)
            last_id = batch[-1].id
            total += len(batch)


@hookimpl
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("noshow.refit", refit, cron=dict(settings.refit_cron), misfire_grace_time=6 * 3600)
    register("noshow.tasks", run_tasks, seconds=settings.sweep_seconds)


# --- for staff (CLI, console) -------------------------------------------------------------------


def risk_rows(session: Session, appointment_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each appointment's estimate and overbooking decisions, for ``--json`` listings."""
    ids = list(appointment_ids)
    rows: dict[int, dict[str, Any]] = {i: {"show_probability": None, "reasons": [], "model_id": None,
                                           "estimated_at": None, "overbook": []} for i in ids}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for found in session.scalars(select(ShowEstimate).where(ShowEstimate.appointment_id.in_(chunk))):
            rows[found.appointment_id].update(
                show_probability=found.probability, reasons=found.reasons, model_id=found.model_id,
                estimated_at=found.estimated_at.isoformat())
        for decision in session.scalars(select(OverbookDecision).where(OverbookDecision.appointment_id.in_(chunk))
                                        .order_by(OverbookDecision.id)):
            rows[decision.appointment_id]["overbook"].append(
                {"decided_at": decision.decided_at.isoformat(), **decision.decision})
    return rows


def model_summary(session: Session, prior: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """The model in use: the latest fit, or the prior."""
    row = session.scalars(select(ShowModel).order_by(ShowModel.id.desc()).limit(1)).first()
    if row is None:
        return {"model_id": None, "fitted_at": None, "sample_size": 0, "coefficients": dict(prior or PRIOR),
                "standard_errors": {}, "source": "prior (no fit yet)"}
    return {"model_id": row.id, "fitted_at": row.fitted_at.isoformat(), "history_from": row.history_from.isoformat(),
            "history_to": row.history_to.isoformat(), "sample_size": row.sample_size, "no_shows": row.no_shows,
            "coefficients": row.coefficients, "standard_errors": row.standard_errors, "prior": row.prior,
            "prior_weight": row.prior_weight, "iterations": row.iterations, "converged": row.converged,
            "log_loss": row.log_loss, "source": "fitted"}
