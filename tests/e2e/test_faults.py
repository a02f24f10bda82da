"""Faults: a full disk, hostile peers, a database that goes away."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hl7.client import MLLPClient, check_ack
from hl7.message import parse
from tests.e2e.daemon import DaemonConfig, DaemonProcess, waiting_messages
from tests.e2e.test_daemon import siu, wait_until

pytestmark = pytest.mark.slow


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MB tmpfs the test can fill (needs mount privileges, as in CI)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a size-limited tmpfs here: {result.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    # unbuffered: a buffered file would raise ENOSPC again when closing, for the bytes it still holds
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_disk_full_no_positive_ack_and_recovery(tmp_path, small_filesystem):
    db_path = small_filesystem / "full.db"
    daemon = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{db_path}", clinic=False)).start()
    try:
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        assert check_ack("D0", client.send(siu("D0", "PD0")))[0]
        filler = fill(small_filesystem)
        codes = {}
        big_note = "NTE|1||" + "x" * 20000 + "\r"
        for n in range(1, 12):
            message = siu(f"D{n}", f"PD{n}", mrn=f"MD{n}") + big_note.encode()
            ok, code, text = check_ack(f"D{n}", client.send(message))
            codes[f"D{n}"] = code
        refused = [cid for cid, code in codes.items() if code != "AA"]
        assert refused, "the disk never filled up"
        accepted = [cid for cid, code in codes.items() if code == "AA"]
        status, detail = daemon.health()
        assert status == 503 and detail["storage"].startswith("failing"), detail
        assert daemon.proc.poll() is None, "the daemon must keep running"
        assert '"could not store messages"' in daemon.logs()

        filler.unlink()  # space returns
        wait_until(lambda: daemon.health()[0] == 200, timeout=30)
        for cid in refused:  # the sender resends what was refused
            n = cid[1:]
            message = siu(cid, f"PD{n}", mrn=f"MD{n}") + big_note.encode()
            assert check_ack(cid, client.send(message))[1] == "AA"
        client.close()
        wait_until(lambda: waiting_messages(db_path) == 0,
                   timeout=60)
    finally:
        daemon.stop()
    stored = {row[0] for row in _rows(db_path, "select control_id from inbound_messages")}
    assert {"D0", *accepted, *refused} <= stored


def _rows(path, sql):
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def _count(path, sql) -> int:
    return _rows(path, sql)[0][0]


def test_hostile_peers_do_not_hurt_others(tmp_path):
    daemon = DaemonProcess(DaemonConfig(
        tmp_path, f"sqlite:///{tmp_path / 'hostile.db'}", clinic=False,
        feeds=[{"name": "ehr", "mode": "mirror", "max_message_bytes": 1048576, "idle_timeout_seconds": 5},
               {"name": "quiet", "mode": "mirror"}],
    )).start()
    try:
        pid = daemon.proc.pid
        baseline = rss_kib(pid)
        port = daemon.port("ehr")
        stop = threading.Event()

        def trickle():  # one byte a second, until the daemon gives up on the frame
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for byte in b"\x0bMSH|^~\\&|SLOW":
                    if stop.is_set():
                        return
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        return
                    time.sleep(1)

        def never_reads():  # sends and sends, never reads an ACK
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(10)
                try:
                    for n in range(5000):
                        if stop.is_set():
                            return
                        sock.sendall(b"\x0b" + siu(f"NR{n}", f"PNR{n}", mrn=f"NR{n}") + b"\x1c\r")
                except OSError:
                    pass

        threads = [threading.Thread(target=trickle, daemon=True), threading.Thread(target=never_reads, daemon=True)]
        for thread in threads:
            thread.start()
        idle = []
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        # a 100 MB frame: refused without buffering it
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            chunk = b"x" * (1024 * 1024)
            sock.sendall(b"\x0bMSH|^~\\&|BIG|BIG|SE|SE|20260101||ADT^A08|BIG1|P|2.5.1\rNTE|1||")
            for _ in range(100):
                sock.sendall(chunk)
            sock.sendall(b"\x1c\r")
            reply = sock.recv(65536)
            assert b"MSA|AR|BIG1" in reply
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(os.urandom(200_000))
        # meanwhile the other feed is served promptly
        quiet = MLLPClient("127.0.0.1", daemon.port("quiet"), timeout=5)
        started = time.monotonic()
        for n in range(50):
            assert check_ack(f"Q{n}", quiet.send(siu(f"Q{n}", f"PQ{n}", mrn=f"Q{n}")))[0]
        elapsed = time.monotonic() - started
        quiet.close()
        assert elapsed < 20, f"the quiet feed was slowed down: {elapsed:.1f}s for 50 messages"
        grown = rss_kib(pid) - baseline
        assert grown < 150 * 1024, f"daemon memory grew by {grown} KiB"
        assert daemon.health()[0] == 200
        stop.set()
        for sock in idle:
            sock.close()
    finally:
        daemon.stop()


PG = os.environ.get("SLOTENGINE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True,
                   capture_output=True)


def test_database_unavailable_no_positive_ack_no_loss(tmp_path):
    from engine.testing import postgresql_schema_url

    schema_urls = postgresql_schema_url()
    url = next(schema_urls)
    daemon = DaemonProcess(DaemonConfig(tmp_path, url, clinic=False)).start()
    acked, refused = [], []
    try:
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        for n in range(20):
            assert check_ack(f"G{n}", client.send(siu(f"G{n}", f"PG{n}", mrn=f"G{n}")))[0]
            acked.append(f"G{n}")
        _pg("stop")
        try:
            for n in range(20, 30):
                try:
                    ok, code, _ = check_ack(f"G{n}", client.send(siu(f"G{n}", f"PG{n}", mrn=f"G{n}")))
                except OSError:
                    client.close()
                    client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
                    ok = False
                assert not ok, "positive ACK while the database is down"
                refused.append(f"G{n}")
            assert daemon.health()[0] == 503
        finally:
            _pg("start")
        wait_until(lambda: daemon.health()[0] == 200, timeout=60, interval=0.5)
        for cid in refused:
            n = cid[1:]
            assert check_ack(cid, client.send(siu(cid, f"PG{n}", mrn=f"G{n}")))[0]
            acked.append(cid)
        client.close()
        from sqlalchemy import create_engine, text

        engine = create_engine(url)

        def all_applied():
            with engine.connect() as connection:
                rows = connection.execute(text("select control_id, status from inbound_messages")).all()
            return rows if all(status == "applied" for _c, status in rows) and len(rows) == len(acked) else None

        rows = wait_until(all_applied, timeout=60, interval=0.5)
        engine.dispose()
        assert sorted(c for c, _s in rows) == sorted(acked)
    finally:
        daemon.stop()
        try:
            next(schema_urls)
        except StopIteration:
            pass


def test_nul_characters_neither_lose_nor_block_messages(tmp_path, any_database_url):
    """PostgreSQL stores no NUL in text.  A NUL in a value (``\\X00\\`` or the byte) is dropped
    and the message applies; one in MSH-10 is refused naming MSH-10, and the feed goes on."""
    from sqlalchemy import create_engine, text

    daemon = DaemonProcess(DaemonConfig(tmp_path, any_database_url)).start()
    engine = create_engine(any_database_url)
    try:
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        sent = {
            "N1": siu("N1", "PN1", mrn="NUL1").replace(b"Testperson^Alex", b"Test\\X00\\person^Alex"),
            "N2": siu("N2", "PN2", mrn="NUL2").replace(b"Testperson^Alex", b"Test\x00person^Alex"),
            "N3": siu("N3", "P\\X00\\N3", mrn="NU\\X00\\L3"),
        }
        for cid, raw in sent.items():
            assert check_ack(cid, client.send(raw)) == (True, "AA", "")
        refused = parse(client.send(siu("N4\x00X", "PN4", mrn="NUL4")))
        assert refused.first("MSA").value(1) == "AR"
        [err] = refused.segments_named("ERR")
        assert (err.value(2, 1), err.value(2, 3), err.value(3, 1)) == ("MSH", "10", "102")
        assert check_ack("N5", client.send(siu("N5", "PN5", mrn="NUL5")))[0]  # the feed goes on
        client.close()

        def settled():
            with engine.connect() as connection:
                rows = dict(connection.execute(text("select control_id, status from inbound_messages")).all())
            return rows if "received" not in rows.values() and len(rows) == 5 else None

        statuses = wait_until(settled, timeout=60, interval=0.2)
        assert statuses == {"N1": "applied", "N2": "applied", "N3": "applied", "N4\ufffdX": "refused", "N5": "applied"}
        with engine.connect() as connection:
            assert set(connection.execute(text("select family_name from patients")).scalars()) == {"Testperson"}
            assert set(connection.execute(text("select value from patient_identifiers")).scalars()) == {
                "NUL1", "NUL2", "NUL3", "NUL5"}
            assert "PN3^EPIC" in set(connection.execute(text("select placer_id from appointments")).scalars())
    finally:
        engine.dispose()
        daemon.stop()


def test_listener_controls_close_what_they_should(tmp_path):
    """Idle connections and frames that never end are closed after idle_timeout_seconds (a
    trickle that is never idle included); a peer outside allowed_peers is dropped unanswered;
    bytes outside a frame are discarded and logged, and the frame after them is answered."""
    daemon = DaemonProcess(DaemonConfig(
        tmp_path, f"sqlite:///{tmp_path / 'controls.db'}", clinic=False,
        feeds=[{"name": "ehr", "mode": "mirror", "idle_timeout_seconds": 2},
               {"name": "walled", "mode": "mirror", "allowed_peers": ["192.0.2.0/24"]}],
    )).start()
    try:
        port = daemon.port("ehr")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1024) == b""  # closed by the daemon
            assert 1.5 < time.monotonic() - started < 6

        with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle:
            started = time.monotonic()
            closed_after = None
            for byte in b"\x0bMSH|^~\\&|SLOW|SLOW|SE|SE|20260101||ADT^A08|T1|P|2.5.1":
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.5)  # never idle for 2 s
            assert closed_after is not None and closed_after < 6, "a trickled frame held the connection open"

        with socket.create_connection(("127.0.0.1", daemon.port("walled")), timeout=10) as outsider:
            outsider.sendall(b"\x0b" + siu("W1", "PW1") + b"\x1c\r")
            try:
                assert outsider.recv(1024) == b""  # dropped, unanswered
            except ConnectionResetError:
                pass  # dropped with the message unread: the same

        with socket.create_connection(("127.0.0.1", port), timeout=10) as sloppy:
            sloppy.sendall(b"noise before the frame\r\n" + b"\x0b" + siu("G1", "PG1") + b"\x1c\r")
            assert b"MSA|AA|G1" in sloppy.recv(65536)

        def logged():
            events = {entry["event"]: entry for entry in map(json.loads, daemon.logs().splitlines())}
            return events if "bytes outside an MLLP frame discarded" in events else None

        messages = wait_until(logged, timeout=10)
        assert "connection closed: a frame not completed within idle_timeout_seconds" in messages
        assert messages["connection refused: peer not in allowed_peers"]["feed"] == "walled"
        assert messages["bytes outside an MLLP frame discarded"]["bytes"] == len(b"noise before the frame\r\n")
        assert "W1" not in _rows_text(tmp_path / "controls.db")
    finally:
        daemon.stop()


def _rows_text(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return " ".join(row[0] for row in db.execute("select control_id from inbound_messages"))
