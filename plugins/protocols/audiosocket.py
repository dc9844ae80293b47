"""Asterisk AudioSocket, sans-IO: bytes read off the TCP socket in, events out.

Frames are ``type (1 byte) | payload length (2 bytes, big-endian) | payload``: 0x00 hangup,
0x01 the stream's UUID (16 bytes, always first), 0x03 a DTMF digit, 0x10 signed linear 16-bit
little-endian 8 kHz mono, 0xff error. Newer Asterisk releases number their higher-rate slin
types differently (16 kHz is 0x11 in some, 0x12 in others), so extra types come from
configuration (``slin_types``); 0x10 is always accepted, anything else is a protocol error
(answered with an error frame). AudioSocket carries the channel's one (mixed) stream, so it
is scored as one party, ``caller``. Asterisk ends every call, normal or not, by closing the
socket without a 0x00 frame: after audio, a clean close is a hangup.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping

from callshield.v1 import detection_pb2 as pb
from plugins.protocols import events as ev
from plugins.protocols.base import Cause, Ending, Inbound, PlatformProtocol
from plugins.protocols.events import AudioFormat, ProtocolViolation

HANGUP, UUID, DTMF, SLIN, ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF
HEADER = struct.Struct(">BH")
LINGER_SECONDS = 0.5  # after our last frame, before closing (see plugins.transports)
DEFAULT_SLIN_TYPES: Mapping[int, int] = {SLIN: 8000}


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def parse_slin_types(spec: str) -> dict[int, int]:
    """``"0x11=16000,0x12=24000"`` -> {0x11: 16000, 0x12: 24000}, plus 0x10 = 8000 always."""
    types = dict(DEFAULT_SLIN_TYPES)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, rate = item.partition("=")
        types[int(kind, 0)] = int(rate)
    types[SLIN] = 8000
    return types


class AudioSocketProtocol(PlatformProtocol):
    """One AudioSocket connection: every complete frame gives at least one event (the
    transport's idle timeout counts frames, not bytes)."""

    plugin = "audiosocket"

    def __init__(self, slin_types: Mapping[int, int] = DEFAULT_SLIN_TYPES) -> None:
        self.slin_types = {**slin_types, SLIN: 8000}
        self.uuid: str | None = None
        self.rate: int | None = None  # set by the first audio frame: the stream is open
        self._buffer = bytearray()
        self._over = False  # hangup or error frame seen: the rest is not read

    def _receive(self, data: Inbound, events: list[ev.Event]) -> None:
        if self._over:
            return
        self._buffer += data if isinstance(data, bytes) else data.encode()
        while len(self._buffer) >= HEADER.size and not self._over:
            kind, length = HEADER.unpack_from(self._buffer)
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            self._frame(kind, payload, events)

    def _frame(self, kind: int, payload: bytes, events: list[ev.Event]) -> None:
        if kind == HANGUP:
            self._over = True
            events += [ev.Note("hangup"), ev.Hangup(), ev.Close()]
        elif kind == ERROR:
            self._over = True
            code = payload[0] if payload else None
            note = ev.Note("asterisk error frame", "warning", {"code": code})
            events += [note, ev.Hangup(), ev.Close()]
        elif kind == UUID:
            if len(payload) != 16:
                raise ProtocolViolation("length",
                                        f"UUID frame of {len(payload)} bytes (16 expected)")
            if self.uuid is not None:
                raise ProtocolViolation("sequence", "a second UUID frame")
            self.uuid = str(uuid.UUID(bytes=payload))
            events.append(ev.Identify(self.uuid))
        elif kind == DTMF:
            if len(payload) != 1:
                raise ProtocolViolation("length", f"DTMF frame of {len(payload)} bytes")
            events.append(ev.Dtmf(payload.decode("latin-1")))
        elif kind in self.slin_types:
            events += self._audio(kind, payload)
        else:
            raise ProtocolViolation("unknown_type", f"unknown frame type {kind:#04x}")

    def _audio(self, kind: int, payload: bytes) -> list[ev.Event]:
        if self.uuid is None:
            raise ProtocolViolation("sequence", "audio before the UUID frame")
        if not payload or len(payload) % 2:
            raise ProtocolViolation("length",
                                    f"slin frame of {len(payload)} bytes (odd or empty)")
        rate = self.slin_types[kind]
        if self.rate is None:
            self.rate = rate
            fmt = AudioFormat(pb.AUDIO_ENCODING_LINEAR16, rate, ("caller",))
            return [ev.Start(self.uuid, fmt), ev.Audio(payload)]
        if rate != self.rate:
            raise ProtocolViolation("format", f"sample rate changed from {self.rate} to {rate}")
        return [ev.Audio(payload)]

    def end_of_input(self, close_code: int | None) -> list[ev.Event]:
        if self._over:
            return []
        if len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            return [ProtocolViolation(
                "length", f"frame type {kind:#04x} announced {length} bytes, connection ended "
                f"after {len(self._buffer) - HEADER.size}")]
        if self._buffer or self.rate is None:
            return [ev.Dropped("connection lost", fields={"error": "IncompleteReadError"})]
        return [ev.Note("hangup", fields={"how": "socket closed"}), ev.Hangup()]

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        """Detector gone: a hangup frame, so the dialplan goes on without us; anything else:
        an error frame."""
        last = frame(HANGUP) if cause is Cause.DETECTOR else frame(ERROR)
        return Ending(send=(last,), linger_seconds=LINGER_SECONDS)
