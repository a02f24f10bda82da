"""``engine.db.flush_changes`` writes changed columns of stored rows with one UPDATE
each, without the unit of work.  It must leave the database and the session exactly
as ``session.flush()`` would: the row written, the object clean, and a rollback
expiring what the transaction changed; anything it does not handle goes to the flush."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select

from engine.db import flush_changes
from engine.models import Appointment, AppointmentResource, AuditEntry, Patient, Resource
from engine.requests import BookingRequest, CoverageRecord, ExternalAppointment
from tests.engine.helpers import STAFF, local, make_patient, provider_id, statements
from tests.engine.test_mirror import EHR


def _appointment(sch) -> int:
    start = local("2026-03-03", "09:00")
    return sch.record_external_appointment(ExternalAppointment(
        status="booked", start=start, end=start + timedelta(minutes=30), appointment_type="general",
        placer_id="EHR1", provider_id=provider_id(sch, "DRSMITH")), EHR).id


def test_changed_columns_are_written_with_one_update_and_the_row_is_clean(sch, slotengine_engine):
    patient = make_patient(sch, phones=[{"number": "+1 555 0100", "use": "PRN"}])
    with sch.sessions() as session, session.begin():
        row = session.get(Patient, patient.id)
        row.family_name = "Roe"
        row.phones = [{"number": "+1 555 0199", "use": "PRN"}]
        row.language = row.language  # set, unchanged: not written
        with statements(slotengine_engine) as sent:
            flush_changes(session)
        assert len(sent) == 1 and sent[0].startswith("UPDATE patients SET")
        assert "family_name" in sent[0] and "phones" in sent[0] and "language" not in sent[0]
        assert not session.dirty
        with statements(slotengine_engine) as sent:
            session.flush()
        assert sent == []  # nothing left for the unit of work
    with sch.sessions() as session:
        stored = session.get(Patient, patient.id)
        assert (stored.family_name, stored.phones) == ("Roe", [{"number": "+1 555 0199", "use": "PRN"}])


def test_a_change_set_back_writes_nothing(sch, slotengine_engine):
    patient = make_patient(sch)
    with sch.sessions() as session, session.begin():
        row = session.get(Patient, patient.id)
        row.family_name = "Roe"
        row.family_name = "Doe"
        with statements(slotengine_engine) as sent:
            flush_changes(session)
        assert sent == [] and not session.dirty


def test_a_rolled_back_savepoint_takes_the_change_back_from_the_object_too(sch):
    patient = make_patient(sch)
    with sch.sessions() as session, session.begin():
        row = session.get(Patient, patient.id)
        savepoint = session.begin_nested()
        row.family_name = "Roe"
        flush_changes(session)
        savepoint.rollback()
        assert row.family_name == "Doe"  # expired by the rollback, read again
        assert session.scalar(select(Patient.family_name).where(Patient.id == patient.id)) == "Doe"


def test_a_changed_collection_goes_through_the_unit_of_work(sch, slotengine_engine):
    appointment_id = _appointment(sch)
    with sch.sessions() as session, session.begin():
        row = session.get(Appointment, appointment_id)
        room = session.scalar(select(Resource.id).limit(1))
        row.resources = [AppointmentResource(resource_id=room)]  # loads the old list first (and autoflushes)
        row.notes = "bring the referral letter"
        with statements(slotengine_engine) as sent:
            flush_changes(session)
        assert not session.dirty and not session.new
    with sch.sessions() as session:
        stored = session.get(Appointment, appointment_id)
        assert stored.notes == "bring the referral letter"
        assert [r.resource_id for r in stored.resources] == [room]
    assert any(s.startswith("UPDATE appointments") for s in sent), sent


def test_a_flush_listener_still_hears_of_the_flush(sch):
    heard = []
    patient = make_patient(sch)
    with sch.sessions() as session, session.begin():
        event.listen(session, "before_flush", lambda *_args: heard.append("before_flush"))
        session.get(Patient, patient.id).family_name = "Roe"
        flush_changes(session)
    assert heard == ["before_flush"]


# --- new rows: written without the flush, holding what a reload gives ----------------------


def _as_reloaded(sch, row, names: list[str]) -> None:
    with sch.sessions() as session:
        stored = session.get(type(row), row.id)
        for name in names:
            assert getattr(row, name) == getattr(stored, name), name
            assert type(getattr(row, name)) is type(getattr(stored, name)), name
            if isinstance(getattr(row, name), datetime):
                assert getattr(row, name).tzinfo is timezone.utc, name


def test_a_new_row_holds_its_values_as_stored_whatever_form_they_were_given_in(sch):
    """``_insert_row`` makes a new row's object persistent without a flush: the object must
    hold each value as a reload gives it (a time in UTC, a date a date, a bool, a list),
    whatever form the caller gave, so that the engine's times stay UTC and an audit
    snapshot reads as the row does.  (A version keeping the values as written left a
    start given in the clinic's zone in that zone, in the object and in the audit.)"""
    new_york = ZoneInfo("America/New_York")
    patient = make_patient(sch, birth_date=datetime(1980, 5, 6, 12, 30), phones=({"number": "+1 555 0100"},),
                           preferred_weekdays=(0, 2), needs_interpreter=1,
                           preferred_earliest=time(9, 0, tzinfo=timezone(timedelta(hours=2))),
                           deceased=True, deceased_at=datetime(2026, 3, 1, 9, 0, tzinfo=new_york))
    _as_reloaded(sch, patient, ["birth_date", "phones", "preferred_weekdays", "needs_interpreter",
                                "preferred_earliest", "deceased", "deceased_at", "created_at", "address"])
    coverage = sch.record_coverage(patient.id, CoverageRecord(
        payer_id="ACME", member_id="M1", effective_date=datetime(2026, 1, 1, 5, 0),
        verified_at=datetime(2026, 3, 1, 9, 0, tzinfo=new_york)), STAFF)
    _as_reloaded(sch, coverage, ["effective_date", "verified_at"])

    start = datetime(2026, 3, 3, 9, 0, tzinfo=new_york)
    booked = sch.book(BookingRequest(patient.id, "general", provider_id=provider_id(sch, "DRSMITH"), start=start),
                      STAFF)
    mirrored = sch.record_external_appointment(ExternalAppointment(
        status="booked", start=start + timedelta(days=1), end=start + timedelta(days=1, minutes=30),
        appointment_type="general", placer_id="EHR-FORMS", provider_id=provider_id(sch, "DRSMITH")), EHR)
    for appointment in (booked, mirrored):
        _as_reloaded(sch, appointment, ["start", "end", "created_at", "eligibility"])
        with sch.sessions() as session:
            after = [entry.after for entry in session.scalars(
                select(AuditEntry).where(AuditEntry.entity == "appointment", AuditEntry.entity_id == appointment.id))
                if entry.after and "start" in entry.after]
        assert after and all(snapshot["start"].endswith("+00:00") for snapshot in after)


def test_a_naive_time_is_still_refused_when_a_row_is_written(sch):
    with pytest.raises(Exception, match="naive datetime"):
        make_patient(sch, deceased=True, deceased_at=datetime(2026, 3, 1, 9, 0))
