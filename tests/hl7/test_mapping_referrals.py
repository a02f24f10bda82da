"""REF^I12 (patient referral) → the referral path of the service API, with the built-in plugins.

Messages are applied the way ``hl7.processor`` applies them: the scheduler is
bound to one session transaction (``Scheduler.within``) that commits when the
message applied and rolls back when it raised; the ``referrals`` plugin
records and routes the referral inside that transaction (hook
``slotengine_referral_received``).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import func, select, update

from engine.metrics import Metrics
from engine.models import (
    Appointment,
    Coverage,
    InboundMessage,
    OutboxItem,
    Patient,
    Referral,
    Slot,
    WaitlistEntry,
)
from engine.plugin_host import PluginHost
from hl7.mapping import ApplyResult, MappingError, apply_message, is_supported
from hl7.message import Message, parse
from hl7.processor import FeedPolicy, Processor
from hl7.store import APPLIED, PARKED, RECEIVED, Incoming, MessageStore, content_hash
from plugins.referrals import as_dict, referral_status
from tests.plugins.helpers import Clinic

UTC = timezone.utc

MSH = "MSH|^~\\&|EPIC|MERCYPCP|SLOTENGINE|MAIN|20260302081500||REF^I12^REF_I12|{control}|P|2.5.1|||AL|NE"
RF1 = ("RF1|P^Pending^HL70283|{priority}|{type}|AM^Assume management^HL70282|O^Outpatient^HL70284|"
       "{referral_id}|20260302|20260601||O^Provider ordered^HL70336")
AUT = "AUT|PPO^Acme PPO|ACME^Acme Health|Acme Health|20260302|20260601|AUTH-5544|||4"
PRD_RP = ("PRD|RP^Referring Provider^HL70286|Who^John^^^Dr^MD|100 Main St^^Springfield^IL^62701^USA|"
          "^^^MERCYPCP|^WPN^PH^^1^217^5550100~^NET^Internet^jwho@mercypcp.example.org||1234567890^NPI")
PRD_RT = "PRD|RT^Referred to Provider^HL70286|{rt_name}|||||{rt_id}^LOCAL"
PID = ("PID|1||{mrn}^^^HOSP^MR~999-00-1234^^^SSA^SS||Referral^Rita^Q^^^^L||19700412|F|||"
       "12 Elm St^^Springfield^IL^62701^USA^H||^PRN^PH^^1^217^5550199~^NET^Internet^rita@example.org||eng")

def segment(name: str, fields: dict[int, str]) -> str:
    """An ER7 segment from {position: value}."""
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


IN1 = segment("IN1", {1: "1", 2: "PPO^Acme PPO", 3: "ACME^^^ACME", 4: "Acme Health", 5: "PO Box 1^^Hartford^CT^06101",
                      8: "GRP-77", 12: "20250101", 22: "1", 36: "M-{mrn}"})
PV1 = "PV1|1|O|^^^MERCYPCP||||1234567890^Who^John^^^Dr"
DG1 = "DG1|1||I49.9^Cardiac arrhythmia, unspecified^I10||20260301|W"
NTE = "NTE|1||Palpitations for three weeks; Holter requested."


def ref_i12(*, control: str = "REF0001", priority: str = "S^STAT^HL70280", type_: str = "CARD^Cardiology^LOCAL",
            referral_id: str = "RFL-0001^MERCYPCP", rt_id: str = "DRJONES", rt_name: str = "Jones^Bob^^^Dr",
            mrn: str = "MRN-R1", drop: tuple[str, ...] = (), replace: dict[str, str] | None = None) -> Message:
    """A REF^I12 (v2.5.1 REF_I12: MSH RF1 AUT PRD PRD PID IN1 PV1 DG1 NTE)."""
    segments = {
        "MSH": MSH.format(control=control),
        "RF1": RF1.format(priority=priority, type=type_, referral_id=referral_id),
        "AUT": AUT, "PRD_RP": PRD_RP, "PRD_RT": PRD_RT.format(rt_id=rt_id, rt_name=rt_name),
        "PID": PID.format(mrn=mrn), "IN1": IN1.format(mrn=mrn), "PV1": PV1, "DG1": DG1, "NTE": NTE,
        **(replace or {}),
    }
    return parse("\r".join(text for name, text in segments.items() if name not in drop).encode())


def apply(scheduler, message: Message, *, message_id: int = 1, mode: str = "mirror") -> ApplyResult:
    """Like the processor: one transaction per message, rolled back on error."""
    with scheduler.sessions() as session:
        with session.begin():
            view = scheduler.within(session)
            result = apply_message(view, message, mode=mode, message_id=message_id)
        view.notify_committed()
    return result


def failure(scheduler, message: Message) -> MappingError:
    with pytest.raises(MappingError) as info:
        apply(scheduler, message)
    return info.value


def where(detail) -> str:
    return "^".join(str(p) for p in (detail.segment, detail.sequence, detail.field, detail.component) if p)


def rows(scheduler, model) -> list[Any]:
    with scheduler.sessions() as session:
        return list(session.scalars(select(model).order_by(model.id)))


def count(scheduler, model) -> int:
    with scheduler.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


@pytest.fixture
def slotengine_plugins() -> PluginHost:
    """The built-in plugins, registered as in production (no vendor discovery)."""
    return PluginHost(discover=False)


@pytest.fixture
def slotengine_plugin_settings() -> dict:
    return {
        "notices": {"teams": {"referrals": {"channel": "email", "address": "referrals@clinic.example.org"},
                              "default": {"channel": "email", "address": "staff@clinic.example.org"}}},
        "eligibility": {"payers": {"ACME": {"network": "acme-ppo"}}},
        "referrals": {"networks": {"ACME": "acme-ppo"}},
    }


@pytest.fixture
def clinic(slotengine_scheduler, slotengine_context) -> Clinic:
    """The demo clinic, DRSMITH and DRJONES in ACME's network, plugins configured."""
    return Clinic(slotengine_scheduler)


