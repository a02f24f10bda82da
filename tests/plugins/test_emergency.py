"""Same-day emergencies: an urgent patient squeezed into a full day with the least harm.

The demo clinic's Monday 2 March 2026 (New York, UTC-5): DRSMITH has 15-minute
new-patient slots 08:00-12:00, follow-up slots 13:00-15:00 and emergency holds
16:00-17:00.  ``full_morning`` books every morning slot but 09:45 and 11:30;
the clock reads 08:30.  The urgent patient needs 30 minutes with DRSMITH,
starting 09:00-10:00, where nothing is free.
"""
from __future__ import annotations

import json
import tomllib
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from sqlalchemy import select

from engine.calendar import local_to_utc
from engine.clinic import load_clinic_data
from engine.models import Appointment, AuditEntry, ChangeRequest, EmergencyMove, EmergencyProposal, EmergencyRequest, \
    OutboxItem, Slot
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.requests import Actor, BookingRequest, ExternalAppointment, UrgentRequest
from engine.service import EngineSettings, Scheduler, slot_accepts
from hl7 import cli
from hl7.config import DestinationConfig
from hl7.filler import apply_request
from hl7.message import parse
from hl7.outbound import OutboundSettings, OutboundSIU
from plugins import emergency
from plugins.emergency_plan import (
    CANCEL,
    PlanAppointment,
    PlanSlot,
    Preferences,
    Problem,
    brute_force,
    feasible,
    solve,
)
from tests.plugins.helpers import REPLY_SECRET, STAFF

REPO = Path(__file__).resolve().parents[2]
NY = "America/New_York"
MONDAY = datetime(2026, 3, 2).date()
TUESDAY = datetime(2026, 3, 3).date()
DOCTOR = Actor("operator", "dr-urgent", "pytest")


def local(hour: int, minute: int = 0, day=MONDAY) -> datetime:
    return local_to_utc(day, time(hour, minute), NY)


@pytest.fixture
def approval() -> str:
    return "never"


@pytest.fixture
def on_call() -> list[str]:
    return []


@pytest.fixture
def slotengine_plugin_settings(slotengine_plugin_settings, approval, on_call) -> dict:
    return {**slotengine_plugin_settings,
            "emergency": {"approval": approval, "notice_minutes": 30, "clinic_name": "Main Street Clinic",
                          "reply_secret": REPLY_SECRET, "on_call_providers": on_call, "channels": ["email"]}}


class Day:
    """The full Monday morning: who sits where."""

    def __init__(self, clinic, clock):
        self.clinic, self.clock, self.scheduler = clinic, clock, clinic.scheduler
        self.patients: dict[str, object] = {}
        self.visits: dict[str, int] = {}

    def book(self, hhmm: str, **fields) -> None:
        hour, minute = map(int, hhmm.split(":"))
        patient = self.clinic.patient(f"P{hour:02d}{minute:02d}", email=f"p{hour:02d}{minute:02d}@example.org",
                                      **fields)
        slot = self.slot_at(local(hour, minute))
        appointment = self.clinic.book(patient, slot=slot)
        self.patients[hhmm], self.visits[hhmm] = patient, appointment.id

    def slot_at(self, start: datetime) -> Slot:
        with self.scheduler.sessions() as session:
            return session.scalars(select(Slot).where(Slot.provider_id == self.clinic.providers["DRSMITH"],
                                                      Slot.start == start)).one()

    def appointment(self, hhmm: str) -> Appointment:
        return self.scheduler.appointment(self.visits[hhmm])

    def urgent(self, **overrides):
        patient = self.clinic.patient("URGENT", email="urgent@example.org")
        fields = dict(patient_id=patient.id, duration_minutes=30, earliest=local(9), latest_start=local(10),
                      provider_id=self.clinic.providers["DRSMITH"], reason="chest pain")
        request = UrgentRequest(**{**fields, **overrides})
        return patient, self.scheduler.request_urgent(request, DOCTOR)


