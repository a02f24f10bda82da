"""The daemon's configuration: one TOML file, read with tomllib and checked in full.

``load_config(path)`` returns a frozen :class:`Config`, or raises :class:`ConfigError`
listing *every* problem found, one per line, as ``FILE:LINE: KEY: what is wrong``::

    demo.toml:12: feeds[0].listen: expected HOST:PORT (IPv6 as [::1]:2575), got 'abc'
    demo.toml:19: feeds[1].lisen: unknown key

The schema is the set of dataclasses below; ``config/production.example.toml``
explains every key. Unknown keys are errors everywhere except inside
``[plugins.<name>]`` tables, which are handed to each plugin as they are. Types are
strict: ``pool_size = "5"`` or ``validate = 1`` are errors (a boolean is not an integer).

Where relative paths point
--------------------------
* Files the configuration *reads* -- the clinic data file, TLS certificates and keys,
  secret files -- resolve against the directory of the configuration file, so a
  configuration directory such as ``/etc/slotengine`` is self-contained.
* The database is *state*, not configuration. A relative SQLite path
  (``sqlite:///var/slotengine.db``, ``sqlite:///./var/slotengine.db``) resolves against
  the working directory of the process, as SQLAlchemy and the ``sqlite3`` shell treat
  it: the bundled demo configuration can sit in a read-only installation and still
  keep its database under ``./var/`` where ``slotengine serve`` was started; under
  systemd that is ``WorkingDirectory=/var/lib/slotengine``. The loaded configuration
  holds the resolved, absolute path, so a later ``chdir`` cannot move the database.

Secrets (the HTTP token, the redaction key) never live in the configuration itself:
it names files, and :func:`read_secret` reads them when the daemon starts.
"""
from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from hl7.logs import LOG_LEVELS

REDACTION_KEY_ENV = "SLOTENGINE_REDACTION_KEY"
"""Environment variable holding the log-redaction key when ``logging.redaction_key_file`` is empty."""

HTTP_TOKEN_ENV = "SLOTENGINE_HTTP_TOKEN"
"""Environment variable holding the HTTP token when ``http.token_file`` is empty."""

SIU_EVENTS = tuple(f"S{number}" for number in range(12, 27) if number != 25)
"""Events a destination can subscribe to: SIU S12..S26 (S25 is the SQM/SQR query, not an SIU)."""

DATABASE_BACKENDS = ("sqlite", "postgresql")

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
SECONDS_PER_DAY = 24 * 60 * 60
MAX_MESSAGE_BYTES_LIMIT = 1 << 30
"""Upper bound for ``feeds.max_message_bytes`` (1 GiB): anything above is a typo."""

COMMAND_LINE = "command line"
"""The ``source`` of problems found in command-line overrides."""

KeyPath = tuple[str | int, ...]
"""A key in the document: table and key names, and 0-based indexes into arrays."""

T = TypeVar("T")


# --- problems ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration, located as precisely as the text allows."""

    source: str
    """The configuration file as it was named, or ``"command line"``."""
    line: int
    """1-based line of the key (or of its table); 0 when unknown."""
    key: str
    """Dotted key such as ``feeds[1].listen``; empty for problems with the whole file."""
    message: str

    def __str__(self) -> str:
        location = f"{self.source}:{self.line}" if self.line else self.source
        return f"{location}: {self.key}: {self.message}" if self.key else f"{location}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` lists every problem, one per line."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --- the schema -------------------------------------------------------------------------


class FeedMode(StrEnum):
    """Who owns the schedule on a feed (DESIGN.md, "Two modes")."""

    MIRROR = "mirror"
    """The EHR is the filler: SIU S12-S26 update our copy of its schedule."""
    FILLER = "filler"
    """slotengine is the filler: SRM requests are answered with SRR, SQM queries with SQR."""


class AckWhen(StrEnum):
    """When a feed sends the positive acknowledgement."""

    STORED = "stored"
    """As soon as the raw message is committed to the message store."""
    APPLIED = "applied"
    """After the message has also been applied to the schedule."""


class OnError(StrEnum):
    """What a sender's later messages do after one of its messages failed and was parked."""

    CONTINUE = "continue"
    """They are applied; the failed one waits for an operator."""
    STOP = "stop"
    """They are stored and wait, in order, until an operator resolves the failed one."""


class UnknownTypes(StrEnum):
    """What a feed does with message types it does not map."""

    ACCEPT = "accept"
    """Store and acknowledge them; they are recorded as skipped."""
    REJECT = "reject"
    """Answer them with an AR acknowledgement."""


