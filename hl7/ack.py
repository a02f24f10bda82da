"""Acknowledgements, and ER7 for outbound messages.

``build_message`` writes segments whose fields are addressed by HL7 position,
so nobody counts separators by hand::

    build_message([("MSH", {3: "SLOTENGINE", 7: ts, 9: ["SIU", "S12", "SIU_S12"], ...}),
                   ("SCH", {1: ["123", "PLACER"], 25: "Booked"})])

A field value is text (escaped for you), ``None`` (empty), ``NULL`` (written
``""``), ``Raw`` ER7 (inserted as is), a list (components; a list inside a
component is its sub-components) or ``Repeat`` (repetitions of any of these).

``build_ack`` answers an inbound message the way HL7 v2 expects (see
HL7-SCHEDULING.md): sender and receiver swapped, MSA-2 echoing MSH-10, the
problems in ERR, all in the terms of the sender's HL7 version; and it still
answers when the inbound bytes could not be parsed, salvaging what it can of
the header so the sender can match the NAK.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from hl7.message import (
    DEFAULT_DELIMITERS,
    NULL,
    TABLE_0357,
    Delimiters,
    ErrorDetail,
    HL7ParseError,
    Message,
    escape,
    parse,
)

__all__ = [
    "ACK_CODES",
    "ErrorDetail",
    "Raw",
    "Repeat",
    "build_ack",
    "build_message",
    "escape",
    "hl7_timestamp",
]

#: MSA-1 codes: original mode (AA/AE/AR) and enhanced-mode accept ACKs (CA/CE/CR).
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")


class Raw(str):
    """ER7 text written as is: already escaped, with the message's delimiters."""

    __slots__ = ()


class Repeat(tuple):
    """The repetitions of one field."""

    __slots__ = ()


Leaf = str | int | None
Component = Leaf | Sequence[Leaf]
Repetition = Leaf | Sequence[Component]
FieldValue = Repetition | Repeat


def build_message(
    segments: Iterable[tuple[str, Mapping[int, FieldValue]]],
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    codec: str = "utf-8",
) -> bytes:
    """ER7 bytes for the given segments, each ended by CR (no MLLP framing).

    For MSH, fields 1 and 2 are written from ``delimiters``; do not give them.
    Characters the codec cannot represent become "?". Trailing spaces in the
    last field of a segment are not data to receivers (ours included).
    """
    lines = []
    for name, fields in segments:
        if not _SEGMENT_ID.match(name):
            raise ValueError(f"{name!r} is not a segment id")
        if name == "MSH":
            if 1 in fields or 2 in fields:
                raise ValueError("MSH-1 and MSH-2 come from the delimiters")
            items = [name + delimiters.field + delimiters.encoding_characters]
            first = 3
        else:
            items = [name]
            first = 1
        if fields and min(fields) < 1:
            raise ValueError("HL7 field positions start at 1")
        for position in range(first, max(fields, default=0) + 1):
            value = fields.get(position)
            items.append("" if value is None else _field(value, delimiters))
        while not items[-1]:
            items.pop()  # trailing empty fields are not written
        lines.append(delimiters.field.join(items) + "\r")
    return "".join(lines).encode(codec, errors="replace")


def _field(value: FieldValue, d: Delimiters) -> str:
    if isinstance(value, str):  # most fields are one value: no structure to walk
        return _leaf(value, d)
    if isinstance(value, Repeat):
        return d.repetition.join(_repetition(item, d) for item in value)
    return _repetition(value, d)


def _repetition(value: Repetition, d: Delimiters) -> str:
    if isinstance(value, (list, tuple)):
        return d.component.join(_component(item, d) for item in value)
    return _leaf(value, d)


def _component(value: Component, d: Delimiters) -> str:
    if isinstance(value, (list, tuple)):
        return d.subcomponent.join(_leaf(item, d) for item in value)
    return _leaf(value, d)


def _leaf(value: Leaf, d: Delimiters) -> str:
    if value is None:
        return ""
    if value is NULL:
        return '""'
    if isinstance(value, Raw):
        return value
    return escape(str(value), d)


