"""The MLLP listener: one asyncio server per feed.

A connection reads frames, and for each message: parse the header, check the
sender, store (group commit), then acknowledge.  Nothing a peer sends can
raise out of a connection handler; a bad connection is closed, the others
never notice.  Memory per connection is bounded by the feed's maximum
message size.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from engine.clock import Clock
from engine.metrics import Metrics
from hl7.ack import ErrorDetail, build_ack, build_batch_ack, new_control_id
from hl7.config import FeedConfig
from hl7.filler import is_filler_request
from hl7.framing import MLLPDecoder, Oversize, frame
from hl7.mapping import is_supported
from hl7.message import HL7ParseError, Message, check_header, parse, split_messages
from hl7.store import (
    RECEIVED,
    REFUSED,
    SKIPPED,
    GroupCommitter,
    Incoming,
    MessageStore,
    StorageUnavailable,
    content_hash,
)
from hl7.validation import structure_problems

log = logging.getLogger("slotengine.listener")

READ_CHUNK = 64 * 1024
WRITE_TIMEOUT = 30.0
OUTCOME_TIMEOUT = 60.0


@dataclass
class FeedRuntime:
    """What a feed's connections share; its TLS context is reloaded in place (SIGHUP)."""

    config: FeedConfig
    ssl_context: Optional[ssl.SSLContext]


