"""The real daemon, on real sockets, with a real SQLite file."""
from __future__ import annotations

import re
import sqlite3
import time

import pytest

from hl7.client import MLLPClient, check_ack
from hl7.message import parse, split_messages
from tests.e2e.daemon import DaemonConfig, DaemonProcess, stored_control_ids, waiting_messages

pytestmark = pytest.mark.slow

SIU = (
    "MSH|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|20260302080000||SIU^S12^SIU_S12|{cid}|P|2.5.1{enhanced}\r"
    "SCH|{placer}^EPIC|{filler}^EPIC|||||ROUTINE^Routine visit|NORMAL|15|min|^^15^20260310090000-0500^20260310091500-0500"
    "||||||||||||||Booked\r"
    "PID|1||{mrn}^^^NORTH^MR||Testperson^Alex||19800101|F\r"
    "RGS|1|A\r"
    "AIP|1|A|DRSMITH^Smith^Ann|ATTENDING\r"
)


def siu(cid: str, placer: str, mrn: str = "E2E1", enhanced: str = "") -> bytes:
    return SIU.format(cid=cid, placer=placer, filler="F" + placer, mrn=mrn, enhanced=enhanced).encode()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def db_rows(path, sql, *params):
    with sqlite3.connect(path) as connection:
        return connection.execute(sql, params).fetchall()


@pytest.fixture
def sqlite_path(tmp_path):
    return tmp_path / "e2e.db"


@pytest.fixture
def daemon(tmp_path, sqlite_path):
    process = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{sqlite_path}", log_level="DEBUG",
                                         feeds=[{"name": "ehr", "mode": "mirror"},
                                                {"name": "strict", "mode": "mirror", "ack_when": "applied",
                                                 "allowed_senders": ["EPIC^NORTHCLINIC"],
                                                 "unknown_types": "reject"}]))
    process.start()
    yield process
    process.stop()


def test_stored_before_ack_and_applied_once(daemon, sqlite_path):
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
    try:
        first = client.send(siu("C1", "P1"))
        ok, code, _ = check_ack("C1", first)
        assert ok and code == "AA"
        # the ACK left: the message must already be on disk
        assert stored_control_ids(sqlite_path, "C1") == {"C1"}
        again = client.send(siu("C1", "P1"))
        assert again == first  # a resend gets the original acknowledgement
    finally:
        client.close()
    wait_until(lambda: db_rows(sqlite_path, "select 1 from inbound_messages where control_id='C1' and status='applied'"))
    assert db_rows(sqlite_path, "select count(*) from inbound_messages where control_id='C1'") == [(1,)]
    assert db_rows(sqlite_path, "select count(*), min(status) from appointments where placer_id like 'P1%'") == [(1, "booked")]


def test_ack_after_apply_reports_mapping_errors(daemon):
    client = MLLPClient("127.0.0.1", daemon.port("strict"), timeout=10)
    try:
        ok, code, _ = check_ack("S1", client.send(siu("S1", "P2")))
        assert ok and code == "AA"
        no_sch = b"MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302080000||SIU^S12|S2|P|2.5.1\rPID|1||X1^^^N^MR\r"
        reply = client.send(no_sch)
        ok, code, text = check_ack("S2", reply)
        assert not ok and code == "AE"
        err = parse(reply).first("ERR")
        assert err is not None and err.value(2, 1) == "SCH"
        # unknown sender: refused with AR naming MSH-3
        stranger = siu("S3", "P3").replace(b"EPIC|NORTHCLINIC", b"OTHER|ELSEWHERE", 1)
        reply = client.send(stranger)
        ok, code, text = check_ack("S3", reply)
        assert code == "AR" and "not allowed" in text
        # unknown message type rejected on this feed
        orm = b"MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302080000||ORM^O01|S4|P|2.5.1\rPID|1||X1^^^N^MR\r"
        ok, code, text = check_ack("S4", client.send(orm))
        assert code == "AR"
    finally:
        client.close()


def test_enhanced_mode_commit_then_application_ack(daemon):
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
    try:
        accept = client.send(siu("E1", "P4", enhanced="|||AL|AL"))
        assert check_ack("E1", accept)[1] == "CA"
        application = client.receive()
        assert check_ack("E1", application)[1] == "AA"
    finally:
        client.close()


