"""Mirror mode closes the loop, through the real daemon.

The EHR owns the calendars (feed ``ehr`` in mirror mode, ``requests_to =
"ehr-srm"``).  A fake EHR here is both ends of it: an MLLP client sending its
SIUs to the daemon, and the MLLP server behind ``[[destinations]] ehr-srm``
that answers each SRM with an SRR on the same connection.  The EHR books and
cancels a visit; the freed slot is offered to a waitlisted patient by e-mail;
the patient accepts over ``POST /waitlist/reply``; what the waitlist wants is
*asked* of the EHR (SRM^S01), and counts only once the EHR's own SIU says so
-- or is given back when the EHR refuses.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from datetime import date, datetime, timedelta, timezone
from typing import Callable, Optional

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import select

from engine.calendar import to_local
from engine.clinic import load_clinic
from engine.db import make_engine, make_session_factory
from engine.models import Appointment, OutboxItem, Provider, Slot, WaitlistEntry, WaitlistOffer
from engine.requests import Actor, CoverageRecord, Identifier, PatientRecord
from engine.schema import upgrade
from engine.service import Scheduler
from hl7.client import MLLPClient
from hl7.framing import MLLPDecoder, frame
from hl7.message import parse
from tests.e2e.daemon import REPO, DaemonConfig, DaemonProcess, free_port
from tests.e2e.test_cli import slotengine
from tests.e2e.test_daemon import wait_until
from tests.plugins.helpers import SmtpSink

pytestmark = pytest.mark.slow

REPLY_SECRET = "mirror-requests-reply-secret"
HTTP_TOKEN = "mirror-requests-http-token"  # the patient portal relays replies with it
TZ = "America/New_York"
STAFF = Actor("operator", "pytest")
WAITING_EMAIL = "waiting.patient@example.org"


# --- the EHR ------------------------------------------------------------------------------------


class FakeEhr(threading.Thread):
    """The EHR's SRM endpoint: answers each request with ``answer(srm)`` -- an SRR
    built by :meth:`accept` or :meth:`refuse` -- on the connection it came on,
    and keeps every message it received."""

    def __init__(self, answer: Callable[["FakeEhr", bytes], bytes]):
        super().__init__(daemon=True)
        self.port = free_port()
        self.answer = answer
        self.received: list[bytes] = []
        self.ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

        async def handle(reader, writer):
            decoder = MLLPDecoder(10_000_000)
            try:
                while data := await reader.read(65536):
                    for message in decoder.feed(data):
                        self.received.append(message)
                        writer.write(frame(self.answer(self, message)))
                        await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await self._stopping.wait()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(5)

    @staticmethod
    def _head(srm: bytes, code: str) -> list[str]:
        control_id = parse(srm).control_id
        return [f"MSH|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE||{datetime.now(timezone.utc):%Y%m%d%H%M%S}||"
                f"SRR^{parse(srm).trigger_event}^SRR_S01|R{control_id}|P|2.5.1",
                f"MSA|{code}|{control_id}"]

    def accept(self, srm: bytes, filler_id: Optional[str]) -> bytes:
        """AA, with the SCH of the appointment as the EHR will book it (our placer id
        echoed in SCH-1, the EHR's own id in SCH-2) -- or, with no ``filler_id``,
        a bare acknowledgement (the SCH group of an SRR is optional)."""
        arq = parse(srm).first("ARQ")
        placer = f"{arq.value(1)}^{arq.value(1, 2)}"
        sch = [f"SCH|{placer}|{filler_id}|||||NEW^New patient|NORMAL|15|min" + "|" * 14 + "Booked"] if filler_id else []
        return "\r".join(self._head(srm, "AA") + sch).encode() + b"\r"

    def refuse(self, srm: bytes, why: str) -> bytes:
        err = f"ERR||ARQ^1^11|207^Application internal error^HL70357|E||SLOT_TAKEN||{why}"
        return "\r".join(self._head(srm, "AE") + [err]).encode() + b"\r"


def ehr_siu(trigger: str, control_id: str, *, placer: str, filler: str, mrn: str, name: str, start: datetime,
            minutes: int = 15, status: str = "Booked") -> bytes:
    """An SIU as the EHR sends it: times in the clinic's wall-clock time with their offset."""
    begin, end = to_local(start, TZ), to_local(start + timedelta(minutes=minutes), TZ)
    stamp = "%Y%m%d%H%M%S%z"
    return "\r".join([
        f"MSH|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|{datetime.now(timezone.utc):%Y%m%d%H%M%S}||"
        f"SIU^{trigger}^SIU_S12|{control_id}|P|2.5.1",
        f"SCH|{placer}|{filler}|||||NEW^New patient|NORMAL|{minutes}|min|"
        f"^^{minutes}^{begin:{stamp}}^{end:{stamp}}" + "|" * 14 + status,
        f"PID|1||{mrn}^^^NORTH^MR||{name}||19800101|F",
        "RGS|1|A",
        "AIP|1|A|DRSMITH^Smith^Ann|ATTENDING",
        "AIL|1|A|MAIN",
    ]).encode() + b"\r"


def send_to_feed(daemon: DaemonProcess, message: bytes) -> None:
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=15)
    try:
        ack = parse(client.send(message))
    finally:
        client.close()
    assert ack.first("MSA").value(1) == "AA", ack.first("ERR")