def build_ssl_context(feed: FeedConfig) -> Optional[ssl.SSLContext]:
    if feed.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(feed.tls.cert), str(feed.tls.key) if feed.tls.key else None)
    if feed.tls.client_ca:
        context.load_verify_locations(cafile=str(feed.tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def feed_runtime(feed: FeedConfig) -> FeedRuntime:
    return FeedRuntime(feed, build_ssl_context(feed))


class OutcomeWaiters:
    """Connections waiting for a message to be applied (ack_when = "applied",
    enhanced-mode application ACKs).  Resolved by the processor's callback,
    with a database poll as the fallback (another node may apply it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._futures: dict[int, asyncio.Future] = {}

    def wait(self, message_id: int) -> asyncio.Future:
        future = self._futures.get(message_id)
        if future is None or future.done():
            future = self.loop.create_future()
            self._futures[message_id] = future
        return future

    def resolve_threadsafe(self, outcomes) -> None:
        # Usually nobody waits (ack_when = "stored"): then the event loop is not woken.
        # A waiter registered after this check finds the outcome in the database,
        # which it reads after registering, and the processor wrote before calling.
        if self._futures:
            self.loop.call_soon_threadsafe(self._resolve, outcomes)

    def _resolve(self, outcomes) -> None:
        for outcome in outcomes:
            future = self._futures.pop(outcome.message_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)


class Listener:
    def __init__(self, runtime: FeedRuntime, committer: GroupCommitter, store: MessageStore,
                 waiters: OutcomeWaiters, metrics: Metrics, clock: Clock):
        self.runtime = runtime
        self.committer = committer
        self.store = store
        self.waiters = waiters
        self.metrics = metrics
        self.clock = clock
        self.server: Optional[asyncio.base_events.Server] = None
        self.connections: set[asyncio.Task] = set()
        self.accepting = True
        # What the operator console shows; written only on the event loop.
        self._peers: dict[asyncio.Task, tuple[str, datetime]] = {}
        self._last_message_at: Optional[datetime] = None
        self._ack_codes: Counter[str] = Counter()
        self._per_minute: deque[list[int]] = deque(maxlen=16)  # [minute since the epoch, messages]
        # The feed's metric series, looked up once rather than per message.
        self._received_count = metrics.messages_received.labels(self.feed.name)
        self._ack_timer = metrics.ack_seconds.labels(self.feed.name)
        self._acked_counts: dict[str, Any] = {}

    @property
    def feed(self) -> FeedConfig:
        return self.runtime.config

    async def start(self) -> None:
        host, port = self.feed.listen.host, self.feed.listen.port
        self.server = await asyncio.start_server(
            self._on_connection, host, port, ssl=self.runtime.ssl_context, limit=READ_CHUNK,
            reuse_address=True,
        )
        log.info("listening", extra={"feed": self.feed.name, "listen": f"{host}:{port}",
                                     "tls": self.runtime.ssl_context is not None})

    @property
    def bound_port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def activity(self, now: datetime) -> dict[str, Any]:
        """Read-only view for the console: connected peers, the last message, messages
        per minute over the last five minutes, acknowledgement codes since start."""
        minute = int(now.timestamp() // 60)
        recent = sum(count for at, count in self._per_minute if minute - 5 <= at < minute)
        return {"serving": self.server is not None and self.server.is_serving(),
                "peers": [{"peer": peer, "since": since} for peer, since in list(self._peers.values())],
                "last_message_at": self._last_message_at, "per_minute": recent / 5,
                "ack_codes": dict(self._ack_codes)}

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self.server:
            self.server.close()

    async def close_connections(self, grace: float) -> None:
        if self.connections:
            _done, pending = await asyncio.wait(self.connections, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # --- one connection ----------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            if not (peer and self.feed.allows_peer(peer[0].split("%")[0])):
                log.warning("connection refused: peer not in allowed_peers",
                            extra={"feed": self.feed.name, "peer": peer_text})
                return
            self._peers[task] = (peer_text, self.clock.now())
            await self._serve(reader, writer, peer_text)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as exc:
            log.info("connection ended", extra={"feed": self.feed.name, "peer": peer_text,
                                                "reason": type(exc).__name__})
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one connection's bug never reaches the others
            log.error("connection failed", exc_info=True, extra={"feed": self.feed.name, "peer": peer_text})
        finally:
            self.connections.discard(task)
            self._peers.pop(task, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except Exception:  # noqa: BLE001 - the peer is gone either way
                pass

    async def _serve(self, reader, writer, peer: str) -> None:
        decoder = MLLPDecoder(self.feed.max_message_bytes)
        write_lock = asyncio.Lock()
        limit = self.feed.idle_timeout_seconds
        frame_started = None  # a frame must arrive whole within ``limit``: a trickle holds no buffer for good
        while self.accepting or decoder.has_partial:
            left = limit if frame_started is None else frame_started + limit - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0)):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                if frame_started is not None:
                    log.warning("connection closed: a frame not completed within idle_timeout_seconds",
                                extra={"feed": self.feed.name, "peer": peer, "bytes": decoder.buffered_bytes})
                raise
            if not data:
                return
            discarded = decoder.discarded_bytes
            ended = False  # a frame ended in this read: a partial one now is a new frame
            for item in decoder.feed(data):
                ended = True
                if isinstance(item, Oversize):
                    await self._send(writer, write_lock, self._refuse_oversize(item))
                    continue
                if _is_batch(item) and len(batch := split_messages(item)) > 1:
                    acks = [ack for raw in batch if (ack := await self._receive(raw, peer, writer, write_lock))]
                    reply = build_batch_ack(item, acks, control_id=new_control_id(), now=self.clock.now())
                else:
                    reply = await self._receive(item, peer, writer, write_lock)
                if reply is not None:
                    await self._send(writer, write_lock, reply)
            if not decoder.has_partial:
                frame_started = None
            elif ended or frame_started is None:
                frame_started = time.monotonic()
            if decoder.discarded_bytes != discarded:
                log.warning("bytes outside an MLLP frame discarded",
                            extra={"feed": self.feed.name, "peer": peer,
                                   "bytes": decoder.discarded_bytes - discarded})

    async def _send(self, writer, lock: asyncio.Lock, message: bytes) -> None:
        async with lock:
            writer.write(frame(message))
            if writer.transport.get_write_buffer_size():  # the peer is slow to read: wait, within limits
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
            else:
                await writer.drain()  # returns at once, or raises for a lost connection

    def _refuse_oversize(self, event: Oversize) -> bytes:
        log.warning("message over max_message_bytes refused", extra={"feed": self.feed.name, "bytes": event.size})
        detail = ErrorDetail("MSH", 1, 0, 0, "207", "E",
                             f"message exceeds this feed's limit of {self.feed.max_message_bytes} bytes")
        self._acked_count("AR").inc()
        return build_ack(None, "AR", [detail], control_id=new_control_id(), now=self.clock.now(),
                         raw_header=event.head)

    # --- one message -------------------------------------------------------------

    async def _receive(self, raw: bytes, peer: str, writer, write_lock) -> Optional[bytes]:
        started = time.perf_counter()
        feed = self.feed
        self._received_count.inc()
        now = self.clock.now()
        self._count_message(now)
        message: Optional[Message] = None
        problems: list[ErrorDetail] = []
        warnings: list[ErrorDetail] = []  # told in a positive acknowledgement's ERR segments
        try:
            message = parse(raw)
            for problem in check_header(message):
                (problems if problem.severity == "E" else warnings).append(problem)
        except HL7ParseError as exc:
            problems = [exc.detail]
        sender = f"{message.sending_application}^{message.sending_facility}" if message else "?^?"
        control_id = message.control_id if message and message.control_id else ""
        kind = _type_of(message)
        if "\x00" in sender + control_id + kind:  # refused (check_header); kept for the record without it
            sender, control_id, kind = (text.replace("\x00", "\ufffd") for text in (sender, control_id, kind))
        log.debug("message received", extra={"feed": feed.name, "control_id": control_id,
                                             "message_type": kind, "bytes": len(raw)})
        if not problems and not feed.allows_sender(_hd_name(message, 3), _hd_name(message, 4)):
            problems = [ErrorDetail("MSH", 1, 3, 0, "207", "E",
                                    f"sending application/facility {sender} is not allowed on feed {feed.name}")]
        if not problems and feed.validate:
            found = await asyncio.get_running_loop().run_in_executor(None, structure_problems, message, raw)
            problems = [p for p in found if p.severity == "E"]
            warnings += [p for p in found if p.severity != "E"]
            if problems:
                rejection = _refusal_code(message, "E")
                ack = build_ack(message, rejection, problems, control_id=new_control_id(), now=now)
                await self._store(Incoming(feed.name, sender, control_id, kind, peer, now, raw, REFUSED, ack),
                                  quiet=True)
                return self._acknowledged(message, ack, rejection, started)
        status = RECEIVED
        # A placer's request (SRM, SQM) is answered with the response message, not an ACK.
        answered = bool(not problems and feed.mode == "filler"
                        and is_filler_request(message.message_type, message.trigger_event))
        if not problems and not answered and not is_supported(message.message_type, message.trigger_event, feed.mode):
            if feed.unknown_types == "reject":
                code = "200" if not is_supported(message.message_type, "", feed.mode) else "201"
                problems = [ErrorDetail("MSH", 1, 9, 1 if code == "200" else 2, code, "E",
                                        f"{message.message_type}^{message.trigger_event} is not handled by feed {feed.name}")]
            else:
                status = SKIPPED
        enhanced = bool(message and message.enhanced_mode)
        refusal = _refusal_code(message, "R")
        if problems:
            ack = build_ack(message, refusal, problems, control_id=new_control_id(), now=now,
                            raw_header=raw[:512])
            if message is not None:  # kept for the record (what does not parse is only logged)
                await self._store(Incoming(feed.name, sender, control_id, kind, peer, now, raw, REFUSED, ack),
                                  quiet=True)
            return self._acknowledged(message, ack, refusal, started)
        immediate = (feed.ack_when == "stored" and not answered) or enhanced or status == SKIPPED
        code = ("CA" if enhanced else "AA")
        ack = build_ack(message, code, warnings, control_id=new_control_id(), now=now) if immediate else None
        incoming = Incoming(feed.name, sender, control_id, kind, peer, now, raw, status, ack,
                            content_hash(raw, message.delimiters.field.encode()))
        if status == SKIPPED and enhanced:
            incoming.application_ack = build_ack(message, "AA", [], "not applicable on this feed; stored",
                                                 control_id=new_control_id(), now=now)
        try:
            stored = await self._store(incoming)
        except StorageUnavailable as exc:
            detail = ErrorDetail("MSH", 1, 10, 0, "207", "E", f"message not stored ({exc}); resend later")
            nak = build_ack(message, refusal, [detail], control_id=new_control_id(), now=now)
            return self._acknowledged(message, nak, refusal, started)
        if stored.reused_control_id:
            log.warning("control id reused for a different message; refused",
                        extra={"feed": feed.name, "control_id": control_id, "message_id": stored.message_id})
            detail = ErrorDetail("MSH", 1, 10, 0, "205", "E",
                                 f"control id {control_id} was already used by {sender} for a different message "
                                 f"(stored as {stored.message_id}); give this message its own MSH-10")
            nak = build_ack(message, refusal, [detail], control_id=new_control_id(), now=now)
            return self._acknowledged(message, nak, refusal, started)
        if stored.duplicate:
            log.info("duplicate message; original acknowledgement resent",
                     extra={"feed": feed.name, "control_id": control_id, "message_id": stored.message_id})
        if enhanced:
            # MSH-15 decides whether the commit acknowledgement is sent (``_acknowledged``),
            # MSH-16 whether the application acknowledgement follows on this connection
            self._schedule_application_ack(message, stored.message_id, writer, write_lock)
        if stored.ack is not None:
            return self._acknowledged(message, stored.ack,
                                      code if stored.ack is ack else _code_of(stored.ack, code), started)
        # ack_when = "applied": answer once the processor has decided.
        ack = await self._application_ack(stored.message_id)
        return self._acknowledged(message, ack, _code_of(ack, "AA"), started)

    def _count_message(self, now: datetime) -> None:
        self._last_message_at = now
        minute = int(now.timestamp() // 60)
        if self._per_minute and self._per_minute[-1][0] == minute:
            self._per_minute[-1][1] += 1
        else:
            self._per_minute.append([minute, 1])

    def _acknowledged(self, message: Optional[Message], ack: Optional[bytes], code: str,
                      started: float) -> Optional[bytes]:
        """``ack``, counted; None (nothing sent) when the sender's MSH-15 asked for no such
        commit acknowledgement."""
        self._ack_codes[code] += 1
        self._acked_count(code).inc()
        self._ack_timer.observe(time.perf_counter() - started)
        if code in ("CA", "CE", "CR") and message is not None and not _wanted(message.accept_ack_type, code == "CA"):
            return None
        return ack

    def _acked_count(self, code: str):
        counter = self._acked_counts.get(code)
        if counter is None:
            counter = self._acked_counts[code] = self.metrics.messages_acked.labels(self.feed.name, code)
        return counter

    async def _store(self, incoming: Incoming, *, quiet: bool = False):
        try:
            return await self.committer.submit(incoming)
        except StorageUnavailable:
            if quiet:
                return None
            raise

    async def _application_ack(self, message_id: int) -> bytes:
        """The reply the processor stored once it applied (or parked) the message."""
        future = self.waiters.wait(message_id)
        deadline = time.monotonic() + OUTCOME_TIMEOUT
        while True:
            _status, _ack, reply, _error = self.store.outcome(message_id)
            if reply is not None:
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError(f"message {message_id} not applied within {OUTCOME_TIMEOUT:.0f} s")
            try:
                outcome = await asyncio.wait_for(asyncio.shield(future), 0.5)
            except TimeoutError:
                continue  # another node may have applied it: look in the database again
            if outcome.reply is not None:
                return outcome.reply

    def _schedule_application_ack(self, message: Message, message_id: int, writer, write_lock) -> None:
        wanted = message.application_ack_type
        if wanted.upper() == "NE":
            return

        async def send_later():
            try:
                ack = await self._application_ack(message_id)
                if _wanted(wanted, _code_of(ack, "AA") == "AA"):
                    await self._send(writer, write_lock, ack)
            except Exception:  # noqa: BLE001 - the ACK is stored; the peer may be gone
                log.info("application acknowledgement not delivered",
                         extra={"feed": self.feed.name, "message_id": message_id})

        task = asyncio.get_running_loop().create_task(send_later())
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)


def _is_batch(raw: bytes) -> bool:
    """Whether a frame holds a batch (FHS or BHS first): its messages are taken one by one,
    and answered together (``build_batch_ack``).  Several messages without an envelope stay
    an error (a second MSH): the sender framed them wrong."""
    return raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:3] in (b"FHS", b"BHS")


def _refusal_code(message: Optional[Message], kind: str) -> str:
    """MSA-1 for a message refused at receipt, ``kind`` E (error) or R (reject): AE/AR in
    original mode, CE/CR in enhanced mode.  When MSH-15 asks for no commit acknowledgement
    on an error but MSH-16 asks for an application acknowledgement, the refusal goes as that
    (AE/AR): nothing will be applied, and it is the one answer the sender waits for."""
    if message is None or not message.enhanced_mode:
        return "A" + kind
    if not _wanted(message.accept_ack_type, False) and _wanted(message.application_ack_type, False):
        return "A" + kind
    return "C" + kind


def _wanted(condition: str, success: bool) -> bool:
    """Whether an acknowledgement is sent under MSH-15 or MSH-16 (table 0155): NE never, ER
    on an error or rejection only, SU on success only; AL always, and so empty (the other
    field made the message enhanced-mode) or a value not in the table (warned of, 103)."""
    return {"NE": False, "ER": not success, "SU": success}.get(condition.upper(), True)


def _hd_name(message: Message, field_: int) -> str:
    """MSH-3 or MSH-4 as ``allowed_senders`` names it: the HD's namespace id, else (a sender
    that gives only an OID) its universal id."""
    return message.msh.value(field_, 1).strip() or message.msh.value(field_, 2).strip()


def _type_of(message: Optional[Message]) -> str:
    if message is None:
        return ""
    return f"{message.message_type}^{message.trigger_event}".strip("^")


def _code_of(ack: bytes, default: str) -> str:
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            parts = segment.split(segment[3:4]) if len(segment) > 3 else []
            if len(parts) > 1:
                return parts[1].decode("ascii", "replace")
    return default
