"""Recall and preventive care: rules, tickets, the daily job, bookings closing tickets,
against the real engine, a real SMTP server and a real SMS webhook on loopback."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select

from engine.calendar import local_to_utc
from engine.jobs import build_job_scheduler
from engine.plugin_host import BUILTIN_PLUGINS, PluginHost
from engine.models import OutboxItem, Patient, PatientFlag, RecallTicket
from engine.requests import Actor, BookingRequest, ExternalAppointment, Identifier, PatientRecord
from hl7.mapping import apply_message
from hl7.message import parse
from plugins import recall
from plugins.recall import Interval, Rule, Visit, Visits, add_months, age_on, judge, local_midnight, parse_interval
from tests.plugins.helpers import REPLY_SECRET, STAFF

TZ = "America/New_York"
RULES = {
    "annual_wellness": {"reasons": ["*wellness*"], "interval": "12 months", "if_never": "wait",
                        "label": "your yearly check-up"},
    "mammogram": {"reasons": ["*mammo*"], "interval": "24 months", "sex": ["F"], "age": [50, 74],
                  "label": "a screening visit"},
    "diabetic_eye": {"reasons": ["*eye exam*", "*retina*"], "interval": "1 year",
                     "flags": ["icd10:E10*", "icd10:E11*"], "label": "an eye check"},
    "post_procedure": {"types": ["follow_up"], "after_types": ["procedure"], "interval": "6 weeks", "lead_days": 7,
                       "grace_days": 14, "notice_days": 7, "label": "your follow-up visit"},
}
#: What each visit is called in these tests: (appointment type, reason).
VISITS = {"wellness": ("general", "Annual wellness visit"), "mammogram": ("general", "Screening mammogram"),
          "eye_exam": ("general", "Diabetic eye exam"), "procedure": ("procedure", "Knee arthroscopy"),
          "follow_up": ("follow_up", "Post-op check")}
RECALL = {"clinic_name": "Main Street Clinic", "booking_url": "https://portal.example.org/book",
          "phone": "+1 555 0100", "reply_secret": REPLY_SECRET, "horizon_days": 10, "run_at": "10:00",
          "rules": RULES}


@pytest.fixture
def slotengine_plugins() -> PluginHost:
    """The built-ins recall works with, registered as in production."""
    return PluginHost(discover=False, builtins=[(name, module) for name, module in BUILTIN_PLUGINS
                                                if name in ("eligibility", "reminders", "recall", "notices", "channels")])


@pytest.fixture
def slotengine_plugin_settings(slotengine_plugin_settings):
    return {**slotengine_plugin_settings, "recall": RECALL}


@pytest.fixture
def scheduler(slotengine_scheduler, slotengine_context):
    slotengine_scheduler.expand_templates(date(2026, 3, 16), date(2026, 4, 30))
    return slotengine_scheduler


def at(day: date, hour: int = 10) -> datetime:
    """The daily run's time on ``day``, clinic-local."""
    return local_to_utc(day, time(hour), TZ)


def patient(scheduler, mrn: str, **fields) -> Patient:
    fields.setdefault("family_name", "Doe")
    fields.setdefault("given_name", mrn.title())
    return scheduler.register_patient(PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], **fields), STAFF)


_visits = iter(range(1, 10_000))


def past_visit(scheduler, who: Patient, kind: str, day: date, provider: str = "DRSMITH"):
    """A visit the EHR reports as done (mirror mode), on ``day`` at 09:00 clinic time."""
    from engine.models import Provider
    with scheduler.sessions() as session:
        provider_id = session.scalar(select(Provider.id).where(Provider.code == provider))
        location_id = session.get(Provider, provider_id).location_id
    start = local_to_utc(day, time(9), TZ)
    appointment_type, reason = VISITS[kind]
    return scheduler.record_external_appointment(ExternalAppointment(
        status="completed", start=start, end=start + timedelta(minutes=30), appointment_type=appointment_type,
        reason=reason,
        placer_id=f"PAST-{next(_visits)}", patient_id=who.id, provider_id=provider_id, location_id=location_id),
        STAFF)


def book(scheduler, who: Patient, kind: str, after: datetime, slot_type: str = "new_patient"):
    from engine.models import Slot
    with scheduler.sessions() as session:
        slot = session.scalars(select(Slot).where(Slot.slot_type == slot_type, Slot.start >= after,
                                                  Slot.booked < Slot.capacity).order_by(Slot.start)).first()
    appointment_type, reason = VISITS[kind]
    return scheduler.book(BookingRequest(patient_id=who.id, appointment_type=appointment_type, reason=reason,
                                         slot_id=slot.id), STAFF)


