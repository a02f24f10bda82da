"""Patient flow: arrival smoothing in the slot search, a running-late day told to
patients over real SMTP and a real webhook, and the daily flow report (DST days too)."""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import select

from engine.calendar import local_to_utc, zone
from engine.clinic import load_clinic_data
from engine.clock import SystemClock
from engine.models import FlowDelay, FlowNotice, OutboxItem, Provider
from engine.plugin import hookimpl
from engine.plugin_host import PluginHost
from engine.requests import Actor, BookingRequest, SlotQuery
from engine.service import Scheduler
from hl7.cli import main
from hl7.mapping import apply_message
from hl7.message import parse
from plugins.flow import arrival_window, parse_settings, report_running_late, send_due
from plugins.flow_report import flow_report, render_png, render_table
from tests.plugins.helpers import STAFF

NY = "America/New_York"
TUESDAY = date(2026, 3, 3)
WEDNESDAY = date(2026, 3, 4)
SPRING_FORWARD = date(2026, 3, 8)  # New York: 02:00 EST -> 03:00 EDT
FALL_BACK = date(2026, 11, 1)  # New York: 02:00 EDT -> 01:00 EST
FLOW = {"max_arrivals": {"MAIN": 2}, "clinic_name": "Main Street Clinic", "reply_secret": "flow-reply-secret",
        "reply_url": "https://portal.example.org/late"}


@pytest.fixture
def slotengine_plugin_settings(slotengine_plugin_settings):
    return {**slotengine_plugin_settings, "flow": dict(FLOW)}


def at(day: date, hhmm: str, tz: str = NY) -> datetime:
    return local_to_utc(day, time.fromisoformat(hhmm), tz)


def hhmm(instant: datetime, tz: str = NY) -> str:
    return f"{instant.astimezone(zone(tz)):%H:%M}"


def book_at(clinic, patient, provider: str, day: date, when: str, **request):
    slot = next(s for s in clinic.slots(provider) if s.start == at(day, when))
    return clinic.scheduler.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                slot_id=slot.id, **request), STAFF)


def code_of(scheduler, provider_id) -> str:
    with scheduler.sessions() as session:
        return session.get(Provider, provider_id).code


def write_config(tmp_path, database_url: str, flow: dict) -> str:
    limits = ", ".join(f"{code} = {n}" for code, n in flow["max_arrivals"].items())
    path = tmp_path / "slotengine.toml"
    path.write_text(f'[database]\nurl = "{database_url}"\n\n[clinic]\ntimezone = "{NY}"\n\n'
                    f'[plugins.flow]\nmax_arrivals = {{ {limits} }}\nreply_secret = "x"\n'
                    f'[plugins.reminders]\nreply_secret = "x"\n[plugins.waitlist_fill]\nreply_secret = "x"\n')
    return str(path)


# --- arrival smoothing ------------------------------------------------------------------------


def test_arrival_windows_follow_the_local_wall_clock():
    # 09:07 New York (EST) is in 09:00-09:15; in Kathmandu (UTC+5:45) too, though not a UTC quarter hour
    assert arrival_window(at(TUESDAY, "09:07"), NY, 15) == (at(TUESDAY, "09:00"), at(TUESDAY, "09:15"))
    katmandu = "Asia/Kathmandu"
    assert arrival_window(at(TUESDAY, "09:07", katmandu), katmandu, 15) == (
        at(TUESDAY, "09:00", katmandu), at(TUESDAY, "09:15", katmandu))
    # the repeated hour of a fall-back night has windows of its own
    first, second = datetime(2026, 11, 1, 5, 40, tzinfo=zone("UTC")), datetime(2026, 11, 1, 6, 40, tzinfo=zone("UTC"))
    assert hhmm(first) == hhmm(second) == "01:40"
    assert arrival_window(first, NY, 15)[0] + timedelta(hours=1) == arrival_window(second, NY, 15)[0]


