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
from collections import namedtuple
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterator, Optional

from sqlalchemy import Connection, DateTime, MetaData, Table, bindparam, create_engine, event, insert, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.state import InstanceState
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

    # On SQLite each conversion is one function, not this type's and then SQLAlchemy's
    # text conversion: every statement of the apply path binds or reads a few times.
    # The text is SQLAlchemy's SQLite storage format to the character (rows are compared
    # as text), which ``tests/engine/test_direct.py`` checks against the two-step path.

    def bind_processor(self, dialect):
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value):
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError(f"naive datetime {value!r} given where UTC is required")
            return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ", "microseconds")

        return process

    def result_processor(self, dialect, coltype):
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value):
            return None if value is None else datetime.fromisoformat(value).replace(tzinfo=timezone.utc)

        return process


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
            # 1,024 prepared statements kept, not 128: the apply path alone runs some 170 distinct
            # ones, and past 128 each was prepared again at nearly every use
            connect_args={"timeout": 30, "check_same_thread": False, "cached_statements": 1024,
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
            if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                return  # a read outside any transaction (``reading``): it takes no write lock
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


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads outside any transaction: on SQLite each statement sees the
    last commit and neither waits for nor holds up the single writer, as every
    transaction of ``make_engine``'s engine does (BEGIN IMMEDIATE).  For a look before
    a write transaction that is often not needed (has any task fallen due?)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        yield connection


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
        statement = _INSERTS.get(table)
        if statement is None:
            statement = _INSERTS[table] = Direct(insert(table))
        for _names, alike in groupby(rows, key=dict.keys):  # one statement takes one set of names
            statement.run_many(pending.connection, list(alike))


#: ``write_pending_rows``' INSERT of each table
_INSERTS: dict[Table, "Direct"] = {}


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


# --- statements run straight on the driver -------------------------------------------


class Direct:
    """A Core statement run straight on the driver's cursor of a ``Connection``.

    ``Connection.execute`` spends three to four times the database's own time on a
    small statement: the cache key, the parameters, the execution context, the result.
    The apply path runs about a dozen statements a message, nearly all of fixed shape, so
    here a statement is compiled once per dialect and per set of parameter names,
    with SQLAlchemy's own bind and result processors and Python-side column
    defaults, and each run only converts the values and calls the driver.  What
    ``Connection.execute`` promises otherwise still holds: engine listeners of
    ``before_cursor_execute`` see each statement (``context`` is None), driver
    errors come out as SQLAlchemy's (``IntegrityError``…), a lost connection is
    invalidated.  The connection must be in a transaction (a session's).

    Not for statements with expanding (IN list) parameters.  Rows come back as
    named tuples; several parameter sets with RETURNING go in one statement.
    It reads SQLAlchemy's compiled form through private names (``_bind_processors``,
    ``_result_columns``, ``_insertmanyvalues``) and wraps errors with
    ``Connection._handle_dbapi_exception``: hence ``sqlalchemy<2.2`` in pyproject.toml,
    and ``tests/engine/test_direct.py`` compares it with ``Connection.execute``."""

    __slots__ = ("statement", "_forms")

    #: parameter sets per statement of ``run_many`` with RETURNING on SQLite (it allows 32,766 parameters)
    ROWS_AT_ONCE = 500

    def __init__(self, statement: Any):
        self.statement = statement
        self._forms: dict[tuple[str, frozenset[str]], _Form] = {}

    def rows(self, connection: Connection, params: Optional[dict[str, Any]] = None) -> list[tuple]:
        """Run once; the rows it returns (SELECT or RETURNING)."""
        form = self._form(connection, params)
        return form.run(connection, form.bind(params), many=False, fetch=True)

    def fetch(self, session: Session, params: Optional[dict[str, Any]] = None) -> list[tuple]:
        """``rows`` for a session's reader: what an ORM statement would autoflush is flushed first."""
        session.flush()
        return self.rows(session.connection(), params)

    def run(self, connection: Connection, params: Optional[dict[str, Any]] = None) -> int:
        """Run once; how many rows it changed."""
        form = self._form(connection, params)
        return form.run(connection, form.bind(params), many=False, fetch=False)

    def run_many(self, connection: Connection, rows: list[dict[str, Any]]) -> list[tuple]:
        """Run for each parameter set (all with the same names); the rows RETURNING gave, if any."""
        if not rows:
            return []
        form = self._form(connection, rows[0])
        if len(rows) == 1:
            # psycopg runs executemany in a pipeline: three waits on the server even for one set
            returned = form.run(connection, form.bind(rows[0]), many=False, fetch=bool(form.row_type))
            return returned if form.row_type else []
        if not form.row_type:
            form.run(connection, [form.bind(row) for row in rows], many=True, fetch=False)
            return []
        if connection.dialect.name != "sqlite":  # psycopg returns each set's rows in turn
            return form.run(connection, [form.bind(row) for row in rows], many=True, fetch=True)
        # SQLite: one INSERT … VALUES (…), (…) … RETURNING per ROWS_AT_ONCE sets
        returned: list[tuple] = []
        for first in range(0, len(rows), self.ROWS_AT_ONCE):
            chunk = rows[first:first + self.ROWS_AT_ONCE]
            values = [value for row in chunk for value in form.bind(row)]
            returned += form.for_rows(len(chunk)).run(connection, values, many=False, fetch=True)
        return returned

    def _form(self, connection: Connection, params: Optional[dict[str, Any]]) -> "_Form":
        if not connection.in_transaction():
            raise RuntimeError("Direct statements run inside a transaction")
        key = (connection.dialect.name, frozenset(params) if params else frozenset())
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = _Form(self.statement, connection.dialect, key[1])
        return form


class _Form:
    """One compiled form of a ``Direct`` statement."""

    __slots__ = ("sql", "binds", "defaults", "generated", "positional", "results", "row_type", "new_row",
                 "values_clause", "_by_row_count", "_names", "_pick", "_processed", "_merge")

    def __init__(self, statement: Any, dialect: Any, keys: frozenset[str]):
        compiled = statement.compile(dialect=dialect, column_keys=sorted(keys), for_executemany=True)
        if compiled.post_compile_params or compiled.literal_execute_params or compiled.escaped_bind_names:
            raise ValueError("Direct statements take no expanding, literal-execute or escaped parameters")
        self.sql = compiled.string
        self.positional = compiled.positional
        names = compiled.positiontup if compiled.positional else list(compiled.bind_names.values())
        processors = compiled._bind_processors
        self.binds = [(name, processors.get(name)) for name in names]
        # the statement's own literal values; the caller's parameters go over them
        self.defaults = {name: value for name, value in compiled.construct_params(_check=False).items()
                         if name not in keys}
        # columns given no value whose default SQLAlchemy computes in Python (a dict, a list…)
        self.generated: list[tuple[str, Any]] = []
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default if column in compiled.insert_prefetch else column.onupdate
            if default.is_scalar:
                self.defaults[column.key] = default.arg
            elif default.is_callable:
                self.defaults.pop(column.key, None)
                self.generated.append((column.key, default.arg))
            else:
                raise ValueError(f"Direct statements compute no SQL default ({column})")
        columns = compiled._result_columns
        self.results = [column[3]._cached_result_processor(dialect, None) for column in columns]
        self.row_type = namedtuple("Row", [column[0] for column in columns], rename=True) if columns else None
        # ``Row._make`` less its length check, which the statement's own columns make needless
        self.new_row = partial(tuple.__new__, self.row_type) if columns else None
        imv = getattr(compiled, "_insertmanyvalues", None)
        self.values_clause = f"({imv.single_values_expr})" if imv is not None and self.positional else None
        self._by_row_count: dict[int, _Form] = {}
        # binding runs for every row written (a booking writes a dozen reservations): values
        # picked in one C call, and only those of a type with a processor converted
        self._names = tuple(name for name, _process in self.binds)
        self._pick = itemgetter(*self._names) if len(self._names) > 1 else \
            (lambda values, names=self._names: tuple(values[name] for name in names))
        self._processed = [(index, process) for index, (_name, process) in enumerate(self.binds) if process]
        self._merge = bool(self.defaults or self.generated)

    def bind(self, params: Optional[dict[str, Any]]) -> Any:
        if self._merge or not params:
            values = {**self.defaults, **params} if params else dict(self.defaults)
            for name, make in self.generated:
                if name not in values:
                    values[name] = make(None)  # SQLAlchemy's wrapper of a default callable takes a context
        else:
            values = params  # read only
        row = list(self._pick(values))
        for index, process in self._processed:
            row[index] = process(row[index])
        return row if self.positional else dict(zip(self._names, row))

    def for_rows(self, count: int) -> "_Form":
        """This INSERT with ``count`` VALUES tuples, for as many parameter sets laid end to end."""
        if count == 1:
            return self
        form = self._by_row_count.get(count)
        if form is None:
            if self.values_clause is None or self.sql.count(self.values_clause) != 1:
                raise ValueError("only a positional INSERT … VALUES takes several rows in one statement")
            form = _Form.__new__(_Form)
            form.sql = self.sql.replace(self.values_clause, ", ".join([self.values_clause] * count))
            form.positional, form.results, form.row_type, form.new_row = True, self.results, self.row_type, self.new_row
            self._by_row_count[count] = form
        return form

    def run(self, connection: Connection, parameters: Any, *, many: bool, fetch: bool) -> Any:
        sql = self.sql
        cursor = connection.connection.dbapi_connection.cursor()
        try:
            if connection._has_events or connection.engine._has_events:
                for listener in connection.dispatch.before_cursor_execute:
                    sql, parameters = listener(connection, cursor, sql, parameters, None, many)
            if many:
                if fetch:
                    cursor.executemany(sql, parameters, returning=True)
                    fetched = []
                    while True:
                        fetched += cursor.fetchall()
                        if not cursor.nextset():
                            break
                else:
                    cursor.executemany(sql, parameters)
            else:
                cursor.execute(sql, parameters)
                fetched = cursor.fetchall() if fetch else None
            if not fetch:
                return cursor.rowcount
        except Exception as exc:  # noqa: BLE001 - wrapped (and a lost connection invalidated) as SQLAlchemy does
            connection._handle_dbapi_exception(exc, sql, parameters, cursor, None)
        finally:
            cursor.close()
        make, processors = self.new_row, self.results
        if not any(processors):
            return list(map(make, fetched))
        return [make([process(value) if process else value for process, value in zip(processors, row)])
                for row in fetched]


# --- changed rows written without the unit of work -------------------------------------


def flush_changes(session: Session) -> None:
    """``session.flush()``, cheaper for the common case: when all the session holds to write
    is changed column values of rows already stored, each row gets one UPDATE of what
    changed, by primary key, straight on the driver (``Direct``), and is left clean and
    noted as changed in the transaction (a rollback expires it), as the flush leaves it.
    The unit of work costs several times that statement, and every message changing an
    appointment or a patient paid for it.  New or deleted rows, a changed relationship or
    primary key, or a flush or update listener anywhere: the session flushes as ever."""
    if session._new or session._deleted:
        session.flush()
        return
    modified = session.identity_map._modified
    if not modified:
        return
    dispatch = session.dispatch
    if dispatch.before_flush or dispatch.after_flush or dispatch.after_flush_postexec:
        session.flush()
        return
    updates = []
    for state in modified:
        mapper = state.mapper
        columns = _updatable_columns(mapper)
        if columns is None or mapper.dispatch.before_update or mapper.dispatch.after_update \
                or not state.committed_state.keys() <= columns.keys():
            session.flush()
            return
        changed = {}
        for key, old in state.committed_state.items():
            column = columns[key]
            new = state.dict.get(key)
            if old is NO_VALUE or not column.type.compare_values(old, new):
                changed[column.key] = new
        updates.append((state, changed))
    connection = session.connection()
    for state, changed in updates:
        if changed:
            _UPDATES_BY_ID[state.mapper].run(connection, {**changed, "row_id_": state.identity[0]})
    states = [state for state, _changed in updates]
    InstanceState._commit_all_states(((state, state.dict) for state in states), session.identity_map)
    session._register_altered(states)


#: each mapper's column attributes (primary key left out) by key, None where
#: ``flush_changes`` leaves the mapper's rows to the flush
_UPDATABLE: dict[Any, Optional[dict[str, Any]]] = {}
#: each such mapper's UPDATE by primary key
_UPDATES_BY_ID: dict[Any, Direct] = {}


def _updatable_columns(mapper: Any) -> Optional[dict[str, Any]]:
    if mapper in _UPDATABLE:
        return _UPDATABLE[mapper]
    table = mapper.local_table
    columns = None
    if (mapper.inherits is None and not mapper.polymorphic_map and mapper.version_id_col is None
            and len(mapper.primary_key) == 1 and isinstance(table, Table)
            and all(column.onupdate is None and column.server_onupdate is None for column in table.columns)):
        key = mapper.primary_key[0]
        columns = {prop.key: prop.columns[0] for prop in mapper.column_attrs
                   if len(prop.columns) == 1 and prop.columns[0].table is table and prop.columns[0] is not key}
        _UPDATES_BY_ID[mapper] = Direct(update(table).where(key == bindparam("row_id_")))
    _UPDATABLE[mapper] = columns
    return columns
