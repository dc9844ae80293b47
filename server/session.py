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
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass

import structlog

from callshield.v1 import detection_pb2 as pb
from server import metrics
from server.audio import Decoded
from server.lanes import Lane, Lanes
from server.logs import CallIdLogging
from server.queue.base import InferenceQueue, WindowJob, WindowScore
from server.settings import StreamSettings
from server.speakers import ChannelAttributor, SpeakerAttributor
from server.verdicts import DEFAULT_RULE, Alert, Verdict
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
            audio_seconds=self.audio_seconds, windows_scored=self.lanes.windows_scored)

    async def run(
        self, source: AsyncIterator[Decoded]
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Responses for ``source`` (model-rate audio per channel, and the mono the attributor
        listens to at its ``mono_rate``, if any), then the summary."""
        reader = asyncio.create_task(self._read(source))
        try:
            while True:
                item = await self._pending.get()
                if isinstance(item, _Failed):
                    raise item.error
                if not isinstance(item, _Pending):
                    break
                try:
                    score = await item.task
                finally:
                    self._slots.release()
                for event in self._events(item, score):
                    yield event
                metrics.WINDOW_LATENCY_SECONDS.observe(time.perf_counter() - item.received)
            summary = self.summary()
            self.log.info("stream summary", windows=summary.windows_scored,
                          audio_seconds=round(summary.audio_seconds, 2),
                          verdicts={v.speaker: pb.SpeakerState.Name(v.state)
                                    for v in summary.speakers})
            yield pb.StreamDetectResponse(summary=summary)
        finally:
            reader.cancel()
            while not self._pending.empty():
                item = self._pending.get_nowait()
                if isinstance(item, _Pending):
                    item.task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await reader

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
        if self.settings.interim_results:
            events.append(pb.StreamDetectResponse(window=pb.WindowResult(
                start_seconds=w.start, end_seconds=w.end, speaker=item.lane.speaker,
                spoof_probability=score.spoof_probability, model=score.model)))
        if self.settings.interim_results or update.changed:
            events.append(pb.StreamDetectResponse(verdict=verdict_pb(rule.verdict())))
        if (alert := update.alert) is not None:
            metrics.ALERTS.inc()
            self.log.warning("spoof alert", speaker=alert.speaker, start=round(alert.start, 2),
                             end=round(alert.end, 2), spoof_probability=round(alert.probability, 3))
            events.append(pb.StreamDetectResponse(alert=alert_pb(alert)))
        return events