def hl7_timestamp(moment: datetime) -> str:
    """DTM to the second with its UTC offset: YYYYMMDDHHMMSS+ZZZZ."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("an HL7 timestamp needs a timezone-aware datetime")
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    # strftime("%Y%m%d%H%M%S"), at a fraction of its cost: every ACK carries one
    return (f"{moment.year}{moment.month:02d}{moment.day:02d}{moment.hour:02d}{moment.minute:02d}"
            f"{moment.second:02d}{sign}{hours:02d}{minutes:02d}")


class _InboundHeader(NamedTuple):
    """What an ACK echoes, as ER7 in ``delimiters`` ("" when unknown)."""

    delimiters: Delimiters
    codec: str
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    trigger_event: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    charset: str = ""


def _header_of(msg: Message) -> _InboundHeader:
    msh = msg.msh
    return _InboundHeader(
        delimiters=msg.delimiters,
        codec=msg.encoding,
        sending_application=msh.field(3),
        sending_facility=msh.field(4),
        receiving_application=msh.field(5),
        receiving_facility=msh.field(6),
        trigger_event=escape(msg.trigger_event, msg.delimiters),
        control_id=msh.field(10),
        processing_id=msh.field(11),
        version=msh.field(12),
        charset=msh.field(18),
    )


def _salvage_header(raw: bytes) -> _InboundHeader:
    """The header of bytes that did not parse as a message.

    The MSH line alone often parses (the message failed for a later reason);
    otherwise its fields are split at the character after "MSH" and taken as
    plain text, escaped with the default delimiters. Latin-1 keeps the bytes
    we echo exactly as they came.
    """
    start = raw.find(b"MSH")
    if start < 0:
        return _InboundHeader(DEFAULT_DELIMITERS, "latin-1")
    line = re.split(rb"[\r\n]", raw[start:], maxsplit=1)[0]
    try:
        return _header_of(parse(line))
    except HL7ParseError:
        pass
    text = line.decode("latin-1")
    if len(text) < 4 or text[3].isalnum():
        return _InboundHeader(DEFAULT_DELIMITERS, "latin-1")
    fields = text.split(text[3])
    fields.insert(1, text[3])  # fields[n] is MSH-n, as in parse()

    def text_of(position: int) -> str:
        value = fields[position].strip() if position < len(fields) else ""
        return escape(value, DEFAULT_DELIMITERS)

    return _InboundHeader(
        DEFAULT_DELIMITERS,
        "latin-1",
        sending_application=text_of(3),
        sending_facility=text_of(4),
        receiving_application=text_of(5),
        receiving_facility=text_of(6),
        control_id=text_of(10),
    )


def build_batch_ack(inbound: bytes, acks: list[bytes], *, control_id: str, now: datetime) -> bytes:
    """The reply to a batch of several messages: their acknowledgements in order, in a
    BHS/BTS envelope, and FHS/FTS when the batch came in one.  Each envelope header is
    the inbound one with sender and receiver swapped, our time and ``control_id`` in
    BHS-11 (FHS-11), and the inbound BHS-11 (FHS-11) echoed in BHS-12 (FHS-12)."""
    lines = [line.strip() for line in re.split(rb"\r\n|\r|\n", inbound)]
    timestamp = hl7_timestamp(now).encode()

    def header(name: bytes) -> bytes | None:
        line = next((line for line in lines if line.startswith(name) and len(line) > 3), None)
        if line is None:
            return None
        separator = line[3:4]
        fields = line.split(separator)  # fields[n - 1] is field n, from field 2 on

        def field(n: int) -> bytes:
            return fields[n - 1] if n - 1 < len(fields) else b""
        return separator.join([name, field(2), field(5), field(6), field(3), field(4), timestamp,
                               b"", b"", b"", control_id.encode(), field(11)])

    batch = header(b"BHS") or b"BHS|^~\\&|||||" + timestamp + b"||||" + control_id.encode()
    separator = batch[3:4]
    segments = [batch, *(ack.strip(b"\r") for ack in acks), b"BTS" + separator + str(len(acks)).encode()]
    file_header = header(b"FHS")
    if file_header is not None:
        segments = [file_header, *segments, b"FTS" + file_header[3:4] + b"1"]
    return b"\r".join(segments) + b"\r"


def new_control_id() -> str:
    """A fresh MSH-10 for a message we originate (ACKs, replies, outbound): 20 hex
    digits, 80 random bits."""
    return secrets.token_hex(10).upper()


def build_ack(
    msg: Message | None,
    code: str,
    errors: Iterable[ErrorDetail] = (),
    text: str = "",
    *,
    control_id: str,
    now: datetime,
    raw_header: bytes | None = None,
    version_fallback: str = "2.5.1",
) -> bytes:
    """An ACK for ``msg``, or for ``raw_header`` bytes when ``msg`` is None.

    ``code`` is MSA-1 (AA/AE/AR, or CA/CE/CR in enhanced mode), ``control_id``
    our new MSH-10, ``now`` (timezone-aware) MSH-7. The ACK uses the inbound
    delimiters and codec and echoes MSH-11, MSH-12 (``version_fallback`` when
    there is none) and MSH-18. Returns ER7 bytes without MLLP framing.

    The ACK is written in the inbound version's terms, because strict
    receivers check them: each error becomes an ERR with ERR-2 location,
    ERR-3 code, ERR-4 severity and ERR-8 text (v2.5+); before v2.5 the ACK
    has one ERR whose repeating ERR-1 holds location and code, and the
    messages go to MSA-3. ``text`` is MSA-3, which v2.7 withdrew: from v2.7
    on it travels as an ERR of its own (I/0 on acceptance, else E/207).
    MSH-9 is ``ACK^<trigger>^ACK`` (``ACK^<trigger>`` before v2.3.1).
    """
    if code not in ACK_CODES:
        raise ValueError(f"MSA-1 must be one of {sorted(ACK_CODES)}, not {code!r}")
    if not control_id:
        raise ValueError("the ACK needs its own control id (MSH-10)")
    if msg is not None:
        header = _header_of(msg)
    elif raw_header is not None:
        header = _salvage_header(raw_header)
    else:
        header = _InboundHeader(DEFAULT_DELIMITERS, "utf-8")
    d = header.delimiters
    version = header.version or escape(version_fallback, d)
    release = _release(version.split(d.component)[0], default=_release(version_fallback))
    errors = list(errors)

    # Letters and digits ("ACK", "P", the MSA-1 code) need no escaping, whatever the delimiters.
    message_type = ["ACK", header.trigger_event, "ACK"] if release >= (2, 3, 1) else ["ACK", header.trigger_event]
    msh: dict[int, FieldValue] = {
        3: Raw(header.receiving_application),
        4: Raw(header.receiving_facility),
        5: Raw(header.sending_application),
        6: Raw(header.sending_facility),
        7: hl7_timestamp(now),
        9: Raw(d.component.join(message_type)),
        10: control_id,
        11: Raw(header.processing_id or "P"),
        12: Raw(version),
    }
    if header.charset:
        msh[18] = Raw(header.charset)
    msa: dict[int, FieldValue] = {1: Raw(code), 2: Raw(header.control_id)}
    segments: list[tuple[str, Mapping[int, FieldValue]]] = [("MSH", msh), ("MSA", msa)]

    if release < (2, 5):
        msa[3] = text or "; ".join(error.message for error in errors)
        if errors:
            locations = Repeat(Raw(_error_code_and_location(error, d)) for error in errors)
            segments.append(("ERR", {1: locations}))
        return build_message(segments, d, header.codec)

    if text and release >= (2, 7):
        accepted = code in ("AA", "CA")
        errors.append(
            ErrorDetail(None, None, None, None, "0" if accepted else "207", "I" if accepted else "E", text)
        )
    elif text:
        msa[3] = text
    for error in errors:
        segments.append(
            (
                "ERR",
                {
                    2: Raw(error.location_er7(d)),
                    3: Raw(error.code_er7(d)),
                    4: error.severity,
                    8: error.message,
                },
            )
        )
    return build_message(segments, d, header.codec)


def _error_code_and_location(error: ErrorDetail, d: Delimiters) -> str:
    """ERR-1 (ELD, before v2.5): segment^sequence^field^code&text&HL70357."""
    return d.component.join(
        (
            escape(error.segment or "", d),
            str(error.sequence or 1) if error.segment else "",
            str(error.field) if error.field else "",
            d.subcomponent.join((error.code, escape(TABLE_0357[error.code], d), "HL70357")),
        )
    )


def _release(version: str, default: tuple[int, ...] = (2, 5, 1)) -> tuple[int, ...]:
    """(2, 3, 1) for "2.3.1"; ``default`` for a version that is not numbers."""
    try:
        return tuple(int(part) for part in version.strip().split("."))
    except ValueError:
        return default