@dataclass(frozen=True)
class ListenAddress:
    """A TCP address to listen on, written ``HOST:PORT``, IPv6 as ``[::1]:2575``.

    Port 0 asks the operating system for a free port.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``HOST:PORT``; ValueError says what is wrong."""
        match = _HOST_PORT.fullmatch(text)
        if match is None:
            raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:2575), got {text!r}")
        if match["ipv6"] is not None:
            host = match["ipv6"]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not a valid IPv6 address: {host!r}") from None
        else:
            host = _checked_host(match["host"])
        port = int(match["port"])
        if port > 65535:
            raise ValueError(f"port out of range (0..65535), got {port}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = field(default="sqlite:///var/slotengine.db", repr=False)
    """SQLAlchemy URL; relative SQLite paths are resolved against the working directory.
    Left out of ``repr()``: a PostgreSQL URL may carry a password."""
    pool_size: int = 5


@dataclass(frozen=True)
class ClinicConfig:
    data: Path | None = None
    """Clinic data file (locations, providers, resources, templates), or None."""
    timezone: str = "America/New_York"
    """IANA time zone for locations that name none; checked to exist."""
    horizon_days: int = 90
    emergency_release_minutes: int = 120
    no_show_grace_minutes: int = 15
    hold_minutes: int = 10
    owner_answer_minutes: int = 30
    """Mirror mode: how long a change asked of the EHR (SRM) may wait for its SIU."""


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    """One of :data:`hl7.logs.LOG_LEVELS`, upper-case."""
    redaction_key_file: Path | None = None

    def read_redaction_key(self) -> bytes | None:
        """The key for log pseudonyms: the file's, else ``$SLOTENGINE_REDACTION_KEY``, else None."""
        return read_secret(self.redaction_key_file, REDACTION_KEY_ENV)


@dataclass(frozen=True)
class HttpConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", 8780)
    token_file: Path | None = None

    def read_token(self) -> bytes | None:
        """The token for state-changing endpoints: the file's, else ``$SLOTENGINE_HTTP_TOKEN``, else None."""
        return read_secret(self.token_file, HTTP_TOKEN_ENV)


@dataclass(frozen=True)
class ShutdownConfig:
    grace_seconds: float = 10.0
    """How long SIGTERM waits for connections and in-flight work before forcing exit."""


@dataclass(frozen=True)
class FeedTlsConfig:
    """TLS on an inbound feed."""

    cert: Path
    key: Path | None = None
    """None: the private key is in the ``cert`` file."""
    client_ca: Path | None = None
    """Set: mutual TLS -- peers must present a certificate issued by this CA."""


@dataclass(frozen=True)
class FeedConfig:
    """One MLLP listener and the policies for the messages it receives."""

    name: str
    listen: ListenAddress
    mode: FeedMode = FeedMode.MIRROR
    ack_when: AckWhen = AckWhen.STORED
    on_error: OnError = OnError.CONTINUE
    unknown_types: UnknownTypes = UnknownTypes.ACCEPT
    max_message_bytes: int = 1048576
    idle_timeout_seconds: float = 300.0
    allowed_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Empty: any peer. A single address is a /32 (or /128) network."""
    allowed_senders: tuple[str, ...] = ()
    """``APP^FACILITY`` or ``APP^*``; empty: any sender."""
    validate: bool = False
    tls: FeedTlsConfig | None = None
    requests_to: str = ""
    """Mirror mode: the destination (the EHR's SRM endpoint) that changes our plugins want
    (waitlist fill, emergency moves) are asked of, as SRM; the EHR's SIU confirms them.
    Its ``locations`` / ``providers`` say which calendars the EHR owns. Empty: plugins
    change our copy directly."""
    expect_message_every_seconds: float = 0.0
    """The console shows the feed as silent when no message arrived for this long
    within ``expect_hours`` on ``expect_days`` (clinic time); 0: no expectation."""
    expect_hours: tuple[time, time] = (time(0), time(0))
    """Local opening and closing time; equal times mean the whole day."""
    expect_days: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    """Weekdays (0 = Monday) on which messages are expected."""

    def expects_messages_at(self, local: datetime) -> bool:
        """Whether this feed should be busy at clinic-local ``local`` (console silence alarms)."""
        if self.expect_message_every_seconds <= 0:
            return False
        opens, closes = self.expect_hours
        at = local.time().replace(tzinfo=None)
        if opens == closes:
            open_now, day = True, local.weekday()
        elif opens < closes:
            open_now, day = opens <= at < closes, local.weekday()
        else:  # past midnight: the early hours belong to the previous day's opening
            open_now = at >= opens or at < closes
            day = local.weekday() if at >= opens else (local.weekday() - 1) % 7
        return open_now and day in self.expect_days

    def allows_peer(self, address: str) -> bool:
        """Whether a connection from IP ``address`` passes ``allowed_peers``.

        An IPv4-mapped IPv6 address (``::ffff:10.0.0.5``, as a dual-stack socket
        reports IPv4 peers) is checked as the IPv4 address it carries.
        """
        if not self.allowed_peers:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer in network for network in self.allowed_peers)

    def allows_sender(self, application: str, facility: str) -> bool:
        """Whether a message from MSH-3 ``application`` and MSH-4 ``facility``
        (their namespace ids, else universal ids) passes ``allowed_senders``."""
        if not self.allowed_senders:
            return True
        return (
            f"{application}^{facility}" in self.allowed_senders
            or f"{application}^*" in self.allowed_senders
        )


@dataclass(frozen=True)
class DestinationTlsConfig:
    """TLS on an outbound connection (slotengine is the client)."""

    ca: Path | None = None
    """CA certificates to verify the server with; None: the system's trust store."""
    cert: Path | None = None
    """Our client certificate, for servers that require mutual TLS."""
    key: Path | None = None
    """None: the private key is in the ``cert`` file."""


@dataclass(frozen=True)
class DestinationConfig:
    """An outbound SIU subscriber and the changes it wants to hear about."""

    name: str
    host: str
    port: int
    tls: DestinationTlsConfig | None = None
    locations: tuple[str, ...] = ()
    """Location codes; empty: all."""
    providers: tuple[str, ...] = ()
    """Provider codes; empty: all."""
    events: tuple[str, ...] = ()
    """SIU events out of :data:`SIU_EVENTS`; empty: all."""


CONSOLE_ROLES = ("viewer", "scheduler", "interface")
"""Console roles: viewers see redacted identifiers only; schedulers also see patient
data and replay parked messages; the interface team also skips them and retries outbox items."""


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: str
    password_hash: str = field(default="", repr=False)
    """``scrypt$N$r$p$salt$hash`` from ``slotengine console hash-password``; empty:
    the user signs in only through the reverse proxy's header."""


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator console on the HTTP endpoint (``/console/``)."""

    enabled: bool = False
    session_minutes: int = 480
    """A sign-in lasts this long, however busy the user is."""
    users: tuple[ConsoleUser, ...] = ()
    proxy_user_header: str = ""
    """A reverse proxy's header naming the user it authenticated (e.g. ``X-Remote-User``);
    believed only from ``proxy_peers``. Empty: no proxy sign-in."""
    proxy_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    proxy_default_role: str = "viewer"
    """Role of proxy users not listed in ``users``; empty: they are refused."""
    secure_cookies: bool = False
    """Mark the session cookie Secure: set it when browsers reach the console over HTTPS."""

    def user(self, name: str) -> ConsoleUser | None:
        return next((user for user in self.users if user.name == name), None)


@dataclass(frozen=True)
class PluginsConfig:
    disabled: tuple[str, ...] = ()
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each ``[plugins.<name>]`` table as written; each plugin validates its own."""


@dataclass(frozen=True)
class Config:
    """The whole configuration of one daemon."""

    source: str = "<defaults>"
    """Where it was read from, as named to :func:`load_config`."""
    database: DatabaseConfig = DatabaseConfig()
    clinic: ClinicConfig = ClinicConfig()
    logging: LoggingConfig = LoggingConfig()
    http: HttpConfig = HttpConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    feeds: tuple[FeedConfig, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    plugins: PluginsConfig = PluginsConfig()
    console: ConsoleConfig = ConsoleConfig()

    def with_overrides(self, database_url: str | None = None, listen: str | None = None) -> Config:
        """This configuration with the command line's ``--database-url`` and ``--listen``.

        ``listen`` (``HOST:PORT``) replaces the first feed's address, or adds a feed named
        ``default`` with default settings when there is none. Raises ConfigError (source
        ``"command line"``) when a value is invalid or the address is taken.
        """
        problems: list[ConfigProblem] = []
        database = self.database
        feeds = self.feeds
        if database_url is not None:
            try:
                database = replace(database, url=resolve_database_url(database_url, Path.cwd()))
            except ValueError as error:
                problems.append(ConfigProblem(COMMAND_LINE, 0, "--database-url", str(error)))
        if listen is not None:
            try:
                address = ListenAddress.parse(listen)
            except ValueError as error:
                problems.append(ConfigProblem(COMMAND_LINE, 0, "--listen", str(error)))
            else:
                if feeds:
                    feeds = (replace(feeds[0], listen=address), *feeds[1:])
                else:
                    feeds = (FeedConfig(name="default", listen=address),)
                others = [("http.listen", self.http.listen)]
                others += [(f"feeds[{index}].listen", feed.listen) for index, feed in enumerate(feeds) if index]
                for owner, other in others:
                    if address.port and other == address:
                        problems.append(
                            ConfigProblem(COMMAND_LINE, 0, "--listen", f"{address} is already used by {owner}")
                        )
        if problems:
            raise ConfigError(problems)
        return replace(self, database=database, feeds=feeds)


# --- entry points -----------------------------------------------------------------------


def default_config_path() -> Path:
    """The bundled demo configuration, used by ``slotengine serve`` without ``--config``."""
    return Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def load_config(path: Path) -> Config:
    """Read and check the configuration file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError([ConfigProblem(str(path), 0, "", f"cannot read: {error.strerror or error}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([ConfigProblem(str(path), 0, "", f"not UTF-8 text: {error.reason}")]) from None
    return parse_config(text, source=str(path), base_dir=path.absolute().parent)


def parse_config(text: str, source: str, base_dir: Path) -> Config:
    """Check the configuration ``text``.

    ``source`` names it in problems; relative file paths resolve against ``base_dir``;
    relative SQLite paths against the current working directory.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, error)]) from None
    except RecursionError:
        raise ConfigError([ConfigProblem(source, 0, "", "invalid TOML: values nested too deeply")]) from None
    except ValueError as error:  # e.g. an integer with more digits than int() converts
        raise ConfigError([ConfigProblem(source, 0, "", f"invalid TOML: {error}")]) from None

    checker = _Checker(source, TomlKeyLines(text), base_dir.absolute(), Path.cwd())
    root = _Table(checker, document, ())
    http = _read_http(root.table("http"))  # first: a feed on the HTTP address is the one reported
    config = Config(
        source=source,
        database=_read_database(root.table("database")),
        clinic=_read_clinic(root.table("clinic")),
        logging=_read_logging(root.table("logging")),
        http=http,
        shutdown=_read_shutdown(root.table("shutdown")),
        destinations=(destinations := _read_destinations(root)),
        feeds=_read_feeds(root, destinations),
        plugins=_read_plugins(root.table("plugins")),
        console=_read_console(root.table("console"), http),
    )
    root.reject_unknown_keys()
    if checker.problems:
        raise ConfigError(sorted(checker.problems, key=lambda problem: problem.line))
    return config


