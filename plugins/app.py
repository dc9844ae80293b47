"""Starting and stopping the plugins: one TCP server for AudioSocket, and one aiohttp server
per HTTP port for the WebSocket plugins, which share a port by path (``:8080/twilio``,
``:8080/fork``, ``:8080/audiohook``); the SIPREC server on its own ports. What to start:
:class:`plugins.config.PluginSettings`."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from plugins.addresses import parse_hostport, parse_listen_path
from plugins.audiohook import AudioHookServer
from plugins.audiosocket import AudioSocketServer
from plugins.bridge import DetectorLink
from plugins.config import PluginSettings
from plugins.freeswitch import AudioFork
from plugins.siprec.server import SiprecServer
from plugins.twilio import TwilioMediaStreams

log = structlog.get_logger("callshield.plugins")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RunningPlugins:
    detector: DetectorLink
    audiosocket: asyncio.Server | None
    audiosocket_handler: AudioSocketServer | None
    runners: list[web.AppRunner]
    ports: dict[str, int]  # plugin name -> bound port (port 0 picks a free one)
    siprec: SiprecServer | None = None

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, give calls in progress ``grace_seconds`` to end, close the rest."""
        if self.siprec is not None:  # recordings end at once: BYE, then their summaries
            await self.siprec.stop()
        if self.audiosocket is not None:
            self.audiosocket.close()
        await self.detector.wait_idle(grace_seconds)
        if self.audiosocket is not None and self.audiosocket_handler is not None:
            self.audiosocket.close()
            self.audiosocket_handler.close_connections()
            await self.audiosocket.wait_closed()
        for runner in self.runners:
            await runner.cleanup()
        await self.detector.drain()


async def start_plugins(settings: PluginSettings, detector: DetectorLink) -> RunningPlugins:
    ports: dict[str, int] = {}
    audiosocket = handler = None
    if settings.audiosocket:
        host, port = parse_hostport(settings.audiosocket)
        handler = AudioSocketServer(detector, alerts=settings.asterisk_alerts,
                                    slin_types=settings.slin_types,
                                    allow=settings.audiosocket_allow)
        audiosocket = await handler.start(host, port)
        ports["audiosocket"] = audiosocket.sockets[0].getsockname()[1]
    routes: dict[tuple[str, int], list[tuple[str, str, Handler]]] = defaultdict(list)
    handlers: dict[str, tuple[str, Handler]] = {}
    if settings.twilio:
        handlers["twilio"] = (settings.twilio,
                              TwilioMediaStreams(detector, settings.twilio_settings).handle)
    if settings.freeswitch:
        handlers["freeswitch"] = (settings.freeswitch, AudioFork(detector).handle)
    if settings.audiohook:
        handlers["audiohook"] = (settings.audiohook,
                                 AudioHookServer(detector, settings.audiohook_api_key,
                                                 settings.audiohook_client_secret).handle)
    for name, (listen, route) in handlers.items():
        host, port, path = parse_listen_path(listen)
        routes[(host, port)].append((name, path, route))
    runners = []
    for (host, port), entries in routes.items():
        app = web.Application()
        for _name, path, route in entries:
            app.router.add_get(path, route)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        runners.append(runner)
        bound = runner.addresses[-1][1]
        for name, path, _handler in entries:
            ports[name] = bound
            log.info("plugin listening", plugin=name, host=host, port=bound, path=path)
    if audiosocket is not None:
        log.info("plugin listening", plugin="audiosocket", port=ports["audiosocket"])
    siprec = None
    if settings.siprec.listen:
        host, port = parse_hostport(settings.siprec.listen)
        siprec = SiprecServer(detector, settings.siprec)
        ports["siprec"] = await siprec.start(host, port)
        log.info("plugin listening", plugin="siprec", host=host, port=ports["siprec"],
                 transports="udp+tcp", rtp_ports="-".join(map(str, settings.siprec.rtp_ports)))
    return RunningPlugins(detector, audiosocket, handler, runners, ports, siprec)
