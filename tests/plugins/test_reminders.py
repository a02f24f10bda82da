"""Reminders: planned with the booking, sent over a real SMTP server and a real webhook, answered."""
from __future__ import annotations

from datetime import date, time, timedelta

import pytest
from sqlalchemy import select

from engine.messaging import outside_quiet_hours
from engine.models import Appointment, OutboxItem
from engine.requests import BookingRequest, CoverageRecord, Identifier, PatientRecord
from engine.signing import make_token
from tests.plugins.helpers import REPLY_SECRET, STAFF, utc

NY = "America/New_York"


def outbox(scheduler, appointment_id=None, kinds=("confirmation", "reminder", "follow_up")):
    with scheduler.sessions() as session:
        stmt = select(OutboxItem).where(OutboxItem.kind.in_(kinds)).order_by(OutboxItem.due_at, OutboxItem.id)
        if appointment_id is not None:
            stmt = stmt.where(OutboxItem.appointment_id == appointment_id)
        return list(session.scalars(stmt))


def test_quiet_hours_move_a_message_forward_or_back():
    quiet = (time(21), time(8))
    evening = utc(2026, 3, 3, 2, 30)  # 21:30 in New York
    assert outside_quiet_hours(evening, NY, *quiet) == utc(2026, 3, 3, 13, 0)  # next 08:00
    # the visit is at 08:30 next morning: moving forward would be too late, so back to 20:55
    assert outside_quiet_hours(evening, NY, *quiet, not_after=utc(2026, 3, 3, 11, 30)) == utc(2026, 3, 3, 1, 55)
    assert outside_quiet_hours(utc(2026, 3, 3, 15), NY, *quiet) == utc(2026, 3, 3, 15)  # 10:00: unchanged


def test_a_booking_plans_a_confirmation_and_reminders_in_its_transaction(clinic, slotengine_clock):
    patient = clinic.patient("R1", email="r1@example.org")
    appointment = clinic.book(patient, after=utc(2026, 3, 6, 14))  # Fri 6 Mar 09:00 New York
    items = outbox(clinic.scheduler, appointment.id)
    assert [(i.kind, i.channel) for i in items] == [("confirmation", "email"), ("reminder", "email"),
                                                    ("reminder", "email")]
    confirmation, three_days, one_day = items
    assert confirmation.due_at == utc(2026, 3, 2, 13)  # booked at 02:00 local: quiet until 08:00
    assert three_days.due_at == appointment.start - timedelta(hours=72)
    assert one_day.due_at == appointment.start - timedelta(hours=24)


def test_reschedule_replans_and_cancel_withdraws(clinic):
    patient = clinic.patient("R2", email="r2@example.org")
    appointment = clinic.book(patient, after=utc(2026, 3, 6, 14))
    later = clinic.slots("DRSMITH", after=utc(2026, 3, 10, 14))[0]
    clinic.scheduler.reschedule(appointment.id, BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                                slot_id=later.id), STAFF)
    items = outbox(clinic.scheduler, appointment.id)
    pending = [i for i in items if i.status == "pending"]
    assert {i.status for i in items if i not in pending} == {"withdrawn"}
    assert [i.payload.get("template") for i in pending if i.kind == "confirmation"] == ["moved"]
    assert all(i.payload["start"] == later.start.isoformat() for i in pending)
    clinic.scheduler.cancel(appointment.id, STAFF, "patient called")
    assert {i.status for i in outbox(clinic.scheduler, appointment.id)} == {"withdrawn"}


def test_a_move_whose_requester_told_the_patient_gets_reminders_but_no_moved_message(clinic):
    patient = clinic.patient("R3", email="r3@example.org")
    appointment = clinic.book(patient, after=utc(2026, 3, 6, 14))
    later = clinic.slots("DRSMITH", after=utc(2026, 3, 10, 14))[0]
    clinic.scheduler.request_reschedule(appointment.id, BookingRequest(
        patient_id=patient.id, appointment_type="new_patient", slot_id=later.id), STAFF, "emergency",
        detail={"emergency_move": 1, "patient_told": True})
    pending = [i for i in outbox(clinic.scheduler, appointment.id) if i.status == "pending"]
    assert pending and all(i.kind == "reminder" for i in pending)
    assert all(i.payload["start"] == later.start.isoformat() for i in pending)


