"""hl7.logs: JSON lines, context fields, pseudonyms, scrubbing of text, tracebacks and
context, a redaction that never loses a line -- and patient data from the real corpus
that never reaches the output."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import time
import uuid
import warnings
from datetime import date, datetime, timezone
from enum import Enum

import pytest

from hl7.logs import (
    LOG_LEVELS,
    PATIENT_DATA_KEYS,
    RedactionFilter,
    configure_logging,
    pseudonym,
    scrub_text,
    set_level,
)

KEY = b"test redaction key"
PSEUDONYM = re.compile(r"~[0-9a-f]{10}")


class JsonLog:
    """The lines written by the handler configure_logging installed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().split("\n") if line]

    def last(self) -> dict:
        return self.lines()[-1]


def remove_installed_handlers() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if any(isinstance(log_filter, RedactionFilter) for log_filter in handler.filters):
            root.removeHandler(handler)


@pytest.fixture
def log():
    root = logging.getLogger()
    level = root.level
    json_log = JsonLog()
    configure_logging("DEBUG", stream=json_log.stream, redaction_key=KEY)
    yield json_log
    remove_installed_handlers()
    root.setLevel(level)
    logging.captureWarnings(False)


logger = logging.getLogger("slotengine.test")


# --- the format ---------------------------------------------------------------------------


def test_each_record_is_one_json_line_with_timestamp_level_logger_and_event(log):
    logger.info("first\nsecond line of the same record")
    logger.warning("%s slots freed", 3)
    raw_lines = log.stream.getvalue().split("\n")
    assert raw_lines[-1] == "" and len(raw_lines) == 3
    first, second = log.lines()
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["event"] == "first\nsecond line of the same record"
    assert (second["level"], second["logger"], second["event"]) == ("WARNING", "slotengine.test", "3 slots freed")
    timestamp = datetime.fromisoformat(second["timestamp"].replace("Z", "+00:00"))
    assert timestamp.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - timestamp).total_seconds()) < 60
    assert second["timestamp"].endswith("Z")


def test_context_fields_are_written_as_given(log):
    appointment = uuid.uuid4()
    logger.info(
        "message stored",
        extra={
            "feed": "ehr",
            "control_id": "1270326314",
            "appointment_id": 42,
            "peer": "10.0.0.5:51000",
            "slot_start": datetime(2026, 1, 15, 9, 0, tzinfo=timezone.utc),
            "request": appointment,
            "mode": Mode.FILLER,
        },
    )
    line = log.last()
    assert line["feed"] == "ehr"
    assert line["control_id"] == "1270326314"
    assert line["appointment_id"] == 42
    assert line["peer"] == "10.0.0.5:51000"
    assert line["slot_start"] == "2026-01-15T09:00:00+00:00"
    assert line["request"] == str(appointment)
    assert line["mode"] == "filler"


class Mode(Enum):
    FILLER = "filler"


def test_context_keys_that_collide_with_core_fields_are_renamed(log):
    logger.info("booked", extra={"event": "appointment.booked", "level": 3})
    line = log.last()
    assert (line["event"], line["extra_event"], line["level"], line["extra_level"]) == (
        "booked",
        "appointment.booked",
        "INFO",
        3,
    )


def test_set_level_changes_what_is_written(log):
    set_level("warning")
    logger.info("hidden")
    logger.warning("shown")
    set_level("DEBUG")
    logger.debug("shown too")
    assert [line["event"] for line in log.lines()] == ["shown", "shown too"]
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        set_level("LOUD")
    assert LOG_LEVELS == ("DEBUG", "INFO", "WARNING", "ERROR")


def test_configuring_again_replaces_the_handler(log):
    second = JsonLog()
    configure_logging("INFO", stream=second.stream, redaction_key=KEY)
    logger.info("once")
    assert log.lines() == []
    assert [line["event"] for line in second.lines()] == ["once"]


def test_python_warnings_become_json_lines(log):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing for 555-555-1234", DeprecationWarning, stacklevel=1)
    line = log.last()
    assert line["logger"] == "py.warnings" and "DeprecationWarning" in line["event"]
    assert "555-555-1234" not in line["event"]


# --- pseudonyms ---------------------------------------------------------------------------


def test_patient_data_keys_become_keyed_pseudonyms(log):
    logger.info("patient registered", extra={"patient_name": "EVERYMAN^ADAM", "dob": date(1961, 6, 15), "mrn": 12345})
    logger.info("again", extra={"Patient_Name": "EVERYMAN^ADAM", "MRN": 12345})
    first, second = log.lines()
    assert first["patient_name"] == pseudonym("EVERYMAN^ADAM", KEY)
    assert PSEUDONYM.fullmatch(first["patient_name"])
    assert first["dob"] == pseudonym(date(1961, 6, 15), KEY)
    assert first["mrn"] == second["MRN"] == pseudonym(12345, KEY)
    assert second["Patient_Name"] == first["patient_name"]  # keys match case-insensitively


