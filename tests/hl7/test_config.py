"""hl7.config: the schema and its defaults, every validation rule, where problems are
reported, command-line overrides, secrets, the bundled files, and a fuzzed loader."""
from __future__ import annotations

import ipaddress
import math
import textwrap
import tomllib
from datetime import date, datetime, time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from sqlalchemy.engine import make_url

from hl7.config import (
    AckWhen,
    Config,
    ConfigError,
    ConfigProblem,
    FeedConfig,
    FeedMode,
    ListenAddress,
    OnError,
    TomlKeyLines,
    UnknownTypes,
    default_config_path,
    format_key,
    load_config,
    parse_config,
    read_secret,
)

REPO = Path(__file__).resolve().parents[2]


def parse(text: str, base_dir: Path) -> Config:
    return parse_config(textwrap.dedent(text), "test.toml", base_dir)


def problems(text: str, base_dir: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        parse(text, base_dir)
    return list(caught.value.problems)


# --- defaults and a complete file -------------------------------------------------------


def test_an_empty_file_gives_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse("", tmp_path)
    assert make_url(config.database.url).database == str(tmp_path / "var" / "slotengine.db")
    assert config.database.pool_size == 5
    assert config.clinic.data is None
    assert config.clinic.timezone == "America/New_York"
    assert (config.clinic.horizon_days, config.clinic.emergency_release_minutes) == (90, 120)
    assert (config.clinic.no_show_grace_minutes, config.clinic.hold_minutes) == (15, 10)
    assert config.logging.level == "INFO" and config.logging.redaction_key_file is None
    assert config.http.listen == ListenAddress("127.0.0.1", 8780) and config.http.token_file is None
    assert config.shutdown.grace_seconds == 10
    assert config.feeds == () and config.destinations == ()
    assert config.plugins.disabled == () and config.plugins.settings == {}
    assert config.source == "test.toml"


def test_every_key_is_read(tmp_path):
    for name in ("clinic.toml", "key", "token", "cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    config = parse(
        """
        [database]
        url = "postgresql+psycopg://slotengine@db/slotengine"
        pool_size = 12
        [clinic]
        data = "clinic.toml"
        timezone = "Europe/Berlin"
        horizon_days = 30
        emergency_release_minutes = 0
        no_show_grace_minutes = 5
        hold_minutes = 3
        [logging]
        level = "debug"
        redaction_key_file = "key"
        [http]
        listen = "[::1]:9000"
        token_file = "token"
        [shutdown]
        grace_seconds = 2.5
        [[feeds]]
        name = "ehr-1"
        listen = "0.0.0.0:2575"
        mode = "filler"
        ack_when = "applied"
        on_error = "stop"
        unknown_types = "reject"
        max_message_bytes = 4096
        idle_timeout_seconds = 30
        allowed_peers = ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
        allowed_senders = ["EPIC^MAIN", "CADENCE^*"]
        validate = true
        tls = { cert = "cert.pem", key = "key.pem", client_ca = "ca.pem" }
        [[destinations]]
        name = "out"
        host = "ehr.example.org"
        port = 6661
        locations = ["MAIN"]
        providers = ["P1", "P2"]
        events = ["S12", "S26"]
        tls = { ca = "ca.pem", cert = "cert.pem", key = "key.pem" }
        [plugins]
        disabled = ["reminders"]
        [plugins.waitlist]
        anything = { goes = [1, "two"] }
        """,
        tmp_path,
    )
    assert config.database.url == "postgresql+psycopg://slotengine@db/slotengine"
    assert config.database.pool_size == 12
    assert config.clinic.data == tmp_path / "clinic.toml"
    assert config.clinic.timezone == "Europe/Berlin"
    assert config.clinic.hold_minutes == 3 and config.clinic.emergency_release_minutes == 0
    assert config.logging.level == "DEBUG"
    assert config.logging.redaction_key_file == tmp_path / "key"
    assert config.http.listen == ListenAddress("::1", 9000)
    assert config.shutdown.grace_seconds == 2.5
    (feed,) = config.feeds
    assert (feed.name, str(feed.listen)) == ("ehr-1", "0.0.0.0:2575")
    assert (feed.mode, feed.ack_when, feed.on_error, feed.unknown_types) == (
        FeedMode.FILLER,
        AckWhen.APPLIED,
        OnError.STOP,
        UnknownTypes.REJECT,
    )
    assert (feed.max_message_bytes, feed.idle_timeout_seconds, feed.validate) == (4096, 30.0, True)
    assert feed.allowed_peers[1] == ipaddress.ip_network("192.0.2.1/32")
    assert feed.allowed_senders == ("EPIC^MAIN", "CADENCE^*")
    assert feed.tls.cert == tmp_path / "cert.pem" and feed.tls.client_ca == tmp_path / "ca.pem"
    (destination,) = config.destinations
    assert (destination.name, destination.host, destination.port) == ("out", "ehr.example.org", 6661)
    assert destination.providers == ("P1", "P2") and destination.events == ("S12", "S26")
    assert destination.tls.ca == tmp_path / "ca.pem"
    assert config.plugins.disabled == ("reminders",)
    assert config.plugins.settings == {"waitlist": {"anything": {"goes": [1, "two"]}}}


def test_the_database_url_is_not_in_repr(tmp_path):
    config = parse('[database]\nurl = "postgresql://u:hunter2@db/x"', tmp_path)
    assert "hunter2" not in repr(config)


# --- every rule, one problem each ---------------------------------------------------------

# (toml, key, line, what the message says)
RULES = [
    ("top = 1", "top", 1, "unknown key"),
    ("database = 1", "database", 1, "expected table, got integer"),
    ("[database]\nurl = 5", "database.url", 2, "expected string, got integer"),
    ("[database]\nurl = 'mysql://db/x'", "database.url", 2, "unsupported database 'mysql'"),
    ("[database]\nurl = 'postgres ql:/x'", "database.url", 2, "not a valid database URL"),
    ("[database]\npool_size = '5'", "database.pool_size", 2, "expected integer, got string"),
    ("[database]\npool_size = true", "database.pool_size", 2, "expected integer, got boolean"),
    ("[database]\npool_size = 0", "database.pool_size", 2, "must be between 1 and 1000, got 0"),
    ("[database]\nport = 5432", "database.port", 2, "unknown key"),
    ("[clinic]\ntimezone = 'Mars/Olympus'", "clinic.timezone", 2, "not a valid IANA time zone: 'Mars/Olympus'"),
    ("[clinic]\ntimezone = '../etc/passwd'", "clinic.timezone", 2, "not a valid IANA time zone"),
    ("[clinic]\nhorizon_days = 731", "clinic.horizon_days", 2, "must be between 1 and 730, got 731"),
    ("[clinic]\nhorizon_days = 0", "clinic.horizon_days", 2, "must be between 1 and 730, got 0"),
    ("[clinic]\nhold_minutes = 0", "clinic.hold_minutes", 2, "must be between 1 and 1440"),
    ("[clinic]\nemergency_release_minutes = -1", "clinic.emergency_release_minutes", 2, "must be between 0"),
    ("[clinic]\nno_show_grace_minutes = 1.5", "clinic.no_show_grace_minutes", 2, "expected integer, got float"),
    ("[clinic]\nhorizon_days = 1979-05-27", "clinic.horizon_days", 2, "expected integer, got date"),
    ("[clinic]\ndata = 'nowhere.toml'", "clinic.data", 2, "file not found: "),
    ("[logging]\nlevel = 'verbose'", "logging.level", 2, "expected one of DEBUG, INFO, WARNING, ERROR; got 'verbose'"),
    ("[logging]\nredaction_key_file = 'none.key'", "logging.redaction_key_file", 2, "file not found"),
    ("[http]\nlisten = 'abc'", "http.listen", 2, "expected HOST:PORT (IPv6 as [::1]:2575), got 'abc'"),
    ("[http]\nlisten = '::1:80'", "http.listen", 2, "expected HOST:PORT"),
    ("[http]\nlisten = '127.0.0.1:70000'", "http.listen", 2, "port out of range (0..65535), got 70000"),
    ("[http]\nlisten = '[::zz]:80'", "http.listen", 2, "not a valid IPv6 address: '::zz'"),
    ("[http]\nlisten = '999.1.1.1:80'", "http.listen", 2, "not a valid IP address: '999.1.1.1'"),
    ("[http]\nlisten = 'bad!host:80'", "http.listen", 2, "not a valid host name or IP address"),
    ("[http]\ntoken_file = 'none'", "http.token_file", 2, "file not found"),
    ("[shutdown]\ngrace_seconds = '10'", "shutdown.grace_seconds", 2, "expected number, got string"),
    ("[shutdown]\ngrace_seconds = -1", "shutdown.grace_seconds", 2, "must be between 0 and 3600, got -1"),
    ("[shutdown]\ngrace_seconds = nan", "shutdown.grace_seconds", 2, "must be between 0 and 3600, got nan"),
    ("[shutdown]\ngrace_seconds = inf", "shutdown.grace_seconds", 2, "got inf"),
    ("[[feeds]]\nlisten = ':1'\nname = 'a'", "feeds[0].listen", 2, "expected HOST:PORT"),
    ("[[feeds]]\nlisten = '127.0.0.1:1'", "feeds[0].name", 1, "missing required value"),
    ("[[feeds]]\nname = 'a'", "feeds[0].listen", 1, "missing required value"),
    ("[[feeds]]\nname = 'EHR'\nlisten = 'h:1'", "feeds[0].name", 2, "expected lower-case letters"),
    ("[feeds]\nname = 'a'", "feeds", 1, "expected array of tables ([[feeds]]), got table"),
    ("feeds = [1]", "feeds[0]", 1, "expected table, got integer"),
    ("[database]\n[clinic]\n[[feeds]]\nname = 'a'\nlisten = 'h:1'\nmode = 'mirrorr'", "feeds[0].mode", 6,
     "expected one of mirror, filler; got 'mirrorr'"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nack_when = 'now'", "feeds[0].ack_when", 4, "expected one of stored, applied"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\non_error = 'panic'", "feeds[0].on_error", 4, "expected one of continue, stop"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nunknown_types = 1", "feeds[0].unknown_types", 4, "expected string, got integer"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nmax_message_bytes = 0", "feeds[0].max_message_bytes", 4, "must be between 1 and"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nidle_timeout_seconds = 0.5", "feeds[0].idle_timeout_seconds", 4,
     "must be between 1 and 86400, got 0.5"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_peers = '10.0.0.0/8'", "feeds[0].allowed_peers", 4,
     "expected array of strings, got string"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_peers = ['10.0.0.1/8']", "feeds[0].allowed_peers[0]", 4,
     "has host bits set"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_peers = [10]", "feeds[0].allowed_peers[0]", 4,
     "expected string, got integer"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_senders = ['EPIC']", "feeds[0].allowed_senders[0]", 4,
     "expected 'APPLICATION^FACILITY' or 'APPLICATION^*', got 'EPIC'"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_senders = ['*^MAIN']", "feeds[0].allowed_senders[0]", 4,
     "expected 'APPLICATION^FACILITY'"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nallowed_senders = ['EPIC^MA*']", "feeds[0].allowed_senders[0]", 4,
     "expected 'APPLICATION^FACILITY'"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nvalidate = 'yes'", "feeds[0].validate", 4, "expected boolean, got string"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\n[feeds.tls]\nclient_ca = ''", "feeds[0].tls.cert", 4, "missing required value"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\n[feeds.tls]\ncert = ''", "feeds[0].tls.cert", 5, "must name a file"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\ntls = 'on'", "feeds[0].tls", 4, "expected table, got string"),
    ("[[feeds]]\nname = 'a'\nlisten = 'h:1'\nmode.x = 1", "feeds[0].mode", 4, "expected string, got table"),
    ("[[destinations]]\nhost = 'h'\nport = 1", "destinations[0].name", 1, "missing required value"),
    ("[[destinations]]\nname = 'd'\nport = 1", "destinations[0].host", 1, "missing required value"),
    ("[[destinations]]\nname = 'd'\nhost = 'h'", "destinations[0].port", 1, "missing required value"),
    ("[[destinations]]\nname = 'd'\nhost = 'h h'\nport = 1", "destinations[0].host", 3, "not a valid host name"),
    ("[[destinations]]\nname = 'd'\nhost = 'h'\nport = 0", "destinations[0].port", 4, "must be between 1 and 65535"),
    ("[[destinations]]\nname = 'd'\nhost = 'h'\nport = 1\nevents = ['S25']", "destinations[0].events[0]", 5,
     "expected an SIU event S12..S24 or S26, got 'S25'"),
    ("[[destinations]]\nname = 'd'\nhost = 'h'\nport = 1\nlocations = 'MAIN'", "destinations[0].locations", 5,
     "expected array of strings"),
    ("[[destinations]]\nname = 'd'\nhost = 'h'\nport = 1\nretries = 3", "destinations[0].retries", 5, "unknown key"),
    ("[plugins]\ndisabled = 'reminders'", "plugins.disabled", 2, "expected array of strings, got string"),
    ("[plugins]\nreminders = true", "plugins.reminders", 2,
     "expected a table of settings for plugin 'reminders', got boolean"),
]


@pytest.mark.parametrize(
    ("text", "key", "line", "message"), RULES, ids=[f"{rule[1]}:{rule[3][:30]}" for rule in RULES]
)
def test_each_rule_reports_one_problem_at_its_key_and_line(tmp_path, text, key, line, message):
    (problem,) = problems(text, tmp_path)
    assert (problem.source, problem.key, problem.line) == ("test.toml", key, line)
    assert message in problem.message


def test_a_destination_key_needs_its_cert(tmp_path):
    (tmp_path / "k.pem").write_text("x")
    text = "[[destinations]]\nname = 'd'\nhost = 'h'\nport = 1\n[destinations.tls]\nkey = 'k.pem'"
    (problem,) = problems(text, tmp_path)
    assert (problem.key, problem.line, problem.message) == ("destinations[0].tls.key", 6, "a key needs its cert")


def test_names_and_listen_addresses_are_unique(tmp_path):
    found = problems(
        """
        [[feeds]]
        name = "a"
        listen = "127.0.0.1:2575"
        [[feeds]]
        name = "a"
        listen = "127.0.0.1:2575"
        [[feeds]]
        name = "b"
        listen = "127.0.0.1:8780"
        [[destinations]]
        name = "d"
        host = "h"
        port = 1
        [[destinations]]
        name = "d"
        host = "h"
        port = 1
        """,
        tmp_path,
    )
    assert [(problem.line, problem.key, problem.message) for problem in found] == [
        (6, "feeds[1].name", "feed name 'a' is already used by feeds[0]"),
        (7, "feeds[1].listen", "listen address 127.0.0.1:2575 is already used by feeds[0].listen"),
        (10, "feeds[2].listen", "listen address 127.0.0.1:8780 is already used by http.listen"),
        (16, "destinations[1].name", "destination name 'd' is already used by destinations[0]"),
    ]


def test_port_zero_never_clashes(tmp_path):
    config = parse(
        "[http]\nlisten = '127.0.0.1:0'\n[[feeds]]\nname = 'a'\nlisten = '127.0.0.1:0'\n"
        "[[feeds]]\nname = 'b'\nlisten = '127.0.0.1:0'",
        tmp_path,
    )
    assert [feed.listen.port for feed in config.feeds] == [0, 0]


def test_plugin_tables_are_kept_as_written(tmp_path):
    config = parse("[plugins.x]\nunknown = 1\nnested = { deep = [true] }\n[plugins.y]", tmp_path)
    assert config.plugins.settings == {"x": {"unknown": 1, "nested": {"deep": [True]}}, "y": {}}


# --- where problems are reported ------------------------------------------------------------

TRICKY = """\
# line 1: a comment with a [table] and key = "value"
[database]
url = "sqlite:///x.db"   # line 3
"description" = \"\"\"
listen = "not a key: inside a multi-line string"
[[feeds]]
\"\"\"
'literal.key' = '''
name = "also inside a string"
'''
[[feeds]]
name = "first"
listen = "127.0.0.1:2575"
[feeds.tls]
cert = "missing.pem"   # line 15
[[feeds]]
name = "second"
allowed_peers = [
  "10.0.0.0/8",
  # a comment with "quotes", [brackets] and a , comma
  "300.0.0.1",         # line 21
]
'lisen' = "127.0.0.1:2576"
tls = { cert = "x.pem", bogus = 1 }
[[feeds]]
name = "third"
listen = "127.0.0.1:2577"
mode . kind = "dotted"   # line 28
[[destinations]]
name = "a"
host = "h"
port = 1
events = ["S12",
          "S13", "XX"]   # line 34
[plugins.any]
whatever = 1
"""


def test_problems_are_located_in_a_tricky_file_and_listed_together(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config(TRICKY, "tricky.toml", tmp_path)
    assert str(caught.value).splitlines() == [
        "tricky.toml:4: database.description: unknown key",
        "tricky.toml:8: database.\"literal.key\": unknown key",
        f"tricky.toml:15: feeds[0].tls.cert: file not found: {tmp_path / 'missing.pem'}",
        "tricky.toml:16: feeds[1].listen: missing required value",
        "tricky.toml:21: feeds[1].allowed_peers[1]: expected an IP address or CIDR network: "
        "'300.0.0.1' does not appear to be an IPv4 or IPv6 network",
        "tricky.toml:23: feeds[1].lisen: unknown key",
        f"tricky.toml:24: feeds[1].tls.cert: file not found: {tmp_path / 'x.pem'}",
        "tricky.toml:24: feeds[1].tls.bogus: unknown key",
        "tricky.toml:28: feeds[2].mode: expected string, got table",
        "tricky.toml:34: destinations[0].events[2]: expected an SIU event S12..S24 or S26, got 'XX'",
    ]


def test_key_lines_follow_nested_arrays_of_tables_and_inline_arrays():
    lines = TomlKeyLines(
        textwrap.dedent(
            """\
            [[a]]
            x = 1
            [[a.b]]
            y = 2
            [[a]]
            [[a.b]]
            [[a.b]]
            y = 3
            [a.c]
            z = {p = {q = 1}}
            inline = [ {k = 1},
              {k = 2} ]
            "quo\\u0074ed" = 1
            """
        )
    )
    assert lines.line_of(("a", 0, "x")) == 2
    assert lines.line_of(("a", 0, "b", 0, "y")) == 4
    assert lines.line_of(("a", 1)) == 5
    assert lines.line_of(("a", 1, "b", 1, "y")) == 8
    assert lines.line_of(("a", 1, "c", "z", "p", "q")) == 10
    assert lines.line_of(("a", 1, "c", "inline", 1, "k")) == 12
    assert lines.line_of(("a", 1, "c", "quoted")) == 13
    assert lines.line_of(("a", 1, "c", "missing")) == 9  # falls back to the table
    assert lines.line_of(("nowhere",)) == 0


def test_format_key_quotes_keys_that_are_not_bare():
    assert format_key(("feeds", 1, "listen")) == "feeds[1].listen"
    assert format_key(("plugins", "my.plugin", "a b")) == 'plugins."my.plugin"."a b"'


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[database]\nurl = \n", 2, "invalid TOML: Invalid value (column 7)"),
        ("[a]\nx = 1\n[a]\n", 3, "invalid TOML: Cannot declare ('a',) twice (column 3)"),
        ("x = [1,\n", 2, "invalid TOML: "),
        ("x = " + "9" * 5000, 0, "invalid TOML: Exceeds the limit"),
        ("x = " + "{ a = " * 5000, 0, "invalid TOML: values nested too deeply"),
    ],
)
def test_toml_syntax_errors_become_a_located_problem(tmp_path, text, line, message):
    (problem,) = problems(text, tmp_path)
    assert (problem.line, problem.key) == (line, "")
    assert problem.message.startswith(message)


