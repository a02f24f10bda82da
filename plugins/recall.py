"""Recall and preventive care: patients overdue or coming due for a visit are asked to book.

A rule says which visits satisfy it — appointment ``types`` (new_patient,
follow_up, procedure, general…) and/or ``reasons``, shell patterns over the
visit's reason (SCH-7 / AIS-3 text in mirror mode, the booking's reason:
``"*mammo*"``) —, how often (``interval``, counted from the patient's last
visit done that matches ``after_types`` / ``after_reasons``, by default the
same visits), and who it is for (``sex``, ``age`` on the due date,
``flags``).  The due window runs from ``lead_days``
before the due date to ``grace_days`` after it.

A daily job (``recall.daily``, at ``run_at`` clinic-local time) judges every
patient under every rule and keeps one ``RecallTicket`` per patient, rule and
counted-from visit: it opens one ``notice_days`` before the window, contacts
the patient through the escalation steps (a message on their preferred
channel, another channel after ``wait_days`` without a booking, then a staff
notice), and closes it when a matching visit is booked or completed.  The
booking hook closes tickets at once (``slotengine_schedule_changed``) and
reopens them when that booking is cancelled, deleted or missed.  Every state
carries its reason, and ``history`` every step: ``slotengine recall list
--json`` shows them.

Never contacted: deceased patients (PID-30; their tickets are suppressed),
patients with the flag ``opt_out:recall`` (PD1-11, or a ``STOP`` reply to a
recall message; their tickets are suppressed with the reason) and channels
they declined (``opt_out:voice``).  Merged patients' tickets follow the
survivor, with their contact history.  Nobody is asked to book a window that
starts after the booking horizon (``horizon_days``, and the last slot that
exists for the rule's types): the ticket waits, saying so.  Messages name
the clinic, the rule's ``label``, the dates and how to book — never a
diagnosis; a label is shown to the patient, so never name one there either.

Flags come from the patient's record (``engine.models.PatientFlag``): ADT
DG1-3 diagnoses arrive as ``icd10:<code>`` (see ``hl7/mapping.py``), so a
rule for patients with diabetes says ``flags = ["icd10:E10*", "icd10:E11*"]``
(shell patterns, any one matches).

Replies: ``POST /recall/reply`` ``{"token": ..., "answer": "stop"}`` (the
token is the message's ``reply_token``, also in the booking link) records
the opt-out.

Settings::

    [plugins.recall]
    run_at = "10:00"                 # clinic-local time of the daily job
    timezone = "America/New_York"    # default: [clinic] timezone
    horizon_days = 56                # never ask for a visit further out than this
    notice_days = 14                 # open (and contact) this long before the window
    lead_days = 30                   # the window opens this long before the due date
    grace_days = 60                  # ... and closes this long after it
    channels = ["email", "sms", "voice"]   # fallback order after the patient's preference
    clinic_name = "Main Street Clinic"
    booking_url = "https://portal.clinic.example/book"   # the token is appended as ?recall=
    phone = "+1 555 0100"
    staff_team = "front_desk"
    reply_secret_env = "SLOTENGINE_REPLY_SECRET"         # or reply_secret = "..."
    batch_size = 500
    send_seconds = 60
    escalation = [                   # the default for every rule
        { via = "preferred" },                 # preferred | other | email | sms | voice | staff
        { via = "other", wait_days = 14 },     # a channel not used yet
        { via = "staff", wait_days = 14 },
    ]

    [plugins.recall.rules.mammogram]
    types = ["procedure"]            # visits that satisfy the rule: these types (any when left out)
    reasons = ["*mammo*"]            # ... whose reason matches one of these (any when left out)
    interval = "24 months"           # N days | weeks | months | years
    after_types = ["procedure"]      # visits done the interval counts from (default: types and reasons)
    after_reasons = ["*mammo*"]
    if_never = "due"                 # due | wait: no such visit yet (default: due unless after_* are given)
    sex = ["F"]
    age = [50, 74]                   # inclusive, on the due date
    flags = []                       # patterns; the patient needs one matching flag
    label = "a screening visit"      # shown to the patient
    # lead_days, grace_days, notice_days, escalation: per rule, over the defaults
"""
from __future__ import annotations

import calendar as month_calendar
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, Iterable, Optional
from urllib.parse import quote

from sqlalchemy import func, or_, select, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from engine.calendar import local_to_utc, zone
from engine.jobs import claim_due, dispatch_outbox
from engine.messaging import address_for, language_of
from engine.models import (
    Appointment,
    OutboxItem,
    Patient,
    PatientFlag,
    PatientIdentifier,
    RecallTicket,
    Slot,
)
from engine.plugin import hookimpl
from engine.requests import Actor, Change
from engine.service import EXCLUSIVE_SLOT_TYPES
from engine.signing import BadToken, make_token, read_token, reply_route, secret_from_settings

log = logging.getLogger("slotengine.plugins.recall")

NAME = "recall"
ACTIVE = ("open", "contacted", "escalated")
#: Appointment states in which a visit counts as booked or done (held: booked, awaiting staff review).
SATISFYING = ("held", "booked", "overbooked", "arrived", "checked_in", "completed")
#: ... as done (the patient came): the interval counts from the last of these.
DONE = ("arrived", "checked_in", "completed")
#: States after which the visit will not happen: a ticket it closed opens again.
UNDONE = ("cancelled", "deleted", "no_show")
VIAS = ("preferred", "other", "email", "sms", "voice", "staff")
OPT_OUT = "opt_out:recall"
RUN_LOCK = 0x7EC_A11  # PostgreSQL advisory lock: one daemon judges patients at a time

