"""The daily flow report of a location: ``slotengine report flow --date D``.

Computed from the schedule's own tables for one clinic-local day (local
midnight to local midnight: 23 or 25 hours on the nights the clocks change):

* arrivals per window (``[plugins.flow] window_minutes``, wall-clock windows
  as arrival smoothing cuts them): appointments on the schedule — held,
  booked, arrived, checked in, completed, and the no-shows — starting in it,
  the no-shows among them, and whether the window is over the location's
  ``max_arrivals``;
* per provider: slot minutes (open, unblocked slots), booked minutes (the
  appointments that hold time: held, booked, overbooked, arrived, checked in,
  completed; a no-show gave its time back), utilisation = booked ÷ slot
  minutes (above 1 when overbooked), gaps (open slot time nobody holds),
  overbooks (appointments overlapping an earlier one of the same provider, or
  flagged overbooked), no-shows, and the worst running-late estimate;
* the same totals for the location.

``render_table`` prints it, ``render_png`` draws it with matplotlib (Agg, no
display): bars carry their numbers and hatching, and the limit is a dashed,
labelled line, so the chart reads without colour.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.calendar import zone
from engine.models import Appointment, FlowDelay, Location, Provider, Slot
from engine.states import OCCUPYING, Status
from plugins.flow import Settings, arrival_window, local_day_bounds

_HOLDING = frozenset(s.value for s in OCCUPYING)
_ON_SCHEDULE = _HOLDING | {Status.NO_SHOW.value}


def _minutes(delta: timedelta) -> int:
    return int(delta.total_seconds() // 60)


def _merge(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _subtract(free: list[tuple[datetime, datetime]], taken: list[tuple[datetime, datetime]]):
    """``free`` minus ``taken`` (both merged, sorted)."""
    left = []
    for start, end in free:
        cursor = start
        for t_start, t_end in taken:
            if t_end <= cursor or t_start >= end:
                continue
            if t_start > cursor:
                left.append((cursor, t_start))
            cursor = max(cursor, t_end)
        if cursor < end:
            left.append((cursor, end))
    return left


def flow_report(session: Session, day: date, settings: Settings,
                location_code: Optional[str] = None) -> list[dict[str, Any]]:
    """One report per location (or the one named), for the clinic-local ``day``."""
    stmt = select(Location).order_by(Location.code)
    if location_code:
        stmt = stmt.where(Location.code == location_code)
    locations = list(session.scalars(stmt))
    if location_code and not locations:
        raise LookupError(f"unknown location {location_code!r}")
    return [_location_report(session, day, settings, location) for location in locations]


def _location_report(session: Session, day: date, settings: Settings, location: Location) -> dict[str, Any]:
    tz = location.timezone
    local = zone(tz)
    day_start, day_end = local_day_bounds(day, tz)
    changes_clocks = day_end - day_start != timedelta(hours=24)

    def label(instant: datetime) -> str:
        # on the nights the clocks change 01:30 can happen twice: the zone's abbreviation tells which
        when = instant.astimezone(local)
        return f"{when:%H:%M} {when:%Z}" if changes_clocks else f"{when:%H:%M}"

    slots = list(session.execute(select(Slot.provider_id, Slot.start, Slot.end, Slot.blocked, Slot.slot_type).where(
        Slot.location_id == location.id, Slot.start >= day_start, Slot.start < day_end)))
    appointments = list(session.scalars(select(Appointment).where(
        Appointment.location_id == location.id, Appointment.start >= day_start, Appointment.start < day_end,
        Appointment.status.in_(_ON_SCHEDULE)).order_by(Appointment.start, Appointment.id)))
    codes = dict(session.execute(select(Provider.id, Provider.code)).all())
    limit = settings.limit_for(location.code)

    windows: list[dict[str, Any]] = []
    starts = [s.start for s in slots] + [a.start for a in appointments]
    if starts:
        cursor, _ = arrival_window(min(starts), tz, settings.window_minutes)
        last, _ = arrival_window(max(starts), tz, settings.window_minutes)
        step = timedelta(minutes=settings.window_minutes)
        while cursor <= last:
            inside = [a for a in appointments if cursor <= a.start < cursor + step]
            arrivals = len(inside)
            windows.append({
                "start": cursor.isoformat(), "local_start": cursor.astimezone(local).isoformat(),
                "label": label(cursor), "arrivals": arrivals,
                "no_shows": sum(1 for a in inside if a.status == Status.NO_SHOW.value),
                "limit": limit, "over_limit": limit is not None and arrivals > limit,
            })
            cursor += step

    worst_delay: dict[int, int] = {}
    for delay in session.scalars(select(FlowDelay).where(FlowDelay.location_id == location.id,
                                                         FlowDelay.local_day == day)):
        minutes = max((e.get("delay_minutes", 0) for e in delay.estimates), default=0)
        worst_delay[delay.provider_id] = max(worst_delay.get(delay.provider_id, 0), minutes, delay.observed_minutes)

    provider_ids = sorted({s.provider_id for s in slots if s.provider_id is not None}
                          | {a.provider_id for a in appointments if a.provider_id is not None},
                          key=lambda pid: codes.get(pid, ""))
    providers, no_shows, overbooks = [], [], []
    for provider_id in provider_ids:
        open_slots = _merge([(s.start, s.end) for s in slots if s.provider_id == provider_id
                             and not s.blocked and s.slot_type != "blocked"])
        slot_minutes = sum(_minutes(end - start) for start, end in open_slots)
        mine = [a for a in appointments if a.provider_id == provider_id]
        holding = [a for a in mine if a.status in _HOLDING]
        booked_minutes = sum(_minutes(a.end - a.start) for a in holding)
        flagged = []
        reach: Optional[datetime] = None
        for appointment in holding:  # by start: one that begins before the ones before it end is double-booked
            if (reach is not None and appointment.start < reach) or appointment.status == Status.OVERBOOKED.value:
                flagged.append(appointment)
            reach = appointment.end if reach is None else max(reach, appointment.end)
        gaps = _subtract(open_slots, _merge([(a.start, a.end) for a in holding]))
        missed = [a for a in mine if a.status == Status.NO_SHOW.value]
        code = codes.get(provider_id, str(provider_id))
        no_shows += [{"appointment_id": a.id, "provider": code, "local_start": label(a.start),
                      "minutes": _minutes(a.end - a.start)} for a in missed]
        overbooks += [{"appointment_id": a.id, "provider": code, "local_start": label(a.start),
                       "status": a.status} for a in flagged]
        providers.append({
            "provider": code, "slot_minutes": slot_minutes, "booked_minutes": booked_minutes,
            "utilisation": round(booked_minutes / slot_minutes, 3) if slot_minutes else None,
            "gap_minutes": sum(_minutes(end - start) for start, end in gaps),
            "gaps": [{"local_start": label(start), "local_end": label(end), "minutes": _minutes(end - start)}
                     for start, end in gaps],
            "overbooks": len(flagged), "no_shows": len(missed),
            "no_show_minutes": sum(_minutes(a.end - a.start) for a in missed),
            "worst_delay_minutes": worst_delay.get(provider_id),
        })
    slot_total = sum(p["slot_minutes"] for p in providers)
    booked_total = sum(p["booked_minutes"] for p in providers)
    return {
        "location": location.code, "name": location.name, "timezone": tz, "date": day.isoformat(),
        "day_hours": (day_end - day_start).total_seconds() / 3600, "window_minutes": settings.window_minutes,
        "limit": limit, "windows": windows, "providers": providers, "no_shows": no_shows, "overbooks": overbooks,
        "totals": {
            "arrivals": len(appointments), "no_shows": len(no_shows), "overbooks": len(overbooks),
            "slot_minutes": slot_total, "booked_minutes": booked_total,
            "utilisation": round(booked_total / slot_total, 3) if slot_total else None,
            "gap_minutes": sum(p["gap_minutes"] for p in providers),
            "windows_over_limit": sum(1 for w in windows if w["over_limit"]),
        },
    }


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    widths = [max(len(c), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def render_table(reports: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for report in reports:
        totals = report["totals"]
        limit = f"limit {report['limit']} per window" if report["limit"] else "no arrival limit"
        out.append(f"Flow at {report['location']} ({report['name']}) on {report['date']}, {report['timezone']}, "
                   f"a {report['day_hours']:g}-hour day; {report['window_minutes']}-minute windows, {limit}")
        out.append(f"arrivals {totals['arrivals']}, utilisation {_percent(totals['utilisation'])} "
                   f"({totals['booked_minutes']} of {totals['slot_minutes']} slot minutes), gaps "
                   f"{totals['gap_minutes']} min, overbooks {totals['overbooks']}, no-shows {totals['no_shows']}, "
                   f"windows over the limit {totals['windows_over_limit']}")
        out.append("")
        out += _table(["WINDOW", "ARRIVALS", "NO-SHOWS", "OVER LIMIT"],
                      [[w["label"], w["arrivals"], w["no_shows"], "yes" if w["over_limit"] else ""]
                       for w in report["windows"]])
        out.append("")
        out += _table(["PROVIDER", "SLOT MIN", "BOOKED MIN", "UTILISATION", "GAP MIN", "OVERBOOKS", "NO-SHOWS",
                       "LATE MIN", "GAPS"],
                      [[p["provider"], p["slot_minutes"], p["booked_minutes"], _percent(p["utilisation"]),
                        p["gap_minutes"], p["overbooks"], p["no_shows"],
                        "" if p["worst_delay_minutes"] is None else p["worst_delay_minutes"],
                        ", ".join(f"{g['local_start']}-{g['local_end']}" for g in p["gaps"])]
                       for p in report["providers"]])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_png(reports: list[dict[str, Any]], path: str) -> None:
    """Draw each location's arrivals per window and utilisation per provider into one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the PNG chart needs matplotlib: pip install 'slotengine[charts]'") from None
    matplotlib.use("Agg")  # no display; the canvas below is Agg anyway, this keeps pyplot users safe too
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(reports), 1)
    figure = Figure(figsize=(12, 5.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for (arrivals_ax, use_ax), report in zip(axes, reports):
        windows = report["windows"]
        positions = range(len(windows))
        shown = [w["arrivals"] - w["no_shows"] for w in windows]
        arrivals_ax.bar(positions, shown, color="#4c72b0", edgecolor="black", label="arrivals")
        arrivals_ax.bar(positions, [w["no_shows"] for w in windows], bottom=shown, color="white",
                        edgecolor="black", hatch="xx", label="no-shows")
        over = [i for i, w in enumerate(windows) if w["over_limit"]]
        if over:
            arrivals_ax.bar(over, [windows[i]["arrivals"] for i in over], fill=False, edgecolor="black",
                            linewidth=2, hatch="//", label="over the limit")
        for i, w in enumerate(windows):
            if w["arrivals"]:
                arrivals_ax.annotate(str(w["arrivals"]), (i, w["arrivals"]), ha="center", va="bottom", fontsize=8)
        if report["limit"]:
            arrivals_ax.axhline(report["limit"], color="black", linestyle="--", linewidth=1.2,
                                label=f"limit {report['limit']}")
        step = max(1, len(windows) // 16)
        arrivals_ax.set_xticks(list(positions)[::step], [w["label"] for w in windows][::step], rotation=60,
                               fontsize=8)
        arrivals_ax.set_ylim(0, max([w["arrivals"] for w in windows] + [report["limit"] or 0, 1]) + 1)  # room for labels
        arrivals_ax.set_ylabel("patients arriving")
        arrivals_ax.set_title(f"{report['location']} {report['date']}: arrivals per "
                              f"{report['window_minutes']}-minute window ({report['timezone']})")
        arrivals_ax.legend(loc="upper right", fontsize=8)
        arrivals_ax.yaxis.get_major_locator().set_params(integer=True)

        providers = report["providers"]
        names = [p["provider"] for p in providers]
        used = [(p["utilisation"] or 0) * 100 for p in providers]
        use_ax.barh(names, used, color="#55a868", edgecolor="black", hatch="..")
        use_ax.axvline(100, color="black", linestyle=":", linewidth=1)
        for i, p in enumerate(providers):
            note = (f"{_percent(p['utilisation'])} ({p['booked_minutes']}/{p['slot_minutes']} min)"
                    f"  gaps {p['gap_minutes']}  ob {p['overbooks']}  ns {p['no_shows']}")
            use_ax.annotate(note, (used[i], i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        use_ax.set_xlim(0, max([110.0] + [u * 1.6 for u in used]))
        use_ax.invert_yaxis()
        use_ax.set_xlabel("utilisation: booked / slot minutes (%)")
        use_ax.set_title("per provider (ob: overbooks, ns: no-shows)")
    figure.savefig(path, format="png", dpi=100)