def full_morning(clinic, clock, *, preferences: dict[str, dict] = None) -> Day:
    clock.set(local(6))
    day = Day(clinic, clock)
    for minutes in range(0, 240, 15):
        hhmm = f"{8 + minutes // 60:02d}:{minutes % 60:02d}"
        if hhmm not in ("09:45", "11:30"):
            day.book(hhmm, **(preferences or {}).get(hhmm, {}))
    clock.set(local(8, 30))
    return day


@pytest.fixture
def day(clinic, slotengine_clock) -> Day:
    # the 10:00 patient cannot come after 11:00, so 11:30 is no alternative for them
    return full_morning(clinic, slotengine_clock, preferences={"10:00": {"preferred_latest": time(11, 0)}})


def moves_of(scheduler, request_id: int) -> list[EmergencyMove]:
    with scheduler.sessions() as session:
        return list(session.scalars(select(EmergencyMove).join(EmergencyProposal).where(
            EmergencyProposal.request_id == request_id).order_by(EmergencyMove.id)))


# --- the scenarios --------------------------------------------------------------------------------


def test_an_emergency_is_squeezed_into_a_full_day_with_the_fewest_moves(day, slotengine_context):
    """By hand: a 30-minute visit starting 08:45-10:00 needs two slots.  At 08:45 it would
    move the 08:45 patient, who may be on the way (30 minutes' notice); at 09:00, 09:15
    or 10:00 it displaces two patients; at 09:30 (with the free 09:45) only the 09:30 patient,
    who then goes to 11:30 (120 minutes later); at 09:45 only the 10:00 patient, who
    cannot come after 11:00 and so would wait until Tuesday 08:00 (1,320 minutes).  The
    fewest moved is one, and of those the smaller delay is 120: urgent at 09:30."""
    urgent_patient, outcome = day.urgent(earliest=local(8, 45))
    assert outcome["outcome"] == "applied" and outcome["patients_moved"] == 1
    urgent = day.scheduler.appointment(outcome["appointment_id"])
    assert (urgent.start, urgent.end, urgent.urgency) == (local(9, 30), local(10), "urgent")
    assert urgent.patient_id == urgent_patient.id
    moved = day.appointment("09:30")
    assert (moved.status, moved.start) == ("booked", local(11, 30))
    for hhmm in ("09:00", "09:15", "10:00", "10:15"):
        assert day.appointment(hhmm).start == local(int(hhmm[:2]), int(hhmm[3:]))
    [move] = moves_of(day.scheduler, outcome["request_id"])
    assert (move.action, move.delay_minutes, move.status) == ("reschedule", 120.0, "applied")
    assert move.alternatives and all(datetime.fromisoformat(a["start"]) > local(11, 30) for a in move.alternatives)
    with day.scheduler.sessions() as session:
        audit = session.scalars(select(AuditEntry).where(AuditEntry.entity_id == moved.id,
                                                         AuditEntry.action == "rescheduled")).one()
        assert audit.actor == "plugin:emergency"
        assert f"urgent request {outcome['request_id']}" in audit.reason
        shown = emergency.describe(session, outcome["request_id"])
    [proposal] = shown["proposals"]
    assert proposal["objective"] == {"patients_moved": 1, "delays_minutes": [120.0]}
    assert proposal["urgent"]["start"] == local(9, 30).isoformat()
    considered = {c["start"]: c for c in proposal["candidates"]}
    assert considered[local(8, 45).isoformat()]["why_not"].startswith("starts within 30 minutes")
    assert considered[local(9, 30).isoformat()]["movable"]
    assert "earliest free time" in proposal["moves"][0]["why"]
    json.dumps(shown)  # all of it shows in --json


