"""Eligibility: is the patient's coverage good for this visit?

Checked when a booking is made (``slotengine_check_booking``) and again a
configurable time before the visit (sweep ``eligibility.recheck``).  The
verdict comes from ``slotengine_verify_coverage`` — the first plugin that
answers; this plugin's payer rules answer last (``trylast``), so a vendor's
clearinghouse check (X12 270/271, a payer API) replaces them by implementing
that one hook.  Anything but ``eligible`` holds the booking for staff review
(fails closed) and tells the front desk and billing.  The outcome and
findings are recorded on ``Appointment.eligibility``::

    {"decision": "allow" | "review", "outcome": "eligible" | "ineligible" | "unknown" | "error",
     "findings": [...], "copay": 30.0, "coverage_id": 4, "source": "eligibility",
     "stage": "booking" | "recheck", "service_date": "2026-03-03", "checked_at": "..."}

Settings::

    [plugins.eligibility]
    recheck_hours = 48          # re-check this long before the visit (0: never)
    require_coverage = true     # no active coverage → review (false: self-pay allowed)
    unknown_payer = "review"    # a payer with no rules below: review | allow
    sweep_seconds = 300
    [plugins.eligibility.payers.ACME]
    network = "acme-ppo"                 # providers must list it in Provider.networks
    referral_required = false
    prior_auth_types = ["procedure"]     # appointment types needing prior authorisation
    copay = { default = 25, procedure = 100 }
    [plugins.eligibility.payers.ACME.plans.GOLD]   # a plan's own rules override its payer's
    network = "acme-gold"
    referral_required = true
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from datetime import date, timedelta
from typing import Any, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.calendar import zone
from engine.jobs import plan_task, sweep_tasks, withdraw_tasks
from engine.models import Appointment, Coverage, Location, Patient, PluginTask, Provider, Referral
from engine.plugin import hookimpl
from engine.requests import Change

NAME = "eligibility"
RULE_KEYS = {"network", "referral_required", "prior_auth_types", "copay"}
BAD_VERIFICATION = {"invalid", "inactive", "denied", "terminated"}
BOOKED = ("booked", "overbooked")


@dataclass(frozen=True)
class Settings:
    recheck_hours: float = 48.0
    require_coverage: bool = True
    unknown_payer: str = "review"
    sweep_seconds: float = 300.0
    payers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rules(self, payer_id: str, plan_id: str) -> Optional[dict[str, Any]]:
        payer = self.payers.get(payer_id)
        if payer is None:
            return None
        rules = {k: v for k, v in payer.items() if k in RULE_KEYS}
        rules.update({k: v for k, v in (payer.get("plans") or {}).get(plan_id, {}).items() if k in RULE_KEYS})
        return rules


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    known = {"recheck_hours", "require_coverage", "unknown_payer", "sweep_seconds", "payers"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"[plugins.eligibility]: unknown settings {', '.join(sorted(unknown))}")
    if settings.get("unknown_payer", "review") not in ("review", "allow"):
        raise ValueError("[plugins.eligibility].unknown_payer: review or allow")
    payers = settings.get("payers") or {}
    for payer_id, payer in payers.items():
        bad = set(payer) - RULE_KEYS - {"plans", "name"}
        if bad:
            raise ValueError(f"[plugins.eligibility.payers.{payer_id}]: unknown rules {', '.join(sorted(bad))}")
        for plan_id, plan in (payer.get("plans") or {}).items():
            bad = set(plan) - RULE_KEYS - {"name"}
            if bad:
                raise ValueError(f"[plugins.eligibility.payers.{payer_id}.plans.{plan_id}]: unknown rules "
                                 f"{', '.join(sorted(bad))}")
    context.state[NAME] = Settings(
        recheck_hours=float(settings.get("recheck_hours", 48)),
        require_coverage=bool(settings.get("require_coverage", True)),
        unknown_payer=settings.get("unknown_payer", "review"),
        sweep_seconds=float(settings.get("sweep_seconds", 300)),
        payers=payers,
    )


# --- the built-in payer rules -----------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_verify_coverage(session: Session, appointment: Appointment, patient: Patient,
                               coverages: list[Coverage], service_date: date, context) -> Optional[dict[str, Any]]:
    settings = _settings(context)
    if settings is None:
        return None
    findings: list[str] = []
    active = [c for c in coverages if c.active_on(service_date)
              and (c.verification_status or "").lower() not in BAD_VERIFICATION]
    if not active:
        for c in coverages:
            if c.expiry_date and c.expiry_date < service_date:
                findings.append(f"coverage {c.payer_id} {c.member_id} ended {c.expiry_date.isoformat()}")
            elif c.effective_date and c.effective_date > service_date:
                findings.append(f"coverage {c.payer_id} {c.member_id} starts {c.effective_date.isoformat()}")
            elif (c.verification_status or "").lower() in BAD_VERIFICATION:
                findings.append(f"coverage {c.payer_id} {c.member_id} is {c.verification_status}")
        if not settings.require_coverage:
            return {"outcome": "eligible", "findings": findings + ["self-pay"], "copay": None, "coverage_id": None}
        findings.append(f"no coverage active on {service_date.isoformat()}")
        return {"outcome": "ineligible", "findings": findings, "copay": None, "coverage_id": None}
    coverage = min(active, key=lambda c: c.priority)
    rules = settings.rules(coverage.payer_id, coverage.plan_id)
    if rules is None:
        if settings.unknown_payer == "allow":
            return {"outcome": "eligible", "findings": [], "copay": None, "coverage_id": coverage.id}
        return {"outcome": "unknown", "findings": [f"no rules for payer {coverage.payer_id}"], "copay": None,
                "coverage_id": coverage.id}
    if rules.get("referral_required"):
        referral = session.scalar(select(Referral.id).where(
            Referral.patient_id == patient.id, Referral.status.not_in(("cancelled", "unroutable"))).limit(1))
        if referral is None:
            findings.append(f"{coverage.payer_id} {coverage.plan_id or ''}".strip() + " requires a referral")
    if appointment.appointment_type in (rules.get("prior_auth_types") or ()):
        findings.append(f"prior authorisation required for {appointment.appointment_type}")
    network = rules.get("network")
    if network and appointment.provider_id is not None:
        provider = session.get(Provider, appointment.provider_id)
        if provider is not None and network not in (provider.networks or []):
            findings.append(f"{provider.display_name} is out of network {network}")
    copay_table = rules.get("copay") or {}
    copay = copay_table.get(appointment.appointment_type, copay_table.get("default"))
    return {"outcome": "ineligible" if findings else "eligible", "findings": findings,
            "copay": float(copay) if copay is not None else None, "coverage_id": coverage.id}


# --- when it runs ---------------------------------------------------------------------------


def service_date(session: Session, appointment: Appointment, default_tz: str) -> date:
    location = session.get(Location, appointment.location_id) if appointment.location_id else None
    return appointment.start.astimezone(zone(location.timezone if location else default_tz)).date()


def check(session: Session, appointment: Appointment, patient: Patient, context, stage: str) -> dict[str, Any]:
    """Verify, record the verdict on the appointment, tell staff when it is not eligible."""
    now = context.clock.now()
    day = service_date(session, appointment, context.scheduler.settings.default_timezone)
    coverages = list(session.scalars(select(Coverage).where(Coverage.patient_id == patient.id)
                                     .order_by(Coverage.priority, Coverage.id)))
    result = context.plugins.verify_coverage(session, appointment, patient, coverages, day)
    decision = "allow" if result["outcome"] == "eligible" else "review"
    appointment.eligibility = {
        "decision": decision, "outcome": result["outcome"], "findings": list(result.get("findings") or []),
        "copay": result.get("copay"), "coverage_id": result.get("coverage_id"), "source": result.get("source", ""),
        "stage": stage, "service_date": day.isoformat(), "checked_at": now.isoformat(),
    }
    if decision == "review":
        findings = "; ".join(appointment.eligibility["findings"]) or result["outcome"]
        when = f"{day.isoformat()} ({appointment.appointment_type})"
        held = "held for review" if stage == "booking" else "needs review before the visit"
        for team in ("front_desk", "billing"):
            context.plugins.staff_notice(session, {
                "team": team,
                "subject": f"Coverage check failed: appointment {appointment.id or 'new'} {held}",
                "text": f"Patient {patient.family_name}, {patient.given_name} (id {patient.id}), visit {when}: "
                        f"{findings}. Verdict from {result.get('source') or 'no verifier'}.",
                "appointment_id": appointment.id, "patient_id": patient.id,
            })
    return appointment.eligibility


@hookimpl(trylast=True)
def slotengine_check_booking(session: Session, appointment: Appointment, patient: Optional[Patient], action: str,
                             context) -> Optional[dict[str, str]]:
    if _settings(context) is None or patient is None:
        return None
    verdict = check(session, appointment, patient, context, "booking")
    if verdict["decision"] == "allow":
        return None
    return {"decision": "review", "reason": "; ".join(verdict["findings"]) or verdict["outcome"]}


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    settings = _settings(context)
    if settings is None or change.appointment_id is None or not settings.recheck_hours:
        return
    if change.kind in ("rescheduled", "cancelled", "no_show", "discontinued", "deleted", "hold_expired") \
            and change.from_state != "requested":  # one this change created has no recheck planned yet
        withdraw_tasks(session, plugin=NAME, kinds=("recheck",), appointment_id=change.appointment_id)
    if change.to_state in BOOKED and change.kind in ("booked", "rescheduled", "reinstated", "no_show_reversed"):
        appointment = session.get(Appointment, change.appointment_id)
        now = context.clock.now()
        due = appointment.start - timedelta(hours=settings.recheck_hours)
        if due > now:  # booked closer than that: the booking check is recent enough
            plan_task(session, plugin=NAME, kind="recheck", due_at=due, now=now, appointment_id=appointment.id,
                      payload={"start": appointment.start.isoformat()},
                      dedupe_key=f"{NAME}:recheck:{appointment.id}:{appointment.start.isoformat()}")


def _recheck(context, session: Session, task: PluginTask, scheduler) -> None:
    appointment = session.get(Appointment, task.appointment_id, with_for_update=True)
    if appointment is None or appointment.status not in BOOKED or appointment.patient_id is None:
        return  # nothing to check any more
    patient = session.get(Patient, appointment.patient_id)
    verdict = check(session, appointment, patient, context, "recheck")
    if verdict["decision"] == "review":
        appointment.review_reason = f"{NAME}: " + ("; ".join(verdict["findings"]) or verdict["outcome"])


def recheck_due(context) -> str:
    done = sweep_tasks(context, plugin=NAME, kinds=("recheck",), handle=partial(_recheck, context))
    return f"{done} appointments re-checked"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    if settings.recheck_hours:
        register("eligibility.recheck", recheck_due, seconds=settings.sweep_seconds)
