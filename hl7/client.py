"""``slotengine send``: an MLLP client for interface teams.

Reads files holding one or many messages (any segment endings, FHS/BHS
batches), sends them in order over one connection with CR segment endings,
waits for each acknowledgement the message asks for, checks MSA-1 and that
MSA-2 echoes the control id, prints one line per message, and exits non-zero
on any AE/AR/CE/CR, mismatch or timeout.

Enhanced mode (MSH-15 or MSH-16 valued) asks for up to two acknowledgements,
each by a condition of table 0155: AL (or empty) always, NE never, ER only on
an error, SU only on success.  ``exchange`` waits for those that must come; for
one that may come (ER, SU), ``CONDITIONAL_WAIT`` once every other is in: so a
message asking ER or SU costs up to that long more.
"""
from __future__ import annotations

import json
import socket
import ssl
import sys
from pathlib import Path
from typing import Optional

from hl7.framing import MLLPDecoder, frame
from hl7.message import HL7ParseError, Message, parse, split_messages

#: seconds to wait for an acknowledgement the sender asked for only on error or success,
#: when no other is due (``exchange``)
CONDITIONAL_WAIT = 1.0
_COMMIT_CODES = ("CA", "CE", "CR")


class MLLPClient:
    def __init__(self, host: str, port: int, *, timeout: float = 30.0, tls: bool = False,
                 ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None,
                 max_message_bytes: int = 16 * 1024 * 1024):
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            context = ssl.create_default_context(cafile=ca)
            if cert:
                context.load_cert_chain(cert, key)
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.decoder = MLLPDecoder(max_message_bytes)
        self.pending: list[bytes] = []

    def send(self, message: bytes) -> bytes:
        """Send one message and return the first reply frame."""
        self.sock.sendall(frame(message))
        return self.receive()

    def exchange(self, message: bytes) -> list[bytes]:
        """Send one message and return every acknowledgement it asked for, in order of
        arrival: one in original mode; in enhanced mode the commit acknowledgement and
        the application acknowledgement as MSH-15 and MSH-16 ask (none for NE/NE)."""
        try:
            parsed: Optional[Message] = parse(message)
        except HL7ParseError:
            parsed = None  # the receiver answers what it cannot read in original mode
        self.sock.sendall(frame(message))
        if parsed is None or not parsed.enhanced_mode:
            return [self.receive()]
        accept, application = parsed.accept_ack_type.upper(), parsed.application_ack_type.upper()
        replies: list[bytes] = []
        commit = applied = None  # the codes received so far
        while True:
            due = [] if commit is not None or applied is not None else [_due(accept)]  # a commit ACK comes first
            if commit in (None, "CA") and applied is None:  # a CE or CR: not stored, nothing will be applied
                due.append(_due(application))
            if "must" in due:
                reply = self.receive()
            elif "may" in due:
                reply = self._receive_within(CONDITIONAL_WAIT)
                if reply is None:
                    return replies
            else:
                return replies
            replies.append(reply)
            code = _code(reply)
            if code in _COMMIT_CODES:
                commit = code
            else:
                applied = code or "?"

    def _receive_within(self, seconds: float) -> Optional[bytes]:
        timeout = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            return self.receive()
        except (socket.timeout, TimeoutError):
            return None
        finally:
            self.sock.settimeout(timeout)

    def receive(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the acknowledgement arrived")
            self.pending.extend(item for item in self.decoder.feed(data) if isinstance(item, bytes))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def _cr_endings(raw: bytes) -> bytes:
    """The message with CR segment endings, as HL7 has them (files hold LF or CRLF)."""
    return b"\r".join(line for line in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n") if line.strip())


def _due(condition: str) -> Optional[str]:
    """Whether an acknowledgement under this MSH-15/16 condition must come, may come, or not
    (a value outside table 0155 is taken as AL, as the receiver takes it)."""
    return None if condition == "NE" else "may" if condition in ("ER", "SU") else "must"


def _code(reply: bytes) -> str:
    try:
        msa = parse(reply).first("MSA")
    except HL7ParseError:
        return ""
    return msa.value(1).upper() if msa is not None else ""


def check_acks(sent_control_id: str, replies: list[bytes]) -> tuple[bool, str, str]:
    """``check_ack`` over every acknowledgement of one message: codes joined with ``+``
    (``CA+AA``), ok when each is; ``-`` for a message that asked for none."""
    if not replies:
        return True, "-", "no acknowledgement asked for (MSH-15/MSH-16)"
    checked = [check_ack(sent_control_id, reply) for reply in replies]
    return (all(ok for ok, _code_, _text in checked), "+".join(code for _ok, code, _text in checked),
            "; ".join(text for _ok, _code_, text in checked if text))


def check_ack(sent_control_id: str, reply: bytes) -> tuple[bool, str, str]:
    """(ok, MSA-1 code, explanation)."""
    try:
        ack = parse(reply)
    except HL7ParseError as exc:
        return False, "?", f"unreadable acknowledgement: {exc}"
    msa = ack.first("MSA")
    if msa is None:
        return False, "?", "acknowledgement has no MSA segment"
    code, echoed = msa.value(1), msa.value(2)
    if echoed != sent_control_id:
        return False, code, f"MSA-2 is {echoed!r}, expected {sent_control_id!r}"
    errors = [err.value(8) or err.value(3, 2) or err.value(3) for err in ack.segments_named("ERR")]
    text = msa.value(3) or "; ".join(e for e in errors if e)
    return code in ("AA", "CA"), code, text


def send_files(args) -> int:
    messages: list[tuple[str, int, bytes]] = []
    for name in args.files:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            print(f"slotengine send: {name}: {exc.strerror}", file=sys.stderr)
            return 1
        for index, raw in enumerate(split_messages(data), 1):
            messages.append((name, index, _cr_endings(raw)))
    if not messages:
        print("slotengine send: no HL7 messages found in the given files", file=sys.stderr)
        return 1
    try:
        client = MLLPClient(args.host, args.port, timeout=args.timeout, tls=args.tls, ca=args.ca,
                            cert=args.cert, key=args.key)
    except OSError as exc:
        print(f"slotengine send: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    failures = 0

    def report(name: str, index: int, control_id: str, ok: bool, code: str, text: str) -> None:
        if args.json:
            print(json.dumps({"file": name, "message": index, "control_id": control_id, "code": code,
                              "ok": ok, "text": text}))
        else:
            print(f"{'ok  ' if ok else 'FAIL'} {name}#{index} {control_id or '-'} {code} {text}".rstrip())

    try:
        for position, (name, index, raw) in enumerate(messages):
            try:
                control_id = parse(raw).control_id
            except HL7ParseError:
                control_id = ""
            try:
                ok, code, text = check_acks(control_id, client.exchange(raw))
            except (OSError, ConnectionError) as exc:
                ok, code, text = False, "timeout" if isinstance(exc, socket.timeout) else "error", str(exc) or "timed out"
            failures += not ok
            report(name, index, control_id, ok, code, text)
            if code in ("timeout", "error"):  # the connection is unusable: say what was not sent
                for name, index, _raw in messages[position + 1:]:
                    failures += 1
                    report(name, index, "", False, "not-sent", "the connection failed before it")
                break
    finally:
        client.close()
    return 1 if failures else 0
