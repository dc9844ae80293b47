"""``python -m plugins serve``: every configured plugin in one process, beside the server.

Flags and settings: :mod:`plugins.config`. The process imports nothing from ``server``: its
logs are set up by :mod:`callshield.logs`, its ``/metrics`` carries the plugins' own series
(:mod:`plugins.metrics`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import structlog

from callshield import logs
from plugins import metrics
from plugins.app import start_plugins
from plugins.bridge import DetectorLink
from plugins.config import PluginSettings, parser, settings_from


async def serve(settings: PluginSettings, detector: DetectorLink, metrics_port: int) -> None:
    log = structlog.get_logger("callshield.plugins")
    if metrics_port:
        metrics.serve(metrics_port)
    running = await start_plugins(settings, detector)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping plugins")
    await running.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings, detector = settings_from(args)
    except ValueError as exc:  # a malformed listener, network or port range: a usage error
        parser().error(str(exc))
    logs.configure(args.log_level)
    if not any((settings.audiosocket, settings.twilio, settings.freeswitch, settings.audiohook,
                settings.siprec.listen)):
        parser().error("enable at least one of --audiosocket --twilio --freeswitch --audiohook"
                       " --siprec")
    asyncio.run(serve(settings, detector, args.metrics_port))


if __name__ == "__main__":
    main()
