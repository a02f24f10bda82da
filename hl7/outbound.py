"""Engine changes → outbound SIU (and SRM) over MLLP, store-and-forward.

Three parts:

* **Rendering** (``appointment_view``, ``schedule_segments``, ``build_siu``,
  ``build_srm``): HL7 v2.5.1 segments for an appointment or a blocked time, as
  the SIU_S12 / SRR_S01 / SQR_S25 / SRM_S01 structures want them (hl7apy's
  strict validation is the reference in the tests). Times are written as the
  location's wall-clock time with its UTC offset (exact for everyone, and
  right even for receivers that drop offsets). ``hl7.filler`` renders its SRR
  and SQR answers with the same functions.

* **Enqueueing** (``OutboundSIU``): a plugin object. Its
  ``slotengine_schedule_changed`` runs inside the transaction of every change
  and writes one ``OutboxItem`` per subscribed destination (``channel =
  "mllp:<name>"``, ``kind = "siu"``, ``payload = {"message", "control_id",
  "event", "destination", "change"}``). The SIU text and its control id are
  fixed at that moment: the message describes the appointment as that change
  left it, and a resend carries the same control id. Register it with
  ``PluginHost(extra=[("outbound_siu", OutboundSIU(config.destinations))])``.

  Which event: booked S12 (S14 when this destination already heard of the
  appointment, e.g. a hold under review that staff confirmed) · rescheduled
  S13 (S14 when the start did not move: a change of resources) · arrived,
  checked_in, completed and their reversals, reinstated, modified S14 ·
  cancelled, hold_expired S15 · discontinued S16 · deleted S17 · no_show S26
  · slots_blocked S23 · slots_opened S24. Holds (``held``) are not announced,
  and the end of an appointment never announced to a destination (a hold
  that expires) is not announced either. Waitlist entries, patients, coverage
  and ``attendance_confirmed`` are not schedule changes: no SIU. Appointments
  copied from the EHR in mirror mode (``source = "mirror"``) are not echoed
  unless ``OutboundSettings.announce_mirrored``.

  Destination filters (``DestinationConfig``): ``events`` (empty: all);
  ``locations`` / ``providers`` codes (empty: all), matched against the
  appointment after the change *or before it* — a destination hears that an
  appointment left its location or provider. Blocked time matches on the
  blocked provider (or resource) and its location.

* **Delivery** (``OutboundDispatcher``): one asyncio task and one persistent
  MLLP connection (TLS per ``DestinationTlsConfig``) per destination. Items
  go strictly in outbox-id order per destination, one at a time: the next is
  sent only when the previous one is acknowledged or parked. An ACK counts
  only when its MSA-2 echoes the control id sent; AA/CA marks the item
  ``sent``; AE/AR, a timeout or a broken connection is a failed attempt,
  retried with exponential back-off (same control id). After
  ``max_attempts`` the item is ``parked``: logged at error level and counted
  (``slotengine_outbox_messages_total{outcome="parked"}``); then the
  destination either continues with the next item or stops until an
  operator retries or skips the parked one (``on_park``). Nothing is ever
  deleted. An ACK that is lost after the receiver committed the message
  makes us send it again with the same control id: receivers drop it as a
  duplicate (ours does, by MSH-3/4/10). A crash between receiving AA and
  committing ``sent`` has the same effect.

  Several daemons on one PostgreSQL: a destination is served by one node at
  a time — the one holding a session-level advisory lock for it on a
  dedicated database connection (checked before every send; another node
  takes over when that connection dies). SQLite is one daemon: one task per
  destination in this process is the only sender.

  Order across appointments on PostgreSQL: outbox ids are given at insert,
  so two transactions committing in the other order make the higher id
  visible first; the dispatcher sends what is visible, lowest id first.
  Changes of one appointment are serialised by its row lock, so their SIUs
  are never reordered.

Operator functions for ``slotengine outbox list|show|retry|skip``:
``list_items``, ``show_item``, ``retry_item``, ``skip_item``.

Mirror mode: asking the EHR for a change (``build_srm`` / ``queue_srm``)
-----------------------------------------------------------------------
When the EHR owns the schedule, a plugin must not change our copy and call
it done; it asks the EHR with an SRM, queued in its own transaction and
delivered by the dispatcher in order with that destination's stream::

    from hl7.outbound import OutboundSettings, queue_srm

    @hookimpl
    def slotengine_schedule_changed(session, change, context):
        if change.kind == "cancelled" and change.actor.kind != "message":  # staff cancelled here
            queue_srm(session, change.appointment_id, "S04", "EHR", OutboundSettings(),
                      now=context.clock.now(), reason=change.reason)

For a new booking, hold the time in our copy first with a placer id of
your own (``scheduler.within(session).hold(BookingRequest(...,
placer_id="SE-<uuid>"))``), then ``queue_srm(session, held, "S01", "EHR",
...)``: the EHR's SIU S12 echoes that placer id in SCH-1, so
``hl7.mapping`` updates the held appointment instead of creating a second
one. The EHR's SRR arrives as the acknowledgement: AA → item ``sent`` with
the SRR in ``payload["reply"]``; AE → ``refused`` (not retried). Acting on
the SRR (take the EHR's filler id from its SCH-2, release the hold on AE,
tell staff) is not done here yet: a later issue closes that loop.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time as _time
import uuid
import zlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Optional, Sequence

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from engine.calendar import zone
from engine.clock import Clock, SystemClock
from engine.db import write_pending_rows
from engine.metrics import Metrics
from engine.models import (
    Appointment,
    AppointmentResource,
    AuditEntry,
    Location,
    OutboxItem,
    Patient,
    PatientIdentifier,
    Provider,
    Resource,
    TimeBlock,
)
from engine.plugin import hookimpl
from engine.requests import Actor, Change
from engine.states import HL7_FILLER_STATUS, Status
from hl7.ack import Repeat, build_message
from hl7.config import DestinationConfig
from hl7.framing import MLLPDecoder, frame
from hl7.hl7time import format_dtm
from hl7.mapping import _ei
from hl7.message import NULL, HL7ParseError, parse

__all__ = [
    "CHANNEL_PREFIX",
    "OUTBOUND_KINDS",
    "AppointmentView",
    "BlockView",
    "OutboundDispatcher",
    "OutboundSIU",
    "OutboundSettings",
    "SRM_TRIGGERS_BY_CHANGE",
    "appointment_view",
    "block_view",
    "build_siu",
    "build_srm",
    "channel_for",
    "list_items",
    "new_control_id",
    "queue_srm",
    "retry_item",
    "schedule_segments",
    "show_item",
    "siu_event",
    "skip_item",
]

log = logging.getLogger("slotengine.outbound")

CHANNEL_PREFIX = "mllp:"
#: Outbox kinds the dispatcher delivers over MLLP, in one ordered stream per destination.
OUTBOUND_KINDS = ("siu", "srm")

PENDING, SENT, PARKED, SKIPPED, REFUSED = "pending", "sent", "parked", "skipped", "refused"

#: Event texts (HL7 table 0003) for SCH-6 when a change gives no reason.
EVENT_TEXTS = {
    "S01": "Request new appointment booking", "S02": "Request appointment rescheduling",
    "S03": "Request appointment modification", "S04": "Request appointment cancellation",
    "S05": "Request appointment discontinuation", "S06": "Request appointment deletion",
    "S07": "Request addition of service/resource", "S08": "Request modification of service/resource",
    "S09": "Request cancellation of service/resource", "S10": "Request discontinuation of service/resource",
    "S11": "Request deletion of service/resource",
    "S12": "Notification of new appointment booking", "S13": "Notification of appointment rescheduling",
    "S14": "Notification of appointment modification", "S15": "Notification of appointment cancellation",
    "S16": "Notification of appointment discontinuation", "S17": "Notification of appointment deletion",
    "S23": "Notification of blocked schedule time slots", "S24": "Notification of opened schedule time slots",
    "S25": "Schedule query message and response", "S26": "Notification that patient did not show up",
}

#: Our appointment types as SCH-7 (table 0276) codes and SCH-8 / AIS-3 codes.
_REASON_0276 = {"follow_up": "FOLLOWUP", "emergency": "EMERGENCY"}
TYPE_CODES = {
    "new_patient": ("NEWPATIENT", "New patient"),
    "follow_up": ("FOLLOWUP", "Follow-up"),
    "procedure": ("PROCEDURE", "Procedure"),
    "emergency": ("EMERGENCY", "Emergency"),
    "general": ("GENERAL", "General"),
}

_CHANGE_EVENTS = {
    "booked": "S12",
    "rescheduled": "S13",
    "modified": "S14",
    "arrived": "S14",
    "checked_in": "S14",
    "completed": "S14",
    "arrival_reversed": "S14",
    "check_in_reversed": "S14",
    "completion_reversed": "S14",
    "no_show_reversed": "S14",
    "reinstated": "S14",
    "cancelled": "S15",
    "hold_expired": "S15",
    "discontinued": "S16",
    "deleted": "S17",
    "no_show": "S26",
    "slots_blocked": "S23",
    "slots_opened": "S24",
}
#: States an appointment may have left without any SIU having announced it.
_UNANNOUNCED_STATES = frozenset({Status.REQUESTED.value, Status.HELD.value, Status.WAITLISTED.value, ""})

#: Mirror mode: which SRM trigger asks the EHR for a change of this kind.
SRM_TRIGGERS_BY_CHANGE = {"booked": "S01", "rescheduled": "S02", "modified": "S03", "cancelled": "S04",
                          "discontinued": "S05", "deleted": "S06"}


@dataclass(frozen=True)
class OutboundSettings:
    """How outbound messages are written and delivered (one set for all destinations)."""

    application: str = "SLOTENGINE"
    """MSH-3, SCH-16 (filler contact), and the namespace of our filler ids (SCH-2.2)."""
    facility: str = ""
    """MSH-4."""
    version: str = "2.5.1"
    default_timezone: str = "UTC"
    """Wall-clock zone for times of things that have no location."""
    max_attempts: int = 10
    """Failed attempts (AE/AR, timeout, no connection) before an item is parked."""
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    ack_timeout: float = 30.0
    connect_timeout: float = 10.0
    on_park: str = "continue"
    """``continue``: send the next item; ``stop``: hold the destination until the parked item is retried or skipped."""
    poll_interval: float = 1.0
    """How often an idle destination looks for new items (``wake()`` is immediate)."""
    announce_mirrored: bool = False
    """Also announce appointments copied from the EHR in mirror mode."""

    def __post_init__(self) -> None:
        if self.on_park not in ("continue", "stop"):
            raise ValueError(f"on_park must be 'continue' or 'stop', not {self.on_park!r}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``."""
        return min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempts - 1)))