def test_reminders_arrive_by_email_and_signed_sms_with_minimum_content(clinic, slotengine_clock, slotengine_jobs,
                                                                        smtp_sink, webhook_sink):
    emailed = clinic.patient("R3", email="r3@example.org", language="es")
    texted = clinic.patient("R4", phones=[{"number": "+15550100", "use": "CP"}], preferred_channel="sms")
    a = clinic.scheduler.book(BookingRequest(patient_id=emailed.id, appointment_type="procedure",
                                             slot_id=clinic.slots("DRJONES", "procedure")[0].id,
                                             reason="suspected melanoma"), STAFF)
    b = clinic.scheduler.book(BookingRequest(patient_id=texted.id, appointment_type="new_patient",
                                             slot_id=clinic.slots("DRSMITH", after=utc(2026, 3, 9, 14))[0].id,
                                             reason="chest pain"), STAFF)
    assert a.status == "held"  # prior authorisation for procedures: eligibility review
    clinic.scheduler.confirm_hold(a.id, STAFF, "authorisation on file")
    slotengine_clock.set(a.start - timedelta(hours=23))
    assert slotengine_jobs.run("reminders.send") == "ok: 4 messages sent"  # 2 confirmations, 2 reminders
    slotengine_clock.set(b.start - timedelta(hours=23))
    assert slotengine_jobs.run("reminders.send") == "ok: 1 messages sent"  # b's 24 h reminder
    mails = smtp_sink.to("r3@example.org")
    assert {m["Subject"] for m in mails} == {"Su cita el sáb 7 mar 08:00", "Recordatorio: su cita el sáb 7 mar 08:00"}
    body = mails[0].get_content()
    assert "Do not eat for 8 hours before." in body and "Photo ID" in body and "Bob Jones" in body
    assert "https://portal.example.org/reply?token=" in body
    assert mails[0]["Message-ID"].startswith("<outbox-")
    texts = webhook_sink.to("+15550100")
    assert len(texts) == 3 and all(r["signed"] for r in webhook_sink.requests)
    assert texts[2]["text"] == ("Main Street Clinic: reminder of your appointment on Mon 9 Mar 10:00. "
                                "Reply C to confirm, X to cancel, R to reschedule.")
    everything = " ".join([m.get_content() for m in smtp_sink.messages] + [t["text"] for t in texts])
    assert "melanoma" not in everything and "chest pain" not in everything
    assert all(i.status in ("sent", "withdrawn", "skipped") for i in outbox(clinic.scheduler)
               if i.due_at <= slotengine_clock.now())
    assert smtp_sink.connections == 1  # a's confirmation and reminder went in one batch, one connection


def test_replies_confirm_cancel_and_ask_to_reschedule(clinic, slotengine_routes, slotengine_jobs, smtp_sink):
    patients = [clinic.patient(f"R{i}", email=f"r{i}@example.org") for i in (5, 6, 7)]
    appointments = [clinic.book(p, "DRJONES", after=utc(2026, 3, 9, 14)) for p in patients]
    tokens = [make_token(REPLY_SECRET, {"a": a.id, "o": 1}, expires=a.start) for a in appointments]
    status, body = slotengine_routes("POST", "/reminders/reply", {"token": tokens[0], "answer": "confirm"})
    assert (status, body["answer"], body["status"]) == (200, "confirm", "booked")
    with clinic.scheduler.sessions() as session:
        assert session.get(Appointment, appointments[0].id).confirmed_at is not None
    assert slotengine_routes("POST", "/reminders/reply", {"token": tokens[1], "text": "X"})[1]["status"] == "cancelled"
    assert slotengine_routes("POST", "/reminders/reply", {"token": tokens[1], "text": "X"})[0] == 409  # already
    assert slotengine_routes("POST", "/reminders/reply", {"token": tokens[2], "answer": "R"})[0] == 200
    slotengine_jobs.run("notices.send")
    [ask] = [m for m in smtp_sink.to("desk@clinic.example.org") if "reschedule" in m["Subject"]]
    assert f"appointment {appointments[2].id}" in ask["Subject"]
    forged = tokens[0][:-2] + ("AA" if not tokens[0].endswith("AA") else "BB")
    assert slotengine_routes("POST", "/reminders/reply", {"token": forged, "answer": "C"})[0] == 403
    assert slotengine_routes("POST", "/reminders/reply", {"token": tokens[0], "answer": "maybe"})[0] == 400
    assert slotengine_routes("POST", "/reminders/reply", body=b"not json")[0] == 400