TEXTS = {
    "en": {
        "subject": "Time to book {label}",
        "short": "{clinic}: it is time to book {label}, between {start} and {end}. {how} Reply STOP to stop these messages.",
        "online": "Book online: {link}",
        "call": "Call us: {phone}",
        "hello": "Hello",
        "body": "It is time to book {label}. Please choose a visit between {start} and {end}.",
        "stop": "If you do not want these messages, reply STOP or tell us when you call.",
        "months": ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
    },
    "es": {
        "subject": "Es hora de reservar {label}",
        "short": "{clinic}: es hora de reservar {label}, entre el {start} y el {end}. {how} Responda STOP para no recibir más mensajes.",
        "online": "Reserve en línea: {link}",
        "call": "Llámenos: {phone}",
        "hello": "Hola",
        "body": "Es hora de reservar {label}. Elija una visita entre el {start} y el {end}.",
        "stop": "Si no desea estos mensajes, responda STOP o díganoslo cuando llame.",
        "months": ("ene", "feb", "mar", "abr", "may", "jun", "jul", "ago", "sep", "oct", "nov", "dic"),
    },
}
STOP_WORDS = {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "baja", "parar"}


# --- dates -----------------------------------------------------------------------------------


def add_months(day: date, months: int) -> date:
    """The same day ``months`` later, or the month's last day when it is shorter (31 Jan + 1 = 28/29 Feb)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    return date(year, month + 1, min(day.day, month_calendar.monthrange(year, month + 1)[1]))


@dataclass(frozen=True)
class Interval:
    months: int = 0
    days: int = 0

    def after(self, day: date) -> date:
        return add_months(day, self.months) + timedelta(days=self.days)

    def __str__(self) -> str:
        if self.months:
            return f"{self.months // 12} years" if self.months % 12 == 0 and self.months > 12 else f"{self.months} months"
        return f"{self.days // 7} weeks" if self.days % 7 == 0 else f"{self.days} days"


_INTERVAL = re.compile(r"^\s*(\d+)\s*(day|week|month|year)s?\s*$", re.IGNORECASE)


def parse_interval(value: Any, where: str) -> Interval:
    match = _INTERVAL.match(str(value))
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{where}: expected an interval like \"12 months\", \"6 weeks\" or \"42 days\", got {value!r}")
    count, unit = int(match.group(1)), match.group(2).lower()
    return {"day": Interval(days=count), "week": Interval(days=7 * count), "month": Interval(months=count),
            "year": Interval(months=12 * count)}[unit]


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def local_midnight(day: date, tz: str) -> datetime:
    """The UTC instant the clinic's ``day`` begins (the daily run that day acts on what is due by then)."""
    return local_to_utc(day, time(0), tz)


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Visits:
    """Which visits a rule means: appointment types and reason patterns (each: any when empty)."""

    types: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()  # lower-case shell patterns

    def match(self, kind: str, reason: str) -> bool:
        return (not self.types or kind in self.types) and (
            not self.reasons or any(fnmatchcase((reason or "").lower(), p) for p in self.reasons))

    def __str__(self) -> str:
        return " ".join(part for part in ("/".join(self.types), " or ".join(f'"{r}"' for r in self.reasons)) if part)


@dataclass(frozen=True)
class Step:
    via: str
    wait_days: int = 0  # after the previous step (the first: after the ticket opens)


@dataclass(frozen=True)
class Rule:
    name: str
    visits: Visits
    interval: Interval
    after: Visits
    if_never: str  # due | wait
    sex: tuple[str, ...] = ()
    age: Optional[tuple[int, int]] = None
    flags: tuple[str, ...] = ()
    label: str = "a routine check-up"
    lead_days: int = 30
    grace_days: int = 60
    notice_days: int = 14
    escalation: tuple[Step, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "types": list(self.visits.types), "reasons": list(self.visits.reasons),
                "interval": str(self.interval), "after_types": list(self.after.types),
                "after_reasons": list(self.after.reasons), "if_never": self.if_never, "sex": list(self.sex),
                "age": list(self.age) if self.age else None, "flags": list(self.flags), "label": self.label,
                "lead_days": self.lead_days, "grace_days": self.grace_days, "notice_days": self.notice_days,
                "escalation": [{"via": s.via, "wait_days": s.wait_days} for s in self.escalation]}


DEFAULT_ESCALATION = (Step("preferred"), Step("other", 14), Step("staff", 14))


@dataclass(frozen=True)
class Settings:
    rules: dict[str, Rule] = field(default_factory=dict)
    run_at: time = time(10, 0)
    timezone: str = "America/New_York"
    horizon_days: int = 56
    channels: tuple[str, ...] = ("email", "sms", "voice")
    clinic_name: str = "Your clinic"
    booking_url: str = ""
    phone: str = ""
    staff_team: str = "front_desk"
    reply_secret: str = ""
    batch_size: int = 500
    send_seconds: float = 60.0


RULE_KEYS = {"types", "reasons", "interval", "after_types", "after_reasons", "if_never", "sex", "age", "flags", "label", "lead_days", "grace_days",
             "notice_days", "escalation"}
