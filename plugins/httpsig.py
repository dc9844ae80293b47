"""HTTP message signatures (RFC 9421) as Genesys AudioHook uses them: HMAC-SHA256 under the
integration's client secret over the upgrade request's target, authority and AudioHook
headers.

Sans-IO: :func:`verify` takes the request's header fields and target and returns why a
signature fails (or None), so any transport can use it and tests can sign requests exactly as
Genesys' reference client does (:func:`sign`). Only what AudioHook sends is parsed: a
dictionary whose members are an inner list of component names with parameters (signature
input) or a byte sequence (signature).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from plugins.errors import PluginError

REQUIRED = ("@request-target", "@authority", "audiohook-organization-id",
            "audiohook-session-id", "audiohook-correlation-id", "x-api-key")
MAX_AGE_SECONDS = 10  # as Genesys' reference server: a signature is used at once
CLOCK_SKEW_SECONDS = 3
MIN_NONCE_LENGTH = 22

Param = str | int | bool
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")


class SignatureError(PluginError, ValueError):
    """A header field that is not the structured field AudioHook sends."""


@dataclass
class _Parser:
    text: str
    pos: int = 0

    def peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def skip(self, chars: str = " ") -> None:
        while self.peek() and self.peek() in chars:
            self.pos += 1

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise SignatureError(f"expected {char!r} at {self.pos}")
        self.pos += 1

    def key(self) -> str:
        m = _KEY.match(self.text, self.pos)
        if not m:
            raise SignatureError(f"expected a key at {self.pos}")
        self.pos = m.end()
        return m.group()

    def bare(self) -> Param | bytes:
        c = self.peek()
        if c == '"':
            self.pos += 1
            out = []
            while (c := self.peek()) != '"':
                if not c:
                    raise SignatureError("unterminated string")
                if c == "\\":
                    self.pos += 1
                    c = self.peek()
                out.append(c)
                self.pos += 1
            self.pos += 1
            return "".join(out)
        if c == ":":
            end = self.text.find(":", self.pos + 1)
            if end < 0:
                raise SignatureError("unterminated byte sequence")
            raw = self.text[self.pos + 1:end]
            self.pos = end + 1
            try:
                return base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise SignatureError("byte sequence is not base64") from exc
        if c == "?":
            self.pos += 2
            return self.text[self.pos - 1] == "1"
        m = re.compile(r"-?\d{1,15}").match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return int(m.group())
        m = _TOKEN.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return m.group()
        raise SignatureError(f"unexpected {c!r} at {self.pos}")

    def params(self) -> dict[str, Param]:
        out: dict[str, Param] = {}
        while self.peek() == ";":
            self.pos += 1
            self.skip()
            name = self.key()
            value: Param | bytes = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare()
            if isinstance(value, bytes):
                raise SignatureError("byte sequence as a parameter")
            out[name] = value
        return out

    def member(self) -> tuple[list[str], dict[str, Param]] | bytes:
        """An inner list of strings, or a byte sequence; with parameters."""
        if self.peek() == "(":
            self.pos += 1
            items: list[str] = []
            while True:
                self.skip()
                if self.peek() == ")":
                    self.pos += 1
                    break
                item = self.bare()
                if not isinstance(item, str) or self.peek() == ";":
                    raise SignatureError("components must be plain strings")
                items.append(item)
            return items, self.params()
        value = self.bare()
        self.params()
        if not isinstance(value, bytes):
            raise SignatureError("signature must be a byte sequence")
        return value

    def dictionary(self) -> dict[str, tuple[list[str], dict[str, Param]] | bytes]:
        out = {}
        self.skip()
        while self.pos < len(self.text):
            name = self.key()
            self.expect("=")
            out[name] = self.member()
            self.skip(" \t")
            if self.pos < len(self.text):
                self.expect(",")
                self.skip(" \t")
        return out


def _serialize(value: Param) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def signature_params(components: list[str], params: Mapping[str, Param]) -> str:
    """The ``@signature-params`` value: the inner list re-serialized, so that a sender's
    stray whitespace or escapes never change what is verified."""
    inner = " ".join(_serialize(c) for c in components)
    return f"({inner})" + "".join(f";{k}={_serialize(v)}" for k, v in params.items())


def _canonical(value: str) -> str:
    return re.sub(r"[ \t]*\r\n[ \t]+", " ", value.strip())


def signature_base(components: list[str], params: Mapping[str, Param],
                   headers: Mapping[str, str], target: str) -> str:
    """The lines HMAC covers; KeyError names a component the request lacks."""
    lines = []
    for name in components:
        if name == "@request-target":
            value = target
        elif name == "@authority":
            value = headers["host"]
        elif name.startswith("@"):
            raise KeyError(name)
        else:
            value = headers[name]
        lines.append(f'"{name}": {_canonical(value)}')
    lines.append(f'"@signature-params": {signature_params(components, params)}')
    return "\n".join(lines)


def _hmac(key: bytes, base: str) -> bytes:
    return hmac.new(key, base.encode(), hashlib.sha256).digest()


def sign(key: bytes, api_key: str, headers: Mapping[str, str], target: str, *,
         created: int | None = None, nonce: str, lifetime: int = 30,
         label: str = "sig1") -> dict[str, str]:
    """``signature-input`` and ``signature`` as Genesys' reference client makes them."""
    created = int(time.time()) if created is None else created
    params: dict[str, Param] = {"keyid": api_key, "nonce": nonce, "alg": "hmac-sha256",
                                "created": created, "expires": created + lifetime}
    lower = {k.lower(): v for k, v in headers.items()}
    base = signature_base(list(REQUIRED), params, lower, target)
    digest = base64.b64encode(_hmac(key, base)).decode()
    return {"signature-input": f"{label}={signature_params(list(REQUIRED), params)}",
            "signature": f"{label}=:{digest}:"}


