"""The typed events a sans-IO platform protocol returns, and the format a platform announces.

Events are returned in the order they must be acted on (a reply before the stream opens, the
buffered audio before the hangup), and a protocol error is returned as the last event rather
than raised, so that the frames that preceded it in the same read are still acted on, as
they would be had they come one read at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callshield.v1 import detection_pb2 as pb
from plugins.errors import PluginError

# WebSocket close codes (RFC 6455) that the platforms' protocol errors map to
NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011

Outbound = str | bytes  # what to write back, ready for the wire


class ProtocolViolation(PluginError):
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
