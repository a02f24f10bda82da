"""Senders: the allowlist against real headers (HD components), and a refused message
resent once its cause is fixed, on both databases, through a restarted daemon."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from hl7.client import MLLPClient, check_ack
from hl7.message import parse
from tests.e2e.daemon import DaemonConfig, DaemonProcess
from tests.e2e.test_daemon import siu, wait_until

pytestmark = pytest.mark.slow


def from_sender(control_id: str, placer: str, application: str, facility: str) -> bytes:
    return siu(control_id, placer).replace(b"|EPIC|NORTHCLINIC|", f"|{application}|{facility}|".encode(), 1)


def statuses(engine) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            text("select control_id, status from inbound_messages order by id"))]


def test_allowlist_names_senders_by_namespace_id_and_a_refused_message_is_taken_when_resent(
        tmp_path, any_database_url):
    config = DaemonConfig(tmp_path, any_database_url,
                          feeds=[{"name": "ehr", "mode": "mirror", "allowed_senders": ["EPIC^NORTH", "OIDONLY^*"]}])
    daemon = DaemonProcess(config).start()
    engine = create_engine(any_database_url)
    refused_raw = from_sender("R1", "PR1", "CADENCE", "NORTH")
    try:
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        # MSH-3 and MSH-4 as HDs with universal ids: matched by their namespace ids
        assert check_ack("H1", client.send(from_sender("H1", "PH1", "EPIC^1.2.840.114350^ISO",
                                                       "NORTH^2.16.840.1.113883^ISO"))) == (True, "AA", "")
        # only a universal id: matched by it
        assert check_ack("H2", client.send(from_sender("H2", "PH2", "^OIDONLY^ISO", "X"))) == (True, "AA", "")
        refused = parse(client.send(refused_raw))
        assert refused.first("MSA").value(1) == "AR"
        [err] = refused.segments_named("ERR")
        assert (err.value(2, 1), err.value(2, 3), err.value(3, 1)) == ("MSH", "3", "207")
        # resent unchanged while the cause stands: refused again, not answered as a duplicate of nothing
        assert parse(client.send(refused_raw)).first("MSA").value(1) == "AR"
        client.close()
        wait_until(lambda: [s for _c, s in statuses(engine)].count("applied") == 2, timeout=60, interval=0.2)
        daemon.stop()

        # the interface team allows the sender; the EHR resends the same bytes
        config.path.write_text(config.path.read_text().replace('"OIDONLY^*"]', '"OIDONLY^*", "CADENCE^*"]'))
        daemon = DaemonProcess(config).start()
        client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=10)
        assert check_ack("R1", client.send(refused_raw)) == (True, "AA", "")
        assert check_ack("R1", client.send(refused_raw)) == (True, "AA", "")  # now a duplicate of the accepted one
        client.close()
        final = wait_until(lambda: rows if ("R1", "applied") in (rows := statuses(engine)) else None,
                           timeout=60, interval=0.2)
        # the refusal stays on record, once; the accepted resend was stored once and applied
        assert final == [("H1", "applied"), ("H2", "applied"), ("R1", "refused"), ("R1", "applied")]
        with engine.connect() as connection:
            assert "PR1^EPIC" in set(connection.execute(text("select placer_id from appointments")).scalars())
    finally:
        engine.dispose()
        daemon.stop()
