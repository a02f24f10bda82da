#!/usr/bin/env python
"""A clinic month, simulated on the real engine: what the #8 plugins change.

    python bench/sim_clinic_month.py                 # 28 days, 2,500 patients (about 3 minutes here, idle)
    python bench/sim_clinic_month.py --quick         # 3 clinic days, 600 patients (about 30 s, idle)
    python bench/sim_clinic_month.py --days 14 --seed 7 --keep --serial

Two arms run on identical, seeded demand, one after the other, each on its own
SQLite file with the demo clinic (``config/demo-clinic.toml``: five
providers at two sites in two time zones), the real ``Scheduler``, the real
plugins registered through ``PluginHost`` and a ``ManualClock`` that the
simulation turns from event to event:

* **baseline**: the engine as configured before #8 -- reminders and waitlist
  fill on; ``noshow``, ``flow``, ``emergency`` and ``recall`` off;
* **issue8**: the same plus ``noshow`` (show-probability model, no-show-aware
  overbooking, escalation of high-risk visits, early waitlist fill), ``flow``
  (arrival smoothing, running-late notices), ``emergency`` (same-day urgent
  requests placed with the least harm) and ``recall`` (no rules here: the
  month has no preventive-care cohort to call back, so it does nothing).

A plugin that cannot be imported or configured is left out of its arm and
named in the output.  ``eligibility``, ``referrals``, ``instructions``,
``notices`` and ``channels`` are off in both arms: the simulated patients
have no coverage or referrals, and their phones and the front desk are a
plugin of this script (``Population``: ``slotengine_register_channels`` for
``sms``/``voice``/``email``, ``slotengine_staff_notice`` for the desk), the
same hooks a vendor would use.

What happens, on the engine's service API only:

* **History.** Each patient has a latent attendance propensity; a year of
  past visits (completed, no-show, cancelled late or early) is drawn from it
  and stored before the month, as a site's imported history.  The noshow
  model is fitted on it by its own job (``noshow.refit``).
* **Demand.** Booking requests arrive on weekdays 08:00-17:00 (New York)
  at about 115 % of the month's routine seats, by specialty in proportion to the
  seats (family medicine, gastroenterology incl. endoscopy, cardiology),
  wanting a visit from 0 to 35 days out; four weeks of requests are booked
  before the month so it starts with a realistic calendar.  Each request is
  ``free_slots`` (specialty, the patient's own preferences, ``overbook =
  True``) within the patient's acceptable wait, then ``book``; with nothing
  there, the first slot later and a waitlist entry for an earlier one, or a
  waitlist entry alone.  12 % of bookings are cancelled by the patient, a
  third of them within 24 hours of the visit.
* **Same-day urgent requests** (about five a clinic day) go through
  ``Scheduler.request_urgent`` with a window to the end of the clinic day;
  proposals that need approval are approved by the simulated desk 10 minutes
  later (``plugins.emergency.approve``).
* **Messages.** Every message the plugins send reaches the simulated patient,
  who may answer through the plugins' own reply functions with the message's
  signed token: confirm or cancel a reminder, take a waitlist offer, take a
  running-late notice's new arrival time or its offer of another day.  Desk
  call tasks (``noshow`` escalation) become a phone call an hour later.
* **The day.** Two hours before a visit the patient's attendance is drawn
  (see below); those who come arrive (``arrive``), are seen in booked order
  when the provider is free and never before their booked time
  (``check_in``), and leave after a service time (``complete``); the others
  are marked ``no_show`` 16 minutes after their time.  Jobs run as the
  daemon would run them: each interval job every 15 minutes from 07:00 to
  20:00 New York time (every 3 hours at night) and as soon as the engine
  has outbox items or plugin tasks due (within 15 minutes in clinic hours),
  a job that found nothing to do backing off to every 4 hours; cron jobs at their APScheduler
  ``CronTrigger`` times (``noshow.refit`` set to weekly, Mondays 03:30, to
  keep the run short).

Behaviour assumed (the simulation's, not measured anywhere):

* show probability: ``logit = base + patient propensity (sd 1.1) - 0.3 log(1
  + days booked ahead) + type (first visit -0.3, follow-up +0.2, procedure
  +0.5, urgent +1.5) + Monday -0.15 + Friday -0.2 + before 09:00 -0.15 +
  from 15:00 -0.25``; ``base`` is solved at start so that about 30 % of
  visits would be missed without any message, which the reminders both arms
  send bring to about 20 %;
* each message reaching a patient who would not come: 6 % come after all
  (reminded), 10 % cancel (a call: 15 % / 30 %); of those who will come, 50 %
  confirm the first message; waitlist offers are taken by 50 % (35 % the same
  day) after 2-40 minutes, 20 % decline; a running-late notice moves the
  arrival of 85 % of those not yet there; 30 % of those offered another day
  take it;
* arrival: N(-6, 7) minutes around the booked time, within -30..+14; service
  time: gamma (CV 0.4) with mean 90 % of the visit's length divided by the
  slot's capacity (Dr Jones sees two patients per 20-minute slot).

Figures, per arm, over the month's clinic days, providers only (the echo
machine is not booked):

* **fill rate** = minutes of visits that took place (booked length) ÷
  seat-minutes the providers' slots offer (slot length × capacity; emergency
  holds included).  Above 100 % only through overbooking;
* **no-show rate** = no-shows ÷ (no-shows + visits that took place);
* **overbooks** = appointments booked or moved onto a seat above a slot's
  capacity (audited ``overbooked``), and how many of those patients came;
* **patient waiting** = when the provider started seeing the patient minus
  the later of their booked time and their arrival (time in the waiting room
  past their booked time; a patient told to come later is counted from when
  they came);
* **provider idle** = minutes inside the provider's slot hours with no
  patient being seen; **overtime** = minutes of visits outside them;
* **urgent served same day** = urgent requests booked (or applied after
  moving others) for the same clinic day.

Prints a table with the ratio issue8 ÷ baseline, then one ``BENCH {...}`` JSON line.
"""
from __future__ import annotations

