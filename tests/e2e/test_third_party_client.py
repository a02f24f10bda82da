"""A third-party MLLP client talks to our listener: python-hl7's ``mllp_send``.

python-hl7 imports as ``hl7``, our own package's name, so it lives in a
virtualenv of its own, never in ours.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hl7 as our_hl7
from tests.e2e.daemon import DaemonConfig, DaemonProcess
from tests.e2e.test_daemon import db_rows, siu, wait_until

pytestmark = pytest.mark.slow


def test_our_hl7_package_is_ours():
    assert Path(our_hl7.__file__).resolve().parent == Path(__file__).resolve().parents[2] / "hl7"


@pytest.fixture(scope="session")
def python_hl7_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("python-hl7-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "hl7"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot install python-hl7 into its own virtualenv: {result.stderr[-2000:]}")
    return venv


def test_python_hl7_mllp_send(tmp_path, python_hl7_venv):
    db_path = tmp_path / "thirdparty.db"
    daemon = DaemonProcess(DaemonConfig(tmp_path, f"sqlite:///{db_path}")).start()
    try:
        messages = tmp_path / "messages.hl7"
        messages.write_bytes(b"\n".join(siu(f"PH{n}", f"PPH{n}", mrn=f"PH{n}").replace(b"\r", b"\r\n")
                                        for n in range(5)))
        result = subprocess.run(
            [str(python_hl7_venv / "bin" / "mllp_send"), "--loose", "-p", str(daemon.port("ehr")),
             "-f", str(messages), "127.0.0.1"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""},
        )
        assert result.returncode == 0, result.stderr
        acks = [line for line in result.stdout.replace("\r", "\n").splitlines() if line.startswith("MSA")]
        assert [line.split("|")[1:3] for line in acks] == [["AA", f"PH{n}"] for n in range(5)]
        wait_until(lambda: db_rows(db_path, "select count(*) from inbound_messages where status='applied'")[0][0] == 5)
    finally:
        daemon.stop()
