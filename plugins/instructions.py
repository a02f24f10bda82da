"""Patient instructions: where to go, what to bring, how to prepare.

Lines come from, in this order: where to go (the location's name and
address), the location's own instructions (clinic data ``instructions``, one
per line), then the settings for the appointment type, for the location, and
for the pair::

    [plugins.instructions]
    bring = ["Photo ID", "Insurance card", "A list of the medicines you take"]
    [plugins.instructions.types.procedure]
    lines = ["Do not eat or drink for 8 hours before.", "Arrange a ride home."]
    [plugins.instructions.locations.WEST]
    lines = ["Parking is free in the garage on 2nd Street."]
    [plugins.instructions.pairs."procedure@MAIN"]
    lines = ["Check in at the surgery desk on floor 3."]

    # per language: [plugins.instructions.es] with the same keys (used for
    # patients whose messages are written in that language)

Lines are for the patient: write them without diagnoses.  Confirmations
and reminders (e-mail) include them; SMS and voice do not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from sqlalchemy import select

from engine.models import Appointment, Location
from engine.plugin import hookimpl

NAME = "instructions"
_LOCATIONS_TTL = 300.0  # seconds a cached location is trusted


@dataclass
class Settings:
    bring: list[str] = field(default_factory=list)
    types: dict[str, list[str]] = field(default_factory=dict)
    locations: dict[str, list[str]] = field(default_factory=dict)
    pairs: dict[str, list[str]] = field(default_factory=dict)
    _locations: dict[str, tuple[float, str, str, str]] = field(default_factory=dict)  # code -> (at, name, address, text)


def _lines(section: Any, where: str) -> list[str]:
    if section is None:
        return []
    lines = section.get("lines") if isinstance(section, dict) else section
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ValueError(f"{where}: expected lines = [\"...\", ...]")
    return list(lines)


def _parse(settings: dict[str, Any], where: str) -> Settings:
    return Settings(
        bring=_lines(settings.get("bring", []), f"{where}.bring"),
        types={k: _lines(v, f"{where}.types.{k}") for k, v in (settings.get("types") or {}).items()},
        locations={k: _lines(v, f"{where}.locations.{k}") for k, v in (settings.get("locations") or {}).items()},
        pairs={k: _lines(v, f"{where}.pairs.{k}") for k, v in (settings.get("pairs") or {}).items()},
    )


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    by_language = {"": _parse(settings, "[plugins.instructions]")}
    for key, value in settings.items():
        if key not in ("bring", "types", "locations", "pairs"):
            if not isinstance(value, dict) or len(key) > 8:
                raise ValueError(f"[plugins.instructions]: unknown setting {key!r}")
            by_language[key] = _parse(value, f"[plugins.instructions.{key}]")
    context.state[NAME] = by_language


def _location(session, settings: Settings, code: str) -> Optional[tuple[str, str, str]]:
    cached = settings._locations.get(code)
    if cached and time.monotonic() - cached[0] < _LOCATIONS_TTL:
        return cached[1:]
    if session is None:
        return None
    location = session.scalars(select(Location).where(Location.code == code)).one_or_none()
    if location is None:
        return None
    settings._locations[code] = (time.monotonic(), location.name, location.address or "", location.instructions or "")
    return settings._locations[code][1:]


@hookimpl(trylast=True)
def slotengine_patient_instructions(session, appointment: Appointment, location_code: str, language: str,
                                    context) -> Optional[list[str]]:
    if context is None or NAME not in context.state:
        return None
    by_language = context.state[NAME]
    base = by_language[""]
    settings = by_language.get(language) or base
    lines: list[str] = []
    location = _location(session, base, location_code) if location_code else None
    if location:
        name, address, text = location
        if address:
            lines.append(f"{name}, {address}")
        lines.extend(line.strip() for line in text.splitlines() if line.strip())
    kind = appointment.appointment_type
    for group in (settings.types.get(kind), settings.locations.get(location_code),
                  settings.pairs.get(f"{kind}@{location_code}")):
        lines.extend(group or [])
    if settings.bring:
        label = _BRING.get(language if settings is not base else "en", _BRING["en"])
        lines.append(f"{label}: " + ", ".join(settings.bring) + ".")
    return lines


_BRING = {"en": "Please bring", "es": "Por favor traiga"}
