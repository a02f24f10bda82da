"""The processor applies a batch unguarded (no savepoints), and redoes it guarded
when a message fails after writing or a plugin hook raises.

Run on SQLite and PostgreSQL; statements are counted on the real engine.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterator

import pytest
from sqlalchemy import event, func, select, text

from engine.metrics import Metrics
from engine.models import InboundMessage, Patient, PatientIdentifier, PluginTask
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.service import Scheduler
from hl7 import processor
from hl7.processor import GUARDED_SECONDS, FeedPolicy, Processor
from hl7.store import APPLIED, PARKED, RECEIVED, Incoming, MessageStore, content_hash
from tests.engine.conftest import DATABASES, database_url

DUE = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
MSH = "MSH|^~\\&|EHR|CLINIC|SLOT|SLOT|20260301120000||{type}|{control}|P|2.5.1"


def siu(event_: str, control: str, *, mrn: str = "MRN-1", placer: str = "P-1", provider: str = "DRSMITH") -> bytes:
    return "\r".join((
        MSH.format(type=f"SIU^{event_}^SIU_S12", control=control),
        f"SCH|{placer}|F-{placer}||||||ROUTINE|20|MIN|^^20^202603031000|||||||||||||Booked",
        f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19800101|F",
        "RGS|1|A",
        f"AIP|1||{provider}^Smith^Ann|D",
    )).encode()


def adt_a04(control: str, mrn: str) -> bytes:
    return "\r".join((MSH.format(type="ADT^A04^ADT_A01", control=control), "EVN|A04|202603031000",
                      f"PID|1||{mrn}^^^HOSP^MR||Roe^Rick||19700101|M")).encode()


def without_sch(control: str) -> bytes:
    return "\r".join((MSH.format(type="SIU^S12^SIU_S12", control=control), "PID|1||MRN-9^^^HOSP^MR||Poe^Pat")).encode()


@pytest.fixture(params=DATABASES)
def slotengine_database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url(request.param, tmp_path)


class Harness:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.metrics = Metrics()
        self.store = MessageStore(scheduler.sessions, self.metrics)
        self.processor = Processor(scheduler, self.store, {"ehr": FeedPolicy()}, self.metrics)
        self.savepoints = 0
        engine = scheduler.sessions.kw["bind"]

        @event.listens_for(engine, "before_cursor_execute")
        def _count(_conn, _cursor, statement, *_args):
            self.savepoints += statement.startswith("SAVEPOINT")

    def receive(self, *raws: bytes) -> None:
        now = self.scheduler.clock.now()
        self.store.store_batch([Incoming("ehr", "EHR^CLINIC", raw.split(b"|")[9].decode(), "", "127.0.0.1", now,
                                         raw, RECEIVED, None, content_hash(raw)) for raw in raws])

    def apply_all(self) -> None:
        while self.processor.apply_pending():
            pass

    def statuses(self) -> list[tuple[str, str]]:
        with self.scheduler.sessions() as session:
            return [(m.control_id, m.status) for m in
                    session.scalars(select(InboundMessage).order_by(InboundMessage.id))]

    def mrns(self) -> set[str]:
        with self.scheduler.sessions() as session:
            return set(session.scalars(select(PatientIdentifier.value).join(Patient)))

    @property
    def redone(self) -> float:
        return self.metrics.batches_redone._value.get()


@pytest.fixture(autouse=True)
def one_batch(monkeypatch):
    """Each test's few messages make one batch, however slow the machine."""
    monkeypatch.setattr(processor, "BATCH_SECONDS", 60.0)


@pytest.fixture
def harness(slotengine_scheduler) -> Harness:
    return Harness(slotengine_scheduler)


