"""hl7.mapping against the real engine on SQLite: the corpus, scenarios, properties.

Messages are applied the way ``hl7.processor`` applies them: the scheduler is
bound to one session transaction (``Scheduler.within``), which commits when
the message applied and rolls back when it raised.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from engine.db import Base
from engine.models import (
    Appointment,
    AppointmentResource,
    AuditEntry,
    Coverage,
    Location,
    Patient,
    PatientIdentifier,
    Provider,
    Reservation,
    Resource,
    Slot,
    TimeBlock,
)
from engine.requests import Identifier
from hl7.hl7time import format_dtm
from hl7.mapping import (
    CLINIC_LANGUAGE,
    ApplyResult,
    MappingError,
    apply_message,
    is_supported,
    look_ahead,
)
from hl7.message import Message, escape, parse, split_messages
from tests.conftest import CORPUS
from tests.engine.helpers import statements

UTC = timezone.utc


# --- helpers ---------------------------------------------------------------------------------------


def corpus_message(corpus_dir: Path, stem: str) -> Message:
    messages = split_messages((corpus_dir / f"{stem}.hl7").read_bytes())
    assert len(messages) == 1, stem
    return parse(messages[0])


def er7(*segments: str) -> Message:
    return parse("\r".join(segments).encode())


def apply(scheduler, message: Message, *, message_id: int = 1, mode: str = "mirror") -> ApplyResult:
    """Like the processor: one transaction per message, rolled back on error."""
    with scheduler.sessions() as session:
        with session.begin():
            view = scheduler.within(session)
            result = apply_message(view, message, mode=mode, message_id=message_id)
        view.notify_committed()
    return result


def failure(scheduler, message: Message, **kwargs) -> MappingError:
    with pytest.raises(MappingError) as info:
        apply(scheduler, message, **kwargs)
    assert info.value.errors
    return info.value


def location_of(detail) -> str:
    text = f"{detail.segment}^{detail.sequence}"
    if detail.field:
        text += f"^{detail.field}"
        if detail.component:
            text += f"^{detail.component}"
    return text


def codes(details) -> list[str]:
    return [f"{d.code} {location_of(d)}" for d in details]


def appointment(scheduler, *, placer: Optional[str] = None, filler: Optional[str] = None) -> dict[str, Any]:
    """The appointment with everything it points to, by code (not by our ids)."""
    with scheduler.sessions() as session:
        appt = session.scalars(select(Appointment).where(
            (Appointment.placer_id == placer) if placer else (Appointment.filler_id == filler))).one()
        provider = session.get(Provider, appt.provider_id) if appt.provider_id else None
        location = session.get(Location, appt.location_id) if appt.location_id else None
        resources = sorted(session.scalars(select(Resource.code).join(
            AppointmentResource, AppointmentResource.resource_id == Resource.id)
            .where(AppointmentResource.appointment_id == appt.id)))
        identifiers = sorted(session.execute(select(PatientIdentifier.value, PatientIdentifier.authority,
                                                    PatientIdentifier.type_code)
                                             .where(PatientIdentifier.patient_id == appt.patient_id)).all())
        reservations = session.scalar(select(func.count()).select_from(Reservation)
                                      .where(Reservation.appointment_id == appt.id))
        audit = [a for a in session.scalars(select(AuditEntry.action).where(
            AuditEntry.entity == "appointment", AuditEntry.entity_id == appt.id).order_by(AuditEntry.id))]
        return {
            "id": appt.id, "status": appt.status, "start": appt.start, "end": appt.end,
            "type": appt.appointment_type, "urgency": appt.urgency, "reason": appt.reason, "notes": appt.notes,
            "provider": (provider.code, provider.family_name, provider.given_name) if provider else None,
            "location": (location.code, location.timezone) if location else None,
            "resources": resources, "patient_id": appt.patient_id, "identifiers": identifiers,
            "reservations": reservations, "audit": audit, "conflict": appt.conflict,
        }


def patient_by(scheduler, value: str, authority: str = "", type_code: str = "") -> Optional[Patient]:
    return scheduler.find_patient([Identifier(value, authority, type_code)])


def database_state(scheduler) -> dict[str, list]:
    """Every row of every table, for "nothing changed" comparisons."""
    with scheduler.sessions() as session:
        return {table.name: sorted(map(tuple, session.execute(select(table)).all()), key=repr)
                for table in Base.metadata.sorted_tables}


MSH = "MSH|^~\\&|EHR|CLINIC|SLOT|SLOT|20260301120000||{type}|{control}|P|2.5.1"


def segment(name: str, fields: dict[int, str]) -> str:
    """An ER7 segment from {position: value}."""
    last = max(fields, default=0)
    return "|".join([name] + [fields.get(i, "") for i in range(1, last + 1)])


def siu(event: str, *, placer: str = "P-1", filler: str = "F-1", start: str = "202603031000",
        end: str = "", duration: str = "20", units: str = "MIN", status: str = "Booked", reason: str = "ROUTINE",
        extra: tuple[str, ...] = (), pid: str = "PID|1||MRN-1^^^HOSP^MR||Doe^Jane||19800101|F",
        aip: str = "AIP|1||DRSMITH^Smith^Ann|D", control: str = "C1", tq1: bool = False) -> Message:
    """A SIU: times in TQ1-7/8 (``tq1``) or SCH-11.4/5, duration in SCH-9/10."""
    sch = {1: placer, 2: filler, 7: reason, 9: duration, 10: units, 25: status}
    segments = [MSH.format(type=f"SIU^{event}^SIU_S12", control=control)]
    if not tq1:
        sch[11] = f"^^{duration}^{start}^{end}"
    segments.append(segment("SCH", sch))
    if tq1:
        segments.append(segment("TQ1", {7: start, 8: end}))
    if pid:
        segments.append(pid)
    segments.append("RGS|1|A")
    segments.extend(extra)
    if aip:
        segments.append(aip)
    return er7(*segments)


def adt(event: str, pid: str, *more: str, evn_time: str = "202603031000", control: str = "A1") -> Message:
    return er7(MSH.format(type=f"ADT^{event}^ADT_A01", control=control), f"EVN|{event}|{evn_time}", pid, *more)


# --- every corpus file --------------------------------------------------------------------------------

#: Outcome per corpus file, each applied on its own to a fresh schedule:
#: (status, [warning or error "code SEG^seq^field^component"]).
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "bugs5382__ADT_A01__1": ("error", ("100 PID^1",)),  # BHS batch: MSH + two EVN, no PID
    "bugs5382__ADT_A03__1": ("applied", ()),
    "bugs5382__ADT_A08__1": ("applied", ()),
    "bugs5382__SIU_S12__1": ("applied", ()),
    "dcm4che__ADT_A31__1": ("applied", ()),
    "dcm4che__ADT_A31__2": ("applied", ()),
    "dcm4che__ADT_A40__1": ("applied", ("204 MRG^1^1",)),  # merged patient unknown: a warning
    "dcm4che__ADT_A47__1": ("skipped", ()),
    "dcm4che__SIU_S12__1": ("error", ("100 SCH^1",)),
    "efferent__ADT_O01__1": ("skipped", ()),
    "elixirhl7__ADT_A01__1": ("applied", ()),
    "elixirhl7__ADT_A03__1": ("applied", ()),
    "hapi__ADT_A03__1": ("applied", ()),
    "hapi__ADT_A24__1": ("applied", ()),
    "hl7v2ig__ADT_A01__1": ("applied", ()),
    "hl7v2ig__ADT_A02__1": ("skipped", ()),
    "hl7v2ig__ADT_A02__2": ("skipped", ()),
    "hl7v2ig__ADT_A03__1": ("applied", ()),
    "hl7v2ig__ADT_A04__1": ("applied", ("101 IN1^2^3",)),  # IN1|2|""|"" has no payer
    "hl7v2ig__ADT_A04__2": ("applied", ("103 PID^1^8",)),  # sex "S" (a spayed dog)
    "hl7v2ig__ADT_A04__3": ("applied", ()),
    "hl7v2ig__ADT_A05__1": ("applied", ("101 IN1^2^3",)),
    "hl7v2ig__ADT_A06__1": ("skipped", ()),
    "hl7v2ig__ADT_A08__1": ("error", ("100 PID^1",)),  # MSH only
    "hl7v2ig__ADT_A12__1": ("skipped", ()),
    "hl7v2ig__SIU_S13__1": ("applied", ("102 AIP^1^2", "102 AIL^1^2")),  # AIx-2 skipped by the sender
    "hl7v2ig__SRM_S01__1": ("skipped", ()),
    "hl7v2ig__SRM_S01__2": ("skipped", ()),
    "hl7v2ig__SRR_S01__1": ("skipped", ()),
    "hl7v2ig__SRR_S01__2": ("skipped", ()),
    "hl7v2tofhir__ADT_A01__1": ("applied", ()),
    "hl7v2tofhir__SIU_S12__1": ("applied", ("102 SCH^1^11^5",)),  # TQ end a year later: duration decides
    "ipf__ADT_A01__1": ("error", ("100 PID^1",)),
    "ipf__ADT_A01__2": ("applied", ()),
    "ipf__ADT_A01__3": ("applied", ()),
    "ipf__ADT_A01__4": ("applied", ()),
    "ipf__ADT_A01__5": ("applied", ()),
    "ipf__ADT_A01__6": ("applied", ()),
    "ipf__ADT_A04__1": ("applied", ()),
    "ipf__ADT_A08__1": ("applied", ()),
    "ipf__ADT_A08__2": ("applied", ()),
    "ipf__ADT_A31__1": ("applied", ()),
    "ipf__ADT_A31__2": ("applied", ()),
    "ipf__ADT_A40__1": ("applied", ("204 MRG^1^1",)),
    "ipf__ADT_A40__2": ("applied", ("204 MRG^1^1",)),
    "ipf__ADT_A40__3": ("applied", ("204 MRG^1^1",)),
    "lfh__ADT_A01__1": ("applied", ()),
    "lfh__ADT_A01__2": ("applied", ()),
    "lfh__ADT_A01__3": ("applied", ()),
    "msfhirconv__ADT_A01__1": ("applied", ()),
    "msfhirconv__ADT_A01__2": ("applied", ()),
    "msfhirconv__ADT_A01__3": ("applied", ()),
    "msfhirconv__ADT_A01__4": ("applied", ()),
    "msfhirconv__ADT_A03__1": ("applied", ()),
    "msfhirconv__ADT_A03__2": ("applied", ()),
    "msfhirconv__ADT_A04__1": ("applied", ()),
    "msfhirconv__ADT_A04__2": ("applied", ()),
    "msfhirconv__ADT_A04__3": ("applied", ()),
    "msfhirconv__ADT_A04__4": ("applied", ()),
    "msfhirconv__ADT_A04__5": ("applied", ()),
    "msfhirconv__ADT_A05__1": ("applied", ()),
    "msfhirconv__ADT_A08__1": ("applied", ()),
    "msfhirconv__ADT_A08__2": ("applied", ()),
    "msfhirconv__ADT_A11__1": ("applied", ()),
    "msfhirconv__ADT_A11__2": ("applied", ()),
    "msfhirconv__ADT_A13__1": ("applied", ()),
    "msfhirconv__ADT_A28__1": ("applied", ()),
    "msfhirconv__ADT_A28__2": ("applied", ()),
    "msfhirconv__ADT_A31__1": ("applied", ()),
    "msfhirconv__ADT_A31__2": ("applied", ()),
    "msfhirconv__ADT_A40__1": ("applied", ("204 MRG^1^1",)),
    "msfhirconv__ADT_A40__2": ("applied", ("204 MRG^1^1", "204 MRG^2^1")),
    "msfhirconv__SIU_S12__1": ("applied", ()),
    "msfhirconv__SIU_S12__2": ("applied", ()),
    "msfhirconv__SIU_S12__3": ("applied", ("102 TQ1^1^8",)),  # TQ1 spans four days: SCH-9 decides
    "msfhirconv__SIU_S13__1": ("applied", ()),
    "msfhirconv__SIU_S13__2": ("applied", ()),
    "msfhirconv__SIU_S14__1": ("applied", ()),
    "msfhirconv__SIU_S14__2": ("applied", ()),
    "msfhirconv__SIU_S15__1": ("applied", ()),
    "msfhirconv__SIU_S15__2": ("applied", ()),
    "msfhirconv__SIU_S16__1": ("applied", ()),
    "msfhirconv__SIU_S16__2": ("applied", ()),
    "msfhirconv__SIU_S17__1": ("applied", ()),
    "msfhirconv__SIU_S17__2": ("applied", ()),
    "msfhirconv__SIU_S26__1": ("applied", ()),
    "msfhirconv__SIU_S26__2": ("applied", ()),
    "nodehl7c__ADT_A01__1": ("applied", ()),
    "nodehl7c__SIU_S12__1": ("error", ("100 SCH^1",)),
    "nodehl7c__SIU_S14__1": ("applied", ()),
    "oazis__ADT_A25__1": ("skipped", ()),
    "oazis__ADT_A28__1": ("applied", ()),
    "renalware__ADT_A01__1": ("applied", ("103 PID^1^8",)),  # NHS sex code "2"
    "renalware__ADT_A02__1": ("skipped", ()),
    "renalware__ADT_A03__1": ("applied", ("103 PID^1^8",)),
    "renalware__ADT_A04__1": ("applied", ("103 PID^1^8",)),
    "renalware__ADT_A05__1": ("applied", ()),
    "renalware__ADT_A05__10": ("applied", ()),
    "renalware__ADT_A05__11": ("applied", ()),
    "renalware__ADT_A05__12": ("applied", ()),
    "renalware__ADT_A05__2": ("applied", ()),
    "renalware__ADT_A05__3": ("applied", ()),
    "renalware__ADT_A05__4": ("applied", ()),
    "renalware__ADT_A05__5": ("applied", ()),
    "renalware__ADT_A05__6": ("applied", ()),
    "renalware__ADT_A05__7": ("applied", ()),
    "renalware__ADT_A05__8": ("applied", ()),
    "renalware__ADT_A05__9": ("applied", ()),
    "renalware__ADT_A08__1": ("applied", ("103 PID^1^8",)),
    "renalware__ADT_A28__1": ("applied", ()),
    "renalware__ADT_A38__1": ("skipped", ()),
    "renalware__ADT_A38__2": ("skipped", ()),
    "renalware__ADT_A38__3": ("skipped", ()),
    "renalware__ADT_A38__4": ("skipped", ()),
    "renalware__ADT_A38__5": ("skipped", ()),
    "renalware__ADT_A38__6": ("skipped", ()),
    "renalware__SIU_S12__1": ("applied", ("103 PID^1^8",)),
    "renalware__SIU_S13__1": ("applied", ("103 PID^1^8",)),
    "renalware__SIU_S14__1": ("applied", ("103 PID^1^8",)),
    "renalware__SIU_S15__1": ("applied", ("103 PID^1^8",)),
    "rethink__ADT_A01__1": ("applied", ()),
    "rethink__ADT_A01__2": ("applied", ("102 IN1^1^12^1",)),  # IN1 fields shifted by the sender
    "rethink__ADT_A01__3": ("applied", ()),
    "rethink__ADT_A01__4": ("applied", ()),
    "rethink__ADT_A01__5": ("error", ("101 PID^1^3",)),  # PID without any identifier
    "rethink__ADT_A01__6": ("applied", ()),
    "rethink__ADT_A01__7": ("applied", ()),
    "rethink__ADT_A01__8": ("applied", ()),
    "rethink__ADT_A01__9": ("applied", ()),
    "rethink__SIU_S12__1": ("applied", ()),
}

CORPUS_FILES = sorted(p.stem for p in CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


def test_corpus_is_there(corpus_dir):
    present = {p.stem for p in corpus_dir.glob("*.hl7")}
    assert present, f"no .hl7 files in {corpus_dir}"


def test_every_corpus_file(slotengine_scheduler, corpus_dir):
    """Each corpus file on its own (its own rolled-back transaction on one
    schedule): the outcome, and the warnings or errors with their locations.
    Files this table does not know (another corpus) must at least never raise
    anything but MappingError."""
    unexpected = {}
    for stem in sorted(p.stem for p in corpus_dir.glob("*.hl7")):
        for raw in split_messages((corpus_dir / f"{stem}.hl7").read_bytes()):
            message = parse(raw)
            with slotengine_scheduler.sessions() as session:
                session.begin()
                try:
                    result = apply_message(slotengine_scheduler.within(session), message, mode="mirror",
                                           message_id=1)
                    outcome = (result.status, tuple(codes(result.warnings)))
                    assert result.response is None
                    assert all(w.severity == "W" for w in result.warnings)
                except MappingError as exc:
                    outcome = ("error", tuple(codes(exc.errors)))
                    assert all(e.severity == "E" for e in exc.errors)
                finally:
                    session.rollback()
            if stem in EXPECTED and outcome != EXPECTED[stem]:
                unexpected[stem] = outcome
    assert unexpected == {}


def outcome_of(scheduler, message: Message, *, looked_ahead: bool) -> tuple:
    """Status and warnings, or the errors, of one message applied in a rolled-back transaction."""
    with scheduler.sessions() as session:
        session.begin()
        try:
            view = scheduler.within(session)
            if looked_ahead:
                look_ahead(view, [message])
            result = apply_message(view, message, mode="mirror", message_id=1)
            return result.status, result.warnings
        except MappingError as exc:
            return "error", exc.errors
        finally:
            session.rollback()


def test_looking_ahead_changes_no_outcome(slotengine_scheduler, corpus_dir):
    """Applying reuses the identifiers and appointment ids ``look_ahead`` read: every
    outcome, warning and error is the one of a message applied without it, also when
    look_ahead could not read them (a PID-3 id too long to keep)."""
    raws = [raw for path in sorted(corpus_dir.glob("*.hl7")) for raw in split_messages(path.read_bytes())]
    raws.append("\r".join((MSH.format(type="ADT^A08^ADT_A01", control="L1"), "EVN|A08",
                           f"PID|1||{'9' * 101}^^^HOSP^MR~S-1^^^SSA^SS||Long^Id")).encode())
    for raw in raws:
        assert outcome_of(slotengine_scheduler, parse(raw), looked_ahead=True) == \
            outcome_of(slotengine_scheduler, parse(raw), looked_ahead=False), raw[:60]
    assert codes(outcome_of(slotengine_scheduler, parse(raws[-1]), looked_ahead=True)[1]) == ["104 PID^1^3"]


# --- msfhirconv: one appointment through S12 … S26 --------------------------------------------------


def test_msfhirconv_series_moves_one_appointment_through_its_states(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    message = lambda event: corpus_message(corpus_dir, f"msfhirconv__SIU_{event}__1")  # noqa: E731

    assert apply(s, message("S12"), message_id=12).status == "applied"
    booked = appointment(s, filler="36996")
    assert booked["status"] == "booked"
    assert (booked["start"], booked["end"]) == (datetime(2021, 9, 24, 7, 15, tzinfo=UTC),  # 09:30+02:15
                                                datetime(2021, 9, 24, 8, 5, tzinfo=UTC))
    assert booked["provider"] == ("1210", "GE", "Robert")
    assert booked["location"] == ("055", "America/New_York")  # created on the fly, clinic time zone
    assert booked["resources"] == ["055^Room01", "5001"]
    assert (booked["type"], booked["urgency"]) == ("procedure", "urgent")  # SNOMED "(procedure)" + EMERGENCY
    assert booked["reason"] == "EMERGENCY; Biopsy of colon (procedure)"
    assert "Appointment booked for emergency procedure" in booked["notes"]
    assert ("PATID1234", "test1", "MR") in booked["identifiers"]
    assert ("123456789", "USSSA", "SS") in booked["identifiers"]
    assert booked["reservations"] > 0
    with s.sessions() as session:
        patient = session.get(Patient, booked["patient_id"])
        assert (patient.family_name, patient.given_name, patient.birth_date) == ("EVERYMAN", "ADAM", date(1988, 8, 18))
        assert (patient.language, patient.needs_interpreter) == ("ar", True)

    apply(s, message("S13"), message_id=13)
    assert appointment(s, filler="36996")["status"] == "booked"

    apply(s, message("S14"), message_id=14)
    modified = appointment(s, filler="36996")
    assert modified["status"] == "booked"
    assert modified["resources"] == ["055^Room02", "5001"]  # the room changed

    apply(s, message("S15"), message_id=15)
    cancelled = appointment(s, filler="36996")
    assert (cancelled["status"], cancelled["reservations"]) == ("cancelled", 0)

    error = failure(s, message("S16"), message_id=16)  # cancelled → discontinued: not a transition
    assert codes(error.errors) == ["207 MSH^1^9"]
    assert appointment(s, filler="36996")["status"] == "cancelled"

    apply(s, message("S17"), message_id=17)
    assert appointment(s, filler="36996")["status"] == "deleted"

    error = failure(s, message("S26"), message_id=26)  # deleted is final
    assert codes(error.errors) == ["207 MSH^1^9"]

    final = appointment(s, filler="36996")
    assert final["status"] == "deleted"
    assert final["audit"] == ["booked", "modified", "modified", "cancelled", "deleted"]
    assert final["id"] == booked["id"]


def test_msfhirconv_no_show_and_discontinue(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S12__1"))
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S14__1"), message_id=2)
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S26__1"), message_id=3)
    no_show = appointment(s, filler="36996")
    assert (no_show["status"], no_show["reservations"]) == ("no_show", 0)


def test_msfhirconv_discontinue_from_booked(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S12__2"))
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S16__2"), message_id=2)
    stopped = appointment(s, filler="36996")
    assert stopped["status"] == "discontinued"
    # three resource groups: one provider (the first AIP), the rooms of every AIL and every AIG
    assert stopped["provider"] == ("400", "PB", "Tim")
    assert stopped["resources"] == ["1001", "123", "DiagnosticUnit201^Imaging Room 01", "LabUnit101^Lab Room 01",
                                    "OPD12^Room 55"]
    assert (stopped["start"], stopped["end"]) == (datetime(2021, 8, 18, 9, 15, tzinfo=UTC),
                                                  datetime(2021, 8, 18, 10, 15, tzinfo=UTC))
    assert "Discontinued (SCH-6): Add" in stopped["notes"]


# --- renalware: S12 → S15 ---------------------------------------------------------------------------


def test_renalware_s12_to_s15(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    for n, trigger in enumerate(("S12", "S13", "S14", "S15"), 1):
        result = apply(s, corpus_message(corpus_dir, f"renalware__SIU_{trigger}__1"), message_id=n)
        assert result.status == "applied"
        assert codes(result.warnings) == ["103 PID^1^8"]  # PID-8 "2" is an NHS code, not table 0001

    new = appointment(s, placer="149549015")
    assert new["status"] == "booked"
    assert (new["start"], new["end"]) == (datetime(2024, 11, 6, 17, 0, tzinfo=UTC),  # naive 12:00, New York
                                          datetime(2024, 11, 6, 17, 30, tzinfo=UTC))
    assert new["location"] == ("RNJ Renal OPD", "America/New_York")
    assert new["resources"] == ["Baxter, Stanley"]
    assert new["identifiers"] == [("10769857", "RNJ 5C4 MRN", "MRN")]
    assert (new["type"], new["reason"]) == ("general", "Nephrology New")

    moved = appointment(s, placer="149549023")  # S13 booked it, S14 repeated it: one change, one no-op
    assert moved["status"] == "booked"
    assert moved["audit"] == ["booked"]
    assert moved["start"] == datetime(2024, 11, 6, 16, 30, tzinfo=UTC)

    cancelled = appointment(s, placer="149549027")  # cancelled before we ever saw it booked
    assert (cancelled["status"], cancelled["reservations"]) == ("cancelled", 0)
    assert cancelled["notes"] == "Cancelled (SCH-6): 6080524"
    assert cancelled["identifiers"] == [("10769859", "Dover", "MRN")]
    with s.sessions() as session:
        patient = session.get(Patient, cancelled["patient_id"])
        assert patient.email == "testemail@test.co"
        assert patient.phones == [{"number": "07898989898", "use": "MOBILE"}, {"number": "0209999998", "use": "HOME"}]
        assert patient.sex == "U"


# --- other SIU senders -------------------------------------------------------------------------------


def test_hl7v2tofhir_siu(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    result = apply(s, corpus_message(corpus_dir, "hl7v2tofhir__SIU_S12__1"))
    assert codes(result.warnings) == ["102 SCH^1^11^5"]
    appt = appointment(s, placer="1209")
    assert appt["status"] == "booked"
    # SCH-11.4 naive 14:00 at a new location (clinic zone, EDT); SCH-9/10 15 min, not the series end
    assert (appt["start"], appt["end"]) == (datetime(2015, 6, 13, 18, 0, tzinfo=UTC),
                                            datetime(2015, 6, 13, 18, 15, tzinfo=UTC))
    assert appt["provider"] == ("JPULLEN1", "Pullen", "Jeri")
    assert appt["location"] == ("MainOffi", "America/New_York")
    assert appt["resources"] == ["PULLEN"]
    assert (appt["type"], appt["urgency"], appt["reason"]) == ("general", "routine", "OFFICE VISIT-15")
    assert appt["identifiers"] == [("1032702", "V2FHIR", "MR"), ("N09204074", "WADMV", "DL")]
    with s.sessions() as session:
        assert session.scalar(select(Appointment.filler_id).where(Appointment.id == appt["id"])) == "13030"
        patient = session.get(Patient, appt["patient_id"])
        assert (patient.family_name, patient.given_name, patient.sex) == ("Everywoman", "Eve", "F")
        assert patient.birth_date == date(1970, 6, 1)
        assert (patient.language, patient.needs_interpreter) == ("en", False)
        assert patient.email == "eve@test.test"
        assert patient.phones == [{"number": "+1 555 555-8473", "use": "PRN", "type": "PH"},
                                  {"number": "+1 555 555-1126 x12", "use": "WPN", "type": "PH"}]
        assert patient.address == {"street": "1000 House Lane", "line2": "Appt 123", "city": "Ann Arbor",
                                   "state": "MI", "zip": "99999", "country": "USA"}
        resource = session.scalars(select(Resource).where(Resource.code == "PULLEN")).one()
        assert resource.kind == "person"


def test_dcm4che_siu_without_sch(slotengine_scheduler, corpus_dir):
    error = failure(slotengine_scheduler, corpus_message(corpus_dir, "dcm4che__SIU_S12__1"))
    assert codes(error.errors) == ["100 SCH^1"]
    with slotengine_scheduler.sessions() as session:  # the PID was not registered either
        assert session.scalar(select(func.count()).select_from(Patient)) == 0


def test_hl7v2ig_s13_with_shifted_ai_fields(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "hl7v2ig__SIU_S13__1"))
    appt = appointment(s, placer="2007047^SCH001")  # EI id plus namespace
    assert appt["provider"] == ("032", "Pump", "Patrick")
    assert appt["location"][0] == "103"
    assert (appt["start"], appt["end"]) == (datetime(2007, 1, 9, 18, 0, tzinfo=UTC),
                                            datetime(2007, 1, 9, 18, 30, tzinfo=UTC))
    assert appt["reason"] == "Referral"


def test_old_sender_with_time_in_sch11_and_status_arrived(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "nodehl7c__SIU_S14__1"))  # S14 before any S12: created as told
    appt = appointment(s, placer="00331839401")
    assert appt["status"] == "arrived"
    assert (appt["start"], appt["end"]) == (datetime(2008, 3, 6, 15, 0, tzinfo=UTC),
                                            datetime(2008, 3, 6, 15, 20, tzinfo=UTC))
    assert appt["provider"] == ("PBN", "LISAPORTER", "")
    assert appt["reason"] == "HEALTHCHECK ANY AGE"


def test_unbound_scheduler_works_too(slotengine_scheduler, corpus_dir):
    result = apply_message(slotengine_scheduler, corpus_message(corpus_dir, "rethink__SIU_S12__1"),
                           mode="mirror", message_id=7)
    assert result.status == "applied"
    appt = appointment(slotengine_scheduler, placer="APT001")
    assert appt["location"] == ("CARDIO", "America/New_York")  # PV1-3 when there is no AIL
    assert appt["resources"] == ["4567", "CARDIO^410^A"]
    assert appt["start"] == datetime(2026, 3, 25, 18, 0, tzinfo=UTC)


def test_actor_and_source_on_every_change(slotengine_scheduler):
    apply(slotengine_scheduler, siu("S12"), message_id=42)
    with slotengine_scheduler.sessions() as session:
        entries = session.execute(select(AuditEntry.actor, AuditEntry.source)).all()
    assert entries and set(entries) == {("message:EHR^CLINIC", "inbound:42")}


# --- idempotency and arrival order ---------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["msfhirconv__SIU_S12__1", "msfhirconv__SIU_S12__2", "renalware__SIU_S15__1",
                                  "msfhirconv__ADT_A01__1", "nodehl7c__ADT_A01__1", "hapi__ADT_A24__1"])
def test_applying_twice_changes_nothing(slotengine_scheduler, corpus_dir, stem):
    s = slotengine_scheduler
    message = corpus_message(corpus_dir, stem)
    apply(s, message, message_id=1)
    before = database_state(s)
    second = apply(s, message, message_id=2)
    assert second.status == "applied"
    assert database_state(s) == before  # not even an audit entry


def test_merge_twice_changes_nothing(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, adt("A28", "PID|1||56789^^^BCBS^MR||Old^Name"))
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A40__1"), message_id=2)
    before = database_state(s)
    result = apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A40__1"), message_id=3)
    assert result.warnings == []
    assert database_state(s) == before


def test_modification_before_booking(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S14__1"), message_id=1)
    first = appointment(s, filler="36996")
    assert first["status"] == "booked"
    assert first["resources"] == ["055^Room02", "5001"]
    late = apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S12__1"), message_id=2)
    assert codes(late.warnings) == ["205 SCH^1^2"]  # a late booking notice: does not undo the S14
    after = appointment(s, filler="36996")
    assert after["resources"] == ["055^Room02", "5001"]
    assert after["audit"] == ["booked"]


def test_cancellation_before_booking_is_not_lost(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S15__1"), message_id=1)
    apply(s, corpus_message(corpus_dir, "msfhirconv__SIU_S12__1"), message_id=2)
    appt = appointment(s, filler="36996")
    assert (appt["status"], appt["reservations"]) == ("cancelled", 0)
    assert (appt["start"], appt["provider"][0]) == (datetime(2021, 9, 24, 7, 15, tzinfo=UTC), "1210")


def test_late_booking_does_not_reinstate_a_cancellation(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S15", aip=""), message_id=1)  # cancelled, provider unknown
    result = apply(s, siu("S12", start="202603030900"), message_id=2)  # names the provider, another time
    assert codes(result.warnings) == ["205 SCH^1^2"]
    appt = appointment(s, placer="P-1")
    assert (appt["status"], appt["reservations"], appt["provider"][0]) == ("cancelled", 0, "DRSMITH")
    assert appt["start"] == datetime(2026, 3, 3, 15, 0, tzinfo=UTC)


def test_late_booking_fills_only_what_we_do_not_know(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S14", pid="", aip="", start="202603031100"), message_id=1)
    apply(s, siu("S12", start="202603031000"), message_id=2)
    appt = appointment(s, placer="P-1")
    assert appt["start"] == datetime(2026, 3, 3, 16, 0, tzinfo=UTC)  # the S14's time stays
    assert appt["provider"][0] == "DRSMITH"  # the S12 told us who
    assert appt["identifiers"] == [("MRN-1", "HOSP", "MR")]


def test_placer_and_filler_ids_of_two_appointments_are_refused_naming_sch_2(slotengine_scheduler):
    """Found by the generated-SIU property test: the placer id names one appointment, the
    filler id another; giving the first the second's filler id broke the unique index."""
    s = slotengine_scheduler
    apply(s, siu("S12", filler=""), message_id=1)
    apply(s, siu("S12", placer="", filler="F-2", start="202603031100", control="C2"), message_id=2)
    error = failure(s, siu("S14", filler="F-2", control="C3"), message_id=3)
    assert codes(error.errors) == ["207 SCH^1^2"]
    assert "two appointments" in error.errors[0].message
    assert appointment(s, placer="P-1")["audit"] == ["booked"]  # given no filler id
    assert appointment(s, filler="F-2")["audit"] == ["booked"]