def test_garbage_and_oversize_never_hang(daemon):
    import socket

    with socket.create_connection(("127.0.0.1", daemon.port("ehr")), timeout=10) as sock:
        sock.sendall(b"random bytes outside any frame\x00\xff" * 10)
        sock.sendall(b"\x0bthis is not hl7\x1c\x0d")
        data = sock.recv(65536)
        assert b"MSA|AR" in data
    status, detail = daemon.health()
    assert status == 200 and detail["status"] == "ready"


def test_corpus_every_message_answered(daemon, sqlite_path, corpus_dir):
    """Every corpus file through the listener, one after another on one connection: each
    message answered as its MSH-15/16 ask, echoing its control id; AA means stored, a
    refusal names what is wrong.  Then, per file, the outcome (stored status, and the codes
    and locations of the errors of a refused or parked message) against what the mapping
    makes of it alone (tests/hl7/test_mapping.py), where the two differ for a reason named
    here.  Corpus files from one source reuse a control id for other messages: refused (AR
    205) as a real feed would be, then sent again with a control id of their own."""
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=15)
    answered = 0
    acknowledged = {}  # per file, the acknowledgements of its (last) message
    control_ids = {}  # per file, the control id it was last sent with

    def send(stem: str, raw: bytes, control_id) -> None:
        nonlocal answered
        replies = client.exchange(raw)  # each acknowledgement MSH-15 and MSH-16 ask for
        answered += 1
        acks = [parse(reply) for reply in replies]
        acknowledged[stem], control_ids[stem] = acks, control_id
        codes = [ack.first("MSA").value(1) for ack in acks]
        assert set(codes) <= {"AA", "AE", "AR", "CA", "CR"}, (stem, codes)
        if control_id:
            assert all(ack.first("MSA").value(2) == control_id for ack in acks), stem
        refusals = [ack for ack, code in zip(acks, codes) if code in ("AR", "CR")]
        if refusals:
            assert refusals[0].segments_named("ERR"), stem
        elif replies:  # stored, whatever applying it made of it (AE)
            assert stored_control_ids(sqlite_path, control_id), stem
        else:  # asked for no acknowledgement (NE/NE): nothing tells when it is stored
            wait_until(lambda: stored_control_ids(sqlite_path, control_id), timeout=10)

    try:
        for path in sorted(corpus_dir.glob("*.hl7")):
            for raw in split_messages(path.read_bytes()):
                try:
                    control_id = parse(raw).control_id
                except Exception:  # noqa: BLE001 - unparseable ones must still be answered
                    control_id = None
                send(path.stem, raw, control_id)
        reused = reused_control_ids(corpus_dir)
        refused_as_reused = {stem for stem, acks in acknowledged.items()
                             if any(_err_codes(ack) == ["205 MSH^1^10"] for ack in acks)}
        # a sender that asked for no accept acknowledgement (MSH-15 NE) is not told either
        assert reused - refused_as_reused == {stem for stem in reused if not acknowledged[stem] and parse(
            split_messages((corpus_dir / f"{stem}.hl7").read_bytes())[-1]).accept_ack_type.upper() == "NE"}
        assert refused_as_reused <= reused
        for stem in sorted(reused):
            raw = split_messages((corpus_dir / f"{stem}.hl7").read_bytes())[-1]
            message = parse(raw)
            unique = f"{message.control_id}-{stem}"
            send(stem, raw.replace(f"|{message.control_id}|".encode(), f"|{unique}|".encode(), 1), unique)
    finally:
        client.close()
    assert answered >= 130
    wait_until(lambda: waiting_messages(sqlite_path) == 0, timeout=60)
    outcomes = corpus_outcomes(corpus_dir, sqlite_path, acknowledged, control_ids)
    expected = expected_corpus_outcomes(corpus_dir)
    different = {stem: (outcomes.get(stem), want) for stem, want in expected.items() if outcomes.get(stem) != want}
    assert not different, "\n".join(f"{stem}: got {got}, expected {want}" for stem, (got, want) in different.items())
    missing = {stem: lacking for stem, (status, _codes) in outcomes.items()
               if status == "applied" and (lacking := records_missing(corpus_dir / f"{stem}.hl7", sqlite_path))}
    assert not missing, missing
    parked = db_rows(sqlite_path, "select control_id, error from inbound_messages where status='parked'")
    for _cid, error in parked:
        assert error, "a parked message says why"
    # privacy: no patient data from the corpus in the daemon's logs (run at DEBUG)
    log_lines = daemon.logs().splitlines()
    assert log_lines and all(line.startswith("{") for line in log_lines)
    patterns = [re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])")
                for value in corpus_patient_data(corpus_dir)]
    leaks = {p.pattern for p in patterns for line in log_lines if p.search(line)}
    assert not leaks, f"patient data in the logs: {sorted(leaks)[:10]}"


