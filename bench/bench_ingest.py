#!/usr/bin/env python
"""Ingest benchmark: realistic ADT and SIU traffic through the real daemon.

    python bench/bench_ingest.py                      # 20,000 messages, 1 and 16 connections
    python bench/bench_ingest.py --quick              # 2,000 messages (smoke run)
    python bench/bench_ingest.py --connections 1 4 16 --messages 50000
    python bench/bench_ingest.py --database postgresql://postgres@127.0.0.1/postgres
    python bench/bench_ingest.py --profile            # py-spy the daemon during each run

For each connection count it starts a fresh ``python -m hl7.cli serve --config
<tmp config>`` (an empty SQLite file, synchronous=FULL as the engine sets it;
the demo clinic ``config/demo-clinic.toml``; every built-in plugin enabled, as
in the demo configuration, unless ``--disable-plugin``/``--no-plugins``), and
sends the same generated messages over 1 and N MLLP connections. Each
connection sends in sequence and waits for each ACK, like a real sender.

The messages (seeded, unique control ids) are patients' stories in the demo
clinic: ADT^A04 registration (EVN, PID, PV1, IN1), SIU^S12 new bookings
(SCH, TQ1, PID, PV1, RGS, AIS, AIL, AIP) for DRSMITH, DRJONES, DRPATEL, DRLEE
and DRGARCIA on the slots of their weekly templates -- never two on one
provider slot, so they book cleanly --, ADT^A08 updates, and SIU^S13
reschedules and S15 cancellations of earlier bookings. About 20 % A04, 10 %
A08, 50 % S12, 12 % S13, 8 % S15. All messages of one patient go over the
same connection, in order (connection = patient mod N).

Measured, client side: messages per second from the first send until the
daemon has applied every message (``/metrics``:
``slotengine_messages_applied_total`` + ``..._parked_total``), messages per
second acknowledged, and ACK latency (send -> ACK received) p50/p99/max.
Afterwards the database is read to check the outcome (every message applied,
appointments booked, overlaps flagged).

Baseline, same run: hl7apy's own ``hl7apy.mllp.MLLPServer`` (a
``ThreadingTCPServer``) with an ``AbstractHandler`` per message type whose
``reply()`` parses the message with ``hl7apy.parser.parse_message`` and
returns an ACK built with hl7apy -- no storage. It runs in its own process.
hl7apy's server answers one message per TCP connection and closes it, so the
baseline client opens a connection per message (included in its latency).
hl7apy parses at a few dozen messages per second, so the baseline sends an
evenly spread sample of the same messages (``--baseline-messages``).

Targets: >= 800 msg/s applied at 1 connection, >= 1,500 msg/s at 16, ACK p99
<= 15 ms. Prints a table, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    Daemon,
    DaemonSettings,
    free_port,
    load_average,
    machine_info,
    machine_line,
    own_cpu_seconds,
    percentile,
    plugin_names,
    print_table,
    process_cpu_seconds,
    source_revision,
    start_py_spy,
    stop_py_spy,
    summarize_collapsed,
)

TARGET_1 = 800.0
TARGET_16 = 1500.0
TARGET_P99_MS = 15.0
CLINIC_FILE = REPO / "config" / "demo-clinic.toml"
SENDER = ("EPIC", "NORTHCLINIC")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# --- the messages ------------------------------------------------------------------------------


def _seg(name: str, fields: dict[int, str]) -> str:
    """One segment from its fields by position."""
    return "|".join([name] + [fields.get(n, "") for n in range(1, max(fields) + 1)])


@dataclass
class ProviderSlots:
    """A provider's template slots, in time order, handed out once each."""

    code: str
    family: str
    given: str
    location: str
    tz: ZoneInfo
    room: str
    templates: list[dict]
    first_day: date
    _pending: list[tuple[datetime, int, str]] = field(default_factory=list)
    _day: int = 0

    def take(self) -> tuple[datetime, datetime, str]:
        """The next free slot: (start, end, slot type), aware datetimes in the location's zone."""
        while not self._pending:
            day = self.first_day + timedelta(days=self._day)
            self._day += 1
            weekday = WEEKDAYS[day.weekday()]
            for template in self.templates:
                if weekday not in template["days"]:
                    continue
                start = datetime.combine(day, dtime.fromisoformat(template["start"]), self.tz)
                end = datetime.combine(day, dtime.fromisoformat(template["end"]), self.tz)
                step = timedelta(minutes=template["slot_minutes"])
                while start + step <= end:
                    self._pending.append((start, template["slot_minutes"], template["slot_type"]))
                    start += step
            self._pending.sort(reverse=True)
        start, minutes, slot_type = self._pending.pop()
        return start, start + timedelta(minutes=minutes), slot_type


def demo_providers(first_day: date) -> list[ProviderSlots]:
    clinic = tomllib.loads(CLINIC_FILE.read_text())
    zones = {loc["code"]: ZoneInfo(loc["timezone"]) for loc in clinic["locations"]}
    rooms = {"MAIN": ["EXAM1", "EXAM2", "ENDO"], "WEST": ["ROOM1", "ROOM2", "ROOM3"]}
    providers = []
    for provider in clinic["providers"]:
        templates = [t for t in clinic["templates"] if t.get("provider") == provider["code"]]
        if not templates:
            continue
        location = provider["location"]
        room = rooms[location][sum(p.location == location for p in providers) % len(rooms[location])]
        providers.append(ProviderSlots(provider["code"], provider["family_name"], provider["given_name"],
                                       location, zones[location], room, templates, first_day))
    return providers