def test_problem_text_leaves_out_an_unknown_line_and_an_empty_key():
    assert str(ConfigProblem("a.toml", 3, "x.y", "bad")) == "a.toml:3: x.y: bad"
    assert str(ConfigProblem("a.toml", 0, "x.y", "bad")) == "a.toml: x.y: bad"
    assert str(ConfigProblem("a.toml", 7, "", "bad")) == "a.toml:7: bad"


def test_huge_integers_are_reported_without_spelling_them_out(tmp_path):
    (problem,) = problems("[database]\npool_size = 0x" + "f" * 2000, tmp_path)
    assert problem.message == "must be between 1 and 1000, got a 8000-bit integer"


# --- files and paths ----------------------------------------------------------------------------


def test_load_config_names_the_file_and_resolves_files_against_its_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "clinic.toml").write_text("")
    path = tmp_path / "etc" / "slotengine.toml"
    path.write_text('\ufeff[clinic]\ndata = "clinic.toml"\n[http]\nlisten = "nope"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:4: http.listen: expected HOST:PORT (IPv6 as [::1]:2575), got 'nope'"
    path.write_text('[clinic]\ndata = "clinic.toml"\n')
    assert load_config(path).clinic.data == tmp_path / "etc" / "clinic.toml"


def test_load_config_reports_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "latin1.toml")


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("sqlite:///var/x.db", "{cwd}/var/x.db"),
        ("sqlite:///./var/x.db", "{cwd}/var/x.db"),
        ("sqlite:////srv/x.db", "/srv/x.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite://", None),
        ("sqlite:///file:x.db?mode=ro&uri=true", "file:x.db"),
    ],
)
def test_relative_sqlite_paths_resolve_against_the_working_directory(tmp_path, monkeypatch, url, database):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    config = parse(f"[database]\nurl = '{url}'", tmp_path / "elsewhere")
    expected = database.format(cwd=tmp_path) if database else None
    assert make_url(config.database.url).database == expected