def channel_for(destination: str) -> str:
    return CHANNEL_PREFIX + destination


def new_control_id() -> str:
    """MSH-10 for an outbound message: 20 characters (ST 20 in v2.5.1), unique."""
    return uuid.uuid4().hex[:20].upper()


# --- what a message says about an appointment -------------------------------------------


@dataclass(frozen=True)
class PartyView:
    code: str
    name: str = ""
    given: str = ""
    kind: str = ""


@dataclass(frozen=True)
class PatientView:
    identifiers: tuple[tuple[str, str, str], ...]  # value, authority, type
    family_name: str = ""
    given_name: str = ""
    birth_date: Optional[Any] = None
    sex: str = ""
    confidential: bool = False


@dataclass(frozen=True)
class AppointmentView:
    """An appointment as messages describe it: plain values, no ORM objects."""

    id: int
    placer_id: Optional[str]
    filler_id: Optional[str]
    status: str
    start: datetime
    end: datetime
    appointment_type: str
    reason: str
    urgency: str
    notes: str
    timezone: str
    source: str = ""
    review_reason: str = ""
    patient: Optional[PatientView] = None
    provider: Optional[PartyView] = None
    location: Optional[PartyView] = None
    resources: tuple[PartyView, ...] = ()

    @property
    def minutes(self) -> int:
        return max(0, int((self.end - self.start).total_seconds() // 60))

    @property
    def filler_status(self) -> str:
        return HL7_FILLER_STATUS[Status(self.status)]


@dataclass(frozen=True)
class BlockView:
    id: int
    start: datetime
    end: datetime
    reason: str
    timezone: str
    provider: Optional[PartyView] = None
    resource: Optional[PartyView] = None
    location: Optional[PartyView] = None


def _location_party(session: Session, location_id: Optional[int]) -> tuple[Optional[PartyView], Optional[str]]:
    if location_id is None:
        return None, None
    row = session.get(Location, location_id)
    if row is None:
        return None, None
    return PartyView(row.code, row.name), row.timezone


def _patient_view(session: Session, patient_id: Optional[int]) -> Optional[PatientView]:
    if patient_id is None:
        return None
    patient = session.get(Patient, patient_id)
    if patient is None:
        return None
    identifiers = tuple(session.execute(
        select(PatientIdentifier.value, PatientIdentifier.authority, PatientIdentifier.type_code)
        .where(PatientIdentifier.patient_id == patient_id).order_by(PatientIdentifier.id)).all())
    return PatientView(tuple(tuple(i) for i in identifiers), patient.family_name or "", patient.given_name or "",
                       patient.birth_date, patient.sex or "", bool(patient.confidential))


def appointment_view(session: Session, appointment_id: int, *, default_timezone: str = "UTC") -> AppointmentView:
    """Read one appointment (and its patient, provider, location, resources) through ``session``:
    three statements, whatever the appointment holds."""
    own_location = Location.__table__.alias("own_location")
    provider_location = Location.__table__.alias("provider_location")
    a, p, pt = Appointment.__table__, Provider.__table__, Patient.__table__
    row = session.execute(
        select(a.c.id, a.c.placer_id, a.c.filler_id, a.c.status, a.c.start, a.c.end, a.c.appointment_type,
               a.c.reason, a.c.urgency, a.c.notes, a.c.source, a.c.review_reason, a.c.patient_id,
               own_location.c.code, own_location.c.name, own_location.c.timezone, provider_location.c.timezone,
               p.c.code, p.c.family_name, p.c.given_name,
               pt.c.family_name, pt.c.given_name, pt.c.birth_date, pt.c.sex, pt.c.confidential)
        .select_from(a.outerjoin(own_location, own_location.c.id == a.c.location_id)
                     .outerjoin(p, p.c.id == a.c.provider_id)
                     .outerjoin(provider_location, provider_location.c.id == p.c.location_id)
                     .outerjoin(pt, pt.c.id == a.c.patient_id))
        .where(a.c.id == appointment_id)).one_or_none()
    if row is None:
        raise LookupError(f"appointment {appointment_id} not found")
    (ident, placer_id, filler_id, status, start, end, appointment_type, reason, urgency, notes, source,
     review_reason, patient_id, location_code, location_name, location_tz, provider_tz, provider_code,
     provider_family, provider_given, family, given, birth_date, sex, confidential) = row
    patient = None
    if patient_id is not None and (family is not None or given is not None):
        identifiers = tuple(tuple(i) for i in session.execute(
            select(PatientIdentifier.value, PatientIdentifier.authority, PatientIdentifier.type_code)
            .where(PatientIdentifier.patient_id == patient_id).order_by(PatientIdentifier.id)))
        patient = PatientView(identifiers, family or "", given or "", birth_date, sex or "", bool(confidential))
    resources = tuple(
        PartyView(code, name, kind=kind) for code, name, kind in session.execute(
            select(Resource.code, Resource.name, Resource.kind)
            .join(AppointmentResource, AppointmentResource.resource_id == Resource.id)
            .where(AppointmentResource.appointment_id == appointment_id).order_by(AppointmentResource.id)))
    return AppointmentView(
        id=ident, placer_id=placer_id, filler_id=filler_id, status=status, start=start, end=end,
        appointment_type=appointment_type or "general", reason=reason or "", urgency=urgency or "routine",
        notes=notes or "", timezone=location_tz or provider_tz or default_timezone, source=source or "",
        review_reason=review_reason or "", patient=patient,
        provider=PartyView(provider_code, provider_family, provider_given) if provider_code else None,
        location=PartyView(location_code, location_name) if location_code else None,
        resources=resources,
    )


def block_view(session: Session, block_id: int, *, default_timezone: str = "UTC") -> BlockView:
    block = session.get(TimeBlock, block_id)
    if block is None:
        raise LookupError(f"time block {block_id} not found")
    provider = resource = None
    location_id = None
    if block.provider_id is not None:
        p = session.get(Provider, block.provider_id)
        provider = PartyView(p.code, p.family_name, p.given_name)
        location_id = p.location_id
    if block.resource_id is not None:
        r = session.get(Resource, block.resource_id)
        resource = PartyView(r.code, r.name, kind=r.kind)
        location_id = location_id or r.location_id
    location, tz = _location_party(session, location_id)
    return BlockView(block.id, block.start, block.end, block.reason or "", tz or default_timezone,
                     provider, resource, location)


# --- segments -------------------------------------------------------------------------------------

Fields = dict[int, Any]
Segments = list[tuple[str, Fields]]


def local_dtm(instant: datetime, tz: str) -> str:
    """DTM to the second, wall-clock time at ``tz`` with its offset."""
    return format_dtm(instant.astimezone(zone(tz)))


def comp(*parts: Any) -> Any:
    """Components without the empty ones at the end (``R1``, not ``R1^``)."""
    parts_list = list(parts)
    while parts_list and parts_list[-1] in (None, ""):
        parts_list.pop()
    if not parts_list:
        return None
    return parts_list if len(parts_list) > 1 else parts_list[0]


def ei(identifier: Optional[str], namespace: str = "") -> Any:
    """An EI field: an id we hold as ``id^namespace`` keeps its parts; a bare one gets ``namespace``."""
    if not identifier:
        return None
    if "^" in identifier:
        return identifier.split("^")
    return [identifier, namespace] if namespace else identifier


def msh(settings: OutboundSettings, message_type: Sequence[str], control_id: str, now: datetime, *,
        receiving_application: Any = "", receiving_facility: Any = "") -> tuple[str, Fields]:
    return ("MSH", {3: settings.application, 4: settings.facility or None, 5: receiving_application or None,
                    6: receiving_facility or None, 7: format_dtm(now), 9: list(message_type), 10: control_id,
                    11: "P", 12: settings.version, 18: "UNICODE UTF-8"})


def event_reason(event: str, reason: str = "") -> list[Optional[str]]:
    """SCH-6 (CE, required): the change's reason when there is one, else the event from table 0003."""
    if reason:
        return [None, reason[:199]]
    return [event, EVENT_TEXTS.get(event, event), "HL70003"]


def _type_codes(appointment_type: str) -> tuple[str, str]:
    return TYPE_CODES.get(appointment_type, (appointment_type.upper(), appointment_type))


def patient_segment(patient: PatientView) -> tuple[str, Fields]:
    identifiers = Repeat(comp(value, None, None, authority, type_code)
                         for value, authority, type_code in patient.identifiers) or None
    name: Any = [patient.family_name, patient.given_name] if (patient.family_name or patient.given_name) else NULL
    fields: Fields = {1: "1", 3: identifiers, 5: name}
    if patient.birth_date:
        fields[7] = patient.birth_date.strftime("%Y%m%d")
    if patient.sex:
        fields[8] = patient.sex
    return ("PID", fields)


def sch_segment(view: AppointmentView, settings: OutboundSettings, *, event: str, reason: str = "",
                entered_by: str = "", status: Optional[str] = None) -> tuple[str, Fields]:
    start, end = local_dtm(view.start, view.timezone), local_dtm(view.end, view.timezone)
    code, label = _type_codes(view.appointment_type)
    reason_code = "EMERGENCY" if view.urgency == "urgent" else _REASON_0276.get(view.appointment_type, "ROUTINE")
    return ("SCH", {
        1: ei(view.placer_id),
        2: ei(view.filler_id, settings.application),
        6: event_reason(event, reason),
        7: [reason_code, view.reason[:199] or reason_code.title(), "HL70276"],
        8: [code, label],
        9: str(view.minutes),
        10: "min",
        11: [None, None, f"M{view.minutes}", start, end],
        16: [settings.application],
        20: [entered_by or settings.application],
        25: [status if status is not None else view.filler_status],
    })


def tq1_segment(start: datetime, end: datetime, tz: str, *, urgent: bool = False) -> tuple[str, Fields]:
    minutes = max(0, int((end - start).total_seconds() // 60))
    return ("TQ1", {1: "1", 6: [str(minutes), "min"], 7: local_dtm(start, tz), 8: local_dtm(end, tz),
                    9: ["S", "Stat", "HL70485"] if urgent else ["R", "Routine", "HL70485"]})


def nte_segments(lines: Iterable[str], *, comment_type: Optional[Sequence[str]] = None) -> Segments:
    out: Segments = []
    for number, line in enumerate((l for l in lines if l), 1):
        fields: Fields = {1: str(number), 3: line[:65536]}
        if comment_type:
            fields[4] = list(comment_type)
        out.append(("NTE", fields))
    return out


def resource_segments(*, start: datetime, end: datetime, tz: str, status: Optional[str],
                      service: Optional[tuple[str, str]] = None, provider: Optional[PartyView] = None,
                      location: Optional[PartyView] = None, resources: Sequence[PartyView] = (),
                      order: str = "SIU") -> Segments:
    """RGS and its AIS/AIG/AIL/AIP. ``order`` "SQR" puts AIP before AIL, as SQR_S25 wants."""
    minutes = str(max(0, int((end - start).total_seconds() // 60)))
    when = local_dtm(start, tz)
    status_ce = [status] if status else None
    ais: Segments = []
    if service is not None:
        ais.append(("AIS", {1: "1", 3: list(service), 4: when, 7: minutes, 8: "min", 10: status_ce}))
    aig: Segments = [("AIG", {1: str(n), 3: comp(r.code, r.name), 4: [r.kind or "other"], 8: when, 11: minutes,
                              12: "min", 14: status_ce}) for n, r in enumerate(resources, 1)]
    ail: Segments = []
    if location is not None:
        place = comp(location.code, None, None, None, None, None, None, None, location.name)
        ail.append(("AIL", {1: "1", 3: place, 6: when, 9: minutes, 10: "min", 12: status_ce}))
    aip: Segments = []
    if provider is not None:
        aip.append(("AIP", {1: "1", 3: comp(provider.code, provider.name, provider.given), 6: when,
                            9: minutes, 10: "min", 12: status_ce}))
    tail = ais + aig + (aip + ail if order == "SQR" else ail + aip)
    return [("RGS", {1: "1"})] + tail


def schedule_segments(view: AppointmentView, settings: OutboundSettings, *, event: str, reason: str = "",
                      entered_by: str = "", structure: str = "SIU", notes: Sequence[str] = (),
                      status: Optional[str] = None) -> Segments:
    """The schedule group of an SIU_S12 / SRR_S01 (SCH … AIP) for one appointment.

    ``structure`` "SRR" leaves out PD1 (SRR_S01 has none); ``notes`` become NTE
    after TQ1 (with the appointment's own notes)."""
    status = status if status is not None else view.filler_status
    segments: Segments = [
        sch_segment(view, settings, event=event, reason=reason, entered_by=entered_by, status=status),
        tq1_segment(view.start, view.end, view.timezone, urgent=view.urgency == "urgent"),
    ]
    segments += nte_segments(list(notes) + [line for line in view.notes.splitlines() if line.strip()][:20])
    if view.patient is not None:
        segments.append(patient_segment(view.patient))
        if structure == "SIU" and view.patient.confidential:
            segments.append(("PD1", {12: "Y"}))
    code, label = _type_codes(view.appointment_type)
    segments += resource_segments(start=view.start, end=view.end, tz=view.timezone, status=status,
                                  service=(code, label), provider=view.provider, location=view.location,
                                  resources=view.resources)
    return segments


def build_siu(view: AppointmentView | BlockView, event: str, settings: OutboundSettings, *, control_id: str,
              now: datetime, destination: str = "", reason: str = "", entered_by: str = "") -> bytes:
    """One SIU^<event>^SIU_S12 for an appointment, or for a blocked/opened time (S23/S24)."""
    head = msh(settings, ["SIU", event, "SIU_S12"], control_id, now, receiving_application=destination)
    if isinstance(view, BlockView):
        status = "Blocked" if event == "S23" else None
        sch: Fields = {
            2: [f"BLK{view.id}", settings.application],
            6: event_reason(event, reason or view.reason),
            9: str(max(0, int((view.end - view.start).total_seconds() // 60))),
            10: "min",
            11: [None, None, None, local_dtm(view.start, view.timezone), local_dtm(view.end, view.timezone)],
            16: [settings.application],
            20: [entered_by or settings.application],
            25: [status] if status else None,
        }
        segments: Segments = [head, ("SCH", sch), tq1_segment(view.start, view.end, view.timezone)]
        segments += resource_segments(start=view.start, end=view.end, tz=view.timezone, status=status,
                                      provider=view.provider, location=view.location,
                                      resources=[view.resource] if view.resource else [])
        return build_message(segments)
    return build_message([head] + schedule_segments(view, settings, event=event, reason=reason,
                                                    entered_by=entered_by))


def build_srm(session: Session, appointment: Appointment | int, trigger: str, settings: OutboundSettings, *,
              control_id: str, now: datetime, destination: str = "", reason: str = "",
              start: Optional[datetime] = None, end: Optional[datetime] = None, entered_by: str = "",
              provider_id: Optional[int] = None) -> bytes:
    """SRM^<trigger>^SRM_S01 asking the EHR (the filler, in mirror mode) for a change.

    ``appointment`` describes what we ask for: its ids (ARQ-1 our placer id —
    the appointment's placer id, else ``SE<id>`` —, ARQ-2 the EHR's filler id),
    patient, provider, location, resources, type and reason. ``start``/``end``
    (default: the appointment's) become ARQ-11, the requested start range
    (``start == end`` asks for that exact start); ``reason`` is ARQ-6 (why the
    request is made: e.g. the cancellation reason for S04); ``provider_id``
    asks for another provider (AIP) than the appointment's.
    """
    if trigger not in EVENT_TEXTS or not ("S01" <= trigger <= "S11"):
        raise ValueError(f"an SRM trigger is S01..S11, not {trigger!r}")
    appointment_id = appointment if isinstance(appointment, int) else appointment.id
    view = appointment_view(session, appointment_id, default_timezone=settings.default_timezone)
    if provider_id is not None:
        other = session.get(Provider, provider_id)
        if other is None:
            raise LookupError(f"provider {provider_id} not found")
        view = replace(view, provider=PartyView(other.code, other.family_name, other.given_name))
    start = start or view.start
    end = end or view.end
    placer = view.placer_id or f"SE{view.id}"
    code, label = _type_codes(view.appointment_type)
    reason_code = "EMERGENCY" if view.urgency == "urgent" else _REASON_0276.get(view.appointment_type, "ROUTINE")
    window = [local_dtm(start, view.timezone)]
    if end and end != start:
        window.append(local_dtm(end, view.timezone))
    arq: Fields = {
        1: ei(placer, settings.application),
        2: ei(view.filler_id),
        6: [None, reason[:199]] if reason else [trigger, EVENT_TEXTS[trigger], "HL70003"],
        7: [reason_code, view.reason[:199] or reason_code.title(), "HL70276"],
        8: [code, label],
        9: str(view.minutes),
        10: "min",
        11: window,
        12: ["S"] if view.urgency == "urgent" else None,
        15: [settings.application],
        19: [entered_by or settings.application],
    }
    segments: Segments = [msh(settings, ["SRM", trigger, "SRM_S01"], control_id, now,
                              receiving_application=destination), ("ARQ", arq)]
    segments += nte_segments([line for line in view.notes.splitlines() if line.strip()][:20])
    if view.patient is not None:
        segments.append(patient_segment(view.patient))
    segments += resource_segments(start=start, end=end if end != start else start + (view.end - view.start),
                                  tz=view.timezone, status=None, service=(code, label), provider=view.provider,
                                  location=view.location, resources=view.resources)
    return build_message(segments)


def queue_srm(session: Session, appointment: Appointment | int, trigger: str, destination: str,
              settings: OutboundSettings, *, now: datetime, change_request_id: Optional[int] = None,
              **options: Any) -> OutboxItem:
    """Mirror mode: write an SRM for ``destination`` (the EHR) into the outbox, in
    the caller's transaction; the dispatcher delivers it in order with the SIUs
    of that destination. The EHR's SRR comes back as the acknowledgement: AA
    marks the item ``sent`` (the SRR is kept in ``payload["reply"]``), AE
    marks it ``refused`` (an answer, not a delivery failure: not retried).
    With ``change_request_id`` the dispatcher hands that answer to
    ``Scheduler.resolve_change_request`` in the same transaction."""
    control_id = new_control_id()
    message = build_srm(session, appointment, trigger, settings, control_id=control_id, now=now,
                        destination=destination, **options)
    appointment_id = appointment if isinstance(appointment, int) else appointment.id
    payload = {"message": message.decode("utf-8"), "control_id": control_id, "event": trigger,
               "destination": destination}
    if change_request_id is not None:
        payload["change_request_id"] = change_request_id
    item = OutboxItem(channel=channel_for(destination), kind="srm", due_at=now, status=PENDING,
                      payload=payload,
                      appointment_id=appointment_id, attempts=0, last_error="", created_at=now)
    session.add(item)
    session.flush()
    return item


# --- which event, for whom -----------------------------------------------------------------------


def siu_event(change: Change, view: Optional[AppointmentView], *, announced: bool) -> Optional[str]:
    """The SIU trigger for a change (None: nothing to announce), given whether
    this destination has already heard of the appointment."""
    event = _CHANGE_EVENTS.get(change.kind)
    if event is None:
        return None
    if event in ("S23", "S24"):
        return event
    if view is None:
        return None
    if event == "S12" and announced:
        return "S14"
    if event == "S13" and change.detail.get("previous_start") == view.start.isoformat():
        return "S14"
    if event != "S12" and change.from_state in _UNANNOUNCED_STATES and not announced:
        return None  # the end of something never announced (an expired hold)
    return event


class OutboundSIU:
    """The plugin that writes SIUs into the outbox (see the module doc).

    ``notify`` (settable later, e.g. ``plugin.notify = dispatcher.wake``) is
    called after a change commits, so delivery starts without waiting for
    the next poll."""

    def __init__(self, destinations: Iterable[DestinationConfig], settings: OutboundSettings = OutboundSettings(),
                 *, clock: Optional[Clock] = None, notify: Optional[Callable[[], None]] = None):
        self.destinations = tuple(destinations)
        self.settings = settings
        self.clock = clock
        self.notify = notify
        self.metrics: Optional[Metrics] = None
        self._codes: dict[tuple[type, int], str] = {}

    # --- hooks ----------------------------------------------------------------

    @hookimpl
    def slotengine_schedule_changed(self, session: Session, change: Change, context: Any) -> None:
        if change.kind not in _CHANGE_EVENTS or not self.destinations:
            return
        clock = self.clock or (context.clock if context is not None else None) or SystemClock()
        if context is not None and getattr(context, "metrics", None) is not None:
            self.metrics = context.metrics
        self.enqueue(session, change, now=clock.now())

    @hookimpl
    def slotengine_after_change(self, change: Change) -> None:
        if self.notify is not None and change.kind in _CHANGE_EVENTS:
            self.notify()

    # --- the work -------------------------------------------------------------

    def enqueue(self, session: Session, change: Change, *, now: datetime) -> list[OutboxItem]:
        """Write the SIU items for one change; returns them (already added to ``session``)."""
        settings = self.settings
        view: Optional[AppointmentView | BlockView] = None
        before: dict[str, Any] = {}
        if change.kind in ("slots_blocked", "slots_opened"):
            block_id = change.detail.get("block_id")
            if block_id is None:
                return []
            view = block_view(session, block_id, default_timezone=settings.default_timezone)
            providers = {view.provider.code} if view.provider else set()
            locations = {view.location.code} if view.location else set()
        else:
            if change.appointment_id is None:
                return []
            view = appointment_view(session, change.appointment_id, default_timezone=settings.default_timezone)
            if view.source == "mirror" and not settings.announce_mirrored:
                return []
            filtered = any(d.providers or d.locations for d in self.destinations)
            before = self._before(session, change) if filtered and change.from_state not in ("", "requested") \
                else {}
            providers = {p for p in (view.provider.code if view.provider else None,
                                     self._code(session, Provider, before.get("provider_id"))) if p}
            locations = {l for l in (view.location.code if view.location else None,
                                     self._code(session, Location, before.get("location_id"))) if l}
        items = []
        for destination in self.destinations:
            channel = channel_for(destination.name)
            if destination.providers and not providers & set(destination.providers):
                continue
            if destination.locations and not locations & set(destination.locations):
                continue
            # a destination can have heard of the appointment only if it existed before this change
            announced = isinstance(view, AppointmentView) and change.from_state not in ("", "requested") and \
                self._announced(session, channel, view.id)
            event = siu_event(change, view if isinstance(view, AppointmentView) else None, announced=announced)
            if change.kind in ("slots_blocked", "slots_opened"):
                event = _CHANGE_EVENTS[change.kind]
            if event is None or (destination.events and event not in destination.events):
                continue
            control_id = new_control_id()
            payload = {"control_id": control_id, "event": event, "destination": destination.name,
                       "change": change.kind}
            status, error = PENDING, ""
            try:
                payload["message"] = build_siu(view, event, settings, control_id=control_id, now=now,
                                               destination=destination.name, reason=change.reason,
                                               entered_by=change.actor.label).decode("utf-8")
            except Exception as exc:  # noqa: BLE001 - a bug must not lose the notice: park it, visibly
                status, error = PARKED, f"the SIU could not be written: {type(exc).__name__}: {exc}"[:2000]
                log.error("outbound SIU could not be written; parked", exc_info=True,
                          extra={"destination": destination.name, "change": change.kind, "event": event})
                if self.metrics is not None:
                    self.metrics.outbox_messages.labels(channel, "siu", "parked").inc()
            item = OutboxItem(
                channel=channel, kind="siu", due_at=now, status=status, payload=payload,
                appointment_id=view.id if isinstance(view, AppointmentView) else None,
                attempts=0, last_error=error, created_at=now,
            )
            session.add(item)
            items.append(item)
        if items:
            session.flush()
        return items

    def _code(self, session: Session, model: type, ident: Optional[int]) -> Optional[str]:
        if ident is None:
            return None
        key = (model, ident)
        if key not in self._codes:
            code = session.scalar(select(model.code).where(model.id == ident))
            if code is None:
                return None
            self._codes[key] = code
        return self._codes[key]

    @staticmethod
    def _before(session: Session, change: Change) -> dict[str, Any]:
        """The appointment before this change (the audit entry ``_record`` just wrote)."""
        write_pending_rows(session)
        before = session.scalar(
            select(AuditEntry.before).where(AuditEntry.entity == "appointment",
                                            AuditEntry.entity_id == change.appointment_id,
                                            AuditEntry.action == change.kind)
            .order_by(AuditEntry.id.desc()).limit(1))
        return before or {}

    @staticmethod
    def _announced(session: Session, channel: str, appointment_id: int) -> bool:
        return session.scalar(
            select(OutboxItem.id).where(OutboxItem.appointment_id == appointment_id, OutboxItem.channel == channel,
                                        OutboxItem.kind == "siu").limit(1)) is not None


# --- delivery ----------------------------------------------------------------------------------------


@dataclass
class _Head:
    id: int
    kind: str
    control_id: str
    message: bytes
    attempts: int
    due_at: datetime


@dataclass
class _Delivery:
    ok: bool
    code: str = ""
    text: str = ""
    reply: Optional[bytes] = None
    refused: bool = False  # an SRM answered AE: an answer, not a failure


class _Halted(Exception):
    """The destination stops at a parked item (``on_park = "stop"``)."""


def _ssl_context(destination: DestinationConfig) -> Optional[ssl.SSLContext]:
    tls = destination.tls
    if tls is None:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return context


class _DestinationSender:
    """One destination: its connection, its ordered stream, its leadership lock."""

    def __init__(self, dispatcher: "OutboundDispatcher", destination: DestinationConfig):
        self.dispatcher = dispatcher
        self.destination = destination
        self.channel = channel_for(destination.name)
        self.settings = dispatcher.settings
        self.wakeup = asyncio.Event()
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.decoder: Optional[MLLPDecoder] = None
        self.frames: list[bytes] = []
        self.ssl_context = _ssl_context(destination)
        self.lock_connection = None  # PostgreSQL: the connection holding our advisory lock
        self.last_error = ""
        self.halted = False
        self.sent = 0
        self.last_sent_at: Optional[datetime] = None

    # --- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        while not self.dispatcher.stopping:
            try:
                if self.dispatcher.postgres and not await asyncio.to_thread(self._hold_leadership):
                    await self._close()  # another node serves this destination
                    await self._sleep(self.settings.poll_interval * 2)
                    continue
                try:
                    head = await asyncio.to_thread(self._head)
                except _Halted:
                    self.halted = True
                    await self._sleep(self.settings.poll_interval)
                    continue
                self.halted = False
                if head is None:
                    await self._sleep(self.settings.poll_interval)
                    continue
                if head.attempts:
                    wait = (head.due_at - self.dispatcher.clock.now()).total_seconds()
                    if wait > 0:
                        await self._sleep(min(wait, self.settings.poll_interval))
                        continue
                outcome = await self._deliver(head)
                answered = await asyncio.to_thread(self._record, head, outcome)
                if answered is not None:
                    await asyncio.to_thread(answered.notify_committed)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database trouble: wait, lose nothing
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                log.error("outbound destination loop failed; will retry",
                          extra={"destination": self.destination.name, "error": self.last_error})
                await self._close()
                await self._sleep(min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(failures, 10)))
        await self._close()
        await asyncio.to_thread(self._release_leadership)

    async def _sleep(self, seconds: float) -> None:
        if self.dispatcher.stopping:
            return
        try:
            await asyncio.wait_for(self.wakeup.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            pass
        self.wakeup.clear()

    # --- database (worker threads) ------------------------------------------------------

    def _head(self) -> Optional[_Head]:
        with self.dispatcher.sessions() as session:
            if self.settings.on_park == "stop":
                parked = session.scalar(select(OutboxItem.id).where(
                    OutboxItem.channel == self.channel, OutboxItem.kind.in_(OUTBOUND_KINDS),
                    OutboxItem.status == PARKED).limit(1))
                if parked is not None:
                    raise _Halted()
            row = session.scalars(select(OutboxItem).where(
                OutboxItem.channel == self.channel, OutboxItem.kind.in_(OUTBOUND_KINDS),
                OutboxItem.status == PENDING).order_by(OutboxItem.id).limit(1)).first()
            if row is None:
                return None
            payload = row.payload or {}
            return _Head(row.id, row.kind, str(payload.get("control_id", "")),
                         str(payload.get("message", "")).encode("utf-8"), row.attempts, row.due_at)

    def _record(self, head: _Head, outcome: _Delivery) -> Optional[Any]:
        """Commit the outcome of one delivery; returns the scheduler view to notify after
        commit when the reply answered a change request."""
        now = self.dispatcher.clock.now()
        metrics = self.dispatcher.metrics
        with self.dispatcher.sessions() as session, session.begin():
            stmt = select(OutboxItem).where(OutboxItem.id == head.id)
            if self.dispatcher.postgres:
                stmt = stmt.with_for_update()
            item = session.scalars(stmt).one_or_none()
            if item is None or item.status != PENDING:
                log.warning("outbox item changed while it was being sent",
                            extra={"destination": self.destination.name, "outbox_id": head.id})
                return
            item.attempts += 1
            if outcome.ok or outcome.refused:
                item.status = SENT if outcome.ok else REFUSED
                item.done_at = now
                item.last_error = "" if outcome.ok else f"{outcome.code}: {outcome.text}"[:2000]
                payload = dict(item.payload or {})
                payload["ack_code"] = outcome.code
                if head.kind == "srm" and outcome.reply is not None:
                    payload["reply"] = outcome.reply.decode("utf-8", "replace")
                item.payload = payload
                answered = None
                if head.kind == "srm" and payload.get("change_request_id") is not None:
                    answered = self._answer_request(session, int(payload["change_request_id"]), outcome)
                self.sent += outcome.ok
                if outcome.ok:
                    self.last_sent_at = now
                self.last_error = ""
                metrics.outbox_messages.labels(self.channel, head.kind, item.status).inc()
                return answered
            item.last_error = f"{outcome.code}: {outcome.text}"[:2000]
            self.last_error = item.last_error
            if item.attempts >= self.settings.max_attempts:
                item.status = PARKED
                metrics.outbox_messages.labels(self.channel, head.kind, "parked").inc()
                log.error("outbound message parked after repeated failures",
                          extra={"destination": self.destination.name, "outbox_id": item.id,
                                 "control_id": head.control_id, "attempts": item.attempts,
                                 "error": item.last_error[:300], "on_park": self.settings.on_park})
            else:
                item.due_at = now + timedelta(seconds=self.settings.backoff(item.attempts))
                metrics.outbox_messages.labels(self.channel, head.kind, "retry").inc()
                log.warning("outbound message not acknowledged; will retry",
                            extra={"destination": self.destination.name, "outbox_id": item.id,
                                   "control_id": head.control_id, "attempts": item.attempts,
                                   "error": item.last_error[:300]})

    def _answer_request(self, session: Session, request_id: int, outcome: _Delivery) -> Optional[Any]:
        """The owner's SRR answers a change request: AA accepted (its filler id, SCH-2,
        noted), AE/AR refused. Joined to the caller's transaction."""
        scheduler = self.dispatcher.scheduler
        if scheduler is None:
            return None
        filler_id = None
        if outcome.ok and outcome.reply is not None:
            try:
                sch = parse(outcome.reply).first("SCH")
                # kept as the SIU mapping reads SCH-2 (id^namespace): the EHR's SIU that follows must find it
                filler_id = _ei(sch, 2) if sch is not None and sch.value(2) != NULL else None
            except HL7ParseError:
                log.warning("unreadable SRR from destination", extra={"destination": self.destination.name})
        view = scheduler.within(session)
        answer = "accepted" if outcome.ok else "refused"
        said = f"{self.destination.name} answered {outcome.code}" + (f": {outcome.text}" if outcome.text else "")
        view.resolve_change_request(request_id, answer, Actor("system", self.destination.name), said,
                                    filler_id=filler_id)
        return view

    def _hold_leadership(self) -> bool:
        """PostgreSQL: hold (or take) this destination's advisory lock on a dedicated connection."""
        if self.lock_connection is not None:
            try:
                self.lock_connection.execute(text("SELECT 1"))
                return True
            except Exception:  # noqa: BLE001 - the connection (and so the lock) is gone
                log.warning("lost the database connection holding the destination lock",
                            extra={"destination": self.destination.name})
                self._release_leadership()
        connection = self.dispatcher.lock_engine().connect().execution_options(isolation_level="AUTOCOMMIT")
        key = zlib.crc32(f"slotengine-outbound:{self.destination.name}".encode()) - 2**31
        try:
            got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        except Exception:
            connection.close()
            raise
        if not got:
            connection.close()  # no lock taken: back to the pool
            return False
        self.lock_connection = connection
        log.info("serving outbound destination", extra={"destination": self.destination.name})
        return True

    def _release_leadership(self) -> None:
        if self.lock_connection is not None:
            try:
                # invalidate, not close: a pooled connection would keep its session, and the lock with it
                self.lock_connection.invalidate()
                self.lock_connection.close()
            except Exception:  # noqa: BLE001 - gone already
                pass
            self.lock_connection = None

    # --- the wire ----------------------------------------------------------------

    async def _connect(self) -> None:
        destination = self.destination
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(destination.host, destination.port, ssl=self.ssl_context,
                                    server_hostname=destination.host if self.ssl_context else None),
            self.settings.connect_timeout)
        self.decoder = MLLPDecoder(64 * 1024 * 1024)
        self.frames = []
        log.info("outbound connection open", extra={"destination": destination.name})

    async def _close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        self.frames = []
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except Exception:  # noqa: BLE001 - the peer is gone either way
                pass

    async def _deliver(self, head: _Head) -> _Delivery:
        if not head.control_id or not head.message:
            return _Delivery(False, "error", "the outbox item has no message or control id")
        for fresh in (False, True):
            reused = self.writer is not None
            try:
                if self.writer is None:
                    await self._connect()
                self.writer.write(frame(head.message))
                await asyncio.wait_for(self.writer.drain(), self.settings.ack_timeout)
                code, reply_text, reply = await self._acknowledgement(head.control_id)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                await self._close()
                if reused and not fresh:
                    continue  # an idle connection the peer had closed: one immediate new try
                return _Delivery(False, "connection", f"{type(exc).__name__}: {exc}".strip()[:300])
            except TimeoutError:
                await self._close()  # the stream's state is unknown: start clean
                return _Delivery(False, "timeout", f"no acknowledgement within {self.settings.ack_timeout:g} s")
            if code in ("AA", "CA"):
                return _Delivery(True, code, reply_text, reply)
            if head.kind == "srm" and code == "AE":
                return _Delivery(False, code, reply_text, reply, refused=True)
            return _Delivery(False, code or "?", reply_text or "negative acknowledgement", reply)
        raise AssertionError("unreachable")

    async def _acknowledgement(self, control_id: str) -> tuple[str, str, bytes]:
        """Read frames until one acknowledges ``control_id``; others are stale and skipped."""
        deadline = _time.monotonic() + self.settings.ack_timeout
        while True:
            while self.frames:
                reply = self.frames.pop(0)
                try:
                    ack = parse(reply)
                except HL7ParseError as exc:
                    log.warning("unreadable reply from destination", extra={"destination": self.destination.name,
                                                                            "error": str(exc)[:200]})
                    continue
                msa = ack.first("MSA")
                if msa is None:
                    continue
                if msa.value(2) != control_id:
                    log.warning("reply for another message ignored",
                                extra={"destination": self.destination.name, "expected": control_id,
                                       "echoed": msa.value(2)[:40]})
                    continue
                errors = [e.value(8) or e.value(3, 2) or e.value(3) for e in ack.segments_named("ERR")]
                return msa.value(1).strip().upper(), msa.value(3) or "; ".join(e for e in errors if e), reply
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not data:
                raise ConnectionError("the destination closed the connection before acknowledging")
            self.frames.extend(item for item in self.decoder.feed(data) if isinstance(item, bytes))


class OutboundDispatcher:
    """Delivers the outbox's SIU/SRM items to every destination (see the module doc).

    ``await dispatcher.run()`` serves until ``await dispatcher.stop()``;
    ``wake()`` (thread-safe) makes idle destinations look for work at once.
    """

    def __init__(self, session_factory: sessionmaker, destinations: Iterable[DestinationConfig], *,
                 settings: OutboundSettings = OutboundSettings(), clock: Optional[Clock] = None,
                 metrics: Optional[Metrics] = None, scheduler: Optional[Any] = None):
        self.sessions = session_factory
        #: the engine's Scheduler: SRR answers to change requests go to it (mirror mode)
        self.scheduler = scheduler
        self.destinations = tuple(destinations)
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.engine = session_factory.kw["bind"]
        self.postgres = self.engine.dialect.name == "postgresql"
        self.stopping = False
        self._lock_engine = None
        self._senders: dict[str, _DestinationSender] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._done: Optional[asyncio.Event] = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.stopping = False
        self._senders = {d.name: _DestinationSender(self, d) for d in self.destinations}
        self._tasks = [asyncio.create_task(s.run(), name=f"outbound:{name}") for name, s in self._senders.items()]
        log.info("outbound dispatcher started", extra={"destinations": list(self._senders)})
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._done.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Finish the send in flight (up to ``grace`` seconds), close connections, return."""
        self.stopping = True
        for sender in self._senders.values():
            sender.wakeup.set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            for sender in self._senders.values():
                await sender._close()
                await asyncio.to_thread(sender._release_leadership)
        if self._lock_engine is not None:
            self._lock_engine.dispose()
            self._lock_engine = None
        log.info("outbound dispatcher stopped")

    def lock_engine(self):
        """PostgreSQL: unpooled connections for the destination locks, one held per
        destination served, so they never starve the daemon's own pool."""
        if self._lock_engine is None:
            self._lock_engine = create_engine(self.engine.url, poolclass=NullPool)
        return self._lock_engine

    def wake(self, destination: Optional[str] = None) -> None:
        """Look for work now (callable from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        senders = [self._senders[destination]] if destination in self._senders else list(self._senders.values())
        for sender in senders:
            loop.call_soon_threadsafe(sender.wakeup.set)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per destination: connected, halted (stopped at a parked item), sent since start, last error."""
        return {name: {"connected": s.writer is not None, "halted": s.halted, "sent": s.sent,
                       "last_error": s.last_error, "last_sent_at": s.last_sent_at.isoformat() if s.last_sent_at else None,
                       "leader": (s.lock_connection is not None) if self.postgres else True}
                for name, s in self._senders.items()}


# --- operators: slotengine outbox list|show|retry|skip ------------------------------------------------


def _row(item: OutboxItem, *, full: bool = False) -> dict[str, Any]:
    payload = item.payload or {}
    row = {
        "id": item.id, "channel": item.channel, "kind": item.kind, "status": item.status,
        "event": payload.get("event"), "control_id": payload.get("control_id"),
        "appointment_id": item.appointment_id, "attempts": item.attempts, "last_error": item.last_error,
        "created_at": item.created_at.isoformat() if item.created_at else None,
        "due_at": item.due_at.isoformat() if item.due_at else None,
        "done_at": item.done_at.isoformat() if item.done_at else None,
    }
    if full:
        row["payload"] = payload
    return row


def list_items(session_factory: sessionmaker, *, destination: Optional[str] = None, status: Optional[str] = None,
               kind: Optional[str] = None, limit: int = 50, all_channels: bool = False) -> list[dict[str, Any]]:
    """Outbox rows, newest first: MLLP ones (``mllp:*``) unless ``all_channels``."""
    with session_factory() as session:
        stmt = select(OutboxItem)
        if destination:
            stmt = stmt.where(OutboxItem.channel == channel_for(destination))
        elif not all_channels:
            stmt = stmt.where(OutboxItem.channel.like(CHANNEL_PREFIX + "%"))
        if status:
            stmt = stmt.where(OutboxItem.status == status)
        if kind:
            stmt = stmt.where(OutboxItem.kind == kind)
        return [_row(i) for i in session.scalars(stmt.order_by(OutboxItem.id.desc()).limit(limit))]


def show_item(session_factory: sessionmaker, item_id: int) -> Optional[dict[str, Any]]:
    """One row with its payload (the message text, its control id, the ACK code)."""
    with session_factory() as session:
        item = session.get(OutboxItem, item_id)
        return _row(item, full=True) if item is not None else None


def _operate(session_factory: sessionmaker, item_id: int, allowed: tuple[str, ...], change) -> dict[str, Any]:
    with session_factory() as session, session.begin():
        item = session.get(OutboxItem, item_id, with_for_update=True)
        if item is None:
            raise LookupError(f"outbox item {item_id} not found")
        if not item.channel.startswith(CHANNEL_PREFIX) or item.kind not in OUTBOUND_KINDS:
            raise ValueError(f"outbox item {item_id} is not an MLLP message ({item.channel}, {item.kind})")
        if item.status not in allowed:
            raise ValueError(f"outbox item {item_id} is {item.status}; only {' or '.join(allowed)} items can be changed")
        change(item)
        return _row(item)


def retry_item(session_factory: sessionmaker, item_id: int, *, operator: str = "operator",
               clock: Optional[Clock] = None) -> dict[str, Any]:
    """Send a parked (or skipped) item again, with the same control id. Under
    ``on_park = "continue"`` later items may have gone out meanwhile: it is sent
    after them (an operator's decision). Wake the dispatcher afterwards."""
    now = (clock or SystemClock()).now()

    def change(item: OutboxItem) -> None:
        item.status, item.attempts, item.due_at, item.done_at = PENDING, 0, now, None
        item.last_error = f"retried by {operator} at {now.isoformat()}; was: {item.last_error}"[:2000]

    return _operate(session_factory, item_id, (PARKED, SKIPPED), change)


def skip_item(session_factory: sessionmaker, item_id: int, *, operator: str = "operator", reason: str = "",
              clock: Optional[Clock] = None) -> dict[str, Any]:
    """Give up on a parked item (it stays in the outbox as ``skipped``): the
    way past it when the destination stops at parked items."""
    now = (clock or SystemClock()).now()

    def change(item: OutboxItem) -> None:
        item.status, item.done_at = SKIPPED, now
        item.last_error = f"skipped by {operator} at {now.isoformat()}: {reason}; was: {item.last_error}"[:2000]

    return _operate(session_factory, item_id, (PARKED,), change)
