"""Helpers for plugins that write to patients: which channel, which address,
clinic-local times in the patient's language, quiet hours.

Minimum necessary: nothing here ever puts the appointment's reason, a
diagnosis or the provider's specialty into a message; SMS and voice carry the
date and time and how to answer, no more.
"""
from __future__ import annotations

import functools
from datetime import datetime, time, timedelta
from typing import Any, Iterable, Optional

from sqlalchemy import bindparam, event, inspect, select
from sqlalchemy.orm import Session

from engine.calendar import zone
from engine.db import Direct
from engine.models import Appointment, Location, Patient, PatientFlag, PatientIdentifier
from engine.requests import Change

_KEPT = "slotengine.messaging.kept"
_REGISTERED = "slotengine.messaging.registered"
# straight on the driver (after the session's autoflush): the ORM's handling of a statement
# costs several times the query, which bookings run often
_IDENTIFIERS = PatientIdentifier.__table__
_FLAGS = PatientFlag.__table__
# the patient's first MR number, in identifier order (as the loaded relationship lists them)
_FIRST_MRN = Direct(select(_IDENTIFIERS.c.value)
                    .where(_IDENTIFIERS.c.patient_id == bindparam("patient_id"), _IDENTIFIERS.c.type_code == "MR")
                    .order_by(_IDENTIFIERS.c.id).limit(1))
# a range, not LIKE 'opt_out:%': SQLite prepares a statement whose LIKE pattern is a
# parameter again at every run (its plan depends on the pattern), which cost 6× the query
_OPT_OUTS = Direct(select(_FLAGS.c.flag).where(_FLAGS.c.patient_id == bindparam("patient_id"),
                                               _FLAGS.c.flag >= "opt_out:", _FLAGS.c.flag < "opt_out;"))

#: Channels that reach a patient, and the patient field each needs.
PATIENT_CHANNELS = ("email", "sms", "voice")

_WEEKDAYS = {
    "en": ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    "es": ("lun", "mar", "mié", "jue", "vie", "sáb", "dom"),
}
_MONTHS = {
    "en": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    "es": ("ene", "feb", "mar", "abr", "may", "jun", "jul", "ago", "sep", "oct", "nov", "dic"),
}


def mobile_number(phones: Optional[list[dict[str, str]]]) -> str:
    """The patient's mobile number (``use`` CP/mobile first), else the first number."""
    phones = [p for p in (phones or []) if isinstance(p, dict) and p.get("number")]
    for phone in phones:
        if str(phone.get("use", "")).upper() in ("CP", "MOBILE", "ORN", "PRN") or str(phone.get("type", "")).upper() == "CP":
            return phone["number"]
    return phones[0]["number"] if phones else ""


def address_for(patient, channel: str) -> str:
    if channel == "email":
        return patient.email or ""
    if channel in ("sms", "voice"):
        return mobile_number(patient.phones)
    return ""


def choose_channel(patient, available: Iterable[str], fallback_order: Iterable[str] = PATIENT_CHANNELS) -> Optional[tuple[str, str]]:
    """``(channel, address)``: the patient's preferred channel when it is available and
    they have an address for it, else the first of ``fallback_order`` that works.
    Nobody writes to a patient recorded as deceased."""
    if patient is None or getattr(patient, "deceased", False):
        return None
    available = set(available)
    order = [patient.preferred_channel] if patient.preferred_channel else []
    order += [c for c in fallback_order if c not in order]
    for channel in order:
        if channel in available:
            address = address_for(patient, channel)
            if address:
                return channel, address
    return None


def opt_outs(session, patient_id: int) -> set[str]:
    """What the patient declined (their ``opt_out:*`` flags, from PD1-11 or a reply):
    a purpose (``reminder``, ``recall``) or a channel (``voice``, ``sms``, ``email``)."""
    return {row.flag.removeprefix("opt_out:") for row in _OPT_OUTS.fetch(session, {"patient_id": patient_id})}


def language_of(patient, known: Iterable[str]) -> str:
    """The patient's language (``es``, ``es-MX``, ``spa``…) if we have text for it, else ``en``."""
    code = (patient.language or "").strip().lower().replace("_", "-")
    known = set(known)
    aliases = {"spa": "es", "eng": "en", "spanish": "es", "english": "en"}
    for candidate in (code, code.split("-")[0], aliases.get(code, "")):
        if candidate in known:
            return candidate
    return "en"


def local_when(instant: datetime, tz: str, language: str = "en") -> str:
    """``Tue 3 Mar 09:00`` in the clinic's zone."""
    local = instant.astimezone(zone(tz))
    weekdays = _WEEKDAYS.get(language, _WEEKDAYS["en"])
    months = _MONTHS.get(language, _MONTHS["en"])
    return f"{weekdays[local.weekday()]} {local.day} {months[local.month - 1]} {local:%H:%M}"