# --- statuses -----------------------------------------------------------------------------------------


def test_filler_status_steps_through_the_visit(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S12"))
    apply(s, siu("S14", status="Complete", control="C2"), message_id=2)
    appt = appointment(s, placer="P-1")
    assert appt["status"] == "completed"
    assert appt["audit"] == ["booked", "arrived", "completed"]


def test_siu_does_not_take_an_arrival_back(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S12"))
    apply(s, adt("A04", "PID|1||MRN-1^^^HOSP^MR", evn_time="202603030950"), message_id=2)
    assert appointment(s, placer="P-1")["status"] == "arrived"
    apply(s, siu("S14", status="Booked", reason="FOLLOWUP", control="C3"), message_id=3)  # a late modification
    appt = appointment(s, placer="P-1")
    assert (appt["status"], appt["type"]) == ("arrived", "follow_up")


@pytest.mark.parametrize("status, expected", [
    ("Pending", "held"), ("Waitlist", "waitlisted"), ("Overbook", "overbooked"), ("Started", "checked_in"),
    ("Confirmed", "booked"), ("Noshow", "no_show"), ("", "booked"),
])
def test_s12_takes_the_filler_status(slotengine_scheduler, status, expected):
    apply(slotengine_scheduler, siu("S12", status=status))
    assert appointment(slotengine_scheduler, placer="P-1")["status"] == expected


def test_unknown_filler_status_is_a_warning(slotengine_scheduler):
    result = apply(slotengine_scheduler, siu("S12", status="Wobbly"))
    assert codes(result.warnings) == ["103 SCH^1^25"]
    assert appointment(slotengine_scheduler, placer="P-1")["status"] == "booked"


@pytest.mark.parametrize("reason, appointment_type, urgency", [
    ("FOLLOWUP", "follow_up", "routine"), ("EMERGENCY^Emergency^HL70276", "general", "urgent"),
    ("ROUTINE", "general", "routine"), ("WALKIN", "general", "routine"), ("CHECKUP", "general", "routine"),
    ("NEW^New patient", "new_patient", "routine"), ("Something else", "general", "routine"),
])
def test_appointment_types(slotengine_scheduler, reason, appointment_type, urgency):
    apply(slotengine_scheduler, siu("S12", reason=reason))
    appt = appointment(slotengine_scheduler, placer="P-1")
    assert (appt["type"], appt["urgency"]) == (appointment_type, urgency)


# --- times ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start, ail, expected", [
    ("20260307100000", "", datetime(2026, 3, 7, 15, 0, tzinfo=UTC)),  # EST
    ("20260308100000", "", datetime(2026, 3, 8, 14, 0, tzinfo=UTC)),  # the DST change day: EDT
    ("20260308023000", "", datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),  # inside the gap: moves forward
    ("20261101013000", "", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),  # the repeated hour: first one
    ("20260308100000", "AIL|1||WEST", datetime(2026, 3, 8, 17, 0, tzinfo=UTC)),  # the location's zone (LA)
    ("20260308100000+0100", "AIL|1||WEST", datetime(2026, 3, 8, 9, 0, tzinfo=UTC)),  # an offset is exact
    ("20260308100000.25-0500", "", datetime(2026, 3, 8, 15, 0, 0, 250000, tzinfo=UTC)),
])
def test_naive_times_are_local_to_the_location(slotengine_scheduler, start, ail, expected):
    apply(slotengine_scheduler, siu("S12", start=start, extra=(ail,) if ail else (), tq1=True))
    appt = appointment(slotengine_scheduler, placer="P-1")
    assert appt["start"] == expected
    assert appt["end"] == expected + timedelta(minutes=20)


