"""``slotengine send``: an MLLP client for interface teams.

Reads files holding one or many messages (any segment endings, FHS/BHS
batches), sends them in order over one connection, waits for each ACK,
checks MSA-1 and that MSA-2 echoes the control id, prints one line per
message, and exits non-zero on any AE/AR/CE/CR, mismatch or timeout.
"""
from __future__ import annotations

import json
import socket
import ssl
import sys
from pathlib import Path
from typing import Optional

from hl7.framing import MLLPDecoder, frame
from hl7.message import HL7ParseError, parse, split_messages


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

    def receive(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the acknowledgement arrived")
            self.pending.extend(item for item in self.decoder.feed(data) if isinstance(item, bytes))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


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
            messages.append((name, index, raw))
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
    try:
        for name, index, raw in messages:
            try:
                control_id = parse(raw).control_id
            except HL7ParseError:
                control_id = ""
            try:
                ok, code, text = check_ack(control_id, client.send(raw))
            except (OSError, ConnectionError) as exc:
                ok, code, text = False, "timeout" if isinstance(exc, socket.timeout) else "error", str(exc) or "timed out"
            failures += not ok
            if args.json:
                print(json.dumps({"file": name, "message": index, "control_id": control_id, "code": code,
                                  "ok": ok, "text": text}))
            else:
                print(f"{'ok  ' if ok else 'FAIL'} {name}#{index} {control_id or '-'} {code} {text}".rstrip())
            if code in ("timeout", "error"):
                break
    finally:
        client.close()
    return 1 if failures else 0
