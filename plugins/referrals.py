"""Referral routing: from a referring provider's request to a booked specialist consult.

A referral (patient, specialty, urgency, payer, referring provider) arrives
through ``receive_referral(context, referral)`` or ``POST /referrals`` (a
transaction of their own), or through the hook
``slotengine_referral_received`` inside the caller's transaction — the HL7
side maps REF^I12 to it (``hl7.mapping``).  All of them end in
``accept_referral(context, session, referral, view)``: record the referral,
then route it in the same transaction.  It is routed through
``slotengine_route_referral`` (the first plugin that answers; this plugin's
router answers last): to an in-network specialist (the payer's network in
``Provider.networks``) of the specialty — the referred-to provider first when
the referral names one (``preferred_provider_id``) and they have a slot in the
window —, speaking the patient's language when one does, preferring the
requested location, with the earliest free slot (``Scheduler.free_slots``).
The consult is booked, or the patient goes on the waitlist for the specialty;
the referring provider hears which (a notice to ``referring_contact`` through
the ``referrals`` team's channel).  Routing runs in a savepoint: an engine
refusal (a vetoed booking) makes the referral ``unroutable`` with the reason;
any other failure leaves it ``received``, and the sweep
``referrals.route_pending`` routes it later — the recorded referral is the
durable to-do.

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
from functools import cache
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import bindparam, event, false, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from engine.db import Direct
from engine.errors import InvalidRequest, NotFound, SchedulingError, SlotUnavailable
from engine.messaging import follow_registrations, kept, local_when, registered_in_transaction
from engine.models import Appointment, Coverage, Location, Patient, Provider, Referral
from engine.plugin import hookimpl
from engine.requests import Actor, BookingRequest, Change, SlotQuery

log = logging.getLogger("slotengine.plugins.referrals")

NAME = "referrals"
ACTOR = Actor("plugin", NAME)
OPEN = ("received", "routed", "booked", "waitlisted")
BOOKED = ("booked", "overbooked", "held")
#: Changes to a consult that its referral follows.
FOLLOWED = ("completed", "completion_reversed", "cancelled", "no_show", "discontinued", "deleted", "hold_expired")


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
        "preferred_provider_id": next((step["preferred_provider_id"] for step in referral.history or []
                                       if step.get("preferred_provider_id")), None),
    }


# --- receiving --------------------------------------------------------------------------------


def receive_referral(context, referral: dict[str, Any]) -> int:
    """Record a referral and route it now, in one transaction of its own; returns its id.

    Keys: ``patient_id`` and ``specialty`` (required), ``urgency`` (routine |
    urgent), ``payer_id`` (default: the patient's primary coverage),
    ``referring_provider``, ``referring_contact`` (where the referrer hears
    back), ``reason``, ``language``, ``location_id``, ``preferred_provider_id``,
    ``external_id`` (a resend with the same one returns the first referral),
    ``source``.  The HL7 side (``REF^I12``) records referrals through the hook
    ``slotengine_referral_received`` inside the message's transaction; both
    end in ``accept_referral``."""
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            referral_id = accept_referral(context, session, referral, view)
        view.notify_committed()
    return referral_id


@hookimpl(trylast=True)
def slotengine_referral_received(session: Session, referral: dict[str, Any], context) -> Optional[int]:
    """Record and route the referral inside the caller's transaction (an HL7 message's)."""
    if _settings(context) is None:
        return None
    view = context.scheduler.within(session)
    referral_id = accept_referral(context, session, referral, view)
    _notify_when_committed(session, view)
    return referral_id


def accept_referral(context, session: Session, referral: dict[str, Any], view) -> int:
    """Record a referral in ``session`` and route it in the same transaction; returns its id.

    Recording errors (no patient, no specialty, an unknown urgency) raise:
    the caller's transaction fails.  Routing runs in a savepoint (see
    ``route_within``) and never fails the caller: an engine refusal makes the
    referral ``unroutable`` (staff and the referrer are told), anything else
    leaves it ``received`` for the sweep ``referrals.route_pending``, so a
    recorded referral is never lost.  A resend (same ``external_id``) returns
    the first referral's id and changes nothing."""
    referral_id, created = record_referral(context, session, referral)
    if created:
        route_within(context, session, referral_id, view)
    return referral_id


