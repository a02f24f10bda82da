"""The ``slotengine`` command line.

Every command that reads or writes the schedule takes ``--config FILE``
(default: the bundled demo configuration) and ``--database URL`` (overrides
the file); listings take ``--json`` (one JSON object per line).  Errors go to
stderr with a non-zero exit status, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from sqlalchemy import or_, select

from engine.calendar import to_local
from engine.errors import SchedulingError
from engine.models import Appointment, InboundMessage, Location, Patient, PatientIdentifier, Provider
from engine.requests import Actor, SlotQuery
from engine.states import HL7_FILLER_STATUS, Status

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed to stderr, exit status 1."""


# --- shared plumbing ---------------------------------------------------------------


def _load(args):
    from hl7.config import default_config_path, load_config

    path = Path(args.config) if args.config else default_config_path()
    config = load_config(path)
    return config.with_overrides(database_url=getattr(args, "database", None), listen=getattr(args, "listen", None))


def _open(args, *, migrate_empty: bool = True):
    from hl7.daemon import engine_settings, prepare_database
    from engine.db import make_session_factory
    from engine.service import Scheduler

    config = _load(args)
    engine = prepare_database(config.database.url) if migrate_empty else None
    sessions = make_session_factory(engine)
    return config, sessions, Scheduler(sessions, settings=engine_settings(config))


def _open_with_plugins(args):
    """``_open`` with the plugins as the daemon has them (slot scores and filters,
    running-late estimates, the outbound SIU feed, mirror mode's requests): a change
    made here is announced (SIU) or asked of the calendar's owner (SRM) exactly as the
    daemon's own. Also returns the plugins' context."""
    from engine.jobs import make_context
    from hl7.daemon import build_plugins
    from hl7.outbound import OutboundSettings

    config, sessions, scheduler = _open(args)
    scheduler.plugins, _outbound, _mirror = build_plugins(
        config, OutboundSettings(default_timezone=config.clinic.timezone))
    return config, sessions, scheduler, make_context(scheduler, plugin_settings=config.plugins.settings)


def _emit(rows: Iterable[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    rows = list(rows)
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str, ensure_ascii=False))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _parse_day(text: Optional[str], default: date) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise CliError(f"expected a date like 2026-03-02, got {text!r}") from None


def _parse_instant(text: Optional[str], option: str, tz: str) -> Optional[datetime]:
    """A moment given on the command line: a date (its start) or a date and time, in the
    clinic's time unless it carries its own offset; UTC."""
    from engine.calendar import local_to_utc

    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{option}: expected a date or time like 2026-03-02 or 2026-03-02T08:30 (clinic time, "
                       f"or with an offset: 2026-03-02T08:30-05:00), got {text!r}") from None
    if moment.tzinfo is None:
        return local_to_utc(moment.date(), moment.time(), tz)
    return moment.astimezone(timezone.utc)


def _parse_time(text: Optional[str]) -> Optional[time]:
    if not text:
        return None
    try:
        return time.fromisoformat(text)
    except ValueError:
        raise CliError(f"expected a time like 08:30, got {text!r}") from None


def _zones(session) -> dict[int, str]:
    return {loc.id: loc.timezone for loc in session.scalars(select(Location))}


def appointment_record(appointment: Appointment, tz: str, codes: dict[int, str]) -> dict[str, Any]:
    local_start = to_local(appointment.start, tz)
    return {
        "id": appointment.id,
        "placer_id": appointment.placer_id,
        "filler_id": appointment.filler_id,
        "status": appointment.status,
        "hl7_status": HL7_FILLER_STATUS.get(Status(appointment.status), ""),
        "type": appointment.appointment_type,
        "start": appointment.start.isoformat(),
        "end": appointment.end.isoformat(),
        "local_start": local_start.isoformat(),
        "timezone": tz,
        "provider": codes.get(appointment.provider_id, ""),
        "patient_id": appointment.patient_id,
        "conflict": appointment.conflict,
        "review": appointment.review_reason,
    }


# --- commands ----------------------------------------------------------------------


def cmd_serve(args) -> int:
    from hl7.daemon import run

    return run(_load(args))


def cmd_check_config(args) -> int:
    config = _load(args)
    from sqlalchemy.engine import make_url

    database = make_url(config.database.url).render_as_string(hide_password=True)
    print(f"{config.source}: OK ({len(config.feeds)} feed(s), database {database})")
    return 0


def cmd_db_upgrade(args) -> int:
    from engine.db import make_engine
    from engine.schema import current_revision, head_revision, upgrade

    config = _load(args)
    engine = make_engine(config.database.url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"schema {before or '(empty)'} -> {head_revision()}")
    return 0


