"""Clinic data (locations, providers, resources, schedule templates) from TOML.

Loading is an upsert keyed by each record's ``code``: running it again after
editing the file updates the calendars without touching bookings.
"""
from __future__ import annotations

import tomllib
from datetime import date, time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.calendar import UNIT_MINUTES, zone
from engine.errors import InvalidRequest
from engine.models import Location, Provider, Resource, ScheduleTemplate

WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def _time(value: Any, where: str) -> time:
    if isinstance(value, time):
        return value
    try:
        return time.fromisoformat(str(value))
    except ValueError:
        raise InvalidRequest(f"{where}: expected a time like 08:00, got {value!r}") from None


def _date(value: Any, where: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise InvalidRequest(f"{where}: expected a date like 2026-01-01, got {value!r}") from None


def load_clinic(session: Session, path: Path) -> dict[str, int]:
    """Upsert the clinic file's records; returns counts by kind."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return load_clinic_data(session, data, source=str(path))


def load_clinic_data(session: Session, data: dict[str, Any], *, source: str = "clinic") -> dict[str, int]:
    counts = {"locations": 0, "providers": 0, "resources": 0, "templates": 0}

    def upsert(model, code: str, **values):
        row = session.scalars(select(model).where(model.code == code)).one_or_none()
        if row is None:
            row = model(code=code)
            session.add(row)
        for key, value in values.items():
            setattr(row, key, value)
        session.flush()
        return row

    locations = {}
    for i, item in enumerate(data.get("locations", [])):
        where = f"{source}: locations[{i}]"
        try:
            zone(item["timezone"])
        except Exception:
            raise InvalidRequest(f"{where}.timezone: not a valid IANA time zone: {item.get('timezone')!r}") from None
        locations[item["code"]] = upsert(Location, item["code"], name=item.get("name", item["code"]),
                                         timezone=item["timezone"], address=item.get("address", ""),
                                         instructions=item.get("instructions", ""))
        counts["locations"] += 1

    def location_id(code: str | None, where: str):
        if code is None:
            return None
        if code not in locations:
            row = session.scalars(select(Location).where(Location.code == code)).one_or_none()
            if row is None:
                raise InvalidRequest(f"{where}.location: unknown location {code!r}")
            locations[code] = row
        return locations[code].id

    providers = {}
    for i, item in enumerate(data.get("providers", [])):
        where = f"{source}: providers[{i}]"
        providers[item["code"]] = upsert(
            Provider, item["code"], family_name=item["family_name"], given_name=item.get("given_name", ""),
            gender=item.get("gender", "U"), languages=list(item.get("languages", [])),
            specialties=list(item.get("specialties", [])), networks=list(item.get("networks", [])),
            location_id=location_id(item.get("location"), where), active=item.get("active", True),
        )
        counts["providers"] += 1
    resources = {}
    for i, item in enumerate(data.get("resources", [])):
        where = f"{source}: resources[{i}]"
        resources[item["code"]] = upsert(Resource, item["code"], name=item.get("name", item["code"]),
                                         kind=item.get("kind", "room"),
                                         location_id=location_id(item.get("location"), where))
        counts["resources"] += 1
    for i, item in enumerate(data.get("templates", [])):
        where = f"{source}: templates[{i}]"
        provider = item.get("provider")
        resource = item.get("resource")
        if provider and provider not in providers:
            row = session.scalars(select(Provider).where(Provider.code == provider)).one_or_none()
            if row is None:
                raise InvalidRequest(f"{where}.provider: unknown provider {provider!r}")
            providers[provider] = row
        if resource and resource not in resources:
            row = session.scalars(select(Resource).where(Resource.code == resource)).one_or_none()
            if row is None:
                raise InvalidRequest(f"{where}.resource: unknown resource {resource!r}")
            resources[resource] = row
        minutes = int(item.get("slot_minutes", 15))
        if minutes % UNIT_MINUTES:
            raise InvalidRequest(f"{where}.slot_minutes: must be a multiple of {UNIT_MINUTES}, got {minutes}")
        try:
            weekdays = sorted(WEEKDAYS[d.lower()[:3]] for d in item["days"])
        except (KeyError, AttributeError):
            raise InvalidRequest(f"{where}.days: expected names like ['mon', 'tue'], got {item.get('days')!r}") from None
        upsert(
            ScheduleTemplate, item["code"],
            provider_id=providers[provider].id if provider else None,
            resource_id=resources[resource].id if resource else None,
            location_id=location_id(item["location"], where),
            weekdays=weekdays, start_time=_time(item["start"], f"{where}.start"),
            end_time=_time(item["end"], f"{where}.end"), slot_minutes=minutes,
            slot_type=item.get("slot_type", "new_patient"), capacity=int(item.get("capacity", 1)),
            effective_from=_date(item.get("effective_from", "2000-01-01"), f"{where}.effective_from"),
            effective_to=_date(item["effective_to"], f"{where}.effective_to") if item.get("effective_to") else None,
        )
        counts["templates"] += 1
    return counts