def test_the_moved_patient_is_told_and_may_take_another_time(day, slotengine_context, slotengine_jobs, smtp_sink,
                                                              slotengine_routes):
    _patient, outcome = day.urgent()
    assert slotengine_jobs.run("emergency.send") == "ok: 1 messages sent"
    smtp_sink.wait_for(1)
    [message] = [m for m in smtp_sink.to("p0930@example.org") if "urgent case" in m.get_content()]
    text = message.get_content()
    assert "Mon 2 Mar 09:30" in text and "Mon 2 Mar 11:30" in text and "1) " in text
    assert "chest pain" not in text  # never the urgent patient's reason
    [move] = moves_of(day.scheduler, outcome["request_id"])
    token = text.split("To choose another time: ")[1].split()[0]
    status, body = slotengine_routes("POST", "/emergency/reply", {"token": token, "answer": "1"})
    assert status == 200 and body["result"] == "chosen"
    assert day.appointment("09:30").start == datetime.fromisoformat(move.alternatives[0]["start"])
    status, body = slotengine_routes("POST", "/emergency/reply", {"token": token + "x", "answer": "1"})
    assert status == 403


@pytest.mark.parametrize("on_call", [["DRONCALL"]])
def test_an_on_call_provider_takes_the_emergency_and_nobody_moves(clinic, slotengine_clock, slotengine_scheduler,
                                                                  on_call):
    with slotengine_scheduler.sessions() as session, session.begin():
        load_clinic_data(session, {"providers": [{"code": "DRONCALL", "family_name": "Call", "location": "MAIN"}]})
    day = full_morning(clinic, slotengine_clock)
    _patient, outcome = day.urgent()
    assert outcome["outcome"] == "applied" and outcome["patients_moved"] == 0
    urgent = day.scheduler.appointment(outcome["appointment_id"])
    with day.scheduler.sessions() as session:
        assert session.scalar(select(Appointment.provider_id).where(Appointment.id == urgent.id)) == \
            session.scalar(select(EmergencyProposal.urgent).where(
                EmergencyProposal.request_id == outcome["request_id"]))["provider_id"]
        shown = emergency.describe(session, outcome["request_id"])
    assert urgent.start == local(9)
    assert all(day.appointment(hhmm).start == local(int(hhmm[:2]), int(hhmm[3:])) for hhmm in day.visits)
    [proposal] = shown["proposals"]
    assert proposal["kind"] == "on_call" and proposal["moves"] == []
    assert proposal["explanation"]["instead_of"]["patients_moved"] == 1  # what it spared


def test_an_arrived_patient_and_one_moved_today_are_left_alone(clinic, slotengine_clock, slotengine_context):
    """By hand: the 09:30 patient has arrived early and the 10:00 patient was moved to
    10:00 by staff this morning, so the only placement left is 09:00 (09:00 and 09:15
    displaced; 09:15 plus 09:30 would move the arrived patient).  Free then: 09:45 and
    11:30.  09:00->09:45 (45) with 09:15->11:30 (135) beats 09:15->09:45 (30) with
    09:00->11:30 (150): the largest delay, 135, is the smaller."""
    slotengine_clock.set(local(6))
    day = Day(clinic, slotengine_clock)
    day.book("08:00")
    tuesday = clinic.patient("P1000", email="p1000@example.org")
    moved_earlier = clinic.book(tuesday, slot=day.slot_at(local(10, day=TUESDAY)))
    for minutes in range(15, 240, 15):
        hhmm = f"{8 + minutes // 60:02d}:{minutes % 60:02d}"
        if hhmm not in ("09:45", "11:30", "10:00"):
            day.book(hhmm)
    slotengine_clock.set(local(7, 30))
    day.scheduler.reschedule(moved_earlier.id, BookingRequest(patient_id=tuesday.id, appointment_type="",
                                                              slot_id=day.slot_at(local(10)).id), STAFF,
                             "the patient asked")
    day.visits["10:00"] = moved_earlier.id
    day.scheduler.arrive(day.visits["09:30"], STAFF)
    slotengine_clock.set(local(8, 30))
    _patient, outcome = day.urgent()
    assert outcome["outcome"] == "applied" and outcome["patients_moved"] == 2
    assert day.scheduler.appointment(outcome["appointment_id"]).start == local(9)
    assert day.appointment("09:00").start == local(9, 45)
    assert day.appointment("09:15").start == local(11, 30)
    assert day.appointment("09:30").status == "arrived" and day.appointment("09:30").start == local(9, 30)
    assert day.appointment("10:00").start == local(10)
    with day.scheduler.sessions() as session:
        considered = {c["appointment_id"]: c for c in emergency.describe(session, outcome["request_id"])
                      ["proposals"][0]["candidates"]}
    assert considered[day.visits["09:30"]]["why_not"] == "the patient has arrived"
    assert considered[day.visits["10:00"]]["why_not"].startswith("already moved today (operator:desk")
    assert sorted(m.delay_minutes for m in moves_of(day.scheduler, outcome["request_id"])) == [45.0, 135.0]


