"""The operator console: server-rendered pages under ``/console/`` on the daemon's HTTP endpoint.

Jinja2 renders the pages (autoescaped), a few lines of JavaScript refresh the
live parts, and there is no build step.  ``ConsoleApp`` is a plain callable
from ``hl7.httpd.Request`` to ``hl7.httpd.Response``; the daemon mounts it and
hands it a ``ConsoleRuntime`` with what it needs to read (the database, the
listeners' activity, the outbound dispatcher's state, plugins, jobs) and to
wake (the processor after a replay, the dispatcher after a retry).

Every page needs a signed-in user (``hl7.console.auth``); every POST needs the
session's CSRF token and, when the browser sends one, a same-origin
``Origin``.  Operator actions are audited with the user's name.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import secrets
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, quote, urlsplit

import jinja2
from sqlalchemy import select

from engine.calendar import to_local, zone
from engine.clock import Clock
from engine.metrics import Metrics
from engine.models import InboundMessage
from engine.plugin_host import PluginHost
from engine.requests import Actor
from hl7.config import Config, ConsoleConfig
from hl7.console import data
from hl7.console.auth import COOKIE, COOKIE_PATH, LOGIN_COOKIE, Authenticator, Identity, same_token
from hl7.console.hl7view import layout
from hl7.httpd import Request, Response
from hl7.outbound import list_items, retry_item, skip_item
from hl7.store import PARKED, STATUSES, replay, skip

log = logging.getLogger("slotengine.console")

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
MAX_IDS_PER_ACTION = 500

SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'; object-src 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
]


@dataclass
class ConsoleRuntime:
    """What the console reads and wakes; the daemon fills it from its running parts."""

    config: Config
    sessions: Any  # sessionmaker
    clock: Clock
    plugins: PluginHost
    metrics: Metrics
    started_at: datetime
    feed_activity: Callable[[datetime], dict[str, dict[str, Any]]] = lambda now: {}
    destination_status: Callable[[], dict[str, dict[str, Any]]] = dict
    job_rows: Callable[[], list[dict[str, Any]]] = list
    stuck_calls: Callable[[], list[dict[str, Any]]] = list
    wake_processor: Callable[[], None] = lambda: None
    wake_dispatcher: Callable[[Optional[str]], None] = lambda destination=None: None


class Forbidden(Exception):
    pass


@dataclass
class Context:
    """One request being answered."""

    request: Request
    identity: Optional[Identity] = None
    cookies: list[str] = field(default_factory=list)  # Set-Cookie values to send
    form: dict[str, list[str]] = field(default_factory=dict)

    def query(self, key: str, default: str = "") -> str:
        return next((v for k, v in self.request.query if k == key), default).strip()

    def field(self, key: str, default: str = "") -> str:
        return (self.form.get(key) or [default])[0]


class ConsoleApp:
    def __init__(self, runtime: ConsoleRuntime, *, redaction_key: Optional[bytes] = None):
        self.runtime = runtime
        self.config = runtime.config
        self.tz = runtime.config.clinic.timezone
        self.auth = Authenticator(runtime.config.console, runtime.sessions, runtime.clock)
        self.key = redaction_key or secrets.token_bytes(32)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(local=self._local, ago=self._ago, tojson_pretty=lambda v: json.dumps(
            v, indent=1, default=str, ensure_ascii=False))
        self.static = {path.name: path.read_bytes() for path in (HERE / "static").iterdir() if path.is_file()}
        self._notices: dict[str, list[tuple[str, str]]] = {}
        self._notices_lock = threading.Lock()
        self.routes: dict[tuple[str, str], Callable[[Context, str], Response]] = {
            ("GET", "/"): self.page_feeds,
            ("GET", "/messages"): self.page_messages,
            ("GET", "/messages/"): self.page_message,
            ("POST", "/messages/replay"): self.action_replay,
            ("POST", "/messages/skip"): self.action_skip,
            ("GET", "/schedule"): self.page_schedule,
            ("GET", "/outbox"): self.page_outbox,
            ("POST", "/outbox"): self.action_outbox,
            ("GET", "/system"): self.page_system,
            ("POST", "/logout"): self.action_logout,
        }

    def reconfigure(self, console: ConsoleConfig) -> None:
        """SIGHUP: new users, roles and session settings; signed-in users keep their sessions
        but their role is read afresh (a removed user is signed out)."""
        self.auth.config = console

    # --- the entry point ----------------------------------------------------------------------

    def __call__(self, request: Request) -> Response:
        path = request.path[len(PREFIX):] or "/"
        if path == "/" and request.path == PREFIX:
            return self._redirect(PREFIX + "/")
        if path.startswith("/static/") and request.method == "GET":
            return self._static(path[len("/static/"):])
        ctx = Context(request)
        if request.method == "POST":
            if "x-www-form-urlencoded" not in request.headers.get("content-type", ""):
                return self._plain(400, "expected a form (application/x-www-form-urlencoded)")
            ctx.form = {}
            for key, value in parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True):
                ctx.form.setdefault(key, []).append(value)
            if not self._same_origin(request):
                return self._plain(403, "cross-origin request refused")
        if path == "/login":
            return self._finish(ctx, self.login(ctx))
        ctx.identity = self._identify(ctx)
        if ctx.identity is None:
            if request.method == "GET":
                return self._finish(ctx, self._redirect(f"{PREFIX}/login?next={quote(self._here(request), safe='')}"))
            return self._finish(ctx, self._plain(403, "sign in first"))
        if request.method == "POST" and not same_token(ctx.identity.csrf_token, ctx.field("csrf")):
            log.warning("console form without a valid CSRF token refused",
                        extra={"user": ctx.identity.name, "path": request.path})
            return self._finish(ctx, self._plain(403, "the form has expired or did not come from this console; "
                                                      "reload the page and try again"))
        handler, rest = self._route(request.method, path)
        if handler is None:
            return self._finish(ctx, self._page(ctx, "error.html", status=404, title="Not found",
                                                problem=f"There is no page {request.path}."))
        try:
            return self._finish(ctx, handler(ctx, rest))
        except Forbidden as exc:
            return self._finish(ctx, self._page(ctx, "error.html", status=403, title="Not allowed", problem=str(exc)))

    def _route(self, method: str, path: str):
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler, ""
        head, _, rest = path.rpartition("/")
        handler = self.routes.get((method, head + "/")) if head else None
        return (handler, rest) if handler is not None and rest else (None, "")

    def _finish(self, ctx: Context, response: Response) -> Response:
        response.headers.extend(SECURITY_HEADERS)
        response.headers.append(("Cache-Control", "no-store"))
        response.headers.extend(("Set-Cookie", cookie) for cookie in ctx.cookies)
        return response

    # --- who is asking -----------------------------------------------------------------------

    def _cookie(self, request: Request, name: str) -> str:
        jar = SimpleCookie()
        try:
            jar.load(request.headers.get("cookie", ""))
        except CookieError:
            return ""
        morsel = jar.get(name)
        return morsel.value if morsel else ""

    def _set_cookie(self, ctx: Context, name: str, value: str, max_age: int) -> None:
        secure = "; Secure" if self.auth.config.secure_cookies else ""
        ctx.cookies.append(f"{name}={value}; Path={COOKIE_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")

    def _identify(self, ctx: Context) -> Optional[Identity]:
        request = ctx.request
        identity = self.auth.current(self._cookie(request, COOKIE))
        proxied = self.auth.proxied_user(request.headers, request.peer)
        if proxied is None:
            return identity
        if identity is not None and identity.name == proxied:
            return identity
        try:
            token, identity = self.auth.start(proxied, "proxy", request.peer)
        except PermissionError:
            log.warning("proxy user without a console role refused", extra={"peer": request.peer})
            return None
        self._set_cookie(ctx, COOKIE, token, self.auth.config.session_minutes * 60)
        return identity

    @staticmethod
    def _same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True  # older browsers: the CSRF token still protects
        host = request.headers.get("host", "")
        return bool(host) and urlsplit(origin).netloc == host

    # --- sign-in --------------------------------------------------------------------------------

    def login(self, ctx: Context) -> Response:
        request = ctx.request
        if self.auth.proxied_user(request.headers, request.peer) is not None:
            return self._redirect(PREFIX + "/")
        target = ctx.query("next") or ctx.field("next")
        if not (target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target):
            target = PREFIX + "/"
        login_token = self._cookie(request, LOGIN_COOKIE)
        if request.method == "GET":
            if not login_token:
                login_token = secrets.token_urlsafe(24)
                self._set_cookie(ctx, LOGIN_COOKIE, login_token, 3600)
            return self._page(ctx, "login.html", title="Sign in", login_token=login_token, next=target, problem="",
                              name="")
        name, password = ctx.field("name").strip(), ctx.field("password")
        if not same_token(login_token, ctx.field("csrf")):
            login_token = secrets.token_urlsafe(24)
            self._set_cookie(ctx, LOGIN_COOKIE, login_token, 3600)
            return self._page(ctx, "login.html", status=400, title="Sign in", login_token=login_token, next=target,
                              name=name, problem="The sign-in form had expired. Please sign in again.")
        outcome = self.auth.check_password(name, password, request.peer)
        if outcome != "ok":
            log.warning("console sign-in refused", extra={"peer": request.peer, "outcome": outcome})
            problem = ("Too many failed attempts. Wait ten minutes and try again." if outcome == "throttled"
                       else "Wrong name or password.")
            return self._page(ctx, "login.html", status=429 if outcome == "throttled" else 401, title="Sign in",
                              login_token=login_token, next=target, name=name, problem=problem)
        token, identity = self.auth.start(name, "password", request.peer)
        log.info("console sign-in", extra={"user": name, "role": identity.role, "peer": request.peer})
        self._set_cookie(ctx, COOKIE, token, self.auth.config.session_minutes * 60)
        self._set_cookie(ctx, LOGIN_COOKIE, "", 0)
        return self._redirect(target)

    def action_logout(self, ctx: Context, _rest: str) -> Response:
        self.auth.end(ctx.identity, ctx.request.peer)
        self._set_cookie(ctx, COOKIE, "", 0)
        return self._redirect(PREFIX + "/login")

    # --- pages ------------------------------------------------------------------------------------

    def page_feeds(self, ctx: Context, _rest: str) -> Response:
        runtime = self.runtime
        now = runtime.clock.now()
        feeds = data.feed_rows(self.config, runtime.sessions, runtime.feed_activity(now), now, runtime.started_at)
        destinations = data.destination_rows(self.config, runtime.sessions, runtime.destination_status())
        return self._page(ctx, "feeds.html", title="Feeds", nav="feeds", feeds=feeds, destinations=destinations,
                          refresh=5)

    def page_messages(self, ctx: Context, _rest: str) -> Response:
        wanted = data.MessageFilter(
            since=self._parse_local(ctx.query("since")), until=self._parse_local(ctx.query("until")),
            feed=ctx.query("feed"), type=ctx.query("type"), status=ctx.query("status"),
            control_id=ctx.query("control_id"), appointment_id=ctx.query("appointment_id"),
            before=int(ctx.query("before")) if ctx.query("before").isdigit() else None)
        rows = data.search_messages(self.runtime.sessions, wanted, self._privacy(ctx))
        older = None
        if len(rows) == data.PAGE_SIZE:
            older = "?" + "&".join(f"{k}={quote(v)}" for k, v in ctx.request.query if k != "before") + \
                    f"&before={rows[-1]['id']}"
        filters = {k: ctx.query(k) for k in ("since", "until", "feed", "type", "status", "control_id", "appointment_id")}
        return self._page(ctx, "messages.html", title="Messages", nav="messages", rows=rows, filters=filters,
                          feeds=[f.name for f in self.config.feeds], statuses=STATUSES, older=older)

    def page_message(self, ctx: Context, rest: str) -> Response:
        if not rest.isdigit():
            return self._page(ctx, "error.html", status=404, title="Not found", problem="No such message.")
        privacy = self._privacy(ctx)
        message = data.message_detail(self.runtime.sessions, int(rest), privacy)
        if message is None:
            return self._page(ctx, "error.html", status=404, title="Not found", problem=f"There is no message {rest}.")

        def redact(value: str) -> str:
            return f"[hidden: {privacy.value(value)}]"

        views = {}
        for part in ("raw", "ack", "application_ack"):
            if message[part]:
                views[part] = layout(message[part], patient_data=privacy.patient_data, redact=redact)
        return self._page(ctx, "message.html", title=f"Message {message['id']}", nav="messages", m=message, views=views)

    def page_schedule(self, ctx: Context, _rest: str) -> Response:
        runtime = self.runtime
        privacy = self._privacy(ctx)
        everyone = data.subjects(runtime.sessions, self.tz)
        kind = ctx.query("by", "provider")
        if kind not in everyone:
            kind = "provider"
        code = ctx.query("code")
        subject = next((s for s in everyone[kind] if s.code == code), None) or (everyone[kind] or [None])[0]
        now = runtime.clock.now()
        tz = subject.timezone if subject else self.tz
        today = to_local(now, tz).date()
        try:
            day = date.fromisoformat(ctx.query("date")) if ctx.query("date") else today
        except ValueError:
            day = today
        view = "week" if ctx.query("view") == "week" else "day"
        first = data.first_of_week(day) if view == "week" else day
        count = 7 if view == "week" else 1
        days = data.schedule_days(runtime.sessions, subject, first, count, privacy, now) if subject else []
        waiting = data.waitlist(runtime.sessions, subject, privacy, now)
        reminders = data.reminders_on(runtime.sessions, subject, day, tz)
        step = timedelta(days=count)
        return self._page(ctx, "schedule.html", title="Schedule", nav="schedule", everyone=everyone, kind=kind,
                          subject=subject, day=day, today=today, view=view, days=days, waiting=waiting,
                          reminders=reminders, tz=tz, previous=(first - step).isoformat(),
                          following=(first + step).isoformat())

    def page_outbox(self, ctx: Context, _rest: str) -> Response:
        destination = ctx.query("destination")
        status = ctx.query("status")
        names = [d.name for d in self.config.destinations]
        rows = list_items(self.runtime.sessions, destination=destination if destination in names else None,
                          status=status or None, limit=data.PAGE_SIZE)
        return self._page(ctx, "outbox.html", title="Outbox", nav="outbox", rows=rows, destinations=names,
                          destination=destination, wanted_status=status)

    def page_system(self, ctx: Context, _rest: str) -> Response:
        runtime = self.runtime
        plugins = runtime.plugins.plugin_rows()
        figures = data.hook_figures(runtime.metrics.exposed)
        return self._page(ctx, "system.html", title="Plugins and jobs", nav="system", plugins=plugins, figures=figures,
                          jobs=runtime.job_rows(), stuck=runtime.stuck_calls())

    # --- actions ------------------------------------------------------------------------------------

    def _ids(self, ctx: Context) -> list[int]:
        ids = sorted({int(v) for v in ctx.form.get("id", []) if v.isdigit()})
        if len(ids) > MAX_IDS_PER_ACTION:
            raise Forbidden(f"at most {MAX_IDS_PER_ACTION} items at once")
        return ids

    def action_replay(self, ctx: Context, _rest: str) -> Response:
        self._require(ctx, "replay", "replay messages")
        actor = Actor("operator", ctx.identity.name, "console: messages replay")
        done, problems = [], []
        for message_id in self._ids(ctx):
            try:
                with self.runtime.sessions() as session:
                    status = session.scalar(select(InboundMessage.status).where(InboundMessage.id == message_id))
                if status is None:
                    raise LookupError(f"no stored message {message_id}")
                if status != PARKED:
                    raise ValueError(f"message {message_id} is {status}; the console replays parked messages")
                replay(self.runtime.sessions, message_id, actor, self.runtime.clock.now())
                done.append(message_id)
            except (LookupError, ValueError) as exc:
                problems.append(str(exc).strip("'\""))
        if done:
            self.runtime.wake_processor()
            log.info("messages replayed from the console", extra={"user": ctx.identity.name, "messages": done})
            self._notify(ctx, "ok", f"Queued for replay: message{'s' if len(done) > 1 else ''} "
                                    f"{', '.join(map(str, done))}. Each is applied again in order; the result shows below.")
        for problem in problems:
            self._notify(ctx, "problem", problem)
        if not done and not problems:
            self._notify(ctx, "problem", "Select at least one parked message.")
        return self._redirect(self._back(ctx, f"{PREFIX}/messages?status=parked"))

    def action_skip(self, ctx: Context, _rest: str) -> Response:
        self._require(ctx, "skip", "skip messages")
        reason = ctx.field("reason").strip()
        if not reason:
            self._notify(ctx, "problem", "Say why the message is skipped (it is recorded in the audit trail).")
            return self._redirect(self._back(ctx, f"{PREFIX}/messages?status=parked"))
        actor = Actor("operator", ctx.identity.name, "console: messages skip")
        for message_id in self._ids(ctx):
            try:
                skip(self.runtime.sessions, message_id, actor, self.runtime.clock.now(), reason[:500])
                self._notify(ctx, "ok", f"Message {message_id} skipped.")
            except (LookupError, ValueError) as exc:
                self._notify(ctx, "problem", str(exc).strip("'\""))
        self.runtime.wake_processor()
        return self._redirect(self._back(ctx, f"{PREFIX}/messages?status=parked"))

    def action_outbox(self, ctx: Context, _rest: str) -> Response:
        self._require(ctx, "outbox", "retry or skip outbound messages")
        action = ctx.field("action")
        operator = f"operator:{ctx.identity.name} (console)"
        for item_id in self._ids(ctx):
            try:
                if action == "skip":
                    skip_item(self.runtime.sessions, item_id, operator=operator, reason=ctx.field("reason")[:500],
                              clock=self.runtime.clock)
                    self._notify(ctx, "ok", f"Outbox item {item_id} skipped.")
                else:
                    retry_item(self.runtime.sessions, item_id, operator=operator, clock=self.runtime.clock)
                    self._notify(ctx, "ok", f"Outbox item {item_id} queued again.")
            except (LookupError, ValueError) as exc:
                self._notify(ctx, "problem", str(exc).strip("'\""))
        self.runtime.wake_dispatcher(None)
        return self._redirect(self._back(ctx, f"{PREFIX}/outbox"))

    def _require(self, ctx: Context, permission: str, what: str) -> None:
        if not ctx.identity.may(permission):
            raise Forbidden(f"Your role ({ctx.identity.role}) may not {what}.")

    @staticmethod
    def _back(ctx: Context, default: str) -> str:
        target = ctx.field("back")
        return target if target.startswith(PREFIX + "/") and not target.startswith("//") else default

    # --- rendering --------------------------------------------------------------------------------

    def _privacy(self, ctx: Context) -> data.Privacy:
        return data.Privacy(ctx.identity is not None and ctx.identity.may("patient_data"), self.key)

    def _notify(self, ctx: Context, kind: str, text: str) -> None:
        with self._notices_lock:
            self._notices.setdefault(ctx.identity.token_hash, []).append((kind, text))

    def _take_notices(self, ctx: Context) -> list[tuple[str, str]]:
        if ctx.identity is None:
            return []
        with self._notices_lock:
            return self._notices.pop(ctx.identity.token_hash, [])

    def _page(self, ctx: Context, template: str, *, status: int = 200, **values: Any) -> Response:
        values.setdefault("nav", "")
        values.setdefault("refresh", 0)
        now = self.runtime.clock.now()
        body = self.env.get_template(template).render(
            me=ctx.identity, csrf=ctx.identity.csrf_token if ctx.identity else "", prefix=PREFIX,
            notices=self._take_notices(ctx), clinic_tz=self.tz, now=now, here=self._here(ctx.request), **values)
        return Response(status, body.encode("utf-8"))

    @staticmethod
    def _here(request: Request) -> str:
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in request.query)
        return request.path + (f"?{query}" if query else "")

    def _local(self, instant: Optional[datetime], tz: Optional[str] = None, fmt: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
        if instant is None:
            return "—"
        if instant.tzinfo is None:
            return instant.strftime(fmt.replace(" %Z", ""))
        return to_local(instant, tz or self.tz).strftime(fmt)

    def _ago(self, instant: Optional[datetime]) -> str:
        if instant is None:
            return "never"
        seconds = int((self.runtime.clock.now() - instant).total_seconds())
        if seconds < 60:
            return f"{max(seconds, 0)} s ago"
        if seconds < 3600:
            return f"{seconds // 60} min ago"
        if seconds < 86400:
            return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
        return f"{seconds // 86400} d ago"

    def _parse_local(self, text: str) -> Optional[datetime]:
        """A ``datetime-local`` form value, in clinic time, as UTC."""
        if not text:
            return None
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone(self.tz))
        return moment.astimezone(timezone.utc)

    def _static(self, name: str) -> Response:
        content = self.static.get(name)
        if content is None:
            return self._plain(404, "not found")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(200, content, f"{kind}; charset=utf-8" if kind.startswith("text/") or kind.endswith("javascript")
                        else kind, [("Cache-Control", "max-age=300"), ("X-Content-Type-Options", "nosniff")])

    @staticmethod
    def _redirect(location: str) -> Response:
        return Response(303, b"", "text/plain; charset=utf-8", [("Location", location)])

    @staticmethod
    def _plain(status: int, text: str) -> Response:
        return Response(status, text.encode("utf-8"), "text/plain; charset=utf-8")
