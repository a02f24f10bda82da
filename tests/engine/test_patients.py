"""Patients: upsert by identifiers, sparse updates, coverage, merges."""
from __future__ import annotations

from datetime import date, datetime, time, timezone

import pytest
from sqlalchemy import select

from engine.errors import PatientConflict
from engine.models import Coverage, Patient, PatientIdentifier, WaitlistEntry
from engine.requests import CoverageRecord, Identifier, PatientRecord
from tests.engine.helpers import STAFF, audit, book, count, local, reservations, slot_at

TUESDAY = "2026-03-03"
MRN = Identifier("12345", "HOSP", "MR")
SSN = Identifier("123-45-6789", "SSA", "SS")
PAYER_ID = Identifier("AET-998877", "AETNA", "MB")


def full_record(*identifiers) -> PatientRecord:
    return PatientRecord(
        identifiers=list(identifiers), family_name="Garcia", given_name="Maria", birth_date=date(1980, 5, 17),
        sex="F", language="es", email="maria@example.org", phones=[{"use": "home", "number": "555-0100"}],
        address={"street": "1 Main St", "city": "Springfield"}, needs_interpreter=True, mobility="A1",
        other_needs="hearing loop", preferred_provider_gender="F", preferred_weekdays=[1, 3],
        preferred_earliest=time(9), preferred_latest=time(12), preferred_channel="sms", confidential=True,
    )


def identifiers_of(sch, patient_id):
    with sch.sessions() as s:
        return sorted((i.authority, i.type_code, i.value) for i in
                      s.scalars(select(PatientIdentifier).where(PatientIdentifier.patient_id == patient_id)))


def patient(sch, patient_id) -> Patient:
    with sch.sessions() as s:
        return s.get(Patient, patient_id)


def test_register_is_an_upsert_by_any_identifier(sch):
    created = sch.register_patient(full_record(MRN, SSN), STAFF)
    assert identifiers_of(sch, created.id) == sorted([("HOSP", "MR", "12345"), ("SSA", "SS", "123-45-6789")])
    assert sorted(i.value for i in created.identifiers) == sorted(["12345", "123-45-6789"])  # the returned object is whole
    # known by the SSN only, with a payer's member id added: the same patient, one more identifier
    again = sch.register_patient(PatientRecord(identifiers=[SSN, PAYER_ID]), STAFF)
    assert again.id == created.id
    assert identifiers_of(sch, created.id) == sorted([("AETNA", "MB", "AET-998877"), ("HOSP", "MR", "12345"),
                                                      ("SSA", "SS", "123-45-6789")])
    assert count(sch, Patient) == 1
    # the same value under another authority or type is somebody else
    other = sch.register_patient(PatientRecord(identifiers=[Identifier("12345", "CLINIC2", "MR")]), STAFF)
    assert other.id != created.id
    other_type = sch.register_patient(PatientRecord(identifiers=[Identifier("12345", "HOSP", "PI")]), STAFF)
    assert other_type.id not in (created.id, other.id)
    assert sch.find_patient([Identifier("12345", "HOSP", "MR")]).id == created.id
    assert sch.find_patient([Identifier("nope", "HOSP", "MR")]) is None
    actions = [e.action for e in audit(sch, entity="patient", entity_id=created.id)]
    assert actions == ["patient_registered", "patient_updated"]


def test_a_sparse_update_does_not_erase_what_it_does_not_say(sch):
    created = sch.register_patient(full_record(MRN), STAFF)
    before = patient(sch, created.id)
    sch.register_patient(PatientRecord(identifiers=[MRN], email="new@example.org"), STAFF)
    after = patient(sch, created.id)
    for name in ("family_name", "given_name", "birth_date", "sex", "language", "phones", "address",
                 "needs_interpreter", "mobility", "other_needs", "preferred_provider_gender", "preferred_weekdays",
                 "preferred_earliest", "preferred_latest", "preferred_channel", "confidential"):
        assert getattr(after, name) == getattr(before, name), name
    assert after.email == "new@example.org"
    # a value that is said, even empty or false, is applied
    sch.register_patient(PatientRecord(identifiers=[MRN], other_needs="", confidential=False), STAFF)
    assert (patient(sch, created.id).other_needs, patient(sch, created.id).confidential) == ("", False)


def test_coverage_is_upserted_by_payer_and_member(sch, clock):
    p = sch.register_patient(full_record(MRN), STAFF)
    first = sch.record_coverage(p.id, CoverageRecord("AETNA", "M1", payer_name="Aetna", plan_id="PPO",
                                                     effective_date=date(2026, 1, 1)), STAFF)
    verified_at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    again = sch.record_coverage(p.id, CoverageRecord("AETNA", "M1", payer_name="Aetna", plan_id="PPO",
                                                     effective_date=date(2026, 1, 1), expiry_date=date(2026, 12, 31),
                                                     verification_status="verified", verified_at=verified_at), STAFF)
    assert again.id == first.id
    second = sch.record_coverage(p.id, CoverageRecord("MEDICARE", "1EG4", priority=2), STAFF)
    with sch.sessions() as s:
        rows = list(s.scalars(select(Coverage).where(Coverage.patient_id == p.id).order_by(Coverage.priority)))
    assert [(c.id, c.payer_id, c.verification_status) for c in rows] == [
        (first.id, "AETNA", "verified"), (second.id, "MEDICARE", "unverified")]
    assert rows[0].verified_at == verified_at and rows[0].expiry_date == date(2026, 12, 31)
    assert rows[0].active_on(date(2026, 6, 1)) and not rows[0].active_on(date(2027, 1, 1))
    assert [e.action for e in audit(sch, entity="coverage")] == ["coverage_recorded"] * 3