def test_completion_plans_a_follow_up(clinic, slotengine_clock, slotengine_jobs, smtp_sink):
    patient = clinic.patient("R8", email="r8@example.org")
    appointment = clinic.book(patient, after=utc(2026, 3, 2, 14))
    slotengine_clock.set(appointment.start)
    for step in (clinic.scheduler.arrive, clinic.scheduler.check_in, clinic.scheduler.complete):
        step(appointment.id, STAFF)
    [follow_up] = outbox(clinic.scheduler, appointment.id, ("follow_up",))
    assert follow_up.due_at == appointment.start + timedelta(hours=24)
    slotengine_clock.advance(hours=25)
    slotengine_jobs.run("reminders.send")
    assert [m["Subject"] for m in smtp_sink.to("r8@example.org")][-1] == "Thank you for your visit"


def test_a_stale_reminder_is_skipped_not_sent(clinic, slotengine_clock, slotengine_jobs, smtp_sink):
    patient = clinic.patient("R9", email="r9@example.org")
    appointment = clinic.book(patient, after=utc(2026, 3, 9, 14))
    slotengine_clock.set(appointment.start - timedelta(hours=1))  # the daemon was down for days
    slotengine_jobs.run("reminders.send")
    statuses = {i.kind + ":" + str(i.payload.get("offset_hours", "")): (i.status, i.last_error)
                for i in outbox(clinic.scheduler, appointment.id)}
    assert statuses["reminder:24.0"] == ("skipped", "too close to the visit")
    assert statuses["reminder:72.0"][0] == "skipped"


@pytest.mark.parametrize("preferred, expected", [("sms", "sms"), ("email", "email"), ("voice", "email")])  # no voice channel: the fallback order
def test_the_patients_preferred_channel_when_it_can_reach_them(clinic, preferred, expected):
    patient = clinic.patient("C1", email="c1@example.org", phones=[{"number": "+15550101"}],
                             preferred_channel=preferred)
    appointment = clinic.book(patient, after=utc(2026, 3, 9, 14))
    assert {i.channel for i in outbox(clinic.scheduler, appointment.id)} == {expected}


def test_patients_who_declined_reminders_or_a_channel_or_died_get_none_by_it(clinic):
    declined = clinic.patient("R10", email="r10@example.org")
    clinic.scheduler.set_patient_flags(declined.id, ["opt_out:reminder"], STAFF, source="hl7:PD1-11")
    assert outbox(clinic.scheduler, clinic.book(declined, after=utc(2026, 3, 6, 14)).id) == []

    no_email = clinic.patient("R11", email="r11@example.org")
    clinic.scheduler.set_patient_flags(no_email.id, ["opt_out:email"], STAFF, source="patient reply")
    assert all(i.channel != "email" for i in outbox(clinic.scheduler,
                                                     clinic.book(no_email, after=utc(2026, 3, 6, 15)).id))

    from engine.requests import Identifier, PatientRecord
    died = clinic.patient("R12", email="r12@example.org")
    clinic.scheduler.register_patient(PatientRecord(identifiers=[Identifier("R12", "HOSP", "MR")], deceased=True), STAFF)
    assert outbox(clinic.scheduler, clinic.book(died, after=utc(2026, 3, 6, 16)).id) == []


def test_a_patient_registered_and_opted_out_in_the_booking_transaction_gets_no_reminders(clinic):
    """The opt-outs of a patient the transaction registered are what it flagged since."""
    slots = clinic.slots("DRSMITH", after=utc(2026, 3, 6, 14))
    with clinic.scheduler.sessions() as session, session.begin():
        view = clinic.scheduler.within(session)
        booked = {}
        for mrn, flags in (("R20", []), ("R21", ["opt_out:reminder"])):
            patient = view.register_patient(PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")],
                                                          family_name="Doe", email=f"{mrn}@example.org"), STAFF)
            view.record_coverage(patient.id, CoverageRecord(payer_id="ACME", member_id=f"M{mrn}", plan_id="PPO",
                                                            effective_date=date(2025, 1, 1)), STAFF)
            view.set_patient_flags(patient.id, flags, STAFF, source="hl7:PD1-11")
            booked[mrn] = view.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                   slot_id=slots[len(booked)].id), STAFF).id
    view.notify_committed()
    assert outbox(clinic.scheduler, booked["R20"]) != []
    assert outbox(clinic.scheduler, booked["R21"]) == []
