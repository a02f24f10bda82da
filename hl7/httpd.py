"""A small HTTP endpoint: health, Prometheus metrics, and plugins' routes.

Loopback by default.  GET needs nothing; anything that changes state
(POST/PUT/DELETE: reminder replies, webhooks) needs ``Authorization: Bearer
<token>`` or ``X-Slotengine-Signature: sha256=<hex HMAC of the body>`` made
with the same secret.  Deliberately minimal: one request per connection,
bounded sizes, no keep-alive.

An application mounted under a path prefix (the operator console) gets whole
requests (method, path, repeated query keys, headers, body, peer) and answers
with a status, headers and a body of any type; it authenticates its own users
(sessions, CSRF), so the token above is not asked of it.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("slotengine.http")

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
Handler = Callable[[bytes, dict[str, str], dict[str, str]], tuple[int, Any]]
REASONS = {200: "OK", 302: "Found", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    """In order, repeated keys kept (``?id=1&id=2``)."""
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    peer: str
    """The connecting address (the proxy's, behind one)."""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


App = Callable[[Request], Response]


class HttpEndpoint:
    def __init__(self, host: str, port: int, *, token: Optional[str], health: Callable[[], tuple[bool, dict]],
                 metrics: Callable[[], bytes]):
        self.host, self.port = host, port
        self.token = token
        self.health = health
        self.metrics = metrics
        self.routes: dict[tuple[str, str], Handler] = {}
        self.mounts: dict[str, App] = {}
        self.server: Optional[asyncio.base_events.Server] = None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method.upper(), path)] = handler

    def mount(self, prefix: str, app: App) -> None:
        """Serve every path at or under ``prefix`` (``/console``) with ``app``, run in a worker thread;
        ``GET /`` then leads there."""
        self.mounts[prefix.rstrip("/")] = app

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_connection, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self.server:
            self.server.close()

    def _authorised(self, headers: dict[str, str], body: bytes) -> bool:
        if not self.token:
            return False  # no secret configured: state changes over HTTP are off
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip(), self.token):
            return True
        signature = headers.get("x-slotengine-signature", "")
        if signature.startswith("sha256="):
            expected = hmac.new(self.token.encode(), body, hashlib.sha256).hexdigest()
            return hmac.compare_digest(signature[7:], expected)
        return False

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra: list[tuple[str, str]] = []
        try:
            answer = await asyncio.wait_for(self._handle(reader, writer), 10)
            if isinstance(answer, Response):
                status, content_type, payload, extra = answer.status, answer.content_type, answer.body, answer.headers
            else:
                status, content_type, payload = answer
        except Exception:  # noqa: BLE001 - a broken request gets a 400, never a traceback
            status, content_type, payload = 400, "application/json", b'{"error": "bad request"}'
        try:
            lines = "".join(f"{name}: {value}\r\n" for name, value in extra if "\n" not in name + value)
            head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(payload)}\r\n{lines}Connection: close\r\n\r\n").encode("latin-1", "replace")
            writer.write(head + payload)
            await asyncio.wait_for(writer.drain(), 10)
        except Exception:  # noqa: BLE001 - client went away
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, str, bytes] | Response:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            return 400, "application/json", b'{"error": "headers too large"}'
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            return 413, "application/json", b'{"error": "body too large"}'
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        query = dict(parse_qsl(url.query))
        if method == "GET" and url.path == "/healthz":
            ok, detail = await asyncio.get_running_loop().run_in_executor(None, self.health)
            return (200 if ok else 503), "application/json", json.dumps(detail).encode()
        if method == "GET" and url.path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics()
        for prefix, app in self.mounts.items():
            if url.path == prefix or url.path.startswith(prefix + "/"):
                peer = writer.get_extra_info("peername")
                request = Request(method, url.path, parse_qsl(url.query, keep_blank_values=True), headers, body,
                                  peer[0] if peer else "")
                return await asyncio.get_running_loop().run_in_executor(None, self._call_app, app, request)
        if method == "GET" and url.path == "/" and self.mounts:
            return Response(302, b"", "text/plain", [("Location", next(iter(self.mounts)) + "/")])
        handler = self.routes.get((method, url.path))
        if handler is None:
            known = any(path == url.path for _m, path in self.routes)
            return (405 if known else 404), "application/json", b'{"error": "no such route"}'
        if method != "GET" and not self._authorised(headers, body):
            return 401, "application/json", b'{"error": "token or signature required"}'
        try:
            status, payload = await asyncio.get_running_loop().run_in_executor(None, handler, body, headers, query)
        except Exception:  # noqa: BLE001 - a plugin's bug is a 500, logged with its route
            log.error("HTTP route failed", exc_info=True, extra={"route": f"{method} {url.path}"})
            return 500, "application/json", b'{"error": "internal error"}'
        return status, "application/json", json.dumps(payload, default=str).encode()

    @staticmethod
    def _call_app(app: App, request: Request) -> Response:
        try:
            return app(request)
        except Exception:  # noqa: BLE001 - a page's bug is a 500, logged with its path
            log.error("HTTP application failed", exc_info=True, extra={"route": f"{request.method} {request.path}"})
            return Response(500, b"internal error", "text/plain; charset=utf-8")
