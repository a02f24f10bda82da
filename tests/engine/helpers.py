"""Small helpers for engine tests: patients, slots, and looking at what the
database holds afterwards (reservations, audit, slot counters)."""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from typing import Optional

from sqlalchemy import event, func, select

from engine.models import (
    Appointment,
    AppointmentSlot,
    AuditEntry,
    Provider,
    Reservation,
    Resource,
    Slot,
)
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.requests import Actor, BookingRequest, Identifier, PatientRecord
from engine.service import Scheduler
from zoneinfo import ZoneInfo

STAFF = Actor("operator", "test-desk", "pytest")
NEW_YORK = "America/New_York"
LOS_ANGELES = "America/Los_Angeles"

_mrns = itertools.count(1)


def make_patient(scheduler, mrn: Optional[str] = None, **fields):
    mrn = mrn or f"MRN{next(_mrns):05d}"
    record = PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], family_name="Doe", given_name="Jane", **fields)
    return scheduler.register_patient(record, STAFF)


def provider_id(scheduler, code: str) -> int:
    with scheduler.sessions() as s:
        return s.scalar(select(Provider.id).where(Provider.code == code))


def resource_id(scheduler, code: str) -> int:
    with scheduler.sessions() as s:
        return s.scalar(select(Resource.id).where(Resource.code == code))


def local(day: date | str, at: time | str, tz: str = NEW_YORK) -> datetime:
    """A clinic-local wall time as a UTC instant."""
    day = date.fromisoformat(day) if isinstance(day, str) else day
    at = time.fromisoformat(at) if isinstance(at, str) else at
    return datetime.combine(day, at, tzinfo=ZoneInfo(tz)).astimezone(timezone.utc)


def slot_at(scheduler, provider_code: str, start: datetime) -> Slot:
    with scheduler.sessions() as s:
        slot = s.scalars(
            select(Slot).where(Slot.provider_id == provider_id(scheduler, provider_code), Slot.start == start)
        ).one_or_none()
        assert slot is not None, f"no {provider_code} slot at {start.isoformat()}"
        return slot


def slots_of(scheduler, provider_code: str, *, slot_type: Optional[str] = None) -> list[Slot]:
    with scheduler.sessions() as s:
        stmt = select(Slot).where(Slot.provider_id == provider_id(scheduler, provider_code))
        if slot_type:
            stmt = stmt.where(Slot.slot_type == slot_type)
        return list(s.scalars(stmt.order_by(Slot.start)))


def get_slot(scheduler, slot_id: int) -> Slot:
    with scheduler.sessions() as s:
        return s.get(Slot, slot_id)


def get_appointment(scheduler, appointment_id: int) -> Appointment:
    return scheduler.appointment(appointment_id)


def reservations(scheduler, *, appointment_id: Optional[int] = None, subject: Optional[str] = None) -> list[tuple]:
    """(subject, unit, seat, appointment_id) rows, sorted."""
    with scheduler.sessions() as s:
        stmt = select(Reservation.subject, Reservation.unit, Reservation.seat, Reservation.appointment_id)
        if appointment_id is not None:
            stmt = stmt.where(Reservation.appointment_id == appointment_id)
        if subject is not None:
            stmt = stmt.where(Reservation.subject == subject)
        return sorted(tuple(r) for r in s.execute(stmt))


def reserved_subjects(scheduler, appointment_id: int) -> set[str]:
    return {r[0] for r in reservations(scheduler, appointment_id=appointment_id)}


def slot_ids_of(scheduler, appointment_id: int) -> list[int]:
    with scheduler.sessions() as s:
        return sorted(s.scalars(select(AppointmentSlot.slot_id).where(AppointmentSlot.appointment_id == appointment_id)))


def audit(scheduler, *, entity: Optional[str] = None, entity_id: Optional[int] = None) -> list[AuditEntry]:
    with scheduler.sessions() as s:
        stmt = select(AuditEntry).order_by(AuditEntry.id)
        if entity is not None:
            stmt = stmt.where(AuditEntry.entity == entity)
        if entity_id is not None:
            stmt = stmt.where(AuditEntry.entity_id == entity_id)
        return list(s.scalars(stmt))


def count(scheduler, model) -> int:
    with scheduler.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def book(scheduler, patient_id: int, slot_id: int, appointment_type: str = "new_patient", **kw):
    return scheduler.book(BookingRequest(patient_id, appointment_type, slot_id=slot_id, **kw), STAFF)


def with_plugins(scheduler: Scheduler, *plugins: tuple[str, object]) -> Scheduler:
    """Another Scheduler on the same database and clock with these plugins only."""
    host = PluginHost(builtins=(), discover=False, extra=list(plugins))
    return Scheduler(scheduler.sessions, plugins=host, clock=scheduler.clock, settings=scheduler.settings)


class ChangeRecorder:
    """A plugin that remembers every Change, in the transaction and after commit."""

    def __init__(self) -> None:
        self.in_transaction: list = []
        self.committed: list = []

    @hookimpl
    def slotengine_schedule_changed(self, change):
        self.in_transaction.append(change)

    @hookimpl
    def slotengine_after_change(self, change):
        self.committed.append(change)

    def kinds(self) -> list[str]:
        return [c.kind for c in self.committed]

    def last(self, kind: Optional[str] = None):
        matching = [c for c in self.committed if kind is None or c.kind == kind]
        assert matching, f"no {kind or ''} change recorded; saw {self.kinds()}"
        return matching[-1]


def overlapping(intervals: list[tuple[datetime, datetime]]) -> list[tuple]:
    """Pairs of intervals that overlap (empty when none do)."""
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if b[0] < a[1]]


UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def minutes(n: int) -> timedelta:
    return timedelta(minutes=n)


@contextmanager
def statements(engine):
    """The SQL statements sent while the block runs."""
    sent: list[str] = []

    def _sent(_conn, _cursor, statement, *_args):
        sent.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", _sent)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", _sent)
