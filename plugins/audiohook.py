"""Genesys Cloud AudioHook (protocol version 2): the WebSocket server an AudioHook integration
connects to.

The messages (``open``/``opened``, audio, ``paused``, ``close``/``closed``, ``disconnect``,
the in-band alert ``event``) are :mod:`plugins.protocols.audiohook`; this module checks the
upgrade request. Its ``X-API-KEY`` header must match the configured key; with a client secret
configured, the request must also carry a valid HTTP message signature
(:mod:`plugins.httpsig`), and the ``organizationId`` of ``open`` must match the signed
``Audiohook-Organization-Id``. A refused upgrade gets 401 after ``FAILURE_DELAY_SECONDS``
(as Genesys' reference server, so timing tells an attacker nothing). Alerts go back in band
and through the webhook.
"""

from __future__ import annotations

import asyncio
import hmac

import structlog
from aiohttp import web

from plugins import metrics
from plugins.bridge import DetectorLink
from plugins.delivery import in_band
from plugins.httpsig import Verifier
from plugins.protocols.audiohook import AudioHookProtocol
from plugins.session import PlatformCall
from plugins.transports import WebSocketTransport

PLUGIN = AudioHookProtocol.plugin
FAILURE_DELAY_SECONDS = 0.5
log = structlog.get_logger("callshield.plugins.audiohook")


class AudioHookServer:
    def __init__(self, detector: DetectorLink, api_key: str = "", client_secret: str = "") -> None:
        self.detector = detector
        self.api_key = api_key
        self.verifier = Verifier(client_secret) if client_secret else None

    def refusal(self, request: web.Request) -> str | None:
        """Why the upgrade is refused (for the log), or None."""
        if self.api_key and not hmac.compare_digest(
                request.headers.get("X-API-KEY", ""), self.api_key):
            return "bad X-API-KEY"
        if self.verifier is not None:
            problem = self.verifier.verify(request.headers, request.path_qs)
            if problem is not None:
                return f"bad signature: {problem}"
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        refusal = self.refusal(request)
        if refusal is not None:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "unauthorized").inc()
            log.warning("upgrade refused", reason=refusal,
                        session_id=request.headers.get("Audiohook-Session-Id", ""))
            await asyncio.sleep(FAILURE_DELAY_SECONDS)
            return web.Response(status=401, text="unauthorized")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        organization = ""
        if self.verifier is not None:
            organization = request.headers.get("Audiohook-Organization-Id", "")
        protocol = AudioHookProtocol(request.headers.get("Audiohook-Session-Id", ""),
                                     organization)
        transport = WebSocketTransport(socket)
        await PlatformCall(self.detector, protocol, transport, in_band(protocol, transport)).run()
        return socket