def test_a_working_directory_with_odd_characters_survives_the_url(tmp_path, monkeypatch):
    odd = tmp_path / "a dir:with %41"
    odd.mkdir()
    monkeypatch.chdir(odd)
    assert make_url(parse("", tmp_path).database.url).database == str(odd / "var" / "slotengine.db")


# --- overrides ------------------------------------------------------------------------------


def test_listen_override_replaces_the_first_feeds_address(tmp_path):
    config = parse(
        "[[feeds]]\nname = 'a'\nlisten = 'h:1'\nmode = 'filler'\n[[feeds]]\nname = 'b'\nlisten = 'h:2'", tmp_path
    )
    changed = config.with_overrides(listen="[::1]:3000")
    assert changed.feeds[0] == FeedConfig(name="a", listen=ListenAddress("::1", 3000), mode=FeedMode.FILLER)
    assert changed.feeds[1] == config.feeds[1]
    assert str(config.feeds[0].listen) == "h:1"  # the original is untouched


def test_listen_override_without_feeds_adds_a_default_feed(tmp_path):
    changed = parse("", tmp_path).with_overrides(listen="127.0.0.1:2575")
    assert changed.feeds == (FeedConfig(name="default", listen=ListenAddress("127.0.0.1", 2575)),)


def test_database_override_resolves_relative_sqlite_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    changed = parse("", tmp_path).with_overrides(database_url="sqlite:///other.db")
    assert make_url(changed.database.url).database == str(tmp_path / "other.db")


