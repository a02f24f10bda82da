"""No-show-aware overbooking: the show model, its fit on the site's history, the
overbooking arithmetic worked by hand, and what high risk sets in motion.

Real engine, real SQLite file or PostgreSQL schema (``--slotengine-db``), the
built-in plugins as in production, an SMTP server and a webhook receiver on
loopback.  The clock starts Monday 2026-03-02 07:00 UTC (02:00 in New York).
"""
from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta

import pytest
from sqlalchemy import insert, select, update

from engine.calendar import zone
from engine.errors import SlotUnavailable
from engine.models import (
    Appointment,
    AuditEntry,
    Location,
    OutboxItem,
    OverbookDecision,
    Patient,
    PluginTask,
    Provider,
    ShowEstimate,
    ShowModel,
    Slot,
)
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Identifier, PatientRecord, SlotQuery
from engine.states import HL7_FILLER_STATUS, Status
from hl7.outbound import OutboundSettings, appointment_view, build_siu
from plugins import noshow, waitlist_fill
from plugins.showmodel import FEATURES, PRIOR, TYPES, Visit, estimate, fit
from tests.plugins.helpers import STAFF, WEBHOOK_SECRET, utc

SYSTEM = Actor("system", "pytest")


@pytest.fixture
def slotengine_plugin_settings(slotengine_plugin_settings, webhook_sink):
    settings = dict(slotengine_plugin_settings)
    settings["channels"] = {**settings["channels"], "voice": {"url": webhook_sink.url, "secret": WEBHOOK_SECRET}}
    settings["noshow"] = {}
    return settings


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def smith_slots(clinic, start: datetime, end: datetime) -> list[Slot]:
    with clinic.scheduler.sessions() as session:
        return list(session.scalars(select(Slot).where(
            Slot.provider_id == clinic.providers["DRSMITH"], Slot.start >= start, Slot.start < end)
            .order_by(Slot.start)))


def stored_estimate(scheduler, appointment_id: int) -> ShowEstimate:
    with scheduler.sessions() as session:
        return session.get(ShowEstimate, appointment_id)


def set_estimates(scheduler, probabilities: dict[int, float]) -> None:
    with scheduler.sessions() as session, session.begin():
        for appointment_id, p in probabilities.items():
            session.execute(update(ShowEstimate).where(ShowEstimate.appointment_id == appointment_id)
                            .values(probability=p))


# --- the model, without a database ----------------------------------------------------------------

TRUE = {"intercept": 1.8, "prior_no_shows": -1.5, "late_cancellations": -0.6, "lead_time": -0.35,
        "new_patient": -0.5, "follow_up": 0.2, "procedure": 0.6, "emergency": 1.2, "monday": -0.3,
        "friday": -0.25, "early": -0.2, "late_afternoon": -0.4}


def synthetic_visits(rng: random.Random, count: int) -> list[tuple[Visit, bool]]:
    visits = []
    for _ in range(count):
        visit = Visit(rng.choice(("general", *TYPES)), int(rng.expovariate(1 / 14)), rng.randrange(5),
                      rng.randrange(8 * 60, 17 * 60, 15), min(int(rng.expovariate(1.2)), 6),
                      min(int(rng.expovariate(2)), 4))
        visits.append((visit, rng.random() < estimate(TRUE, visit).probability))
    return visits


def test_fit_recovers_known_coefficients_from_a_seeded_history():
    found = fit(synthetic_visits(random.Random(7), 30_000), prior_weight=1.0)
    assert found.converged and found.sample_size == 30_000
    for name in FEATURES:
        # within four standard errors of the truth (the standard errors are ~0.01-0.05 here)
        assert abs(found.coefficients[name] - TRUE[name]) < 4 * found.standard_errors[name], name
    assert found.groups < found.sample_size / 3  # grouping is what makes this fast without numpy


def test_without_history_the_prior_stands_and_a_few_visits_barely_move_it():
    nothing = fit([], prior_weight=10)
    assert nothing.coefficients == PRIOR and nothing.sample_size == 0
    few = fit(synthetic_visits(random.Random(3), 20), prior_weight=10)
    assert max(abs(few.coefficients[n] - PRIOR[n]) for n in FEATURES) < 0.25
    # the same history with a weak prior moves much further: the shrinkage is what holds it
    loose = fit(synthetic_visits(random.Random(3), 20), prior_weight=0.01)
    assert max(abs(loose.coefficients[n] - PRIOR[n]) for n in FEATURES) > 1.0


