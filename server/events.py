"""The admin event feed behind ``WatchCalls``: an in-process bus the sessions publish to.

Why in-process: every call's events are produced here, on the event loop of the server that
holds the stream (the in-process queue and the Redis deployment alike: the Redis workers only
score windows, the verdicts, alerts and summaries are the server's). So a console watches
each server it cares about; a feed does not survive a server restart, and need not: the
calls it described ended with it. A watcher that reconnects gets a snapshot of the calls open
now, then :class:`~callshield.v1.detection_pb2.WatchReady` (with the server's start time, so a
restart is visible), then live events; what it stored survives on its side.

Publishing costs nothing while nobody watches but one dict update per scored window (the
latest verdict per speaker, for the snapshot). A watcher that falls behind by more than
``max_backlog`` events is ended with RESOURCE_EXHAUSTED rather than buffered without bound:
it reconnects and gets a fresh snapshot.

Authorization: ``WatchCalls`` carries the admin token (``--admin-token``), never the stream
token; :class:`server.auth.BearerTokenInterceptor` lets it through to :func:`watch_calls`,
which checks it here. A server without an admin token refuses every watch.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import structlog

from callshield.v1 import detection_pb2 as pb
from server.errors import MAPPED, grpc_status

if TYPE_CHECKING:
    from server.session import Session

WATCH_METHOD = "/callshield.v1.DetectionService/WatchCalls"
ADMIN_METHODS = frozenset({WATCH_METHOD})  # authorized by the admin token, not the stream one
DEFAULT_MAX_BACKLOG = 20_000
log = structlog.get_logger("callshield.events")

_OVERFLOW = object()


def status_name(exc: BaseException | None) -> str:
    """How a call ended, as a gRPC status code name ("OK" when it did not raise)."""
    if exc is None:
        return "OK"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    if isinstance(exc, MAPPED):
        return grpc_status(exc)[0].name
    return "INTERNAL"


class Watcher:
    """One ``WatchCalls`` subscriber: its queue of events, snapshot first."""

    def __init__(self, include_windows: bool, max_backlog: int) -> None:
        self.include_windows = include_windows
        self.max_backlog = max_backlog
        self.queue: asyncio.Queue[pb.WatchCallsResponse | object] = asyncio.Queue()
        self.overflowed = False

    def put(self, event: pb.WatchCallsResponse) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= self.max_backlog:
            self.overflowed = True
            self.queue.put_nowait(_OVERFLOW)
            return
        self.queue.put_nowait(event)

    async def events(self) -> AsyncIterator[pb.WatchCallsResponse]:
        while True:
            item = await self.queue.get()
            if item is _OVERFLOW:
                return
            assert isinstance(item, pb.WatchCallsResponse)
            yield item


class CallFeed:
    """What one call publishes; held by the bus while the call is open."""

    def __init__(self, bus: EventBus, stream_id: str, call_id: str,
                 opened: pb.CallOpened) -> None:
        self.bus = bus
        self.stream_id = stream_id
        self.call_id = call_id
        self.opened = opened
        self.verdicts: dict[str, pb.SpeakerVerdict] = {}  # latest, per speaker (snapshot)
        self.alerts: list[pb.Alert] = []

    def event(self, snapshot: bool = False, **field: object) -> pb.WatchCallsResponse:
        return pb.WatchCallsResponse(stream_id=self.stream_id, call_id=self.call_id,
                                     server_time=time.time(), snapshot=snapshot,
                                     **field)  # type: ignore[arg-type]

    def scored(self, window: pb.WindowResult, verdict: pb.SpeakerVerdict,
               alert: pb.Alert | None) -> None:
        """A window scored (the session's hook): its score, the speaker's running verdict,
        and the alert it raised, if any."""
        self.verdicts[verdict.speaker] = verdict
        if alert is not None:
            self.alerts.append(alert)
        if not self.bus.watchers:
            return
        if any(w.include_windows for w in self.bus.watchers):
            self.bus.publish(self.event(window=window), windows=True)
        self.bus.publish(self.event(verdict=verdict))
        if alert is not None:
            self.bus.publish(self.event(alert=alert))

    def summary(self, summary: pb.StreamSummary) -> None:
        if self.bus.watchers:
            self.bus.publish(self.event(summary=summary))

    def close(self, status: str) -> None:
        self.bus.calls.pop(self.stream_id, None)
        if self.bus.watchers:
            self.bus.publish(self.event(closed=pb.CallClosed(status=status)))


class EventBus:
    """Every call of this server, published to every ``WatchCalls`` subscriber."""

    def __init__(self, model: str, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self.model = model
        self.max_backlog = max_backlog
        self.started_at = time.time()
        self.calls: dict[str, CallFeed] = {}
        self.watchers: set[Watcher] = set()

    def publish(self, event: pb.WatchCallsResponse, windows: bool = False) -> None:
        for watcher in self.watchers:
            if windows and not watcher.include_windows:
                continue
            watcher.put(event)

    def open(self, session: Session, rpc: str) -> CallFeed:
        """Register a call as it opens and announce it."""
        s = session.settings
        opened = pb.CallOpened(
            platform=s.platform, speakers=list(session.attributor.speakers),
            channel_mode=pb.CHANNEL_MODE_SPLIT if s.split else pb.CHANNEL_MODE_MIXED,
            alert_threshold=s.alert_threshold, model=self.model, rpc=rpc,
            opened_at=time.time())
        feed = CallFeed(self, session.stream_id, s.call_id, opened)
        self.calls[session.stream_id] = feed
        if self.watchers:
            self.publish(feed.event(opened=opened))
        return feed

    def subscribe(self, include_windows: bool) -> Watcher:
        """A new watcher, its queue primed with the snapshot and the ready marker."""
        watcher = Watcher(include_windows, self.max_backlog)
        for feed in self.calls.values():
            watcher.put(feed.event(snapshot=True, opened=feed.opened))
            for verdict in feed.verdicts.values():
                watcher.put(feed.event(snapshot=True, verdict=verdict))
            for alert in feed.alerts:
                watcher.put(feed.event(snapshot=True, alert=alert))
        watcher.put(pb.WatchCallsResponse(server_time=time.time(), ready=pb.WatchReady(
            open_calls=len(self.calls), server_started_at=self.started_at)))
        self.watchers.add(watcher)
        return watcher

    async def relay(self, session: Session, rpc: str,
                    responses: AsyncIterator[pb.StreamDetectResponse],
                    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Pass a session's responses through, publishing the call's open, summary and
        close; the session publishes its scored windows through ``session.on_scored``."""
        feed = self.open(session, rpc)
        session.on_scored = feed.scored
        error: BaseException | None = None
        try:
            async for response in responses:
                if response.HasField("summary"):
                    feed.summary(response.summary)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            feed.close(status_name(error))


def authorized(context: grpc.aio.ServicerContext, admin_token: str) -> bool:
    """Whether the call carries ``authorization: Bearer <admin token>``."""
    if not admin_token:
        return False
    given = dict(context.invocation_metadata() or ()).get("authorization", "")
    given_bytes = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given_bytes, f"Bearer {admin_token}".encode())


async def watch_calls(bus: EventBus, admin_token: str, request: pb.WatchCallsRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchCallsResponse]:
    """The body of ``WatchCalls``: the admin token checked, then the bus's events until the
    client goes away (or falls too far behind: RESOURCE_EXHAUSTED, it reconnects)."""
    if not admin_token:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            "WatchCalls is disabled: the server has no --admin-token")
    if not authorized(context, admin_token):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "WatchCalls needs 'authorization: Bearer <admin token>' metadata")
    watcher = bus.subscribe(request.include_windows)
    log.info("watch open", watchers=len(bus.watchers), open_calls=len(bus.calls))
    try:
        async for event in watcher.events():
            yield event
    finally:
        bus.watchers.discard(watcher)
        log.info("watch closed", watchers=len(bus.watchers), overflowed=watcher.overflowed)
    if watcher.overflowed:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"watcher fell {bus.max_backlog} events behind; reconnect")
