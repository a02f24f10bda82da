"""A stored message laid out for people: one row per field, named from hl7apy's
structure knowledge, with patient data redacted for roles that may not see it.

hl7apy carries every HL7 version's segment definitions (field names, data
types, component names, coded-value tables); loading a version's library
costs tens of milliseconds, so each (version, segment) lookup is cached.
Our own tokenizer (``hl7.message``) splits the message: it tolerates what
senders really send, which hl7apy's parser refuses.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import hl7apy

from hl7.message import HL7ParseError, parse

FALLBACK_VERSION = "2.5.1"

# What a role without patient data may see, per segment: fields that describe the
# message, the schedule and its resources, never the person.  Any segment not
# listed (PID, PD1, NK1, IN1, GT1, NTE, OBX, MRG, Z-segments…) is redacted
# whole but for its set id, so a new or local segment errs on the side of privacy.
VISIBLE_FIELDS: dict[str, Optional[frozenset[int]]] = {
    "MSH": None, "MSA": None, "ERR": None, "EVN": None, "RGS": None, "TQ1": None,
    "AIS": None, "AIG": None, "AIL": None, "AIP": None,
    # SCH-7 (reason) is clinical; SCH-12..19 name and reach contact people.
    "SCH": frozenset({1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27}),
    # ARQ-12..13 and 14..15 are timing; 7 (reason) and 16..19 (contacts) are not shown.
    "ARQ": frozenset({1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25}),
    "PV1": frozenset({1, 2, 3, 4, 7, 8, 9, 10, 17, 18, 39, 44, 45}),
    "RF1": frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}),
}
SET_ID_SEGMENTS = frozenset({"PID", "NK1", "IN1", "IN2", "GT1", "NTE", "OBX", "DG1", "AL1", "PRD", "CTD", "PD1"})


@dataclass
class FieldRow:
    position: str  # "PID-5", "PID-3[2]" for a repetition
    name: str  # "Patient name"
    datatype: str
    value: str
    components: list[tuple[str, str]] = field(default_factory=list)  # (name, value) when composite
    table: str = ""  # "HL70203 Identifier type"
    redacted: bool = False


@dataclass
class SegmentRows:
    name: str
    description: str
    fields: list[FieldRow]
    redacted: bool = False


def _title(code: str) -> str:
    return code.replace("_", " ").capitalize() if code else ""


@functools.lru_cache(maxsize=16)
def _library(version: str):
    return hl7apy.load_library(version)


@functools.lru_cache(maxsize=1024)
def segment_fields(version: str, segment: str) -> dict[int, tuple[str, str, tuple[str, ...], str]]:
    """Field number -> (name, data type, component names, table) for ``segment`` in ``version``."""
    library = _library(version)
    definition = library.SEGMENTS.get(segment)
    if definition is None:
        return {}
    result = {}
    for key, spec, _cardinality, _kind in definition[1]:
        number = int(key.rsplit("_", 1)[1])
        if spec[0] == "sequence":
            components = tuple(_title(child[1][3]) for child in spec[1])
            datatype, long_name, table = spec[2], spec[3], spec[4]
        else:
            components = ()
            datatype, long_name, table = spec[2], spec[3], spec[4]
        table_text = ""
        if table:
            described = library.TABLES.get(table)
            table_text = f"{table} {described[0]}" if described else table
        result[number] = (_title(long_name), datatype or "", components, table_text)
    return result


# hl7apy names fields but not segments; these are the ones scheduling feeds carry.
SEGMENT_NAMES = {
    "MSH": "Message header", "MSA": "Message acknowledgment", "ERR": "Error", "EVN": "Event type",
    "PID": "Patient identification", "PD1": "Patient additional demographic", "PV1": "Patient visit",
    "PV2": "Patient visit - additional information", "NK1": "Next of kin", "IN1": "Insurance",
    "IN2": "Insurance additional information", "GT1": "Guarantor", "MRG": "Merge patient information",
    "SCH": "Scheduling activity information", "TQ1": "Timing/quantity", "NTE": "Notes and comments",
    "RGS": "Resource group", "AIS": "Appointment information - service", "AIG": "Appointment information - general resource",
    "AIL": "Appointment information - location resource", "AIP": "Appointment information - personnel resource",
    "ARQ": "Appointment request", "APR": "Appointment preferences", "RF1": "Referral information",
    "PRD": "Provider data", "DG1": "Diagnosis", "OBX": "Observation/result", "AL1": "Patient allergy information",
}


def _known(version: str) -> str:
    return version if version in hl7apy.SUPPORTED_LIBRARIES else FALLBACK_VERSION


def layout(raw: bytes, *, patient_data: bool, redact: Callable[[str], str]) -> tuple[list[SegmentRows], str]:
    """The message as segments of named fields, and the parse problem if it has one.

    ``patient_data`` False hides every field not in :data:`VISIBLE_FIELDS`; ``redact``
    turns a hidden value into what is shown instead (a pseudonym keeps equal
    values recognisably equal without showing them)."""
    try:
        message = parse(raw)
    except HL7ParseError as exc:
        return [], f"the message cannot be read: {exc}"
    version = _known(message.version or FALLBACK_VERSION)
    rows: list[SegmentRows] = []
    for segment in message.segments:
        names = segment_fields(version, segment.name)
        visible = VISIBLE_FIELDS.get(segment.name, frozenset())
        fields: list[FieldRow] = []
        for number in range(1, segment.field_count + 1):
            name, datatype, components, table = names.get(number, ("", "", (), ""))
            shown = (patient_data or visible is None or number in visible
                     or (number == 1 and segment.name in SET_ID_SEGMENTS))
            delimiters = segment.name == "MSH" and number <= 2  # the separators themselves: never unescaped
            repetitions = segment.repetitions(number)
            for index, repetition in enumerate(repetitions, 1):
                if not repetition:
                    continue
                position = f"{segment.name}-{number}" + (f"[{index}]" if len(repetitions) > 1 else "")
                if not shown:
                    fields.append(FieldRow(position, name, datatype, redact(repetition), table=table, redacted=True))
                    continue
                values = segment.components(number, index) if components and not delimiters else []
                parts = [(components[i] if i < len(components) else f"Component {i + 1}", message.unescape(value))
                         for i, value in enumerate(values) if value] if len(values) > 1 else []
                text = repetition if delimiters or parts else message.unescape(repetition)
                fields.append(FieldRow(position, name, datatype, text, parts, table))
        hidden = not patient_data and segment.name not in VISIBLE_FIELDS
        rows.append(SegmentRows(segment.name, SEGMENT_NAMES.get(segment.name, ""), fields, hidden))
    return rows, ""