def cmd_slots_find(args) -> int:
    config, sessions, scheduler, _context = _open_with_plugins(args)
    with sessions() as session:
        provider_id = None
        if args.provider:
            provider_id = session.scalar(select(Provider.id).where(Provider.code == args.provider))
            if provider_id is None:
                raise CliError(f"unknown provider {args.provider!r}")
        patient_id = None
        if args.patient:
            patient_id = _patient_id(session, args.patient)
        zones = _zones(session)
        codes = dict(session.execute(select(Provider.id, Provider.code)).all())
    now = scheduler.clock.now()
    first = _parse_day(args.date_from, now.date())
    start = max(now, datetime.combine(first, time(0), tzinfo=timezone.utc))
    query = SlotQuery(
        appointment_type=args.type, start=start, end=start + timedelta(days=args.days),
        duration_minutes=args.duration, provider_id=provider_id, specialty=args.specialty,
        patient_id=patient_id, urgency=args.urgency, provider_gender=args.gender, language=args.language,
        earliest=_parse_time(args.earliest), latest=_parse_time(args.latest), limit=args.limit,
        overbook=args.overbook,
    )
    excluded: list = []
    candidates = scheduler.free_slots(query, excluded=excluded if args.explain else None)
    rows = []
    for c in candidates + excluded:
        tz = zones.get(c.location_id, config.clinic.timezone)
        row = c.as_dict()
        row.update(provider=codes.get(c.provider_id, ""), local_start=to_local(c.start, tz).isoformat(), timezone=tz)
        rows.append(row)
    _emit(rows, args.json, ["slot_id", "local_start", "provider", "slot_type", "seats_left", "score"]
          + (["excluded"] if args.explain else []))
    return 0


def _flow_settings(config):
    from plugins.flow import parse_settings

    try:
        return parse_settings(config.plugins.settings.get("flow") or {})
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_report_flow(args) -> int:
    from plugins.flow_report import flow_report, render_png, render_table

    config, sessions, scheduler = _open(args)
    day = _parse_day(args.date, to_local(scheduler.clock.now(), config.clinic.timezone).date())
    with sessions() as session:
        try:
            reports = flow_report(session, day, _flow_settings(config), args.location)
        except LookupError as exc:
            raise CliError(exc.args[0]) from None
    if args.png:
        try:
            render_png(reports, args.png)
        except (RuntimeError, OSError) as exc:
            raise CliError(f"cannot write the chart {args.png}: {exc}") from None
    if args.json:
        for report in reports:
            print(json.dumps(report, ensure_ascii=False))
    else:
        sys.stdout.write(render_table(reports) if reports else "(no locations)\n")
    return 0


def cmd_flow_late(args) -> int:
    from plugins.flow import report_running_late

    _config, _sessions, _scheduler, context = _open_with_plugins(args)
    decision = report_running_late(context, args.provider, args.minutes,
                                   Actor("operator", args.operator, "cli: flow late"))
    if args.json:
        print(json.dumps(decision, ensure_ascii=False))
        return 0
    print(decision["explanation"])
    _emit([{**e, "notice": next((n["channel"] or "front desk to call" for n in decision["notices"]
                                 if n["appointment_id"] == e["appointment_id"]), "")}
           for e in decision["estimates"]], False,
          ["appointment_id", "scheduled_local", "estimated_local", "delay_minutes", "decision", "notice"])
    print("messages go out with the daemon's flow.send job")
    return 0


def cmd_flow_delays(args) -> int:
    from plugins.flow import delays_on

    config, sessions, scheduler = _open(args)
    day = _parse_day(args.date, to_local(scheduler.clock.now(), config.clinic.timezone).date())
    with sessions() as session:
        rows = delays_on(session, day, args.provider)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    _emit([{**row, "notified": len(row["notices"])} for row in rows], False,
          ["id", "at", "provider", "trigger", "observed_minutes", "notified", "explanation"])
    return 0


def _patient_id(session, identifier: str) -> int:
    if identifier.isdigit() and session.get(Patient, int(identifier)) is not None and not session.scalar(
        select(PatientIdentifier.patient_id).where(PatientIdentifier.value == identifier)
    ):
        return int(identifier)
    rows = list(session.scalars(select(PatientIdentifier.patient_id).where(PatientIdentifier.value == identifier)))
    if not rows:
        raise CliError(f"no patient with identifier {identifier!r}")
    if len(set(rows)) > 1:
        raise CliError(f"identifier {identifier!r} names {len(set(rows))} patients; give AUTHORITY:VALUE")
    patient = session.get(Patient, rows[0])
    while patient.merged_into_id:
        patient = session.get(Patient, patient.merged_into_id)
    return patient.id


def cmd_appointments_list(args) -> int:
    config, sessions, _scheduler = _open(args)
    with sessions() as session:
        stmt = select(Appointment).order_by(Appointment.start, Appointment.id)
        if args.date_from:
            stmt = stmt.where(Appointment.start >= datetime.combine(_parse_day(args.date_from, date.today()), time(0), tzinfo=timezone.utc))
        if args.date_to:
            stmt = stmt.where(Appointment.start < datetime.combine(_parse_day(args.date_to, date.today()) + timedelta(days=1), time(0), tzinfo=timezone.utc))
        if args.status:
            stmt = stmt.where(Appointment.status == args.status)
        if args.provider:
            stmt = stmt.join(Provider, Provider.id == Appointment.provider_id).where(Provider.code == args.provider)
        if args.patient:
            stmt = stmt.where(Appointment.patient_id == _patient_id(session, args.patient))
        if args.conflicts:
            stmt = stmt.where(Appointment.conflict != "")
        zones = _zones(session)
        codes = dict(session.execute(select(Provider.id, Provider.code)).all())
        rows = [appointment_record(a, zones.get(a.location_id, config.clinic.timezone), codes)
                for a in session.scalars(stmt.limit(args.limit))]
    _emit(rows, args.json, ["id", "filler_id", "status", "type", "local_start", "provider", "patient_id"])
    return 0