def read_secret(path: Path | None, env_var: str) -> bytes | None:
    """A secret: the content of file ``path`` if given, else environment variable
    ``env_var`` if set and not empty, else None.

    Surrounding whitespace is ignored (``echo secret > file`` adds a newline). The
    secret never appears in logs or error messages. Raises ConfigError when the file
    cannot be read or holds nothing.
    """
    if path is not None:
        try:
            secret = path.read_bytes().strip()
        except OSError as error:
            problem = f"cannot read secret file: {error.strerror or error}"
            raise ConfigError([ConfigProblem(str(path), 0, "", problem)]) from None
        if not secret:
            raise ConfigError([ConfigProblem(str(path), 0, "", "secret file is empty")])
        return secret
    value = os.environ.get(env_var, "").strip()
    return value.encode() if value else None


def resolve_database_url(url: str, working_dir: Path) -> str:
    """Check a database URL; a relative SQLite path is made absolute against ``working_dir``.

    The ValueError for a bad URL does not repeat it: it may hold a password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError("not a valid database URL (expected sqlite:///PATH or postgresql://HOST/NAME)") from None
    backend = parsed.get_backend_name()
    if backend not in DATABASE_BACKENDS:
        raise ValueError(f"unsupported database {backend!r}; expected one of {', '.join(DATABASE_BACKENDS)}")
    if backend == "sqlite" and _is_relative_sqlite_file(parsed):
        return parsed.set(database=str(working_dir / parsed.database)).render_as_string(hide_password=False)
    return url


def _is_relative_sqlite_file(url: URL) -> bool:
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") == "true":
        return False
    return not Path(database).is_absolute()


def _syntax_problem(source: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigProblem:
    """The decoder's message, with its line moved into the problem's location."""
    message = str(error)
    match = re.search(r"\(at line (\d+), column (\d+)\)$", message)
    if match:
        line = int(match[1])
        message = f"{message[:match.start()].rstrip()} (column {match[2]})"
    else:  # "(at end of document)"
        line = text.count("\n") + 1
    return ConfigProblem(source, line, "", f"invalid TOML: {message}")


# --- value checks -----------------------------------------------------------------------

_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^:\[\]\s]+)):(?P<port>[0-9]{1,10})")
_HOST_NAME = re.compile(
    r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?", re.ASCII
)
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_NAME = re.compile(r"[a-z0-9_-]+", re.ASCII)
_HL7_DELIMITERS = frozenset("^|~\\&")


def _checked_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS host name (underscores allowed, as
    container names have them), else ValueError."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if _DOTTED_NUMBERS.fullmatch(host):
        raise ValueError(f"not a valid IP address: {host!r}")
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError(f"not a valid host name or IP address: {host!r}")
    return host


def _checked_name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise ValueError(f"expected lower-case letters, digits, '_' and '-', got {text!r}")
    return text


def _time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"not a valid IANA time zone: {name!r}") from None
    return name


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}; got {text!r}")
    return text.upper()


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as error:
        raise ValueError(f"expected an IP address or CIDR network: {error}") from None


def _sender(text: str) -> str:
    application, caret, facility = text.partition("^")
    if (
        not caret
        or not application
        or "*" in application
        or _HL7_DELIMITERS.intersection(application + facility)
        or ("*" in facility and facility != "*")
    ):
        raise ValueError(f"expected 'APPLICATION^FACILITY' or 'APPLICATION^*', got {text!r}")
    return text


def _siu_event(text: str) -> str:
    if text not in SIU_EVENTS:
        raise ValueError(f"expected an SIU event S12..S24 or S26, got {text!r}")
    return text


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")


def _weekday(text: str) -> int:
    if text.lower() not in _WEEKDAYS:
        raise ValueError(f"expected one of {', '.join(_WEEKDAYS)}; got {text!r}")
    return _WEEKDAYS.index(text.lower())


def _hours(text: str) -> tuple[time, time]:
    """``"07:00-19:00"``; ``"22:00-06:00"`` runs past midnight; ``24:00`` closes at midnight."""
    match = _HOURS.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    if h2 == 24 and m2 == 0:
        h2 = 0
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"not a time of day in {text!r}")
    return time(h1, m1), time(h2, m2)


def _header_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError(f"expected an HTTP header name such as X-Remote-User, got {text!r}")
    return text


def _one_of(choices: type[StrEnum]) -> Callable[[str], Any]:
    def convert(text: str) -> StrEnum:
        try:
            return choices(text)
        except ValueError:
            expected = ", ".join(choice.value for choice in choices)
            raise ValueError(f"expected one of {expected}; got {text!r}") from None

    return convert


# --- reading the document ---------------------------------------------------------------

_ABSENT = object()  # the key is not in the table
_INVALID = object()  # the value is wrong, and that has been reported

_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (datetime, "date-time"),  # before date: datetime is a subclass of date
    (date, "date"),
    (time, "time"),
)


def _toml_type_name(value: Any) -> str:
    return next(name for python_type, name in _TOML_TYPE_NAMES if isinstance(value, python_type))


def _number_text(value: int | float) -> str:
    """``value`` for a message; str() refuses integers of more than 4300 digits."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    return str(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Collects the problems of one document, located by its text."""

    def __init__(self, source: str, key_lines: TomlKeyLines, base_dir: Path, working_dir: Path) -> None:
        self.source = source
        self.key_lines = key_lines
        self.base_dir = base_dir
        self.working_dir = working_dir
        self.problems: list[ConfigProblem] = []
        self._listen_owners: dict[ListenAddress, KeyPath] = {}

    def report(self, path: KeyPath, message: str) -> None:
        self.problems.append(ConfigProblem(self.source, self.key_lines.line_of(path), format_key(path), message))

    def claim_listen_address(self, address: ListenAddress, path: KeyPath) -> None:
        """Report ``address`` at ``path`` if another key already listens there (port 0 never clashes)."""
        if address.port == 0:
            return
        owner = self._listen_owners.setdefault(address, path)
        if owner != path:
            self.report(path, f"listen address {address} is already used by {format_key(owner)}")


