"""Appointment confirmations, reminders and post-visit follow-ups, and the patient's replies.

Planning happens in ``slotengine_schedule_changed``, in the booking's own
transaction: a booking plans a confirmation and one reminder per offset
(default 72 h and 24 h before) as ``OutboxItem`` rows; a reschedule withdraws
the pending ones and plans again; a cancellation, no-show or expired hold
withdraws them; a completed visit plans a follow-up.  Due times are moved out
of the clinic's quiet hours (clinic-local).  The sweep ``reminders.send``
renders each message when it is sent (fresh data, the patient's language,
their preferred channel) and delivers it through the channel.
``plan_escalation`` adds one extra reminder, a call where it can, for a visit
likely to be missed (plugin ``noshow``).

Minimum necessary: no message carries the appointment's reason; SMS and voice
carry only the clinic's name, the date and time, and how to answer; e-mail
adds where to go, the instructions (``slotengine_patient_instructions``) and
the provider's name (not for confidential patients).

Replies (confirm, cancel, ask to reschedule) arrive through
``record_reply(context, token, answer)`` or ``POST /reminders/reply`` with
``{"token": ..., "answer": "confirm" | "cancel" | "reschedule"}`` (or the
SMS text ``C``/``X``/``R`` as ``"text"``).  The token is in every message
(``reply_token`` for webhook gateways, a link in e-mail) and is signed with
the reply secret; it names the appointment and expires at its start.

Settings::

    [plugins.reminders]
    offsets_hours = [72, 24]
    types = { procedure = [168, 72, 24] }   # per appointment type
    confirmation = true
    follow_up_hours = 24                    # after completion; 0: none
    quiet_start = "21:00"
    quiet_end = "08:00"
    min_lead_minutes = 120                  # no reminder later than this before the visit
    skip_reminders_within_hours = 12        # no reminder this soon after the confirmation
    channels = ["email", "sms", "voice"]    # fallback order after the patient's preference
    clinic_name = "Main Street Clinic"
    reply_url = "https://portal.clinic.example/appointments/reply"
    reply_secret_env = "SLOTENGINE_REPLY_SECRET"   # or reply_secret = "..."
    sweep_seconds = 30
    batch_size = 200
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from functools import cache, partial
from typing import Any, Optional
from urllib.parse import quote

from sqlalchemy import bindparam, false, or_, select, update
from sqlalchemy.orm import Session

from engine.db import Direct
from engine.errors import SchedulingError
from engine.jobs import dispatch_outbox
from engine.messaging import (
    address_for,
    choose_channel,
    describe_for_staff,
    follow_registrations,
    language_of,
    local_when,
    opt_outs,
    outside_quiet_hours,
)
from engine.models import Appointment, Location, OutboxItem, Patient, Provider
from engine.plugin import hookimpl
from engine.requests import Actor, Change
from engine.signing import BadToken, make_token, read_token, secret_from_settings

log = logging.getLogger("slotengine.plugins.reminders")

NAME = "reminders"
KINDS = ("confirmation", "reminder", "follow_up")
BOOKED = ("booked", "overbooked")
RELEASED = ("cancelled", "no_show", "discontinued", "deleted", "hold_expired")

TEMPLATES: dict[str, dict[str, dict[str, str]]] = {
    "en": {
        "confirmation": {
            "subject": "Your appointment on {when}",
            "short": "{clinic}: your appointment is booked for {when}. Reply C to confirm, X to cancel, R to reschedule.",
            "intro": "Your appointment is booked.",
        },
        "moved": {
            "subject": "Your appointment has moved to {when}",
            "short": "{clinic}: your appointment has moved to {when}. Reply C to confirm, X to cancel, R to reschedule.",
            "intro": "Your appointment has moved to a new time.",
        },
        "reminder": {
            "subject": "Reminder: your appointment on {when}",
            "short": "{clinic}: reminder of your appointment on {when}. Reply C to confirm, X to cancel, R to reschedule.",
            "intro": "This is a reminder of your appointment.",
        },
        "follow_up": {
            "subject": "Thank you for your visit",
            "short": "{clinic}: thank you for your visit. Questions? Call us or reply to this message.",
            "intro": "Thank you for your visit. If you have questions, call us.",
        },
        "labels": {"hello": "Hello", "when": "When", "where": "Where", "with": "With", "prepare": "Before you come",
                   "reply": "To confirm, cancel or ask to reschedule", "token": "Reply code"},
    },
    "es": {
        "confirmation": {
            "subject": "Su cita el {when}",
            "short": "{clinic}: su cita está reservada para el {when}. Responda C para confirmar, X para cancelar, R para cambiarla.",
            "intro": "Su cita está reservada.",
        },
        "moved": {
            "subject": "Su cita ha cambiado al {when}",
            "short": "{clinic}: su cita ha cambiado al {when}. Responda C para confirmar, X para cancelar, R para cambiarla.",
            "intro": "Su cita ha cambiado de hora.",
        },
        "reminder": {
            "subject": "Recordatorio: su cita el {when}",
            "short": "{clinic}: le recordamos su cita el {when}. Responda C para confirmar, X para cancelar, R para cambiarla.",
            "intro": "Le recordamos su cita.",
        },
        "follow_up": {
            "subject": "Gracias por su visita",
            "short": "{clinic}: gracias por su visita. ¿Preguntas? Llámenos o responda a este mensaje.",
            "intro": "Gracias por su visita. Si tiene preguntas, llámenos.",
        },
        "labels": {"hello": "Hola", "when": "Cuándo", "where": "Dónde", "with": "Con", "prepare": "Antes de venir",
                   "reply": "Para confirmar, cancelar o cambiar la cita", "token": "Código de respuesta"},
    },
}

ANSWERS = {
    "confirm": {"c", "confirm", "yes", "y", "1", "si", "sí", "confirmar"},
    "cancel": {"x", "cancel", "no", "n", "2", "cancelar"},
    "reschedule": {"r", "reschedule", "3", "cambiar", "change"},
}


def _time(value: Any, where: str) -> time:
    try:
        return value if isinstance(value, time) else time.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where}: expected a time like 21:00, got {value!r}") from None


def _offsets(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and x > 0 for x in value):
        raise ValueError(f"{where}: expected a list of positive hours, got {value!r}")
    return tuple(sorted((float(x) for x in value), reverse=True))


@dataclass
class Settings:
    offsets_hours: tuple[float, ...] = (72.0, 24.0)
    types: dict[str, tuple[float, ...]] = field(default_factory=dict)
    confirmation: bool = True
    follow_up_hours: float = 24.0
    quiet_start: time = time(21, 0)
    quiet_end: time = time(8, 0)
    min_lead: timedelta = timedelta(minutes=120)
    channels: tuple[str, ...] = ("email", "sms", "voice")
    clinic_name: str = "Your clinic"
    reply_url: str = ""
    reply_secret: str = ""
    sweep_seconds: float = 30.0
    batch_size: int = 200
    skip_after_confirmation: timedelta = timedelta(hours=12)
    templates: dict[str, dict[str, dict[str, str]]] = field(default_factory=lambda: TEMPLATES)

    def offsets_for(self, appointment_type: str) -> tuple[float, ...]:
        return self.types.get(appointment_type, self.offsets_hours)


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    known = {"offsets_hours", "types", "confirmation", "follow_up_hours", "quiet_start", "quiet_end",
             "min_lead_minutes", "channels", "clinic_name", "reply_url", "reply_secret", "reply_secret_env",
             "sweep_seconds", "batch_size", "templates", "skip_reminders_within_hours"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"[plugins.reminders]: unknown settings {', '.join(sorted(unknown))}")
    where = "[plugins.reminders]"
    templates = {lang: {kind: dict(fields) for kind, fields in kinds.items()} for lang, kinds in TEMPLATES.items()}
    for lang, kinds in (settings.get("templates") or {}).items():
        base = templates.setdefault(lang, {k: dict(v) for k, v in TEMPLATES["en"].items()})
        for kind, fields in kinds.items():
            base.setdefault(kind, {}).update(fields)
    context.state[NAME] = Settings(
        offsets_hours=_offsets(settings.get("offsets_hours", [72, 24]), f"{where}.offsets_hours"),
        types={k: _offsets(v, f"{where}.types.{k}") for k, v in (settings.get("types") or {}).items()},
        confirmation=bool(settings.get("confirmation", True)),
        follow_up_hours=float(settings.get("follow_up_hours", 24)),
        quiet_start=_time(settings.get("quiet_start", "21:00"), f"{where}.quiet_start"),
        quiet_end=_time(settings.get("quiet_end", "08:00"), f"{where}.quiet_end"),
        min_lead=timedelta(minutes=float(settings.get("min_lead_minutes", 120))),
        channels=tuple(settings.get("channels", ("email", "sms", "voice"))),
        clinic_name=str(settings.get("clinic_name", "Your clinic")),
        reply_url=str(settings.get("reply_url", "")),
        reply_secret=secret_from_settings(settings, "reply_secret", where, default_env="SLOTENGINE_REPLY_SECRET"),
        sweep_seconds=float(settings.get("sweep_seconds", 30)),
        batch_size=int(settings.get("batch_size", 200)),
        skip_after_confirmation=timedelta(hours=float(settings.get("skip_reminders_within_hours", 12))),
        templates=templates,
    )


# --- planning -------------------------------------------------------------------------------


def _zone_of(session: Session, location_id: Optional[int], default: str) -> str:
    location = session.get(Location, location_id) if location_id else None
    return location.timezone if location else default


def _outbox(channel: str, kind: str, due: datetime, appointment: Appointment, now: datetime,
            **payload: Any) -> OutboxItem:
    return OutboxItem(channel=channel, kind=kind, due_at=due, status="pending", appointment_id=appointment.id,
                      payload={"appointment_id": appointment.id, "start": appointment.start.isoformat(), **payload},
                      attempts=0, last_error="", created_at=now)


def plan_reminders(session: Session, appointment: Appointment, context, *, confirmation: Optional[str] = None,
                   declined: Optional[set[str]] = None) -> int:
    """Plan the reminders (and a ``confirmation`` or ``moved`` message) for a booked
    appointment in the caller's transaction; returns how many were planned.
    ``declined``: the patient's ``opt_outs`` when the caller knows them."""
    settings = _settings(context)
    if settings is None or appointment.patient_id is None:
        return 0
    patient = session.get(Patient, appointment.patient_id)
    if declined is None:
        declined = opt_outs(session, appointment.patient_id)
    if "reminder" in declined:
        log.debug("the patient declined reminders", extra={"appointment_id": appointment.id})
        return 0
    chosen = choose_channel(patient, [c for c in settings.channels if c in context.channels and c not in declined],
                            settings.channels)
    if chosen is None:
        log.debug("no channel reaches the patient; no reminders", extra={"appointment_id": appointment.id})
        return 0
    channel = chosen[0]
    tz = _zone_of(session, appointment.location_id, context.scheduler.settings.default_timezone)
    now = context.clock.now()
    latest = appointment.start - settings.min_lead
    items = []
    not_before = now
    if confirmation and settings.confirmation:
        due = outside_quiet_hours(now, tz, settings.quiet_start, settings.quiet_end, not_after=latest) or now
        items.append(_outbox(channel, "confirmation", due, appointment, now, template=confirmation))
        not_before = due + settings.skip_after_confirmation  # the confirmation is reminder enough
    for hours in settings.offsets_for(appointment.appointment_type):
        due = appointment.start - timedelta(hours=hours)
        if due < not_before:
            continue  # booked after (or just before) that reminder's time: the confirmation says it
        due = outside_quiet_hours(due, tz, settings.quiet_start, settings.quiet_end, not_after=latest, not_before=now)
        if due is None or due > latest:
            continue
        items.append(_outbox(channel, "reminder", due, appointment, now, offset_hours=hours))
    session.add_all(items)
    return len(items)


