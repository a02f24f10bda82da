"""The console application without a browser: sign-in, sessions, CSRF, roles, replay,
redaction -- on a real database (SQLite, or PostgreSQL with --slotengine-db=postgresql)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from engine.clock import ManualClock
from engine.metrics import Metrics
from engine.models import AuditEntry, ConsoleSession, InboundMessage
from engine.plugin_host import PluginHost
from engine.testing import CLOCK_START
from hl7.config import parse_config
from hl7.console.app import ConsoleApp, ConsoleRuntime
from hl7.console.passwords import hash_password
from hl7.httpd import Request
from hl7.store import PARKED, RECEIVED

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {"alice": "alice-secret", "sam": "sam-secret", "victor": "victor-secret"}
HASHES = {name: hash_password(password) for name, password in PASSWORDS.items()}

PARKED_SIU = (b"MSH|^~\\&|EPIC|NORTHCLINIC|SE|SE|20260302080000||SIU^S12|C1|P|2.5.1\r"
              b"SCH|PLACER7^EPIC|FILLER7^EPIC|||||ROUTINE^Routine visit\r"
              b"PID|1||MRN555^^^NORTH^MR||Doe^Jane||19800101|F|||1 Main St^^Springfield\r")


def console_config(extra: str = ""):
    users = "".join(f'\n[[console.users]]\nname = "{name}"\nrole = "{role}"\npassword_hash = "{HASHES[name]}"\n'
                    for name, role in (("alice", "interface"), ("sam", "scheduler"), ("victor", "viewer")))
    text = f"""
[[feeds]]
name = "ehr"
listen = "127.0.0.1:0"

