"""Two daemons on one PostgreSQL database share the schedule safely.

Every sender alternates between the two nodes message by message (waiting for
each ACK), so its messages are stored by both and must still be applied in
arrival order; both nodes' reminder sweeps run against the same outbox.
"""
from __future__ import annotations

import email
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from engine.testing import postgresql_schema_url
from hl7.client import MLLPClient, check_ack
from tests.e2e.daemon import DaemonConfig, DaemonProcess, free_port
from tests.e2e.test_daemon import wait_until

pytestmark = pytest.mark.slow

SENDERS = 4
PER_SENDER = 40
PROVIDERS = ["DRSMITH", "DRJONES", "DRPATEL", "DRLEE"]


class Sink:
    def __init__(self):
        self.messages: list[email.message.Message] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


def booking(sender: int, n: int, base: datetime) -> bytes:
    start = base + timedelta(minutes=15 * n)
    end = start + timedelta(minutes=15)
    stamp = "%Y%m%d%H%M%S+0000"
    return (
        f"MSH|^~\\&|NODE{sender}|MULTI|SE|SE|20260401080000||SIU^S12^SIU_S12|M{sender}-{n}|P|2.5.1\r"
        f"SCH|M{sender}-{n}^MN|FM{sender}-{n}^MN|||||ROUTINE|NORMAL|15|min|^^15^{start:{stamp}}^{end:{stamp}}"
        f"||||||||||||||Booked\r"
        f"PID|1||MP{sender}-{n}^^^MN^MR||Patient^Multi||19700101|F|||||^NET^Internet^p{sender}-{n}@example.org\r"
        f"RGS|1|A\r"
        f"AIP|1|A|{PROVIDERS[sender]}^Provider|ATTENDING\r"
    ).encode()


def test_two_daemons_share_one_postgresql(tmp_path):
    urls = postgresql_schema_url()
    url = next(urls)
    sink = Sink()
    smtp = Controller(sink, hostname="127.0.0.1", port=free_port())
    smtp.start()
    plugin_settings = (
        f'\n[plugins.channels.email]\nhost = "127.0.0.1"\nport = {smtp.port}\nsender = "clinic@example.org"\n'
        '\n[plugins.reminders]\noffsets_hours = [24]\nsweep_seconds = 1\nquiet_start = "00:00"\nquiet_end = "00:00"\n'
        'min_lead_minutes = 0\nskip_reminders_within_hours = 0\nreply_secret = "multi-node-test-secret"\n'
    )
    nodes = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            nodes.append(DaemonProcess(DaemonConfig(directory, url, extra=plugin_settings)))
        threads = [threading.Thread(target=node.start) for node in nodes]
        for thread in threads:  # both start at once: migrations and clinic load must not collide
            thread.start()
        for thread in threads:
            thread.join(60)
        for node in nodes:
            assert node.health()[0] == 200, node.logs()[-3000:]

        base = (datetime.now(timezone.utc) + timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
        errors: list[str] = []

        def send(sender: int) -> None:
            clients = [MLLPClient("127.0.0.1", node.port("ehr"), timeout=20) for node in nodes]
            try:
                for n in range(PER_SENDER):
                    ok, code, text_ = check_ack(f"M{sender}-{n}", clients[n % 2].send(booking(sender, n, base)))
                    if not ok:
                        errors.append(f"M{sender}-{n}: {code} {text_}")
            finally:
                for client in clients:
                    client.close()

        senders = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(120)
        assert not errors, errors[:5]

        engine = create_engine(url)

        def applied() -> bool:
            with engine.connect() as connection:
                return connection.execute(text(
                    "select count(*) from inbound_messages where status = 'applied'")).scalar() == SENDERS * PER_SENDER

        wait_until(applied, timeout=90, interval=0.5)

        def reminders_done():
            with engine.connect() as connection:
                return connection.execute(text(
                    "select count(*) from outbox where status = 'pending' and due_at <= now() at time zone 'utc'"
                )).scalar() == 0

        wait_until(reminders_done, timeout=90, interval=0.5)
        time.sleep(2)  # a second sweep on either node must not send anything again
        with engine.connect() as connection:
            messages = connection.execute(text(
                "select id, sender, control_id from inbound_messages order by id")).all()
            audit = connection.execute(text(
                "select source from audit where action = 'booked' and source like 'inbound:%' order by id")).all()
            booked = connection.execute(text(
                "select provider_id, start, \"end\" from appointments where status = 'booked'")).all()
            sent = connection.execute(text("select id from outbox where status = 'sent'")).all()
        engine.dispose()
    finally:
        for node in nodes:
            node.stop()
        smtp.stop()
        try:
            next(urls)
        except StopIteration:
            pass

    # every message applied exactly once, in arrival order per sender
    assert Counter(source for (source,) in audit).most_common(1)[0][1] == 1
    assert len(audit) == SENDERS * PER_SENDER
    sender_of = {message_id: sender for message_id, sender, _cid in messages}
    per_sender = defaultdict(list)
    for (source,) in audit:
        message_id = int(source.split(":")[1])
        per_sender[sender_of[message_id]].append(message_id)
    for sender, ids in per_sender.items():
        assert ids == sorted(ids), f"{sender} applied out of order across nodes"
    # zero overlapping bookings
    by_provider = defaultdict(list)
    for provider_id, start, end in booked:
        by_provider[provider_id].append((start, end))
    for intervals in by_provider.values():
        intervals.sort()
        assert all(e1 <= s2 for (_s1, e1), (s2, _e2) in zip(intervals, intervals[1:]))
    assert len(booked) == SENDERS * PER_SENDER
    # every reminder sent once
    ids = Counter(m["Message-ID"] for m in sink.messages)
    assert sent and len(ids) == len(sent)
    assert max(ids.values()) == 1, "a message was sent twice"
