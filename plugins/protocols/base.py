"""What every sans-IO platform protocol speaks: the format it announces, the typed events it
returns, how a connection ends on our side, and the protocol error.

Events are returned in the order they must be acted on (a reply before the stream opens, the
buffered audio before the hangup), and a protocol error is returned as the last event rather
than raised, so that the frames that preceded it in the same read are still acted on, as
they would be had they come one read at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from callshield.v1 import detection_pb2 as pb

# WebSocket close codes (RFC 6455) that the platforms' protocol errors map to
NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011

Inbound = str | bytes  # a WebSocket text (str) or binary frame, or bytes read off TCP
Outbound = str | bytes  # what to write back, ready for the wire


class ProtocolViolation(Exception):
    """A platform broke its protocol: ends that one connection. ``reason`` labels the
    metric; ``code`` is the WebSocket close code (RFC 6455) where the transport has one."""

    def __init__(self, reason: str, detail: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class AudioFormat:
    """What the platform sends: encoding (a ``pb.AudioEncoding``), rate, and the party on each
    interleaved channel, the caller first. Each channel is one known party (SPLIT, never
    diarized: a single-party leg is scored as that party, named ``caller`` or ``agent``)
    unless ``mixed``: both parties summed into one channel by the platform, which the
    server diarizes (MIXED)."""

    encoding: int
    sample_rate: int
    parties: tuple[str, ...] = ("caller",)
    mixed: bool = False

    @property
    def channels(self) -> int:
        return len(self.parties)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample instant across channels: audio must come in multiples."""
        width = 2 if self.encoding == pb.AUDIO_ENCODING_LINEAR16 else 1
        return width * self.channels

    def bytes_per_second(self) -> int:
        return self.frame_bytes * self.sample_rate


@dataclass(frozen=True)
class Identify:
    """The platform named the call: from here on, log lines carry ``call_id`` and ``context``
    (no detection stream yet: AudioSocket names the call before its first audio)."""

    call_id: str
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Start:
    """Open the call's detection stream."""

    call_id: str
    format: AudioFormat


@dataclass(frozen=True)
class Audio:
    """Whole samples of every channel, in the started format."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Dtmf:
    """A key the caller pressed: noted, never logged (callers key in PINs)."""

    digit: str = field(repr=False)


@dataclass(frozen=True)
class Mark:
    """A platform bookkeeping message (Twilio ``mark``): nothing to do."""

    name: str = ""


@dataclass(frozen=True)
class Pause:
    """The platform stopped sending audio on purpose (AudioHook ``paused``): ``silence`` (one
    sample instant of every channel) takes its place at ``rate`` so call time goes on."""

    silence: bytes
    rate: int


@dataclass(frozen=True)
class Resume:
    """Audio comes again: stop filling in silence."""


@dataclass(frozen=True)
class Note:
    """A log line the protocol wants written (never audio, numbers or digits)."""

    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hangup:
    """The platform ended the call: score what came (:meth:`PlatformProtocol.flush` first),
    wait for the last verdicts, deliver the summary."""


@dataclass(frozen=True)
class Dropped:
    """The connection ended without the platform's own goodbye. Ignored when our detector
    had already failed (then we ended the call); else logged as ``event`` (a ``lost`` one
    also counts as a protocol error ``disconnect``), and with ``finish`` the call is still
    scored and summarized as at a hangup."""

    event: str
    level: str = "warning"
    fields: dict[str, Any] = field(default_factory=dict)
    lost: bool = True
    finish: bool = False


@dataclass(frozen=True)
class Send:
    """A reply to write back now."""

    message: Outbound


@dataclass(frozen=True)
class Close:
    """The conversation is over (after the replies before it): close the connection."""


Event = (Identify | Start | Audio | Dtmf | Mark | Pause | Resume | Note | Hangup | Dropped | Send
         | Close | ProtocolViolation)


class Cause(Enum):
    """Why we end a connection ourselves."""

    PROTOCOL = "protocol"  # the platform broke its protocol
    DETECTOR = "detector"  # the detection stream failed
    INTERNAL = "internal"  # our own bug


@dataclass(frozen=True)
class Ending:
    """How a connection ends on our side: ``send`` these, then (``farewell_seconds``) wait
    that long for the platform's own goodbye (:meth:`PlatformProtocol.farewell`), or
    (``linger_seconds``) shut the write side and wait that long before closing, then close
    with ``code``/``reason`` where the transport has them."""

    send: tuple[Outbound, ...] = ()
    code: int = NORMAL
    reason: str = ""
    farewell_seconds: float = 0.0
    linger_seconds: float = 0.0


class PlatformProtocol:
    """One connection of one platform, sans-IO. Subclasses implement :meth:`_receive`."""

    plugin = ""

    def context(self) -> dict[str, Any]:
        """Log fields known before the call is identified (AudioHook's session id)."""
        return {}

    def receive(self, data: Inbound) -> list[Event]:
        """What ``data`` (one read or one message) means, in order; a protocol error comes
        last, as a value."""
        events: list[Event] = []
        try:
            self._receive(data, events)
        except ProtocolViolation as exc:
            events.append(exc)
        return events

    def _receive(self, data: Inbound, events: list[Event]) -> None:
        raise NotImplementedError

    def end_of_input(self, close_code: int | None) -> list[Event]:
        """The platform closed its side (WebSocket ``close_code``, None on TCP)."""
        return []

    def flush(self) -> list[Event]:
        """At a hangup: audio still held back (a lagging track), padded out."""
        return []

    def alert(self, data: dict[str, Any]) -> Outbound | None:
        """The in-band alert message for the platform, or None when it has no in-band
        channel or can no longer take one (closing)."""
        return None

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        """How we end the connection for ``cause``; None when an ending is under way."""
        raise NotImplementedError

    def farewell(self, data: Inbound) -> list[Outbound] | None:
        """While waiting for the platform's goodbye after ours: the replies once it came."""
        return None


class WebSocketProtocol(PlatformProtocol):
    """Platforms whose only goodbye is the WebSocket close frame (Twilio, FreeSWITCH)."""

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        if cause is Cause.PROTOCOL and error is not None:
            return Ending(code=error.code, reason=str(error))
        reason = "detector unavailable" if cause is Cause.DETECTOR else "internal error"
        return Ending(code=INTERNAL_ERROR, reason=reason)


def json_object(data: Inbound) -> dict[str, Any]:
    """A text frame's JSON object, or :class:`ProtocolViolation`."""
    if isinstance(data, bytes):
        raise ProtocolViolation("unexpected_binary", "binary frame where JSON text was expected",
                                UNSUPPORTED_DATA)
    try:
        message = json.loads(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolViolation("malformed", f"not JSON: {exc}", INVALID_PAYLOAD) from exc
    if not isinstance(message, dict):
        raise ProtocolViolation("malformed", "JSON message is not an object", INVALID_PAYLOAD)
    return message


def dumps(message: dict[str, Any]) -> str:
    """A JSON text frame, as aiohttp's ``send_json`` writes it."""
    return json.dumps(message)
