"""Racing bookers: eight threads, and eight separate processes with their own
engines, go for the same few slots at the same moment, on SQLite and on
PostgreSQL.  Afterwards the database is read back: nobody is double booked,
and everyone who lost was told so clearly."""
from __future__ import annotations

import multiprocessing
import queue
import re
import threading
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import select

from engine.clinic import load_clinic_data
from engine.models import Appointment, AppointmentSlot, Reservation, Slot
from engine.service import Scheduler
from engine.states import OCCUPYING
from tests.engine import racers
from tests.engine.helpers import local, make_patient, overlapping, provider_id, slot_at

WORKERS = 8
TUESDAY = "2026-03-03"

RACE_CLINIC = {
    "providers": [{"code": f"RACE{i}", "family_name": f"Racer{i}", "location": "MAIN"} for i in range(1, 9)],
    "templates": [{"code": f"RACE{i}-TUE", "provider": f"RACE{i}", "location": "MAIN", "days": ["tue"],
                   "start": "09:00", "end": "10:00", "slot_minutes": 30, "slot_type": "new_patient",
                   "capacity": 2 if i == 8 else 1} for i in range(1, 9)],
}

SLOT_TAKEN = re.compile(r"^slot \d+ at \S+ is full$|^provider:\d+ is already booked between \S+ and \S+")
PATIENT_TAKEN = re.compile(r"^patient:(\d+) is already booked between \S+ and \S+ \(appointment (\d+)\)$")


@pytest.fixture
def arena(sch):
    """The demo clinic plus eight providers with two half-hour slots on Tuesday 09:00-10:00."""
    with sch.sessions() as s, s.begin():
        load_clinic_data(s, RACE_CLINIC)
    day = sch.clock.now().date()
    sch.expand_templates(day, day + timedelta(days=6))
    return sch


def build_plan(sch):
    """Four rounds, each with a known right answer."""
    at9, at930 = local(TUESDAY, "09:00"), local(TUESDAY, "09:30")
    slot = {(i, t): slot_at(sch, f"RACE{i}", t).id for i in range(1, 9) for t in (at9, at930)}
    fresh = lambda: [make_patient(sch).id for _ in range(WORKERS)]  # noqa: E731
    one_patient = make_patient(sch).id
    few = [slot[(i, at9)] for i in (2, 3, 4)]
    rounds = {
        # 1. everybody wants the same slot
        "one_slot": [[(p, slot[(1, at9)])] for p in fresh()],
        # 2. one patient is booked by eight desks at once, each with another provider at 09:30
        "one_patient": [[(one_patient, slot[(i, at930)])] for i in range(1, 9)],
        # 3. a capacity-2 slot: one booked, one overbooked, the rest refused
        "capacity_two": [[(p, slot[(8, at9)])] for p in fresh()],
        # 4. three slots, eight bookers each trying all three in its own order
        "few_slots": [[(p, s) for s in few[w % 3:] + few[:w % 3]] for w, p in enumerate(fresh())],
    }
    return list(rounds), [rounds[name] for name in rounds]


