"""One platform connection from accept to close: the protocol's events acted on, and the one
error ladder every platform and transport shares.

The transport (:mod:`plugins.transports`) reads; the platform's sans-IO protocol
(:mod:`plugins.protocols`) says what was read means; :class:`PlatformCall` acts on it: it
opens the call's detection stream (:class:`plugins.bridge.CallBridge`), feeds it, writes the
protocol's replies, finishes the call at a hangup, and ends the connection. Every failure of
one connection ends in :meth:`PlatformCall.run` (never in the server or another call), as:

- a protocol error: counted by reason, logged, and the platform's way of refusing (an
  AudioSocket error frame, a WebSocket close code, an AudioHook ``disconnect``);
- the connection lost (reset, or closed without the platform's goodbye): counted and logged,
  unless we had ended the call ourselves;
- the detector gone (the stream failed, or stopped reading): the platform's way of ending the
  fork while the call goes on (a hangup frame, close 1011, ``disconnect``), also when the
  bridge fails between two reads (:meth:`PlatformCall.on_failure`);
- anything else: our bug, logged with its traceback, and the platform's error ending.

Whichever way it ends, the call's detection stream is dropped at once unless the call
finished normally.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Protocol

import structlog

from plugins import metrics
from plugins.bridge import CallBridge, DetectorGone, DetectorLink
from plugins.delivery import AlertSink
from plugins.protocols import events as ev
from plugins.protocols.base import Cause, Ending, Inbound, PlatformProtocol
from plugins.protocols.events import Outbound, ProtocolViolation

FILL_STEP_SECONDS = 0.2  # how often silence catches up with the clock during a pause


class Transport(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def close_code(self) -> int | None: ...

    def heard(self) -> None: ...

    async def receive(self) -> Inbound | None: ...

    async def send(self, message: Outbound) -> None: ...

    async def close(self, code: int = ..., reason: str = ..., last: tuple[Outbound, ...] = ...,
                    linger_seconds: float = ...) -> None: ...


class PlatformCall:
    """One platform connection. ``deliver`` is the platform's back channel for alerts."""

    def __init__(self, detector: DetectorLink, protocol: PlatformProtocol,
                 transport: Transport, deliver: AlertSink | None = None) -> None:
        self.detector = detector
        self.protocol = protocol
        self.transport = transport
        self.deliver = deliver
        self.plugin = protocol.plugin
        self.bridge: CallBridge | None = None
        self.filler: asyncio.Task[None] | None = None  # silence while the platform pauses
        self._ending = False  # we are ending the connection (once only)
        self._base = structlog.get_logger(f"callshield.plugins.{self.plugin}")
        self.log = self._base.bind(call_id=None, **protocol.context())

    async def run(self) -> None:
        """Run the connection to its end: the error ladder. A call that did not finish
        normally is aborted with the cause that ended it (the detector's failure, the
        protocol error, the lost connection), not with the close that followed it."""
        cause = "connection closed without a hangup"
        try:
            await self._serve()
        except ProtocolViolation as exc:
            cause = f"protocol error: {exc.reason}"
            metrics.PROTOCOL_ERRORS.labels(self.plugin, exc.reason).inc()
            self.log.warning("protocol error", reason=exc.reason, detail=str(exc))
            await self.end(self.protocol.ending(Cause.PROTOCOL, exc))
        except ConnectionError as exc:
            cause = f"connection lost: {type(exc).__name__}"
            await self._dropped(ev.Dropped("connection lost", fields={"error": type(exc).__name__}))
            await self.end(Ending())
        except DetectorGone as exc:
            cause = str(exc)
            await self.end(self.protocol.ending(Cause.DETECTOR))
        except Exception as exc:
            cause = f"internal error: {type(exc).__name__}"
            self.log.exception("internal error")
            await self.end(self.protocol.ending(Cause.INTERNAL))
        finally:
            if self.filler is not None:
                self.filler.cancel()
            if self.bridge is not None:
                # the detector's failure is the cause even when the platform's close of the
                # fork we ended is what the read loop saw last
                await self.bridge.abort(self.bridge.failed or cause)

    async def _serve(self) -> None:
        while (data := await self.transport.receive()) is not None:
            events = self.protocol.receive(data)
            if events:
                self.transport.heard()
            if await self._apply(events):
                await self.transport.close()  # the conversation is over: close now
                return
        if not await self._apply(self.protocol.end_of_input(self.transport.close_code)):
            await self.end(Ending())
        else:
            await self.transport.close()

    async def _apply(self, events: list[ev.Event]) -> bool:
        """Act on ``events`` in order; True when the protocol's conversation is over."""
        for event in events:
            if isinstance(event, ev.Audio):
                assert self.bridge is not None, "audio before the stream opened"
                self.bridge.feed(event.data)
            elif isinstance(event, ev.Send):
                await self.transport.send(event.message)
            elif isinstance(event, ev.Identify):
                self.log = self._base.bind(call_id=event.call_id, **event.context)
            elif isinstance(event, ev.Start):
                self.bridge = self.detector.open_call(
                    self.plugin, event.call_id, event.format, deliver=self.deliver,
                    on_failure=self.on_failure)
            elif isinstance(event, ev.Note):
                getattr(self.log, event.level)(event.event, **event.fields)
            elif isinstance(event, ev.Hangup):
                await self._hangup()
            elif isinstance(event, ev.Dropped):
                await self._dropped(event)
            elif isinstance(event, ev.Pause):
                if self.bridge is not None and self.filler is None:
                    self.filler = asyncio.create_task(self._fill(self.bridge, event))
            elif isinstance(event, ev.Resume):
                if self.filler is not None:
                    self.filler.cancel()
                    self.filler = None
            elif isinstance(event, ProtocolViolation):
                raise event
            elif isinstance(event, ev.Close):
                return True
        return False

    async def _hangup(self) -> None:
        if self.bridge is not None:
            await self._apply(self.protocol.flush())
            await self.bridge.finish()

    async def _dropped(self, event: ev.Dropped) -> None:
        if self.bridge is not None and self.bridge.failed is not None:
            return  # we ended the call (detector gone): its close is no news
        if event.lost:
            metrics.PROTOCOL_ERRORS.labels(self.plugin, "disconnect").inc()
        getattr(self.log, event.level)(event.event, **event.fields)
        if event.finish:
            await self._hangup()

    async def on_failure(self, reason: str) -> None:
        """The detector failed between two reads: end the fork, the call itself goes on."""
        if not self.transport.closed:
            await self.end(self.protocol.ending(Cause.DETECTOR), reading=True)

    async def end(self, ending: Ending | None, *, reading: bool = False) -> None:
        """End the connection our way (once; ``None``: a goodbye is already under way). A
        farewell is read here unless the read loop still runs (``reading``), which then
        answers the platform's goodbye itself."""
        if self._ending or self.transport.closed:
            return
        self._ending = True
        ending = ending or Ending()
        if not ending.farewell_seconds:
            await self.transport.close(ending.code, ending.reason, ending.send,
                                       ending.linger_seconds)
            return
        with suppress(TimeoutError, ConnectionError, RuntimeError):
            for message in ending.send:
                await self.transport.send(message)
            if reading:
                await asyncio.sleep(ending.farewell_seconds)
            else:
                async with asyncio.timeout(ending.farewell_seconds):
                    await self._farewell()
        await self.transport.close(ending.code, ending.reason)

    async def _farewell(self) -> None:
        while (data := await self.transport.receive()) is not None:
            replies = self.protocol.farewell(data)
            if replies is not None:
                for message in replies:
                    await self.transport.send(message)
                return

    async def _fill(self, bridge: CallBridge, pause: ev.Pause) -> None:
        """The platform sends no audio while paused (a card number read out, say): silence
        takes its place in real time, so call time stays wall time and the detector's idle
        timeout never ends the stream in a long pause."""
        start, filled = time.monotonic(), 0  # samples, caught up with the clock each step
        with suppress(DetectorGone):
            while True:
                await asyncio.sleep(FILL_STEP_SECONDS)
                due = int((time.monotonic() - start) * pause.rate) - filled
                bridge.feed(pause.silence * due)
                filled += due
