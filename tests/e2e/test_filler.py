"""Filler mode through the real daemon: a placer books and cancels over MLLP
(SRM in, SRR out) and a subscriber receives the SIU stream in order."""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest

from hl7.client import MLLPClient
from hl7.framing import MLLPDecoder, frame
from hl7.message import parse
from tests.e2e.daemon import DaemonConfig, DaemonProcess, free_port
from tests.e2e.test_daemon import wait_until

pytestmark = pytest.mark.slow


class Subscriber(threading.Thread):
    """An MLLP receiver that acknowledges everything it gets, in a thread of its own."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.received: list[bytes] = []
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        async def handle(reader, writer):
            decoder = MLLPDecoder(10_000_000)
            while data := await reader.read(65536):
                for message in decoder.feed(data):
                    self.received.append(message)
                    control_id = parse(message).control_id
                    ack = f"MSH|^~\\&|SUB|SUB|SE|SE|20260101||ACK|A{control_id}|P|2.5.1\rMSA|AA|{control_id}\r"
                    writer.write(frame(ack.encode()))
                    await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()


def srm(trigger: str, control: str, placer: str, start: datetime, end: datetime) -> bytes:
    stamp = "%Y%m%d%H%M%S+0000"
    return "\r".join([
        f"MSH|^~\\&|PORTAL|HOSP|SLOTENGINE|CLINIC|20260302070000||SRM^{trigger}^SRM_S01|{control}|P|2.5.1",
        f"ARQ|{placer}^PORTAL|||||ROUTINE|ROUTINE|NORMAL|15|min|{start:{stamp}}^{end:{stamp}}",
        "PID|1||FILL1^^^HOSP^MR||Doe^Jane||19800101|F",
        "RGS|1",
        "AIP|1||DRSMITH^Smith^Ann",
    ]).encode() + b"\r"


def test_placer_books_and_cancels_subscriber_hears(tmp_path):
    subscriber = Subscriber(free_port())
    subscriber.start()
    assert subscriber.ready.wait(10)
    extra = (f'[[destinations]]\nname = "ris"\nhost = "127.0.0.1"\nport = {subscriber.port}\n'
             '[plugins.eligibility.payers.ACME-PPO]\nnetwork = "ACME-PPO"\n')
    daemon = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{tmp_path / 'filler.db'}", extra=extra,
                                        feeds=[{"name": "placer", "mode": "filler"}])).start()
    try:
        client = MLLPClient("127.0.0.1", daemon.port("placer"), timeout=15)
        # the patient and an active insurance first, or eligibility holds the booking for review
        registration = ("MSH|^~\\&|PORTAL|HOSP|SLOTENGINE|CLINIC|20260302070000||ADT^A31|R0|P|2.5.1\r"
                        "PID|1||FILL1^^^HOSP^MR||Doe^Jane||19800101|F\r"
                        "IN1|1|PPO|ACME-PPO|Acme Health||||G1||||20260101|20281231||||||||||||||||||||||M123\r")
        assert parse(client.send(registration.encode())).first("MSA").value(1) == "AA"
        monday = datetime.now(timezone.utc).date() + timedelta(days=14)
        monday -= timedelta(days=monday.weekday())
        start = datetime.combine(monday, datetime.min.time(), tzinfo=timezone.utc) + timedelta(hours=13)
        reply = parse(client.send(srm("S01", "R1", "PL1", start, start + timedelta(hours=4))))
        assert reply.message_type == "SRR" and reply.first("MSA").value(1) == "AA", reply.first("ERR")
        assert reply.first("MSA").value(2) == "R1"
        filler_id = reply.first("SCH").value(2)
        assert filler_id and reply.first("SCH").value(25) == "Booked"
        again = parse(client.send(srm("S01", "R2", "PL1", start, start + timedelta(hours=4))))
        assert again.first("SCH").value(2) == filler_id  # same placer id: not booked twice
        cancel = parse(client.send(srm("S04", "R3", "PL1", start, start + timedelta(hours=4))))
        assert cancel.first("MSA").value(1) == "AA"
        client.close()
        wait_until(lambda: len(subscriber.received) >= 2, timeout=30)
        events = [parse(m).trigger_event for m in subscriber.received]
        assert events[:2] == ["S12", "S15"]
        assert all(parse(m).first("SCH").value(2) == filler_id for m in subscriber.received[:2])
    finally:
        daemon.stop()
    from tests.e2e.test_cli import slotengine

    listed = [json.loads(line) for line in slotengine(
        "outbox", "list", "--destination", "ris", "--json", "--config", str(daemon.config.path)).stdout.splitlines()]
    assert len(listed) >= 2 and {row["status"] for row in listed} == {"sent"}