def test_bad_overrides_are_reported_together_without_echoing_the_url(tmp_path):
    config = parse("[[feeds]]\nname = 'a'\nlisten = 'h:1'\n[[feeds]]\nname = 'b'\nlisten = 'h:2'", tmp_path)
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(database_url="oracle://u:hunter2@db/x", listen="nope")
    assert str(caught.value).splitlines() == [
        "command line: --database-url: unsupported database 'oracle'; expected one of sqlite, postgresql",
        "command line: --listen: expected HOST:PORT (IPv6 as [::1]:2575), got 'nope'",
    ]
    with pytest.raises(ConfigError, match="--listen: h:2 is already used by feeds\\[1\\].listen"):
        config.with_overrides(listen="h:2")
    with pytest.raises(ConfigError, match="already used by http.listen"):
        config.with_overrides(listen="127.0.0.1:8780")
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(database_url="postgresql://u:hunter2@db:port/x")
    assert "hunter2" not in str(caught.value)


# --- secrets --------------------------------------------------------------------------------


def test_read_secret_prefers_the_file_then_the_environment(tmp_path, monkeypatch):
    secret_file = tmp_path / "token"
    secret_file.write_bytes(b"s3cret\n")
    monkeypatch.setenv("TEST_SECRET", "from-env")
    assert read_secret(secret_file, "TEST_SECRET") == b"s3cret"
    assert read_secret(None, "TEST_SECRET") == b"from-env"
    monkeypatch.setenv("TEST_SECRET", "")
    assert read_secret(None, "TEST_SECRET") is None
    monkeypatch.delenv("TEST_SECRET")
    assert read_secret(None, "TEST_SECRET") is None


