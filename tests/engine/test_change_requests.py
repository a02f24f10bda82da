"""Calendars owned elsewhere: changes are asked of the owner and count once it confirms.

A plugin answering ``slotengine_schedule_owner`` makes ``request_booking`` hold
the time and record a request; the owner's own message (``record_external_appointment``
with our placer id) confirms it, a refusal or a timeout gives the time back."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from engine.plugin_host import PluginError
from engine.models import ChangeRequest
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, ExternalAppointment
from tests.engine.helpers import (
    STAFF,
    get_slot,
    local,
    make_patient,
    provider_id,
    reservations,
    slot_at,
    with_plugins,
)

EHR = Actor("message", "EPIC^HOSP", "inbound message 9")
WAITLIST = Actor("plugin", "waitlist_fill", "offer 4")
TUESDAY = "2026-03-03"


class EhrOwns:
    """Says the EHR owns the calendars of the providers named (all, if none)."""

    def __init__(self, *provider_ids: int):
        self.provider_ids = set(provider_ids)

    @hookimpl
    def slotengine_schedule_owner(self, provider_id):
        return "EHR" if not self.provider_ids or provider_id in self.provider_ids else None


@pytest.fixture
def owned(sch, recorder):
    return with_plugins(sch, ("ehr_owns", EhrOwns()), ("recorder", recorder))


def requests(sch) -> list[ChangeRequest]:
    with sch.sessions() as s:
        return list(s.scalars(select(ChangeRequest).order_by(ChangeRequest.id)))


def confirm_as_ehr(sch, appointment, status="booked", start=None, filler_id="EHR77"):
    start = start or appointment.start
    return sch.record_external_appointment(ExternalAppointment(
        status=status, start=start, end=start + (appointment.end - appointment.start),
        appointment_type=appointment.appointment_type, placer_id=appointment.placer_id, filler_id=filler_id,
        patient_id=appointment.patient_id, provider_id=appointment.provider_id,
        location_id=appointment.location_id), EHR)


def ehr_booking(sch, patient_id, slot, filler_id):
    """An appointment the EHR booked and told us of."""
    return sch.record_external_appointment(ExternalAppointment(
        status="booked", start=slot.start, end=slot.end, appointment_type="new_patient", filler_id=filler_id,
        patient_id=patient_id, provider_id=slot.provider_id, location_id=slot.location_id), EHR)


def test_without_an_owner_the_request_is_applied_at_once(sch, recorder):
    patient = make_patient(sch)
    slot = slot_at(sch, "DRSMITH", local(TUESDAY, "09:00"))
    outcome = sch.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST)
    assert outcome.applied and outcome.appointment_status == "booked" and outcome.owner is None
    assert requests(sch) == []
    assert [c.kind for c in recorder.committed][-1:] == ["booked"]


def test_a_requested_booking_holds_the_time_until_the_owner_confirms(owned, recorder):
    patient = make_patient(owned)
    slot = slot_at(owned, "DRSMITH", local(TUESDAY, "09:00"))
    outcome = owned.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST,
                                    detail={"waitlist_offer_id": 4})
    assert (outcome.status, outcome.owner, outcome.appointment_status) == ("requested", "EHR", "held")
    held = owned.appointment(outcome.appointment_id)
    assert held.placer_id.startswith("SE-") and held.filler_id is None  # the EHR gives the filler id
    assert held.hold_expires_at == owned.clock.now() + owned.settings.owner_answer_timeout
    assert reservations(owned, appointment_id=held.id)  # nobody else can take the time meanwhile
    [asked] = requests(owned)
    assert (asked.kind, asked.status, asked.owner, asked.requested_start) == ("book", "pending", "EHR", slot.start)
    requested = [c for c in recorder.committed if c.kind == "change_requested"]
    assert requested[0].detail["request_id"] == asked.id and requested[0].detail["requester"] == {"waitlist_offer_id": 4}

    confirmed = confirm_as_ehr(owned, held)
    assert confirmed.id == held.id and confirmed.status == "booked" and confirmed.filler_id == "EHR77"
    [asked] = requests(owned)
    assert asked.status == "confirmed" and asked.decided_at == owned.clock.now()
    kinds = [c.kind for c in recorder.committed]
    assert kinds[-2:] == ["booked", "change_confirmed"]
    assert recorder.committed[-1].detail["requester"] == {"waitlist_offer_id": 4}


def test_a_refused_booking_gives_its_time_back(owned, recorder):
    patient = make_patient(owned)
    slot = slot_at(owned, "DRSMITH", local(TUESDAY, "09:00"))
    outcome = owned.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST)
    owned.resolve_change_request(outcome.request_id, "refused", Actor("system", "EHR"), "AE: slot taken in Cadence")
    assert owned.appointment(outcome.appointment_id).status == "cancelled"
    assert reservations(owned, appointment_id=outcome.appointment_id) == []
    assert get_slot(owned, slot.id).booked == 0
    [asked] = requests(owned)
    assert (asked.status, asked.outcome) == ("refused", "AE: slot taken in Cadence")
    assert [c.kind for c in recorder.committed][-2:] == ["cancelled", "change_refused"]
    # a second answer to a settled request changes nothing
    owned.resolve_change_request(outcome.request_id, "accepted", Actor("system", "EHR"))
    assert requests(owned)[0].status == "refused"


def test_an_accepted_request_still_waits_for_the_owners_schedule(owned):
    patient = make_patient(owned)
    slot = slot_at(owned, "DRSMITH", local(TUESDAY, "09:00"))
    outcome = owned.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST)
    owned.resolve_change_request(outcome.request_id, "accepted", Actor("system", "EHR"), "AA", filler_id="C-991")
    held = owned.appointment(outcome.appointment_id)
    assert held.status == "held" and held.filler_id == "C-991"
    assert requests(owned)[0].status == "accepted"
    # the SIU that follows finds it by the filler id alone
    owned.record_external_appointment(ExternalAppointment(
        status="booked", start=held.start, end=held.end, appointment_type="new_patient", filler_id="C-991",
        patient_id=patient.id, provider_id=held.provider_id, location_id=held.location_id), EHR)
    assert owned.appointment(held.id).status == "booked"
    assert requests(owned)[0].status == "confirmed"


def test_an_unanswered_request_expires_and_releases_the_hold(owned, clock, recorder):
    patient = make_patient(owned)
    slot = slot_at(owned, "DRSMITH", local(TUESDAY, "09:00"))
    outcome = owned.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST)
    clock.advance(seconds=owned.settings.owner_answer_timeout.total_seconds() - 1)
    assert owned.release_expired_holds() == 0
    clock.advance(seconds=1)
    owned.release_expired_holds()
    assert owned.appointment(outcome.appointment_id).status == "cancelled"
    assert requests(owned)[0].status == "expired"
    assert [c.kind for c in recorder.committed][-2:] == ["hold_expired", "change_expired"]
    assert get_slot(owned, slot.id).booked == 0


def test_a_requested_reschedule_moves_nothing_until_the_owner_does(owned, recorder):
    patient = make_patient(owned)
    first = slot_at(owned, "DRSMITH", local(TUESDAY, "11:30"))
    earlier = slot_at(owned, "DRSMITH", local(TUESDAY, "09:00"))
    appointment = ehr_booking(owned, patient.id, first, "EHR1")
    outcome = owned.request_reschedule(appointment.id, BookingRequest(patient.id, "", slot_id=earlier.id),
                                       WAITLIST, "earlier time from waitlist offer 4")
    assert outcome.status == "requested"
    assert owned.appointment(appointment.id).start == first.start  # our copy is unchanged
    [asked] = requests(owned)
    assert (asked.kind, asked.requested_start, asked.requested_provider_id) == (
        "reschedule", earlier.start, provider_id(owned, "DRSMITH"))
    moved = confirm_as_ehr(owned, owned.appointment(appointment.id), start=earlier.start, filler_id="EHR1")
    assert moved.start == earlier.start
    assert requests(owned)[0].status == "confirmed"


def test_a_requested_cancellation_is_confirmed_by_the_owners_cancellation(owned):
    patient = make_patient(owned)
    slot = slot_at(owned, "DRSMITH", local(TUESDAY, "10:00"))
    appointment = ehr_booking(owned, patient.id, slot, "EHR2")
    outcome = owned.request_cancellation(appointment.id, STAFF, "emergency needs the slot")
    assert outcome.status == "requested" and owned.appointment(appointment.id).status == "booked"
    # an unrelated modification from the EHR settles nothing
    confirm_as_ehr(owned, owned.appointment(appointment.id), filler_id="EHR2")
    assert requests(owned)[0].status == "pending"
    confirm_as_ehr(owned, owned.appointment(appointment.id), status="cancelled", filler_id="EHR2")
    assert requests(owned)[0].status == "confirmed"


def test_only_the_owned_calendars_are_asked(sch, recorder):
    smith, jones = provider_id(sch, "DRSMITH"), provider_id(sch, "DRJONES")
    partly = with_plugins(sch, ("ehr_owns", EhrOwns(smith)), ("recorder", recorder))
    patient = make_patient(partly)
    at_smith = slot_at(partly, "DRSMITH", local(TUESDAY, "11:00"))
    at_jones = slot_at(partly, "DRJONES", local(TUESDAY, "11:00"))
    assert partly.request_booking(BookingRequest(patient.id, "new_patient", slot_id=at_smith.id), WAITLIST).status \
        == "requested"
    other = make_patient(partly)
    assert partly.request_booking(BookingRequest(other.id, "new_patient", slot_id=at_jones.id), WAITLIST).applied
    assert jones != smith


class BrokenOwner:
    @hookimpl
    def slotengine_schedule_owner(self):
        raise RuntimeError("directory down")


def test_an_owner_plugin_that_fails_refuses_the_request(sch):
    broken = with_plugins(sch, ("broken", BrokenOwner()))
    patient = make_patient(broken)
    slot = slot_at(broken, "DRSMITH", local(TUESDAY, "09:00"))
    with pytest.raises(PluginError, match="broken"):
        broken.request_booking(BookingRequest(patient.id, "new_patient", slot_id=slot.id), WAITLIST)
    assert get_slot(broken, slot.id).booked == 0 and requests(broken) == []
