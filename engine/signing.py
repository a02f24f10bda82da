"""HMAC-SHA256 signatures for HTTP bodies and short signed tokens.

One format everywhere:

- a request or webhook body is signed as ``X-Slotengine-Signature:
  sha256=<hex HMAC-SHA256(secret, body)>`` — the built-in SMS/voice webhook
  signs what it sends that way, and the daemon accepts it instead of a
  bearer token on non-GET plugin routes;
- a token (in a reminder's reply link, a waitlist offer) is
  ``<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, first part))>``
  with an ``exp`` claim (Unix seconds); ``read_token`` checks signature and
  expiry and returns the claims.

Comparisons use ``hmac.compare_digest``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from datetime import datetime
from typing import Any, Callable, Optional

SIGNATURE_HEADER = "X-Slotengine-Signature"
log = logging.getLogger("slotengine.signing")


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign_body(secret: str | bytes, body: bytes) -> str:
    """The ``X-Slotengine-Signature`` header value for ``body``."""
    return "sha256=" + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_body(secret: str | bytes, body: bytes, header: Optional[str]) -> bool:
    if not header or not secret:
        return False
    return hmac.compare_digest(sign_body(secret, body), header.strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BadToken(ValueError):
    """A token that is malformed, forged or expired."""


def make_token(secret: str | bytes, claims: dict[str, Any], *, expires: datetime) -> str:
    body = _b64(json.dumps({**claims, "exp": int(expires.timestamp())}, separators=(",", ":"),
                           sort_keys=True).encode())
    mac = hmac.new(_key(secret), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def read_token(secret: str | bytes, token: str, *, now: datetime) -> dict[str, Any]:
    try:
        body, mac = token.strip().split(".", 1)
        expected = hmac.new(_key(secret), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise BadToken("token signature does not match")
        claims = json.loads(_unb64(body))
    except BadToken:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformation is the same answer
        raise BadToken("malformed token") from exc
    if not isinstance(claims, dict) or int(claims.get("exp", 0)) < int(now.timestamp()):
        raise BadToken("token expired")
    return claims


def secret_from_settings(settings: dict[str, Any], key: str, where: str, *, default_env: str = "") -> str:
    """``settings[key]``, else the environment variable named by ``settings[key + "_env"]``
    (or ``default_env``); else a random secret for this process, with a warning:
    tokens signed with it do not survive a restart."""
    if settings.get(key):
        return str(settings[key])
    env = settings.get(f"{key}_env", default_env)
    if env and os.environ.get(env):
        return os.environ[env]
    log.warning("no secret configured; a random one is used until restart",
                extra={"setting": f"{where}.{key}", "env": env})
    return secrets.token_hex(32)


def reply_route(answer: Callable[[str, str], dict[str, Any]]) -> Callable[..., tuple[int, dict[str, Any]]]:
    """The HTTP handler for a patient's signed reply: a JSON body ``{"token": ...,
    "answer": ...}`` (``text`` for an SMS gateway's forward; both may come in the
    query instead) handed to ``answer(token, text)``.  A bad token is 403, a
    scheduling conflict 409 with its code, any other unusable answer 400."""
    from engine.errors import SchedulingError

    def handle(body: bytes, headers: dict[str, str], query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return 400, {"error": "the body must be a JSON object"}
        token = data.get("token") or query.get("token", "")
        text = data.get("answer") or data.get("text") or query.get("answer", "")
        try:
            return 200, answer(token, text)
        except BadToken as exc:
            return 403, {"error": str(exc)}
        except SchedulingError as exc:
            return 409, {"error": str(exc), "code": exc.code}
        except ValueError as exc:
            return 400, {"error": str(exc)}
    return handle
