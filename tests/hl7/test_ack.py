"""ACKs: what they echo, how they report errors, and that hl7apy accepts them."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import get_message_info, parse_message, parse_segments

from hl7.ack import Raw, Repeat, build_ack, build_batch_ack, build_message, hl7_timestamp
from hl7.message import NULL, Delimiters, ErrorDetail, HL7ParseError, check_header, parse

CORPUS = Path(
    os.environ.get("SLOTENGINE_CORPUS")
    or Path(__file__).resolve().parents[3] / "shared" / "hl7-corpus"  # <repo>/../shared
)
CORPUS_FILES = sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not CORPUS_FILES, reason=f"no HL7 corpus at {CORPUS}")

NOW = datetime(2026, 3, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))
INBOUND = (
    b"MSH|^~\\&|EHR^1.2.3^ISO|NORTH|SLOTS|CLINIC|20260301120000||SIU^S12^SIU_S12|CTRL-1|P|2.5.1"
    b"|||AL|NE||UNICODE UTF-8\r"
    b"SCH|A1|F1\r"
)
PID_3_4 = ErrorDetail("PID", 1, 3, 4, "103", "E", "unknown assigning authority: X|Y^Z")


def hl7apy_strict(ack: bytes, codec: str = "utf-8"):
    """hl7apy reads the ACK as structure ACK and finds nothing to object to."""
    message = parse_message(ack.decode(codec), validation_level=VALIDATION_LEVEL.STRICT)
    assert message.name == "ACK"
    assert message.validate()
    return message


def test_ack_echoes_and_swaps_the_header():
    ack = parse(build_ack(parse(INBOUND), "AA", control_id="ACK-9", now=NOW))
    msh = ack.msh
    assert (ack.sending_application, ack.sending_facility) == ("SLOTS", "CLINIC")
    assert (ack.receiving_application, ack.receiving_facility) == ("EHR^1.2.3^ISO", "NORTH")
    assert msh.field(7) == "20260301123005+0100"
    assert msh.field(9) == "ACK^S12^ACK"
    assert ack.control_id == "ACK-9"
    assert (ack.processing_id, ack.version, ack.charset) == ("P", "2.5.1", "UNICODE UTF-8")
    assert (msh.field(15), msh.field(16)) == ("", "")  # an ACK is not acknowledged
    msa = ack.first("MSA")
    assert (msa.value(1), msa.value(2), msa.field(3)) == ("AA", "CTRL-1", "")
    assert ack.segments_named("ERR") == []
    hl7apy_strict(build_ack(parse(INBOUND), "AA", control_id="ACK-9", now=NOW))


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_every_ack_code_builds_a_valid_ack(code):
    errors = [] if code in ("AA", "CA") else [PID_3_4]
    raw = build_ack(parse(INBOUND), code, errors, control_id="ACK-1", now=NOW)
    assert parse(raw).first("MSA").value(1) == code
    assert hl7apy_strict(raw).msa.msa_1.to_er7() == code


def test_errors_become_err_segments():
    errors = [
        ErrorDetail("MSH", 1, 9, 2, "101", "E", "MSH-9.2 trigger event missing"),
        PID_3_4,
        ErrorDetail("MSH", 1, 12, 0, "203", "W", "version"),
        HL7ParseError("boom", code="207", segment=None, sequence=None).detail,
    ]
    raw = build_ack(parse(INBOUND), "AE", errors, "see ERR & co", control_id="ACK-2", now=NOW)
    assert b"X\\F\\Y\\S\\Z" in raw  # delimiters in messages are escaped
    ack = parse(raw)
    assert ack.first("MSA").value(3) == "see ERR & co"
    first, second, third, fourth = ack.segments_named("ERR")
    assert first.field(2) == "MSH^1^9^1^2"  # ERL: segment^sequence^field^repetition^component
    assert first.field(3) == "101^Required field missing^HL70357"
    assert (first.value(4), first.value(8)) == ("E", "MSH-9.2 trigger event missing")
    assert second.field(2) == "PID^1^3^1^4"
    assert second.value(8) == "unknown assigning authority: X|Y^Z"
    assert (third.field(2), third.value(4)) == ("MSH^1^12", "W")
    assert (fourth.field(2), fourth.field(3)) == ("", "207^Application internal error^HL70357")
    assert all(err.field(1) == "" for err in ack.segments_named("ERR"))
    hl7apy_strict(raw)


def test_acks_keep_the_inbound_delimiters():
    inbound = b"MSH#!@%*#APP#FAC#US#HERE#20260101##ADT!A01#C7#P#2.5\rPID#1"
    raw = build_ack(parse(inbound), "AE", [PID_3_4], control_id="K", now=NOW)
    assert raw.startswith(b"MSH#!@%*#US#HERE#APP#FAC#")
    ack = parse(raw)
    assert ack.delimiters == Delimiters("#", "!", "@", "%", "*")
    assert ack.first("MSA").value(2) == "C7"
    assert ack.first("ERR").field(2) == "PID!1!3!1!4"
    assert ack.first("ERR").value(8) == "unknown assigning authority: X|Y^Z"


def test_before_v25_errors_travel_in_err_1_and_msa_3():
    inbound = INBOUND.replace(b"|2.5.1|", b"|2.4|")
    errors = [PID_3_4, ErrorDetail("MSH", 1, 10, 0, "101", "E", "MSH-10 missing")]
    raw = build_ack(parse(inbound), "AE", errors, control_id="K", now=NOW)
    ack = parse(raw)
    (err,) = ack.segments_named("ERR")  # ERR does not repeat in a v2.4 ACK
    assert err.repetitions(1) == [
        "PID^1^3^103&Table value not found&HL70357",
        "MSH^1^10^101&Required field missing&HL70357",
    ]
    assert err.field_count == 1
    assert ack.first("MSA").value(3) == "unknown assigning authority: X|Y^Z; MSH-10 missing"
    hl7apy_strict(raw)
    old = parse(build_ack(parse(inbound.replace(b"|2.4|", b"|2.3|")), "AA", control_id="K", now=NOW))
    assert old.msh.field(9) == "ACK^S12"  # MSH-9.3 exists from v2.3.1


def test_from_v27_the_text_moves_from_msa_3_to_an_err():
    inbound = INBOUND.replace(b"|2.5.1|", b"|2.7|")
    accepted = build_ack(parse(inbound), "AA", [], "stored", control_id="K", now=NOW)
    rejected = build_ack(parse(inbound), "AR", [PID_3_4], "try later", control_id="K", now=NOW)
    for raw, code, severity in ((accepted, "0", "I"), (rejected, "207", "E")):
        ack = parse(raw)
        assert ack.first("MSA").field_count == 2
        last = ack.segments_named("ERR")[-1]
        assert (last.value(3), last.value(4), last.value(8)) == (
            code,
            severity,
            "stored" if code == "0" else "try later",
        )
        hl7apy_strict(raw)


def test_ack_for_bytes_that_do_not_parse():
    bad_msh_2 = b"MSH|^^^|EHR|NORTH|SLOTS|CLINIC|20260301||ADT^A01|CTRL-7|P|2.4\rPID|1"
    with pytest.raises(HL7ParseError) as caught:
        parse(bad_msh_2)
    raw = build_ack(None, "AR", [caught.value.detail], control_id="K", now=NOW, raw_header=bad_msh_2)
    ack = parse(raw)
    assert ack.first("MSA").value(2) == "CTRL-7"
    assert (ack.sending_application, ack.receiving_application) == ("SLOTS", "EHR")
    assert ack.version == "2.5.1"
    assert ack.first("ERR").field(2) == "MSH^1^2"
    hl7apy_strict(raw)

    # The header line is fine, the message is not (a second MSH): echo it all.
    two = INBOUND + INBOUND
    with pytest.raises(HL7ParseError) as caught:
        parse(two)
    ack = parse(build_ack(None, "AR", [caught.value.detail], control_id="K", now=NOW, raw_header=two))
    assert (ack.first("MSA").value(2), ack.msh.field(9), ack.version) == ("CTRL-1", "ACK^S12^ACK", "2.5.1")

    nothing = parse(build_ack(None, "AR", control_id="K", now=NOW, raw_header=b"\x00\xffgarbage"))
    assert nothing.first("MSA").value(2) == ""
    assert nothing.first("MSA").value(1) == "AR"

    latin = b"MSH|^~\\&|\xc4PP|F\xd6|R|F|20260301||ADT^A01|\xc9-1|P"
    raw = build_ack(None, "AR", control_id="K", now=NOW, raw_header=latin + b"\rMSH|")
    assert b"|R|F|\xc4PP|F\xd6|" in raw and b"MSA|AR|\xc9-1" in raw  # bytes echoed as received


def test_ack_is_written_in_the_inbound_codec():
    inbound = b"MSH|^~\\&|\xc4PP|F|R|F|20260301||ADT^A01|1|P|2.5\rPID|1||||M\xfcller"
    msg = parse(inbound)
    assert msg.encoding == "latin-1"
    error = ErrorDetail("PID", 1, 5, 0, "207", "E", "Müller’s record")
    raw = build_ack(msg, "AE", [error], control_id="K", now=NOW)
    assert raw.startswith(b"MSH|^~\\&|R|F|\xc4PP|F|")
    assert "M\xfcller?s record".encode("latin-1") in raw  # no ’ in Latin-1


def test_ack_arguments_are_checked():
    msg = parse(INBOUND)
    with pytest.raises(ValueError):
        build_ack(msg, "OK", control_id="K", now=NOW)
    with pytest.raises(ValueError):
        build_ack(msg, "AA", control_id="", now=NOW)
    with pytest.raises(ValueError):
        build_ack(msg, "AA", control_id="K", now=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        ErrorDetail("MSH", 1, 9, 0, "999", "E", "not in table 0357")
    with pytest.raises(ValueError):
        ErrorDetail("MSH", 1, 9, 0, "101", "X", "not a severity")


def test_timestamp_offsets():
    assert hl7_timestamp(datetime(2026, 7, 1, 8, 0, tzinfo=timezone.utc)) == "20260701080000+0000"
    minus = timezone(-timedelta(hours=3, minutes=30))
    assert hl7_timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=minus)) == "20260102030405-0330"


def test_build_message_writes_fields_by_position():
    raw = build_message(
        [
            ("MSH", {3: "SLOTS", 9: ["SIU", "S12", "SIU_S12"], 10: "1", 12: "2.5.1"}),
            ("SCH", {1: ["A|1", "PLACER"], 6: NULL, 25: "Booked"}),
            ("PID", {3: Repeat([["1", None, None, ["MRN", "1.2&3"]], "2"]), 5: Raw("DOE^J"), 8: None}),
        ]
    )
    assert raw == (
        b"MSH|^~\\&|SLOTS||||||SIU^S12^SIU_S12|1||2.5.1\r"
        b'SCH|A\\F\\1^PLACER|||||""|||||||||||||||||||Booked\r'
        b"PID|||1^^^MRN&1.2\\T\\3~2||DOE^J\r"
    )
    with pytest.raises(ValueError):
        build_message([("MSH", {1: "|"})])
    with pytest.raises(ValueError):
        build_message([("pid", {1: "x"})])


@needs_corpus
@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in CORPUS_FILES])
def test_corpus_acks(path: Path):
    msg = parse(path.read_bytes())
    errors = check_header(msg) + [PID_3_4]
    for code, problems in (("AA", []), ("AE", errors), ("CR", errors)):
        raw = build_ack(msg, code, problems, "note", control_id="ACK-1", now=NOW)
        ack = parse(raw)
        msa = ack.first("MSA")
        assert msa.value(1) == code
        assert msa.field(2) == msg.msh.field(10)  # MSA-2 echoes MSH-10 as sent
        assert (ack.sending_application, ack.sending_facility) == (
            msg.receiving_application,
            msg.receiving_facility,
        )
        assert (ack.receiving_application, ack.receiving_facility) == (
            msg.sending_application,
            msg.sending_facility,
        )
        assert ack.trigger_event == msg.trigger_event
        assert ack.delimiters == msg.delimiters
        reason = _why_hl7apy_cannot_be_strict(path.name, msg)
        if reason is None:
            hl7apy_strict(raw, msg.encoding)
        else:
            theirs = hl7apy_tolerant(raw.decode(msg.encoding), msg.version)
            assert [s.name for s in theirs] == [s.name for s in ack.segments], reason


def hl7apy_tolerant(text: str, version: str):
    """The ACK's segments as hl7apy reads them without validating."""
    if version.startswith("2.9"):  # unknown to hl7apy 1.3.5: read as its latest
        encoding_chars, _, _ = get_message_info(text)
        return parse_segments(text, "2.8.2", encoding_chars, VALIDATION_LEVEL.TOLERANT)
    return parse_message(text, VALIDATION_LEVEL.TOLERANT, find_groups=False).children


