"""Referral routing: from a referring provider's request to a booked specialist consult.

A referral (patient, specialty, urgency, payer, referring provider) arrives
through ``receive_referral(context, referral)`` — the HL7 side maps REF^I12
to it — or ``POST /referrals``.  It is routed through
``slotengine_route_referral`` (the first plugin that answers; this plugin's
router answers last): to an in-network specialist (the payer's network in
``Provider.networks``) of the specialty, speaking the patient's language when
one does, preferring the requested location, with the earliest free slot
(``Scheduler.free_slots``).  The consult is booked, or the patient goes on the
waitlist for the specialty; the referring provider hears which (a notice to
``referring_contact`` through the ``referrals`` team's channel).

Status: received → routed → booked | waitlisted → completed (when the
consult completes); ``unroutable`` when no provider fits; a cancelled consult
sets the referral back to ``routed`` for staff.  ``Referral.history`` keeps
each step.

Settings::

    [plugins.referrals]
    appointment_type = "new_patient"
    routine_days = 28           # search window for a routine consult
    urgent_days = 3             # ... for an urgent one (emergency holds allowed)
    waitlist_minutes = 30       # duration asked for on the waitlist
    networks = { ACME = "acme-ppo" }   # payer id -> network name (default: the payer id)
    sweep_seconds = 600
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import InvalidRequest, NotFound, SchedulingError, SlotUnavailable
from engine.messaging import local_when
from engine.models import Appointment, Coverage, Location, Patient, Provider, Referral
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Change, SlotQuery

log = logging.getLogger("slotengine.plugins.referrals")

NAME = "referrals"
ACTOR = Actor("plugin", NAME)
OPEN = ("received", "routed", "booked", "waitlisted")
BOOKED = ("booked", "overbooked", "held")


@dataclass(frozen=True)
class Settings:
    appointment_type: str = "new_patient"
    routine_days: float = 28
    urgent_days: float = 3
    waitlist_minutes: int = 30
    networks: dict[str, str] = field(default_factory=dict)
    sweep_seconds: float = 600


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    unknown = set(settings) - set(Settings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"[plugins.referrals]: unknown settings {', '.join(sorted(unknown))}")
    context.state[NAME] = Settings(**{**settings, "networks": dict(settings.get("networks") or {})})


def _step(referral: Referral, status: str, note: str, now: datetime) -> None:
    referral.status, referral.updated_at = status, now
    referral.history = [*(referral.history or []), {"at": now.isoformat(), "status": status, "note": note}]


def as_dict(referral: Referral) -> dict[str, Any]:
    return {
        "id": referral.id, "external_id": referral.external_id, "patient_id": referral.patient_id,
        "specialty": referral.specialty, "urgency": referral.urgency, "payer_id": referral.payer_id,
        "referring_provider": referral.referring_provider, "referring_contact": referral.referring_contact,
        "language": referral.language, "location_id": referral.location_id, "status": referral.status,
        "provider_id": referral.provider_id, "appointment_id": referral.appointment_id,
        "waitlist_id": referral.waitlist_id, "history": list(referral.history or []),
    }


# --- receiving --------------------------------------------------------------------------------


def receive_referral(context, referral: dict[str, Any]) -> int:
    """Record a referral and route it now; returns its id.

    Keys: ``patient_id`` and ``specialty`` (required), ``urgency`` (routine |
    urgent), ``payer_id`` (default: the patient's primary coverage),
    ``referring_provider``, ``referring_contact`` (where the referrer hears
    back), ``reason``, ``language``, ``location_id``, ``external_id`` (a resend
    with the same one returns the first referral)."""
    if not referral.get("patient_id") or not referral.get("specialty"):
        raise InvalidRequest("a referral needs a patient_id and a specialty")
    urgency = referral.get("urgency", "routine")
    if urgency not in ("routine", "urgent"):
        raise InvalidRequest(f"urgency must be routine or urgent, not {urgency!r}")
    now = context.clock.now()
    with context.session_factory() as session, session.begin():
        if referral.get("external_id"):
            known = session.scalar(select(Referral.id).where(Referral.external_id == referral["external_id"]))
            if known is not None:
                return known
        patient = session.get(Patient, int(referral["patient_id"]))
        if patient is None:
            raise NotFound("patient", referral["patient_id"])
        payer_id = referral.get("payer_id")
        if payer_id is None:
            coverage = session.scalars(select(Coverage).where(Coverage.patient_id == patient.id)
                                       .order_by(Coverage.priority, Coverage.id)).first()
            payer_id = coverage.payer_id if coverage else ""
        row = Referral(
            external_id=referral.get("external_id"), patient_id=patient.id, specialty=referral["specialty"],
            urgency=urgency, payer_id=payer_id or "", referring_provider=referral.get("referring_provider", ""),
            referring_contact=referral.get("referring_contact", ""), reason=referral.get("reason", ""),
            language=referral.get("language") or patient.language or "", location_id=referral.get("location_id"),
            status="received", history=[], received_at=now, updated_at=now,
        )
        _step(row, "received", f"from {row.referring_provider or 'unknown referrer'}", now)
        session.add(row)
        session.flush()
        referral_id = row.id
    route(context, referral_id)
    return referral_id


def route(context, referral_id: int) -> str:
    """Route a ``received`` referral: book, waitlist or mark it unroutable; returns its status."""
    settings = _settings(context)
    for _attempt in range(3):
        with context.session_factory() as session:
            view = context.scheduler.within(session)
            with session.begin():
                referral = session.get(Referral, referral_id, with_for_update=True)
                if referral is None:
                    raise NotFound("referral", referral_id)
                if referral.status != "received":
                    return referral.status
                now = context.clock.now()
                decision = context.plugins.route_referral(session, as_dict(referral))
                if decision is None or decision.get("unroutable"):
                    why = (decision or {}).get("unroutable") or "no router answered"
                    _step(referral, "unroutable", why, now)
                    _tell(context, session, referral, f"Referral {referral.id} could not be routed",
                          f"Referral {referral.id} ({referral.specialty}) could not be routed: {why}. "
                          "Staff will contact you.")
                elif decision.get("slot_id"):
                    try:
                        appointment = view.book(BookingRequest(
                            patient_id=referral.patient_id, appointment_type=settings.appointment_type,
                            slot_id=int(decision["slot_id"]), urgency=referral.urgency,
                            reason=f"referral {referral.id}"), Actor("plugin", NAME, f"referral {referral.id}"))
                    except SlotUnavailable:
                        continue  # taken meanwhile: route again
                    referral.provider_id = appointment.provider_id
                    _step(referral, "routed", f"to provider {appointment.provider_id} by {decision.get('plugin')}", now)
                    referral.appointment_id = appointment.id
                    _step(referral, "booked", f"appointment {appointment.id}", now)
                    _tell(context, session, referral, f"Referral {referral.id}: consult booked",
                          f"Referral {referral.id} ({referral.specialty}) is booked: {_consult(session, appointment)}.")
                else:
                    provider_id = decision.get("provider_id")
                    referral.provider_id = provider_id
                    _step(referral, "routed", f"to the {referral.specialty} waitlist by {decision.get('plugin')}", now)
                    entry = view.add_to_waitlist(
                        patient_id=referral.patient_id, appointment_type=settings.appointment_type,
                        duration_minutes=settings.waitlist_minutes, actor=Actor("plugin", NAME, f"referral {referral.id}"),
                        urgency=referral.urgency, provider_id=provider_id, specialty=referral.specialty,
                        location_id=referral.location_id, reason=f"referral {referral.id}")
                    referral.waitlist_id = entry.id
                    _step(referral, "waitlisted", f"waitlist entry {entry.id}", now)
                    _tell(context, session, referral, f"Referral {referral.id}: patient waitlisted",
                          f"Referral {referral.id} ({referral.specialty}): no in-network slot in the next "
                          f"{_days(settings, referral)} days; the patient is on the waitlist and will be booked "
                          "when a slot frees.")
                status = referral.status
            view.notify_committed()
            return status
    return "received"


def _days(settings: Settings, referral: Referral) -> int:
    return int(settings.urgent_days if referral.urgency == "urgent" else settings.routine_days)


def _consult(session: Session, appointment: Appointment) -> str:
    provider = session.get(Provider, appointment.provider_id) if appointment.provider_id else None
    location = session.get(Location, appointment.location_id) if appointment.location_id else None
    when = local_when(appointment.start, location.timezone if location else "UTC")
    held = " (held for staff review)" if appointment.status == "held" else ""
    return f"{provider.display_name if provider else 'a specialist'} on {when}" + \
        (f" at {location.name}" if location else "") + held


def _tell(context, session: Session, referral: Referral, subject: str, text: str) -> None:
    """A notice to the referring provider (their contact, else the referrals team's address)."""
    context.plugins.staff_notice(session, {
        "team": "referrals", "subject": subject, "text": text, "patient_id": referral.patient_id,
        "appointment_id": referral.appointment_id, **({"address": referral.referring_contact}
                                                       if referral.referring_contact else {}),
    })


# --- the built-in router --------------------------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_route_referral(session: Session, referral: dict[str, Any], context) -> Optional[dict[str, Any]]:
    settings = _settings(context)
    if settings is None:
        return None
    specialty = referral["specialty"]
    providers = [p for p in session.scalars(select(Provider).where(Provider.active.is_(True)).order_by(Provider.id))
                 if specialty in (p.specialties or [])]
    if not providers:
        return {"unroutable": f"no active {specialty} provider"}
    payer = referral.get("payer_id") or ""
    if payer:
        network = settings.networks.get(payer, payer)
        providers = [p for p in providers if network in (p.networks or [])]
        if not providers:
            return {"unroutable": f"no {specialty} provider in network {network} (payer {payer})"}
    language = (referral.get("language") or "").lower()
    if language and language != "en":
        speaking = [p for p in providers if language in [x.lower() for x in (p.languages or [])]]
        providers = speaking or providers
    now = context.clock.now()
    days = settings.urgent_days if referral.get("urgency") == "urgent" else settings.routine_days
    best: Optional[tuple[Any, ...]] = None
    search = context.scheduler.within(session)  # the search joins the routing transaction
    for provider in providers:
        found = search.free_slots(SlotQuery(
            appointment_type=settings.appointment_type, start=now, end=now + timedelta(days=days),
            provider_id=provider.id, patient_id=referral["patient_id"], urgency=referral.get("urgency", "routine"),
            limit=1))
        if found:
            away = 0 if referral.get("location_id") in (None, found[0].location_id) else 1
            key = (found[0].start, away, provider.id, found[0].slot_id)
            best = min(best, key) if best else key
    if best is not None:
        return {"provider_id": best[2], "slot_id": best[3]}
    return {"waitlist": True, "provider_id": providers[0].id if len(providers) == 1 else None}


# --- following the consult ----------------------------------------------------------------------------


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    if _settings(context) is None or change.appointment_id is None:
        return
    now = context.clock.now()
    linked = session.scalars(select(Referral).where(Referral.appointment_id == change.appointment_id)).first()
    if change.kind == "booked" and linked is None and change.to_state in BOOKED:
        appointment = session.get(Appointment, change.appointment_id)
        provider = session.get(Provider, appointment.provider_id) if appointment.provider_id else None
        if provider is None or appointment.patient_id is None or appointment.reason.startswith("referral "):
            return  # the routing of another referral booked it
        waiting = session.scalars(select(Referral).where(
            Referral.patient_id == appointment.patient_id, Referral.status == "waitlisted",
            Referral.specialty.in_(provider.specialties or [])).order_by(Referral.received_at)).first()
        if waiting is not None:
            waiting.appointment_id, waiting.provider_id = appointment.id, provider.id
            _step(waiting, "booked", f"appointment {appointment.id} ({change.actor.label})", now)
            _tell(context, session, waiting, f"Referral {waiting.id}: consult booked",
                  f"Referral {waiting.id} ({waiting.specialty}) is booked: {_consult(session, appointment)}.")
    elif linked is None:
        return
    elif change.kind == "completed":
        _step(linked, "completed", f"appointment {change.appointment_id} completed", now)
        _tell(context, session, linked, f"Referral {linked.id}: consult completed",
              f"The consult for referral {linked.id} ({linked.specialty}) took place.")
    elif change.kind == "completion_reversed":
        _step(linked, "booked", "completion reversed", now)
    elif change.kind in ("cancelled", "no_show", "discontinued", "deleted", "hold_expired"):
        _step(linked, "routed", f"consult appointment {change.appointment_id} {change.kind}; to be rebooked", now)
        linked.appointment_id = None
        context.plugins.staff_notice(session, {
            "team": "referrals", "subject": f"Referral {linked.id}: consult {change.kind}",
            "text": f"The consult for referral {linked.id} ({linked.specialty}) was {change.kind}; "
                    "the referral is open again.", "patient_id": linked.patient_id})


def route_pending(context) -> str:
    with context.session_factory() as session:
        ids = list(session.scalars(select(Referral.id).where(Referral.status == "received")
                                   .order_by(Referral.received_at).limit(50)))
    statuses = [route(context, referral_id) for referral_id in ids]
    return f"{len(statuses)} referrals routed"


def referral_status(context, referral_id: int) -> dict[str, Any]:
    with context.session_factory() as session:
        referral = session.get(Referral, referral_id)
        if referral is None:
            raise NotFound("referral", referral_id)
        return as_dict(referral)


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("referrals.route_pending", route_pending, seconds=settings.sweep_seconds)


def _post(context):
    def handle(body: bytes, headers: dict[str, str], query: dict[str, str]) -> tuple[int, dict]:
        try:
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError("not an object")
            referral_id = receive_referral(context, data)
        except ValueError as exc:
            return 400, {"error": f"the body must be a JSON object ({exc})"}
        except InvalidRequest as exc:
            return 400, {"error": str(exc)}
        except NotFound as exc:
            return 404, {"error": str(exc)}
        except SchedulingError as exc:
            return 409, {"error": str(exc), "code": exc.code}
        return 201, referral_status(context, referral_id)
    return handle


@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    if _settings(context) is not None:
        register("POST", "/referrals", _post(context))  # no GET: GET routes are served without auth
