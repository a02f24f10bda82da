#!/usr/bin/env python
"""Applying HL7 messages to the schedule, in-process: what one message costs.

    python bench/bench_apply.py                     # 3,000 of bench_ingest's messages
    python bench/bench_apply.py --messages 1500 --profile       # cProfile, our functions first
    python bench/bench_apply.py --fingerprint before.txt        # every table, run times masked
    python bench/bench_apply.py --database postgresql://postgres@127.0.0.1:5432/test  # on PostgreSQL

No sockets, no daemon: the messages ``bench_ingest`` generates (the demo
clinic; A04, A08, S12, S13, S15) are stored in the inbox first, then applied
by the applier process's own ``hl7.processor.Processor``, batch after batch,
each arm on a fresh SQLite file (synchronous=FULL).  Two arms in one run, and a floor:

- **all plugins**: every built-in plugin, configured as in the demo, their
  after-commit notices run inline;
- **baseline, no plugins**: the same messages through the engine alone;
- **its SQL alone**: every statement the all-plugins arm ran, with its parameters,
  commits and rollbacks, replayed on a bare ``sqlite3`` connection against a copy
  of the database from before it applied: what the database itself costs.

Reports CPU ms and SQL statements per message, messages per second, and the
ratio; ``--fingerprint FILE`` writes every table of the all-plugins arm (times
of the run masked) so that two commits can be compared row for row (``cmp``)
when a change must not change the data.  ``bench_ingest.py`` measures the
whole daemon; this isolates the apply path it is bound by.

Prints a table, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ingest import _postgres_schema, generate  # noqa: E402
from common import DaemonSettings, machine_info, machine_line, print_table, source_revision  # noqa: E402
from sqlalchemy import event, inspect, text  # noqa: E402

from engine.clock import SystemClock  # noqa: E402
from engine.db import make_session_factory  # noqa: E402
from engine.jobs import generate_slots, make_context  # noqa: E402
from engine.metrics import Metrics  # noqa: E402
from engine.plugin_host import PluginHost  # noqa: E402
from engine.service import Scheduler  # noqa: E402
from hl7.config import load_config  # noqa: E402
from hl7.daemon import build_plugins, engine_settings, prepare_database  # noqa: E402
from hl7.daemon import feed_policies  # noqa: E402
from hl7.message import parse  # noqa: E402
from hl7.outbound import OutboundSettings  # noqa: E402
from hl7.processor import Processor  # noqa: E402
from hl7.store import RECEIVED, Inbox, Incoming, MessageStore, content_hash  # noqa: E402


def run_arm(raws: list[bytes], *, plugins: bool, workdir: Path, profile: bool = False,
            fingerprint: Path | None = None, floor: bool = False, database: str | None = None) -> dict:
    """One arm on a fresh SQLite file in ``workdir``, or with ``database`` (PostgreSQL) in a
    fresh schema there, dropped afterwards; the floor (SQL replayed on bare sqlite3) is SQLite's."""
    schema = f"bench_apply_{os.getpid()}_{'all' if plugins else 'none'}" if database else None
    url = _postgres_schema(database, schema, create=True) if database else f"sqlite:///{workdir}/apply.db"
    try:
        return _run_arm(raws, url, plugins=plugins, workdir=workdir, profile=profile, fingerprint=fingerprint,
                        floor=floor and not database)
    finally:
        if database:
            _postgres_schema(database, schema, create=False)


