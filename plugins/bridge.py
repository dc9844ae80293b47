"""The bridge from a platform connection to the detector: :class:`DetectorLink` (the
process-wide gRPC client every plugin shares) and :class:`CallBridge` (one call's detection
streams, their reconnects and the summary merged over them).

A call (:mod:`plugins.session`) hands the raw audio frames its platform's protocol decoded to
a :class:`CallBridge` without awaiting anything, so a slow detector never stalls the socket
read loop of this or another call. The bridge forwards each frame to the gRPC stream as soon
as gRPC can take it (the SDK's :class:`client.AsyncDetectionClient`), and hands the first
alert per speaker to :mod:`plugins.delivery`: the platform's own back channel and the
webhook, each in its own task so that neither can fail the call. At every normal end (the
platform's hangup, :meth:`CallBridge.finish`) the call's summary goes to the webhook as a
``call_summary`` event: the receiver learns that a call ended clean as well as that one was
flagged.

A detector that goes away mid-call (restart, drain, crash: UNAVAILABLE; an idle stream it
ended: DEADLINE_EXCEEDED) does not end detection: the bridge drops the audio that arrives
meanwhile (a gap, logged and reported in the ``call_summary``), reconnects within
``reconnect_seconds`` and goes on in a new stream, with alert times in call time and one alert
per speaker over the whole call. A detector that refuses the stream, stays away longer, or
stops reading fails the bridge: it logs the error and calls the call's ``on_failure``, which
closes the platform connection cleanly. A stall shows here only as audio gRPC no longer
takes: the bridge fails once ``stall_seconds`` of it wait in its queue, which happens
``64 KiB`` of audio after the detector stopped, the read-ahead its transport grants a stream
(``server/app.py`` keeps it there: with grpc's default BDP probing it grew to 4 MiB, 262 s
of 8 kHz audio, and a stalled detector went unnoticed for minutes). Note the grpcio
asyncio bug the SDK documents (grpc/grpc#36066): a status the server sends while we are still
writing can surface as INTERNAL "Internal error from Core" (so INTERNAL counts as a lost
stream, and the logged code is not always the server's own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

import grpc
import structlog

from callshield.v1 import detection_pb2 as pb
from client import AsyncDetectionClient
from plugins import metrics
from plugins.delivery import (
    DELIVERY_SECONDS,
    AlertSink,
    Deliveries,
    SpoofAlert,
    summary_event,
)
from plugins.errors import PluginError
from plugins.protocols.events import AudioFormat
from plugins.webhook import WebhookSender

STALL_SECONDS = 5.0  # audio the bridge buffers for a detector that stopped reading
FINISH_SECONDS = 10.0  # after hangup: the summary (last windows) or give up
RECONNECT_SECONDS = 30.0  # a detector gone mid-call: keep trying this long, then give up
RETRY_PAUSE_SECONDS = 0.5  # between a lost stream and the next attempt
# a lost stream worth a new one; other codes are the detector refusing this call
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.DEADLINE_EXCEEDED})
ForwardObserver = Callable[[str, float], None]
FailureHook = Callable[[str], Awaitable[None]]


class DetectorGone(PluginError):
    """The detection stream of this call has failed; the call should end its connection."""


@dataclass
class DetectorLink:
    """The process-wide link to the detection service, shared by every plugin and call."""

    target: str
    token: str | None = None
    alert_threshold: float = 0.0
    webhook: WebhookSender | None = None
    stall_seconds: float = STALL_SECONDS
    finish_seconds: float = FINISH_SECONDS
    reconnect_seconds: float = RECONNECT_SECONDS
    observe_forward: ForwardObserver = metrics.observe_forward  # each frame's (plugin, delay)
    deliveries: Deliveries = field(init=False)
    _client: AsyncDetectionClient | None = None
    _streams: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.deliveries = Deliveries(self.webhook)

    @property
    def client(self) -> AsyncDetectionClient:
        if self._client is None:  # created lazily: needs the running loop
            self._client = AsyncDetectionClient(self.target, token=self.token)
        return self._client

    def open_call(
        self, plugin: str, call_id: str, fmt: AudioFormat, *, deliver: AlertSink | None,
        on_failure: FailureHook, extra: dict[str, str] | None = None,
    ) -> CallBridge:
        bridge = CallBridge(self, plugin, call_id, fmt, deliver, on_failure, extra or {})
        bridge.start()
        if bridge._task is not None:
            self._streams.add(bridge._task)
            bridge._task.add_done_callback(self._streams.discard)
        return bridge

    async def wait_idle(self, seconds: float) -> None:
        """At shutdown: let open detection streams end (bounded) before sockets are torn."""
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=seconds)

    async def drain(self, seconds: float = DELIVERY_SECONDS) -> None:
        """Wait (bounded) for open streams to end and for the alert and summary deliveries
        still in flight, then close the channel (which would cut any stream still open)."""
        await self.wait_idle(seconds)
        await self.deliveries.drain(seconds)
        if self._client is not None:
            await self._client.close()
            self._client = None


@dataclass
class _Segment:
    """One detection stream of a call: where it starts in call time, and what it said."""

    offset: float
    verdicts: dict[str, pb.SpeakerVerdict] = field(default_factory=dict)
    summary: pb.StreamSummary | None = None

    def final(self) -> list[pb.SpeakerVerdict]:
        return list(self.summary.speakers) if self.summary is not None else list(
            self.verdicts.values())


def merge_segments(call_id: str, segments: list[_Segment]) -> pb.StreamSummary | None:
    """One summary over a call's streams: a speaker flagged in any stream stays flagged,
    speech adds up (its time ranges shifted to call time), the last stream's score stands.
    None unless the last stream finished."""
    if not segments or segments[-1].summary is None:
        return None
    if len(segments) == 1:
        return segments[0].summary
    merged: dict[str, pb.SpeakerVerdict] = {}
    for segment in segments:
        for v in segment.final():
            m = merged.setdefault(v.speaker, pb.SpeakerVerdict(speaker=v.speaker))
            flagged = pb.SPEAKER_STATE_SPOOF_SUSPECTED in (m.state, v.state)
            m.spoof_probability, m.state = v.spoof_probability, v.state
            if flagged:
                m.state = pb.SPEAKER_STATE_SPOOF_SUSPECTED
            m.speech_seconds += v.speech_seconds
            m.speech.extend(pb.TimeRange(start_seconds=segment.offset + r.start_seconds,
                                         end_seconds=segment.offset + r.end_seconds)
                            for r in v.speech)
    last = segments[-1]
    assert last.summary is not None
    return pb.StreamSummary(
        call_id=call_id, speakers=list(merged.values()),
        audio_seconds=last.offset + last.summary.audio_seconds,
        windows_scored=sum(s.summary.windows_scored for s in segments if s.summary))


@dataclass(eq=False)
class CallBridge:
    """One platform connection's detection streams (one, unless the detector restarts)."""

    detector: DetectorLink
    plugin: str
    call_id: str
    format: AudioFormat
    deliver: AlertSink | None
    on_failure: FailureHook
    extra: dict[str, str]
    alerts: list[SpoofAlert] = field(init=False, default_factory=list)
    summary: pb.StreamSummary | None = field(init=False, default=None)
    failed: str | None = field(init=False, default=None)
    gaps: list[tuple[float, float]] = field(init=False, default_factory=list)  # none heard
    _segments: list[_Segment] = field(init=False, default_factory=list)
    _alerted: set[str] = field(init=False, default_factory=set)
    _fed: int = field(init=False, default=0)  # bytes the platform gave us: call time
    _sent: int = field(init=False, default=0)  # bytes handed to streams, or dropped in a gap
    _dropping: bool = field(init=False, default=False)  # between a lost stream and the next
    _buffered: int = field(init=False, default=0)  # bytes queued, not yet taken by gRPC
    _queue: asyncio.Queue[tuple[bytes, float] | None] = field(init=False,
                                                              default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _closing: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        # the stall bound: what this bridge holds for a detector that stopped reading (the
        # detector's transport reads 64 KiB ahead on top: server/app.py)
        self._max_buffered = max(int(self.detector.stall_seconds
                                     * self.format.bytes_per_second()), 1)
        self.log = structlog.get_logger("callshield.plugins").bind(plugin=self.plugin,
                                                                   call_id=self.call_id)

    def start(self) -> None:
        metrics.CALLS.labels(self.plugin).inc()
        metrics.CALLS_OPEN.labels(self.plugin).inc()
        self.log.info("call open", parties=list(self.format.parties),
                      sample_rate=self.format.sample_rate)
        self._task = asyncio.create_task(self._run())

    def feed(self, audio: bytes, received: float | None = None) -> None:
        """Queue one frame (whole samples of all channels) for the detector; never blocks.

        Raises :class:`DetectorGone` once the stream has failed, or when the detector has
        not taken ``stall_seconds`` of audio: the call then ends its connection.
        """
        if self.failed is not None:
            raise DetectorGone(self.failed)
        if self._closing or not audio:
            return
        self._fed += len(audio)
        if self._dropping:  # no detector to hear it: part of the gap
            return
        if self._buffered + len(audio) > self._max_buffered:
            self._fail("detector stalled: not reading audio")
            raise DetectorGone(self.failed or "stalled")
        metrics.FRAMES.labels(self.plugin).inc()
        self._buffered += len(audio)
        self._queue.put_nowait((audio, time.perf_counter() if received is None else received))

    async def finish(self) -> pb.StreamSummary | None:
        """The platform ended the call: half-close, wait (bounded) for the last verdicts."""
        if self._closing:
            return self.summary
        self._closing = True
        self._queue.put_nowait(None)
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.detector.finish_seconds)
        except TimeoutError:
            self.log.error("detector did not finish the stream in time",
                           seconds=self.detector.finish_seconds)
            await self._stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.summary is None or (task is not None and task.cancelling()):
                await self._stop()
                raise
            # the stream was torn down after its summary arrived: the call is complete
        finally:
            self._closed()
        if self.summary is not None:
            event = summary_event(self.plugin, self.call_id, self.summary, len(self.alerts),
                                  self.extra, self.gaps)
            self.detector.deliveries.summary(self.plugin, event, self.log)
        return self.summary

    async def abort(self, reason: str) -> None:
        """The platform connection broke (or a protocol error): drop the stream at once."""
        if self._closing:
            return
        self._closing = True
        self.log.info("call aborted", reason=reason)
        await self._stop()
        self._closed()

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._task

    def _closed(self) -> None:
        metrics.CALLS_OPEN.labels(self.plugin).dec()
        self.log.info("call closed", alerts=len(self.alerts), failed=self.failed is not None,
                      verdicts=self._verdicts())

    def _verdicts(self) -> dict[str, str]:
        if self.summary is None:
            return {}
        return {v.speaker: pb.SpeakerState.Name(v.state) for v in self.summary.speakers}

    def stream_config(self) -> pb.StreamConfig:
        fmt = self.format
        return pb.StreamConfig(
            encoding=fmt.encoding, sample_rate_hz=fmt.sample_rate, channels=fmt.channels,
            channel_mode=pb.CHANNEL_MODE_MIXED if fmt.mixed else pb.CHANNEL_MODE_SPLIT,
            call_id=self.call_id, party_labels=list(fmt.parties),
            alert_threshold=self.detector.alert_threshold, interim_results=False,
        )

    async def _audio(self) -> AsyncIterator[bytes]:
        observe = self.detector.observe_forward
        queue = self._queue  # this stream's: a lost stream's reader must not take later audio
        while (item := await queue.get()) is not None:
            audio, received = item
            self._buffered -= len(audio)
            self._sent += len(audio)
            observe(self.plugin, time.perf_counter() - received)
            yield audio

    async def _run(self) -> None:
        try:
            # A call that starts while the detector restarts waits for it (its audio
            # buffers meanwhile), for at most stall_seconds.
            if not await self.detector.client.wait_ready(self.detector.stall_seconds):
                self._fail("detector unreachable")
                return
            while await self._stream():
                if not await self._reconnect():
                    return
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(f"detector stream failed: {exc.code().name}: {exc.details()}")
        except Exception as exc:  # any other failure of the stream is the detector's too
            self._fail(f"detector stream failed: {type(exc).__name__}: {exc}")
        finally:
            self.summary = merge_segments(self.call_id, self._segments)

    async def _stream(self) -> bool:
        """One detection stream; True when it was lost mid-call and is worth another."""
        segment = _Segment(self._sent / self.format.bytes_per_second())
        self._segments.append(segment)
        stream = self.detector.client.stream(self.stream_config(), self._audio(),
                                             wait_for_ready=True)
        try:
            async for response in stream:
                kind = response.WhichOneof("event")
                if kind == "alert":
                    self._alert(response.alert, segment.offset)
                elif kind == "verdict":
                    segment.verdicts[response.verdict.speaker] = response.verdict
                elif kind == "summary":
                    segment.summary = response.summary
        except grpc.aio.AioRpcError as exc:
            if self._closing or exc.code() not in RETRYABLE:
                raise
            self._lost(exc)
            return True
        if segment.summary is None and not self._closing:
            self._fail("detector ended the stream early")
        return False

    def _lost(self, exc: grpc.aio.AioRpcError) -> None:
        """Drop what was queued for the lost stream: from here to the next stream is a gap."""
        self._dropping = True
        lost, self._queue = self._queue, asyncio.Queue()
        while not lost.empty():
            item = lost.get_nowait()
            if item is None:  # the call ended meanwhile
                self._closing = True
                break
            self._buffered -= len(item[0])
        lost.put_nowait(None)  # ends the lost stream's request generator, if gRPC still reads
        start = self._sent / self.format.bytes_per_second()
        if self.gaps and self.gaps[-1][1] == start:  # refused again at once: the same gap
            start = self.gaps.pop()[0]
        self.gaps.append((start, start))
        metrics.DETECTOR_ERRORS.labels(self.plugin).inc()
        self.log.warning("detector stream lost; reconnecting", code=exc.code().name,
                         at_seconds=round(start, 2))

    async def _reconnect(self) -> bool:
        """Wait (bounded) for the detector; True when a new stream can start."""
        deadline = time.monotonic() + self.detector.reconnect_seconds
        while not self._closing:
            # A draining server still accepts connections and answers each new stream with
            # UNAVAILABLE (retry pushback 1 s): pace the attempts rather than spin.
            await asyncio.sleep(RETRY_PAUSE_SECONDS)
            if self._closing:
                break
            if await self.detector.client.wait_ready(min(0.5, self.detector.reconnect_seconds)):
                self._dropping = False
                self._sent = self._fed  # everything until now was heard or dropped
                start = self.gaps[-1][0]
                resumed = self._sent / self.format.bytes_per_second()
                self.gaps[-1] = (start, resumed)
                self.log.warning("detector stream resumed", gap_seconds=round(resumed - start, 2))
                return True
            if time.monotonic() >= deadline:
                self._fail(f"detector unreachable for {self.detector.reconnect_seconds:g} s")
                return False
        return False

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        metrics.DETECTOR_ERRORS.labels(self.plugin).inc()
        self.log.error("detector error", reason=reason)
        if not self._closing:
            self.detector.deliveries.spawn(self.on_failure(reason))

    def _alert(self, alert: pb.Alert, offset: float = 0.0) -> None:
        """The first alert per speaker over the whole call, in call time (a new stream after
        a reconnect starts its clock and its alerts afresh)."""
        if alert.speaker in self._alerted:
            return
        self._alerted.add(alert.speaker)
        spoof = SpoofAlert(self.plugin, self.call_id, alert.speaker, alert.spoof_probability,
                           offset + alert.start_seconds, offset + alert.end_seconds,
                           extra=self.extra)
        self.alerts.append(spoof)
        self.log.warning("spoof alert", speaker=spoof.speaker,
                         spoof_probability=round(spoof.spoof_probability, 3))
        self.detector.deliveries.alert(spoof, self.deliver, self.log)