def tickets(scheduler) -> dict[tuple[str, str], RecallTicket]:
    """Tickets by (patient's given name, rule)."""
    with scheduler.sessions() as session:
        rows = session.execute(select(RecallTicket, Patient.given_name)
                               .join(Patient, Patient.id == RecallTicket.patient_id)).all()
        return {(name, t.rule): t for t, name in rows}


def recall_texts(smtp_sink, webhook_sink, email: str = "", phone: str = "") -> list[str]:
    mails = [m for m in smtp_sink.to(email) if str(m["Subject"]).startswith("Time to book")] if email else []
    texts = [r["text"] for r in webhook_sink.to(phone) if r["kind"] == "recall"] if phone else []
    return [m.get_content() for m in mails] + texts


# --- the scenario ----------------------------------------------------------------------------------


def test_a_recall_cohort_is_contacted_escalated_and_closed(scheduler, slotengine_clock, slotengine_jobs,
                                                           smtp_sink, webhook_sink):
    s = scheduler
    ann = patient(s, "ANN", sex="F", birth_date=date(1970, 5, 10), email="ann@example.org")  # e-mail only
    bob = patient(s, "BOB", sex="M", birth_date=date(1965, 1, 5), email="bob@example.org",
                  phones=[{"number": "+15550002", "use": "CP"}], preferred_channel="sms")
    cat = patient(s, "CAT", sex="F", birth_date=date(1980, 6, 1), email="cat@example.org",
                  phones=[{"number": "+15550003", "use": "CP"}])
    dan = patient(s, "DAN", sex="M", birth_date=date(1955, 2, 2), phones=[{"number": "+15550004", "use": "CP"}])
    eve = patient(s, "EVE", sex="F", birth_date=date(1963, 7, 7), email="eve@example.org")
    fay = patient(s, "FAY", sex="F", birth_date=date(1990, 9, 9), email="fay@example.org")
    hal = patient(s, "HAL", sex="F", birth_date=date(1968, 3, 3), email="hal@example.org")
    ned = patient(s, "NED", sex="M", birth_date=date(1950, 1, 1), email="ned@example.org", deceased=True)
    gus = patient(s, "GUS", sex="M", birth_date=date(1985, 4, 4), email="gus@example.org")
    dup = patient(s, "GUS-DUP", sex="M", birth_date=date(1985, 4, 4), email="gus@example.org", given_name="Dup")
    past_visit(s, ann, "wellness", date(2025, 3, 20))       # due 2026-03-20: window open
    past_visit(s, ann, "mammogram", date(2025, 1, 10))      # due 2027: not yet
    past_visit(s, bob, "eye_exam", date(2025, 2, 1))        # overdue since 2026-02-01
    past_visit(s, cat, "wellness", date(2025, 4, 1))        # due 2026-04-01: opens 2026-02-16
    past_visit(s, dan, "eye_exam", date(2025, 1, 15))
    past_visit(s, ned, "eye_exam", date(2025, 1, 15))
    past_visit(s, fay, "procedure", date(2026, 1, 20), provider="DRJONES")  # follow-up due 2026-03-03
    past_visit(s, hal, "mammogram", date(2024, 4, 15))      # due 2026-04-15: window 2026-03-16, beyond the horizon
    past_visit(s, dup, "wellness", date(2025, 3, 25))
    for who in (bob, dan, ned):
        s.set_patient_flags(who.id, ["icd10:E11.9"], STAFF, source="hl7:DG1")
    s.set_patient_flags(eve.id, ["opt_out:recall"], STAFF, source="hl7:PD1-11")
    s.set_patient_flags(gus.id, ["icd10:J45.909"], STAFF, source="hl7:DG1")
    s.set_patient_flags(dup.id, ["icd10:J45.909", "icd10:Z87.891"], STAFF, source="hl7:DG1")

    # day 1 --------------------------------------------------------------------------------------
    slotengine_clock.set(at(date(2026, 3, 2)))
    outcome = slotengine_jobs.run("recall.daily")
    assert outcome.startswith("ok: 10 patients judged, 8 opened, 6 contacted, 1 suppressed, 1 waiting"), outcome
    t = tickets(s)
    assert set(t) == {("Ann", "annual_wellness"), ("Bob", "diabetic_eye"), ("Cat", "annual_wellness"),
                      ("Dan", "diabetic_eye"), ("Eve", "mammogram"), ("Fay", "post_procedure"),
                      ("Hal", "mammogram"), ("Dup", "annual_wellness")}
    assert t["Ann", "annual_wellness"].status == "contacted" and t["Ann", "annual_wellness"].channels_used == ["email"]
    assert t["Bob", "diabetic_eye"].channels_used == ["sms"]  # his preference
    assert t["Eve", "mammogram"].status == "suppressed"
    assert t["Eve", "mammogram"].reason == "the patient opted out of recall messages"
    assert t["Hal", "mammogram"].status == "open"
    assert t["Hal", "mammogram"].reason.startswith("waiting: the visit window opens 2026-03-16, after the last "
                                                   "bookable day 2026-03-12")
    assert t["Fay", "post_procedure"].due_date == date(2026, 3, 3)
    wellness = t["Ann", "annual_wellness"]
    assert (wellness.due_date, wellness.window_start, wellness.window_end) == (
        date(2026, 3, 20), date(2026, 2, 18), date(2026, 5, 19))
    assert "12 months after appointment" in wellness.history[0]["reason"]
    assert wellness.anchor_appointment_id is not None
    mail = recall_texts(smtp_sink, webhook_sink, email="ann@example.org")
    assert len(mail) == 1 and "your yearly check-up" in mail[0] and "https://portal.example.org/book?recall=" in mail[0]
    sms = recall_texts(smtp_sink, webhook_sink, phone="+15550002")
    assert len(sms) == 1 and sms[0].startswith("Main Street Clinic: it is time to book an eye check")
    assert "E11" not in sms[0] and "diabet" not in sms[0].lower()
    assert not recall_texts(smtp_sink, webhook_sink, email="eve@example.org")
    assert not recall_texts(smtp_sink, webhook_sink, email="ned@example.org")

    # the same day again contacts nobody
    sent_before = (len(smtp_sink.messages), len(webhook_sink.requests))
    again = slotengine_jobs.run("recall.daily")
    assert again == "ok: 10 patients judged; 0 recall messages sent", again
    assert (len(smtp_sink.messages), len(webhook_sink.requests)) == sent_before

    # day 2: Gus's duplicate record is merged into him; the ticket follows with its history
    slotengine_clock.set(at(date(2026, 3, 3), 8))
    s.merge_patients(gus.id, dup.id, STAFF, "duplicate")
    gus_ticket = tickets(s)["Gus", "annual_wellness"]
    assert gus_ticket.contacts == 1 and gus_ticket.history[-1]["event"] == "moved"
    with s.sessions() as session:  # the flags moved with the merge, none twice
        assert sorted(session.execute(select(PatientFlag.patient_id, PatientFlag.flag).where(
            PatientFlag.flag.like("icd10:%"), PatientFlag.patient_id.in_([gus.id, dup.id]))).all()) == [
            (gus.id, "icd10:J45.909"), (gus.id, "icd10:Z87.891")]
    # Dan dies; his ticket is suppressed at once
    s.register_patient(PatientRecord(identifiers=[Identifier("DAN", "HOSP", "MR")], deceased=True), STAFF)
    assert tickets(s)["Dan", "diabetic_eye"].status == "suppressed"

    # day 3: Bob books his eye exam, Fay her follow-up: their tickets close
    slotengine_clock.set(at(date(2026, 3, 4), 11))
    bob_visit = book(s, bob, "eye_exam", at(date(2026, 3, 9)))
    fay_visit = book(s, fay, "follow_up", at(date(2026, 3, 9)), slot_type="follow_up")
    t = tickets(s)
    assert t["Bob", "diabetic_eye"].status == "closed"
    assert t["Bob", "diabetic_eye"].closed_by_appointment_id == bob_visit.id
    assert t["Bob", "diabetic_eye"].reason == f"appointment {bob_visit.id} (general) held for review for 2026-03-09"
    assert t["Fay", "post_procedure"].status == "closed"
    assert t["Fay", "post_procedure"].closed_by_appointment_id == fay_visit.id

    # day 4: Bob cancels before the visit: his ticket reopens and he is asked again on the next run
    slotengine_clock.set(at(date(2026, 3, 5), 9))
    s.cancel(bob_visit.id, Actor("patient", str(bob.id)), "cannot come")
    assert tickets(s)["Bob", "diabetic_eye"].status == "open"
    assert tickets(s)["Bob", "diabetic_eye"].reason == f"reopened: appointment {bob_visit.id} was cancelled"
    slotengine_clock.set(at(date(2026, 3, 5)))
    assert "1 contacted" in slotengine_jobs.run("recall.daily")
    assert len(recall_texts(smtp_sink, webhook_sink, phone="+15550002")) == 2

    # day 7 (after the change to summer time): Hal's window comes within the horizon
    slotengine_clock.set(at(date(2026, 3, 8)))
    assert "1 contacted" in slotengine_jobs.run("recall.daily")
    assert tickets(s)["Hal", "mammogram"].status == "contacted"

    # day 15: no bookings from Ann, Cat and Gus: the next step
    slotengine_clock.set(at(date(2026, 3, 16)))
    slotengine_jobs.run("recall.daily")
    t = tickets(s)
    assert t["Cat", "annual_wellness"].status == "escalated"
    assert t["Cat", "annual_wellness"].channels_used == ["email", "sms"]  # another channel
    assert len(recall_texts(smtp_sink, webhook_sink, phone="+15550003")) == 1
    ann_ticket = t["Ann", "annual_wellness"]  # e-mail only: the second channel is skipped, staff are asked
    assert ann_ticket.status == "escalated" and ann_ticket.step == 3
    assert [h["event"] for h in ann_ticket.history][-2:] == ["step skipped", "escalated"]
    assert ann_ticket.reason == "step 3: staff (front_desk) asked to call the patient"
    slotengine_jobs.run("notices.send")
    desk = [m for m in smtp_sink.to("desk@clinic.example.org") if "Recall" in str(m["Subject"])]
    assert sorted(m.get_content().split(" is due")[0] for m in desk) == ["Doe, Ann (MR ANN)", "Doe, Gus (MR GUS)"]
    # the survivor's history counted: e-mailed once (as the duplicate), then staff, never e-mailed twice
    assert t["Gus", "annual_wellness"].status == "escalated" and t["Gus", "annual_wellness"].channels_used == ["email"]
    assert len(recall_texts(smtp_sink, webhook_sink, email="gus@example.org")) == 1
    assert t["Dan", "diabetic_eye"].contacts == 1 and t["Dan", "diabetic_eye"].status == "suppressed"
    assert t["Eve", "mammogram"].contacts == 0

    # day 29: Cat is escalated to staff; later she books, the ticket closes
    slotengine_clock.set(at(date(2026, 3, 30)))
    slotengine_jobs.run("recall.daily")
    assert tickets(s)["Cat", "annual_wellness"].reason == "step 3: staff (front_desk) asked to call the patient"
    visit = book(s, cat, "wellness", at(date(2026, 4, 6)))
    cat_ticket = tickets(s)["Cat", "annual_wellness"]
    assert cat_ticket.status == "closed" and cat_ticket.closed_by_appointment_id == visit.id
    assert [h["event"] for h in cat_ticket.history] == ["opened", "contacted", "escalated", "escalated", "closed"]
    assert len(recall_texts(smtp_sink, webhook_sink, email="eve@example.org")) == 0
    dan_texts = recall_texts(smtp_sink, webhook_sink, phone="+15550004")
    assert len(dan_texts) == 1  # only the one before he died


