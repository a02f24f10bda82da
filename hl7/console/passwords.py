"""Console passwords: scrypt from the standard library, in a self-describing string.

``scrypt$N$r$p$<salt>$<hash>`` (salt and hash in unpadded URL-safe base64) keeps
the cost parameters with each hash, so they can be raised later without
invalidating the passwords already configured.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

COST_N, COST_R, COST_P = 2**14, 8, 1  # about 16 MiB and 50 ms per check: slow to guess, quick to sign in
HASH_BYTES = 32
MAX_PASSWORD_BYTES = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES,
                          maxmem=256 * n * r + 1024 * 1024)


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    salt = secrets.token_bytes(16)
    return f"scrypt${COST_N}${COST_R}${COST_P}${_b64(salt)}${_b64(_derive(password, salt, COST_N, COST_R, COST_P))}"


def _parts(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = encoded.split("$")
    if scheme != "scrypt":
        raise ValueError
    n_, r_, p_ = int(n), int(r), int(p)
    if n_ < 2 or n_ & (n_ - 1) or not 1 <= r_ <= 64 or not 1 <= p_ <= 16 or n_ > 2**20:
        raise ValueError
    return n_, r_, p_, _unb64(salt), _unb64(digest)


def check_hash_format(encoded: str) -> str:
    """``encoded`` if it is a hash this module made (for the configuration check), else ValueError."""
    try:
        _n, _r, _p, salt, digest = _parts(encoded)
        if len(salt) < 8 or len(digest) != HASH_BYTES:
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError("expected a hash from `slotengine console hash-password` (scrypt$N$r$p$salt$hash)") from None
    return encoded


def verify_password(password: str, encoded: str) -> bool:
    if not encoded or not password or len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return False
    try:
        n, r, p, salt, digest = _parts(encoded)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(_derive(password, salt, n, r, p), digest)


@functools.cache
def decoy_hash() -> str:
    """Checked against when the user does not exist, so an unknown name costs the same time as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))