def cmd_appointments_risk(args) -> int:
    from plugins.noshow import risk_rows
    from plugins.showmodel import reasons_text

    config, sessions, _scheduler = _open(args)
    with sessions() as session:
        stmt = select(Appointment).where(Appointment.status.in_(("held", "booked", "overbooked"))) \
            .order_by(Appointment.start, Appointment.id)
        if args.date_from:
            stmt = stmt.where(Appointment.start >= datetime.combine(_parse_day(args.date_from, date.today()), time(0), tzinfo=timezone.utc))
        if args.date_to:
            stmt = stmt.where(Appointment.start < datetime.combine(_parse_day(args.date_to, date.today()) + timedelta(days=1), time(0), tzinfo=timezone.utc))
        if args.provider:
            stmt = stmt.join(Provider, Provider.id == Appointment.provider_id).where(Provider.code == args.provider)
        zones = _zones(session)
        codes = dict(session.execute(select(Provider.id, Provider.code)).all())
        appointments = list(session.scalars(stmt.limit(args.limit)))
        risk = risk_rows(session, [a.id for a in appointments])
    rows = []
    for appointment in appointments:
        row = {**appointment_record(appointment, zones.get(appointment.location_id, config.clinic.timezone), codes),
               **risk[appointment.id]}
        if args.below is not None and (row["show_probability"] is None or row["show_probability"] >= args.below):
            continue
        if not args.json:
            row["show"] = "" if row["show_probability"] is None else f"{row['show_probability']:.0%}"
            row["why"] = reasons_text(row["reasons"])
            row["overbooked"] = row["overbook"][-1]["reason"] if row["overbook"] else ""
        rows.append(row)
    _emit(rows, args.json, ["id", "status", "local_start", "provider", "show", "why", "overbooked"])
    return 0


def _noshow_context(args):
    """The schedule with only the ``noshow`` plugin, configured from the file."""
    from engine.jobs import make_context
    from engine.plugin_host import PluginHost

    config, sessions, scheduler = _open(args)
    if "noshow" in config.plugins.disabled:
        raise CliError("the noshow plugin is disabled in this configuration")
    scheduler.plugins = PluginHost(builtins=(("noshow", "plugins.noshow"),), discover=False)
    return sessions, make_context(scheduler, plugin_settings={"noshow": config.plugins.settings.get("noshow") or {}})


def cmd_noshow_model(args) -> int:
    from plugins.noshow import NAME, model_summary

    sessions, context = _noshow_context(args)
    with sessions() as session:
        summary = model_summary(session, context.state[NAME].prior)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    print(f"{summary['source']}" + (f", model {summary['model_id']} fitted {summary['fitted_at']} on "
                                    f"{summary['sample_size']} visits ({summary['no_shows']} no-shows)"
                                    if summary["model_id"] else ""))
    for name, value in summary["coefficients"].items():
        error = summary["standard_errors"].get(name)
        print(f"  {name:20} {value:+8.3f}" + (f"  ± {error:.3f}" if error is not None else ""))
    return 0


def cmd_noshow_fit(args) -> int:
    from plugins.noshow import refit

    _sessions, context = _noshow_context(args)
    print(refit(context, force=True))
    return 0


def cmd_patients_show(args) -> int:
    _config, sessions, _scheduler = _open(args)
    with sessions() as session:
        patient = session.get(Patient, _patient_id(session, args.identifier))
        record = {
            "id": patient.id,
            "identifiers": [{"value": i.value, "authority": i.authority, "type": i.type_code} for i in patient.identifiers],
            "family_name": patient.family_name, "given_name": patient.given_name,
            "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
            "sex": patient.sex, "language": patient.language, "email": patient.email, "phones": patient.phones,
            "address": patient.address, "needs_interpreter": patient.needs_interpreter, "mobility": patient.mobility,
            "coverage": [{"payer": c.payer_id, "plan": c.plan_id, "member_id": c.member_id,
                          "effective": c.effective_date, "expiry": c.expiry_date,
                          "verification": c.verification_status} for c in patient.coverages],
        }
    if args.json:
        print(json.dumps(record, default=str, ensure_ascii=False))
    else:
        for key, value in record.items():
            print(f"{key:18} {value}")
    return 0