def test_pseudonyms_depend_on_the_key():
    assert pseudonym("DOE", b"one") == pseudonym("DOE", b"one")
    assert pseudonym("DOE", b"one") != pseudonym("DOE", b"two")
    assert pseudonym("DOE", b"one") != pseudonym("ROE", b"one")


def test_without_a_key_pseudonyms_use_a_random_one(log):
    other = JsonLog()
    configure_logging("INFO", stream=other.stream)
    logger.info("x", extra={"mrn": "12345"})
    assert other.last()["mrn"] != pseudonym("12345", KEY)
    assert PSEUDONYM.fullmatch(other.last()["mrn"])


def test_patient_data_keys_are_lower_case_and_cover_the_usual_suspects():
    assert all(key == key.lower() for key in PATIENT_DATA_KEYS)
    for key in ("patient_name", "name", "family", "given", "birth_date", "dob", "phone", "email", "address",
                "street", "mrn", "patient_id_value", "identifier", "ssn", "member_id"):
        assert key in PATIENT_DATA_KEYS


@dataclasses.dataclass
class Patient:
    name: str
    mrn: str
    visits: int


def test_nested_context_is_walked(log):
    logger.info(
        "merge",
        extra={
            "patients": [{"Name": "DOE^JOHN", "address": {"street": "1 Main St"}, "note": "call 555-555-1234"}],
            "record": Patient(name="ROE^RICHARD", mrn="A1234", visits=2),
        },
    )
    line = log.last()
    (patient,) = line["patients"]
    assert patient["Name"] == pseudonym("DOE^JOHN", KEY)
    assert patient["address"] == pseudonym({"street": "1 Main St"}, KEY)
    assert patient["note"] == "call <redacted phone>"
    assert line["record"] == {"name": pseudonym("ROE^RICHARD", KEY), "mrn": pseudonym("A1234", KEY), "visits": 2}


def test_self_referencing_context_is_cut_off(log):
    loop: dict = {}
    loop["again"] = loop
    logger.info("loop", extra={"loop": loop})
    depth, value = 0, log.last()["loop"]
    while isinstance(value, dict):
        depth, value = depth + 1, value["again"]
    assert value == "<redacted: nested too deeply>" and depth == 8


# --- scrubbing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("PID|1||12345^^^MRN||DOE^JOHN", "PID|<redacted 24 bytes>"),
        ("MSH|^~\\&|EPIC\rPID|1||X\rPV1|1|O", "MSH|<redacted 9 bytes>\rPID|<redacted 4 bytes>\rPV1|<redacted 3 bytes>"),
        ("got NK1|1|DUCK^HUEY|SO today\nnext", "got NK1|<redacted 20 bytes>\nnext"),
        ("IN1|1|Blue Cross", "IN1|<redacted 12 bytes>"),
        ("b'MSH|^~\\\\&|A\\rPID|1||X'", "b'MSH|<redacted 18 bytes>"),
        ("MSH^~|\\&^APP^FAC", "MSH^<redacted 12 bytes>"),
        ("PID#1##12345!!!MRN##DOE!JOHN", "PID#<redacted 24 bytes>"),
        ("Zoë ZPD|x", "Zoë ZPD|<redacted 1 bytes>"),
        ("mail john.doe+appt@example.org!", "mail <redacted email>!"),
        ("born 19800101, 1980-01-01, 1980/1/1, 01/02/1980, 1.2.1980",
         "born <redacted date>, <redacted date>, <redacted date>, <redacted date>, <redacted date>"),
        ("ssn 444-33-3333", "ssn <redacted ssn>"),
        ("(555)555-1234 (555) 555-1234", "<redacted phone> <redacted phone>"),
        ("+1 555 555 1234, +44 20 7946 0958, +15555551234", "<redacted phone>, <redacted phone>, <redacted phone>"),
        ("555-555-1234 555.555.1234 555 555 1234", "<redacted phone> <redacted phone> <redacted phone>"),
        ("(555) 555\u20112004 and 555-555- 2004", "<redacted phone> and <redacted phone>"),
        ("555-0001 8885551212 0766655652 02011110111", "<redacted phone> " * 3 + "<redacted phone>"),
        ("050-1234567, 01/56 65 99, 020 7946 0958", "<redacted phone>, <redacted phone>, <redacted phone>"),
    ],
)
def test_scrub_text_redacts_segments_contacts_and_birth_dates(text, scrubbed):
    assert scrub_text(text) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "listening on 127.0.0.1:2575 and [::1]:2575, peer 10.0.0.5:51000",
        "control id MSG00001, 1270326314, RAJ_24459306, Q1663236015T1667362682A1117, 8919-40",
        "slot 2026-01-15T09:00:00Z, 2026-01-15 09:00, 01/15/2026 09:00, 20260115090000",
        "appointment 550e8400-e29b-41d4-a716-446655440000 took 123.4567 ms, 1048576 bytes",
        "HL7 2.5.1, SIU^S12 from EPIC, ACK AA, offset +0215, retry in 30 s",
        "Mirror feed ehr: 3 messages parked; ERR code 207",
    ],
)
def test_scrub_text_leaves_operational_values_alone(text):
    assert scrub_text(text) == text