def record_referral(context, session: Session, referral: dict[str, Any]) -> tuple[int, bool]:
    """Insert a ``received`` referral through ``session`` (no commit); returns
    (id, created).  ``created`` is False for a resend of a known ``external_id``."""
    if not referral.get("patient_id") or not referral.get("specialty"):
        raise InvalidRequest("a referral needs a patient_id and a specialty")
    urgency = referral.get("urgency") or "routine"
    if urgency not in ("routine", "urgent"):
        raise InvalidRequest(f"urgency must be routine or urgent, not {urgency!r}")
    external_id = referral.get("external_id") or None
    if external_id:
        known = session.scalar(select(Referral.id).where(Referral.external_id == external_id))
        if known is not None:
            return known, False
    now = context.clock.now()
    patient = session.get(Patient, int(referral["patient_id"]))
    if patient is None:
        raise NotFound("patient", referral["patient_id"])
    payer_id = referral.get("payer_id")
    if payer_id is None:
        coverage = session.scalars(select(Coverage).where(Coverage.patient_id == patient.id)
                                   .order_by(Coverage.priority, Coverage.id)).first()
        payer_id = coverage.payer_id if coverage else ""
    row = Referral(
        external_id=external_id, patient_id=patient.id, specialty=referral["specialty"],
        urgency=urgency, payer_id=payer_id or "", referring_provider=referral.get("referring_provider") or "",
        referring_contact=referral.get("referring_contact") or "", reason=referral.get("reason") or "",
        language=referral.get("language") or patient.language or "", location_id=referral.get("location_id"),
        status="received", history=[], received_at=now, updated_at=now,
    )
    source = referral.get("source")
    _step(row, "received", f"from {row.referring_provider or 'unknown referrer'}" + (f" ({source})" if source else ""),
          now)
    if referral.get("preferred_provider_id"):
        # No column of its own: kept with the first step, where as_dict finds it for the routers.
        row.history = [{**row.history[0], "preferred_provider_id": int(referral["preferred_provider_id"])}]
    registered_in_transaction(session, NAME).discard(patient.id)  # now a booking may be the one they wait for
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # the same external_id, recorded concurrently
        known = session.scalar(select(Referral.id).where(Referral.external_id == external_id)) \
            if external_id else None
        if known is None:
            raise
        return known, False
    return row.id, True


def route(context, referral_id: int) -> str:
    """Route a ``received`` referral in a transaction of its own (the sweep); returns its status."""
    with context.session_factory() as session:
        view = context.scheduler.within(session)
        with session.begin():
            status = route_within(context, session, referral_id, view)
        view.notify_committed()
    return status


def route_within(context, session: Session, referral_id: int, view) -> str:
    """Route a ``received`` referral inside the caller's transaction: book,
    waitlist or mark it unroutable; returns its status.

    ``view`` is ``context.scheduler.within(session)``; the caller delivers
    its after-commit notifications.  Everything happens in a savepoint: a
    refusal of the engine (a vetoed booking…) makes the referral
    ``unroutable`` with the reason, and any other failure rolls the routing
    back and leaves the referral ``received`` for the sweep to try again."""
    referral = session.get(Referral, referral_id, with_for_update=True)
    if referral is None:
        raise NotFound("referral", referral_id)
    if referral.status != "received":
        return referral.status
    for _attempt in range(3):
        announced = len(view._deferred)
        savepoint = session.begin_nested()
        try:
            status = _route_once(context, session, referral, view)
        except SlotUnavailable:
            status = None  # taken meanwhile: route again
        except SchedulingError as exc:
            status = _unroutable(context, session, referral, f"{type(exc).__name__}: {exc}", view, announced,
                                 savepoint)
            return status
        except Exception:  # noqa: BLE001 - the sweep tries again; the referral stays recorded
            log.warning("routing a referral failed; the sweep will try again", exc_info=True,
                        extra={"referral_id": referral_id})
            if savepoint.is_active:
                savepoint.rollback()
            del view._deferred[announced:]
            session.refresh(referral)
            return referral.status
        if status is None:
            if savepoint.is_active:
                savepoint.rollback()
            del view._deferred[announced:]
            session.refresh(referral)
            continue
        savepoint.commit()
        return status
    return referral.status