@pytest.mark.parametrize("approval", ["always"])
def test_with_approval_required_nothing_moves_until_staff_approve(day, slotengine_context, smtp_sink):
    _patient, outcome = day.urgent()
    assert outcome["outcome"] == "proposed" and outcome["appointment_id"] is None
    assert day.appointment("09:30").start == local(9, 30)
    with day.scheduler.sessions() as session:
        notice = session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff_notice")).all()
        assert any(f"Urgent request {outcome['request_id']}" in n.payload.get("subject", "") for n in notice)
    result = emergency.approve(slotengine_context, outcome["request_id"], STAFF, "agreed with Dr Smith")
    assert result["outcome"] == "applied"
    assert day.appointment("09:30").start == local(11, 30)
    with day.scheduler.sessions() as session:
        proposal = session.scalars(select(EmergencyProposal)).one()
        assert (proposal.status, proposal.decided_by, proposal.decision_reason) == \
            ("applied", "operator:desk", "agreed with Dr Smith")
    with pytest.raises(Exception, match="no proposal waits"):
        emergency.approve(slotengine_context, outcome["request_id"], STAFF)


@pytest.mark.parametrize("approval", ["when_moving"])
def test_a_rejected_proposal_moves_nobody(day, slotengine_context):
    _patient, outcome = day.urgent()
    assert outcome["outcome"] == "proposed"
    result = emergency.reject(slotengine_context, outcome["request_id"], STAFF, "we will send them to the ER")
    assert result["outcome"] == "rejected"
    assert all(day.appointment(hhmm).status == "booked" for hhmm in day.visits)
    with day.scheduler.sessions() as session:
        assert session.scalars(select(EmergencyProposal.status)).one() == "rejected"
        assert session.scalars(select(EmergencyRequest.status)).one() == "rejected"


@pytest.mark.parametrize("approval", ["always"])
def test_an_approved_proposal_is_planned_again_when_the_day_changed(day, slotengine_context):
    _patient, outcome = day.urgent()
    day.scheduler.cancel(day.visits["09:00"], STAFF, "the patient called")
    day.scheduler.cancel(day.visits["09:15"], STAFF, "the patient called")
    day.scheduler.book(BookingRequest(patient_id=day.patients["08:00"].id, appointment_type="new_patient",
                                      slot_id=day.slot_at(local(11, 30)).id), STAFF)
    result = emergency.approve(slotengine_context, outcome["request_id"], STAFF)
    # 11:30 is taken, so the approved plan fails; planned again, 09:00-09:30 needs nobody moved
    assert result["outcome"] == "proposed" and result["patients_moved"] == 0
    with day.scheduler.sessions() as session:
        proposals = list(session.scalars(select(EmergencyProposal).order_by(EmergencyProposal.id)))
    assert [p.status for p in proposals] == ["failed", "pending"]
    assert "changed since the proposal" in proposals[0].explanation["failed"] or "full" in \
        proposals[0].explanation["failed"]
    assert proposals[1].urgent["start"] == local(9).isoformat()
    assert day.appointment("09:30").start == local(9, 30)


def test_the_window_must_not_have_passed(day, slotengine_context):
    with pytest.raises(Exception, match="window"):
        day.urgent(earliest=local(6), latest_start=local(7))