import argparse
import heapq
import importlib
import itertools
import json
import math
import multiprocessing
import random
import re
import shutil
import statistics
import sys
import tempfile
import time as wall
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from apscheduler.triggers.cron import CronTrigger  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from common import machine_info, machine_line, print_table, source_revision  # noqa: E402
from engine.calendar import zone  # noqa: E402
from engine.clinic import load_clinic  # noqa: E402
from engine.clock import ManualClock  # noqa: E402
from engine.db import make_engine, make_session_factory  # noqa: E402
from engine.errors import SchedulingError  # noqa: E402
from engine.jobs import JobSettings, collect_jobs, make_context, run_job  # noqa: E402
from engine.models import (  # noqa: E402
    Appointment,
    AppointmentSlot,
    AuditEntry,
    FlowNotice,
    Location,
    OutboxItem,
    Patient,
    PatientIdentifier,
    PluginTask,
    Provider,
    Slot,
)
from engine.plugin import hookimpl  # noqa: E402
from engine.plugin_host import BUILTIN_PLUGINS, PluginError, PluginHost  # noqa: E402
from engine.requests import Actor, BookingRequest, SlotQuery, UrgentRequest  # noqa: E402
from engine.schema import upgrade  # noqa: E402
from engine.service import EngineSettings, Scheduler  # noqa: E402
from engine.signing import read_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLINIC_FILE = REPO / "config" / "demo-clinic.toml"
FIRST_DAY = date(2026, 6, 1)  # a Monday; no clock change in June or in the four weeks before
NEW_YORK = "America/New_York"
SECRET = "sim-clinic-month-reply-secret"
ISSUE8 = ("noshow", "flow", "emergency", "recall")
#: Off in both arms (see the docstring).
NOT_SIMULATED = ("eligibility", "referrals", "instructions", "notices", "channels")
TARGET_NO_SHOW = 0.20
RAW_NO_SHOW = 0.30  # before reminders; the messages both arms send bring it to about TARGET_NO_SHOW
DESK = Actor("operator", "front-desk", "sim_clinic_month.py")
#: A job outcome that says it found nothing to do ("ok: 0 offers expired", "ok: no recall rules configured").
IDLE = re.compile(r"^ok(: (0 |no |nothing)|$)")

#: What patients ask for: specialty, appointment type, share of requests, minutes (waitlist entries).
DEMAND = [
    ("family_medicine", "new_patient", 0.55, 15),
    ("family_medicine", "follow_up", 0.08, 15),
    ("gastroenterology", "new_patient", 0.033, 30),
    ("gastroenterology", "procedure", 0.012, 60),
    ("cardiology", "new_patient", 0.325, 20),
]
#: Same-day urgent requests per clinic weekday: specialty, minutes, expected count.
URGENT = [("family_medicine", 15, 3.5), ("cardiology", 20, 1.5)]
TRUE_EFFECTS = {"lead": -0.3, "new_patient": -0.3, "follow_up": 0.2, "procedure": 0.5, "emergency": 1.5,
                "monday": -0.15, "friday": -0.2, "early": -0.15, "late": -0.25}
PROPENSITY_SD = 1.1
#: Patient answers (see the docstring): (reminded into coming, cancels) per message that reaches them.
REMINDER_EFFECT = {"message": (0.06, 0.10), "voice": (0.06, 0.15), "call": (0.15, 0.30)}


def rng_for(seed: int, *parts: Any) -> random.Random:
    """A stream of its own per purpose: both arms draw the same numbers for the same request."""
    return random.Random(":".join(map(str, (seed, *parts))))


def logistic(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# --- the world: identical in both arms ----------------------------------------------------------


@dataclass
class PatientSpec:
    index: int
    sex: str
    birth: date
    propensity: float
    channel: str
    email: bool


@dataclass
class Request:
    key: str
    at: datetime
    patient: int
    specialty: str
    appointment_type: str
    minutes: int
    earliest: datetime
    tolerance_days: int
    cancels: bool
    late_cancel: bool
    cancel_fraction: float


@dataclass
class Urgent:
    key: str
    at: datetime
    patient: int
    specialty: str
    minutes: int


@dataclass
class World:
    seed: int
    days: int
    patients: list[PatientSpec]
    requests: list[Request]
    urgents: list[Urgent]
    base: float = 0.0
    warmup_days: int = 28
    start: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    end: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def last_day(self) -> date:
        return FIRST_DAY + timedelta(days=self.days - 1)


def local(day: date, hour: float, tz: str = NEW_YORK) -> datetime:
    minutes = round(hour * 60)
    return datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=zone(tz)).astimezone(timezone.utc)


def seats_per_week() -> float:
    """Seats of the providers' routine slots a week, from the clinic file (emergency holds left out)."""
    import tomllib

    data = tomllib.loads(CLINIC_FILE.read_text())
    total = 0.0
    for template in data["templates"]:
        if not template.get("provider") or template["slot_type"] == "emergency":
            continue
        start, end = (time.fromisoformat(template[k]) for k in ("start", "end"))
        minutes = (end.hour * 60 + end.minute) - (start.hour * 60 + start.minute)
        total += minutes // template["slot_minutes"] * template.get("capacity", 1) * len(template["days"])
    return total


def true_logit(base: float, propensity: float, appointment_type: str, lead_days: float, local_start: datetime) -> float:
    z = base + propensity + TRUE_EFFECTS["lead"] * math.log1p(max(lead_days, 0.0))
    z += TRUE_EFFECTS.get(appointment_type, 0.0)
    z += TRUE_EFFECTS["monday"] if local_start.weekday() == 0 else 0.0
    z += TRUE_EFFECTS["friday"] if local_start.weekday() == 4 else 0.0
    minute = local_start.hour * 60 + local_start.minute
    z += TRUE_EFFECTS["early"] if minute < 9 * 60 else 0.0
    z += TRUE_EFFECTS["late"] if minute >= 15 * 60 else 0.0
    return z


def solve_base(patients: list[PatientSpec], seed: int) -> float:
    """The intercept at which RAW_NO_SHOW of routine visits would be missed without reminders."""
    rng = rng_for(seed, "calibrate")
    sample = []
    for _ in range(4000):
        patient = rng.choice(patients)
        lead = rng.choice([rng.uniform(0, 3), rng.uniform(4, 14), rng.uniform(15, 35)])
        when = datetime(2026, 6, 1 + rng.randrange(5), rng.randrange(8, 17), tzinfo=zone(NEW_YORK))
        kind = rng.choices([d[1] for d in DEMAND], [d[2] for d in DEMAND])[0]
        sample.append((patient.propensity, kind, lead, when))
    low, high = -5.0, 8.0
    for _ in range(50):
        mid = (low + high) / 2
        missed = statistics.fmean(1 - logistic(true_logit(mid, *s)) for s in sample)
        low, high = (mid, high) if missed > RAW_NO_SHOW else (low, mid)
    return (low + high) / 2