FAMILY = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
          "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
          "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
          "O'Neil", "Nguyen", "Kim", "Patel", "Cohen", "Kowalski", "Rossi", "Silva", "Okafor", "Haddad"]
GIVEN_F = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
           "Maria", "Ana", "Mei", "Aisha", "Priya", "Olga", "Fatima", "Grace", "Chloe", "Emma"]
GIVEN_M = ["James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Charles",
           "Jose", "Luis", "Wei", "Omar", "Raj", "Ivan", "Kwame", "Noah", "Liam", "Lucas"]
STREETS = ["Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Pine Rd", "Washington Blvd", "Lake View Ct",
           "Hill St", "River Rd"]
CITIES = [("Springfield", "MA", "011"), ("Riverside", "CA", "925"), ("Hartford", "CT", "061"),
          ("Albany", "NY", "122"), ("Pasadena", "CA", "911")]
LANGUAGES = [("eng", "English"), ("eng", "English"), ("eng", "English"), ("spa", "Spanish"), ("kor", "Korean"),
             ("hin", "Hindi"), ("por", "Portuguese")]
PAYERS = [("ACME", "ACME-PPO", "ACME Health PPO"), ("MCAID", "STATE-MEDICAID", "State Medicaid"),
          ("ACME", "ACME-HMO", "ACME Health HMO")]
SERVICES = {"new_patient": ("NEWPT", "New patient visit", "ROUTINE^Routine visit^HL70276", "NP^New patient^HL70277"),
            "follow_up": ("FU", "Follow-up visit", "FOLLOWUP^Follow-up^HL70276", "FU^Follow-up^HL70277"),
            "emergency": ("URG", "Same-day urgent visit", "EMERGENCY^Emergency^HL70276", "URGENT^Urgent^HL70277"),
            "procedure": ("PROC", "Procedure", "ROUTINE^Routine visit^HL70276", "PROC^Procedure^HL70277")}
NOTES = ["Patient prefers morning calls", "Bring current medication list", "Interpreter requested",
         "Wheelchair access needed", "Referred by Dr Adams", "Fasting required"]


def _dtm(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


@dataclass
class Patient:
    number: int
    mrn: str
    family: str
    given: str
    middle: str
    sex: str
    birth: str
    street: str
    city: tuple[str, str, str]
    phone: str
    email: str
    language: tuple[str, str]
    payer: tuple[str, str, str]
    member: str


def make_patient(rng: random.Random, number: int) -> Patient:
    sex = rng.choice("FM")
    given = rng.choice(GIVEN_F if sex == "F" else GIVEN_M)
    family = rng.choice(FAMILY)
    birth = date(1935, 1, 1) + timedelta(days=rng.randrange(0, 365 * 85))
    return Patient(
        number=number, mrn=f"{4000000 + number}", family=family, given=given,
        middle=rng.choice("ABCDEJKLMR"), sex=sex, birth=birth.strftime("%Y%m%d"),
        street=f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}", city=rng.choice(CITIES),
        phone=f"{rng.randrange(200, 999)}{rng.randrange(1000, 9999)}",
        email=f"{given.lower()}.{family.lower().replace(chr(39), '')}{number}@example.org",
        language=rng.choice(LANGUAGES), payer=rng.choice(PAYERS), member=f"M{rng.randrange(10**8, 10**9)}",
    )


