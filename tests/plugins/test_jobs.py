"""Timed jobs: claims that never overlap, the real AsyncIOScheduler, run records."""
from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from engine.db import make_engine, make_session_factory
from engine.jobs import (
    JobSettings,
    build_job_scheduler,
    claim_due,
    list_job_records,
    list_jobs,
    make_context,
    plan_task,
    run_job,
)
from engine.models import JobRun, OutboxItem, PluginTask
from engine.plugin import hookimpl
from engine.plugin_host import JobRegistration, PluginHost
from engine.requests import BookingRequest
from engine.schema import upgrade
from engine.testing import CLOCK_START, postgresql_schema_url
from tests.plugins.helpers import STAFF, Clinic


def add_tasks(session_factory, count: int) -> None:
    with session_factory() as session, session.begin():
        for i in range(count):
            plan_task(session, plugin="test", kind="work", due_at=CLOCK_START - timedelta(seconds=i), now=CLOCK_START)


def race_claimers(session_factory, claimers: int = 2, batch: int = 7) -> list[list[int]]:
    """Each claimer loops: claim a batch, hold it a moment, mark it done, commit."""
    claimed: list[list[int]] = [[] for _ in range(claimers)]
    start = threading.Barrier(claimers)
    failures = []

    def claimer(n: int) -> None:
        try:
            start.wait()
            while True:
                with session_factory() as session, session.begin():
                    rows = claim_due(session, PluginTask, PluginTask.due_at, batch, CLOCK_START,
                                     PluginTask.status == "pending")
                    if not rows:
                        return
                    time.sleep(0.002)
                    for row in rows:
                        row.status = "done"
                    claimed[n].extend(row.id for row in rows)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    return claimed


def test_two_claimers_on_sqlite_never_claim_the_same_row(slotengine_session_factory):
    add_tasks(slotengine_session_factory, 150)
    claimed = race_claimers(slotengine_session_factory)
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 150


@pytest.fixture
def pg_factory():
    try:
        urls = postgresql_schema_url()
        url = next(urls)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    engine = make_engine(url)
    upgrade(engine)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()
        next(urls, None)


@pytest.mark.postgres
def test_two_connections_on_postgresql_skip_each_others_claims(pg_factory):
    add_tasks(pg_factory, 20)
    with pg_factory() as first, first.begin():
        mine = claim_due(first, PluginTask, PluginTask.due_at, 5, CLOCK_START, PluginTask.status == "pending")
        with pg_factory() as second, second.begin():  # a second connection while the first holds its claim
            theirs = claim_due(second, PluginTask, PluginTask.due_at, 5, CLOCK_START, PluginTask.status == "pending")
        assert len(mine) == len(theirs) == 5
        assert not {r.id for r in mine} & {r.id for r in theirs}  # skipped, not waited for


@pytest.mark.postgres
def test_two_claimers_on_postgresql_never_claim_the_same_row(pg_factory):
    add_tasks(pg_factory, 150)
    claimed = race_claimers(pg_factory)
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 150
    assert claimed[0] and claimed[1]  # both worked at once


def test_claim_due_refuses_to_run_outside_a_transaction(slotengine_session_factory):
    with slotengine_session_factory() as session:
        with pytest.raises(RuntimeError, match="inside a transaction"):
            claim_due(session, PluginTask, PluginTask.due_at, 1, CLOCK_START)


# --- running jobs ----------------------------------------------------------------------------------------


