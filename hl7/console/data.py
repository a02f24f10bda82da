"""What the console's pages show, read from the database and the running daemon.

Plain dicts and dataclasses, no ORM objects, so templates never touch a session.
Patient data passes through a ``Privacy`` on its way out: for a role without
patient data every name, identifier, birth date and free text about a person
becomes a pseudonym (the same keyed HMAC the logs use, so one patient reads
the same in both).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Optional

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from engine.calendar import to_local, zone
from engine.models import (
    Appointment,
    AppointmentResource,
    AppointmentSlot,
    AuditEntry,
    InboundMessage,
    Location,
    OutboxItem,
    Patient,
    PatientIdentifier,
    Provider,
    Resource,
    Slot,
    TimeBlock,
    WaitlistEntry,
    WaitlistOffer,
)
from hl7.config import Config, FeedConfig
from hl7.logs import PATIENT_DATA_KEYS, pseudonym, scrub_text
from hl7.message import HL7ParseError, parse
from hl7.outbound import CHANNEL_PREFIX, channel_for
from hl7.store import PARKED, RECEIVED, STATUSES

REMINDER_KINDS = ("confirmation", "reminder", "follow_up")
# Besides patient data proper, why a person has a visit is not for every role.
HIDDEN_KEYS = PATIENT_DATA_KEYS | {"reason", "notes", "other_needs", "review_reason"}
# Audit reasons of these entities are operators' words, not a patient's visit.
OPERATIONAL_ENTITIES = ("inbound_message", "console_session", "outbox")
PLACER_SCAN_LIMIT = 5000  # newest stored messages searched for a placer/filler id no appointment knows
PAGE_SIZE = 100


class Privacy:
    """Shows patient data, or pseudonyms of it, depending on the viewer's role."""

    def __init__(self, patient_data: bool, key: bytes):
        self.patient_data = patient_data
        self.key = key

    def value(self, text: Any) -> str:
        if text is None or text == "":
            return ""
        return str(text) if self.patient_data else pseudonym(str(text), self.key)

    def free_text(self, text: str) -> str:
        """Error texts and reasons may quote a segment or a phone number."""
        return text if self.patient_data else scrub_text(text or "")

    def mapping(self, data: Any, depth: int = 0) -> Any:
        """Audit before/after: values under patient-data keys become pseudonyms."""
        if self.patient_data or data is None:
            return data
        if isinstance(data, dict) and depth < 8:
            return {k: (self.value(v) if str(k).lower() in HIDDEN_KEYS and not isinstance(v, (dict, list))
                        else self.mapping(v, depth + 1)) for k, v in data.items()}
        if isinstance(data, list) and depth < 8:
            return [self.mapping(v, depth + 1) for v in data]
        return scrub_text(data) if isinstance(data, str) else data


# --- feeds -----------------------------------------------------------------------------------


@dataclass
class FeedRow:
    name: str
    mode: str
    listen: str
    state: str  # ok | silent | down | attention | idle
    state_text: str
    peers: list[dict[str, Any]]
    last_message_at: Optional[datetime]
    silent_for: Optional[float]
    per_minute: float
    ack_codes: dict[str, int]
    parked: int
    queue: int
    expectation: str


@dataclass
class DestinationRow:
    name: str
    address: str
    state: str
    state_text: str
    connected: bool
    last_sent_at: Optional[datetime]
    sent: int
    pending: int
    parked: int
    last_error: str


def _expectation(feed: FeedConfig) -> str:
    if feed.expect_message_every_seconds <= 0:
        return "none"
    every = feed.expect_message_every_seconds
    text = f"every {every / 60:g} min" if every >= 60 else f"every {every:g} s"
    opens, closes = feed.expect_hours
    if opens != closes:
        text += f", {opens:%H:%M}-{closes:%H:%M}"
    if feed.expect_days != (0, 1, 2, 3, 4, 5, 6):
        text += ", " + " ".join(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[d] for d in feed.expect_days)
    return text