def corpus_patient_data(corpus_dir) -> set[str]:
    """Names, identifiers, birth dates, phones and streets from every PID in the
    corpus, read with a plain split so that the check does not trust our parser."""
    values, control_ids = set(), set()
    for path in corpus_dir.glob("*.hl7"):
        text = path.read_bytes().decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
        for segment in text.split("\r"):
            segment = segment.strip().lstrip("\ufeff")
            if segment.startswith("MSH|") and len(segment.split("|")) > 9:
                control_ids.add(segment.split("|")[9])
            if not segment.startswith("PID|"):
                continue
            fields = segment.split("|")
            def part(index, component=0):
                if index >= len(fields):
                    return ""
                return fields[index].split("~")[0].split("^")[component] if component < len(
                    fields[index].split("~")[0].split("^")) else ""
            for index, component in ((3, 0), (5, 0), (5, 1), (7, 0), (11, 0), (13, 0)):
                value = part(index, component).strip()
                if len(value) >= 5 and value != '""':
                    values.add(value)
    # a few synthetic messages reuse their control id as the patient id; control ids are logged
    return values - control_ids


def test_sigterm_drains_and_exits_zero(tmp_path, sqlite_path):
    process = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{sqlite_path}")).start()
    client = MLLPClient("127.0.0.1", process.port("ehr"), timeout=10)
    acked = []
    try:
        for n in range(50):
            ok, _code, _ = check_ack(f"T{n}", client.send(siu(f"T{n}", f"PT{n}", mrn=f"M{n}")))
            if ok:
                acked.append(f"T{n}")
    finally:
        client.close()
    started = time.monotonic()
    assert process.terminate(30) == 0
    assert time.monotonic() - started < 15
    stored = {row[0] for row in db_rows(sqlite_path, "select control_id from inbound_messages")}
    assert set(acked) <= stored
    lines = [line for line in process.logs().splitlines() if line.startswith("{")]
    assert any('"stopped"' in line for line in lines)
    assert all(re.match(r"^\{.*\}$", line) for line in lines)


def test_validating_feed_refuses_what_hl7apy_refuses(tmp_path, corpus_dir):
    daemon = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{tmp_path / 'validate.db'}", clinic=False,
                                        feeds=[{"name": "checked", "mode": "mirror", "validate": True}])).start()
    try:
        client = MLLPClient("127.0.0.1", daemon.port("checked"), timeout=15)
        valid = (corpus_dir / "rethink__ADT_A01__1.hl7").read_bytes()
        assert check_ack(parse(valid).control_id, client.send(valid))[1] == "AA"
        invalid = (corpus_dir / "msfhirconv__SIU_S12__1.hl7").read_bytes()
        reply = parse(client.send(invalid))
        assert reply.first("MSA").value(1) == "AE"
        assert "hl7apy" in reply.first("ERR").value(8)
        client.close()
    finally:
        daemon.stop()