def test_settings_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match=r"window_minutes: .*dividing an hour"):
        parse_settings({"window_minutes": 25})
    with pytest.raises(ValueError, match=r"max_arrivals.MAIN: .*at least 1"):
        parse_settings({"max_arrivals": {"MAIN": 0}})
    with pytest.raises(ValueError, match=r"over_limit"):
        parse_settings({"over_limit": "warn"})
    with pytest.raises(ValueError, match=r"unknown settings colour"):
        parse_settings({"colour": "blue"})


def test_a_full_arrival_window_is_left_out_and_the_rest_scored_by_crowding(clinic, slotengine_context):
    a, b, c = (clinic.patient(f"S{i}") for i in range(3))
    book_at(clinic, a, "DRSMITH", TUESDAY, "09:00")
    book_at(clinic, b, "DRJONES", TUESDAY, "09:00")  # Jones's 09:00 has two seats: one is left
    book_at(clinic, c, "DRSMITH", TUESDAY, "09:30")
    query = SlotQuery("new_patient", at(TUESDAY, "09:00"), at(TUESDAY, "10:00"), limit=10)

    excluded = []
    found = clinic.scheduler.free_slots(query, excluded=excluded)
    sch = clinic.scheduler
    # 09:15 and 09:45 are empty windows (score 0, earliest first); 09:30 already has one of two
    assert [(code_of(sch, f.provider_id), hhmm(f.start), f.scores) for f in found] == [
        ("DRSMITH", "09:15", {"flow": 0.0}), ("DRSMITH", "09:45", {"flow": 0.0}), ("DRJONES", "09:30", {"flow": -0.5})]
    assert [(code_of(sch, e.provider_id), hhmm(e.start), e.excluded) for e in excluded] == [
        ("DRJONES", "09:00", "flow: arrival limit: 2 of 2 arrivals already booked at MAIN 09:00–09:15")]
    assert excluded[0].as_dict()["excluded"].startswith("flow: arrival limit")

    # an urgent request is never left out: the crowded window comes last instead
    urgent = sch.free_slots(replace(query, urgency="urgent"))
    assert (hhmm(urgent[-1].start), urgent[-1].scores) == ("09:00", {"flow": -101.0})

    # over_limit = "rank": kept for everyone, below every window within the limit
    slotengine_context.state["flow"] = replace(slotengine_context.state["flow"], over_limit="rank")
    ranked = sch.free_slots(query)
    assert [hhmm(r.start) for r in ranked] == ["09:15", "09:45", "09:30", "09:00"]
    assert ranked[-1].score == -101.0

    # a location without a limit is not scored at all
    lee = clinic.providers["DRLEE"]
    west = sch.free_slots(SlotQuery("new_patient", at(TUESDAY, "08:00", "America/Los_Angeles"),
                                    at(TUESDAY, "09:00", "America/Los_Angeles"), provider_id=lee))
    assert west and all(w.scores == {} for w in west)


def test_a_failing_slot_filter_keeps_the_candidate(slotengine_scheduler):
    class Broken:
        @hookimpl
        def slotengine_exclude_slot(self, candidate):
            raise RuntimeError("filter down")

    class Picky:
        @hookimpl
        def slotengine_exclude_slot(self, session, candidate, query):
            assert session is not None
            return "mornings only" if candidate.start.astimezone(zone(NY)).hour >= 12 else None

    start = at(TUESDAY, "00:00")
    query = SlotQuery("new_patient", start, start + timedelta(days=1), limit=50)
    slotengine_scheduler.plugins = PluginHost(builtins=(), discover=False, extra=[("broken", Broken())])
    everything = slotengine_scheduler.free_slots(query)
    assert everything and slotengine_scheduler.plugins.metrics.plugin_errors.labels(
        "broken", "slotengine_exclude_slot")._value.get() >= len(everything)
    slotengine_scheduler.plugins = PluginHost(builtins=(), discover=False, extra=[("picky", Picky())])
    left_out = []
    mornings = slotengine_scheduler.free_slots(query, excluded=left_out)
    assert mornings and all(m.start.astimezone(zone(NY)).hour < 12 for m in mornings)
    assert left_out and {e.excluded for e in left_out} == {"picky: mornings only"}