# --- what is supported -------------------------------------------------------------------------------


def test_ref_i12_is_supported_in_both_modes():
    assert is_supported("REF", "I12", "mirror") and is_supported("ref", "i12", "filler")
    for event in ("I11", "I13", "I14", "I15", ""):
        assert not is_supported("REF", event, "mirror")
    assert not is_supported("RRI", "I12", "mirror")


# --- the referral, end to end through the mapping ------------------------------------------------------


def test_a_ref_i12_is_recorded_routed_and_booked(clinic):
    s = clinic.scheduler
    result = apply(s, ref_i12(), message_id=41)
    assert result == ApplyResult("applied", [])
    [referral] = rows(s, Referral)
    status = referral_status_of(s, referral.id)
    assert (status["specialty"], status["urgency"], status["payer_id"]) == ("cardiology", "urgent", "ACME")
    assert status["external_id"] == "RFL-0001^MERCYPCP"
    assert status["referring_provider"] == "Dr John Who, MD (1234567890)"
    assert status["referring_contact"] == "jwho@mercypcp.example.org"
    assert status["preferred_provider_id"] == clinic.providers["DRJONES"]
    assert referral.reason.splitlines() == ["Provider ordered; Cardiac arrhythmia, unspecified",
                                            "Palpitations for three weeks; Holter requested."]
    assert "(inbound:41)" in status["history"][0]["note"]
    # routed: booked with the in-network cardiologist (DRLEE is out of ACME's network)
    assert status["status"] == "booked" and status["provider_id"] == clinic.providers["DRJONES"]
    appointment = s.appointment(status["appointment_id"])
    assert appointment.patient_id == referral.patient_id and appointment.urgency == "urgent"
    assert appointment.start == datetime(2026, 3, 2, 14, tzinfo=UTC)  # DRJONES's first slot, 09:00 New York
    # the patient (PID) and the coverage (IN1) were recorded by the same message
    [patient] = rows(s, Patient)
    assert (patient.family_name, patient.given_name, patient.email) == ("Referral", "Rita", "rita@example.org")
    [coverage] = rows(s, Coverage)
    assert (coverage.patient_id, coverage.payer_id, coverage.member_id) == (patient.id, "ACME", "M-MRN-R1")
    # the referrer hears back at the PRD-5 e-mail address
    notices = [i.payload for i in rows(s, OutboxItem) if i.kind == "staff_notice" and i.payload["team"] == "referrals"]
    assert [n["to"] for n in notices] == ["jwho@mercypcp.example.org"] and "booked" in notices[0]["subject"]


def referral_status_of(scheduler, referral_id: int) -> dict[str, Any]:
    with scheduler.sessions() as session:
        return as_dict(session.get(Referral, referral_id))


def test_a_resend_with_the_same_rf1_6_creates_nothing_new(clinic):
    s = clinic.scheduler
    apply(s, ref_i12(control="REF0001"), message_id=1)
    tables = (Referral, Appointment, Patient, Coverage, OutboxItem)
    before = {model.__name__: count(s, model) for model in tables}
    # the sender resends it under a new control id (MSH-10): the store cannot tell, RF1-6 can
    assert apply(s, ref_i12(control="REF0002"), message_id=2).status == "applied"
    assert {model.__name__: count(s, model) for model in tables} == before
    assert before["Referral"] == before["Appointment"] == 1


def test_no_free_slot_puts_the_patient_on_the_waitlist(clinic):
    s = clinic.scheduler
    with s.sessions() as session, session.begin():
        session.execute(update(Slot).where(Slot.provider_id == clinic.providers["DRJONES"]).values(blocked=True))
    apply(s, ref_i12(priority="R^Routine^HL70280"))
    [referral] = rows(s, Referral)
    assert (referral.status, referral.urgency) == ("waitlisted", "routine")
    [entry] = rows(s, WaitlistEntry)
    assert (entry.patient_id, entry.specialty, entry.provider_id) == (referral.patient_id, "cardiology",
                                                                      clinic.providers["DRJONES"])
    assert count(s, Appointment) == 0


