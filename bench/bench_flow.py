#!/usr/bin/env python
"""What arrival smoothing costs the slot search, and what the flow report costs.

    python bench/bench_flow.py                  # 20 providers, 10 days, half booked
    python bench/bench_flow.py --quick
    python bench/bench_flow.py --database postgresql+psycopg://postgres@127.0.0.1/bench

One location (New York), every provider 08:00-16:00 in 15-minute slots, about
half of them booked at random.  The same searches (10 candidates from a random
morning, any provider) run four ways in one run:

- ``baseline``: no plugins (earliest first);
- ``flow idle``: the flow plugin registered, no arrival limit configured;
- ``exclude``: a limit of a quarter of the providers per 15 minutes, crowded
  windows left out (the plugin counts each candidate's window: one indexed
  query for the filter, one for the score);
- ``rank``: the same limit, crowded windows ranked last.

Prints p50/p95 search latency and the ratio to the baseline, the time of one
day's ``flow_report``, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from datetime import date, time as dtime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.calendar import local_to_utc  # noqa: E402
from engine.clinic import load_clinic_data  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.errors import SchedulingError  # noqa: E402
from engine.jobs import make_context  # noqa: E402
from engine.models import Slot  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.requests import Actor, BookingRequest, Identifier, PatientRecord, SlotQuery  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import Scheduler  # noqa: E402
from sqlalchemy import select  # noqa: E402

import plugins.flow as flow  # noqa: E402
from common import machine_info, machine_line, percentile, print_table, source_revision  # noqa: E402
from plugins.flow_report import flow_report  # noqa: E402

NY = "America/New_York"
FIRST_DAY = date(2026, 3, 2)  # a Monday
ACTOR = Actor("system", "bench")


def build(url: str, providers: int, days: int, seed: int) -> tuple[Scheduler, int]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    clinic = {
        "locations": [{"code": "MAIN", "name": "Main", "timezone": NY}],
        "providers": [{"code": f"DR{i:03}", "family_name": f"Doc{i}", "location": "MAIN"} for i in range(providers)],
        "templates": [{"code": f"T{i:03}", "provider": f"DR{i:03}", "location": "MAIN",
                       "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "08:00", "end": "16:00",
                       "slot_minutes": 15} for i in range(providers)],
    }
    with sessions() as session, session.begin():
        load_clinic_data(session, clinic)
    scheduler = Scheduler(sessions, clock=ManualClock(local_to_utc(FIRST_DAY, dtime(6), NY)))
    scheduler.expand_templates(FIRST_DAY, FIRST_DAY + timedelta(days=days - 1))
    with sessions() as session:
        slot_ids = list(session.scalars(select(Slot.id).order_by(Slot.id)))
    rng = random.Random(seed)
    chosen = rng.sample(slot_ids, len(slot_ids) // 2)
    patients = [scheduler.register_patient(PatientRecord(identifiers=[Identifier(f"B{i}", "BENCH", "MR")]), ACTOR).id
                for i in range(len(chosen))]
    booked = 0
    for slot_id, patient_id in zip(chosen, patients):
        try:
            scheduler.book(BookingRequest(patient_id=patient_id, appointment_type="new_patient", slot_id=slot_id),
                           ACTOR)
            booked += 1
        except SchedulingError:
            pass
    return scheduler, booked


def searches(days: int, count: int, seed: int) -> list[SlotQuery]:
    rng = random.Random(seed)
    queries = []
    for _ in range(count):
        day = FIRST_DAY + timedelta(days=rng.randrange(days))
        start = local_to_utc(day, dtime(rng.choice([8, 9, 10, 11])), NY)
        queries.append(SlotQuery("new_patient", start, start + timedelta(hours=6), limit=10))
    return queries


def measure(scheduler: Scheduler, queries: list[SlotQuery]) -> list[float]:
    scheduler.free_slots(queries[0])  # warm the statement cache
    took = []
    for query in queries:
        started = time.perf_counter()
        scheduler.free_slots(query)
        took.append((time.perf_counter() - started) * 1000)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=20)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--database", help="a database URL (default: a temporary SQLite file)")
    parser.add_argument("--quick", action="store_true", help="8 providers, 4 days, 100 searches")
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.providers, args.days, args.searches = 8, 4, 100
    tmp = None
    url = args.database
    if url is None:
        tmp = tempfile.mkdtemp(prefix="bench-flow-")
        url = f"sqlite:///{tmp}/flow.db"
    try:
        info = machine_info()
        started = time.perf_counter()
        scheduler, booked = build(url, args.providers, args.days, args.seed)
        build_seconds = time.perf_counter() - started
        queries = searches(args.days, args.searches, args.seed)
        limit = max(1, args.providers // 4)
        setups = {
            "baseline": (PluginHost(builtins=(), discover=False), None),
            "flow idle": (PluginHost(builtins=(), discover=False, extra=[("flow", flow)]), {}),
            "exclude": (PluginHost(builtins=(), discover=False, extra=[("flow", flow)]),
                        {"max_arrivals": {"MAIN": limit}}),
            "rank": (PluginHost(builtins=(), discover=False, extra=[("flow", flow)]),
                     {"max_arrivals": {"MAIN": limit}, "over_limit": "rank"}),
        }
        figures = {}
        for name, (host, settings) in setups.items():
            scheduler.plugins = host
            if settings is not None:
                make_context(scheduler, plugin_settings={"flow": {**settings, "reply_secret": "bench"}})
            took = measure(scheduler, queries)
            figures[name] = {"p50_ms": round(percentile(took, 50), 3), "p95_ms": round(percentile(took, 95), 3)}
        base = figures["baseline"]["p50_ms"]
        for values in figures.values():
            values["p50_vs_baseline"] = round(values["p50_ms"] / base, 2) if base else None
        settings = flow.parse_settings({"max_arrivals": {"MAIN": limit}})
        report_times = []
        with scheduler.sessions() as session:
            for offset in range(min(args.days, 5)):
                started = time.perf_counter()
                flow_report(session, FIRST_DAY + timedelta(days=offset), settings)
                report_times.append((time.perf_counter() - started) * 1000)

        print(machine_line(info))
        print(f"{args.providers} providers x {args.days} days, {booked} appointments booked "
              f"(built in {build_seconds:.1f} s); arrival limit {limit} per 15 minutes; {args.searches} searches")
        print_table(["search", "p50 ms", "p95 ms", "p50 / baseline"],
                    [[name, v["p50_ms"], v["p95_ms"], v["p50_vs_baseline"]] for name, v in figures.items()])
        print(f"flow report, one day: {percentile(report_times, 50):.1f} ms (median of {len(report_times)})")
        result = {"bench": "flow", "machine": info, "source": source_revision(),
                  "database": "postgresql" if url.startswith("postgresql") else "sqlite",
                  "providers": args.providers, "days": args.days, "appointments": booked, "limit": limit,
                  "search": figures, "report_ms": round(percentile(report_times, 50), 2)}
        print("BENCH " + json.dumps(result, sort_keys=True, default=str))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
