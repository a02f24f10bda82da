"""Built-in message channels: e-mail over SMTP, SMS and voice through an HTTP webhook.

Settings (each channel is registered only when configured)::

    [plugins.channels.email]
    host = "smtp.clinic.example"
    port = 587
    sender = "Main Street Clinic <noreply@clinic.example>"
    tls = "starttls"            # none | starttls | ssl
    username = "slotengine"
    password_env = "SLOTENGINE_SMTP_PASSWORD"   # or password = "..."
    timeout = 10
    helo = "clinic.example"                     # default: this host's FQDN
    connections = 2                             # parallel SMTP connections per batch

    [plugins.channels.sms]       # and [plugins.channels.voice], same keys
    url = "https://sms-gateway.example/slotengine"
    secret_env = "SLOTENGINE_SMS_SECRET"        # or secret = "..."
    timeout = 10

The webhook receives ``POST`` JSON ``{"id", "channel", "to", "text",
"language", "kind", "reply_token", "sent_at"}`` with ``X-Slotengine-Signature:
sha256=<hex HMAC-SHA256 of the body>`` and ``Idempotency-Key: <id>``; any 2xx
is success.  A vendor replaces a channel by registering the same name (vendors
are asked first; the first registration wins).
"""
from __future__ import annotations

import json
import os
import quopri
import smtplib
import ssl
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.header import Header
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, Optional

from engine.plugin import hookimpl
from engine.signing import SIGNATURE_HEADER, sign_body

NAME = "channels"


def _secret(section: dict[str, Any], key: str, where: str) -> str:
    if section.get(key):
        return str(section[key])
    env = section.get(f"{key}_env")
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise ValueError(f"{where}.{key}_env: environment variable {env} is not set")
        return value
    return ""


@dataclass
class EmailChannel:
    """E-mail over SMTP (smtplib).  ``send_many`` splits a batch over ``connections``
    parallel SMTP connections (each message costs several round trips; the
    server, not our CPU, is what a batch waits for)."""

    host: str
    port: int = 25
    sender: str = "slotengine@localhost"
    tls: str = "none"  # none | starttls | ssl
    username: str = ""
    password: str = ""
    timeout: float = 10.0
    helo: str = ""  # the name we greet with; default: this host's FQDN
    connections: int = 2

    def __post_init__(self) -> None:
        self.envelope_sender = parseaddr(self.sender)[1] or self.sender

    def _connect(self) -> smtplib.SMTP:
        if self.tls == "ssl":
            client: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, local_hostname=self.helo or None,
                                                    timeout=self.timeout, context=ssl.create_default_context())
        else:
            client = smtplib.SMTP(self.host, self.port, local_hostname=self.helo or None, timeout=self.timeout)
            if self.tls == "starttls":
                client.starttls(context=ssl.create_default_context())
        if self.username:
            client.login(self.username, self.password)
        return client

    def build(self, message: dict[str, Any]) -> EmailMessage:
        """The message as an ``EmailMessage`` (for callers that want one; sending uses ``encode``)."""
        from email import message_from_bytes, policy  # noqa: PLC0415

        return message_from_bytes(self.encode(message), policy=policy.default)

    def encode(self, message: dict[str, Any], date: Optional[str] = None) -> bytes:
        """RFC 5322 bytes: UTF-8 text, quoted-printable, RFC 2047 subject.  Built by hand:
        ``EmailMessage``'s header machinery costs more than the SMTP round trips."""
        to, subject = str(message["to"]), str(message.get("subject", ""))
        if any(c in to + subject for c in "\r\n"):
            raise ValueError("line breaks in a header")
        if not to.isascii():
            raise ValueError(f"non-ASCII address {to!r}")
        if not subject.isascii():
            subject = Header(subject, "utf-8").encode()
        ident = message.get("id")
        headers = [
            f"From: {self.sender}", f"To: {to}", f"Subject: {subject}", f"Date: {date or formatdate()}",
            f"Message-ID: <{ident}@slotengine>" if ident else f"Message-ID: {make_msgid('slotengine')}",
            "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
        ]
        if message.get("language"):
            headers.append(f"Content-Language: {message['language']}")
        body = quopri.encodestring(str(message.get("text", "")).encode("utf-8"))
        return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def _transaction(self, client: smtplib.SMTP, to: str, data: bytes) -> None:
        """MAIL, RCPT, DATA for one message: ``sendmail`` without its per-call address parsing
        (the addresses were checked in ``encode``), which costs as much as a round trip."""
        if not client.does_esmtp:
            client.ehlo_or_helo_if_needed()
        code, reply = client.docmd("mail", f"FROM:<{self.envelope_sender}>")
        if code != 250:
            client.rset()
            raise smtplib.SMTPSenderRefused(code, reply, self.envelope_sender)
        code, reply = client.docmd("rcpt", f"TO:<{to}>")
        if code not in (250, 251):
            client.rset()
            raise smtplib.SMTPRecipientsRefused({to: (code, reply)})
        code, reply = client.data(data)
        if code != 250:
            client.rset()
            raise smtplib.SMTPDataError(code, reply)

    def send(self, message: dict[str, Any]) -> None:
        error = self.send_many([message])[0]
        if error is not None:
            raise error

    def send_many(self, messages: list[dict[str, Any]]) -> list[Optional[Exception]]:
        """One result per message, in order: None when the server took it."""
        lanes = max(1, min(self.connections, len(messages) // 50))
        if lanes == 1:
            return self._send_over_one_connection(messages)
        chunk = -(-len(messages) // lanes)
        parts = [messages[i:i + chunk] for i in range(0, len(messages), chunk)]
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="smtp") as pool:
            return [error for part in pool.map(self._send_over_one_connection, parts) for error in part]

    def _send_over_one_connection(self, messages: list[dict[str, Any]]) -> list[Optional[Exception]]:
        errors: list[Optional[Exception]] = []
        client: Optional[smtplib.SMTP] = None
        date = formatdate()
        try:
            for message in messages:
                try:
                    data = self.encode(message, date)
                    if client is None:
                        client = self._connect()
                    self._transaction(client, str(message["to"]), data)
                    errors.append(None)
                except smtplib.SMTPServerDisconnected as exc:
                    client = None  # reconnect for the next message
                    errors.append(exc)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError,
                        ValueError) as exc:
                    errors.append(exc)  # this message only; the connection is still good
                except (OSError, smtplib.SMTPException) as exc:
                    errors.append(exc)
                    if client is not None:
                        try:
                            client.close()
                        finally:
                            client = None
        finally:
            if client is not None:
                try:
                    client.quit()
                except (OSError, smtplib.SMTPException):
                    client.close()
        return errors


@dataclass
class WebhookChannel:
    """SMS or voice through an HTTP webhook (urllib), each body signed with HMAC-SHA256."""

    name: str
    url: str
    secret: str
    timeout: float = 10.0

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({
            "id": message.get("id"),
            "channel": self.name,
            "to": message["to"],
            "text": message.get("text", ""),
            "language": message.get("language", ""),
            "kind": message.get("kind", ""),
            "reply_token": message.get("reply_token", ""),
            "sent_at": datetime.now(timezone.utc).isoformat(),
        }, separators=(",", ":")).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_body(self.secret, body),
            "Idempotency-Key": str(message.get("id", "")),
            "User-Agent": "slotengine",
        })
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{self.name} webhook answered {exc.code}") from None