def test_a_completed_visit_restarts_the_interval(scheduler, slotengine_clock, slotengine_jobs):
    s = scheduler
    ann = patient(s, "ANN", sex="F", birth_date=date(1970, 5, 10), email="ann@example.org")
    first = past_visit(s, ann, "wellness", date(2025, 3, 10))
    slotengine_clock.set(at(date(2026, 3, 2)))
    slotengine_jobs.run("recall.daily")
    assert tickets(s)["Ann", "annual_wellness"].anchor_appointment_id == first.id
    done = past_visit(s, ann, "wellness", date(2026, 2, 27))  # the EHR tells us late about a visit
    slotengine_jobs.run("recall.daily")
    ticket = tickets(s)["Ann", "annual_wellness"]
    assert ticket.status == "closed" and ticket.closed_by_appointment_id == done.id
    assert ticket.reason == f"appointment {done.id} (general) done for 2026-02-27"


def test_stop_reply_opts_the_patient_out(scheduler, slotengine_clock, slotengine_jobs, slotengine_routes,
                                         webhook_sink):
    s = scheduler
    bob = patient(s, "BOB", sex="M", birth_date=date(1965, 1, 5), phones=[{"number": "+15550002", "use": "CP"}])
    past_visit(s, bob, "eye_exam", date(2025, 2, 1))
    s.set_patient_flags(bob.id, ["icd10:E11.65"], STAFF, source="hl7:DG1")
    slotengine_clock.set(at(date(2026, 3, 2)))
    slotengine_jobs.run("recall.daily")
    token = next(r["body"]["reply_token"] for r in webhook_sink.requests if r["body"]["kind"] == "recall")
    assert slotengine_routes("POST", "/recall/reply", {"token": "forged.token", "text": "STOP"})[0] == 403
    status, body = slotengine_routes("POST", "/recall/reply", {"token": token, "text": "STOP"})
    assert (status, body["opted_out"]) == (200, True)
    ticket = tickets(s)["Bob", "diabetic_eye"]
    assert ticket.status == "suppressed" and ticket.reason == "the patient opted out of recall messages"
    with s.sessions() as session:
        assert session.scalar(select(PatientFlag.source).where(PatientFlag.flag == "opt_out:recall")) == "patient reply"


