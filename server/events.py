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

Flagged audio: a console may keep the audio of each alert's range for its analysts
(``WatchCallsRequest.flagged_audio_seconds``). The feed sends it only when the server was
started with ``--feed-flagged-audio SECONDS``: audio leaves the server only where its operator
allowed it, and only to the admin token. Only then does each call keep the last SECONDS
(plus the windows still queued behind the reader) of every speaker's audio, 16-bit at the
model's rate (about 32 KB a second per speaker at 16 kHz), in :class:`AudioTap`; each alert's
cut is held with the call while it is open (a console reconnecting mid-call gets it in the
snapshot) and dropped with it.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
import structlog

from callshield.v1 import detection_pb2 as pb
from server.errors import MAPPED, grpc_status

if TYPE_CHECKING:
    from server.lanes import Lanes
    from server.session import Session
    from server.speakers import SpeakerAudio

WATCH_METHOD = "/callshield.v1.DetectionService/WatchCalls"
RELOAD_METHOD = "/callshield.v1.DetectionService/ReloadModel"  # server/reload.py
# authorized by the admin token, not the stream one
ADMIN_METHODS = frozenset({WATCH_METHOD, RELOAD_METHOD})
DEFAULT_MAX_BACKLOG = 20_000
MAX_FLAGGED_AUDIO_SECONDS = 60.0  # 1.9 MB of 16 kHz PCM: well inside gRPC's 4 MB message
# audio the reader may have attributed past a window before that window is scored (its
# in-flight windows, up to 8 hops, plus a window): kept beyond the cap so a cut is whole
TAP_MARGIN_SECONDS = 30.0
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


class AudioTap:
    """The last ``keep_seconds`` of each speaker's audio in one call, as 16-bit PCM with its
    call-time sample index; key ``""`` holds the call's mix (a diarized call's speakers
    share one signal, kept once)."""

    def __init__(self, sample_rate: int, keep_seconds: float) -> None:
        self.sample_rate = sample_rate
        self.keep = int(keep_seconds * sample_rate)
        self.rings: dict[str, deque[tuple[int, np.ndarray]]] = {}

    def add(self, key: str, start: int, audio: np.ndarray) -> None:
        """Keep ``audio`` (float32 in [-1, 1]) heard from call-time sample ``start`` on."""
        pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
        ring = self.rings.setdefault(key, deque())
        ring.append((start, pcm))
        end = start + pcm.shape[0]
        while ring and ring[0][0] + ring[0][1].shape[0] <= end - self.keep:
            ring.popleft()

    def cut(self, key: str, start: int, end: int) -> tuple[int, np.ndarray]:
        """Samples ``[start, end)`` of ``key`` (or of the mix), silence where the speaker
        was not heard, from the first kept sample on: (first sample index, PCM)."""
        ring = self.rings.get(key) or self.rings.get("")
        if not ring:
            return end, np.zeros(0, "<i2")
        start = max(start, ring[0][0])
        out = np.zeros(max(0, end - start), "<i2")
        for at, pcm in ring:
            a, b = max(at, start), min(at + pcm.shape[0], end)
            if a < b:
                out[a - start:b - start] = pcm[a - at:b - at]
        return start, out

    def install(self, lanes: Lanes) -> None:
        """Hear every attributed chunk of this one session before its lanes cut it into
        windows."""
        lanes.taps.append(self.hear)

    def hear(self, at: int, parts: Sequence[SpeakerAudio]) -> None:
        """Keep one attributed chunk that starts at call-time sample ``at``."""
        mix_kept = False
        for speaker, audio, mask in parts:
            if mask is None and speaker:  # a channel of its own
                self.add(speaker, at, audio)
            elif not mix_kept:  # the shared signal, once
                self.add("", at, audio)
                mix_kept = True


