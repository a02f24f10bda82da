"""Audit rows wait in the session and reach the database together at the
transaction's flush points (``engine.db.insert_at_flush_point``): at commit,
when a savepoint begins or commits, or when a reader asks (``write_pending_rows``).
A rollback, of a savepoint or of the transaction, takes its own rows with it."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from sqlalchemy import event, func, select

from engine.db import write_pending_rows
from engine.models import AuditEntry, Patient
from engine.plugin import hookimpl
from engine.plugin_host import UNGUARDED_HOOKS
from engine.requests import Identifier, PatientRecord
from tests.engine.helpers import STAFF, audit, book, local, make_patient, slot_at, with_plugins


def record(mrn: str) -> PatientRecord:
    return PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], family_name="Doe", given_name=mrn)


@contextmanager
def audit_inserts(engine):
    """The INSERT statements sent for the audit table while the block runs (an executemany is one)."""
    sent: list[int] = []

    def _sent(_conn, _cursor, statement, parameters, _context, executemany):
        if statement.startswith("INSERT INTO audit"):
            sent.append(len(parameters) if executemany else 1)

    event.listen(engine, "before_cursor_execute", _sent)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", _sent)


def rows_on_database(session) -> int:
    """Audit rows the transaction's connection sees (Core: no flush of anything first)."""
    return session.connection().execute(select(func.count()).select_from(AuditEntry.__table__)).scalar_one()


def test_the_rows_of_a_transaction_reach_the_database_at_commit_in_one_statement(sch, clock, slotengine_engine):
    plain = with_plugins(sch)  # no plugin hooks: no savepoint between the changes
    with audit_inserts(slotengine_engine) as sent:
        with sch.sessions() as session, session.begin():
            view = plain.within(session).all_or_nothing()
            before = rows_on_database(session)
            first_at = clock.now()
            first = view.register_patient(record("A1"), STAFF)
            second_at = clock.advance(minutes=1)
            second = view.register_patient(record("A2"), STAFF)
            assert rows_on_database(session) == before  # waiting in the session
    assert sent == [2]
    entries = audit(sch, entity="patient")
    assert [(e.action, e.entity_id, e.at) for e in entries] == [
        ("patient_registered", first.id, first_at), ("patient_registered", second.id, second_at)]
    assert entries[0].id < entries[1].id  # in the order they were recorded


def test_a_rolled_back_savepoint_takes_only_its_own_rows(sch):
    plain = with_plugins(sch)
    with sch.sessions() as session, session.begin():
        view = plain.within(session).all_or_nothing()
        kept = view.register_patient(record("B1"), STAFF)
        savepoint = session.begin_nested()  # writes B1's row, before its SAVEPOINT
        view.register_patient(record("B2"), STAFF)
        savepoint.rollback()  # B2's row, still waiting, goes with it
        savepoint = session.begin_nested()
        view.register_patient(record("B3"), STAFF)
        inner = session.begin_nested()  # writes B3's row inside the savepoint
        view.register_patient(record("B4"), STAFF)
        inner.commit()  # writes B4's row into the savepoint too
        savepoint.rollback()
        after = view.register_patient(record("B5"), STAFF)
    assert [e.entity_id for e in audit(sch, entity="patient")] == [kept.id, after.id]
    with sch.sessions() as session:
        assert sorted(session.scalars(select(Patient.given_name))) == ["B1", "B5"]


def test_a_rolled_back_transaction_writes_no_audit_row(sch, slotengine_engine):
    plain = with_plugins(sch)
    with audit_inserts(slotengine_engine) as sent:
        with pytest.raises(RuntimeError):
            with sch.sessions() as session, session.begin():
                plain.within(session).all_or_nothing().register_patient(record("C1"), STAFF)
                raise RuntimeError("the caller gives up")
    assert sent == []
    assert audit(sch) == []


def test_a_session_closed_without_commit_keeps_nothing_for_its_next_transaction(sch):
    plain = with_plugins(sch)
    session = sch.sessions()
    session.begin()
    plain.within(session).all_or_nothing().register_patient(record("D1"), STAFF)
    session.close()  # ends the transaction without a rollback event
    with session.begin():
        kept = plain.within(session).all_or_nothing().register_patient(record("D2"), STAFF)
    session.close()
    assert [e.entity_id for e in audit(sch)] == [kept.id]


def test_a_reader_in_the_same_transaction_sees_the_rows_once_written(sch, slotengine_engine):
    plain = with_plugins(sch)
    with audit_inserts(slotengine_engine) as sent:
        with sch.sessions() as session, session.begin():
            patient = plain.within(session).all_or_nothing().register_patient(record("E1"), STAFF)
            write_pending_rows(session)
            seen = session.scalars(select(AuditEntry.entity_id).where(AuditEntry.entity == "patient")).all()
            assert seen == [patient.id]
    assert sent == [1]  # written once: nothing was left for the commit


class AuditReader:
    """A plugin that reads, inside the change's transaction, the audit entry of the change."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def slotengine_schedule_changed(self, session, change):
        write_pending_rows(session)
        self.seen += session.scalars(select(AuditEntry.action).where(
            AuditEntry.entity == "appointment", AuditEntry.entity_id == change.appointment_id)).all()


@pytest.mark.parametrize("guarded", [True, False], ids=["hooks in a savepoint", "unguarded hooks"])
def test_a_plugin_reads_the_audit_entry_of_the_change_it_is_told_of(sch, guarded):
    reader = AuditReader()
    scheduler = with_plugins(sch, ("reader", reader))
    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local("2026-03-03", "09:00"))
    with sch.sessions() as session, session.begin():
        session.info[UNGUARDED_HOOKS] = not guarded
        appointment = book(scheduler.within(session).all_or_nothing(), patient.id, slot.id)
    assert reader.seen == ["booked"]
    assert [e.action for e in audit(sch, entity="appointment", entity_id=appointment.id)] == ["booked"]
