#!/usr/bin/env python
"""Emergency planner benchmark: how long the exact minimum-harm search takes.

    python bench/bench_emergency.py
    python bench/bench_emergency.py --providers 6 --days 7 --window-hours 4 --repeat 20

A clinic day as the ``emergency`` plugin reads it (``plugins.emergency_plan``):
every provider 08:00-16:00 in 15-minute slots for ``--days`` days, the first day
fully booked but for three free slots (never two side by side), later days
three-quarters booked; an
urgent 30-minute visit must start within ``--window-hours`` with any provider;
moved patients keep their provider.  Measured in the same run:

- ``solve`` on that day (p50 / p95 over ``--repeat`` runs);
- ``solve`` and the brute-force reference (``brute_force``: every placement x
  every subset x every combination of alternatives) on a small day both can
  finish (one provider, eight slots, six visits), and their ratio.

Prints a table, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, machine_line, percentile, print_table  # noqa: E402
from engine.service import EngineSettings, slot_accepts  # noqa: E402
from plugins.emergency_plan import PlanAppointment, PlanSlot, Problem, brute_force, solve  # noqa: E402

T0 = datetime(2026, 3, 2, 13, 0, tzinfo=timezone.utc)  # 08:00 in New York


def day_problem(providers: int, days: int, window_hours: float, slots_per_day: int, seed: int,
                first_day_free: int = 3) -> Problem:
    rng = random.Random(seed)
    slots, appointments = [], []
    slot_id, appointment_id = 1, 1
    for p in range(providers):
        owner = f"provider:{p + 1}"
        for d in range(days):
            # the first day's free slots are never side by side: a 30-minute visit needs a move
            free = set(rng.sample(range(0, slots_per_day, 3), first_day_free)) if d == 0 else \
                {i for i in range(slots_per_day) if rng.random() < 0.25}
            for i in range(slots_per_day):
                start = T0 + timedelta(days=d, minutes=15 * i)
                booked = 0 if i in free else 1
                slots.append(PlanSlot(slot_id, owner, start, start + timedelta(minutes=15), "new_patient", 1, booked,
                                      local_weekday=d % 7, local_minute=480 + 15 * i))
                if booked:
                    appointments.append(PlanAppointment(appointment_id, 10_000 + appointment_id, owner, start,
                                                        start + timedelta(minutes=15), "new_patient", (slot_id,)))
                    appointment_id += 1
                slot_id += 1
    now = T0 + timedelta(minutes=30)
    return Problem(
        slots=slots, appointments=appointments,
        accepts=lambda s, kind, urgency: slot_accepts(s, kind, urgency, now, EngineSettings()) is None,
        urgent_type="general", urgent_duration=timedelta(minutes=30),
        urgent_owners=frozenset(f"provider:{p + 1}" for p in range(providers)),
        earliest=T0 + timedelta(hours=1), latest_start=T0 + timedelta(hours=1 + window_hours),
        min_start=T0 + timedelta(hours=1),
        patient_busy={a.patient_id: ((a.start, a.end, a.id),) for a in appointments}, max_moves=3)


def timed(function, problem, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(problem)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--window-hours", type=float, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    info = machine_info()
    print(machine_line(info))
    clinic = day_problem(args.providers, args.days, args.window_hours, 32, seed=1)
    plan = solve(clinic)
    clinic_ms = timed(solve, clinic, args.repeat)

    small = day_problem(1, 1, 1.5, 8, seed=2, first_day_free=2)
    small.max_moves = 3
    fast_small = timed(solve, small, max(args.repeat, 5))
    slow_small = timed(brute_force, small, 1)
    assert (len(solve(small).moves), solve(small).delays) == (len(brute_force(small).moves),
                                                             brute_force(small).delays)

    rows = [
        (f"solve, {args.providers} providers x {args.days} days ({len(clinic.appointments)} visits)",
         f"{percentile(clinic_ms, 50):.1f}", f"{percentile(clinic_ms, 95):.1f}",
         f"moves {len(plan.moves) if plan else '-'}, delays {list(plan.delays) if plan else '-'}"),
        (f"solve, small day ({len(small.appointments)} visits)", f"{percentile(fast_small, 50):.2f}",
         f"{percentile(fast_small, 95):.2f}", ""),
        ("brute force, small day", f"{slow_small[0]:.1f}", f"{slow_small[0]:.1f}",
         f"{slow_small[0] / max(percentile(fast_small, 50), 1e-6):.0f}x the search"),
    ]
    print_table(["case", "p50 ms", "p95 ms", "note"], rows)
    print("BENCH " + json.dumps({
        "bench": "emergency", "machine": info, "clinic_p50_ms": percentile(clinic_ms, 50),
        "clinic_p95_ms": percentile(clinic_ms, 95), "clinic_visits": len(clinic.appointments),
        "small_solve_ms": percentile(fast_small, 50), "small_brute_force_ms": slow_small[0],
        "ratio": slow_small[0] / max(percentile(fast_small, 50), 1e-6)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
