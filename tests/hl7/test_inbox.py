"""The SQLite inbox: receipts committed beside the database, moved into it by the processor.

Real files: a migrated SQLite database and its ``-inbox`` file.  The point of the
inbox is that storing a receipt never waits for the writer applying messages,
so the first test holds the database's write transaction open while storing.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from engine.db import make_session_factory
from engine.metrics import Metrics
from engine.models import InboundMessage
from hl7.daemon import prepare_database
from hl7.store import RECEIVED, REFUSED, SKIPPED, Inbox, Incoming, MessageStore, content_hash, inbox_path

UTC = timezone.utc


def incoming(control_id: str, *, sender: str = "EPIC^NORTH", body: str = "A", status: str = RECEIVED) -> Incoming:
    raw = (f"MSH|^~\\&|EPIC|NORTH|SE|SE|20260302080000||ADT^A08|{control_id}|P|2.5.1\r"
           f"PID|1||{body}^^^H^MR").encode()
    return Incoming("ehr", sender, control_id, "ADT^A08", "127.0.0.1", datetime.now(UTC), raw, status,
                    b"ACK " + control_id.encode(), content_hash(raw))


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "schedule.db"
    engine = prepare_database(f"sqlite:///{path}")
    yield path, engine
    engine.dispose()


def open_store(path, engine) -> MessageStore:
    return MessageStore(make_session_factory(engine), Metrics(), Inbox(path))


def move_all(store: MessageStore, *, survive: bool = True) -> None:
    with store.sessions() as session, session.begin():
        through = store.move_received(session, 1000)
    if survive:
        store.moved(through)


def inbox_ids(path) -> list[int]:
    with sqlite3.connect(inbox_path(path)) as inbox:
        return [row[0] for row in inbox.execute("select id from inbox order by id")]


def database_rows(store: MessageStore) -> list[tuple]:
    with store.sessions() as session:
        return [tuple(row) for row in session.execute(
            select(InboundMessage.id, InboundMessage.control_id, InboundMessage.status, InboundMessage.ack)
            .order_by(InboundMessage.id))]


def test_storing_never_waits_for_the_database_writer(database):
    path, engine = database
    store = open_store(path, engine)
    holding, release = threading.Event(), threading.Event()

    def long_apply_batch():
        with store.sessions() as session, session.begin():
            session.execute(text("UPDATE job_runs SET runs = runs WHERE 0"))
            holding.set()
            release.wait(10)

    writer = threading.Thread(target=long_apply_batch)
    writer.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        stored = store.store_batch([incoming("C1")])
        waited = time.monotonic() - started
    finally:
        release.set()
        writer.join()
    assert waited < 5, "the receipt waited for the apply transaction"
    assert stored[0].duplicate is False
    with sqlite3.connect(inbox_path(path)) as inbox:
        assert inbox.execute("select control_id, status from inbox").fetchall() == [("C1", RECEIVED)]


def test_a_message_keeps_its_id_and_answer_when_it_moves(database):
    path, engine = database
    store = open_store(path, engine)
    first = store.store_batch([incoming("C1"), incoming("C2", status=SKIPPED)])
    assert [s.message_id for s in first] == [1, 2]
    assert store.outcome(1)[:2] == (RECEIVED, b"ACK C1")  # still in the inbox
    move_all(store)
    assert database_rows(store) == [(1, "C1", RECEIVED, b"ACK C1"), (2, "C2", SKIPPED, b"ACK C2")]
    assert store.inbox_depth() == 0
    # resends: one already moved, one still in the inbox, one twice in a batch
    third = store.store_batch([incoming("C3")])[0]
    again = store.store_batch([incoming("C1"), incoming("C3"), incoming("C4"), incoming("C4")])
    assert [(s.message_id, s.duplicate, s.ack) for s in again] == [
        (1, True, b"ACK C1"), (third.message_id, True, b"ACK C3"),
        (third.message_id + 1, False, b"ACK C4"), (third.message_id + 1, True, b"ACK C4")]


def test_a_reused_control_id_is_told_apart_from_a_resend(database):
    path, engine = database
    store = open_store(path, engine)
    store.store_batch([incoming("C1", body="A")])
    assert store.store_batch([incoming("C1", body="B")])[0].reused_control_id  # in the inbox
    move_all(store)
    assert store.store_batch([incoming("C1", body="B")])[0].reused_control_id  # in the database
    assert not store.store_batch([incoming("C1", body="A")])[0].reused_control_id


def test_a_refused_message_holds_no_key(database):
    """Refused (say, its sender not yet allowed), then resent once that is fixed: stored
    under a new id and answered with its own ACK, the refusal kept, once, for the record."""
    path, engine = database
    store = open_store(path, engine)
    refused = store.store_batch([incoming("C1", status=REFUSED)])[0]
    assert store.store_batch([incoming("C1", status=REFUSED)])[0].message_id == refused.message_id  # kept once
    taken = store.store_batch([incoming("C1")])[0]  # the refusal still in the inbox
    assert (taken.duplicate, taken.status) == (False, RECEIVED) and taken.message_id > refused.message_id
    assert store.store_batch([incoming("C1")])[0].message_id == taken.message_id  # a resend of the accepted one
    store.store_batch([incoming("C2", status=REFUSED)])
    move_all(store)
    later = store.store_batch([incoming("C2")])[0]  # the refusal already moved into the database
    assert (later.duplicate, later.status) == (False, RECEIVED)
    move_all(store)
    assert [row[1:3] for row in database_rows(store)] == [
        ("C1", REFUSED), ("C1", RECEIVED), ("C2", REFUSED), ("C2", RECEIVED)]
    assert store.store_batch([incoming("C2", status=REFUSED)])[0].message_id == later.message_id


def test_messages_refused_for_lacking_a_control_id_are_each_kept(database):
    path, engine = database
    store = open_store(path, engine)
    first, second = store.store_batch([incoming("", status=REFUSED), incoming("", status=REFUSED, body="B")])
    third = store.store_batch([incoming("", status=REFUSED)])[0]
    assert len({first.message_id, second.message_id, third.message_id}) == 3
    assert not (first.duplicate or second.duplicate or third.duplicate)
    move_all(store)
    assert [row[1:3] for row in database_rows(store)] == [("", REFUSED)] * 3


def test_an_inbox_from_before_is_rebuilt_with_its_rows(database):
    """Inboxes written before refused messages stopped holding their key had the key
    UNIQUE in the table: the rows still waiting there are kept, and move."""
    path, engine = database
    with sqlite3.connect(inbox_path(path)) as old:
        old.executescript("""
            CREATE TABLE inbox (id INTEGER PRIMARY KEY, feed TEXT NOT NULL, sender TEXT NOT NULL,
                control_id TEXT NOT NULL, message_type TEXT NOT NULL, peer TEXT NOT NULL, received_at TEXT NOT NULL,
                raw BLOB NOT NULL, content_hash TEXT NOT NULL, status TEXT NOT NULL, ack BLOB, application_ack BLOB,
                UNIQUE (sender, control_id));
            CREATE TABLE inbox_sequence (last_id INTEGER NOT NULL);
            INSERT INTO inbox_sequence VALUES (1);""")
        waiting = incoming("C1", status=REFUSED)
        old.execute("INSERT INTO inbox VALUES (1, 'ehr', ?, 'C1', 'ADT^A08', 'peer', ?, ?, '', ?, ?, NULL)",
                    (waiting.sender, waiting.received_at.isoformat(), waiting.raw, REFUSED, waiting.ack))
    store = open_store(path, engine)
    assert store.store_batch([incoming("C1")])[0].message_id == 2
    move_all(store)
    assert [row[:3] for row in database_rows(store)] == [(1, "C1", REFUSED), (2, "C1", RECEIVED)]
    with sqlite3.connect(inbox_path(path)) as rebuilt:
        assert "UNIQUE" not in rebuilt.execute("SELECT sql FROM sqlite_master WHERE name = 'inbox'").fetchone()[0]


def test_a_crash_right_after_a_move_loses_and_doubles_nothing(database):
    path, engine = database
    store = open_store(path, engine)
    store.store_batch([incoming(f"C{n}") for n in range(5)])
    move_all(store, survive=False)  # committed in the database; the process dies before it notes that
    store.inbox.close()
    assert inbox_ids(path) == [1, 2, 3, 4, 5]  # in both files now

    reopened = open_store(path, engine)  # the restart
    assert reopened.inbox_depth() == 0, "the database holds them: nothing waits"
    later = reopened.store_batch([incoming("C9")])[0]
    assert later.message_id == 6, "ids continue above everything either file holds"
    assert inbox_ids(path) == [6], "the receiving side deleted what had moved"
    move_all(reopened)
    rows = database_rows(reopened)
    assert [r[:2] for r in rows] == [(n + 1, f"C{n}") for n in range(5)] + [(6, "C9")]
    assert reopened.inbox_depth() == 0


def test_the_applying_side_only_reads_the_inbox(database):
    """As the daemon runs it: one process receives, another applies with a read-only inbox."""
    path, engine = database
    receiving = MessageStore(make_session_factory(engine), Metrics(), Inbox(path))
    applying = MessageStore(make_session_factory(engine), Metrics(), Inbox(path, writer=False))
    receiving.store_batch([incoming("C1"), incoming("C2")])
    move_all(applying)
    assert [r[:2] for r in database_rows(applying)] == [(1, "C1"), (2, "C2")]
    with pytest.raises(sqlite3.OperationalError):
        applying.inbox._db.execute("DELETE FROM inbox")
    assert receiving.inbox_depth() == 0 and inbox_ids(path) == [1, 2]
    receiving.inbox.PRUNE_EVERY_SECONDS = 0
    receiving.store_batch([incoming("C3")])
    assert inbox_ids(path) == [3]
    move_all(applying)
    assert [r[:2] for r in database_rows(applying)][-1] == (3, "C3")


def test_ids_start_above_what_the_database_already_holds(database):
    path, engine = database
    with make_session_factory(engine)() as session, session.begin():
        session.add(InboundMessage(id=41, feed="ehr", sender="OLD", control_id="X", received_at=datetime.now(UTC),
                                   raw=b"MSH", status="applied"))
    store = open_store(path, engine)
    assert store.store_batch([incoming("C1")])[0].message_id == 42


def test_no_inbox_for_postgresql_or_memory():
    assert Inbox.for_database("postgresql://postgres@127.0.0.1/test") is None
    assert Inbox.for_database("sqlite://") is None


def test_a_failed_commit_leaves_the_inbox_usable(database):
    """Disk full at COMMIT: the sender gets an error, and the next store works."""
    path, engine = database
    store = open_store(path, engine)
    store.store_batch([incoming("C1")])
    failing = store.inbox._db
    store.inbox._db = _FailingCommit(failing)
    with pytest.raises(sqlite3.OperationalError):
        store.store_batch([incoming("C2")])
    store.inbox._db = failing
    assert not failing.in_transaction
    assert store.store_batch([incoming("C3")])[0].duplicate is False
    with sqlite3.connect(inbox_path(path)) as inbox:
        assert [r[0] for r in inbox.execute("select control_id from inbox order by id")] == ["C1", "C3"]


class _FailingCommit:
    """A connection whose COMMIT fails as it does on a full disk."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.connection.execute(sql, *args)

    def executemany(self, sql, *args):
        return self.connection.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self.connection, name)


def test_stopping_the_committer_stores_and_answers_what_is_queued(database):
    import asyncio

    from hl7.store import GroupCommitter, Stored

    path, engine = database
    store = open_store(path, engine)

    async def run() -> list:
        committer = GroupCommitter(store, max_batch=8)
        committer.start()
        requests = [asyncio.ensure_future(committer.submit(incoming(f"Q{n}", body=f"B{n}"))) for n in range(60)]
        await asyncio.sleep(0)  # every request queued, few committed yet
        await committer.stop()
        done, pending = await asyncio.wait(requests, timeout=5)
        assert not pending, "a request queued at stop was never answered"
        return [task.result() for task in requests]

    answers = asyncio.run(run())
    assert all(isinstance(answer, Stored) and not answer.duplicate for answer in answers)
    assert inbox_ids(path) == sorted(answer.message_id for answer in answers)
