"""Applies stored messages to the schedule, in arrival order per sender.

One transaction applies a batch; each message's schedule changes and its new
status (applied / parked with the reason) commit together — a crash leaves a
message either wholly applied and marked, or untouched and still ``received``.

A batch first runs *unguarded*: no savepoint per message or per plugin hook
(they cost about a fifth of the statements).  A message that fails before
writing anything is simply parked.  One that fails after writing, or a plugin
hook that raises, undoes the whole transaction, and the batch is redone
*guarded* — each message, and each change's plugin hooks, in a savepoint, so
a failure undoes only its own work — as is every batch for the next
``GUARDED_SECONDS``: a feed or a plugin that keeps failing costs a redo a
minute, not one a batch.  Several daemons on one PostgreSQL
share the work: a transaction-scoped advisory lock per sender keeps each
sender's messages in order on one node at a time.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

from sqlalchemy import bindparam, event, func, select, text, update
from sqlalchemy.orm import Session

from engine.db import Direct, pending_row_count
from engine.errors import SchedulingError
from engine.metrics import Metrics
from engine.models import InboundMessage
from engine.plugin_host import UNGUARDED_HOOKS, UnguardedHookFailed
from engine.service import Scheduler
from hl7.ack import ErrorDetail, build_ack, new_control_id
from hl7.filler import FillerSettings, apply_request, is_filler_request
from hl7.mapping import MappingError, apply_message, look_ahead
from hl7.message import HL7ParseError, Message, check_header, parse
from hl7.store import APPLIED, PARKED, RECEIVED, MessageStore

log = logging.getLogger("slotengine.processor")

#: A batch commits after this long even if more messages wait, so that
#: "applied" acknowledgements and plugins' notices never wait long.
BATCH_SECONDS = 0.1
#: Messages loaded at a time within a batch.
CLAIM_ROWS = 16
#: The queue-depth gauge counts rows; once a second is often enough.
DEPTH_EVERY_SECONDS = 1.0
#: After a batch had to be redone, batches run guarded this long.
GUARDED_SECONDS = 60.0
#: How long an idle processor sleeps before it looks for messages nobody woke it for.
IDLE_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class FeedPolicy:
    mode: str = "mirror"  # mirror | filler
    on_error: str = "continue"  # continue | stop
    ack_when: str = "stored"  # stored | applied
    filler: FillerSettings = field(default_factory=FillerSettings)


@dataclass
class Outcome:
    message_id: int
    feed: str
    status: str
    errors: list[ErrorDetail] = field(default_factory=list)
    reply: Optional[bytes] = None  # the application ACK, or the response message (SRR, SQR)


class Processor:
    def __init__(
        self,
        scheduler: Scheduler,
        store: MessageStore,
        policies: dict[str, FeedPolicy],
        metrics: Metrics,
        *,
        batch_size: int = 100,
        on_outcomes: Callable[[list[Outcome]], None] = lambda outcomes: None,
        idle: Any = None,
    ):
        self.scheduler = scheduler
        self.store = store
        self.policies = policies
        self.metrics = metrics
        self.batch_size = batch_size
        self.on_outcomes = on_outcomes
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self._depth_counted_at = 0.0
        self._guarded_until = 0.0
        self._parsed_ahead: dict[int, Message] = {}  # the last claim's messages, by id
        self._writes = 0  # statements other than SELECT run on the engine: did a failed message write?
        self._counting: set = set()  # engines whose statements are counted
        #: ``value`` 1 while this processor waits for messages (or is about to), shared with what
        #: wakes it from another process (``hl7.applier``), which sends a wake only then
        self.idle = idle if idle is not None else SimpleNamespace(value=0)

    # --- the worker thread -------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="processor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the batch in flight (never half-applied), then stop; what the
        inbox still holds moves into the database, to be applied at the next start."""
        self._stop.set()
        self.store.new_messages.set()
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
        try:
            while True:
                with self.scheduler.sessions() as session, session.begin():
                    moved_through = self.store.move_received(session, 1000)
                self.store.moved(moved_through)
                if moved_through is None:
                    break
        except Exception as exc:  # noqa: BLE001 - still in the inbox: moved at the next start
            log.error("inbox not emptied at shutdown", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                applied = self.apply_pending()
                self.last_error = None
                backoff = 0.05
            except Exception as exc:  # noqa: BLE001 - database down: retry, lose nothing
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                log.error("applying messages failed; will retry", extra={"error": self.last_error})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not applied:
                if not self.idle.value:
                    self.idle.value = 1
                    continue  # look once more: what was stored before the flag went up was not announced
                self.store.new_messages.wait(IDLE_POLL_SECONDS)
                self.store.new_messages.clear()

    # --- one batch ---------------------------------------------------------------

    def apply_pending(self) -> int:
        """Apply one batch; returns how many stored messages it handled (0: none waited)."""
        if time.monotonic() < self._guarded_until:
            return self._apply_batch(guarded=True)
        try:
            return self._apply_batch(guarded=False)
        except _RedoGuarded as redo:
            self._guarded_until = time.monotonic() + GUARDED_SECONDS
            self.metrics.batches_redone.inc()
            log.warning("batch redone with savepoints", extra={"reason": redo.reason})
            return self._apply_batch(guarded=True)

    def _apply_batch(self, *, guarded: bool) -> int:
        outcomes: list[Outcome] = []
        views: list[Scheduler] = []
        applied_in: dict[str, list[float]] = defaultdict(list)  # seconds per message, by feed: observed after
        finished: list[dict] = []  # the messages' new status, written in one statement with the batch
        with self.scheduler.sessions() as session, session.begin():
            session.info[UNGUARDED_HOOKS] = not guarded
            self._count_writes(session)
            moved_through = self.store.move_received(session, self.batch_size)
            # per sender, for this whole transaction: may its messages be applied here?
            allowed: dict[str, bool] = {}
            batch_started = time.monotonic()
            for row, message in self._waiting(session, allowed, guarded):
                if outcomes and (len(outcomes) >= self.batch_size
                                 or time.monotonic() - batch_started > BATCH_SECONDS):
                    break  # the rest stay "received" for the next batch
                if not allowed[row.sender]:
                    continue  # held back: another node applies this sender, or its feed stopped at a parked one
                started = time.perf_counter()
                view = self.scheduler.within(session)
                outcome = self._apply_one(session, view, row, message, guarded)
                finished.append({"message_id": row.id, "status": outcome.status, "attempts": row.attempts + 1,
                                 # an error may quote the message, and PostgreSQL stores no NUL in text
                                 "error": "; ".join(e.described() for e in outcome.errors)[:4000].replace("\x00", "\ufffd")
                                 if outcome.status == PARKED else "",
                                 "processed_at": self.scheduler.clock.now(), "application_ack": outcome.reply})
                if outcome.status == APPLIED:
                    views.append(view)
                elif outcome.status == PARKED and self.policies.get(row.feed, FeedPolicy()).on_error == "stop":
                    allowed[row.sender] = False
                outcomes.append(outcome)
                applied_in[row.feed].append(time.perf_counter() - started)
            if finished:
                _FINISH.run_many(session.connection(), finished)
            depth = self._received(session)
        self.store.moved(moved_through)
        if depth is not None:
            self.metrics.queue_depth.set(depth + self.store.inbox_depth())
        for view in views:
            view.notify_committed()
        for feed, seconds in applied_in.items():  # a label looked up once a batch, not once a message
            observe = self.metrics.apply_seconds.labels(feed).observe
            for each in seconds:
                observe(each)
        for (feed, parked), count in Counter((o.feed, o.status == PARKED) for o in outcomes).items():
            (self.metrics.messages_parked if parked else self.metrics.messages_applied).labels(feed).inc(count)
        if outcomes:
            self.on_outcomes(outcomes)
        return len(outcomes) or int(moved_through is not None)

    def _received(self, session: Session) -> Optional[int]:
        now = time.monotonic()
        if now - self._depth_counted_at < DEPTH_EVERY_SECONDS:
            return None
        self._depth_counted_at = now
        return session.scalar(select(func.count()).select_from(InboundMessage)
                              .where(InboundMessage.status == RECEIVED))

    def _waiting(self, session: Session, allowed: dict[str, bool],
                 guarded: bool) -> Iterator[tuple[Any, Optional[Message]]]:
        """The waiting rows, each with its message parsed (None: it does not parse), a few at
        a time: the patients those few name are looked up with one query before any applies.

        That look-up is only a shortcut (each message looks up what it lacks), so its failure
        must not hold the feed up: unguarded, the batch is redone guarded; guarded, the look-up
        runs in a savepoint and, failing, is left out, and each message's own look-up fails in
        that message's savepoint, which parks it alone."""
        after_id = 0
        view = self.scheduler.within(session)
        while rows := self._claim(session, after_id, allowed):
            # a batch that ends mid-claim leaves rows parsed for nothing: the next batch takes them
            parsed_before = self._parsed_ahead
            messages = [(parsed_before.get(row.id) or _parsed(row.raw)) if allowed[row.sender] else None
                        for row in rows]
            self._parsed_ahead = {row.id: message for row, message in zip(rows, messages) if message is not None}
            ahead = [message for message in messages if message is not None]
            if not guarded:
                try:
                    look_ahead(view, ahead)
                except Exception as exc:  # noqa: BLE001 - see above
                    raise _RedoGuarded(f"the look-ahead raised {type(exc).__name__}") from exc
            else:
                savepoint = session.begin_nested()
                try:
                    look_ahead(view, ahead)
                except Exception:  # noqa: BLE001 - see above
                    savepoint.rollback()
                    log.warning("look-ahead failed; the messages look up for themselves", exc_info=True)
                else:
                    savepoint.commit()
            yield from zip(rows, messages)
            after_id = rows[-1].id

    def _claim(self, session: Session, after_id: int, allowed: dict[str, bool]) -> list[Any]:
        """The next few waiting messages after ``after_id``; ``allowed`` learns their
        senders.  A few at a time: a batch ends after ``BATCH_SECONDS``, and rows
        loaded past that point are waste."""
        rows = _NEXT_WAITING.fetch(session, {"after_id": after_id})
        if not rows:
            return []
        postgres = session.get_bind().dialect.name == "postgresql"
        for row in rows:
            if row.sender not in allowed:
                allowed[row.sender] = self._may_apply(session, row, postgres)
        claimed = [row.id for row in rows if allowed[row.sender]]
        if postgres and claimed:
            # Another node may have applied some of them before we held the sender's lock.
            locked = {row.id: row for row in session.execute(_WAITING.where(
                InboundMessage.id.in_(claimed), InboundMessage.status == RECEIVED).with_for_update())}
            rows = [locked.get(row.id) if allowed[row.sender] else row for row in rows]
            rows = [row for row in rows if row is not None]
        return rows  # with those of senders held back, which the caller passes over

    def _may_apply(self, session: Session, row: Any, postgres: bool) -> bool:
        if postgres:
            key = zlib.crc32(f"slotengine-sender:{row.sender}".encode()) - 2**31
            if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}):
                return False
        policy = self.policies.get(row.feed, FeedPolicy())
        if policy.on_error == "stop":
            parked = session.scalar(select(InboundMessage.id).where(
                InboundMessage.sender == row.sender, InboundMessage.status == PARKED,
                InboundMessage.id < row.id).limit(1))
            if parked is not None:
                return False
        return True

    def _count_writes(self, session: Session) -> None:
        engine = session.get_bind()
        if engine not in self._counting:
            self._counting.add(engine)
            event.listen(engine, "before_cursor_execute", self._statement_run)

    def _statement_run(self, _conn, _cursor, statement: str, *_args) -> None:
        if not statement.startswith("SELECT"):
            self._writes += 1

    def _wrote(self, session: Session, before: tuple[int, int]) -> bool:
        """Whether the message being applied wrote anything: statements run, ORM changes not
        yet flushed, or rows waiting for the transaction's next flush point (audit)."""
        return ((self._writes, pending_row_count(session)) != before
                or bool(session.new or session.dirty or session.deleted))

    def _apply_one(self, session: Session, view: Scheduler, row: Any, parsed: Optional[Message],
                   guarded: bool) -> Outcome:
        policy = self.policies.get(row.feed, FeedPolicy())
        message = None
        if not guarded:
            session.flush()  # the previous message's pending changes are not this one's writes
        savepoint = session.begin_nested() if guarded else None
        writes_before = self._writes, pending_row_count(session)
        try:
            message = parsed or parse(row.raw)
            if policy.mode == "filler" and is_filler_request(message.message_type, message.trigger_event):
                result = apply_request(view, message, message_id=row.id, settings=policy.filler)
            else:
                result = apply_message(view, message, mode=policy.mode, message_id=row.id)
        except UnguardedHookFailed as exc:
            raise _RedoGuarded(f"plugin {exc.plugin} raised in {exc.hook}") from exc
        except (MappingError, HL7ParseError, SchedulingError) as exc:
            if not guarded and self._wrote(session, writes_before):
                raise _RedoGuarded(f"message {row.id} failed after writing: {type(exc).__name__}") from exc
            if savepoint:
                savepoint.rollback()
            view._deferred.clear()
            log.warning("message parked", extra={"feed": row.feed, "message_id": row.id,
                                                 "control_id": row.control_id, "error": type(exc).__name__})
            outcome = Outcome(row.id, row.feed, PARKED, _errors_of(exc))
        except Exception as exc:  # noqa: BLE001 - a bug or a bad plugin: park, keep going
            if not guarded:
                raise _RedoGuarded(f"message {row.id} raised {type(exc).__name__}") from exc
            savepoint.rollback()
            view._deferred.clear()
            detail = ErrorDetail("MSH", 1, 0, 0, "207", "E", f"internal error while applying: {type(exc).__name__}")
            log.error("message parked after an internal error", exc_info=True,
                      extra={"feed": row.feed, "message_id": row.id, "control_id": row.control_id})
            outcome = Outcome(row.id, row.feed, PARKED, [detail])
        else:
            if savepoint:
                savepoint.commit()
            outcome = Outcome(row.id, row.feed, result.status, list(result.warnings), result.response)
        if message is not None and outcome.reply is None and (policy.ack_when == "applied" or message.enhanced_mode):
            # Built here, in the same transaction as the outcome, so a resend of
            # this message later gets exactly this answer.
            code = "AE" if outcome.status == PARKED else "AA"
            # the header's warnings too, as the listener's acknowledgement at receipt tells them
            warnings = [problem for problem in check_header(message) if problem.severity != "E"]
            outcome.reply = build_ack(message, code, warnings + outcome.errors, control_id=new_control_id(),
                                      now=self.scheduler.clock.now())
        return outcome


