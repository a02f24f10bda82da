"""MLLP over TLS and mutual TLS; SIGHUP reloads certificates and log level
without dropping open connections."""
from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time

import pytest

from hl7.client import MLLPClient, check_ack
from tests.e2e.daemon import DaemonConfig, DaemonProcess
from tests.e2e.test_daemon import siu, wait_until

pytestmark = pytest.mark.slow


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)


def issue(directory, ca: str, name: str, *, server: bool) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=directory)
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", f"{name}.pem", cwd=directory)


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    make_ca(directory, "ca")
    issue(directory, "ca", "server", server=True)
    issue(directory, "ca", "client", server=False)
    make_ca(directory, "other-ca")
    issue(directory, "other-ca", "intruder", server=False)
    return directory


def test_mutual_tls_and_sighup_reload(tmp_path, pki):
    extra = (f'[feeds.tls]\ncert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n'
             f'client_ca = "{pki / "ca.pem"}"\n')
    config = DaemonConfig(tmp_path, f"sqlite:///{tmp_path / 'tls.db'}", clinic=False, extra=extra)
    daemon = DaemonProcess(config).start()
    port = daemon.port("ehr")
    try:
        client = MLLPClient("127.0.0.1", port, timeout=10, tls=True, ca=str(pki / "ca.pem"),
                            cert=str(pki / "client.pem"), key=str(pki / "client.key"))
        assert check_ack("TLS1", client.send(siu("TLS1", "PTLS1")))[1] == "AA"

        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            intruder = MLLPClient("127.0.0.1", port, timeout=5, tls=True, ca=str(pki / "ca.pem"),
                                  cert=str(pki / "intruder.pem"), key=str(pki / "intruder.key"))
            intruder.send(siu("TLS2", "PTLS2"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            anonymous = MLLPClient("127.0.0.1", port, timeout=5, tls=True, ca=str(pki / "ca.pem"))
            anonymous.send(siu("TLS3", "PTLS3"))

        # rotate the server certificate and raise the log level, then SIGHUP
        issue(pki, "ca", "server", server=True)
        rotated_serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(pki / "server.pem")],
                                        capture_output=True, text=True, check=True).stdout.strip()
        config.path.write_text(config.path.read_text().replace('level = "INFO"', 'level = "DEBUG"'))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: '"configuration reloaded"' in daemon.logs(), timeout=10)

        # the open connection was not dropped
        assert check_ack("TLS4", client.send(siu("TLS4", "PTLS4")))[1] == "AA"
        client.close()
        # new connections see the new certificate
        fresh = MLLPClient("127.0.0.1", port, timeout=10, tls=True, ca=str(pki / "ca.pem"),
                           cert=str(pki / "client.pem"), key=str(pki / "client.key"))
        der = fresh.sock.getpeercert(binary_form=True)
        pem = ssl.DER_cert_to_PEM_cert(der)
        serial = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem, capture_output=True,
                                text=True, check=True).stdout.strip()
        assert serial == rotated_serial
        assert check_ack("TLS5", fresh.send(siu("TLS5", "PTLS5")))[1] == "AA"
        fresh.close()
        time.sleep(0.5)
        debug_lines = [json.loads(line) for line in daemon.logs().splitlines() if '"level": "DEBUG"' in line]
        assert debug_lines, "log level not raised by SIGHUP"
    finally:
        daemon.stop()