class Sweeper:
    """A vendor-style job: sends due outbox rows of kind ``ping`` through channel ``test``."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message["id"])

    @hookimpl
    def slotengine_register_channels(self, register):
        register("test", self)

    @hookimpl
    def slotengine_register_jobs(self, register):
        from engine.jobs import dispatch_outbox

        def sweep(context):
            return dispatch_outbox(context, kinds=("ping",), batch_size=3,
                                   render=lambda session, items: {i.id: {"id": f"outbox-{i.id}", "to": "x"}
                                                                  for i in items})

        def broken(context):
            raise ValueError("no luck")

        register("test.sweep", sweep, seconds=0.2)
        register("test.broken", broken, seconds=0.2)


@pytest.fixture
def sweeper():
    return Sweeper()


@pytest.fixture
def slotengine_plugins(sweeper):
    return PluginHost(builtins=(), discover=False, extra=[("sweeper", sweeper)])


def add_pings(context, count: int) -> None:
    with context.session_factory() as session, session.begin():
        for _ in range(count):
            session.add(OutboxItem(channel="test", kind="ping", due_at=context.clock.now(), payload={},
                                   created_at=context.clock.now()))


def test_the_real_scheduler_sweeps_rows_once_and_records_runs(slotengine_scheduler, slotengine_clock, sweeper):
    context = make_context(slotengine_scheduler)
    add_pings(context, 10)
    patient = Clinic(slotengine_scheduler).patient("H1", payer=None)
    hold = slotengine_scheduler.hold(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                    slot_id=Clinic(slotengine_scheduler).slots("DRJONES")[0].id), STAFF)
    slotengine_clock.advance(minutes=30)  # the hold has expired

    async def run_for(seconds: float):
        jobs = build_job_scheduler(context, context.plugins,
                                   settings=JobSettings(hold_expiry_seconds=0.2, slot_horizon_days=20))
        jobs.start()
        try:
            await asyncio.sleep(seconds)
            return list_jobs(jobs)
        finally:
            jobs.shutdown(wait=True)

    rows = {row.job_id: row for row in asyncio.run(run_for(1.2))}
    assert sorted(sweeper.sent) == sorted(set(sweeper.sent)) and len(sweeper.sent) == 10  # each once
    assert set(rows) == {"core.generate_slots", "core.release_expired_holds", "test.sweep", "test.broken"}
    assert rows["test.sweep"].runs >= 3 and rows["test.sweep"].last_outcome.startswith("ok")
    assert rows["test.broken"].last_outcome == "error: ValueError: no luck"
    assert rows["core.generate_slots"].runs == 1 and "slots created" in rows["core.generate_slots"].last_outcome
    assert slotengine_scheduler.appointment(hold.id).status == "cancelled"  # core hold expiry ran
    metrics = context.metrics.registry
    assert metrics.get_sample_value("slotengine_job_runs_total", {"job": "test.broken", "outcome": "error"}) >= 3
    with context.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.status == "sent")) == 10

    # a restart loses nothing and fires nothing twice
    add_pings(context, 2)
    asyncio.run(run_for(0.5))
    assert len(sweeper.sent) == 12 and len(set(sweeper.sent)) == 12


def test_list_job_records_without_a_daemon(slotengine_scheduler):
    context = make_context(slotengine_scheduler)
    [sweep] = [job for job in context.plugins.job_registrations() if job.job_id == "test.sweep"]
    run_job(context, sweep)
    rows = {row.job_id: row for row in list_job_records(context)}
    assert rows["test.sweep"].runs == 1 and rows["test.sweep"].plugin == "sweeper"
    assert rows["core.release_expired_holds"].runs == 0 and rows["core.release_expired_holds"].next_run is None
    with context.session_factory() as session, session.begin():
        session.add(JobRun(job_id="gone.job", runs=4, last_outcome="ok"))
    assert {row.job_id: row.plugin for row in list_job_records(context)}["gone.job"] == "?"


def test_a_failed_send_is_retried_with_back_off_then_given_up(slotengine_scheduler, slotengine_clock, sweeper):
    context = make_context(slotengine_scheduler)
    add_pings(context, 1)
    sweeper.send = lambda message: (_ for _ in ()).throw(ConnectionError("gateway down"))
    job = JobRegistration("sweeper", "test.sweep", [j for j in context.plugins.job_registrations()
                                                    if j.job_id == "test.sweep"][0].func, seconds=1)
    for attempt in range(5):
        run_job(context, job)
        slotengine_clock.advance(minutes=5 * (attempt + 1))
    with context.session_factory() as session:
        item = session.scalars(select(OutboxItem)).one()
    assert item.status == "failed" and item.attempts == 5 and "gateway down" in item.last_error


def test_job_table_for_the_cli_without_configuring_plugins(slotengine_scheduler):
    from engine.jobs import job_table

    context = make_context(slotengine_scheduler)
    [sweep] = [job for job in context.plugins.job_registrations() if job.job_id == "test.sweep"]
    run_job(context, sweep)
    rows = {row["id"]: row for row in job_table(context.session_factory, PluginHost(discover=False))}
    assert rows["test.sweep"]["plugin"] == "?" and rows["test.sweep"]["runs"] == 1  # ran, not registered here
    assert rows["reminders.send"]["every_seconds"] == 30 and rows["reminders.send"]["runs"] == 0
    assert rows["core.generate_slots"]["every_seconds"] is None