def _unroutable(context, session: Session, referral: Referral, why: str, view, announced: int, savepoint) -> str:
    if savepoint.is_active:
        savepoint.rollback()
    del view._deferred[announced:]
    session.refresh(referral)
    _step(referral, "unroutable", why, context.clock.now())
    _tell(context, session, referral, f"Referral {referral.id} could not be routed",
          f"Referral {referral.id} ({referral.specialty}) could not be routed: {why}. Staff will contact you.")
    return referral.status


def _route_once(context, session: Session, referral: Referral, view) -> Optional[str]:
    """One routing attempt; ``None`` when the chosen slot was taken meanwhile."""
    settings = _settings(context)
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
            return None
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
    return referral.status


_PENDING = "plugins.referrals.notify_after_commit"


def _notify_when_committed(session: Session, view) -> None:
    """Deliver ``view``'s after-change notifications once the caller's transaction commits.

    The hook does not own the transaction (an HL7 message's), so it cannot
    call ``view.notify_committed()`` itself: session events do, when the
    outermost transaction has ended with a commit.  When it rolls back, or a
    savepoint enclosing the hook's work does, the notifications are dropped.
    The listeners are registered once per session and kept in ``session.info``."""
    if not view._deferred:
        return
    chain = []
    transaction = session.get_nested_transaction() or session.get_transaction()
    while transaction is not None:
        chain.append(transaction)
        transaction = transaction.parent
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        event.listen(session, "after_soft_rollback", _on_soft_rollback)
        event.listen(session, "after_rollback", _on_rollback)
        event.listen(session, "after_commit", _on_commit)
        event.listen(session, "after_transaction_end", _on_transaction_end)
    pending.append({"view": view, "chain": chain, "committed": False, "discarded": False})


def _on_soft_rollback(session: Session, previous) -> None:
    for entry in session.info.get(_PENDING, ()):
        if any(previous is transaction for transaction in entry["chain"]):
            entry["discarded"] = True


def _on_rollback(session: Session) -> None:
    for entry in session.info.get(_PENDING, ()):
        entry["discarded"] = True


def _on_commit(session: Session) -> None:
    if session.get_nested_transaction() is None:  # the outermost transaction, not a savepoint
        for entry in session.info.get(_PENDING, ()):
            entry["committed"] = True


def _on_transaction_end(session: Session, transaction) -> None:
    if transaction.parent is not None or transaction.nested:
        return
    entries, session.info[_PENDING] = session.info.get(_PENDING, []), []
    for entry in entries:
        if entry["committed"] and not entry["discarded"]:
            entry["view"].notify_committed()
        else:
            entry["view"]._deferred.clear()


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
    preferred = [p for p in providers if p.id == referral.get("preferred_provider_id")]
    language = (referral.get("language") or "").lower()
    if language and language != "en":
        speaking = [p for p in providers if language in [x.lower() for x in (p.languages or [])]]
        providers = speaking or providers
    if preferred:  # the referred-to specialist (REF^I12 PRD role RT), in network: their slot when they have one
        providers = preferred + [p for p in providers if p.id != preferred[0].id]
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
            if preferred and provider is preferred[0]:
                return {"provider_id": provider.id, "slot_id": found[0].slot_id}
            best = min(best, key) if best else key
    if best is not None:
        return {"provider_id": best[2], "slot_id": best[3]}
    return {"waitlist": True, "provider_id": providers[0].id if len(providers) == 1 or preferred else None}


