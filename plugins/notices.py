"""Staff and billing notices.

Special needs go to the team that handles them (an interpreter, mobility
help, labs before the visit); changes that affect claims or copays
(cancellations, reschedules, no-shows, coverage failures) go to billing.
Other plugins send notices through ``context.plugins.staff_notice(session,
notice)`` (hook ``slotengine_staff_notice``); this plugin turns each into an
outbox row for the team's channel, in the caller's transaction, and a sweep
sends them.

Settings::

    [plugins.notices]
    sweep_seconds = 30
    labs_before_types = ["procedure"]        # appointment types that need labs first
    [plugins.notices.teams.front_desk]
    channel = "email"
    address = "desk@clinic.example"
    [plugins.notices.teams.billing]
    channel = "email"
    address = "billing@clinic.example"
    # interpreters, facilities (mobility), lab, referrals, eligibility…
    # a team without an entry goes to teams.default when there is one.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass, field
from typing import Any, Optional

from sqlalchemy.orm import Session

from engine.jobs import dispatch_outbox
from engine.messaging import describe_for_staff
from engine.models import Appointment, OutboxItem, Patient
from engine.plugin import hookimpl
from engine.requests import Change

log = logging.getLogger("slotengine.plugins.notices")

NAME = "notices"
KINDS = ("staff_notice", "billing_notice")
OCCUPIED = ("booked", "overbooked")
#: Changes that affect claims or copays, when the appointment had been booked.
BILLING_CHANGES = ("cancelled", "rescheduled", "no_show", "discontinued", "deleted")
#: Changes after which the teams preparing a visit need to know (again).
PREPARE_CHANGES = ("booked", "rescheduled", "reinstated")


@dataclass(frozen=True)
class Team:
    channel: str
    address: str


@dataclass(frozen=True)
class Settings:
    teams: dict[str, Team] = field(default_factory=dict)
    labs_before_types: tuple[str, ...] = ()
    sweep_seconds: float = 30.0
    batch_size: int = 100

    def route(self, team: str) -> Optional[Team]:
        return self.teams.get(team) or self.teams.get("default")


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    known = {"teams", "labs_before_types", "sweep_seconds", "batch_size"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"[plugins.notices]: unknown settings {', '.join(sorted(unknown))}")
    teams = {}
    for name, team in (settings.get("teams") or {}).items():
        if not team.get("address"):
            raise ValueError(f"[plugins.notices.teams.{name}]: address is required")
        teams[name] = Team(team.get("channel", "email"), team["address"])
    parsed = Settings(teams, tuple(settings.get("labs_before_types", ())), float(settings.get("sweep_seconds", 30)),
                      int(settings.get("batch_size", 100)))
    context.state[NAME] = parsed


@hookimpl(trylast=True)
def slotengine_staff_notice(session: Session, notice: dict[str, Any], context) -> None:
    settings = _settings(context)
    if settings is None:
        return
    team = str(notice.get("team", "front_desk"))
    route = settings.route(team)
    if route is None:
        # A configuration gap, not a failure of the change: say so once per team.
        warned = context.state.setdefault(f"{NAME}.unrouted", set())
        if team not in warned:
            warned.add(team)
            log.warning("staff notices for a team with no route are not sent; configure "
                        f"[plugins.notices.teams.{team}] or teams.default", extra={"team": team})
        return
    session.add(OutboxItem(
        channel=route.channel,
        kind="billing_notice" if team == "billing" else "staff_notice",
        due_at=context.clock.now(),
        status="pending",
        payload={
            "team": team,
            "to": notice.get("address") or route.address,
            "subject": str(notice.get("subject", "")),
            "text": str(notice.get("text", "")),
            "patient_id": notice.get("patient_id"),
        },
        appointment_id=notice.get("appointment_id"),
        attempts=0,
        last_error="",
        created_at=context.clock.now(),
    ))


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    settings = _settings(context)
    if settings is None or change.appointment_id is None:
        return
    described = None
    if change.kind in PREPARE_CHANGES and change.to_state in OCCUPIED:
        described = _needs(session, change, settings, context)
    if change.kind in BILLING_CHANGES and change.from_state in OCCUPIED:
        appointment = session.get(Appointment, change.appointment_id)
        what = {"rescheduled": "moved", "no_show": "a no-show"}.get(change.kind, change.kind)
        text = f"{described or describe_for_staff(session, appointment)} was {what} ({change.actor.label})."
        if change.kind == "rescheduled" and change.detail.get("previous_start"):
            text += f" It was booked for {change.detail['previous_start']} (UTC)."
        if (appointment.eligibility or {}).get("copay") is not None:
            text += f" Estimated copay on file: {appointment.eligibility['copay']}."
        context.plugins.staff_notice(session, {
            "team": "billing", "subject": f"Appointment {appointment.id} {what}", "text": text,
            "appointment_id": appointment.id, "patient_id": appointment.patient_id,
        })


def _needs(session: Session, change: Change, settings: Settings, context) -> Optional[str]:
    """Tell the teams that prepare the visit; returns ``describe_for_staff`` of the
    appointment when it was needed (a move tells billing too)."""
    appointment = session.get(Appointment, change.appointment_id)
    if appointment is None or appointment.patient_id is None:
        return None
    patient = session.get(Patient, appointment.patient_id)
    if not (patient.needs_interpreter or patient.mobility or patient.other_needs
            or appointment.appointment_type in settings.labs_before_types):
        return None
    moved = " (moved)" if change.kind == "rescheduled" else ""
    what = describe_for_staff(session, appointment)
    notices = []
    if patient.needs_interpreter:
        notices.append(("interpreters", f"Interpreter needed{moved}",
                        f"An interpreter ({patient.language or 'language not recorded'}) is needed for {what}."))
    if patient.mobility or patient.other_needs:
        needs = ", ".join(x for x in (f"mobility {patient.mobility}" if patient.mobility else "",
                                      patient.other_needs) if x)
        notices.append(("facilities", f"Access needs{moved}", f"{what}: {needs}."))
    if appointment.appointment_type in settings.labs_before_types:
        notices.append(("lab", f"Labs before the visit{moved}",
                        f"Labs are to be drawn before {what} ({appointment.appointment_type})."))
    for team, subject, text in notices:
        context.plugins.staff_notice(session, {
            "team": team, "subject": subject, "text": text,
            "appointment_id": appointment.id, "patient_id": patient.id,
        })
    return what


def _render(session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    return {
        item.id: {"id": f"outbox-{item.id}", "to": item.payload["to"], "subject": item.payload.get("subject", ""),
                  "text": item.payload.get("text", ""), "kind": item.kind, "language": "en"}
        for item in items
    }


def send_notices(context) -> str:
    settings = _settings(context)
    sent = dispatch_outbox(context, kinds=KINDS, render=_render, batch_size=settings.batch_size if settings else 100)
    return f"{sent} notices sent"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("notices.send", send_notices, seconds=settings.sweep_seconds)
