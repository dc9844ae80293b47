"""The pipeline of one stream: audio -> speakers -> windows -> queue -> verdicts -> events.

A reader task pulls audio from the source and submits windows; the response side awaits them
in order. At most ``max_inflight`` windows of a stream wait in the queue: past that the reader
stops pulling, so a client sending faster than real time is slowed by gRPC flow control
rather than buffered without bound or dropped. Cancelling the stream (client gone) cancels the
reader and every queued window at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import structlog

from callshield.v1 import detection_pb2 as pb
from models.verdicts import DEFAULT_RULE, Alert, Verdict
from server import metrics
from server.audio import Decoded
from server.lanes import Lane, Lanes
from server.logs import CallIdLogging
from server.queue.base import InferenceQueue, QueueUnavailable, WindowJob, WindowScore
from server.settings import StreamSettings
from server.speakers import ChannelAttributor, SpeakerAttributor
from server.windowing import Window


def verdict_pb(v: Verdict, ranges: Sequence[tuple[float, float]] = ()) -> pb.SpeakerVerdict:
    return pb.SpeakerVerdict(
        speaker=v.speaker, spoof_probability=v.probability, state=int(v.state),
        speech_seconds=v.speech_seconds,
        speech=[pb.TimeRange(start_seconds=a, end_seconds=b) for a, b in ranges])


def alert_pb(a: Alert) -> pb.Alert:
    return pb.Alert(speaker=a.speaker, start_seconds=a.start, end_seconds=a.end,
                    spoof_probability=a.probability)


@dataclass
class _Pending:
    lane: Lane
    window: Window
    task: asyncio.Task[WindowScore]
    received: float  # perf_counter when the chunk completing the window arrived


@dataclass
class _Failed:
    error: BaseException


_END = object()


def _may_block(attributor: SpeakerAttributor, chunk: Decoded) -> bool:
    """A blocking attributor that can tell (``blocks_for``) whether this chunk runs its
    models is called inline when it does not."""
    blocks_for = getattr(attributor, "blocks_for", None)
    if blocks_for is None:
        return True
    heard = chunk.mono if chunk.mono is not None else chunk.channels[0]
    return bool(blocks_for(heard.shape[0]))


class Session:
    def __init__(
        self, settings: StreamSettings, queue: InferenceQueue, model_rate: int,
        stream_id: str, max_inflight: int = 8,
        attributor: SpeakerAttributor | None = None,
        call_id_logging: CallIdLogging | None = None, verdict_rule: str = DEFAULT_RULE,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.stream_id = stream_id
        self.model_rate = model_rate
        self.attributor = attributor or ChannelAttributor(settings.speakers)
        self.lanes = Lanes(model_rate, settings.window_seconds, settings.hop_seconds,
                           settings.alert_threshold, verdict_rule, self.attributor.speakers)
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: asyncio.Queue[_Pending | _Failed | object] = asyncio.Queue()
        self._job_ids = itertools.count()
        #: windows submitted and never scored (the queue became unavailable: see ``run``)
        self.windows_unscored = 0
        #: the admin feed's hook (server/events.py): every scored window, the speaker's
        #: running verdict and the alert raised, whatever the client asked for
        self.on_scored: Callable[[pb.WindowResult, pb.SpeakerVerdict, pb.Alert | None],
                                 None] | None = None
        logged_id = (call_id_logging or CallIdLogging())(settings.call_id)
        self.log = structlog.get_logger("callshield.session").bind(
            call_id=logged_id, stream_id=stream_id)

    @property
    def audio_seconds(self) -> float:
        return self.lanes.audio_seconds

    async def _attribute(self, chunk: Decoded | None) -> list[tuple[Lane, Window]]:
        """Windows completed by one chunk (``None``: the end of the stream)."""
        a = self.attributor
        if chunk is None:
            parts = await asyncio.to_thread(a.flush) if a.blocking else a.flush()
        elif a.blocking and _may_block(a, chunk):
            parts = await asyncio.to_thread(a.attribute, chunk.channels, chunk.mono)
        else:
            parts = a.attribute(chunk.channels, chunk.mono)
        return self.lanes.push(parts)

    def summary(self) -> pb.StreamSummary:
        return pb.StreamSummary(
            call_id=self.settings.call_id,
            speakers=[verdict_pb(s.verdict, s.speech_ranges) for s in self.lanes.summary()],
            audio_seconds=self.audio_seconds, windows_scored=self.lanes.windows_scored,
            windows_unscored=self.windows_unscored)

    async def run(
        self, source: AsyncIterator[Decoded]
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Responses for ``source`` (model-rate audio per channel, and the mono the attributor
        listens to at its ``mono_rate``, if any), then the summary.

        When the queue becomes unavailable (Redis restarts, no worker answers in time) the
        stream cannot go on being scored, but what was scored is not lost: reading stops, the
        windows still queued are counted in the summary's ``windows_unscored``, the summary goes
        out, and only then :class:`QueueUnavailable` is raised (the client's UNAVAILABLE)."""
        reader = asyncio.create_task(self._read(source))
        failure: QueueUnavailable | None = None
        try:
            while True:
                item = await self._pending.get()
                if isinstance(item, _Failed):
                    if not isinstance(item.error, QueueUnavailable):
                        raise item.error
                    failure = item.error
                    break
                if not isinstance(item, _Pending):
                    break
                try:
                    score = await item.task
                except QueueUnavailable as exc:
                    self.windows_unscored += 1
                    failure = exc
                    break
                finally:
                    self._slots.release()
                for event in self._events(item, score):
                    yield event
                metrics.WINDOW_LATENCY_SECONDS.observe(time.perf_counter() - item.received)
            if failure is not None:
                await self._stop_reading(reader)
            summary = self.summary()
            self.log.info("stream summary", windows=summary.windows_scored,
                          windows_unscored=summary.windows_unscored,
                          audio_seconds=round(summary.audio_seconds, 2),
                          verdicts={v.speaker: pb.SpeakerState.Name(v.state)
                                    for v in summary.speakers})
            yield pb.StreamDetectResponse(summary=summary)
            if failure is not None:
                raise failure
        finally:
            await self._stop_reading(reader)

    async def _stop_reading(self, reader: asyncio.Task[None]) -> None:
        """Stop the reader and cancel the windows it queued, counting them unscored."""
        reader.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await reader
        while not self._pending.empty():
            item = self._pending.get_nowait()
            if isinstance(item, _Pending):
                item.task.cancel()
                self.windows_unscored += 1

    async def _read(self, source: AsyncIterator[Decoded]) -> None:
        try:
            async for chunk in source:
                received = time.perf_counter()
                for lane, window in await self._attribute(chunk):
                    await self._submit(lane, window, received)
            received = time.perf_counter()
            for lane, window in await self._attribute(None) + self.lanes.flush():
                await self._submit(lane, window, received)
            self._pending.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the response side, which owns the status
            self._pending.put_nowait(_Failed(exc))

    async def _submit(self, lane: Lane, window: Window, received: float) -> None:
        if not window.has_speech:
            return
        await self._slots.acquire()
        job = WindowJob(f"{self.stream_id}:{next(self._job_ids)}", self.stream_id, window.audio)
        task = asyncio.create_task(self.queue.submit(job))
        self._pending.put_nowait(_Pending(lane, window, task, received))

    def _events(self, item: _Pending, score: WindowScore) -> list[pb.StreamDetectResponse]:
        metrics.WINDOWS_SCORED.inc()
        w = item.window
        rule = item.lane.rule
        update = rule.update(score.spoof_probability, w.start, w.end, w.speech_total)
        events = []
        window = pb.WindowResult(
            start_seconds=w.start, end_seconds=w.end, speaker=item.lane.speaker,
            spoof_probability=score.spoof_probability, model=score.model)
        # a state change carries the speaker's speech so far: a client whose stream is lost
        # before its summary (a detector crash) still has a range for each second of its
        # speech_seconds (the plugins merge them across reconnects)
        verdict = verdict_pb(rule.verdict(), item.lane.speech_ranges if update.changed else ())
        if self.settings.interim_results:
            events.append(pb.StreamDetectResponse(window=window))
        if self.settings.interim_results or update.changed:
            events.append(pb.StreamDetectResponse(verdict=verdict))
        alerted = None
        if (alert := update.alert) is not None:
            metrics.ALERTS.inc()
            self.log.warning("spoof alert", speaker=alert.speaker, start=round(alert.start, 2),
                             end=round(alert.end, 2), spoof_probability=round(alert.probability, 3))
            alerted = alert_pb(alert)
            events.append(pb.StreamDetectResponse(alert=alerted))
        if self.on_scored is not None:
            self.on_scored(window, verdict, alerted)
        return events