def in_quiet_hours(instant: datetime, tz: str, quiet_start: time, quiet_end: time) -> bool:
    local = instant.astimezone(zone(tz)).time()
    if quiet_start == quiet_end:
        return False
    if quiet_start < quiet_end:
        return quiet_start <= local < quiet_end
    return local >= quiet_start or local < quiet_end


def outside_quiet_hours(due: datetime, tz: str, quiet_start: time, quiet_end: time, *,
                        not_after: Optional[datetime] = None, not_before: Optional[datetime] = None) -> Optional[datetime]:
    """Move ``due`` out of the clinic's quiet hours.

    Forward to the end of the quiet period when that is still no later than
    ``not_after`` (e.g. the visit minus the minimum lead time); otherwise back
    to just before the quiet period began, if that is not earlier than
    ``not_before`` (now).  ``None`` when neither works."""
    if not in_quiet_hours(due, tz, quiet_start, quiet_end):
        return due
    tzinfo = zone(tz)
    local = due.astimezone(tzinfo)
    end_day = local.date() if local.time() < quiet_end else local.date() + timedelta(days=1)
    forward = datetime.combine(end_day, quiet_end, tzinfo=tzinfo).astimezone(due.tzinfo)
    if not_after is None or forward <= not_after:
        return forward
    start_day = local.date() if local.time() >= quiet_start else local.date() - timedelta(days=1)
    backward = (datetime.combine(start_day, quiet_start, tzinfo=tzinfo) - timedelta(minutes=5)).astimezone(due.tzinfo)
    if not_before is None or backward >= not_before:
        return backward
    return None


def kept(session: Session, model: type, ident: int) -> Any:
    """The row of ``model`` (a location, a provider: the few reference rows that change after
    change names again) with primary key ``ident``, read once in the transaction and held
    until it ends.  A plain row to read (``row.name``), not the mapped object: loading that
    costs several times the query."""
    held = session.info.setdefault(_KEPT, {})
    row = held.get((model, ident))
    if row is None:
        found = _by_primary_key(model).fetch(session, {"ident": ident})
        if found:
            row = held[(model, ident)] = found[0]
    return row


@functools.cache
def _by_primary_key(model: type) -> Any:
    table = model.__table__
    return Direct(select(table).where(table.primary_key.columns[0] == bindparam("ident")))


def follow_registrations(session: Session, owner: str, change: Change) -> set[int]:
    """The patients registered in this transaction, as ``owner`` (a plugin) follows
    them: its ``slotengine_schedule_changed`` passes every change here first, before
    any early return, and gets its set back.

    Such a patient had no rows before the transaction, so they have none of a kind
    (flags, no-shows, referrals) unless the transaction wrote one.  The owner drops
    from its set each patient it sees such a write for (a change, or a row it writes
    itself: ``registered_in_transaction``), and need not query for the others.  A
    merge moves rows between patients: it empties the set."""
    registered = registered_in_transaction(session, owner)
    if change.kind == "patient_registered":
        registered.add(change.detail["patient_id"])
    elif change.kind == "patients_merged":
        registered.clear()
    return registered


def registered_in_transaction(session: Session, owner: str) -> set[int]:
    """``owner``'s set of ``follow_registrations``, kept until the transaction ends or a
    savepoint in it rolls back."""
    return session.info.setdefault(_REGISTERED, {}).setdefault(owner, set())


@event.listens_for(Session, "after_transaction_end")
def _forget_at_end(session: Session, transaction) -> None:
    if transaction.parent is None:
        session.info.pop(_KEPT, None)
        session.info.pop(_REGISTERED, None)


@event.listens_for(Session, "after_soft_rollback")
def _forget_on_rollback(session: Session, _transaction) -> None:
    """A rolled-back savepoint may have taken a row held here (one it created), or a
    patient registered here (SQLite may give their id again)."""
    session.info.pop(_KEPT, None)
    session.info.pop(_REGISTERED, None)


def _mrn(session: Session, patient: Patient) -> str:
    if "identifiers" in inspect(patient).dict:  # the relationship is loaded: no query
        return next((i.value for i in patient.identifiers if i.type_code == "MR"), "")
    found = _FIRST_MRN.fetch(session, {"patient_id": patient.id})
    return found[0].value if found else ""


def describe_for_staff(session: Session, appointment: Appointment) -> str:
    """``appointment 12 for Doe, Jane (MR 123) on Tue 3 Mar 09:00 at Main Street Clinic`` (staff only)."""
    location = kept(session, Location, appointment.location_id) if appointment.location_id else None
    tz = location.timezone if location else "UTC"
    local = appointment.start.astimezone(zone(tz))
    who = ""
    if appointment.patient_id:
        patient = session.get(Patient, appointment.patient_id)
        mrn = _mrn(session, patient)
        who = f" for {patient.family_name}, {patient.given_name}" + (f" (MR {mrn})" if mrn else "")
    where = f" at {location.name}" if location else ""
    return f"appointment {appointment.id}{who} on {local:%a %d %b %Y %H:%M %Z}{where}"