def feed_rows(config: Config, sessions: sessionmaker, activity: dict[str, dict[str, Any]], now: datetime,
              watching_since: datetime) -> list[FeedRow]:
    """One row per configured inbound feed.  Silence is measured from the last message,
    or from ``watching_since`` (the daemon's start) when none has arrived since."""
    with sessions() as session:
        counts = defaultdict(int)
        for feed, status, count in session.execute(
                select(InboundMessage.feed, InboundMessage.status, func.count())
                .where(InboundMessage.status.in_((PARKED, RECEIVED)))
                .group_by(InboundMessage.feed, InboundMessage.status)):
            counts[(feed, status)] = count
    local_now = to_local(now, config.clinic.timezone)
    rows = []
    for feed in config.feeds:
        seen = activity.get(feed.name, {})
        last = seen.get("last_message_at")
        quiet = (now - (last or watching_since)).total_seconds()
        parked, queue = counts[(feed.name, PARKED)], counts[(feed.name, RECEIVED)]
        if not seen.get("serving", False):
            state, text = "down", "not listening"
        elif feed.expects_messages_at(local_now) and quiet > feed.expect_message_every_seconds:
            state, text = "silent", f"silent for {_duration(quiet)} (expected {_expectation(feed)})"
        elif parked:
            state, text = "attention", f"{parked} parked message{'s' if parked != 1 else ''}"
        else:
            state, text = "ok", "receiving" if last else "listening"
        rows.append(FeedRow(feed.name, str(feed.mode), str(feed.listen), state, text, seen.get("peers", []),
                            last, quiet if last else None, seen.get("per_minute", 0.0),
                            dict(sorted(seen.get("ack_codes", {}).items())), parked, queue, _expectation(feed)))
    return rows


def destination_rows(config: Config, sessions: sessionmaker, status: dict[str, dict[str, Any]]) -> list[DestinationRow]:
    with sessions() as session:
        counts = defaultdict(int)
        for channel, state, count in session.execute(
                select(OutboxItem.channel, OutboxItem.status, func.count())
                .where(OutboxItem.status.in_(("pending", "parked")), OutboxItem.channel.like(CHANNEL_PREFIX + "%"))
                .group_by(OutboxItem.channel, OutboxItem.status)):
            counts[(channel, state)] = count
    rows = []
    for destination in config.destinations:
        seen = status.get(destination.name, {})
        channel = channel_for(destination.name)
        pending, parked = counts[(channel, "pending")], counts[(channel, "parked")]
        if seen.get("halted"):
            state, text = "down", "stopped at a parked message"
        elif seen.get("last_error"):
            state, text = "down", "failing"
        elif parked:
            state, text = "attention", f"{parked} parked"
        else:
            state, text = "ok", "delivering" if pending else "up to date"
        last = seen.get("last_sent_at")
        rows.append(DestinationRow(destination.name, f"{destination.host}:{destination.port}", state, text,
                                   bool(seen.get("connected")), datetime.fromisoformat(last) if last else None,
                                   int(seen.get("sent", 0)), pending, parked, seen.get("last_error", "")))
    return rows


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- messages -------------------------------------------------------------------------------


@dataclass
class MessageFilter:
    since: Optional[datetime] = None
    until: Optional[datetime] = None
    feed: str = ""
    type: str = ""
    status: str = ""
    control_id: str = ""
    appointment_id: str = ""  # a placer or filler appointment id
    before: Optional[int] = None  # paging: only ids below this


def _ids_naming(session: Session, appointment_id: str, base) -> set[int]:
    """Stored messages about the placer/filler appointment id ``appointment_id``: those whose
    changes the audit trail links to the appointment, and among the newest stored
    messages, those whose SCH-1/2 or ARQ-1/2 names it (a parked one changed nothing)."""
    found: set[int] = set()
    wanted = appointment_id.strip()
    appointments = session.scalars(select(Appointment.id).where(or_(
        Appointment.placer_id == wanted, Appointment.filler_id == wanted,
        Appointment.placer_id.startswith(wanted + "^"), Appointment.filler_id.startswith(wanted + "^")))).all()
    if appointments:
        for source in session.scalars(select(AuditEntry.source).where(
                AuditEntry.entity == "appointment", AuditEntry.entity_id.in_(appointments),
                AuditEntry.source.startswith("inbound:"))):
            number = source.split(":", 1)[1]
            if number.isdigit():
                found.add(int(number))
    needle = wanted.encode()
    for message_id, raw in session.execute(base.with_only_columns(InboundMessage.id, InboundMessage.raw)
                                           .order_by(InboundMessage.id.desc()).limit(PLACER_SCAN_LIMIT)):
        if needle not in raw:
            continue
        try:
            message = parse(raw)
        except HL7ParseError:
            continue
        for name in ("SCH", "ARQ"):
            for segment in message.segments_named(name):
                if wanted in (segment.value(1), segment.value(2)):
                    found.add(message_id)
    return found