KEYS = {"rules", "run_at", "timezone", "horizon_days", "notice_days", "lead_days", "grace_days", "channels",
        "clinic_name", "booking_url", "phone", "staff_team", "reply_secret", "reply_secret_env", "batch_size",
        "send_seconds", "escalation"}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _days(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: expected a whole number of days (0 or more), got {value!r}")
    return value


def _escalation(value: Any, where: str) -> tuple[Step, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: expected a list of steps like {{ via = \"sms\", wait_days = 14 }}")
    steps = []
    for n, item in enumerate(value):
        here = f"{where}[{n}]"
        if not isinstance(item, dict) or set(item) - {"via", "wait_days"}:
            raise ValueError(f"{here}: a step has via and wait_days, got {item!r}")
        if item.get("via") not in VIAS:
            raise ValueError(f"{here}.via: one of {', '.join(VIAS)}, got {item.get('via')!r}")
        steps.append(Step(item["via"], _days(item.get("wait_days", 0), f"{here}.wait_days")))
    return tuple(steps)


def parse_rule(name: str, raw: Any, defaults: dict[str, Any]) -> Rule:
    where = f"[plugins.recall.rules.{name}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    if "interval" not in raw:
        raise ValueError(f"{where}.interval is required")
    if not (raw.get("types") or raw.get("reasons")):
        raise ValueError(f"{where}: types or reasons is required (the visits that satisfy the rule)")

    def visits(types_key: str, reasons_key: str) -> Visits:
        types = _strings(raw[types_key], f"{where}.{types_key}") if raw.get(types_key) else ()
        reasons = _strings(raw[reasons_key], f"{where}.{reasons_key}") if raw.get(reasons_key) else ()
        return Visits(types, tuple(r.lower() for r in reasons))

    satisfying = visits("types", "reasons")
    counted_from = visits("after_types", "after_reasons") if ("after_types" in raw or "after_reasons" in raw) \
        else satisfying
    if_never = raw.get("if_never", "due" if counted_from == satisfying else "wait")
    if if_never not in ("due", "wait"):
        raise ValueError(f"{where}.if_never: due or wait, got {if_never!r}")
    sex = _strings(raw.get("sex", []), f"{where}.sex") if raw.get("sex") else ()
    if any(s not in ("F", "M", "O", "U", "A", "N") for s in sex):
        raise ValueError(f"{where}.sex: HL7 table 0001 codes (F, M, O, U, A, N), got {list(sex)!r}")
    age = raw.get("age")
    if age is not None:
        if (not isinstance(age, (list, tuple)) or len(age) != 2 or not all(isinstance(a, int) and a >= 0 for a in age)
                or age[0] > age[1]):
            raise ValueError(f"{where}.age: expected [youngest, oldest] in whole years, got {age!r}")
        age = (age[0], age[1])
    flags = tuple(f.lower() for f in _strings(raw["flags"], f"{where}.flags")) if raw.get("flags") else ()
    label = raw.get("label", "a routine check-up")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}.label: a short text shown to the patient")
    days = {key: _days(raw.get(key, defaults[key]), f"{where}.{key}") for key in ("lead_days", "grace_days", "notice_days")}
    escalation = _escalation(raw["escalation"], f"{where}.escalation") if "escalation" in raw else defaults["escalation"]
    return Rule(name=name, visits=satisfying, interval=parse_interval(raw["interval"], f"{where}.interval"),
                after=counted_from,
                if_never=if_never, sex=sex, age=age, flags=flags, label=label.strip(), escalation=escalation, **days)


def parse_settings(raw: dict[str, Any], default_timezone: str, *, secret: bool = True) -> Settings:
    where = "[plugins.recall]"
    unknown = set(raw) - KEYS
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(sorted(unknown))}")
    defaults = {key: _days(raw.get(key, value), f"{where}.{key}")
                for key, value in (("lead_days", 30), ("grace_days", 60), ("notice_days", 14))}
    defaults["escalation"] = (_escalation(raw["escalation"], f"{where}.escalation") if "escalation" in raw
                              else DEFAULT_ESCALATION)
    rules_raw = raw.get("rules") or {}
    if not isinstance(rules_raw, dict):
        raise ValueError(f"{where}.rules: expected tables [plugins.recall.rules.<name>]")
    rules = {name: parse_rule(name, rule, defaults) for name, rule in rules_raw.items()}
    try:
        run_at = time.fromisoformat(str(raw.get("run_at", "10:00")))
    except ValueError:
        raise ValueError(f"{where}.run_at: expected a time like 10:00, got {raw.get('run_at')!r}") from None
    tz = str(raw.get("timezone") or default_timezone)
    try:
        zone(tz)
    except Exception:  # noqa: BLE001 - zoneinfo raises several kinds
        raise ValueError(f"{where}.timezone: unknown time zone {tz!r}") from None
    horizon = raw.get("horizon_days", 56)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"{where}.horizon_days: at least 1, got {horizon!r}")
    channels = _strings(raw.get("channels", ["email", "sms", "voice"]), f"{where}.channels")
    batch_size = raw.get("batch_size", 500)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}.batch_size: at least 1, got {batch_size!r}")
    return Settings(
        rules=rules, run_at=run_at, timezone=tz, horizon_days=horizon, channels=channels,
        clinic_name=str(raw.get("clinic_name", "Your clinic")), booking_url=str(raw.get("booking_url", "")),
        phone=str(raw.get("phone", "")), staff_team=str(raw.get("staff_team", "front_desk")),
        reply_secret=(secret_from_settings(raw, "reply_secret", where, default_env="SLOTENGINE_REPLY_SECRET")
                      if secret and rules else ""),
        batch_size=batch_size, send_seconds=float(raw.get("send_seconds", 60)),
    )


def _settings(context) -> Optional[Settings]:
    return context.state.get(NAME) if context is not None else None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    context.state[NAME] = parse_settings(settings, context.scheduler.settings.default_timezone)


# --- judging one patient under one rule -----------------------------------------------------------


@dataclass(frozen=True)
class Visit:
    id: int
    type: str
    status: str
    start: datetime
    day: date  # clinic-local
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    state: str  # ineligible | waiting | satisfied | due
    reason: str
    anchor: Optional[Visit] = None
    due: Optional[date] = None
    window_start: Optional[date] = None
    window_end: Optional[date] = None
    satisfied_by: Optional[Visit] = None


