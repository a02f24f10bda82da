"""Inbound HL7 v2 messages → engine service calls.

``apply_message(scheduler, message, mode=..., message_id=...)`` reads one
parsed message (``hl7.message.Message``) and calls the engine's service API
(``engine.service.Scheduler``) on a scheduler already bound to the caller's
transaction: every call of one message commits or rolls back together. It
raises ``MappingError`` (each error names segment, occurrence, field,
component and an HL7 table 0357 code) when the message cannot be applied;
engine refusals are converted into ``MappingError`` naming the field that
caused them. Lenient readings come back as ``ApplyResult.warnings`` (severity
W in the application ACK). Nothing here logs patient data: logs carry
control ids and our own numeric ids only, and warning/error texts never echo
values from PID, PD1, PV1, MRG, IN1 or IN2, nor any date.

Every call is made as ``Actor("message", "<MSH-3>^<MSH-4>",
source="inbound:<message_id>")``.

What is supported (``is_supported``)
------------------------------------
* ADT, any ``Ann`` event, in both modes. Acted on: A01 A03 A04 A05 A08 A11
  A13 A24 A28 A31 A40. Every other ADT event (A02 transfer, A06/A07 class
  changes, A12 cancel transfer, A25, A38 cancel pre-admit, A47 identifier
  change, …) is accepted and returns ``"skipped"`` without touching anything:
  they describe inpatient movements the schedule does not hold, and the
  demographics they carry arrive again with A08/A31. (The Essex feeds in the
  corpus send outpatient bookings as A05/A38 with Z-segments; that local
  convention is not mapped: A05 updates the patient, A38 is skipped.)
* SIU in mirror mode: S12–S17, S26, S23, S24. S18–S22 (changes to one
  service or resource of an appointment) are not supported: they carry a
  partial resource list that an upsert would misread.
* REF^I12 (patient referral), in both modes. REF^I13 (modify) and I14
  (cancel) are not supported: changing or withdrawing a referral that may
  already be booked is for staff (the referrals team hears of every referral).
* Everything else (SRM/SRR/SQM/ORU…, SIU in filler mode for now, ADT^O01,
  REF^I11/I13/I14…) is unsupported; ``apply_message`` returns ``"skipped"``
  for it.

ADT
---
* PID → ``register_patient`` (create, or update the patient any identifier
  names): PID-3, every repetition, ``id^^^authority^type`` — authority is
  CX-4.1, or CX-4.2 (universal id) when .1 is empty; PID-2 / PID-4 only
  when PID-3 yields none · PID-5 (the first repetition with a name: the
  primary, legal one) · PID-7 birth date (ISO ``1928-01-01`` tolerated) ·
  PID-8 sex (table 0001) · PID-11 address (street, line2, city, state, zip,
  country; home repetition first) · PID-13/14 phones (XTN-1, else XTN-12,
  else +5 6 7 x8) as ``{"number", "use", "type"}`` — the two fields
  together are the patient's list, replaced whenever a message carries
  either — and the e-mail from an XTN with use NET / type Internet / an "@"
  in component 4 or 1 · PID-15 language (ISO 639-2 codes folded to 639-1;
  ``needs_interpreter`` when it is not ``CLINIC_LANGUAGE``) · PD1-12
  protection → ``confidential`` · PV1-15 ambulatory status → ``mobility``. A sender's explicit null ``""`` erases
  the value (name, phones, e-mail, address, language, mobility); an absent
  field changes nothing. A patient that would not change is not written
  (no audit entry, no plugin call), so a resent message changes nothing.
* PID-30 deceased indicator (Y/N) and PID-29 time of death → ``deceased`` /
  ``deceased_at`` (a time of death alone means deceased). Patient flags
  (``set_patient_flags``; unchanged flags write nothing): PD1-11 publicity
  code, as the CDC immunization guide's table 0215 reads it (01 no
  reminder/recall, 03/05/07 no calls, 04/05 reminders only, 06/07 recall
  only, 08-12 to the provider only) → ``opt_out:reminder``,
  ``opt_out:recall``, ``opt_out:voice``, replaced whenever PD1-11 is valued;
  DG1-3 diagnoses → ``icd10:<code>`` (``icd9:``, ``snomed:``, else the
  coding system in lower case), added and never removed by a message.
* IN1 (+ the IN2 after it) → ``record_coverage``: payer = IN1-3.1 (else
  IN1-2.1, else IN1-4.1), payer name IN1-4, plan IN1-2, group IN1-8,
  effective/expiry IN1-12/13, priority IN1-22 (else IN1-1, else order),
  verified at IN1-29, status IN1-45 (else "verified" when IN1-29 is valued),
  member id IN1-36, else IN1-49.1, else IN2-61.1. IN1-15 (plan type) has
  no place in ``CoverageRecord`` yet and is not recorded.
* A04 / A01: the patient's booked appointment on the local day of the event
  (EVN-2, else PV1-44 — A03/A13: PV1-45, then PV1-44 —, else MSH-7; the
  day and the times of the appointment's location) nearest to that time →
  ``arrive``.
  A03: the patient's arrived / checked-in appointment of that day →
  ``complete`` (a booked one goes arrived, then completed). A11: arrived /
  checked-in → booked (``undo_check_in`` / ``undo_arrival``). A13: completed
  → checked-in (``undo_completion``). The nearest appointment of the day
  decides, so a repeated event finds its work done and changes nothing; no
  appointment that day is not an error (walk-ins, inpatients).
* A40 (and several PID/MRG pairs in one message): MRG-1 (every repetition;
  MRG-4 for old senders) names the merged patient, the PID before it the
  survivor. An unknown survivor is created from the PID; an unknown merged
  patient is a warning (204, MRG-1); a pair already merged changes nothing.
* A24 (link patients): each PID updates its patient; the link itself is not
  held by the engine.

SIU (mirror mode: the EHR owns the schedule)
--------------------------------------------
* Identity: SCH-1 placer and SCH-2 filler appointment ids (EI: component 1,
  plus ``^namespace`` — EI-2, else EI-3 — when present); the engine matches
  on either. A message without SCH is error 100 (SCH^1); without either id
  101 (SCH^1^1) — except S23/S24, which name time, not an appointment.
* Times (``hl7.hl7time``): start = TQ1-7, else SCH-11.4 (TQ, old senders),
  else AIS-4 / AIG-8 / AIL-6 / AIP-6. End = the end paired with the start
  (TQ1-8 or SCH-11.5), else start + the first duration of TQ1-6, SCH-9/10,
  SCH-11.3, AIS-7/8, AIG-11/12, AIL-9/10, AIP-9/10 (units: empty = minutes,
  s/sec, min/m/MIN/MINUTES, h/hr, d; UCUM or ANSI), else 15 minutes with a
  warning. An explicit end that is not after the start, or more than 24 h
  after it (TQ ends of a series: hl7v2tofhir sends a year), gives way to
  the duration with a warning. A DTM with an offset is exact; without one
  it is wall-clock time at the appointment's location (its time zone; new
  locations and no location: ``settings.default_timezone``).
* Status: S15 cancelled, S16 discontinued, S17 deleted, S26 no_show — the
  trigger decides. S12/S13/S14: SCH-25 (table 0278 plus common synonyms:
  Pending → held, Waitlist, Booked/Confirmed/Scheduled, Overbook, Started →
  checked_in, Arrived, Complete, Cancelled, Dc, Noshow, Deleted), else
  booked (S14: else the current state). SIU never moves a visit backwards
  (booked < arrived < checked_in < completed: a "Booked" S14 does not undo
  an A04 arrival; reversals come as A11/A13). A change the state machine
  does not allow in one step goes through booked/arrived/checked_in when
  the appointment occupies its time before or after (booked → completed =
  arrived, completed); one that would have to occupy time only in between
  (cancelled → discontinued) or leaves a final state (deleted) is error 207.
* Arrival order: a modification or cancellation for an appointment we do
  not hold creates it in that state (``record_external_appointment``). An
  S12 for an appointment we already hold is a repeated or late booking
  notice: it only fills what we do not know (patient, provider, location)
  and never moves the appointment or changes its state (warning 205 when it
  says otherwise) — modifications come as S13/S14. A message that would
  change nothing writes nothing, so applying one twice changes nothing.
* Who and where: first AIP (XCN id^family^given) → provider; AIL-3 of the
  first AIL (else PV1-3) → location (code = PL-1, else the facility PL-4,
  else the room); every AIL room (PL-2, with the bed PL-3) → a resource of
  kind room (code ``point of care^room[^bed]``); every AIG-3 → a resource
  (code = the id, else the text; kind room / person / equipment / other from
  AIG-4). Resources deleted by RGS-2 or AIx-2 = D are left out. Further
  AIPs are not recorded (the engine holds one provider per appointment).
  AIx segments whose field 2 is not an action code but a value (senders
  that skip AIx-2) are read one position to the left, with a warning.
* Providers, locations and resources the EHR names that we do not know are
  created on the fly: in mirror mode the EHR's word is the record, and an
  appointment must not be refused because the clinic file lags behind the
  EHR. Code = the EHR's id, names from the XCN/PL/CWE, location time zone
  = ``settings.default_timezone``, provider gender U. Known ones are used as
  they are (their names and time zones are never overwritten). A provider
  without an XCN id is not created (warning): a name alone does not
  identify a person.
* Appointment type: codes of SCH-7, SCH-8 and AIS-3 (code, then text) in
  ``APPOINTMENT_TYPE_CODES``; the first one that names a specific type
  (new_patient, follow_up, procedure — also a SNOMED CT code whose text ends
  in "(procedure)") wins; EMERGENCY/URGENT (or TQ1-9 S/A) make it urgent;
  ROUTINE/CHECKUP/WALKIN/unknown are ``general``. Reason = SCH-7 text and
  the AIS-3 texts (else the SCH-8 text); notes = every NTE-3, plus SCH-6
  (event reason) for S15/S16/S17/S26 — ``ExternalAppointment`` has no
  separate event reason, and its ``reason`` would overwrite the visit's.
* PID → ``register_patient`` as for ADT; PV1-15 → mobility.
* S23/S24: every AIP provider, AIG resource and AIL room named gets its
  time ``block_time``-d (S23; an identical active block is not repeated) or
  its blocks inside the time ``unblock_time``-d (S24; nothing to open is a
  warning).

REF (REF^I12: the referral path of the service API)
---------------------------------------------------
The referral goes to the hook ``slotengine_referral_received`` inside the
message's transaction (``scheduler.plugins.referral_received``); the
built-in ``referrals`` plugin records it and routes it in the same
transaction — books the consult with an in-network specialist or puts the
patient on the waitlist, and tells the referrer (see ``plugins.referrals``).
No plugin recording it (``referrals`` disabled) is error 207 (MSH^1^9); a
plugin that raises fails the message (parked).

* PID (+ PD1, PV1) → ``register_patient`` as for ADT; IN1 (+ IN2) →
  ``record_coverage`` as for ADT, and the primary IN1's payer (IN1-3.1, else
  IN1-2.1, else IN1-4.1) is the referral's payer (no IN1: the patient's
  primary coverage).
* RF1-1 status (table 0283): R (rejected) or E (expired) → nothing is
  scheduled: ``"skipped"`` with a warning (207); anything else is a referral.
* RF1-2 priority (table 0280): S, A, STAT, ASAP, URGENT, EMERGENCY (code or
  text) → urgent, else routine.
* RF1-3 referral type → specialty: the text (component 2), else the code,
  lower case with ``_`` between words (``Family Medicine`` →
  ``family_medicine``); the candidate some provider practises wins.
* RF1-6 originating referral identifier (EI, ``id^namespace``; else RF1-11)
  → the referral's external id: a resend with the same id records nothing
  new. Without one, a warning (101 RF1^1^6).
* RF1-10 referral reason (text, else the table 0336 code in words), the DG1
  diagnoses (DG1-3 text, else DG1-4, else the code) and every NTE-3 → the
  referral's reason (clinical: never sent to the patient).
* PRD with PRD-1 = RP (referring provider): PRD-2 prefix, given and family
  name, degree and PRD-7.1 id → ``referring_provider``; the e-mail address in
  PRD-5 (XTN use NET / type Internet / an "@") → ``referring_contact``, where
  the referrer hears back (a phone number is not used: the referrals team's
  channel sends e-mail by default). PRD with PRD-1 = RT (referred-to
  provider): our provider whose code is PRD-7.1 is routed to first when in
  network and free in the window; unknown → warning 204 (PRD^n^7), routing by
  specialty.

Missing essential data → ``MappingError``: REF without RF1 (100 RF1^1), RF1
without a referral type (101 RF1^1^3), REF without PID (100 PID^1); SIU without SCH (100 SCH^1), SCH
without placer and filler id (101 SCH^1^1), no start anywhere (101 TQ1^1^7,
or SCH^1^11 when there is no TQ1), a start or end that is not a date/time
(102 naming it), ADT without PID (100 PID^1), PID without any identifier
(101 PID^n^3), PID-3 naming two patients we hold separately (205).
Non-essential dates (birth date, coverage dates, event times) that do not
parse are dropped with a warning (102).
"""
from __future__ import annotations

