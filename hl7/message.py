"""The HL7 v2 ER7 tokenizer: the inbound hot path.

hl7apy builds a typed object tree per message (tens of milliseconds for a
scheduling message); the listener and the mapping layer only need to address
values by position. So this module splits a message into segments and fields
eagerly (one ``str.split`` per segment), splits repetitions, components and
sub-components only when a value is asked for, and unescapes only on access.
hl7apy stays the reference: ``tests/hl7/test_message.py`` holds this tokenizer
to it over the corpus and over generated messages.

Positions follow HL7 numbering everywhere (1-based; for MSH, field 1 is the
field separator and field 2 the encoding characters), so ``PID-3.4.2`` is
``seg.value(3, 4, 2)``.

What real feeds send, and what this module does about it (see the corpus
README's quirk index):

* Bytes: UTF-8 is tried first whatever MSH-18 declares (feeds declare 8859/1
  and send UTF-8); bytes that are not valid UTF-8 are decoded with the declared
  ISO 8859 part, else Latin-1. Decoding never raises. ``Message.encoding``
  says which codec was used.
* A UTF-8 BOM, whitespace or other bytes before the header are dropped;
  FHS/BHS/BTS/FTS envelope segments are dropped.
* Segments end with CR, LF or CRLF; blank and whitespace-only lines are
  skipped; spaces and tabs around a segment are not data (hl7apy strips them
  too).
* MSH-2 written ``^~\\\\&`` (the escape character doubled by a string literal
  that was never unescaped) is read as ``^~\\&``.
* Segments glued to the previous one by a space are split apart, under a
  conservative rule: see ``GLUE_SEGMENT_IDS``.
* ``""`` (the HL7 explicit null: "delete the value you hold") is returned as
  the ``NULL`` sentinel, distinct from an absent value.

Only what makes a message unusable raises ``HL7ParseError``: no MSH, an
unusable field separator or MSH-2, several messages in one. Missing header
fields are reported by ``check_header``, so the receiver can still ACK with
the right control id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "DEFAULT_DELIMITERS",
    "GLUE_SEGMENT_IDS",
    "NULL",
    "TABLE_0357",
    "Delimiters",
    "ErrorDetail",
    "HL7ParseError",
    "Message",
    "Segment",
    "check_header",
    "escape",
    "parse",
    "split_messages",
]

_BOM_BYTES = b"\xef\xbb\xbf"
_SOFT_HYPHEN = "\u00ad"

#: HL7 table 0357 (message error condition codes) with their standard texts.
TABLE_0357: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

#: Standard segment ids that ``parse`` splits off when a space glued them to
#: the end of the previous segment (``…|N ROL|1|…``). The separator cannot
#: occur in data, so `` ROL|`` means either a lost segment separator or a
#: value that ends in " ROL" - which is why the list holds only the ids of the
#: segments the scheduling families carry and leaves out ids that are words
#: or common abbreviations in free text (APR, ACC, ADD, ERR, DSC, CON…).
#: Z-segments are never split: their names are free. A glue with no space at
#: all (corpus dcm4che__SIU_S12__1, ``…CIRURGIANTE|``) is not recognisable
#: and is left alone.
GLUE_SEGMENT_IDS = frozenset(
    {
        "AIG", "AIL", "AIP", "AIS", "AL1", "ARQ", "DB1", "DG1", "DRG", "EVN",
        "GT1", "IAM", "IN1", "IN2", "IN3", "MRG", "MSA", "NK1", "NTE", "OBR",
        "OBX", "ORC", "PD1", "PDA", "PID", "PR1", "PV1", "PV2", "RGS", "ROL",
        "SCH", "SFT", "TQ1", "UB1", "UB2",
    }
)

_ENVELOPE_IDS = ("FHS", "BHS", "BTS", "FTS")
_HEADER_RE = re.compile(r"(?:MSH|FHS|BHS)[^0-9A-Za-z\s]")
_SEGMENT_STRIP = " \t"

# MSH-18 values naming an 8-bit character set, mapped to the codec used when
# the bytes are not valid UTF-8.
_DECLARED_8BIT = {f"8859/{n}": f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 15)}
_DECLARED_8BIT["8859/1"] = "latin-1"
_FALLBACK_CODEC = "latin-1"


class _Null(str):
    """Type of ``NULL``; a ``str`` so that code which does not care sees ""."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NULL"