def judge(rule: Rule, *, sex: str, birth_date: Optional[date], flags: Iterable[str], visits: Iterable[Visit],
          today: date) -> Verdict:
    """Where a patient stands under ``rule`` on ``today``, and why."""
    flags = [f.lower() for f in flags]
    if rule.flags and not any(fnmatchcase(f, pattern) for f in flags for pattern in rule.flags):
        return Verdict("ineligible", f"no flag matching {', '.join(rule.flags)}")
    if rule.sex and sex not in rule.sex:
        return Verdict("ineligible", f"sex {sex or 'U'}; the rule is for {'/'.join(rule.sex)}")
    visits = list(visits)
    counted = [v for v in visits if rule.after.match(v.type, v.reason) and v.status in DONE]
    anchor = max(counted, key=lambda v: (v.start, v.id)) if counted else None
    if anchor is None:
        if rule.if_never == "wait":
            return Verdict("waiting", f"no {rule.after} visit done to count from")
        due, basis = today, f"no {rule.after} visit done on record"
    else:
        due = rule.interval.after(anchor.day)
        basis = f"{rule.interval} after appointment {anchor.id} ({anchor.type}) on {anchor.day.isoformat()}"
    if rule.age:
        youngest, oldest = rule.age
        if birth_date is None:
            return Verdict("ineligible", f"birth date unknown; the rule is for ages {youngest}-{oldest}")
        if age_on(birth_date, due) < youngest:
            due = add_months(birth_date, 12 * youngest)
            basis += f"; age {youngest} reached on {due.isoformat()}"
        if age_on(birth_date, due) > oldest:
            return Verdict("ineligible", f"aged {age_on(birth_date, due)} on the due date {due.isoformat()}; "
                                         f"the rule is for ages {youngest}-{oldest}", anchor)
    # a booking whose day has passed without the patient coming is stale, not a visit
    satisfying = [v for v in visits if rule.visits.match(v.type, v.reason) and (v.status in DONE or v.day >= today)
                  and (anchor is None or (v.start, v.id) > (anchor.start, anchor.id))]
    if satisfying:
        visit = min(satisfying, key=lambda v: (v.start, v.id))
        return Verdict("satisfied", _visit_words(visit), anchor, due, satisfied_by=visit)
    window_start, window_end = due - timedelta(days=rule.lead_days), due + timedelta(days=rule.grace_days)
    opens = window_start - timedelta(days=rule.notice_days)
    if today < opens:
        return Verdict("waiting", f"due {due.isoformat()} ({basis}); recall opens {opens.isoformat()}", anchor, due,
                       window_start, window_end)
    return Verdict("due", f"due {due.isoformat()} ({basis}); visit window {window_start.isoformat()} to "
                          f"{window_end.isoformat()}", anchor, due, window_start, window_end)


def _visit_words(visit: Visit) -> str:
    done = "done" if visit.status in DONE else "held for review" if visit.status == "held" else "booked"
    return f"appointment {visit.id} ({visit.type}) {done} for {visit.day.isoformat()}"


# --- tickets ------------------------------------------------------------------------------------


def _key(rule: str, patient_id: int, anchor_id: Optional[int]) -> str:
    return f"{rule}:{patient_id}:{anchor_id if anchor_id is not None else 'none'}"


def _note(ticket: RecallTicket, now: datetime, event: str, status: str, reason: str, **detail: Any) -> None:
    """Move ``ticket`` to ``status`` for ``reason`` and keep the step in its history."""
    ticket.status, ticket.reason, ticket.updated_at = status, reason, now
    entry = {"at": now.isoformat(), "event": event, "status": status, "reason": reason}
    entry.update({k: v for k, v in detail.items() if v is not None})
    ticket.history = [*(ticket.history or []), entry]  # reassigned: JSON columns do not track appends


def _close(ticket: RecallTicket, now: datetime, reason: str, by: Optional[int] = None) -> None:
    ticket.next_action_at, ticket.closed_by_appointment_id = None, by
    _note(ticket, now, "closed", "closed", reason, appointment_id=by)


def _suppress(ticket: RecallTicket, now: datetime, reason: str) -> bool:
    if ticket.status == "suppressed" and ticket.reason == reason:
        return False
    ticket.next_action_at = None
    _note(ticket, now, "suppressed", "suppressed", reason)
    return True


def _reopen(ticket: RecallTicket, now: datetime, reason: str, tz: str) -> None:
    ticket.step, ticket.channels_used, ticket.closed_by_appointment_id = 0, [], None
    ticket.next_action_at = local_midnight(now.astimezone(zone(tz)).date(), tz)
    _note(ticket, now, "reopened", "open", reason)


def _insert_ticket(session: Session, values: dict[str, Any]) -> Optional[RecallTicket]:
    """Insert unless another daemon opened the same ticket a moment ago (``dedupe_key``)."""
    module = pg_dialect if session.get_bind().dialect.name == "postgresql" else sqlite_dialect
    inserted = session.execute(module.insert(RecallTicket).values(**values)
                               .on_conflict_do_nothing(index_elements=["dedupe_key"])
                               .returning(RecallTicket.id)).first()
    return session.get(RecallTicket, inserted[0]) if inserted else None


def suppression(patient: Patient, flags: Iterable[str]) -> Optional[str]:
    """Why this patient must not be contacted at all, or None."""
    if patient.deceased:
        return "the patient is deceased (PID-30)" + (
            f", died {patient.deceased_at.date().isoformat()}" if patient.deceased_at else "")
    if OPT_OUT in flags:
        return "the patient opted out of recall messages"
    return None