@dataclass
class Verifier:
    """Checks signed upgrade requests under one client secret (base64, as Genesys shows it)
    and remembers nonces for the signature lifetime, so a captured request cannot be
    replayed."""

    client_secret: str
    max_age: int = MAX_AGE_SECONDS
    _seen: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.client_secret)

    def verify(self, headers: Mapping[str, str], target: str,
               now: float | None = None) -> str | None:
        """None when the request is signed right, else the reason (safe to log)."""
        now = time.time() if now is None else now
        lower = {k.lower(): v for k, v in headers.items()}
        if "signature-input" not in lower or "signature" not in lower:
            return "unsigned request (no signature-input/signature header)"
        try:
            inputs = _Parser(lower["signature-input"]).dictionary()
            signatures = _Parser(lower["signature"]).dictionary()
        except SignatureError as exc:
            return f"malformed signature header: {exc}"
        if not inputs:
            return "empty signature-input"
        label, signed = next(iter(inputs.items()))
        given = signatures.get(label)
        if not isinstance(signed, tuple) or not isinstance(given, bytes):
            return f"signature {label!r} missing or malformed"
        components, params = signed
        missing = [c for c in REQUIRED if c not in components]
        if missing:
            return f"signature does not cover {', '.join(missing)}"
        if params.get("alg", "hmac-sha256") != "hmac-sha256":
            return f"unsupported alg {str(params.get('alg'))[:20]!r}"
        if params.get("keyid") != lower.get("x-api-key"):
            return "keyid is not the X-API-KEY"
        created, expires, nonce = params.get("created"), params.get("expires"), params.get("nonce")
        if not isinstance(created, int) or isinstance(created, bool):
            return "no created parameter"
        if created > now + CLOCK_SKEW_SECONDS:
            return "created is in the future"
        if created + self.max_age < now - CLOCK_SKEW_SECONDS or (
                isinstance(expires, int) and expires < now - CLOCK_SKEW_SECONDS):
            return "signature expired"
        if not isinstance(nonce, str) or len(nonce) < MIN_NONCE_LENGTH:
            return "nonce missing or too short"
        try:
            base = signature_base(components, params, lower, target)
        except KeyError as exc:
            return f"request lacks signed component {exc.args[0]}"
        if not hmac.compare_digest(_hmac(self.key, base), given):
            return "signature does not match (client secret?)"
        self._seen = {n: t for n, t in self._seen.items() if t > now}
        if nonce in self._seen:
            return "nonce replayed"
        self._seen[nonce] = now + self.max_age + 2 * CLOCK_SKEW_SECONDS
        return None