def run_threads(sch, plan):
    """Each thread its own Scheduler; one shared session factory (one engine, one pool)."""
    barrier = threading.Barrier(WORKERS)
    results = queue.Queue()

    def main(worker):
        scheduler = Scheduler(sch.sessions, clock=sch.clock)
        try:
            racers.run_rounds(scheduler, plan, worker, lambda: barrier.wait(racers.BARRIER_TIMEOUT), results.put)
        except Exception:  # noqa: BLE001
            import traceback

            results.put((-1, worker, {"unexpected": traceback.format_exc()}))
            barrier.abort()

    threads = [threading.Thread(target=main, args=(w,), name=f"booker-{w}") for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(racers.BARRIER_TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "a booker thread hung"
    return drain(results)


def run_processes(url, now, plan):
    """Each process its own interpreter (spawn), engine, pool, sessions and Scheduler."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=racers.process_main, args=(url, now.isoformat(), plan, w, barrier, results),
                         name=f"booker-{w}") for w in range(WORKERS)]
    for p in procs:
        p.start()
    collected = []
    expected = len(plan) * WORKERS
    try:
        while len(collected) < expected:
            item = results.get(timeout=racers.BARRIER_TIMEOUT * 2)
            collected.append(item)
            if item[0] == -1:
                break
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return collected


def drain(q):
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def check_outcomes(names, results):
    crashed = [r for r in results if r[0] == -1 or r[2].get("unexpected")]
    assert not crashed, "\n".join(r[2]["unexpected"] for r in crashed)
    by_round = defaultdict(list)
    for round_no, worker, outcome in results:
        by_round[names[round_no]].append(outcome)
    assert {name: len(v) for name, v in by_round.items()} == {name: WORKERS for name in names}

    def won(name):
        return [o for o in by_round[name] if o["booked"]]

    def refusals(name):
        return [r for o in by_round[name] for r in o["refusals"]]

    # 1. one winner; every loser was told the slot is taken
    assert len(won("one_slot")) == 1
    assert [r["type"] for r in refusals("one_slot")] == ["SlotUnavailable"] * (WORKERS - 1)
    assert all(SLOT_TAKEN.match(r["message"]) for r in refusals("one_slot")), refusals("one_slot")
    # 2. the patient ends up with one appointment; the others heard whose it is
    (winner,) = won("one_patient")
    assert [r["type"] for r in refusals("one_patient")] == ["PatientConflict"] * (WORKERS - 1)
    for r in refusals("one_patient"):
        m = PATIENT_TAKEN.match(r["message"])
        assert m, r["message"]
        assert (int(m.group(1)), int(m.group(2))) == (winner["patient_id"], winner["booked"])
        assert r["subject"] == f"patient:{winner['patient_id']}"
    # 3. capacity two: booked + overbooked, six refused
    assert sorted(o["status"] for o in won("capacity_two")) == ["booked", "overbooked"]
    assert [r["type"] for r in refusals("capacity_two")] == ["SlotUnavailable"] * (WORKERS - 2)
    assert all(SLOT_TAKEN.match(r["message"]) for r in refusals("capacity_two"))
    # 4. three slots, three winners on three different slots; each loser tried all three
    assert len(won("few_slots")) == 3 and len({o["slot_id"] for o in won("few_slots")}) == 3
    losers = [o for o in by_round["few_slots"] if not o["booked"]]
    assert all(len(o["refusals"]) == 3 for o in losers)
    assert all(r["type"] == "SlotUnavailable" and SLOT_TAKEN.match(r["message"]) for r in refusals("few_slots"))
    # and it was a race: in some round, bookers were inside the engine at the same time
    contended = 0
    for outcomes in by_round.values():
        spans = sorted((o["started"], o["finished"]) for o in outcomes)
        contended = max(contended, sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1]))
    assert contended >= 1, "no two bookers overlapped in time: the test did not race"
    return [o["booked"] for o in results_outcomes(results) if o["booked"]]


def results_outcomes(results):
    return [r[2] for r in results]


def check_database(sch, booked_ids):
    """Read everything back: no overlapping bookings for anybody."""
    with sch.sessions() as s:
        appointments = list(s.scalars(select(Appointment).where(Appointment.status.in_([x.value for x in OCCUPYING]))))
        capacity = {p: c for p, c in s.execute(select(Slot.provider_id, Slot.capacity))}
        slots = s.execute(select(Slot.id, Slot.booked, Slot.capacity)).all()
        links = Counter(s.scalars(select(AppointmentSlot.slot_id)))
        rows = s.execute(select(Reservation.subject, Reservation.unit, Reservation.seat,
                                Reservation.appointment_id)).all()
    assert sorted(a.id for a in appointments) == sorted(booked_ids)
    by_provider, by_patient = defaultdict(list), defaultdict(list)
    for a in appointments:
        by_provider[a.provider_id].append((a.start, a.end))
        by_patient[a.patient_id].append((a.start, a.end))
    for provider, intervals in by_provider.items():
        if capacity[provider] == 1:
            assert not overlapping(intervals), f"provider {provider} double booked: {overlapping(intervals)}"
        else:
            assert max(Counter(intervals).values()) <= capacity[provider]
    for patient, intervals in by_patient.items():
        assert not overlapping(intervals), f"patient {patient} double booked: {overlapping(intervals)}"
    for slot_id, booked, cap in slots:
        assert booked <= cap and booked == links.get(slot_id, 0), (slot_id, booked, cap)
    per_unit = defaultdict(set)
    for subject, unit, seat, appointment_id in rows:
        per_unit[(subject, unit)].add(appointment_id)
    for (subject, _unit), holders in per_unit.items():
        limit = max(capacity.values()) if subject.startswith("provider:") else 1
        assert len(holders) <= limit, (subject, holders)
    assert {r.appointment_id for r in rows} == set(booked_ids)  # no reservation left behind by a loser


def test_racing_threads_never_double_book(arena, db_kind):
    names, plan = build_plan(arena)
    results = run_threads(arena, plan)
    check_database(arena, check_outcomes(names, results))


def test_racing_processes_never_double_book(arena, slotengine_database_url, db_kind):
    names, plan = build_plan(arena)
    results = run_processes(slotengine_database_url, arena.clock.now(), plan)
    check_database(arena, check_outcomes(names, results))


def test_the_race_clinic_is_what_the_plan_assumes(arena):
    assert slot_at(arena, "RACE8", local(TUESDAY, "09:00")).capacity == 2
    assert slot_at(arena, "RACE1", local(TUESDAY, "09:30")).capacity == 1
    assert provider_id(arena, "RACE8") is not None
