"""A pytest plugin for slotengine and for vendors testing their plugins.

Installed with slotengine (entry point ``pytest11``), it gives:

- ``slotengine_database_url`` — a fresh, migrated SQLite file per test; run
  pytest with ``--slotengine-db=postgresql`` (or set ``SLOTENGINE_TEST_DB``)
  to get a fresh PostgreSQL schema instead (server from ``SLOTENGINE_TEST_PG``,
  default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
- ``slotengine_clock`` — a ``ManualClock`` at Monday 2026-03-02 07:00 UTC;
- ``slotengine_plugins`` — the plugin host (override it to register yours);
- ``slotengine_scheduler`` — a ``Scheduler`` on all of the above, with a small
  clinic (``DEMO_CLINIC``) loaded and two weeks of slots generated;
- ``slotengine_plugin_settings`` — settings by plugin name (override it);
- ``slotengine_context`` — the running engine's ``JobContext``: plugins
  configured with those settings, channels registered (what every hook gets
  as ``context``);
- ``slotengine_jobs`` — run any registered job by id, synchronously, exactly
  as the daemon's scheduler would (``JobRun`` row, metrics);
- ``slotengine_routes`` — call the plugins' HTTP routes without a server;
- ``slotengine_patient`` — a factory: ``slotengine_patient("MRN7", email=...)``.

Example for a vendor::

    import pytest
    from engine.jobs import JobContext, collect_jobs, make_context, run_job
from engine.plugin_host import PluginHost
from engine.requests import Actor, Identifier, PatientRecord

    @pytest.fixture
    def slotengine_plugins():
        return PluginHost(builtins=(), discover=False, extra=[("acme", acme_plugin)])

    def test_acme_vetoes_mri(slotengine_scheduler): ...

    def test_acme_sweep(slotengine_context, slotengine_jobs):
        assert slotengine_jobs.run("acme.sweep").startswith("ok")
"""
from __future__ import annotations

import os
import secrets
from datetime import date, datetime, timedelta, timezone
import json
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import text

from engine.clinic import load_clinic_data
from engine.clock import ManualClock
from engine.db import make_engine, make_session_factory
from engine.jobs import JobContext, collect_jobs, make_context, run_job
from engine.plugin_host import PluginHost
from engine.requests import Actor, Identifier, PatientRecord
from engine.schema import upgrade
from engine.service import EngineSettings, Scheduler

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

DEMO_CLINIC = {
    "locations": [
        {"code": "MAIN", "name": "Main Street Clinic", "timezone": "America/New_York"},
        {"code": "WEST", "name": "West Clinic", "timezone": "America/Los_Angeles"},
    ],
    "providers": [
        {"code": "DRSMITH", "family_name": "Smith", "given_name": "Ann", "gender": "F",
         "languages": ["en", "es"], "specialties": ["family_medicine"], "location": "MAIN"},
        {"code": "DRJONES", "family_name": "Jones", "given_name": "Bob", "gender": "M",
         "languages": ["en"], "specialties": ["family_medicine", "cardiology"], "location": "MAIN"},
        {"code": "DRLEE", "family_name": "Lee", "given_name": "Kim", "gender": "F",
         "languages": ["en", "ko"], "specialties": ["cardiology"], "location": "WEST"},
    ],
    "resources": [
        {"code": "ROOM1", "name": "Exam room 1", "kind": "room", "location": "MAIN"},
        {"code": "ECG1", "name": "ECG machine", "kind": "equipment", "location": "MAIN"},
    ],
    "templates": [
        {"code": "SMITH-WEEK", "provider": "DRSMITH", "location": "MAIN", "days": ["mon", "tue", "wed", "thu", "fri"],
         "start": "08:00", "end": "12:00", "slot_minutes": 15, "slot_type": "new_patient"},
        {"code": "SMITH-FU", "provider": "DRSMITH", "location": "MAIN", "days": ["mon", "wed"],
         "start": "13:00", "end": "15:00", "slot_minutes": 20, "slot_type": "follow_up"},
        {"code": "SMITH-ER", "provider": "DRSMITH", "location": "MAIN", "days": ["mon", "tue", "wed", "thu", "fri"],
         "start": "16:00", "end": "17:00", "slot_minutes": 30, "slot_type": "emergency"},
        {"code": "JONES-WEEK", "provider": "DRJONES", "location": "MAIN", "days": ["mon", "tue", "wed", "thu", "fri"],
         "start": "09:00", "end": "17:00", "slot_minutes": 30, "slot_type": "new_patient", "capacity": 2},
        {"code": "JONES-PROC", "provider": "DRJONES", "location": "MAIN", "days": ["sat"],
         "start": "08:00", "end": "12:00", "slot_minutes": 60, "slot_type": "procedure"},
        {"code": "LEE-WEEK", "provider": "DRLEE", "location": "WEST", "days": ["mon", "tue", "wed", "thu"],
         "start": "08:00", "end": "16:00", "slot_minutes": 15, "slot_type": "new_patient"},
    ],
}

