"""SIP messages, sans-IO: parse what a session recording client (SRC) sends, and build the
recording server's (SRS) responses and requests (RFC 3261), with nothing but bytes in and
out.

Only what an SRS needs is read: the start line, headers (compact forms expanded, repeated
headers kept in order), and the body by ``Content-Length``. On TCP the length is what frames
one message from the next (:class:`StreamFramer`); on UDP one datagram is one message. A
message that breaks the grammar raises :class:`SipError` carrying the status to answer with
(400, 513, ...), which the server turns into that response when the message is a request it
can still answer, and otherwise drops with a log line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from plugins.errors import PluginError

MAX_MESSAGE_BYTES = 65536  # one INVITE, metadata included: a real one is a few KiB
MAX_HEADERS = 100
COMPACT = {"i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact",
           "l": "content-length", "c": "content-type", "k": "supported", "s": "subject",
           "e": "content-encoding", "o": "event", "r": "refer-to", "x": "session-expires"}
# how headers are written back (the names responses copy from requests)
CANONICAL = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate"}
REASONS = {100: "Trying", 200: "OK", 400: "Bad Request", 403: "Forbidden",
           405: "Method Not Allowed", 415: "Unsupported Media Type",
           420: "Bad Extension", 421: "Extension Required",
           481: "Call/Transaction Does Not Exist", 486: "Busy Here",
           487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
           500: "Server Internal Error", 503: "Service Unavailable", 513: "Message Too Large"}


class SipError(PluginError, ValueError):
    """A message we cannot take: ``status`` is the response that says so."""

    def __init__(self, status: int, detail: str, message: SipMessage | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.message = message  # what was read of it, when enough to answer


def canonical(name: str) -> str:
    name = COMPACT.get(name.lower(), name.lower())
    return CANONICAL.get(name, "-".join(part.capitalize() for part in name.split("-")))


@dataclass
class SipMessage:
    """A request (``method`` set) or a response (``status`` set)."""

    method: str = ""
    uri: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # canonical names, in order
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str = "") -> str:
        want = canonical(name)
        return next((v for n, v in self.headers if n == want), default)

    def get_all(self, name: str) -> list[str]:
        want = canonical(name)
        return [v for n, v in self.headers if n == want]

    def tokens(self, name: str) -> set[str]:
        """A comma-separated token header (Require, Supported), lower-cased."""
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    @property
    def call_id(self) -> str:
        return self.get("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = self.get("CSeq").strip().partition(" ")
        try:
            return int(number), method.strip().upper()
        except ValueError as exc:
            raise SipError(400, "malformed CSeq") from exc

    @property
    def branch(self) -> str:
        return header_param(self.get("Via"), "branch")

    def to_tag(self) -> str:
        return header_param(self.get("To"), "tag")

    def from_tag(self) -> str:
        return header_param(self.get("From"), "tag")

    def encode(self) -> bytes:
        start = (f"{self.method} {self.uri} SIP/2.0" if self.method
                 else f"SIP/2.0 {self.status} {self.reason or REASONS.get(self.status, '')}")
        headers = [(n, v) for n, v in self.headers if n != "Content-Length"]
        headers.append(("Content-Length", str(len(self.body))))
        head = "\r\n".join([start, *(f"{n}: {v}" for n, v in headers)]) + "\r\n\r\n"
        return head.encode() + self.body


def header_param(value: str, name: str) -> str:
    """A ``;name=value`` parameter of a header (outside its <URI>)."""
    _, _, tail = value.rpartition(">") if ">" in value else ("", "", value)
    for part in tail.split(";")[1:]:
        key, _, val = part.partition("=")
        if key.strip().lower() == name:
            return val.strip().strip('"')
    return ""


def uri_of(value: str) -> str:
    """The URI of a name-addr (``"A" <sip:a@b>;tag=x``) or addr-spec header."""
    if "<" in value and ">" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";")[0].strip()


def parse_message(data: bytes) -> SipMessage:
    """One whole message (a datagram, or one :class:`StreamFramer` frame)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipError(513, f"message of {len(data)} bytes (limit {MAX_MESSAGE_BYTES})")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipError(400, "headers are not UTF-8") from exc
    lines = text.replace("\r\n", "\n").split("\n")
    message = _start_line(lines[0])
    problem: SipError | None = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and message.headers:  # folded continuation
            name, value = message.headers[-1]
            message.headers[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            # named by its first word only: the rest may be an AOR (a number), and the
            # reason is logged
            problem = problem or SipError(400, f"malformed header line {_word(line)!r}")
            continue
        if len(message.headers) >= MAX_HEADERS:
            problem = problem or SipError(400, f"more than {MAX_HEADERS} headers")
            break
        message.headers.append((canonical(name.strip()), value.strip()))
    try:
        if problem is not None:
            raise problem
        _check(message, body)
    except SipError as exc:
        exc.message = message
        raise
    return message


def _check(message: SipMessage, body: bytes) -> None:
    length = message.get("Content-Length")
    if length:
        try:
            n = int(length)
        except ValueError as exc:
            raise SipError(400, "malformed Content-Length") from exc
        if n < 0 or n > len(body):
            raise SipError(400, f"Content-Length {n} but {len(body)} body bytes")
        body = body[:n]
    message.body = body
    if message.is_request:
        for required in ("Via", "From", "To", "Call-ID", "CSeq"):
            if not message.get(required):
                raise SipError(400, f"missing {required}")
        _number, method = message.cseq
        if method != message.method:
            raise SipError(400, f"CSeq method {method} is not {message.method}")


def answerable(message: SipMessage | None) -> bool:
    """Enough of a request to send a response to (RFC 3261 8.2.6 copies these)."""
    return (message is not None and message.is_request and message.method != "ACK"
            and all(message.get(h) for h in ("Via", "From", "To", "Call-ID", "CSeq")))


def _start_line(line: str) -> SipMessage:
    parts = line.strip().split(" ", 2)
    if len(parts) == 3 and parts[0] == "SIP/2.0":
        try:
            return SipMessage(status=int(parts[1]), reason=parts[2])
        except ValueError as exc:
            raise SipError(400, "malformed status line") from exc
    if len(parts) == 3 and parts[2] == "SIP/2.0" and parts[0].isalpha() and parts[0].isupper():
        return SipMessage(method=parts[0], uri=parts[1])
    raise SipError(400, f"not a SIP/2.0 start line: {_word(line)!r}...")


def _word(line: str) -> str:
    """The first word of a line we refuse, for the log (never the URI that follows)."""
    return line.strip().split(" ")[0].split(":")[0][:20]


def response(request: SipMessage, status: int, *, to_tag: str = "",
             headers: list[tuple[str, str]] | None = None, body: bytes = b"",
             reason: str = "") -> SipMessage:
    """A response to ``request``: its Via, From, To (with ``to_tag`` unless it has one),
    Call-ID and CSeq copied, as RFC 3261 8.2.6 says."""
    copied = [(n, v) for n, v in request.headers
              if n in ("Via", "From", "Call-ID", "CSeq", "Record-Route")]
    to = request.get("To")
    if to_tag and not header_param(to, "tag"):
        to = f"{to};tag={to_tag}"
    copied.insert(2, ("To", to))
    return SipMessage(status=status, reason=reason or REASONS.get(status, ""),
                      headers=[*copied, *(headers or [])], body=body)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class StreamFramer:
    """Messages out of a TCP byte stream, framed by ``Content-Length`` (mandatory on
    streams, RFC 3261 18.3); CRLF keep-alives between messages are skipped."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while True:
            while self._buffer[:2] == b"\r\n":  # keep-alive (RFC 5626 double CRLF)
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self.limit:
                    raise SipError(513, f"headers longer than {self.limit} bytes")
                return frames
            head = bytes(self._buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() in (b"content-length", b"l"):
                    try:
                        length = int(value.strip())
                    except ValueError as exc:
                        raise SipError(400, "malformed Content-Length") from exc
                    break
            else:
                if not head.startswith(b"SIP/2.0") and b"\r\n" in head:
                    raise SipError(400, "no Content-Length on a stream transport")
            total = end + 4 + length
            if length < 0 or total > self.limit:
                raise SipError(513, f"message of {total} bytes (limit {self.limit})")
            if len(self._buffer) < total:
                return frames
            frames.append(bytes(self._buffer[:total]))
            del self._buffer[:total]
