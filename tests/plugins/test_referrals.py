"""Referrals: routed to an in-network specialist, booked or waitlisted, followed to completion."""
from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import select, update

from engine.errors import InvalidRequest
from engine.models import OutboxItem, Provider, Slot
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.requests import BookingRequest, CoverageRecord, Identifier, PatientRecord
from plugins.referrals import receive_referral, referral_status
from tests.plugins.helpers import STAFF, utc


def referral_notices(scheduler):
    with scheduler.sessions() as session:
        return [i.payload for i in session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff_notice"))
                if i.payload["team"] == "referrals"]


def test_a_referral_is_booked_with_the_in_network_specialist_with_the_earliest_slot(clinic, slotengine_context):
    patient = clinic.patient("F1")
    referral_id = receive_referral(slotengine_context, {
        "patient_id": patient.id, "specialty": "cardiology", "referring_provider": "Dr Who",
        "referring_contact": "who@referrers.example.org", "external_id": "REF-1", "reason": "palpitations"})
    status = referral_status(slotengine_context, referral_id)
    # DRLEE (cardiology) is out of ACME's network: DRJONES it is
    assert status["status"] == "booked" and status["provider_id"] == clinic.providers["DRJONES"]
    assert [step["status"] for step in status["history"]] == ["received", "routed", "booked"]
    appointment = clinic.scheduler.appointment(status["appointment_id"])
    assert appointment.status == "booked" and appointment.patient_id == patient.id
    assert appointment.start == utc(2026, 3, 2, 14)  # DRJONES's first slot: Monday 09:00 in New York
    [told] = referral_notices(clinic.scheduler)
    assert told["to"] == "who@referrers.example.org" and "booked" in told["subject"]
    assert receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology",
                                                 "external_id": "REF-1"}) == referral_id  # a resend


def test_no_free_slot_puts_the_patient_on_the_waitlist_and_a_later_booking_links(clinic, slotengine_context):
    with clinic.scheduler.sessions() as session, session.begin():
        session.execute(update(Slot).where(Slot.provider_id == clinic.providers["DRJONES"]).values(blocked=True))
    patient = clinic.patient("F2", language="es")
    referral_id = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "waitlisted" and status["waitlist_id"]
    with clinic.scheduler.sessions() as session, session.begin():
        session.execute(update(Slot).where(Slot.provider_id == clinic.providers["DRJONES"]).values(blocked=False))
    appointment = clinic.book(patient, "DRJONES")
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "booked" and status["appointment_id"] == appointment.id


def test_a_booking_links_the_referral_recorded_for_a_patient_registered_in_the_same_transaction(
        clinic, slotengine_context):
    """Registered, referred (waitlisted) and booked in one transaction (an HL7 batch): the
    booking asks for the referral its transaction recorded."""
    scheduler = clinic.scheduler
    jones = clinic.providers["DRJONES"]
    with scheduler.sessions() as session, session.begin():
        view = scheduler.within(session)
        patient = view.register_patient(PatientRecord(identifiers=[Identifier("F9", "HOSP", "MR")],
                                                      family_name="Doe", given_name="Nine"), STAFF)
        view.record_coverage(patient.id, CoverageRecord(payer_id="ACME", member_id="MF9", plan_id="PPO",
                                                        effective_date=date(2025, 1, 1)), STAFF)
        session.execute(update(Slot).where(Slot.provider_id == jones).values(blocked=True))
        referral_id = slotengine_context.plugins.referral_received(
            session, {"patient_id": patient.id, "specialty": "cardiology"})
        session.execute(update(Slot).where(Slot.provider_id == jones).values(blocked=False))
        slot_id = session.scalars(select(Slot.id).where(Slot.provider_id == jones, Slot.slot_type == "new_patient")
                                  .order_by(Slot.start).limit(1)).one()
        appointment_id = view.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                  slot_id=slot_id), STAFF).id
    view.notify_committed()
    status = referral_status(slotengine_context, referral_id)
    assert [step["status"] for step in status["history"]] == ["received", "routed", "waitlisted", "booked"]
    assert status["appointment_id"] == appointment_id


def test_the_referral_completes_with_its_consult(clinic, slotengine_context, slotengine_clock):
    patient = clinic.patient("F3")
    referral_id = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology",
                                                        "referring_contact": "who@referrers.example.org"})
    appointment = clinic.scheduler.appointment(referral_status(slotengine_context, referral_id)["appointment_id"])
    slotengine_clock.set(appointment.start)
    for step in (clinic.scheduler.arrive, clinic.scheduler.check_in, clinic.scheduler.complete):
        step(appointment.id, STAFF)
    assert referral_status(slotengine_context, referral_id)["status"] == "completed"
    assert "completed" in referral_notices(clinic.scheduler)[-1]["subject"]


def test_a_cancelled_consult_reopens_the_referral(clinic, slotengine_context):
    patient = clinic.patient("F4")
    referral_id = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    appointment_id = referral_status(slotengine_context, referral_id)["appointment_id"]
    clinic.scheduler.cancel(appointment_id, STAFF)
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "routed" and status["appointment_id"] is None


def test_unroutable_and_invalid_referrals(clinic, slotengine_context, slotengine_routes):
    patient = clinic.patient("F5", payer="NOWHERE")
    referral_id = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    assert referral_status(slotengine_context, referral_id)["status"] == "unroutable"
    with pytest.raises(InvalidRequest):
        receive_referral(slotengine_context, {"patient_id": patient.id})
    assert slotengine_routes("POST", "/referrals", {"patient_id": patient.id})[0] == 400
    status, body = slotengine_routes("POST", "/referrals", {"patient_id": clinic.patient("F6").id,
                                                           "specialty": "family_medicine"})
    assert status == 201 and body["status"] == "booked"


def test_the_router_prefers_a_provider_speaking_the_patients_language(clinic, slotengine_context):
    with clinic.scheduler.sessions() as session, session.begin():
        session.execute(update(Provider).where(Provider.code == "DRLEE").values(networks=["acme-ppo"]))
    patient = clinic.patient("F7", language="ko")
    referral_id = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    assert referral_status(slotengine_context, referral_id)["provider_id"] == clinic.providers["DRLEE"]


class OnCall:
    @hookimpl
    def slotengine_route_referral(self, session, referral, context):
        if referral["urgency"] == "urgent":
            return {"waitlist": True, "provider_id": None}
        return None


@pytest.fixture
def slotengine_plugins():
    return PluginHost(discover=False, extra=[("on_call", OnCall())])


def test_a_vendor_router_answers_first(clinic, slotengine_context):
    patient = clinic.patient("F8")
    urgent = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology",
                                                   "urgency": "urgent"})
    routine = receive_referral(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    assert referral_status(slotengine_context, urgent)["status"] == "waitlisted"
    assert "by on_call" in referral_status(slotengine_context, urgent)["history"][1]["note"]
    assert referral_status(slotengine_context, routine)["status"] == "booked"  # the built-in router
    assert utc(2026, 3, 2) < clinic.scheduler.appointment(
        referral_status(slotengine_context, routine)["appointment_id"]).start
