"""The hook ``slotengine_referral_received``: a referral recorded (and routed)
inside the caller's transaction, as the HL7 processor applies a REF^I12."""
from __future__ import annotations

from typing import Any, Optional

import pytest
from sqlalchemy import func, select

from engine.models import Appointment, Referral
from engine.plugin import hookimpl
from engine.plugin_host import PluginError, PluginHost
from plugins.referrals import referral_status
from tests.plugins.helpers import utc


class Vendor:
    """A vendor plugin whose behaviour each test chooses."""

    def __init__(self):
        self.receive: Optional[str] = None  # None | "record" | "raise" | "junk"
        self.route: Optional[str] = None  # None | "bad_slot_once"
        self.veto = False
        self.changes: list[tuple[str, Optional[int]]] = []

    @hookimpl
    def slotengine_referral_received(self, session, referral, context):
        if self.receive == "record":
            return 4242
        if self.receive == "raise":
            session.add(Referral(patient_id=referral["patient_id"], specialty="half-written", status="received",
                                 history=[], received_at=context.now(), updated_at=context.now()))
            session.flush()
            raise RuntimeError("referral system down")
        if self.receive == "junk":
            return "R-1"
        return None

    @hookimpl
    def slotengine_route_referral(self, session, referral, context):
        if self.route == "bad_slot_once":
            self.route = None
            return {"provider_id": None, "slot_id": "not a slot id"}
        return None

    @hookimpl
    def slotengine_check_booking(self, session, appointment, patient, action, context):
        return {"decision": "veto", "reason": "referrals need a signed order"} if self.veto else None

    @hookimpl
    def slotengine_after_change(self, change, context):
        self.changes.append((change.kind, change.appointment_id))


@pytest.fixture
def vendor() -> Vendor:
    return Vendor()


@pytest.fixture
def slotengine_plugins(vendor) -> PluginHost:
    return PluginHost(discover=False, extra=[("vendor", vendor)])


def received(context, referral: dict[str, Any], *, commit: bool = True) -> Optional[int]:
    """Like the HL7 processor: one transaction of the caller's, rolled back unless ``commit``."""
    with context.session_factory() as session:
        transaction = session.begin()
        try:
            referral_id = context.plugins.referral_received(session, referral)
        except BaseException:
            transaction.rollback()
            raise
        if commit:
            transaction.commit()
        else:
            transaction.rollback()
    return referral_id


def count(scheduler, model) -> int:
    with scheduler.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_the_builtin_plugin_records_and_routes_in_the_callers_transaction(clinic, slotengine_context, vendor):
    patient = clinic.patient("H1")
    vendor.changes.clear()
    with slotengine_context.session_factory() as session, session.begin():
        referral_id = slotengine_context.plugins.referral_received(session, {
            "patient_id": patient.id, "specialty": "cardiology", "external_id": "RF-1^EHR",
            "referring_contact": "who@referrers.example.org", "source": "inbound:7"})
        assert session.get(Referral, referral_id).status == "booked"  # routed before the caller commits
        assert vendor.changes == []  # plugins hear of the booking only after the commit
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "booked" and status["provider_id"] == clinic.providers["DRJONES"]
    assert "(inbound:7)" in status["history"][0]["note"]
    assert vendor.changes == [("booked", status["appointment_id"])]
    # a resend: the same referral, nothing new
    assert received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology",
                                         "external_id": "RF-1^EHR"}) == referral_id
    assert count(clinic.scheduler, Referral) == 1 and count(clinic.scheduler, Appointment) == 1


def test_nothing_remains_when_the_caller_rolls_back(clinic, slotengine_context, vendor):
    patient = clinic.patient("H2")
    vendor.changes.clear()
    referral_id = received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"}, commit=False)
    assert isinstance(referral_id, int)
    assert count(clinic.scheduler, Referral) == 0 and count(clinic.scheduler, Appointment) == 0
    assert vendor.changes == []
    with clinic.scheduler.sessions() as session, session.begin():  # the session's next transaction
        pass
    assert vendor.changes == []


def test_the_first_plugin_that_records_it_wins(clinic, slotengine_context, vendor):
    vendor.receive = "record"
    patient = clinic.patient("H3")
    assert received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"}) == 4242
    assert count(clinic.scheduler, Referral) == 0  # the built-in plugin was not asked


def test_a_raising_plugin_fails_the_callers_transaction(clinic, slotengine_context, vendor):
    vendor.receive = "raise"
    patient = clinic.patient("H4")
    metric = slotengine_context.metrics.plugin_errors.labels("vendor", "slotengine_referral_received")
    before = metric._value.get()
    with slotengine_context.session_factory() as session, session.begin():
        with pytest.raises(RuntimeError, match="referral system down"):
            slotengine_context.plugins.referral_received(session, {"patient_id": patient.id,
                                                                   "specialty": "cardiology"})
        # only the plugin's own work was rolled back (its savepoint); the caller decides
        assert session.scalar(select(func.count()).select_from(Referral)) == 0
    assert metric._value.get() == before + 1
    vendor.receive = "junk"
    with pytest.raises(PluginError, match="vendor"):
        received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})


def test_without_a_plugin_nobody_records_it(slotengine_scheduler):
    host = PluginHost(builtins=(), discover=False)
    with slotengine_scheduler.sessions() as session, session.begin():
        assert host.referral_received(session, {"patient_id": 1, "specialty": "cardiology"}) is None


def test_a_routing_failure_leaves_the_referral_received_for_the_sweep(clinic, slotengine_context, slotengine_jobs,
                                                                        vendor):
    vendor.route = "bad_slot_once"
    patient = clinic.patient("H5")
    referral_id = received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    assert referral_status(slotengine_context, referral_id)["status"] == "received"
    assert count(clinic.scheduler, Appointment) == 0
    assert slotengine_jobs.run("referrals.route_pending").startswith("ok")
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "booked"
    assert clinic.scheduler.appointment(status["appointment_id"]).start == utc(2026, 3, 2, 14)


def test_a_vetoed_consult_makes_the_referral_unroutable(clinic, slotengine_context, vendor):
    vendor.veto = True
    patient = clinic.patient("H6")
    vendor.changes.clear()
    referral_id = received(slotengine_context, {"patient_id": patient.id, "specialty": "cardiology"})
    status = referral_status(slotengine_context, referral_id)
    assert status["status"] == "unroutable" and "signed order" in status["history"][-1]["note"]
    assert count(clinic.scheduler, Appointment) == 0 and vendor.changes == []


def test_the_referred_to_provider_is_routed_to_first(clinic, slotengine_context):
    patient = clinic.patient("H7")
    # DRSMITH's first slot (08:00 New York) is earlier than DRJONES's (09:00), but DRJONES is asked for
    referral_id = received(slotengine_context, {"patient_id": patient.id, "specialty": "family_medicine",
                                                "preferred_provider_id": clinic.providers["DRJONES"]})
    status = referral_status(slotengine_context, referral_id)
    assert status["provider_id"] == clinic.providers["DRJONES"]
    assert status["preferred_provider_id"] == clinic.providers["DRJONES"]
    other = received(slotengine_context, {"patient_id": clinic.patient("H8").id, "specialty": "family_medicine"})
    assert referral_status(slotengine_context, other)["provider_id"] == clinic.providers["DRSMITH"]