def search_messages(sessions: sessionmaker, wanted: MessageFilter, privacy: Privacy) -> list[dict[str, Any]]:
    with sessions() as session:
        stmt = select(InboundMessage)
        if wanted.since:
            stmt = stmt.where(InboundMessage.received_at >= wanted.since)
        if wanted.until:
            stmt = stmt.where(InboundMessage.received_at < wanted.until)
        if wanted.feed:
            stmt = stmt.where(InboundMessage.feed == wanted.feed)
        if wanted.type:
            stmt = stmt.where(or_(InboundMessage.message_type == wanted.type,
                                  InboundMessage.message_type.startswith(wanted.type + "^")))
        if wanted.status in STATUSES:
            stmt = stmt.where(InboundMessage.status == wanted.status)
        if wanted.control_id:
            stmt = stmt.where(InboundMessage.control_id == wanted.control_id)
        if wanted.appointment_id:
            ids = _ids_naming(session, wanted.appointment_id, stmt)
            stmt = stmt.where(InboundMessage.id.in_(sorted(ids) or [-1]))
        if wanted.before:
            stmt = stmt.where(InboundMessage.id < wanted.before)
        rows = session.execute(stmt.with_only_columns(
            InboundMessage.id, InboundMessage.feed, InboundMessage.sender, InboundMessage.control_id,
            InboundMessage.message_type, InboundMessage.status, InboundMessage.received_at, InboundMessage.error,
            InboundMessage.attempts).order_by(InboundMessage.id.desc()).limit(PAGE_SIZE)).all()
    return [{"id": r.id, "feed": r.feed, "sender": r.sender, "control_id": r.control_id, "type": r.message_type,
             "status": r.status, "received_at": r.received_at, "error": privacy.free_text(r.error),
             "attempts": r.attempts} for r in rows]


def message_detail(sessions: sessionmaker, message_id: int, privacy: Privacy) -> Optional[dict[str, Any]]:
    with sessions() as session:
        m = session.get(InboundMessage, message_id)
        if m is None:
            return None
        # Entries the message caused carry its id as their source; they were written while it
        # was applied, so the time index narrows the search to its lifetime.
        latest = (m.processed_at or m.received_at) + timedelta(seconds=5)
        caused = session.scalars(select(AuditEntry).where(
            AuditEntry.at >= m.received_at - timedelta(seconds=5), AuditEntry.at <= latest,
            AuditEntry.source == f"inbound:{m.id}")).all()
        operated = session.scalars(select(AuditEntry).where(
            AuditEntry.entity == "inbound_message", AuditEntry.entity_id == m.id)).all()
        audit = sorted({a.id: a for a in [*caused, *operated]}.values(), key=lambda a: (a.at, a.id))
        return {
            "id": m.id, "feed": m.feed, "sender": m.sender, "control_id": m.control_id, "type": m.message_type,
            "peer": m.peer, "status": m.status, "attempts": m.attempts, "received_at": m.received_at,
            "processed_at": m.processed_at, "error": privacy.free_text(m.error),
            "raw": m.raw, "ack": m.ack, "application_ack": m.application_ack,
            "audit": [audit_row(a, privacy) for a in audit],
        }