class _Table:
    """One TOML table being read.

    The getters return the value converted, or ``default`` when the key is absent or
    its value is wrong -- after reporting what is wrong, so reading goes on and every
    problem is found. ``reject_unknown_keys`` then reports the keys no getter asked for.
    """

    def __init__(self, checker: _Checker, data: dict[str, Any], path: KeyPath) -> None:
        self.checker = checker
        self.path = path
        self._data = data
        self._read_keys: set[str] = set()
        self._invalid_keys: set[str] = set()

    def report(self, where: str | KeyPath, message: str) -> None:
        """Report a problem at key ``where`` (or at a path below this table)."""
        relative = (where,) if isinstance(where, str) else where
        self._invalid_keys.add(str(relative[0]))
        self.checker.report(self.path + relative, message)

    def is_valid(self, key: str) -> bool:
        """Whether the getter for ``key`` found nothing wrong (an absent key is valid)."""
        return key not in self._invalid_keys

    def _value(self, key: str, kind: str, accepts: Callable[[Any], bool], required: bool) -> Any:
        """The raw value at ``key``, ``_ABSENT``, or ``_INVALID`` after reporting why."""
        self._read_keys.add(key)
        if key not in self._data:
            if required:
                self.report(key, "missing required value")
                return _INVALID
            return _ABSENT
        value = self._data[key]
        if not accepts(value):
            self.report(key, f"expected {kind}, got {_toml_type_name(value)}")
            return _INVALID
        return value

    def string(
        self, key: str, default: T, *, required: bool = False, convert: Callable[[str], Any] | None = None
    ) -> Any:
        """A string, passed through ``convert`` (whose ValueError becomes the problem) if given."""
        value = self._value(key, "string", lambda v: isinstance(v, str), required)
        if value is _ABSENT or value is _INVALID:
            return default
        if convert is None:
            return value
        try:
            return convert(value)
        except ValueError as error:
            self.report(key, str(error))
            return default

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, "boolean", lambda v: isinstance(v, bool), False)
        return default if value is _ABSENT or value is _INVALID else value

    def integer(self, key: str, default: T, *, minimum: int, maximum: int, required: bool = False) -> int | T:
        value = self._value(key, "integer", _is_integer, required)
        if value is _ABSENT or value is _INVALID:
            return default
        if not minimum <= value <= maximum:
            self.report(key, f"must be between {minimum} and {maximum}, got {_number_text(value)}")
            return default
        return value

    def seconds(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        """A duration in seconds, written as an integer or a float."""
        value = self._value(key, "number", _is_number, False)
        if value is _ABSENT or value is _INVALID:
            return default
        if not minimum <= value <= maximum:  # also false for nan
            self.report(key, f"must be between {minimum:g} and {maximum:g}, got {_number_text(value)}")
            return default
        return float(value)

    def strings(self, key: str, *, convert: Callable[[str], Any] | None = None) -> tuple[Any, ...]:
        """An array of strings, each converted; wrong elements are reported and left out."""
        value = self._value(key, "array of strings", lambda v: isinstance(v, list), False)
        if value is _ABSENT or value is _INVALID:
            return ()
        items = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.report((key, index), f"expected string, got {_toml_type_name(item)}")
                continue
            if convert is not None:
                try:
                    item = convert(item)
                except ValueError as error:
                    self.report((key, index), str(error))
                    continue
            items.append(item)
        return tuple(items)

    def file(self, key: str, *, required: bool = False) -> Path | None:
        """A file the configuration names, relative to its directory; it must exist.
        An empty string means none (unless required)."""
        value = self.string(key, "", required=required)
        if not value:
            if required and key in self._data and self.is_valid(key):
                self.report(key, "must name a file")
            return None
        path = self.checker.base_dir / value
        if not path.is_file():
            self.report(key, f"file not found: {path}")
            return None
        return path

    def table(self, key: str) -> _Table:
        """The sub-table ``key``; an absent (or wrong) one reads as empty, giving defaults."""
        return self.optional_table(key) or _Table(self.checker, {}, self.path + (key,))

    def optional_table(self, key: str) -> _Table | None:
        value = self._value(key, "table", lambda v: isinstance(v, dict), False)
        if value is _ABSENT or value is _INVALID:
            return None
        return _Table(self.checker, value, self.path + (key,))

    def tables(self, key: str) -> list[_Table]:
        """An array of tables (``[[key]]``)."""
        value = self._value(key, f"array of tables ([[{key}]])", lambda v: isinstance(v, list), False)
        if value is _ABSENT or value is _INVALID:
            return []
        tables = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                tables.append(_Table(self.checker, item, self.path + (key, index)))
            else:
                self.report((key, index), f"expected table, got {_toml_type_name(item)}")
        return tables

    def remaining_items(self) -> list[tuple[str, Any]]:
        """The items no getter has read yet, now counted as read."""
        items = [(key, value) for key, value in self._data.items() if key not in self._read_keys]
        self._read_keys.update(key for key, _ in items)
        return items

    def reject_unknown_keys(self) -> None:
        for key in self._data:
            if key not in self._read_keys:
                self.report(key, "unknown key")


def _read_database(table: _Table) -> DatabaseConfig:
    defaults = DatabaseConfig()
    working_dir = table.checker.working_dir
    database = DatabaseConfig(
        url=table.string(
            "url",
            resolve_database_url(defaults.url, working_dir),
            convert=lambda url: resolve_database_url(url, working_dir),
        ),
        pool_size=table.integer("pool_size", defaults.pool_size, minimum=1, maximum=1000),
    )
    table.reject_unknown_keys()
    return database


def _read_clinic(table: _Table) -> ClinicConfig:
    defaults = ClinicConfig()
    clinic = ClinicConfig(
        data=table.file("data"),
        timezone=table.string("timezone", defaults.timezone, convert=_time_zone),
        horizon_days=table.integer("horizon_days", defaults.horizon_days, minimum=1, maximum=730),
        emergency_release_minutes=table.integer(
            "emergency_release_minutes", defaults.emergency_release_minutes, minimum=0, maximum=MINUTES_PER_WEEK
        ),
        no_show_grace_minutes=table.integer(
            "no_show_grace_minutes", defaults.no_show_grace_minutes, minimum=0, maximum=MINUTES_PER_DAY
        ),
        hold_minutes=table.integer("hold_minutes", defaults.hold_minutes, minimum=1, maximum=MINUTES_PER_DAY),
        owner_answer_minutes=table.integer("owner_answer_minutes", defaults.owner_answer_minutes, minimum=1,
                                           maximum=MINUTES_PER_DAY),
    )
    table.reject_unknown_keys()
    return clinic


def _read_logging(table: _Table) -> LoggingConfig:
    defaults = LoggingConfig()
    logging = LoggingConfig(
        level=table.string("level", defaults.level, convert=_log_level),
        redaction_key_file=table.file("redaction_key_file"),
    )
    table.reject_unknown_keys()
    return logging


def _read_http(table: _Table) -> HttpConfig:
    defaults = HttpConfig()
    http = HttpConfig(
        listen=table.string("listen", defaults.listen, convert=ListenAddress.parse),
        token_file=table.file("token_file"),
    )
    if table.is_valid("listen"):
        table.checker.claim_listen_address(http.listen, table.path + ("listen",))
    table.reject_unknown_keys()
    return http


def _read_shutdown(table: _Table) -> ShutdownConfig:
    shutdown = ShutdownConfig(
        grace_seconds=table.seconds("grace_seconds", ShutdownConfig().grace_seconds, minimum=0, maximum=3600)
    )
    table.reject_unknown_keys()
    return shutdown


def _read_feeds(root: _Table, destinations: tuple[DestinationConfig, ...]) -> tuple[FeedConfig, ...]:
    feeds = []
    name_owners: dict[str, KeyPath] = {}
    for table in root.tables("feeds"):
        feed = _read_feed(table, destinations)
        if feed is None:
            continue
        owner = name_owners.setdefault(feed.name, table.path)
        if owner != table.path:
            table.report("name", f"feed name {feed.name!r} is already used by {format_key(owner)}")
        table.checker.claim_listen_address(feed.listen, table.path + ("listen",))
        feeds.append(feed)
    return tuple(feeds)


def _read_feed(table: _Table, destinations: tuple[DestinationConfig, ...]) -> FeedConfig | None:
    """The feed, or None when its name or address is missing or wrong (and reported)."""
    name = table.string("name", None, required=True, convert=_checked_name)
    listen = table.string("listen", None, required=True, convert=ListenAddress.parse)
    defaults = FeedConfig(name="", listen=ListenAddress("127.0.0.1", 0))
    tls_table = table.optional_table("tls")
    settings = dict(
        mode=table.string("mode", defaults.mode, convert=_one_of(FeedMode)),
        ack_when=table.string("ack_when", defaults.ack_when, convert=_one_of(AckWhen)),
        on_error=table.string("on_error", defaults.on_error, convert=_one_of(OnError)),
        unknown_types=table.string("unknown_types", defaults.unknown_types, convert=_one_of(UnknownTypes)),
        max_message_bytes=table.integer(
            "max_message_bytes", defaults.max_message_bytes, minimum=1, maximum=MAX_MESSAGE_BYTES_LIMIT
        ),
        idle_timeout_seconds=table.seconds(
            "idle_timeout_seconds", defaults.idle_timeout_seconds, minimum=1, maximum=SECONDS_PER_DAY
        ),
        allowed_peers=table.strings("allowed_peers", convert=_network),
        allowed_senders=table.strings("allowed_senders", convert=_sender),
        validate=table.boolean("validate", defaults.validate),
        tls=_read_feed_tls(tls_table) if tls_table is not None else None,
        expect_message_every_seconds=table.seconds(
            "expect_message_every_seconds", defaults.expect_message_every_seconds, minimum=0, maximum=7 * SECONDS_PER_DAY
        ),
        expect_hours=table.string("expect_hours", defaults.expect_hours, convert=_hours),
        expect_days=tuple(sorted(set(table.strings("expect_days", convert=_weekday)))) or defaults.expect_days,
        requests_to=table.string("requests_to", defaults.requests_to),
    )
    if settings["requests_to"]:
        known = [d.name for d in destinations]
        if settings["mode"] != FeedMode.MIRROR:
            table.report("requests_to", "only a mirror feed sends requests to the EHR; this feed is in filler mode")
        elif settings["requests_to"] not in known:
            table.report("requests_to", f"no [[destinations]] is named {settings['requests_to']!r}"
                                        + (f"; expected one of {', '.join(known)}" if known else ""))
    table.reject_unknown_keys()
    if name is None or listen is None:
        return None
    return FeedConfig(name=name, listen=listen, **settings)


def _read_feed_tls(table: _Table) -> FeedTlsConfig | None:
    """The feed's TLS settings, or None when the cert is missing or wrong (and reported)."""
    cert = table.file("cert", required=True)
    key = table.file("key")
    client_ca = table.file("client_ca")
    table.reject_unknown_keys()
    return FeedTlsConfig(cert, key, client_ca) if cert is not None else None


def _read_destinations(root: _Table) -> tuple[DestinationConfig, ...]:
    destinations = []
    name_owners: dict[str, KeyPath] = {}
    for table in root.tables("destinations"):
        destination = _read_destination(table)
        if destination is None:
            continue
        owner = name_owners.setdefault(destination.name, table.path)
        if owner != table.path:
            table.report("name", f"destination name {destination.name!r} is already used by {format_key(owner)}")
        destinations.append(destination)
    return tuple(destinations)


def _read_destination(table: _Table) -> DestinationConfig | None:
    """The destination, or None when a required value is missing or wrong (and reported)."""
    name = table.string("name", None, required=True, convert=_checked_name)
    host = table.string("host", None, required=True, convert=_checked_host)
    port = table.integer("port", None, required=True, minimum=1, maximum=65535)
    tls_table = table.optional_table("tls")
    tls = _read_destination_tls(tls_table) if tls_table is not None else None
    locations = table.strings("locations")
    providers = table.strings("providers")
    events = table.strings("events", convert=_siu_event)
    table.reject_unknown_keys()
    if name is None or host is None or port is None:
        return None
    return DestinationConfig(name, host, port, tls, locations, providers, events)


def _read_destination_tls(table: _Table) -> DestinationTlsConfig:
    tls = DestinationTlsConfig(ca=table.file("ca"), cert=table.file("cert"), key=table.file("key"))
    if tls.key and not tls.cert:
        table.report("key", "a key needs its cert")
    table.reject_unknown_keys()
    return tls


def _read_plugins(table: _Table) -> PluginsConfig:
    disabled = table.strings("disabled")
    settings = {}
    for name, value in table.remaining_items():
        if isinstance(value, dict):
            settings[name] = value
        else:
            table.report(name, f"expected a table of settings for plugin {name!r}, got {_toml_type_name(value)}")
    return PluginsConfig(disabled=disabled, settings=settings)


def _console_role(text: str) -> str:
    if text not in CONSOLE_ROLES:
        raise ValueError(f"expected one of {', '.join(CONSOLE_ROLES)}; got {text!r}")
    return text


def _read_console(table: _Table, http: HttpConfig) -> ConsoleConfig:
    from hl7.console.passwords import check_hash_format

    defaults = ConsoleConfig()
    users: list[ConsoleUser] = []
    for user_table in table.tables("users"):
        name = user_table.string("name", None, required=True, convert=_console_user_name)
        role = user_table.string("role", None, required=True, convert=_console_role)
        password_hash = user_table.string("password_hash", "", convert=check_hash_format)
        user_table.reject_unknown_keys()
        if name is None or role is None:
            continue
        if any(user.name == name for user in users):
            user_table.report("name", f"console user {name!r} is listed twice")
            continue
        users.append(ConsoleUser(name, role, password_hash))
    console = ConsoleConfig(
        enabled=table.boolean("enabled", defaults.enabled),
        session_minutes=table.integer("session_minutes", defaults.session_minutes, minimum=1, maximum=MINUTES_PER_WEEK),
        users=tuple(users),
        proxy_user_header=table.string("proxy_user_header", defaults.proxy_user_header, convert=_header_name),
        proxy_peers=table.strings("proxy_peers", convert=_network) if "proxy_peers" in table._data else defaults.proxy_peers,
        proxy_default_role=table.string("proxy_default_role", defaults.proxy_default_role,
                                        convert=lambda text: text and _console_role(text)),
        secure_cookies=table.boolean("secure_cookies", defaults.secure_cookies),
    )
    table.reject_unknown_keys()
    if console.enabled and not console.secure_cookies and not ipaddress.ip_address(
            _loopback_candidate(http.listen.host)).is_loopback:
        table.report("enabled", f"the console would send passwords and session cookies in clear to {http.listen}: "
                                "keep [http] listen on loopback behind an HTTPS proxy, or set secure_cookies = true")
    return console


def _console_user_name(text: str) -> str:
    if not 0 < len(text) <= 64 or text.strip() != text or any(not char.isprintable() for char in text):
        raise ValueError(f"expected 1 to 64 printable characters without surrounding blanks, got {text!r}")
    return text


def _loopback_candidate(host: str) -> str:
    """``host`` as an address for the loopback check (``localhost`` is loopback; other names are not trusted)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return "192.0.2.1"


# --- where keys are in the text ---------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_MAX_NESTING = 64


def format_key(path: KeyPath) -> str:
    """``("feeds", 1, "listen")`` -> ``feeds[1].listen``; keys that are not bare are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{key}" if text else key
    return text


def _unescape_basic(raw: str) -> str:
    def replacement(match: re.Match[str]) -> str:
        escape = match[1]
        if escape[0] in "uU" and len(escape) > 1:
            try:
                return chr(int(escape[1:], 16))
            except ValueError:  # beyond U+10FFFF: tomllib rejects the document anyway
                return escape
        return _SIMPLE_ESCAPES.get(escape, escape)

    return _BASIC_ESCAPE.sub(replacement, raw)


class TomlKeyLines:
    """The line on which each key, table and array element of a TOML text starts.

    tomllib reports no positions, so this scanner follows the text itself: table
    headers (``[a.b]``, ``[[feeds]]`` counted per array, nested arrays of tables),
    dotted and quoted keys, inline tables, arrays (element by element, across lines),
    comments, and strings of every kind -- so that ``listen = ...`` inside a multi-line
    string or a ``#`` inside a quoted value is not taken for a key or a comment.
    It is meant for text tomllib has accepted; on anything else it still ends without
    raising and simply knows fewer lines.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._newlines = [match.start() for match in re.finditer("\n", text)]
        self._lines: dict[KeyPath, int] = {}
        self._array_table_counts: dict[KeyPath, int] = {}
        self._scan_document()

    def line_of(self, path: KeyPath) -> int:
        """The line of ``path``, else of the nearest enclosing table or key found, else 0."""
        for length in range(len(path), 0, -1):
            line = self._lines.get(path[:length])
            if line:
                return line
        return 0

    # The document: headers and key/value pairs, one per line.

    def _scan_document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_space_and_comments()
            if self._pos >= len(self._text):
                return
            start = self._pos
            if self._text.startswith("[[", self._pos):
                table = self._scan_array_table_header()
            elif self._text[self._pos] == "[":
                table = self._scan_table_header()
            else:
                self._scan_key_value(table)
            self._skip_rest_of_line()
            if self._pos == start:
                self._pos += 1

    def _scan_table_header(self) -> KeyPath:
        start = self._pos
        self._pos += 1
        table = self._resolve(self._scan_key())
        self._record(table, start)
        return table

    def _scan_array_table_header(self) -> KeyPath:
        start = self._pos
        self._pos += 2
        keys = self._scan_key()
        if not keys:
            return ()
        array = self._resolve(keys[:-1]) + (keys[-1],)
        index = self._array_table_counts.get(array, 0)
        self._array_table_counts[array] = index + 1
        table = array + (index,)
        self._record(table, start)
        return table

    def _resolve(self, keys: list[str]) -> KeyPath:
        """A header's keys as a path: each array of tables it passes through means its latest element."""
        path: KeyPath = ()
        for key in keys:
            path += (key,)
            count = self._array_table_counts.get(path)
            if count:
                path += (count - 1,)
        return path

    def _scan_key_value(self, table: KeyPath) -> None:
        start = self._pos
        keys = self._scan_key()
        if not keys:
            return
        path = table + tuple(keys)
        self._record(path, start)
        self._skip_blank()
        if self._text.startswith("=", self._pos):
            self._pos += 1
            self._skip_blank()
            self._scan_value(path, depth=0)

    # Keys.

    def _scan_key(self) -> list[str]:
        """A possibly dotted key; empty when there is none here."""
        keys = []
        while True:
            self._skip_blank()
            key = self._scan_simple_key()
            if key is None:
                return keys
            keys.append(key)
            self._skip_blank()
            if not self._text.startswith(".", self._pos):
                return keys
            self._pos += 1

    def _scan_simple_key(self) -> str | None:
        if self._text.startswith('"', self._pos):
            return self._scan_basic_string()
        if self._text.startswith("'", self._pos):
            return self._scan_literal_string()
        match = _BARE_KEY.match(self._text, self._pos)
        if match is None:
            return None
        self._pos = match.end()
        return match[0]

    # Values.

    def _scan_value(self, path: KeyPath, depth: int) -> None:
        text, pos = self._text, self._pos
        if text.startswith('"""', pos):
            self._skip_multiline_string('"""')
        elif text.startswith("'''", pos):
            self._skip_multiline_string("'''")
        elif text.startswith('"', pos):
            self._scan_basic_string()
        elif text.startswith("'", pos):
            self._scan_literal_string()
        elif depth >= _MAX_NESTING:
            self._skip_rest_of_line()
        elif text.startswith("[", pos):
            self._scan_array(path, depth)
        elif text.startswith("{", pos):
            self._scan_inline_table(path, depth)
        else:  # number, boolean, date or time
            while self._pos < len(text) and text[self._pos] not in ",]}#\r\n":
                self._pos += 1

    def _scan_array(self, path: KeyPath, depth: int) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip_space_and_comments()
            if self._pos >= len(self._text):
                return
            char = self._text[self._pos]
            if char == "]":
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                continue
            start = self._pos
            self._record(path + (index,), start)
            self._scan_value(path + (index,), depth + 1)
            index += 1
            if self._pos == start:
                self._pos += 1

    def _scan_inline_table(self, path: KeyPath, depth: int) -> None:
        self._pos += 1
        while True:
            self._skip_space_and_comments()
            if self._pos >= len(self._text):
                return
            char = self._text[self._pos]
            if char == "}":
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                continue
            start = self._pos
            keys = self._scan_key()
            if not keys:
                self._pos += 1
                continue
            self._record(path + tuple(keys), start)
            self._skip_blank()
            if self._text.startswith("=", self._pos):
                self._pos += 1
                self._skip_blank()
                self._scan_value(path + tuple(keys), depth + 1)

    # Strings: each ends at its closing quote, or at the end of the line when unclosed.

    def _scan_basic_string(self) -> str:
        text = self._text
        start = end = self._pos + 1
        while end < len(text) and text[end] not in '"\n':
            end += 2 if text[end] == "\\" else 1
        end = min(end, len(text))
        self._pos = end + 1 if end < len(text) and text[end] == '"' else end
        return _unescape_basic(text[start:end])

    def _scan_literal_string(self) -> str:
        start = self._pos + 1
        end = start
        while end < len(self._text) and self._text[end] not in "'\n":
            end += 1
        self._pos = end + 1 if end < len(self._text) and self._text[end] == "'" else end
        return self._text[start:end]

    def _skip_multiline_string(self, quotes: str) -> None:
        text = self._text
        end = self._pos + 3
        while end < len(text) and not text.startswith(quotes, end):
            end += 2 if quotes == '"""' and text[end] == "\\" else 1
        # Up to two more quote characters right before the closing ones belong to the string.
        closing = end
        while closing < len(text) and text[closing] == quotes[0] and closing - end < 5:
            closing += 1
        self._pos = min(closing, len(text))

    # Blanks, comments, line ends.

    def _skip_blank(self) -> None:
        while self._pos < len(self._text) and self._text[self._pos] in " \t":
            self._pos += 1

    def _skip_space_and_comments(self) -> None:
        text = self._text
        while self._pos < len(text):
            char = text[self._pos]
            if char in " \t\r\n":
                self._pos += 1
            elif char == "#":
                self._skip_rest_of_line()
            else:
                return

    def _skip_rest_of_line(self) -> None:
        newline = self._text.find("\n", self._pos)
        self._pos = len(self._text) if newline < 0 else newline + 1

    def _record(self, path: KeyPath, pos: int) -> None:
        """Note that ``path`` (and each table it implies) is first seen on the line of ``pos``."""
        line = bisect.bisect_left(self._newlines, pos) + 1
        for length in range(1, len(path) + 1):
            self._lines.setdefault(path[:length], line)