def strict(er7: bytes):
    """hl7apy v2.5.1 reads the message with strict validation and finds nothing wrong."""
    message = parse_message(er7.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate()
    return message


# --- the clinic, prepared before the daemon starts ----------------------------------------------------


class Clinic:
    """The database the daemon will use: demo clinic, slots, a waitlisted patient
    (with an e-mail address and a valid insurance); read back while it runs."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.scheduler = Scheduler(self.sessions)
        with self.sessions() as session, session.begin():
            load_clinic(session, REPO / "config" / "demo-clinic.toml")
        today = datetime.now(timezone.utc).date()
        self.scheduler.expand_templates(today, today + timedelta(days=21))
        with self.sessions() as session:
            self.smith = session.scalar(select(Provider.id).where(Provider.code == "DRSMITH"))
            # a new-patient morning slot a week or more ahead: well inside the waitlist's horizon
            self.slot = session.scalars(select(Slot).where(
                Slot.provider_id == self.smith, Slot.slot_type == "new_patient",
                Slot.start >= datetime.now(timezone.utc) + timedelta(days=7)).order_by(Slot.start)).first()
            session.expunge(self.slot)
        patient = self.scheduler.register_patient(PatientRecord(
            identifiers=[Identifier("WAIT1", "NORTH", "MR")], family_name="Waiting", given_name="Wanda",
            email=WAITING_EMAIL, language="en"), STAFF)
        self.scheduler.record_coverage(patient.id, CoverageRecord(
            payer_id="ACME-PPO", member_id="M-WAIT1", plan_id="PPO", effective_date=date(2025, 1, 1),
            expiry_date=date(2030, 12, 31)), STAFF)
        self.patient_id = patient.id
        self.entry_id = self.scheduler.add_to_waitlist(
            patient_id=patient.id, appointment_type="new_patient", duration_minutes=15, actor=STAFF,
            provider_id=self.smith, reason="wants an earlier visit").id

    def get(self, model, ident):
        with self.sessions() as session:
            row = session.get(model, ident)
            session.expunge_all()
            return row

    def offers(self) -> list[WaitlistOffer]:
        with self.sessions() as session:
            rows = list(session.scalars(select(WaitlistOffer).order_by(WaitlistOffer.id)))
            session.expunge_all()
            return rows

    def outbox(self, channel: str) -> list[OutboxItem]:
        with self.sessions() as session:
            rows = list(session.scalars(select(OutboxItem).where(OutboxItem.channel == channel)
                                        .order_by(OutboxItem.id)))
            session.expunge_all()
            return rows

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def clinic(slotengine_database_url):
    """On a SQLite file, or a fresh PostgreSQL schema with ``--slotengine-db=postgresql``."""
    prepared = Clinic(slotengine_database_url)
    yield prepared
    prepared.close()


def start_daemon(tmp_path, clinic: Clinic, ehr: FakeEhr, smtp_sink: SmtpSink) -> DaemonProcess:
    extra = f"""
[[destinations]]
name = "ehr-srm"
host = "127.0.0.1"
port = {ehr.port}

[plugins.channels.email]
host = "127.0.0.1"
port = {smtp_sink.port}
sender = "clinic@example.org"

[plugins.waitlist_fill]
clinic_name = "Main Street Clinic"
reply_secret = "{REPLY_SECRET}"
channels = ["email"]
quiet_start = "00:00"
quiet_end = "00:00"
sweep_seconds = 1

[plugins.eligibility.payers.ACME-PPO]
network = "ACME-PPO"
"""
    config = DaemonConfig(tmp_path, clinic.url, extra=extra,
                          feeds=[{"name": "ehr", "mode": "mirror", "requests_to": "ehr-srm"}])
    return DaemonProcess(config, env={"SLOTENGINE_HTTP_TOKEN": HTTP_TOKEN}).start()


def offer_the_freed_slot(daemon: DaemonProcess, clinic: Clinic, smtp_sink: SmtpSink) -> tuple[WaitlistOffer, str]:
    """The EHR books a visit into the slot and cancels it; the slot goes to the waitlist by e-mail."""
    start = clinic.slot.start
    visit = {"placer": "EPICP1^EPIC", "filler": "EPICF1^EPIC", "mrn": "OTHER1", "name": "Other^Otto", "start": start}
    send_to_feed(daemon, ehr_siu("S12", "E1", **visit))
    booked = wait_until(lambda: _appointment_by_filler(clinic, "EPICF1^EPIC"))
    wait_until(lambda: clinic.get(Appointment, booked.id).status == "booked")
    assert clinic.get(Slot, clinic.slot.id).booked == 1
    send_to_feed(daemon, ehr_siu("S15", "E2", **visit, status="Cancelled"))
    [offer] = wait_until(lambda: clinic.offers())
    assert (offer.status, offer.waitlist_id, offer.slot_id) == ("offered", clinic.entry_id, clinic.slot.id)
    assert clinic.get(Appointment, booked.id).status == "cancelled"
    smtp_sink.wait_for(1, timeout=20)
    [mail] = smtp_sink.to(WAITING_EMAIL)
    token = re.search(r"To take it or pass: (\S+)", mail.get_content()).group(1)
    return offer, token


def _appointment_by_filler(clinic: Clinic, filler_id: str) -> Optional[Appointment]:
    with clinic.sessions() as session:
        row = session.scalars(select(Appointment).where(Appointment.filler_id == filler_id)).first()
        session.expunge_all()
        return row


def reply(daemon: DaemonProcess, token: str, answer: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.config.http_port}/waitlist/reply",
                                     data=json.dumps({"token": token, "answer": answer}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {HTTP_TOKEN}"}, method="POST")
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 200
        return json.loads(response.read())


def check_srm(raw: bytes, clinic: Clinic, trigger: str, placer_id: str) -> None:
    """Valid v2.5.1 (hl7apy, strict); asks for our placer id at the slot's start."""
    assert strict(raw).name == "SRM_S01"
    srm = parse(raw)
    assert srm.message_type == "SRM" and srm.trigger_event == trigger
    arq = srm.first("ARQ")
    assert (arq.value(1), arq.value(1, 2)) == (placer_id, "SLOTENGINE")
    requested = to_local(clinic.slot.start, TZ)
    assert arq.value(11) == requested.strftime("%Y%m%d%H%M%S%z")
    assert arq.value(9) == "15" and arq.value(10) == "min"
    assert srm.first("PID").value(3) == "WAIT1"
    assert srm.first("AIP").value(3) == "DRSMITH"


# --- the proofs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("srr_filler_id", ["EHR-4471^EPIC", None], ids=["srr-names-its-id", "bare-srr"])
def test_the_ehr_accepts_and_its_siu_confirms_the_waitlist_booking(tmp_path, clinic, smtp_sink, srr_filler_id):
    ehr = FakeEhr(lambda ehr, srm: ehr.accept(srm, srr_filler_id))
    ehr.start()
    assert ehr.ready.wait(10)
    daemon = start_daemon(tmp_path, clinic, ehr, smtp_sink)
    try:
        offer, token = offer_the_freed_slot(daemon, clinic, smtp_sink)

        answered = reply(daemon, token, "yes")
        assert answered["result"] == "requested" and answered["owner"] == "ehr-srm"
        held = clinic.get(Appointment, answered["appointment_id"])
        assert held.status == "held" and held.placer_id.startswith("SE-")
        assert (held.patient_id, held.start) == (clinic.patient_id, clinic.slot.start)

        [srm] = wait_until(lambda: list(ehr.received))
        check_srm(srm, clinic, "S01", held.placer_id)
        [asked] = wait_until(lambda: [r for r in clinic.scheduler.change_requests(appointment_id=held.id)
                                      if r.status != "pending"])
        # the EHR said yes; the booking does not count until its schedule says so
        assert asked.status == "accepted" and asked.kind == "book" and asked.owner == "ehr-srm"
        assert asked.detail == {"waitlist_offer_id": offer.id}
        assert "ehr-srm answered AA" in asked.outcome
        still = clinic.get(Appointment, held.id)
        assert still.status == "held" and still.filler_id == srr_filler_id
        assert clinic.get(WaitlistOffer, offer.id).status == "requested"
        assert clinic.get(WaitlistEntry, clinic.entry_id).status == "waiting"
        [sent] = clinic.outbox("mllp:ehr-srm")
        assert (sent.kind, sent.status, sent.payload["ack_code"]) == ("srm", "sent", "AA")

        # the EHR books it, echoing our placer id and giving its own filler id (which we may not know yet)
        arq = parse(srm).first("ARQ")
        send_to_feed(daemon, ehr_siu("S12", "E3", placer=f"{arq.value(1)}^{arq.value(1, 2)}",
                                     filler="EHR-4471^EPIC", mrn="WAIT1", name="Waiting^Wanda",
                                     start=clinic.slot.start))
        wait_until(lambda: clinic.get(Appointment, held.id).status == "booked")
        [confirmed] = clinic.scheduler.change_requests(appointment_id=held.id)
        assert confirmed.status == "confirmed" and confirmed.decided_at is not None
        assert "ehr-srm booked the appointment" in confirmed.outcome
        wait_until(lambda: clinic.get(WaitlistEntry, clinic.entry_id).status == "booked")
        assert clinic.get(WaitlistOffer, offer.id).status == "accepted"
        booked = clinic.get(Appointment, held.id)
        assert (booked.placer_id, booked.filler_id, booked.conflict) == (held.placer_id, "EHR-4471^EPIC", "")
        with clinic.sessions() as session:  # one appointment in that time, not a copy beside the hold
            assert session.scalars(select(Appointment.id).where(
                Appointment.start == clinic.slot.start, Appointment.status == "booked")).all() == [held.id]
        assert clinic.get(Slot, clinic.slot.id).booked == 1

        # the EHR heard of its calendar through our request only: one SRM, no SIU
        assert [parse(m).message_type for m in ehr.received] == ["SRM"]
        assert [item.kind for item in clinic.outbox("mllp:ehr-srm")] == ["srm"]
    finally:
        daemon.stop()
        ehr.stop()
    logs = daemon.logs()
    assert [said for said in ("WAIT1", "Waiting", "Wanda", "OTHER1", "Otto", WAITING_EMAIL) if said in logs] == []

    # what the operator sees: the request, why it was made, and how the owner settled it
    config = str(daemon.config.path)
    listed = slotengine("requests", "list", "--json", "--config", config).stdout.splitlines()
    [row] = [json.loads(line) for line in listed]
    assert (row["kind"], row["status"], row["owner"], row["appointment_id"]) == ("book", "confirmed", "ehr-srm",
                                                                                 held.id)
    assert row["requester"] == {"waitlist_offer_id": offer.id} and row["outcome"] == "ehr-srm booked the appointment"
    assert row["requested_local"] == to_local(clinic.slot.start, TZ).isoformat() and row["provider"] == "DRSMITH"
    assert row["requested_start"] == clinic.slot.start.isoformat() and row["decided_at"] is not None
    assert row["actor"] == f"patient:{clinic.patient_id}"
    assert slotengine("requests", "list", "--status", "pending", "--config", config).stdout.strip() == "(none)"
    missing = slotengine("requests", "list", "--appointment", "99999", "--config", config, check=False)
    assert missing.returncode == 1 and "no appointment 99999" in missing.stderr and "Traceback" not in missing.stderr


def test_the_ehr_refuses_and_the_held_time_is_given_back(tmp_path, clinic, smtp_sink):
    ehr = FakeEhr(lambda ehr, srm: ehr.refuse(srm, "Slot already taken in Cadence"))
    ehr.start()
    assert ehr.ready.wait(10)
    daemon = start_daemon(tmp_path, clinic, ehr, smtp_sink)
    try:
        offer, token = offer_the_freed_slot(daemon, clinic, smtp_sink)

        answered = reply(daemon, token, "yes")
        assert answered["result"] == "requested"
        held_id = answered["appointment_id"]
        [srm] = wait_until(lambda: list(ehr.received))
        check_srm(srm, clinic, "S01", clinic.get(Appointment, held_id).placer_id)

        [refused] = wait_until(lambda: [r for r in clinic.scheduler.change_requests(appointment_id=held_id)
                                        if r.status != "pending"])
        assert refused.status == "refused"
        assert refused.outcome == "ehr-srm answered AE: Slot already taken in Cadence"
        released = clinic.get(Appointment, held_id)
        assert released.status == "cancelled" and released.filler_id is None
        assert clinic.get(Slot, clinic.slot.id).booked == 0  # free again
        wait_until(lambda: clinic.get(WaitlistOffer, offer.id).status == "refused")
        assert clinic.get(WaitlistEntry, clinic.entry_id).status == "waiting"
        [item] = clinic.outbox("mllp:ehr-srm")
        assert (item.kind, item.status, item.attempts, item.payload["ack_code"]) == ("srm", "refused", 1, "AE")
        assert [parse(m).message_type for m in ehr.received] == ["SRM"]  # an answer is not retried
    finally:
        daemon.stop()
        ehr.stop()
    listed = slotengine("requests", "list", "--appointment", str(held_id), "--status", "refused",
                        "--config", str(daemon.config.path)).stdout.splitlines()
    assert listed[0].split()[:5] == ["ID", "KIND", "STATUS", "OWNER", "APPOINTMENT_ID"]
    assert listed[1].split()[1:5] == ["book", "refused", "ehr-srm", str(held_id)]
    assert listed[1].endswith("ehr-srm answered AE: Slot already taken in Cadence")