@pytest.mark.parametrize("approval", ["always"])
def test_a_proposal_expires_when_the_window_passes(day, slotengine_context, slotengine_jobs, slotengine_clock):
    _patient, outcome = day.urgent()
    assert slotengine_jobs.run("emergency.expire") == "ok: 0 proposals expired"
    slotengine_clock.set(local(10, 1))
    assert slotengine_jobs.run("emergency.expire") == "ok: 1 proposals expired"
    with day.scheduler.sessions() as session:
        assert session.scalars(select(EmergencyProposal.status)).one() == "expired"
        assert session.scalars(select(EmergencyRequest.status)).one() == "expired"
    with pytest.raises(Exception, match="no proposal waits"):
        emergency.approve(slotengine_context, outcome["request_id"], STAFF)


# --- SIU S13 with the reason, and an urgent SRM -------------------------------------------------


@pytest.fixture
def slotengine_plugins() -> PluginHost:
    siu = OutboundSIU([DestinationConfig("placer", "127.0.0.1", 1)], OutboundSettings())
    return PluginHost(discover=False, extra=[("outbound_siu", siu)])


def test_moves_are_announced_as_siu_s13_with_the_reason_in_sch_6(day, slotengine_context):
    _patient, outcome = day.urgent()
    with day.scheduler.sessions() as session:
        items = list(session.scalars(select(OutboxItem).where(OutboxItem.kind == "siu").order_by(OutboxItem.id)))
    moved = [i for i in items if i.appointment_id == day.visits["09:30"] and i.payload["event"] == "S13"]
    assert len(moved) == 1
    sch = [seg for seg in moved[0].payload["message"].split("\r") if seg.startswith("SCH|")][0]
    assert f"moved for an urgent patient (urgent request {outcome['request_id']})" in sch.split("|")[6]
    booked = [i for i in items if i.appointment_id == outcome["appointment_id"]]
    assert [i.payload["event"] for i in booked] == ["S12"]


def urgent_srm(placer: str, control: str) -> bytes:
    start, end = f"{MONDAY:%Y%m%d}0900", f"{MONDAY:%Y%m%d}1000"
    return "\r".join([
        f"MSH|^~\\&|EHR|HOSP|SLOTENGINE|CLINIC|20260302133000||SRM^S01^SRM_S01|{control}|P|2.5.1",
        f"ARQ|{placer}^EHR||||||ROUTINE^chest pain|NORMAL|30|min|{start}-0500^{end}-0500|S",
        "PID|1||URG9^^^HOSP^MR||Doe^Urgent||19800101|F",
        "RGS|1",
        "AIP|1||DRSMITH^Smith^Ann",
    ]).encode()


@pytest.mark.parametrize("approval", ["never", "always"])
def test_an_urgent_srm_takes_the_urgent_path(day, slotengine_context, approval):
    def send(control: str):
        with day.scheduler.sessions() as session:
            with session.begin():
                view = day.scheduler.within(session)
                result = apply_request(view, parse(urgent_srm("U1", control)), message_id=1)
            view.notify_committed()
        return parse(result.response)

    day.clinic.patient("URG9")  # insured: eligibility lets the booking through
    answer = send("C1")
    if approval == "never":
        assert answer.first("MSA").value(1) == "AA", [(e.value(5), e.value(8)) for e in answer.segments_named("ERR")]
        assert day.appointment("09:30").start == local(11, 30)
        with day.scheduler.sessions() as session:
            urgent = session.scalars(select(Appointment).where(Appointment.placer_id == "U1^EHR")).one()
        assert urgent.start == local(9, 30) and urgent.urgency == "urgent"
    else:
        assert answer.first("MSA").value(1) == "AE"
        assert answer.first("ERR").value(5) == "pending_approval"
        assert day.appointment("09:30").start == local(9, 30)
        again = send("C2")  # the placer asks again: the same request, not a second one
        assert again.first("ERR").value(5) == "pending_approval"
        with day.scheduler.sessions() as session:
            assert len(session.scalars(select(EmergencyRequest)).all()) == 1