def cmd_messages_list(args) -> int:
    from hl7.store import inbox_rows

    config, sessions, _scheduler = _open(args)
    since = _parse_instant(args.since, "--since", config.clinic.timezone)
    until = _parse_instant(args.until, "--until", config.clinic.timezone)
    with sessions() as session:
        stmt = select(InboundMessage).order_by(InboundMessage.id.desc())
        if args.status:
            stmt = stmt.where(InboundMessage.status == args.status)
        if args.sender:
            stmt = stmt.where(InboundMessage.sender == args.sender)
        if args.type:
            stmt = stmt.where(or_(InboundMessage.message_type == args.type,
                                  InboundMessage.message_type.startswith(args.type + "^")))
        if since:
            stmt = stmt.where(InboundMessage.received_at >= since)
        if until:
            stmt = stmt.where(InboundMessage.received_at < until)
        rows = [{"id": m.id, "feed": m.feed, "sender": m.sender, "control_id": m.control_id, "type": m.message_type,
                 "status": m.status, "received_at": m.received_at.isoformat(), "error": m.error}
                for m in session.scalars(stmt.limit(args.limit))]
    listed = {row["id"] for row in rows}
    # stored but not yet moved into the database (SQLite's inbox): newest of all
    waiting = [{"id": m["id"], "feed": m["feed"], "sender": m["sender"], "control_id": m["control_id"],
                "type": m["message_type"], "status": m["status"], "received_at": m["received_at"].isoformat(),
                "error": ""} for m in inbox_rows(config.database.url)
               if m["id"] not in listed and (not args.status or m["status"] == args.status)
               and (not args.sender or m["sender"] == args.sender)
               and (not args.type or m["message_type"] == args.type or m["message_type"].startswith(args.type + "^"))
               and (not since or m["received_at"] >= since) and (not until or m["received_at"] < until)]
    rows = sorted(waiting + rows, key=lambda row: row["id"], reverse=True)[:args.limit]
    _emit(rows, args.json, ["id", "feed", "sender", "control_id", "type", "status", "received_at", "error"])
    return 0


def cmd_messages_show(args) -> int:
    from hl7.store import inbox_rows

    config, sessions, _scheduler = _open(args)
    with sessions() as session:
        m = session.get(InboundMessage, args.id)
        found = None if m is None else {c: getattr(m, c) for c in (
            "id", "feed", "sender", "control_id", "message_type", "peer", "status", "attempts", "received_at",
            "error", "raw", "ack")}
    if found is None:
        found = next((row for row in inbox_rows(config.database.url) if row["id"] == args.id), None)
    if found is None:
        raise CliError(f"no stored message {args.id}")
    record = {"id": found["id"], "feed": found["feed"], "sender": found["sender"], "control_id": found["control_id"],
              "type": found["message_type"], "peer": found["peer"], "status": found["status"],
              "attempts": found["attempts"], "received_at": found["received_at"].isoformat(), "error": found["error"],
              "raw": found["raw"].decode("utf-8", "replace").replace("\r", "\n"),
              "ack": (found["ack"] or b"").decode("utf-8", "replace").replace("\r", "\n")}
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        for key, value in record.items():
            print(f"{key}:\n{value}" if key in ("raw", "ack") else f"{key:12} {value}")
    return 0


def cmd_messages_replay(args) -> int:
    from hl7.store import replay

    _config, sessions, scheduler = _open(args)
    actor = Actor("operator", args.operator, "cli: messages replay")
    for message_id in args.ids:
        try:
            replay(sessions, message_id, actor, scheduler.clock.now())
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc).strip("'\"")) from None
        print(f"message {message_id} queued for replay")
    return 0


def cmd_messages_skip(args) -> int:
    from hl7.store import skip

    _config, sessions, scheduler = _open(args)
    actor = Actor("operator", args.operator, "cli: messages skip")
    for message_id in args.ids:
        try:
            skip(sessions, message_id, actor, scheduler.clock.now(), args.reason)
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc).strip("'\"")) from None
        print(f"message {message_id} skipped")
    return 0


def cmd_plugins_list(args) -> int:
    from engine.plugin_host import PluginHost

    config = _load(args)
    rows = PluginHost(disabled=config.plugins.disabled).plugin_rows()
    for row in rows:
        row["hooks"] = ", ".join(row["hooks"]) if isinstance(row["hooks"], (list, tuple)) else row["hooks"]
    _emit(rows, args.json, ["name", "enabled", "origin", "module", "hooks"])
    return 0


def cmd_jobs_list(args) -> int:
    from engine.jobs import job_table
    from engine.plugin_host import PluginHost

    config, sessions, _scheduler = _open(args)
    rows = job_table(sessions, PluginHost(disabled=config.plugins.disabled))
    _emit(rows, args.json, ["id", "every_seconds", "last_started_at", "last_outcome", "runs"])
    return 0


def cmd_recall_list(args) -> int:
    from plugins.recall import parse_settings, ticket_rows

    config, sessions, _scheduler = _open(args)
    try:
        settings = parse_settings(config.plugins.settings.get("recall") or {}, config.clinic.timezone, secret=False)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with sessions() as session:
        rows = ticket_rows(session, settings, args.status, args.limit)
    if not args.json:
        for row in rows:
            row["reason"] = row["reason"][:80]
    _emit(rows, args.json, ["id", "patient_id", "rule", "status", "due", "window", "contacts", "channels",
                            "next_action", "reason"])
    return 0


def cmd_outbox_list(args) -> int:
    from hl7.outbound import list_items

    _config, sessions, _scheduler = _open(args)
    rows = list_items(sessions, destination=args.destination, status=args.status, kind=args.kind,
                      limit=args.limit, all_channels=args.all)
    _emit(rows, args.json, ["id", "channel", "kind", "status", "attempts", "due_at", "last_error"])
    return 0


