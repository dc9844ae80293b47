"""Asterisk AudioSocket: a TCP server Asterisk dials from ``AudioSocket()`` or the channel driver.

Frames are ``type (1 byte) | payload length (2 bytes, big-endian) | payload``: 0x00 hangup,
0x01 the stream's UUID (16 bytes, always first), 0x03 a DTMF digit, 0x10 signed linear 16-bit
little-endian 8 kHz mono, 0xff error. Newer Asterisk releases number their higher-rate slin
types differently (16 kHz is 0x11 in some, 0x12 in others), so extra types come from
configuration (``slin_types``); 0x10 is always accepted, anything else closes the connection
with an error frame and a log line. AudioSocket carries the channel's one (mixed) stream, so
it is scored as one party, ``caller``. Alerts go back as channel variables
(:mod:`plugins.asterisk`).
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import structlog

from callshield.v1 import detection_pb2 as pb
from plugins import metrics
from plugins.asterisk import AmiTarget
from plugins.core import (
    AudioFormat,
    CallBridge,
    DetectorGone,
    DetectorLink,
    ProtocolError,
    SpoofAlert,
)

PLUGIN = "audiosocket"
HANGUP, UUID, DTMF, SLIN, ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF
LINGER_SECONDS = 0.5  # after a last frame, before closing (see _Call.close)
DEFAULT_SLIN_TYPES: Mapping[int, int] = {SLIN: 8000}
IDLE_SECONDS = 10.0  # Asterisk sends 20 ms frames all call long; silence this long is a fault
log = structlog.get_logger("callshield.plugins.audiosocket")


def parse_networks(value: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """``"10.0.0.0/8,192.0.2.7"`` -> networks (a bare address is a /32 or /128)."""
    return tuple(ip_network(part.strip(), strict=False) for part in value.split(",")
                 if part.strip())


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


def parse_slin_types(spec: str) -> dict[int, int]:
    """``"0x11=16000,0x12=24000"`` -> {0x11: 16000, 0x12: 24000}, plus 0x10 = 8000 always."""
    types = dict(DEFAULT_SLIN_TYPES)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, rate = item.partition("=")
        types[int(kind, 0)] = int(rate)
    types[SLIN] = 8000
    return types


class AudioSocketServer:
    def __init__(
        self, detector: DetectorLink, *, alerts: AmiTarget | None = None,
        slin_types: Mapping[int, int] = DEFAULT_SLIN_TYPES, idle_seconds: float = IDLE_SECONDS,
        allow: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.detector = detector
        self.alerts = alerts
        self.slin_types = {**slin_types, SLIN: 8000}
        self.idle_seconds = idle_seconds
        self.allow = tuple(allow)  # empty: any source that can reach the listener
        self.connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port)

    def close_connections(self) -> None:
        """At shutdown (``Server.close`` leaves accepted connections open before 3.13)."""
        for writer in list(self.connections):
            writer.close()

    def allowed(self, writer: asyncio.StreamWriter) -> bool:
        """AudioSocket has no authentication: the source address is all there is to check."""
        if not self.allow:
            return True
        peer = writer.get_extra_info("peername")
        try:
            address = ip_address(peer[0]) if peer else None
        except ValueError:
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address is not None and any(address in net for net in self.allow)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Asterisk channel; every failure ends here, so other calls never see it."""
        if not self.allowed(writer):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "source").inc()
            log.warning("connection refused: source not in --audiosocket-allow",
                        source=str((writer.get_extra_info("peername") or ("?",))[0]))
            writer.close()
            return
        call = _Call(self, reader, writer)
        self.connections.add(writer)
        try:
            await call.run()
        except ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, exc.reason).inc()
            call.log.warning("protocol error", reason=exc.reason, detail=str(exc))
            await call.close(frame(ERROR))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if call.bridge is None or call.bridge.failed is None:  # else: we hung up
                metrics.PROTOCOL_ERRORS.labels(PLUGIN, "disconnect").inc()
                call.log.warning("connection lost", error=type(exc).__name__)
            await call.close()
        except DetectorGone:
            await call.close(frame(HANGUP))
        except Exception:
            call.log.exception("internal error")
            await call.close(frame(ERROR))
        finally:
            self.connections.discard(writer)
            if call.bridge is not None:
                await call.bridge.abort("connection closed")