def plan_escalation(session: Session, appointment: Appointment, context, *, channel: str = "voice") -> Optional[str]:
    """One extra reminder for a visit likely to be missed (plugin ``noshow``), due
    now or at the end of quiet hours: through ``channel`` (``voice``: a call)
    when it is registered and the patient has an address for it, else their
    usual channel.  Returns the channel, or ``None`` when none reaches the
    patient or the visit is too close."""
    settings = _settings(context)
    if settings is None or appointment.patient_id is None:
        return None
    patient = session.get(Patient, appointment.patient_id)
    chosen = channel if channel in context.channels and address_for(patient, channel) else None
    if chosen is None:
        usual = choose_channel(patient, [c for c in settings.channels if c in context.channels], settings.channels)
        chosen = usual[0] if usual else None
    now = context.clock.now()
    latest = appointment.start - settings.min_lead
    tz = _zone_of(session, appointment.location_id, context.scheduler.settings.default_timezone)
    due = outside_quiet_hours(now, tz, settings.quiet_start, settings.quiet_end, not_after=latest)
    if chosen is None or due is None or due > latest:
        return None
    hours = round((appointment.start - due).total_seconds() / 3600, 1)
    session.add(_outbox(chosen, "reminder", due, appointment, now, offset_hours=hours, escalated=True))
    return chosen


