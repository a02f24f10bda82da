"""What a transaction looks up ahead of its work (``look_up_identifiers``,
``look_up_appointments``) spares the queries of the calls that follow: the
patients and appointments come from the session, and on PostgreSQL the
appointments are locked as they are loaded, not one by one again."""
from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from engine.models import Appointment, AppointmentResource
from engine.requests import Actor, ExternalAppointment, Identifier, PatientRecord
from tests.engine.helpers import STAFF, local, minutes, provider_id, resource_id, statements

EHR = Actor("message", "EPIC^HOSP", "inbound message 7")
TUESDAY = "2026-03-03"


def booked(sch, placer_id: str, *, at: str = "09:00", **kw) -> Appointment:
    start = local(TUESDAY, at)
    return sch.record_external_appointment(ExternalAppointment(
        status="booked", start=start, end=start + minutes(30), appointment_type="general", placer_id=placer_id,
        provider_id=provider_id(sch, "DRSMITH"), **kw), EHR)


def test_an_appointment_looked_up_ahead_is_not_locked_again(sch, slotengine_engine, db_kind):
    first = booked(sch, "EHR1")
    with sch.sessions() as session, session.begin():
        view = sch.within(session).all_or_nothing()
        view.look_up_appointments(["EHR1"], [])
        with statements(slotengine_engine) as sent:
            moved = view.record_external_appointment(ExternalAppointment(
                status="booked", start=local(TUESDAY, "10:00"), end=local(TUESDAY, "10:30"),
                appointment_type="general", placer_id="EHR1"), EHR, found=first.id)
        assert moved.id == first.id
        assert not [s for s in sent if "FOR UPDATE" in s]
        if db_kind == "postgresql":
            # locked by the look-up itself: another transaction cannot take the row
            with slotengine_engine.connect() as other, pytest.raises(OperationalError):
                other.execute(select(Appointment.id).where(Appointment.id == first.id).with_for_update(nowait=True))


def test_a_rolled_back_savepoint_forgets_the_locks_taken_ahead(sch, slotengine_engine, db_kind):
    if db_kind != "postgresql":
        pytest.skip("SQLite takes no row locks")
    first = booked(sch, "EHR1")
    with sch.sessions() as session, session.begin():
        view = sch.within(session)
        with pytest.raises(RuntimeError), session.begin_nested():
            view.look_up_appointments(["EHR1"], [])
            raise RuntimeError("the message failed")
        # rolling back to the savepoint released the lock: the call takes it again
        with statements(slotengine_engine) as sent:
            view.cancel(first.id, EHR)
        assert [s for s in sent if "FOR UPDATE" in s]


def test_the_resources_looked_up_ahead_are_the_appointments_own(sch):
    room = resource_id(sch, "ROOM1")
    with_room = booked(sch, "EHR1", resource_ids=(room,))
    without = booked(sch, "EHR2", at="11:00")
    with sch.sessions() as session, session.no_autoflush:
        view = sch.within(session)
        changed = session.get(Appointment, without.id)
        changed.resources.append(AppointmentResource(resource_id=room))  # not written: the look-up must keep it
        view.look_up_appointments(["EHR1", "EHR2"], [])
        found = view.find_appointment(placer_id="EHR1")
        assert found.id == with_room.id
        assert [r.resource_id for r in found.__dict__["resources"]] == [room]  # loaded: no query when read
        assert [r.resource_id for r in changed.resources] == [room]


def test_a_patient_holding_every_identifier_looked_up_is_updated_without_loading_them(sch, slotengine_engine):
    mrn, other = Identifier("M1", "HOSP", "MR"), Identifier("S1", "SSA", "SS")
    patient = sch.register_patient(PatientRecord(identifiers=[mrn, other], family_name="Doe"), STAFF)
    with sch.sessions() as session, session.begin():
        view = sch.within(session).all_or_nothing()
        view.look_up_identifiers([mrn, other])
        with statements(slotengine_engine) as sent:
            updated = view.register_patient(PatientRecord(identifiers=[mrn, other], family_name="Roe"), STAFF)
        assert not [s for s in sent if "FROM patient_identifiers" in s]
        assert updated.id == patient.id and updated.family_name == "Roe"
        assert sorted(i.value for i in updated.identifiers) == ["M1", "S1"]
        # an identifier it does not hold yet is added as before
        added = view.register_patient(PatientRecord(identifiers=[mrn, Identifier("E1", "EPI", "PI")]), STAFF)
        assert sorted(i.value for i in added.identifiers) == ["E1", "M1", "S1"]
    assert sch.find_patient([Identifier("E1", "EPI", "PI")]).id == patient.id
