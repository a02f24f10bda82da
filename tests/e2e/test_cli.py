"""The ``slotengine`` command line, run as a user runs it."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.e2e.daemon import DaemonConfig, DaemonProcess
from tests.e2e.test_daemon import db_rows, siu, wait_until

pytestmark = pytest.mark.slow


def slotengine(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hl7.cli", *args], capture_output=True, text=True,
                            cwd=cwd, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"slotengine {' '.join(args)} -> {result.returncode}\n{result.stderr}")
    return result


def test_check_config_names_file_line_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[database]\nurl = "sqlite:///x.db"\n\n[[feeds]]\nname = "ehr"\nlisten = "nowhere"\ncolour = 1\n')
    result = slotengine("check-config", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{config}:6: feeds[0].listen" in result.stderr
    assert f"{config}:7: feeds[0].colour: unknown key" in result.stderr
    serve = slotengine("serve", "--config", str(config), check=False)
    assert serve.returncode == 2 and "feeds[0].listen" in serve.stderr and "Traceback" not in serve.stderr


def test_demo_configuration_is_valid():
    result = slotengine("check-config")
    assert "OK" in result.stdout


def test_daemon_refuses_an_old_schema(tmp_path):
    from engine.db import make_engine
    from engine.schema import upgrade

    db = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    engine.dispose()
    process = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{db}", clinic=False))
    with pytest.raises(RuntimeError) as failure:
        process.start()
    assert "Run: slotengine db upgrade" in str(failure.value)


def test_sqlite_file_is_private(tmp_path):
    db = tmp_path / "private.db"
    process = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{db}", clinic=False)).start()
    process.stop()
    mode = stat.S_IMODE(os.stat(db).st_mode)
    assert mode == 0o600, oct(mode)


def test_operator_commands_end_to_end(tmp_path):
    db = tmp_path / "ops.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db}")
    daemon = DaemonProcess(config).start()
    try:
        good = tmp_path / "good.hl7"
        good.write_bytes(siu("OP1", "POP1", mrn="OPS1").replace(b"\r", b"\n") + b"\n" +
                         siu("OP2", "POP2", mrn="OPS2").replace(b"\r", b"\n"))
        sent = slotengine("send", "--port", str(daemon.port("ehr")), str(good))
        assert sent.stdout.count("ok ") == 2
        bad = tmp_path / "bad.hl7"
        bad.write_bytes(b"MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302||SIU^S12|OP3|P|2.5.1\rPID|1||X^^^N^MR\r")
        strict = slotengine("send", "--port", str(daemon.port("ehr")), str(bad), "--json")
        assert json.loads(strict.stdout)["code"] == "AA"  # stored; applying it will fail
        wait_until(lambda: db_rows(db, "select 1 from inbound_messages where control_id='OP3' and status='parked'"))
        unreachable = slotengine("send", "--port", "1", str(good), check=False)
        assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr
    finally:
        daemon.stop()

    common = ["--config", str(config.path)]
    listing = slotengine("messages", "list", "--status", "parked", "--json", *common)
    parked = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [m["control_id"] for m in parked] == ["OP3"] and "SCH" in parked[0]["error"]
    shown = json.loads(slotengine("messages", "show", str(parked[0]["id"]), "--json", *common).stdout)
    assert shown["raw"].startswith("MSH|")
    slotengine("messages", "replay", str(parked[0]["id"]), "--operator", "alice", *common)
    assert db_rows(db, "select actor, action from audit where action='message_replayed'") == [("operator:alice", "message_replayed")]

    appointments = [json.loads(line) for line in
                    slotengine("appointments", "list", "--json", *common).stdout.splitlines()]
    assert {a["placer_id"] for a in appointments} >= {"POP1^EPIC", "POP2^EPIC"} or \
        {a["placer_id"] for a in appointments} >= {"POP1", "POP2"}
    assert all(a["hl7_status"] == "Booked" for a in appointments)
    # 09:00 at -0500 is 10:00 clinic time: New York is on daylight time since March 8
    assert appointments[0]["local_start"].startswith("2026-03-10T10:00:00-04:00")

    patient = json.loads(slotengine("patients", "show", "OPS1", "--json", *common).stdout)
    assert patient["identifiers"][0]["value"] == "OPS1"
    missing = slotengine("patients", "show", "NOPE", *common, check=False)
    assert missing.returncode == 1 and "no patient" in missing.stderr

    slots = [json.loads(line) for line in slotengine(
        "slots", "find", "--provider", "DRSMITH", "--type", "new_patient", "--from", "2027-01-04", "--json",
        *common).stdout.splitlines()]
    assert slots and all(s["provider"] == "DRSMITH" for s in slots)
    table = slotengine("slots", "find", "--specialty", "cardiology", "--gender", "F", "--from", "2027-01-04", *common)
    assert "LOCAL_START" in table.stdout
    unknown = slotengine("slots", "find", "--provider", "DRWHO", *common, check=False)
    assert unknown.returncode == 1 and "unknown provider" in unknown.stderr


def test_stopped_feed_waits_for_the_operator(tmp_path):
    db = tmp_path / "stop.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db}", feeds=[{"name": "ehr", "mode": "mirror", "on_error": "stop"}])
    daemon = DaemonProcess(config).start()
    try:
        from hl7.client import MLLPClient

        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        client.send(b"MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302||SIU^S12|ST1|P|2.5.1\rPID|1||X^^^N^MR\r")
        client.send(siu("ST2", "PST2", mrn="ST2"))
        client.close()
        wait_until(lambda: db_rows(db, "select status from inbound_messages where control_id='ST1'") == [("parked",)])
        time.sleep(1.5)  # the next message of that sender must wait
        assert db_rows(db, "select status from inbound_messages where control_id='ST2'") == [("received",)]
        parked = db_rows(db, "select id from inbound_messages where control_id='ST1'")[0][0]
        slotengine("messages", "skip", str(parked), "--reason", "EHR will resend", "--operator", "bob",
                   "--config", str(config.path))
        wait_until(lambda: db_rows(db, "select status from inbound_messages where control_id='ST2'") == [("applied",)])
        assert db_rows(db, "select actor, reason from audit where action='message_skipped'") == [
            ("operator:bob", "EHR will resend")]
    finally:
        daemon.stop()


def test_messages_still_in_the_inbox_are_listed_and_applied_at_the_next_start(tmp_path):
    """As after a kill -9 between the ACK and the move: the daemon is down, the
    message is only in the SQLite inbox; operators see it, and the next start applies it."""
    from datetime import datetime, timezone

    from engine.metrics import Metrics
    from hl7.daemon import prepare_database
    from hl7.store import RECEIVED, Inbox, Incoming, MessageStore, content_hash
    from tests.e2e.daemon import waiting_messages

    db = tmp_path / "inbox.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db}")
    config.write()
    common = ["--config", str(config.path)]
    slotengine("messages", "list", *common)  # creates and migrates the database
    engine = prepare_database(f"sqlite:///{db}")
    raw = siu("IN1", "PIN1", mrn="INBOX1")
    store = MessageStore(None, Metrics(), Inbox(db))
    [stored] = store.store_batch([Incoming("ehr", "EPIC^NORTHCLINIC", "IN1", "SIU^S12", "127.0.0.1",
                                           datetime.now(timezone.utc), raw, RECEIVED, b"ACK", content_hash(raw))])
    store.inbox.close()
    engine.dispose()

    listing = [json.loads(line) for line in
               slotengine("messages", "list", "--status", "received", "--json", *common).stdout.splitlines()]
    assert [(m["id"], m["control_id"], m["status"]) for m in listing] == [(stored.message_id, "IN1", "received")]
    shown = json.loads(slotengine("messages", "show", str(stored.message_id), "--json", *common).stdout)
    assert shown["raw"].startswith("MSH|") and shown["status"] == "received"

    daemon = DaemonProcess(config).start()
    try:
        wait_until(lambda: waiting_messages(db) == 0)
    finally:
        daemon.stop()
    assert db_rows(db, "select id, status from inbound_messages where control_id='IN1'") == [
        (stored.message_id, "applied")]
    assert db_rows(db, "select count(*) from appointments where placer_id like 'PIN1%'") == [(1,)]


def test_send_follows_msh15_and_msh16_and_reports_every_message(tmp_path):
    """Each message's acknowledgements as MSH-15/16 ask, read without losing step with the
    next message; LF files sent with CR endings; refusals and a silent peer fail loudly."""
    db = tmp_path / "send.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db}", feeds=[{"name": "ehr", "mode": "mirror",
                                                                 "unknown_types": "reject"}])
    daemon = DaemonProcess(config).start()
    try:
        asks = {"E1": "|||AL|AL", "E2": "|||NE|AL", "E3": "|||AL|NE", "E4": "|||NE|NE", "E5": "|||ER|ER",
                "E6": "|||SU|SU", "E7": "", "E8": "|||XX|"}  # XX: not in table 0155, taken as AL
        messages = tmp_path / "enhanced.hl7"
        messages.write_bytes(b"\n".join(siu(cid, "P" + cid, mrn="S" + cid, enhanced=ask).replace(b"\r", b"\n")
                                        for cid, ask in asks.items()))
        sent = slotengine("send", "--port", str(daemon.port("ehr")), "--json", str(messages))
        lines = [json.loads(line) for line in sent.stdout.splitlines()]
        assert [(line["control_id"], line["code"], line["ok"]) for line in lines] == [
            ("E1", "CA+AA", True), ("E2", "AA", True), ("E3", "CA", True), ("E4", "-", True), ("E5", "-", True),
            ("E6", "CA+AA", True), ("E7", "AA", True), ("E8", "CA+AA", True)]
        wait_until(lambda: len(db_rows(db, "select 1 from inbound_messages where status='applied'")) == 8)
        assert not db_rows(db, "select id from inbound_messages where instr(raw, x'0a') > 0")  # CR endings

        refused = tmp_path / "refused.hl7"
        orm = "MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302080000||ORM^O01|{cid}|P|2.5.1{ask}\rPID|1||X1^^^N^MR\r"
        refused.write_bytes("\r".join(orm.format(cid=cid, ask=ask) for cid, ask in (
            ("R1", ""), ("R2", "|||ER|ER"), ("R3", "|||SU|AL"), ("R4", "|||NE|AL"), ("R5", "|||NE|NE"))).encode())
        answered = slotengine("send", "--port", str(daemon.port("ehr")), "--timeout", "3", str(refused), check=False)
        assert answered.returncode == 1
        assert [line.split()[:4] for line in answered.stdout.splitlines()] == [
            ["FAIL", f"{refused}#1", "R1", "AR"], ["FAIL", f"{refused}#2", "R2", "CR"],
            # SU: no commit acknowledgement for a refusal; the application acknowledgement asked for says it
            ["FAIL", f"{refused}#3", "R3", "AR"], ["FAIL", f"{refused}#4", "R4", "AR"],
            ["ok", f"{refused}#5", "R5", "-"]]  # asked to be told nothing, even of a refusal
    finally:
        daemon.stop()

    import socket  # a peer that takes the message and never answers

    with socket.create_server(("127.0.0.1", 0)) as server:
        silent = tmp_path / "two.hl7"
        silent.write_bytes(siu("T1", "PT1") + siu("T2", "PT2"))
        quiet = slotengine("send", "--port", str(server.getsockname()[1]), "--timeout", "1", str(silent),
                           check=False)
    assert quiet.returncode == 1
    assert [line.split()[:4] for line in quiet.stdout.splitlines()] == [
        ["FAIL", f"{silent}#1", "T1", "timeout"], ["FAIL", f"{silent}#2", "-", "not-sent"]]


def test_messages_list_filters_by_status_sender_type_and_time(tmp_path):
    """Filters combine; times are clinic time unless they carry an offset; messages still in
    the SQLite inbox are listed by the same rules; a bad time names its option."""
    from datetime import datetime, timezone

    from engine.db import make_session_factory
    from engine.metrics import Metrics
    from hl7.daemon import prepare_database
    from hl7.store import APPLIED, RECEIVED, Inbox, Incoming, MessageStore

    db = tmp_path / "list.db"
    config = DaemonConfig(tmp_path, f"sqlite:///{db}")  # clinic time: America/New_York
    common = ["--config", str(config.write())]
    engine = prepare_database(f"sqlite:///{db}")
    store = MessageStore(make_session_factory(engine), Metrics(), Inbox(db))

    def item(control_id, sender, kind, received_utc, status=RECEIVED):
        return Incoming("ehr", sender, control_id, kind, "127.0.0.1", received_utc, b"MSH|^~\\&|", status, None,
                        control_id)

    store.store_batch([item("M1", "EPIC^NORTH", "SIU^S12", datetime(2026, 3, 2, 13, 0, tzinfo=timezone.utc), APPLIED),
                       item("M2", "EPIC^NORTH", "ADT^A04", datetime(2026, 3, 2, 15, 0, tzinfo=timezone.utc)),
                       item("M3", "LAB^WEST", "SIU^S15", datetime(2026, 3, 3, 13, 0, tzinfo=timezone.utc))])
    with store.sessions() as session, session.begin():  # M1 and M2 into the database, M3 stays in the inbox
        store.move_received(session, 2)
    engine.dispose()

    def listed(*filters):
        result = slotengine("messages", "list", "--json", *filters, *common)
        return [json.loads(line)["control_id"] for line in result.stdout.splitlines()]

    assert listed() == ["M3", "M2", "M1"]
    assert listed("--sender", "EPIC^NORTH") == ["M2", "M1"]
    assert listed("--type", "SIU") == ["M3", "M1"] and listed("--type", "SIU^S15") == ["M3"]
    assert listed("--status", "applied") == ["M1"]
    # 2 March 09:00 in New York is 14:00 UTC; 3 March starts at 05:00 UTC
    assert listed("--since", "2026-03-02T09:00") == ["M3", "M2"]
    assert listed("--since", "2026-03-02T09:00", "--until", "2026-03-03") == ["M2"]
    assert listed("--until", "2026-03-02T13:30+00:00") == ["M1"]
    assert listed("--sender", "EPIC^NORTH", "--type", "ADT", "--since", "2026-03-02") == ["M2"]
    bad = slotengine("messages", "list", "--since", "yesterday", *common, check=False)
    assert bad.returncode != 0 and "--since" in bad.stderr and "Traceback" not in bad.stderr
