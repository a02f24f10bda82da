"""JSON log lines, with patient data redacted in one place for every logger.

:func:`configure_logging` gives the root logger one handler that writes one JSON
object per line (python-json-logger)::

    {"timestamp": "2026-01-15T10:00:00.123Z", "level": "INFO", "logger": "hl7.listener",
     "event": "message stored", "feed": "ehr", "control_id": "MSG00001", "peer": "10.0.0.5"}

``timestamp`` is ISO 8601 in UTC, ``event`` the formatted message, and every ``extra=``
key follows; a traceback is in ``exception``, stack information in ``stack``.

Redaction is a :class:`logging.Filter` on that handler, so it applies to every record
of every library before anything is formatted:

* Context keys that carry patient data -- :data:`PATIENT_DATA_KEYS`, matched
  case-insensitively, also inside nested mappings and dataclasses -- have their values
  replaced by a keyed pseudonym, ``~`` and 10 hex digits of HMAC-SHA256: one value
  gives one pseudonym for as long as the key lives, so operators can follow a patient
  through the log without seeing who it is.
* The message, the string values of all other context, tracebacks (formatted, then
  scrubbed: an exception's message may quote a segment) and stack information are
  scrubbed by :func:`scrub_text` of: HL7 segments with data
  (``PID|1||12345^^^MRN||DOE^JOHN`` -> ``PID|<redacted 24 bytes>``, whatever the field
  separator), e-mail addresses, phone numbers, SSN-shaped numbers, and date-only values
  shaped like birth dates (``19800101``, ``1980-01-01``, ``01/02/1980``). A date with a
  time of day attached (``2026-01-15T09:00``, ``20260115090000``) is how appointments
  are written and is kept.

What scrubbing cannot do is recognise a name, a street or a record number in free text.
Log those under a patient-data key (``extra={"patient_name": ...}``) or not at all.

Numbers, booleans, dates and times, enums and UUIDs in the context are logged as they
are; bytes are decoded and scrubbed; any other object is logged as its scrubbed str().
If redaction fails for any reason the line is still written, with its event and all
context replaced by placeholders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
import sys
import traceback
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from enum import Enum
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The levels the configuration and :func:`set_level` accept."""

PATIENT_DATA_KEYS = frozenset(
    {
        # names
        "patient_name", "name", "family", "family_name", "given", "given_name", "middle_name",
        "maiden_name", "mothers_maiden_name", "alias",
        # birth
        "birth_date", "date_of_birth", "dob", "birth_place",
        # contact
        "phone", "phone_number", "home_phone", "work_phone", "mobile", "email",
        "address", "street", "city", "postal_code", "zip",
        # identifiers
        "mrn", "patient_id_value", "identifier", "ssn", "member_id", "subscriber_id",
        "policy_number", "account_number", "nhs_number",
        # other people tied to the patient
        "next_of_kin", "guarantor",
    }
)
"""Context keys whose values are patient data, lower-case; matched case-insensitively.

Internal surrogate ids (``patient_id``, ``appointment_id``) are not on the list: they
identify rows in our database, not people, and operators need them.
"""

PSEUDONYM_HEX_DIGITS = 10

_NESTING_LIMIT = 8
"""Context nested deeper than this is replaced, not walked (it may be self-referencing)."""

_PASSED_AS_IS = (bool, int, float, date, time, timedelta, Enum, uuid.UUID)

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
"""Attributes every LogRecord has; everything else on a record came from ``extra=``."""