# --- the search is exact: proved against brute force on small random days ---------------------------


T0 = datetime(2026, 3, 2, 13, 0, tzinfo=timezone.utc)


def _accepts(slot, kind, urgency):
    return slot_accepts(slot, kind, urgency, T0, EngineSettings()) is None


@st.composite
def small_days(draw):
    owners = draw(st.integers(1, 2))
    slots, appointments = [], []
    next_id = 1
    for owner_index in range(owners):
        owner = f"provider:{owner_index + 1}"
        count = draw(st.integers(4, 8))
        capacity = draw(st.sampled_from([1, 1, 2]))
        owner_slots = []
        for i in range(count):
            kind = draw(st.sampled_from(["new_patient", "new_patient", "new_patient", "follow_up", "emergency"]))
            owner_slots.append(dict(id=next_id, owner=owner, start=T0 + timedelta(minutes=15 * i),
                                    end=T0 + timedelta(minutes=15 * (i + 1)), slot_type=kind, capacity=capacity,
                                    booked=0, local_minute=480 + 15 * i))
            next_id += 1
        for i, slot in enumerate(owner_slots):
            for _seat in range(slot["capacity"]):
                if slot["booked"] >= slot["capacity"] or not draw(st.booleans()):
                    continue
                length = draw(st.sampled_from([1, 1, 2]))
                covered = owner_slots[i:i + length]
                if len(covered) < length or any(s["booked"] >= s["capacity"] for s in covered):
                    continue
                kind = "follow_up" if slot["slot_type"] == "follow_up" else "new_patient"
                if any(s["slot_type"] == "follow_up" and kind != "follow_up" for s in covered) or \
                        any(s["slot_type"] == "emergency" for s in covered):
                    continue
                for s in covered:
                    s["booked"] += 1
                appointment_id = 100 + len(appointments)
                why = draw(st.sampled_from(["", "", "", "the patient has arrived"]))
                appointments.append(PlanAppointment(
                    appointment_id, 1000 + len(appointments), owner, covered[0]["start"], covered[-1]["end"], kind,
                    tuple(s["id"] for s in covered), why))
        slots += [PlanSlot(**s) for s in owner_slots]
    if len(appointments) > 6:
        appointments = appointments[:6]
        used = {}
        for a in appointments:
            for s in a.slot_ids:
                used[s] = used.get(s, 0) + 1
        slots = [PlanSlot(s.id, s.owner, s.start, s.end, s.slot_type, s.capacity, used.get(s.id, 0), s.blocked,
                          s.local_weekday, s.local_minute) for s in slots]
    preferences = {a.patient_id: Preferences(latest_minute=draw(st.sampled_from([None, None, 540, 570])))
                   for a in appointments}
    owners_all = frozenset(s.owner for s in slots)
    allowed = {a.id: draw(st.sampled_from([frozenset({a.owner}), owners_all])) for a in appointments}
    earliest = T0 + timedelta(minutes=15 * draw(st.integers(0, 3)))
    return Problem(
        slots=slots, appointments=appointments, accepts=_accepts,
        urgent_type=draw(st.sampled_from(["new_patient", "general"])),
        urgent_duration=timedelta(minutes=draw(st.sampled_from([15, 30]))),
        urgent_owners=frozenset(draw(st.sampled_from([["provider:1"], sorted(owners_all)]))),
        earliest=earliest, latest_start=earliest + timedelta(minutes=15 * draw(st.integers(0, 4))),
        min_start=T0 + timedelta(minutes=15 * draw(st.integers(0, 2))),
        allowed_owners=allowed, preferences=preferences,
        patient_busy={a.patient_id: ((a.start, a.end, a.id),) for a in appointments},
        max_moves=draw(st.integers(1, 3)))


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_days())
def test_the_search_finds_what_brute_force_finds(problem):
    fast, slow = solve(problem), brute_force(problem)
    if slow is None:
        assert fast is None
        return
    assert fast is not None and feasible(problem, fast)
    assert (len(fast.moves), fast.delays) == (len(slow.moves), slow.delays)
    assert fast.urgent.start == slow.urgent.start  # ties on the harm go to the earliest urgent start