def test_a_message_queued_before_the_opt_out_is_not_sent(scheduler, slotengine_clock, slotengine_context,
                                                         slotengine_jobs, smtp_sink):
    s = scheduler
    ann = patient(s, "ANN", sex="F", birth_date=date(1970, 5, 10), email="ann@example.org")
    past_visit(s, ann, "wellness", date(2025, 3, 20))
    slotengine_clock.set(at(date(2026, 3, 2)))
    counts = recall.judge_patients(slotengine_context, recall._settings(slotengine_context), slotengine_clock.now())
    counts += recall.contact_due(slotengine_context, recall._settings(slotengine_context), slotengine_clock.now())
    assert counts["contacted"] == 2  # her wellness visit, and a first mammogram (never had one, aged 55)
    s.set_patient_flags(ann.id, ["opt_out:reminder", "opt_out:recall"], STAFF, source="hl7:PD1-11",
                        replace_source=True)
    assert slotengine_jobs.run("recall.send") == "ok: 0 recall messages sent"
    with s.sessions() as session:
        items = session.scalars(select(OutboxItem).where(OutboxItem.kind == "recall")).all()
        assert {(i.status, i.last_error) for i in items} == {("skipped", "the recall ticket is suppressed")}
    assert {t.reason for t in tickets(s).values()} == {"the patient opted out of recall messages"}
    assert smtp_sink.to("ann@example.org") == []