def test_message_args_and_context_strings_are_scrubbed(log):
    segment = "PID|1||12345^^^MRN||DOE^JOHN||19800101"
    logger.info("received %s from %s", segment, "ehr", extra={"segment": segment, "raw": segment.encode()})
    line = log.last()
    assert line["event"] == "received PID|<redacted 43 bytes>"  # to the end of the line
    assert line["segment"] == line["raw"] == "PID|<redacted 34 bytes>"


def test_objects_in_context_are_logged_as_their_scrubbed_text(log):
    class Message:
        def __str__(self):
            return "MSH|^~\\&|A\rPID|1||SECRET"

    logger.info("stored", extra={"stored_message": Message(), "count": 3, "ok": True})
    line = log.last()
    assert line["stored_message"] == "MSH|<redacted 6 bytes>\rPID|<redacted 9 bytes>"
    assert (line["count"], line["ok"]) == (3, True)


def test_tracebacks_are_formatted_then_scrubbed_including_causes(log):
    try:
        try:
            raise KeyError("no patient with phone 555-555-1234")
        except KeyError as cause:
            raise ValueError("cannot map PID|1||12345^^^MRN||DOE^JOHN") from cause
    except ValueError:
        logger.exception("mapping failed", extra={"control_id": "MSG00001"})
    line = log.last()
    assert line["event"] == "mapping failed" and line["control_id"] == "MSG00001"
    exception = line["exception"]
    assert "Traceback (most recent call last)" in exception
    assert "ValueError: cannot map PID|<redacted 24 bytes>" in exception
    assert "KeyError: 'no patient with phone <redacted phone>'" in exception
    assert "DOE^JOHN" not in exception and "555-555-1234" not in exception


def test_a_traceback_another_handler_already_formatted_is_scrubbed(log):
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), None)
    record.exc_text = "Traceback ...\nValueError: PID|1||SECRET"
    logger.handle(record)
    assert log.last()["exception"] == "Traceback ...\nValueError: PID|<redacted 9 bytes>"


def test_stack_information_is_scrubbed(log):
    stack = "Stack:\n  PID|1||SECRET"
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "where", (), None, sinfo=stack)
    logger.handle(record)
    assert log.last()["stack"] == "Stack:\n  PID|<redacted 9 bytes>"


def test_records_from_other_libraries_are_redacted_too(log):
    logging.getLogger("sqlalchemy.engine").warning("[parameters: %r]", ("PID|1||SECRET", "x@example.org"))
    event = log.last()["event"]
    assert event.startswith("[parameters: ('PID|<redacted ")
    assert "SECRET" not in event and "example.org" not in event


def test_a_dict_message_is_logged_as_redacted_fields(log):
    logger.info({"event_kind": "booked", "mrn": "12345", "note": "PID|1||SECRET"})
    line = log.last()
    assert line["event_kind"] == "booked"
    assert line["mrn"] == pseudonym("12345", KEY)
    assert line["note"] == "PID|<redacted 9 bytes>"


# --- redaction never loses a line --------------------------------------------------------------


def test_a_failing_redaction_still_writes_a_fully_redacted_line(log):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("PID|1||SECRET")

    logger.warning("about %s", "PID|1||SECRET", extra={"thing": Unprintable(), "feed": "ehr"})
    line = log.last()
    assert line["event"] == "<log record redacted: RuntimeError while redacting>"
    assert (line["level"], line["logger"], line["thing"], line["feed"]) == (
        "WARNING",
        "slotengine.test",
        "<redacted>",
        "<redacted>",
    )
    assert "SECRET" not in json.dumps(line)


def test_a_message_that_cannot_be_formatted_still_writes_a_line(log):
    logger.info("%d appointments", "PID|1||SECRET")
    assert log.last()["event"] == "<log record redacted: TypeError while redacting>"