def test_a_cancellation_counts_as_the_longest_delay():
    slots = [PlanSlot(1, "provider:1", T0, T0 + timedelta(minutes=15), "new_patient", 1, 1),
             PlanSlot(2, "provider:1", T0 + timedelta(minutes=15), T0 + timedelta(minutes=30), "new_patient", 1, 0)]
    only = PlanAppointment(7, 70, "provider:1", T0, T0 + timedelta(minutes=15), "new_patient", (1,))
    problem = Problem(slots, [only], _accepts, "general", timedelta(minutes=30), frozenset({"provider:1"}),
                      T0, T0, T0)
    plan = solve(problem)
    assert plan.moves[0].to is None and plan.delays == (CANCEL,)


# --- the hook, the engine without a plugin, the settings, the command line -----------------------


class WalkInClinic:
    """A vendor plugin that answers urgent dermatology requests itself."""

    def __init__(self):
        self.seen = []

    @hookimpl(tryfirst=True)
    def slotengine_urgent_request(self, session, request, actor, scheduler, context):
        self.seen.append((request.patient_id, actor.label, scheduler._bound is session))
        if request.specialty != "dermatology":
            return None
        return {"outcome": "unplaced", "request_id": None, "appointment_id": None, "proposal_id": None,
                "explanation": "dermatology emergencies go to the walk-in clinic"}


def test_a_vendor_answering_slotengine_urgent_request_comes_first(day, slotengine_context):
    vendor = WalkInClinic()
    day.scheduler.plugins.pm.register(vendor, name="walk_in")
    _patient, outcome = day.urgent(specialty="dermatology", provider_id=None)
    assert outcome == {"outcome": "unplaced", "request_id": None, "appointment_id": None, "proposal_id": None,
                       "explanation": "dermatology emergencies go to the walk-in clinic", "plugin": "walk_in"}
    _patient, outcome = day.urgent()
    assert outcome["plugin"] == "emergency" and outcome["outcome"] == "applied"
    assert [bound for _p, _a, bound in vendor.seen] == [True, True]


def test_without_a_plugin_the_engine_books_free_time_emergency_holds_first(clinic, slotengine_scheduler,
                                                                           slotengine_clock):
    bare = Scheduler(slotengine_scheduler.sessions, plugins=PluginHost(builtins=(), discover=False),
                     clock=slotengine_clock, settings=slotengine_scheduler.settings)
    slotengine_clock.set(local(8, 30))
    patient = clinic.patient("BARE")
    request = UrgentRequest(patient_id=patient.id, duration_minutes=30, earliest=local(8, 30),
                            latest_start=local(16), provider_id=clinic.providers["DRSMITH"])
    outcome = bare.request_urgent(request, DOCTOR)
    assert outcome["outcome"] == "booked" and outcome["plugin"] is None
    assert bare.appointment(outcome["appointment_id"]).start == local(16)  # the emergency hold, not 08:30
    full = UrgentRequest(patient_id=patient.id, duration_minutes=30, earliest=local(16), latest_start=local(16),
                         provider_id=clinic.providers["DRSMITH"])
    assert bare.request_urgent(full, DOCTOR)["outcome"] == "unplaced"


@pytest.mark.parametrize("path", ["config/demo.toml", "config/production.example.toml"])
def test_the_documented_settings_are_accepted(path):
    section = tomllib.loads((REPO / path).read_text())["plugins"]["emergency"]
    context = SimpleNamespace(state={})
    emergency.slotengine_configure(section, context)
    assert context.state["emergency"].approval == "when_moving"


@pytest.mark.parametrize("bad, key", [({"approval": "sometimes"}, "approval"), ({"max_moves": 0}, "max_moves"),
                                      ({"on_call_hours": ["8"]}, "on_call_hours"), ({"colour": 1}, "colour")])