def test_read_secret_refuses_empty_and_unreadable_files_without_showing_content(tmp_path):
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="secret file is empty"):
        read_secret(tmp_path / "empty", "UNSET_VARIABLE")
    with pytest.raises(ConfigError, match="cannot read secret file: Is a directory"):
        read_secret(tmp_path, "UNSET_VARIABLE")


def test_secret_accessors_use_their_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTENGINE_REDACTION_KEY", "k1")
    monkeypatch.setenv("SLOTENGINE_HTTP_TOKEN", "t1")
    config = parse("", tmp_path)
    assert config.logging.read_redaction_key() == b"k1"
    assert config.http.read_token() == b"t1"
    (tmp_path / "token").write_text("t2")
    assert parse("[http]\ntoken_file = 'token'", tmp_path).http.read_token() == b"t2"


# --- allowlists -------------------------------------------------------------------------------


def test_allowed_peers_match_addresses_networks_and_mapped_ipv4():
    feed = FeedConfig(
        name="a",
        listen=ListenAddress("h", 1),
        allowed_peers=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("2001:db8::/32")),
    )
    assert feed.allows_peer("10.1.2.3")
    assert feed.allows_peer("::ffff:10.1.2.3")
    assert feed.allows_peer("2001:db8::5")
    assert not feed.allows_peer("10.2.0.1")
    assert not feed.allows_peer("not an address")
    assert FeedConfig(name="a", listen=ListenAddress("h", 1)).allows_peer("203.0.113.9")


