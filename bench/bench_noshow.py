#!/usr/bin/env python
"""No-show model and overbooking: what they cost.

    python bench/bench_noshow.py            # 50,000 visits to fit, 600 bookings each way
    python bench/bench_noshow.py --quick    # 10,000 visits, 200 bookings

Measures, in one run, each against a baseline of the same run:

- fitting the show model (``plugins.showmodel.fit``: Newton on visits grouped
  by identical features) against the textbook form, one row per visit, on the
  same seeded history; the coefficients must agree;
- a booking through ``Scheduler.book`` with the ``noshow`` plugin (estimate
  stored at booking) against the same bookings with no plugin, each on a fresh
  SQLite file (synchronous=FULL, as the daemon runs it);
- a slot search that offers overbooking seats (``SlotQuery(overbook=True)``)
  over a fully booked provider day, against the same search without them.

Prints a table, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine_info, machine_line, percentile, print_table  # noqa: E402

from engine.clinic import load_clinic_data  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.jobs import make_context  # noqa: E402
from engine.models import Provider, Slot  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.requests import Actor, BookingRequest, Identifier, PatientRecord, SlotQuery  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import Scheduler  # noqa: E402
from engine.testing import DEMO_CLINIC  # noqa: E402
from plugins.showmodel import FEATURES, TYPES, Visit, estimate, fit, vector  # noqa: E402

TRUE = {"intercept": 1.8, "prior_no_shows": -1.5, "late_cancellations": -0.6, "lead_time": -0.35,
        "new_patient": -0.5, "follow_up": 0.2, "procedure": 0.6, "emergency": 1.2, "monday": -0.3,
        "friday": -0.25, "early": -0.2, "late_afternoon": -0.4}
START = datetime(2026, 3, 2, 7, 0, tzinfo=timezone.utc)
STAFF = Actor("operator", "bench")


def history(count: int) -> list[tuple[Visit, bool]]:
    rng = random.Random(7)
    visits = []
    for _ in range(count):
        visit = Visit(rng.choice(("general", *TYPES)), int(rng.expovariate(1 / 14)), rng.randrange(5),
                      rng.randrange(8 * 60, 17 * 60, 15), min(int(rng.expovariate(1.2)), 6),
                      min(int(rng.expovariate(2)), 4))
        visits.append((visit, rng.random() < estimate(TRUE, visit).probability))
    return visits


def fit_per_row(visits: list[tuple[Visit, bool]], prior_weight: float) -> dict[str, float]:
    """The baseline: Newton's method with one row per visit (what a first version would do)."""
    from plugins.showmodel import PRIOR, _cholesky, _solve  # the same linear algebra

    rows = [(vector(v), 1.0 if showed else 0.0) for v, showed in visits]
    base = [PRIOR[n] for n in FEATURES]
    beta, k = list(base), len(FEATURES)
    for _ in range(50):
        gradient = [-prior_weight * (b - b0) for b, b0 in zip(beta, base)]
        hessian = [[prior_weight if i == j else 0.0 for j in range(k)] for i in range(k)]
        for x, y in rows:
            p = 1 / (1 + math.exp(-sum(b * v for b, v in zip(beta, x))))
            w = p * (1 - p)
            for i in range(k):
                gradient[i] += (y - p) * x[i]
                for j in range(i + 1):
                    hessian[i][j] += w * x[i] * x[j]
        for i in range(k):
            for j in range(i):
                hessian[j][i] = hessian[i][j]
        step = _solve(_cholesky(hessian), gradient)
        beta = [b + d for b, d in zip(beta, step)]
        if max(abs(d) for d in step) < 1e-9:
            break
    return dict(zip(FEATURES, beta))


def clinic(directory: Path, name: str, plugins: PluginHost) -> tuple[Scheduler, list[int]]:
    engine = make_engine(f"sqlite:///{directory / name}.db")
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        load_clinic_data(session, DEMO_CLINIC)
    scheduler = Scheduler(sessions, plugins=plugins, clock=ManualClock(START))
    scheduler.expand_templates(START.date(), START.date() + timedelta(days=27))
    make_context(scheduler, plugin_settings={"noshow": {}})
    with sessions() as session:
        slots = list(session.scalars(select_capacity_one_slots()))
    return scheduler, slots


def select_capacity_one_slots():
    from sqlalchemy import select

    return select(Slot.id).where(Slot.slot_type == "new_patient", Slot.capacity == 1, Slot.start > START) \
        .order_by(Slot.start, Slot.id)


