"""Console users: a file of ``name:role:password-hash`` lines, passwords hashed with scrypt.

Why a file: a fraud desk has a handful of analysts and the console runs on the customer's own
machine; the file is written with ``python -m console hash-password`` and kept readable by
the console's user only. Nothing stores or logs a password in clear.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ROLES = ("viewer", "analyst")  # viewer: read and export; analyst: also acknowledge and judge
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and ~50 ms per check


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the line."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str

    def can(self, role: str) -> bool:
        """Whether this user holds ``role`` (an analyst can do what a viewer can)."""
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), for the users file."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant time in the digest)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=32)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


_DUMMY = hash_password("not a password", b"\0" * 16)


def check_login(users: dict[str, User], name: str, password: str) -> User | None:
    """The user if the password matches; an unknown name costs the same scrypt time, so
    timing does not tell which names exist."""
    user = users.get(name)
    ok = verify_password(password, user.password_hash if user else _DUMMY)
    return user if ok and user is not None else None


def load_users(path: str | Path) -> dict[str, User]:
    """Users by name from ``path``; ``#`` starts a comment line."""
    users: dict[str, User] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise UsersFileError(f"{path}:{number}: expected name:role:hash")
        name, role, stored = parts
        if not NAME.match(name):
            raise UsersFileError(f"{path}:{number}: bad user name")
        if role not in ROLES:
            raise UsersFileError(f"{path}:{number}: role must be one of {', '.join(ROLES)}")
        if not stored.startswith("scrypt$"):
            raise UsersFileError(f"{path}:{number}: not an scrypt hash "
                                 "(python -m console hash-password)")
        if name in users:
            raise UsersFileError(f"{path}:{number}: user {name} listed twice")
        users[name] = User(name, role, stored)
    if not users:
        raise UsersFileError(f"{path}: no users")
    return users