#: Returned by ``Segment.value`` for the HL7 explicit null ``""``. It equals
#: "" and is falsy, so it reads as empty; test ``value is NULL`` to tell "the
#: sender says: delete this" from "the sender says nothing".
NULL = _Null()


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators of one message: MSH-1 and MSH-2 (truncation is v2.7+)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it must be written for these delimiters."""
        return (
            self.component
            + self.repetition
            + self.escape
            + self.subcomponent
            + (self.truncation or "")
        )


DEFAULT_DELIMITERS = Delimiters()


class HL7ParseError(Exception):
    """The bytes cannot be used as one HL7 message.

    Carries what the NAK's ERR segment needs: the location (segment id,
    segment occurrence, field, component - HL7 numbering, None when not
    applicable), the table 0357 ``code`` and a human ``message``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        segment: str | None = "MSH",
        sequence: int | None = 1,
        field: int | None = None,
        component: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.component = component

    @property
    def detail(self) -> ErrorDetail:
        """The error as an ERR entry for the negative acknowledgement."""
        return ErrorDetail(
            self.segment, self.sequence, self.field, self.component, self.code, "E", self.message
        )


@dataclass(frozen=True)
class ErrorDetail:
    """One problem to report in an ERR segment.

    The location uses HL7 numbering, 0 or None where a part does not apply
    (an application error has no location at all). ``code`` is from HL7
    table 0357 ("101", "207"…), ``severity`` from table 0516: E error,
    W warning, I information.
    """

    segment: str | None
    sequence: int | None
    field: int | None
    component: int | None
    code: str
    severity: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in TABLE_0357:
            raise ValueError(f"{self.code!r} is not an HL7 table 0357 code")
        if self.severity not in ("E", "W", "I"):
            raise ValueError(f"severity must be E, W or I, not {self.severity!r}")

    def location_er7(self, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
        """ERR-2 (ERL): segment^sequence^field^repetition^component.

        ERL puts the field repetition before the component, so a component
        location reads ``MSH^1^9^1^2`` (repetition 1).
        """
        if not self.segment:
            return ""
        parts = [escape(self.segment, delimiters), str(self.sequence or 1)]
        if self.field:
            parts.append(str(self.field))
            if self.component:
                parts += ["1", str(self.component)]
        return delimiters.component.join(parts)

    def described(self) -> str:
        """``code SEG^sequence^field^component: message``, as an operator reads it in a
        parked message's error (``slotengine messages list``)."""
        where = [str(part) for part in (self.segment, self.sequence or 1, self.field, self.component) if part]
        return f"{self.code} {'^'.join(where) if self.segment else '-'}: {self.message}"

    def code_er7(self, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
        """ERR-3 (CWE): code^standard text^HL70357."""
        return delimiters.component.join(
            (self.code, escape(TABLE_0357[self.code], delimiters), "HL70357")
        )


class _Dialect:
    """A message's delimiters and 8-bit codec, as the accessors use them.

    Immutable and shared (see ``_dialect``) by all messages that have the same.
    """

    __slots__ = ("delimiters", "fallback_codec", "separators", "_simple")

    def __init__(self, delimiters: Delimiters, fallback_codec: str) -> None:
        self.delimiters = delimiters
        self.fallback_codec = fallback_codec
        # What Segment.value tests for, in the order it tests.
        self.separators = (
            delimiters.repetition,
            delimiters.component,
            delimiters.subcomponent,
            delimiters.escape,
        )
        simple = {
            "F": delimiters.field,
            "S": delimiters.component,
            "T": delimiters.subcomponent,
            "R": delimiters.repetition,
            "E": delimiters.escape,
            "H": "",  # start highlighting: formatting only
            "N": "",  # normal text (end highlighting)
        }
        if delimiters.truncation:
            simple["P"] = delimiters.truncation
        self._simple = simple

    def unescape(self, text: str) -> str:
        """Replace escape sequences; unknown or unterminated ones stay as written.

        Adjacent ``\\Xhh\\`` sequences are decoded together, so a UTF-8
        character split over two escapes comes out whole.
        """
        esc = self.delimiters.escape
        start = text.find(esc)
        if start < 0:
            return text
        out: list[str] = []
        pending = bytearray()  # bytes of consecutive \X..\ sequences
        pos = 0
        while start >= 0:
            end = text.find(esc, start + 1)
            if end < 0:
                break
            if start > pos:
                if pending:
                    out.append(self._decode_hex(pending))
                out.append(text[pos:start])
            sequence = text[start + 1 : end]
            hex_bytes = _hex_payload(sequence)
            if hex_bytes is not None:
                pending += hex_bytes
            else:
                if pending:
                    out.append(self._decode_hex(pending))
                replacement = self._replacement(sequence)
                out.append(esc + sequence + esc if replacement is None else replacement)
            pos = end + 1
            start = text.find(esc, pos)
        if pending:
            out.append(self._decode_hex(pending))
        out.append(text[pos:])
        return "".join(out)

    def _decode_hex(self, pending: bytearray) -> str:
        data = bytes(pending)
        pending.clear()
        return _decode_bytes(data, self.fallback_codec)

    def _replacement(self, sequence: str) -> str | None:
        simple = self._simple.get(sequence)
        if simple is not None:
            return simple
        if sequence.startswith("."):
            return _formatting(sequence[1:])
        return None


@lru_cache(maxsize=64)
def _dialect(delimiters: Delimiters, fallback_codec: str) -> _Dialect:
    return _Dialect(delimiters, fallback_codec)


_HEX_RE = re.compile(r"X((?:[0-9A-Fa-f]{2})+)\Z")


def _hex_payload(sequence: str) -> bytes | None:
    match = _HEX_RE.match(sequence)
    return bytes.fromhex(match.group(1)) if match else None


_FORMATTING_RE = re.compile(r"(br|sp|in|ti|sk|fi|nf|ce)\s*([+-]?\d*)\Z")


def _formatting(command: str) -> str | None:
    """Formatted-text commands (FT) reduced to plain text.

    A line break or vertical space becomes newlines and ``.sk`` spaces; the
    layout-only commands (indent, fill, centre) vanish.
    """
    match = _FORMATTING_RE.match(command)
    if match is None:
        return None
    name, number = match.groups()
    count = abs(int(number)) if number.lstrip("+-") else 1
    if name == "br":
        return "\n"
    if name == "sp":
        return "\n" * max(count, 1)
    if name == "sk":
        return " " * count
    return ""


def _decode_bytes(data: bytes, fallback_codec: str) -> str:
    """UTF-8 when the bytes are valid UTF-8, else ``fallback_codec``; never raises."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(fallback_codec, errors="replace")


@lru_cache(maxsize=64)
def _escape_table(delimiters: Delimiters) -> dict[int, str]:
    esc = delimiters.escape
    table = {code: f"{esc}X{code:02X}{esc}" for code in range(32) if code != ord("\t")}
    table[ord("\n")] = table[ord("\r")] = f"{esc}.br{esc}"
    table[ord(delimiters.escape)] = f"{esc}E{esc}"
    table[ord(delimiters.field)] = f"{esc}F{esc}"
    table[ord(delimiters.component)] = f"{esc}S{esc}"
    table[ord(delimiters.subcomponent)] = f"{esc}T{esc}"
    table[ord(delimiters.repetition)] = f"{esc}R{esc}"
    if delimiters.truncation:
        table[ord(delimiters.truncation)] = f"{esc}P{esc}"
    return table


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Make text safe as one ER7 value: the inverse of unescaping.

    Delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (``\\P\\`` for a
    truncation character); a line break (CR, LF or CRLF) becomes ``\\.br\\``;
    other control characters, which would break segment or MLLP framing,
    become ``\\Xhh\\``. The text ``""`` itself is written in hex, since
    written plainly it would mean "null".
    """
    if text == '""':
        return f"{delimiters.escape}X2222{delimiters.escape}"
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    return text.translate(_escape_table(delimiters))


class Segment:
    """One segment: its fields split, everything below split on demand.

    ``field``, ``repetitions`` and ``components`` return ER7 text (still
    escaped) for navigating structure; ``value`` (and ``component_values``,
    several of its values at once) return decoded text.
    """

    __slots__ = ("name", "_fields", "_dialect", "_msh")

    def __init__(self, name: str, fields: list[str], dialect: _Dialect) -> None:
        self.name = name
        self._fields = fields  # index n holds field n; index 0 the name
        self._dialect = dialect
        self._msh = name == "MSH"

    def __repr__(self) -> str:
        return f"<Segment {self.name} ({self.field_count} fields)>"

    @property
    def field_count(self) -> int:
        """The highest field position present (trailing empty fields count)."""
        return len(self._fields) - 1

    def field(self, field: int) -> str:
        """Field ``field`` as ER7 text, all repetitions; "" when absent."""
        if field < 1:
            raise ValueError("HL7 field positions start at 1")
        fields = self._fields
        return fields[field] if field < len(fields) else ""

    def repetitions(self, field: int) -> list[str]:
        """The repetitions of a field as ER7 text; [] when the field is empty."""
        text = self.field(field)
        if not text:
            return []
        if self._msh and field <= 2:
            return [text]
        return text.split(self._dialect.delimiters.repetition)

    def components(self, field: int, repetition: int = 1) -> list[str]:
        """The components of one repetition as ER7 text; [] when it is empty."""
        if repetition < 1:
            raise ValueError("HL7 repetitions are numbered from 1")
        reps = self.repetitions(field)
        if repetition > len(reps) or not reps[repetition - 1]:
            return []
        if self._msh and field <= 2:
            return reps
        return reps[repetition - 1].split(self._dialect.delimiters.component)

    def value(
        self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 1
    ) -> str:
        """The decoded value at field.component.subcomponent of a repetition.

        Returns "" when absent and ``NULL`` when the sender wrote ``""`` there
        or at an enclosing level (a null field has null components).
        """
        if field < 1 or component < 1 or subcomponent < 1 or repetition < 1:
            raise ValueError("HL7 positions are numbered from 1")
        fields = self._fields
        if field >= len(fields):
            return ""
        text = fields[field]
        if not text:
            return ""
        if self._msh and field <= 2:
            # MSH-1 and MSH-2 hold the delimiters themselves: never split.
            return text if component == subcomponent == repetition == 1 else ""
        repetition_sep, component_sep, subcomponent_sep, escape_char = self._dialect.separators
        if repetition > 1 or repetition_sep in text:
            parts = text.split(repetition_sep)
            if repetition > len(parts):
                return ""
            text = parts[repetition - 1]
        if text == '""':
            return NULL
        if component_sep in text:
            parts = text.split(component_sep)
            if component > len(parts):
                return ""
            text = parts[component - 1]
            if text == '""':
                return NULL
        elif component > 1:
            return ""
        if subcomponent_sep in text:
            parts = text.split(subcomponent_sep)
            if subcomponent > len(parts):
                return ""
            text = parts[subcomponent - 1]
            if text == '""':
                return NULL
        elif subcomponent > 1:
            return ""
        if escape_char in text:
            return self._dialect.unescape(text)
        return text

    def component_values(self, field: int, count: int, repetition: int = 1) -> list[str]:
        """``[value(field, c, 1, repetition) for c in 1..count]``, the field split once.

        For readers of a composite value (an address, a phone number), which
        would otherwise split the same field once per component.
        """
        if field < 1 or repetition < 1:
            raise ValueError("HL7 positions are numbered from 1")
        fields = self._fields
        text = fields[field] if field < len(fields) else ""
        if not text:
            return [""] * count
        if self._msh and field <= 2:
            # MSH-1 and MSH-2 hold the delimiters themselves: never split.
            values = [""] * count
            if count and repetition == 1:
                values[0] = text
            return values
        repetition_sep, component_sep, subcomponent_sep, escape_char = self._dialect.separators
        if repetition > 1 or repetition_sep in text:
            parts = text.split(repetition_sep)
            if repetition > len(parts):
                return [""] * count
            text = parts[repetition - 1]
        if text == '""':
            return [NULL] * count
        components = text.split(component_sep)
        missing = count - len(components)
        if missing > 0:
            components += [""] * missing
        elif missing < 0:
            del components[count:]
        if '"' not in text and subcomponent_sep not in text and escape_char not in text:
            return components  # the common case: plain text
        for index, text in enumerate(components):
            if text == '""':
                components[index] = NULL
                continue
            if subcomponent_sep in text:
                text = components[index] = text.split(subcomponent_sep, 1)[0]
                if text == '""':
                    components[index] = NULL
                    continue
            if escape_char in text:
                components[index] = self._dialect.unescape(text)
        return components


class Message:
    """A parsed message: its segments in order and how it was read.

    ``encoding`` is the codec the bytes were decoded with; ``repairs`` lists,
    in words, what was tolerated (BOM, leading bytes, glued segments, doubled
    escape in MSH-2, undecodable UTF-8…) - worth showing to an operator.
    """

    __slots__ = ("segments", "delimiters", "encoding", "repairs", "memo", "_dialect", "_index", "_type")

    def __init__(
        self,
        segments: list[Segment],
        dialect: _Dialect,
        encoding: str,
        repairs: tuple[str, ...],
    ) -> None:
        self.segments = segments
        self.delimiters = dialect.delimiters
        self.encoding = encoding
        self.repairs = repairs
        #: What a reader worked out from the message, for the next reader to reuse (a
        #: parsed message does not change): the mapping's look-ahead and its apply.
        self.memo: dict[Any, Any] = {}
        self._dialect = dialect
        self._index: dict[str, list[Segment]] | None = None
        self._type: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Message {self.message_type}^{self.trigger_event} {self.control_id!r}>"

    @property
    def msh(self) -> Segment:
        """The header segment (always the first)."""
        return self.segments[0]

    def segments_named(self, name: str) -> list[Segment]:
        """Every segment with this id, in message order."""
        index = self._index
        if index is None:
            index = self._index = {}
            for segment in self.segments:
                index.setdefault(segment.name, []).append(segment)
        return index.get(name, [])

    def first(self, name: str) -> Segment | None:
        """The first segment with this id, or None."""
        found = self.segments_named(name)
        return found[0] if found else None

    def occurrence(self, segment: Segment) -> int:
        """1-based occurrence of a segment among those with its id (ERR-2.2)."""
        for number, candidate in enumerate(self.segments_named(segment.name), 1):
            if candidate is segment:
                return number
        raise ValueError(f"{segment!r} is not a segment of this message")

    def unescape(self, text: str) -> str:
        """Decode escape sequences in a piece of this message's ER7 text."""
        return self._dialect.unescape(text)

    # MSH values. Coded values are stripped of spaces; MSH-9 also of soft
    # hyphens, which word processors leave in copied messages.

    @property
    def control_id(self) -> str:
        """MSH-10, the whole field decoded: with MSH-3 and MSH-4, the message's identity."""
        return self.unescape(self.msh.field(10))

    @property
    def sending_application(self) -> str:
        """MSH-3, whole (all HD components, as ER7): part of the dedupe key."""
        return self.msh.field(3).strip()

    @property
    def sending_facility(self) -> str:
        """MSH-4, whole (as ER7): part of the dedupe key."""
        return self.msh.field(4).strip()

    @property
    def receiving_application(self) -> str:
        """MSH-5, whole (as ER7)."""
        return self.msh.field(5).strip()

    @property
    def receiving_facility(self) -> str:
        """MSH-6, whole (as ER7)."""
        return self.msh.field(6).strip()

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. SIU."""
        return self._message_type()[0]

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. S12."""
        return self._message_type()[1]

    def _message_type(self) -> tuple[str, str]:
        """MSH-9.1 and MSH-9.2, read once: every reader of a message routes it by them."""
        if self._type is None:
            message_type, trigger_event = self.msh.component_values(9, 2)
            self._type = (
                _coded(message_type).replace(_SOFT_HYPHEN, ""),
                _coded(trigger_event).replace(_SOFT_HYPHEN, ""),
            )
        return self._type

    @property
    def structure(self) -> str:
        """MSH-9.3, e.g. SIU_S12 ("" when the sender left it out: v2.3 and older)."""
        return _coded(self.msh.value(9, 3)).replace(_SOFT_HYPHEN, "")

    @property
    def processing_id(self) -> str:
        """MSH-11.1: P production, T training, D debugging."""
        return _coded(self.msh.value(11))

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. 2.5.1."""
        return _coded(self.msh.value(12))

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (AL, NE, ER, SU); "" means original acknowledgement mode."""
        return _coded(self.msh.value(15))

    @property
    def application_ack_type(self) -> str:
        """MSH-16 (AL, NE, ER, SU)."""
        return _coded(self.msh.value(16))

    @property
    def charset(self) -> str:
        """MSH-18 as declared (first repetition); see ``encoding`` for what was used."""
        return _coded(self.msh.value(18))

    @property
    def enhanced_mode(self) -> bool:
        """True when the sender asked for accept acknowledgements (MSH-15/16 valued)."""
        return bool(self.accept_ack_type or self.application_ack_type)


def _coded(value: str) -> str:
    return value.strip() if value else value


def parse(raw: bytes) -> Message:
    """Tokenize one message.

    Raises ``HL7ParseError`` only when the bytes cannot be one message:
    no MSH, MSH-1 or MSH-2 unusable, or a second MSH (a batch: use
    ``split_messages``).
    """
    repairs: list[str] = []
    text, codec = _decode(raw, repairs)
    if not text.startswith("MSH"):
        text = _skip_to_header(text, repairs)
    lines = _split_lines(text)
    header = _header_line(lines, repairs)
    delimiters = _read_delimiters(lines[header].strip(_SEGMENT_STRIP), repairs)
    fs = delimiters.field
    if header:
        lines = lines[header:]
    if _looks_glued(text, fs):
        lines = _unglue(lines, fs, repairs)

    segments: list[Segment] = []
    dialect: _Dialect | None = None
    for line in lines:
        line = line.strip(_SEGMENT_STRIP)
        if not line:
            continue
        fields = line.split(fs)
        name = fields[0]
        if name == "MSH":
            if dialect is not None:
                raise HL7ParseError(
                    "a second MSH segment: several messages in one (split them first)",
                    code="100",
                    sequence=2,
                )
            fields.insert(1, fs)
            declared = fields[18].split(delimiters.repetition)[0] if len(fields) > 18 else ""
            dialect = _dialect(delimiters, _codec_for(declared))
        elif name in _ENVELOPE_IDS:
            continue
        segments.append(Segment(name, fields, dialect))
    return Message(segments, dialect, codec, tuple(repairs))


def _decode(raw: bytes, repairs: list[str]) -> tuple[str, str]:
    if raw.startswith(_BOM_BYTES):
        raw = raw[len(_BOM_BYTES) :]
        repairs.append("UTF-8 byte order mark dropped")
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    # Latin-1 maps every byte, so the header can be read to learn MSH-18.
    text = raw.decode("latin-1")
    codec = _codec_for(_declared_charset(text))
    if codec != _FALLBACK_CODEC:
        text = raw.decode(codec, errors="replace")
    repairs.append(f"not valid UTF-8: decoded as {codec}")
    return text, codec


def _codec_for(declared_charset: str) -> str:
    """The 8-bit codec for bytes that are not UTF-8: the declared one, else Latin-1."""
    if not declared_charset:
        return _FALLBACK_CODEC
    return _DECLARED_8BIT.get(declared_charset.strip().upper(), _FALLBACK_CODEC)


def _declared_charset(text: str) -> str:
    """MSH-18 (first repetition) read before the delimiters are validated."""
    match = _HEADER_RE.search(text)
    start = text.find("MSH", match.start()) if match else -1
    if start < 0 or len(text) < start + 5:
        return ""
    line = _split_lines(text[start:])[0]
    fields = line.split(line[3])
    if len(fields) < 18:
        return ""
    return fields[17].split(fields[1][1:2] or "~")[0]


def _skip_to_header(text: str, repairs: list[str]) -> str:
    match = _HEADER_RE.search(text)
    if match is None:
        if not text.strip():
            raise HL7ParseError("empty message", code="100")
        raise HL7ParseError("no MSH segment", code="100")
    start = match.start()
    if text[:start].strip():
        repairs.append(f"dropped {start} characters before the header")
    return text[start:]


def _split_lines(text: str) -> list[str]:
    """Split at CR, LF or CRLF; CR-only text (the wire format) costs one split."""
    if "\n" not in text:
        return text.split("\r")
    if "\r" not in text:
        return text.split("\n")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _header_line(lines: list[str], repairs: list[str]) -> int:
    """Index of the MSH line; FHS/BHS envelope lines before it are dropped."""
    for index, line in enumerate(lines):
        line = line.strip(_SEGMENT_STRIP)
        if line.startswith("MSH"):
            return index
        if line and not line.startswith(_ENVELOPE_IDS):
            repairs.append(f"dropped text before MSH: {line[:40]!r}")
    raise HL7ParseError("no MSH segment", code="100")


def _read_delimiters(msh_line: str, repairs: list[str]) -> Delimiters:
    if len(msh_line) < 4:
        raise HL7ParseError("MSH-1 (field separator) missing", code="101", field=1)
    fs = msh_line[3]
    end = msh_line.find(fs, 4)
    chars = msh_line[4:] if end < 0 else msh_line[4:end]
    if len(chars) >= 5 and chars[2] == chars[3]:
        chars = chars[:3] + chars[4:]
        repairs.append("MSH-2 escape character doubled: read as single")
    return _delimiters(fs, chars)


@lru_cache(maxsize=64)
def _delimiters(fs: str, chars: str) -> Delimiters:
    """Validated delimiters; cached because a feed always sends the same ones."""
    if fs.isalnum() or fs.isspace():
        raise HL7ParseError(f"MSH-1 field separator {fs!r} is not usable", code="102", field=1)
    if not chars:
        raise HL7ParseError("MSH-2 (encoding characters) missing", code="101", field=2)
    if (
        len(chars) not in (4, 5)
        or len(set(chars)) != len(chars)
        or fs in chars
        or any(c.isalnum() or c.isspace() for c in chars)
    ):
        raise HL7ParseError(
            f"MSH-2 encoding characters {chars!r} are not usable", code="102", field=2
        )
    return Delimiters(fs, chars[0], chars[1], chars[2], chars[3], chars[4:] or None)


@lru_cache(maxsize=32)
def _glue_patterns(field_separator: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """A cheap pre-check (any " XYZ|") and the exact splitter (known ids only)."""
    fs = re.escape(field_separator)
    ids = "|".join(sorted(GLUE_SEGMENT_IDS))
    return (
        re.compile(f" ([A-Z][A-Z0-9]{{2}}){fs}"),
        re.compile(f" (?=(?:{ids}){fs})"),
    )


def _looks_glued(text: str, field_separator: str) -> bool:
    candidates = _glue_patterns(field_separator)[0]
    return any(m.group(1) in GLUE_SEGMENT_IDS for m in candidates.finditer(text))


def _unglue(lines: list[str], field_separator: str, repairs: list[str]) -> list[str]:
    splitter = _glue_patterns(field_separator)[1]
    result: list[str] = []
    for line in lines:
        pieces = splitter.split(line)
        if len(pieces) > 1:
            repairs.append(
                "segment separator lost: split "
                + ", ".join(piece[:3] for piece in pieces[1:])
                + f" off {pieces[0].lstrip(_SEGMENT_STRIP)[:3]}"
            )
        result.extend(pieces)
    return result


def split_messages(raw: bytes) -> list[bytes]:
    """The messages in a file or batch, each as its own bytes.

    A message starts at an MSH segment and runs to its last segment; FHS, BHS,
    BTS and FTS envelope segments end the current message and are dropped,
    and so is anything outside a message (blank lines, text before the first
    MSH or after an envelope trailer). Each message keeps its bytes and
    separators as they were.
    """
    spans: list[list[int]] = []
    current: list[int] | None = None
    for match in re.finditer(rb"[^\r\n]+", raw):
        start, end = match.span()
        line = match.group()
        if line.startswith(_BOM_BYTES):
            line = line[len(_BOM_BYTES) :]
            start += len(_BOM_BYTES)
        stripped = line.lstrip(b" \t")
        if not stripped.strip():
            continue
        start += len(line) - len(stripped)
        head = stripped[:3]
        if head == b"MSH":
            current = [start, end]
            spans.append(current)
        elif head in (b"FHS", b"BHS", b"BTS", b"FTS"):
            current = None
        elif current is not None:
            current[1] = end
    return [raw[start:end] for start, end in spans]


_PROCESSING_IDS = frozenset({"P", "T", "D"})
_ACK_TYPES = frozenset({"AL", "NE", "ER", "SU"})
_VERSIONS = frozenset(
    {
        "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6",
        "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1",
    }
)


def check_header(msg: Message) -> list[ErrorDetail]:
    """What is missing or wrong in MSH, for the ACK's ERR segments.

    Errors (E) concern what the receiver needs to route and acknowledge:
    MSH-9 type and trigger, MSH-10, MSH-11 processing id, a version that is
    not v2, a NUL character in MSH-3, -4, -9 or -10. Warnings (W): MSH-11 or
    MSH-12 missing, a v2 version we do not know, MSH-15/16 values outside
    table 0155. Message types and events are the mapping layer's to judge
    (codes 200/201).
    """

    def at(field: int, code: str, text: str, severity: str = "E", component: int = 0) -> ErrorDetail:
        return ErrorDetail("MSH", 1, field, component, code, severity, text)

    problems: list[ErrorDetail] = []
    # the identity and type of the message are stored as text, where PostgreSQL takes no NUL
    for field, value in ((3, msg.sending_application), (4, msg.sending_facility),
                         (9, msg.message_type + msg.trigger_event), (10, msg.control_id)):
        if "\x00" in value:
            problems.append(at(field, "102", f"MSH-{field} holds a NUL character"))
    if not msg.message_type:
        problems.append(at(9, "101", "MSH-9 message type missing"))
    elif not msg.trigger_event:
        problems.append(at(9, "101", "MSH-9.2 trigger event missing", component=2))
    if not msg.control_id:
        problems.append(at(10, "101", "MSH-10 message control id missing"))
    processing_id = msg.processing_id
    if not processing_id:
        problems.append(at(11, "101", "MSH-11 processing id missing", "W"))
    elif processing_id not in _PROCESSING_IDS:
        problems.append(at(11, "202", f"MSH-11 processing id {processing_id!r} is not P, T or D"))
    version = msg.version
    if not version:
        problems.append(at(12, "101", "MSH-12 version id missing", "W"))
    elif version not in _VERSIONS:
        severity = "W" if version.startswith("2.") else "E"
        problems.append(at(12, "203", f"MSH-12 version {version!r} is not a known HL7 v2 version", severity))
    for field, value in ((15, msg.accept_ack_type), (16, msg.application_ack_type)):
        if value and value not in _ACK_TYPES:
            problems.append(
                at(field, "103", f"MSH-{field} {value!r} is not AL, NE, ER or SU", "W")
            )
    return problems