def test_specialty_text_is_normalised_and_an_unknown_referred_to_provider_is_a_warning(clinic):
    s = clinic.scheduler
    result = apply(s, ref_i12(type_="FM^Family Medicine^LOCAL", priority="", rt_id="NPI-555",
                              rt_name="Nobody^Known"))
    assert [(w.code, w.severity, where(w)) for w in result.warnings] == [("204", "W", "PRD^2^7")]
    [referral] = rows(s, Referral)
    assert (referral.specialty, referral.urgency, referral.status) == ("family_medicine", "routine", "booked")
    assert referral.provider_id == clinic.providers["DRSMITH"]  # the earliest in-network slot: 08:00


def test_a_rejected_referral_is_skipped_with_a_warning(clinic):
    s = clinic.scheduler
    result = apply(s, ref_i12(replace={"RF1": RF1.format(priority="", type="CARD^Cardiology", referral_id="X-1")
                                       .replace("P^Pending", "R^Rejected")}))
    assert result.status == "skipped" and [(w.code, where(w)) for w in result.warnings] == [("207", "RF1^1^1")]
    assert count(s, Referral) == 0 and count(s, Patient) == 0


def test_filler_mode_applies_it_too(clinic):
    assert apply(clinic.scheduler, ref_i12(), mode="filler").status == "applied"
    assert [r.status for r in rows(clinic.scheduler, Referral)] == ["booked"]


# --- errors name the segment and field; nothing is written ------------------------------------------------


@pytest.mark.parametrize("message, code, location", [
    (lambda: ref_i12(drop=("RF1",)), "100", "RF1^1"),
    (lambda: ref_i12(type_=""), "101", "RF1^1^3"),
    (lambda: ref_i12(type_="^"), "101", "RF1^1^3"),
    (lambda: ref_i12(drop=("PID",)), "100", "PID^1"),
    (lambda: ref_i12(replace={"PID": "PID|1||||Referral^Rita"}), "101", "PID^1^3"),
])
def test_missing_essentials_fail_naming_the_field(clinic, message, code, location):
    error = failure(clinic.scheduler, message())
    assert [(e.code, where(e)) for e in error.errors] == [(code, location)]
    assert count(clinic.scheduler, Referral) == 0 and count(clinic.scheduler, Patient) == 0


class TestWithoutTheReferralsPlugin:
    @pytest.fixture
    def slotengine_plugins(self) -> PluginHost:
        return PluginHost(discover=False, disabled=["referrals"])

    def test_no_plugin_handles_referrals(self, clinic):
        error = failure(clinic.scheduler, ref_i12())
        assert [(e.code, where(e)) for e in error.errors] == [("207", "MSH^1^9")]
        assert "no plugin handles referrals" in error.errors[0].message
        assert count(clinic.scheduler, Patient) == 0  # the message's transaction rolled back


# --- end to end: stored, applied by the processor in its one transaction ---------------------------------


def test_the_processor_applies_a_stored_ref_i12(clinic, slotengine_context):
    s = clinic.scheduler
    store = MessageStore(s.sessions, Metrics())
    processor = Processor(s, store, {"referrals": FeedPolicy(mode="filler")}, Metrics())

    def receive(message: Message, raw: bytes) -> None:
        store.store_batch([Incoming("referrals", "EPIC^MERCYPCP", message.control_id, "REF^I12", "127.0.0.1",
                                    s.clock.now(), raw, RECEIVED, None, content_hash(raw))])

    raws = [b"\r".join(part.encode() for part in (
        MSH.format(control=control), RF1.format(priority="S", type="^Cardiology", referral_id=ref_id),
        PRD_RP, PID.format(mrn=mrn), IN1.format(mrn=mrn))) for control, ref_id, mrn in
        (("E1", "RFL-9", "MRN-E1"), ("E2", "RFL-9", "MRN-E1"), ("E3", "", "MRN-E3"))]
    raws[2] = raws[2].replace(b"^Cardiology", b"")  # no specialty: parked
    for raw in raws:
        receive(parse(raw), raw)
    applied = 0
    while batch := processor.apply_pending():  # a batch ends early on a slow machine
        applied += batch
    assert applied == 3
    with s.sessions() as session:
        statuses = [(m.control_id, m.status) for m in session.scalars(select(InboundMessage)
                                                                      .order_by(InboundMessage.id))]
        error = session.scalar(select(InboundMessage.error).where(InboundMessage.control_id == "E3"))
    assert statuses == [("E1", APPLIED), ("E2", APPLIED), ("E3", PARKED)]
    assert "RF1-3" in error
    [referral] = rows(s, Referral)
    status = referral_status(slotengine_context, referral.id)
    assert status["status"] == "booked" and status["urgency"] == "urgent"
    assert count(s, Appointment) == 1
    assert [p.family_name for p in rows(s, Patient)] == ["Referral"]  # E3's patient rolled back with it