def test_a_large_message_is_redacted_quickly():
    # Not a benchmark: a guard against patterns that backtrack badly on long text.
    message = "MSH|^~\\&|EPIC|MAIN\r" + "PID|1||12345^^^MRN||DOE^JOHN||19800101|M\r" * 50 + "x" * 100_000
    records = [logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%s", (message,), None) for _ in range(20)]
    redaction = RedactionFilter(KEY)
    start = time.perf_counter()
    for record in records:
        redaction.filter(record)
    assert time.perf_counter() - start < 2.0


# --- the real corpus ------------------------------------------------------------------------------

MIN_VALUE_LENGTH = 4
"""Shorter values ("M", "1", "Doe") could turn up in a line by coincidence."""


def pid_fields(segment: str, number: int) -> list[list[str]]:
    """PID-``number``: its repetitions, each a list of components (a plain split)."""
    fields = segment.split("|")
    if len(fields) <= number:
        return []
    return [repetition.split("^") for repetition in fields[number].split("~")]


def patient_values(segment: str) -> dict[str, list[str]]:
    """Names (PID-5), birth date (PID-7), address (PID-11), phones (PID-13) and
    identifiers (PID-3, first component) of one PID segment."""
    values = {
        "names": [part for repetition in pid_fields(segment, 5) for part in repetition],
        "birth_date": [repetition[0] for repetition in pid_fields(segment, 7)],
        "address": [part for repetition in pid_fields(segment, 11) for part in repetition],
        "phones": [part for repetition in pid_fields(segment, 13) for part in repetition],
        "identifiers": [repetition[0] for repetition in pid_fields(segment, 3)],
    }
    return {
        kind: [value.strip() for value in found if len(value.strip()) >= MIN_VALUE_LENGTH and value.strip() != '""']
        for kind, found in values.items()
    }


def corpus_messages(corpus_dir):
    for path in sorted(corpus_dir.glob("*.hl7")):
        raw = path.read_bytes()
        text = raw.decode("utf-8", "replace")
        segments = [segment.lstrip("\ufeff ") for segment in re.split(r"[\r\n]+", text)]
        pids = [segment for segment in segments if segment.startswith("PID|")]
        if pids:
            yield path.name, raw, text, pids


def searchable_text(line: dict) -> str:
    """What a reader of the line sees, minus what cannot carry data: the timestamp,
    pseudonyms, placeholders, and a traceback's frame lines (paths and our source)."""
    line = {key: value for key, value in line.items() if key != "timestamp"}
    if "exception" in line:
        line["exception"] = "\n".join(
            text for text in line["exception"].split("\n") if not text.startswith("  ")
        )
    text = json.dumps(line, ensure_ascii=False)
    return re.sub(r"<redacted[^>]*>", " ", PSEUDONYM.sub(" ", text))


BARE_DATE = re.compile(r"(19|20)\d{6}|(19|20)\d\d-\d\d-\d\d")
BARE_PHONE = re.compile(r"[-\s()./\u2011]|\d{10,11}$")
"""Phone shapes scrub_text claims in free text: with separators or parentheses, or
10-11 digits. Bare 8-digit national numbers are not recognised: they cannot be told
from record numbers and control ids."""


def test_patient_data_from_the_corpus_never_reaches_the_output(log, corpus_dir):
    checked = {"names": 0, "birth_date": 0, "address": 0, "phones": 0, "identifiers": 0}
    files = 0
    for name, raw, text, pids in corpus_messages(corpus_dir):
        files += 1
        log.stream.seek(0)
        log.stream.truncate()
        corpus_logger = logging.getLogger("corpus")
        corpus_logger.info("received %s", text, extra={"feed": "ehr", "raw": raw, "file": name})
        for segment in pids:
            values = patient_values(segment)
            corpus_logger.warning("unexpected segment %s", segment, extra={"segment": segment})
            corpus_logger.info(
                "patient",
                extra={
                    "patient_name": "^".join(values["names"]),
                    "family": values["names"][:1],
                    "dob": values["birth_date"],
                    "phone": values["phones"],
                    "address": values["address"],
                    "identifier": values["identifiers"],
                },
            )
            try:
                try:
                    raise KeyError(text)
                except KeyError as cause:
                    raise ValueError(f"cannot map {segment}") from cause
            except ValueError:
                corpus_logger.exception("mapping failed")
            for birth_date in values["birth_date"]:
                if BARE_DATE.fullmatch(birth_date):
                    corpus_logger.info("born on %s", birth_date, extra={"note": f"dob {birth_date}"})
            for phone in values["phones"]:
                if BARE_PHONE.search(phone):
                    corpus_logger.info("call %s", phone, extra={"note": f"tel {phone}"})
            output = "\n".join(searchable_text(line) for line in log.lines())
            for kind, found in values.items():
                for value in found:
                    assert value not in output, f"{name}: {kind} {value!r} reached the log"
                    checked[kind] += 1
    assert files > 100
    assert all(count > 20 for count in checked.values()), checked