def test_allowed_senders_match_exactly_or_by_facility_wildcard():
    feed = FeedConfig(name="a", listen=ListenAddress("h", 1), allowed_senders=("EPIC^MAIN", "CADENCE^*"))
    assert feed.allows_sender("EPIC", "MAIN")
    assert feed.allows_sender("CADENCE", "ANY")
    assert not feed.allows_sender("EPIC", "EAST")
    assert not feed.allows_sender("epic", "MAIN")
    assert FeedConfig(name="a", listen=ListenAddress("h", 1)).allows_sender("X", "Y")


def test_listen_addresses_print_as_written():
    assert str(ListenAddress.parse("[::1]:2575")) == "[::1]:2575"
    assert str(ListenAddress.parse("localhost:1")) == "localhost:1"


# --- bundled files ------------------------------------------------------------------------------


def test_default_config_path_is_the_bundled_demo():
    assert default_config_path() == REPO / "config" / "demo.toml"


def test_the_demo_config_loads_with_two_feeds_and_a_database_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(default_config_path())
    assert [(feed.name, str(feed.listen), feed.mode) for feed in config.feeds] == [
        ("ehr", "127.0.0.1:2575", FeedMode.MIRROR),
        ("placer", "127.0.0.1:2576", FeedMode.FILLER),
    ]
    assert make_url(config.database.url).database == str(tmp_path / "var" / "slotengine.db")
    assert config.clinic.data == REPO / "config" / "demo-clinic.toml"