# --- following the consult ----------------------------------------------------------------------------


# straight on the driver, for the id only: most bookings have no referral, and the ORM's
# handling of a query for the entity costs more than the query; the one found is then
# loaded by its id
_REFERRALS = Referral.__table__
_LINKED = Direct(select(_REFERRALS.c.id).where(_REFERRALS.c.appointment_id == bindparam("appointment_id"))
                 .order_by(_REFERRALS.c.id).limit(1))


@cache
def _waiting_for(specialties: tuple[str, ...]) -> Direct:
    """The patient's oldest referral waitlisted for one of ``specialties``: ``specialty = … OR …``,
    as an IN list's expanding parameter is rendered into the SQL again at every execution."""
    return Direct(select(_REFERRALS.c.id)
                  .where(_REFERRALS.c.patient_id == bindparam("patient_id"), _REFERRALS.c.status == "waitlisted",
                         or_(false(), *(_REFERRALS.c.specialty == specialty for specialty in specialties)))
                  .order_by(_REFERRALS.c.received_at).limit(1))


def _first_referral(session: Session, query: Direct, params: dict[str, Any]) -> Optional[Referral]:
    found = query.fetch(session, params)
    return session.get(Referral, found[0].id) if found else None


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    if _settings(context) is None:
        return
    without_referrals = follow_registrations(session, NAME, change)
    if change.appointment_id is None:
        return
    now = context.clock.now()
    if change.kind == "booked" and change.to_state in BOOKED:
        _link_waiting(context, session, change, without_referrals, now)
        return
    # routing links a referral to its booking after the booking: an appointment this change
    # created (from "requested") has none yet
    if change.kind not in FOLLOWED or change.from_state == "requested":
        return
    linked = _first_referral(session, _LINKED, {"appointment_id": change.appointment_id})
    if linked is None:
        return
    if change.kind == "completed":
        _step(linked, "completed", f"appointment {change.appointment_id} completed", now)
        _tell(context, session, linked, f"Referral {linked.id}: consult completed",
              f"The consult for referral {linked.id} ({linked.specialty}) took place.")
    elif change.kind == "completion_reversed":
        _step(linked, "booked", "completion reversed", now)
    else:
        _step(linked, "routed", f"consult appointment {change.appointment_id} {change.kind}; to be rebooked", now)
        linked.appointment_id = None
        context.plugins.staff_notice(session, {
            "team": "referrals", "subject": f"Referral {linked.id}: consult {change.kind}",
            "text": f"The consult for referral {linked.id} ({linked.specialty}) was {change.kind}; "
                    "the referral is open again.", "patient_id": linked.patient_id})


def _link_waiting(context, session: Session, change: Change, without_referrals: set[int], now: datetime) -> None:
    """The patient's booking with a specialist is the consult of their referral waitlisted
    for one of the specialist's specialties."""
    appointment = session.get(Appointment, change.appointment_id)
    if not appointment.provider_id or appointment.patient_id is None:
        return
    if appointment.reason.startswith("referral "):
        return  # the routing of another referral booked it
    if appointment.patient_id in without_referrals:
        return  # registered in this transaction, which recorded no referral for them
    if change.from_state != "requested" and \
            _LINKED.fetch(session, {"appointment_id": change.appointment_id}):
        return  # already a referral's consult (one this change created is not yet)
    provider = kept(session, Provider, appointment.provider_id)
    if provider is None or not provider.specialties:
        return
    waiting = _first_referral(session, _waiting_for(tuple(sorted(provider.specialties))),
                              {"patient_id": appointment.patient_id})
    if waiting is not None:
        waiting.appointment_id, waiting.provider_id = appointment.id, provider.id
        _step(waiting, "booked", f"appointment {appointment.id} ({change.actor.label})", now)
        _tell(context, session, waiting, f"Referral {waiting.id}: consult booked",
              f"Referral {waiting.id} ({waiting.specialty}) is booked: {_consult(session, appointment)}.")


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
