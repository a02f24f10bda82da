"""Fill freed slots from the waitlist.

When a slot frees — a cancellation, no-show, discontinued or deleted visit,
an expired hold, blocked time opened again, a reschedule that left its old
slot, or an emergency hold released for routine use — this plugin plans a
``fill`` task in the same transaction (``slotengine_schedule_changed``) if
anyone is waiting (a slot freed while the waitlist is empty is not offered
later to patients who join it: they are booked into free slots directly), and
right after commit (``slotengine_after_change``) or at the next sweep ranks
the waiting patients who fit the slot: urgency first (same-day urgent needs
before anything), then days waiting and fit (type, duration, provider,
location, the patient's preferred days, hours and provider gender, plus any
``slotengine_score_waitlist_entry`` scores).  It offers the slot to a few at
a time (``WaitlistOffer`` rows with an expiry, messages through the patient's
channel); the first to accept gets it — booked, or their current later
appointment moved into it (``WaitlistEntry.current_appointment_id``), which
frees *that* slot and the fill cascades.  Offers that expire or are declined
pass the slot on to the next patients.

Accept or decline with ``accept_offer(context, offer_id)`` /
``decline_offer(context, offer_id)``, a signed token (``reply_to_offer``), or
``POST /waitlist/reply`` ``{"token": ..., "answer": "yes" | "no"}``.

Settings::

    [plugins.waitlist_fill]
    offer_batch = 3               # patients offered one slot at once
    offer_minutes = 60            # how long an offer stands
    same_day_offer_minutes = 15   # ... for a slot later today
    min_notice_minutes = 30       # slots starting sooner are not offered
    horizon_days = 60             # nor slots further out
    quiet_start = "21:00"         # no offers during the clinic's quiet hours
    quiet_end = "08:00"
    channels = ["sms", "email", "voice"]
    clinic_name = "Main Street Clinic"
    reply_url = ""
    reply_secret_env = "SLOTENGINE_REPLY_SECRET"
    sweep_seconds = 30
    fill_on_change = true         # offer right after the change, not only at the sweep
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import partial
from typing import Any, Optional
from urllib.parse import quote

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from engine.calendar import zone
from engine.db import Direct
from engine.errors import NotFound, SchedulingError
from engine.jobs import claim_due, dispatch_outbox, plan_task, sweep_tasks
from engine.messaging import address_for, choose_channel, in_quiet_hours, language_of, local_when, opt_outs
from engine.models import (
    Appointment,
    Location,
    OutboxItem,
    Patient,
    PluginTask,
    Provider,
    Slot,
    WaitlistEntry,
    WaitlistOffer,
)
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Change
from engine.service import slot_accepts
from engine.signing import BadToken, make_token, read_token, reply_route, secret_from_settings
from engine.states import OCCUPYING

log = logging.getLogger("slotengine.plugins.waitlist_fill")

NAME = "waitlist_fill"
#: The changes that planned a ``fill`` task (by id; weakly held): only their after-change sweeps run.
#: Per change, not one flag: after-change hooks run in a thread of their own, and a flag cleared
#: for one change could hide the task the next transaction has just planned.
PLANNED = f"{NAME}.planned"
#: Changes that free slots (their ``slot_ids``).
FREEING = ("cancelled", "no_show", "discontinued", "deleted", "hold_expired", "slots_opened", "rescheduled")
BOOKED = ("booked", "overbooked")

TEXTS = {
    "en": {"subject": "An earlier appointment is available",
           "short": "{clinic}: an earlier appointment is free on {when}. Reply Y to take it or N to pass. "
                    "The offer ends at {until}.",
           "reply": "To take it or pass"},
    "es": {"subject": "Hay una cita antes disponible",
           "short": "{clinic}: hay una cita libre el {when}. Responda S para tomarla o N para dejarla. "
                    "La oferta termina a las {until}.",
           "reply": "Para tomarla o dejarla"},
}
YES = {"y", "yes", "s", "si", "sí", "accept", "1", "ok"}
NO = {"n", "no", "decline", "2", "pass"}


@dataclass(frozen=True)
class Settings:
    offer_batch: int = 3
    offer_minutes: float = 60
    same_day_offer_minutes: float = 15
    min_notice_minutes: float = 30
    horizon_days: float = 60
    quiet_start: time = time(21, 0)
    quiet_end: time = time(8, 0)
    channels: tuple[str, ...] = ("sms", "email", "voice")
    clinic_name: str = "Your clinic"
    reply_url: str = ""
    reply_secret: str = ""
    sweep_seconds: float = 30
    fill_on_change: bool = True


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    fields = set(Settings.__dataclass_fields__) - {"reply_secret"} | {"reply_secret", "reply_secret_env"}
    unknown = set(settings) - fields
    if unknown:
        raise ValueError(f"[plugins.waitlist_fill]: unknown settings {', '.join(sorted(unknown))}")
    values = {k: v for k, v in settings.items() if k not in ("reply_secret", "reply_secret_env")}
    for key in ("quiet_start", "quiet_end"):
        if key in values:
            values[key] = time.fromisoformat(str(values[key]))
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    parsed = Settings(**values, reply_secret=secret_from_settings(settings, "reply_secret", "[plugins.waitlist_fill]",
                                                                  default_env="SLOTENGINE_REPLY_SECRET"))
    if parsed.offer_batch < 1:
        raise ValueError("[plugins.waitlist_fill].offer_batch: at least 1")
    context.state[NAME] = parsed
    context.state[PLANNED] = weakref.WeakValueDictionary()


# --- noticing freed slots ------------------------------------------------------------------


_ANYONE_WAITING = Direct(select(WaitlistEntry.__table__.c.id).where(WaitlistEntry.__table__.c.status == "waiting")
                        .limit(1))


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    if _settings(context) is None:
        return
    now = context.clock.now()
    if change.kind in FREEING and change.slot_ids:
        if not _ANYONE_WAITING.fetch(session):
            return  # nobody to offer it to: no task, and no sweep after the commit
        plan_task(session, plugin=NAME, kind="fill", due_at=now, now=now, appointment_id=change.appointment_id,
                  payload={"slot_ids": list(change.slot_ids), "why": change.kind})
        context.state[PLANNED][id(change)] = change  # a rolled-back change is never announced: it goes with it
    elif change.kind in ("change_confirmed", "change_refused", "change_expired") and \
            change.detail.get("requester", {}).get("waitlist_offer_id"):
        _owner_answered(context, session, change, now)
    elif change.kind.startswith("waitlist_") and change.kind != "waitlist_booked" and change.detail.get("waitlist_id"):
        session.execute(update(WaitlistOffer).where(WaitlistOffer.waitlist_id == change.detail["waitlist_id"],
                                                    WaitlistOffer.status == "offered")
                        .values(status="withdrawn", responded_at=now).execution_options(synchronize_session=False))


def _owner_answered(context, session: Session, change: Change, now: datetime) -> None:
    """The EHR settled what an accepted offer asked of it: confirmed, the patient
    leaves the waitlist; otherwise the offer is ``refused`` and the slot offered again."""
    offer = session.get(WaitlistOffer, change.detail["requester"]["waitlist_offer_id"], with_for_update=True)
    if offer is None or offer.status != "requested":
        return
    offer.responded_at = now
    if change.kind == "change_confirmed":
        offer.status = "accepted"
        entry = session.get(WaitlistEntry, offer.waitlist_id)
        if entry is not None and entry.status == "waiting":
            context.scheduler.within(session).remove_from_waitlist(
                entry.id, change.actor, f"booked from waitlist offer {offer.id}, confirmed by {change.detail['owner']}",
                status="booked")
        return
    offer.status = "refused"
    if change.detail["request"] == "reschedule":  # a refused booking frees its hold, which refills by itself
        _refill(session, offer.slot_id, now, "owner_refused")


@hookimpl(trylast=True)
def slotengine_after_change(change: Change, context) -> None:
    settings = _settings(context)
    if settings is not None and settings.fill_on_change and change.kind in FREEING and change.slot_ids:
        if context.state[PLANNED].pop(id(change), None) is change:
            fill_pending(context)


def fill_pending(context) -> str:
    """Offer every slot waiting in a ``fill`` task (the sweep ``waitlist_fill.fill``)."""
    done = sweep_tasks(context, plugin=NAME, kinds=("fill",), handle=partial(_fill, context))
    return f"{done} fill tasks done"


def _fill(context, session: Session, task: PluginTask, scheduler) -> Optional[datetime]:
    settings = _settings(context)
    now = context.clock.now()
    for slot_id in task.payload.get("slot_ids", []):
        slot = session.get(Slot, slot_id, with_for_update=True)
        if slot is None:
            continue
        tz = _zone(session, slot.location_id, context)
        if in_quiet_hours(now, tz, settings.quiet_start, settings.quiet_end):
            local = now.astimezone(zone(tz))
            day = local.date() if local.time() < settings.quiet_end else local.date() + timedelta(days=1)
            return datetime.combine(day, settings.quiet_end, tzinfo=zone(tz)).astimezone(now.tzinfo)
        offer_slot(context, session, slot, now, overbook=bool(task.payload.get("overbook")))
    return None


def _zone(session: Session, location_id: Optional[int], context) -> str:
    location = session.get(Location, location_id) if location_id else None
    return location.timezone if location else context.scheduler.settings.default_timezone


# --- ranking and offering ----------------------------------------------------------------------


def rank(context, session: Session, slot: Slot, now: datetime,
         exclude: frozenset[int] = frozenset()) -> list[tuple[WaitlistEntry, float]]:
    """Waiting entries that fit ``slot``, best first, with their scores."""
    engine_settings = context.scheduler.settings
    provider = session.get(Provider, slot.provider_id) if slot.provider_id else None
    tz = _zone(session, slot.location_id, context)
    slot_local = slot.start.astimezone(zone(tz))
    same_day = slot_local.date() == now.astimezone(zone(tz)).date()
    slot_minutes = (slot.end - slot.start).total_seconds() / 60
    entries = [e for e in session.scalars(select(WaitlistEntry).where(WaitlistEntry.status == "waiting")
                                          .order_by(WaitlistEntry.created_at, WaitlistEntry.id))
               if e.id not in exclude]
    patients = {p.id: p for p in session.scalars(select(Patient).where(
        Patient.id.in_({e.patient_id for e in entries})))}
    ranked = []
    for entry in entries:
        if slot_accepts(slot, entry.appointment_type, entry.urgency, now, engine_settings):
            continue
        if entry.duration_minutes > slot_minutes:
            continue
        if entry.provider_id and entry.provider_id != slot.provider_id:
            continue
        if entry.specialty and (provider is None or entry.specialty not in (provider.specialties or [])):
            continue
        if entry.location_id and entry.location_id != slot.location_id:
            continue
        if (entry.earliest and slot.start < entry.earliest) or (entry.latest and slot.end > entry.latest):
            continue
        current = session.get(Appointment, entry.current_appointment_id) if entry.current_appointment_id else None
        if current is not None and current.status in BOOKED and current.start <= slot.start:
            continue  # not earlier than what they have
        if _busy(session, entry.patient_id, slot, current.id if current is not None else None):
            continue
        patient = patients.get(entry.patient_id)
        score = 0.0
        if entry.urgency == "urgent":
            score += 2000 if same_day else 1000
        score += min(max((now - entry.created_at).days, 0), 365)
        score += 10 if entry.appointment_type == slot.slot_type else 0
        score += 5 if entry.duration_minutes == slot_minutes else 0
        score += 20 if entry.provider_id and entry.provider_id == slot.provider_id else 0
        if patient is not None:
            if patient.preferred_weekdays and slot_local.weekday() in patient.preferred_weekdays:
                score += 5
            if patient.preferred_earliest and patient.preferred_latest and \
                    patient.preferred_earliest <= slot_local.time() < patient.preferred_latest:
                score += 5
            if patient.preferred_provider_gender and provider is not None and \
                    provider.gender == patient.preferred_provider_gender:
                score += 3
        score += context.plugins.score_waitlist_entry(entry, slot)
        ranked.append((entry, score))
    ranked.sort(key=lambda pair: (-pair[1], pair[0].created_at, pair[0].id))
    return ranked


def _busy(session: Session, patient_id: int, slot: Slot, ignore: Optional[int]) -> bool:
    clauses = [Appointment.patient_id == patient_id, Appointment.status.in_([s.value for s in OCCUPYING]),
               Appointment.start < slot.end, Appointment.end > slot.start]
    if ignore is not None:
        clauses.append(Appointment.id != ignore)
    return session.scalar(select(Appointment.id).where(*clauses).limit(1)) is not None


def offer_slot(context, session: Session, slot: Slot, now: datetime, *, overbook: bool = False) -> list[WaitlistOffer]:
    """Offer a free slot to the next best patients, up to ``offer_batch`` open offers.
    ``overbook``: the slot may be full (plugin ``noshow`` offers a likely no-show's
    slot early); accepting then asks for a seat above capacity."""
    settings = _settings(context)
    if not (slot.is_free or (overbook and not slot.blocked)) \
            or slot.start < now + timedelta(minutes=settings.min_notice_minutes) \
            or slot.start > now + timedelta(days=settings.horizon_days):
        return []
    if not _ANYONE_WAITING.fetch(session):
        return []  # nobody to offer it to (an empty waitlist is common): no offers, no ranking to read
    offers = list(session.scalars(select(WaitlistOffer).where(WaitlistOffer.slot_id == slot.id)))
    open_now = [o for o in offers if o.status == "offered" and o.expires_at > now]
    room = settings.offer_batch - len(open_now)
    if room <= 0:
        return []
    holding = set(session.scalars(select(WaitlistOffer.waitlist_id).where(
        ((WaitlistOffer.status == "offered") & (WaitlistOffer.expires_at > now)) | (WaitlistOffer.status == "requested"))))
    exclude = frozenset({o.waitlist_id for o in offers} | holding)
    tz = _zone(session, slot.location_id, context)
    same_day = slot.start.astimezone(zone(tz)).date() == now.astimezone(zone(tz)).date()
    minutes = settings.same_day_offer_minutes if same_day else settings.offer_minutes
    expires = min(now + timedelta(minutes=minutes), slot.start - timedelta(minutes=settings.min_notice_minutes))
    if expires <= now:
        return []
    made = []
    available = [c for c in settings.channels if c in context.channels]
    for entry, score in rank(context, session, slot, now, exclude)[:room]:
        offer = WaitlistOffer(waitlist_id=entry.id, patient_id=entry.patient_id, slot_id=slot.id, start=slot.start,
                              end=slot.start + timedelta(minutes=entry.duration_minutes), provider_id=slot.provider_id,
                              status="offered", score=score, offered_at=now, expires_at=expires)
        session.add(offer)
        session.flush()
        declined = opt_outs(session, entry.patient_id)  # they asked for the offers; a channel may still be declined
        chosen = choose_channel(session.get(Patient, entry.patient_id), [c for c in available if c not in declined],
                                settings.channels)
        if chosen is not None:
            session.add(OutboxItem(channel=chosen[0], kind="waitlist_offer", due_at=now, status="pending",
                                   payload={"offer_id": offer.id}, attempts=0, last_error="", created_at=now))
        else:
            context.plugins.staff_notice(session, {
                "team": "front_desk", "subject": f"Call a patient about waitlist offer {offer.id}",
                "text": f"Patient {entry.patient_id} can take a slot at {slot.start.isoformat()} (UTC) until "
                        f"{expires.isoformat()}; no message channel reaches them.",
                "patient_id": entry.patient_id})
        made.append(offer)
        log.info("waitlist offer made", extra={"offer_id": offer.id, "slot_id": slot.id, "waitlist_id": entry.id})
    return made


# --- answers -----------------------------------------------------------------------------------


def accept_offer(context, offer_id: int, actor: Optional[Actor] = None) -> dict[str, Any]:
    """The first acceptance books the slot (or moves the patient's current, later
    appointment into it, freeing that one for the next fill); later ones find it taken."""
    now = context.clock.now()
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            offer = session.get(WaitlistOffer, offer_id, with_for_update=True)
            if offer is None:
                raise NotFound("waitlist offer", offer_id)
            result: dict[str, Any] = {"offer_id": offer.id, "slot_id": offer.slot_id}
            if offer.status != "offered":
                return {**result, "result": offer.status}
            if offer.expires_at <= now:
                offer.status = "expired"
                _refill(session, offer.slot_id, now, "offer_expired")
                return {**result, "result": "expired"}
            entry = session.get(WaitlistEntry, offer.waitlist_id, with_for_update=True)
            if entry.status != "waiting":
                offer.status, offer.responded_at = "withdrawn", now
                return {**result, "result": "withdrawn"}
            actor = actor or Actor("patient", str(entry.patient_id), f"waitlist offer {offer.id}")
            current = session.get(Appointment, entry.current_appointment_id) if entry.current_appointment_id else None
            # where the EHR owns the calendar these ask it (an SRM) and the booking counts once its SIU confirms
            asked = {"waitlist_offer_id": offer.id}
            # overbook: a full slot (offered early for a likely no-show) takes one more only if a plugin allows it
            try:
                if current is not None and current.status in BOOKED:
                    outcome = view.request_reschedule(
                        current.id, BookingRequest(patient_id=entry.patient_id, appointment_type="",
                                                   slot_id=offer.slot_id, duration_minutes=entry.duration_minutes,
                                                   overbook=True),
                        actor, f"earlier time from waitlist offer {offer.id}", detail=asked)
                else:
                    outcome = view.request_booking(BookingRequest(
                        patient_id=entry.patient_id, appointment_type=entry.appointment_type, slot_id=offer.slot_id,
                        duration_minutes=entry.duration_minutes, urgency=entry.urgency, reason=entry.reason,
                        overbook=True), actor, detail=asked)
            except SchedulingError as exc:
                offer.status, offer.responded_at = "taken", now
                return {**result, "result": "taken", "reason": str(exc)}
            offer.status = "accepted" if outcome.applied else "requested"
            offer.responded_at, offer.appointment_id = now, outcome.appointment_id
            session.execute(update(WaitlistOffer).where(WaitlistOffer.slot_id == offer.slot_id,
                                                        WaitlistOffer.status == "offered", WaitlistOffer.id != offer.id)
                            .values(status="taken", responded_at=now).execution_options(synchronize_session=False))
            session.execute(update(WaitlistOffer).where(WaitlistOffer.waitlist_id == entry.id,
                                                        WaitlistOffer.status == "offered", WaitlistOffer.id != offer.id)
                            .values(status="withdrawn", responded_at=now).execution_options(synchronize_session=False))
            moved_from = current.id if current is not None and current.id == outcome.appointment_id else None
            if not outcome.applied:
                result.update(result="requested", appointment_id=outcome.appointment_id, owner=outcome.owner,
                              request_id=outcome.request_id, moved_from=moved_from)
            else:
                view.remove_from_waitlist(entry.id, actor, f"booked from waitlist offer {offer.id}", status="booked")
                result.update(result="accepted", appointment_id=outcome.appointment_id,
                              status=outcome.appointment_status, moved_from=moved_from)
        # a request too: its after-change hooks wake the dispatcher that sends it to the owner
        view.notify_committed()
    return result


def decline_offer(context, offer_id: int) -> dict[str, Any]:
    now = context.clock.now()
    with context.session_factory() as session:
        with session.begin():
            offer = session.get(WaitlistOffer, offer_id, with_for_update=True)
            if offer is None:
                raise NotFound("waitlist offer", offer_id)
            if offer.status != "offered":
                return {"offer_id": offer.id, "result": offer.status}
            offer.status, offer.responded_at = "declined", now
            _refill(session, offer.slot_id, now, "offer_declined")
    fill_pending(context)
    return {"offer_id": offer_id, "result": "declined"}


def _refill(session: Session, slot_id: int, now: datetime, why: str) -> None:
    plan_task(session, plugin=NAME, kind="fill", due_at=now, now=now, payload={"slot_ids": [slot_id], "why": why})


def reply_to_offer(context, token: str, answer: str) -> dict[str, Any]:
    settings = _settings(context)
    claims = read_token(settings.reply_secret, token or "", now=context.clock.now())
    if "w" not in claims:
        raise BadToken("not a waitlist offer token")
    word = str(answer or "").strip().lower().rstrip(".!")
    if word in YES:
        return accept_offer(context, int(claims["w"]))
    if word in NO:
        return decline_offer(context, int(claims["w"]))
    raise ValueError(f"unknown answer {answer!r}; expected yes or no")




# --- sweeps ---------------------------------------------------------------------------------------


def expire_offers(context) -> str:
    now = context.clock.now()
    with context.session_factory() as session, session.begin():
        offers = claim_due(session, WaitlistOffer, WaitlistOffer.expires_at, 200, now,
                           WaitlistOffer.status == "offered")
        for offer in offers:
            offer.status = "expired"
        for slot_id in sorted({offer.slot_id for offer in offers}):
            _refill(session, slot_id, now, "offer_expired")
    if offers:
        fill_pending(context)
    return f"{len(offers)} offers expired"


def release_emergency_holds(context) -> str:
    """Emergency slots whose hold is released (``EngineSettings.emergency_release``
    before they start) and still free are offered to the waitlist, once each."""
    settings = _settings(context)
    now = context.clock.now()
    release = context.scheduler.settings.emergency_release
    planned = 0
    with context.session_factory() as session, session.begin():
        slots = session.scalars(select(Slot.id).where(
            Slot.slot_type == "emergency", Slot.blocked.is_(False), Slot.booked < Slot.capacity,
            Slot.start > now + timedelta(minutes=settings.min_notice_minutes), Slot.start <= now + release))
        for slot_id in slots:
            planned += plan_task(session, plugin=NAME, kind="fill", due_at=now, now=now,
                                 payload={"slot_ids": [slot_id], "why": "emergency_released"},
                                 dedupe_key=f"{NAME}:release:{slot_id}")
    if planned:
        fill_pending(context)
    return f"{planned} emergency slots released to the waitlist"


def _render(context, session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    settings = _settings(context)
    now = context.clock.now()
    messages = {}
    for item in items:
        offer = session.get(WaitlistOffer, item.payload.get("offer_id"))
        if offer is None or offer.status != "offered" or offer.expires_at <= now:
            messages[item.id] = {"skip": "the offer is no longer open"}
            continue
        patient = session.get(Patient, offer.patient_id)
        address = address_for(patient, item.channel)
        if not address:
            messages[item.id] = {"skip": f"the patient has no address for {item.channel}"}
            continue
        language = language_of(patient, TEXTS)
        tz = _zone(session, session.get(Slot, offer.slot_id).location_id, context)
        token = make_token(settings.reply_secret, {"w": offer.id}, expires=offer.expires_at)
        words = TEXTS[language]
        text = words["short"].format(clinic=settings.clinic_name, when=local_when(offer.start, tz, language),
                                     until=f"{offer.expires_at.astimezone(zone(tz)):%H:%M}")
        if item.channel == "email":
            link = f"{settings.reply_url}?token={quote(token)}" if settings.reply_url else token
            text += f"\n\n{words['reply']}: {link}\n"
        messages[item.id] = {"id": f"outbox-{item.id}", "to": address, "subject": words["subject"], "text": text,
                             "kind": item.kind, "language": language, "reply_token": token}
    return messages


def send_offers(context) -> str:
    return f"{dispatch_outbox(context, kinds=('waitlist_offer',), render=partial(_render, context))} offers sent"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("waitlist_fill.fill", fill_pending, seconds=settings.sweep_seconds)
    register("waitlist_fill.send_offers", send_offers, seconds=settings.sweep_seconds)
    register("waitlist_fill.expire_offers", expire_offers, seconds=max(settings.sweep_seconds, 60))
    register("waitlist_fill.release_emergency_holds", release_emergency_holds, seconds=300)


@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    if _settings(context) is not None:
        register("POST", "/waitlist/reply", reply_route(partial(reply_to_offer, context)))
