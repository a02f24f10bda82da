"""Optional per-feed structure validation with hl7apy (``validate = true``).

hl7apy knows every version's structures, segments and data types; it is also
about a thousand times slower than our tokenizer, so it runs only on feeds
that ask for it, in a worker thread, before the message is stored.  A message
it refuses is answered AE with hl7apy's own explanation in ERR-8 and stored as
refused, so the sender's team can see what to fix.
"""
from __future__ import annotations

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import UnsupportedVersion
from hl7apy.parser import parse_message

from hl7.message import ErrorDetail, Message


def structure_problems(message: Message, raw: bytes) -> list[ErrorDetail]:
    """What hl7apy's strict validation finds wrong with the message ([] when valid)."""
    text = raw.decode(message.encoding, errors="replace").replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    text = text.lstrip("\ufeff")
    try:
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT).validate()
    except UnsupportedVersion:
        # hl7apy has no definitions for this version (2.9 and later): nothing to check it against.
        return [ErrorDetail("MSH", 1, 12, 0, "203", "W",
                            f"version {message.version or '(none)'} not validated: hl7apy has no definitions for it")]
    except Exception as exc:  # noqa: BLE001 - hl7apy reports problems as assorted exceptions
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return [ErrorDetail("MSH", 1, 9, 0, "100", "E", f"structure validation (hl7apy, v{message.version}): {reason}"[:400])]
    return []