def test_an_estimate_explains_itself():
    visit = Visit("new_patient", lead_days=30, weekday=0, local_minute=8 * 60 + 30, prior_no_shows=2)
    found = estimate(PRIOR, visit)
    logit = 2.2 - 1.2 * math.log(3) - 0.25 * math.log(31) - 0.3 - 0.1 - 0.1
    assert found.probability == pytest.approx(sigmoid(logit))
    assert [r["text"] for r in found.reasons] == ["2 earlier no-shows", "booked 30 days ahead", "first visit"]
    assert found.reasons[0]["effect"] == pytest.approx(-1.2 * math.log(3), abs=1e-3)
    assert found.reasons[0]["direction"] == "lowers"


# --- estimates at booking, on the real engine --------------------------------------------------------


def test_booking_stores_the_prior_estimate_with_its_reasons(clinic, slotengine_scheduler):
    patient = clinic.patient("MRN1", email="one@example.org")
    # Tuesday 2026-03-03 09:00 New York (14:00 UTC), booked Monday 07:00 UTC: 1 whole day ahead
    slot = smith_slots(clinic, utc(2026, 3, 3, 14), utc(2026, 3, 3, 15))[0]
    booked = clinic.book(patient, slot=slot)
    found = stored_estimate(slotengine_scheduler, booked.id)
    # prior: 2.2, new patient -0.3, lead log(1 + 1) * -0.25; Tuesday 09:00 has no term of its own
    assert found.probability == pytest.approx(sigmoid(2.2 - 0.3 - 0.25 * math.log(2)), abs=1e-6)
    assert found.model_id is None  # no fit yet: the prior
    assert [r["feature"] for r in found.reasons] == ["new_patient", "lead_time"]


def test_earlier_no_shows_and_late_cancellations_lower_the_next_estimate(clinic, slotengine_scheduler, slotengine_clock):
    scheduler = slotengine_scheduler
    patient = clinic.patient("MRN2", email="two@example.org")
    monday = smith_slots(clinic, utc(2026, 3, 2, 14), utc(2026, 3, 2, 17))
    missed = [clinic.book(patient, slot=monday[0]), clinic.book(patient, slot=monday[4])]
    late = clinic.book(patient, slot=monday[8])
    slotengine_clock.set(utc(2026, 3, 2, 13))  # 08:00 local: three hours before the 11:00 visit
    scheduler.cancel(late.id, STAFF, "patient called")
    slotengine_clock.set(utc(2026, 3, 2, 18))
    for appointment in missed:
        scheduler.mark_no_show(appointment.id, STAFF)
    following = clinic.book(patient, slot=smith_slots(clinic, utc(2026, 3, 4, 14), utc(2026, 3, 4, 15))[0])
    found = stored_estimate(scheduler, following.id)
    assert found.features["prior_no_shows"] == pytest.approx(math.log(3))
    assert found.features["late_cancellations"] == pytest.approx(math.log(2))
    assert [r["text"] for r in found.reasons][:2] == ["2 earlier no-shows", "1 late cancellation"]
    logit = 2.2 - 1.2 * math.log(3) - 0.5 * math.log(2) - 0.25 * math.log(2) - 0.3
    assert found.probability == pytest.approx(sigmoid(logit), abs=1e-6)


def register(view, mrn: str):
    return view.register_patient(PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], family_name="Doe",
                                               given_name=mrn.title()), STAFF)