import logging
import re
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from functools import cache, cached_property
from typing import Any, Callable, Iterator, Optional

from sqlalchemy import bindparam, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from engine.calendar import zone
from engine.db import Direct
from engine.errors import NotFound, SchedulingError
from engine.models import Appointment, ChangeRequest, Location, Patient, Provider, Resource, TimeBlock
from engine.requests import Actor, CoverageRecord, ExternalAppointment, Identifier, PatientRecord
from engine.service import REQUESTED_PLACER_PREFIX, Scheduler
from engine.states import OCCUPYING, TRANSITIONS, Status
from hl7.hl7time import DTMError, HL7DateTime, parse_dtm
from hl7.message import NULL, ErrorDetail, Message, Segment

__all__ = [
    "APPOINTMENT_TYPE_CODES",
    "CLINIC_LANGUAGE",
    "DEFAULT_DURATION",
    "ApplyResult",
    "MappingError",
    "apply_message",
    "is_supported",
]

log = logging.getLogger("slotengine.hl7.mapping")

#: The language the clinic works in: a patient whose PID-15 names another
#: one needs an interpreter. ISO 639-1; 639-2 codes and names are folded.
CLINIC_LANGUAGE = "en"
#: Length of an appointment whose message gives neither an end nor a duration.
DEFAULT_DURATION = timedelta(minutes=15)
#: An explicit end further than this from the start is read as the end of a
#: series (TQ), not of this appointment.
MAX_DURATION = timedelta(hours=24)

MODES = ("mirror", "filler")

#: ADT events that change something; every other ``Ann`` event is skipped.
ADT_PATIENT_EVENTS = frozenset({"A01", "A03", "A04", "A05", "A08", "A11", "A13", "A24", "A28", "A31", "A40"})
SIU_APPOINTMENT_EVENTS = frozenset({"S12", "S13", "S14", "S15", "S16", "S17", "S26"})
SIU_BLOCK_EVENTS = frozenset({"S23", "S24"})

#: Appointment type codes (SCH-7 table 0276, SCH-8, AIS-3), compared in upper
#: case with everything but letters and digits removed: (type, urgency);
#: None for "no opinion".
APPOINTMENT_TYPE_CODES: dict[str, tuple[Optional[str], Optional[str]]] = {
    "ROUTINE": ("general", None),
    "CHECKUP": ("general", None),
    "WALKIN": ("general", None),
    "NORMAL": (None, None),
    "EMERGENCY": ("general", "urgent"),
    "EMERG": ("general", "urgent"),
    "URGENT": ("general", "urgent"),
    "STAT": ("general", "urgent"),
    "FOLLOWUP": ("follow_up", None),
    "FU": ("follow_up", None),
    "FUP": ("follow_up", None),
    "NEW": ("new_patient", None),
    "NEWPATIENT": ("new_patient", None),
    "NEWPT": ("new_patient", None),
    "NP": ("new_patient", None),
    "PROCEDURE": ("procedure", None),
    "PROC": ("procedure", None),
}
_SPECIFIC_TYPES = ("new_patient", "follow_up", "procedure")

#: SCH-25 filler status (table 0278 and what senders write instead).
FILLER_STATUS: dict[str, Status] = {
    "PENDING": Status.HELD,
    "WAITLIST": Status.WAITLISTED,
    "WAITLISTED": Status.WAITLISTED,
    "BOOKED": Status.BOOKED,
    "CONFIRMED": Status.BOOKED,
    "SCHEDULED": Status.BOOKED,
    "SCHED": Status.BOOKED,
    "SCH": Status.BOOKED,
    "OVERBOOK": Status.OVERBOOKED,
    "OVERBOOKED": Status.OVERBOOKED,
    "ARRIVED": Status.ARRIVED,
    "STARTED": Status.CHECKED_IN,
    "CHECKEDIN": Status.CHECKED_IN,
    "INROOM": Status.CHECKED_IN,
    "COMPLETE": Status.COMPLETED,
    "COMPLETED": Status.COMPLETED,
    "FULFILLED": Status.COMPLETED,
    "CANCELLED": Status.CANCELLED,
    "CANCELED": Status.CANCELLED,
    "DC": Status.DISCONTINUED,
    "DISCONTINUED": Status.DISCONTINUED,
    "NOSHOW": Status.NO_SHOW,
    "DELETED": Status.DELETED,
}
_TRIGGER_STATUS = {"S15": Status.CANCELLED, "S16": Status.DISCONTINUED, "S17": Status.DELETED, "S26": Status.NO_SHOW}
_EVENT_NAMES = {"S15": "Cancelled", "S16": "Discontinued", "S17": "Deleted", "S26": "No-show"}
#: The visit moves forward only; SIU never takes it back (ADT A11/A13 do).
_VISIT_RANK = {Status.BOOKED: 0, Status.OVERBOOKED: 0, Status.ARRIVED: 1, Status.CHECKED_IN: 2, Status.COMPLETED: 3}
#: States an appointment may pass through on the way to the EHR's state.
_STEPPING_STONES = (Status.BOOKED, Status.ARRIVED, Status.CHECKED_IN)

_SEX = {"F": "F", "M": "M", "O": "O", "U": "U", "A": "A", "N": "N", "X": "X", "FEMALE": "F", "MALE": "M",
        "OTHER": "O", "UNKNOWN": "U"}
