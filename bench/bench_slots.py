#!/usr/bin/env python
"""Slot engine benchmark: a 200-provider clinic, 90 days of 15-minute slots.

    python bench/bench_slots.py                       # temp SQLite file, synchronous=FULL
    python bench/bench_slots.py --providers 200 --days 90 --threads 8
    python bench/bench_slots.py --database postgresql+psycopg://postgres@127.0.0.1/bench
    python bench/bench_slots.py --profile             # cProfile of the search and booking phases

It builds the clinic (two locations, New York and Los Angeles; ten
specialties; every provider 08:00-16:00 every day in 15-minute slots: 200 x 90
x 32 = 576,000 slots), then measures, all in one run:

- template expansion time (``Scheduler.expand_templates``);
- slot search latency p50/p95: by provider, and by specialty across all
  providers with the patient's preferences (provider gender, weekdays, hours);
- bookings per second through ``Scheduler.book``, sequentially and with N
  threads (each thread its own Scheduler, one engine);
- the same operations done naively, as a same-run baseline: search by loading
  the provider's (or every matching provider's) slots with the ORM and
  filtering in Python; booking with a plain ORM check-then-insert and no
  double-booking guard, no audit.  The ratios say what the figures mean on
  this machine.

Targets: search p95 <= 10 ms; >= 1,000 bookings/s on SQLite.  Prints a table,
then one JSON line (``BENCH {...}``) for CI to keep.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import date, datetime, time as dtime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy  # noqa: E402
from sqlalchemy import func, insert, select, text  # noqa: E402

from engine.clinic import load_clinic_data  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.errors import SchedulingError  # noqa: E402
from engine.models import Appointment, Patient, PatientIdentifier, Provider, Slot  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.requests import Actor, BookingRequest, SlotQuery  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import EXCLUSIVE_SLOT_TYPES, Scheduler  # noqa: E402
from engine.states import OCCUPYING  # noqa: E402

SPECIALTIES = ["family_medicine", "cardiology", "dermatology", "neurology", "orthopedics", "pediatrics",
               "psychiatry", "oncology", "endocrinology", "gastroenterology"]
LOCATIONS = [("MAIN", "America/New_York"), ("WEST", "America/Los_Angeles")]
FIRST_DAY = date(2026, 6, 1)  # a Monday; no clock change in the next 90 days in either zone
BENCH = Actor("system", "bench", "bench_slots.py")
TARGET_SEARCH_P95_MS = 10.0
TARGET_BOOKINGS_PER_S = 1000.0


# --- the clinic -----------------------------------------------------------------------------


def clinic_data(providers: int) -> dict:
    return {
        "locations": [{"code": code, "name": code, "timezone": tz} for code, tz in LOCATIONS],
        "providers": [
            {"code": f"P{i:04d}", "family_name": f"Doctor{i}", "gender": "FM"[i % 2],
             "languages": ["en"] + (["es"] if i % 3 == 0 else []),
             "specialties": sorted({SPECIALTIES[i % 10], SPECIALTIES[(i * 7 + 3) % 10]}),
             "location": LOCATIONS[i % 2][0]}
            for i in range(providers)
        ],
        "templates": [
            {"code": f"T{i:04d}", "provider": f"P{i:04d}", "location": LOCATIONS[i % 2][0],
             "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "08:00", "end": "16:00",
             "slot_minutes": 15, "slot_type": "new_patient"}
            for i in range(providers)
        ],
    }


def add_patients(session_factory, count: int, now: datetime, rng: random.Random) -> list[int]:
    """Patients in bulk (set-up, not measured), a third with preferences of every kind."""
    rows, idents = [], []
    for i in range(count):
        prefs = i % 3 == 0
        earliest = rng.choice([8, 9, 10, 11]) if prefs else None
        rows.append({
            "family_name": f"Patient{i}", "given_name": "Bench", "sex": "FM"[i % 2], "language": "en",
            "email": "", "phones": [], "address": {}, "needs_interpreter": False, "mobility": "",
            "other_needs": "", "preferred_provider_gender": rng.choice("FM") if prefs else "",
            "preferred_weekdays": sorted(rng.sample(range(7), rng.randint(2, 5))) if prefs else [],
            "preferred_earliest": dtime(earliest) if prefs else None,
            "preferred_latest": dtime(earliest + rng.randint(3, 5)) if prefs else None,
            "preferred_channel": "", "confidential": False, "created_at": now, "updated_at": now,
        })
    with session_factory() as s, s.begin():
        s.execute(insert(Patient), rows)
        ids = list(s.scalars(select(Patient.id).order_by(Patient.id)))
        for pid in ids:
            idents.append({"patient_id": pid, "value": f"B{pid:07d}", "authority": "BENCH", "type_code": "MR"})
        s.execute(insert(PatientIdentifier), idents)
    return ids


# --- naive baselines ---------------------------------------------------------------------------


def naive_search(session_factory, query: SlotQuery, now: datetime) -> list:
    """What one writes without thinking: ORM objects for everything, filters in Python."""
    with session_factory() as s:
        patient = s.get(Patient, query.patient_id) if query.patient_id else None
        gender = query.provider_gender or (patient.preferred_provider_gender if patient else "")
        weekdays = query.weekdays or (patient.preferred_weekdays if patient else None)
        earliest = query.earliest or (patient.preferred_earliest if patient else None)
        latest = query.latest or (patient.preferred_latest if patient else None)
        if query.provider_id is not None:
            providers = [query.provider_id]
        else:
            providers = [p.id for p in s.scalars(select(Provider))
                         if (not query.specialty or query.specialty in p.specialties)
                         and (not gender or p.gender == gender)]
        busy = []
        if patient is not None:
            busy = [(a.start, a.end) for a in s.scalars(select(Appointment).where(Appointment.patient_id == patient.id))
                    if a.status in {x.value for x in OCCUPYING}]
        found = []
        for provider_id in providers:
            for slot in s.scalars(select(Slot).where(Slot.provider_id == provider_id, Slot.start >= query.start,
                                                     Slot.start < query.end)):
                if not slot.is_free or slot.start < now or slot.slot_type in EXCLUSIVE_SLOT_TYPES:
                    continue
                if weekdays and slot.local_weekday not in weekdays:
                    continue
                if earliest and slot.local_minute < earliest.hour * 60 + earliest.minute:
                    continue
                if latest and slot.local_minute >= latest.hour * 60 + latest.minute:
                    continue
                if any(b0 < slot.end and slot.start < b1 for b0, b1 in busy):
                    continue
                found.append(slot)
        found.sort(key=lambda x: (x.start, x.id))
        return found[: query.limit]


def naive_book(session_factory, patient_id: int, slot_id: int, now: datetime) -> int:
    """A plain ORM check-then-insert: no reservation rows, no audit, no plugins."""
    with session_factory() as s, s.begin():
        slot = s.get(Slot, slot_id)
        if slot is None or slot.blocked or slot.booked >= slot.capacity:
            raise SchedulingError("slot taken")
        occupying = [x.value for x in OCCUPYING]
        clash = s.scalar(select(Appointment.id).where(
            ((Appointment.provider_id == slot.provider_id) | (Appointment.patient_id == patient_id)),
            Appointment.status.in_(occupying), Appointment.start < slot.end, Appointment.end > slot.start).limit(1))
        if clash is not None:
            raise SchedulingError("overlap")
        appointment = Appointment(status="booked", appointment_type="new_patient", start=slot.start, end=slot.end,
                                  patient_id=patient_id, provider_id=slot.provider_id, location_id=slot.location_id,
                                  source="bench", created_at=now, updated_at=now)
        s.add(appointment)
        slot.booked += 1
        s.flush()
        return appointment.id


# --- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latencies(call, args_list) -> dict:
    times = []
    found = 0
    for args in args_list:
        t0 = time.perf_counter()
        result = call(*args)
        times.append((time.perf_counter() - t0) * 1000)
        found += len(result)
    return {"n": len(times), "p50_ms": round(percentile(times, 0.5), 3), "p95_ms": round(percentile(times, 0.95), 3),
            "mean_ms": round(statistics.fmean(times), 3), "results_per_query": round(found / max(1, len(times)), 1)}


def book_all(book_one, jobs, threads: int) -> dict:
    """Run (patient, slot) bookings, sequentially (threads=1) or split over threads; bookings/s."""
    refused, errors = [0], []
    lock = threading.Lock()

    def run(chunk, book):
        for patient_id, slot_id in chunk:
            try:
                book(patient_id, slot_id)
            except SchedulingError:
                with lock:
                    refused[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                with lock:
                    errors.append(repr(exc))

    chunks = [jobs[i::threads] for i in range(threads)]
    bookers = [book_one() for _ in range(threads)]
    c0 = time.process_time()
    t0 = time.perf_counter()
    if threads == 1:
        run(chunks[0], bookers[0])
    else:
        pool = [threading.Thread(target=run, args=(chunks[i], bookers[i])) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"n": len(jobs), "threads": threads, "seconds": round(elapsed, 3),
            "cpu_ms_per_booking": round(cpu / max(1, len(jobs)) * 1000, 3),
            "per_s": round((len(jobs) - refused[0] - len(errors)) / elapsed, 1), "refused": refused[0],
            "errors": errors[:3]}


def book_grouped(scheduler: Scheduler, sessions, jobs, batch: int) -> dict:
    """Group commit: ``batch`` bookings share one transaction (one fsync), each in its own
    savepoint through ``Scheduler.within`` -- how the HL7 listener applies messages that
    arrive together.  A refused booking undoes only itself."""
    refused, errors = 0, []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(jobs), batch):
        with sessions() as s, s.begin():
            view = scheduler.within(s)
            for patient_id, slot_id in jobs[i:i + batch]:
                try:
                    view.book(BookingRequest(patient_id, "new_patient", slot_id=slot_id), BENCH)
                except SchedulingError:
                    refused += 1
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    errors.append(repr(exc))
        view.notify_committed()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"n": len(jobs), "batch": batch, "seconds": round(elapsed, 3),
            "cpu_ms_per_booking": round(cpu / max(1, len(jobs)) * 1000, 3),
            "per_s": round((len(jobs) - refused - len(errors)) / elapsed, 1), "refused": refused,
            "errors": errors[:3]}


def commit_floor_ms(directory: str | None) -> float | None:
    """What one durable commit costs on this disk (WAL, synchronous=FULL, one tiny row):
    the ceiling on transactions per second, whatever the engine does."""
    if directory is None:
        return None
    path = Path(directory) / "fsync-probe.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL)")
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO probe (at) VALUES (?)", (t0,))
            conn.execute("COMMIT")
            times.append((time.perf_counter() - t0) * 1000)
        return round(percentile(times, 0.5), 3)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def machine(engine) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import engine as engine_package

    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "engine_package": str(Path(engine_package.__file__).parent),
            "sqlalchemy": sqlalchemy.__version__, "database": engine.dialect.name, "platform": platform.platform(),
            "load_average": round(os.getloadavg()[0], 2)}  # other work on the machine skews every figure
    with engine.connect() as c:
        if engine.dialect.name == "sqlite":
            info["sqlite"] = sqlite3.sqlite_version
            info["synchronous"] = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[c.exec_driver_sql(
                "PRAGMA synchronous").scalar()]
            info["journal_mode"] = c.exec_driver_sql("PRAGMA journal_mode").scalar()
        else:
            info["server"] = c.execute(text("SHOW server_version")).scalar()
    return info


def profiled(enabled: bool, label: str, fn):
    if not enabled:
        return fn()
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    print(f"\n--- profile: {label} ---\n{out.getvalue()}")
    return result


# --- the run -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", type=int, default=200)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--database", help="SQLAlchemy URL (default: a temporary SQLite file)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--bookings", type=int, default=2000, help="sequential bookings (and as many naive ones)")
    ap.add_argument("--threaded-bookings", type=int, default=4000)
    ap.add_argument("--group-commit", type=int, default=32,
                    help="bookings per transaction in the group-commit run (hl7.processor applies up to 100)")
    ap.add_argument("--searches", type=int, default=300, help="engine searches of each kind")
    ap.add_argument("--baseline-searches", type=int, default=20, help="naive searches of each kind")
    ap.add_argument("--patients", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=20260601)
    ap.add_argument("--profile", action="store_true", help="print cProfile output of search and booking")
    ap.add_argument("--keep", action="store_true", help="keep the temporary SQLite file")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    tmpdir = None
    url = args.database
    if not url:
        tmpdir = tempfile.mkdtemp(prefix="slotengine-bench-")
        url = f"sqlite:///{tmpdir}/bench.db"
    engine = make_engine(url, pool_size=max(5, args.threads + 2))
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        with sessions() as s:
            if s.scalar(select(func.count()).select_from(Slot)):
                ap.error(f"{url} already holds slots: give an empty database")
        now = datetime.combine(FIRST_DAY, dtime(0), tzinfo=timezone.utc)
        clock = ManualClock(now)
        scheduler = Scheduler(sessions, plugins=PluginHost(builtins=(), discover=False), clock=clock)
        results: dict = {"machine": machine(engine), "providers": args.providers, "days": args.days}

        # set-up: clinic and patients (not measured)
        with sessions() as s, s.begin():
            load_clinic_data(s, clinic_data(args.providers))
        patients = add_patients(sessions, args.patients, now, rng)

        # 1. template expansion
        t0 = time.perf_counter()
        created = scheduler.expand_templates(FIRST_DAY, FIRST_DAY + timedelta(days=args.days - 1))
        results["expansion"] = {"slots": created, "seconds": round(time.perf_counter() - t0, 2),
                                "slots_per_s": round(created / (time.perf_counter() - t0))}
        with engine.connect() as c:  # planner statistics, as a running system would have them
            c.exec_driver_sql("ANALYZE")
            c.commit()

        with sessions() as s:
            slot_ids = list(s.scalars(select(Slot.id)))
            provider_ids = list(s.scalars(select(Provider.id)))

        # 2. bookings: engine sequential, engine threaded, naive sequential, naive threaded
        picks = rng.sample(slot_ids, args.bookings * 3 + args.threaded_bookings * 2)
        people = rng.sample(patients, min(len(patients), len(picks)))
        people += [rng.choice(patients) for _ in range(len(picks) - len(people))]
        jobs = list(zip(people, picks))
        seq, thr = jobs[:args.bookings], jobs[args.bookings:args.bookings + args.threaded_bookings]
        naive_seq = jobs[args.bookings + args.threaded_bookings:2 * args.bookings + args.threaded_bookings]
        naive_thr = jobs[2 * args.bookings + args.threaded_bookings:2 * args.bookings + 2 * args.threaded_bookings]
        grouped = jobs[2 * args.bookings + 2 * args.threaded_bookings:]

        def engine_booker():
            own = Scheduler(sessions, plugins=PluginHost(builtins=(), discover=False), clock=clock)
            return lambda p, sl: own.book(BookingRequest(p, "new_patient", slot_id=sl), BENCH)

        def naive_booker():
            return lambda p, sl: naive_book(sessions, p, sl, now)

        results["book_engine_sequential"] = profiled(args.profile, "engine booking (sequential)",
                                                     lambda: book_all(engine_booker, seq, 1))
        results["book_engine_threads"] = book_all(engine_booker, thr, args.threads)
        results["book_naive_sequential"] = book_all(naive_booker, naive_seq, 1)
        results["book_naive_threads"] = book_all(naive_booker, naive_thr, args.threads)
        if hasattr(scheduler, "within"):
            results["book_engine_group_commit"] = book_grouped(scheduler, sessions, grouped, args.group_commit)
        results["commit_floor_ms"] = commit_floor_ms(tmpdir)

        # 3. searches, on the partly booked schedule
        window = timedelta(days=28)
        with_prefs = [p for p in patients[::3]]
        by_provider = [(SlotQuery("new_patient", now, now + window, provider_id=rng.choice(provider_ids), limit=10),)
                       for _ in range(args.searches)]
        by_specialty = [(SlotQuery("new_patient", now, now + window, specialty=rng.choice(SPECIALTIES),
                                   patient_id=rng.choice(with_prefs), limit=10),) for _ in range(args.searches)]
        for q in by_provider[:20] + by_specialty[:20]:  # warm caches and pools
            scheduler.free_slots(q[0])
        results["search_provider"] = profiled(args.profile, "search by provider",
                                              lambda: latencies(scheduler.free_slots, by_provider))
        results["search_specialty_prefs"] = profiled(args.profile, "search by specialty with preferences",
                                                     lambda: latencies(scheduler.free_slots, by_specialty))
        naive = lambda q: naive_search(sessions, q, now)  # noqa: E731
        results["naive_search_provider"] = latencies(naive, by_provider[:args.baseline_searches])
        results["naive_search_specialty_prefs"] = latencies(naive, by_specialty[:args.baseline_searches])

        # 4. check: the engine's answers agree with the naive ones (same slots, same order)
        for (q,) in by_provider[:10] + by_specialty[:10]:
            ours = [c.slot_id for c in scheduler.free_slots(q)]
            theirs = [x.id for x in naive_search(sessions, q, now)]
            if ours != theirs:
                raise SystemExit(f"engine and naive search disagree for {q}: {ours} != {theirs}")

        report(results)
        errors = [k for k, v in results.items() if isinstance(v, dict) and v.get("errors")]
        return 1 if errors else 0  # figures depend on the machine; unexpected errors do not
    finally:
        engine.dispose()
        if tmpdir and not args.keep:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmpdir:
            print(f"kept {tmpdir}/bench.db")


def report(r: dict) -> None:
    m = r["machine"]
    p95 = max(r["search_provider"]["p95_ms"], r["search_specialty_prefs"]["p95_ms"])
    per_s = r["book_engine_sequential"]["per_s"]
    r["ratios"] = {
        "search_provider_p95_speedup_vs_naive": round(r["naive_search_provider"]["p95_ms"] / r["search_provider"]["p95_ms"], 1),
        "search_specialty_p95_speedup_vs_naive": round(
            r["naive_search_specialty_prefs"]["p95_ms"] / r["search_specialty_prefs"]["p95_ms"], 1),
        "booking_sequential_vs_naive": round(per_s / r["book_naive_sequential"]["per_s"], 2),
        "booking_threads_vs_naive": round(r["book_engine_threads"]["per_s"] / r["book_naive_threads"]["per_s"], 2),
    }
    grouped = r.get("book_engine_group_commit")
    r["targets"] = {"search_p95_ms": TARGET_SEARCH_P95_MS, "bookings_per_s": TARGET_BOOKINGS_PER_S}
    r["targets_met"] = {
        "search_p95": p95 <= TARGET_SEARCH_P95_MS,
        "bookings_one_per_transaction": per_s >= TARGET_BOOKINGS_PER_S,
        "bookings_group_commit": bool(grouped) and grouped["per_s"] >= TARGET_BOOKINGS_PER_S,
    }
    r["meets_targets"] = r["targets_met"]["search_p95"] and (
        r["targets_met"]["bookings_one_per_transaction"] or r["targets_met"]["bookings_group_commit"])

    r["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    machine_line = (f"{m['cpu']} | {m['cores']} cores (load {m['load_average']} -> {m['load_average_at_end']}) | "
                    f"Python {m['python']} | SQLAlchemy {m['sqlalchemy']} | "
                    + (f"SQLite {m['sqlite']} ({m['journal_mode']}, synchronous={m['synchronous']})"
                       if m["database"] == "sqlite" else f"PostgreSQL {m.get('server')}"))
    rows = [
        ("template expansion", f"{r['expansion']['slots']:,} slots", f"{r['expansion']['seconds']:.2f} s",
         f"{r['expansion']['slots_per_s']:,} slots/s", ""),
        ("search by provider", "p50 / p95", f"{r['search_provider']['p50_ms']:.2f} / {r['search_provider']['p95_ms']:.2f} ms",
         f"naive {r['naive_search_provider']['p50_ms']:.1f} / {r['naive_search_provider']['p95_ms']:.1f} ms",
         f"x{r['ratios']['search_provider_p95_speedup_vs_naive']}"),
        ("search by specialty + prefs", "p50 / p95",
         f"{r['search_specialty_prefs']['p50_ms']:.2f} / {r['search_specialty_prefs']['p95_ms']:.2f} ms",
         f"naive {r['naive_search_specialty_prefs']['p50_ms']:.1f} / {r['naive_search_specialty_prefs']['p95_ms']:.1f} ms",
         f"x{r['ratios']['search_specialty_p95_speedup_vs_naive']}"),
        ("bookings, sequential", f"{r['book_engine_sequential']['n']:,}",
         f"{per_s:,.0f} /s ({r['book_engine_sequential']['cpu_ms_per_booking']:.2f} ms CPU each)",
         f"naive {r['book_naive_sequential']['per_s']:,.0f} /s "
         f"({r['book_naive_sequential']['cpu_ms_per_booking']:.2f} ms CPU each)", f"x{r['ratios']['booking_sequential_vs_naive']}"),
        (f"bookings, {r['book_engine_threads']['threads']} threads", f"{r['book_engine_threads']['n']:,}",
         f"{r['book_engine_threads']['per_s']:,.0f} /s", f"naive {r['book_naive_threads']['per_s']:,.0f} /s",
         f"x{r['ratios']['booking_threads_vs_naive']}"),
    ]
    if grouped:
        rows.append((f"bookings, group commit of {grouped['batch']}", f"{grouped['n']:,}",
                     f"{grouped['per_s']:,.0f} /s ({grouped['cpu_ms_per_booking']:.2f} ms CPU each)", "", ""))
    if r.get("commit_floor_ms"):
        rows.append(("one durable commit (this disk)", "p50", f"{r['commit_floor_ms']:.2f} ms",
                     f"<= {1000 / r['commit_floor_ms']:,.0f} transactions/s", ""))
    print(f"\nslotengine bench: {r['providers']} providers x {r['days']} days (engine core: no plugins)\n"
          f"{machine_line}\n")
    widths = [max(len(str(row[i])) for row in rows + [("", "", "engine", "same-run baseline", "ratio")])
              for i in range(5)]
    header = ("", "", "engine", "same-run baseline", "ratio")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"\ntargets: search p95 <= {TARGET_SEARCH_P95_MS:g} ms: {met(p95 <= TARGET_SEARCH_P95_MS)} ({p95:.2f} ms)")
    print(f"         >= {TARGET_BOOKINGS_PER_S:,.0f} bookings/s, one transaction (one fsync) per booking: "
          f"{met(per_s >= TARGET_BOOKINGS_PER_S)} ({per_s:,.0f}/s)")
    if grouped:
        print(f"         >= {TARGET_BOOKINGS_PER_S:,.0f} bookings/s, group commit of {grouped['batch']} as hl7.processor "
              f"applies messages: {met(grouped['per_s'] >= TARGET_BOOKINGS_PER_S)} ({grouped['per_s']:,.0f}/s)")
    for key in ("book_engine_sequential", "book_engine_threads", "book_naive_sequential", "book_naive_threads",
                "book_engine_group_commit"):
        if r.get(key, {}).get("errors"):
            print(f"{key}: unexpected errors {r[key]['errors']}")
    print("BENCH " + json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
