"""``slotengine console hash-password``: a password hash for ``[[console.users]]``."""
from __future__ import annotations

import getpass
import json
import sys

from hl7.console.passwords import hash_password


class PasswordError(Exception):
    pass


def read_password(stdin=None) -> str:
    """Asked twice on a terminal; else the first line of standard input (for scripts)."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise PasswordError("the two passwords differ")
        return first
    return stdin.readline().rstrip("\r\n")


def cmd_hash_password(args) -> int:
    try:
        encoded = hash_password(read_password())
    except (PasswordError, ValueError) as exc:
        raise PasswordError(str(exc)) from None
    if args.user:
        print("[[console.users]]")
        print(f"name = {json.dumps(args.user)}")
        print(f'role = "{args.role}"')
        print(f'password_hash = "{encoded}"')
    else:
        print(encoded)
    return 0
