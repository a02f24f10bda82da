"""The durable message store: receive → commit → acknowledge.

Every listener connection hands its message to one ``GroupCommitter``; the
committer writes whatever has arrived meanwhile in one transaction (one fsync
shared by many connections) and only then answers each waiting connection.
A positive acknowledgement is therefore never sent for a message that is not
on disk; if the commit fails, every waiter in that batch gets the exception
and its sender a negative answer.

(MSH-3, MSH-4, MSH-10) is unique among accepted messages: a resend gets the
acknowledgement stored with the original and is not stored or applied again.
A refused message is kept for the record but holds no key: once its cause is
fixed (the sender allowed, the type accepted), the sender's resend is stored
and applied, under a new id, in its place in the order of arrival.  Each
message refused for lacking MSH-10 is kept too, none a resend of another.

On SQLite, receipts are committed to an ``Inbox``: a file of its own beside
the database (``<database>-inbox``).  SQLite has a single writer per file, and
the writer applying messages holds the database's for whole batches; with
receipts in the database, every acknowledgement would wait for the batch in
flight.  The processor moves inbox rows into ``inbound_messages`` inside its
apply transaction and only reads the inbox; the receiving side later deletes
what the database holds, so a crash between the two leaves a row in both,
which the next move skips.
PostgreSQL locks rows, not the database, and stores receipts directly.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine.db import Direct
from engine.metrics import Metrics
from engine.models import InboundMessage

log = logging.getLogger("slotengine.store")

# Message statuses, in the order a message normally passes through them.
RECEIVED = "received"  # stored, waiting to be applied
APPLIED = "applied"
SKIPPED = "skipped"  # stored and acknowledged, nothing to apply (unknown type accepted)
PARKED = "parked"  # applying failed; waits for an operator (replay)
REFUSED = "refused"  # answered AR (unknown sender, unusable header); kept for the record
STATUSES = (RECEIVED, APPLIED, SKIPPED, PARKED, REFUSED)


@dataclass
class Incoming:
    feed: str
    sender: str
    control_id: str
    message_type: str
    peer: str
    received_at: datetime
    raw: bytes
    status: str
    ack: Optional[bytes]
    content_hash: str = ""
    application_ack: Optional[bytes] = None  # known at receipt when there is nothing to apply


@dataclass(frozen=True)
class Stored:
    message_id: int
    duplicate: bool
    status: str
    ack: Optional[bytes]
    reused_control_id: bool = False  # same key, different content: not stored


def content_hash(raw: bytes, field_separator: bytes = b"|") -> str:
    """SHA-256 of the message with MSH-7 (time of message) blanked and segment
    endings normalised: a sender that restamps MSH-7 when it resends after a
    lost ACK is still recognised as resending."""
    segments = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r").split(b"\r")
    header = segments[0].split(field_separator)
    if len(header) > 6:
        header[6] = b""
    segments[0] = field_separator.join(header)
    return hashlib.sha256(b"\r".join(segments)).hexdigest()


class StorageUnavailable(Exception):
    """The message could not be committed; the sender must get no positive ACK."""


_INBOX_TABLE = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    feed TEXT NOT NULL, sender TEXT NOT NULL, control_id TEXT NOT NULL, message_type TEXT NOT NULL,
    peer TEXT NOT NULL, received_at TEXT NOT NULL, raw BLOB NOT NULL, content_hash TEXT NOT NULL,
    status TEXT NOT NULL, ack BLOB, application_ack BLOB
)"""
# as inbound_messages: looked up by key, and the key unique among accepted messages
_INBOX_SCHEMA = f"""
{_INBOX_TABLE};
CREATE INDEX IF NOT EXISTS inbox_key ON inbox (sender, control_id);
CREATE UNIQUE INDEX IF NOT EXISTS inbox_accepted_key ON inbox (sender, control_id) WHERE status != '{REFUSED}';
CREATE TABLE IF NOT EXISTS inbox_sequence (last_id INTEGER NOT NULL);
"""
_INBOX_COLUMNS = ("id", "feed", "sender", "control_id", "message_type", "peer", "received_at", "raw",
                  "content_hash", "status", "ack", "application_ack")
#: SQLite's limit on bound parameters is 32,766 (3.32+); two per key stays far below it.
_KEYS_PER_QUERY = 500
#: receipts moved from the inbox into ``inbound_messages`` (a receipt moved before a crash is skipped)
_MOVE_IN = Direct(sqlite_insert(InboundMessage.__table__).on_conflict_do_nothing())