def cmd_outbox_show(args) -> int:
    from hl7.outbound import show_item

    _config, sessions, _scheduler = _open(args)
    row = show_item(sessions, args.id)
    if row is None:
        raise CliError(f"no outbox item {args.id}")
    if args.json:
        print(json.dumps(row, default=str, ensure_ascii=False))
    else:
        for key, value in row.items():
            print(f"{key:12} {value}")
    return 0


def cmd_outbox_retry(args) -> int:
    from hl7.outbound import retry_item, skip_item

    _config, sessions, _scheduler = _open(args)
    for item_id in args.ids:
        try:
            if args.skip:
                skip_item(sessions, item_id, operator=args.operator, reason=args.reason)
                print(f"outbox item {item_id} skipped")
            else:
                retry_item(sessions, item_id, operator=args.operator)
                print(f"outbox item {item_id} queued again")
        except (LookupError, ValueError) as exc:
            raise CliError(str(exc).strip("'\"")) from None
    return 0


CHANGE_REQUEST_STATUSES = ("pending", "accepted", "confirmed", "refused", "expired")


def cmd_requests_list(args) -> int:
    config, sessions, scheduler = _open(args)
    asked = scheduler.change_requests(appointment_id=args.appointment, status=args.status, limit=args.limit)
    with sessions() as session:
        if not asked and args.appointment is not None and session.get(Appointment, args.appointment) is None:
            raise CliError(f"no appointment {args.appointment}")
        zones = _zones(session)
        codes = dict(session.execute(select(Provider.id, Provider.code)).all())
        locations = dict(session.execute(select(Appointment.id, Appointment.location_id)
                                         .where(Appointment.id.in_({r.appointment_id for r in asked}))).all())
    rows = []
    for r in asked:
        tz = zones.get(locations.get(r.appointment_id), config.clinic.timezone)
        rows.append({
            "id": r.id, "kind": r.kind, "status": r.status, "owner": r.owner, "appointment_id": r.appointment_id,
            "requested_start": r.requested_start.isoformat() if r.requested_start else None,
            "requested_end": r.requested_end.isoformat() if r.requested_end else None,
            "requested_local": to_local(r.requested_start, tz).isoformat() if r.requested_start else "",
            "timezone": tz, "provider": codes.get(r.requested_provider_id, ""),
            "reason": r.reason, "actor": r.actor, "requester": r.detail, "outcome": r.outcome,
            "created_at": r.created_at.isoformat(), "expires_at": r.expires_at.isoformat(),
            "decided_at": r.decided_at.isoformat() if r.decided_at else None,
        })
    _emit(rows, args.json, ["id", "kind", "status", "owner", "appointment_id", "requested_local", "provider",
                            "created_at", "outcome"])
    return 0


# --- same-day emergencies (plugins/emergency.py) -------------------------------------


def _open_for_emergencies(args):
    config, sessions, scheduler, context = _open_with_plugins(args)
    if "emergency" not in context.state:
        raise CliError("the emergency plugin is disabled in this configuration")
    return config, sessions, scheduler, context


def _local_instant(day: date, text: str, tz: str) -> datetime:
    from engine.calendar import local_to_utc

    moment = _parse_time(text)
    return local_to_utc(day, moment, tz)


def cmd_emergencies_request(args) -> int:
    from engine.requests import UrgentRequest

    config, sessions, scheduler, _context = _open_for_emergencies(args)
    with sessions() as session:
        patient_id = _patient_id(session, args.patient)
        provider_id = location_id = None
        tz = config.clinic.timezone
        if args.provider:
            provider = session.scalars(select(Provider).where(Provider.code == args.provider)).one_or_none()
            if provider is None:
                raise CliError(f"unknown provider {args.provider!r}")
            provider_id = provider.id
            if provider.location_id:
                tz = session.get(Location, provider.location_id).timezone
        if args.location:
            location = session.scalars(select(Location).where(Location.code == args.location)).one_or_none()
            if location is None:
                raise CliError(f"unknown location {args.location!r}")
            location_id, tz = location.id, location.timezone
    now = scheduler.clock.now()
    day = _parse_day(args.date, to_local(now, tz).date())
    earliest = _local_instant(day, args.earliest, tz) if args.earliest else now
    if args.latest:
        latest = _local_instant(day, args.latest, tz)
    else:
        latest = earliest + timedelta(minutes=args.within) if args.within else None
    actor = Actor("operator", args.operator, "cli: emergencies request")
    outcome = scheduler.request_urgent(UrgentRequest(
        patient_id=patient_id, duration_minutes=args.duration, earliest=earliest, latest_start=latest,
        appointment_type=args.type, provider_id=provider_id, specialty=args.specialty, location_id=location_id,
        reason=args.reason), actor)
    return _show_emergency(sessions, outcome["request_id"], args.json, outcome)