def test_a_patient_registered_in_the_transaction_has_the_history_it_wrote(clinic, slotengine_scheduler,
                                                                          slotengine_clock):
    """No history query for a patient the transaction registered: it knows what it wrote
    about them -- a late cancellation, another patient merged into them."""
    scheduler = slotengine_scheduler
    missed = clinic.book(clinic.patient("MRN5"), slot=smith_slots(clinic, utc(2026, 3, 2, 14), utc(2026, 3, 2, 15))[0])
    monday = smith_slots(clinic, utc(2026, 3, 2, 15), utc(2026, 3, 2, 17))
    wednesday = smith_slots(clinic, utc(2026, 3, 4, 14), utc(2026, 3, 4, 16))
    slotengine_clock.set(utc(2026, 3, 2, 14, 30))
    scheduler.mark_no_show(missed.id, STAFF)
    with scheduler.sessions() as session, session.begin():
        view = scheduler.within(session)
        patient = register(view, "MRN6")
        late = view.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                        slot_id=monday[4].id), STAFF)  # 11:00 in New York
        view.cancel(late.id, STAFF, "patient called")  # half an hour before: late
        cancelled_once = view.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                  slot_id=wednesday[0].id), STAFF)
        merged = register(view, "MRN7")
        view.merge_patients(merged.id, missed.patient_id, STAFF)
        after_merge = view.book(BookingRequest(patient_id=merged.id, appointment_type="new_patient",
                                               slot_id=wednesday[4].id), STAFF)
        ids = late.id, cancelled_once.id, after_merge.id
    view.notify_committed()
    late, cancelled_once, after_merge = (stored_estimate(scheduler, i).features for i in ids)
    assert late["late_cancellations"] == 0
    assert cancelled_once["late_cancellations"] == pytest.approx(math.log(2))
    assert after_merge["prior_no_shows"] == pytest.approx(math.log(2))


def test_a_move_estimates_again_the_same_row(clinic, slotengine_scheduler):
    """One row per appointment, written over when it moves -- also the session's copy when it holds one."""
    scheduler = slotengine_scheduler
    patient = clinic.patient("MRN8")
    booked = clinic.book(patient, slot=smith_slots(clinic, utc(2026, 3, 3, 14), utc(2026, 3, 3, 15))[0])
    assert stored_estimate(scheduler, booked.id).features["lead_time"] == pytest.approx(math.log(2))
    friday = smith_slots(clinic, utc(2026, 3, 13, 14), utc(2026, 3, 13, 15))[0]
    scheduler.reschedule(booked.id, BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                   slot_id=friday.id), STAFF)
    assert stored_estimate(scheduler, booked.id).features["lead_time"] == pytest.approx(math.log(12))
    monday = smith_slots(clinic, utc(2026, 3, 9, 13), utc(2026, 3, 9, 14))[0]
    with scheduler.sessions() as session, session.begin():
        held = session.get(ShowEstimate, booked.id)
        assert held.features["friday"] == 1.0
        scheduler.within(session).reschedule(booked.id, BookingRequest(
            patient_id=patient.id, appointment_type="new_patient", slot_id=monday.id), STAFF)
        assert (held.features["monday"], held.features["friday"]) == (1.0, 0.0)
    with scheduler.sessions() as session:
        [stored] = session.scalars(select(ShowEstimate).where(ShowEstimate.appointment_id == booked.id))
        assert stored.features["lead_time"] == pytest.approx(math.log(8)) and stored.features["monday"] == 1.0


# --- the refit job on the site's own history ----------------------------------------------------------


def write_history(scheduler, rng: random.Random, patients: int, now: datetime) -> int:
    """Visits of the last year written straight to the tables (as years of HL7 traffic
    would have left them), each outcome drawn from ``TRUE`` given the patient's
    history so far; returns how many visits have an outcome."""
    with scheduler.sessions() as session, session.begin():
        location = session.scalar(select(Location.id).where(Location.code == "MAIN"))
        provider = session.scalar(select(Provider.id).where(Provider.code == "DRSMITH"))
        first = session.scalar(select(Patient.id).order_by(Patient.id.desc()).limit(1)) or 0
        session.execute(insert(Patient), [{"id": first + i + 1, "created_at": now, "updated_at": now}
                                          for i in range(patients)])
        rows, outcomes = [], 0
        for i in range(patients):
            no_shows = late = 0
            start = now - timedelta(days=365) + timedelta(days=rng.randrange(0, 30))
            while True:
                start += timedelta(days=rng.randrange(10, 60))
                start = start.replace(hour=rng.choice((13, 14, 15, 16, 17, 18, 19, 20)), minute=rng.choice((0, 30)))
                if start >= now - timedelta(days=1):
                    break
                lead = int(rng.expovariate(1 / 14))
                kind = rng.choice(("general", *TYPES))
                row = {"patient_id": first + i + 1, "provider_id": provider, "location_id": location,
                       "appointment_type": kind, "start": start, "end": start + timedelta(minutes=15),
                       "created_at": start - timedelta(days=lead, hours=1)}
                if rng.random() < 0.06:  # cancelled: a third of them within a day of the visit
                    changed = start - timedelta(hours=3) if rng.random() < 0.33 else start - timedelta(days=5)
                    rows.append({**row, "status": "cancelled", "updated_at": changed})
                    late += changed >= start - timedelta(hours=24)
                    continue
                local = start.astimezone(zone("America/New_York"))
                visit = Visit(kind, lead, local.weekday(), local.hour * 60 + local.minute, no_shows, late)
                showed = rng.random() < estimate(TRUE, visit).probability
                rows.append({**row, "status": "completed" if showed else "no_show", "updated_at": start})
                no_shows += not showed
                outcomes += 1
        for i in range(0, len(rows), 2000):
            session.execute(insert(Appointment), [{"source": "api", **r} for r in rows[i:i + 2000]])
    return outcomes