def trimmed(clip: pb.FlaggedAudio, seconds: float) -> pb.FlaggedAudio:
    """``clip`` cut to its last ``seconds`` (a watcher asking for less than the server's
    cap)."""
    have = len(clip.audio) // 2
    want = int(seconds * clip.sample_rate_hz)
    if want >= have:
        return clip
    out = pb.FlaggedAudio()
    out.CopyFrom(clip)
    out.audio = clip.audio[(have - want) * 2:]
    out.start_seconds = clip.end_seconds - want / clip.sample_rate_hz
    return out


class Watcher:
    """One ``WatchCalls`` subscriber: its queue of events, snapshot first."""

    def __init__(self, include_windows: bool, max_backlog: int,
                 flagged_audio_seconds: float = 0.0) -> None:
        self.include_windows = include_windows
        self.flagged_audio_seconds = flagged_audio_seconds  # 0: no audio
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
        self.tap: AudioTap | None = None  # only on a server allowed to send flagged audio
        self.flagged: list[pb.FlaggedAudio] = []  # each alert's audio while the call is open

    def event(self, snapshot: bool = False, **field: object) -> pb.WatchCallsResponse:
        return pb.WatchCallsResponse(stream_id=self.stream_id, call_id=self.call_id,
                                     server_time=time.time(), snapshot=snapshot,
                                     **field)  # type: ignore[arg-type]

    def scored(self, window: pb.WindowResult, verdict: pb.SpeakerVerdict,
               alert: pb.Alert | None) -> None:
        """A window scored (the session's hook): its score, the speaker's running verdict,
        and the alert it raised, if any."""
        self.verdicts[verdict.speaker] = verdict
        clip = None
        if alert is not None:
            self.alerts.append(alert)
            clip = self.flagged_audio(alert)
        if not self.bus.watchers:
            return
        if any(w.include_windows for w in self.bus.watchers):
            self.bus.publish(self.event(window=window), windows=True)
        self.bus.publish(self.event(verdict=verdict))
        if alert is not None:
            self.bus.publish(self.event(alert=alert))
        if clip is not None:
            self.bus.publish_audio(self, clip)

    def flagged_audio(self, alert: pb.Alert) -> pb.FlaggedAudio | None:
        """The alert's audio, its last ``bus.flagged_audio_seconds`` at most (kept with the
        call for the snapshot); None when the server sends no audio or has none left."""
        if self.tap is None:
            return None
        rate = self.tap.sample_rate
        end = int(round(alert.end_seconds * rate))
        start = max(int(round(alert.start_seconds * rate)),
                    end - int(self.bus.flagged_audio_seconds * rate))
        first, pcm = self.tap.cut(alert.speaker, start, end)
        if pcm.shape[0] == 0:
            return None
        clip = pb.FlaggedAudio(
            speaker=alert.speaker, start_seconds=first / rate, end_seconds=end / rate,
            alert_start_seconds=alert.start_seconds, alert_end_seconds=alert.end_seconds,
            sample_rate_hz=rate, audio=pcm.tobytes())
        self.flagged.append(clip)
        return clip

    def summary(self, summary: pb.StreamSummary) -> None:
        if self.bus.watchers:
            self.bus.publish(self.event(summary=summary))

    def close(self, status: str) -> None:
        self.bus.calls.pop(self.stream_id, None)
        if self.bus.watchers:
            self.bus.publish(self.event(closed=pb.CallClosed(status=status)))


