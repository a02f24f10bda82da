"""``engine.db.Direct`` runs Core statements straight on the driver's cursor.  What
``Connection.execute`` would have written and read, it must write and read too:
the same values after SQLAlchemy's bind and result processing, the same
Python-side column defaults, the same errors, and the same listeners told."""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, delete, event, exc, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import DateTime, TypeDecorator

from engine.db import Direct, UTCDateTime
from engine.models import Appointment, Patient, Reservation

PATIENTS = Patient.__table__
APPOINTMENTS = Appointment.__table__
RESERVATIONS = Reservation.__table__
NOW = datetime(2026, 3, 8, 7, 30, tzinfo=timezone.utc)  # the night the US clocks go forward


def _reserve(dialect_name: str) -> Direct:
    module = postgresql if dialect_name == "postgresql" else sqlite
    return Direct(module.insert(RESERVATIONS).on_conflict_do_nothing()
                  .returning(RESERVATIONS.c.subject, RESERVATIONS.c.unit, RESERVATIONS.c.seat))


def _patient(connection, **values) -> int:
    inserted = Direct(insert(PATIENTS).returning(PATIENTS.c.id)).rows(
        connection, {"created_at": NOW, "updated_at": NOW, **values})
    return inserted[0].id


def _appointment(connection, patient_id: int, **values) -> int:
    inserted = Direct(insert(APPOINTMENTS).returning(APPOINTMENTS.c.id)).rows(connection, {
        "patient_id": patient_id, "status": "booked", "appointment_type": "general", "start": NOW,
        "end": NOW + timedelta(minutes=20), "created_at": NOW, "updated_at": NOW, **values})
    return inserted[0].id


def test_an_insert_stores_what_connection_execute_stores_defaults_included(slotengine_session_factory):
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        by_direct = _patient(connection, family_name="Doe", phones=[{"number": "+1 555 0100"}])
        by_core = connection.execute(insert(PATIENTS).returning(PATIENTS.c.id), {
            "created_at": NOW, "updated_at": NOW, "family_name": "Doe",
            "phones": [{"number": "+1 555 0100"}]}).scalar_one()
        rows = {row.id: row._asdict() for row in connection.execute(select(PATIENTS))}
    direct, core = rows.pop(by_direct), rows.pop(by_core)
    assert {**direct, "id": None} == {**core, "id": None}
    assert direct["address"] == {} and direct["preferred_weekdays"] == []  # callable defaults, computed per row
    assert direct["sex"] == "U" and direct["confidential"] is False  # scalar defaults


def test_a_python_default_is_computed_afresh_for_each_row_and_an_onupdate_at_each_update(slotengine_engine):
    counted = itertools.count(1)
    table = Table("direct_defaults", MetaData(), Column("id", Integer, primary_key=True),
                  Column("made", Integer, default=lambda: next(counted)),
                  Column("touched", Integer, default=0, onupdate=lambda: next(counted)),
                  Column("label", String(10)))
    table.create(slotengine_engine)
    try:
        with slotengine_engine.begin() as connection:
            add = Direct(insert(table))
            add.run(connection, {"label": "a"})
            add.run_many(connection, [{"label": "b"}, {"label": "c"}])
            add.run(connection, {"label": "d", "made": 100})  # given: no default
            Direct(update(table).where(table.c.label == "a").values(label="A")).run(connection)
            rows = connection.execute(select(table.c.label, table.c.made, table.c.touched)
                                      .order_by(table.c.id)).all()
    finally:
        table.drop(slotengine_engine)
    assert [tuple(row) for row in rows] == [("A", 1, 4), ("b", 2, 0), ("c", 3, 0), ("d", 100, 0)]


def test_rows_come_back_converted_utc_and_json(slotengine_session_factory):
    query = Direct(select(APPOINTMENTS.c.start, APPOINTMENTS.c.eligibility)
                   .where(APPOINTMENTS.c.id == bindparam("appointment_id")))
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        appointment_id = _appointment(connection, _patient(connection), eligibility={"payer": "ACME"})
        row, = query.rows(connection, {"appointment_id": appointment_id})
    assert row.start == NOW and row.start.tzinfo is not None
    assert row.eligibility == {"payer": "ACME"}


