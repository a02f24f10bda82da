"""The durable message store: receive → commit → acknowledge.

Every listener connection hands its message to one ``GroupCommitter``; the
committer writes whatever has arrived meanwhile in one transaction (one fsync
shared by many connections) and only then answers each waiting connection.
A positive acknowledgement is therefore never sent for a message that is not
on disk; if the commit fails, every waiter in that batch gets the exception
and its sender a negative answer.

(MSH-3, MSH-4, MSH-10) is unique: a resend gets the acknowledgement stored
with the original and is not stored or applied again.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

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


class MessageStore:
    def __init__(self, session_factory: sessionmaker, metrics: Metrics):
        self.sessions = session_factory
        self.metrics = metrics
        self.last_failure: Optional[str] = None
        self.last_failure_at: Optional[float] = None
        self.new_messages = threading.Event()
        # Receiving has priority over applying: the processor keeps its
        # transactions short and steps aside while a store is waiting.
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def store_waiting(self) -> bool:
        return self._waiting > 0

    def store_batch(self, items: list[Incoming]) -> list[Stored]:
        """Commit a batch in one transaction; duplicates return their original."""
        with self._waiting_lock:
            self._waiting += 1
        try:
            return self._store_batch(items)
        finally:
            with self._waiting_lock:
                self._waiting -= 1

    def _store_batch(self, items: list[Incoming]) -> list[Stored]:
        results: list[Optional[Stored]] = [None] * len(items)
        with self.sessions() as session, session.begin():
            keys = list({(i.sender, i.control_id) for i in items})
            existing = {
                (row.sender, row.control_id): row
                for row in session.execute(
                    select(InboundMessage.id, InboundMessage.sender, InboundMessage.control_id,
                           InboundMessage.status, InboundMessage.ack, InboundMessage.content_hash)
                    .where(tuple_(InboundMessage.sender, InboundMessage.control_id).in_(keys))
                )
            } if keys else {}
            fresh: dict[tuple[str, str], InboundMessage] = {}
            for index, item in enumerate(items):
                key = (item.sender, item.control_id)
                if key in existing:
                    row = existing[key]
                    reused = bool(row.content_hash) and row.content_hash != item.content_hash
                    results[index] = Stored(row.id, True, row.status, row.ack, reused_control_id=reused)
                    continue
                if key in fresh:
                    continue  # the same message twice in one batch: answered below
                row = InboundMessage(
                    feed=item.feed, sender=item.sender, control_id=item.control_id,
                    message_type=item.message_type, peer=item.peer, received_at=item.received_at,
                    raw=item.raw, content_hash=item.content_hash, status=item.status, ack=item.ack,
                    application_ack=item.application_ack,
                )
                fresh[key] = row
                session.add(row)
            try:
                with session.begin_nested():
                    session.flush()
            except IntegrityError:
                # Another node stored one of them between our select and insert.
                raise StorageUnavailable("concurrent duplicate; retry") from None
            for index, item in enumerate(items):
                if results[index] is None:
                    row = fresh[(item.sender, item.control_id)]
                    first = row.received_at is item.received_at and row.raw is item.raw
                    reused = not first and row.content_hash != item.content_hash
                    results[index] = Stored(row.id, not first, row.status, row.ack, reused_control_id=reused)
        self.last_failure = None
        self.new_messages.set()
        return [r for r in results if r is not None]

    def outcome(self, message_id: int) -> tuple[str, Optional[bytes], Optional[bytes], str]:
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
    """Batches concurrent store requests into shared transactions."""

    def __init__(self, store: MessageStore, *, max_batch: int = 256):
        self.store = store
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Incoming, asyncio.Future]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, item: Incoming) -> Stored:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.store.store_batch, items)
            except Exception as exc:  # noqa: BLE001 - every waiter gets a negative answer
                self.store.record_failure(exc)
                log.error("could not store messages", extra={"batch": len(batch), "error": self.store.last_failure})
                for item, future in batch:
                    self.store.metrics.storage_failures.labels(item.feed).inc()
                    if not future.done():
                        future.set_exception(StorageUnavailable(self.store.last_failure or "storage failed"))
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


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