def test_the_refit_job_learns_the_sites_history(clinic, slotengine_scheduler, slotengine_jobs, slotengine_clock):
    scheduler = slotengine_scheduler
    later = clinic.book(clinic.patient("MRN3", email="three@example.org"),
                        slot=smith_slots(clinic, utc(2026, 3, 5, 14), utc(2026, 3, 5, 15))[0])
    prior_estimate = stored_estimate(scheduler, later.id).probability
    visits = write_history(scheduler, random.Random(11), 1500, slotengine_clock.now())
    outcome = slotengine_jobs.run("noshow.refit")
    assert outcome.startswith("ok: model ") and f"fitted on {visits} visits" in outcome
    with scheduler.sessions() as session:
        model = session.scalars(select(ShowModel)).one()
    assert model.sample_size == visits and model.converged
    assert 0 < model.no_shows < visits
    for name in ("intercept", "prior_no_shows", "lead_time", "new_patient", "procedure", "emergency"):
        assert abs(model.coefficients[name] - TRUE[name]) < 4 * model.standard_errors[name] + 0.05, name
    # future appointments were estimated again with the fitted model
    refreshed = stored_estimate(scheduler, later.id)
    assert refreshed.model_id == model.id and refreshed.probability != pytest.approx(prior_estimate)
    # run again at once: the fresh fit stands (several daemons run the same job)
    assert "stands" in slotengine_jobs.run("noshow.refit")


def test_the_refit_job_without_history_keeps_the_prior(clinic, slotengine_jobs, slotengine_scheduler):
    outcome = slotengine_jobs.run("noshow.refit")
    assert "the prior stands" in outcome
    with slotengine_scheduler.sessions() as session:
        assert session.scalars(select(ShowModel)).first() is None


# --- overbooking: a decision worked by hand ------------------------------------------------------------

# Dr Smith, Tuesday 2026-03-03 09:00-10:00 New York: one block (block_minutes = 60) of four
# 15-minute slots, 60 seat-minutes.  Its four patients show with 0.9, 0.5, 0.6 and 0.8 (set on
# their estimates, as if the model had said so).  A new patient without history, a new-patient
# visit booked Monday 07:00 UTC for Tuesday 14:15 UTC (1 whole day ahead), shows with
#     p = 1 / (1 + exp(-(2.2 - 0.3 - 0.25 * ln 2))) = 1 / (1 + exp(-1.726713)) = 0.848992
# Doubling the 09:15 slot (its patient: 0.5):
#     expected patients in the block  0.9 + 0.5 + 0.6 + 0.8 + 0.848992 = 3.648992   (<= 4)
#     expected patient-minutes        15 * 3.648992 = 54.7349                          (<= 60)
#     expected overtime: work beyond 60 minutes only if all five come (75 minutes):
#                                     15 * 0.9 * 0.5 * 0.6 * 0.8 * 0.848992 = 2.7507 min  (<= 15)
#     expected patients in the slot   0.5 + 0.848992 = 1.348992                        (<= 1.5)
# 09:30 (0.6) gives 1.448992 in the slot: allowed, ranked second; 09:45 (0.8: 1.648992) and
# 09:00 (0.9) exceed 1.5.  A second new patient would bring the block to
#     15 * (3.648992 + 0.848992) = 67.4697 expected patient-minutes > 60: refused.
P_NEW = 1 / (1 + math.exp(-(2.2 - 0.3 - 0.25 * math.log(2))))