# --- HL7: PID-29/30, PD1-11, DG1 -------------------------------------------------------------------


MSH = "MSH|^~\\&|EHR|CLINIC|SLOT|SLOT|20260301120000||ADT^A08^ADT_A01|{control}|P|2.5.1"


def adt(control: str, pid: str, *more: str):
    return parse("\r".join([MSH.format(control=control), "EVN|A08|202603011200", pid, *more]).encode())


def apply(scheduler, message, message_id: int):
    with scheduler.sessions() as session:
        with session.begin():
            view = scheduler.within(session)
            result = apply_message(view, message, mode="mirror", message_id=message_id)
        view.notify_committed()
    return result


def test_adt_carries_death_opt_outs_and_diagnoses(scheduler):
    pid = "PID|1||R-1^^^HOSP^MR||Roe^Rita||19600101|F"
    result = apply(scheduler, adt("1", pid, "PD1|||||||||||05", "DG1|1||E11.9^Type 2 diabetes^I10",
                                  "DG1|2||I10^Hypertension^ICD10"), 1)
    assert result.warnings == []
    patient_id = scheduler.find_patient([Identifier("R-1", "HOSP", "MR")]).id

    def flags():
        with scheduler.sessions() as session:
            return dict(session.execute(select(PatientFlag.flag, PatientFlag.source)
                                        .where(PatientFlag.patient_id == patient_id)).all())

    assert flags() == {"opt_out:recall": "hl7:PD1-11", "opt_out:voice": "hl7:PD1-11",
                       "icd10:E11.9": "hl7:DG1", "icd10:I10": "hl7:DG1"}
    # PD1-11 stated again replaces its own flags; a diagnosis stays when a later message leaves it out
    apply(scheduler, adt("2", pid, "PD1|||||||||||02", "DG1|1||J06.9^URI^I10"), 2)
    assert flags() == {"icd10:E11.9": "hl7:DG1", "icd10:I10": "hl7:DG1", "icd10:J06.9": "hl7:DG1"}
    apply(scheduler, adt("3", pid + "|" * 21 + "202602281530|Y"), 3)  # PID-29, PID-30
    with scheduler.sessions() as session:
        rita = session.get(Patient, patient_id)
        assert rita.deceased and rita.deceased_at == datetime(2026, 2, 28, 20, 30, tzinfo=timezone.utc)
    warned = apply(scheduler, adt("4", pid, "PD1|||||||||||N"), 4)
    assert [w.field for w in warned.warnings] == [11]