def test_the_production_example_loads_once_its_files_exist(tmp_path):
    example = REPO / "config" / "production.example.toml"
    text = example.read_text()
    file_keys = {"data", "redaction_key_file", "token_file", "cert", "key", "client_ca", "ca"}

    def create_named_files(table):
        for key, value in table.items():
            if isinstance(value, dict):
                create_named_files(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        create_named_files(item)
            elif key in file_keys and value:
                (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / value).write_text("placeholder")

    create_named_files(tomllib.loads(text))
    config = parse_config(text, str(example), tmp_path)
    assert config.database.url.startswith("postgresql+psycopg://")
    assert [feed.name for feed in config.feeds] == ["ehr", "placer"]
    assert config.feeds[0].tls.client_ca == tmp_path / "tls" / "clients-ca.crt"
    assert config.feeds[0].allowed_senders == ("EPIC^MAIN_HOSPITAL", "CADENCE^*")
    assert config.destinations[0].tls.cert == tmp_path / "tls" / "slotengine-client.crt"


def test_the_systemd_unit_runs_serve_with_hardening():
    unit = (REPO / "config" / "slotengine.service").read_text()
    settings_ = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings_["Type"] == "simple"
    assert settings_["Restart"] == "on-failure"
    assert settings_["User"] == "slotengine"
    assert settings_["ProtectSystem"] == "strict"
    assert settings_["ReadWritePaths"] == "/var/lib/slotengine"
    assert settings_["NoNewPrivileges"] == "yes"
    assert settings_["KillSignal"] == "SIGTERM"
    assert " serve --config " in settings_["ExecStart"]
    # systemd must wait longer than the daemon's own shutdown grace period.
    assert int(settings_["TimeoutStopSec"]) > Config().shutdown.grace_seconds


# --- fuzzing: only ConfigError escapes ----------------------------------------------------------

FUZZ_EXAMPLES = 400

TOML_PIECES = st.sampled_from(
    [
        "\n", " ", "=", ".", ",", "[", "]", "[[", "]]", "{", "}", '"', "'", '"""', "'''", "#", "\\",
        "feeds", "listen", "name", "tls", "cert", "database", "url", "plugins", "x", "1", "1.5", "true",
        "1979-05-27", '"127.0.0.1:2575"', '"mirror"', "\t", "\r\n", "\\u00e9", "-", "_",
    ]
)
TOMLISH_TEXT = st.lists(TOML_PIECES | st.text(max_size=4), max_size=40).map("".join)


def test_the_loader_raises_only_config_error_on_tomlish_text(tmp_path, record_property):
    tried = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(TOMLISH_TEXT)
    def load(text):
        tried.append(text)
        TomlKeyLines(text)  # the locator copes with text tomllib would refuse, too
        try:
            parse_config(text, "fuzz.toml", tmp_path)
        except ConfigError as error:
            assert error.problems and all(isinstance(problem, ConfigProblem) for problem in error.problems)

    load()
    record_property("inputs_tried", len(tried))
    assert len(tried) >= FUZZ_EXAMPLES // 2


SCHEMA_KEYS = [
    "database", "url", "pool_size", "clinic", "data", "timezone", "horizon_days", "emergency_release_minutes",
    "no_show_grace_minutes", "hold_minutes", "logging", "level", "redaction_key_file", "http", "listen",
    "token_file", "shutdown", "grace_seconds", "feeds", "name", "mode", "ack_when", "on_error", "unknown_types",
    "max_message_bytes", "idle_timeout_seconds", "allowed_peers", "allowed_senders", "validate", "tls", "cert",
    "key", "client_ca", "destinations", "host", "port", "locations", "providers", "events", "ca", "plugins",
    "disabled",
]
MEANINGFUL_STRINGS = [
    "", "127.0.0.1:2575", "[::1]:2575", "127.0.0.1:8780", "h:0", "abc", "mirror", "filler", "stored",
    "applied", "continue", "stop", "accept", "reject", "ehr", "EHR", "S12", "S25", "10.0.0.0/8", "10.0.0.1/8",
    "APP^*", "APP", "America/New_York", "Nowhere/Zone", "sqlite:///x.db", "postgresql://h/db", "mysql://h/d",
    "INFO", "loud", "exists.pem", "missing.pem",
]
KEYS = st.sampled_from(SCHEMA_KEYS) | st.text(min_size=1, max_size=6)
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 5, 90, 731, 2575, 65536]),
    st.floats(),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(MEANINGFUL_STRINGS),
    st.dates(),
    st.datetimes(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=10,
)
TABLES = st.dictionaries(KEYS, VALUES, max_size=8)
DOCUMENTS = st.builds(
    lambda sections, extra: {**extra, **sections},
    st.fixed_dictionaries(
        {},
        optional={
            **{name: TABLES for name in ("database", "clinic", "logging", "http", "shutdown", "plugins")},
            "feeds": st.lists(TABLES, max_size=3),
            "destinations": st.lists(TABLES, max_size=2),
        },
    ),
    st.dictionaries(KEYS, VALUES, max_size=2),
)