class MessageFactory:
    """Builds the segments; control ids are unique per factory (and per run tag)."""

    def __init__(self, rng: random.Random, tag: str, now: datetime):
        self.rng = rng
        self.tag = tag
        self.now = now
        self.count = 0

    def _msh(self, kind: str) -> tuple[str, str]:
        self.count += 1
        control = f"{self.tag}{self.count:07d}"
        stamp = _dtm(self.now + timedelta(milliseconds=37 * self.count))
        return control, (f"MSH|^~\\&|{SENDER[0]}|{SENDER[1]}|SLOTENGINE|SE|{stamp}||{kind}|{control}|P|2.5.1"
                         f"|||||UNICODE UTF-8")  # original mode: one ACK (AA) per message

    def pid(self, p: Patient, *, updated: bool = False) -> str:
        city, state, zip3 = p.city
        street = f"{p.street}^Apt {p.number % 40 + 1}" if updated else p.street
        phones = f"^PRN^PH^^1^{zip3}^{p.phone}~^NET^Internet^{p.email}"
        if updated:
            phones = f"^PRN^CP^^1^{zip3}^{int(p.phone) + 1}~" + phones
        return _seg("PID", {
            1: "1", 3: f"{p.mrn}^^^NORTH^MR~{900000000 + p.number}^^^SSA^SS",
            5: f"{p.family}^{p.given}^{p.middle}^^^^L", 7: p.birth, 8: p.sex,
            10: "2106-3^White^CDCREC" if p.number % 3 else "2054-5^Black or African American^CDCREC",
            11: f"{street}^^{city}^{state}^{zip3}{p.number % 100:02d}^USA^H",
            13: phones, 14: f"^WPN^PH^^1^{zip3}^5550{p.number % 1000:03d}",
            15: f"{p.language[0]}^{p.language[1]}^ISO6392", 16: "M^Married^HL70002" if p.number % 2 else "S^Single^HL70002",
            18: f"V{7000000 + p.number}^^^NORTH^AN", 30: "N",
        })

    def pv1(self, p: Patient, location: str, room: str, provider: ProviderSlots, when: datetime) -> str:
        return _seg("PV1", {
            1: "1", 2: "O", 3: f"{location}^{room}^^{location}",
            7: f"{provider.code}^{provider.family}^{provider.given}^^^DR", 10: "OUT",
            15: "A0" if p.number % 11 else "A2", 18: "OP", 19: f"V{7000000 + p.number}^^^NORTH^VN",
            44: _dtm(when),
        })

    def in1(self, p: Patient) -> str:
        payer_code, plan, name = p.payer
        return _seg("IN1", {
            1: "1", 2: f"{plan}^{name}", 3: f"{payer_code}^^^{payer_code}", 4: name,
            5: "PO Box 100^^Hartford^CT^06101^USA", 7: "^WPN^PH^^1^800^5550100", 8: f"G{p.number % 500:04d}",
            9: "Employer group", 12: "20260101", 13: "20271231", 15: "PPO" if "PPO" in plan else "HMO",
            16: f"{p.family}^{p.given}^{p.middle}", 17: "SEL^Self^HL70063", 18: p.birth, 22: "1",
            36: p.member,
        })

    def adt(self, event: str, p: Patient, provider: ProviderSlots) -> tuple[str, bytes]:
        control, msh = self._msh(f"ADT^{event}^ADT_A01")
        when = self.now + timedelta(seconds=self.count)
        segments = [msh, f"EVN|{event}|{_dtm(when)}|||REGCLERK^Clerk^Rita", self.pid(p, updated=event == "A08"),
                    self.pv1(p, provider.location, provider.room, provider, when), self.in1(p)]
        return control, ("\r".join(segments) + "\r").encode()

    def siu(self, event: str, p: Patient, provider: ProviderSlots, placer: str, start: datetime, end: datetime,
            slot_type: str, *, reason: str = "") -> tuple[str, bytes]:
        control, msh = self._msh(f"SIU^{event}^SIU_S12")
        code, text, sch7, sch8 = SERVICES.get(slot_type, SERVICES["new_patient"])
        minutes = int((end - start).total_seconds() // 60)
        status = "Cancelled" if event == "S15" else "Booked"
        loc, room = provider.location, provider.room
        segments = [
            msh,
            _seg("SCH", {
                1: f"{placer}^EPIC", 2: f"F{placer}^EPIC", 6: reason, 7: sch7, 8: sch8, 9: str(minutes), 10: "MIN",
                11: f"^^{minutes}^{_dtm(start)}^{_dtm(end)}", 12: "1027^Scheduler^Anna^^^^^^NORTH",
                13: "^WPN^PH^^1^617^5550100", 16: "1027^Scheduler^Anna^^^^^^NORTH",
                20: "1027^Scheduler^Anna^^^^^^NORTH", 25: f"{status}^{status}^HL70278",
            }),
            f"TQ1|1||||||{_dtm(start)}|{_dtm(end)}|R^Routine^HL70485",
        ]
        if p.number % 4 == 0:
            segments.append(f"NTE|1||{NOTES[p.number % len(NOTES)]}")
        segments += [
            self.pid(p),
            self.pv1(p, loc, room, provider, start),
            "RGS|1|A",
            f"AIS|1|A|{code}^{text}^L|{_dtm(start)}|0|MIN|{minutes}|MIN|Y|{status}",
            f"AIL|1|A|{loc}^{room}^^{loc}|C^Clinic^HL70305||{_dtm(start)}|0|MIN|{minutes}|MIN|Y|{status}",
            (f"AIP|1|A|{provider.code}^{provider.family}^{provider.given}^^^DR|ATND^Attending^HL70182||"
             f"{_dtm(start)}|0|MIN|{minutes}|MIN|Y|{status}"),
        ]
        return control, ("\r".join(segments) + "\r").encode()


@dataclass
class Item:
    story: int
    kind: str  # "ADT^A04", "SIU^S12", ...
    control_id: str
    raw: bytes


def generate(count: int, seed: int = 20260601, tag: str = "B") -> list[Item]:
    """``count`` messages in arrival order; each patient's messages in story order."""
    rng = random.Random(seed)
    today = date.today()
    first_day = today + timedelta(days=7 + (7 - today.weekday()) % 7)  # a Monday, 1-2 weeks ahead
    providers = demo_providers(first_day)
    weights = [sum(len(t["days"]) * _minutes_between(t["start"], t["end"]) // t["slot_minutes"] for t in p.templates)
               for p in providers]  # slots per week: busy providers get more bookings
    factory = MessageFactory(rng, tag, datetime.now(ZoneInfo("America/New_York")).replace(microsecond=0))
    keyed: list[tuple[float, int, int, str, tuple[str, bytes]]] = []
    story = 0
    while len(keyed) < count + 16:
        p = make_patient(rng, story)
        provider = rng.choices(providers, weights)[0]
        placer = f"{tag}A{story:07d}"
        position = float(story)
        events: list[tuple[str, tuple[str, bytes]]] = []
        if rng.random() < 0.4:
            events.append(("ADT^A04", factory.adt("A04", p, provider)))
        start, end, slot_type = provider.take()
        events.append(("SIU^S12", factory.siu("S12", p, provider, placer, start, end, slot_type)))
        if rng.random() < 0.2:
            events.append(("ADT^A08", factory.adt("A08", p, provider)))
        if rng.random() < 0.24:
            start, end, slot_type = provider.take()
            events.append(("SIU^S13", factory.siu("S13", p, provider, placer, start, end, slot_type,
                                                  reason="PATREQ^Patient request")))
        if rng.random() < 0.16:
            events.append(("SIU^S15", factory.siu("S15", p, provider, placer, start, end, slot_type,
                                                  reason="PATCANCEL^Cancelled by patient")))
        for seq, (kind, message) in enumerate(events):
            # follow-ups arrive later, interleaved with other patients' traffic
            offset = 0.0 if seq == 0 else seq * 0.25 + rng.uniform(5, 400) * seq
            keyed.append((position + offset, story, seq, kind, message))
        story += 1
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    # keep each story's order even where offsets cross: re-sort per story by seq
    by_story: dict[int, list[int]] = {}
    for index, entry in enumerate(keyed):
        by_story.setdefault(entry[1], []).append(index)
    ordered: list[tuple | None] = [None] * len(keyed)
    for indexes in by_story.values():
        entries = sorted((keyed[i] for i in indexes), key=lambda k: k[2])
        for i, entry in zip(indexes, entries):
            ordered[i] = entry
    items = [Item(e[1], e[3], e[4][0], e[4][1]) for e in ordered[:count]]
    return items


def _minutes_between(start: str, end: str) -> int:
    a, b = dtime.fromisoformat(start), dtime.fromisoformat(end)
    return (b.hour * 60 + b.minute) - (a.hour * 60 + a.minute)


def lanes(items: list[Item], connections: int) -> list[list[Item]]:
    split: list[list[Item]] = [[] for _ in range(connections)]
    for item in items:
        split[item.story % connections].append(item)
    return [lane for lane in split if lane]


# --- the client ----------------------------------------------------------------------------


@dataclass
class LaneResult:
    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    mismatched: int = 0
    errors: list[str] = field(default_factory=list)


def _msa(ack: bytes) -> tuple[str, str]:
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            parts = segment.split(segment[3:4])
            return (parts[1].decode(errors="replace") if len(parts) > 1 else "?",
                    parts[2].decode(errors="replace") if len(parts) > 2 else "")
    return "?", ""


async def _read_frame(reader: asyncio.StreamReader, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(b"\x1c")
        if end >= 0:
            start = buffer.find(b"\x0b")
            payload = bytes(buffer[start + 1:end])
            cut = end + 2 if len(buffer) > end + 1 and buffer[end + 1] == 0x0D else end + 1
            del buffer[:cut]
            return payload
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        buffer += chunk


async def _persistent_lane(host: str, port: int, items: list[Item], result: LaneResult, timeout: float) -> None:
    """One connection, sent in sequence, each message waiting for its ACK."""
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    clock = time.perf_counter
    try:
        for item in items:
            started = clock()
            writer.write(b"\x0b" + item.raw + b"\x1c\r")
            await writer.drain()
            ack = await asyncio.wait_for(_read_frame(reader, buffer), timeout)
            result.latencies.append(clock() - started)
            code, echoed = _msa(ack)
            result.codes[code] += 1
            if echoed != item.control_id:
                result.mismatched += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001
            pass


async def _reconnecting_lane(host: str, port: int, items: list[Item], result: LaneResult, timeout: float) -> None:
    """hl7apy's MLLPServer closes the connection after each reply: one connection per message."""
    clock = time.perf_counter
    for item in items:
        started = clock()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(b"\x0b" + item.raw + b"\x1c\r")
            await writer.drain()
            ack = await asyncio.wait_for(_read_frame(reader, bytearray()), timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            result.codes["error"] += 1
            if len(result.errors) < 5:
                result.errors.append(f"{item.control_id}: {type(exc).__name__}: {exc}")
            continue
        result.latencies.append(clock() - started)
        writer.close()
        code, echoed = _msa(ack)
        result.codes[code] += 1
        if echoed != item.control_id:
            result.mismatched += 1


def send_all(host: str, port: int, split: list[list[Item]], *, reconnect: bool = False,
             timeout: float = 60.0) -> tuple[list[LaneResult], float, float]:
    """Send every lane concurrently; returns (results, t_first_send, t_last_ack) (perf_counter)."""
    results = [LaneResult() for _ in split]
    lane = _reconnecting_lane if reconnect else _persistent_lane

    async def run() -> tuple[float, float]:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(lane(host, port, items, r, timeout) for items, r in zip(split, results)),
                                        return_exceptions=True)
        for r, outcome in zip(results, outcomes):
            if isinstance(outcome, BaseException):
                r.errors.append(f"{type(outcome).__name__}: {outcome}")
        return started, time.perf_counter()

    first, last = asyncio.run(run())
    return results, first, last


# --- one run against the daemon ----------------------------------------------------------------


class MetricsPoller(threading.Thread):
    """Samples /metrics until stopped: progress (applied + parked) and the queue depth."""

    def __init__(self, daemon: Daemon, interval: float = 0.25):
        super().__init__(daemon=True, name="metrics-poller")
        self.target_daemon = daemon
        self.interval = interval
        self.samples: list[tuple[float, float, float, float]] = []  # (t, acked, done, queue depth)
        self.stop_event = threading.Event()

    def sample(self) -> tuple[float, float, float, float]:
        m = self.target_daemon.metrics()
        done = m.get("slotengine_messages_applied_total", 0.0) + m.get("slotengine_messages_parked_total", 0.0)
        entry = (time.perf_counter(), m.get("slotengine_messages_acknowledged_total", 0.0), done,
                 m.get("slotengine_queue_depth", 0.0))
        self.samples.append(entry)
        return entry

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.sample()
            except OSError:
                pass


class Progress:
    """How many stored messages still wait to be applied, read from the database itself
    (read-only SQLite connection, or a PostgreSQL session): costs the daemon nothing,
    unlike rendering /metrics at a high rate."""

    SQL = "select count(*) from inbound_messages where status = 'received'"

    def __init__(self, url: str):
        self.url = url
        self._sqlite = None
        self._engine = None
        if url.startswith("sqlite"):
            import sqlite3

            path = url.split(":///", 1)[1]
            self._sqlite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            from sqlalchemy import create_engine

            self._engine = create_engine(url, pool_size=1)

    def waiting(self) -> int:
        if self._sqlite is not None:
            return self._sqlite.execute(self.SQL).fetchone()[0]
        from sqlalchemy import text

        with self._engine.connect() as connection:
            return connection.execute(text(self.SQL)).scalar()

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._engine is not None:
            self._engine.dispose()


def _postgres_schema(base_url: str, schema: str, *, create: bool) -> str:
    """A fresh schema for one run on the PostgreSQL server of ``base_url`` (as the
    test suite does), and the URL that puts the daemon in it; dropped with create=False."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            if create:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        engine.dispose()
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def run_database_url(args, run_dir: Path, connections: int) -> tuple[str, str | None]:
    """(URL for this run's daemon, PostgreSQL schema to drop afterwards or None)."""
    if not args.database:
        return f"sqlite:///{run_dir / 'slotengine.db'}", None
    if args.database.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = Path(make_url(args.database).database)
        path = path.with_name(f"{path.stem}-{connections}conn{path.suffix or '.db'}")
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return f"sqlite:///{path.resolve()}", None
    schema = f"bench_ingest_{os.getpid()}_{connections}"
    return _postgres_schema(args.database, schema, create=True), schema


def database_summary(url: str) -> dict:
    """Read the outcome after the daemon stopped."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            def rows(sql: str) -> dict:
                return {str(k): v for k, v in connection.execute(text(sql)).all()}

            return {
                "messages": rows("select status, count(*) from inbound_messages group by status"),
                "appointments": rows("select status, count(*) from appointments group by status"),
                "conflicts": connection.execute(text(
                    "select count(*) from appointments where conflict is not null and conflict <> ''")).scalar(),
                "patients": connection.execute(text("select count(*) from patients")).scalar(),
                "audit_entries": connection.execute(text("select count(*) from audit")).scalar(),
                "outbox": connection.execute(text("select count(*) from outbox")).scalar(),
                "parked_reasons": rows("select substr(error, 1, 120), count(*) from inbound_messages "
                                       "where status = 'parked' group by 1 order by 2 desc limit 5"),
            }
    except Exception as exc:  # noqa: BLE001 - a summary, not the measurement
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        engine.dispose()


def run_daemon(items: list[Item], connections: int, args, workdir: Path) -> dict:
    run_dir = workdir / f"daemon-{connections}"
    run_dir.mkdir(parents=True, exist_ok=True)
    url, schema = run_database_url(args, run_dir, connections)
    feed = {"name": "ehr", "mode": "mirror"}
    if args.ack_when != "stored":
        feed["ack_when"] = args.ack_when
    settings = DaemonSettings(run_dir, url, log_level=args.log_level, plugins_disabled=tuple(args.disabled),
                              feeds=[feed], grace_seconds=30, builtin_plugins_only=not args.with_installed_plugins)
    daemon = Daemon(settings).start()
    profiler = None
    profile_path = run_dir / "py-spy.txt"
    load_before = load_average()
    try:
        split = lanes(items, connections)
        if args.profile:
            profiler = start_py_spy(daemon.pid, profile_path)
            time.sleep(0.5)
        poller = MetricsPoller(daemon, interval=1.0)
        poller.start()
        progress = Progress(url)
        cpu_before = process_cpu_seconds(daemon.pid)
        receiving_cpu_before = own_cpu_seconds(daemon.pid)
        client_cpu_before = time.process_time()
        results, first, last_ack = send_all("127.0.0.1", daemon.port(), split, timeout=args.ack_timeout)
        client_cpu = time.process_time() - client_cpu_before
        # Only positively acknowledged messages are stored; a NAK (AR: "not stored, resend
        # later") is counted and reported, and the run waits for what was accepted.
        accepted = sum(r.codes.get("AA", 0) + r.codes.get("CA", 0) for r in results)
        deadline = time.perf_counter() + args.apply_timeout
        done_at = None
        while time.perf_counter() < deadline:
            # every accepted message is stored once its ACK arrived: done when none waits
            t = time.perf_counter()
            if progress.waiting() == 0:
                done_at = t
                break
            time.sleep(0.02)
        progress.close()
        poller.sample()
        cpu_after = process_cpu_seconds(daemon.pid)
        receiving_cpu_after = own_cpu_seconds(daemon.pid)
        poller.stop_event.set()
        poller.join(5)
        stop_py_spy(profiler)
        metrics = daemon.metrics()
    finally:
        load_after = load_average()
        stop_py_spy(profiler)
        code = daemon.stop(60)
    summary = database_summary(url)
    if schema and not args.keep:
        _postgres_schema(args.database, schema, create=False)
    latencies = [x for r in results for x in r.latencies]
    codes = sum((r.codes for r in results), Counter())
    done = max((s[2] for s in poller.samples), default=0.0)
    applied_seconds = (done_at - first) if done_at else None
    max_depth = max((s[3] for s in poller.samples), default=0.0)
    # acked - done at its widest: how far applying fell behind storing
    backlog = max((s[1] - s[2] for s in poller.samples), default=0.0)
    out = {
        "connections": len(split),
        "messages": len(items),
        "acked": len(latencies),
        "ack_codes": dict(codes),
        "mismatched_control_ids": sum(r.mismatched for r in results),
        "client_errors": [e for r in results for e in r.errors][:5],
        "ack_seconds": round(last_ack - first, 3),
        "acked_per_s": round(len(latencies) / (last_ack - first), 1) if last_ack > first else None,
        "applied_seconds": round(applied_seconds, 3) if applied_seconds else None,
        "applied_per_s": round(accepted / applied_seconds, 1) if applied_seconds else None,
        "accepted": accepted,
        "naks": len(latencies) - accepted,
        "applied_when_stopped_waiting": done,
        "ack_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "ack_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "ack_max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        "max_backlog": int(backlog),
        "daemon_cpu_seconds": round(cpu_after - cpu_before, 2) if cpu_before is not None and cpu_after else None,
        "daemon_cpu_ms_per_message": round((cpu_after - cpu_before) * 1000 / len(items), 2)
        if cpu_before is not None and cpu_after else None,
        # the receiving process alone (listener, store, ACKs); the rest of the daemon's is the applier's
        "receiving_cpu_ms_per_message": round((receiving_cpu_after - receiving_cpu_before) * 1000 / len(items), 2)
        if receiving_cpu_before is not None and receiving_cpu_after else None,
        "client_cpu_seconds": round(client_cpu, 2),
        "client_cpu_ms_per_message": round(client_cpu * 1000 / len(items), 2),
        "daemon_apply_ms_mean": round(1000 * metrics.get("slotengine_apply_seconds_sum", 0)
                                      / max(1.0, metrics.get("slotengine_apply_seconds_count", 0)), 2),
        "daemon_ack_ms_mean": round(1000 * metrics.get("slotengine_ack_seconds_sum", 0)
                                    / max(1.0, metrics.get("slotengine_ack_seconds_count", 0)), 2),
        "max_queue_depth_gauge": int(max_depth),
        "daemon_exit": code,
        "daemon_ack_histogram": {k.split('le="')[1].split('"')[0]: v for k, v in metrics.items()
                                 if k.startswith("slotengine_ack_seconds_bucket{")},
        "database": summary,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if profiler is not None and profile_path.exists():
        out["profile"] = str(profile_path)
        out["profile_top"] = summarize_collapsed(profile_path, top=args.profile_top)
    if not args.keep and not args.profile:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# --- the baseline: hl7apy's MLLPServer -----------------------------------------------------------


def baseline_server(port: int, kinds: list[str]) -> None:
    """Runs in its own process: hl7apy.mllp.MLLPServer parsing and acknowledging."""
    from hl7apy.core import Message as Hl7apyMessage
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    class AckHandler(AbstractHandler):
        def reply(self) -> str:
            incoming = parse_message(self.incoming_message)
            msh = incoming.msh
            ack = Hl7apyMessage("ACK", version=msh.msh_12.to_er7() or "2.5")
            ack.msh.msh_3 = msh.msh_5.to_er7()
            ack.msh.msh_4 = msh.msh_6.to_er7()
            ack.msh.msh_5 = msh.msh_3.to_er7()
            ack.msh.msh_6 = msh.msh_4.to_er7()
            ack.msh.msh_9 = f"ACK^{msh.msh_9.msh_9_2.to_er7()}^ACK"
            ack.msh.msh_10 = "ACK" + msh.msh_10.to_er7()
            ack.msh.msh_11 = msh.msh_11.to_er7()
            ack.msa.msa_1 = "AA"
            ack.msa.msa_2 = msh.msh_10.to_er7()
            return "\x0b" + ack.to_er7() + "\r\x1c\r"

    handlers = {kind: (AckHandler,) for kind in kinds}
    server = MLLPServer("127.0.0.1", port, handlers, timeout=30)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


def run_baseline(items: list[Item], connections: int, args) -> dict:
    port = free_port()
    kinds = sorted({item.raw.split(b"\r", 1)[0].split(b"|")[8].decode() for item in items})
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(port), "--kinds", ",".join(kinds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"hl7apy MLLPServer did not start: {line}{proc.stderr.read()[-2000:]}")
        split = lanes(items, connections)
        cpu_before = process_cpu_seconds(proc.pid)
        results, first, last = send_all("127.0.0.1", port, split, reconnect=True, timeout=args.ack_timeout)
        cpu_after = process_cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    latencies = [x for r in results for x in r.latencies]
    codes = sum((r.codes for r in results), Counter())
    return {
        "connections": len(split),
        "messages": len(items),
        "acked": len(latencies),
        "ack_codes": dict(codes),
        "mismatched_control_ids": sum(r.mismatched for r in results),
        "client_errors": [e for r in results for e in r.errors][:5],
        "seconds": round(last - first, 3),
        "acked_per_s": round(len(latencies) / (last - first), 1) if last > first else None,
        "ack_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "ack_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "server_cpu_ms_per_message": round((cpu_after - cpu_before) * 1000 / len(items), 2)
        if cpu_before is not None and cpu_after else None,
    }


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 16],
                    help="connection counts to measure (default: 1 16)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 messages, 300 for the baseline")
    ap.add_argument("--full", action="store_true", help="accepted for run_all.py; the default is the full run")
    ap.add_argument("--database", metavar="URL",
                    help="postgresql://USER@HOST/DB: each run gets a fresh schema there, dropped afterwards "
                         "(--keep keeps it); sqlite:///PATH.db: a fresh file PATH-<N>conn.db per run. "
                         "Default: a temporary SQLite file")
    ap.add_argument("--baseline-messages", type=int, default=2000,
                    help="messages sent to hl7apy's MLLPServer per connection count (an evenly spread sample)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--disable-plugin", dest="disabled", action="append", default=[], metavar="NAME",
                    help="disable a built-in plugin (repeatable); the default enables all, as the demo does")
    ap.add_argument("--no-plugins", action="store_true", help="disable every built-in plugin")
    ap.add_argument("--with-installed-plugins", action="store_true",
                    help="also load plugins installed in this environment through the slotengine.plugins entry "
                         "points (by default only the built-ins run, as in the demo)")
    ap.add_argument("--ack-when", choices=("stored", "applied"), default="stored")
    ap.add_argument("--log-level", default="INFO", help="daemon log level (the demo's is INFO)")
    ap.add_argument("--seed", type=int, default=20260601)
    ap.add_argument("--ack-timeout", type=float, default=60.0)
    ap.add_argument("--apply-timeout", type=float, default=900.0)
    ap.add_argument("--profile", action="store_true", help="record the daemon with py-spy (kept in the work dir)")
    ap.add_argument("--profile-top", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (databases, logs, configs)")
    ap.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kinds", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.baseline_server:
        baseline_server(args.baseline_server, args.kinds.split(","))
        return 0
    if args.quick:
        args.messages = min(args.messages, 2000) if "--messages" in sys.argv else 2000
        args.baseline_messages = min(args.baseline_messages, 300)
    builtin, installed = plugin_names()
    if args.no_plugins:
        args.disabled = list(builtin)
    args.third_party_disabled = [] if args.with_installed_plugins else [n for n in installed if n not in builtin]
    args.disabled = list(dict.fromkeys(args.disabled + args.third_party_disabled))

    info = machine_info()
    revision = source_revision()
    generated_at = time.perf_counter()
    items = generate(args.messages, seed=args.seed)
    generate_seconds = time.perf_counter() - generated_at
    mix = Counter(item.kind for item in items)
    sizes = [len(item.raw) for item in items]
    step = max(1, len(items) // max(1, args.baseline_messages))
    sample = items[::step][:args.baseline_messages]

    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    runs, baselines = [], []
    try:
        for connections in args.connections:
            print(f"... daemon, {connections} connection(s), {len(items):,} messages", file=sys.stderr, flush=True)
            runs.append(run_daemon(items, connections, args, workdir))
        if not args.no_baseline:
            for connections in args.connections:
                print(f"... hl7apy MLLPServer, {connections} connection(s), {len(sample):,} messages",
                      file=sys.stderr, flush=True)
                baselines.append(run_baseline(sample, connections, args))
    finally:
        if not (args.keep or args.profile):
            shutil.rmtree(workdir, ignore_errors=True)

    database = "postgresql" if args.database and not args.database.startswith("sqlite") \
        else "sqlite (file, WAL, synchronous=FULL)"
    print(f"\nslotengine ingest bench: {len(items):,} messages "
          f"({', '.join(f'{k} {v}' for k, v in sorted(mix.items()))}; "
          f"{min(sizes)}-{max(sizes)} bytes, mean {sum(sizes) / len(sizes):.0f}), generated in {generate_seconds:.1f} s")
    print(machine_line(info))
    print(f"source: commit {revision['commit']}{' + uncommitted changes in ' + ', '.join(revision['dirty_files'][:5]) if revision['dirty'] else ''}")
    builtin_off = [n for n in args.disabled if n not in args.third_party_disabled]
    print(f"database: {database}; built-in plugins disabled: {', '.join(builtin_off) or 'none'}"
          + (f"; installed non-built-in plugins left out: {', '.join(args.third_party_disabled)}"
             if args.third_party_disabled else "") + "; "
          f"ack_when = {args.ack_when}; daemon log level {args.log_level}\n")
    headers = ["server", "conns", "msgs", "acked/s", "applied/s", "ACK p50 ms", "ACK p99 ms", "ACK max ms",
               "max backlog", "CPU ms/msg", "receiving CPU", "client CPU", "apply ms", "codes",
               "load 1m before/after"]
    rows = []
    for r in runs:
        load = f"{(r['loadavg_before'] or ['?'])[0]}/{(r['loadavg_after'] or ['?'])[0]}"
        rows.append(["slotengine daemon", r["connections"], f"{r['messages']:,}", r["acked_per_s"],
                     r["applied_per_s"] or f"incomplete ({r['applied_when_stopped_waiting']:.0f})", r["ack_p50_ms"],
                     r["ack_p99_ms"], r["ack_max_ms"], r["max_backlog"], r["daemon_cpu_ms_per_message"],
                     r["receiving_cpu_ms_per_message"], r["client_cpu_ms_per_message"], r["daemon_apply_ms_mean"],
                     " ".join(f"{k}:{v}" for k, v in sorted(r["ack_codes"].items())), load])
    for b in baselines:
        rows.append(["hl7apy MLLPServer", b["connections"], f"{b['messages']:,}", b["acked_per_s"], "-",
                     b["ack_p50_ms"], b["ack_p99_ms"], "-", "-", b.get("server_cpu_ms_per_message", "-"),
                     "-", "-", "-",
                     " ".join(f"{k}:{v}" for k, v in sorted(b["ack_codes"].items())), "-"])
    print_table(headers, rows)

    ratios = {}
    for r, b in zip(runs, baselines):
        if b["acked_per_s"] and r["applied_per_s"]:
            ratios[str(r["connections"])] = {
                "applied_over_baseline": round(r["applied_per_s"] / b["acked_per_s"], 1),
                "acked_over_baseline": round(r["acked_per_s"] / b["acked_per_s"], 1),
            }
    if ratios:
        print("\nours / hl7apy baseline (baseline parses and ACKs only, no storage): " + "; ".join(
            f"{c} conn: applied x{v['applied_over_baseline']}, acked x{v['acked_over_baseline']}"
            for c, v in ratios.items()))

    print("\ndatabase after each run:")
    for r in runs:
        d = r["database"]
        if "error" in d:
            print(f"  {r['connections']} conn: {d['error']}")
            continue
        print(f"  {r['connections']} conn: messages {d['messages']}; appointments {d['appointments']}; "
              f"conflicts {d['conflicts']}; patients {d['patients']}; audit entries {d['audit_entries']}; outbox {d['outbox']}")
        if d.get("parked_reasons"):
            print(f"     parked: {d['parked_reasons']}")
        if r["naks"]:
            print(f"     {r['naks']} message(s) answered with a NAK (not stored): see the daemon log "
                  f"(e.g. 'could not store messages ... database is locked')")
        if r["client_errors"] or r["mismatched_control_ids"]:
            print(f"     client errors {r['client_errors']}, mismatched control ids {r['mismatched_control_ids']}")

    verdicts = []
    for r in runs:
        target = TARGET_1 if r["connections"] == 1 else TARGET_16 if r["connections"] >= 16 else None
        rate = r["applied_per_s"] or 0
        if target:
            verdicts.append(f"{r['connections']} conn >= {target:,.0f} msg/s applied: "
                            f"{'met' if rate >= target else 'MISSED'} ({rate:,.0f})")
        verdicts.append(f"{r['connections']} conn ACK p99 <= {TARGET_P99_MS:g} ms: "
                        f"{'met' if r['ack_p99_ms'] <= TARGET_P99_MS else 'MISSED'} ({r['ack_p99_ms']} ms)")
    print("\ntargets: " + "\n         ".join(verdicts))

    for r in runs:
        top = r.get("profile_top")
        if top and top["samples"]:
            print(f"\npy-spy, daemon, {r['connections']} connection(s), {top['samples']} samples ({r['profile']})")
            print("  threads: " + ", ".join(f"{name} {pct}%" for name, pct in top["threads"].items()))
            print("  our functions, inclusive % of all samples:")
            for name, pct in top["inclusive"]:
                print(f"    {pct:5.1f}  {name[:140]}")
            print("  self % (any code):")
            for name, pct in top["self"]:
                print(f"    {pct:5.1f}  {name[:140]}")

    result = {
        "bench": "ingest",
        "messages": len(items),
        "mix": dict(mix),
        "database": "postgresql" if args.database and not args.database.startswith("sqlite") else "sqlite",
        "plugins_disabled": [n for n in args.disabled if n not in args.third_party_disabled],
        "installed_plugins_left_out": args.third_party_disabled,
        "ack_when": args.ack_when,
        "machine": info,
        "source": revision,
        "runs": [{k: v for k, v in r.items() if k not in ("profile_top", "daemon_ack_histogram")} for r in runs],
        "baseline": baselines,
        "ratios": ratios,
        "targets": {"applied_per_s_1": TARGET_1, "applied_per_s_16": TARGET_16, "ack_p99_ms": TARGET_P99_MS},
    }
    for r in runs:
        result[f"applied_per_s_{r['connections']}"] = r["applied_per_s"]
        result[f"ack_p99_ms_{r['connections']}"] = r["ack_p99_ms"]
    for connections, ratio in ratios.items():
        result[f"baseline_ratio_applied_{connections}"] = ratio["applied_over_baseline"]
    print("BENCH " + json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