def _show_emergency(sessions, request_id: Optional[int], as_json: bool, outcome: Optional[dict] = None) -> int:
    from plugins.emergency import describe

    if request_id is None:  # no plugin handles urgent requests: the engine's own answer
        print(json.dumps(outcome, default=str) if as_json else f"{outcome['outcome']}: {outcome['explanation']}")
        return 0
    with sessions() as session:
        record = describe(session, request_id)
    if outcome is not None:
        record = {"outcome": outcome, **record}
    if as_json:
        print(json.dumps(record, default=str, ensure_ascii=False))
        return 0
    print(f"urgent request {record['id']}: {record['status']}"
          + (f" (appointment {record['appointment_id']})" if record["appointment_id"] else ""))
    print(f"  window {record['earliest']} .. {record['latest_start']}, {record['duration_minutes']} min")
    for step in record["steps"]:
        print(f"  - {step['step']}: {step['what']}")
    for proposal in record["proposals"]:
        print(f"  proposal {proposal['id']} ({proposal['kind']}, {proposal['status']}): urgent at "
              f"{proposal['urgent']['start']}, {proposal['objective']['patients_moved']} moved, delays "
              f"{proposal['objective']['delays_minutes']}")
        for move in proposal["moves"]:
            print(f"    appointment {move['appointment_id']}: {move['action']} {move['from_start']} -> "
                  f"{move['to_start'] or 'cancelled'} [{move['status']}] {move['why']}")
        for candidate in proposal["candidates"]:
            if not candidate["movable"]:
                print(f"    appointment {candidate['appointment_id']} left alone: {candidate['why_not']}")
    return 0


def cmd_emergencies_list(args) -> int:
    from plugins.emergency import list_requests

    _config, sessions, _scheduler = _open(args)
    with sessions() as session:
        rows = list_requests(session, status=args.status, limit=args.limit)
    _emit(rows, args.json, ["id", "status", "earliest", "latest_start", "appointment_id", "proposal_id",
                            "proposal_status", "patients_moved"])
    return 0


def cmd_emergencies_show(args) -> int:
    _config, sessions, _scheduler = _open(args)
    return _show_emergency(sessions, args.id, args.json)


def cmd_emergencies_decide(args) -> int:
    from plugins.emergency import approve, reject

    _config, sessions, _scheduler, context = _open_for_emergencies(args)
    actor = Actor("operator", args.operator, f"cli: emergencies {args.emergencies_command}")
    decide = approve if args.emergencies_command == "approve" else reject
    outcome = decide(context, args.id, actor, args.reason)
    return _show_emergency(sessions, args.id, args.json, outcome)


def cmd_send(args) -> int:
    from hl7.client import send_files

    return send_files(args)


def cmd_console_hash_password(args) -> int:
    from hl7.console.cli import PasswordError, cmd_hash_password

    try:
        return cmd_hash_password(args)
    except PasswordError as exc:
        raise CliError(str(exc)) from None