#: ISO 639-2 (and a few names) → ISO 639-1, so PID-15 matches providers' languages.
_LANGUAGES = {
    "eng": "en", "english": "en", "spa": "es", "spanish": "es", "fra": "fr", "fre": "fr", "french": "fr",
    "deu": "de", "ger": "de", "german": "de", "nld": "nl", "dut": "nl", "dutch": "nl", "ita": "it", "por": "pt",
    "ara": "ar", "arabic": "ar", "zho": "zh", "chi": "zh", "kor": "ko", "korean": "ko", "jpn": "ja", "rus": "ru",
    "vie": "vi", "pol": "pl", "tur": "tr", "hin": "hi", "urd": "ur", "ben": "bn", "pan": "pa", "fas": "fa",
    "per": "fa", "som": "so", "tgl": "tl", "hat": "ht", "cym": "cy", "wel": "cy",
}
_UNITS = {
    "": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60, "m": 60, "mn": 60, "mi": 60,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_NOT_CODE_CHARACTER = re.compile(r"[^0-9A-Z]")
_TQ_DURATION_RE = re.compile(r"([SMHD]?)(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_ACTION_CODES = frozenset({"", "A", "D", "U", "X"})
_ACTOR_NAME_MAX = 100 - len("message:")


# --- the interface ------------------------------------------------------------


@dataclass
class ApplyResult:
    status: str  # "applied" | "skipped"
    warnings: list[ErrorDetail] = field(default_factory=list)
    response: bytes | None = None  # reply message (filler mode, later): None for now


class MappingError(Exception):
    """The message cannot be applied; ``errors`` says where and why."""

    def __init__(self, errors: list[ErrorDetail] | ErrorDetail):
        self.errors: list[ErrorDetail] = [errors] if isinstance(errors, ErrorDetail) else list(errors)
        super().__init__("; ".join(e.message for e in self.errors))


def is_supported(message_type: str, trigger_event: str, mode: str) -> bool:
    """Whether this mapping knows the message (see the module doc); a known
    ADT event we do not act on is supported (and skipped)."""
    message_type = (message_type or "").strip().upper()
    trigger_event = (trigger_event or "").strip().upper()
    if mode not in MODES:
        return False
    if message_type == "ADT":
        return re.fullmatch(r"A\d\d", trigger_event) is not None
    if message_type == "SIU" and mode == "mirror":
        return trigger_event in SIU_APPOINTMENT_EVENTS or trigger_event in SIU_BLOCK_EVENTS
    if message_type == "REF":
        return trigger_event in REF_EVENTS
    return False


def apply_message(scheduler: Scheduler, message: Message, *, mode: str, message_id: int) -> ApplyResult:
    """Apply one message; see the module doc for what maps where."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    message_type, event = message.message_type.upper(), message.trigger_event.upper()
    if not is_supported(message_type, event, mode):
        log.info("message skipped: type not mapped",
                 extra={"message_id": message_id, "control_id": message.control_id,
                        "message_type": f"{message_type}^{event}"[:20]})
        return ApplyResult("skipped", [])
    ctx = _Context(scheduler, message, event, message_id)
    try:
        if message_type == "ADT":
            status = _apply_adt(ctx)
        elif message_type == "REF":
            status = _apply_referral(ctx)
        elif event in SIU_BLOCK_EVENTS:
            status = _apply_blocks(ctx)
        else:
            status = _apply_siu(ctx)
    except SchedulingError as exc:  # not converted where it happened: name the message
        raise MappingError(_error(207, f"the schedule refused the message: {type(exc).__name__}: {exc}",
                                  "MSH", 1, 9)) from exc
    # one line per message would be the busiest line of the log; the inbox holds every message's
    # outcome (``slotengine messages list``), so only what is out of the ordinary is logged at INFO
    log.log(logging.DEBUG if status == "applied" and not ctx.warnings else logging.INFO,
            "message %s", status, extra={"message_id": message_id, "control_id": message.control_id,
                                         "message_type": f"{message_type}^{event}",
                                         "appointment_id": ctx.appointment_id, "warnings": len(ctx.warnings)})
    return ApplyResult(status, ctx.warnings)


def look_ahead(scheduler: Scheduler, messages: list[Message]) -> None:
    """Before the next ``messages`` are applied one by one in this transaction, look up
    with one query the patients they name (PID-3, else PID-2 or PID-4), and with another
    the appointments (SCH-1, SCH-2).  Applying a message reuses what was read here (kept
    in ``Message.memo``); what cannot be read here is read again, and its error reported,
    when the message is applied."""
    identifiers, placers, fillers = [], [], []
    for message in messages:
        ctx = _Context(scheduler, message, message.trigger_event.upper(), 0)  # its warnings come when applied
        try:
            for pid in message.segments_named("PID"):
                identifiers.extend(_patient_identifiers(ctx, pid))
            if message.message_type.upper() == "SIU" and (sch := message.first("SCH")) is not None:
                placer, filler = _external_ids(message, sch)
                placers.append(placer)
                fillers.append(filler)
        except Exception:  # noqa: BLE001 - see above
            continue
    if identifiers:
        scheduler.look_up_identifiers(identifiers)
    if any(placers) or any(fillers):
        scheduler.look_up_appointments(placers, fillers)


# --- context and small helpers -------------------------------------------------------


def _error(code: int, text: str, segment: Optional[str] = None, sequence: Optional[int] = None,
           field_: Optional[int] = None, component: Optional[int] = None, severity: str = "E") -> ErrorDetail:
    return ErrorDetail(segment=segment, sequence=sequence, field=field_, component=component, code=str(code),
                       severity=severity, message=text)


class _Context:
    def __init__(self, scheduler: Scheduler, message: Message, event: str, message_id: int):
        # ``guarded`` is the caller's view, each call in a savepoint, for what is retried
        self.guarded = scheduler
        self.message = message
        self.event = event
        self.message_id = message_id
        self.warnings: list[ErrorDetail] = []
        self.default_tz: str = scheduler.settings.default_timezone
        self.appointment_id: Optional[int] = None
        self._held: list[Any] = []
        #: patients this message registered: they had no coverage and no appointment before it
        self.created: set[int] = set()

    # Made on first use: ``look_ahead`` reads messages through a context and calls nothing.

    @cached_property
    def scheduler(self) -> Scheduler:
        """The message's calls commit or roll back together (the caller's contract): no
        savepoint each."""
        return self.guarded.all_or_nothing()

    @cached_property
    def actor(self) -> Actor:
        sender = f"{self.message.sending_application}^{self.message.sending_facility}"
        return Actor("message", sender[:_ACTOR_NAME_MAX], source=f"inbound:{self.message_id}")

    def hold(self, row: Any) -> None:
        """Keep ``row`` referenced while the message is applied: the session's identity
        map holds rows weakly, and the engine and plugins then get it without a SELECT."""
        self._held.append(row)

    def where(self, seg: Optional[Segment]) -> tuple[Optional[str], Optional[int]]:
        if seg is None:
            return None, None
        return seg.name, self.message.occurrence(seg)

    def warn(self, code: int, text: str, seg: Optional[Segment] = None, field_: Optional[int] = None,
             component: Optional[int] = None, *, segment_name: Optional[str] = None) -> None:
        name, seq = self.where(seg)
        if seg is None and segment_name:
            name, seq = segment_name, 1
        self.warnings.append(_error(code, text, name, seq, field_, component, severity="W"))

    def fail(self, code: int, text: str, seg: Optional[Segment] = None, field_: Optional[int] = None,
             component: Optional[int] = None, *, segment_name: Optional[str] = None) -> MappingError:
        name, seq = self.where(seg)
        if seg is None and segment_name:
            name, seq = segment_name, 1
        return MappingError(_error(code, text, name, seq, field_, component))

    @contextmanager
    def engine_call(self, seg: Optional[Segment], field_: Optional[int] = None, component: Optional[int] = None,
                    *, segment_name: Optional[str] = None) -> Iterator[None]:
        """Turn an engine refusal into a MappingError naming the field that caused it."""
        try:
            yield
        except SchedulingError as exc:
            code = 204 if isinstance(exc, NotFound) else 207
            raise self.fail(code, f"{type(exc).__name__}: {exc}", seg, field_, component,
                            segment_name=segment_name) from exc


def _val(seg: Optional[Segment], field_: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
    """A decoded value, stripped; ``NULL`` when the sender wrote ``""``.  Soft hyphens and
    NUL characters (``\\X00\\``, or the byte itself) are dropped: neither means anything in
    a name, code or note, and PostgreSQL stores no NUL in text."""
    if seg is None:
        return ""
    value = seg.value(field_, component, sub, rep)
    if not value:  # "" or NULL, as it is
        return value
    return value.replace("\u00ad", "").replace("\x00", "").strip()


def _vals(seg: Optional[Segment], field_: int, count: int, rep: int = 1) -> list[str]:
    """``_val`` of components 1..count of one repetition, the field split once."""
    if seg is None:
        return [""] * count
    return [value.replace("\u00ad", "").replace("\x00", "").strip() if value else value
            for value in seg.component_values(field_, count, rep)]


def _once(message: Message, key: tuple, read: Callable[[], Any]) -> Any:
    """``read()``, worked out once per message: ``look_ahead`` reads what applying the
    message reads again.  What raises is not kept (it raises again where it is reported)."""
    memo = message.memo
    if key not in memo:
        memo[key] = read()
    return memo[key]


def _reps(seg: Optional[Segment], field_: int) -> int:
    return len(seg.repetitions(field_)) if seg is not None else 0


def _norm(code: str) -> str:
    upper = (code or "").upper()
    if upper.isalnum() and upper.isascii():  # the usual code: nothing to remove
        return upper
    return _NOT_CODE_CHARACTER.sub("", upper)


def _fit(ctx: _Context, text: str, limit: int, seg: Optional[Segment], field_: int) -> str:
    if len(text) <= limit:
        return text
    ctx.warn(104, f"{seg.name if seg else ''}-{field_} is longer than {limit} characters: shortened", seg, field_)
    return text[:limit]


class _AI:
    """An AIS/AIG/AIL/AIP segment, read one position to the left when the
    sender skipped field 2 (segment action code, table 0206)."""

    def __init__(self, ctx: _Context, seg: Segment, deleted_group: bool):
        self.seg = seg
        raw2 = seg.field(2).strip()
        delimiters = ctx.message.delimiters
        self.shift = 1 if raw2.upper() not in _ACTION_CODES and (delimiters.component in raw2 or len(raw2) > 1) \
            else 0
        if self.shift:
            ctx.warn(102, f"{seg.name}-2 holds a value, not a segment action code: fields read one position "
                          f"to the left", seg, 2)
        action = "" if self.shift else raw2.upper()
        self.deleted = deleted_group or action == "D"

    def value(self, field_: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
        if self.shift and field_ <= 2:
            return ""
        return _val(self.seg, field_ - self.shift, component, sub, rep)

    def values(self, field_: int, count: int) -> list[str]:
        if self.shift and field_ <= 2:
            return [""] * count
        return _vals(self.seg, field_ - self.shift, count)

    def field(self, field_: int) -> int:
        """The physical position of a logical field (for error locations)."""
        return field_ - self.shift


# --- times ------------------------------------------------------------------------


def _dtm(ctx: _Context, seg: Optional[Segment], field_: int, component: int = 1, *, essential: bool,
         physical: Optional[int] = None) -> Optional[HL7DateTime]:
    """Parse a DTM; an essential one that does not parse is error 102, any
    other a warning (and None)."""
    text = _val(seg, physical or field_, component)
    if not text:
        return None
    try:
        return parse_dtm(text)
    except DTMError as exc:
        comp = component if component != 1 or _has_components(seg, physical or field_) else None
        label = f"{seg.name}-{field_}" + (f".{component}" if comp else "")
        if essential:
            raise ctx.fail(102, f"{label} is not an HL7 date/time: {exc}", seg, physical or field_, comp) from None
        ctx.warn(102, f"{label} is not an HL7 date/time; ignored", seg, physical or field_, comp)
        return None


def _has_components(seg: Optional[Segment], field_: int) -> bool:
    return seg is not None and len(seg.components(field_)) > 1


def _duration(quantity: str, units: str, units_text: str = "") -> Optional[timedelta]:
    """A quantity and its units as a positive timedelta, or None."""
    if not quantity:
        return None
    try:
        amount = float(quantity)
    except ValueError:
        return None
    if not amount > 0 or amount > 1e7:
        return None
    factor = _UNITS.get(units.strip().lower())
    if factor is None and units_text.strip():
        factor = _UNITS.get(units_text.strip().lower())
    if factor is None:
        return None
    return timedelta(seconds=round(amount * factor))


def _tq_duration(text: str) -> Optional[timedelta]:
    """TQ-3 duration: ``M30``, ``H2``, ``S90``, ``30`` (minutes), ``2 hours``."""
    match = _TQ_DURATION_RE.fullmatch((text or "").strip())
    if not match:
        return None
    prefix, number, word = match.groups()
    if prefix and word:
        return None
    units = {"S": "s", "M": "min", "H": "h", "D": "d"}.get(prefix, word)
    return _duration(number, units)


# --- patients ---------------------------------------------------------------------


def _identifier(ctx: _Context, seg: Segment, field_: int, rep: int) -> Optional[Identifier]:
    value, _, _, authority, type_code = _vals(seg, field_, 5, rep)
    if not value:
        return None
    authority = authority or _val(seg, field_, 4, 2, rep) or ""
    type_code = type_code or ""
    for text, limit in ((value, 100), (authority, 100), (type_code, 16)):
        if len(text) > limit:
            raise ctx.fail(104, f"{seg.name}-{field_} identifier (repetition {rep}) is longer than the "
                                f"{limit} characters we keep", seg, field_)
    return Identifier(value, authority, type_code)


def _identifiers(ctx: _Context, seg: Segment, fields: tuple[int, ...]) -> list[Identifier]:
    found: list[Identifier] = []
    for field_ in fields:
        for rep in range(1, _reps(seg, field_) + 1):
            ident = _identifier(ctx, seg, field_, rep)
            if ident is not None and ident not in found:
                found.append(ident)
        if found:
            break
    return found


def _patient_identifiers(ctx: _Context, pid: Segment) -> list[Identifier]:
    """PID-3, else PID-2 or PID-4."""
    found = _once(ctx.message, ("patient identifiers", pid), lambda: tuple(_identifiers(ctx, pid, (3, 2, 4))))
    return list(found)


def _patient_record(ctx: _Context, pid: Segment, pd1: Optional[Segment], pv1: Optional[Segment]) -> PatientRecord:
    identifiers = _patient_identifiers(ctx, pid)
    if not identifiers:
        raise ctx.fail(101, "PID-3 (patient identifier list) is empty: the patient cannot be identified", pid, 3)
    record = PatientRecord(identifiers=identifiers)
    _name(ctx, pid, record)
    birth = _dtm(ctx, pid, 7, essential=False)
    if birth is not None:
        record.birth_date = birth.date()
    sex = _val(pid, 8)
    if sex is NULL:
        record.sex = "U"
    elif sex:
        mapped = _SEX.get(_norm(sex))
        if mapped is None:
            ctx.warn(103, "PID-8 administrative sex is not an HL7 table 0001 value; not recorded", pid, 8)
        record.sex = mapped
    _address(ctx, pid, record)
    _phones(ctx, pid, record)
    _language(pid, record)
    _death(ctx, pid, record)
    if pd1 is not None:
        protection = _val(pd1, 12)
        if protection is NULL:
            record.confidential = False
        elif protection:
            record.confidential = protection.upper().startswith("Y")
    if pv1 is not None:
        mobility = _val(pv1, 15)
        if mobility is NULL:
            record.mobility = ""
        elif mobility.upper() == "A0":  # HL7 0009: "no functional limitations" is not a need
            record.mobility = ""
        elif mobility:
            record.mobility = _fit(ctx, mobility, 32, pv1, 15)
    return record


def _name(ctx: _Context, pid: Segment, record: PatientRecord) -> None:
    reps = _reps(pid, 5)
    if not reps:
        return
    if pid.field(5) == '""':
        record.family_name, record.given_name = "", ""
        return
    chosen = None
    for rep in range(1, reps + 1):  # the primary (legal) name comes first; skip empty repetitions
        family, given = _vals(pid, 5, 2, rep)
        if family or given:
            chosen = (family, given)
            break
    if chosen is not None:
        record.family_name = _fit(ctx, chosen[0], 100, pid, 5)
        record.given_name = _fit(ctx, chosen[1], 100, pid, 5)


def _address(ctx: _Context, pid: Segment, record: PatientRecord) -> None:
    reps = _reps(pid, 11)
    if not reps:
        return
    if pid.field(11) == '""':
        record.address = {}
        return
    addresses = {rep: _vals(pid, 11, 7, rep) for rep in range(1, reps + 1)}
    order = sorted(addresses, key=lambda r: (addresses[r][6].upper() not in ("H", "HOME"), r))
    for rep in order:
        street, line2, city, state, zip_code, country, _type = addresses[rep]
        street_name = _val(pid, 11, 1, 2, rep)
        if street_name and street_name not in street:
            street = f"{street} {street_name}".strip()
        parts = {"street": street, "line2": line2, "city": city, "state": state, "zip": zip_code,
                 "country": country}
        address = {k: v.replace("\u2011", "-")[:200] for k, v in parts.items() if v}
        if address:
            record.address = address
            return


def _phones(ctx: _Context, pid: Segment, record: PatientRecord) -> None:
    phones: list[dict[str, str]] = []
    email: Optional[str] = None
    said = False
    for field_, default_use in ((13, "PRN"), (14, "WPN")):
        for rep in range(1, _reps(pid, field_) + 1):
            said = True
            first, use, kind, fourth, country, area, local, extension, _, _, _, unformatted = \
                _vals(pid, field_, 12, rep)
            use = use.upper()
            if use in ("NET", "EMAIL", "X.400") or kind.upper() in ("INTERNET", "X.400") or "@" in fourth \
                    or "@" in first:
                address = fourth if "@" in fourth else first
                if "@" in address and email is None:
                    email = _fit(ctx, address.removeprefix("mailto:"), 200, pid, field_)
                continue
            number = first or unformatted
            if not number and (area or local):
                number = " ".join(p for p in (f"+{country}" if country else "", area, local) if p)
                if extension:
                    number += f" x{extension}"
            if not number or number is NULL:
                continue
            phone = {"number": number.replace("\u2011", "-")[:64], "use": use or default_use}
            if kind:
                phone["type"] = kind.upper()
            if phone not in phones:
                phones.append(phone)
    if said:
        record.phones = phones
        record.email = email or ""


def _language(pid: Segment, record: PatientRecord) -> None:
    code = _val(pid, 15)
    if code is NULL:
        record.language, record.needs_interpreter = "", False
        return
    text = code or _val(pid, 15, 2)
    if not text:
        return
    key = text.strip().lower().replace("_", "-")
    base = key.split("-")[0]
    language = _LANGUAGES.get(key) or _LANGUAGES.get(base) or (base if len(base) == 2 else key)
    record.language = language[:32]
    record.needs_interpreter = language != CLINIC_LANGUAGE


def _death(ctx: _Context, pid: Segment, record: PatientRecord) -> None:
    indicator = _val(pid, 30)
    died = None if _val(pid, 29) is NULL else _dtm(ctx, pid, 29, essential=False)
    if died is not None:
        record.deceased, record.deceased_at = True, died.to_utc(ctx.default_tz)
    elif indicator is NULL:
        record.deceased = False
    elif indicator:
        record.deceased = indicator.upper().startswith("Y")


#: PD1-11 publicity code (CDC table 0215, reminder/recall) → what the patient declined.
_PUBLICITY_OPT_OUTS = {
    "01": ("opt_out:reminder", "opt_out:recall"), "02": (), "03": ("opt_out:voice",),
    "04": ("opt_out:recall",), "05": ("opt_out:recall", "opt_out:voice"), "06": ("opt_out:reminder",),
    "07": ("opt_out:reminder", "opt_out:voice"),
    **{code: ("opt_out:reminder", "opt_out:recall") for code in ("08", "09", "10", "11", "12")},
}
_CODING_SYSTEMS = {"I10": "icd10", "I10C": "icd10", "ICD10": "icd10", "ICD10CM": "icd10", "I9": "icd9",
                   "I9C": "icd9", "ICD9": "icd9", "ICD9CM": "icd9", "SCT": "snomed", "SNOMEDCT": "snomed"}


def _patient_flags(ctx: _Context, patient_id: int, pd1: Optional[Segment]) -> None:
    publicity = _val(pd1, 11)
    if publicity is NULL or publicity in _PUBLICITY_OPT_OUTS:
        with ctx.engine_call(pd1, 11):
            ctx.scheduler.set_patient_flags(patient_id, _PUBLICITY_OPT_OUTS.get(publicity, ()), ctx.actor,
                                            source="hl7:PD1-11", replace_source=True)
    elif publicity:
        ctx.warn(103, "PD1-11 publicity code is not a table 0215 reminder/recall value; not recorded", pd1, 11)
    diagnoses = []
    for dg1 in ctx.message.segments_named("DG1"):
        code, system = _val(dg1, 3), _val(dg1, 3, 3)
        if code and code is not NULL:
            system = "" if system is NULL else system
            diagnoses.append(f"{_CODING_SYSTEMS.get(_norm(system), system.lower() or 'dx')}:{code.upper()}"[:64])
    if diagnoses:
        with ctx.engine_call(ctx.message.first("DG1"), 3):
            ctx.scheduler.set_patient_flags(patient_id, diagnoses, ctx.actor, source="hl7:DG1")


def _owners(ctx: _Context, identifiers: list[Identifier]) -> list[int]:
    return ctx.scheduler.patients_named_by(identifiers)


def _unchanged(patient: Patient, held: set[tuple[str, str, str]], record: PatientRecord) -> bool:
    """Whether registering ``record`` would change nothing: every field it gives is the
    patient's already, and the patient holds (``held``) each of its identifiers."""
    for name in record.__dataclass_fields__:
        if name == "identifiers":
            continue
        value = getattr(record, name)
        if value is not None and getattr(patient, name) != value:
            return False
    return all((i.authority, i.type_code, i.value) in held for i in record.identifiers)


def _register(ctx: _Context, pid: Segment, record: PatientRecord) -> int:
    """Create or update the patient; returns our patient id."""
    owners, held = ctx.scheduler.named_patients(record.identifiers)
    if len(owners) > 1:
        raise ctx.fail(205, f"PID-3 names patients {', '.join(str(o.id) for o in owners)}, whom this schedule "
                            f"holds separately (a merge, A40, is needed first)", pid, 3)
    if owners and _unchanged(owners[0], held, record):
        ctx.hold(owners[0])
        return owners[0].id
    with ctx.engine_call(pid, 3):
        patient = ctx.scheduler.register_patient(record, ctx.actor, named=[o.id for o in owners])
    ctx.hold(patient)
    if not owners:
        ctx.created.add(patient.id)
    return patient.id


def _patient_segments(message: Message, pid: Segment) -> tuple[Optional[Segment], Optional[Segment]]:
    """PD1 and PV1 of the patient group that starts with ``pid``."""
    pd1 = pv1 = None
    started = False
    for seg in message.segments:
        if seg is pid:
            started = True
            continue
        if not started:
            continue
        if seg.name in ("PID", "MRG", "RGS"):
            break
        if seg.name == "PD1" and pd1 is None:
            pd1 = seg
        elif seg.name == "PV1" and pv1 is None:
            pv1 = seg
    return pd1, pv1


# --- coverage -------------------------------------------------------------------------


def _coverages(ctx: _Context, patient_id: int) -> None:
    in2_of: dict[int, Segment] = {}
    current: Optional[Segment] = None
    for seg in ctx.message.segments:
        if seg.name == "IN1":
            current = seg
        elif seg.name == "IN2" and current is not None and id(current) not in in2_of:
            in2_of[id(current)] = seg
        elif seg.name not in ("IN3", "ROL", "NTE", "IN2"):
            current = None
    recorded: set[tuple[str, str]] = set()  # by this message
    for position, in1 in enumerate(ctx.message.segments_named("IN1"), 1):
        record = _coverage_record(ctx, in1, in2_of.get(id(in1)), position)
        if record is None:
            continue
        key = (record.payer_id, record.member_id)
        if patient_id in ctx.created and key not in recorded:
            coverage = None  # a patient new with this message has no coverage to look up
        else:
            coverage = ctx.scheduler.coverage_of(patient_id, record.payer_id, record.member_id)
        recorded.add(key)
        if coverage is not None and _coverage_unchanged(coverage, record):
            continue
        with ctx.engine_call(in1, 3):
            ctx.scheduler.record_coverage(patient_id, record, ctx.actor, found=coverage.id if coverage else None)


def _coverage_record(ctx: _Context, in1: Segment, in2: Optional[Segment], position: int) -> Optional[CoverageRecord]:
    plan = _val(in1, 2)
    payer = _val(in1, 3) or plan or _val(in1, 4)
    if not payer:
        ctx.warn(101, "IN1-3 (insurance company id), IN1-2 and IN1-4 are empty: coverage not recorded", in1, 3)
        return None
    member = _val(in1, 36) or _val(in1, 49) or _val(in2, 61)
    if len(payer) > 64 or len(member) > 64:
        ctx.warn(104, "IN1 payer or member id longer than 64 characters: coverage not recorded", in1, 3)
        return None
    priority = None
    for candidate in (_val(in1, 22), _val(in1, 1)):
        if candidate.isdigit() and 1 <= int(candidate) <= 99:
            priority = int(candidate)
            break
    dates: dict[str, Optional[date]] = {}
    for name, field_ in (("effective_date", 12), ("expiry_date", 13)):
        parsed = _dtm(ctx, in1, field_, essential=False)
        dates[name] = parsed.date() if parsed else None
    verified = _dtm(ctx, in1, 29, essential=False)
    verified_at = verified.to_utc(ctx.default_tz) if verified else None
    status_text = _val(in1, 45)
    if status_text:
        status = {"Y": "verified", "V": "verified", "VERIFIED": "verified", "N": "unverified",
                  "NOTVERIFIED": "unverified", "UNVERIFIED": "unverified"}.get(_norm(status_text),
                                                                                status_text.lower()[:32])
    else:
        status = "verified" if verified_at else "unverified"
    return CoverageRecord(
        payer_id=payer, member_id=member, payer_name=_val(in1, 4)[:200], plan_id=plan[:64],
        group_number=_val(in1, 8)[:64], priority=priority or position, verification_status=status,
        verified_at=verified_at, **dates,
    )


def _coverage_unchanged(coverage: Any, record: CoverageRecord) -> bool:
    return all(getattr(coverage, name) == getattr(record, name) for name in (
        "payer_name", "plan_id", "group_number", "priority", "effective_date", "expiry_date",
        "verification_status", "verified_at"))


# --- ADT ------------------------------------------------------------------------------


def _apply_adt(ctx: _Context) -> str:
    event = ctx.event
    if event not in ADT_PATIENT_EVENTS:
        return "skipped"
    pids = ctx.message.segments_named("PID")
    if not pids:
        raise ctx.fail(100, f"ADT^{event} without a PID segment", segment_name="PID")
    if event == "A40":
        _merge(ctx, pids)
        return "applied"
    if event == "A24":
        for pid in pids:
            pd1, pv1 = _patient_segments(ctx.message, pid)
            _register(ctx, pid, _patient_record(ctx, pid, pd1, pv1))
        return "applied"
    pid = pids[0]
    pd1, pv1 = _patient_segments(ctx.message, pid)
    patient_id = _register(ctx, pid, _patient_record(ctx, pid, pd1, pv1))
    _coverages(ctx, patient_id)
    _patient_flags(ctx, patient_id, pd1)
    if event in ("A01", "A04", "A03", "A11", "A13") and patient_id not in ctx.created:
        _visit_event(ctx, patient_id, pv1)  # (a patient new with this message has no appointment to mark)
    return "applied"


def _merge(ctx: _Context, pids: list[Segment]) -> None:
    segments = ctx.message.segments
    for pid in pids:
        start = segments.index(pid)
        mrg = None
        for seg in segments[start + 1:]:
            if seg.name == "PID":
                break
            if seg.name == "MRG":
                mrg = seg
                break
        if mrg is None:
            raise ctx.fail(100, "ADT^A40: a PID without the MRG segment naming the merged patient", pid)
        pd1, pv1 = _patient_segments(ctx.message, pid)
        record = _patient_record(ctx, pid, pd1, pv1)
        merged_ids = _identifiers(ctx, mrg, (1, 4))
        if not merged_ids:
            raise ctx.fail(101, "MRG-1 (prior patient identifier list) is empty", mrg, 1)
        merged_owners = _owners(ctx, merged_ids)
        if len(merged_owners) > 1:
            raise ctx.fail(205, f"MRG-1 names patients {', '.join(map(str, merged_owners))}, whom this schedule "
                                f"holds separately", mrg, 1)
        merged_id = merged_owners[0] if merged_owners else None
        owners = _owners(ctx, record.identifiers)
        others = [o for o in owners if o != merged_id]
        if len(others) > 1:
            raise ctx.fail(205, f"PID-3 names patients {', '.join(map(str, others))}, whom this schedule holds "
                                f"separately", pid, 3)
        if merged_id is None:
            ctx.warn(204, "MRG-1 names a patient this schedule does not hold: nothing to merge", mrg, 1)
            _register(ctx, pid, record)
            continue
        if others:
            survivor_id = others[0]
        elif owners:  # every PID-3 identifier is already the merged patient's: merged before
            _register(ctx, pid, record)
            continue
        else:  # unknown survivor: created from the PID, without the identifiers MRG-1 holds
            with ctx.engine_call(pid, 3):
                survivor_id = ctx.scheduler.register_patient(record, ctx.actor).id
        with ctx.engine_call(mrg, 1):
            ctx.scheduler.merge_patients(survivor_id, merged_id, ctx.actor,
                                         reason=f"ADT^A40 {ctx.message.control_id}"[:200])
        _register(ctx, pid, record)


def _event_time(ctx: _Context, pv1: Optional[Segment]) -> datetime:
    sources: list[tuple[Optional[Segment], int]] = [(ctx.message.first("EVN"), 2)]
    if ctx.event in ("A03", "A13"):
        sources.append((pv1, 45))
    sources += [(pv1, 44), (ctx.message.msh, 7)]
    for seg, field_ in sources:
        parsed = _dtm(ctx, seg, field_, essential=False)
        if parsed is not None:
            return parsed.to_utc(ctx.default_tz)
    return ctx.scheduler.clock.now()


# the patient's appointments around an event, and every location's time zone
_AROUND = Direct(select(Appointment.id, Appointment.start, Appointment.status, Appointment.location_id)
                 .where(Appointment.patient_id == bindparam("patient_id"), Appointment.start >= bindparam("earliest"),
                        Appointment.start <= bindparam("latest"))
                 .order_by(Appointment.start, Appointment.id))
_ZONES = Direct(select(Location.id, Location.timezone))


def _visit_event(ctx: _Context, patient_id: int, pv1: Optional[Segment]) -> None:
    when = _event_time(ctx, pv1)
    with ctx.scheduler.sessions() as session:
        rows = _AROUND.fetch(session, {"patient_id": patient_id, "earliest": when - timedelta(days=2),
                                       "latest": when + timedelta(days=2)})
        zones = dict(_ZONES.fetch(session)) if rows else {}
    same_day = []
    for appointment_id, start, status, location_id in rows:
        tz = zones.get(location_id) or ctx.default_tz
        local = zone(tz)
        if start.astimezone(local).date() == when.astimezone(local).date():
            same_day.append((abs(start - when), appointment_id, Status(status)))

    def nearest(statuses) -> Optional[tuple[int, Status]]:
        found = sorted((d, a, s) for d, a, s in same_day if s in statuses)
        return (found[0][1], found[0][2]) if found else None

    reason = f"ADT^{ctx.event}"
    booked = (Status.BOOKED, Status.OVERBOOKED)
    visit = (Status.ARRIVED, Status.CHECKED_IN, Status.COMPLETED)
    scheduler, actor = ctx.scheduler, ctx.actor
    with ctx.engine_call(pv1, None, segment_name="PV1"):
        if ctx.event in ("A01", "A04"):
            hit = nearest(booked + visit)
            if hit and hit[1] in booked:
                scheduler.arrive(hit[0], actor, reason)
                ctx.appointment_id = hit[0]
        elif ctx.event == "A03":
            hit = nearest((Status.ARRIVED, Status.CHECKED_IN)) or nearest(booked + (Status.COMPLETED,))
            if hit and hit[1] != Status.COMPLETED:
                if hit[1] in booked:
                    scheduler.arrive(hit[0], actor, reason)
                scheduler.complete(hit[0], actor, reason)
                ctx.appointment_id = hit[0]
        elif ctx.event == "A11":
            hit = nearest((Status.ARRIVED, Status.CHECKED_IN))
            if hit:
                if hit[1] == Status.CHECKED_IN:
                    scheduler.undo_check_in(hit[0], actor, reason)
                scheduler.undo_arrival(hit[0], actor, reason)
                ctx.appointment_id = hit[0]
        elif ctx.event == "A13":
            hit = nearest((Status.COMPLETED,))
            if hit:
                scheduler.undo_completion(hit[0], actor, reason)
                ctx.appointment_id = hit[0]


# --- SIU: who and where ------------------------------------------------------------------


@dataclass
class _Entity:
    model: type
    code: str
    values: dict[str, Any]
    seg: Segment
    field_: int


def _ai_segments(ctx: _Context) -> list[_AI]:
    found: list[_AI] = []
    group_deleted = False
    for seg in ctx.message.segments:
        if seg.name == "RGS":
            group_deleted = _val(seg, 2).upper() == "D"
        elif seg.name in ("AIS", "AIG", "AIL", "AIP"):
            found.append(_AI(ctx, seg, group_deleted))
    return found


def _ei(seg: Segment, field_: int) -> Optional[str]:
    ident, namespace_id, universal_id = _vals(seg, field_, 3)
    if not ident:
        return None
    namespace = namespace_id or universal_id
    return f"{ident}^{namespace}" if namespace else ident


def _location_entity(ctx: _Context, seg: Segment, field_: int, physical: int) -> Optional[_Entity]:
    point, room, _, facility, _, _, _, _, description = _vals(seg, physical, 9)
    facility = facility or _val(seg, physical, 4, 2)
    code = point or facility or room or description
    if not code:
        return None
    if len(code) > 64:
        ctx.warn(104, f"{seg.name}-{field_} location code is longer than 64 characters: not recorded", seg, physical)
        return None
    name = description or _val(seg, physical, 1, 2) or (f"{point} ({facility})" if point and facility else code)
    return _Entity(Location, code, {"name": name[:200], "timezone": ctx.default_tz, "address": "",
                                    "instructions": ""}, seg, physical)


def _room_entity(ctx: _Context, seg: Segment, field_: int, physical: int, location_code: str) -> Optional[_Entity]:
    _, room, bed = _vals(seg, physical, 3)
    if not room:
        return None
    code = "^".join(p for p in (location_code, room, bed) if p)
    if len(code) > 64:
        ctx.warn(104, f"{seg.name}-{field_} room code is longer than 64 characters: not recorded", seg, physical)
        return None
    return _Entity(Resource, code, {"name": (room + (f" {bed}" if bed else ""))[:200], "kind": "room"}, seg, physical)


def _resource_kind(kind_code: str, kind_text: str) -> str:
    words = _norm(kind_code) + " " + _norm(kind_text)
    if "ROOM" in words:
        return "room"
    if _norm(kind_code) in ("P", "PERSON", "PERSONNEL", "PROVIDER", "STAFF") or "PERSON" in words:
        return "person"
    if "EQUIP" in words or "DEVICE" in words or "MACHINE" in words:
        return "equipment"
    return "other"


def _resource_entity(ctx: _Context, ai: _AI) -> Optional[_Entity]:
    code, text = ai.values(3, 2)
    code = code or text
    if not code:
        return None
    if len(code) > 64:
        ctx.warn(104, "AIG-3 resource id is longer than 64 characters: not recorded", ai.seg, ai.field(3))
        return None
    kind = _resource_kind(*ai.values(4, 2))
    return _Entity(Resource, code, {"name": (text or code)[:200], "kind": kind}, ai.seg, ai.field(3))


def _provider_entity(ctx: _Context, ai: _AI) -> Optional[_Entity]:
    code, family, given = ai.values(3, 3)
    if not code:
        if family or given:
            ctx.warn(101, "AIP-3.1 (person id) is empty: the provider is not recorded", ai.seg, ai.field(3), 1)
        return None
    if len(code) > 64:
        ctx.warn(104, "AIP-3.1 person id is longer than 64 characters: not recorded", ai.seg, ai.field(3), 1)
        return None
    return _Entity(Provider, code, {"family_name": (family or code)[:100], "given_name": given[:100],
                                    "gender": "U", "languages": [], "specialties": [], "networks": [],
                                    "active": True}, ai.seg, ai.field(3))


_CODES = "slotengine.mapping.codes"
#: Per database: the ids of the locations, providers and resources found by code.  Kept
#: across transactions: such a row is never deleted and its code never changes, so an id
#: once found stays true (a code not found is asked again: another writer may add it).
_IDS_BY_CODE: "weakref.WeakKeyDictionary[Engine, dict[tuple, int]]" = weakref.WeakKeyDictionary()


@event.listens_for(Session, "after_soft_rollback")
def _forget_codes(session: Session, _transaction) -> None:
    """A rolled-back savepoint may have taken a row we looked up with it."""
    session.info.pop(_CODES, None)
    _IDS_BY_CODE.pop(session.get_bind(), None)


def _looked_up(ctx: _Context, query: Direct, code: str) -> Any:
    """What ``query`` answers for ``code`` (its first column, or None), remembered for the rest
    of the transaction: the messages of one batch name the same few locations, providers and
    rooms again and again."""
    with ctx.scheduler.sessions() as session:
        known = session.info.setdefault(_CODES, {})
        key = (query, code)
        if key not in known:
            found = query.fetch(session, {"code": code})
            known[key] = found[0][0] if found else None
        return known[key]


@cache
def _id_by_code(model: type) -> Direct:
    return Direct(select(model.id).where(model.code == bindparam("code")))


_TIMEZONE_BY_CODE = Direct(select(Location.timezone).where(Location.code == bindparam("code")))


def _existing_id(ctx: _Context, model, code: str) -> Optional[int]:
    with ctx.scheduler.sessions() as session:
        ids = _IDS_BY_CODE.setdefault(session.get_bind(), {})
    found = ids.get((model, code))
    if found is None:
        found = _looked_up(ctx, _id_by_code(model), code)
        if found is not None:
            ids[(model, code)] = found
    return found


def _location_timezone(ctx: _Context, code: str) -> str:
    return _looked_up(ctx, _TIMEZONE_BY_CODE, code) or ctx.default_tz


def _ensure(ctx: _Context, entity: _Entity, **extra: Any) -> int:
    """The id of the record with this code, created when the EHR names one we
    do not know (mirror mode: see the module doc)."""
    found = _existing_id(ctx, entity.model, entity.code)
    if found is not None:
        return found
    try:
        with ctx.guarded.unit_of_work() as (session, _work):
            row = entity.model(code=entity.code, **entity.values, **extra)
            session.add(row)
            session.flush()
            new_id = row.id
            known = session.info.get(_CODES, {})
            known.pop((_id_by_code(entity.model), entity.code), None)
            known.pop((_TIMEZONE_BY_CODE, entity.code), None)
    except IntegrityError:  # created by a concurrent writer meanwhile
        found = _existing_id(ctx, entity.model, entity.code)
        if found is None:
            raise
        return found
    log.info("created from an inbound message", extra={"message_id": ctx.message_id, "entity": entity.model.__name__,
                                                         "entity_id": new_id})
    return new_id


# --- SIU: times, type, status ----------------------------------------------------------------


def _siu_times(ctx: _Context, sch: Segment, ais: list[_AI], tz: str) -> tuple[datetime, datetime]:
    tq1 = ctx.message.first("TQ1")
    candidates: list[tuple[Segment, int, int, Optional[tuple[Segment, int, int]], int]] = []
    if tq1 is not None:
        candidates.append((tq1, 7, 1, (tq1, 8, 1), 7))
    candidates.append((sch, 11, 4, (sch, 11, 5), 11))
    starts = {"AIS": 4, "AIG": 8, "AIL": 6, "AIP": 6}
    for ai in ais:
        if not ai.deleted:
            candidates.append((ai.seg, starts[ai.seg.name], 1, None, ai.field(starts[ai.seg.name])))
    start = end_source = None
    for seg, field_, component, pair, physical in candidates:
        start = _dtm(ctx, seg, field_, component, essential=True, physical=physical)
        if start is not None:
            end_source = pair
            break
    if start is None:
        if tq1 is not None:
            raise ctx.fail(101, "no appointment start time: TQ1-7 (and SCH-11.4, AIS-4, AIP-6…) empty", tq1, 7)
        raise ctx.fail(101, "no appointment start time: SCH-11.4 (and TQ1, AIS-4, AIP-6…) empty", sch, 11)
    if not start.has_time:
        ctx.warn(102, f"{seg.name}-{field_} start has no time of day: midnight assumed", seg, physical)
    start_utc = start.to_utc(tz)
    duration = _siu_duration(ctx, sch, tq1, ais)
    end_utc = None
    if end_source is not None:
        end_seg, end_field, end_component = end_source
        end = _dtm(ctx, end_seg, end_field, end_component, essential=True)
        if end is not None:
            end_utc = end.to_utc(tz)
            label = f"{end_seg.name}-{end_field}" + (f".{end_component}" if end_seg.name == "SCH" else "")
            problem = ("is not after the start" if end_utc <= start_utc else
                       "is more than 24 hours after the start" if end_utc - start_utc > MAX_DURATION else None)
            if problem:
                where = (end_seg, end_field, end_component if end_seg.name == "SCH" else None)
                if duration is None:
                    raise ctx.fail(102, f"{label} (end) {problem}, and no duration is given", *where)
                ctx.warn(102, f"{label} (end) {problem}: the duration decides the end", *where)
                end_utc = None
    if end_utc is None and duration is not None:
        if duration > MAX_DURATION:
            raise ctx.fail(102, "the appointment's duration is more than 24 hours", sch, 9)
        end_utc = start_utc + duration
    if end_utc is None:
        ctx.warn(101, f"no end time or duration (TQ1-8, TQ1-6, SCH-9/10, AIS-7/8…): "
                      f"{int(DEFAULT_DURATION.total_seconds() // 60)} minutes assumed",
                 tq1 or sch, 8 if tq1 is not None else 9)
        end_utc = start_utc + DEFAULT_DURATION
    return start_utc, end_utc


def _siu_duration(ctx: _Context, sch: Segment, tq1: Optional[Segment], ais: list[_AI]) -> Optional[timedelta]:
    """The first duration given: TQ1-6, SCH-9/10, SCH-11.3, AIS-7/8, AIG-11/12,
    AIL-9/10, AIP-9/10. One that is not understood is skipped with a warning."""
    fields = {"AIS": 7, "AIG": 11, "AIL": 9, "AIP": 9}

    def given() -> Iterator[tuple[str, str, str, Segment, int]]:
        """Quantity, units, units text and where, read only as far as needed."""
        if tq1 is not None and (quantity := _val(tq1, 6, 1)):
            yield quantity, _val(tq1, 6, 2, 1), _val(tq1, 6, 2, 2), tq1, 6
        if quantity := _val(sch, 9):
            yield (quantity, *_vals(sch, 10, 2), sch, 9)
        if quantity := _val(sch, 11, 3):
            yield quantity, "", "", sch, 11
        for ai in ais:
            f = fields[ai.seg.name]
            if not ai.deleted and (quantity := ai.value(f)):
                yield (quantity, *ai.values(f + 1, 2), ai.seg, ai.field(f))

    for quantity, units, units_text, seg, field_ in given():
        if seg is sch and field_ == 11:
            duration = _tq_duration(quantity)
            label, component = "SCH-11.3", 3
        else:
            duration = _duration(quantity, units, units_text)
            label, component = f"{seg.name}-{field_}/{field_ + 1}", None
        if duration is None:
            ctx.warn(103, f"{label} duration or its units are not understood: ignored", seg, field_, component)
            continue
        return duration
    return None


def _appointment_type(ctx: _Context, sch: Segment, ais: list[_AI]) -> tuple[str, str]:
    codes = [_vals(sch, 7, 3), _vals(sch, 8, 3)]
    codes += [a.values(3, 3) for a in ais if a.seg.name == "AIS" and not a.deleted]
    kind, urgency = None, "routine"
    for code, text, system in codes:
        found: tuple[Optional[str], Optional[str]] = APPOINTMENT_TYPE_CODES.get(_norm(code)) or \
            APPOINTMENT_TYPE_CODES.get(_norm(text)) or (None, None)
        if found == (None, None) and _norm(system) in ("SCT", "SNM", "SNOMEDCT", "SNM3") and \
                text.lower().endswith("(procedure)"):
            found = ("procedure", None)
        if found[1] == "urgent":
            urgency = "urgent"
        if found[0] in _SPECIFIC_TYPES and kind not in _SPECIFIC_TYPES:
            kind = found[0]
        elif found[0] and kind is None:
            kind = found[0]
    tq1 = ctx.message.first("TQ1")
    if tq1 is not None and _norm(_val(tq1, 9)) in ("S", "A", "STAT", "ASAP"):
        urgency = "urgent"
    return kind or "general", urgency


def _reason_and_notes(ctx: _Context, sch: Segment, ais: list[_AI]) -> tuple[str, str]:
    texts = [text or code for code, text in
             [_vals(sch, 7, 2)] + [a.values(3, 2) for a in ais if a.seg.name == "AIS" and not a.deleted]]
    reason_parts: list[str] = []
    for text in texts:
        if text and text is not NULL and text not in reason_parts:
            reason_parts.append(text)
    if not reason_parts:
        fallback = _val(sch, 8, 2) or _val(sch, 8, 1)
        if fallback and _norm(fallback) not in APPOINTMENT_TYPE_CODES:
            reason_parts.append(fallback)
    reason = _fit(ctx, "; ".join(reason_parts), 400, sch, 7)
    notes = []
    for nte in ctx.message.segments_named("NTE"):
        for rep in range(1, _reps(nte, 3) + 1):
            text = _val(nte, 3, 1, 1, rep)
            if text:
                notes.append(text)
    if ctx.event in _EVENT_NAMES:
        why = _val(sch, 6, 2) or _val(sch, 6, 1)
        if why:
            notes.append(f"{_EVENT_NAMES[ctx.event]} (SCH-6): {why}")
    return reason, "\n".join(notes)


def _filler_status(ctx: _Context, sch: Segment) -> Optional[Status]:
    text = _val(sch, 25, 1)
    if not text:
        return None
    status = FILLER_STATUS.get(_norm(text)) or FILLER_STATUS.get(_norm(_val(sch, 25, 2)))
    if status is None:
        ctx.warn(103, f"SCH-25 filler status {text[:20]!r} is not in table 0278: not used", sch, 25)
    return status


def _status_path(current: Status, target: Status) -> Optional[list[Status]]:
    """The states to pass through (ending with ``target``), or None when the
    state machine does not lead there without occupying time only in between."""
    if current == target or target in TRANSITIONS[current]:
        return [target]
    if current not in OCCUPYING and target not in OCCUPYING:
        return None
    queue: deque[list[Status]] = deque([[current]])
    seen = {current}
    while queue:
        path = queue.popleft()
        for step in _STEPPING_STONES:
            if step in seen or step not in TRANSITIONS[path[-1]]:
                continue
            if target in TRANSITIONS[step]:
                return path[1:] + [step, target]
            seen.add(step)
            queue.append(path + [step])
    return None


# --- SIU: appointments ------------------------------------------------------------------------


def _siu_patient(ctx: _Context) -> Optional[int]:
    pid = ctx.message.first("PID")
    if pid is None:
        return None
    pd1, pv1 = _patient_segments(ctx.message, pid)
    return _register(ctx, pid, _patient_record(ctx, pid, pd1, pv1))


@dataclass
class _Where:
    location: Optional[_Entity]
    rooms: list[_Entity]
    resources: list[_Entity]
    providers: list[_Entity]


def _siu_where(ctx: _Context, ais: list[_AI]) -> _Where:
    location: Optional[_Entity] = None
    rooms: list[_Entity] = []
    resources: list[_Entity] = []
    providers: list[_Entity] = []
    for ai in ais:
        if ai.deleted:
            continue
        if ai.seg.name == "AIL":
            entity = _location_entity(ctx, ai.seg, 3, ai.field(3))
            if entity is None:
                continue
            if location is None:
                location = entity
            room = _room_entity(ctx, ai.seg, 3, ai.field(3), entity.code)
            if room is not None and room.code not in {r.code for r in rooms}:
                rooms.append(room)
        elif ai.seg.name == "AIG":
            entity = _resource_entity(ctx, ai)
            if entity is not None and entity.code not in {r.code for r in resources}:
                resources.append(entity)
        elif ai.seg.name == "AIP":
            entity = _provider_entity(ctx, ai)
            if entity is not None and entity.code not in {p.code for p in providers}:
                providers.append(entity)
    if location is None:
        pv1 = ctx.message.first("PV1")
        if pv1 is not None and _val(pv1, 3):
            location = _location_entity(ctx, pv1, 3, 3)
            if location is not None:
                room = _room_entity(ctx, pv1, 3, 3, location.code)
                if room is not None:
                    rooms.append(room)
    return _Where(location, rooms, resources, providers)


def _snapshot(ctx: _Context, placer: Optional[str], filler: Optional[str]) -> Optional[dict[str, Any]]:
    appointment = ctx.scheduler.find_appointment(placer_id=placer, filler_id=filler)
    if appointment is None:
        return None
    with ctx.scheduler.sessions() as session:
        row = session.get(Appointment, appointment.id)
        ctx.hold(row)
        # the relationship, which record_external_appointment reads next
        resources = sorted(r.resource_id for r in row.resources)
        # held until the EHR books it (Scheduler.request_booking): its S12 is that booking, not a late notice
        asked = row.status == Status.HELD.value and session.scalar(select(ChangeRequest.id).where(
            ChangeRequest.appointment_id == row.id, ChangeRequest.kind == "book",
            ChangeRequest.status.in_(("pending", "accepted"))).limit(1)) is not None
        return {"id": row.id, "status": Status(row.status), "start": row.start, "end": row.end,
                "appointment_type": row.appointment_type, "reason": row.reason, "urgency": row.urgency,
                "notes": row.notes, "patient_id": row.patient_id, "provider_id": row.provider_id,
                "location_id": row.location_id, "resource_ids": tuple(resources), "asked_of_owner": asked}


def _external_ids(message: Message, sch: Segment) -> tuple[str, str]:
    """SCH-1 and SCH-2: the placer's and the filler's appointment ids, as we keep them."""
    return _once(message, ("appointment ids", sch), lambda: _read_external_ids(sch))


def _read_external_ids(sch: Segment) -> tuple[str, str]:
    placer, filler = _ei(sch, 1), _ei(sch, 2)
    if placer and placer.startswith(REQUESTED_PLACER_PREFIX):
        # a booking we asked the EHR for: kept under the bare id we gave it, which it echoes with our namespace
        placer = placer.split("^")[0]
    return placer, filler


def _would_change(existing: dict[str, Any], external: ExternalAppointment) -> bool:
    """Whether ``record_external_appointment`` would change the appointment."""
    if existing["status"] != Status(external.status):
        return True
    for name in ("start", "end", "appointment_type", "urgency"):
        if existing[name] != getattr(external, name):
            return True
    for name in ("reason", "notes", "patient_id", "provider_id", "location_id"):
        value = getattr(external, name)
        if value and existing[name] != value:
            return True
    return tuple(sorted(existing["resource_ids"])) != tuple(sorted(external.resource_ids))


def _apply_siu(ctx: _Context) -> str:
    message = ctx.message
    sch = message.first("SCH")
    if sch is None:
        raise ctx.fail(100, f"SIU^{ctx.event} without an SCH segment", segment_name="SCH")
    placer, filler = _external_ids(message, sch)
    if not (placer or filler):
        raise ctx.fail(101, "SCH-1 (placer appointment id) and SCH-2 (filler appointment id) are both empty",
                       sch, 1)
    for ident, field_ in ((placer, 1), (filler, 2)):
        if ident and len(ident) > 100:
            raise ctx.fail(104, f"SCH-{field_} appointment id is longer than 100 characters", sch, field_)
    ais = _ai_segments(ctx)
    where = _siu_where(ctx, ais)
    tz = _location_timezone(ctx, where.location.code) if where.location else ctx.default_tz
    start, end = _siu_times(ctx, sch, ais, tz)
    appointment_type, urgency = _appointment_type(ctx, sch, ais)
    reason, notes = _reason_and_notes(ctx, sch, ais)
    filler_status = _filler_status(ctx, sch)
    existing = _snapshot(ctx, placer, filler)
    if existing is not None and placer and filler:
        by_placer = ctx.scheduler.find_appointment(placer_id=placer)
        by_filler = ctx.scheduler.find_appointment(filler_id=filler)
        if by_placer is not None and by_filler is not None and by_placer.id != by_filler.id:
            raise ctx.fail(207, f"the placer id (SCH-1) names appointment {by_placer.id} and the filler id "
                                f"names appointment {by_filler.id}: two appointments, not one", sch, 2)

    # Writes start here; everything above only read.
    patient_id = _siu_patient(ctx)
    location_id = _ensure(ctx, where.location) if where.location else None
    provider_id = _ensure(ctx, where.providers[0], location_id=location_id) if where.providers else None
    resource_ids = sorted({_ensure(ctx, e, location_id=location_id) for e in where.rooms + where.resources})

    current = existing["status"] if existing else None
    if ctx.event in _TRIGGER_STATUS:
        target = _TRIGGER_STATUS[ctx.event]
    else:
        target = filler_status or (current if ctx.event == "S14" and current else Status.BOOKED)
    if current in _VISIT_RANK and target in _VISIT_RANK and _VISIT_RANK[target] < _VISIT_RANK[current]:
        target = current
    external = ExternalAppointment(
        status=target.value, start=start, end=end, appointment_type=appointment_type, placer_id=placer,
        filler_id=filler, patient_id=patient_id, provider_id=provider_id, location_id=location_id,
        resource_ids=tuple(resource_ids), reason=reason, urgency=urgency, notes=notes,
    )
    if existing is not None and ctx.event == "S12" and not existing["asked_of_owner"]:
        external = _late_booking(ctx, sch, existing, external)
        target = Status(external.status)
    if existing is not None:
        ctx.appointment_id = existing["id"]
        if not _would_change(existing, external):
            return "applied"
        path = _status_path(current, target)
        if path is None:
            source = (sch, 25) if ctx.event not in _TRIGGER_STATUS and filler_status else (message.msh, 9)
            raise ctx.fail(207, f"appointment {existing['id']} is {current.value}; SIU^{ctx.event} would make it "
                                f"{target.value}, which the appointment state machine does not allow", *source)
    else:
        path = [target]
    status_field = (sch, 25) if filler_status and ctx.event not in _TRIGGER_STATUS else (message.msh, 9)
    found = existing["id"] if existing else None
    for step in path:
        with ctx.engine_call(*status_field):
            appointment = ctx.scheduler.record_external_appointment(replace(external, status=step.value), ctx.actor,
                                                                    found=found)
        found = appointment.id
    ctx.appointment_id = appointment.id
    return "applied"


def _late_booking(ctx: _Context, sch: Segment, existing: dict[str, Any],
                  external: ExternalAppointment) -> ExternalAppointment:
    """An S12 for an appointment we hold fills only what we do not know."""
    kept = replace(
        external, status=existing["status"].value, start=existing["start"], end=existing["end"],
        appointment_type=existing["appointment_type"], urgency=existing["urgency"],
        reason=existing["reason"] or external.reason, notes=existing["notes"] or external.notes,
        patient_id=existing["patient_id"] or external.patient_id,
        provider_id=existing["provider_id"] or external.provider_id,
        location_id=existing["location_id"] or external.location_id,
        resource_ids=existing["resource_ids"] or external.resource_ids,
    )
    kept_view = {**existing, "status": Status(kept.status), "patient_id": kept.patient_id,
                 "provider_id": kept.provider_id, "location_id": kept.location_id, "reason": kept.reason,
                 "notes": kept.notes, "resource_ids": kept.resource_ids}
    if _would_change(kept_view, external):
        ctx.warn(205, f"SIU^S12 for appointment {existing['id']}, which this schedule already holds: a repeated or "
                      f"late booking notice does not change it (send S13/S14)", sch, 2 if external.filler_id else 1)
    return kept


# --- SIU: blocked and opened time ------------------------------------------------------------------


def _apply_blocks(ctx: _Context) -> str:
    sch = ctx.message.first("SCH")
    if sch is None:
        raise ctx.fail(100, f"SIU^{ctx.event} without an SCH segment", segment_name="SCH")
    ais = _ai_segments(ctx)
    where = _siu_where(ctx, ais)
    tz = _location_timezone(ctx, where.location.code) if where.location else ctx.default_tz
    start, end = _siu_times(ctx, sch, ais, tz)
    owners: list[tuple[str, _Entity]] = [("provider", p) for p in where.providers]
    owners += [("resource", r) for r in where.rooms + where.resources]
    if not owners:
        raise ctx.fail(101, f"SIU^{ctx.event} names no provider (AIP-3) or resource (AIG-3, AIL-3) whose time "
                            f"it {'blocks' if ctx.event == 'S23' else 'opens'}", segment_name="AIP")
    location_id = _ensure(ctx, where.location) if where.location else None
    reason = _val(sch, 6, 2) or _val(sch, 6, 1) or _val(sch, 7, 2) or _val(sch, 7, 1)
    for kind, entity in owners:
        owner_id = _ensure(ctx, entity, location_id=location_id)
        column = TimeBlock.provider_id if kind == "provider" else TimeBlock.resource_id
        with ctx.scheduler.sessions() as session:
            if ctx.event == "S23":
                blocks = list(session.scalars(select(TimeBlock.id).where(
                    column == owner_id, TimeBlock.active.is_(True), TimeBlock.start == start, TimeBlock.end == end)))
            else:
                blocks = list(session.scalars(select(TimeBlock.id).where(
                    column == owner_id, TimeBlock.active.is_(True), TimeBlock.start >= start, TimeBlock.end <= end)))
        with ctx.engine_call(entity.seg, entity.field_):
            if ctx.event == "S23":
                if not blocks:
                    ctx.scheduler.block_time(start=start, end=end, actor=ctx.actor, reason=reason[:400],
                                             **{f"{kind}_id": owner_id})
            elif blocks:
                for block_id in blocks:
                    ctx.scheduler.unblock_time(block_id, ctx.actor, reason[:400])
            else:
                ctx.warn(204, f"no blocked time of this {kind} lies within the opened time: nothing to open",
                         entity.seg, entity.field_)
    return "applied"


# --- REF: patient referrals (REF^I12) --------------------------------------------------------------
#
# A referral is recorded through the hook ``slotengine_referral_received`` in
# the message's transaction (the built-in ``referrals`` plugin records it and
# routes it: books the consult or waitlists the patient, and tells the
# referrer) — the path ``plugins.referrals.receive_referral`` takes for the
# service API.  See the module doc, "REF".

REF_EVENTS = frozenset({"I12"})
#: RF1-2 referral priority (table 0280 and what senders write) that makes the referral urgent.
_URGENT_PRIORITIES = frozenset({"S", "A", "STAT", "ASAP", "URGENT", "EMERGENCY"})
#: RF1-1 referral status (table 0283) of a referral not to be scheduled.
_CLOSED_REFERRALS = {"R": "rejected", "REJECTED": "rejected", "E": "expired", "EXPIRED": "expired"}
#: RF1-10 referral reason (table 0336) codes in words, when the sender gives no text.
_REFERRAL_REASONS = {"S": "second opinion", "P": "patient preference", "O": "provider ordered", "W": "work load"}
#: PRD-1 provider roles (table 0286): code, and the role's name as senders spell it.
_REFERRING = frozenset({"RP", "REFERRINGPROVIDER"})
_REFERRED_TO = frozenset({"RT", "REFERREDTOPROVIDER"})


def _specialty_code(text: str) -> str:
    """``Family Medicine`` → ``family_medicine``: how ``Provider.specialties`` spell them."""
    return re.sub(r"[^0-9a-z]+", "_", (text or "").lower()).strip("_")


def _apply_referral(ctx: _Context) -> str:
    message = ctx.message
    rf1 = message.first("RF1")
    if rf1 is None:
        raise ctx.fail(100, f"REF^{ctx.event} without an RF1 segment", segment_name="RF1")
    closed = _CLOSED_REFERRALS.get(_norm(_val(rf1, 1))) or _CLOSED_REFERRALS.get(_norm(_val(rf1, 1, 2)))
    if closed:
        ctx.warn(207, f"RF1-1 says the referral is {closed}: nothing is scheduled", rf1, 1)
        return "skipped"
    pid = message.first("PID")
    if pid is None:
        raise ctx.fail(100, f"REF^{ctx.event} without a PID segment", segment_name="PID")
    specialty = _referral_specialty(ctx, rf1)
    priorities = {_norm(_val(rf1, 2, 1)), _norm(_val(rf1, 2, 2))}
    urgency = "urgent" if priorities & _URGENT_PRIORITIES else "routine"
    external_id = _ei(rf1, 6) or _ei(rf1, 11)
    if external_id and len(external_id) > 100:
        raise ctx.fail(104, "RF1-6 (originating referral identifier) is longer than 100 characters", rf1, 6)
    if not external_id:
        ctx.warn(101, "RF1-6 (originating referral identifier) is empty: a resend of this referral would be "
                      "recorded again", rf1, 6)
    referring = _prd(ctx, _REFERRING)
    referred_to = _prd(ctx, _REFERRED_TO)
    referral: dict[str, Any] = {
        "specialty": specialty, "urgency": urgency, "external_id": external_id,
        "referring_provider": _referrer(ctx, referring) if referring is not None else "",
        "referring_contact": _prd_email(ctx, referring) if referring is not None else "",
        "reason": _referral_reason(rf1, message), "payer_id": _referral_payer(message),
        "preferred_provider_id": _referred_to(ctx, referred_to) if referred_to is not None else None,
        "source": ctx.actor.source,
    }

    # Writes start here; everything above only read.
    pd1, pv1 = _patient_segments(message, pid)
    referral["patient_id"] = _register(ctx, pid, _patient_record(ctx, pid, pd1, pv1))
    _coverages(ctx, referral["patient_id"])
    with ctx.engine_call(rf1), ctx.scheduler.unit_of_work() as (session, _work):
        referral_id = ctx.scheduler.plugins.referral_received(session, referral)
    if referral_id is None:
        raise ctx.fail(207, "no plugin handles referrals (is the referrals plugin disabled?)", message.msh, 9)
    log.info("referral received", extra={"message_id": ctx.message_id, "control_id": message.control_id,
                                         "referral_id": referral_id})
    return "applied"


def _referral_specialty(ctx: _Context, rf1: Segment) -> str:
    """RF1-3 referral type as a specialty: the text (component 2), else the
    code; whichever a provider of ours practises, else the first one given."""
    candidates = [c for c in (_specialty_code(_val(rf1, 3, 2)), _specialty_code(_val(rf1, 3, 1))) if c]
    if not candidates:
        raise ctx.fail(101, "RF1-3 (referral type: the specialty asked for) is empty", rf1, 3)
    with ctx.scheduler.sessions() as session:
        known = {s for specialties in session.scalars(select(Provider.specialties)) for s in specialties or ()}
    chosen = next((c for c in candidates if c in known), candidates[0])
    return _fit(ctx, chosen, 64, rf1, 3)


def _referral_reason(rf1: Segment, message: Message) -> str:
    """RF1-10 (text, else the table 0336 code in words), DG1 diagnoses, NTE comments."""
    parts: list[str] = []
    code, text = _val(rf1, 10, 1), _val(rf1, 10, 2)
    if text or code:
        parts.append(text or _REFERRAL_REASONS.get(code.upper(), code))
    for dg1 in message.segments_named("DG1"):
        diagnosis = _val(dg1, 3, 2) or _val(dg1, 4) or _val(dg1, 3, 1)
        if diagnosis and diagnosis not in parts:
            parts.append(diagnosis)
    notes = [_val(nte, 3, 1, 1, rep) for nte in message.segments_named("NTE") for rep in range(1, _reps(nte, 3) + 1)]
    return "\n".join(["; ".join(parts)] + [n for n in notes if n]).strip()


def _referral_payer(message: Message) -> Optional[str]:
    """The payer of the primary IN1 (IN1-22, else IN1-1, else order), picked as
    ``_coverage_record`` picks it; None (the patient's primary coverage) without IN1."""
    best: Optional[tuple[int, str]] = None
    for position, in1 in enumerate(message.segments_named("IN1"), 1):
        payer = _val(in1, 3) or _val(in1, 2) or _val(in1, 4)
        if not payer or len(payer) > 64:
            continue
        priority = next((int(c) for c in (_val(in1, 22), _val(in1, 1)) if c.isdigit() and 1 <= int(c) <= 99),
                        position)
        if best is None or priority < best[0]:
            best = (priority, payer)
    return best[1] if best else None


def _prd(ctx: _Context, roles: frozenset[str]) -> Optional[Segment]:
    """The first PRD whose PRD-1 (any repetition, code or text) is one of ``roles``."""
    for prd in ctx.message.segments_named("PRD"):
        for rep in range(1, _reps(prd, 1) + 1):
            if _norm(_val(prd, 1, 1, 1, rep)) in roles or _norm(_val(prd, 1, 2, 1, rep)) in roles:
                return prd
    return None


def _prd_id(prd: Segment) -> str:
    """PRD-7 provider identifier (the first repetition with one)."""
    return next((v for rep in range(1, _reps(prd, 7) + 1) if (v := _val(prd, 7, 1, 1, rep))), "")


def _referrer(ctx: _Context, prd: Segment) -> str:
    """``Dr Ann Who, MD (1234)``: PRD-2 prefix, given and family name, degree; PRD-7 id."""
    name = " ".join(p for p in (_val(prd, 2, 5), _val(prd, 2, 2), _val(prd, 2, 1)) if p)
    if name and _val(prd, 2, 6):
        name += f", {_val(prd, 2, 6)}"
    ident = _prd_id(prd)
    text = f"{name} ({ident})" if name and ident else name or ident
    return _fit(ctx, text, 200, prd, 2)


def _prd_email(ctx: _Context, prd: Segment) -> str:
    """The e-mail address in PRD-5 (an XTN with use NET, type Internet, or an
    "@"); a phone number is not used: notices go out through the referrals
    team's channel, e-mail by default."""
    for rep in range(1, _reps(prd, 5) + 1):
        use, kind = _val(prd, 5, 2, 1, rep).upper(), _val(prd, 5, 3, 1, rep).upper()
        first, fourth = _val(prd, 5, 1, 1, rep), _val(prd, 5, 4, 1, rep)
        address = fourth if "@" in fourth else first if "@" in first else ""
        if not address and (use in ("NET", "X.400") or kind in ("INTERNET", "X.400")):
            address = fourth or first
        if address:
            return _fit(ctx, address.removeprefix("mailto:"), 200, prd, 5)
    return ""


def _referred_to(ctx: _Context, prd: Segment) -> Optional[int]:
    """Our provider whose code is the referred-to provider's PRD-7 id, if we have one."""
    ident = _prd_id(prd)
    if not ident:
        if _val(prd, 2, 1) or _val(prd, 2, 2):
            ctx.warn(101, "PRD-7 of the referred-to provider (PRD-1 RT) is empty: a name alone does not identify "
                          "a provider; routed by specialty", prd, 7)
        return None
    found = _existing_id(ctx, Provider, ident)
    if found is None:
        ctx.warn(204, "the referred-to provider (PRD-1 RT, PRD-7) is not a provider of this schedule: routed by "
                      "specialty", prd, 7)
    return found