@pytest.fixture
def full_block(clinic, slotengine_scheduler):
    slots = smith_slots(clinic, utc(2026, 3, 3, 14), utc(2026, 3, 3, 15))
    assert [s.start.minute for s in slots] == [0, 15, 30, 45]
    booked = [clinic.book(clinic.patient(f"MRN1{i}", email=f"p{i}@example.org"), slot=slot)
              for i, slot in enumerate(slots)]
    set_estimates(slotengine_scheduler, dict(zip([a.id for a in booked], (0.9, 0.5, 0.6, 0.8))))
    return slots, booked


def test_overbooking_matches_the_hand_computation(clinic, slotengine_scheduler, full_block):
    scheduler = slotengine_scheduler
    slots, booked = full_block
    newcomer = clinic.patient("MRN20", email="new@example.org")
    query = SlotQuery("new_patient", utc(2026, 3, 3, 14), utc(2026, 3, 3, 15), provider_id=clinic.providers["DRSMITH"],
                      patient_id=newcomer.id)
    assert scheduler.free_slots(query) == []  # the block is full
    offered = scheduler.free_slots(SlotQuery(**{**query.__dict__, "overbook": True}))
    assert [c.slot_id for c in offered] == [slots[1].id, slots[2].id]  # the 0.5 patient's slot first
    verdict = offered[0].overbook
    assert verdict["allow"] and verdict["plugin"] == "noshow"
    assert verdict["new_show_probability"] == pytest.approx(0.848992, abs=1e-4)
    assert verdict["expected_present_before"] == pytest.approx(2.8)
    assert verdict["expected_present_after"] == pytest.approx(3.648992, abs=1e-4)
    assert verdict["expected_minutes_after"] == pytest.approx(54.7349, abs=1e-3)
    assert verdict["seat_minutes"] == 60 and verdict["load_limit_minutes"] == 60
    assert verdict["expected_overtime_minutes"] == pytest.approx(2.7507, abs=1e-3)
    assert verdict["slot_expected_after"] == pytest.approx(1.348992, abs=1e-4)
    assert offered[1].overbook["slot_expected_after"] == pytest.approx(1.448992, abs=1e-4)
    assert verdict["block_local"] == "Tue 2026-03-03 09:00-10:00 America/New_York"

    appointment = scheduler.book(BookingRequest(newcomer.id, "new_patient", slot_id=slots[1].id, overbook=True), STAFF)
    assert appointment.status == "overbooked"
    assert HL7_FILLER_STATUS[Status(appointment.status)] == "Overbook"
    with scheduler.sessions() as session:  # the SIU^S12 announcing it says so in SCH-25
        siu = build_siu(appointment_view(session, appointment.id), "S12", OutboundSettings(), control_id="1",
                        now=utc(2026, 3, 2, 7))
    sch = next(s for s in siu.decode().split("\r") if s.startswith("SCH|"))
    assert sch.split("|")[25] == "Overbook"
    with scheduler.sessions() as session:
        decision = session.scalars(select(OverbookDecision)).one()
        audit = session.scalars(select(AuditEntry).where(AuditEntry.entity_id == appointment.id,
                                                         AuditEntry.action == "booked")).one()
        slot = session.get(Slot, slots[1].id)
    assert (decision.appointment_id, decision.slot_id) == (appointment.id, slots[1].id)
    assert decision.expected_present == pytest.approx(3.648992, abs=1e-4)
    assert decision.expected_overtime_minutes == pytest.approx(2.7507, abs=1e-3)
    assert [a["show_probability"] for a in decision.decision["appointments"]] == [0.9, 0.5, 0.6, 0.8]
    assert audit.after["overbook"][0]["expected_present_after"] == pytest.approx(3.648992, abs=1e-4)
    assert (slot.booked, slot.capacity) == (2, 1)

    # a second new patient would push the block past its 60 seat-minutes
    second = clinic.patient("MRN21", email="second@example.org")
    with pytest.raises(SlotUnavailable) as refused:
        scheduler.book(BookingRequest(second.id, "new_patient", slot_id=slots[2].id, overbook=True), STAFF)
    assert "67.5 expected patient-minutes in the block (limit 60.0)" in str(refused.value)
    assert scheduler.free_slots(SlotQuery(**{**query.__dict__, "patient_id": second.id, "overbook": True})) == []
    # nor a third seat in the doubled slot
    with pytest.raises(SlotUnavailable, match="extra seat"):
        scheduler.book(BookingRequest(second.id, "new_patient", slot_id=slots[1].id, overbook=True), STAFF)