def _run_arm(raws: list[bytes], url: str, *, plugins: bool, workdir: Path, profile: bool,
             fingerprint: Path | None, floor: bool) -> dict:
    config = load_config(DaemonSettings(workdir, url, log_level="WARNING").write())
    engine = prepare_database(config.database.url, config.database.pool_size, config.clinic.data)
    sessions = make_session_factory(engine)
    metrics = Metrics()
    host = build_plugins(config, OutboundSettings(default_timezone=config.clinic.timezone), metrics)[0] \
        if plugins else PluginHost(builtins=(), discover=False, metrics=metrics)
    scheduler = Scheduler(sessions, plugins=host, clock=SystemClock(), settings=engine_settings(config))
    context = make_context(scheduler, plugin_settings=config.plugins.settings if plugins else {}, metrics=metrics)
    generate_slots(context)  # as the daemon does at start: bookings take seats, cancellations free them
    outbound_settings = OutboundSettings(default_timezone=config.clinic.timezone)
    inbox = Inbox.for_database(config.database.url)
    store = MessageStore(sessions, metrics, Inbox.for_database(config.database.url, writer=False))
    if inbox is not None:
        inbox.store([_incoming(raw) for raw in raws])
    else:  # PostgreSQL: receipts go straight to inbound_messages, as the daemon's do
        store.store_batch([_incoming(raw) for raw in raws])
    processor = Processor(scheduler, store, feed_policies(config, outbound_settings), metrics)
    statements = [0]
    recorded: list[tuple] = []  # with ``floor``: every statement and commit, to be replayed

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_connection, _cursor, sql, parameters, _context, many):
        statements[0] += 1
        if floor:
            recorded.append((sql, parameters, many))

    if floor:
        event.listen(engine, "commit", lambda _connection: recorded.append(None))
        event.listen(engine, "rollback", lambda _connection: recorded.append(False))
        before = workdir / "before-apply.db"
        with sqlite3.connect(workdir / "apply.db") as source, sqlite3.connect(before) as copy:
            source.backup(copy)

    profiler = cProfile.Profile() if profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    while processor.apply_pending():
        pass
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    with sessions() as session:
        counts = {table: session.scalar(text(f"select count(*) from {table}"))
                  for table in ("patients", "appointments", "audit", "reservations", "plugin_tasks", "outbox")}
        failed = session.scalar(text("select count(*) from inbound_messages where status != 'applied'"))
    if fingerprint is not None:
        write_fingerprint(engine, sessions, fingerprint)
    engine.dispose()
    result = {"messages": len(raws), "failed": failed, "seconds": round(seconds, 3),
              "per_s": round(len(raws) / seconds, 1), "cpu_ms": round(cpu / len(raws) * 1000, 2),
              "statements": round(statements[0] / len(raws), 1), "counts": counts}
    if profiler:
        result["profile"] = profiler
    if floor:
        result["floor"] = replay(before, recorded, len(raws))
    return result


def replay(database: Path, recorded: list, messages: int) -> dict:
    """The database's own share: the statements an arm ran, with their parameters, and its
    commits and rollbacks, run again in order on a bare ``sqlite3`` connection (same pragmas)
    against a copy of the database as it stood before the arm applied anything.  What the
    arm spent beyond this is Python: parsing, mapping, the engine, the ORM, the plugins."""
    connection = sqlite3.connect(database, isolation_level=None, cached_statements=1024)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        connection.execute(f"PRAGMA {pragma}")
    cursor = connection.cursor()
    started, cpu_started = time.perf_counter(), time.process_time()
    for entry in recorded:
        if entry is None or entry is False:
            if connection.in_transaction:
                (connection.commit if entry is None else connection.rollback)()
        elif entry[2]:
            cursor.executemany(entry[0], entry[1])
        else:
            cursor.execute(entry[0], entry[1])
            cursor.fetchall()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    connection.close()
    return {"seconds": round(seconds, 3), "per_s": round(messages / seconds, 1),
            "cpu_ms": round(cpu / messages * 1000, 3)}


_TIMESTAMP = re.compile(r"20\d\d-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?")


def _incoming(raw: bytes) -> Incoming:
    message = parse(raw)
    return Incoming("ehr", f"{message.sending_application}^{message.sending_facility}", message.control_id,
                    f"{message.message_type}^{message.trigger_event}", "bench", datetime.now(timezone.utc), raw,
                    RECEIVED, None, content_hash(raw))


