"""Staff and billing notices, and patient instructions."""
from __future__ import annotations

from sqlalchemy import select, update

from engine.models import Location, OutboxItem
from engine.requests import BookingRequest
from tests.plugins.helpers import STAFF, utc


def notices(scheduler):
    with scheduler.sessions() as session:
        return [(i.payload["team"], i.payload["to"], i.payload["subject"], i.kind) for i in session.scalars(
            select(OutboxItem).where(OutboxItem.kind.in_(("staff_notice", "billing_notice"))).order_by(OutboxItem.id))]


def test_special_needs_go_to_the_teams_that_handle_them(clinic):
    patient = clinic.patient("N1", needs_interpreter=True, language="ko", mobility="A1",
                             other_needs="hearing loop")
    clinic.book(patient, after=utc(2026, 3, 4, 14))
    teams = {team: subject for team, _to, subject, _kind in notices(clinic.scheduler)}
    assert teams == {"interpreters": "Interpreter needed", "facilities": "Access needs"}


def test_labs_before_a_procedure_are_announced(clinic):
    appointment = clinic.book(clinic.patient("N2"), "DRJONES", slot_type="procedure")
    clinic.scheduler.confirm_hold(appointment.id, STAFF, "authorised")  # prior authorisation on file
    assert ("lab", "staff@clinic.example.org", "Labs before the visit", "staff_notice") in notices(clinic.scheduler)


def test_changes_affecting_claims_go_to_billing(clinic, slotengine_clock):
    patient = clinic.patient("N3")
    appointment = clinic.book(patient, after=utc(2026, 3, 4, 14))
    other = clinic.slots("DRSMITH", after=utc(2026, 3, 5, 14))[0]
    clinic.scheduler.reschedule(appointment.id, BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                                slot_id=other.id), STAFF)
    clinic.scheduler.cancel(appointment.id, STAFF, "moved away")
    billing = [(subject, kind) for team, to, subject, kind in notices(clinic.scheduler) if team == "billing"]
    assert billing == [(f"Appointment {appointment.id} moved", "billing_notice"),
                       (f"Appointment {appointment.id} cancelled", "billing_notice")]


def test_notices_are_sent_by_their_sweep(clinic, slotengine_jobs, smtp_sink):
    clinic.scheduler.cancel(clinic.book(clinic.patient("N4")).id, STAFF)
    assert slotengine_jobs.run("notices.send") == "ok: 1 notices sent"
    [mail] = smtp_sink.to("billing@clinic.example.org")
    assert "cancelled" in mail["Subject"] and "Estimated copay on file: 40.0" in mail.get_content()


def test_instructions_combine_location_type_and_settings(clinic, slotengine_context):
    with clinic.scheduler.sessions() as session, session.begin():
        session.execute(update(Location).where(Location.code == "MAIN").values(
            address="1 Main Street", instructions="Enter by the side door.\nCheck in at desk B."))
    appointment = clinic.book(clinic.patient("N5"), "DRJONES", slot_type="procedure")
    with clinic.scheduler.sessions() as session:
        lines = slotengine_context.plugins.patient_instructions(appointment, "MAIN", "en", session)
    assert lines == ["Main Street Clinic, 1 Main Street", "Enter by the side door.", "Check in at desk B.",
                     "Do not eat for 8 hours before.", "Please bring: Photo ID, Insurance card."]


def test_a_team_without_a_route_is_reported_once_not_raised(clinic, slotengine_context, caplog):
    settings = slotengine_context.state["notices"]
    settings.teams.clear()  # nothing configured: neither "facilities" nor "default"
    for n in range(2):
        clinic.book(clinic.patient(f"NR{n}", mobility="A1"), after=utc(2026, 3, 4, 14))
    assert not [n for n in notices(clinic.scheduler) if n[0] == "facilities"]
    warnings = [r for r in caplog.records if "no route" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].team == "facilities"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
