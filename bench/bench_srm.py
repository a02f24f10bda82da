"""Filler-mode booking throughput: SRM in, SRR out, SIU into the outbox.

    python bench/bench_srm.py [--n 300] [--rounds 3]

On a SQLite file (WAL, synchronous=FULL: one fsync per commit, as the daemon
runs) with the demo clinic and eight weeks of slots, in one process, one
booking after another. Three ways of booking N new patients, measured in
the same run, each on a fresh copy of the same database:

* ``Scheduler.book`` — the bare engine call: patient already registered,
  provider and start known. The baseline.
* ``engine path`` — what a request needs of the engine, without HL7:
  ``register_patient``, ``free_slots`` over the requested day, ``book``.
* ``SRM → SRR`` — end to end as the processor applies a stored message:
  tokenize the SRM, ``apply_request`` in one transaction (PID → patient,
  AIP/AIL → provider/location, ARQ-11 range → earliest free slot, book with
  plugin checks, the SIU S12 rendered into the outbox for one subscriber,
  the SRR rendered), commit.

Prints a table (best of ``--rounds``) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import date, time as dtime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from engine.calendar import local_to_utc  # noqa: E402
from engine.clinic import load_clinic_data  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.models import OutboxItem, Provider, Slot  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.requests import Actor, BookingRequest, Identifier, PatientRecord, SlotQuery  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import Scheduler  # noqa: E402
from engine.testing import CLOCK_START, DEMO_CLINIC  # noqa: E402
from hl7.config import DestinationConfig  # noqa: E402
from hl7.filler import FillerSettings, apply_request  # noqa: E402
from hl7.message import parse  # noqa: E402
from hl7.outbound import OutboundSIU  # noqa: E402

ACTOR = Actor("operator", "bench")
WEEKS = 8
#: (provider, location time zone, local weekdays with new-patient slots, first hour, last hour)
CALENDARS = [("DRSMITH", "America/New_York", (0, 1, 2, 3, 4), 8, 12),
             ("DRJONES", "America/New_York", (0, 1, 2, 3, 4), 9, 17),
             ("DRLEE", "America/Los_Angeles", (0, 1, 2, 3), 8, 16)]


def template_database(directory: Path) -> Path:
    path = directory / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        load_clinic_data(session, DEMO_CLINIC)
    scheduler = Scheduler(sessions, clock=ManualClock(CLOCK_START))
    first = CLOCK_START.date()
    scheduler.expand_templates(first, first + timedelta(weeks=WEEKS))
    engine.dispose()
    return path


def fresh(template: Path, directory: Path, name: str, *, with_outbound: bool):
    path = directory / f"{name}.db"
    shutil.copy(template, path)
    engine = make_engine(f"sqlite:///{path}")
    sessions = make_session_factory(engine)
    extra = [("outbound_siu", OutboundSIU([DestinationConfig("subscriber", "127.0.0.1", 2575)]))] \
        if with_outbound else []
    plugins = PluginHost(builtins=(), discover=False, extra=extra)
    return engine, Scheduler(sessions, plugins=plugins, clock=ManualClock(CLOCK_START))


PER_DAY = 4  # requests per provider and working day


def requests(n: int) -> list[tuple[str, str, date, str]]:
    """(mrn, provider, local day, time zone): each working day, PER_DAY requests per provider."""
    out = []
    day = CLOCK_START.date() + timedelta(days=1)
    while len(out) < n:
        if day > CLOCK_START.date() + timedelta(weeks=WEEKS):
            raise SystemExit(f"--n {n} is more than {WEEKS} weeks of slots hold")
        for _ in range(PER_DAY):
            for provider, tz, weekdays, _first, _last in CALENDARS:
                if day.weekday() in weekdays and len(out) < n:
                    out.append((f"B{len(out):06d}", provider, day, tz))
        day += timedelta(days=1)
    return out


def srm(number: int, mrn: str, provider: str, day: date) -> bytes:
    start, end = f"{day:%Y%m%d}0000", f"{day:%Y%m%d}2359"
    return "\r".join([
        f"MSH|^~\\&|EHR|HOSP|SLOTENGINE|CLINIC|20260302070000||SRM^S01^SRM_S01|C{number}|P|2.5.1",
        f"ARQ|PL{number}^EHR||||||ROUTINE|NORMAL|15|min|{start}^{end}",
        f"PID|1||{mrn}^^^HOSP^MR||Doe^Pat{number}||19800101|F|||1 Main St^^Springfield^MA^01101||555-0100",
        "RGS|1",
        f"AIP|1||{provider}",
    ]).encode()


def run_book(scheduler: Scheduler, work) -> float:
    """Baseline: patients registered and slots chosen first (not timed), then ``book`` each."""
    with scheduler.sessions() as session:
        ids = {code: pid for code, pid in session.execute(select(Provider.code, Provider.id))}
        planned = []
        used: dict[tuple[str, date], int] = {}
        for mrn, provider, day, tz in work:
            slots = session.execute(select(Slot.id, Slot.start, Slot.capacity).where(
                Slot.provider_id == ids[provider], Slot.slot_type == "new_patient",
                Slot.start >= local_to_utc(day, dtime(0), tz), Slot.start < local_to_utc(day, dtime(23, 59), tz))
                .order_by(Slot.start)).all()
            seats = [(slot_id, start) for slot_id, start, capacity in slots for _ in range(capacity)]
            k = used.get((provider, day), 0)
            used[(provider, day)] = k + 1
            planned.append((mrn, seats[k]))
    patients = [scheduler.register_patient(PatientRecord([Identifier(mrn, "HOSP", "MR")], family_name="Doe"),
                                           ACTOR).id for mrn, _seat in planned]
    started = time.perf_counter()
    for patient_id, (_mrn, (slot_id, start)) in zip(patients, planned):
        scheduler.book(BookingRequest(patient_id=patient_id, appointment_type="general", slot_id=slot_id,
                                      start=start, duration_minutes=15), ACTOR)
    return time.perf_counter() - started


def run_engine_path(scheduler: Scheduler, work) -> float:
    with scheduler.sessions() as session:
        ids = {code: pid for code, pid in session.execute(select(Provider.code, Provider.id))}
    started = time.perf_counter()
    for mrn, provider, day, tz in work:
        patient = scheduler.register_patient(PatientRecord([Identifier(mrn, "HOSP", "MR")], family_name="Doe",
                                                           given_name=mrn), ACTOR)
        candidates = scheduler.free_slots(SlotQuery("general", local_to_utc(day, dtime(0), tz),
                                                    local_to_utc(day, dtime(23, 59), tz),
                                                    provider_id=ids[provider], duration_minutes=15, limit=5))
        scheduler.book(BookingRequest(patient_id=patient.id, appointment_type="general",
                                      slot_id=candidates[0].slot_id, start=candidates[0].start,
                                      duration_minutes=15), ACTOR)
    return time.perf_counter() - started


def run_srm(scheduler: Scheduler, work) -> tuple[float, int, int]:
    messages = [srm(number, mrn, provider, day) for number, (mrn, provider, day, _tz) in enumerate(work, 1)]
    settings = FillerSettings()
    accepted = 0
    started = time.perf_counter()
    for number, raw in enumerate(messages, 1):
        message = parse(raw)
        with scheduler.sessions() as session:
            with session.begin():
                view = scheduler.within(session)
                result = apply_request(view, message, message_id=number, settings=settings)
            view.notify_committed()
        accepted += b"MSA|AA|" in result.response
    elapsed = time.perf_counter() - started
    with scheduler.sessions() as session:
        queued = len(list(session.scalars(select(OutboxItem.id).where(OutboxItem.kind == "siu"))))
    return elapsed, accepted, queued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="bookings per way and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = requests(args.n)
    best = {"book": float("inf"), "engine": float("inf"), "srm": float("inf")}
    accepted = queued = 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        template = template_database(directory)
        for round_number in range(args.rounds):
            engine, scheduler = fresh(template, directory, f"book{round_number}", with_outbound=False)
            best["book"] = min(best["book"], run_book(scheduler, work))
            engine.dispose()
            engine, scheduler = fresh(template, directory, f"engine{round_number}", with_outbound=False)
            best["engine"] = min(best["engine"], run_engine_path(scheduler, work))
            engine.dispose()
            engine, scheduler = fresh(template, directory, f"srm{round_number}", with_outbound=True)
            elapsed, accepted, queued = run_srm(scheduler, work)
            best["srm"] = min(best["srm"], elapsed)
            engine.dispose()
    n = args.n
    rate = {k: n / v for k, v in best.items()}
    print(f"filler bookings on SQLite, {n} per way, best of {args.rounds} (AA answers: {accepted}/{n}, "
          f"SIU queued: {queued})")
    print(f"  {'way':<44}{'bookings/s':>12}{'ms each':>10}{'vs book':>9}")
    rows = [("Scheduler.book (baseline)", "book"), ("register + free_slots + book", "engine"),
            ("SRM -> apply_request -> SRR + SIU in outbox", "srm")]
    for label, key in rows:
        print(f"  {label:<44}{rate[key]:>12.0f}{best[key] / n * 1000:>10.2f}{best[key] / best['book']:>8.2f}x")
    print(json.dumps({
        "bench": "srm", "database": "sqlite", "n": n, "rounds": args.rounds,
        "book_per_s": round(rate["book"], 1), "engine_path_per_s": round(rate["engine"], 1),
        "srm_per_s": round(rate["srm"], 1), "srm_ms": round(best["srm"] / n * 1000, 3),
        "srm_vs_book": round(best["srm"] / best["book"], 2), "srm_vs_engine_path": round(best["srm"] / best["engine"], 2),
        "accepted": accepted, "siu_queued": queued,
    }))


if __name__ == "__main__":
    main()