class _RedoGuarded(Exception):
    """Undo the unguarded batch (the transaction rolls back) and redo it guarded."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


_WAITING = select(InboundMessage.id, InboundMessage.feed, InboundMessage.sender, InboundMessage.control_id,
                  InboundMessage.raw, InboundMessage.attempts)
_NEXT_WAITING = Direct(_WAITING.where(InboundMessage.status == RECEIVED, InboundMessage.id > bindparam("after_id"))
                       .order_by(InboundMessage.id).limit(CLAIM_ROWS))
#: a message's outcome, written for the whole batch with one statement
_FINISH = Direct(update(InboundMessage.__table__).where(InboundMessage.__table__.c.id == bindparam("message_id")))


def _parsed(raw: bytes) -> Optional[Message]:
    try:
        return parse(raw)
    except Exception:  # noqa: BLE001 - parsed again when applied, where the error is reported
        return None


def _errors_of(exc: Exception) -> list[ErrorDetail]:
    if isinstance(exc, MappingError):
        return list(exc.errors)
    if isinstance(exc, HL7ParseError):
        return [ErrorDetail(exc.segment or "MSH", exc.sequence or 1, exc.field or 0, exc.component or 0,
                            exc.code or "102", "E", exc.message)]
    code = {"not_found": "204", "slot_unavailable": "207", "illegal_transition": "207"}.get(
        getattr(exc, "code", ""), "207")
    return [ErrorDetail("SCH", 1, 0, 0, code, "E", str(exc))]
