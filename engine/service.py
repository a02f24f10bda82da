"""The scheduling service: every change to the schedule goes through here.

Each public method is one unit of work (one session, one transaction), audits
what it changed (actor, source, reason, before and after), lets plugins judge
and follow up inside the transaction, and tells them after commit.

Double booking is refused by the database: ``reservations`` has one row per
(subject, 5-minute unit, seat) under a primary key, so two transactions that
want the same provider, room or patient at the same time cannot both commit,
on SQLite or PostgreSQL, in one process or several.  Slot capacity is a
conditional ``UPDATE … WHERE booked < capacity``, equally atomic.
"""
from __future__ import annotations

import bisect
import logging
import uuid
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any, Iterator, Optional, Sequence

from sqlalchemy import and_, bindparam, delete, event, exists, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, object_session, sessionmaker
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from engine import calendar
from engine.clock import Clock, SystemClock
from engine.db import Direct, flush_changes, insert_at_flush_point
from engine.errors import (
    BookingVetoed,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    PatientConflict,
    SlotTypeMismatch,
    SlotUnavailable,
    TooEarly,
)
from engine.models import (
    Appointment,
    AppointmentResource,
    AppointmentSlot,
    AuditEntry,
    ChangeRequest,
    Coverage,
    Location,
    Patient,
    PatientFlag,
    PatientIdentifier,
    Provider,
    Reservation,
    Resource,
    ScheduleTemplate,
    Slot,
    TimeBlock,
    WaitlistEntry,
)
from engine.plugin_host import Decision, PluginHost
from engine.requests import (
    Actor,
    BookingRequest,
    Candidate,
    Change,
    ChangeOutcome,
    CoverageRecord,
    ExternalAppointment,
    PatientRecord,
    SlotQuery,
    UrgentRequest,
)
from engine.states import OCCUPYING, RELEASING, Status, check_transition

log = logging.getLogger("slotengine.engine")

APPOINTMENT_TYPES = ("new_patient", "follow_up", "procedure", "emergency", "general")
SLOT_TYPES = ("new_patient", "follow_up", "procedure", "emergency", "blocked")
#: Slot types that take only appointments of their own type.
EXCLUSIVE_SLOT_TYPES = frozenset({"procedure", "follow_up"})
#: How the placer ids of bookings asked of a calendar's owner begin (``request_booking``).
REQUESTED_PLACER_PREFIX = "SE-"

# Core tables for the booking hot path (no ORM unit of work per row)
_SLOTS = Slot.__table__
_SLOT_COLUMNS = (_SLOTS.c.id, _SLOTS.c.start, _SLOTS.c.end, _SLOTS.c.provider_id, _SLOTS.c.resource_id,
                 _SLOTS.c.location_id, _SLOTS.c.slot_type, _SLOTS.c.capacity, _SLOTS.c.booked, _SLOTS.c.blocked)
_RESERVATIONS = Reservation.__table__
_APPOINTMENT_SLOTS = AppointmentSlot.__table__
_BLOCKS = TimeBlock.__table__
_RESOURCES = Resource.__table__
# built once: a statement object is compiled and cache-keyed once, not per booking
_SLOT_BY_ID = select(*_SLOT_COLUMNS).where(_SLOTS.c.id == bindparam("slot_id"))
_CLAIM_SEAT = (update(_SLOTS)
               .where(_SLOTS.c.id == bindparam("slot_id"), _SLOTS.c.booked < _SLOTS.c.capacity,
                      _SLOTS.c.blocked.is_(False))
               .values(booked=_SLOTS.c.booked + 1))
_CLAIM_WHOLE_SLOT = (
    update(_SLOTS)
    .where(_SLOTS.c.id == bindparam("slot_id"), _SLOTS.c.booked < _SLOTS.c.capacity, _SLOTS.c.blocked.is_(False),
           ~exists().where(_BLOCKS.c.active.is_(True), _BLOCKS.c.provider_id == _SLOTS.c.provider_id,
                           _BLOCKS.c.start < _SLOTS.c.end, _BLOCKS.c.end > _SLOTS.c.start))
    .values(booked=_SLOTS.c.booked + 1)
    .returning(*_SLOT_COLUMNS)
)
_LINK_SLOT = Direct(insert(_APPOINTMENT_SLOTS))
_AUDIT = AuditEntry.__table__  # rows written at the transaction's flush points, several with one statement
_PATIENT_MERGED_INTO = Direct(select(Patient.__table__.c.merged_into_id)
                              .where(Patient.__table__.c.id == bindparam("patient_id")))
#: Rows written by ``_insert_row``: each model's INSERT … RETURNING every column
_INSERT_RETURNING = {model: Direct(insert(model.__table__).returning(*model.__table__.columns))
                     for model in (Appointment, AppointmentResource, Coverage, Patient, PatientIdentifier)}
#: their columns in that order, each with whether a None given is stored (else left to the default)
_INSERTED_COLUMNS = {model: {column.key: column.type.should_evaluate_none for column in model.__table__.columns}
                     for model in _INSERT_RETURNING}
_SET_FILLER_ID = Direct(update(Appointment.__table__).where(Appointment.__table__.c.id == bindparam("appointment_id"))
                        .values(filler_id=bindparam("new_filler_id")))
# the owners of identifiers, by count (``_identifier_owners``), and their rows loaded after:
# a caller comparing the patient with a message's record then finds it in the session
_IDENTIFIER_OWNERS: dict[int, Direct] = {}
_PATIENTS_BY_ID = select(Patient).where(Patient.id.in_(bindparam("patient_ids", expanding=True)))


#: ``session.info`` key: identifiers looked up ahead (``Scheduler.look_up_identifiers``) for
#: this transaction, ``(authority, type_code, value)`` → the patient holding it, or None for
#: nobody; the writes that add or move identifiers keep it true, a rollback forgets it
_OWNERS_LOOKED_UP = "slotengine.identifier_owners"
#: identifiers per look-up query: a statement is compiled and cached for each count
_LOOK_UP_AT_ONCE = 32


#: ``session.info`` key: appointments looked up ahead (``Scheduler.look_up_appointments``)
#: for this transaction, ``("placer" | "filler", id)`` → the oldest appointment with that
#: id, or None for none; new appointments are noted in it, a changed id or a rollback
#: forgets it
_APPOINTMENTS_LOOKED_UP = "slotengine.appointments_by_external_id"
#: ``session.info`` key: ids of the appointments ``Scheduler.look_up_appointments`` loaded
#: with FOR UPDATE (PostgreSQL) in this transaction, which ``_appointment`` need not lock
#: again; forgotten when the transaction ends and on any rollback (rolling back to a
#: savepoint releases the locks taken after it)
_LOCKED_APPOINTMENTS = "slotengine.locked_appointments"


@event.listens_for(Session, "after_soft_rollback")
def _forget_looked_up(session: Session, _transaction) -> None:
    session.info.pop(_OWNERS_LOOKED_UP, None)
    session.info.pop(_APPOINTMENTS_LOOKED_UP, None)
    session.info.pop(_LOCKED_APPOINTMENTS, None)


@event.listens_for(Session, "after_transaction_end")
def _locks_released(session: Session, transaction) -> None:
    if transaction.parent is None:
        session.info.pop(_LOCKED_APPOINTMENTS, None)


def _note_appointment(session: Session, appointment: "Appointment") -> None:
    """A new appointment (or one given an id it lacked): it answers for its ids where
    nothing did (it is the newest, so never the oldest where another already answers)."""
    looked_up = session.info.get(_APPOINTMENTS_LOOKED_UP)
    if looked_up is None:
        return
    for key in (("placer", appointment.placer_id), ("filler", appointment.filler_id)):
        if key[1] and key in looked_up and looked_up[key] is None:
            looked_up[key] = appointment


@event.listens_for(Session, "pending_to_persistent")
def _appointment_flushed(session: Session, instance: Any) -> None:
    if isinstance(instance, Appointment):
        _note_appointment(session, instance)


def _external_id_set(target: "Appointment", value: Any, old: Any, _initiator) -> None:
    session = object_session(target)
    if session is not None and value != old:
        session.info.pop(_APPOINTMENTS_LOOKED_UP, None)


event.listen(Appointment.placer_id, "set", _external_id_set)
event.listen(Appointment.filler_id, "set", _external_id_set)


def _identifier_owners(count: int):
    """The owners of ``count`` identifiers: an OR of equalities, which both databases
    answer from the (authority, type_code, value) index; SQLite scans the whole table
    for a row-value IN (VALUES …), which grew with every patient."""
    statement = _IDENTIFIER_OWNERS.get(count)
    if statement is None:
        statement = _IDENTIFIER_OWNERS[count] = Direct(
            select(PatientIdentifier.authority, PatientIdentifier.type_code, PatientIdentifier.value,
                   PatientIdentifier.patient_id)
            .where(or_(*(and_(PatientIdentifier.authority == bindparam(f"a{n}"),
                              PatientIdentifier.type_code == bindparam(f"t{n}"),
                              PatientIdentifier.value == bindparam(f"v{n}")) for n in range(count)))))
    return statement
_NOT_LOOKED_UP = object()
#: (by placer id?, by filler id?) → the appointment either names, the oldest first
_BY_EXTERNAL_IDS = {
    (by_placer, by_filler): select(Appointment).where(or_(
        *([Appointment.filler_id == bindparam("filler_id")] if by_filler else []),
        *([Appointment.placer_id == bindparam("placer_id")] if by_placer else []))).order_by(Appointment.id)
    for by_placer, by_filler in ((True, False), (False, True), (True, True))
}
_BY_EXTERNAL_ID_LISTS = (select(Appointment).where(or_(Appointment.placer_id.in_(bindparam("placers", expanding=True)),
                                                        Appointment.filler_id.in_(bindparam("fillers", expanding=True))))
                         .order_by(Appointment.id))
_LOCK_BY_EXTERNAL_ID_LISTS = _BY_EXTERNAL_ID_LISTS.with_for_update()
#: what selectinload(Appointment.resources) asks, built once: selectinload builds its query on every load
_RESOURCES_OF = select(AppointmentResource).where(
    AppointmentResource.appointment_id.in_(bindparam("appointment_ids", expanding=True)))
# a plain row, straight on the driver: the caller compares it with a message's coverage, which
# has mostly not changed (the ORM's handling of a query for the entity costs more than the query)
_COVERAGE_OF = Direct(select(Coverage.__table__).where(Coverage.__table__.c.patient_id == bindparam("patient_id"),
                                                            Coverage.__table__.c.payer_id == bindparam("payer_id"),
                                                            Coverage.__table__.c.member_id == bindparam("member_id"))
                      .order_by(Coverage.__table__.c.id).limit(1))
# reservations and slot links are written with Core only (never pending in the session), so
# these run on the session's connection: no autoflush, no ORM bookkeeping
_SLOT_IDS = Direct(select(_APPOINTMENT_SLOTS.c.slot_id)
                   .where(_APPOINTMENT_SLOTS.c.appointment_id == bindparam("appointment_id")))
_RELEASE_RESERVATIONS = Direct(delete(_RESERVATIONS).where(_RESERVATIONS.c.appointment_id == bindparam("appointment_id")))
# one slot per parameter set (run_many): an appointment spans one slot or a few
_RELEASE_SEATS = Direct(update(_SLOTS).where(_SLOTS.c.id == bindparam("slot_id"), _SLOTS.c.booked > 0)
                        .values(booked=_SLOTS.c.booked - 1))
_UNLINK_SLOTS = Direct(delete(_APPOINTMENT_SLOTS).where(_APPOINTMENT_SLOTS.c.appointment_id == bindparam("appointment_id")))
_PROVIDER_SLOTS = Direct(select(_SLOTS.c.id).where(_SLOTS.c.provider_id == bindparam("provider_id"),
                                                   _SLOTS.c.start >= bindparam("earliest_start"),
                                                   _SLOTS.c.start < bindparam("end"), _SLOTS.c.end > bindparam("start")))
_TAKE_SEATS = Direct(update(_SLOTS).where(_SLOTS.c.id == bindparam("slot_id")).values(booked=_SLOTS.c.booked + 1))
_HOLDS_TIME = Direct(select(_RESERVATIONS.c.appointment_id)
                     .where(_RESERVATIONS.c.appointment_id == bindparam("appointment_id")).limit(1))
_APPOINTMENT_FOR_UPDATE = select(Appointment).where(Appointment.id == bindparam("appointment_id")).with_for_update()
_PROVIDER_BLOCK = Direct(select(_BLOCKS.c.provider_id, _BLOCKS.c.resource_id, _BLOCKS.c.start, _BLOCKS.c.end)
                         .where(_BLOCKS.c.active.is_(True), _BLOCKS.c.provider_id == bindparam("provider_id"),
                                _BLOCKS.c.start < bindparam("end"), _BLOCKS.c.end > bindparam("start"))
                         .limit(1))