_OUTBOX = OutboxItem.__table__


@cache
def _withdraw_statement(kinds: tuple[str, ...]) -> Any:
    """Straight on the driver, and ``kind = … OR …``: an ORM bulk UPDATE costs several times
    more, and an IN list's expanding parameter is rendered into the SQL again at every execution."""
    return Direct(update(_OUTBOX)
                  .where(_OUTBOX.c.appointment_id == bindparam("for_appointment"),
                         or_(false(), *(_OUTBOX.c.kind == kind for kind in kinds)), _OUTBOX.c.status == "pending")
                  .values(status="withdrawn"))


def withdraw(session: Session, appointment_id: int, kinds: tuple[str, ...] = ("confirmation", "reminder")) -> int:
    session.flush()  # what an ORM statement would autoflush: reminders added in this transaction
    return _withdraw_statement(tuple(kinds)).run(session.connection(), {"for_appointment": appointment_id})


def plan_follow_up(session: Session, appointment: Appointment, context) -> int:
    settings = _settings(context)
    if settings is None or not settings.follow_up_hours or appointment.patient_id is None:
        return 0
    patient = session.get(Patient, appointment.patient_id)
    declined = opt_outs(session, appointment.patient_id)
    if "reminder" in declined:
        return 0
    chosen = choose_channel(patient, [c for c in settings.channels if c in context.channels and c not in declined],
                            settings.channels)
    if chosen is None:
        return 0
    tz = _zone_of(session, appointment.location_id, context.scheduler.settings.default_timezone)
    now = context.clock.now()
    due = outside_quiet_hours(now + timedelta(hours=settings.follow_up_hours), tz, settings.quiet_start,
                              settings.quiet_end)
    session.add(_outbox(chosen[0], "follow_up", due, appointment, now))
    return 1


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    if _settings(context) is None:
        return
    without_flags = _registered_without_flags(session, change)
    if change.appointment_id is None:
        return
    kind = change.kind
    created = change.from_state == "requested"  # by this change: it has no messages to withdraw yet
    if not created and (kind in RELEASED or kind == "rescheduled" or (
            kind in ("booked", "reinstated", "no_show_reversed") and change.to_state in BOOKED)):
        withdraw(session, change.appointment_id)
    if change.to_state in BOOKED and kind in ("booked", "reinstated", "no_show_reversed", "rescheduled"):
        appointment = session.get(Appointment, change.appointment_id)
        template = {"booked": "confirmation", "reinstated": "confirmation", "rescheduled": "moved"}.get(kind)
        if change.detail.get("requester", {}).get("patient_told"):
            template = None  # whoever moved it told the patient already (an emergency move)
        plan_reminders(session, appointment, context, confirmation=template,
                       declined=set() if appointment.patient_id in without_flags else None)
    elif kind == "completed":
        plan_follow_up(session, session.get(Appointment, change.appointment_id), context)
    elif kind == "completion_reversed":
        withdraw(session, change.appointment_id, ("follow_up",))


