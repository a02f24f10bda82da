"""Bookers that race each other, as threads or as separate processes.

Kept free of pytest so that ``multiprocessing`` (spawn) can import it in a
fresh interpreter: each process builds its own engine and ``Scheduler`` from
the database URL, exactly as a second daemon would.
"""
from __future__ import annotations

import time
import traceback
from datetime import datetime
from typing import Any

from engine.clock import ManualClock
from engine.db import make_engine, make_session_factory
from engine.errors import SchedulingError
from engine.requests import Actor, BookingRequest
from engine.service import Scheduler

BARRIER_TIMEOUT = 120

#: plan[round][worker] = the (patient id, slot id) attempts of that worker, tried in order until one books
Plan = list[list[list[tuple[int, int]]]]


def attempt(scheduler: Scheduler, tries: list[tuple[int, int]], who: str) -> dict[str, Any]:
    """Try each (patient, slot) until one books; report the booking and every refusal."""
    outcome: dict[str, Any] = {"booked": None, "status": None, "refusals": [], "unexpected": None,
                               "started": time.time()}
    for patient_id, slot_id in tries:
        try:
            appointment = scheduler.book(BookingRequest(patient_id, "new_patient", slot_id=slot_id),
                                         Actor("api", who, "race"))
        except SchedulingError as exc:
            outcome["refusals"].append({"type": type(exc).__name__, "message": str(exc),
                                        "subject": getattr(exc, "subject", ""), "slot_id": slot_id,
                                        "patient_id": patient_id})
        except Exception:  # noqa: BLE001 - any other error is a failure the test reports
            outcome["unexpected"] = traceback.format_exc()
            return outcome
        else:
            outcome.update(booked=appointment.id, status=appointment.status, slot_id=slot_id, patient_id=patient_id,
                           finished=time.time())
            return outcome
    outcome["finished"] = time.time()
    return outcome


def run_rounds(scheduler: Scheduler, plan: Plan, worker: int, wait, report) -> None:
    for round_no, attempts in enumerate(plan):
        wait()  # everybody starts the round together
        report((round_no, worker, attempt(scheduler, attempts[worker], f"booker-{worker}")))
    wait()


def process_main(url: str, now: str, plan: Plan, worker: int, barrier, results) -> None:
    """Entry point of one racing process: its own engine, sessions and scheduler."""
    engine = make_engine(url)
    try:
        scheduler = Scheduler(make_session_factory(engine), clock=ManualClock(datetime.fromisoformat(now)))
        run_rounds(scheduler, plan, worker, lambda: barrier.wait(BARRIER_TIMEOUT), results.put)
    except Exception:  # noqa: BLE001 - reported to the parent instead of dying silently
        results.put((-1, worker, {"unexpected": traceback.format_exc()}))
        barrier.abort()
    finally:
        engine.dispose()