#: What the listener refuses of the corpus before the mapping sees it; tests/hl7/test_mapping.py's
#: EXPECTED says what the mapping makes of the rest, each file on a schedule of its own.
REFUSED_AT_RECEIPT = {
    # MSH-10 (required) missing, the MSH cut short before it or the field empty: no key to
    # deduplicate by, nor a control id for the sender to match the ACK to (kept, refused)
    "bugs5382__ADT_A03__1": ("refused", ("101 MSH^1^10",)),
    "hl7v2ig__ADT_A04__2": ("refused", ("101 MSH^1^10",)),
    "hl7v2ig__ADT_A04__3": ("refused", ("101 MSH^1^10",)),
}
#: Where one file after another through one daemon differs from each file alone.
IN_SEQUENCE: dict[str, tuple[str, tuple[str, ...]]] = {
    # Every msfhirconv SIU names appointment 12345.  msfhirconv__SIU_S15__1 cancels it and
    # S17__1 deletes it; the state machine then refuses discontinuing it, a no-show, and (the
    # __2 files come last, resent with control ids of their own) booking or moving it again.
    "msfhirconv__SIU_S16__1": ("parked", ("207 MSH^1^9",)),
    "msfhirconv__SIU_S26__1": ("parked", ("207 MSH^1^9",)),
    "msfhirconv__SIU_S13__2": ("parked", ("207 SCH^1^25",)),
    "msfhirconv__SIU_S14__2": ("parked", ("207 SCH^1^25",)),
    "msfhirconv__SIU_S15__2": ("parked", ("207 MSH^1^9",)),
    "msfhirconv__SIU_S16__2": ("parked", ("207 MSH^1^9",)),
    "msfhirconv__SIU_S26__2": ("parked", ("207 MSH^1^9",)),
}


def expected_corpus_outcomes(corpus_dir) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per file: the stored status, and for a refused or parked message the codes and
    locations of its errors; an applied message's warnings are not stored (the mapping's
    own test checks them)."""
    from tests.hl7.test_mapping import EXPECTED

    status = {"applied": "applied", "error": "parked", "skipped": "skipped"}
    expected = {stem: (status[outcome], found if outcome == "error" else ())
                for stem, (outcome, found) in EXPECTED.items()}
    expected.update(REFUSED_AT_RECEIPT)
    expected.update(IN_SEQUENCE)
    return {stem: expected.get(stem, ("?", ())) for stem in sorted(p.stem for p in corpus_dir.glob("*.hl7"))}


def corpus_outcomes(corpus_dir, sqlite_path, acknowledged, control_ids) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per corpus file, what the daemon made of its (last) message: refused, with the ERR
    codes of the refusal it answered; else the status stored, with the codes of a parked
    message's errors (``code SEG^sequence^field^component``)."""
    outcomes = {}
    for path in sorted(corpus_dir.glob("*.hl7")):
        refusal = next((ack for ack in acknowledged[path.stem] if ack.first("MSA").value(1) in ("AR", "CR")), None)
        if refusal is not None:
            outcomes[path.stem] = ("refused", tuple(_err_codes(refusal)))
            continue
        message = parse(split_messages(path.read_bytes())[-1])
        rows = db_rows(sqlite_path, "select status, error from inbound_messages where sender = ? and control_id = ? "
                                    "and status != 'refused'",
                       f"{message.sending_application}^{message.sending_facility}", control_ids[path.stem])
        status, error = rows[0] if rows else ("not stored", "")
        outcomes[path.stem] = (status, tuple(re.findall(r"(?:^|; )(\d{3} [A-Z][A-Z0-9]{2}(?:\^\d+)*): ", error))
                                        if status == "parked" else ())
    return outcomes


def records_missing(path, sqlite_path) -> list[str]:
    """What an applied file's message should have left in the schedule and did not: a
    patient for each PID-3 identifier of an ADT that registers patients (not a merge, whose
    merged identifiers move), an appointment for an SIU's placer or filler id."""
    message = parse(split_messages(path.read_bytes())[-1])
    kind, event = message.message_type.upper(), message.trigger_event.upper()
    lacking = []
    if kind == "ADT" and event in ("A01", "A04", "A05", "A08", "A28", "A31"):
        for pid in message.segments_named("PID"):
            for rep in range(1, len(pid.repetitions(3)) + 1):
                value = pid.value(3, 1, 1, rep).strip()
                if value and not db_rows(sqlite_path, "select 1 from patient_identifiers where value = ?", value):
                    lacking.append(f"patient {value}")
    if kind == "SIU" and (sch := message.first("SCH")) is not None:
        ids = [i for i in (sch.value(1), sch.value(2)) if i]
        if ids and not any(db_rows(sqlite_path, "select 1 from appointments where placer_id = ? or placer_id like ? "
                                                "or filler_id = ? or filler_id like ?", i, i + "^%", i, i + "^%")
                           for i in ids):
            lacking.append(f"appointment {'/'.join(ids)}")
    return lacking