def pseudonym(value: Any, key: bytes) -> str:
    """``~`` and the first hex digits of HMAC-SHA256(key, str(value))."""
    digest = hmac.new(key, str(value).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "~" + digest[:PSEUDONYM_HEX_DIGITS]


# Digit groups of a phone number are separated by a dash (including the Unicode
# hyphens word processors put in), a dot, or a space; a dash may be followed by a space.
_DASH = r"\-\u2010\u2011\u2013"
_GAP = rf"(?:[{_DASH}.]\ ?|\ )"
# Numbers in a date shape (01/02/1980, 05-01-24) are not taken for phone numbers.
_DATE_LIKE = rf"\d\d?[/.{_DASH}]\d\d?[/.{_DASH}]\d"

# One pass over the text finds segments, dates, SSNs and phone numbers; the empty
# group at the end of each branch names what was found. Branches that start with a
# digit, "+" or "(" sit behind one lookahead, so that at any other character the
# engine dismisses them all at once: a short message is scrubbed in microseconds.
_SENSITIVE_TEXT = re.compile(
    rf"""
        \b[A-Z][A-Z0-9]{{2}}                                 # a segment: PID, NK1, ZPD ...
        (?:
            \|(?=[^\r\n])                                    # the usual field separator
          | (?P<other_separator>[\^#!@%*~&\\])               # or another, seen again soon
            (?=[^\r\n]{{0,64}}?(?P=other_separator))
        )
        [^\r\n]*                                             # its fields, to the end of the line
        (?P<segment>)
      | (?=[\d+(])
        (?:
            (?<!\d)(?:
                (?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)                          # 19800101
              | (?:19|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])(?![\dT]|\ \d\d?:)  # 1980-01-01
              | (?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:19|20)\d\d(?![\dT]|\ \d\d?:)  # 01/02/1980
            )
            (?P<date>)
          | (?<![\w-])\d{{3}}-\d{{2}}-\d{{4}}(?![\w-])                           # 444-33-3333
            (?P<ssn>)
          | (?:
                (?<![\w+])\+\d(?:{_GAP}?\(?\d\)?){{6,14}}(?!\d)                   # +1 555 555 1234: 7-15 digits
              | (?<![\w(])\(\d{{2,5}}\)\ ?\d{{3,4}}{_GAP}?\d{{3,4}}(?!\d)          # (555)555-1234, (020) 7946 0958
              | (?<![\w.{_DASH}])\d{{3}}{_GAP}\d{{3}}{_GAP}\d{{4}}(?![\w{_DASH}])  # 555-555-1234, 555.555.1234
              | (?<![\w.{_DASH}])\d{{3}}[{_DASH}]\d{{4}}(?![\w{_DASH}])            # 555-1234
              | (?<!\d)(?:1?[2-9]\d\d[2-9]\d{{6}}|0\d{{9,10}})(?!\d)               # 5555551234, 07700900123
              | (?<![\w./{_DASH}])(?!{_DATE_LIKE})                               # 050-1234567, 01/56 65 99
                0\d{{1,4}}(?:[/{_DASH}\ ]\ ?\d{{5,8}}|(?:[/{_DASH}\ ]\ ?\d{{2,4}}){{2,4}}+)(?![\d:])
            )
            (?P<phone>)
        )
    """,
    re.VERBOSE,
)
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
_PLACEHOLDERS = {
    "date": "<redacted date>",
    "ssn": "<redacted ssn>",
    "phone": "<redacted phone>",
}


def _placeholder(match: re.Match[str]) -> str:
    if match.lastgroup == "segment":
        segment = match[0]
        size = len(segment[4:].encode("utf-8", "surrogatepass"))
        return f"{segment[:4]}<redacted {size} bytes>"
    return _PLACEHOLDERS[match.lastgroup or ""]


def scrub_text(text: str) -> str:
    """``text`` with e-mail addresses, HL7 segments, birth-date-shaped dates, SSNs and
    phone numbers replaced by placeholders.

    E-mail addresses go first, so that digits in one are not taken for a date; the
    size given for a segment counts its fields as they were after that.
    """
    if "@" in text:
        text = _EMAIL.sub("<redacted email>", text)
    return _SENSITIVE_TEXT.sub(_placeholder, text)


class RedactionFilter(logging.Filter):
    """Redacts each record in place (see the module's docstring); never drops one.

    In place: handlers that run after this one see the redacted record too.
    """

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self._key = key

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception as error:  # whatever went wrong, the line is written, redacted
            _replace_everything(record, error)
        return True

    def _redact(self, record: logging.LogRecord) -> None:
        # Everything is computed before the record is touched: a failure leaves no half-redacted record.
        if isinstance(record.msg, dict):  # python-json-logger logs a dict message as fields
            message: Any = self.redact_value("", record.msg)
        else:
            message = scrub_text(record.getMessage())
        exception_text = None
        if record.exc_info and record.exc_info[0] is not None:
            exception_text = scrub_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            exception_text = scrub_text(record.exc_text)
        stack_text = scrub_text(record.stack_info) if record.stack_info else None
        context = {
            key: self.redact_value(key, value)
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRIBUTES
        }
        record.msg, record.args = message, ()
        record.exc_info, record.exc_text = None, exception_text
        record.stack_info = stack_text
        vars(record).update(context)

    def redact_value(self, key: str, value: Any, depth: int = 0) -> Any:
        """``value``, logged under context ``key``, made safe to write."""
        if value is None:
            return None
        if key.casefold() in PATIENT_DATA_KEYS:
            return pseudonym(value, self._key)
        if isinstance(value, str):
            return scrub_text(value)
        if isinstance(value, _PASSED_AS_IS):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return scrub_text(bytes(value).decode("utf-8", "replace"))
        if depth >= _NESTING_LIMIT:
            return "<redacted: nested too deeply>"
        if isinstance(value, Mapping):
            return {str(name): self.redact_value(str(name), item, depth + 1) for name, item in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {
                item.name: self.redact_value(item.name, getattr(value, item.name), depth + 1)
                for item in dataclasses.fields(value)
            }
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.redact_value(key, item, depth + 1) for item in value]
        return scrub_text(str(value))


def _replace_everything(record: logging.LogRecord, error: Exception) -> None:
    record.msg = f"<log record redacted: {type(error).__name__} while redacting>"
    record.args = ()
    record.exc_info = record.exc_text = record.stack_info = None
    for key in list(vars(record)):
        if key not in _RECORD_ATTRIBUTES:
            setattr(record, key, "<redacted>")


class _JsonLineFormatter(JsonFormatter):
    """timestamp, level, logger and event first, then the context.

    A context key that collides with one of those four is written as ``extra_<key>``.
    """

    def __init__(self) -> None:
        super().__init__(rename_fields={"exc_info": "exception", "stack_info": "stack"})

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        context: dict[str, Any] = {}
        super().add_fields(context, record, message_dict)
        context.pop("message", None)  # the default format's field; written as "event"
        created = datetime.fromtimestamp(record.created, timezone.utc)
        log_data["timestamp"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["event"] = record.message
        for key, value in context.items():
            log_data[f"extra_{key}" if key in log_data else key] = value


class _JsonLinesHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs, recognised by its class when replaced."""


def configure_logging(level: str, stream: TextIO | None = None, redaction_key: bytes | None = None) -> None:
    """Send every log record to ``stream`` (default: ``sys.stderr`` at call time) as a
    redacted JSON line, at ``level`` and above.

    ``redaction_key`` keys the pseudonyms; without one a random key is drawn, so
    pseudonyms then hold only for the life of the process. Calling this again
    replaces the handler it installed before; handlers others installed are left
    alone. Python warnings are routed through logging too, so that stderr stays
    one JSON object per line.
    """
    set_level(level)
    handler = _JsonLinesHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonLineFormatter())
    handler.addFilter(RedactionFilter(redaction_key or secrets.token_bytes(32)))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """Change the root logger's level (e.g. on SIGHUP); ValueError for an unknown level."""
    name = level.upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    logging.getLogger().setLevel(name)