def test_a_naive_datetime_is_refused_as_by_connection_execute(slotengine_session_factory):
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        with pytest.raises(exc.StatementError):
            connection.execute(insert(PATIENTS), {"created_at": NOW.replace(tzinfo=None), "updated_at": NOW})
    with slotengine_session_factory() as session, session.begin():
        with pytest.raises(ValueError, match="naive datetime"):
            _patient(session.connection(), updated_at=NOW.replace(tzinfo=None))


def test_many_rows_with_returning_give_back_only_those_that_went_in(slotengine_session_factory, db_kind):
    reserve = _reserve(db_kind)
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        appointment_id = _appointment(connection, _patient(connection))
        rows = [{"subject": "provider:1", "unit": unit, "seat": 0, "appointment_id": appointment_id}
                for unit in range(1200)]  # more than one statement's worth
        assert len(reserve.run_many(connection, rows)) == 1200
        again = reserve.run_many(connection, rows[1190:] + [
            {"subject": "provider:2", "unit": 5, "seat": 0, "appointment_id": appointment_id}])
        assert [tuple(row) for row in again] == [("provider:2", 5, 0)]
        assert reserve.run_many(connection, []) == []


def test_run_reports_rows_changed_and_run_many_writes_each_set(slotengine_session_factory):
    rename = Direct(update(PATIENTS).where(PATIENTS.c.family_name == bindparam("old"))
                    .values(family_name=bindparam("new")))
    forget = Direct(delete(PATIENTS).where(PATIENTS.c.family_name == bindparam("name")))
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        for name in ("Ames", "Ames", "Bell"):
            _patient(connection, family_name=name)
        assert rename.run(connection, {"old": "Ames", "new": "Cole"}) == 2
        rename.run_many(connection, [{"old": "Cole", "new": "Dunn"}, {"old": "Bell", "new": "Dunn"}])
        assert forget.run(connection, {"name": "Dunn"}) == 3


def test_the_statement_is_undone_with_its_savepoint(slotengine_session_factory):
    with slotengine_session_factory() as session, session.begin():
        kept = _patient(session.connection(), family_name="Kept")
        with session.begin_nested() as savepoint:
            _patient(session.connection(), family_name="Undone")
            savepoint.rollback()
        names = session.connection().execute(select(PATIENTS.c.family_name)).scalars().all()
    assert names == ["Kept"] and kept


def test_a_driver_error_comes_out_as_sqlalchemys_and_the_transaction_goes_on(slotengine_session_factory):
    with slotengine_session_factory() as session, session.begin():
        patient_id = _patient(session.connection())
        with pytest.raises(exc.IntegrityError) as raised:
            with session.begin_nested():
                _patient(session.connection(), id=patient_id)
        assert "patients" in str(raised.value)
        assert _patient(session.connection()) > patient_id


@contextmanager
def _verbs_sent(engine):
    """(first word of the statement, whether executemany) for each statement the engine's
    listeners are told of while the block runs."""
    seen: list[tuple[str, bool]] = []

    def _sent(_conn, _cursor, statement, parameters, _context, executemany):
        seen.append((statement.split()[0], executemany))

    event.listen(engine, "before_cursor_execute", _sent)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", _sent)


def test_engine_listeners_see_each_statement(slotengine_session_factory, slotengine_engine, db_kind):
    with _verbs_sent(slotengine_engine) as seen, slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        appointment_id = _appointment(connection, _patient(connection))
        _reserve(db_kind).run_many(connection, [
            {"subject": "patient:1", "unit": u, "seat": 0, "appointment_id": appointment_id} for u in range(3)])
        Direct(insert(RESERVATIONS)).run_many(connection, [
            {"subject": "patient:2", "unit": u, "seat": 0, "appointment_id": appointment_id} for u in range(3)])
    inserts = [entry for entry in seen if entry[0] == "INSERT"]
    # RETURNING many: one statement on SQLite, psycopg's executemany on PostgreSQL
    assert inserts == [("INSERT", False), ("INSERT", False), ("INSERT", db_kind == "postgresql"), ("INSERT", True)]