def _registered_without_flags(session: Session, change: Change) -> set[int]:
    """The patients registered in this transaction whose flags it has not changed
    since: they have none, so they declined nothing."""
    registered = follow_registrations(session, NAME, change)
    if change.kind == "patient_flags_changed":
        registered.discard(change.detail["patient_id"])
    return registered


# --- sending ----------------------------------------------------------------------------------


def render(context, session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    """Messages for a batch of outbox items, read fresh; ``{"skip": why}`` for stale ones."""
    settings = _settings(context)
    now = context.clock.now()
    appointment_ids = {item.appointment_id for item in items if item.appointment_id}
    appointments = {a.id: a for a in session.scalars(select(Appointment).where(Appointment.id.in_(appointment_ids)))}
    patients = {p.id: p for p in session.scalars(select(Patient).where(
        Patient.id.in_({a.patient_id for a in appointments.values() if a.patient_id})))}
    providers = {p.id: p for p in session.scalars(select(Provider).where(
        Provider.id.in_({a.provider_id for a in appointments.values() if a.provider_id})))}
    locations = context.state.setdefault(f"{NAME}.locations", {})
    missing = {a.location_id for a in appointments.values() if a.location_id and a.location_id not in locations}
    if missing:
        for location in session.scalars(select(Location).where(Location.id.in_(missing))):
            locations[location.id] = (location.code, location.name, location.address or "", location.timezone)
    # after downtime several reminders of one visit may be due at once: send the latest-planned only
    keep: dict[int, OutboxItem] = {}
    for item in items:
        if item.kind == "reminder":
            best = keep.get(item.appointment_id)
            if best is None or item.payload.get("offset_hours", 0) < best.payload.get("offset_hours", 0):
                keep[item.appointment_id] = item
    default_tz = context.scheduler.settings.default_timezone
    messages: dict[int, dict[str, Any]] = {}
    for item in items:
        appointment = appointments.get(item.appointment_id)
        if appointment is None:
            messages[item.id] = {"skip": "appointment not found"}
            continue
        why = _stale(item, appointment, now, settings, keep)
        if why:
            messages[item.id] = {"skip": why}
            continue
        patient = patients.get(appointment.patient_id)
        address = address_for(patient, item.channel) if patient else ""
        if not address:
            messages[item.id] = {"skip": f"the patient has no address for {item.channel}"}
            continue
        location = locations.get(appointment.location_id)
        messages[item.id] = _message(context, session, settings, item, appointment, patient, address, location,
                                     providers.get(appointment.provider_id), default_tz)
    return messages


def _stale(item: OutboxItem, appointment: Appointment, now: datetime, settings: Settings,
           keep: dict[int, OutboxItem]) -> str:
    if item.kind == "follow_up":
        return "" if appointment.status == "completed" else f"the appointment is {appointment.status}"
    if appointment.status not in BOOKED:
        return f"the appointment is {appointment.status}"
    if item.payload.get("start") != appointment.start.isoformat():
        return "the appointment moved"
    if item.kind == "reminder":
        if appointment.start - now < settings.min_lead:
            return "too close to the visit"
        if keep.get(appointment.id) is not item:
            return "superseded by a later reminder"
    return ""


def _message(context, session: Session, settings: Settings, item: OutboxItem, appointment: Appointment, patient: Patient,
             address: str, location, provider, default_tz: str) -> dict[str, Any]:
    language = language_of(patient, settings.templates)
    texts = settings.templates[language]
    template = item.payload.get("template", item.kind) if item.kind == "confirmation" else item.kind
    words = texts[template]
    labels = texts["labels"]
    code, name, place, tz = location or ("", "", "", default_tz)
    when = local_when(appointment.start, tz, language)
    fields = {"clinic": settings.clinic_name, "when": when}
    token = make_token(settings.reply_secret, {"a": appointment.id, "o": item.id},
                       expires=max(appointment.start, context.clock.now() + timedelta(days=7)))
    message = {"id": f"outbox-{item.id}", "to": address, "kind": item.kind, "language": language,
               "subject": words["subject"].format(**fields), "reply_token": token}
    if item.channel != "email":
        message["text"] = words["short"].format(**fields)
        return message
    lines = [f"{labels['hello']} {patient.given_name},".replace(" ,", ","), "", words["intro"], ""]
    if item.kind != "follow_up":
        lines.append(f"{labels['when']}: {when}")
        if name:
            lines.append(f"{labels['where']}: {name}" + (f", {place}" if place else ""))
        if provider is not None and not patient.confidential:
            lines.append(f"{labels['with']}: {provider.display_name}")
        instructions = context.plugins.patient_instructions(appointment, code, language, session)
        if instructions:
            lines += ["", f"{labels['prepare']}:"] + [f"- {line}" for line in instructions]
        lines.append("")
        if settings.reply_url:
            lines.append(f"{labels['reply']}: {settings.reply_url}?token={quote(token)}")
        else:
            lines.append(f"{labels['token']}: {token}")
    lines += ["", settings.clinic_name]
    message["text"] = "\n".join(lines)
    return message


def send_due(context) -> str:
    settings = _settings(context)
    sent = dispatch_outbox(context, kinds=KINDS, render=partial(render, context), batch_size=settings.batch_size)
    return f"{sent} messages sent"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("reminders.send", send_due, seconds=settings.sweep_seconds)


# --- replies -------------------------------------------------------------------------------------


class ReplyError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def normalise_answer(answer: Any) -> Optional[str]:
    word = str(answer or "").strip().lower().rstrip(".!")
    for meaning, words in ANSWERS.items():
        if word in words:
            return meaning
    return None


def record_reply(context, token: str, answer: str) -> dict[str, Any]:
    """Apply a patient's reply to a reminder: ``confirm`` (records the
    confirmation), ``cancel`` (cancels the appointment, which withdraws its
    reminders and frees the slot) or ``reschedule`` (the front desk is asked
    to call the patient).  Raises ``ReplyError`` (403 bad token, 400 unknown
    answer) or a ``SchedulingError`` (e.g. already cancelled)."""
    settings = _settings(context)
    if settings is None:
        raise ReplyError(503, "reminders are not configured")
    try:
        claims = read_token(settings.reply_secret, token or "", now=context.clock.now())
    except BadToken as exc:
        raise ReplyError(403, str(exc)) from None
    if "a" not in claims:
        raise ReplyError(403, "not a reminder token")
    meaning = normalise_answer(answer)
    if meaning is None:
        raise ReplyError(400, f"unknown answer {answer!r}; expected confirm, cancel or reschedule")
    appointment_id = int(claims["a"])
    scheduler = context.scheduler
    appointment = scheduler.appointment(appointment_id)
    actor = Actor("patient", str(appointment.patient_id), f"reminder reply (outbox {claims.get('o')})")
    if meaning == "confirm":
        appointment = scheduler.confirm_attendance(appointment_id, actor, "confirmed by reminder reply")
    elif meaning == "cancel":
        appointment = scheduler.cancel(appointment_id, actor, "cancelled by the patient (reminder reply)")
    else:
        with context.session_factory() as session, session.begin():
            context.plugins.staff_notice(session, {
                "team": "front_desk", "subject": f"Patient asks to reschedule appointment {appointment_id}",
                "text": f"The patient asked (reminder reply) to reschedule {describe_for_staff(session, appointment)}. "
                        "Please call them.",
                "appointment_id": appointment_id, "patient_id": appointment.patient_id,
            })
    return {"appointment_id": appointment_id, "answer": meaning, "status": appointment.status}


def _reply_handler(context):
    def handle(body: bytes, headers: dict[str, str], query: dict[str, str]) -> tuple[int, dict]:
        try:
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return 400, {"error": "the body must be a JSON object"}
        token = data.get("token") or query.get("token", "")
        answer = data.get("answer") or data.get("text") or query.get("answer", "")
        try:
            return 200, record_reply(context, token, answer)
        except ReplyError as exc:
            return exc.status, {"error": str(exc)}
        except SchedulingError as exc:
            return 409, {"error": str(exc), "code": exc.code}
    return handle


@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    if _settings(context) is not None:
        register("POST", "/reminders/reply", _reply_handler(context))
