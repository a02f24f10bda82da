"""Eligibility: coverage checked at booking and before the visit; failures held for review and told to staff."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from engine.models import Appointment, OutboxItem, PluginTask
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.requests import BookingRequest
from tests.plugins.helpers import STAFF, utc


def notices(scheduler, team):
    with scheduler.sessions() as session:
        return [i for i in session.scalars(select(OutboxItem).where(OutboxItem.kind.in_(("staff_notice", "billing_notice"))))
                if i.payload["team"] == team]


def test_an_eligible_booking_records_the_verdict_and_copay(clinic):
    appointment = clinic.book(clinic.patient("E1"), after=utc(2026, 3, 4, 14))
    assert appointment.status == "booked"
    verdict = appointment.eligibility
    assert (verdict["decision"], verdict["outcome"], verdict["copay"], verdict["source"]) == \
        ("allow", "eligible", 40.0, "eligibility")
    assert verdict["service_date"] == "2026-03-04" and verdict["stage"] == "booking"


@pytest.mark.parametrize("case, finding", [
    ("expired", "ended 2026-03-01"),
    ("no coverage", "no coverage active on"),
    ("out of network", "Kim Lee is out of network acme-ppo"),
    ("prior auth", "prior authorisation required for procedure"),
    ("unknown payer", "no rules for payer OTHER"),
])
def test_failures_are_held_for_review_and_reach_front_desk_and_billing(clinic, case, finding):
    patient = {
        "expired": lambda: clinic.patient("E2", expiry=date(2026, 3, 1)),
        "no coverage": lambda: clinic.patient("E3", payer=None),
        "out of network": lambda: clinic.patient("E4"),
        "prior auth": lambda: clinic.patient("E5"),
        "unknown payer": lambda: clinic.patient("E6", payer="OTHER"),
    }[case]()
    if case == "out of network":
        appointment = clinic.book(patient, "DRLEE")
    elif case == "prior auth":
        appointment = clinic.book(patient, "DRJONES", slot_type="procedure")
    else:
        appointment = clinic.book(patient)
    assert appointment.status == "held" and appointment.hold_expires_at is None
    assert appointment.eligibility["decision"] == "review"
    assert any(finding in f for f in appointment.eligibility["findings"]), appointment.eligibility
    assert appointment.review_reason.startswith("eligibility: ")
    for team in ("front_desk", "billing"):
        [notice] = notices(clinic.scheduler, team)
        assert notice.appointment_id == appointment.id and finding in notice.payload["text"]


def test_coverage_is_checked_again_before_the_visit(clinic, slotengine_clock, slotengine_jobs, smtp_sink):
    patient = clinic.patient("E7", expiry=date(2026, 3, 31))
    appointment = clinic.book(patient, after=utc(2026, 3, 12, 14))
    with clinic.scheduler.sessions() as session:
        [task] = session.scalars(select(PluginTask).where(PluginTask.plugin == "eligibility"))
    assert task.due_at == appointment.start - timedelta(hours=48) and task.kind == "recheck"
    # the payer ends the coverage early; the re-check finds it
    from engine.requests import CoverageRecord
    clinic.scheduler.record_coverage(patient.id, CoverageRecord(payer_id="ACME", member_id="ME7", plan_id="PPO",
                                                                effective_date=date(2025, 1, 1),
                                                                expiry_date=date(2026, 3, 9)), STAFF)
    slotengine_clock.set(task.due_at)
    assert slotengine_jobs.run("eligibility.recheck") == "ok: 1 appointments re-checked"
    with clinic.scheduler.sessions() as session:
        checked = session.get(Appointment, appointment.id)
        assert checked.status == "booked"  # staff decide; the visit keeps its time
        assert checked.eligibility["stage"] == "recheck" and checked.eligibility["decision"] == "review"
        assert "ended 2026-03-09" in " ".join(checked.eligibility["findings"])
        assert session.get(PluginTask, task.id).status == "done"
    slotengine_jobs.run("notices.send")
    assert any("needs review before the visit" in m["Subject"] for m in smtp_sink.to("desk@clinic.example.org"))
    assert slotengine_jobs.run("eligibility.recheck") == "ok: 0 appointments re-checked"  # once


def test_a_reschedule_replans_the_recheck(clinic):
    patient = clinic.patient("E8")
    appointment = clinic.book(patient, after=utc(2026, 3, 12, 14))
    later = clinic.slots("DRSMITH", after=utc(2026, 3, 13, 14))[0]
    clinic.scheduler.reschedule(appointment.id, BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                                slot_id=later.id), STAFF)
    with clinic.scheduler.sessions() as session:
        tasks = list(session.scalars(select(PluginTask).where(PluginTask.appointment_id == appointment.id,
                                                             PluginTask.plugin == "eligibility")))
    assert sorted((t.status, t.due_at) for t in tasks) == [("pending", later.start - timedelta(hours=48)),
                                                           ("withdrawn", appointment.start - timedelta(hours=48))]


class Clearinghouse:
    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def slotengine_verify_coverage(self, session, appointment, patient, coverages, service_date):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer, status, source", [
    ({"outcome": "eligible", "findings": [], "copay": 12.5}, "booked", "clearinghouse"),
    ({"outcome": "ineligible", "findings": ["member not found"]}, "held", "clearinghouse"),
    (TimeoutError("clearinghouse timed out"), "held", "clearinghouse"),  # fails closed
    (None, "booked", "eligibility"),  # not answered: the built-in rules decide
])
def test_a_vendor_clearinghouse_answers_before_the_builtin_rules(slotengine_scheduler, slotengine_plugin_settings,
                                                                  answer, status, source):
    from engine.jobs import make_context
    from tests.plugins.helpers import Clinic

    slotengine_scheduler.plugins = PluginHost(discover=False, extra=[("clearinghouse", Clearinghouse(answer))])
    make_context(slotengine_scheduler, plugin_settings=slotengine_plugin_settings)
    clinic = Clinic(slotengine_scheduler)
    appointment = clinic.book(clinic.patient("E9"))
    assert appointment.status == status and appointment.eligibility["source"] == source
