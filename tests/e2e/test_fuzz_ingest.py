"""Malformed input over a real socket: every input gets an answer, a refusal
names the problem in ERR, and what is already stored never changes."""
from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7.client import MLLPClient
from hl7.message import parse, split_messages
from tests.conftest import CORPUS
from tests.e2e.daemon import DaemonConfig, DaemonProcess, waiting_messages
from tests.e2e.test_daemon import wait_until

pytestmark = pytest.mark.slow

EXAMPLES = 300
SEEDS = [raw for path in sorted(CORPUS.glob("*.hl7")) for raw in split_messages(path.read_bytes())]


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    daemon = DaemonProcess(DaemonConfig(directory, f"sqlite:///{directory / 'fuzz.db'}",
                                        feeds=[{"name": "ehr", "mode": "mirror", "unknown_types": "reject"}]))
    daemon.start()
    yield daemon, directory / "fuzz.db"
    daemon.stop()


def _pending(db) -> int:
    return waiting_messages(db)


def snapshot(db):
    with sqlite3.connect(db) as connection:
        return connection.execute("select id, raw, status, ack, content_hash from inbound_messages "
                                  "where status != 'received' order by id").fetchall()


@st.composite
def malformed(draw):
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete", "dup"]))
        if not seed:
            break
        at = draw(st.integers(0, len(seed) - 1))
        if action == "flip":
            seed[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del seed[at:]
        elif action == "insert":
            seed[at:at] = draw(st.sampled_from([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b'""',
                                                b"\\X\\", b"\\Xzz\\", b"MSH|", "é".encode(), b"\xff\xfe"]))
        elif action == "delete":
            del seed[at:at + draw(st.integers(1, 40))]
        else:
            seed[at:at] = seed[at:at + draw(st.integers(1, 200))]
    if draw(st.booleans()):
        seed = bytearray(draw(st.binary(max_size=300))) + seed
    # MLLP framing bytes cannot travel inside a frame
    return bytes(seed).replace(b"\x0b", b"?").replace(b"\x1c", b"?") or b"?"


def test_malformed_messages_get_specific_answers(fuzz_daemon, record_property):
    daemon, db = fuzz_daemon
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=15)
    for raw in SEEDS:  # what is stored before the fuzzing starts
        try:
            enhanced = parse(raw).enhanced_mode
        except Exception:  # noqa: BLE001 - unparseable seeds are fuzz material only
            continue
        if not enhanced:  # (their application ACKs would interleave with the replies below)
            client.send(raw)
    wait_until(lambda: not _pending(db), timeout=60)
    before = snapshot(db)
    assert len(before) > 50
    tried = {"inputs": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(malformed())
    def one(raw):
        tried["inputs"] += 1
        replies = client.exchange(raw)  # each acknowledgement the input's MSH-15 and MSH-16 ask for
        if not replies:  # a sender that asked for none (NE, or ER and SU on their conditions)
            assert parse(raw).enhanced_mode
            return
        # a mutation may make a batch of several messages (BHS, two MSH): answered with a batch of ACKs
        acks = [ack for reply in replies
                for ack in (split_messages(reply) if reply.lstrip()[:3] in (b"FHS", b"BHS") else [reply])]
        for reply in map(parse, acks):
            msa = reply.first("MSA")
            assert msa is not None
            code = msa.value(1)
            assert code in ("AA", "AE", "AR", "CA", "CR")
            if code in ("AE", "AR", "CR"):
                tried["refused"] += 1
                errors = reply.segments_named("ERR")
                assert errors, "a refusal names the problem"
                for err in errors:
                    location = err.value(2, 1) or err.value(1, 1)
                    text = err.value(8) or err.value(3, 2) or reply.first("MSA").value(3)
                    assert location and text

    try:
        one()
    finally:
        client.close()
    record_property("inputs_tried", tried["inputs"])
    record_property("inputs_refused", tried["refused"])
    assert tried["inputs"] == EXAMPLES
    assert tried["refused"] > 0
    after = {row[0]: row for row in snapshot(db)}
    for row in before:  # stored messages are never rewritten by later input
        assert after[row[0]] == row
    assert daemon.health()[0] == 200
