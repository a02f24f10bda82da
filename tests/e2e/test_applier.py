"""The applier process: killed, it is replaced and nothing stored is lost; when the
daemon is killed, it does not outlive it."""
from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from hl7.applier import APPLIER_NICENESS
from hl7.client import MLLPClient, check_ack
from tests.e2e.daemon import DaemonConfig, DaemonProcess, waiting_messages
from tests.e2e.test_daemon import wait_until
from tests.e2e.test_kill9 import booking

pytestmark = pytest.mark.slow


def appliers(pid: int) -> set[int]:
    """The daemon's spawned children (multiprocessing's resource tracker is one too, but not spawned so)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            pass
    return {child for child in found if b"spawn_main" in _cmdline(child)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def applied(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute("select count(*) from inbound_messages where status = 'applied'").fetchone()[0]


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_a_killed_applier_is_replaced_and_a_killed_daemon_takes_its_applier_along(tmp_path):
    db = tmp_path / "applier.db"
    daemon = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{db}")).start()
    try:
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        for n in range(5):
            assert check_ack(f"K0-{n}", client.send(booking(0, n)))[1] == "AA"
        wait_until(lambda: applied(db) == 5)

        [first] = appliers(daemon.proc.pid)
        # receiving goes first when both want a core: the applier runs at a higher niceness
        assert niceness(first) == niceness(daemon.proc.pid) + APPLIER_NICENESS
        os.kill(first, signal.SIGKILL)
        for n in range(5, 10):  # stored and acknowledged while no applier runs
            assert check_ack(f"K0-{n}", client.send(booking(0, n)))[1] == "AA"
        wait_until(lambda: applied(db) == 10 and waiting_messages(db) == 0, timeout=30)
        [second] = wait_until(lambda: appliers(daemon.proc.pid) - {first} or None)
        assert "applier process exited; restarting" in daemon.logs()
        wait_until(lambda: daemon.health()[0] == 200 and "processing" not in daemon.health()[1], timeout=10)
        client.close()

        daemon.kill()  # SIGKILL: no shutdown, the pipe to the applier breaks
        wait_until(lambda: not alive(second), timeout=10)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    with sqlite3.connect(db) as connection:
        booked = connection.execute("select count(*) from appointments where status = 'booked'").fetchone()[0]
    assert booked == 10
