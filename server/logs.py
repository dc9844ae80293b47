"""What the server logs about a call: the call id as a keyed hash or cut to safe characters,
and connection URLs without their passwords (the JSON setup itself: :mod:`callshield.logs`).

Loggers bind call and stream ids; no code path logs audio. A ``call_id`` is the client's own
reference and may be anything up to 128 characters, a caller's phone number included, so it is
logged through :class:`CallIdLogging`: by default (``--log-call-ids hash``) only a keyed hash
of it, which still ties together the lines of one call, since privacy must not depend on an
operator remembering a flag; with ``--log-call-ids plain`` (opt-in, for call ids known to
carry no personal data) characters outside a safe set are replaced (no control characters,
newlines or terminal escapes reach a log line) and it is cut to ``MAX_LOGGED_CALL_ID``
characters.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from callshield.logs import configure as configure  # re-exported: one log setup

MAX_LOGGED_CALL_ID = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=/#-]")
CALL_ID_LOGGING = ("plain", "hash")


@dataclass(frozen=True)
class CallIdLogging:
    """How a client's ``call_id`` appears in logs (the API's responses keep it unchanged).

    ``plain``: the safe characters (letters, digits, ``._:@+=/#-``; others become ``_``), at
    most ``MAX_LOGGED_CALL_ID`` of them (a longer one ends with ``~``). ``hash``: ``h-`` and 16
    hex digits of HMAC-SHA256 under ``key``; without a key, a random one per process (lines
    correlate within one process only; set ``--log-hash-key`` on every server to correlate
    across them). A key keeps a phone number from being recovered by hashing every number.
    """

    mode: str = "hash"
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __post_init__(self) -> None:
        if self.mode not in CALL_ID_LOGGING:
            raise ValueError(f"call id logging must be one of {CALL_ID_LOGGING}")

    def __call__(self, call_id: str) -> str:
        if self.mode == "hash":
            digest = hmac.new(self.key, call_id.encode(), hashlib.sha256).hexdigest()
            return f"h-{digest[:16]}"
        safe = _UNSAFE.sub("_", call_id)
        if len(safe) > MAX_LOGGED_CALL_ID:
            safe = safe[: MAX_LOGGED_CALL_ID - 1] + "~"
        return safe

    @classmethod
    def from_flags(cls, mode: str, key: str) -> CallIdLogging:
        return cls(mode, key.encode()) if key else cls(mode)


def safe_url(url: str) -> str:
    """A URL without its credentials (``redis://:secret@host`` becomes ``redis://***@host``):
    connection URLs are logged at start-up, and their passwords must not be."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