def reused_control_ids(corpus_dir) -> set[str]:
    """The files whose (MSH-3, MSH-4, MSH-10) an earlier file (in name order) used for another message."""
    from hl7.store import content_hash

    first_seen, reused = {}, set()
    for path in sorted(corpus_dir.glob("*.hl7")):
        for raw in split_messages(path.read_bytes()):
            try:
                message = parse(raw)
            except Exception:  # noqa: BLE001 - no key
                continue
            if not message.control_id:
                continue
            key = (message.sending_application, message.sending_facility, message.control_id)
            digest = content_hash(raw, message.delimiters.field.encode())
            if first_seen.setdefault(key, digest) != digest:
                reused.add(path.stem)
    return reused


def _err_codes(ack) -> list[str]:
    found = []
    for err in ack.segments_named("ERR"):
        if err.value(3):  # v2.5 on: ERR-2 location (segment, sequence, field, repetition, component), ERR-3 code
            location, code = [err.value(2, n) for n in (1, 2, 3, 5)], err.value(3)
            if err.value(4) not in ("E", "W"):
                continue
        else:  # before: ERR-1 (segment, sequence, field, code)
            location, code = [err.value(1, n) for n in (1, 2, 3)], err.value(1, 4)
        while location and location[-1] in ("", "0"):
            location.pop()
        found.append(f"{code} {'^'.join(location)}")
    return found


def test_a_batch_in_one_frame_is_answered_with_a_batch(daemon, sqlite_path):
    """FHS/BHS with several messages in one frame: each stored (or refused) on its own,
    the acknowledgements returned in order in the batch's own envelope."""
    refused = siu("B2", "PB2").replace(b"SIU^S12^SIU_S12", b"")  # no MSH-9
    batch = (b"FHS|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|20260302080000||||FILE7\r"
             b"BHS|^~\\&|EPIC|NORTHCLINIC|SLOTENGINE|SE|20260302080000||||BATCH7\r"
             + siu("B1", "PB1", mrn="BAT1") + refused + siu("B3", "PB3", mrn="BAT3")
             + b"BTS|3\rFTS|1\r")
    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
    try:
        reply = client.send(batch)
    finally:
        client.close()
    segments = [segment.split(b"|") for segment in reply.strip(b"\r").split(b"\r")]
    assert [s[0] for s in segments] == [b"FHS", b"BHS", b"MSH", b"MSA", b"MSH", b"MSA", b"ERR", b"MSH", b"MSA",
                                        b"BTS", b"FTS"]
    fhs, bhs = segments[0], segments[1]
    assert (fhs[2:6], fhs[11]) == ([b"SLOTENGINE", b"SE", b"EPIC", b"NORTHCLINIC"], b"FILE7")  # swapped, echoed
    assert (bhs[2:6], bhs[11]) == ([b"SLOTENGINE", b"SE", b"EPIC", b"NORTHCLINIC"], b"BATCH7")
    assert [s[1:3] for s in segments if s[0] == b"MSA"] == [[b"AA", b"B1"], [b"AR", b"B2"], [b"AA", b"B3"]]
    assert segments[6][2].startswith(b"MSH^1^9") and segments[-2:] == [[b"BTS", b"3"], [b"FTS", b"1"]]
    assert stored_control_ids(sqlite_path, "B1") and stored_control_ids(sqlite_path, "B3")
    wait_until(lambda: db_rows(sqlite_path, "select 1 from appointments where placer_id = 'PB3^EPIC'"), timeout=30)


@pytest.mark.parametrize("feed", ["ehr", "strict"])  # acknowledged when stored, and when applied
def test_header_warnings_travel_in_the_positive_acknowledgement(daemon, sqlite_path, feed):
    """A message accepted despite a header problem (MSH-11 missing) is told so: AA with an
    ERR of severity W naming the field."""
    client = MLLPClient("127.0.0.1", daemon.port(feed), timeout=10)
    try:
        reply = parse(client.send(siu("W1", "PW1").replace(b"|W1|P|2.5.1", b"|W1||2.5.1", 1)))
    finally:
        client.close()
    assert reply.first("MSA").value(1) == "AA"
    [err] = reply.segments_named("ERR")
    assert ([err.value(2, n) for n in (1, 2, 3)], err.value(3), err.value(4)) == (["MSH", "1", "11"], "101", "W")
    assert stored_control_ids(sqlite_path, "W1")