@hookimpl
def slotengine_configure(settings: dict[str, Any], context) -> None:
    channels: dict[str, Any] = {}
    unknown = set(settings) - {"email", "sms", "voice"}
    if unknown:
        raise ValueError(f"[plugins.channels]: unknown channels {', '.join(sorted(unknown))}")
    email = settings.get("email")
    if email:
        if not email.get("host"):
            raise ValueError("[plugins.channels.email]: host is required")
        tls = email.get("tls", "none")
        if tls not in ("none", "starttls", "ssl"):
            raise ValueError(f"[plugins.channels.email].tls: none, starttls or ssl, not {tls!r}")
        channels["email"] = EmailChannel(
            host=email["host"], port=int(email.get("port", 465 if tls == "ssl" else 25)),
            sender=email.get("sender", "slotengine@localhost"), tls=tls, username=email.get("username", ""),
            password=_secret(email, "password", "[plugins.channels.email]"),
            timeout=float(email.get("timeout", 10)), helo=email.get("helo", ""),
            connections=int(email.get("connections", 2)),
        )
    for name in ("sms", "voice"):
        section = settings.get(name)
        if section:
            if not str(section.get("url", "")).startswith(("http://", "https://")):
                raise ValueError(f"[plugins.channels.{name}]: url must be an http(s) URL")
            secret = _secret(section, "secret", f"[plugins.channels.{name}]")
            if not secret:
                raise ValueError(f"[plugins.channels.{name}]: secret or secret_env is required (bodies are signed)")
            channels[name] = WebhookChannel(name, section["url"], secret, float(section.get("timeout", 10)))
    if context is not None:
        context.state[NAME] = channels


@hookimpl(trylast=True)
def slotengine_register_channels(register, context) -> None:
    for name, channel in ((context.state.get(NAME) or {}) if context is not None else {}).items():
        register(name, channel)