def build_world(seed: int, days: int, patient_count: int, demand_factor: float, *, longest_lead: int = 35) -> World:
    rng = rng_for(seed, "world")
    patients = [PatientSpec(i, rng.choice("FM"),
                            date(1940 + rng.randrange(70), 1 + rng.randrange(12), 1 + rng.randrange(28)),
                            rng.gauss(0.0, PROPENSITY_SD), rng.choices(["sms", "email", "voice"], [0.7, 0.2, 0.1])[0],
                            rng.random() < 0.6)
                for i in range(patient_count)]
    world = World(seed, days, patients, [], [])
    world.base = solve_base(patients, seed)
    scale = longest_lead / 35  # --quick books at most 14 days ahead, so 14 days of booking fill its calendar
    warmup_days = 28 if longest_lead >= 35 else longest_lead
    world.warmup_days = warmup_days
    world.start = local(FIRST_DAY - timedelta(days=warmup_days), 0)
    world.end = local(world.last_day + timedelta(days=1), 23)
    per_weekday = seats_per_week() * demand_factor / 5
    weights = [d[2] for d in DEMAND]
    day = FIRST_DAY - timedelta(days=warmup_days)
    n = 0
    while day <= world.last_day:
        if day.weekday() < 5:
            for _ in range(_poisson(rng, per_weekday)):
                at = local(day, rng.uniform(8, 17))
                specialty, kind, _share, minutes = DEMAND[rng.choices(range(len(DEMAND)), weights)[0]]
                band = rng.random()
                lead = rng.uniform(0, 3) if band < 0.3 else \
                    scale * (rng.uniform(4, 14) if band < 0.7 else rng.uniform(15, 35))
                earliest_day = (at + timedelta(days=lead)).astimezone(zone(NEW_YORK)).date()
                while earliest_day.weekday() >= 5:  # "from Saturday" means Monday
                    earliest_day += timedelta(days=1)
                earliest = max(local(earliest_day, 0), at + timedelta(hours=2))
                # only requests for the month (and the weeks of history before it are stored, not simulated)
                if FIRST_DAY <= earliest_day <= world.last_day:
                    cancels = rng.random() < 0.12
                    world.requests.append(Request(
                        f"r{n}", at, rng.randrange(patient_count), specialty, kind, minutes, earliest,
                        rng.choice([3, 7, 7, 14]), cancels, cancels and rng.random() < 1 / 3, rng.random()))
                    n += 1
            if FIRST_DAY <= day <= world.last_day:
                for specialty, minutes, mean in URGENT:
                    for _ in range(_poisson(rng, mean)):
                        world.urgents.append(Urgent(f"u{len(world.urgents)}", local(day, rng.uniform(8, 14)),
                                                    rng.randrange(patient_count), specialty, minutes))
        day += timedelta(days=1)
    return world


def _poisson(rng: random.Random, mean: float) -> int:
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


# --- the simulated patients' phones and the front desk: a plugin, as a vendor would write it ------


class Phone:
    def __init__(self, population: "Population", name: str):
        self.population, self.name = population, name

    def send(self, message: dict) -> None:
        self.population.inbox.append((self.name, message))


class Population:
    """Registers the channels the patients are reached on, and receives the desk's notices."""

    def __init__(self):
        self.inbox: list[tuple[str, dict]] = []
        self.desk: list[dict] = []

    @hookimpl
    def slotengine_register_channels(self, register) -> None:
        for name in ("sms", "voice", "email"):
            register(name, Phone(self, name))

    @hookimpl
    def slotengine_staff_notice(self, notice) -> None:
        self.desk.append(dict(notice))


# --- one arm -------------------------------------------------------------------------------------


def plugin_settings(world: World) -> dict[str, dict[str, Any]]:
    common = {"clinic_name": "Main Street Clinic", "reply_secret": SECRET}
    return {
        "reminders": dict(common),
        "waitlist_fill": dict(common),
        "noshow": {"refit_cron": {"day_of_week": "mon", "hour": 3, "minute": 30}},
        "flow": {**common, "max_arrivals": {"MAIN": 4, "WEST": 3}},
        "emergency": dict(common),
    }


@dataclass
class Visit:
    appointment_id: int
    provider_id: int
    scheduled: datetime
    minutes: float
    arrival: Optional[datetime] = None
    seen: Optional[datetime] = None
    left: Optional[datetime] = None