def inbox_path(database: Path) -> Path:
    return database.with_name(database.name + "-inbox")


class Inbox:
    """Receipts of a SQLite schedule, in a file of their own (see the module doc).

    The receiving side writes it: new receipts, and (at most once a second) the
    deletion of rows the database now holds.  The applying side only reads it,
    from its own connection, possibly in another process: it never waits for
    the receiving side's lock, nor the receiving side for its.  Every inbox id
    at or below the database's highest ``inbound_messages`` id has been moved
    (rows move in id order, ids come from ``inbox_sequence`` started above every
    id either file holds); every id above it has not.
    """

    PRUNE_EVERY_SECONDS = 1.0

    def __init__(self, database: Path, *, writer: bool = True):
        self.path = inbox_path(database)
        if writer and not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR))  # patient data
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
            self._db.execute(f"PRAGMA {pragma}")
        self._schedule = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=30)
        self._schedule.execute("PRAGMA query_only=1")
        self._pruned_at = 0.0
        if not writer:
            self._db.execute("PRAGMA query_only=1")
            return
        with self._writing() as db:
            _upgrade_inbox(db)
        self._db.executescript(_INBOX_SCHEMA)
        with self._writing() as db:
            stored = db.execute("SELECT max(id) FROM inbox").fetchone()[0] or 0
            counter = db.execute("SELECT last_id FROM inbox_sequence").fetchone()
            last = max(stored, self._moved_through(), counter[0] if counter else 0)
            if counter is None:
                db.execute("INSERT INTO inbox_sequence (last_id) VALUES (?)", (last,))
            else:
                db.execute("UPDATE inbox_sequence SET last_id = ?", (last,))

    @classmethod
    def for_database(cls, url: str, *, writer: bool = True) -> Optional["Inbox"]:
        """The inbox of a SQLite database file; None for PostgreSQL (and in-memory SQLite)."""
        parsed = make_url(url)
        database = parsed.database or ""
        if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
            return None
        return cls(Path(database), writer=writer)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._schedule.close()

    def _moved_through(self) -> int:
        """The highest id the database holds: everything up to it has moved."""
        return self._schedule.execute("SELECT max(id) FROM inbound_messages").fetchone()[0] or 0

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # a failed COMMIT (disk full) leaves the transaction open: end it, or
                # every later BEGIN fails and storage never recovers
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _schedule_rows(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            return self._schedule.execute(sql, params).fetchall()

    def store(self, items: list[Incoming]) -> list[Stored]:
        results: list[Stored] = []
        with self._writing() as db:
            now = time.monotonic()
            if now - self._pruned_at > self.PRUNE_EVERY_SECONDS:
                self._pruned_at = now
                db.execute("DELETE FROM inbox WHERE id <= ?", (self._moved_through(),))
            keys = list(dict.fromkeys((i.sender, i.control_id) for i in items if i.control_id))
            known = _rows_by_key(db, "inbox", keys)
            elsewhere = [k for k in keys if k not in known]
            if elsewhere:  # moved to the database already: its row answers the resend
                known.update(_rows_by_key(self._schedule, "inbound_messages", elsewhere))
            last = db.execute("SELECT last_id FROM inbox_sequence").fetchone()[0]
            fresh: dict[tuple[str, str], tuple[int, Incoming]] = {}
            rows = []
            for item in items:
                key = (item.sender, item.control_id)
                if not item.control_id:  # refused for lacking MSH-10: each one kept, none a resend of another
                    last += 1
                    rows.append(_inbox_row(last, item))
                    results.append(Stored(last, False, item.status, item.ack))
                elif key in known and not (known[key][1] == REFUSED and item.status != REFUSED):
                    message_id, status, ack, digest = known[key]
                    reused = bool(digest) and digest != item.content_hash
                    results.append(Stored(message_id, True, status, ack, reused_control_id=reused))
                elif key in fresh:  # the same message twice in one batch
                    message_id, first = fresh[key]
                    results.append(Stored(message_id, True, first.status, first.ack,
                                          reused_control_id=first.content_hash != item.content_hash))
                else:
                    last += 1
                    fresh[key] = (last, item)
                    rows.append(_inbox_row(last, item))
                    results.append(Stored(last, False, item.status, item.ack))
            if rows:
                db.executemany(f"INSERT INTO inbox ({', '.join(_INBOX_COLUMNS)}) "
                               f"VALUES ({', '.join('?' * len(_INBOX_COLUMNS))})", rows)
                db.execute("UPDATE inbox_sequence SET last_id = ?", (last,))
        return results

    def waiting(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        """The oldest receipts above ``after_id``, as ``inbound_messages`` rows."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_INBOX_COLUMNS)} FROM inbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after_id, limit)).fetchall()
        return [_as_message(row) for row in rows]

    def depth(self) -> int:
        """Receipts not yet moved into the database."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM inbox WHERE id > ?", (self._moved_through(),)).fetchone()[0]

    def find(self, message_id: int) -> Optional[tuple[str, Optional[bytes]]]:
        with self._lock:
            row = self._db.execute("SELECT status, ack FROM inbox WHERE id = ?", (message_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def outcome(self, message_id: int) -> Optional[tuple[str, Optional[bytes], Optional[bytes], str]]:
        """``MessageStore.outcome`` read from the database without waiting for its writer."""
        rows = self._schedule_rows("SELECT status, ack, application_ack, error FROM inbound_messages WHERE id = ?",
                                   (message_id,))
        return rows[0] if rows else None


def inbox_rows(url: str) -> list[dict[str, Any]]:
    """What a SQLite database's inbox holds (not yet moved into the database), read
    without opening it for writing: the CLI lists these while the daemon is down."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return []
    path = inbox_path(Path(parsed.database))
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{parsed.database}?mode=ro", uri=True) as db:
        moved_through = db.execute("SELECT coalesce(max(id), 0) FROM inbound_messages").fetchone()[0]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute(f"SELECT {', '.join(_INBOX_COLUMNS)} FROM inbox WHERE id > ? ORDER BY id",
                          (moved_through,)).fetchall()
    return [{**_as_message(row), "error": "", "attempts": 0} for row in rows]


def _as_message(row: tuple) -> dict[str, Any]:
    """An inbox row as the ``inbound_messages`` row it becomes."""
    values = dict(zip(_INBOX_COLUMNS, row))
    values["received_at"] = datetime.fromisoformat(values["received_at"])
    return values


def _inbox_row(message_id: int, item: Incoming) -> tuple:
    return (message_id, item.feed, item.sender, item.control_id, item.message_type, item.peer,
            _utc_text(item.received_at), item.raw, item.content_hash, item.status, item.ack, item.application_ack)


def _upgrade_inbox(db: sqlite3.Connection) -> None:
    """An inbox written before refused messages stopped holding their key had the key
    UNIQUE in its table: rebuilt without (it holds only what is not yet moved)."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'inbox'").fetchone()
    if row is None or "UNIQUE" not in row[0]:
        return
    db.execute("ALTER TABLE inbox RENAME TO inbox_before")
    db.execute(_INBOX_TABLE)
    db.execute("INSERT INTO inbox SELECT * FROM inbox_before")
    db.execute("DROP TABLE inbox_before")


def _rows_by_key(db: sqlite3.Connection, table: str, keys: list[tuple[str, str]]) -> dict:
    """The stored message of each key: the accepted one, else a refused one."""
    found: dict[tuple[str, str], tuple] = {}
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[start:start + _KEYS_PER_QUERY]
        values = ", ".join("(?, ?)" for _ in chunk)
        params = tuple(part for key in chunk for part in key)
        # a join, not "(sender, control_id) IN (VALUES …)": SQLite scans the whole table for that
        for message_id, sender, control_id, status, ack, digest in db.execute(
                f"WITH wanted(sender, control_id) AS (VALUES {values}) "
                f"SELECT t.id, t.sender, t.control_id, t.status, t.ack, t.content_hash "
                f"FROM wanted JOIN {table} AS t ON t.sender = wanted.sender AND t.control_id = wanted.control_id",
                params):
            if found.get((sender, control_id), (0, REFUSED))[1] == REFUSED:
                found[(sender, control_id)] = (message_id, status, ack, digest)
    return found


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def _inbound_row(item: Incoming) -> InboundMessage:
    return InboundMessage(feed=item.feed, sender=item.sender, control_id=item.control_id,
                          message_type=item.message_type, peer=item.peer, received_at=item.received_at,
                          raw=item.raw, content_hash=item.content_hash, status=item.status, ack=item.ack,
                          application_ack=item.application_ack)


class MessageStore:
    def __init__(self, session_factory: sessionmaker, metrics: Metrics, inbox: Optional[Inbox] = None):
        self.sessions = session_factory
        self.metrics = metrics
        self.inbox = inbox
        self.last_failure: Optional[str] = None
        self.last_failure_at: Optional[float] = None
        self.new_messages = threading.Event()
        self._moved_through: Optional[int] = None  # the last inbox id moved into the database

    def store_batch(self, items: list[Incoming]) -> list[Stored]:
        """Commit a batch in one transaction; duplicates return their original."""
        results = self.inbox.store(items) if self.inbox is not None else self._store_batch(items)
        self.last_failure = None
        self.new_messages.set()
        return results

    def _store_batch(self, items: list[Incoming]) -> list[Stored]:
        results: list[Optional[Stored]] = [None] * len(items)
        with self.sessions() as session, session.begin():
            keys = list({(i.sender, i.control_id) for i in items if i.control_id})
            existing: dict[tuple[str, str], Any] = {}  # the accepted message of each key, else a refused one
            for row in session.execute(
                    select(InboundMessage.id, InboundMessage.sender, InboundMessage.control_id,
                           InboundMessage.status, InboundMessage.ack, InboundMessage.content_hash)
                    .where(tuple_(InboundMessage.sender, InboundMessage.control_id).in_(keys))) if keys else ():
                if (held := existing.get((row.sender, row.control_id))) is None or held.status == REFUSED:
                    existing[(row.sender, row.control_id)] = row
            fresh: dict[tuple[str, str], InboundMessage] = {}
            keyless: dict[int, InboundMessage] = {}
            for index, item in enumerate(items):
                key = (item.sender, item.control_id)
                if not item.control_id:  # refused for lacking MSH-10: each one kept, none a resend of another
                    row = _inbound_row(item)
                    session.add(row)
                    keyless[index] = row
                    continue
                if key in existing and not (existing[key].status == REFUSED and item.status != REFUSED):
                    row = existing[key]
                    reused = bool(row.content_hash) and row.content_hash != item.content_hash
                    results[index] = Stored(row.id, True, row.status, row.ack, reused_control_id=reused)
                    continue
                if key in fresh:
                    continue  # the same message twice in one batch: answered below
                row = _inbound_row(item)
                fresh[key] = row
                session.add(row)
            try:
                with session.begin_nested():
                    session.flush()
            except IntegrityError:
                # Another node stored one of them between our select and insert.
                raise StorageUnavailable("concurrent duplicate; retry") from None
            for index, row in keyless.items():
                results[index] = Stored(row.id, False, row.status, row.ack)
            for index, item in enumerate(items):
                if results[index] is None:
                    row = fresh[(item.sender, item.control_id)]
                    first = row.received_at is item.received_at and row.raw is item.raw
                    reused = not first and row.content_hash != item.content_hash
                    results[index] = Stored(row.id, not first, row.status, row.ack, reused_control_id=reused)
        return [r for r in results if r is not None]

    def move_received(self, session: Session, limit: int) -> Optional[int]:
        """Move the oldest inbox rows into ``inbound_messages`` in ``session``'s
        transaction; returns the last id moved, for ``moved`` once that commits."""
        if self.inbox is None:
            return None
        if self._moved_through is None:
            self._moved_through = session.scalar(select(func.max(InboundMessage.id))) or 0
        rows = self.inbox.waiting(self._moved_through, limit)
        if not rows:
            return None
        _MOVE_IN.run_many(session.connection(), rows)
        return rows[-1]["id"]

    def moved(self, through_id: Optional[int]) -> None:
        """The transaction that moved rows up to ``through_id`` committed (the
        receiving side deletes them from the inbox in its own time)."""
        if through_id is not None:
            self._moved_through = through_id

    def inbox_depth(self) -> int:
        return self.inbox.depth() if self.inbox is not None else 0

    def outcome(self, message_id: int) -> tuple[str, Optional[bytes], Optional[bytes], str]:
        if self.inbox is not None:
            # read beside the writer: this runs on the event loop, which must not wait for a batch
            found = self.inbox.outcome(message_id)
            if found is not None:
                return found
            waiting = self.inbox.find(message_id)
            if waiting is not None:
                return waiting[0], waiting[1], None, ""
        with self.sessions() as session:
            row = session.execute(
                select(InboundMessage.status, InboundMessage.ack, InboundMessage.application_ack, InboundMessage.error)
                .where(InboundMessage.id == message_id)
            ).one()
            return row.status, row.ack, row.application_ack, row.error

    def probe(self) -> bool:
        """Try a small durable write; clears the failure once storage works again
        (disk space back, database reachable), so health recovers by itself."""
        from engine.models import JobRun

        try:
            with self.sessions() as session, session.begin():
                row = session.get(JobRun, "storage-probe")
                if row is None:
                    row = JobRun(job_id="storage-probe", runs=0)
                    session.add(row)
                row.runs = (row.runs or 0) + 1
        except Exception as exc:  # noqa: BLE001 - still failing; keep the newest reason
            self.record_failure(exc)
            return False
        self.last_failure = None
        return True

    def record_failure(self, exc: BaseException) -> None:
        self.last_failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.last_failure_at = time.monotonic()


class GroupCommitter:
    """Batches concurrent store requests into shared transactions.

    One thread commits, batch after batch: what arrives while it commits is the
    next batch, taken as soon as that commit ends.  The event loop only queues
    requests and, once per batch, answers them; it wakes the thread only when
    the thread has nothing to do.
    """

    def __init__(self, store: MessageStore, *, max_batch: int = 256):
        self.store = store
        self.max_batch = max_batch
        self._pending: deque[tuple[Incoming, asyncio.Future]] = deque()
        self._work = threading.Condition()
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._commit_batches, name="store", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Ends the thread once every request queued is stored (or refused) and answered."""
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(self, item: Incoming) -> Stored:
        future = self._loop.create_future()
        with self._work:
            self._pending.append((item, future))
            self._work.notify()
        return await future

    def _commit_batches(self) -> None:
        while True:
            with self._work:
                while not self._pending and not self._stopping:
                    self._work.wait()
                if not self._pending:
                    return  # stopping, and every request answered
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
            try:
                results = self.store.store_batch([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter gets a negative answer
                # recorded before the next batch, whose commit clears it
                self.store.record_failure(exc)
                self._loop.call_soon_threadsafe(self._fail, batch, self.store.last_failure or "storage failed")
                continue
            self._loop.call_soon_threadsafe(self._answer, batch, results)

    @staticmethod
    def _answer(batch: list[tuple[Incoming, asyncio.Future]], results: list[Stored]) -> None:
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def _fail(self, batch: list[tuple[Incoming, asyncio.Future]], reason: str) -> None:
        log.error("could not store messages", extra={"batch": len(batch), "error": reason})
        for item, future in batch:
            self.store.metrics.storage_failures.labels(item.feed).inc()
            if not future.done():
                future.set_exception(StorageUnavailable(reason))


def replay(session_factory: sessionmaker, message_id: int, actor, now: datetime) -> None:
    """Queue a parked (or applied) message to be applied again; audited as an operator action."""
    from engine.models import AuditEntry

    with session_factory() as session, session.begin():
        row = session.get(InboundMessage, message_id)
        if row is None:
            raise LookupError(f"no stored message {message_id}")
        if row.status == REFUSED:
            raise ValueError(f"message {message_id} was refused at receipt; the sender must resend it")
        previous = row.status
        row.status, row.error = RECEIVED, ""
        session.add(AuditEntry(at=now, actor=actor.label, source=actor.source, action="message_replayed",
                               entity="inbound_message", entity_id=message_id, from_state=previous,
                               to_state=RECEIVED, reason=""))


def skip(session_factory: sessionmaker, message_id: int, actor, now: datetime, reason: str) -> None:
    """Give up on a parked message (it stays stored, marked skipped): the way past it
    when its feed stops at parked messages (``on_error = "stop"``); audited."""
    from engine.models import AuditEntry

    with session_factory() as session, session.begin():
        row = session.get(InboundMessage, message_id)
        if row is None:
            raise LookupError(f"no stored message {message_id}")
        if row.status != PARKED:
            raise ValueError(f"message {message_id} is {row.status}; only parked messages are skipped")
        row.status = SKIPPED
        row.error = f"skipped by {actor.label}: {reason}" if reason else f"skipped by {actor.label}"
        session.add(AuditEntry(at=now, actor=actor.label, source=actor.source, action="message_skipped",
                               entity="inbound_message", entity_id=message_id, from_state=PARKED,
                               to_state=SKIPPED, reason=reason))