def audit_row(entry: AuditEntry, privacy: Privacy) -> dict[str, Any]:
    return {"id": entry.id, "at": entry.at, "actor": entry.actor, "source": entry.source, "action": entry.action,
            "entity": entry.entity, "entity_id": entry.entity_id, "from_state": entry.from_state,
            "to_state": entry.to_state,
            "reason": privacy.free_text(entry.reason) if privacy.patient_data or entry.entity in OPERATIONAL_ENTITIES
            else ("[hidden]" if entry.reason else ""),
            "before": privacy.mapping(entry.before), "after": privacy.mapping(entry.after)}


# --- schedule -------------------------------------------------------------------------------


@dataclass
class Subject:
    kind: str  # provider | resource | location
    id: int
    code: str
    name: str
    timezone: str


@dataclass
class DayItem:
    start: datetime  # local
    end: datetime
    kind: str  # slot | appointment | block
    label: str
    state: str
    state_text: str
    detail: str = ""
    flags: list[str] = field(default_factory=list)
    children: list["DayItem"] = field(default_factory=list)


def subjects(sessions: sessionmaker, default_timezone: str) -> dict[str, list[Subject]]:
    with sessions() as session:
        zones = {loc.id: loc.timezone for loc in session.scalars(select(Location))}
        return {
            "provider": [Subject("provider", p.id, p.code, p.display_name or p.code,
                                 zones.get(p.location_id, default_timezone))
                         for p in session.scalars(select(Provider).where(Provider.active).order_by(Provider.code))],
            "resource": [Subject("resource", r.id, r.code, r.name, zones.get(r.location_id, default_timezone))
                         for r in session.scalars(select(Resource).where(Resource.active).order_by(Resource.code))],
            "location": [Subject("location", loc.id, loc.code, loc.name, loc.timezone)
                         for loc in session.scalars(select(Location).order_by(Location.code))],
        }


def _utc_day(day: date, tz: str) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=zone(tz)).astimezone(timezone.utc)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone(tz)).astimezone(timezone.utc)
    return start, end


def patient_label(session: Session, patient_id: Optional[int], privacy: Privacy) -> str:
    if patient_id is None:
        return "no patient"
    patient = session.get(Patient, patient_id)
    if patient is None:
        return f"patient {patient_id}"
    identifier = session.scalars(select(PatientIdentifier.value).where(PatientIdentifier.patient_id == patient_id)
                                 .order_by(PatientIdentifier.id).limit(1)).first() or ""
    if not privacy.patient_data:
        return f"patient {privacy.value(identifier or patient_id)}"
    name = ", ".join(part for part in (patient.family_name, patient.given_name) if part) or "(no name)"
    return f"{name} ({identifier})" if identifier else name


_APPOINTMENT_STATES = {
    "booked": ("ok", "booked"), "overbooked": ("attention", "overbooked"), "held": ("attention", "held"),
    "requested": ("info", "requested"), "waitlisted": ("info", "waitlisted"), "arrived": ("ok", "arrived"),
    "checked_in": ("ok", "checked in"), "completed": ("done", "completed"), "cancelled": ("off", "cancelled"),
    "discontinued": ("off", "discontinued"), "no_show": ("down", "no-show"), "deleted": ("off", "deleted"),
}