class Arm:
    def __init__(self, world: World, name: str, issue8: bool, directory: Path, without: tuple[str, ...] = ()):
        self.world, self.name, self.issue8, self.without = world, name, issue8, without
        self.seed = world.seed
        self.directory = directory
        self.events: list = []
        self.sequence = itertools.count()
        self.key_of: dict[int, str] = {}  # appointment id -> the demand it serves (its random streams)
        self.appointment_of: dict[str, int] = {}
        self.entry_key: dict[int, str] = {}  # waitlist entry id -> request key
        self.planned: dict[int, datetime] = {}  # appointment id -> start its attendance was planned for
        self.arrival_at: dict[int, datetime] = {}
        self.suggested: dict[int, datetime] = {}
        self.messages_seen: Counter = Counter()
        self.rescued: set[int] = set()
        self.visits: dict[int, Visit] = {}
        self.waiting: dict[int, list[Visit]] = defaultdict(list)
        self.busy: dict[int, Optional[Visit]] = {}
        self.wake: dict[int, datetime] = {}
        self.busy_intervals: dict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
        self.counts: Counter = Counter()
        self.urgent_outcomes: Counter = Counter()
        self.last_prompt = datetime.min.replace(tzinfo=timezone.utc)
        self.next_run: dict[str, datetime] = {}
        self.backoff: dict[str, timedelta] = {}
        self.notes: list[str] = []

    # --- set-up --------------------------------------------------------------------------------

    def plugins(self) -> list[tuple[str, str]]:
        chosen = []
        for name, module in BUILTIN_PLUGINS:
            if name in NOT_SIMULATED or (name in ISSUE8 and not self.issue8) or name in self.without:
                continue
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - being written: the arm runs without it, and says so
                self.notes.append(f"{name}: not importable ({type(exc).__name__}: {exc})")
                continue
            chosen.append((name, module))
        return chosen

    def set_up(self) -> None:
        world = self.world
        self.engine = make_engine(f"sqlite:///{self.directory / f'{self.name}.db'}")
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        with self.sessions() as session, session.begin():
            load_clinic(session, CLINIC_FILE)
        self.population = Population()
        self.clock = ManualClock(world.start)
        builtins = self.plugins()
        settings = plugin_settings(world)
        while True:
            host = PluginHost(builtins=builtins, discover=False, extra=[("population", self.population)])
            self.scheduler = Scheduler(self.sessions, plugins=host, clock=self.clock,
                                       settings=EngineSettings(default_timezone=NEW_YORK))
            try:
                self.context = make_context(self.scheduler, plugin_settings=settings)
                break
            except PluginError as exc:  # a plugin in the making refuses: run without it, and say so
                self.notes.append(f"{exc.plugin}: left out ({exc})")
                builtins = [b for b in builtins if b[0] != exc.plugin]
        self.active = sorted(name for name, _m in builtins)
        self.scheduler.expand_templates(world.start.date(), world.last_day + timedelta(days=60))
        with self.sessions() as session:
            self.providers = {p.id: p.code for p in session.scalars(select(Provider))}
            self.zones = {loc.id: loc.timezone for loc in session.scalars(select(Location))}
        self.patient_ids = self._add_patients()
        self.patient_index = {pid: i for i, pid in enumerate(self.patient_ids)}
        self._add_history()
        self.jobs = collect_jobs(self.context, JobSettings())
        self.interval_jobs = [job for job in self.jobs if job.seconds is not None]
        for job in self.jobs:
            # the slots of every day simulated exist from the start: the daily roll-out would find nothing to add
            if job.cron is not None and job.job_id != "core.generate_slots":
                trigger = CronTrigger(**{"timezone": "UTC", **job.cron})
                self._cron(job, trigger, world.start)

    def _add_patients(self) -> list[int]:
        now = self.world.start
        rows = [{"family_name": f"Sim{p.index}", "given_name": "Patient", "birth_date": p.birth, "sex": p.sex,
                 "language": "en", "email": f"p{p.index}@example.org" if p.email or p.channel == "email" else "",
                 "phones": [{"number": f"+1555{p.index:07d}", "use": "CP"}], "address": {},
                 "needs_interpreter": False, "mobility": "", "other_needs": "", "preferred_provider_gender": "",
                 "preferred_weekdays": [], "preferred_channel": p.channel, "confidential": False, "deceased": False,
                 "created_at": now, "updated_at": now} for p in self.world.patients]
        with self.sessions() as session, session.begin():
            session.execute(insert(Patient), rows)
            ids = list(session.scalars(select(Patient.id).order_by(Patient.id)))
            session.execute(insert(PatientIdentifier), [
                {"patient_id": pid, "value": f"SIM{pid:07d}", "authority": "SIM", "type_code": "MR"} for pid in ids])
        return ids

    def _add_history(self) -> None:
        """A year of past visits per patient, drawn from their propensity: the site's own history."""
        world = self.world
        rng = rng_for(self.seed, "history")
        with self.sessions() as session:
            by_specialty = defaultdict(list)
            for provider in session.scalars(select(Provider)):
                for specialty in provider.specialties:
                    by_specialty[specialty].append((provider.id, provider.location_id))
        rows = []
        for patient, pid in zip(world.patients, self.patient_ids):
            for _ in range(_poisson(rng, 1.8)):
                specialty, kind, _share, minutes = rng.choices(DEMAND, [d[2] for d in DEMAND])[0]
                provider_id, location_id = rng.choice(by_specialty[specialty])
                day = world.start.date() - timedelta(days=rng.randrange(1, 365))
                while day.weekday() >= 5:
                    day -= timedelta(days=1)
                tz = self.zones[location_id]
                start = local(day, rng.choice([8, 9, 10, 11, 13, 14, 15, 16]) + rng.choice([0, 0.25, 0.5]), tz)
                lead = rng.uniform(0, 30)
                created = start - timedelta(days=lead)
                outcome, changed = "completed", start + timedelta(minutes=minutes)
                if rng.random() < 0.12:
                    outcome = "cancelled"
                    late = rng.random() < 1 / 3
                    changed = start - timedelta(hours=rng.uniform(1, 24) if late else rng.uniform(25, 240))
                elif rng.random() > logistic(true_logit(world.base, patient.propensity, kind, lead,
                                                        start.astimezone(zone(tz)))):
                    outcome, changed = "no_show", start + timedelta(minutes=16)
                rows.append({"status": outcome, "appointment_type": kind, "reason": "", "urgency": "routine",
                             "start": start, "end": start + timedelta(minutes=minutes), "patient_id": pid,
                             "provider_id": provider_id, "location_id": location_id, "notes": "", "conflict": "",
                             "review_reason": "", "eligibility": {}, "source": "history", "created_at": created,
                             "updated_at": changed})
        with self.sessions() as session, session.begin():
            session.execute(insert(Appointment), rows)
        self.history_visits = len(rows)

    # --- the event loop ------------------------------------------------------------------------

    def at(self, when: datetime, action: Callable, *args: Any) -> None:
        heapq.heappush(self.events, (when, next(self.sequence), action, args))

    def run(self) -> None:
        world = self.world
        for request in world.requests:
            self.at(request.at, self.book_request, request)
        for urgent in world.urgents:
            self.at(urgent.at, self.urgent_request, urgent)
        self.at(world.start, self.tick)
        while self.events:
            when, _n, action, args = heapq.heappop(self.events)
            if when > world.end:
                break
            if when > self.clock.now():
                self.clock.set(when)
            action(*args)
            self.react()
            self.prompt_jobs()

    def busy_time(self) -> bool:
        """Clinic hours of the month (and the days before it, when its reminders go out)."""
        here = self.clock.now().astimezone(zone(NEW_YORK))
        return here.weekday() < 5 and 7 <= here.hour < 20 and here.date() >= FIRST_DAY - timedelta(days=3)

    def tick(self) -> None:
        """Every interval job at the base cadence (30 min in clinic hours, 6 h otherwise), except
        that a job which found nothing to do waits twice as long each time, up to 4 hours."""
        now = self.clock.now()
        base = timedelta(minutes=30 if self.busy_time() else 360)
        for job in self.interval_jobs:
            if now < self.next_run.get(job.job_id, now):
                continue
            outcome = self.run_job(job)
            if IDLE.match(outcome):
                self.backoff[job.job_id] = min(self.backoff.get(job.job_id, base) * 2, timedelta(hours=4))
            else:
                self.backoff[job.job_id] = base
            self.next_run[job.job_id] = now + min(self.backoff[job.job_id], timedelta(hours=4))
        self.last_prompt = now
        self.at(now + base, self.tick)

    def _cron(self, job, trigger, after: datetime) -> None:
        following = trigger.get_next_fire_time(None, after + timedelta(seconds=1))
        if following is not None:
            self.at(following, self._run_cron, job, trigger)

    def _run_cron(self, job, trigger) -> None:
        self.run_job(job)
        self._cron(job, trigger, self.clock.now())

    def run_job(self, job) -> str:
        outcome = run_job(self.context, job)
        self.counts[f"job {job.job_id}"] += 1
        if outcome.startswith("error"):
            self.counts["job errors"] += 1
            if self.counts["job errors"] <= 3:
                self.notes.append(f"job {job.job_id} at {self.clock.now().isoformat()}: {outcome[:200]}")
        return outcome

    def prompt_jobs(self) -> None:
        """The daemon sweeps every 30 s: work that falls due (messages, plugin tasks) is done within
        10 minutes in clinic hours, not at the next tick; each plugin's sweep only when it has work."""
        now = self.clock.now()
        if now - self.last_prompt < timedelta(minutes=15 if self.busy_time() else 120):
            return
        with self.sessions() as session:
            sending = session.scalar(select(OutboxItem.id).where(OutboxItem.status == "pending",
                                                                 OutboxItem.due_at <= now).limit(1)) is not None
            working = set(session.scalars(select(PluginTask.plugin).distinct().where(
                PluginTask.status == "pending", PluginTask.due_at <= now)))
        due = [job for job in self.interval_jobs
               if job.plugin in working or (sending and "send" in job.job_id)]
        for job in due:
            self.run_job(job)
            self.next_run.pop(job.job_id, None)
        if due:
            self.last_prompt = now
            self.react()

    # --- demand --------------------------------------------------------------------------------

    def book_request(self, request: Request) -> None:
        patient_id = self.patient_ids[request.patient]
        now = self.clock.now()
        earliest = max(request.earliest, now + timedelta(hours=1))
        query = dict(appointment_type=request.appointment_type, specialty=request.specialty, patient_id=patient_id)
        near = self.scheduler.free_slots(SlotQuery(start=earliest, end=earliest + timedelta(days=request.tolerance_days),
                                                   limit=1, overbook=True, **query))
        appointment = self._book_first(near, patient_id, request)
        self.counts["requests"] += 1
        if appointment is None:
            later = self.scheduler.free_slots(SlotQuery(start=earliest, end=earliest + timedelta(days=42), limit=1,
                                                        **query))
            appointment = self._book_first(later, patient_id, request)
            entry = self.scheduler.add_to_waitlist(
                patient_id=patient_id, appointment_type=request.appointment_type, duration_minutes=request.minutes,
                actor=Actor("api", "sim"), specialty=request.specialty, earliest=earliest,
                latest=appointment.start if appointment else earliest + timedelta(days=42),
                current_appointment_id=appointment.id if appointment else None, reason="wants an earlier visit")
            self.entry_key[entry.id] = request.key
            self.counts["waitlisted"] += 1
        if appointment is None:
            self.counts["requests unbooked"] += 1
            return
        if request.cancels:
            span = appointment.start - now
            cancel_at = appointment.start - timedelta(hours=1 + 23 * request.cancel_fraction) if request.late_cancel \
                and span > timedelta(hours=25) else now + span * (0.1 + 0.8 * request.cancel_fraction)
            self.at(max(cancel_at, now), self.cancel, request.key)

    def _book_first(self, candidates, patient_id: int, request: Request):
        for candidate in candidates:
            try:
                appointment = self.scheduler.book(BookingRequest(
                    patient_id=patient_id, appointment_type=request.appointment_type, slot_id=candidate.slot_id,
                    overbook=candidate.overbook is not None, reason="sim request"), Actor("api", "sim"))
            except SchedulingError:
                self.counts["booking refused"] += 1
                continue
            self.track(appointment.id, request.key, appointment.start)
            return appointment
        return None

    def look(self, appointment_id: int):
        """What the simulated people know of an appointment (one Core query; no ORM object)."""
        with self.sessions() as session:
            return session.execute(select(
                Appointment.id, Appointment.status, Appointment.start, Appointment.end, Appointment.created_at,
                Appointment.patient_id, Appointment.provider_id, Appointment.location_id, Appointment.urgency,
                Appointment.appointment_type).where(Appointment.id == appointment_id)).one()

    def track(self, appointment_id: int, key: str, start: datetime) -> None:
        self.key_of[appointment_id] = key
        self.appointment_of[key] = appointment_id
        self.plan(appointment_id, start)

    def cancel(self, key: str) -> None:
        appointment_id = self.appointment_of.get(key)
        if appointment_id is None:
            return
        appointment = self.look(appointment_id)
        if appointment.status not in ("booked", "overbooked") or appointment.start <= self.clock.now():
            return
        self.scheduler.cancel(appointment_id, Actor("patient", str(appointment.patient_id), "sim"), "patient cancelled")
        late = appointment.start - self.clock.now() < timedelta(hours=24)
        self.counts["late cancellations" if late else "early cancellations"] += 1

    def urgent_request(self, urgent: Urgent) -> None:
        now = self.clock.now()
        today = now.astimezone(zone(NEW_YORK)).date()
        tz = NEW_YORK if urgent.specialty == "family_medicine" else "America/Los_Angeles"
        latest = local(today, 16.75 if urgent.specialty == "family_medicine" else 17.5, tz)
        answer = self.scheduler.request_urgent(UrgentRequest(
            patient_id=self.patient_ids[urgent.patient], duration_minutes=urgent.minutes,
            earliest=now + timedelta(minutes=20), latest_start=latest, appointment_type="emergency",
            specialty=urgent.specialty, reason="same-day urgent"), DESK)
        self.urgent_outcomes[answer.get("outcome", "?")] += 1
        if answer.get("outcome") == "proposed" and answer.get("request_id") is not None:
            self.at(now + timedelta(minutes=10), self.approve_urgent, urgent, answer["request_id"])
        self._urgent_placed(urgent, answer.get("appointment_id"))

    def approve_urgent(self, urgent: Urgent, request_id: int) -> None:
        emergency = importlib.import_module("plugins.emergency")
        try:
            answer = emergency.approve(self.context, request_id, DESK, "approved by the desk")
        except SchedulingError as exc:
            self.urgent_outcomes["approval failed"] += 1
            self.notes.append(f"urgent approval {request_id}: {exc}")
            return
        self.urgent_outcomes[f"approved: {answer.get('outcome', '?')}"] += 1
        self._urgent_placed(urgent, answer.get("appointment_id"))

    def _urgent_placed(self, urgent: Urgent, appointment_id: Optional[int]) -> None:
        if appointment_id is None:
            return
        appointment = self.look(appointment_id)
        tz = self.zones.get(appointment.location_id, NEW_YORK)
        if appointment.start.astimezone(zone(tz)).date() == urgent.at.astimezone(zone(tz)).date():
            self.counts["urgent served same day"] += 1
        self.track(appointment_id, urgent.key, appointment.start)

    # --- patients' answers -----------------------------------------------------------------------

    def react(self) -> None:
        while self.population.inbox or self.population.desk:
            inbox, self.population.inbox = self.population.inbox, []
            desk, self.population.desk = self.population.desk, []
            for channel, message in inbox:
                self.counts[f"messages {message.get('kind', '?')}"] += 1
                self.on_message(channel, message)
            for notice in desk:
                self.counts["desk notices"] += 1
                if "likely no-show" in notice.get("subject", "") and notice.get("appointment_id"):
                    self.at(self.office_time(self.clock.now() + timedelta(hours=1)), self.desk_call,
                            notice["appointment_id"])

    def office_time(self, when: datetime) -> datetime:
        here = when.astimezone(zone(NEW_YORK))
        if here.weekday() < 5 and 9 <= here.hour < 17:
            return when
        day = here.date() + timedelta(days=0 if here.hour < 9 else 1)
        while day.weekday() >= 5:
            day += timedelta(days=1)
        return local(day, 9)

    def on_message(self, channel: str, message: dict) -> None:
        kind = message.get("kind", "")
        token = message.get("reply_token", "")
        claims = read_token(SECRET, token, now=self.clock.now()) if token else {}
        if kind in ("confirmation", "reminder") and "a" in claims:
            self.answer_reminder(int(claims["a"]), token, "voice" if channel == "voice" else "message")
        elif kind == "waitlist_offer" and "w" in claims:
            self.waitlist_answer(int(claims["w"]), token)
        elif kind == "running_late":
            self.running_late(message, token)

    def would_come(self, appointment) -> bool:
        key = self.key_of.get(appointment.id)
        if key is None or appointment.id in self.rescued:
            return True
        tz = self.zones.get(appointment.location_id, NEW_YORK)
        lead = (appointment.start - appointment.created_at).total_seconds() / 86400
        spec = self.world.patients[self.patient_index[appointment.patient_id]]
        kind = "emergency" if appointment.urgency == "urgent" else appointment.appointment_type
        p = logistic(true_logit(self.world.base, spec.propensity, kind, lead, appointment.start.astimezone(zone(tz))))
        return rng_for(self.seed, key, "show").random() < p

    def answer_reminder(self, appointment_id: int, token: str, how: str) -> None:
        reminders = importlib.import_module("plugins.reminders")
        appointment = self.look(appointment_id)
        if appointment.status not in ("booked", "overbooked"):
            return
        key = self.key_of.get(appointment_id, f"a{appointment_id}")
        self.messages_seen[appointment_id] += 1
        draw = rng_for(self.seed, key, "message", self.messages_seen[appointment_id]).random()
        try:
            if self.would_come(appointment):
                if self.messages_seen[appointment_id] == 1 and draw < 0.5:
                    reminders.record_reply(self.context, token, "C")
                return
            reminded, cancels = REMINDER_EFFECT[how]
            if draw < reminded:
                self.rescued.add(appointment_id)
                self.counts["reminded into coming"] += 1
            elif draw < reminded + cancels:
                reminders.record_reply(self.context, token, "X")
                self.counts["cancelled on a message"] += 1
        except (SchedulingError, reminders.ReplyError) as exc:
            self.counts[f"reply refused: {type(exc).__name__}"] += 1

    def desk_call(self, appointment_id: int) -> None:
        appointment = self.look(appointment_id)
        if appointment.status not in ("booked", "overbooked") or appointment.start <= self.clock.now():
            return
        self.counts["desk calls"] += 1
        key = self.key_of.get(appointment_id, f"a{appointment_id}")
        draw = rng_for(self.seed, key, "call").random()
        if self.would_come(appointment):
            if draw < 0.7:
                self.scheduler.confirm_attendance(appointment_id, DESK, "confirmed on the phone")
            return
        reminded, cancels = REMINDER_EFFECT["call"]
        if draw < reminded:
            self.rescued.add(appointment_id)
            self.counts["reminded into coming"] += 1
        elif draw < reminded + cancels:
            self.scheduler.cancel(appointment_id, DESK, "the patient cancelled on the phone")
            self.counts["cancelled on a call"] += 1

    def waitlist_answer(self, offer_id: int, token: str) -> None:
        rng = rng_for(self.seed, "offer", offer_id, self.name)
        draw = rng.random()
        with self.sessions() as session:
            from engine.models import WaitlistOffer

            offer = session.get(WaitlistOffer, offer_id)
            same_day = offer.start - self.clock.now() < timedelta(hours=12)
        take = 0.35 if same_day else 0.5
        if draw < take + 0.2:
            self.at(self.clock.now() + timedelta(minutes=rng.uniform(2, 40 if not same_day else 12)),
                    self.waitlist_reply, offer_id, token, "yes" if draw < take else "no")

    def waitlist_reply(self, offer_id: int, token: str, answer: str) -> None:
        waitlist = importlib.import_module("plugins.waitlist_fill")
        try:
            result = waitlist.reply_to_offer(self.context, token, answer)
        except Exception as exc:  # noqa: BLE001 - an expired token is an answer too late
            self.counts[f"offer reply refused: {type(exc).__name__}"] += 1
            return
        self.counts[f"offers {result.get('result')}"] += 1
        if result.get("result") == "accepted" and result.get("appointment_id"):
            from engine.models import WaitlistOffer

            with self.sessions() as session:
                entry_id = session.get(WaitlistOffer, offer_id).waitlist_id
            appointment = self.look(result["appointment_id"])
            key = self.key_of.get(appointment.id) or self.entry_key.get(entry_id, f"w{entry_id}")
            self.track(appointment.id, key, appointment.start)

    def running_late(self, message: dict, token: str) -> None:
        outbox_id = int(str(message.get("id", "outbox-0")).split("-")[-1])
        with self.sessions() as session:
            item = session.get(OutboxItem, outbox_id)
            notice = session.get(FlowNotice, item.payload.get("notice_id")) if item else None
            if notice is None:
                return
            appointment_id, suggested, offered = notice.appointment_id, notice.suggested_arrival, notice.offer_status
        key = self.key_of.get(appointment_id, f"a{appointment_id}")
        rng = rng_for(self.seed, key, "late", outbox_id)
        if offered == "offered" and token and rng.random() < 0.3:
            flow = importlib.import_module("plugins.flow")
            result = flow.reply_to_notice(self.context, token, "Y")
            self.counts[f"late offers {result.get('result')}"] += 1
            if result.get("result") == "accepted":
                self.plan(appointment_id, self.look(appointment_id).start)
            return
        if rng.random() >= 0.85:
            return
        self.suggested[appointment_id] = suggested
        planned = self.arrival_at.get(appointment_id)
        if planned is not None and planned > self.clock.now() and suggested > planned:
            self.arrival_at[appointment_id] = suggested + timedelta(minutes=rng.uniform(-3, 5))
            self.at(self.arrival_at[appointment_id], self.arrive, appointment_id, self.planned[appointment_id],
                    self.arrival_at[appointment_id])
            self.counts["arrivals moved later"] += 1

    # --- the clinic day ----------------------------------------------------------------------------

    def plan(self, appointment_id: int, start: datetime) -> None:
        if self.planned.get(appointment_id) == start:
            return
        self.planned[appointment_id] = start
        self.arrival_at.pop(appointment_id, None)
        self.at(max(self.clock.now(), start - timedelta(hours=2)), self.decide, appointment_id, start)

    def decide(self, appointment_id: int, start: datetime) -> None:
        appointment = self.look(appointment_id)
        if appointment.status not in ("booked", "overbooked"):
            return
        if appointment.start != start:
            self.plan(appointment_id, appointment.start)
            return
        if self.planned.get(appointment_id) != start:
            return
        key = self.key_of.get(appointment_id, f"a{appointment_id}")
        rng = rng_for(self.seed, key, "day")
        if not self.would_come(appointment):
            self.at(start + timedelta(minutes=16), self.no_show, appointment_id, start)
            return
        arrival = start + timedelta(minutes=min(max(rng.gauss(-6, 7), -30), 14))
        suggested = self.suggested.get(appointment_id)
        if suggested is not None and suggested > arrival:
            arrival = suggested + timedelta(minutes=rng.uniform(-3, 5))
        arrival = max(arrival, self.clock.now())
        self.arrival_at[appointment_id] = arrival
        capacity = self._capacity(appointment_id)
        minutes = (appointment.end - appointment.start).total_seconds() / 60
        service = rng.gammavariate(6.25, 0.9 * minutes / capacity / 6.25)
        self.visits[appointment_id] = Visit(appointment_id, appointment.provider_id, start, service)
        self.at(arrival, self.arrive, appointment_id, start, arrival)

    def _capacity(self, appointment_id: int) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.min(Slot.capacity)).join(
                AppointmentSlot, AppointmentSlot.slot_id == Slot.id).where(
                AppointmentSlot.appointment_id == appointment_id)) or 1

    def no_show(self, appointment_id: int, start: datetime) -> None:
        appointment = self.look(appointment_id)
        if appointment.status in ("booked", "overbooked") and appointment.start == start:
            self.scheduler.mark_no_show(appointment_id, DESK, "did not come")
            self.counts["no-shows marked"] += 1

    def arrive(self, appointment_id: int, start: datetime, arrival: datetime) -> None:
        if self.arrival_at.get(appointment_id) != arrival or self.planned.get(appointment_id) != start:
            return
        appointment = self.look(appointment_id)
        if appointment.status not in ("booked", "overbooked") or appointment.start != start:
            if appointment.status in ("booked", "overbooked"):
                self.plan(appointment_id, appointment.start)
            return
        self.scheduler.arrive(appointment_id, DESK, "at the front desk")
        visit = self.visits[appointment_id]
        visit.arrival = self.clock.now()
        self.waiting[visit.provider_id].append(visit)
        self.try_start(visit.provider_id)

    def try_start(self, provider_id: int) -> None:
        if self.busy.get(provider_id) is not None or not self.waiting[provider_id]:
            return
        now = self.clock.now()
        visit = min(self.waiting[provider_id], key=lambda v: (v.scheduled, v.arrival))
        if visit.scheduled > now:
            if self.wake.get(provider_id) != visit.scheduled:
                self.wake[provider_id] = visit.scheduled
                self.at(visit.scheduled, self.try_start, provider_id)
            return
        self.waiting[provider_id].remove(visit)
        self.busy[provider_id] = visit
        visit.seen = now
        self.scheduler.check_in(visit.appointment_id, DESK, "seen by the provider")
        self.at(now + timedelta(minutes=visit.minutes), self.done, visit)

    def done(self, visit: Visit) -> None:
        visit.left = self.clock.now()
        self.scheduler.complete(visit.appointment_id, DESK, "visit done")
        self.busy_intervals[visit.provider_id].append((visit.seen, visit.left))
        self.busy[visit.provider_id] = None
        self.try_start(visit.provider_id)

    # --- the figures -------------------------------------------------------------------------------

    def measure(self) -> dict[str, Any]:
        world = self.world
        first = local(FIRST_DAY, 0, "UTC") - timedelta(hours=12)
        last = local(world.last_day, 0, "UTC") + timedelta(hours=36)

        def in_month(start: datetime, location_id: int) -> bool:
            day = start.astimezone(zone(self.zones.get(location_id, NEW_YORK))).date()
            return FIRST_DAY <= day <= world.last_day

        with self.sessions() as session:
            slots = [s for s in session.execute(select(Slot.provider_id, Slot.start, Slot.end, Slot.capacity,
                                                       Slot.location_id)
                                                .where(Slot.provider_id.is_not(None), Slot.blocked.is_(False),
                                                       Slot.start >= first, Slot.start < last))
                     if in_month(s.start, s.location_id)]
            appointments = [a for a in session.execute(
                select(Appointment.id, Appointment.status, Appointment.start, Appointment.end, Appointment.location_id,
                       Appointment.provider_id, Appointment.urgency)
                .where(Appointment.start >= first, Appointment.start < last, Appointment.source != "history"))
                if in_month(a.start, a.location_id)]
            # a seat above a slot's capacity carries the plugins' verdict (Dr Jones's second seat does not)
            overbooked_ids = {entity_id for entity_id, after in session.execute(
                select(AuditEntry.entity_id, AuditEntry.after).where(
                    AuditEntry.entity == "appointment", AuditEntry.to_state == "overbooked"))
                if isinstance(after, dict) and after.get("overbook")}
            waitlist_left = session.scalar(select(func.count()).select_from(
                importlib.import_module("engine.models").WaitlistEntry).where(
                importlib.import_module("engine.models").WaitlistEntry.status == "waiting"))
        seat_minutes = sum((s.end - s.start).total_seconds() / 60 * s.capacity for s in slots)
        came = [a for a in appointments if a.status in ("arrived", "checked_in", "completed")]
        attended_minutes = sum((a.end - a.start).total_seconds() / 60 for a in came)
        no_shows = sum(1 for a in appointments if a.status == "no_show")
        overbooked = [a for a in appointments if a.id in overbooked_ids]
        # provider idle: slot hours (union per provider) minus time seeing a patient
        spans: dict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
        for s in sorted(slots, key=lambda s: (s.provider_id, s.start)):
            merged = spans[s.provider_id]
            if merged and s.start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], s.end))
            else:
                merged.append((s.start, s.end))
        per_provider: dict[str, dict[str, float]] = {}
        for provider_id, provider_spans in spans.items():
            busy = [b for b in self.busy_intervals[provider_id] if first <= b[0] < last]
            opened = sum((e - s).total_seconds() / 60 for s, e in provider_spans)
            inside = sum(max((min(b1, s1) - max(b0, s0)).total_seconds() / 60, 0)
                         for b0, b1 in busy for s0, s1 in provider_spans)
            total = sum((e - s).total_seconds() / 60 for s, e in busy)
            waited = [(v.seen - max(v.scheduled, v.arrival)).total_seconds() / 60 for v in self.visits.values()
                      if v.provider_id == provider_id and v.seen is not None and first <= v.scheduled < last]
            per_provider[self.providers[provider_id]] = {
                "open_min": round(opened), "idle_min": round(opened - inside), "overtime_min": round(total - inside),
                "wait_mean_min": round(statistics.fmean(waited), 1) if waited else None}
        open_minutes = sum(p["open_min"] for p in per_provider.values())
        idle_minutes = sum(p["idle_min"] for p in per_provider.values())
        overtime_minutes = sum(p["overtime_min"] for p in per_provider.values())
        waits = [(v.seen - max(v.scheduled, v.arrival)).total_seconds() / 60 for v in self.visits.values()
                 if v.seen is not None and v.arrival is not None and first <= v.scheduled < last]
        urgent_total = len(world.urgents)
        return {
            "plugins": self.active,
            "fill_rate": round(attended_minutes / seat_minutes, 4) if seat_minutes else None,
            "booked_rate": round(sum((a.end - a.start).total_seconds() / 60 for a in appointments
                                     if a.status in ("arrived", "checked_in", "completed", "no_show"))
                                 / seat_minutes, 4) if seat_minutes else None,
            "seat_minutes": round(seat_minutes),
            "attended_minutes": round(attended_minutes),
            "visits": len(came),
            "no_shows": no_shows,
            "no_show_rate": round(no_shows / (no_shows + len(came)), 4) if came else None,
            "overbooks": len(overbooked),
            "overbooked_came": sum(1 for a in overbooked if a.status in ("arrived", "checked_in", "completed")),
            "wait_mean_min": round(statistics.fmean(waits), 2) if waits else None,
            "wait_p50_min": round(statistics.median(waits), 1) if waits else None,
            "wait_p90_min": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 1) if waits else None,
            "idle_min": idle_minutes,
            "idle_share": round(idle_minutes / open_minutes, 4) if open_minutes else None,
            "overtime_min": overtime_minutes,
            "open_minutes": open_minutes,
            "providers": per_provider,
            "urgent_requests": urgent_total,
            "urgent_same_day": self.counts["urgent served same day"],
            "urgent_same_day_rate":
                round(self.counts["urgent served same day"] / urgent_total, 4) if urgent_total else None,
            "urgent_outcomes": dict(self.urgent_outcomes),
            "cancellations": self.counts["late cancellations"] + self.counts["early cancellations"]
            + self.counts["cancelled on a message"] + self.counts["cancelled on a call"],
            "waitlist_still_waiting": waitlist_left,
            "history_visits": self.history_visits,
            "events": {k: v for k, v in sorted(self.counts.items()) if not k.startswith("job ")},
            "job_runs": sum(v for k, v in self.counts.items() if k.startswith("job ") and k != "job errors"),
            "notes": self.notes,
        }


