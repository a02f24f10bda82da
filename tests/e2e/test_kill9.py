"""kill -9 under load: nothing acknowledged is lost, nothing is applied twice.

Several senders stream SIU bookings over their own connections while the
daemon is killed with SIGKILL at random moments and restarted.  A sender
whose connection breaks before the ACK resends the same message (same
control id), as a real interface engine does.  Afterwards:

* every message that received AA is stored and applied exactly once;
* each sender's messages were applied in the order they arrived;
* no provider holds overlapping bookings;
* the audit trail has exactly one booking entry per message.
"""
from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import pytest

from hl7.client import MLLPClient, check_ack
from tests.e2e.daemon import DaemonConfig, DaemonProcess, waiting_messages

pytestmark = pytest.mark.slow

SENDERS = 4
MINIMUM_PER_SENDER = 100
# Receiving is several times faster than applying: unbounded senders would leave a
# backlog of tens of thousands when the kills end. Each paces itself and stops here.
MAXIMUM_PER_SENDER = 800
PAUSE_SECONDS = 0.01
KILLS = 10
PROVIDERS = ["DRSMITH", "DRJONES", "DRPATEL", "DRLEE"]


def booking(sender: int, n: int, base: datetime = datetime(2026, 4, 1, 12, 0, tzinfo=timezone.utc)) -> bytes:
    # Each sender books its own provider, back to back, so nothing may overlap.
    start = base + timedelta(minutes=15 * n)
    end = start + timedelta(minutes=15)
    stamp = "%Y%m%d%H%M%S+0000"
    return (
        f"MSH|^~\\&|SENDER{sender}|KILLTEST|SE|SE|20260401080000||SIU^S12^SIU_S12|K{sender}-{n}|P|2.5.1\r"
        f"SCH|K{sender}-{n}^KT|FK{sender}-{n}^KT|||||ROUTINE|NORMAL|15|min|^^15^{start:{stamp}}^{end:{stamp}}"
        f"||||||||||||||Booked\r"
        f"PID|1||KP{sender}-{n}^^^KT^MR||Patient^Number{n}||19700101|M|||||^NET^Internet^k{sender}-{n}@example.org\r"
        f"RGS|1|A\r"
        f"AIP|1|A|{PROVIDERS[sender]}^Provider|ATTENDING\r"
    ).encode()


class Sender(threading.Thread):
    def __init__(self, index: int, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.index, self.port, self.stop = index, port, stop
        self.acked: list[str] = []
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = None
            n = 0
            while n < MINIMUM_PER_SENDER or (n < MAXIMUM_PER_SENDER and not self.stop.is_set()):
                control_id = f"K{self.index}-{n}"
                try:
                    if client is None:
                        client = MLLPClient("127.0.0.1", self.port, timeout=5)
                    ok, code, text = check_ack(control_id, client.send(booking(self.index, n)))
                except OSError:
                    if client is not None:
                        client.close()
                    client = None
                    self.resent += 1
                    time.sleep(0.05)
                    continue  # the daemon is down: resend the same message
                if not ok:
                    raise AssertionError(f"{control_id}: {code} {text}")
                self.acked.append(control_id)
                n += 1
                time.sleep(PAUSE_SECONDS)
            if client is not None:
                client.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_kill9_under_load_loses_nothing(tmp_path):
    db_path = tmp_path / "kill9.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db_path}")
    daemon = DaemonProcess(config).start()
    port = daemon.port("ehr")
    stop = threading.Event()
    senders = [Sender(i, port, stop) for i in range(SENDERS)]
    for sender in senders:
        sender.start()
    rng = random.Random(20261127)
    kills = 0
    try:
        while kills < KILLS:
            time.sleep(rng.uniform(0.2, 1.0))
            daemon.kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 0.3))
            daemon = DaemonProcess(config).start()
        stop.set()
        for sender in senders:
            sender.join(180)
        assert all(not s.is_alive() for s in senders), "senders did not finish"
        for sender in senders:
            assert sender.error is None, sender.error
        deadline = time.monotonic() + 180
        while (waiting := waiting_messages(db_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert waiting == 0, f"{waiting} stored messages still not applied after 180 s"
    finally:
        daemon.stop()

    assert kills >= KILLS
    with sqlite3.connect(db_path) as db:
        rows = db.execute("select id, sender, control_id, status from inbound_messages order by id").fetchall()
        audit = db.execute(
            "select id, source, entity_id from audit where action='booked' and source like 'inbound:%' order by id"
        ).fetchall()
        appointments = db.execute(
            "select provider_id, start, \"end\", conflict from appointments where status='booked'"
        ).fetchall()

    stored = defaultdict(list)
    for message_id, sender, control_id, status in rows:
        stored[control_id].append((message_id, sender, status))
    acked = [cid for s in senders for cid in s.acked]
    assert len(acked) >= SENDERS * MINIMUM_PER_SENDER
    for control_id in acked:
        assert len(stored[control_id]) == 1, f"{control_id} stored {len(stored[control_id])} times"
        assert stored[control_id][0][2] == "applied", control_id

    # applied exactly once: one booking audit entry per stored message
    per_message = defaultdict(int)
    for _audit_id, source, _entity in audit:
        per_message[int(source.split(":")[1])] += 1
    assert set(per_message.values()) == {1}
    assert len(per_message) == len(rows)

    # in order per sender: audit (commit) order follows arrival order
    by_sender = defaultdict(list)
    sender_of = {message_id: sender for message_id, sender, _c, _s in rows}
    for _audit_id, source, _entity in audit:
        message_id = int(source.split(":")[1])
        by_sender[sender_of[message_id]].append(message_id)
    for sender, message_ids in by_sender.items():
        assert message_ids == sorted(message_ids), f"{sender} applied out of order"

    # no overlapping bookings, none flagged
    assert all(not conflict for *_rest, conflict in appointments)
    by_provider = defaultdict(list)
    for provider_id, start, end, _conflict in appointments:
        by_provider[provider_id].append((start, end))
    for intervals in by_provider.values():
        intervals.sort()
        for (s1, e1), (s2, e2) in zip(intervals, intervals[1:]):
            assert e1 <= s2, "overlapping bookings"
    assert len(appointments) == len(acked)
    assert sum(s.resent for s in senders) > 0, "no sender ever had to resend: the kills missed the load"