# --- settings, jobs, CLI ------------------------------------------------------------------------------


def test_settings_are_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"\[plugins.recall.rules.x\].interval"):
        recall.parse_settings({"rules": {"x": {"types": ["a"], "interval": "yearly"}}}, TZ, secret=False)
    with pytest.raises(ValueError, match=r"\[plugins.recall.rules.x\].age"):
        recall.parse_settings({"rules": {"x": {"types": ["a"], "interval": "1 year", "age": [74, 50]}}}, TZ,
                              secret=False)
    with pytest.raises(ValueError, match=r"\[plugins.recall\].escalation\[1\].via"):
        recall.parse_settings({"escalation": [{"via": "sms"}, {"via": "pigeon"}]}, TZ, secret=False)
    with pytest.raises(ValueError, match=r"unknown settings colour"):
        recall.parse_settings({"colour": "red"}, TZ, secret=False)
    parsed = recall.parse_settings({"rules": {"fu": {"types": ["follow_up"], "after_types": ["procedure"],
                                                     "interval": "6 weeks"}}}, TZ, secret=False)
    assert parsed.rules["fu"].if_never == "wait" and parsed.rules["fu"].interval == Interval(days=42)


def test_the_daily_run_is_at_clinic_local_time_across_dst(slotengine_context):
    jobs = build_job_scheduler(slotengine_context)
    trigger = jobs.get_job("recall.daily").trigger
    before = datetime(2026, 3, 7, 16, 0, tzinfo=timezone.utc)
    fires = []
    for _ in range(3):
        before = trigger.get_next_fire_time(None, before)
        fires.append(before.astimezone(timezone.utc))
        before += timedelta(seconds=1)
    assert fires == [datetime(2026, 3, 8, 14, 0, tzinfo=timezone.utc), datetime(2026, 3, 9, 14, 0, tzinfo=timezone.utc),
                     datetime(2026, 3, 10, 14, 0, tzinfo=timezone.utc)]
    assert trigger.get_next_fire_time(None, datetime(2026, 3, 6, 16, 0, tzinfo=timezone.utc)) == \
        datetime(2026, 3, 7, 10, 0, tzinfo=ZoneInfo(TZ))


def test_cli_lists_tickets_with_their_reasons(scheduler, slotengine_clock, slotengine_jobs, slotengine_database_url,
                                              tmp_path):
    ann = patient(scheduler, "ANN", sex="F", birth_date=date(1970, 5, 10), email="ann@example.org")
    past_visit(scheduler, ann, "wellness", date(2025, 3, 20))
    slotengine_clock.set(at(date(2026, 3, 2)))
    slotengine_jobs.run("recall.daily")
    config = tmp_path / "slotengine.toml"
    rules = "\n".join(f"[plugins.recall.rules.{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in rule.items())
                      for name, rule in RULES.items())
    config.write_text(f'[database]\nurl = "{slotengine_database_url}"\n[clinic]\ntimezone = "{TZ}"\n'
                      f'[plugins.recall]\nreply_secret = "x"\n{rules}\n')
    run = subprocess.run([sys.executable, "-m", "hl7.cli", "recall", "list", "--config", str(config), "--json",
                          "--status", "contacted"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {row["rule"]: row for row in map(json.loads, run.stdout.splitlines())}
    assert set(rows) == {"annual_wellness", "mammogram"}
    row = rows["annual_wellness"]
    assert (row["rule"], row["status"], row["due"], row["contacts"], row["channels"]) == (
        "annual_wellness", "contacted", "2026-03-20", 1, "email")
    assert row["rule_detail"]["interval"] == "12 months" and row["reason"].startswith("step 1: asked by email")
    assert [h["event"] for h in row["history"]] == ["opened", "contacted"]
    table = subprocess.run([sys.executable, "-m", "hl7.cli", "recall", "list", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "annual_wellness" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "hl7.cli", "recall", "list", "--config", str(config),
                          "--status", "lost"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


# --- the arithmetic ------------------------------------------------------------------------------------


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 12, 31)), st.integers(min_value=0, max_value=600))
def test_adding_months_keeps_the_day_or_ends_the_month(day, months):
    later = add_months(day, months)
    assert (later.year * 12 + later.month) - (day.year * 12 + day.month) == months
    assert later.day == day.day or (later.day < day.day and (later + timedelta(days=1)).day == 1)


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)),
       st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)))
