"""The console's parts on their own: configuration, passwords, the HL7 layout, the HTTP mount, the CLI."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from hl7.config import ConfigError, parse_config
from hl7.console.hl7view import layout
from hl7.console.passwords import check_hash_format, hash_password, verify_password
from hl7.httpd import HttpEndpoint, Response

REPO = Path(__file__).resolve().parents[2]
NEW_YORK = ZoneInfo("America/New_York")


def config(text: str):
    return parse_config(text, "c.toml", REPO / "config")


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(text)
    return str(caught.value)


def test_passwords_round_trip_and_hashes_are_checked():
    encoded = hash_password("correct horse")
    assert verify_password("correct horse", encoded) and not verify_password("correct hors", encoded)
    assert encoded != hash_password("correct horse")  # salted
    assert check_hash_format(encoded) == encoded
    with pytest.raises(ValueError):
        check_hash_format("sha256$abc")
    assert not verify_password("x", "scrypt$3$8$1$AAAA$BBBB")


def test_console_section_is_checked_in_full():
    found = problems(
        '[console]\nenabled = true\nsession_minutes = 0\nproxy_user_header = "X Remote"\nproxy_default_role = "admin"\n'
        '[[console.users]]\nname = "ann"\nrole = "boss"\n'
        '[[console.users]]\nname = "bob"\nrole = "viewer"\npassword_hash = "plain"\n'
        '[[console.users]]\nname = "bob"\nrole = "viewer"\n')
    for expected in ("c.toml:3: console.session_minutes", "console.proxy_user_header", "console.proxy_default_role",
                     "console.users[0].role: expected one of viewer, scheduler, interface",
                     "console.users[1].password_hash: expected a hash from `slotengine console hash-password`",
                     "console.users[2].name: console user 'bob' is listed twice"):
        assert expected in found, found
    assert "in clear" in problems('[http]\nlisten = "0.0.0.0:8780"\n[console]\nenabled = true\n')
    remote = config('[http]\nlisten = "0.0.0.0:8780"\n[console]\nenabled = true\nsecure_cookies = true\n')
    assert remote.console.enabled and remote.console.proxy_peers  # loopback proxies by default
    assert not config("").console.enabled


def test_feed_silence_expectations_follow_clinic_hours():
    feeds = config('[[feeds]]\nname = "day"\nlisten = "127.0.0.1:0"\nexpect_message_every_seconds = 600\n'
                   'expect_hours = "07:00-19:00"\nexpect_days = ["mon", "tue", "wed", "thu", "fri"]\n'
                   '[[feeds]]\nname = "night"\nlisten = "127.0.0.1:0"\nexpect_message_every_seconds = 60\n'
                   'expect_hours = "22:00-06:00"\nexpect_days = ["fri"]\n'
                   '[[feeds]]\nname = "quiet"\nlisten = "127.0.0.1:0"\n').feeds
    day, night, quiet = feeds
    monday_noon = datetime(2026, 3, 2, 12, 0, tzinfo=NEW_YORK)
    assert day.expects_messages_at(monday_noon)
    assert not day.expects_messages_at(monday_noon.replace(hour=19))
    assert not day.expects_messages_at(datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK))  # Saturday
    assert night.expects_messages_at(datetime(2026, 3, 6, 23, 0, tzinfo=NEW_YORK))  # Friday night
    assert night.expects_messages_at(datetime(2026, 3, 7, 5, 0, tzinfo=NEW_YORK))  # ...into Saturday morning
    assert not night.expects_messages_at(datetime(2026, 3, 6, 5, 0, tzinfo=NEW_YORK))  # Thursday's night
    assert not quiet.expects_messages_at(monday_noon)
    found = problems('[[feeds]]\nname = "x"\nlisten = "127.0.0.1:0"\nexpect_hours = "7-19"\nexpect_days = ["funday"]\n')
    assert "feeds[0].expect_hours: expected HH:MM-HH:MM" in found and "feeds[0].expect_days[0]" in found


def test_fields_are_named_and_patient_data_hidden():
    raw = (b"MSH|^~\\&|EPIC|N|SE|SE|20260302||SIU^S12|C1|P|2.5.1\r"
           b"SCH|P1^EPIC|F1^EPIC|||||CHEST PAIN^Chest pain\r"
           b"PID|1||MRN1^^^N^MR~SSN9^^^SSA^SS||Doe^Jane||19800101\r"
           b"ZPI|secret\r")
    segments, problem = layout(raw, patient_data=False, redact=lambda value: "[hidden]")
    assert problem == ""
    by_position = {f.position: f for s in segments for f in s.fields}
    assert by_position["SCH-1"].name == "Placer appointment id" and by_position["SCH-1"].components[0] == (
        "Entity identifier", "P1")
    assert by_position["SCH-7"].value == "[hidden]"  # the reason for the visit is clinical
    assert by_position["PID-3[2]"].value == "[hidden]" and by_position["PID-5"].name == "Patient name"
    assert by_position["PID-1"].value == "1" and by_position["ZPI-1"].value == "[hidden]"
    shown, _ = layout(raw, patient_data=True, redact=lambda value: "[hidden]")
    assert ("Family name", "Doe") in {f.position: f for s in shown for f in s.fields}["PID-5"].components
    assert layout(b"not hl7", patient_data=True, redact=str)[1].startswith("the message cannot be read")


def test_a_mounted_application_shares_the_endpoint(tmp_path):
    seen = []

    def app(request):
        seen.append(request)
        return Response(200, b"<p>hi</p>", headers=[("Set-Cookie", "a=b; Path=/console")])

    async def scenario():
        endpoint = HttpEndpoint("127.0.0.1", 0, token=None, health=lambda: (True, {"status": "ready"}),
                                metrics=lambda: b"m 1\n")
        endpoint.add_route("GET", "/plugin", lambda body, headers, query: (200, {"ok": True}))
        endpoint.mount("/console", app)
        await endpoint.start()
        port = endpoint.server.sockets[0].getsockname()[1]

        def fetch(path, data=None):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=5) as response:
                    return response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()

        results = await asyncio.get_running_loop().run_in_executor(None, lambda: [
            fetch("/healthz"), fetch("/metrics"), fetch("/plugin"), fetch("/console/x?id=1&id=2"),
            fetch("/console/form", b"a=1"), fetch("/"), fetch("/consoleX")])
        await endpoint.stop()
        return results

    health, metrics, plugin, page, form, root, other = asyncio.run(scenario())
    assert health[0] == 200 and json.loads(health[2])["status"] == "ready"
    assert metrics[2] == b"m 1\n" and plugin[0] == 200
    assert page[0] == 200 and page[1]["Set-Cookie"] == "a=b; Path=/console" and page[2] == b"<p>hi</p>"
    assert seen[0].query == [("id", "1"), ("id", "2")] and seen[0].peer == "127.0.0.1"
    assert form[0] == 200 and seen[1].method == "POST" and seen[1].body == b"a=1"  # no token asked: the app decides
    assert root[0] == 302 and root[1]["Location"] == "/console/"
    assert other[0] == 404


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_hash_password_command():
    made = subprocess.run([sys.executable, "-m", "hl7.cli", "console", "hash-password", "--user", "ann",
                           "--role", "scheduler"], input="s3cret\n", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith('[[console.users]]\nname = "ann"\nrole = "scheduler"\n')
    encoded = made.stdout.split('password_hash = "')[1].split('"')[0]
    assert verify_password("s3cret", encoded)
    empty = subprocess.run([sys.executable, "-m", "hl7.cli", "console", "hash-password"], input="\n",
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and "the password is empty" in empty.stderr and "Traceback" not in empty.stderr