def _apply(session: Session, settings: Settings, rule: Rule, patient: Patient, flags: set[str], verdict: Verdict,
           tickets: list[RecallTicket], now: datetime, counts: Counter) -> None:
    """Bring the patient's tickets under ``rule`` in line with ``verdict``."""
    key = _key(rule.name, patient.id, verdict.anchor.id if verdict.anchor else None)
    current = next((t for t in tickets if t.dedupe_key == key), None)
    closing = {"ineligible": "no longer eligible: ", "waiting": "not due: "}.get(verdict.state, "") + verdict.reason
    for ticket in tickets:
        if ticket is current or ticket.status == "closed":
            continue
        if verdict.anchor is not None and ticket.anchor_appointment_id != verdict.anchor.id:
            _close(ticket, now, f"{_visit_words(verdict.anchor)}: the interval counts from it now", verdict.anchor.id)
        elif verdict.state == "due":
            _close(ticket, now, f"superseded: {verdict.reason}")
        else:
            _close(ticket, now, closing, verdict.satisfied_by.id if verdict.satisfied_by else None)
        counts["closed"] += 1
    if verdict.state != "due":
        if current is not None and current.status != "closed":
            _close(current, now, closing, verdict.satisfied_by.id if verdict.satisfied_by else None)
            counts["closed"] += 1
        return
    why_not = suppression(patient, flags)
    if current is None:
        current = _insert_ticket(session, dict(
            patient_id=patient.id, rule=rule.name, dedupe_key=key, status="open",
            anchor_appointment_id=verdict.anchor.id if verdict.anchor else None, due_date=verdict.due,
            window_start=verdict.window_start, window_end=verdict.window_end, step=0, contacts=0, channels_used=[],
            next_action_at=None if why_not else local_midnight(
                now.astimezone(zone(settings.timezone)).date() + timedelta(days=rule.escalation[0].wait_days),
                settings.timezone),
            reason="", closed_by_appointment_id=None, history=[], created_at=now, updated_at=now))
        if current is None:
            return  # another daemon opened it just now
        _note(current, now, "opened", "open", verdict.reason)
        counts["opened"] += 1
        if why_not:
            _suppress(current, now, why_not)
            counts["suppressed"] += 1
    elif why_not:
        counts["suppressed"] += _suppress(current, now, why_not)
    elif current.status in ("closed", "suppressed"):
        _reopen(current, now, f"reopened: {verdict.reason}", settings.timezone)
        counts["reopened"] += 1