def test_age_is_whole_years_since_the_birthday(birth, day):
    if day < birth:
        return
    age = age_on(birth, day)
    assert add_months(birth, 12 * age) <= day
    assert day < add_months(birth, 12 * (age + 1)) or (birth.month, birth.day) == (2, 29)


@hypothesis_settings(max_examples=200)
@given(st.dates(min_value=date(2020, 1, 1), max_value=date(2035, 12, 31)),
       st.sampled_from(["America/New_York", "Europe/London", "Australia/Sydney", "America/Santiago", "Asia/Kolkata"]))
def test_local_midnight_starts_that_local_day(day, tz):
    instant = local_midnight(day, tz)
    assert instant.tzinfo is not None
    assert instant.astimezone(ZoneInfo(tz)).date() == day
    assert (instant - timedelta(hours=3)).astimezone(ZoneInfo(tz)).date() < day


@given(st.dates(min_value=date(2000, 1, 1), max_value=date(2030, 12, 31)),
       st.sampled_from(["12 months", "24 months", "6 weeks", "1 year", "42 days"]),
       st.integers(min_value=0, max_value=90), st.integers(min_value=0, max_value=90),
       st.integers(min_value=0, max_value=60), st.integers(min_value=-800, max_value=800))
def test_the_due_window_surrounds_the_due_date(last_visit, interval, lead, grace, notice, offset):
    rule = Rule(name="r", visits=Visits(("general",)), interval=parse_interval(interval, "x"), after=Visits(("general",)),
                if_never="due", lead_days=lead, grace_days=grace, notice_days=notice)
    start = datetime.combine(last_visit, time(14), tzinfo=timezone.utc)
    today = last_visit + timedelta(days=offset)
    verdict = judge(rule, sex="F", birth_date=None, flags=(), today=today,
                    visits=[Visit(1, "general", "completed", start, last_visit)])
    due = rule.interval.after(last_visit)
    assert verdict.due == due
    assert verdict.state == ("due" if today >= due - timedelta(days=lead + notice) else "waiting")
    assert verdict.window_start == due - timedelta(days=lead) <= due <= verdict.window_end
    assert verdict.window_end == due + timedelta(days=grace)


def test_eligibility_reasons():
    mammogram = recall.parse_rule("mammogram", RULES["mammogram"], {"lead_days": 30, "grace_days": 60,
                                                                     "notice_days": 14,
                                                                     "escalation": recall.DEFAULT_ESCALATION})
    today = date(2026, 3, 2)
    young = judge(mammogram, sex="F", birth_date=date(1976, 8, 31), flags=(), visits=(), today=today)
    assert young.state == "waiting" and young.due == date(2026, 8, 31)  # her 50th birthday
    assert "age 50 reached on 2026-08-31" in young.reason
    old = judge(mammogram, sex="F", birth_date=date(1951, 1, 1), flags=(), visits=(), today=today)
    assert old.state == "ineligible" and old.reason.startswith("aged 75 on the due date 2026-03-02")
    assert judge(mammogram, sex="M", birth_date=date(1960, 1, 1), flags=(), visits=(), today=today).state == "ineligible"
    assert judge(mammogram, sex="F", birth_date=None, flags=(), visits=(), today=today).reason.startswith(
        "birth date unknown")
    eye = recall.parse_rule("eye", RULES["diabetic_eye"], {"lead_days": 30, "grace_days": 60, "notice_days": 14,
                                                          "escalation": recall.DEFAULT_ESCALATION})
    assert judge(eye, sex="M", birth_date=None, flags=["icd10:J06.9"], visits=(), today=today).state == "ineligible"
    assert judge(eye, sex="M", birth_date=None, flags=["ICD10:E10.1"], visits=(), today=today).state == "due"
