"""Waitlist fill: freed slots offered to ranked patients, first acceptance books, the fill cascades."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from engine.models import OutboxItem, PluginTask, Slot, WaitlistEntry, WaitlistOffer
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.signing import make_token
from plugins.waitlist_fill import accept_offer, decline_offer
from tests.plugins.helpers import REPLY_SECRET, STAFF, utc


def offers(scheduler, **where):
    with scheduler.sessions() as session:
        stmt = select(WaitlistOffer).order_by(WaitlistOffer.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(WaitlistOffer, key) == value)
        return list(session.scalars(stmt))


def wait(clinic, patient, **kwargs):
    kwargs.setdefault("appointment_type", "new_patient")
    kwargs.setdefault("duration_minutes", 15)
    return clinic.scheduler.add_to_waitlist(patient_id=patient.id, actor=STAFF, **kwargs)


@pytest.fixture
def cancelled_slot(clinic, slotengine_clock):
    slotengine_clock.set(utc(2026, 3, 2, 14))  # Monday 09:00 in New York: no quiet hours
    holder = clinic.patient("W0", email="w0@example.org")
    appointment = clinic.book(holder, after=utc(2026, 3, 3, 15))  # Tue 3 Mar 10:00 New York
    return appointment


def test_a_cancellation_is_offered_to_the_best_fitting_patients_urgent_first(clinic, slotengine_clock,
                                                                              cancelled_slot):
    routine_old = clinic.patient("W1", phones=[{"number": "+15550001"}], preferred_channel="sms")
    urgent = clinic.patient("W2", email="w2@example.org")
    wrong_provider = clinic.patient("W3", email="w3@example.org")
    too_long = clinic.patient("W4", email="w4@example.org")
    routine_new = clinic.patient("W5", email="w5@example.org")
    waiting_since = slotengine_clock.now()
    slotengine_clock.set(waiting_since - timedelta(days=20))
    wait(clinic, routine_old)
    slotengine_clock.set(waiting_since)
    wait(clinic, urgent, urgency="urgent")
    wait(clinic, wrong_provider, provider_id=clinic.providers["DRLEE"])
    wait(clinic, too_long, duration_minutes=45)
    wait(clinic, routine_new)
    clinic.scheduler.cancel(cancelled_slot.id, STAFF, "patient called")
    made = offers(clinic.scheduler)
    assert [o.patient_id for o in made] == [urgent.id, routine_old.id, routine_new.id]  # offer_batch = 3
    assert made[0].score > made[1].score > made[2].score
    assert {o.slot_id for o in made} == {cancelled_slot_slot(clinic, cancelled_slot)}
    assert all(o.expires_at == slotengine_clock.now() + timedelta(minutes=60) for o in made)
    with clinic.scheduler.sessions() as session:
        messages = list(session.scalars(select(OutboxItem).where(OutboxItem.kind == "waitlist_offer")))
    assert sorted(m.channel for m in messages) == ["email", "email", "sms"]


def test_a_slot_freed_while_nobody_waits_plans_no_fill_and_runs_no_sweep(clinic, cancelled_slot, monkeypatch):
    import plugins.waitlist_fill as waitlist_fill
    sweeps = []
    monkeypatch.setattr(waitlist_fill, "sweep_tasks", lambda *a, **kw: sweeps.append(kw["kinds"]) or 0)
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    with clinic.scheduler.sessions() as session:
        assert session.scalars(select(PluginTask).where(PluginTask.plugin == "waitlist_fill")).all() == []
    assert sweeps == []
    waiting = clinic.patient("W1", email="w1@example.org")
    wait(clinic, waiting)
    clinic.scheduler.cancel(clinic.book(clinic.patient("W2"), after=utc(2026, 3, 3, 15)).id, STAFF)
    assert sweeps == [("fill",)]  # someone waits: planned, and swept right after the commit
    with clinic.scheduler.sessions() as session:
        [task] = session.scalars(select(PluginTask).where(PluginTask.plugin == "waitlist_fill"))
    assert task.kind == "fill" and task.status == "pending"  # the stubbed sweep left it for the timed one


def test_each_change_that_planned_a_fill_gets_its_own_sweep(clinic, slotengine_context, monkeypatch):
    """After-change hooks run in a thread of their own: the sweep for one change must not
    swallow the mark of the next, whose transaction planned its task meanwhile."""
    import plugins.waitlist_fill as waitlist_fill
    from engine.requests import Change

    wait(clinic, clinic.patient("W1", email="w1@example.org"))
    sweeps = []
    monkeypatch.setattr(waitlist_fill, "fill_pending", lambda context: sweeps.append(context))
    first, second, unplanned = (Change("cancelled", None, "booked", "cancelled", STAFF, slot_ids=(slot,))
                                for slot in (1, 2, 3))
    with clinic.scheduler.sessions() as session, session.begin():
        waitlist_fill.slotengine_schedule_changed(session, first, slotengine_context)
        waitlist_fill.slotengine_schedule_changed(session, second, slotengine_context)
    waitlist_fill.slotengine_after_change(first, slotengine_context)
    waitlist_fill.slotengine_after_change(second, slotengine_context)
    waitlist_fill.slotengine_after_change(unplanned, slotengine_context)
    assert len(sweeps) == 2


def cancelled_slot_slot(clinic, appointment):
    with clinic.scheduler.sessions() as session:
        return session.scalar(select(Slot.id).where(Slot.provider_id == appointment.provider_id,
                                                    Slot.start == appointment.start))


def test_first_acceptance_books_and_the_others_find_it_taken(clinic, cancelled_slot, slotengine_context):
    first, second = clinic.patient("W1", email="w1@example.org"), clinic.patient("W2", email="w2@example.org")
    wait(clinic, first)
    wait(clinic, second)
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    one, two = offers(clinic.scheduler)
    result = accept_offer(slotengine_context, two.id)
    assert result["result"] == "accepted"
    booked = clinic.scheduler.appointment(result["appointment_id"])
    assert (booked.patient_id, booked.start, booked.status) == (second.id, cancelled_slot.start, "booked")
    assert accept_offer(slotengine_context, one.id)["result"] == "taken"
    with clinic.scheduler.sessions() as session:
        assert session.get(WaitlistEntry, two.waitlist_id).status == "booked"
        assert session.get(WaitlistEntry, one.waitlist_id).status == "waiting"


def test_accepting_moves_the_current_appointment_and_the_fill_cascades(clinic, cancelled_slot, slotengine_context,
                                                                       slotengine_routes):
    mover = clinic.patient("W1", email="w1@example.org")
    later = clinic.book(mover, after=utc(2026, 3, 6, 15))  # Fri: wants earlier
    wait(clinic, mover, current_appointment_id=later.id)
    next_in_line = clinic.patient("W2", email="w2@example.org")
    wait(clinic, next_in_line, earliest=utc(2026, 3, 5))  # only from Thursday on: fits the Friday slot only
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    [offer] = offers(clinic.scheduler)
    assert offer.patient_id == mover.id
    token = make_token(REPLY_SECRET, {"w": offer.id}, expires=offer.expires_at)
    status, body = slotengine_routes("POST", "/waitlist/reply", {"token": token, "answer": "yes"})
    assert status == 200 and body["result"] == "accepted" and body["appointment_id"] == later.id
    moved = clinic.scheduler.appointment(later.id)
    assert moved.start == cancelled_slot.start and moved.status == "booked"  # moved earlier, same appointment
    cascade = offers(clinic.scheduler, patient_id=next_in_line.id)
    assert len(cascade) == 1 and cascade[0].start == later.start  # the Friday slot it vacated, offered on
    assert accept_offer(slotengine_context, cascade[0].id)["result"] == "accepted"


def test_expired_and_declined_offers_pass_the_slot_on(clinic, cancelled_slot, slotengine_clock, slotengine_context,
                                                      slotengine_jobs):
    patients = [clinic.patient(f"W{i}", email=f"w{i}@example.org") for i in range(1, 6)]
    for p in patients:
        wait(clinic, p)
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    first_round = offers(clinic.scheduler)
    assert [o.patient_id for o in first_round] == [p.id for p in patients[:3]]
    assert decline_offer(slotengine_context, first_round[0].id)["result"] == "declined"
    assert [o.patient_id for o in offers(clinic.scheduler, status="offered")] == [p.id for p in patients[1:4]]
    slotengine_clock.advance(minutes=61)
    assert slotengine_jobs.run("waitlist_fill.expire_offers") == "ok: 3 offers expired"
    assert [o.patient_id for o in offers(clinic.scheduler, status="offered")] == [patients[4].id]
    assert accept_offer(slotengine_context, first_round[1].id)["result"] == "expired"


def test_an_emergency_hold_released_before_it_starts_goes_to_the_waitlist(clinic, slotengine_clock, slotengine_jobs):
    routine = clinic.patient("W1", email="w1@example.org")
    wait(clinic, routine, duration_minutes=30)
    [emergency] = [s for s in clinic.slots("DRSMITH", "emergency") if s.start >= utc(2026, 3, 3)][:1]
    slotengine_clock.set(emergency.start - timedelta(hours=3))
    assert slotengine_jobs.run("waitlist_fill.release_emergency_holds").startswith("ok: 0")  # still held back
    slotengine_clock.set(emergency.start - timedelta(minutes=110))
    assert slotengine_jobs.run("waitlist_fill.release_emergency_holds") == \
        "ok: 1 emergency slots released to the waitlist"
    [offer] = offers(clinic.scheduler)
    assert (offer.slot_id, offer.patient_id) == (emergency.id, routine.id)
    assert offer.expires_at == slotengine_clock.now() + timedelta(minutes=15)  # same day: a short offer
    assert slotengine_jobs.run("waitlist_fill.release_emergency_holds").startswith("ok: 0")  # once only


def test_offers_wait_for_the_end_of_quiet_hours(clinic, slotengine_clock, cancelled_slot):
    wait(clinic, clinic.patient("W1", email="w1@example.org"))
    slotengine_clock.set(utc(2026, 3, 3, 4))  # 23:00 in New York
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    assert offers(clinic.scheduler) == []
    slotengine_clock.set(utc(2026, 3, 3, 13, 1))  # 08:01
    from plugins.waitlist_fill import fill_pending
    fill_pending(clinic.scheduler.plugins.context)
    assert len(offers(clinic.scheduler)) == 1


class Favourite:
    @hookimpl
    def slotengine_score_waitlist_entry(self, entry, slot):
        return 5000.0 if entry.reason == "favourite" else None


@pytest.fixture
def slotengine_plugins():
    return PluginHost(discover=False, extra=[("favourite", Favourite())])


def test_vendor_scores_add_to_the_ranking(clinic, cancelled_slot):
    urgent = clinic.patient("W1", email="w1@example.org")
    favourite = clinic.patient("W2", email="w2@example.org")
    wait(clinic, urgent, urgency="urgent")
    wait(clinic, favourite, reason="favourite")
    clinic.scheduler.cancel(cancelled_slot.id, STAFF)
    assert [o.patient_id for o in offers(clinic.scheduler)] == [favourite.id, urgent.id]
