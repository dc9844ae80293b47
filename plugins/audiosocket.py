"""Asterisk AudioSocket: the TCP server Asterisk dials from ``AudioSocket()`` or the channel
driver.

The protocol (frames, slin types, what a close means) is :mod:`plugins.protocols.audiosocket`;
this module accepts connections (AudioSocket has no authentication: the source address is
all there is to check), and sends alerts back as channel variables over AMI
(:mod:`plugins.asterisk`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import structlog

from plugins import metrics
from plugins.addresses import Network, allowed
from plugins.asterisk import AmiTarget
from plugins.bridge import DetectorLink
from plugins.delivery import SpoofAlert
from plugins.protocols.audiosocket import (
    DEFAULT_SLIN_TYPES,
    SLIN,
    AudioSocketProtocol,
    parse_slin_types,
)
from plugins.session import PlatformCall
from plugins.transports import TcpTransport

__all__ = ["IDLE_SECONDS", "AudioSocketServer", "parse_slin_types"]

PLUGIN = AudioSocketProtocol.plugin
IDLE_SECONDS = 10.0  # Asterisk sends 20 ms frames all call long; silence this long is a fault
log = structlog.get_logger("callshield.plugins.audiosocket")


class AudioSocketServer:
    def __init__(
        self, detector: DetectorLink, *, alerts: AmiTarget | None = None,
        slin_types: Mapping[int, int] = DEFAULT_SLIN_TYPES, idle_seconds: float = IDLE_SECONDS,
        allow: Sequence[Network] = (),
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
        return bool(peer) and allowed(self.allow, peer[0])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Asterisk channel."""
        if not self.allowed(writer):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "source").inc()
            log.warning("connection refused: source not in --audiosocket-allow",
                        source=str((writer.get_extra_info("peername") or ("?",))[0]))
            writer.close()
            return
        protocol = AudioSocketProtocol(self.slin_types)

        async def set_variables(alert: SpoofAlert) -> None:
            if self.alerts is not None and protocol.uuid is not None:
                await self.alerts.set_alert(protocol.uuid, alert)

        call = PlatformCall(self.detector, protocol,
                            TcpTransport(reader, writer, self.idle_seconds), set_variables)
        self.connections.add(writer)
        try:
            await call.run()
        finally:
            self.connections.discard(writer)
