"""Who is using the console: sign-in, sessions, roles, CSRF.

* Local users sign in with a password checked against the scrypt hash in
  ``[[console.users]]``; a reverse proxy may instead name the user it
  authenticated in ``proxy_user_header``, believed only from ``proxy_peers``.
* A session is a random token in an HttpOnly, SameSite=Strict cookie; the
  database keeps its SHA-256 (``console_sessions``) with a fixed expiry, so a
  restart keeps sign-ins, signing out ends the session everywhere, and a
  stolen copy of the table signs no one in.
* Every state-changing request carries the session's CSRF token in a form
  field, compared in constant time; the sign-in form, which has no session
  yet, uses a double-submit cookie instead.
* The role is read from the configuration on every request: removing a
  user or changing their role takes effect at once (after SIGHUP or restart).
* Repeated failed sign-ins for one name or from one address are refused for
  a while, so passwords cannot be guessed at the speed of the network.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

from sqlalchemy import delete
from sqlalchemy.orm import sessionmaker

from engine.clock import Clock
from engine.models import AuditEntry, ConsoleSession
from hl7.config import ConsoleConfig
from hl7.console.passwords import decoy_hash, verify_password

COOKIE = "slotengine_console"
LOGIN_COOKIE = "slotengine_console_login"
COOKIE_PATH = "/console"

# What each role may do; see CONSOLE_ROLES in hl7.config.
PERMISSIONS = {
    "viewer": frozenset(),
    "scheduler": frozenset({"patient_data", "replay"}),
    "interface": frozenset({"patient_data", "replay", "skip", "outbox"}),
}

FAILURES_ALLOWED = 5
FAILURE_WINDOW_SECONDS = 600.0


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    via: str  # password | proxy
    csrf_token: str
    token_hash: str
    expires_at: datetime

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS.get(self.role, frozenset())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(expected: str, given: str) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


class Throttle:
    """Failed sign-ins per key (a user name, an address) within a sliding window."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window: float = FAILURE_WINDOW_SECONDS):
        self.allowed, self.window = allowed, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        recent = [at for at in self._failures.get(key, []) if now - at < self.window]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)
        return recent

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(key, now)) >= self.allowed for key in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, []).append(now)
            if len(self._failures) > 10_000:  # a flood of invented names: keep memory bounded
                for key in list(self._failures)[:5_000]:
                    self._failures.pop(key, None)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


class Authenticator:
    def __init__(self, config: ConsoleConfig, sessions: sessionmaker, clock: Clock):
        self.config = config
        self.sessions = sessions
        self.clock = clock
        self.throttle = Throttle()

    # --- roles --------------------------------------------------------------------

    def role_of(self, name: str, via: str) -> Optional[str]:
        user = self.config.user(name)
        if user is not None:
            return user.role if via == "proxy" or user.password_hash else None
        return (self.config.proxy_default_role or None) if via == "proxy" else None

    def proxied_user(self, headers: dict[str, str], peer: str) -> Optional[str]:
        header = self.config.proxy_user_header
        if not header:
            return None
        name = headers.get(header.lower(), "").strip()
        if not name or len(name) > 100:
            return None
        try:
            address = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not any(address in network for network in self.config.proxy_peers):
            return None
        return name

    # --- sessions -----------------------------------------------------------------

    def current(self, token: str) -> Optional[Identity]:
        if not token or len(token) > 100:
            return None
        with self.sessions() as session:
            row = session.get(ConsoleSession, _digest(token))
            if row is None or row.expires_at <= self.clock.now():
                return None
            role = self.role_of(row.username, row.via)
            if role is None:
                return None
            return Identity(row.username, role, row.via, row.csrf_token, row.token_hash, row.expires_at)

    def start(self, name: str, via: str, peer: str) -> tuple[str, Identity]:
        """A new session for ``name``; returns the cookie token and who it is."""
        role = self.role_of(name, via)
        if role is None:
            raise PermissionError(name)
        token = secrets.token_urlsafe(32)
        now = self.clock.now()
        row = ConsoleSession(token_hash=_digest(token), username=name, via=via, csrf_token=secrets.token_urlsafe(32),
                             created_at=now, expires_at=now + timedelta(minutes=self.config.session_minutes))
        with self.sessions() as session, session.begin():
            session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
            session.add(row)
            session.add(AuditEntry(at=now, actor=f"operator:{name}"[:100], source=f"console: sign-in from {peer}"[:200],
                                   action="console_signed_in", entity="console_session", entity_id=None,
                                   reason=f"{via}; role {role}"))
        return token, Identity(name, role, via, row.csrf_token, row.token_hash, row.expires_at)

    def end(self, identity: Identity, peer: str) -> None:
        with self.sessions() as session, session.begin():
            session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == identity.token_hash))
            session.add(AuditEntry(at=self.clock.now(), actor=f"operator:{identity.name}"[:100],
                                   source=f"console: sign-out from {peer}"[:200], action="console_signed_out",
                                   entity="console_session", entity_id=None, reason=""))

    # --- passwords ----------------------------------------------------------------

    def check_password(self, name: str, password: str, peer: str) -> str:
        """"ok", "throttled" or "refused" (unknown user and wrong password look the same)."""
        keys = (f"user:{name}", f"peer:{peer}")
        if self.throttle.blocked(*keys):
            return "throttled"
        user = self.config.user(name)
        encoded = user.password_hash if user is not None and user.password_hash else decoy_hash()
        if verify_password(password, encoded) and user is not None and user.password_hash:
            self.throttle.succeeded(f"user:{name}")
            return "ok"
        self.throttle.failed(*keys)
        return "refused"