CLOCK_START = datetime(2026, 3, 2, 7, 0, tzinfo=timezone.utc)  # a Monday


def pytest_addoption(parser):
    parser.addoption("--slotengine-db", default=os.environ.get("SLOTENGINE_TEST_DB", "sqlite"),
                     choices=("sqlite", "postgresql"), help="database for slotengine fixtures")


@pytest.fixture
def slotengine_database_url(request, tmp_path) -> Iterator[str]:
    if request.config.getoption("--slotengine-db") == "postgresql":
        yield from postgresql_schema_url()
    else:
        yield f"sqlite:///{tmp_path / 'slotengine.db'}"


def postgresql_schema_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    base = os.environ.get("SLOTENGINE_TEST_PG", DEFAULT_PG)
    schema = "t_" + secrets.token_hex(6)
    admin = make_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def slotengine_engine(slotengine_database_url):
    engine = make_engine(slotengine_database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def slotengine_session_factory(slotengine_engine):
    return make_session_factory(slotengine_engine)


@pytest.fixture
def slotengine_clock() -> ManualClock:
    return ManualClock(CLOCK_START)


@pytest.fixture
def slotengine_plugins() -> PluginHost:
    return PluginHost(builtins=(), discover=False)


@pytest.fixture
def slotengine_settings() -> EngineSettings:
    return EngineSettings()


@pytest.fixture
def slotengine_scheduler(slotengine_session_factory, slotengine_plugins, slotengine_clock, slotengine_settings) -> Scheduler:
    with slotengine_session_factory() as session, session.begin():
        load_clinic_data(session, DEMO_CLINIC)
    scheduler = Scheduler(slotengine_session_factory, plugins=slotengine_plugins, clock=slotengine_clock,
                          settings=slotengine_settings)
    first = slotengine_clock.now().date()
    scheduler.expand_templates(first, first + timedelta(days=13))
    return scheduler


def first_of(day: date, weekday: int) -> date:
    return day + timedelta(days=(weekday - day.weekday()) % 7)


@pytest.fixture
def slotengine_plugin_settings() -> dict[str, dict[str, Any]]:
    """Settings by plugin name, as in the ``[plugins.<name>]`` config sections."""
    return {}


@pytest.fixture
def slotengine_context(slotengine_scheduler, slotengine_plugin_settings) -> JobContext:
    return make_context(slotengine_scheduler, plugin_settings=slotengine_plugin_settings)


class JobRunner:
    """Runs registered jobs by id, synchronously, as the daemon's scheduler would."""

    def __init__(self, context: JobContext):
        self.context = context
        self.jobs = {job.job_id: job for job in collect_jobs(context)}

    def ids(self) -> list[str]:
        return sorted(self.jobs)

    def run(self, job_id: str) -> str:
        """Run once; returns the recorded outcome (``ok: ...`` or ``error: ...``)."""
        return run_job(self.context, self.jobs[job_id])


@pytest.fixture
def slotengine_jobs(slotengine_context) -> JobRunner:
    return JobRunner(slotengine_context)


class RouteCaller:
    """Calls the plugins' HTTP handlers directly (no server, no authentication)."""

    def __init__(self, context: JobContext):
        self.routes = {(method, path): handler for method, path, handler, _plugin in context.plugins.http_routes()}

    def __call__(self, method: str, path: str, json_body: Any = None, *, body: bytes = b"",
                 headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> tuple[int, dict]:
        handler = self.routes[(method.upper(), path)]
        if json_body is not None:
            body = json.dumps(json_body).encode()
        return handler(body, {k.lower(): v for k, v in (headers or {}).items()}, dict(query or {}))


@pytest.fixture
def slotengine_routes(slotengine_context) -> RouteCaller:
    return RouteCaller(slotengine_context)


@pytest.fixture
def slotengine_patient(slotengine_scheduler) -> Callable[..., Any]:
    """``slotengine_patient(mrn="MRN1", **fields)`` registers (or updates) a patient."""
    def make(mrn: str = "MRN1", **fields: Any):
        fields.setdefault("family_name", "Doe")
        fields.setdefault("given_name", "Jane")
        record = PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], **fields)
        return slotengine_scheduler.register_patient(record, Actor("operator", "pytest"))
    return make