def toml_string(text: str) -> str:
    def escaped(char: str) -> str:
        if char in '\\"':
            return "\\" + char
        return f"\\u{ord(char):04x}" if ord(char) < 32 or ord(char) == 127 else char

    return '"' + "".join(escaped(char) for char in text) + '"'


def toml_key(key: str) -> str:
    return key if key and all(char.isascii() and (char.isalnum() or char in "_-") for char in key) else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_key(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


def is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def toml_document(table: dict, path: tuple[str, ...] = ()) -> list[str]:
    """TOML lines for ``table``: its plain keys, then sub-tables, then arrays of tables."""
    lines = [
        f"{toml_key(key)} = {toml_value(value)}"
        for key, value in table.items()
        if not isinstance(value, dict) and not is_table_array(value)
    ]
    for key, value in table.items():
        header = ".".join(toml_key(part) for part in (*path, key))
        if isinstance(value, dict):
            lines += [f"[{header}]", *toml_document(value, (*path, key))]
        elif is_table_array(value):
            for item in value:
                lines += [f"[[{header}]]", *toml_document(item, (*path, key))]
    return lines


def test_the_loader_locates_every_problem_in_generated_documents(tmp_path, record_property):
    (tmp_path / "exists.pem").write_text("x")
    tried = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(DOCUMENTS)
    def load(document):
        text = "\n".join(toml_document(document)) + "\n"
        tomllib.loads(text)  # the generator writes valid TOML
        tried.append(text)
        try:
            parse_config(text, "generated.toml", tmp_path)
        except ConfigError as error:
            lines = text.split("\n")
            for problem in error.problems:
                assert problem.line >= 1, problem
                assert not problem.message.startswith("invalid TOML"), problem
                last_key = problem.key.rsplit(".", 1)[-1]
                if problem.message == "unknown key" and toml_key(last_key) == last_key:
                    assert last_key in lines[problem.line - 1], (problem, text)

    load()
    record_property("inputs_tried", len(tried))
    assert len(tried) >= FUZZ_EXAMPLES // 2