def schedule_days(sessions: sessionmaker, subject: Subject, first: date, days: int, privacy: Privacy,
                  now: datetime) -> list[tuple[date, list[DayItem]]]:
    tz = subject.timezone
    start, _ = _utc_day(first, tz)
    _, end = _utc_day(first + timedelta(days=days - 1), tz)
    with sessions() as session:
        slot_stmt = select(Slot).where(*Slot.overlapping(start, end))
        appt_stmt = select(Appointment).where(Appointment.start < end, Appointment.end > start)
        block_stmt = select(TimeBlock).where(TimeBlock.start < end, TimeBlock.end > start, TimeBlock.active)
        if subject.kind == "provider":
            slot_stmt = slot_stmt.where(Slot.provider_id == subject.id)
            appt_stmt = appt_stmt.where(Appointment.provider_id == subject.id)
            block_stmt = block_stmt.where(TimeBlock.provider_id == subject.id)
        elif subject.kind == "resource":
            slot_stmt = slot_stmt.where(Slot.resource_id == subject.id)
            appt_stmt = appt_stmt.where(Appointment.id.in_(
                select(AppointmentResource.appointment_id).where(AppointmentResource.resource_id == subject.id)))
            block_stmt = block_stmt.where(TimeBlock.resource_id == subject.id)
        else:
            slot_stmt = slot_stmt.where(Slot.location_id == subject.id)
            appt_stmt = appt_stmt.where(Appointment.location_id == subject.id)
            block_stmt = block_stmt.where(TimeBlock.provider_id.in_(
                select(Provider.id).where(Provider.location_id == subject.id)))
        slots = session.scalars(slot_stmt.order_by(Slot.start, Slot.id)).all()
        appointments = session.scalars(appt_stmt.order_by(Appointment.start, Appointment.id)).all()
        blocks = session.scalars(block_stmt.order_by(TimeBlock.start)).all()
        seats = defaultdict(list)
        if appointments:
            for appointment_id, slot_id in session.execute(select(AppointmentSlot.appointment_id, AppointmentSlot.slot_id)
                                                           .where(AppointmentSlot.appointment_id.in_([a.id for a in appointments]))):
                seats[slot_id].append(appointment_id)
        codes = dict(session.execute(select(Provider.id, Provider.code)).all())
        items_by_appointment = {a.id: _appointment_item(session, a, tz, privacy, codes, subject, now) for a in appointments}
        placed: set[int] = set()
        items: list[DayItem] = []
        for slot in slots:
            free = slot.capacity - slot.booked
            if slot.blocked or slot.slot_type == "blocked":
                state, text = "off", "blocked"
            elif free <= 0:
                state, text = "done", "full"
            else:
                state, text = "ok", "free"
            item = DayItem(to_local(slot.start, tz), to_local(slot.end, tz), "slot", slot.slot_type.replace("_", " "),
                           state, text, f"{slot.booked} of {slot.capacity} seat{'s' if slot.capacity != 1 else ''} taken")
            for appointment_id in seats.get(slot.id, []):
                if appointment_id in items_by_appointment and appointment_id not in placed:
                    item.children.append(items_by_appointment[appointment_id])
                    placed.add(appointment_id)
            items.append(item)
        items += [item for appointment_id, item in items_by_appointment.items() if appointment_id not in placed]
        items += [DayItem(to_local(b.start, tz), to_local(b.end, tz), "block", "time block", "off", "blocked",
                          b.reason) for b in blocks]
    by_day: dict[date, list[DayItem]] = {first + timedelta(days=n): [] for n in range(days)}
    for item in sorted(items, key=lambda i: (i.start, i.kind != "block", i.kind != "slot")):
        if item.start.date() in by_day:
            by_day[item.start.date()].append(item)
        elif item.kind == "block" and item.start.date() < first:
            by_day[first].append(item)
    return list(by_day.items())


def _appointment_item(session: Session, a: Appointment, tz: str, privacy: Privacy, codes: dict[int, str],
                      subject: Subject, now: datetime) -> DayItem:
    state, text = _APPOINTMENT_STATES.get(a.status, ("info", a.status))
    flags = []
    if a.conflict:
        flags.append(f"conflict: {a.conflict}")
    if a.review_reason:
        flags.append(f"needs review: {privacy.free_text(a.review_reason)}")
    if a.status == "held" and a.hold_expires_at:
        left = (a.hold_expires_at - now).total_seconds()
        flags.append(f"hold expires in {int(left // 60)} min" if left > 0 else "hold expired")
    if a.urgency == "urgent":
        flags.append("urgent")
    if a.confirmed_at:
        flags.append("patient confirmed")
    who = patient_label(session, a.patient_id, privacy)
    detail = f"{who} · {a.appointment_type.replace('_', ' ')}"
    if subject.kind != "provider" and a.provider_id:
        detail += f" · {codes.get(a.provider_id, '')}"
    ids = " / ".join(x for x in (a.placer_id, a.filler_id) if x)
    return DayItem(to_local(a.start, tz), to_local(a.end, tz), "appointment", f"appointment {a.id}" +
                   (f" ({ids})" if ids else ""), state, text, detail, flags)