def test_a_batch_that_succeeds_runs_without_a_savepoint(harness):
    harness.receive(adt_a04("A1", "MRN-1"), siu("S12", "S1"), adt_a04("A2", "MRN-2"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("S1", APPLIED), ("A2", APPLIED)]
    assert (harness.savepoints, harness.redone) == (0, 0)


def test_a_message_refused_before_writing_is_parked_without_a_redo(harness):
    harness.receive(adt_a04("A1", "MRN-1"), without_sch("BAD"), adt_a04("A2", "MRN-2"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("BAD", PARKED), ("A2", APPLIED)]
    assert (harness.savepoints, harness.redone) == (0, 0)
    assert harness.mrns() == {"MRN-1", "MRN-2"}


def test_a_message_failing_after_writing_is_undone_and_the_batch_redone_guarded(harness):
    # S16 on a cancelled appointment is refused (207), after its new patient MRN-NEW was registered
    harness.receive(siu("S12", "S1"), siu("S15", "S2"), siu("S16", "S3", mrn="MRN-NEW"), adt_a04("A1", "MRN-2"))
    harness.apply_all()
    assert harness.statuses() == [("S1", APPLIED), ("S2", APPLIED), ("S3", PARKED), ("A1", APPLIED)]
    assert harness.mrns() == {"MRN-1", "MRN-2"}  # nothing of S3 kept
    assert harness.redone == 1
    assert harness.savepoints >= 4  # the redo: one per message

    harness.savepoints = 0
    harness.receive(adt_a04("A2", "MRN-3"))
    harness.apply_all()
    assert harness.savepoints == 2, f"batches stay guarded for {GUARDED_SECONDS} s after a redo"  # look-ahead, A2

    harness.processor._guarded_until = 0.0  # the quiet minute has passed
    harness.savepoints = 0
    harness.receive(adt_a04("A3", "MRN-4"))
    harness.apply_all()
    assert (harness.savepoints, harness.redone) == (0, 1)


def planned_task(plugin: str, change) -> PluginTask:
    return PluginTask(plugin=plugin, kind=change.kind, due_at=DUE, status="pending", appointment_id=change.appointment_id,
                      payload={}, attempts=0, last_error="", created_at=DUE)


class Planner:
    """Plans a task for every change: work that must survive another plugin's failure."""

    @hookimpl
    def slotengine_schedule_changed(self, session, change):
        session.add(planned_task("planner", change))


class Faulty:
    @hookimpl
    def slotengine_schedule_changed(self, session, change):
        session.add(planned_task("faulty", change))
        session.flush()
        raise RuntimeError("faulty plugin")


def test_a_plugin_raising_undoes_only_its_own_work_after_a_redo(slotengine_scheduler):
    s = slotengine_scheduler
    plugins = PluginHost(builtins=(), discover=False, extra=[("planner", Planner()), ("faulty", Faulty())])
    harness = Harness(Scheduler(s.sessions, plugins=plugins, clock=s.clock, settings=s.settings))
    harness.receive(adt_a04("A1", "MRN-1"), siu("S12", "S1"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("S1", APPLIED)]
    assert harness.redone == 1
    with harness.scheduler.sessions() as session:
        planned = sorted(session.scalars(select(PluginTask.plugin).distinct()))
        changes = session.scalar(select(PluginTask.id).where(PluginTask.plugin == "planner").limit(1))
    assert planned == ["planner"] and changes is not None  # the faulty plugin's rows are gone
    assert harness.scheduler.plugins.metrics.plugin_errors.labels("faulty", "slotengine_schedule_changed")._value.get() >= 1


# --- the look-ahead: one query for the patients of the next few messages ---------------------------


def a40(control: str, survivor: str, merged: str) -> bytes:
    return "\r".join((MSH.format(type="ADT^A40^ADT_A39", control=control), "EVN|A40|202603031000",
                      f"PID|1||{survivor}^^^HOSP^MR||Roe^Rick||19700101|M", f"MRG|{merged}^^^HOSP^MR")).encode()


def appointment_patients(harness) -> dict[str, str]:
    from engine.models import Appointment
    with harness.scheduler.sessions() as session:
        return {placer: mrn for placer, mrn in session.execute(
            select(Appointment.placer_id, PatientIdentifier.value)
            .join(PatientIdentifier, PatientIdentifier.patient_id == Appointment.patient_id))}


def identifier_queries(harness) -> list[str]:
    queries: list[str] = []
    engine = harness.scheduler.sessions.kw["bind"]

    @event.listens_for(engine, "before_cursor_execute")
    def _note(_conn, _cursor, statement, *_args):
        if statement.startswith("SELECT patient_identifiers.authority"):
            queries.append(statement)
    return queries


def test_a_patient_registered_earlier_in_the_batch_is_found_by_a_later_message(harness):
    queries = identifier_queries(harness)
    harness.receive(adt_a04("A1", "MRN-5"), adt_a04("A2", "MRN-6"), siu("S12", "S1", mrn="MRN-5"),
                    siu("S12", "S2", mrn="MRN-6", placer="P-2"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("A2", APPLIED), ("S1", APPLIED), ("S2", APPLIED)]
    assert appointment_patients(harness) == {"P-1": "MRN-5", "P-2": "MRN-6"}
    assert len(queries) == 1, "the four messages' patients were looked up together"
    with harness.scheduler.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 2


def test_a_merge_in_the_batch_is_seen_by_the_messages_after_it(harness):
    harness.receive(adt_a04("A1", "MRN-7"), adt_a04("A2", "MRN-OLD"), a40("M1", "MRN-7", "MRN-OLD"),
                    siu("S12", "S1", mrn="MRN-OLD"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("A2", APPLIED), ("M1", APPLIED), ("S1", APPLIED)]
    with harness.scheduler.sessions() as session:
        from engine.models import Appointment
        booked_for = session.scalar(select(Appointment.patient_id))
        survivor = session.scalar(select(PatientIdentifier.patient_id).where(PatientIdentifier.value == "MRN-7"))
    assert booked_for == survivor


def test_an_appointment_booked_earlier_in_the_batch_is_found_by_a_later_message(harness):
    from engine.models import Appointment
    lookups: list[str] = []

    @event.listens_for(harness.scheduler.sessions.kw["bind"], "before_cursor_execute")
    def _note(_conn, _cursor, statement, *_args):
        if statement.startswith("SELECT appointments.id") and "placer_id" in statement.split("WHERE")[-1]:
            lookups.append(statement)

    harness.receive(siu("S12", "S1", placer="P-3"), siu("S12", "S2", placer="P-4", mrn="MRN-2"),
                    siu("S15", "S3", placer="P-3"), siu("S14", "S4", placer="P-4", mrn="MRN-2"))
    harness.apply_all()
    assert harness.statuses() == [("S1", APPLIED), ("S2", APPLIED), ("S3", APPLIED), ("S4", APPLIED)]
    with harness.scheduler.sessions() as session:
        assert sorted(session.execute(select(Appointment.placer_id, Appointment.status))) == [
            ("P-3", "cancelled"), ("P-4", "booked")]
    assert len(lookups) == 1, "the four messages' appointments were looked up together"


def test_a_provider_created_in_an_undone_batch_is_not_remembered(harness):
    from engine.models import Appointment, Provider
    # S1 creates provider DRNEW (named by the EHR, unknown here), S2 finds it; S5 fails after
    # writing, so the batch is undone, DRNEW with it, and redone: DRNEW is created again
    harness.receive(siu("S12", "S1", placer="P-8", provider="DRNEW"), siu("S12", "S2", placer="P-9", provider="DRNEW"),
                    siu("S12", "S3"), siu("S15", "S4"), siu("S16", "S5", mrn="MRN-NEW"))
    harness.apply_all()
    assert harness.statuses() == [("S1", APPLIED), ("S2", APPLIED), ("S3", APPLIED), ("S4", APPLIED), ("S5", PARKED)]
    with harness.scheduler.sessions() as session:
        providers = set(session.execute(select(Provider.code).join(Appointment, Appointment.provider_id == Provider.id)
                                        .where(Appointment.placer_id.in_(("P-8", "P-9")))).scalars())
    assert providers == {"DRNEW"}


def test_a_failing_look_ahead_holds_nothing_up(harness, monkeypatch, caplog):
    """The look-ahead is a shortcut: a statement of it that the database refuses (which on
    PostgreSQL aborts the transaction) redoes the batch guarded, where it runs in a
    savepoint and is left out; every message still applies, none is retried for ever."""
    real = processor.look_ahead

    def refusing(view, messages):
        if any(m.control_id == "POISON" for m in messages):
            with view.sessions() as session:
                session.execute(text("SELECT * FROM no_such_table"))
        real(view, messages)

    monkeypatch.setattr(processor, "look_ahead", refusing)
    harness.receive(adt_a04("A1", "MRN-1"), siu("S12", "POISON"), adt_a04("A2", "MRN-2"))
    harness.apply_all()
    assert harness.statuses() == [("A1", APPLIED), ("POISON", APPLIED), ("A2", APPLIED)]
    assert harness.redone == 1
    assert harness.mrns() == {"MRN-1", "MRN-2"}
    assert "look-ahead failed" in caplog.text


def test_an_idle_processor_is_told_by_its_flag_and_misses_no_message(harness, monkeypatch):
    """The applier process's processor raises ``idle`` before it waits; the daemon wakes it
    only then (``hl7.applier``).  A message stored after the last look but before the flag
    went up was announced to nobody: the processor looks once more before it sleeps."""
    from types import SimpleNamespace

    from tests.e2e.test_daemon import wait_until

    monkeypatch.setattr(processor, "IDLE_POLL_SECONDS", 120.0)  # a missed message would wait this long
    flag = SimpleNamespace(value=0)
    work = harness.processor
    work.idle = flag
    real, looks = work.apply_pending, []

    def apply_pending():
        done = real()
        looks.append(done)
        if len(looks) == 1:  # stored now, while the flag is still down: nobody is told
            harness.receive(adt_a04("UNTOLD", "MRN-7"))
            harness.store.new_messages.clear()  # that event is the daemon's, in another process
        return done

    monkeypatch.setattr(work, "apply_pending", apply_pending)
    work.start()
    try:
        wait_until(lambda: harness.statuses() == [("UNTOLD", APPLIED)] and flag.value == 1, timeout=30)
        harness.receive(adt_a04("TOLD", "MRN-8"))
        flag.value = 0  # what the daemon does before it sends the wake
        harness.store.new_messages.set()
        wait_until(lambda: ("TOLD", APPLIED) in harness.statuses(), timeout=30)
    finally:
        work.stop(5)