class _Call:
    def __init__(
        self, server: AudioSocketServer, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.uuid: str | None = None
        self.rate: int | None = None
        self.bridge: CallBridge | None = None
        self.closed = False
        self.log = log.bind(call_id=None)

    async def _read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(self.server.idle_seconds):
            kind, length = struct.unpack(">BH", await self.reader.readexactly(3))
            try:
                payload = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise ProtocolError("length", f"frame type {kind:#04x} announced {length} bytes, "
                                    f"connection ended after {len(exc.partial)}") from exc
        return kind, payload

    async def run(self) -> None:
        while True:
            try:
                kind, payload = await self._read_frame()
            except TimeoutError as exc:
                raise ProtocolError("idle", f"no frame for {self.server.idle_seconds} s") from exc
            except asyncio.IncompleteReadError as exc:
                if exc.partial or self.bridge is None:
                    raise
                # Asterisk ends every call, normal or not, by closing the socket without a
                # 0x00 frame: after audio, a clean close (FIN) is a hangup. The summary is
                # delivered as for an explicit hangup. (A reset raises ConnectionError.)
                self.log.info("hangup", how="socket closed")
                await self.bridge.finish()
                await self.close()
                return
            if kind == HANGUP:
                self.log.info("hangup")
                if self.bridge is not None:
                    await self.bridge.finish()
                await self.close()
                return
            if kind == ERROR:
                code = payload[0] if payload else None
                self.log.warning("asterisk error frame", code=code)
                if self.bridge is not None:
                    await self.bridge.finish()
                await self.close()
                return
            if kind == UUID:
                self._on_uuid(payload)
            elif kind == DTMF:
                if len(payload) != 1:
                    raise ProtocolError("length", f"DTMF frame of {len(payload)} bytes")
                # digits are not logged: callers key in account numbers and PINs
            elif kind in self.server.slin_types:
                self._on_audio(kind, payload)
            else:
                raise ProtocolError("unknown_type", f"unknown frame type {kind:#04x}")

    def _on_uuid(self, payload: bytes) -> None:
        if len(payload) != 16:
            raise ProtocolError("length", f"UUID frame of {len(payload)} bytes (16 expected)")
        if self.uuid is not None:
            raise ProtocolError("sequence", "a second UUID frame")
        self.uuid = str(uuid.UUID(bytes=payload))
        self.log = log.bind(call_id=self.uuid)

    def _on_audio(self, kind: int, payload: bytes) -> None:
        if self.uuid is None:
            raise ProtocolError("sequence", "audio before the UUID frame")
        if not payload or len(payload) % 2:
            raise ProtocolError("length", f"slin frame of {len(payload)} bytes (odd or empty)")
        rate = self.server.slin_types[kind]
        if self.bridge is None:
            self.rate = rate
            self.bridge = self.server.detector.open_call(
                PLUGIN, self.uuid, AudioFormat(pb.AUDIO_ENCODING_LINEAR16, rate, ("caller",)),
                deliver=self._deliver, on_failure=self._on_failure)
        elif rate != self.rate:
            raise ProtocolError("format", f"sample rate changed from {self.rate} to {rate}")
        self.bridge.feed(payload)

    async def _deliver(self, alert: SpoofAlert) -> None:
        if self.server.alerts is None:
            return
        assert self.uuid is not None
        await self.server.alerts.set_alert(self.uuid, alert)

    async def _on_failure(self, reason: str) -> None:
        """Detector gone: hang the AudioSocket up so the dialplan goes on without us."""
        await self.close(frame(HANGUP))

    async def close(self, last: bytes = b"") -> None:
        """Close, sending ``last`` (hangup or error frame) first. After that frame the write
        side is shut (FIN) and the socket lingers briefly before closing: Asterisk keeps
        streaming audio until it reads the frame, and closing a socket with unread input
        makes the kernel send a reset, which can destroy the frame before Asterisk reads it.
        Once only: a detector failure can race the call's own end."""
        if self.closed or self.writer.is_closing():
            return
        self.closed = True
        with suppress(ConnectionError, OSError):
            if last:
                self.writer.write(last)
                await self.writer.drain()
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                await asyncio.sleep(LINGER_SECONDS)
        self.writer.close()
        with suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