_RESERVE = {
    name: Direct(module.insert(_RESERVATIONS).on_conflict_do_nothing()
                 .returning(_RESERVATIONS.c.subject, _RESERVATIONS.c.unit, _RESERVATIONS.c.seat))
    for name, module in (("postgresql", postgresql), ("sqlite", sqlite))
}


@dataclass(frozen=True)
class EngineSettings:
    emergency_release: timedelta = timedelta(minutes=120)
    no_show_grace: timedelta = timedelta(minutes=15)
    hold_duration: timedelta = timedelta(minutes=10)
    #: How long a change asked of a calendar's outside owner (mirror mode) may wait for its answer.
    owner_answer_timeout: timedelta = timedelta(minutes=30)
    default_timezone: str = "America/New_York"


def slot_accepts(slot: Slot, appointment_type: str, urgency: str, now: datetime,
                 settings: EngineSettings) -> Optional[str]:
    """None when the slot may take this appointment, else why not."""
    if slot.slot_type == "blocked" or slot.blocked:
        return "the time is blocked"
    if slot.slot_type == "emergency":
        if urgency == "urgent" or now >= slot.start - settings.emergency_release:
            return None
        return "an emergency hold takes only urgent requests until it is released"
    if slot.slot_type in EXCLUSIVE_SLOT_TYPES and appointment_type != slot.slot_type:
        return f"a {slot.slot_type} slot takes only {slot.slot_type} appointments"
    return None


_ALLOW = Decision("allow")


def _insert_row(session: Session, row_object: Any) -> None:
    """Write a new (transient or pending) object with one Core INSERT … RETURNING and keep
    it as a clean persistent instance: the ORM flush of one row costs several times the
    statement itself, and every booking and new patient pays it.  The values are those the
    flush would send: a None is left to the column's default unless the type stores it."""
    state = instance_state(row_object)
    stores_none = _INSERTED_COLUMNS[state.class_]
    values = {key: value for key, value in state.dict.items()
              if key in stores_none and (value is not None or stores_none[key])}
    row, = _INSERT_RETURNING[state.class_].rows(session.connection(), values)
    if state.pending:
        session.expunge(row_object)
    _as_stored(session, row_object, row)  # an appointment is noted by _appointment_flushed


def _as_stored(session: Session, row_object: Any, row: Any) -> None:
    """Make the transient ``row_object`` the persistent instance of the ``row`` just inserted:
    every column as stored, defaults included, clean, exactly as if the session had flushed
    it, so that a rollback takes it out of the session again (SQLite may give its id to the
    next row).  Pending as ``Session.add`` makes it, less the save-update cascade, which costs
    more than the rest together and finds nothing here (the related rows of the callers'
    objects are written by INSERTs of their own); then persistent as the flush makes it."""
    state = instance_state(row_object)
    session._save_impl(state)
    state.dict.update(zip(_INSERTED_COLUMNS[state.class_], row))
    session._register_persistent({state})


def _assign(row_object: Any, **values: Any) -> None:
    """Set the attributes that differ: setting one to the value it has still marks the row
    dirty, and the next flush runs the whole unit of work to find nothing to write."""
    for name, value in values.items():
        if getattr(row_object, name) != value:
            setattr(row_object, name, value)


def _subject(kind: str, ident: int) -> str:
    return f"{kind}:{ident}"


def _snapshot(appointment: Appointment) -> dict[str, Any]:
    return {
        "status": appointment.status,
        "start": appointment.start.isoformat() if appointment.start else None,
        "end": appointment.end.isoformat() if appointment.end else None,
        "provider_id": appointment.provider_id,
        "location_id": appointment.location_id,
        "patient_id": appointment.patient_id,
        "type": appointment.appointment_type,
        "resource_ids": sorted(r.resource_id for r in appointment.resources),
    }


def _with_overbook(snapshot: dict[str, Any], overbooks: list[dict[str, Any]]) -> dict[str, Any]:
    """An audit snapshot with the overbooking verdicts (why the seat above capacity was given)."""
    return {**snapshot, "overbook": overbooks} if overbooks else snapshot


def _mirror_view(appointment: Appointment) -> tuple:
    """What a mirror message can change on an appointment (to spot a repeated message)."""
    return (_snapshot(appointment), appointment.placer_id, appointment.filler_id, appointment.reason,
            appointment.urgency, appointment.notes, appointment.conflict)


