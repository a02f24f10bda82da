"""One week of a small clinic, hour by hour on a ManualClock, with every built-in plugin,
a real SMTP server and a real SMS webhook: bookings, a cancellation filled from the
waitlist through a cascade, reminders sent and confirmed, an eligibility failure
reaching staff, a referral routed, booked and completed."""
from __future__ import annotations

import re
from datetime import date

from sqlalchemy import select

from engine.models import OutboxItem, WaitlistEntry
from plugins.referrals import receive_referral, referral_status
from tests.plugins.helpers import STAFF, utc

SWEEPS = ("reminders.send", "notices.send", "waitlist_fill.fill", "waitlist_fill.send_offers",
          "waitlist_fill.expire_offers", "eligibility.recheck", "core.release_expired_holds")


def token_in(text: str) -> str:
    return re.search(r"([A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,})", text).group(1)


def test_a_week_at_the_clinic(clinic, slotengine_clock, slotengine_jobs, slotengine_routes, slotengine_context,
                              smtp_sink, webhook_sink):
    clock, scheduler = slotengine_clock, clinic.scheduler

    def sweep():
        for job in SWEEPS:
            assert slotengine_jobs.run(job).startswith("ok"), job

    def tick(until):
        """Advance an hour at a time, running the sweeps as the daemon would."""
        while clock.now() < until:
            clock.advance(hours=1)
            sweep()

    def mails(to, subject=""):
        return [m for m in smtp_sink.to(to) if subject in m["Subject"]]

    # Monday 08:00 in New York: the front desk books the week
    clock.set(utc(2026, 3, 2, 13))
    ana = clinic.patient("ANA", email="ana@example.org", language="es")
    ben = clinic.patient("BEN", phones=[{"number": "+15550111", "use": "CP"}], preferred_channel="sms")
    cara = clinic.patient("CARA", email="cara@example.org")
    dan = clinic.patient("DAN", email="dan@example.org")
    eve = clinic.patient("EVE", email="eve@example.org", expiry=date(2026, 2, 28))
    fay = clinic.patient("FAY", email="fay@example.org")
    ana_visit = clinic.book(ana, after=utc(2026, 3, 3, 15))  # Tue 10:00
    ben_visit = clinic.book(ben, after=utc(2026, 3, 4, 14))  # Wed 09:00
    cara_visit = clinic.book(cara, after=utc(2026, 3, 6, 15))  # Fri 10:00 ...
    scheduler.add_to_waitlist(patient_id=cara.id, appointment_type="new_patient", duration_minutes=15, actor=STAFF,
                              current_appointment_id=cara_visit.id)  # ... but would come earlier
    scheduler.add_to_waitlist(patient_id=dan.id, appointment_type="new_patient", duration_minutes=15, actor=STAFF,
                              urgency="urgent")
    eve_visit = clinic.book(eve, after=utc(2026, 3, 5, 14))
    assert eve_visit.status == "held"  # coverage ended: held for review
    referral_id = receive_referral(slotengine_context, {
        "patient_id": fay.id, "specialty": "cardiology", "referring_provider": "Dr Who",
        "referring_contact": "who@referrers.example.org"})
    tick(utc(2026, 3, 2, 16))

    assert [m["Subject"] for m in mails("ana@example.org")] == ["Su cita el mar 3 mar 10:00"]
    assert "Coverage check failed" in mails("desk@clinic.example.org")[0]["Subject"]
    assert "ended 2026-02-28" in mails("billing@clinic.example.org", "Coverage")[0].get_content()
    assert referral_status(slotengine_context, referral_id)["status"] == "booked"
    assert "consult booked" in mails("who@referrers.example.org")[0]["Subject"]

    # Monday noon: Ana cancels by answering her confirmation
    tick(utc(2026, 3, 2, 17))
    status, body = slotengine_routes("POST", "/reminders/reply",
                                     {"token": token_in(mails("ana@example.org")[0].get_content()), "answer": "X"})
    assert (status, body["status"]) == (200, "cancelled")
    clock.advance(minutes=1)
    sweep()  # the daemon's sweeps run every 30 s
    [offer_to_cara] = mails("cara@example.org", "earlier appointment")
    [offer_to_dan] = mails("dan@example.org", "earlier appointment")
    assert f"Appointment {ana_visit.id} cancelled" in mails("billing@clinic.example.org", "cancelled")[0]["Subject"]

    # Cara takes Tuesday 10:00; her Friday slot cascades to Dan, who takes it
    assert slotengine_routes("POST", "/waitlist/reply",
                             {"token": token_in(offer_to_cara.get_content()), "answer": "yes"})[1]["result"] == "accepted"
    assert slotengine_routes("POST", "/waitlist/reply",
                             {"token": token_in(offer_to_dan.get_content()), "answer": "yes"})[1]["result"] == "taken"
    clock.advance(minutes=1)
    sweep()
    friday_offer = mails("dan@example.org", "earlier appointment")[-1]
    assert "vie" not in friday_offer.get_content() and "Fri 6 Mar 10:00" in friday_offer.get_content()
    dan_result = slotengine_routes("POST", "/waitlist/reply",
                                   {"token": token_in(friday_offer.get_content()), "answer": "yes"})[1]
    assert dan_result["result"] == "accepted"
    assert scheduler.appointment(cara_visit.id).start == ana_visit.start  # Cara moved to Tuesday 10:00
    dan_visit = scheduler.appointment(dan_result["appointment_id"])
    assert (dan_visit.patient_id, dan_visit.start) == (dan.id, cara_visit.start)  # Dan in Cara's Friday
    with scheduler.sessions() as session:
        assert {e.status for e in session.scalars(select(WaitlistEntry))} == {"booked"}

    # Tuesday 09:00: Ben's 24-hour reminder goes out by SMS; he confirms
    tick(utc(2026, 3, 3, 15))
    texts = webhook_sink.to("+15550111")
    assert [t["kind"] for t in texts] == ["confirmation", "reminder"]
    assert all(r["signed"] for r in webhook_sink.requests)
    assert slotengine_routes("POST", "/reminders/reply",
                             {"token": texts[-1]["reply_token"], "text": "C"})[1]["answer"] == "confirm"
    assert scheduler.appointment(ben_visit.id).confirmed_at is not None

    # Wednesday: Fay's consult takes place; the referral completes
    consult = scheduler.appointment(referral_status(slotengine_context, referral_id)["appointment_id"])
    tick(consult.start)
    for step in (scheduler.arrive, scheduler.check_in, scheduler.complete):
        step(consult.id, STAFF)
    assert referral_status(slotengine_context, referral_id)["status"] == "completed"

    # ... to Sunday night
    tick(utc(2026, 3, 9, 4))
    assert "Thank you for your visit" in [m["Subject"] for m in mails("fay@example.org")]
    assert "consult completed" in mails("who@referrers.example.org")[-1]["Subject"]
    ids = [m["Message-ID"] for m in smtp_sink.messages] + [r["body"]["id"] for r in webhook_sink.requests]
    assert len(ids) == len(set(ids))  # nothing sent twice
    with scheduler.sessions() as session:
        left = list(session.scalars(select(OutboxItem).where(OutboxItem.status == "pending",
                                                             OutboxItem.due_at <= clock.now())))
        assert left == []
        failed = list(session.scalars(select(OutboxItem).where(OutboxItem.status == "failed")))
        assert failed == []
    # the messages followed the moves: none for the times given up
    assert [m["Subject"] for m in mails("cara@example.org") if "earlier" not in m["Subject"]] == [
        "Your appointment on Fri 6 Mar 10:00", "Your appointment has moved to Tue 3 Mar 10:00"]
    assert [m["Subject"] for m in mails("dan@example.org") if "earlier" not in m["Subject"]][:2] == [
        "Your appointment on Fri 6 Mar 10:00", "Reminder: your appointment on Fri 6 Mar 10:00"]
