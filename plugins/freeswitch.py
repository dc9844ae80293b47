"""FreeSWITCH mod_audio_fork / mod_audio_stream: the WebSocket server a media bug streams to.

The protocol (metadata, audio frames, the in-band alert) is
:mod:`plugins.protocols.freeswitch`; mod_audio_fork raises the alert frame as a
``mod_audio_fork::json`` custom event, on which an ESL application acts
(docs/platforms/freeswitch.md).
"""

from __future__ import annotations

from aiohttp import web

from plugins.bridge import DetectorLink
from plugins.delivery import in_band
from plugins.protocols.freeswitch import SUBPROTOCOLS, AudioForkProtocol, parse_metadata
from plugins.session import PlatformCall
from plugins.transports import WebSocketTransport

__all__ = ["AudioFork", "parse_metadata"]


class AudioFork:
    def __init__(self, detector: DetectorLink) -> None:
        self.detector = detector

    async def handle(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(protocols=SUBPROTOCOLS)
        await socket.prepare(request)
        protocol, transport = AudioForkProtocol(), WebSocketTransport(socket)
        await PlatformCall(self.detector, protocol, transport, in_band(protocol, transport)).run()
        return socket
