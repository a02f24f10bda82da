"""Plan and dispatch reminders for many appointments to a loopback SMTP sink.

    python bench/bench_reminders.py [--appointments 100000] [--baseline 3000] [--batch 500]

What it measures, on one SQLite file (WAL, synchronous=FULL, as in production):

1. planning: ``plugins.reminders.plan_reminders`` for every appointment (one
   24-hour reminder each), committed 2,000 appointments per transaction;
2. dispatch: the real sweep (``plugins.reminders.send_due`` →
   ``engine.jobs.dispatch_outbox``: claim a batch, render, send, mark sent in
   the claiming transaction) to an aiosmtpd server in another process, the
   built-in SMTP channel reusing one connection per batch;
3. baseline, same run: the same sweep with one SMTP connection per message,
   on the first ``--baseline`` reminders of a fresh set.

Prints a table and one JSON line (rates, the ratio to the baseline, peak RSS).
Target: ≥ 2,000 reminders/s dispatched.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, select  # noqa: E402

from engine.clinic import load_clinic_data  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.jobs import make_context  # noqa: E402
from engine.models import Appointment, Location, Patient, Provider  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import Scheduler  # noqa: E402
from engine.testing import DEMO_CLINIC  # noqa: E402
from plugins.reminders import plan_reminders, send_due  # noqa: E402

START = datetime(2026, 3, 2, 14, 0, tzinfo=timezone.utc)  # Monday 09:00 New York
VISITS = datetime(2026, 3, 5, 14, 0, tzinfo=timezone.utc)  # Thursday 09:00 New York
DUE = VISITS - timedelta(hours=24) + timedelta(hours=8, minutes=1)  # every 24-hour reminder is due


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sink(port: int, counter, ready) -> None:
    """An aiosmtpd server that counts messages (in its own process: no GIL shared with the sender)."""
    import asyncio

    from aiosmtpd.controller import Controller

    class Counter:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's naming
            with counter.get_lock():
                counter.value += 1
            return "250 OK"

    controller = Controller(Counter(), hostname="127.0.0.1", port=port, server_hostname="localhost")
    controller.start()
    ready.set()
    try:
        asyncio.run(asyncio.sleep(10**6))
    finally:
        controller.stop()


def setup(path: Path, port: int, appointments: int, batch: int):
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        load_clinic_data(session, DEMO_CLINIC)
    clock = ManualClock(START)
    scheduler = Scheduler(factory, plugins=PluginHost(discover=False, disabled=["waitlist_fill", "eligibility",
                                                                               "referrals", "notices"]), clock=clock)
    context = make_context(scheduler, plugin_settings={
        "channels": {"email": {"host": "127.0.0.1", "port": port, "sender": "clinic@example.org"}},
        "reminders": {"offsets_hours": [24], "confirmation": False, "batch_size": batch,
                      "reply_secret": "bench", "clinic_name": "Main Street Clinic"},
    })
    with factory() as session, session.begin():
        provider = session.scalar(select(Provider.id).where(Provider.code == "DRSMITH"))
        location = session.scalar(select(Location.id).where(Location.code == "MAIN"))
        now = clock.now()
        for first in range(0, appointments, 10000):
            count = min(10000, appointments - first)
            session.execute(insert(Patient), [
                {"family_name": f"Patient{i}", "given_name": "Pat", "email": f"p{i}@example.org", "phones": [],
                 "address": {}, "preferred_weekdays": [], "created_at": now, "updated_at": now}
                for i in range(first, first + count)])
        patient_ids = list(session.scalars(select(Patient.id).order_by(Patient.id)))
        # Thursday's visits, 09:00-17:00 New York (the reminders plugin only reads them: the
        # double-booking guard is not what is measured here)
        rows = []
        for i, patient_id in enumerate(patient_ids):
            start = VISITS + timedelta(minutes=15 * (i % 32))
            rows.append({"status": "booked", "appointment_type": "new_patient", "reason": "", "urgency": "routine",
                         "start": start, "end": start + timedelta(minutes=15), "patient_id": patient_id,
                         "provider_id": provider, "location_id": location, "notes": "", "conflict": "",
                         "review_reason": "", "eligibility": {}, "source": "api", "created_at": now,
                         "updated_at": now})
        for first in range(0, len(rows), 10000):
            session.execute(insert(Appointment), rows[first:first + 10000])
    return engine, factory, clock, context


def plan(factory, context, limit: int | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    planned = 0
    with factory() as session:
        ids = list(session.scalars(select(Appointment.id).order_by(Appointment.id).limit(limit)))
    for first in range(0, len(ids), 2000):
        with factory() as session, session.begin():
            for appointment in session.scalars(select(Appointment).where(Appointment.id.in_(ids[first:first + 2000]))):
                planned += plan_reminders(session, appointment, context)
    return planned, time.perf_counter() - started


def dispatch(context) -> tuple[int, float]:
    started = time.perf_counter()
    total = 0
    while True:
        sent = int(send_due(context).split()[0])
        total += sent
        if sent == 0:
            break
    return total, time.perf_counter() - started


class OneConnectionPerMessage:
    """The baseline: the same SMTP channel, without ``send_many`` (a connection per message)."""

    def __init__(self, channel):
        self.channel = channel

    def send(self, message):
        self.channel.send(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appointments", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=3_000, help="reminders sent for the baseline")
    parser.add_argument("--batch", type=int, default=500, help="outbox rows claimed (and one connection) per batch")
    args = parser.parse_args()

    port = free_port()
    counter, ready = multiprocessing.Value("l", 0), multiprocessing.Event()
    sink = multiprocessing.Process(target=run_sink, args=(port, counter, ready), daemon=True)
    sink.start()
    ready.wait(10)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine, factory, clock, context = setup(Path(tmp) / "bench.db", port, args.appointments, args.batch)
            planned, plan_seconds = plan(factory, context)
            clock.set(DUE)
            received_before = counter.value
            sent, send_seconds = dispatch(context)
            received = counter.value - received_before
            engine.dispose()
        with tempfile.TemporaryDirectory() as tmp:
            engine, factory, clock, context = setup(Path(tmp) / "baseline.db", port, args.baseline, args.batch)
            plan(factory, context)
            context.channels["email"] = OneConnectionPerMessage(context.channels["email"])
            clock.set(DUE)
            base_sent, base_seconds = dispatch(context)
            engine.dispose()
    finally:
        sink.terminate()
        sink.join(5)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan_rate, send_rate = planned / plan_seconds, sent / send_seconds
    base_rate = base_sent / base_seconds
    rows = [
        ("appointments", f"{args.appointments:,}"),
        ("reminders planned", f"{planned:,} in {plan_seconds:.1f} s ({plan_rate:,.0f}/s)"),
        ("reminders dispatched", f"{sent:,} in {send_seconds:.1f} s ({send_rate:,.0f}/s), sink received {received:,}"),
        ("baseline (1 connection/message)", f"{base_sent:,} in {base_seconds:.1f} s ({base_rate:,.0f}/s)"),
        ("speed-up over baseline", f"{send_rate / base_rate:.1f}x"),
        ("peak RSS", f"{peak_mib:,.0f} MiB"),
        ("target ≥ 2,000/s", "met" if send_rate >= 2000 else "NOT met"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(json.dumps({
        "bench": "reminders", "appointments": args.appointments, "planned": planned,
        "plan_per_s": round(plan_rate), "dispatched": sent, "received": received,
        "dispatch_per_s": round(send_rate), "baseline_per_s": round(base_rate),
        "baseline_ratio": round(send_rate / base_rate, 2), "batch": args.batch, "peak_rss_mib": round(peak_mib),
    }))


if __name__ == "__main__":
    main()