# --- parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slotengine", description="Scheduling engine with an HL7 v2 interface")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def schedule_command(sub, name: str, help_text: str, handler, *, listing: bool = False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", help="configuration file (default: bundled demo)")
        p.add_argument("--database", metavar="URL", help="database URL (overrides the configuration)")
        if listing:
            p.add_argument("--json", action="store_true", help="one JSON object per record")
        p.set_defaults(handler=handler)
        return p

    serve = schedule_command(commands, "serve", "run the daemon in the foreground", cmd_serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="MLLP address (overrides the first feed)")
    schedule_command(commands, "check-config", "validate the configuration and exit", cmd_check_config)

    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    schedule_command(db, "upgrade", "apply schema migrations", cmd_db_upgrade)

    slots = commands.add_parser("slots", help="free slots").add_subparsers(dest="slots_command", required=True)
    find = schedule_command(slots, "find", "find free slots", cmd_slots_find, listing=True)
    find.add_argument("--type", default="general", help="appointment type (new_patient, follow_up, procedure, …)")
    find.add_argument("--provider", help="provider code")
    find.add_argument("--specialty")
    find.add_argument("--patient", help="patient identifier (brings the patient's preferences)")
    find.add_argument("--from", dest="date_from", metavar="DATE")
    find.add_argument("--days", type=int, default=14)
    find.add_argument("--duration", type=int, metavar="MINUTES")
    find.add_argument("--urgency", choices=("routine", "urgent"), default="routine")
    find.add_argument("--gender", choices=("F", "M", "O", "U"))
    find.add_argument("--language")
    find.add_argument("--earliest", metavar="HH:MM")
    find.add_argument("--latest", metavar="HH:MM")
    find.add_argument("--limit", type=int, default=10)
    find.add_argument("--explain", action="store_true",
                      help="also list the candidates plugins left out, and why (e.g. an arrival limit)")
    find.add_argument("--overbook", action="store_true",
                      help="when few slots are free, also seats in full slots a plugin allows (with its arithmetic)")

    appointments = commands.add_parser("appointments", help="appointments").add_subparsers(
        dest="appointments_command", required=True)
    listing = schedule_command(appointments, "list", "list appointments", cmd_appointments_list, listing=True)
    listing.add_argument("--from", dest="date_from", metavar="DATE")
    listing.add_argument("--to", dest="date_to", metavar="DATE")
    listing.add_argument("--status", choices=[s.value for s in Status])
    listing.add_argument("--provider")
    listing.add_argument("--patient")
    listing.add_argument("--conflicts", action="store_true", help="only appointments flagged as overlapping")
    listing.add_argument("--limit", type=int, default=200)
    risk = schedule_command(appointments, "risk", "show probability, its reasons, and overbooking decisions",
                            cmd_appointments_risk, listing=True)
    risk.add_argument("--from", dest="date_from", metavar="DATE")
    risk.add_argument("--to", dest="date_to", metavar="DATE")
    risk.add_argument("--provider")
    risk.add_argument("--below", type=float, metavar="P", help="only appointments less likely than P to be kept")
    risk.add_argument("--limit", type=int, default=200)

    noshow = commands.add_parser("noshow", help="the show-probability model").add_subparsers(
        dest="noshow_command", required=True)
    schedule_command(noshow, "model", "the model in use: coefficients, fit date, sample size", cmd_noshow_model,
                     listing=True)
    schedule_command(noshow, "fit", "fit the model on the site's history now and refresh the estimates",
                     cmd_noshow_fit)

    patients = commands.add_parser("patients", help="patients").add_subparsers(dest="patients_command", required=True)
    show = schedule_command(patients, "show", "show one patient", cmd_patients_show, listing=True)
    show.add_argument("identifier", help="an identifier value (MRN…) or the internal id")

    messages = commands.add_parser("messages", help="stored HL7 messages").add_subparsers(
        dest="messages_command", required=True)
    mlist = schedule_command(messages, "list", "list stored messages", cmd_messages_list, listing=True)
    mlist.add_argument("--status", choices=("received", "applied", "skipped", "parked", "refused"))
    mlist.add_argument("--sender", metavar="MSH-3^MSH-4", help="as stored and listed (the whole fields)")
    mlist.add_argument("--type", metavar="SIU^S12", help="a message type (SIU) or type and event (SIU^S12)")
    mlist.add_argument("--since", metavar="TIME", help="received at or after: a date or date and time, clinic time "
                                                       "unless it has an offset")
    mlist.add_argument("--until", metavar="TIME", help="received before (as --since)")
    mlist.add_argument("--limit", type=int, default=100)
    mshow = schedule_command(messages, "show", "show one stored message", cmd_messages_show, listing=True)
    mshow.add_argument("id", type=int)
    replay = schedule_command(messages, "replay", "apply parked messages again", cmd_messages_replay)
    replay.add_argument("ids", type=int, nargs="+")
    replay.add_argument("--operator", default="cli", help="who is replaying (recorded in the audit trail)")
    skipping = schedule_command(messages, "skip", "give up on parked messages (a stopped feed moves on)",
                                cmd_messages_skip)
    skipping.add_argument("ids", type=int, nargs="+")
    skipping.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    skipping.add_argument("--operator", default="cli", help="who decides (recorded in the audit trail)")

    outbox = commands.add_parser("outbox", help="outbound messages (store-and-forward)").add_subparsers(
        dest="outbox_command", required=True)
    olist = schedule_command(outbox, "list", "list outbound messages", cmd_outbox_list, listing=True)
    olist.add_argument("--destination")
    olist.add_argument("--status", choices=("pending", "sent", "parked", "skipped", "refused"))
    olist.add_argument("--kind")
    olist.add_argument("--limit", type=int, default=50)
    olist.add_argument("--all", action="store_true", help="also reminders and notices, not only MLLP")
    oshow = schedule_command(outbox, "show", "show one outbound message", cmd_outbox_show, listing=True)
    oshow.add_argument("id", type=int)
    oretry = schedule_command(outbox, "retry", "send parked messages again (same control id)", cmd_outbox_retry)
    oretry.add_argument("ids", type=int, nargs="+")
    oretry.add_argument("--skip", action="store_true", help="give up on them instead (stays recorded)")
    oretry.add_argument("--reason", default="")
    oretry.add_argument("--operator", default="cli", help="who decides (recorded in the audit trail)")

    requests = commands.add_parser("requests", help="changes asked of a calendar's owner (mirror mode)").add_subparsers(
        dest="requests_command", required=True)
    rlist = schedule_command(requests, "list", "list change requests, newest first, with the owner's answer",
                             cmd_requests_list, listing=True)
    rlist.add_argument("--status", choices=CHANGE_REQUEST_STATUSES)
    rlist.add_argument("--appointment", type=int, metavar="ID")
    rlist.add_argument("--limit", type=int, default=200)

    plugins = commands.add_parser("plugins", help="plugins").add_subparsers(dest="plugins_command", required=True)
    plist = plugins.add_parser("list", help="list plugins and their hooks")
    plist.add_argument("--config", metavar="FILE")
    plist.add_argument("--json", action="store_true")
    plist.set_defaults(handler=cmd_plugins_list)

    report = commands.add_parser("report", help="reports").add_subparsers(dest="report_command", required=True)
    flow_report = schedule_command(report, "flow", "a location's day: arrivals per window, utilisation, gaps, "
                                   "overbooks, no-shows", cmd_report_flow, listing=True)
    flow_report.add_argument("--date", metavar="DATE", help="clinic-local day (default: today)")
    flow_report.add_argument("--location", metavar="CODE", help="one location (default: every location)")
    flow_report.add_argument("--png", metavar="FILE", help="also draw the report as a PNG chart")

    flow = commands.add_parser("flow", help="patient flow").add_subparsers(dest="flow_command", required=True)
    late = schedule_command(flow, "late", "a provider is running late: estimate the day and tell the patients",
                            cmd_flow_late, listing=True)
    late.add_argument("--provider", required=True, metavar="CODE")
    late.add_argument("--minutes", required=True, type=int, help="how many minutes behind the provider is")
    late.add_argument("--operator", default="cli", help="who says so (recorded with the decision)")
    delays = schedule_command(flow, "delays", "running-late estimates of a day and what was done",
                              cmd_flow_delays, listing=True)
    delays.add_argument("--date", metavar="DATE", help="clinic-local day (default: today)")
    delays.add_argument("--provider", metavar="CODE")

    jobs = commands.add_parser("jobs", help="timed jobs").add_subparsers(dest="jobs_command", required=True)
    schedule_command(jobs, "list", "list timed jobs and their last outcome", cmd_jobs_list, listing=True)

    recalls = commands.add_parser("recall", help="recall of due preventive care").add_subparsers(
        dest="recall_command", required=True)
    rlist = schedule_command(recalls, "list", "list recall tickets: rule, due window, contacts and why",
                             cmd_recall_list, listing=True)
    rlist.add_argument("--status", action="append", metavar="STATUS",
                       choices=("open", "contacted", "escalated", "closed", "suppressed"),
                       help="only tickets in this state (repeatable)")
    rlist.add_argument("--limit", type=int, default=500)

    console = commands.add_parser("console", help="the operator console").add_subparsers(
        dest="console_command", required=True)
    hashing = console.add_parser("hash-password", help="hash a console password (asked on the terminal, or "
                                                       "the first line of standard input)")
    hashing.add_argument("--user", metavar="NAME", help="print a whole [[console.users]] table for this user")
    hashing.add_argument("--role", choices=("viewer", "scheduler", "interface"), default="viewer")
    hashing.set_defaults(handler=cmd_console_hash_password)

    emergencies = commands.add_parser("emergencies", help="same-day urgent requests").add_subparsers(
        dest="emergencies_command", required=True)
    urgent = schedule_command(emergencies, "request", "place an urgent patient (free time, on-call, or moving others)",
                              cmd_emergencies_request, listing=True)
    urgent.add_argument("--patient", required=True, help="patient identifier (MRN…) or internal id")
    urgent.add_argument("--duration", type=int, required=True, metavar="MINUTES")
    urgent.add_argument("--date", metavar="DATE", help="clinic-local day (default: today)")
    urgent.add_argument("--from", dest="earliest", metavar="HH:MM", help="earliest start (default: now)")
    urgent.add_argument("--until", dest="latest", metavar="HH:MM", help="latest start: the clinically required window")
    urgent.add_argument("--within", type=int, metavar="MINUTES", help="latest start this long after the earliest")
    urgent.add_argument("--type", default="general", help="appointment type")
    urgent.add_argument("--provider", help="provider code")
    urgent.add_argument("--specialty")
    urgent.add_argument("--location", help="location code")
    urgent.add_argument("--reason", default="", help="clinical reason (never sent to other patients)")
    urgent.add_argument("--operator", default="cli", help="who asks (recorded in the audit trail)")
    elist = schedule_command(emergencies, "list", "list urgent requests", cmd_emergencies_list, listing=True)
    elist.add_argument("--status", choices=("booked", "proposed", "waiting", "applied", "rejected", "expired",
                                            "unplaced"))
    elist.add_argument("--limit", type=int, default=100)
    eshow = schedule_command(emergencies, "show", "an urgent request, its proposals and why each move was chosen",
                             cmd_emergencies_show, listing=True)
    eshow.add_argument("id", type=int)
    for verb, text in (("approve", "apply the pending proposal of an urgent request"),
                       ("reject", "turn down the pending proposal: nobody is moved")):
        decide = schedule_command(emergencies, verb, text, cmd_emergencies_decide, listing=True)
        decide.add_argument("id", type=int, help="urgent request id")
        decide.add_argument("--reason", default="", help="why (recorded with the decision)")
        decide.add_argument("--operator", default="cli", help="who decides (recorded in the audit trail)")

    send = commands.add_parser("send", help="send HL7 files over MLLP and check each ACK")
    send.add_argument("files", nargs="+", metavar="FILE")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=2575)
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("--tls", action="store_true")
    send.add_argument("--ca", metavar="FILE", help="CA bundle to verify the server")
    send.add_argument("--cert", metavar="FILE", help="client certificate (mutual TLS)")
    send.add_argument("--key", metavar="FILE")
    send.add_argument("--json", action="store_true")
    send.set_defaults(handler=cmd_send)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from hl7.config import ConfigError
    from hl7.daemon import StartupError
    from engine.plugin_host import PluginError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"slotengine: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, StartupError, PluginError, SchedulingError) as exc:
        print(f"slotengine: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