def test_slots_find_shows_the_flow_score_and_explains_what_it_left_out(clinic, slotengine_database_url, tmp_path,
                                                                        capsys):
    # The CLI runs on the real clock: a schedule next week, seen from today.
    real = Scheduler(clinic.scheduler.sessions, clock=SystemClock())
    today = datetime.now(zone(NY)).date()
    day = today + timedelta(days=(1 - today.weekday()) % 7 + 7)  # a Tuesday, one to two weeks ahead
    real.expand_templates(day, day)
    for provider, who in (("DRSMITH", "C1"), ("DRJONES", "C2")):
        slot = next(s for s in clinic.slots(provider) if s.start == at(day, "09:00"))
        real.book(BookingRequest(patient_id=clinic.patient(who).id, appointment_type="new_patient",
                                 slot_id=slot.id), STAFF)
    config = write_config(tmp_path, slotengine_database_url, FLOW)

    assert main(["slots", "find", "--config", config, "--type", "new_patient", "--from", day.isoformat(),
                 "--days", "1", "--specialty", "family_medicine", "--earliest", "09:00", "--latest", "09:30", "--json", "--explain"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kept = [(r["provider"], r["local_start"][11:16], r["scores"]) for r in rows if "excluded" not in r]
    assert kept == [("DRSMITH", "09:15", {"flow": 0.0})]
    assert [(r["provider"], r["local_start"][11:16], r["excluded"]) for r in rows if "excluded" in r] == [
        ("DRJONES", "09:00", "flow: arrival limit: 2 of 2 arrivals already booked at MAIN 09:00–09:15")]


# --- running late -----------------------------------------------------------------------------


def outbox_of(scheduler, kind):
    with scheduler.sessions() as session:
        return list(session.scalars(select(OutboxItem).where(OutboxItem.kind == kind).order_by(OutboxItem.id)))


def test_a_running_late_day(clinic, slotengine_clock, slotengine_context, slotengine_routes, smtp_sink,
                            webhook_sink, slotengine_database_url, tmp_path, capsys):
    sch = clinic.scheduler
    names = ["P0", "P1", "P2", "P3", "P4", "P5", "P6", "P7"]
    contact = {"P4": {"email": "p4@example.org"},
               "P5": {"phones": [{"number": "+15550105", "use": "CP"}], "preferred_channel": "sms"},
               "P7": {"email": "p7@example.org", "language": "es"}}  # P6: no way to reach them
    patients = {n: clinic.patient(n, **contact.get(n, {})) for n in names}
    times = ["09:00", "09:15", "09:30", "09:45", "10:00", "10:30", "11:00", "11:30"]  # 10:15 stays free
    booked = {n: book_at(clinic, patients[n], "DRSMITH", TUESDAY, t) for n, t in zip(names, times)}
    for name, when in (("P1", "09:10"), ("P2", "09:25"), ("P3", "09:44")):  # on time: no estimate
        slotengine_clock.set(at(TUESDAY, when))
        sch.arrive(booked[name].id, STAFF)
    assert outbox_of(sch, "running_late") == []

    slotengine_clock.set(at(TUESDAY, "09:50"))
    sch.check_in(booked["P0"].id, Actor("operator", "drsmith", "pytest"))  # the 09:00 patient, 50 min late

    with sch.sessions() as session:
        delay = session.scalars(select(FlowDelay)).one()
        assert (delay.trigger, delay.observed_minutes, delay.local_day) == ("checked_in", 50, TUESDAY)
        assert "started at 09:50 (50 min after its time)" in delay.explanation
        estimates = {e["appointment_id"]: e for e in delay.estimates}
    by_name = {n: estimates[booked[n].id] for n in names[1:]}
    # P0 runs 09:50-10:05; the three waiting follow; 10:00 is seen at 10:50; the free 10:15 absorbs 15 min
    assert {n: (e["estimated_local"], e["delay_minutes"]) for n, e in by_name.items()} == {
        "P1": ("10:05", 50), "P2": ("10:20", 50), "P3": ("10:35", 50), "P4": ("10:50", 50),
        "P5": ("11:05", 35), "P6": ("11:20", 20), "P7": ("11:35", 5)}
    assert {n: e["decision"] for n, e in by_name.items()} == {
        "P1": "none", "P2": "none", "P3": "none", "P4": "tell_and_offer", "P5": "tell", "P6": "tell", "P7": "none"}
    assert by_name["P1"]["why"] == "already in the clinic"
    assert "under the 20-min threshold" in by_name["P7"]["why"]
    assert {n: by_name[n]["suggested_arrival_local"] for n in ("P4", "P5", "P6")} == {
        "P4": "10:40", "P5": "10:55", "P6": "11:10"}
    assert "no message channel reaches the patient: the front desk is asked to call" in by_name["P6"]["why"]

    # sent right after the check-in: e-mail with a signed link to the other time, SMS
    (mail,) = smtp_sink.to("p4@example.org")
    body = mail.get_content()
    assert mail["Subject"] == "Your appointment today: please come at 10:40"
    assert "running about 50 min late. For your 10:00 appointment today, please arrive at 10:40" in body
    assert "we can move you to Wed 4 Mar 08:00" in body
    (sms,) = webhook_sink.to("+15550105")
    assert sms["text"] == ("Main Street Clinic: we are running about 35 min late. For your 10:30 appointment "
                           "today, please arrive at 10:55 instead.")
    staff = [item.payload for item in outbox_of(sch, "staff_notice")]
    assert any(p["subject"] == f"Running late: please call about appointment {booked['P6'].id}"
               and "arrive at 11:10" in p["text"] for p in staff)
    assert any(p["subject"] == "Ann Smith (DRSMITH) is running about 50 min late" for p in staff)

    # P4 takes the other time through the signed link
    token = parse_qs(urlparse(body.split("To take it: ")[1].split()[0]).query)["token"][0]
    status, answer = slotengine_routes("POST", "/flow/reply", {"token": token, "answer": "Y"})
    assert (status, answer["result"]) == (200, "accepted")
    assert sch.appointment(booked["P4"].id).start == at(WEDNESDAY, "08:00")
    assert slotengine_routes("POST", "/flow/reply", {"token": token + "x", "answer": "Y"})[0] == 403

    # staff: 90 minutes behind at 10:00. P5 and P6 are told again (later), P7 for the first time
    slotengine_clock.set(at(TUESDAY, "10:00"))
    decision = report_running_late(slotengine_context, "DRSMITH", 90, Actor("operator", "desk", "pytest"))
    assert decision["trigger"] == "staff"
    told = {e["appointment_id"]: e for e in decision["estimates"]}
    assert (told[booked["P5"].id]["estimated_local"], told[booked["P5"].id]["decision"]) == ("11:30", "tell_and_offer")
    assert told[booked["P5"].id]["suggested_arrival_local"] == "11:20"
    assert told[booked["P6"].id]["suggested_arrival_local"] == "11:35"
    assert told[booked["P7"].id]["decision"] == "tell"  # 11:30 -> 12:00, 30 min
    assert booked["P4"].id not in told  # moved to tomorrow
    with sch.sessions() as session:
        offers = {n.appointment_id: n for n in session.scalars(select(FlowNotice).where(FlowNotice.offer_status == "offered"))}
    assert set(offers) == {booked["P5"].id, booked["P6"].id}  # the worst affected, each once
    slotengine_clock.set(at(TUESDAY, "10:01"))
    assert send_due(slotengine_context) == "2 running-late messages sent"  # P5 again (SMS), P7 (e-mail, Spanish)
    assert webhook_sink.to("+15550105")[-1]["text"].startswith(
        "Main Street Clinic: we are running about 60 min late. For your 10:30 appointment today, please arrive at 11:20")
    (spanish,) = smtp_sink.to("p7@example.org")
    assert spanish["Subject"] == "Su cita de hoy: por favor venga a las 11:50"

    # an estimate that says "earlier" does not call anyone in earlier than told
    slotengine_clock.set(at(TUESDAY, "10:05"))
    sch.check_in(booked["P1"].id, STAFF)  # 50 min late: P1 10:05-10:20, P2, P3, then P5 at 10:50
    with sch.sessions() as session:
        latest = session.scalars(select(FlowDelay).order_by(FlowDelay.id.desc())).first()
        p5 = next(e for e in latest.estimates if e["appointment_id"] == booked["P5"].id)
    assert p5["decision"] == "none" and "already told to arrive at 11:20" in p5["why"]

    # the decisions, as staff list them
    config = write_config(tmp_path, slotengine_database_url, FLOW)
    capsys.readouterr()
    assert main(["flow", "delays", "--config", config, "--date", TUESDAY.isoformat(), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["trigger"] for d in listed] == ["checked_in", "staff", "checked_in"]
    assert all(d["explanation"] and d["estimates"] for d in listed)
    assert main(["flow", "late", "--config", config, "--provider", "DRWHO", "--minutes", "10"]) == 1
    assert "DRWHO" in capsys.readouterr().err


def test_a_late_arrival_by_adt_a04_starts_an_estimate_and_an_early_one_does_not(clinic, slotengine_clock):
    sch = clinic.scheduler
    early, late = clinic.patient("MRNEARLY"), clinic.patient("MRNLATE", email="late@example.org")
    later = clinic.patient("MRNLATER", email="later@example.org")
    first = book_at(clinic, early, "DRSMITH", TUESDAY, "08:00")
    book_at(clinic, late, "DRSMITH", TUESDAY, "08:15")
    waiting = book_at(clinic, later, "DRSMITH", TUESDAY, "09:00")

    def a04(mrn: str, when: str, control: str):
        slotengine_clock.set(at(TUESDAY, when))
        stamp = at(TUESDAY, when).astimezone(zone(NY)).strftime("%Y%m%d%H%M%S-0500")
        message = parse("\r".join([
            f"MSH|^~\\&|EHR|CLINIC|SLOT|SLOT|{stamp}||ADT^A04^ADT_A01|{control}|P|2.5.1",
            f"EVN|A04|{stamp}", f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane"]).encode())
        with sch.sessions() as session, session.begin():
            view = sch.within(session)
            apply_message(view, message, mode="mirror", message_id=1)
        view.notify_committed()

    a04("MRNEARLY", "07:55", "A1")
    for step, when in ((sch.check_in, "08:00"), (sch.complete, "08:14")):  # seen on time
        slotengine_clock.set(at(TUESDAY, when))
        step(sch.find_appointment(appointment_id=first.id).id, STAFF)
    a04("MRNLATE", "08:50", "A2")  # 35 min late: seen now, 08:50-09:05 -> the 09:00 patient waits 5 min
    with sch.sessions() as session:
        delays = list(session.scalars(select(FlowDelay)))
        assert [(d.trigger, d.observed_minutes) for d in delays] == [("arrived", 35)]
        (estimate,) = [e for e in delays[0].estimates if e["appointment_id"] == waiting.id]
    assert (estimate["estimated_local"], estimate["decision"]) == ("09:05", "none")


# --- the flow report --------------------------------------------------------------------------------


def test_the_flow_report_of_a_known_day_matches_a_hand_count(clinic, slotengine_clock, slotengine_context,
                                                            slotengine_database_url, tmp_path, capsys):
    sch = clinic.scheduler
    p = {n: clinic.patient(n) for n in "ABCDEFG"}
    book_at(clinic, p["A"], "DRSMITH", TUESDAY, "09:00")
    book_at(clinic, p["B"], "DRSMITH", TUESDAY, "09:15")
    missed = book_at(clinic, p["C"], "DRSMITH", TUESDAY, "09:30")
    book_at(clinic, p["D"], "DRSMITH", TUESDAY, "10:00", duration_minutes=30)
    book_at(clinic, p["E"], "DRJONES", TUESDAY, "09:00")
    second = book_at(clinic, p["F"], "DRJONES", TUESDAY, "09:00")  # the second seat: overbooked
    book_at(clinic, p["G"], "DRJONES", TUESDAY, "10:00")
    assert second.status == "overbooked"
    slotengine_clock.set(at(TUESDAY, "09:50"))
    sch.mark_no_show(missed.id, STAFF)

    with sch.sessions() as session:
        (report,) = flow_report(session, TUESDAY, slotengine_context.state["flow"], "MAIN")
    # Smith: 08:00-12:00 in 15-min slots and 16:00-17:00 emergency = 300 min; A, B (15) + D (30) = 60 min,
    # C's no-show gave its 15 back. Jones: 09:00-17:00 = 480 min; E, F, G 30 each = 90 (F on E's second seat).
    assert report["day_hours"] == 24
    assert {p["provider"]: (p["slot_minutes"], p["booked_minutes"], p["utilisation"], p["gap_minutes"],
                            p["overbooks"], p["no_shows"]) for p in report["providers"]} == {
        "DRSMITH": (300, 60, 0.2, 240, 0, 1), "DRJONES": (480, 90, 0.188, 420, 1, 0)}
    smith = next(p for p in report["providers"] if p["provider"] == "DRSMITH")
    assert [(g["local_start"], g["local_end"], g["minutes"]) for g in smith["gaps"]] == [
        ("08:00", "09:00", 60), ("09:30", "10:00", 30), ("10:30", "12:00", 90), ("16:00", "17:00", 60)]
    windows = {w["label"]: (w["arrivals"], w["no_shows"], w["over_limit"]) for w in report["windows"]}
    assert len(report["windows"]) == 35  # 08:00 .. 16:30
    assert [windows[t] for t in ("08:00", "09:00", "09:15", "09:30", "09:45", "10:00")] == [
        (0, 0, False), (3, 0, True), (1, 0, False), (1, 1, False), (0, 0, False), (2, 0, False)]
    assert report["totals"] == {"arrivals": 7, "no_shows": 1, "overbooks": 1, "slot_minutes": 780,
                                "booked_minutes": 150, "utilisation": 0.192, "gap_minutes": 660,
                                "windows_over_limit": 1}
    assert [o["appointment_id"] for o in report["overbooks"]] == [second.id]
    assert [n["appointment_id"] for n in report["no_shows"]] == [missed.id]

    table = render_table([report])
    assert "DRSMITH   300       60          20%" in table and "09:00   3         0         yes" in table

    config = write_config(tmp_path, slotengine_database_url, FLOW)
    chart = tmp_path / "flow.png"
    capsys.readouterr()
    assert main(["report", "flow", "--config", config, "--date", TUESDAY.isoformat(), "--location", "MAIN",
                 "--json", "--png", str(chart)]) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "flow", "--config", config, "--date", TUESDAY.isoformat(), "--location", "NOWHERE"]) == 1
    assert "unknown location 'NOWHERE'" in capsys.readouterr().err


def test_the_flow_report_counts_clinic_local_days_across_clock_changes(clinic, slotengine_context, tmp_path):
    sch = clinic.scheduler
    with sch.sessions() as session, session.begin():
        load_clinic_data(session, {
            "locations": [{"code": "NIGHT", "name": "Night Clinic", "timezone": NY}],
            "providers": [{"code": "DRNIGHT", "family_name": "Night", "location": "NIGHT"}],
            "templates": [{"code": "NIGHT-SUN", "provider": "DRNIGHT", "location": "NIGHT", "days": ["sun"],
                           "start": "00:00", "end": "04:00", "slot_minutes": 15}],
        })
    sch.expand_templates(SPRING_FORWARD, SPRING_FORWARD)
    sch.expand_templates(FALL_BACK, FALL_BACK)
    with sch.sessions() as session:
        clinic.providers["DRNIGHT"] = session.scalar(select(Provider.id).where(Provider.code == "DRNIGHT"))
    slots = clinic.slots("DRNIGHT")
    patient = clinic.patient("N1")
    utc = zone("UTC")
    spring = [s for s in slots if s.start.date() == SPRING_FORWARD]
    # 00:00-04:00 on the spring-forward night is three hours long: 00:00-02:00 EST, 03:00-04:00 EDT
    for start in (datetime(2026, 3, 8, 6, 30, tzinfo=utc), datetime(2026, 3, 8, 6, 45, tzinfo=utc),
                  datetime(2026, 3, 8, 7, 0, tzinfo=utc)):  # 01:30 EST, 01:45 EST, 03:00 EDT
        sch.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                slot_id=next(s.id for s in spring if s.start == start)), STAFF)
    settings = slotengine_context.state["flow"]
    with sch.sessions() as session:
        (spring_report,) = flow_report(session, SPRING_FORWARD, settings, "NIGHT")
        (fall_report,) = flow_report(session, FALL_BACK, settings, "NIGHT")

    assert spring_report["day_hours"] == 23
    assert [w["label"] for w in spring_report["windows"]][6:9] == ["01:30 EST", "01:45 EST", "03:00 EDT"]
    assert len(spring_report["windows"]) == 12
    assert [w["arrivals"] for w in spring_report["windows"]] == [0] * 6 + [1, 1, 1] + [0] * 3
    (night,) = spring_report["providers"]
    assert (night["slot_minutes"], night["booked_minutes"], night["utilisation"], night["gap_minutes"]) == (
        180, 45, 0.25, 135)
    assert [(g["local_start"], g["local_end"]) for g in night["gaps"]] == [("00:00 EST", "01:30 EST"),
                                                                           ("03:15 EDT", "04:00 EDT")]
    # 00:00-04:00 on the fall-back night is five hours: 01:00-02:00 comes twice
    assert fall_report["day_hours"] == 25
    labels = [w["label"] for w in fall_report["windows"]]
    assert len(labels) == 20 and labels[4:8] == ["01:00 EDT", "01:15 EDT", "01:30 EDT", "01:45 EDT"]
    assert labels[8:10] == ["01:00 EST", "01:15 EST"]
    assert fall_report["providers"][0]["slot_minutes"] == 300

    chart = tmp_path / "dst.png"
    render_png([spring_report, fall_report], str(chart))
    from matplotlib.image import imread
    assert imread(str(chart)).shape[:2] == (1100, 1200)  # two locations' rows at 100 dpi


def test_a_provider_whose_slots_seat_two_is_estimated_with_two_seats(clinic, slotengine_clock, slotengine_context):
    """DRJONES's 30-minute slots seat two patients: a late start delays half as many."""
    sch = clinic.scheduler
    patients = {n: clinic.patient(n) for n in ("J0", "J1", "J2", "J3")}
    times = {"J0": "09:00", "J1": "09:00", "J2": "09:30", "J3": "09:30"}
    booked = {n: book_at(clinic, patients[n], "DRJONES", TUESDAY, t) for n, t in times.items()}
    slotengine_clock.set(at(TUESDAY, "09:05"))
    sch.arrive(booked["J1"].id, STAFF)
    slotengine_clock.set(at(TUESDAY, "09:25"))
    sch.check_in(booked["J0"].id, Actor("operator", "drjones", "pytest"))  # 25 min late, runs to 09:55
    with sch.sessions() as session:
        delay = session.scalars(select(FlowDelay)).one()
        estimates = {e["appointment_id"]: e for e in delay.estimates}
    # J1 takes the other seat at once; the 09:30 pair share 09:55 (after J0) and 09:55 (after J1)
    assert {n: estimates[booked[n].id]["estimated_local"] for n in ("J1", "J2", "J3")} == {
        "J1": "09:25", "J2": "09:55", "J3": "09:55"}
    assert "2 patients are seen at once" in delay.explanation