def bookings_per_second(scheduler: Scheduler, slot_ids: list[int], count: int) -> float:
    patients = [scheduler.register_patient(PatientRecord([Identifier(f"B{i}", "HOSP", "MR")]), STAFF).id
                for i in range(count)]
    started = time.perf_counter()
    for patient_id, slot_id in zip(patients, slot_ids):
        scheduler.book(BookingRequest(patient_id, "new_patient", slot_id=slot_id), STAFF)
    return count / (time.perf_counter() - started)


def search_latencies(scheduler: Scheduler, overbook: bool, runs: int) -> list[float]:
    from sqlalchemy import select

    with scheduler.sessions() as session:
        smith = session.scalar(select(Provider.id).where(Provider.code == "DRSMITH"))
    day = datetime(2026, 3, 3, 13, tzinfo=timezone.utc)  # Tuesday 08:00-12:00 New York
    query = SlotQuery("new_patient", day, day + timedelta(hours=5), provider_id=smith, overbook=overbook)
    for i, left in enumerate(scheduler.free_slots(SlotQuery(**{**query.__dict__, "limit": 100, "overbook": False}))):
        patient = scheduler.register_patient(PatientRecord([Identifier(f"T{i}", "HOSP", "MR")]), STAFF)
        scheduler.book(BookingRequest(patient.id, "new_patient", slot_id=left.slot_id), STAFF)  # the day is full
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        scheduler.free_slots(query)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    visits_n, bookings_n = (10_000, 200) if args.quick else (50_000, 600)
    result: dict = {"machine": machine_info()}

    visits = history(visits_n)
    started = time.perf_counter()
    grouped = fit(visits, prior_weight=1.0)
    grouped_s = time.perf_counter() - started
    started = time.perf_counter()
    per_row = fit_per_row(visits, prior_weight=1.0)
    per_row_s = time.perf_counter() - started
    result["fit"] = {"visits": visits_n, "groups": grouped.groups, "iterations": grouped.iterations,
                     "grouped_seconds": round(grouped_s, 3), "per_row_seconds": round(per_row_s, 3),
                     "speedup": round(per_row_s / grouped_s, 1),
                     "max_coefficient_difference": max(abs(grouped.coefficients[n] - per_row[n]) for n in FEATURES)}

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        plain, plain_slots = clinic(directory, "plain", PluginHost(builtins=(), discover=False))
        with_noshow, noshow_slots = clinic(directory, "noshow",
                                           PluginHost(builtins=(("noshow", "plugins.noshow"),), discover=False))
        bookings_n = min(bookings_n, len(plain_slots))
        plain_rate = bookings_per_second(plain, plain_slots, bookings_n)
        noshow_rate = bookings_per_second(with_noshow, noshow_slots, bookings_n)
        result["booking"] = {"bookings": bookings_n, "plain_per_s": round(plain_rate, 1),
                             "noshow_per_s": round(noshow_rate, 1),
                             "cost_ratio": round(plain_rate / noshow_rate, 2)}
        searches = 30 if args.quick else 100
        free = search_latencies(with_noshow, False, searches)
        offering = search_latencies(with_noshow, True, searches)
        result["overbook_search"] = {"runs": searches, "free_only_p50_ms": round(statistics.median(free), 2),
                                     "with_overbook_p50_ms": round(statistics.median(offering), 2),
                                     "with_overbook_p95_ms": round(percentile(offering, 95), 2),
                                     "ratio": round(statistics.median(offering) / statistics.median(free), 1)}

    print(machine_line(result["machine"]))
    fit_row, booking, search = result["fit"], result["booking"], result["overbook_search"]
    print_table(["measure", "noshow", "baseline", "ratio"], [
        [f"fit {visits_n} visits ({fit_row['groups']} groups), s", fit_row["grouped_seconds"],
         f"{fit_row['per_row_seconds']} (one row per visit)", f"{fit_row['speedup']}x faster"],
        [f"bookings/s ({bookings_n}, SQLite)", booking["noshow_per_s"], f"{booking['plain_per_s']} (no plugin)",
         f"{booking['cost_ratio']}x the cost"],
        ["search p50 ms, full day", search["with_overbook_p50_ms"], f"{search['free_only_p50_ms']} (no overbook)",
         f"{search['ratio']}x"],
    ])
    print("BENCH " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