def test_wrong_settings_are_refused_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        emergency.slotengine_configure(bad, SimpleNamespace(state={}))


@pytest.mark.parametrize("approval", ["always"])
def test_staff_review_and_approve_on_the_command_line(day, slotengine_context, slotengine_database_url, capsys):
    _patient, outcome = day.urgent()
    request_id = str(outcome["request_id"])
    assert cli.main(["emergencies", "list", "--json", "--database", slotengine_database_url]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["status"], row["proposal_status"], row["patients_moved"]) == ("proposed", "pending", 1)
    assert cli.main(["emergencies", "show", request_id, "--json", "--database", slotengine_database_url]) == 0
    shown = json.loads(capsys.readouterr().out)
    [move] = shown["proposals"][0]["moves"]
    assert move["appointment_id"] == day.visits["09:30"] and move["delay_minutes"] == 120.0
    assert move["why"] and shown["proposals"][0]["candidates"]
    assert cli.main(["emergencies", "approve", request_id, "--operator", "nurse", "--reason", "ok",
                     "--database", slotengine_database_url]) == 0
    assert "urgent request" in capsys.readouterr().out
    assert day.appointment("09:30").start == local(11, 30)
    assert cli.main(["emergencies", "reject", request_id, "--database", slotengine_database_url]) == 1
    assert "no proposal waits" in capsys.readouterr().err
    assert cli.main(["emergencies", "show", "999", "--database", slotengine_database_url]) == 1


# --- mirror mode: the EHR owns the calendar --------------------------------------------------------


class EhrOwns:
    @hookimpl
    def slotengine_schedule_owner(self, provider_id):
        return "EHR"


def as_ehr(scheduler, appointment: Appointment, start: datetime, filler_id: str):
    return scheduler.record_external_appointment(ExternalAppointment(
        status="booked", start=start, end=start + (appointment.end - appointment.start),
        appointment_type=appointment.appointment_type, placer_id=appointment.placer_id,
        filler_id=appointment.filler_id or filler_id, patient_id=appointment.patient_id,
        provider_id=appointment.provider_id, location_id=appointment.location_id, urgency=appointment.urgency),
        Actor("message", "EPIC^HOSP", "inbound message 7"))


def test_in_mirror_mode_moves_are_asked_of_the_ehr_and_the_urgent_visit_follows_its_answers(day,
                                                                                             slotengine_context):
    day.scheduler.plugins.pm.register(EhrOwns(), name="ehr_owns")
    _patient, outcome = day.urgent()
    assert outcome["outcome"] == "waiting" and outcome["appointment_id"] is None
    assert day.appointment("09:30").start == local(9, 30)  # nothing moves until the EHR says so
    with day.scheduler.sessions() as session:
        [asked] = session.scalars(select(ChangeRequest)).all()
    move_id = moves_of(day.scheduler, outcome["request_id"])[0].id
    assert (asked.kind, asked.requested_start, asked.detail) == \
        ("reschedule", local(11, 30), {"emergency_move": move_id, "patient_told": True})
    as_ehr(day.scheduler, day.appointment("09:30"), local(11, 30), "EHR1")  # the EHR's SIU S13
    [move] = moves_of(day.scheduler, outcome["request_id"])
    assert move.status == "applied"
    with day.scheduler.sessions() as session:
        row = session.get(EmergencyRequest, outcome["request_id"])
        booking = session.scalars(select(ChangeRequest).where(ChangeRequest.kind == "book")).one()
        held = session.get(Appointment, booking.appointment_id)
        assert (row.status, held.status, held.start) == ("waiting", "held", local(9, 30))
    as_ehr(day.scheduler, held, local(9, 30), "EHR2")  # the EHR's SIU S12 for the urgent visit
    with day.scheduler.sessions() as session:
        row = session.get(EmergencyRequest, outcome["request_id"])
        assert (row.status, row.appointment_id) == ("applied", held.id)
        assert session.get(Appointment, held.id).status == "booked"