[console]
enabled = true
session_minutes = 30
{extra}
{users}
"""
    return parse_config(text, "console-test.toml", REPO / "config")


class Client:
    """Just enough of a browser: a cookie jar, forms, and the CSRF token of the last page."""

    def __init__(self, app: ConsoleApp, peer: str = "127.0.0.1", headers: dict[str, str] | None = None):
        self.app, self.peer, self.headers = app, peer, headers or {}
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def _send(self, method: str, path: str, body: bytes = b"", query=(), headers=None):
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        sent = {**self.headers, **(headers or {}), "cookie": cookie}
        if method == "POST":
            sent.setdefault("content-type", "application/x-www-form-urlencoded")
        response = self.app(Request(method, path, list(query), sent, body, self.peer))
        for name, value in response.headers:
            if name == "Set-Cookie":
                key, _, rest = value.partition("=")
                token = rest.split(";", 1)[0]
                if "Max-Age=0" in value:
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = token
        found = re.search(rb'name="csrf" value="([^"]+)"', response.body)
        if found:
            self.csrf = found.group(1).decode()
        return response

    def get(self, path: str, **query):
        return self._send("GET", path, query=list(query.items()))

    def post(self, path: str, fields: list[tuple[str, str]], *, csrf: bool = True, headers=None):
        if csrf:
            fields = [("csrf", self.csrf), *fields]
        return self._send("POST", path, urlencode(fields).encode(), headers=headers)

    def sign_in(self, name: str, password: str | None = None):
        self.get("/console/login")
        return self.post("/console/login", [("name", name), ("password", password or PASSWORDS[name])])


def location(response) -> str:
    return dict(response.headers).get("Location", "")


@pytest.fixture
def clock():
    return ManualClock(CLOCK_START)


@pytest.fixture
def runtime(slotengine_session_factory, clock):
    woken = []
    runtime = ConsoleRuntime(config=console_config(), sessions=slotengine_session_factory, clock=clock,
                             plugins=PluginHost(builtins=(), discover=False), metrics=Metrics(), started_at=clock.now(),
                             wake_processor=lambda: woken.append("processor"))
    runtime.woken = woken
    return runtime


@pytest.fixture
def app(runtime):
    return ConsoleApp(runtime, redaction_key=b"k" * 32)


@pytest.fixture
def parked_message(slotengine_session_factory, clock):
    with slotengine_session_factory() as session, session.begin():
        row = InboundMessage(feed="ehr", sender="EPIC^NORTHCLINIC", control_id="C1", message_type="SIU^S12",
                             peer="10.0.0.9:5000", received_at=clock.now(), raw=PARKED_SIU, status=PARKED,
                             error="PID-3 names patients 1, 2, whom this schedule holds separately", attempts=1)
        session.add(row)
        session.flush()
        return row.id


def test_pages_need_a_sign_in_and_come_back_after_it(app):
    client = Client(app)
    first = client.get("/console/messages", status="parked")
    assert first.status == 303 and location(first) == "/console/login?next=%2Fconsole%2Fmessages%3Fstatus%3Dparked"
    assert client.get("/console/static/console.css").status == 200  # the sign-in page needs its styles
    client.get("/console/login")
    signed = client.post("/console/login", [("name", "alice"), ("password", "alice-secret"),
                                            ("next", "/console/messages?status=parked")])
    assert signed.status == 303 and location(signed) == "/console/messages?status=parked"
    cookie = dict(signed.headers)["Set-Cookie"]
    page = client.get("/console/messages", status="parked")
    assert page.status == 200 and b"alice" in page.body
    headers = dict(page.headers)
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    assert any("HttpOnly; SameSite=Strict" in v for k, v in signed.headers if v.startswith("slotengine_console="))
    assert cookie


def test_wrong_passwords_are_refused_then_throttled(app):
    client = Client(app)
    assert client.sign_in("alice", "wrong").status == 401
    assert client.sign_in("nobody", "wrong").status == 401  # an unknown name looks the same
    for _ in range(3):
        client.sign_in("alice", "wrong")
    throttled = client.sign_in("alice")  # the right password, too late
    assert throttled.status == 429 and b"Too many failed attempts" in throttled.body
    assert Client(app, peer="127.0.0.2").sign_in("sam").status == 303


def test_the_sign_in_form_needs_its_own_token(app):
    client = Client(app)
    client.get("/console/login")
    refused = client.post("/console/login", [("name", "alice"), ("password", "alice-secret")], csrf=False)
    assert refused.status == 400 and b"expired" in refused.body
    assert "slotengine_console" not in client.cookies


def test_posts_need_the_csrf_token_and_the_same_origin(app, parked_message, slotengine_session_factory):
    client = Client(app)
    client.sign_in("alice")
    client.get("/console/")
    forged = client.post("/console/messages/replay", [("id", str(parked_message))], csrf=False)
    assert forged.status == 403
    other_site = client.post("/console/messages/replay", [("id", str(parked_message))],
                             headers={"origin": "http://evil.example", "host": "127.0.0.1:8780"})
    assert other_site.status == 403
    with slotengine_session_factory() as session:
        assert session.get(InboundMessage, parked_message).status == PARKED


def test_replay_is_audited_with_the_operators_name(app, runtime, parked_message, slotengine_session_factory):
    client = Client(app)
    client.sign_in("sam")
    client.get("/console/messages", status="parked")
    done = client.post("/console/messages/replay", [("id", str(parked_message)), ("id", "999999"),
                                                    ("back", "/console/messages?status=parked")],
                       headers={"origin": "http://127.0.0.1:8780", "host": "127.0.0.1:8780"})
    assert done.status == 303 and location(done) == "/console/messages?status=parked"
    with slotengine_session_factory() as session:
        assert session.get(InboundMessage, parked_message).status == RECEIVED
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "message_replayed")).one()
        assert (entry.actor, entry.source, entry.entity_id) == ("operator:sam", "console: messages replay",
                                                                parked_message)
    assert runtime.woken == ["processor"]
    page = client.get("/console/messages").body.decode()
    assert f"Queued for replay: message {parked_message}" in page and "no stored message 999999" in page
    again = client.post("/console/messages/replay", [("id", str(parked_message))])
    assert again.status == 303
    assert "the console replays parked messages" in client.get("/console/messages").body.decode()


def test_roles_decide_who_may_act(app, parked_message, slotengine_session_factory):
    viewer = Client(app)
    viewer.sign_in("victor")
    viewer.get("/console/")
    refused = viewer.post("/console/messages/replay", [("id", str(parked_message))])
    assert refused.status == 403 and b"may not replay" in refused.body
    scheduler = Client(app)
    scheduler.sign_in("sam")
    scheduler.get("/console/")
    assert scheduler.post("/console/messages/skip", [("id", str(parked_message)), ("reason", "x")]).status == 403
    interface = Client(app)
    interface.sign_in("alice")
    interface.get("/console/")
    assert interface.post("/console/messages/skip", [("id", str(parked_message)), ("reason", "EHR resends")]).status == 303
    with slotengine_session_factory() as session:
        assert session.get(InboundMessage, parked_message).status == "skipped"
        assert session.scalars(select(AuditEntry.actor).where(AuditEntry.action == "message_skipped")).one() == \
            "operator:alice"


def test_a_viewer_sees_pseudonyms_where_patient_data_would_be(app, parked_message):
    viewer = Client(app)
    viewer.sign_in("victor")
    page = viewer.get(f"/console/messages/{parked_message}").body.decode()
    assert "MRN555" not in page and "Doe" not in page and "Main St" not in page and "19800101" not in page
    assert "[hidden: ~" in page and "Patient identifier list" in page and "Routine visit" not in page
    assert "PLACER7" in page  # appointment ids are not about the person
    scheduler = Client(app)
    scheduler.sign_in("sam")
    page = scheduler.get(f"/console/messages/{parked_message}").body.decode()
    assert "MRN555" in page and "Doe" in page and "Replay this message" in page


def test_a_placer_id_finds_its_parked_message(app, parked_message):
    client = Client(app)
    client.sign_in("alice")
    page = client.get("/console/messages", appointment_id="PLACER7").body.decode()
    assert f'data-message="{parked_message}"' in page
    assert 'data-message=' not in client.get("/console/messages", appointment_id="PLACER8").body.decode()


def test_sessions_expire_and_end_at_sign_out(app, clock, slotengine_session_factory):
    client = Client(app)
    client.sign_in("alice")
    assert client.get("/console/").status == 200
    clock.advance(minutes=31)
    assert client.get("/console/").status == 303
    client.sign_in("alice")
    client.get("/console/")
    assert client.post("/console/logout", []).status == 303
    assert client.get("/console/").status == 303
    with slotengine_session_factory() as session:
        assert session.scalars(select(ConsoleSession)).all() == []  # the expired one went at the next sign-in
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.entity == "console_session")).all()
    assert actions == ["console_signed_in", "console_signed_in", "console_signed_out"]


def test_a_removed_user_is_signed_out(app):
    client = Client(app)
    client.sign_in("victor")
    assert client.get("/console/").status == 200
    app.reconfigure(console_config().console.__class__(enabled=True, users=()))
    assert client.get("/console/").status == 303


def test_a_trusted_proxy_names_the_user(slotengine_session_factory, clock):
    config = console_config('proxy_user_header = "X-Remote-User"\nproxy_peers = ["10.1.2.3"]\n'
                            'proxy_default_role = "viewer"')
    app = ConsoleApp(ConsoleRuntime(config=config, sessions=slotengine_session_factory, clock=clock,
                                    plugins=PluginHost(builtins=(), discover=False), metrics=Metrics(),
                                    started_at=clock.now()))
    proxied = Client(app, peer="10.1.2.3", headers={"x-remote-user": "sam"})
    page = proxied.get("/console/")
    assert page.status == 200 and b"scheduler" in page.body  # listed: the configured role
    stranger = Client(app, peer="10.1.2.3", headers={"x-remote-user": "nina"})
    assert b"viewer" in stranger.get("/console/").body
    spoofed = Client(app, peer="10.9.9.9", headers={"x-remote-user": "alice"})
    assert spoofed.get("/console/").status == 303  # not from the proxy: the header means nothing


def test_schedule_and_system_pages_render(app, slotengine_scheduler, clock):
    client = Client(app)
    client.sign_in("alice")
    day = client.get("/console/schedule", by="provider", code="DRSMITH", date="2026-03-02")
    assert day.status == 200 and b"new patient" in day.body and b"Monday 02 March 2026" in day.body
    week = client.get("/console/schedule", by="resource", view="week")
    assert week.status == 200
    assert client.get("/console/system").status == 200
    assert client.get("/console/outbox").status == 200
    assert client.get("/console/nowhere").status == 404