# --- the run -------------------------------------------------------------------------------------


HEADLINE = [
    ("fill rate", "fill_rate", "{:.1%}"),
    ("booked (incl. no-shows)", "booked_rate", "{:.1%}"),
    ("visits that took place", "visits", "{:,}"),
    ("no-show rate", "no_show_rate", "{:.1%}"),
    ("overbooks (of them came)", "overbooks", "{:,}"),
    ("patient wait mean, min", "wait_mean_min", "{:.1f}"),
    ("patient wait p50 / p90, min", "wait_p90_min", "{:.1f}"),
    ("provider idle, min", "idle_min", "{:,}"),
    ("provider idle share", "idle_share", "{:.1%}"),
    ("provider overtime, min", "overtime_min", "{:,}"),
    ("urgent served same day", "urgent_same_day", "{:,}"),
    ("cancellations (all)", "cancellations", "{:,}"),
    ("waitlist still waiting", "waitlist_still_waiting", "{:,}"),
]


def cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    if key == "overbooks":
        text += f" ({result['overbooked_came']})"
    if key == "wait_p90_min":
        text = f"{result['wait_p50_min']:.1f} / {text}"
    if key == "urgent_same_day":
        text += f" of {result['urgent_requests']}"
    return text


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def run_arm(world: World, name: str, issue8: bool, directory: Path, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """One arm, start to finish (in a process of its own when the arms run side by side)."""
    started = wall.perf_counter()
    arm = Arm(world, name, issue8, directory, without)
    arm.set_up()
    setup_notes, arm.notes = arm.notes, []
    arm.run()
    result = arm.measure()
    arm.engine.dispose()
    return {"result": result, "active": arm.active, "setup_notes": setup_notes,
            "seconds": round(wall.perf_counter() - started, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 clinic days, 600 patients, bookings at most 14 days ahead")
    ap.add_argument("--days", type=int, help="days measured from Monday 2026-06-01 (default 28; --quick 3)")
    ap.add_argument("--patients", type=int, help="population (default 2,500; --quick 600)")
    ap.add_argument("--demand", type=float, default=1.15, help="requests per routine seat (default 1.15)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--keep", action="store_true", help="keep the SQLite files (their directory is printed)")
    ap.add_argument("--without", action="append", default=[], choices=ISSUE8, metavar="PLUGIN",
                    help="leave one of the #8 plugins out of the issue8 arm (repeatable): what each one brings")
    ap.add_argument("--serial", action="store_true", help="run the arms one after the other (default: side by side, "
                                                           "one process each)")
    args = ap.parse_args()
    days = args.days or (3 if args.quick else 28)
    patients = args.patients or (600 if args.quick else 2500)

    info, revision = machine_info(), source_revision()
    print(machine_line(info), flush=True)
    started = wall.perf_counter()
    world = build_world(args.seed, days, patients, args.demand, longest_lead=14 if args.quick else 35)
    print(f"world: {days} day(s) from {FIRST_DAY} (+{world.warmup_days} days of booking before), {patients:,} patients, "
          f"{len(world.requests):,} booking requests, {len(world.urgents):,} urgent requests, seed {args.seed}; "
          f"show-model intercept {world.base:.2f} for {RAW_NO_SHOW:.0%} missed before reminders", flush=True)
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="sim-clinic-", dir=shm if shm.is_dir() else None))
    arms = (("baseline", False, ()), ("issue8", True, tuple(args.without)))
    try:
        if args.serial:
            runs = {name: run_arm(world, name, issue8, directory, without) for name, issue8, without in arms}
        else:
            with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {name: pool.submit(run_arm, world, name, issue8, directory, without)
                           for name, issue8, without in arms}
                runs = {name: future.result() for name, future in futures.items()}
        results = {name: run["result"] for name, run in runs.items()}
        seconds = {name: run["seconds"] for name, run in runs.items()}
        for name, run in runs.items():
            print(f"{name}: plugins {', '.join(run['active'])}; simulated in {run['seconds']:.1f} s "
                  f"({run['result']['job_runs']:,} job runs)")
            for note in run["setup_notes"] + run["result"]["notes"]:
                print(f"  note: {note}")
    finally:
        if args.keep:
            print(f"databases kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)

    base, new = results["baseline"], results["issue8"]
    print(f"\nclinic month simulation: {days} day(s), demo clinic, seed {args.seed}, "
          f"{wall.perf_counter() - started:.0f} s\n")
    rows = []
    for label, key, fmt in HEADLINE:
        relative = ratio(new.get(key), base.get(key))
        rows.append([label, cell(base, key, fmt), cell(new, key, fmt), "-" if relative is None else f"{relative:.2f}"])
    print_table(["per arm", "baseline", "issue8", "issue8 / baseline"], rows)
    print(f"\nurgent outcomes: baseline {base['urgent_outcomes']}, issue8 {new['urgent_outcomes']}")
    print("per provider, baseline -> issue8:")
    for code, b in sorted(base["providers"].items()):
        n = new["providers"][code]
        print(f"  {code:9} idle {b['idle_min']:>5} -> {n['idle_min']:>5} min, overtime {b['overtime_min']:>4} -> "
              f"{n['overtime_min']:>4} min, mean wait {b['wait_mean_min']} -> {n['wait_mean_min']} min")
    for name in ("baseline", "issue8"):
        print(f"{name} events: " + ", ".join(f"{k} {v}" for k, v in results[name]["events"].items()))
    ratios = {key: ratio(new.get(key), base.get(key)) for key in
              ("fill_rate", "no_show_rate", "wait_mean_min", "idle_min", "overtime_min", "urgent_same_day")}
    print("BENCH " + json.dumps({
        "bench": "sim_clinic_month", "days": days, "patients": patients, "seed": args.seed, "without": args.without,
        "requests": len(world.requests), "urgent_requests": len(world.urgents),
        "seconds": round(wall.perf_counter() - started, 1), "arm_seconds": seconds,
        "baseline": {k: v for k, v in base.items() if k not in ("events", "notes")},
        "issue8": {k: v for k, v in new.items() if k not in ("events", "notes")},
        "ratio": ratios, "machine": info, "source": revision,
    }, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