def test_one_parameter_set_is_one_execute_with_what_many_would_give(slotengine_session_factory, slotengine_engine,
                                                                    db_kind):
    """psycopg pipelines every executemany (three waits on the server even for one set):
    ``run_many`` of a single set runs it as one execute instead, with the same result."""
    with _verbs_sent(slotengine_engine) as seen, slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        appointment_id = _appointment(connection, _patient(connection))
        seen.clear()
        returned = _reserve(db_kind).run_many(connection, [
            {"subject": "patient:1", "unit": 7, "seat": 0, "appointment_id": appointment_id}])
        again = _reserve(db_kind).run_many(connection, [
            {"subject": "patient:1", "unit": 7, "seat": 0, "appointment_id": appointment_id}])
        plain = Direct(update(RESERVATIONS).where(RESERVATIONS.c.unit == bindparam("old"))
                       .values(unit=bindparam("new"))).run_many(connection, [{"old": 7, "new": 8}])
        units = connection.execute(select(RESERVATIONS.c.unit).where(
            RESERVATIONS.c.appointment_id == appointment_id)).scalars().all()
    assert [tuple(row) for row in returned] == [("patient:1", 7, 0)] and again == [] and plain == []
    assert units == [8]
    assert seen[:3] == [("INSERT", False), ("INSERT", False), ("UPDATE", False)]


def test_outside_a_transaction_nothing_runs(slotengine_engine):
    with slotengine_engine.connect() as connection:
        with pytest.raises(RuntimeError, match="inside a transaction"):
            Direct(select(PATIENTS.c.id)).rows(connection)


def test_expanding_parameters_are_refused(slotengine_session_factory):
    with slotengine_session_factory() as session, session.begin():
        with pytest.raises(ValueError, match="expanding"):
            Direct(select(PATIENTS.c.id).where(PATIENTS.c.id.in_(bindparam("ids", expanding=True)))).rows(
                session.connection(), {"ids": [1]})


#: any text both databases store: UTF-8 has no lone surrogates, PostgreSQL's text refuses NUL
_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                          timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-5)),
                                                     timezone(timedelta(hours=5, minutes=30))])),
       notes=st.text(_TEXT, max_size=40),
       phones=st.lists(st.dictionaries(st.sampled_from(["number", "use"]), st.text(_TEXT, max_size=12)), max_size=3))
def test_what_direct_writes_reads_back_as_connection_execute_reads_it(slotengine_session_factory, start, notes,
                                                                     phones):
    with slotengine_session_factory() as session, session.begin():
        connection = session.connection()
        patient_id = _patient(connection, phones=phones)
        appointment_id = _appointment(connection, patient_id, start=start, end=start + timedelta(minutes=5),
                                      notes=notes)
        read = Direct(select(APPOINTMENTS.c.start, APPOINTMENTS.c.notes, PATIENTS.c.phones)
                      .join(PATIENTS, PATIENTS.c.id == APPOINTMENTS.c.patient_id)
                      .where(APPOINTMENTS.c.id == bindparam("appointment_id")))
        direct, = read.rows(connection, {"appointment_id": appointment_id})
        core = connection.execute(read.statement, {"appointment_id": appointment_id}).one()
        session.rollback()
    assert tuple(direct) == tuple(core)
    assert direct.start == start and direct.notes == notes and direct.phones == phones


class _TwoStepUTCDateTime(TypeDecorator):
    """UTCDateTime as SQLAlchemy runs it without our SQLite shortcut: our conversion, then its own."""
    impl = DateTime
    cache_ok = True
    process_bind_param = UTCDateTime.process_bind_param
    process_result_value = UTCDateTime.process_result_value


@settings(max_examples=2000, deadline=None)
@given(value=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                          timezones=st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23),
                                                                      max_value=timedelta(hours=23)))))
def test_utc_datetimes_go_to_sqlite_as_sqlalchemys_own_text(value):
    dialect = sqlite.dialect()
    ours, twostep = UTCDateTime(), _TwoStepUTCDateTime()
    text = ours._cached_bind_processor(dialect)(value)
    assert text == twostep._cached_bind_processor(dialect)(value)
    back = ours._cached_result_processor(dialect, None)(text)
    assert back == twostep._cached_result_processor(dialect, None)(text) == value
    assert back.tzinfo is timezone.utc