def test_two_overbookings_racing_for_the_last_room_in_a_block_one_wins(clinic, slotengine_scheduler, full_block):
    """0.9 + 0.5 + 0.5 + 0.8 = 2.7 expected: one newcomer (0.848992) fits the 4 seats, two
    (4.398) do not.  Two threads double the two 0.5 slots at the same moment; whatever the
    database interleaves, one is refused (on PostgreSQL the provider's row serialises them)."""
    import threading

    scheduler = slotengine_scheduler
    slots, booked = full_block
    set_estimates(scheduler, {booked[2].id: 0.5})
    racers = [clinic.patient(f"MRN6{i}", email=f"r6{i}@example.org") for i in range(2)]
    barrier, outcomes = threading.Barrier(2), {}

    def race(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = scheduler.book(BookingRequest(racers[i].id, "new_patient", slot_id=slots[1 + i].id,
                                                        overbook=True), STAFF).status
        except SlotUnavailable as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o if o == "overbooked" else "refused" for o in outcomes.values()) == ["overbooked", "refused"]
    refusal = next(o for o in outcomes.values() if o != "overbooked")
    assert "expected patient-minutes in the block (limit 60.0)" in refusal
    with scheduler.sessions() as session:
        assert session.scalars(select(OverbookDecision)).one().expected_present == pytest.approx(3.548992, abs=1e-4)


def test_the_overbooked_patient_keeps_the_slot_when_the_first_cancels(clinic, slotengine_scheduler, full_block):
    scheduler = slotengine_scheduler
    slots, booked = full_block
    newcomer = clinic.patient("MRN22", email="n22@example.org")
    doubled = scheduler.book(BookingRequest(newcomer.id, "new_patient", slot_id=slots[1].id, overbook=True), STAFF)
    scheduler.cancel(booked[1].id, STAFF, "patient called")
    with scheduler.sessions() as session:
        assert session.get(Slot, slots[1].id).booked == 1
        assert session.get(Appointment, doubled.id).status == "overbooked"


def test_blocks_are_clinic_local_hours_across_the_dst_change():
    # New York moves to daylight time on Sunday 2026-03-08: 09:00 is 14:00 UTC before, 13:00 UTC after
    assert noshow.block_of(utc(2026, 3, 6, 14, 15), "America/New_York", 60) == (utc(2026, 3, 6, 14), utc(2026, 3, 6, 15))
    assert noshow.block_of(utc(2026, 3, 9, 13, 15), "America/New_York", 60) == (utc(2026, 3, 9, 13), utc(2026, 3, 9, 14))
    # that night 02:00 local does not exist: the 00:00-02:00 block ends when the clocks jump (07:00 UTC)
    assert noshow.block_of(utc(2026, 3, 8, 6, 30), "America/New_York", 120) == (utc(2026, 3, 8, 5), utc(2026, 3, 8, 7))
    # the last block of the day ends at local midnight
    assert noshow.block_of(utc(2026, 3, 3, 4, 30), "America/New_York", 90) == (utc(2026, 3, 3, 3, 30), utc(2026, 3, 3, 5))


class Allows:
    @staticmethod
    @hookimpl
    def slotengine_allow_overbook(candidate):
        return {"allow": True, "reason": "room", "expected": 0.5}


class RefusesProcedures:
    @staticmethod
    @hookimpl
    def slotengine_allow_overbook(appointment_type):
        return {"allow": False, "reason": "never a procedure"} if appointment_type == "procedure" else None


class Breaks:
    @staticmethod
    @hookimpl
    def slotengine_allow_overbook(candidate):
        raise RuntimeError("judge down")


