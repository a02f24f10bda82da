"""Database plumbing: one engine and one session factory per process.

SQLite is the embedded default (WAL, synchronous=FULL, foreign keys on, and
``BEGIN IMMEDIATE`` so every write transaction takes the single writer lock at
its start instead of failing half-way with "database is locked").  PostgreSQL
is the multi-node store.  Both get exactly the same schema.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import Connection, DateTime, MetaData, Table, create_engine, event, insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zone type; storing naive UTC and re-attaching UTC on
    the way out keeps comparisons and ordering identical on both databases.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given where UTC is required")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def _prepare_sqlite_file(url) -> None:
    """Create the SQLite file (and its directory) readable by its owner only.

    The file holds patient data; a umask of 022 would leave it world-readable.
    """
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR)
        os.close(fd)
    else:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def _serialized_connection_class(write_lock: threading.RLock) -> type[sqlite3.Connection]:
    """A pysqlite connection that gives the process-wide write lock back the
    moment its transaction ends (see ``make_engine``)."""

    class SerializedConnection(sqlite3.Connection):
        holds_write_lock = False

        def _release(self) -> None:
            if self.holds_write_lock:
                self.holds_write_lock = False
                try:
                    write_lock.release()
                except RuntimeError:  # ended from another thread (garbage collection): nothing held here
                    pass

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self._release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._release()

    return SerializedConnection


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite_file(parsed)
        # SQLite has one writer.  Threads of this process queue for it on a lock
        # of ours, handed over the moment a transaction ends, instead of in
        # SQLite's busy handler, which sleeps up to 100 ms between attempts and
        # would put those sleeps straight into ACK latency.  Other processes
        # still wait in the busy handler (busy_timeout).
        write_lock = threading.RLock()
        engine = create_engine(
            parsed,
            connect_args={"timeout": 30, "check_same_thread": False,
                          "factory": _serialized_connection_class(write_lock)},
            # pysqlite's own transaction handling would defer BEGIN; we issue it.
            isolation_level=None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection):
            dbapi_connection = connection.connection.dbapi_connection
            write_lock.acquire()
            dbapi_connection.holds_write_lock = True
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                dbapi_connection._release()
                raise

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_size=pool_size, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker:
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "after_transaction_create", _transaction_created)
    event.listen(factory, "before_commit", write_pending_rows)
    event.listen(factory, "after_rollback", _discard_pending_rows)
    return factory


# --- rows inserted at the transaction's flush points ----------------------------------

#: ``session.info`` key of the transaction's ``_PendingRows``
_PENDING_ROWS = "slotengine.pending_rows"


class _PendingRows:
    __slots__ = ("connection", "by_table")

    def __init__(self) -> None:
        self.connection: Optional[Connection] = None
        self.by_table: dict[Table, list[dict[str, Any]]] = {}


def insert_at_flush_point(session: Session, table: Table, row: dict[str, Any]) -> None:
    """Insert ``row`` at the transaction's next flush point, with the other rows
    waiting for ``table``: one executemany instead of one INSERT per row.

    The flush points are the beginning of a savepoint and the commit of a savepoint
    or of the transaction.  A rollback, of a savepoint or of the transaction,
    discards the waiting rows: as every savepoint's beginning and end is a flush
    point, all of them were added in the innermost transaction, the one rolled back.
    Code that reads ``table`` in the same transaction calls ``write_pending_rows``
    first (a check on every ORM statement would cost more than the batching saves).

    For sessions of ``make_session_factory`` only: they have the flush points."""
    # the innermost savepoint is now on the database (SQLAlchemy sends its SAVEPOINT with
    # its first statement): every flush point writes the rows there, on this connection
    connection = session.connection()
    pending: _PendingRows = session.info[_PENDING_ROWS]
    pending.connection = connection
    pending.by_table.setdefault(table, []).append(row)


def write_pending_rows(session: Session) -> None:
    """Insert the rows waiting for the transaction's next flush point, in the order they came."""
    pending: Optional[_PendingRows] = session.info.get(_PENDING_ROWS)
    if pending is None or not pending.by_table:
        return
    by_table, pending.by_table = pending.by_table, {}
    for table, rows in by_table.items():
        pending.connection.execute(insert(table), rows)


def pending_row_count(session: Session) -> int:
    """How many rows wait for the transaction's next flush point."""
    pending: Optional[_PendingRows] = session.info.get(_PENDING_ROWS)
    return sum(map(len, pending.by_table.values())) if pending is not None else 0


def _transaction_created(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info[_PENDING_ROWS] = _PendingRows()  # nothing of an earlier transaction is kept
    elif transaction.nested:
        # its SAVEPOINT is not on the database yet (SQLAlchemy sends it with the savepoint's
        # first statement): the rows written here belong to the enclosing transaction, as they must
        write_pending_rows(session)


def _discard_pending_rows(session: Session) -> None:
    pending: Optional[_PendingRows] = session.info.get(_PENDING_ROWS)
    if pending is not None:
        pending.by_table = {}


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