def _serialise(session: Session) -> None:
    """One daemon at a time judges patients (each would reach the same answers; this keeps histories single)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RUN_LOCK})


def follow_merges(session: Session, now: datetime) -> int:
    """Tickets of merged-away patients move to the survivor with their history, unless
    the survivor has a ticket of their own for that rule (then theirs continues)."""
    moved = 0
    rows = session.execute(select(RecallTicket, Patient.merged_into_id).join(Patient, Patient.id == RecallTicket.patient_id)
                           .where(Patient.merged_into_id.is_not(None), RecallTicket.status != "closed")).all()
    for ticket, survivor_id in rows:
        survivor = session.get(Patient, survivor_id)
        while survivor.merged_into_id:
            survivor = session.get(Patient, survivor.merged_into_id)
        key = _key(ticket.rule, survivor.id, ticket.anchor_appointment_id)
        theirs = session.scalars(select(RecallTicket).where(
            RecallTicket.patient_id == survivor.id, RecallTicket.rule == ticket.rule,
            or_(RecallTicket.status != "closed", RecallTicket.dedupe_key == key)).limit(1)).first()
        if theirs is not None:
            _close(ticket, now, f"patient {ticket.patient_id} was merged into {survivor.id}, whose ticket {theirs.id} "
                                "continues")
        else:
            previous = ticket.patient_id
            ticket.patient_id, ticket.dedupe_key = survivor.id, key
            _note(ticket, now, "moved", ticket.status, f"patient {previous} was merged into {survivor.id}; "
                                                         f"this ticket follows the survivor ({ticket.reason})")
        moved += 1
    return moved


def judge_patients(context, settings: Settings, now: datetime) -> Counter:
    """Open, close, suppress and reopen tickets for every patient, a batch per transaction."""
    counts: Counter = Counter()
    today = now.astimezone(zone(settings.timezone)).date()
    last_id = 0
    while True:
        with context.session_factory() as session, session.begin():
            _serialise(session)
            if last_id == 0:
                counts["followed merges"] += follow_merges(session, now)
            patients = list(session.scalars(select(Patient).where(Patient.id > last_id, Patient.merged_into_id.is_(None))
                                            .order_by(Patient.id).limit(settings.batch_size)))
            if not patients:
                break
            ids = [p.id for p in patients]
            visits: dict[int, list[Visit]] = {}
            for row in session.execute(select(Appointment.id, Appointment.patient_id, Appointment.appointment_type,
                                              Appointment.status, Appointment.start, Appointment.reason)
                                       .where(Appointment.patient_id.in_(ids), Appointment.status.in_(SATISFYING))):
                day = row.start.astimezone(zone(settings.timezone)).date()
                visits.setdefault(row.patient_id, []).append(Visit(row.id, row.appointment_type, row.status,
                                                                   row.start, day, row.reason))
            flags: dict[int, set[str]] = {}
            for patient_id, flag in session.execute(select(PatientFlag.patient_id, PatientFlag.flag)
                                                    .where(PatientFlag.patient_id.in_(ids))):
                flags.setdefault(patient_id, set()).add(flag)
            tickets: dict[tuple[int, str], list[RecallTicket]] = {}
            for ticket in session.scalars(select(RecallTicket).where(RecallTicket.patient_id.in_(ids))
                                          .order_by(RecallTicket.id)):
                tickets.setdefault((ticket.patient_id, ticket.rule), []).append(ticket)
            for patient in patients:
                counts["patients"] += 1
                if patient.deceased:
                    why = suppression(patient, ())
                    for rule_tickets in (tickets.get((patient.id, name), []) for name in settings.rules):
                        for ticket in rule_tickets:
                            if ticket.status != "closed":
                                counts["suppressed"] += _suppress(ticket, now, why)
                    continue
                for rule in settings.rules.values():
                    verdict = judge(rule, sex=patient.sex, birth_date=patient.birth_date,
                                    flags=flags.get(patient.id, ()), visits=visits.get(patient.id, ()), today=today)
                    _apply(session, settings, rule, patient, flags.get(patient.id, set()), verdict,
                           tickets.get((patient.id, rule.name), []), now, counts)
            last_id = ids[-1]
    return counts


# --- contacting ------------------------------------------------------------------------------


def bookable_until(session: Session, settings: Settings, rule: Rule, today: date) -> date:
    """The last day a patient could book a visit under ``rule``: the horizon, or the last slot that exists."""
    usable = [Slot.blocked.is_(False), Slot.slot_type.not_in(["blocked", "emergency"]),
              or_(Slot.slot_type.not_in(sorted(EXCLUSIVE_SLOT_TYPES)), Slot.slot_type.in_(rule.visits.types))]
    last = session.scalar(select(func.max(Slot.start)).where(*usable))
    horizon = today + timedelta(days=settings.horizon_days)
    if last is None:
        return today - timedelta(days=1)
    return min(horizon, last.astimezone(zone(settings.timezone)).date())


def _channel_for(patient: Patient, step: Step, used: list[str], available: list[str],
                 settings: Settings, declined: set[str]) -> Optional[str]:
    if step.via == "preferred":
        order = [patient.preferred_channel] if patient.preferred_channel else []
        order += [c for c in settings.channels if c not in order]
    elif step.via == "other":
        order = [c for c in ([patient.preferred_channel] if patient.preferred_channel else []) + list(settings.channels)
                 if c not in used]
    else:
        order = [step.via]
    for channel in order:
        if channel in available and channel not in declined and address_for(patient, channel):
            return channel
    return None


def _staff_text(session: Session, patient: Patient, ticket: RecallTicket, rule: Rule) -> str:
    mrn = session.scalar(select(PatientIdentifier.value).where(PatientIdentifier.patient_id == patient.id,
                                                               PatientIdentifier.type_code == "MR").limit(1)) or ""
    tried = ", ".join(ticket.channels_used) or "no channel reached them"
    return (f"{patient.family_name}, {patient.given_name}" + (f" (MR {mrn})" if mrn else "") +
            f" is due for {rule.name} ({rule.label}) on {ticket.due_date.isoformat()}; visit window "
            f"{ticket.window_start.isoformat()} to {ticket.window_end.isoformat()}. Contacted {ticket.contacts} "
            f"time(s) ({tried}) without a booking. Please call them to book (recall ticket {ticket.id}).")


def _act(context, session: Session, settings: Settings, ticket: RecallTicket, now: datetime, today: date,
         horizons: dict[str, date], counts: Counter) -> None:
    rule = settings.rules.get(ticket.rule)
    if rule is None:
        _close(ticket, now, f"the rule {ticket.rule!r} is no longer configured")
        counts["closed"] += 1
        return
    patient = session.get(Patient, ticket.patient_id)
    if patient.merged_into_id:
        ticket.next_action_at = local_midnight(today + timedelta(days=1), settings.timezone)
        return  # the next judging moves it to the survivor
    flags = set(session.scalars(select(PatientFlag.flag).where(PatientFlag.patient_id == patient.id)))
    why_not = suppression(patient, flags)
    if why_not:
        counts["suppressed"] += _suppress(ticket, now, why_not)
        return
    if rule.name not in horizons:
        horizons[rule.name] = bookable_until(session, settings, rule, today)
    last_day = horizons[rule.name]
    if ticket.window_start > last_day:
        reason = (f"waiting: the visit window opens {ticket.window_start.isoformat()}, after the last bookable day "
                  f"{last_day.isoformat()}")
        ticket.next_action_at = local_midnight(today + timedelta(days=1), settings.timezone)
        if ticket.reason != reason:
            _note(ticket, now, "waiting", ticket.status, reason)
        counts["waiting"] += 1
        return
    available = [c for c in settings.channels if c in context.channels]
    declined = {f.removeprefix("opt_out:") for f in flags if f.startswith("opt_out:")}
    while ticket.step < len(rule.escalation):
        index, step = ticket.step, rule.escalation[ticket.step]
        ticket.step += 1
        if step.via == "staff":
            context.plugins.staff_notice(session, {
                "team": settings.staff_team, "subject": f"Recall: please call patient {patient.id} to book {rule.name}",
                "text": _staff_text(session, patient, ticket, rule), "patient_id": patient.id})
            event, channel = "escalated", None
            reason = f"step {index + 1}: staff ({settings.staff_team}) asked to call the patient"
        else:
            channel = _channel_for(patient, step, ticket.channels_used, available, settings, declined)
            if channel is None:
                _note(ticket, now, "step skipped", ticket.status,
                      f"step {index + 1} ({step.via}): no channel reaches the patient", step=index + 1)
                continue
            item = OutboxItem(channel=channel, kind="recall", due_at=now, status="pending",
                              payload={"ticket_id": ticket.id, "step": index + 1}, attempts=0, last_error="",
                              created_at=now)
            session.add(item)
            session.flush()
            ticket.channels_used = [*ticket.channels_used, channel]
            event = "contacted" if index == 0 else "escalated"
            reason = f"step {index + 1}: asked by {channel} to book" + (
                f", due {ticket.due_date.isoformat()}" if index == 0 else ", no booking after the last contact")
        ticket.contacts += 1
        status = "contacted" if event == "contacted" else "escalated"
        ticket.next_action_at = (local_midnight(today + timedelta(days=rule.escalation[ticket.step].wait_days),
                                                settings.timezone)
                                 if ticket.step < len(rule.escalation) else None)
        _note(ticket, now, event, status, reason, step=index + 1, channel=channel,
              next_action_at=ticket.next_action_at.isoformat() if ticket.next_action_at else None)
        counts[event] += 1
        return
    ticket.next_action_at = None
    if ticket.contacts == 0:
        _note(ticket, now, "stuck", ticket.status, "no escalation step could reach the patient")
        log.warning("no recall step reaches the patient", extra={"ticket": ticket.id, "rule": ticket.rule})
        counts["unreachable"] += 1


def contact_due(context, settings: Settings, now: datetime) -> Counter:
    counts: Counter = Counter()
    today = now.astimezone(zone(settings.timezone)).date()
    horizons: dict[str, date] = {}
    while True:
        with context.session_factory() as session, session.begin():
            tickets = claim_due(session, RecallTicket, RecallTicket.next_action_at, settings.batch_size, now,
                                RecallTicket.status.in_(ACTIVE))
            for ticket in tickets:
                _act(context, session, settings, ticket, now, today, horizons, counts)
        if len(tickets) < settings.batch_size:
            return counts


# --- sending ------------------------------------------------------------------------------------


def _day_words(day: date, language: str) -> str:
    return f"{day.day} {TEXTS[language]['months'][day.month - 1]} {day.year}"


def _token(settings: Settings, ticket: RecallTicket) -> str:
    expires = local_midnight(ticket.window_end + timedelta(days=90), settings.timezone)
    return make_token(settings.reply_secret, {"r": ticket.id}, expires=expires)


def render(context, session: Session, items: list[OutboxItem]) -> dict[int, dict[str, Any]]:
    """Recall messages read fresh at sending; stale ones (ticket closed, patient gone quiet) are skipped."""
    settings = _settings(context)
    today = context.clock.now().astimezone(zone(settings.timezone)).date()
    messages: dict[int, dict[str, Any]] = {}
    for item in items:
        ticket = session.get(RecallTicket, item.payload.get("ticket_id"))
        if ticket is None or ticket.status not in ACTIVE:
            messages[item.id] = {"skip": f"the recall ticket is {ticket.status if ticket else 'gone'}"}
            continue
        rule = settings.rules.get(ticket.rule)
        patient = session.get(Patient, ticket.patient_id)
        flags = set(session.scalars(select(PatientFlag.flag).where(PatientFlag.patient_id == patient.id)))
        why_not = suppression(patient, flags) or ("" if rule else f"the rule {ticket.rule!r} is no longer configured")
        if why_not:
            messages[item.id] = {"skip": why_not}
            continue
        address = address_for(patient, item.channel)
        if not address:
            messages[item.id] = {"skip": f"the patient has no address for {item.channel}"}
            continue
        language = language_of(patient, TEXTS)
        words = TEXTS[language]
        token = _token(settings, ticket)
        link = f"{settings.booking_url}?recall={quote(token)}" if settings.booking_url else ""
        how = " ".join(part for part in (words["online"].format(link=link) if link else "",
                                         words["call"].format(phone=settings.phone) if settings.phone else "") if part)
        fields = {"clinic": settings.clinic_name, "label": rule.label,
                  "start": _day_words(max(ticket.window_start, today), language),
                  "end": _day_words(max(ticket.window_end, today), language), "how": how}
        message = {"id": f"outbox-{item.id}", "to": address, "kind": item.kind, "language": language,
                   "subject": words["subject"].format(**fields), "reply_token": token}
        if item.channel == "email":
            lines = [f"{words['hello']} {patient.given_name},".replace(" ,", ","), "", words["body"].format(**fields)]
            if link:
                lines += ["", words["online"].format(link=link)]
            if settings.phone:
                lines += ["", words["call"].format(phone=settings.phone)]
            lines += ["", words["stop"], "", settings.clinic_name]
            message["text"] = "\n".join(lines)
        else:
            message["text"] = " ".join(words["short"].format(**fields).split())
        messages[item.id] = message
    return messages


def send_due(context) -> str:
    if not (_settings(context) and _settings(context).rules):
        return "no recall rules configured"
    return f"{dispatch_outbox(context, kinds=('recall',), render=partial(render, context))} recall messages sent"


def run_daily(context) -> str:
    """The daily recall: follow merges, judge every patient, contact and escalate, send."""
    settings = _settings(context)
    if settings is None or not settings.rules:
        return "no recall rules configured"
    now = context.clock.now()
    counts = judge_patients(context, settings, now) + contact_due(context, settings, now)
    sent = send_due(context)
    parts = [f"{counts[k]} {k}" for k in ("opened", "reopened", "contacted", "escalated", "closed", "suppressed",
                                          "waiting", "unreachable", "followed merges") if counts[k]]
    return f"{counts['patients']} patients judged" + "".join(f", {p}" for p in parts) + f"; {sent}"


@hookimpl(trylast=True)
def slotengine_register_jobs(register, context) -> None:
    settings = _settings(context) or Settings()
    register("recall.daily", run_daily, cron={"hour": settings.run_at.hour, "minute": settings.run_at.minute,
                                              "timezone": settings.timezone}, misfire_grace_time=6 * 3600)
    register("recall.send", send_due, seconds=settings.send_seconds)


# --- bookings close tickets, cancellations reopen them -----------------------------------------------


@hookimpl(trylast=True)
def slotengine_schedule_changed(session: Session, change: Change, context) -> None:
    settings = _settings(context)
    if settings is None or not settings.rules:
        return
    now = context.clock.now()
    if change.kind in ("patients_merged", "patient_updated", "patient_flags_changed"):
        patient_id = change.detail.get("survivor_id") or change.detail.get("patient_id")
        patient = session.get(Patient, patient_id) if patient_id else None
        if change.kind == "patients_merged":
            follow_merges(session, now)
        if patient is not None:
            flags = set(session.scalars(select(PatientFlag.flag).where(PatientFlag.patient_id == patient.id)))
            why_not = suppression(patient, flags)
            if why_not:
                for ticket in session.scalars(select(RecallTicket).where(RecallTicket.patient_id == patient.id,
                                                                         RecallTicket.status.in_(ACTIVE))):
                    _suppress(ticket, now, why_not)
        return
    if change.appointment_id is None:
        return
    if change.to_state in SATISFYING:
        appointment = session.get(Appointment, change.appointment_id)
        rules = [r.name for r in settings.rules.values()
                 if r.visits.match(appointment.appointment_type, appointment.reason)]
        if not rules or appointment.patient_id is None:
            return
        visit = Visit(appointment.id, appointment.appointment_type, appointment.status, appointment.start,
                      appointment.start.astimezone(zone(settings.timezone)).date(), appointment.reason)
        for ticket in session.scalars(select(RecallTicket).where(
                RecallTicket.patient_id == appointment.patient_id, RecallTicket.rule.in_(rules),
                RecallTicket.status.in_(ACTIVE + ("suppressed",)))):
            anchor = session.get(Appointment, ticket.anchor_appointment_id) if ticket.anchor_appointment_id else None
            if anchor is not None and (anchor.start, anchor.id) >= (appointment.start, appointment.id):
                continue  # not a visit after the one the interval counts from
            _close(ticket, now, _visit_words(visit), appointment.id)
    elif change.to_state in UNDONE:
        for ticket in session.scalars(select(RecallTicket).where(
                RecallTicket.closed_by_appointment_id == change.appointment_id, RecallTicket.status == "closed")):
            _reopen(ticket, now, f"reopened: appointment {change.appointment_id} was "
                                 f"{change.to_state.replace('_', '-')}", settings.timezone)


# --- replies -------------------------------------------------------------------------------------


def record_reply(context, token: str, answer: str) -> dict[str, Any]:
    """A patient's answer to a recall message: ``stop`` records the opt-out
    (flag ``opt_out:recall``, source ``patient reply``), which suppresses
    their tickets.  Raises ``BadToken`` or ``ValueError``."""
    settings = _settings(context)
    if settings is None or not settings.rules:
        raise ValueError("recall is not configured")
    claims = read_token(settings.reply_secret, token or "", now=context.clock.now())
    if "r" not in claims:
        raise BadToken("not a recall token")
    if str(answer or "").strip().lower().rstrip(".!") not in STOP_WORDS:
        raise ValueError(f"unknown answer {answer!r}; expected stop")
    with context.session_factory() as session:
        ticket = session.get(RecallTicket, int(claims["r"]))
        if ticket is None:
            raise BadToken("no such recall ticket")
        patient = session.get(Patient, ticket.patient_id)
        while patient.merged_into_id:
            patient = session.get(Patient, patient.merged_into_id)
        patient_id = patient.id
    context.scheduler.set_patient_flags(patient_id, [OPT_OUT], Actor("patient", str(patient_id),
                                                                     f"recall reply (ticket {claims['r']})"),
                                        source="patient reply")
    return {"ticket_id": int(claims["r"]), "answer": "stop", "opted_out": True}




@hookimpl(trylast=True)
def slotengine_register_http_routes(register, context) -> None:
    settings = _settings(context)
    if settings is not None and settings.rules:
        register("POST", "/recall/reply", reply_route(partial(record_reply, context)))


# --- listing (``slotengine recall list``) -------------------------------------------------------------


def ticket_rows(session: Session, settings: Optional[Settings], status: Optional[Iterable[str]] = None,
                limit: int = 500) -> list[dict[str, Any]]:
    """Tickets with their rule, due window, contact attempts and why they are where they are."""
    stmt = select(RecallTicket).order_by(RecallTicket.due_date, RecallTicket.id).limit(limit)
    if status:
        stmt = stmt.where(RecallTicket.status.in_(list(status)))
    tz = settings.timezone if settings else "UTC"
    rows = []
    for ticket in session.scalars(stmt):
        rule = settings.rules.get(ticket.rule) if settings else None
        rows.append({
            "id": ticket.id, "patient_id": ticket.patient_id, "rule": ticket.rule, "status": ticket.status,
            "due": ticket.due_date.isoformat(),
            "window": f"{ticket.window_start.isoformat()}..{ticket.window_end.isoformat()}",
            "window_start": ticket.window_start.isoformat(), "window_end": ticket.window_end.isoformat(),
            "counted_from_appointment_id": ticket.anchor_appointment_id,
            "contacts": ticket.contacts, "channels": ",".join(ticket.channels_used or []),
            "next_step": ticket.step + 1 if rule and ticket.step < len(rule.escalation) else None,
            "next_action": (ticket.next_action_at.astimezone(zone(tz)).isoformat() if ticket.next_action_at else None),
            "closed_by_appointment_id": ticket.closed_by_appointment_id,
            "reason": ticket.reason, "rule_detail": rule.describe() if rule else None,
            "history": ticket.history,
        })
    return rows