# hl7apy's strict validation cannot pass these ACKs for reasons of the inbound message.
_ECHOED_VALUES_TOO_LONG = {  # hl7apy's length tables for HD/IS in the old versions
    "hl7v2ig__ADT_A04__3.hl7": "MSH-4 'Foothill Veterinary Clinic' > 20",
    "ipf__ADT_A01__5.hl7": "MSH-3/4 OIDs > 20",
    "ipf__ADT_A40__3.hl7": "MSH-3/4 OIDs > 20",
}


def _why_hl7apy_cannot_be_strict(name: str, msg) -> str | None:
    if name in _ECHOED_VALUES_TOO_LONG:
        return _ECHOED_VALUES_TOO_LONG[name]
    if not msg.control_id:
        return "no MSH-10 to echo: MSA-2 empty"
    if msg.version.startswith("2.9"):
        return "v2.9: hl7apy 1.3.5 knows versions up to 2.8.2"
    if msg.version in ("2.2", "2.3"):
        return "before v2.3.1 MSH-9 has no structure and hl7apy looks for ACK_<trigger>"
    return None


def test_batch_ack_without_a_file_envelope_or_acknowledgements():
    """A BHS batch without FHS gets BHS/BTS only; messages that asked for no
    acknowledgement leave an empty batch, its count zero; custom delimiters kept."""
    moment = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
    inbound = b"BHS#^~\\&#LAB#WEST#SE#SE#20260302080000####B9\nMSH#^~\\&#LAB#WEST#SE#SE#1##ADT^A08#M1#P#2.5.1\n"
    reply = build_batch_ack(inbound, [], control_id="OURS1", now=moment)
    assert reply == b"BHS#^~\\&#SE#SE#LAB#WEST#20260302080000+0000####OURS1#B9\rBTS#0\r"
    ack = b"MSH#^~\\&#SE#SE#LAB#WEST#20260302080000+0000##ACK^A08^ACK#X1#P#2.5.1\rMSA#AA#M1\r"
    assert build_batch_ack(inbound, [ack, ack], control_id="OURS2", now=moment).split(b"\r")[1:-1] == [
        b"MSH#^~\\&#SE#SE#LAB#WEST#20260302080000+0000##ACK^A08^ACK#X1#P#2.5.1", b"MSA#AA#M1",
        b"MSH#^~\\&#SE#SE#LAB#WEST#20260302080000+0000##ACK^A08^ACK#X1#P#2.5.1", b"MSA#AA#M1", b"BTS#2"]