def test_merge_repoints_everything_and_old_identifiers_find_the_survivor(sch, recorder):
    survivor = sch.register_patient(full_record(MRN), STAFF)
    dup_ids = [Identifier("99999", "HOSP", "MR"), Identifier("555-55-5555", "SSA", "SS")]
    duplicate = sch.register_patient(PatientRecord(identifiers=dup_ids, family_name="Garcia"), STAFF)
    sch.record_coverage(survivor.id, CoverageRecord("AETNA", "M1", verification_status="verified"), STAFF)
    sch.record_coverage(duplicate.id, CoverageRecord("AETNA", "M1"), STAFF)  # the same policy, twice registered
    sch.record_coverage(duplicate.id, CoverageRecord("MEDICAID", "MC-7"), STAFF)
    mine = book(sch, survivor.id, slot_at(sch, "DRSMITH", local(TUESDAY, "09:00")).id)
    theirs = book(sch, duplicate.id, slot_at(sch, "DRSMITH", local(TUESDAY, "10:00")).id)
    overlapping = book(sch, duplicate.id, slot_at(sch, "DRJONES", local(TUESDAY, "09:00")).id)  # 09:00-09:30!
    entry = sch.add_to_waitlist(patient_id=duplicate.id, appointment_type="new_patient", duration_minutes=15,
                                actor=STAFF)

    merged = sch.merge_patients(survivor.id, duplicate.id, STAFF, "A40 from registration")
    assert merged.id == survivor.id
    assert identifiers_of(sch, survivor.id) == sorted(
        [("HOSP", "MR", "12345"), ("HOSP", "MR", "99999"), ("SSA", "SS", "555-55-5555")])
    assert identifiers_of(sch, duplicate.id) == []
    for ident in dup_ids:
        assert sch.find_patient([ident]).id == survivor.id
    # registering by an old identifier updates the survivor, never resurrects the duplicate
    assert sch.register_patient(PatientRecord(identifiers=[dup_ids[0]], email="x@example.org"), STAFF).id \
        == survivor.id
    assert patient(sch, duplicate.id).merged_into_id == survivor.id

    with sch.sessions() as s:
        payers = sorted((c.payer_id, c.verification_status)
                        for c in s.scalars(select(Coverage).where(Coverage.patient_id == survivor.id)))
        waitlist_owner = s.get(WaitlistEntry, entry.id).patient_id
    assert payers == [("AETNA", "verified"), ("MEDICAID", "unverified")]
    assert waitlist_owner == survivor.id
    for a in (mine, theirs, overlapping):
        assert sch.appointment(a.id).patient_id == survivor.id
    held = {r[3] for r in reservations(sch, subject=f"patient:{survivor.id}")}
    assert held == {mine.id, theirs.id, overlapping.id}
    assert reservations(sch, subject=f"patient:{duplicate.id}") == []
    # the merge revealed an overlap: flagged, not refused
    assert "overlaps" in sch.appointment(overlapping.id).conflict
    assert sch.appointment(theirs.id).conflict == ""
    change = recorder.last("patients_merged")
    assert change.detail["survivor_id"] == survivor.id and change.detail["merged_id"] == duplicate.id
    assert sorted(change.detail["appointments"]) == sorted([theirs.id, overlapping.id])
    # the survivor now holds the duplicate's time
    with pytest.raises(PatientConflict):
        book(sch, survivor.id, slot_at(sch, "DRJONES", local(TUESDAY, "10:00")).id)  # theirs is 10:00
    # and booking under the retired record books the survivor
    later = book(sch, duplicate.id, slot_at(sch, "DRSMITH", local(TUESDAY, "11:00")).id)
    assert later.patient_id == survivor.id


def test_a_patient_rolled_back_with_its_savepoint_leaves_the_session(sch):
    """SQLite gives a rolled-back row's id to the next row: the next patient must not meet
    the first one still in the session under that id."""
    with sch.sessions() as session, session.begin():
        view = sch.within(session)
        with pytest.raises(RuntimeError), session.begin_nested():
            gone = view.register_patient(PatientRecord(identifiers=[MRN], family_name="Gone"), STAFF)
            raise RuntimeError("the message failed")
        assert gone not in session
        kept = view.register_patient(PatientRecord(identifiers=[SSN], family_name="Kept"), STAFF)
        assert session.get(Patient, kept.id) is kept and kept.family_name == "Kept"
    assert sch.find_patient([MRN]) is None and sch.find_patient([SSN]).family_name == "Kept"
