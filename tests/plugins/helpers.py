"""Real parts for plugin tests: an SMTP server (aiosmtpd) and an HTTP webhook
receiver on loopback, and shortcuts over the demo clinic."""
from __future__ import annotations

import email
import json
import socket
import threading
import time
from datetime import date, datetime, timezone
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import select, update

from engine.models import Provider, Slot
from engine.requests import Actor, BookingRequest, CoverageRecord, Identifier, PatientRecord
from engine.signing import SIGNATURE_HEADER, verify_body

WEBHOOK_SECRET = "webhook-secret-for-tests"
REPLY_SECRET = "reply-secret-for-tests"
STAFF = Actor("operator", "desk", "pytest")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    """An aiosmtpd handler that keeps every message received, and counts connections."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.connections = 0
        self.port = 0
        self._lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802 - aiosmtpd's naming
        with self._lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        with self._lock:
            self.messages.append(message)
        return "250 Message accepted"

    def to(self, address: str) -> list[email.message.EmailMessage]:
        return [m for m in self.messages if address in str(m["To"])]

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)


class WebhookSink:
    """An http.server in a thread that records every POST and checks its signature."""

    def __init__(self, secret: str):
        self.secret = secret
        self.requests: list[dict] = []
        self.status = 200
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests.append({
                    "path": self.path, "headers": dict(self.headers), "body": json.loads(body),
                    "signed": verify_body(sink.secret, body, self.headers.get(SIGNATURE_HEADER)),
                })
                self.send_response(sink.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sms"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def to(self, number: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["body"]["to"] == number]


class Clinic:
    """Shortcuts over the demo clinic of ``engine.testing`` (DRSMITH and DRJONES in
    payer network acme-ppo, DRLEE in none)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        with scheduler.sessions() as session, session.begin():
            session.execute(update(Provider).where(Provider.code.in_(["DRSMITH", "DRJONES"]))
                            .values(networks=["acme-ppo"]))
            self.providers = {code: pid for code, pid in session.execute(select(Provider.code, Provider.id))}

    def patient(self, mrn: str, *, payer: str | None = "ACME", expiry: date | None = None, **fields):
        fields.setdefault("family_name", "Doe")
        fields.setdefault("given_name", mrn.title())
        patient = self.scheduler.register_patient(
            PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], **fields), STAFF)
        if payer:
            self.scheduler.record_coverage(patient.id, CoverageRecord(
                payer_id=payer, member_id=f"M{mrn}", plan_id="PPO", effective_date=date(2025, 1, 1),
                expiry_date=expiry), STAFF)
        return patient

    def slots(self, provider: str, slot_type: str = "new_patient", *, after: datetime | None = None) -> list[Slot]:
        with self.scheduler.sessions() as session:
            stmt = select(Slot).where(Slot.provider_id == self.providers[provider], Slot.slot_type == slot_type,
                                      Slot.booked < Slot.capacity, Slot.blocked.is_(False)).order_by(Slot.start)
            if after is not None:
                stmt = stmt.where(Slot.start >= after)
            return list(session.scalars(stmt))

    def book(self, patient, provider: str = "DRSMITH", *, slot=None, slot_type: str = "new_patient",
             after: datetime | None = None, appointment_type: str | None = None, actor: Actor = STAFF):
        slot = slot or self.slots(provider, slot_type, after=after)[0]
        return self.scheduler.book(BookingRequest(patient_id=patient.id, appointment_type=appointment_type or slot_type,
                                                  slot_id=slot.id), actor)