def waitlist(sessions: sessionmaker, subject: Optional[Subject], privacy: Privacy, now: datetime) -> dict[str, list]:
    with sessions() as session:
        entries_stmt = select(WaitlistEntry).where(WaitlistEntry.status == "waiting")
        offers_stmt = select(WaitlistOffer).where(WaitlistOffer.status == "offered", WaitlistOffer.expires_at > now)
        if subject is not None and subject.kind == "provider":
            entries_stmt = entries_stmt.where(or_(WaitlistEntry.provider_id == subject.id,
                                                  WaitlistEntry.provider_id.is_(None)))
            offers_stmt = offers_stmt.where(WaitlistOffer.provider_id == subject.id)
        tz = subject.timezone if subject else "UTC"
        entries = [{"id": w.id, "patient": patient_label(session, w.patient_id, privacy),
                    "type": w.appointment_type.replace("_", " "), "urgency": w.urgency,
                    "window": _window(w.earliest, w.latest, tz), "since": w.created_at}
                   for w in session.scalars(entries_stmt.order_by(WaitlistEntry.created_at).limit(PAGE_SIZE))]
        offers = [{"id": o.id, "patient": patient_label(session, o.patient_id, privacy),
                   "start": to_local(o.start, tz), "expires_at": o.expires_at, "score": o.score}
                  for o in session.scalars(offers_stmt.order_by(WaitlistOffer.expires_at).limit(PAGE_SIZE))]
    return {"entries": entries, "offers": offers}


def _window(earliest: Optional[datetime], latest: Optional[datetime], tz: str) -> str:
    if not earliest and not latest:
        return "any time"
    fmt = "%a %d %b"
    return " – ".join(to_local(t, tz).strftime(fmt) if t else "…" for t in (earliest, latest))


def reminders_on(sessions: sessionmaker, subject: Optional[Subject], day: date, tz: str) -> list[dict[str, Any]]:
    """Confirmations, reminders and follow-ups due or sent on ``day`` (local), with their outcome."""
    start, end = _utc_day(day, tz)
    with sessions() as session:
        stmt = select(OutboxItem).where(OutboxItem.kind.in_(REMINDER_KINDS), or_(
            (OutboxItem.due_at >= start) & (OutboxItem.due_at < end),
            (OutboxItem.done_at >= start) & (OutboxItem.done_at < end)))
        if subject is not None and subject.kind == "provider":
            stmt = stmt.where(OutboxItem.appointment_id.in_(
                select(Appointment.id).where(Appointment.provider_id == subject.id)))
        elif subject is not None and subject.kind == "location":
            stmt = stmt.where(OutboxItem.appointment_id.in_(
                select(Appointment.id).where(Appointment.location_id == subject.id)))
        return [{"id": item.id, "kind": item.kind.replace("_", " "), "channel": item.channel, "status": item.status,
                 "due_at": item.due_at, "done_at": item.done_at, "appointment_id": item.appointment_id,
                 "attempts": item.attempts, "last_error": scrub_text(item.last_error or "")}
                for item in session.scalars(stmt.order_by(OutboxItem.due_at, OutboxItem.id).limit(PAGE_SIZE * 5))]


# --- plugins --------------------------------------------------------------------------------


def hook_figures(registry) -> dict[str, dict[str, dict[str, float]]]:
    """Per plugin, per hook: calls, errors and mean milliseconds since start, from the metrics."""
    figures: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: {
        "calls": 0, "errors": 0, "seconds": 0.0}))
    for metric in registry.collect():
        for sample in metric.samples:
            plugin, hook = sample.labels.get("plugin"), sample.labels.get("hook")
            if plugin is None or hook is None:
                continue
            if sample.name == "slotengine_plugin_seconds_count":
                figures[plugin][hook]["calls"] = sample.value
            elif sample.name == "slotengine_plugin_seconds_sum":
                figures[plugin][hook]["seconds"] = sample.value
            elif sample.name == "slotengine_plugin_errors_total":
                figures[plugin][hook]["errors"] = sample.value
    return {plugin: dict(sorted(hooks.items())) for plugin, hooks in figures.items()}


def first_of_week(day: date) -> date:
    return day - timedelta(days=day.weekday())