def test_the_host_gives_a_seat_only_when_one_allows_and_none_refuses():
    from engine.plugin_host import PluginHost
    from engine.requests import Candidate

    seat = Candidate(1, utc(2026, 3, 3, 14), utc(2026, 3, 3, 14, 15), 1, None, 1, "new_patient", 0)
    host = PluginHost(builtins=(), discover=False, extra=[("allows", Allows), ("strict", RefusesProcedures)])
    assert host.allow_overbook(None, seat, None, "new_patient", "search") == \
        {"allow": True, "reason": "room", "expected": 0.5, "plugin": "allows"}
    assert host.allow_overbook(None, seat, None, "procedure", "book") == \
        {"allow": False, "reason": "never a procedure", "plugin": "strict"}
    silent = PluginHost(builtins=(), discover=False, extra=[("strict", RefusesProcedures)])
    assert silent.allow_overbook(None, seat, None, "new_patient", "book")["reason"] == "no plugin allows overbooking"
    broken = PluginHost(builtins=(), discover=False, extra=[("allows", Allows), ("breaks", Breaks)])
    verdict = broken.allow_overbook(None, seat, None, "new_patient", "book")
    assert not verdict["allow"] and verdict["plugin"] == "breaks" and "RuntimeError" in verdict["reason"]


def test_without_a_judge_a_full_slot_is_refused(slotengine_database_url, slotengine_session_factory, slotengine_clock):
    from engine.clinic import load_clinic_data
    from engine.plugin_host import PluginHost
    from engine.requests import Identifier, PatientRecord
    from engine.service import Scheduler
    from engine.testing import DEMO_CLINIC

    with slotengine_session_factory() as session, session.begin():
        load_clinic_data(session, DEMO_CLINIC)
    scheduler = Scheduler(slotengine_session_factory, plugins=PluginHost(builtins=(), discover=False),
                          clock=slotengine_clock)
    scheduler.expand_templates(slotengine_clock.now().date(), slotengine_clock.now().date() + timedelta(days=2))
    a, b = (scheduler.register_patient(PatientRecord([Identifier(m, "HOSP", "MR")]), STAFF) for m in ("A", "B"))
    with scheduler.sessions() as session:
        slot = session.scalars(select(Slot).where(Slot.slot_type == "new_patient", Slot.capacity == 1)
                               .order_by(Slot.start)).first()
    scheduler.book(BookingRequest(a.id, "new_patient", slot_id=slot.id), STAFF)
    with pytest.raises(SlotUnavailable, match="no plugin allows overbooking"):
        scheduler.book(BookingRequest(b.id, "new_patient", slot_id=slot.id, overbook=True), STAFF)


# --- high risk: escalation and an early waitlist fill --------------------------------------------------