class EventBus:
    """Every call of this server, published to every ``WatchCalls`` subscriber."""

    def __init__(self, model: str, max_backlog: int = DEFAULT_MAX_BACKLOG,
                 flagged_audio_seconds: float = 0.0) -> None:
        if not 0 <= flagged_audio_seconds <= MAX_FLAGGED_AUDIO_SECONDS:
            raise ValueError(f"flagged audio must lie in [0, {MAX_FLAGGED_AUDIO_SECONDS:g}] s")
        self.model = model
        self.max_backlog = max_backlog
        self.flagged_audio_seconds = flagged_audio_seconds  # 0: the feed never sends audio
        self.started_at = time.time()
        self.calls: dict[str, CallFeed] = {}
        self.watchers: set[Watcher] = set()

    def publish(self, event: pb.WatchCallsResponse, windows: bool = False) -> None:
        for watcher in self.watchers:
            if windows and not watcher.include_windows:
                continue
            watcher.put(event)

    def publish_audio(self, feed: CallFeed, clip: pb.FlaggedAudio,
                      snapshot: bool = False, to: Watcher | None = None) -> None:
        """A flagged clip to the watchers that asked for audio, each cut to its own cap."""
        for watcher in [to] if to is not None else self.watchers:
            if watcher.flagged_audio_seconds > 0:
                watcher.put(feed.event(snapshot=snapshot, flagged_audio=trimmed(
                    clip, watcher.flagged_audio_seconds)))

    def open(self, session: Session, rpc: str) -> CallFeed:
        """Register a call as it opens and announce it."""
        s = session.settings
        opened = pb.CallOpened(
            platform=s.platform, speakers=list(session.attributor.speakers),
            channel_mode=pb.CHANNEL_MODE_SPLIT if s.split else pb.CHANNEL_MODE_MIXED,
            alert_threshold=s.alert_threshold, model=self.model, rpc=rpc,
            opened_at=time.time())
        feed = CallFeed(self, session.stream_id, s.call_id, opened)
        if self.flagged_audio_seconds > 0:
            feed.tap = AudioTap(session.lanes.sample_rate,
                                self.flagged_audio_seconds + TAP_MARGIN_SECONDS)
            feed.tap.install(session.lanes)
        self.calls[session.stream_id] = feed
        if self.watchers:
            self.publish(feed.event(opened=opened))
        return feed

    def subscribe(self, include_windows: bool, flagged_audio_seconds: float = 0.0) -> Watcher:
        """A new watcher, its queue primed with the snapshot and the ready marker; it gets
        flagged audio when it asks and this server allows it (the lesser cap)."""
        watcher = Watcher(include_windows, self.max_backlog,
                          min(max(flagged_audio_seconds, 0.0), self.flagged_audio_seconds))
        for feed in self.calls.values():
            watcher.put(feed.event(snapshot=True, opened=feed.opened))
            for verdict in feed.verdicts.values():
                watcher.put(feed.event(snapshot=True, verdict=verdict))
            for alert in feed.alerts:
                watcher.put(feed.event(snapshot=True, alert=alert))
            for clip in feed.flagged:
                self.publish_audio(feed, clip, snapshot=True, to=watcher)
        watcher.put(pb.WatchCallsResponse(server_time=time.time(), ready=pb.WatchReady(
            open_calls=len(self.calls), server_started_at=self.started_at,
            flagged_audio_seconds=self.flagged_audio_seconds)))
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


async def require_admin(context: grpc.aio.ServicerContext, admin_token: str, rpc: str) -> None:
    """Abort an admin RPC (``WatchCalls``, ``ReloadModel``) unless the server has an admin
    token and the call carries it: one gate, so both RPCs refuse alike (PERMISSION_DENIED
    when the server has none, UNAUTHENTICATED when the call lacks it)."""
    if not admin_token:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{rpc} is disabled: the server has no --admin-token")
    if not authorized(context, admin_token):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{rpc} needs 'authorization: Bearer <admin token>' metadata")


async def watch_calls(bus: EventBus, admin_token: str, request: pb.WatchCallsRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchCallsResponse]:
    """The body of ``WatchCalls``: the admin token checked, then the bus's events until the
    client goes away (or falls too far behind: RESOURCE_EXHAUSTED, it reconnects)."""
    await require_admin(context, admin_token, "WatchCalls")
    watcher = bus.subscribe(request.include_windows, request.flagged_audio_seconds)
    log.info("watch open", watchers=len(bus.watchers), open_calls=len(bus.calls),
             flagged_audio_seconds=watcher.flagged_audio_seconds)
    try:
        async for event in watcher.events():
            yield event
    finally:
        bus.watchers.discard(watcher)
        log.info("watch closed", watchers=len(bus.watchers), overflowed=watcher.overflowed)
    if watcher.overflowed:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"watcher fell {bus.max_backlog} events behind; reconnect")