@pytest.mark.parametrize("duration, units, minutes", [
    ("30", "MIN", 30), ("30", "min^minutes^UCUM", 30), ("1", "h", 60), ("1.5", "HOURS", 90),
    ("3600.000", "s", 60), ("45", "", 45), ("45", "MINUTES", 45),
])
def test_durations(slotengine_scheduler, duration, units, minutes):
    apply(slotengine_scheduler, siu("S12", duration=duration, units=units))
    appt = appointment(slotengine_scheduler, placer="P-1")
    assert appt["end"] - appt["start"] == timedelta(minutes=minutes)


def test_tq1_end_and_duration(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S12", start="202603031000", end="202603031045", tq1=True))
    assert appointment(s, placer="P-1")["end"] == datetime(2026, 3, 3, 15, 45, tzinfo=UTC)
    message = er7(MSH.format(type="SIU^S12", control="C9"), "SCH|P-2|F-2", "TQ1||||||25^min|202603031000",
                  "PID|1||MRN-1^^^HOSP^MR")
    apply(s, message, message_id=2)
    appt = appointment(s, placer="P-2")
    assert appt["end"] - appt["start"] == timedelta(minutes=25)


def test_no_end_and_no_duration_is_fifteen_minutes_with_a_warning(slotengine_scheduler):
    result = apply(slotengine_scheduler, siu("S12", duration="", units="", tq1=True))
    assert codes(result.warnings) == ["101 TQ1^1^8"]
    appt = appointment(slotengine_scheduler, placer="P-1")
    assert appt["end"] - appt["start"] == timedelta(minutes=15)


def test_unknown_units_fall_through_to_the_next_duration(slotengine_scheduler):
    message = siu("S12", units="fortnights", tq1=True,
                  extra=(segment("AIS", {1: "1", 3: "CONSULT^Consultation", 7: "40", 8: "min"}),))
    result = apply(slotengine_scheduler, message)
    assert codes(result.warnings) == ["103 SCH^1^9"]
    appt = appointment(slotengine_scheduler, placer="P-1")
    assert appt["end"] - appt["start"] == timedelta(minutes=40)


# --- errors that park the message ----------------------------------------------------------------------


@pytest.mark.parametrize("message, expected", [
    (lambda: siu("S12", placer="", filler=""), "101 SCH^1^1"),
    (lambda: siu("S12", start="", tq1=True), "101 TQ1^1^7"),
    (lambda: siu("S12", start=""), "101 SCH^1^11"),
    (lambda: siu("S12", start="20260231100000", tq1=True), "102 TQ1^1^7"),
    (lambda: siu("S12", start="tomorrow"), "102 SCH^1^11^4"),
    (lambda: siu("S12", start="202603031000", end="202603030900", duration="", tq1=True), "102 TQ1^1^8"),
    (lambda: siu("S12", pid="PID|1||"), "101 PID^1^3"),
    (lambda: er7(MSH.format(type="ADT^A08", control="X"), "EVN|A08"), "100 PID^1"),
])
def test_missing_or_broken_essentials(slotengine_scheduler, message, expected):
    error = failure(slotengine_scheduler, message())
    assert codes(error.errors) == [expected]
    assert database_state(slotengine_scheduler)["appointments"] == []


def test_identifiers_of_two_patients_are_refused(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, adt("A28", "PID|1||A-1^^^HOSP^MR||One^Pat"))
    apply(s, adt("A28", "PID|1||B-2^^^HOSP^MR||Two^Pat"), message_id=2)
    error = failure(s, adt("A08", "PID|1||A-1^^^HOSP^MR~B-2^^^HOSP^MR||One^Pat"), message_id=3)
    assert codes(error.errors) == ["205 PID^1^3"]


# --- ADT: patients and coverage -------------------------------------------------------------------------


def test_patient_demographics(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, adt("A28", "PID|1||M-9^^^&1.2.3&ISO^MR~S-1^^^SSA^SS||Smith^Anna^B||1928-01-01|F|||"
                 "1 Main St&Main St&1^Apt 2^Springfield^IL^62701^USA^H||555-0100^PRN^PH~^NET^Internet^anna@example.org|"
                 "555-0200^WPN^PH|spa^Spanish^HL70296",
                 segment("PD1", {12: "Y"}), segment("PV1", {1: "1", 2: "O", 15: "A1"})))
    patient = patient_by(s, "M-9", "1.2.3", "MR")
    assert (patient.family_name, patient.given_name, patient.birth_date, patient.sex) == (
        "Smith", "Anna", date(1928, 1, 1), "F")
    assert patient.address == {"street": "1 Main St", "line2": "Apt 2", "city": "Springfield", "state": "IL",
                               "zip": "62701", "country": "USA"}
    assert patient.phones == [{"number": "555-0100", "use": "PRN", "type": "PH"},
                              {"number": "555-0200", "use": "WPN", "type": "PH"}]
    assert patient.email == "anna@example.org"
    assert (patient.language, patient.needs_interpreter) == ("es", True)
    assert (patient.confidential, patient.mobility) == (True, "A1")
    assert patient_by(s, "S-1", "SSA", "SS").id == patient.id

    # A sparse update changes only what it says; "" erases.
    apply(s, adt("A08", segment("PID", {1: "1", 3: "M-9^^^&1.2.3&ISO^MR", 5: "Smith^Anna", 13: '""', 15: "ENG"})),
          message_id=2)
    patient = patient_by(s, "M-9", "1.2.3", "MR")
    assert (patient.phones, patient.email) == ([], "")
    assert patient.birth_date == date(1928, 1, 1)
    assert (patient.language, patient.needs_interpreter) == (CLINIC_LANGUAGE, False)


def test_old_sender_identifier_in_pid2(slotengine_scheduler):
    apply(slotengine_scheduler, adt("A04", "PID|1|OLD-7^^^LEGACY|||Old^Sender"))
    assert patient_by(slotengine_scheduler, "OLD-7", "LEGACY").family_name == "Old"


def test_unparseable_birth_date_is_a_warning(slotengine_scheduler):
    result = apply(slotengine_scheduler, adt("A28", "PID|1||M-1^^^H^MR||Doe^Jo||19800231|M"))
    assert codes(result.warnings) == ["102 PID^1^7"]
    assert patient_by(slotengine_scheduler, "M-1", "H", "MR").birth_date is None


def test_coverage_from_in1(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A01__1"))
    patient = patient_by(s, "PATID1234", "test1", "MR")
    with s.sessions() as session:
        coverage = session.scalars(select(Coverage).where(Coverage.patient_id == patient.id)).one()
        assert (coverage.payer_id, coverage.payer_name, coverage.plan_id, coverage.group_number) == (
            "IC-1.31", "Blue Cross Blue Shield of Texas", "BAV", "PUBSUMB")
        assert (coverage.member_id, coverage.priority) == ("PN-145", 1)
        assert (coverage.effective_date, coverage.expiry_date) == (date(1989, 10, 1), date(2050, 10, 1))
        assert coverage.verification_status == "unverified"


def test_several_coverages_with_in2(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "nodehl7c__ADT_A01__1"))  # segments glued on one line
    patient = patient_by(s, "10006579", "1", "MRN")
    with s.sessions() as session:
        rows = session.execute(select(Coverage.payer_id, Coverage.plan_id, Coverage.member_id, Coverage.priority)
                               .where(Coverage.patient_id == patient.id).order_by(Coverage.priority)).all()
    assert rows == [("3", "MEDICARE", "123121234A", 1), ("9", "NON-PRIMARY", "056269770", 2),
                    ("1", "SELF PAY", "", 3)]


def test_coverage_verification_and_member_number(slotengine_scheduler):
    in1 = segment("IN1", {1: "1", 2: "GOLD", 3: "ACME^^^X", 4: "Acme Health", 8: "G-7", 12: "20260101",
                          13: "20261231", 15: "PPO", 22: "2", 29: "20260215", 45: "Y"})
    in2 = segment("IN2", {1: "1", 61: "MEM-42"})
    apply(slotengine_scheduler, adt("A08", "PID|1||M-1^^^H^MR||Doe^Jo", in1, in2))
    patient = patient_by(slotengine_scheduler, "M-1", "H", "MR")
    with slotengine_scheduler.sessions() as session:
        coverage = session.scalars(select(Coverage).where(Coverage.patient_id == patient.id)).one()
    assert (coverage.payer_id, coverage.plan_id, coverage.group_number, coverage.member_id) == (
        "ACME", "GOLD", "G-7", "MEM-42")
    assert (coverage.priority, coverage.verification_status) == (2, "verified")
    assert coverage.verified_at == datetime(2026, 2, 15, 5, 0, tzinfo=UTC)


def test_a_patient_new_with_the_message_is_not_searched_for_coverage_or_visits(slotengine_scheduler):
    """Two IN1 of one payer and member: the second updates what the first recorded."""
    first = segment("IN1", {1: "1", 2: "GOLD", 3: "ACME", 36: "MEM-1"})
    second = segment("IN1", {1: "2", 2: "PLATINUM", 3: "ACME", 36: "MEM-1"})
    engine = slotengine_scheduler.sessions.kw["bind"]
    with statements(engine) as sent:
        apply(slotengine_scheduler, adt("A04", "PID|1||M-1^^^H^MR||Doe^Jo", "PV1|1|O", first, second))
    patient = patient_by(slotengine_scheduler, "M-1", "H", "MR")
    with slotengine_scheduler.sessions() as session:
        [coverage] = session.scalars(select(Coverage).where(Coverage.patient_id == patient.id))
    assert (coverage.plan_id, coverage.priority) == ("PLATINUM", 2)
    assert [s for s in sent if s.startswith("SELECT") and "FROM appointments" in s] == []
    assert len([s for s in sent if s.startswith("SELECT") and "FROM coverages WHERE coverages.patient_id" in s]) \
        == 1  # the second IN1's
    apply(slotengine_scheduler, adt("A04", "PID|1||M-1^^^H^MR||Doe^Jo", "PV1|1|O", first), message_id=2)
    with slotengine_scheduler.sessions() as session:
        assert session.scalars(select(Coverage.plan_id).where(Coverage.patient_id == patient.id)).all() == ["GOLD"]


# --- ADT: arrival, completion and their reversals ------------------------------------------------------

#: A booking on 2029-08-01 (the day of EVN-2 in the msfhirconv ADT samples) for their patient.
BOOKING_0801 = er7(MSH.format(type="SIU^S12^SIU_S12", control="B1"),
                   "SCH|APPT-1|APPT-1||||ROUTINE|||20|MIN|^^20^202908011000||||||||||||||Booked",
                   "PID|1||PATID1234^^^test1^MR", "AIP|1||DRSMITH^Smith^Ann")


def test_a04_arrives_and_a03_completes(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, BOOKING_0801)
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A04__1"), message_id=2)
    assert appointment(s, placer="APPT-1")["status"] == "arrived"
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A04__1"), message_id=3)  # repeated: no change
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A03__1"), message_id=4)
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A03__1"), message_id=5)
    appt = appointment(s, placer="APPT-1")
    assert appt["status"] == "completed"
    assert appt["audit"] == ["booked", "arrived", "completed"]
    with s.sessions() as session:  # the ADT also updated the patient the SIU created
        patient = session.get(Patient, appt["patient_id"])
        assert (patient.family_name, patient.given_name) == ("EVERYMAN", "ADAM")

    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A13__1"), message_id=6)  # cancel discharge
    assert appointment(s, placer="APPT-1")["status"] == "checked_in"
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A11__1"), message_id=7)  # cancel the visit
    appt = appointment(s, placer="APPT-1")
    assert appt["status"] == "booked"
    assert appt["audit"][-3:] == ["completion_reversed", "check_in_reversed", "arrival_reversed"]


def test_a03_on_a_booked_appointment_arrives_then_completes(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, BOOKING_0801)
    apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A03__2"), message_id=2)
    assert appointment(s, placer="APPT-1")["audit"] == ["booked", "arrived", "completed"]


def test_arrival_takes_the_nearest_booking_of_the_day(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S12", placer="AM", filler="AM", start="202603030900"))
    apply(s, siu("S12", placer="PM", filler="PM", start="202603031500"), message_id=2)
    apply(s, adt("A04", "PID|1||MRN-1^^^HOSP^MR", evn_time="202603031440"), message_id=3)
    assert [appointment(s, placer=p)["status"] for p in ("AM", "PM")] == ["booked", "arrived"]


def test_arrival_day_is_the_local_day(slotengine_scheduler):
    s = slotengine_scheduler
    apply(s, siu("S12", placer="EARLY", filler="EARLY", start="202603030900"))  # 14:00 UTC on the 3rd
    apply(s, siu("S12", placer="NEXT", filler="NEXT", start="202603040700"), message_id=2)  # 12:00 UTC the 4th
    # 20:30 in New York is 01:30 UTC on the 4th, nearer to NEXT; but locally it is still the 3rd
    apply(s, adt("A04", "PID|1||MRN-1^^^HOSP^MR", evn_time="202603032030"), message_id=3)
    assert [appointment(s, placer=p)["status"] for p in ("EARLY", "NEXT")] == ["arrived", "booked"]


def test_arrival_without_a_booking_that_day_changes_only_the_patient(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    result = apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A04__1"))
    assert result.status == "applied"
    assert database_state(s)["appointments"] == []
    assert patient_by(s, "PATID1234", "test1", "MR") is not None


# --- ADT: merges ----------------------------------------------------------------------------------------


def test_a40_repoints_appointments_to_the_survivor(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, siu("S12", pid="PID|1||56789^^^BCBS^MR||Old^Name"))
    merged = patient_by(s, "56789", "BCBS", "MR")
    result = apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A40__1"), message_id=2)
    assert result.warnings == []
    survivor = patient_by(s, "12345", "BCBS", "MR")  # unknown before: created from the PID
    assert survivor.id != merged.id
    assert (survivor.family_name, survivor.given_name) == ("Test", "Test")
    assert patient_by(s, "56789", "BCBS", "MR").id == survivor.id  # identifiers moved
    appt = appointment(s, placer="P-1")
    assert appt["patient_id"] == survivor.id
    with s.sessions() as session:
        assert session.get(Patient, merged.id).merged_into_id == survivor.id


def test_a40_with_two_pairs(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, adt("A28", "PID|1||12345^^^BCBS^MR||Test^Test"))
    apply(s, adt("A28", "PID|1||56789^^^BCBS^MR||Old^One"), message_id=2)
    apply(s, adt("A28", "PID|1||569^^^BCBS^MR||Old^Two"), message_id=3)
    result = apply(s, corpus_message(corpus_dir, "msfhirconv__ADT_A40__2"), message_id=4)
    assert result.warnings == []
    first, second = patient_by(s, "12345", "BCBS", "MR"), patient_by(s, "145", "BCBS", "MR")
    assert first.id != second.id
    assert patient_by(s, "56789", "BCBS", "MR").id == first.id
    assert patient_by(s, "569", "BCBS", "MR").id == second.id


def test_a40_merged_patient_found_by_any_mrg1_repetition(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, adt("A28", "PID|1||7200117359^^^BBB&2.16.840.1.113883.3.37.4.1.1.2.611.1&ISO||Stiller^Ben"))
    merged = patient_by(s, "7200117359", "BBB")
    result = apply(s, corpus_message(corpus_dir, "ipf__ADT_A40__1"), message_id=2)  # Latin-1 header bytes
    assert result.warnings == []
    survivor = patient_by(s, "305014", "MPI-NS-P")
    assert patient_by(s, "7200117359", "BBB").id == survivor.id != merged.id


def test_a40_unknown_merged_patient_is_a_warning(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    result = apply(s, corpus_message(corpus_dir, "dcm4che__ADT_A40__1"))
    assert codes(result.warnings) == ["204 MRG^1^1"]
    assert patient_by(s, "NEW_PID_1", "ADT1").family_name == "New_Smith"
    assert patient_by(s, "OLD_PID_1", "ADT1") is None


def test_a24_updates_both_patients(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    apply(s, corpus_message(corpus_dir, "hapi__ADT_A24__1"))  # "^" as field separator
    assert patient_by(s, "11111", "FOO", "NI").family_name == "SMITH"
    assert patient_by(s, "22222", "FOO", "NI").given_name == "JOHN"


# --- blocked time (S23/S24) ------------------------------------------------------------------------------


def test_s23_blocks_and_s24_opens(slotengine_scheduler):
    s = slotengine_scheduler

    def block_message(event: str, control: str) -> Message:
        return er7(MSH.format(type=f"SIU^{event}^SIU_S12", control=control),
                   segment("SCH", {7: "MEETING^Staff meeting", 9: "60", 10: "MIN", 11: "^^60^202603031000"}),
                   "RGS|1", "AIP|1||DRSMITH^Smith^Ann", "AIG|1||ECG1^ECG machine")

    apply(s, block_message("S23", "B1"))
    apply(s, block_message("S23", "B2"), message_id=2)  # the same block again: not repeated
    with s.sessions() as session:
        blocks = session.execute(select(TimeBlock.provider_id, TimeBlock.resource_id, TimeBlock.start,
                                        TimeBlock.end, TimeBlock.active)).all()
        assert len(blocks) == 2 and all(b.active for b in blocks)
        assert {b.start for b in blocks} == {datetime(2026, 3, 3, 15, 0, tzinfo=UTC)}
        blocked_slots = session.scalar(select(func.count()).select_from(Slot).where(Slot.blocked.is_(True)))
        assert blocked_slots == 4  # four 15-minute slots of Dr Smith
    apply(s, block_message("S24", "B3"), message_id=3)
    with s.sessions() as session:
        assert not any(session.scalars(select(TimeBlock.active)))
        assert session.scalar(select(func.count()).select_from(Slot).where(Slot.blocked.is_(True))) == 0
    result = apply(s, block_message("S24", "B4"), message_id=4)
    assert codes(result.warnings) == ["204 AIP^1^3", "204 AIG^1^3"]  # nothing left to open


# --- what is not mapped ----------------------------------------------------------------------------------


def test_is_supported():
    assert is_supported("ADT", "A04", "mirror") and is_supported("ADT", "A02", "filler")
    assert is_supported("SIU", "S12", "mirror") and is_supported("SIU", "S24", "mirror")
    assert not is_supported("SIU", "S12", "filler")
    assert not is_supported("SIU", "S18", "mirror")
    assert not is_supported("SRM", "S01", "mirror")
    assert not is_supported("ADT", "O01", "mirror")
    assert not is_supported("ORU", "R01", "mirror")
    assert not is_supported("ADT", "A04", "bogus")


def test_unsupported_and_ignored_messages_are_skipped(slotengine_scheduler, corpus_dir):
    s = slotengine_scheduler
    before = database_state(s)
    for message in (corpus_message(corpus_dir, "hl7v2ig__SRM_S01__1"),
                    corpus_message(corpus_dir, "hl7v2ig__ADT_A02__1"),
                    siu("S18"), er7(MSH.format(type="ORU^R01", control="O1"), "OBR|1")):
        assert apply(s, message) == ApplyResult("skipped", [])
    assert apply(s, siu("S12"), mode="filler").status == "skipped"
    assert database_state(s) == before
    assert apply(s, adt("A28", "PID|1||M-1^^^H^MR"), mode="filler").status == "applied"


def test_log_records_carry_no_patient_data(slotengine_scheduler, corpus_dir, caplog):
    caplog.set_level(logging.DEBUG)
    for stem in ("msfhirconv__SIU_S12__1", "hl7v2tofhir__ADT_A01__1", "msfhirconv__ADT_A04__1",
                 "msfhirconv__ADT_A40__2", "renalware__SIU_S12__1"):
        apply(slotengine_scheduler, corpus_message(corpus_dir, stem))
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "slotengine.hl7.mapping" in text
    for secret in ("EVERYMAN", "Everywoman", "PATID1234", "1032702", "19880818", "1988-08-18", "Hospital Lane",
                   "eve@test.test", "555-8473", "RENALOP2", "10769857", "Test^Test"):
        assert secret not in text


# --- properties: generated SIU messages never break the mapping ------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def dtm_texts(draw) -> str:
    kind = draw(st.sampled_from(["valid"] * 8 + ["junk", "empty", "null"]))
    if kind == "empty":
        return ""
    if kind == "null":
        return '""'
    if kind == "junk":
        return escape(draw(_text))
    moment = draw(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2040, 12, 31)))
    offset = draw(st.one_of(st.none(), st.integers(-14 * 60, 14 * 60).map(lambda m: timedelta(minutes=m))))
    precision = draw(st.sampled_from(["day", "minute", "second"]))
    return format_dtm(moment, precision=precision, offset=offset)


@st.composite
def siu_messages(draw, placer: str, filler: str) -> bytes:
    event = draw(st.sampled_from(["S12", "S13", "S14", "S15", "S16", "S17", "S26", "S23", "S24", "S18",
                                  "S12", "S14"]))
    status = draw(st.sampled_from(["", "Booked", "Pending", "Complete", "Cancelled", "Noshow", "Started", "Dc",
                                   "Deleted", "Overbook", "Waitlist", "ARRIVED", '""', "Blocked", "zzz"]))
    reason = draw(st.sampled_from(["", "ROUTINE", "FOLLOWUP", "EMERGENCY^Emergency^HL70276", "NEW", '""']))
    duration = draw(st.sampled_from(["", "0", "-5", "15", "30", "3600.000", "abc", "1e9", "99999999999"]))
    units = draw(st.sampled_from(["", "MIN", "min^minutes", "s", "h", "days", "xyz", '""']))
    placer = draw(st.sampled_from([placer, placer, placer, "", '""', placer + "^NS"]))
    filler = draw(st.sampled_from([filler, "", filler]))
    segments = [MSH.format(type=f"SIU^{event}^SIU_S12", control="G"),
                f"SCH|{placer}|{filler}||||{escape(draw(_text))}|{reason}||{duration}|{units}|"
                f"^^{draw(st.sampled_from(['', '30', 'M30', 'H1', 'x']))}^{draw(dtm_texts())}^{draw(dtm_texts())}"
                f"||||||||||||||{status}"]
    if draw(st.booleans()):
        segments.append(f"TQ1|||||||{draw(dtm_texts())}|{draw(dtm_texts())}|{draw(st.sampled_from(['', 'S', 'R']))}")
    if draw(st.booleans()):
        identifier = draw(st.sampled_from(["MRN-1^^^HOSP^MR", "MRN-2^^^HOSP^MR", "", '""', escape("x" * 120)]))
        segments.append(f"PID|1||{identifier}||{escape(draw(_text))}^{escape(draw(_text))}||{draw(dtm_texts())}|"
                        f"{draw(st.sampled_from(['F', 'M', '2', '']))}")
    segments.append("RGS|1|" + draw(st.sampled_from(["", "A", "D"])))
    for name, value in (("AIP", draw(st.sampled_from(["DRSMITH^Smith^Ann", "NEWDOC^New^Doc", "^Nameless", ""]))),
                        ("AIL", draw(st.sampled_from(["WEST", "CLINIC^R1^^SITE", "", '""']))),
                        ("AIG", draw(st.sampled_from(["ECG1^ECG", escape(draw(_text)), ""])))):
        if draw(st.booleans()):
            action = draw(st.sampled_from(["", "A", "D", "X^Y"]))
            segments.append(f"{name}|1|{action}|{value}|||{draw(dtm_texts())}|||"
                            f"{draw(st.sampled_from(['', '20', 'q']))}|{draw(st.sampled_from(['', 'min', 'z']))}")
    if draw(st.booleans()):
        segments.append(f"NTE|1||{escape(draw(_text))}")
    return "\r".join(segments).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_siu_never_raises_anything_but_mapping_error(slotengine_scheduler, data):
    messages = data.draw(st.lists(siu_messages("G-1", "GF-1"), min_size=1, max_size=3))
    with slotengine_scheduler.sessions() as session:
        session.begin()
        try:
            view = slotengine_scheduler.within(session)
            for n, raw in enumerate(messages, 1):
                savepoint = session.begin_nested()
                try:
                    result = apply_message(view, parse(raw), mode="mirror", message_id=n)
                except MappingError as exc:
                    savepoint.rollback()
                    assert exc.errors and all(e.severity == "E" for e in exc.errors)
                    event(f"error {exc.errors[0].code}")
                    continue
                savepoint.commit()
                event(result.status)
                assert result.status in ("applied", "skipped")
                assert all(w.severity == "W" for w in result.warnings)
                for appt in session.scalars(select(Appointment)):
                    assert appt.start.tzinfo is not None and appt.end > appt.start
                    assert appt.end - appt.start <= timedelta(hours=24)
        finally:
            session.rollback()