def test_a_likely_no_show_is_called_and_its_slot_offered_early(
        clinic, slotengine_scheduler, slotengine_clock, slotengine_jobs, slotengine_context, webhook_sink, smtp_sink):
    scheduler = slotengine_scheduler
    risky = clinic.patient("MRN30", email="risky@example.org", phones=[{"number": "+15550000030", "use": "CP"}])
    # three no-shows this morning (recorded after each visit) make the patient high risk
    morning = smith_slots(clinic, utc(2026, 3, 2, 13), utc(2026, 3, 2, 14))
    missed = [clinic.book(risky, slot=s) for s in morning[:3]]
    slotengine_clock.set(utc(2026, 3, 2, 15))
    for appointment in missed:
        scheduler.mark_no_show(appointment.id, STAFF)
    friday = smith_slots(clinic, utc(2026, 3, 6, 15), utc(2026, 3, 6, 16))[0]  # Friday 10:00 New York
    visit = clinic.book(risky, slot=friday)
    found = stored_estimate(scheduler, visit.id)
    assert found.probability < 0.7 and found.reasons[0]["text"] == "3 earlier no-shows"
    waiting = clinic.patient("MRN31", email="waiting@example.org")
    scheduler.add_to_waitlist(patient_id=waiting.id, appointment_type="new_patient", duration_minutes=15,
                              actor=STAFF, provider_id=clinic.providers["DRSMITH"])

    # 48 hours before: an extra reminder by voice call, and a call task for the front desk
    slotengine_clock.set(friday.start - timedelta(hours=48))
    assert slotengine_jobs.run("noshow.tasks") == "ok: 1 escalations, 0 early waitlist fills"
    with scheduler.sessions() as session:
        extra = session.scalars(select(OutboxItem).where(OutboxItem.appointment_id == visit.id,
                                                         OutboxItem.payload["escalated"].as_boolean())).one()
        notice = session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff_notice",
                                                          OutboxItem.appointment_id == visit.id)).one()
    assert extra.channel == "voice"
    assert "likely no-show" in notice.payload["subject"]
    assert "3 earlier no-shows" in notice.payload["text"]
    slotengine_jobs.run("reminders.send")
    calls = [r for r in webhook_sink.requests if r["body"]["to"] == "+15550000030"]
    assert calls and calls[-1]["signed"]

    # 24 hours before, still unconfirmed: the slot goes to the waitlist as an overbooking seat
    slotengine_clock.set(friday.start - timedelta(hours=24))
    assert slotengine_jobs.run("noshow.tasks") == "ok: 0 escalations, 1 early waitlist fills"
    slotengine_jobs.run("waitlist_fill.fill")
    with scheduler.sessions() as session:
        offer = session.scalars(select(waitlist_fill.WaitlistOffer)).one()
    assert (offer.slot_id, offer.patient_id) == (friday.id, waiting.id)
    accepted = waitlist_fill.accept_offer(slotengine_context, offer.id)
    assert accepted["result"] == "accepted" and accepted["status"] == "overbooked"
    with scheduler.sessions() as session:
        assert session.get(Slot, friday.id).booked == 2
        assert session.scalars(select(OverbookDecision)).one().appointment_id == accepted["appointment_id"]


def test_a_confirmed_patient_is_not_escalated(clinic, slotengine_scheduler, slotengine_clock, slotengine_jobs):
    scheduler = slotengine_scheduler
    risky = clinic.patient("MRN40", email="r40@example.org")
    morning = smith_slots(clinic, utc(2026, 3, 2, 13), utc(2026, 3, 2, 14))
    missed = [clinic.book(risky, slot=s) for s in morning[:3]]
    slotengine_clock.set(utc(2026, 3, 2, 15))
    for appointment in missed:
        scheduler.mark_no_show(appointment.id, STAFF)
    slot = smith_slots(clinic, utc(2026, 3, 6, 15), utc(2026, 3, 6, 16))[0]
    visit = clinic.book(risky, slot=slot)
    scheduler.confirm_attendance(visit.id, STAFF, "patient called back")
    slotengine_clock.set(slot.start - timedelta(hours=24))
    assert slotengine_jobs.run("noshow.tasks") == "ok: 1 escalations, 1 early waitlist fills"
    with scheduler.sessions() as session:
        outcomes = sorted(t.payload["outcome"] for t in session.scalars(select(PluginTask).where(
            PluginTask.plugin == "noshow")))
        assert not session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff_notice")).all()
    assert outcomes == ["skipped: the patient confirmed"] * 2


# --- the command line -----------------------------------------------------------------------------------


def test_cli_shows_risk_and_the_model(clinic, slotengine_scheduler, slotengine_database_url, full_block, capsys):
    from hl7.cli import main

    scheduler = slotengine_scheduler
    slots, booked = full_block
    newcomer = clinic.patient("MRN50", email="n50@example.org")
    doubled = scheduler.book(BookingRequest(newcomer.id, "new_patient", slot_id=slots[1].id, overbook=True), STAFF)
    assert main(["appointments", "risk", "--database", slotengine_database_url, "--from", "2026-03-03",
                 "--to", "2026-03-03", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_id = {row["id"]: row for row in rows}
    assert by_id[booked[1].id]["show_probability"] == 0.5
    assert by_id[doubled.id]["status"] == "overbooked" and by_id[doubled.id]["hl7_status"] == "Overbook"
    assert by_id[doubled.id]["overbook"][0]["expected_present_after"] == pytest.approx(3.648992, abs=1e-4)
    assert by_id[doubled.id]["reasons"][0]["text"] == "first visit"
    assert main(["noshow", "model", "--database", slotengine_database_url, "--json"]) == 0
    model = json.loads(capsys.readouterr().out)
    assert model["source"] == "prior (no fit yet)" and model["coefficients"] == PRIOR