def write_fingerprint(engine, sessions, path: Path) -> None:
    """Every row of every table, sorted; timestamps within ten minutes of now (stamped
    by the run's clock) masked, the appointments' own times kept.  Compare runs made
    at the same minute: no-show estimates depend on how far ahead a visit is booked."""
    now = datetime.now(timezone.utc)

    def masked(value) -> str:
        shown = value.decode("latin-1") if isinstance(value, bytes) else str(value)

        def mask(match: re.Match) -> str:
            moment = datetime.fromisoformat(match.group(0).replace(" ", "T"))
            moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
            return "<now>" if abs((moment - now).total_seconds()) < 600 else match.group(0)
        return _TIMESTAMP.sub(mask, shown)

    with sessions() as session, open(path, "w") as out:
        # inbound_messages: the generated messages carry the time they were generated
        for table in sorted(set(inspect(engine).get_table_names()) - {"inbound_messages"}):
            rows = session.execute(text(f"select * from {table}")).all()
            out.write(f"== {table} {len(rows)}\n")
            out.writelines(line + "\n" for line in sorted(json.dumps([masked(v) for v in row]) for row in rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="1,000 messages")
    ap.add_argument("--full", action="store_true", help="accepted for run_all.py; the default is the full run")
    ap.add_argument("--seed", type=int, default=20260601)
    ap.add_argument("--profile", action="store_true", help="cProfile the all-plugins arm")
    ap.add_argument("--fingerprint", type=Path, metavar="FILE", help="write the all-plugins arm's tables here")
    ap.add_argument("--database", metavar="URL",
                    help="postgresql://USER@HOST/DB: each arm in a fresh schema there, dropped afterwards "
                         "(default: SQLite files in a temporary directory)")
    args = ap.parse_args()
    if args.database and not args.database.startswith("postgresql"):
        ap.error("--database takes a postgresql:// URL (SQLite is the default)")
    count = 1000 if args.quick else args.messages
    raws = [item.raw for item in generate(count, seed=args.seed)]
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as work:
        (Path(work) / "base").mkdir()
        (Path(work) / "all").mkdir()
        baseline = run_arm(raws, plugins=False, workdir=Path(work) / "base", database=args.database)
        measured = run_arm(raws, plugins=True, workdir=Path(work) / "all", profile=args.profile,
                           fingerprint=args.fingerprint, floor=True, database=args.database)
    print(f"\nslotengine apply bench: {count:,} of bench_ingest's messages through the processor, "
          f"{'PostgreSQL' if args.database else 'SQLite synchronous=FULL'}, in-process")
    print(machine_line(info))
    revision = source_revision()
    print(f"source: commit {revision['commit']}{' (uncommitted changes)' if revision['dirty'] else ''}")
    rows = [[name, f"{arm['per_s']:,.1f}", f"{arm['cpu_ms']:.2f}", f"{arm['statements']:.1f}", str(arm["failed"])]
            for name, arm in (("all built-in plugins", measured), ("baseline: no plugins", baseline))]
    floor = measured.pop("floor", None)
    if floor:
        rows.append(["its SQL alone, bare sqlite3", f"{floor['per_s']:,.1f}", f"{floor['cpu_ms']:.2f}",
                     f"{measured['statements']:.1f}", "-"])
    print()
    print_table(["arm", "msg/s", "CPU ms/msg", "statements/msg", "failed"], rows)
    ratio = round(measured["cpu_ms"] / baseline["cpu_ms"], 2)
    print(f"\nplugins / no plugins: CPU per message x{ratio}; rows written (all plugins): {measured['counts']}")
    if floor:
        print(f"all plugins / its SQL alone: CPU per message x{measured['cpu_ms'] / floor['cpu_ms']:.1f} "
              f"(the rest is Python: parsing, mapping, engine, ORM, plugins)")
    if args.fingerprint:
        print(f"tables written to {args.fingerprint} (compare two commits with cmp)")
    profiler = measured.pop("profile", None)
    if profiler is not None:
        print()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"slotengine|/engine/|/hl7/|/plugins/", 40)
    print("BENCH " + json.dumps({"bench": "apply", "machine": info, "source": revision, "messages": count,
                                 "all_plugins": measured, "baseline": baseline, "cpu_ratio": ratio,
                                 "sql_alone": floor}, sort_keys=True))
    return 0 if not (measured["failed"] or baseline["failed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