@dataclass
class _Work:
    """What one unit of work did, for the after-commit notifications."""

    changes: list[Change] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        session_factory: sessionmaker,
        *,
        plugins: Optional[PluginHost] = None,
        clock: Optional[Clock] = None,
        settings: EngineSettings = EngineSettings(),
    ):
        self.sessions = session_factory
        self.plugins = plugins or PluginHost(builtins=(), discover=False)
        self.clock = clock or SystemClock()
        self.settings = settings
        self._bound: Optional[Session] = None
        self._deferred: list[Change] = []
        self._savepoints = True

    # --- the unit of work ----------------------------------------------------

    def within(self, session: Session) -> "Scheduler":
        """A view of this scheduler whose calls join ``session``'s transaction.

        The caller owns the transaction: it applies several calls (all the
        commands of one HL7 message) and its own bookkeeping (marking the
        message applied) atomically, then calls ``notify_committed()``.  Each
        call runs in a savepoint, so a refused booking undoes only itself.
        """
        view = Scheduler.__new__(Scheduler)
        view.__dict__.update(self.__dict__)
        view._bound = session
        view._deferred = []
        view.sessions = lambda: nullcontext(session)
        return view

    def all_or_nothing(self) -> "Scheduler":
        """This bound view, its calls without a savepoint each (no SAVEPOINT and RELEASE
        per call): for a caller that rolls back all of them when one fails, as the
        commands of one HL7 message are.  An unbound scheduler is returned as it is."""
        if self._bound is None:
            return self
        view = Scheduler.__new__(Scheduler)
        view.__dict__.update(self.__dict__)  # the same session and list of changes to announce
        view._savepoints = False
        return view

    def notify_committed(self) -> None:
        changes, self._deferred = self._deferred, []
        for change in changes:
            self.plugins.after_change(change)

    @contextmanager
    def unit_of_work(self) -> Iterator[tuple[Session, _Work]]:
        """One session, one transaction; plugins hear of changes after commit."""
        work = _Work()
        if self._bound is not None:
            with self._bound.begin_nested() if self._savepoints else nullcontext():
                yield self._bound, work
            self._deferred.extend(work.changes)
            return
        with self.sessions() as session:
            with session.begin():
                yield session, work
        for change in work.changes:
            self.plugins.after_change(change)

    def _record(self, session: Session, work: _Work, change: Change, *, entity: str = "appointment",
                entity_id: Optional[int] = None, before=None, after=None) -> None:
        # plugins below read with Core on session.connection() too, which does not autoflush
        flush_changes(session)
        insert_at_flush_point(session, _AUDIT, {  # Core, no ORM unit of work
            "at": self.clock.now(),
            "actor": change.actor.label,
            "source": change.actor.source,
            "action": change.kind,
            "entity": entity,
            "entity_id": entity_id if entity_id is not None else change.appointment_id,
            "from_state": change.from_state,
            "to_state": change.to_state,
            "reason": change.reason,
            "before": before,
            "after": after,
        })
        self.plugins.schedule_changed(session, change)
        work.changes.append(change)

    # --- lookups ---------------------------------------------------------------

    def _appointment(self, session: Session, appointment_id: int, *, lock: bool = True) -> Appointment:
        if lock and session.get_bind().dialect.name == "postgresql" and \
                appointment_id not in session.info.get(_LOCKED_APPOINTMENTS, ()):
            appointment = session.scalars(_APPOINTMENT_FOR_UPDATE, {"appointment_id": appointment_id}).one_or_none()
        else:
            # SQLite's BEGIN IMMEDIATE already holds the write lock, so FOR UPDATE would add nothing;
            # an appointment this transaction has loaded comes from the identity map, without a SELECT
            appointment = session.get(Appointment, appointment_id)
        if appointment is None:
            raise NotFound("appointment", appointment_id)
        return appointment

    def find_appointment(self, *, placer_id: Optional[str] = None, filler_id: Optional[str] = None,
                         appointment_id: Optional[int] = None) -> Optional[Appointment]:
        with self.sessions() as session:
            return self._find_appointment(session, placer_id, filler_id, appointment_id)

    @staticmethod
    def _find_appointment(session, placer_id, filler_id, appointment_id=None) -> Optional[Appointment]:
        if appointment_id is not None:
            return session.get(Appointment, appointment_id)
        if not (placer_id or filler_id):
            return None
        looked_up = session.info.get(_APPOINTMENTS_LOOKED_UP)
        keys = [key for key in (("placer", placer_id), ("filler", filler_id)) if key[1]]
        if looked_up is not None and all(key in looked_up for key in keys):
            found = [looked_up[key] for key in keys if looked_up[key] is not None]
            return min(found, key=lambda appointment: appointment.id) if found else None
        return session.scalars(_BY_EXTERNAL_IDS[bool(placer_id), bool(filler_id)],
                               {"placer_id": placer_id, "filler_id": filler_id}).first()

    def look_up_appointments(self, placer_ids: Sequence[str], filler_ids: Sequence[str]) -> None:
        """Look up many appointments by placer and filler id with one query (their
        resources with a second), for the work about to be done in this transaction (a view
        bound by ``within``): ``find_appointment`` then needs no query of its own for them.
        On PostgreSQL they are locked (FOR UPDATE) as they are loaded, so that ``_appointment``
        need not lock them one by one."""
        with self.sessions() as session:
            looked_up = session.info.setdefault(_APPOINTMENTS_LOOKED_UP, {})
            keys = [key for key in dict.fromkeys([("placer", p) for p in placer_ids if p]
                                                 + [("filler", f) for f in filler_ids if f])
                    if key not in looked_up]
            if not keys:
                return
            placers = [value for kind, value in keys if kind == "placer"]
            fillers = [value for kind, value in keys if kind == "filler"]
            looked_up.update((key, None) for key in keys)
            locked = session.info.setdefault(_LOCKED_APPOINTMENTS, set()) \
                if session.get_bind().dialect.name == "postgresql" else None
            statement = _BY_EXTERNAL_ID_LISTS if locked is None else _LOCK_BY_EXTERNAL_ID_LISTS
            appointments = session.scalars(statement, {"placers": placers, "fillers": fillers}).all()
            for appointment in appointments:
                if locked is not None:
                    locked.add(appointment.id)
                for key in (("placer", appointment.placer_id), ("filler", appointment.filler_id)):
                    if key in looked_up and looked_up[key] is None:
                        looked_up[key] = appointment  # in id order: the first is the oldest
            # their resources: a collection already loaded (or changed) in this session is kept
            unloaded = {appointment.id: appointment for appointment in appointments
                        if "resources" not in instance_state(appointment).dict}
            if unloaded:
                resources: dict[int, list[AppointmentResource]] = {appointment_id: [] for appointment_id in unloaded}
                for link in session.scalars(_RESOURCES_OF, {"appointment_ids": list(unloaded)}):
                    resources[link.appointment_id].append(link)
                for appointment_id, links in resources.items():
                    set_committed_value(unloaded[appointment_id], "resources", links)

    def appointment(self, appointment_id: int) -> Appointment:
        with self.sessions() as session:
            appointment = session.get(Appointment, appointment_id)
            if appointment is None:
                raise NotFound("appointment", appointment_id)
            appointment.resources  # load while the session is open
            return appointment

    # --- slot search -------------------------------------------------------------

    def free_slots(self, query: SlotQuery, excluded: Optional[list[Candidate]] = None) -> list[Candidate]:
        """Free slots that fit the request, ranked: plugin scores, then earliest.

        Plugins may leave candidates out (``slotengine_exclude_slot``); pass a
        list as ``excluded`` to receive those, each with its reason."""
        now = self.clock.now()
        with self.sessions() as session:
            providers = self._matching_providers(session, query)
            if providers is not None and not providers:
                return []
            weekdays, earliest, latest = query.weekdays, query.earliest, query.latest
            busy: list[tuple[datetime, datetime]] = []
            if query.patient_id is not None:
                patient = session.get(Patient, query.patient_id)
                if patient is None:
                    raise NotFound("patient", query.patient_id)
                weekdays = weekdays or patient.preferred_weekdays or None
                earliest = earliest or patient.preferred_earliest
                latest = latest or patient.preferred_latest
                busy = list(
                    session.execute(
                        select(Appointment.start, Appointment.end).where(
                            Appointment.patient_id == patient.id,
                            Appointment.status.in_([s.value for s in OCCUPYING]),
                            Appointment.end > query.start,
                            Appointment.start < query.end,
                        )
                    )
                )
            types = [t for t in ("new_patient", "emergency") if t]
            if query.appointment_type in EXCLUSIVE_SLOT_TYPES:
                types.append(query.appointment_type)
            conditions = [
                Slot.start >= query.start,
                Slot.start < query.end,
                Slot.blocked.is_(False),
                Slot.slot_type.in_(types),
            ]
            if query.urgency != "urgent":
                conditions.append(
                    or_(Slot.slot_type != "emergency", Slot.start <= now + self.settings.emergency_release)
                )
            if query.appointment_type not in EXCLUSIVE_SLOT_TYPES:
                conditions.append(Slot.slot_type.not_in(EXCLUSIVE_SLOT_TYPES))
            if providers is not None:
                conditions.append(Slot.provider_id.in_(providers))
            if query.location_id is not None:
                conditions.append(Slot.location_id == query.location_id)
            if weekdays:
                conditions.append(Slot.local_weekday.in_(list(weekdays)))
            if earliest is not None:
                conditions.append(Slot.local_minute >= earliest.hour * 60 + earliest.minute)
            if latest is not None:
                conditions.append(Slot.local_minute < latest.hour * 60 + latest.minute)
            conditions.append(Slot.start >= now)
            want = query.limit * (5 if self.plugins.has_scorers else 1)
            filtered = self.plugins.has_slot_filters
            duration = timedelta(minutes=query.duration_minutes) if query.duration_minutes else None
            rows = session.execute(
                select(
                    Slot.id, Slot.start, Slot.end, Slot.provider_id, Slot.resource_id,
                    Slot.location_id, Slot.slot_type, Slot.capacity - Slot.booked,
                )
                .where(and_(*conditions), Slot.booked < Slot.capacity)
                .order_by(Slot.start, Slot.id)
                .limit(want * (8 if filtered else 4) + 20)  # room for the candidates filters leave out
            ).all()
            candidates: list[Candidate] = []
            for row in rows:
                slot_id, start, end, provider_id, resource_id, location_id, slot_type, left = row
                slot_ids: tuple[int, ...] = (slot_id,)
                if duration and end - start < duration:
                    run = self._consecutive_free(session, provider_id, resource_id, start, start + duration, types,
                                                 None if query.urgency == "urgent"
                                                 else now + self.settings.emergency_release)
                    if run is None:
                        continue
                    slot_ids, end = run
                elif duration:
                    end = start + duration
                if any(b_start < end and start < b_end for b_start, b_end in busy):
                    continue
                candidate = Candidate(slot_id, start, end, provider_id, resource_id, location_id, slot_type, left,
                                      slot_ids=slot_ids)
                if filtered:
                    candidate.excluded = self.plugins.slot_exclusion(candidate, query, session) or ""
                    if candidate.excluded:
                        if excluded is not None:
                            excluded.append(candidate)
                        continue
                candidates.append(candidate)
                if len(candidates) >= want:
                    break
            if query.overbook and len(candidates) < query.limit and self.plugins.has_overbook_judges:
                candidates += self._overbook_candidates(session, query, conditions, duration, busy,
                                                        want - len(candidates), excluded)
            if self.plugins.has_scorers:
                for candidate in candidates:
                    candidate.scores = self.plugins.slot_scores(candidate, query, session)
                    candidate.score = sum(candidate.scores.values())
                # a seat above capacity is the last resort: after every free slot
                candidates.sort(key=lambda c: (c.overbook is not None, -c.score, c.start, c.slot_id))
            return candidates[: query.limit]

    def _overbook_candidates(self, session: Session, query: SlotQuery, conditions: list, duration: Optional[timedelta],
                             busy: list[tuple[datetime, datetime]], want: int,
                             excluded: Optional[list[Candidate]]) -> list[Candidate]:
        """Seats in full slots that the plugins allow (``slotengine_allow_overbook``), each
        with the verdict.  One slot each: an overbooked visit does not span slots."""
        rows = session.execute(
            select(Slot.id, Slot.start, Slot.end, Slot.provider_id, Slot.resource_id, Slot.location_id, Slot.slot_type)
            .where(and_(*conditions), Slot.booked >= Slot.capacity, Slot.provider_id.is_not(None))
            .order_by(Slot.start, Slot.id)
            .limit(want * 4 + 20)
        ).all()
        found: list[Candidate] = []
        for slot_id, start, end, provider_id, resource_id, location_id, slot_type in rows:
            if duration and end - start < duration:
                continue
            end = start + duration if duration else end
            if any(b_start < end and start < b_end for b_start, b_end in busy):
                continue
            candidate = Candidate(slot_id, start, end, provider_id, resource_id, location_id, slot_type, 0,
                                  slot_ids=(slot_id,))
            if self.plugins.has_slot_filters:
                candidate.excluded = self.plugins.slot_exclusion(candidate, query, session) or ""
                if candidate.excluded:
                    if excluded is not None:
                        excluded.append(candidate)
                    continue
            verdict = self.plugins.allow_overbook(session, candidate, query.patient_id, query.appointment_type,
                                                  "search")
            if verdict["allow"]:
                candidate.overbook = verdict
                found.append(candidate)
                if len(found) >= want:
                    break
        return found

    def _matching_providers(self, session: Session, query: SlotQuery) -> Optional[list[int]]:
        """Provider ids allowed by the query, or None for "any" (no provider criterion)."""
        gender = query.provider_gender
        if query.patient_id is not None and not gender:
            gender = session.scalar(select(Patient.preferred_provider_gender).where(Patient.id == query.patient_id)) or None
        if query.provider_id is not None:
            return [query.provider_id]
        if not (query.specialty or gender or query.language):
            return None
        rows = session.execute(
            select(Provider.id, Provider.gender, Provider.languages, Provider.specialties).where(
                Provider.active.is_(True)
            )
        )
        chosen = []
        for provider_id, p_gender, languages, specialties in rows:
            if query.specialty and query.specialty not in (specialties or []):
                continue
            if gender and p_gender != gender:
                continue
            if query.language and query.language not in (languages or []):
                continue
            chosen.append(provider_id)
        return chosen

    @staticmethod
    def _consecutive_free(session, provider_id, resource_id, start, end, types, emergency_released_until=None):
        """Slot ids covering [start, end) back to back, or None.  Emergency slots
        that start after ``emergency_released_until`` (None: urgent, all usable)
        are not usable, as in ``slot_accepts``."""
        owner = Slot.provider_id == provider_id if provider_id is not None else Slot.resource_id == resource_id
        rows = session.execute(
            select(Slot.id, Slot.start, Slot.end, Slot.booked, Slot.capacity, Slot.blocked, Slot.slot_type)
            .where(owner, *Slot.overlapping(start, end))
            .order_by(Slot.start)
        ).all()
        cursor = start
        ids = []
        for slot_id, s_start, s_end, booked, capacity, blocked, slot_type in rows:
            if s_start > cursor or booked >= capacity or blocked or slot_type not in types:
                return None
            if slot_type == "emergency" and emergency_released_until is not None and s_start > emergency_released_until:
                return None
            ids.append(slot_id)
            cursor = s_end
        if cursor < end:
            return None
        return tuple(ids), end

    # --- booking ---------------------------------------------------------------

    def book(self, request: BookingRequest, actor: Actor) -> Appointment:
        return self._book(request, actor, hold=False)

    def hold(self, request: BookingRequest, actor: Actor) -> Appointment:
        """Take the time for a short while (``hold_duration``) until confirmed."""
        return self._book(request, actor, hold=True)

    def _book(self, request: BookingRequest, actor: Actor, *, hold: bool,
              owner: Optional[str] = None) -> Appointment:
        """``owner``: the outside system asked for this booking; it gives the filler id, and
        the hold lasts until it answers."""
        if request.appointment_type not in APPOINTMENT_TYPES:
            raise InvalidRequest(
                f"unknown appointment type {request.appointment_type!r}; expected one of {', '.join(APPOINTMENT_TYPES)}"
            )
        now = self.clock.now()
        for attempt in (1, 2):
            try:
                with self.unit_of_work() as (session, work):
                    patient_id = self._booking_patient(session, request.patient_id)
                    appointment = Appointment(
                        placer_id=request.placer_id,
                        filler_id=request.filler_id,
                        # written as what it is about to become, so that a plain booking is one
                        # INSERT (plus the filler id); audited as requested -> booked/held
                        status=(Status.HELD if hold else Status.BOOKED).value,
                        hold_expires_at=now + (self.settings.owner_answer_timeout if owner else
                                               self.settings.hold_duration) if hold else None,
                        appointment_type=request.appointment_type,
                        reason=request.reason,
                        urgency=request.urgency,
                        patient_id=patient_id,
                        notes=request.notes,
                        source=actor.kind,
                        created_at=now,
                        updated_at=now,
                        start=now,
                        end=now,
                        resources=[],
                    )  # not added: _occupy writes it once its time is claimed
                    claimed: list[int] = []
                    overbooks: list[dict[str, Any]] = []
                    seat = self._occupy(session, appointment, request, now, claimed, overbooks)  # writes the row
                    if not appointment.filler_id and owner is None:
                        filler_id = f"SE{appointment.id}"
                        _SET_FILLER_ID.run(session.connection(),
                                           {"appointment_id": appointment.id, "new_filler_id": filler_id})
                        set_committed_value(appointment, "filler_id", filler_id)
                        _note_appointment(session, appointment)
                    target = Status.HELD if hold else (Status.OVERBOOKED if seat or overbooks else Status.BOOKED)
                    decision = self._check_booking(session, appointment, "hold" if hold else "book")
                    if decision.decision == "veto":
                        raise BookingVetoed(decision.plugin, decision.reason)
                    if decision.decision == "review":
                        target = Status.HELD
                        appointment.hold_expires_at = None
                        appointment.review_reason = f"{decision.plugin}: {decision.reason}"
                    if appointment.status != target.value:  # overbooked, or held for review
                        appointment.status = target.value
                    change = Change(
                        "held" if target is Status.HELD else "booked",
                        appointment.id,
                        Status.REQUESTED.value,
                        target.value,
                        actor,
                        appointment.review_reason or request.reason,
                        slot_ids=tuple(claimed),
                        detail={"overbook": overbooks} if overbooks else {},
                    )
                    self._record(session, work, change, after=_with_overbook(_snapshot(appointment), overbooks))
                return appointment
            except SlotUnavailable:
                if attempt == 2 or not self.release_expired_holds():
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _booking_patient(session: Session, patient_id: int) -> int:
        """The id to book under: the patient's own, or the survivor's once merged."""
        seen = set()
        while True:
            found = _PATIENT_MERGED_INTO.rows(session.connection(), {"patient_id": patient_id})
            if not found:
                raise NotFound("patient", patient_id)
            merged_into = found[0].merged_into_id
            if merged_into is None or patient_id in seen:
                return patient_id
            seen.add(patient_id)
            patient_id = merged_into

    def _check_booking(self, session: Session, appointment: Appointment, action: str):
        """Ask the plugins; the patient (an ORM load) is fetched only when one will look at it."""
        if not self.plugins.has_booking_checks:
            return _ALLOW
        patient = session.get(Patient, appointment.patient_id) if appointment.patient_id is not None else None
        return self.plugins.check_booking(session, appointment, patient, action)

    def _slot_ids(self, session: Session, appointment_id: int) -> list[int]:
        return [row.slot_id for row in _SLOT_IDS.rows(session.connection(), {"appointment_id": appointment_id})]

    def _occupy(self, session: Session, appointment: Appointment, request: BookingRequest, now: datetime,
                claimed_slot_ids: Optional[list[int]] = None,
                overbooks: Optional[list[dict[str, Any]]] = None) -> int:
        """Claim slots and reservations for the appointment; returns the seat (0 = not overbooked).

        The hot path of every booking, so it speaks Core, not ORM: the slots are
        claimed before the appointment row is written (a refusal costs little),
        and the reservation rows of provider, resources and patient go in with
        one ``INSERT … ON CONFLICT DO NOTHING RETURNING``: what did not come back
        was taken by somebody else.  ``claimed_slot_ids`` receives the slot ids,
        ``overbooks`` the plugins' verdict for each seat taken above a full
        slot's capacity (``request.overbook``)."""
        connection = session.connection()  # Core statements below: no autoflush, no ORM bookkeeping
        overbooks = [] if overbooks is None else overbooks
        overbooked_to = 0  # the highest slot count an overbooking reached: the provider seats needed
        whole = None
        if request.slot_id is not None and request.start is None and request.duration_minutes is None:
            # The usual request, one whole slot: claimed, with its provider's time blocks
            # checked, in one statement.  If that fails the general path says why.
            whole = connection.execute(_CLAIM_WHOLE_SLOT, {"slot_id": request.slot_id}).first()
        if whole is not None:
            why = slot_accepts(whole, appointment.appointment_type, appointment.urgency, now, self.settings)
            if why:
                raise SlotTypeMismatch(f"slot {whole.id} at {whole.start.isoformat()}: {why}", subject=f"slot:{whole.id}")
            slots, slot_ids, start, end = [whole], [whole.id], whole.start, whole.end
            appointment.provider_id, appointment.location_id = whole.provider_id, whole.location_id
            appointment.start, appointment.end = start, end
        else:
            slots = self._slots_for(session, request)
            first = slots[0] if slots else None
            if first is not None:
                start = request.start or first.start
                duration = timedelta(minutes=request.duration_minutes) if request.duration_minutes else first.end - first.start
                appointment.provider_id = first.provider_id
                appointment.location_id = first.location_id
            else:
                if request.start is None or request.duration_minutes is None:
                    raise InvalidRequest("a booking without a slot needs a start and a duration")
                start, duration = request.start, timedelta(minutes=request.duration_minutes)
                appointment.provider_id = request.provider_id
            if duration <= timedelta(0):
                raise InvalidRequest("duration must be positive")
            end = start + duration
            appointment.start, appointment.end = start, end
            if slots:
                # the slots (sorted by start) must cover [start, end) without a gap
                covered_until = start
                for slot in slots:
                    if slot.start > covered_until:
                        break
                    covered_until = max(covered_until, slot.end)
                if covered_until < end:
                    raise SlotUnavailable(
                        f"{duration.seconds // 60} minutes from {start.isoformat()} do not fit in the provider's free slots",
                        subject=_subject("provider", appointment.provider_id or 0),
                    )
            slot_ids = []
            for slot in slots:
                why = slot_accepts(slot, appointment.appointment_type, appointment.urgency, now, self.settings)
                if why:
                    raise SlotTypeMismatch(f"slot {slot.id} at {slot.start.isoformat()}: {why}", subject=f"slot:{slot.id}")
                claimed = connection.execute(_CLAIM_SEAT, {"slot_id": slot.id}).rowcount
                if claimed != 1 and request.overbook and not slot.blocked:
                    overbooked_to = max(overbooked_to,
                                        self._claim_overbook_seat(session, appointment, slot, start, end, overbooks))
                    claimed = 1
                if claimed != 1:
                    raise SlotUnavailable(f"slot {slot.id} at {slot.start.isoformat()} is full", subject=f"slot:{slot.id}")
                slot_ids.append(slot.id)
        capacity = max(min((s.capacity for s in slots), default=1), overbooked_to)
        # sorted: two bookings asking for the same rooms lock them in the same order (no deadlock)
        resource_ids = sorted(set(request.resource_ids))
        self._check_blocks(session, None if whole is not None else appointment.provider_id, resource_ids, start, end)
        if resource_ids:
            known = set(connection.execute(select(_RESOURCES.c.id).where(_RESOURCES.c.id.in_(resource_ids))).scalars())
            missing = [r for r in resource_ids if r not in known]
            if missing:
                raise NotFound("resource", missing[0])
        if appointment.id is None:
            _insert_row(session, appointment)  # the row slot links and reservations point at
        if slot_ids:
            _LINK_SLOT.run_many(connection, [{"appointment_id": appointment.id, "slot_id": s} for s in slot_ids])
        if claimed_slot_ids is not None:
            claimed_slot_ids.extend(slot_ids)
        seat = self._reserve_time(session, appointment.id, start, end, appointment.provider_id, resource_ids,
                                  appointment.patient_id, capacity)
        for resource_id in resource_ids:
            appointment.resources.append(AppointmentResource(resource_id=resource_id))
        return seat

    def _claim_overbook_seat(self, session: Session, appointment: Appointment, slot, start: datetime, end: datetime,
                             overbooks: list[dict[str, Any]]) -> int:
        """One more seat in a full slot if the plugins allow it; returns the slot's new count.

        The slot row is locked first, so the verdict's arithmetic is about the
        slot as it will be committed (on SQLite the writer lock does the same)."""
        connection = session.connection()
        booked = connection.execute(select(_SLOTS.c.booked).where(_SLOTS.c.id == slot.id).with_for_update()).scalar_one()
        candidate = Candidate(slot.id, start, end, slot.provider_id, slot.resource_id, slot.location_id, slot.slot_type,
                              0, slot_ids=(slot.id,))
        verdict = self.plugins.allow_overbook(session, candidate, appointment.patient_id, appointment.appointment_type,
                                              "book") if self.plugins.has_overbook_judges else \
            {"allow": False, "plugin": "", "reason": "no plugin allows overbooking"}
        if not verdict["allow"]:
            raise SlotUnavailable(f"slot {slot.id} at {slot.start.isoformat()} is full and may not be overbooked: "
                                  f"{verdict['plugin'] or 'engine'}: {verdict.get('reason', '')}",
                                  subject=f"slot:{slot.id}")
        connection.execute(update(_SLOTS).where(_SLOTS.c.id == slot.id).values(booked=_SLOTS.c.booked + 1))
        overbooks.append({**verdict, "slot_id": slot.id})
        return booked + 1

    def _slots_for(self, session: Session, request: BookingRequest) -> list:
        """The slots a request would use, as rows (id, start, end, owner, type, capacity…), by start."""
        if request.slot_id is not None:
            first = session.connection().execute(_SLOT_BY_ID, {"slot_id": request.slot_id}).first()
            if first is None:
                raise NotFound("slot", request.slot_id)
            start = request.start or first.start
            duration = timedelta(minutes=request.duration_minutes) if request.duration_minutes else first.end - first.start
            if start + duration <= first.end and first.start <= start:
                return [first]
            owner = (_SLOTS.c.provider_id == first.provider_id) if first.provider_id is not None \
                else (_SLOTS.c.resource_id == first.resource_id)
        elif request.provider_id is not None and request.start is not None:
            if session.connection().execute(select(Provider.__table__.c.id)
                                            .where(Provider.__table__.c.id == request.provider_id)).first() is None:
                raise NotFound("provider", request.provider_id)
            start = request.start
            duration = timedelta(minutes=request.duration_minutes or 15)
            owner = _SLOTS.c.provider_id == request.provider_id
        else:
            raise InvalidRequest("a booking needs a slot, or a provider and a start time")
        return list(session.connection().execute(
            select(*_SLOT_COLUMNS).where(owner, *Slot.overlapping(start, start + duration))
            .order_by(_SLOTS.c.start)
        ))

    def _check_blocks(self, session, provider_id, resource_ids, start, end) -> None:
        if provider_id is not None and not resource_ids:  # the common case, with a ready statement
            blocks = _PROVIDER_BLOCK.rows(session.connection(), {"provider_id": provider_id, "start": start, "end": end})
            if blocks:
                block = blocks[0]
                raise SlotUnavailable(f"provider:{provider_id} is blocked from {block.start.isoformat()} "
                                      f"to {block.end.isoformat()}", subject=f"provider:{provider_id}")
            return
        owners = []
        if provider_id is not None:
            owners.append(_BLOCKS.c.provider_id == provider_id)
        if resource_ids:
            owners.append(_BLOCKS.c.resource_id.in_(resource_ids))
        if not owners:
            return
        block = session.connection().execute(
            select(_BLOCKS.c.provider_id, _BLOCKS.c.resource_id, _BLOCKS.c.start, _BLOCKS.c.end)
            .where(_BLOCKS.c.active.is_(True), or_(*owners), _BLOCKS.c.start < end, _BLOCKS.c.end > start)
            .limit(1)
        ).first()
        if block is not None:
            who = f"provider:{block.provider_id}" if block.provider_id else f"resource:{block.resource_id}"
            raise SlotUnavailable(f"{who} is blocked from {block.start.isoformat()} to {block.end.isoformat()}", subject=who)

    def _reserve_time(self, session: Session, appointment_id: int, start: datetime, end: datetime,
                      provider_id: Optional[int], resource_ids: Sequence[int], patient_id: Optional[int],
                      capacity: int) -> int:
        """Write the reservation rows of everyone taking part; returns the provider's seat.

        Refusals name the first subject whose time was taken, provider first,
        then resources, then the patient (``PatientConflict``)."""
        span = calendar.units(start, end)
        wanted: list[tuple[str, int, type[SlotUnavailable]]] = []
        seat = 0
        if provider_id is not None:
            provider = _subject("provider", provider_id)
            if capacity > 1:
                seat = self._reserve_seat(session, provider, span, start, end, appointment_id, capacity)
            else:
                wanted.append((provider, 0, SlotUnavailable))
        wanted += [(_subject("resource", r), 0, SlotUnavailable) for r in resource_ids]
        if patient_id is not None:
            wanted.append((_subject("patient", patient_id), 0, PatientConflict))
        if not wanted:
            return seat
        taken = self._insert_reservations(session, [
            {"subject": subject, "unit": u, "seat": s, "appointment_id": appointment_id}
            for subject, s, _error in wanted for u in span
        ])
        for subject, s, error in wanted:
            if any((subject, u, s) not in taken for u in span):
                raise self._taken(session, error, subject, s, span, start, end, appointment_id)
        return seat

    def _reserve_seat(self, session, subject, span, start, end, appointment_id, capacity) -> int:
        """The lowest seat free for the whole span (capacity above one: overbooking)."""
        for seat in range(capacity):
            rows = [{"subject": subject, "unit": u, "seat": seat, "appointment_id": appointment_id} for u in span]
            if len(self._insert_reservations(session, rows)) == len(rows):
                return seat
            session.execute(delete(_RESERVATIONS).where(_RESERVATIONS.c.appointment_id == appointment_id,
                                                        _RESERVATIONS.c.subject == subject,
                                                        _RESERVATIONS.c.seat == seat))
        raise self._taken(session, SlotUnavailable, subject, capacity - 1, span, start, end, appointment_id)

    @staticmethod
    def _taken(session, error, subject, seat, span, start, end, appointment_id) -> SlotUnavailable:
        other = session.scalar(
            select(_RESERVATIONS.c.appointment_id).where(
                _RESERVATIONS.c.subject == subject, _RESERVATIONS.c.unit >= span.start,
                _RESERVATIONS.c.unit < span.stop, _RESERVATIONS.c.seat == seat,
                _RESERVATIONS.c.appointment_id != appointment_id,
            ).limit(1)
        )
        return error(
            f"{subject} is already booked between {start.isoformat()} and {end.isoformat()}"
            + (f" (appointment {other})" if other else ""),
            subject=subject,
        )

    @staticmethod
    def _insert_reservations(session: Session, rows: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
        """Insert what is free; returns the (subject, unit, seat) rows that went in.

        The primary key refuses the rest, whatever the number of concurrent
        writers: on PostgreSQL a conflicting row of an uncommitted transaction
        is waited for, then skipped if that transaction commits."""
        connection = session.connection()
        return set(map(tuple, _RESERVE[connection.dialect.name].run_many(connection, rows)))

    def _release(self, session: Session, appointment: Appointment) -> list[int]:
        """Give back the appointment's time; returns the freed slot ids."""
        connection = session.connection()
        _RELEASE_RESERVATIONS.run(connection, {"appointment_id": appointment.id})
        slot_ids = self._slot_ids(session, appointment.id)
        if slot_ids:
            _RELEASE_SEATS.run_many(connection, [{"slot_id": slot_id} for slot_id in slot_ids])
            _UNLINK_SLOTS.run(connection, {"appointment_id": appointment.id})
        return slot_ids

    @staticmethod
    def _on_overbooking_seat(session: Session, appointment: Appointment) -> bool:
        """Whether the appointment holds a seat above the first of its provider's time."""
        if appointment.provider_id is None:
            return False
        return session.scalar(
            select(Reservation.seat).where(
                Reservation.appointment_id == appointment.id,
                Reservation.subject == _subject("provider", appointment.provider_id),
                Reservation.seat > 0,
            ).limit(1)
        ) is not None

    def _reoccupy(self, session: Session, appointment: Appointment, now: datetime) -> int:
        request = BookingRequest(
            patient_id=appointment.patient_id,
            appointment_type=appointment.appointment_type,
            provider_id=appointment.provider_id,
            start=appointment.start,
            duration_minutes=int((appointment.end - appointment.start).total_seconds() // 60),
            resource_ids=tuple(r.resource_id for r in appointment.resources),
            urgency=appointment.urgency,
        )
        resources = list(appointment.resources)
        appointment.resources.clear()
        session.flush()
        slots = self._slots_for(session, request) if appointment.provider_id is not None else []
        if slots:
            request = replace(request, slot_id=slots[0].id)
        elif appointment.provider_id is not None:
            request = replace(request, provider_id=None)
        try:
            return self._occupy(session, appointment, request, now)
        except Exception:
            appointment.resources.extend(resources)
            raise

    # --- transitions -------------------------------------------------------------

    def _transition(self, appointment_id: int, target: Status, actor: Actor, reason: str, kind: str,
                    *, guard=None) -> Appointment:
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            before = _snapshot(appointment)
            current = appointment.status
            check_transition(appointment.id, current, target.value)
            if guard:
                guard(appointment, now)
            freed: list[int] = []
            if target in RELEASING and Status(current) in OCCUPYING:
                freed = self._release(session, appointment)
            elif target in OCCUPYING and Status(current) not in OCCUPYING:
                seat = self._reoccupy(session, appointment, now)
                if target is Status.BOOKED and seat:
                    target = Status.OVERBOOKED
            elif target is Status.BOOKED and self._on_overbooking_seat(session, appointment):
                # a confirmed hold / reversed arrival keeps the seat it sits on
                target = Status.OVERBOOKED
            appointment.status = target.value
            appointment.updated_at = now
            if target is not Status.HELD:
                appointment.hold_expires_at = None
            change = Change(kind, appointment.id, current, target.value, actor, reason, slot_ids=tuple(freed))
            self._record(session, work, change, before=before, after=_snapshot(appointment))
        return appointment

    def confirm_hold(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        def guard(appointment: Appointment, now: datetime) -> None:
            if appointment.hold_expires_at and appointment.hold_expires_at <= now:
                raise SlotUnavailable(f"the hold on appointment {appointment.id} expired at {appointment.hold_expires_at.isoformat()}")
            if appointment.status == Status.HELD.value and appointment.review_reason:
                appointment.review_reason = ""
        return self._transition(appointment_id, Status.BOOKED, actor, reason, "booked", guard=guard)

    def cancel(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.CANCELLED, actor, reason, "cancelled")

    def discontinue(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.DISCONTINUED, actor, reason, "discontinued")

    def delete(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.DELETED, actor, reason, "deleted")

    def reinstate(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        """Undo a cancellation: only if the time is still free."""
        return self._transition(appointment_id, Status.BOOKED, actor, reason, "reinstated")

    def mark_no_show(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        def guard(appointment: Appointment, now: datetime) -> None:
            allowed = appointment.start + self.settings.no_show_grace
            if now < allowed:
                raise TooEarly(
                    f"appointment {appointment.id} starts at {appointment.start.isoformat()}; "
                    f"a no-show can be recorded from {allowed.isoformat()}"
                )
        return self._transition(appointment_id, Status.NO_SHOW, actor, reason, "no_show", guard=guard)

    def undo_no_show(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.BOOKED, actor, reason, "no_show_reversed")

    def arrive(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.ARRIVED, actor, reason, "arrived")

    def undo_arrival(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.BOOKED, actor, reason, "arrival_reversed")

    def check_in(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.CHECKED_IN, actor, reason, "checked_in")

    def undo_check_in(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.ARRIVED, actor, reason, "check_in_reversed")

    def complete(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.COMPLETED, actor, reason, "completed")

    def undo_completion(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        return self._transition(appointment_id, Status.CHECKED_IN, actor, reason, "completion_reversed")

    def reschedule(self, appointment_id: int, request: BookingRequest, actor: Actor, reason: str = "", *,
                   requester: Optional[dict[str, Any]] = None) -> Appointment:
        """Move a booked appointment to another slot/time in one transaction: the
        old time is only given up if the new one can be taken.  ``requester``:
        what the caller wants other plugins to know, in the change's detail
        (``{"patient_told": True}``: the caller tells the patient itself)."""
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            before = _snapshot(appointment)
            current = appointment.status
            check_transition(appointment.id, current, Status.BOOKED.value)
            if Status(current) not in (Status.BOOKED, Status.OVERBOOKED):
                raise InvalidRequest(f"appointment {appointment.id} is {current}; only booked appointments are rescheduled")
            freed = self._release(session, appointment)
            appointment.resources.clear()
            session.flush()
            request = replace(request, patient_id=appointment.patient_id,
                              appointment_type=request.appointment_type or appointment.appointment_type)
            overbooks: list[dict[str, Any]] = []
            seat = self._occupy(session, appointment, request, now, overbooks=overbooks)
            decision = self._check_booking(session, appointment, "reschedule")
            if decision.decision == "veto":
                raise BookingVetoed(decision.plugin, decision.reason)
            target = Status.OVERBOOKED if seat or overbooks else Status.BOOKED
            if decision.decision == "review":
                # A booked visit stays booked at its new time; staff see why it needs review
                # (booked -> held is not a move the state machine allows).
                appointment.review_reason = f"{decision.plugin}: {decision.reason}"
            appointment.status = target.value
            appointment.updated_at = now
            claimed = set(self._slot_ids(session, appointment.id))
            change = Change("rescheduled", appointment.id, current, target.value, actor, reason,
                            slot_ids=tuple(s for s in freed if s not in claimed),
                            detail={"previous_start": before["start"], **({"overbook": overbooks} if overbooks else {}),
                                    **({"requester": requester} if requester else {})})
            self._record(session, work, change, before=before, after=_with_overbook(_snapshot(appointment), overbooks))
        return appointment

    def modify(self, appointment_id: int, actor: Actor, *, reason: Optional[str] = None, notes: Optional[str] = None,
               why: str = "") -> Appointment:
        """Change what an appointment is for (``reason``) or its ``notes``, not its time:
        a ``modified`` change (SIU S14).  ``None`` leaves a field as it is; nothing
        different records nothing."""
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            if Status(appointment.status) in RELEASING:
                raise InvalidRequest(f"appointment {appointment.id} is {appointment.status}; it cannot be modified")
            before = {**_snapshot(appointment), "reason": appointment.reason, "notes": appointment.notes}
            changed = False
            if reason is not None and reason[:400] != appointment.reason:
                appointment.reason, changed = reason[:400], True
            if notes is not None and notes != appointment.notes:
                appointment.notes, changed = notes, True
            if not changed:
                return appointment
            appointment.updated_at = now
            change = Change("modified", appointment.id, appointment.status, appointment.status, actor, why,
                            detail={"fields": [f for f, v in (("reason", reason), ("notes", notes)) if v is not None]})
            self._record(session, work, change, before=before,
                         after={**_snapshot(appointment), "reason": appointment.reason, "notes": appointment.notes})
        return appointment

    def release_expired_holds(self) -> int:
        """Cancel holds whose time ran out; returns how many were released."""
        self.expire_change_requests()
        now = self.clock.now()
        with self.sessions() as session:
            ids = list(
                session.scalars(
                    select(Appointment.id).where(
                        Appointment.status == Status.HELD.value,
                        Appointment.hold_expires_at.is_not(None),
                        Appointment.hold_expires_at <= now,
                    ).limit(500)
                )
            )
        released = 0
        for appointment_id in ids:
            try:
                self._transition(appointment_id, Status.CANCELLED, Actor("system", "hold-expiry"),
                                 "hold expired", "hold_expired")
                released += 1
            except Exception:  # noqa: BLE001 - confirmed meanwhile; nothing to release
                log.debug("hold not released", extra={"appointment_id": appointment_id})
        return released

    # --- calendars owned elsewhere (mirror mode) --------------------------------------

    def request_booking(self, request: BookingRequest, actor: Actor, reason: str = "", *,
                        detail: Optional[dict[str, Any]] = None) -> ChangeOutcome:
        """Book; or, where an outside system owns the calendar
        (``slotengine_schedule_owner``), hold the time and ask that system.
        ``detail`` is kept on the request and handed back in the
        ``change_confirmed`` / ``change_refused`` / ``change_expired`` change."""
        with self.unit_of_work() as (session, work):
            view = self.within(session)
            provider_id, location_id = self._calendar_of(session, request)
            owner = self.plugins.schedule_owner(session, provider_id, location_id)
            if owner is None:
                appointment = view.book(request, actor)
                outcome = ChangeOutcome("applied", appointment.id, appointment.status)
            else:
                request = replace(request, placer_id=request.placer_id or
                                  f"{REQUESTED_PLACER_PREFIX}{uuid.uuid4().hex[:16].upper()}")
                appointment = view._book(request, actor, hold=True, owner=owner)
                asked = self._ask_owner(session, work, "book", appointment, owner, actor, reason or request.reason,
                                        detail, start=appointment.start, end=appointment.end,
                                        provider_id=appointment.provider_id)
                outcome = ChangeOutcome("requested", appointment.id, appointment.status, owner, asked.id)
            work.changes.extend(view._deferred)
        return outcome

    def request_reschedule(self, appointment_id: int, request: BookingRequest, actor: Actor, reason: str = "", *,
                           detail: Optional[dict[str, Any]] = None) -> ChangeOutcome:
        """Reschedule; or ask the calendar's outside owner to (our copy keeps its
        time until the owner's own message moves it)."""
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            owner = self.plugins.schedule_owner(session, appointment.provider_id, appointment.location_id)
            if owner is None:
                view = self.within(session)
                moved = view.reschedule(appointment_id, request, actor, reason, requester=detail)
                work.changes.extend(view._deferred)
                return ChangeOutcome("applied", moved.id, moved.status)
            if Status(appointment.status) not in (Status.BOOKED, Status.OVERBOOKED):
                raise InvalidRequest(f"appointment {appointment.id} is {appointment.status}; "
                                     "only booked appointments are rescheduled")
            start, end, provider_id = self._requested_time(session, request, appointment)
            asked = self._ask_owner(session, work, "reschedule", appointment, owner, actor, reason, detail,
                                    start=start, end=end, provider_id=provider_id)
            return ChangeOutcome("requested", appointment.id, appointment.status, owner, asked.id)

    def request_cancellation(self, appointment_id: int, actor: Actor, reason: str = "", *,
                             detail: Optional[dict[str, Any]] = None) -> ChangeOutcome:
        """Cancel; or ask the calendar's outside owner to."""
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            owner = self.plugins.schedule_owner(session, appointment.provider_id, appointment.location_id)
            if owner is None:
                view = self.within(session)
                cancelled = view.cancel(appointment_id, actor, reason)
                work.changes.extend(view._deferred)
                return ChangeOutcome("applied", cancelled.id, cancelled.status)
            check_transition(appointment.id, appointment.status, Status.CANCELLED.value)
            asked = self._ask_owner(session, work, "cancel", appointment, owner, actor, reason, detail)
            return ChangeOutcome("requested", appointment.id, appointment.status, owner, asked.id)

    def resolve_change_request(self, request_id: int, answer: str, actor: Actor, reason: str = "", *,
                               filler_id: Optional[str] = None) -> ChangeRequest:
        """The owner's answer to a request: ``accepted`` (it will; its schedule
        message confirms later) or ``refused`` (a requested booking's hold is
        released).  Answers to requests already settled change nothing."""
        if answer not in ("accepted", "refused"):
            raise InvalidRequest(f"an owner's answer is accepted or refused, not {answer!r}")
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            asked = session.scalars(select(ChangeRequest).where(ChangeRequest.id == request_id)
                                    .with_for_update()).one_or_none()
            if asked is None:
                raise NotFound("change request", request_id)
            if asked.status not in _OPEN_REQUESTS:
                return asked
            appointment = self._appointment(session, asked.appointment_id)
            if filler_id and not appointment.filler_id:
                appointment.filler_id = filler_id
            if answer == "accepted":
                asked.status, asked.outcome = "accepted", reason or "accepted by the owner"
                return asked
            self._settle(session, work, asked, appointment, "refused", reason or "refused by the owner", actor, now)
        return asked

    def expire_change_requests(self) -> int:
        """Requests their owner did not settle in time: expired, and a requested
        booking's hold released.  Returns how many expired."""
        now = self.clock.now()
        with self.sessions() as session:
            ids = list(session.scalars(select(ChangeRequest.id).where(
                ChangeRequest.status.in_(_OPEN_REQUESTS), ChangeRequest.expires_at <= now).limit(500)))
        expired = 0
        actor = Actor("system", "request-expiry")
        for request_id in ids:
            with self.unit_of_work() as (session, work):
                asked = session.scalars(select(ChangeRequest).where(ChangeRequest.id == request_id)
                                        .with_for_update()).one()
                if asked.status in _OPEN_REQUESTS:
                    appointment = self._appointment(session, asked.appointment_id)
                    self._settle(session, work, asked, appointment, "expired",
                                 f"{asked.owner} did not answer by {asked.expires_at.isoformat()}", actor, now)
                    expired += 1
        return expired

    def change_requests(self, *, appointment_id: Optional[int] = None, status: Optional[str] = None,
                        limit: int = 200) -> list[ChangeRequest]:
        with self.sessions() as session:
            stmt = select(ChangeRequest).order_by(ChangeRequest.id.desc()).limit(limit)
            if appointment_id is not None:
                stmt = stmt.where(ChangeRequest.appointment_id == appointment_id)
            if status is not None:
                stmt = stmt.where(ChangeRequest.status == status)
            return list(session.scalars(stmt))

    @staticmethod
    def _calendar_of(session: Session, request: BookingRequest) -> tuple[Optional[int], Optional[int]]:
        if request.slot_id is not None:
            row = session.connection().execute(_SLOT_BY_ID, {"slot_id": request.slot_id}).first()
            if row is None:
                raise NotFound("slot", request.slot_id)
            return row.provider_id, row.location_id
        if request.provider_id is not None:
            return request.provider_id, session.scalar(select(Provider.location_id)
                                                       .where(Provider.id == request.provider_id))
        return None, None

    @staticmethod
    def _requested_time(session: Session, request: BookingRequest,
                        appointment: Appointment) -> tuple[datetime, datetime, Optional[int]]:
        minutes = request.duration_minutes or int((appointment.end - appointment.start).total_seconds() // 60)
        if request.slot_id is not None:
            row = session.connection().execute(_SLOT_BY_ID, {"slot_id": request.slot_id}).first()
            if row is None:
                raise NotFound("slot", request.slot_id)
            return row.start, row.start + timedelta(minutes=minutes), row.provider_id or appointment.provider_id
        if request.start is None:
            raise InvalidRequest("a reschedule request needs a slot or a start time")
        return request.start, request.start + timedelta(minutes=minutes), request.provider_id or appointment.provider_id

    def _ask_owner(self, session: Session, work: _Work, kind: str, appointment: Appointment, owner: str,
                   actor: Actor, reason: str, detail: Optional[dict[str, Any]], *, start: Optional[datetime] = None,
                   end: Optional[datetime] = None, provider_id: Optional[int] = None) -> ChangeRequest:
        now = self.clock.now()
        asked = ChangeRequest(kind=kind, appointment_id=appointment.id, owner=owner, status="pending",
                              requested_start=start, requested_end=end, requested_provider_id=provider_id,
                              reason=reason, actor=actor.label, detail=dict(detail or {}), outcome="",
                              created_at=now, expires_at=now + self.settings.owner_answer_timeout)
        session.add(asked)
        session.flush()
        change = Change("change_requested", appointment.id, appointment.status, appointment.status, actor, reason,
                        detail=_request_detail(asked))
        self._record(session, work, change, entity="change_request", entity_id=asked.id)
        return asked

    def _settle(self, session: Session, work: _Work, asked: ChangeRequest, appointment: Appointment, status: str,
                outcome: str, actor: Actor, now: datetime) -> None:
        """Close a request; a requested booking that did not come about gives its held time back."""
        asked.status, asked.outcome, asked.decided_at = status, outcome[:2000], now
        if status != "confirmed" and asked.kind == "book" and appointment.status == Status.HELD.value:
            before = _snapshot(appointment)
            freed = self._release(session, appointment)
            appointment.status, appointment.updated_at, appointment.hold_expires_at = Status.CANCELLED.value, now, None
            self._record(session, work, Change("hold_expired" if status == "expired" else "cancelled", appointment.id,
                                               Status.HELD.value, Status.CANCELLED.value, actor, outcome,
                                               slot_ids=tuple(freed)),
                         before=before, after=_snapshot(appointment))
        change = Change(f"change_{status}", appointment.id, appointment.status, appointment.status, actor, outcome,
                        detail=_request_detail(asked))
        self._record(session, work, change, entity="change_request", entity_id=asked.id)

    def _settle_by_owner_message(self, session: Session, work: _Work, appointment: Appointment, kind: str,
                                 actor: Actor) -> None:
        """The owner's own schedule message is the confirmation a request waits for."""
        # nearly always none: asked with Core first (the caller's _record flushed), loaded only if any
        if not _ANY_OPEN_REQUEST_OF.rows(session.connection(), {"appointment_id": appointment.id}):
            return
        now = self.clock.now()
        released = Status(appointment.status) in RELEASING
        for asked in session.scalars(_OPEN_REQUESTS_OF, {"appointment_id": appointment.id}):
            if asked.kind == "book":
                done = Status(appointment.status) in OCCUPYING and appointment.status != Status.HELD.value
                verdict = "confirmed" if done else ("refused" if released else None)
            elif asked.kind == "reschedule":
                verdict = "confirmed" if kind == "rescheduled" and not released else ("refused" if released else None)
            else:
                verdict = "confirmed" if released else None
            if verdict is not None:
                said = f"{asked.owner} {kind} the appointment"
                self._settle(session, work, asked, appointment, verdict, said, actor, now)

    # --- blocked time ------------------------------------------------------------

    def block_time(self, *, start: datetime, end: datetime, actor: Actor, reason: str = "",
                   provider_id: Optional[int] = None, resource_id: Optional[int] = None) -> tuple[TimeBlock, list[int]]:
        """Take time out of a calendar; returns the block and the appointments it
        now overlaps (they keep their time; staff decide what to move)."""
        if (provider_id is None) == (resource_id is None):
            raise InvalidRequest("block either a provider or a resource")
        if end <= start:
            raise InvalidRequest("a block must end after it starts")
        with self.unit_of_work() as (session, work):
            block = TimeBlock(provider_id=provider_id, resource_id=resource_id, start=start, end=end,
                              reason=reason, created_at=self.clock.now())
            session.add(block)
            owner = Slot.provider_id == provider_id if provider_id is not None else Slot.resource_id == resource_id
            slot_ids = list(session.scalars(select(Slot.id).where(owner, *Slot.overlapping(start, end))))
            if slot_ids:
                session.execute(update(Slot).where(Slot.id.in_(slot_ids)).values(blocked=True)
                                .execution_options(synchronize_session=False))
            subject = _subject("provider", provider_id) if provider_id is not None else _subject("resource", resource_id)
            span = calendar.units(start, end)
            affected = sorted(set(session.scalars(
                select(Reservation.appointment_id).where(
                    # a range, not an IN list: a long leave is more units than a query may bind
                    Reservation.subject == subject, Reservation.unit >= span.start, Reservation.unit < span.stop
                )
            )))
            session.flush()
            change = Change("slots_blocked", None, "", "blocked", actor, reason, slot_ids=tuple(slot_ids),
                            detail={"block_id": block.id, "affected_appointments": affected})
            self._record(session, work, change, entity="time_block", entity_id=block.id,
                         after={"start": start.isoformat(), "end": end.isoformat(), "provider_id": provider_id,
                                "resource_id": resource_id})
        return block, affected

    def unblock_time(self, block_id: int, actor: Actor, reason: str = "") -> list[int]:
        with self.unit_of_work() as (session, work):
            block = session.get(TimeBlock, block_id)
            if block is None or not block.active:
                raise NotFound("time block", block_id)
            block.active = False
            owner = Slot.provider_id == block.provider_id if block.provider_id is not None else Slot.resource_id == block.resource_id
            others = list(session.scalars(select(TimeBlock).where(
                TimeBlock.active.is_(True), TimeBlock.id != block.id,
                TimeBlock.provider_id == block.provider_id if block.provider_id is not None else TimeBlock.resource_id == block.resource_id,
                TimeBlock.start < block.end, TimeBlock.end > block.start)))
            opened = []
            for slot in session.scalars(select(Slot).where(owner, *Slot.overlapping(block.start, block.end))):
                if any(o.start < slot.end and slot.start < o.end for o in others):
                    continue
                slot.blocked = False
                opened.append(slot.id)
            change = Change("slots_opened", None, "blocked", "open", actor, reason, slot_ids=tuple(opened),
                            detail={"block_id": block.id})
            self._record(session, work, change, entity="time_block", entity_id=block.id)
        return opened

    # --- waitlist ----------------------------------------------------------------

    def add_to_waitlist(self, *, patient_id: int, appointment_type: str, duration_minutes: int, actor: Actor,
                        urgency: str = "routine", provider_id: Optional[int] = None, specialty: str = "",
                        location_id: Optional[int] = None, earliest: Optional[datetime] = None,
                        latest: Optional[datetime] = None, current_appointment_id: Optional[int] = None,
                        reason: str = "") -> WaitlistEntry:
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            if session.get(Patient, patient_id) is None:
                raise NotFound("patient", patient_id)
            entry = WaitlistEntry(
                patient_id=patient_id, appointment_type=appointment_type, duration_minutes=duration_minutes,
                urgency=urgency, provider_id=provider_id, specialty=specialty, location_id=location_id,
                earliest=earliest, latest=latest, current_appointment_id=current_appointment_id,
                status="waiting", reason=reason, created_at=now, updated_at=now,
            )
            session.add(entry)
            session.flush()
            self._record(session, work, Change("waitlisted", current_appointment_id, "", "waiting", actor, reason,
                                               detail={"waitlist_id": entry.id}),
                         entity="waitlist", entity_id=entry.id)
        return entry

    def remove_from_waitlist(self, entry_id: int, actor: Actor, reason: str = "", *, status: str = "removed") -> None:
        with self.unit_of_work() as (session, work):
            entry = session.get(WaitlistEntry, entry_id)
            if entry is None:
                raise NotFound("waitlist entry", entry_id)
            previous = entry.status
            entry.status, entry.updated_at = status, self.clock.now()
            self._record(session, work, Change("waitlist_" + status, entry.current_appointment_id, previous, status,
                                               actor, reason, detail={"waitlist_id": entry.id}),
                         entity="waitlist", entity_id=entry.id)

    # --- patients ----------------------------------------------------------------

    def register_patient(self, record: PatientRecord, actor: Actor, *, named: Optional[list[int]] = None) -> Patient:
        """Create the patient, or update the one any of the identifiers already names.

        ``named``: what ``patients_named_by(record.identifiers)`` answered the caller in this
        transaction, so that the identifiers are not looked up again."""
        if not record.identifiers:
            raise InvalidRequest("a patient needs at least one identifier")
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            looked_up = session.info.get(_OWNERS_LOOKED_UP)
            ids = self._patient_ids(session, record.identifiers) if named is None else named
            patient = session.get(Patient, ids[0]) if ids else None
            created = patient is None
            if created:
                patient = Patient(created_at=now, updated_at=now)  # not added: written below
            for name in (
                "family_name", "given_name", "birth_date", "sex", "language", "email", "phones", "address",
                "needs_interpreter", "mobility", "other_needs", "preferred_provider_gender", "preferred_weekdays",
                "preferred_earliest", "preferred_latest", "preferred_channel", "confidential", "deceased",
                "deceased_at",
            ):
                value = getattr(record, name)
                if value is not None:
                    setattr(patient, name, value)
            patient.updated_at = now
            if created:
                _insert_row(session, patient)
                # one INSERT for all of them; the rows come back in no promised order
                keys = list(dict.fromkeys((i.authority, i.type_code, i.value) for i in record.identifiers))
                stored = {(row.authority, row.type_code, row.value): row
                          for row in _INSERT_RETURNING[PatientIdentifier].run_many(session.connection(), [
                              {"patient_id": patient.id, "authority": authority, "type_code": type_code, "value": value}
                              for authority, type_code, value in keys])}
                identifiers = []
                for key in keys:
                    identifier = PatientIdentifier()
                    _as_stored(session, identifier, stored[key])
                    identifiers.append(identifier)
                set_committed_value(patient, "identifiers", identifiers)  # so the returned patient lists them
                added = keys
            elif looked_up is not None and all(looked_up.get((i.authority, i.type_code, i.value)) is patient
                                               for i in record.identifiers):
                added = []  # it holds every one (looked up ahead): its identifiers need no load
            else:
                session.flush()
                known = {(i.authority, i.type_code, i.value) for i in patient.identifiers}
                added = []
                for ident in record.identifiers:
                    key = (ident.authority, ident.type_code, ident.value)
                    if key not in known:
                        # through the relationship, so the returned patient lists it too
                        patient.identifiers.append(PatientIdentifier(value=ident.value, authority=ident.authority,
                                                                     type_code=ident.type_code))
                        known.add(key)
                        added.append(key)
                session.flush()
            if looked_up is not None:
                looked_up.update((key, patient) for key in added)
            self._record(session, work, Change("patient_registered" if created else "patient_updated", None, "", "",
                                               actor, detail={"patient_id": patient.id}),
                         entity="patient", entity_id=patient.id)
        return patient

    @staticmethod
    def _patient_by_identifiers(session: Session, identifiers) -> Optional[Patient]:
        patients, _held = Scheduler._named_patients(session, identifiers)
        return patients[0] if patients else None

    @staticmethod
    def _patient_ids(session: Session, identifiers) -> list[int]:
        """The (surviving) patients the identifiers name, in identifier order, one query."""
        return [patient.id for patient in Scheduler._named_patients(session, identifiers)[0]]

    @staticmethod
    def _named_patients(session: Session, identifiers) -> tuple[list[Patient], set[tuple[str, str, str]]]:
        """The (surviving) patients the identifiers name, in identifier order, loaded by one
        query; and the ``(authority, type_code, value)`` of those identifiers the first of
        them holds itself (not through a patient merged into it)."""
        keys = [(i.authority, i.type_code, i.value) for i in identifiers]
        if not keys:
            return [], set()
        looked_up = session.info.get(_OWNERS_LOOKED_UP)
        if looked_up is not None and all(key in looked_up for key in keys):
            owner_of = {key: looked_up[key] for key in keys if looked_up[key] is not None}
        else:
            owner_of = Scheduler._owners(session, keys)
        found: list[Patient] = []
        for key in keys:
            patient = owner_of.get(key)
            if patient is None:
                continue
            while patient.merged_into_id:
                patient = session.get(Patient, patient.merged_into_id)
            if all(patient is not other for other in found):
                found.append(patient)
        held = {key for key, owner in owner_of.items() if owner is found[0]} if found else set()
        return found, held

    @staticmethod
    def _owners(session: Session, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], Patient]:
        """The patients holding these identifiers: the identifiers straight on the driver, then
        their patients not yet in the session with one ORM query (loading a mapped row costs
        several times reading it, and the session often holds them already)."""
        rows = _identifier_owners(len(keys)).fetch(
            session, {f"{part}{n}": key[i] for n, key in enumerate(keys) for i, part in enumerate("atv")})
        patients: dict[int, Patient] = {}
        missing = set()
        for row in rows:
            held = session.identity_map.get(Patient.__mapper__.identity_key_from_primary_key((row.patient_id,)))
            if held is not None:
                patients[row.patient_id] = held
            else:
                missing.add(row.patient_id)
        if missing:
            patients.update((patient.id, patient) for patient in session.scalars(
                _PATIENTS_BY_ID, {"patient_ids": sorted(missing)}))
        return {(row.authority, row.type_code, row.value): patients[row.patient_id] for row in rows}

    def look_up_identifiers(self, identifiers) -> None:
        """Look up many patients' identifiers with one query, for the work about to be done
        in this transaction (a view bound by ``within``): ``named_patients`` and
        ``register_patient`` then need no query of their own for them."""
        with self.sessions() as session:
            looked_up = session.info.setdefault(_OWNERS_LOOKED_UP, {})
            keys = [key for key in dict.fromkeys((i.authority, i.type_code, i.value) for i in identifiers)
                    if key not in looked_up]
            for first in range(0, len(keys), _LOOK_UP_AT_ONCE):
                chunk = keys[first:first + _LOOK_UP_AT_ONCE]
                owners = self._owners(session, chunk)
                looked_up.update((key, owners.get(key)) for key in chunk)

    def find_patient(self, identifiers) -> Optional[Patient]:
        with self.sessions() as session:
            return self._patient_by_identifiers(session, identifiers)

    def patients_named_by(self, identifiers) -> list[int]:
        """Every patient any of the identifiers names: more than one means a merge is due."""
        with self.sessions() as session:
            return self._patient_ids(session, identifiers)

    def named_patients(self, identifiers) -> tuple[list[Patient], set[tuple[str, str, str]]]:
        """``patients_named_by``'s patients as rows, and which of the identifiers (as
        ``(authority, type_code, value)``) the first of them already holds: one query
        for a caller about to compare them with a record (``register_patient(named=)``)."""
        with self.sessions() as session:
            return self._named_patients(session, identifiers)

    def record_coverage(self, patient_id: int, record: CoverageRecord, actor: Actor, *,
                        found: Any = _NOT_LOOKED_UP) -> Coverage:
        """Create or update the patient's coverage by this payer and member id.

        ``found``: the id of that coverage, or None for none, when the caller has just
        looked (``coverage_of``) in this transaction; by default it is looked up here."""
        with self.unit_of_work() as (session, work):
            if session.get(Patient, patient_id) is None:
                raise NotFound("patient", patient_id)
            if found is _NOT_LOOKED_UP:
                stored = self._coverage_of(session, patient_id, record.payer_id, record.member_id)
                found = stored.id if stored is not None else None
            coverage = session.get(Coverage, found) if found is not None else None
            created = coverage is None
            if created:
                coverage = Coverage(patient_id=patient_id, payer_id=record.payer_id, member_id=record.member_id)
            for name in ("payer_name", "plan_id", "group_number", "priority", "effective_date", "expiry_date",
                         "verification_status", "verified_at"):
                setattr(coverage, name, getattr(record, name))
            if created:
                _insert_row(session, coverage)
            self._record(session, work, Change("coverage_recorded", None, "", record.verification_status, actor,
                                               detail={"patient_id": patient_id, "coverage_id": coverage.id}),
                         entity="coverage", entity_id=coverage.id)
        return coverage

    def coverage_of(self, patient_id: int, payer_id: str, member_id: str) -> Optional[tuple]:
        """The patient's coverage by this payer and member id, if recorded: the stored row, to
        read (``row.plan_id``), not the mapped object."""
        with self.sessions() as session:
            return self._coverage_of(session, patient_id, payer_id, member_id)

    @staticmethod
    def _coverage_of(session: Session, patient_id: int, payer_id: str, member_id: str) -> Optional[tuple]:
        found = _COVERAGE_OF.fetch(session, {"patient_id": patient_id, "payer_id": payer_id, "member_id": member_id})
        return found[0] if found else None

    def set_patient_flags(self, patient_id: int, flags: Sequence[str], actor: Actor, *, source: str,
                          replace_source: bool = False) -> bool:
        """Record ``flags`` (``icd10:E11.9``, ``opt_out:recall``…) on the patient as
        said by ``source``; with ``replace_source`` the source's other flags go
        (a list stated again in full).  A flag another source set stays that
        source's.  Returns whether anything changed; a change is audited and
        announced as ``patient_flags_changed``."""
        wanted = {flag.strip()[:64] for flag in flags if flag and flag.strip()}
        with self.unit_of_work() as (session, work):
            if session.get(Patient, patient_id) is None:
                raise NotFound("patient", patient_id)
            held = {row.flag: row.source for row in session.execute(
                select(PatientFlag.flag, PatientFlag.source).where(PatientFlag.patient_id == patient_id))}
            added = sorted(wanted - set(held))
            removed = sorted(f for f, s in held.items() if s == source and f not in wanted) if replace_source else []
            if not added and not removed:
                return False
            now = self.clock.now()
            session.add_all(PatientFlag(patient_id=patient_id, flag=f, source=source, recorded_at=now) for f in added)
            if removed:
                session.execute(delete(PatientFlag).where(PatientFlag.patient_id == patient_id,
                                                          PatientFlag.flag.in_(removed)))
            self._record(session, work, Change("patient_flags_changed", None, "", "", actor, source,
                                               detail={"patient_id": patient_id, "added": added, "removed": removed}),
                         entity="patient", entity_id=patient_id)
        return True

    def merge_patients(self, survivor_id: int, merged_id: int, actor: Actor, reason: str = "") -> Patient:
        """Fold ``merged_id`` into ``survivor_id``: identifiers, coverage, appointments,
        waitlist entries and reservations move; overlaps that the merge reveals are
        flagged on the appointments, never refused (the merge is a fact)."""
        if survivor_id == merged_id:
            raise InvalidRequest("a patient cannot be merged into itself")
        with self.unit_of_work() as (session, work):
            survivor, merged = session.get(Patient, survivor_id), session.get(Patient, merged_id)
            if survivor is None:
                raise NotFound("patient", survivor_id)
            if merged is None:
                raise NotFound("patient", merged_id)
            session.execute(update(PatientIdentifier).where(PatientIdentifier.patient_id == merged_id)
                            .values(patient_id=survivor_id))
            session.info.pop(_OWNERS_LOOKED_UP, None)
            # a policy both records carry (the same IN1 twice) stays with the merged record: the
            # survivor's copy wins instead of the move breaking the (patient, payer, member) key
            held = set(session.execute(select(Coverage.payer_id, Coverage.member_id)
                                       .where(Coverage.patient_id == survivor_id)).all())
            movable = [c.id for c in session.scalars(select(Coverage).where(Coverage.patient_id == merged_id))
                       if (c.payer_id, c.member_id) not in held]
            if movable:
                session.execute(update(Coverage).where(Coverage.id.in_(movable)).values(patient_id=survivor_id)
                                .execution_options(synchronize_session=False))
            session.execute(update(WaitlistEntry).where(WaitlistEntry.patient_id == merged_id).values(patient_id=survivor_id))
            survivor_flags = select(PatientFlag.flag).where(PatientFlag.patient_id == survivor_id)
            session.execute(delete(PatientFlag).where(PatientFlag.patient_id == merged_id,
                                                      PatientFlag.flag.in_(survivor_flags)))
            session.execute(update(PatientFlag).where(PatientFlag.patient_id == merged_id).values(patient_id=survivor_id))
            moved = list(session.scalars(select(Appointment).where(Appointment.patient_id == merged_id)))
            for appointment in moved:
                appointment.patient_id = survivor_id
            old_subject, new_subject = _subject("patient", merged_id), _subject("patient", survivor_id)
            rows = session.execute(select(Reservation.unit, Reservation.seat, Reservation.appointment_id)
                                   .where(Reservation.subject == old_subject)).all()
            session.execute(delete(Reservation).where(Reservation.subject == old_subject))
            if rows:
                taken = self._insert_ignoring_conflicts(
                    session, [{"subject": new_subject, "unit": u, "seat": s, "appointment_id": a} for u, s, a in rows]
                )
                if taken < len(rows):
                    # flag only the appointments whose time collided, not every one that moved
                    kept = set(session.execute(select(Reservation.unit, Reservation.appointment_id).where(
                        Reservation.subject == new_subject,
                        Reservation.appointment_id.in_({a for _u, _s, a in rows}))).all())
                    clashing = {a for u, _s, a in rows if (u, a) not in kept}
                    for appointment in moved:
                        if appointment.status in OCCUPYING and appointment.id in clashing:
                            appointment.conflict = (appointment.conflict + "\n" if appointment.conflict else "") + \
                                f"after merging patient {merged_id} into {survivor_id}, this overlaps another appointment of the patient"
            merged.merged_into_id = survivor_id
            session.flush()  # expire_all() would otherwise throw away the unflushed changes above
            session.expire_all()
            self._record(session, work, Change("patients_merged", None, "", "", actor, reason,
                                               detail={"survivor_id": survivor_id, "merged_id": merged_id,
                                                       "appointments": [a.id for a in moved]}),
                         entity="patient", entity_id=survivor_id)
        with self.sessions() as session:
            return session.get(Patient, survivor_id)

    # --- urgent requests (same-day emergencies; decided by a plugin) -----------------

    def request_urgent(self, request: UrgentRequest, actor: Actor) -> dict[str, Any]:
        """Place a patient who must be seen within ``request``'s window, in one transaction.

        The hook ``slotengine_urgent_request`` decides (the built-in
        ``emergency`` plugin: free time and emergency holds first, else added
        on-call capacity or the least harmful set of visits to move, with or
        without staff approval).  Without such a plugin the earliest free time
        in the window is booked, emergency holds first.  Returns the answer
        (``outcome``: booked | applied | proposed | unplaced, with
        ``request_id``, ``appointment_id``, ``proposal_id``, ``explanation``)."""
        if request.duration_minutes <= 0:
            raise InvalidRequest("an urgent request needs a positive duration")
        if self._bound is not None:
            with self._bound.begin_nested():
                return self._urgent(self._bound, self, request, actor)
        with self.sessions() as session:
            view = self.within(session)
            with session.begin():
                outcome = self._urgent(session, view, request, actor)
            view.notify_committed()
        return outcome

    def _urgent(self, session: Session, view: "Scheduler", request: UrgentRequest, actor: Actor) -> dict[str, Any]:
        outcome = self.plugins.urgent_request(session, request, actor, view)
        if outcome is not None:
            return outcome
        latest = request.latest_start or request.earliest
        candidates = view.free_slots(SlotQuery(
            appointment_type=request.appointment_type, start=request.earliest, end=latest + timedelta(seconds=1),
            duration_minutes=request.duration_minutes, provider_id=request.provider_id, specialty=request.specialty,
            location_id=request.location_id, urgency="urgent", limit=20))
        answer: dict[str, Any] = {"request_id": None, "proposal_id": None, "plugin": None}
        for candidate in sorted(candidates, key=lambda c: (c.slot_type != "emergency", c.start, c.slot_id)):
            try:
                appointment = view.book(BookingRequest(
                    patient_id=request.patient_id, appointment_type=request.appointment_type,
                    slot_id=candidate.slot_id, duration_minutes=request.duration_minutes, urgency="urgent",
                    reason=request.reason, notes=request.notes, placer_id=request.placer_id), actor)
            except SlotUnavailable:
                continue
            return {**answer, "outcome": "booked", "appointment_id": appointment.id,
                    "explanation": f"free {candidate.slot_type} time at {candidate.start.isoformat()}"}
        return {**answer, "outcome": "unplaced", "appointment_id": None,
                "explanation": "no free time in the window, and no plugin handles urgent requests"}

    # --- mirror mode -------------------------------------------------------------

    def _insert_ignoring_conflicts(self, session: Session, rows: list[dict[str, Any]]) -> int:
        # count the rows RETURNING gives back: psycopg reports rowcount -1 for this INSERT
        return len(self._insert_reservations(session, rows))

    def record_external_appointment(self, external: ExternalAppointment, actor: Actor, *,
                                    found: Any = _NOT_LOOKED_UP) -> Appointment:
        """Mirror mode: the EHR owns the schedule.  Create or update our copy as it
        says, even when it overlaps another booking; such overlaps are flagged on
        the appointment (``conflict``) for staff instead of being refused.  Works in
        any arrival order: a modification or cancellation for an appointment we
        have not seen yet creates it.

        ``found``: the id of the appointment the placer and filler ids name, or None
        for none, when the caller has just looked (``find_appointment``) in this
        transaction; by default they are looked up here."""
        if not (external.placer_id or external.filler_id):
            raise InvalidRequest("an external appointment needs a placer or a filler id")
        target = Status(external.status)
        now = self.clock.now()
        with self.unit_of_work() as (session, work):
            if found is _NOT_LOOKED_UP:
                appointment = self._find_appointment(session, external.placer_id, external.filler_id)
                found = appointment.id if appointment is not None else None
            created = found is None
            if created:  # not added: written below
                appointment = Appointment(status=Status.REQUESTED.value, source="mirror", created_at=now, updated_at=now,
                                          placer_id=external.placer_id, filler_id=external.filler_id)
                before: Optional[dict[str, Any]] = None
                current = Status.REQUESTED.value
            else:
                appointment = self._appointment(session, found)
                before = _snapshot(appointment)
                seen = _mirror_view(appointment)
                current = appointment.status
                if target.value != current:
                    check_transition(appointment.id, current, target.value)
                for ids, held in (((external.placer_id, None), appointment.placer_id),
                                  ((None, external.filler_id), appointment.filler_id)):
                    other = self._find_appointment(session, *ids) if any(ids) and not held else None
                    if other is not None and other is not appointment:
                        raise InvalidRequest(f"placer id {external.placer_id} and filler id {external.filler_id} "
                                             f"name two appointments ({appointment.id} and {other.id}), not one")
                _assign(appointment, placer_id=appointment.placer_id or external.placer_id,
                        filler_id=appointment.filler_id or external.filler_id)
            moved = created or (appointment.start, appointment.end, appointment.provider_id) != (
                external.start, external.end, external.provider_id or appointment.provider_id)
            resources_changed = sorted(r.resource_id for r in appointment.resources) != sorted(external.resource_ids)
            was_occupying = not created and Status(current) in OCCUPYING
            freed: list[int] = []
            released = was_occupying and bool(moved or resources_changed or target in RELEASING or
                                               (external.patient_id and external.patient_id != appointment.patient_id))
            if released:
                freed = self._release(session, appointment)
            _assign(appointment, start=external.start, end=external.end, appointment_type=external.appointment_type,
                    reason=external.reason or appointment.reason, urgency=external.urgency,
                    notes=external.notes or appointment.notes,
                    patient_id=external.patient_id or appointment.patient_id,
                    provider_id=external.provider_id or appointment.provider_id,
                    location_id=external.location_id or appointment.location_id, status=target.value)
            if not created and (target.value != current or moved or resources_changed):
                appointment.updated_at = now  # a change for certain: one UPDATE of the row, not two
            if created:
                _insert_row(session, appointment)
                links = [AppointmentResource(appointment_id=appointment.id, resource_id=r) for r in external.resource_ids]
                for link in links:
                    _insert_row(session, link)
                set_committed_value(appointment, "resources", links)
            elif resources_changed:
                appointment.resources = [AppointmentResource(resource_id=r) for r in external.resource_ids]
            flush_changes(session)
            # a row inserted just now, or whose time was given back above, holds no reservations
            holds_time = not (created or released) and \
                bool(_HOLDS_TIME.rows(session.connection(), {"appointment_id": appointment.id}))
            if target in OCCUPYING and not holds_time:
                _assign(appointment, conflict=self._occupy_as_told(session, appointment, unlinked=created or released))
            elif target not in OCCUPYING:
                _assign(appointment, conflict="")
            told = _mirror_view(appointment)
            if not created and told == seen:
                return appointment  # the same message again: nothing to record or announce
            _assign(appointment, updated_at=now)
            kind = self._mirror_kind(created, current, target, moved)
            change = Change(kind, appointment.id, current, target.value, actor, external.reason,
                            slot_ids=tuple(freed), detail={"conflict": appointment.conflict} if appointment.conflict else {})
            self._record(session, work, change, before=before, after=told[0])  # its _snapshot
            if not created:
                self._settle_by_owner_message(session, work, appointment, kind, actor)
        return appointment

    @staticmethod
    def _mirror_kind(created: bool, current: str, target: Status, moved: bool) -> str:
        if current == Status.HELD.value and target in (Status.BOOKED, Status.OVERBOOKED):
            return "booked"  # the owner confirmed a booking we asked for
        if created or current == target.value:
            return "booked" if created and target in OCCUPYING else ("rescheduled" if moved and not created else "modified")
        return {Status.CANCELLED: "cancelled", Status.DISCONTINUED: "discontinued", Status.DELETED: "deleted",
                Status.NO_SHOW: "no_show", Status.ARRIVED: "arrived", Status.CHECKED_IN: "checked_in",
                Status.COMPLETED: "completed"}.get(target, "modified")

    def _occupy_as_told(self, session: Session, appointment: Appointment, *, unlinked: bool = False) -> str:
        """Take what time is free for this appointment; describe what was not.
        ``unlinked``: no slot links it (inserted, or its time given back, by this call)."""
        connection = session.connection()
        problems = []
        subjects = []
        if appointment.provider_id is not None:
            subjects.append(_subject("provider", appointment.provider_id))
        subjects += [_subject("resource", r.resource_id) for r in appointment.resources]
        if appointment.patient_id is not None:
            subjects.append(_subject("patient", appointment.patient_id))
        unit_range = list(calendar.units(appointment.start, appointment.end))
        if unit_range and subjects:
            # every subject's rows in one INSERT; what did not go in tells who overlaps
            taken = Counter(subject for subject, _unit, _seat in self._insert_reservations(session, [
                {"subject": subject, "unit": u, "seat": 0, "appointment_id": appointment.id}
                for subject in subjects for u in unit_range]))
            for subject in subjects:
                if taken[subject] < len(unit_range):
                    others = sorted(set(connection.execute(select(_RESERVATIONS.c.appointment_id).where(
                        _RESERVATIONS.c.subject == subject, _RESERVATIONS.c.unit.in_(unit_range),
                        _RESERVATIONS.c.appointment_id != appointment.id)).scalars()))
                    problems.append(f"{subject} overlaps appointment(s) {', '.join(map(str, others))}")
        if appointment.provider_id is not None:
            # an appointment whose every minute overlapped others holds no reservations yet keeps its slot
            # links: a later message about it must not count it into those slots twice
            linked = set() if unlinked else set(self._slot_ids(session, appointment.id))
            slot_ids = [row.id for row in _PROVIDER_SLOTS.rows(connection, {"provider_id": appointment.provider_id,
                                                                            "start": appointment.start,
                                                                            "end": appointment.end,
                                                                            "earliest_start":
                                                                                appointment.start - calendar.LONGEST_SLOT})
                        if row.id not in linked]
            if slot_ids:
                _TAKE_SEATS.run_many(connection, [{"slot_id": slot_id} for slot_id in slot_ids])
                _LINK_SLOT.run_many(connection, [{"appointment_id": appointment.id, "slot_id": s} for s in slot_ids])
        return "; ".join(problems)

    # --- calendars -----------------------------------------------------------------

    def expand_templates(self, first_day: date, last_day: date, *, template_ids: Optional[Sequence[int]] = None) -> int:
        """Create the slots of every template between two local dates; idempotent.

        A slot that would overlap another slot of the same provider or resource
        (two templates covering the same hours) is skipped and logged."""
        created = 0
        with self.sessions() as session, session.begin():
            stmt = select(ScheduleTemplate)
            if template_ids is not None:
                stmt = stmt.where(ScheduleTemplate.id.in_(list(template_ids)))
            templates = list(session.scalars(stmt))
            zones = {loc.id: loc.timezone for loc in session.scalars(select(Location))}
            range_start = calendar.local_to_utc(first_day, datetime.min.time(), "UTC") - timedelta(days=1)
            range_end = calendar.local_to_utc(last_day, datetime.min.time(), "UTC") + timedelta(days=2)
            for template in templates:
                tz = zones.get(template.location_id) or self.settings.default_timezone
                owner = (Slot.provider_id == template.provider_id) if template.provider_id is not None \
                    else (Slot.resource_id == template.resource_id)
                existing = sorted(session.execute(
                    select(Slot.start, Slot.end, Slot.template_id).where(owner, *Slot.overlapping(range_start, range_end))
                ))
                own_starts = {s for s, _e, t in existing if t == template.id}
                others = [(s, e) for s, e, t in existing if t != template.id]
                # time already taken out (leave entered before these weeks were rolled out)
                block_owner = (TimeBlock.provider_id == template.provider_id) if template.provider_id is not None \
                    else (TimeBlock.resource_id == template.resource_id)
                blocks = list(session.execute(select(TimeBlock.start, TimeBlock.end).where(
                    block_owner, TimeBlock.active.is_(True), TimeBlock.start < range_end, TimeBlock.end > range_start)))
                rows = []
                for st in calendar.expand(template.weekdays, template.start_time, template.end_time,
                                          template.slot_minutes, tz, first_day, last_day,
                                          template.effective_from, template.effective_to):
                    if st.start in own_starts:
                        continue
                    if others and _overlaps_any(others, st.start, st.end):
                        log.warning("template slot overlaps another template; skipped",
                                    extra={"template": template.code, "start": st.start.isoformat()})
                        continue
                    rows.append({
                        "template_id": template.id, "provider_id": template.provider_id,
                        "resource_id": template.resource_id, "location_id": template.location_id,
                        "start": st.start, "end": st.end, "local_weekday": st.local_weekday,
                        "local_minute": st.local_minute, "slot_type": template.slot_type,
                        "capacity": template.capacity, "booked": 0,
                        "blocked": template.slot_type == "blocked"
                        or any(b_start < st.end and st.start < b_end for b_start, b_end in blocks),
                    })
                for i in range(0, len(rows), 5000):
                    session.connection().execute(insert(_SLOTS), rows[i:i + 5000])  # Core executemany, not ORM bulk
                created += len(rows)
        return created

    # --- added for the plugins (reminder replies) --------------------------------------
    # Kept at the end of the class on purpose: owned by the plugins work, see plugins/reminders.py.

    def confirm_attendance(self, appointment_id: int, actor: Actor, reason: str = "") -> Appointment:
        """The patient says they will come (a reminder reply).

        A booked appointment keeps its state and records ``confirmed_at``
        (audited as ``attendance_confirmed``); a held one whose hold is still
        running is confirmed like ``confirm_hold``.  Anything else is refused
        with ``IllegalTransition``."""
        with self.unit_of_work() as (session, work):
            appointment = self._appointment(session, appointment_id)
            current = appointment.status
            if current == Status.HELD.value and not appointment.review_reason:
                pass  # handled below by confirm_hold, outside this unit of work
            elif current not in (Status.BOOKED.value, Status.OVERBOOKED.value):
                raise IllegalTransition(appointment.id, current, "confirmed")
            else:
                now = self.clock.now()
                before = _snapshot(appointment)
                appointment.confirmed_at = now
                appointment.updated_at = now
                change = Change("attendance_confirmed", appointment.id, current, current, actor, reason)
                self._record(session, work, change, before=before, after=_snapshot(appointment))
                return appointment
        return self.confirm_hold(appointment_id, actor, reason)


_OPEN_REQUESTS = ("pending", "accepted")
_OPEN_REQUESTS_OF = (select(ChangeRequest)
                     .where(ChangeRequest.appointment_id == bindparam("appointment_id"),
                            ChangeRequest.status.in_(_OPEN_REQUESTS))
                     .order_by(ChangeRequest.id))
_CHANGE_REQUESTS = ChangeRequest.__table__
_ANY_OPEN_REQUEST_OF = Direct(select(_CHANGE_REQUESTS.c.id)
                              .where(_CHANGE_REQUESTS.c.appointment_id == bindparam("appointment_id"),
                                     or_(*(_CHANGE_REQUESTS.c.status == status for status in _OPEN_REQUESTS)))
                              .limit(1))


def _request_detail(asked: ChangeRequest) -> dict[str, Any]:
    return {"request_id": asked.id, "request": asked.kind, "owner": asked.owner, "status": asked.status,
            "requested_start": asked.requested_start.isoformat() if asked.requested_start else None,
            "requested_end": asked.requested_end.isoformat() if asked.requested_end else None,
            "requested_provider_id": asked.requested_provider_id, "requester": dict(asked.detail or {})}


def _overlaps_any(sorted_intervals: list[tuple[datetime, datetime]], start: datetime, end: datetime) -> bool:
    """Slots of one owner never overlap each other, so only the interval that
    starts last before ``end`` can overlap [start, end)."""
    i = bisect.bisect_left(sorted_intervals, (end,))
    return i > 0 and sorted_intervals[i - 1][1] > start
