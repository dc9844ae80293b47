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
from typing import Protocol

import numpy as np
import structlog

from callshield.v1 import detection_pb2 as pb
from server import metrics
from server.aggregation import CallAggregator
from server.logs import CallIdLogging
from server.queue.base import InferenceQueue, WindowJob, WindowScore
from server.settings import StreamSettings
from server.windowing import Window, Windower

FIRST_WINDOW_SECONDS = 1.0


class SpeakerAttributor(Protocol):
    """Who speaks in the decoded audio: the seam where diarization plugs in for MIXED calls.

    Given one chunk per decoded channel, returns audio per speaker (a speaker's silent parts
    zeroed). Every call returns the same length for all speakers it names, and the lengths add
    up to call time, so that window times stay call times; a diarizer may lag (return less
    now, the rest later and in ``flush``) and may name new speakers as the call goes on
    (``speakers`` grows); an entry with the empty label ``""`` carries call time that no
    speaker holds yet. ``blocking`` attributors (model inference) run in a worker thread.
    """

    speakers: Sequence[str]
    blocking: bool

    def attribute(self, channels: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray]]: ...

    def flush(self) -> list[tuple[str, np.ndarray]]: ...


class ChannelAttributor:
    """One speaker per channel: SPLIT calls, and MIXED calls with diarization off."""

    blocking = False

    def __init__(self, speakers: Sequence[str]) -> None:
        self.speakers = tuple(speakers)

    def attribute(self, channels: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        return list(zip(self.speakers, channels, strict=True))

    def flush(self) -> list[tuple[str, np.ndarray]]:
        return []


@dataclass
class _Pending:
    speaker: str
    window: Window
    task: asyncio.Task[WindowScore]
    received: float  # perf_counter when the chunk completing the window arrived


@dataclass
class _Failed:
    error: BaseException


_END = object()


class Session:
    def __init__(
        self, settings: StreamSettings, queue: InferenceQueue, model_rate: int,
        stream_id: str, max_inflight: int = 8,
        attributor: SpeakerAttributor | None = None,
        call_id_logging: CallIdLogging | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.stream_id = stream_id
        self.model_rate = model_rate
        self.attributor = attributor or ChannelAttributor(settings.speakers)
        self.windowers: dict[str, Windower] = {}
        self._attributed = 0  # samples of call time handed to the windowers so far
        self.aggregator = CallAggregator(settings.alert_threshold)
        for speaker in self.attributor.speakers:
            self._windower(speaker)
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: asyncio.Queue[_Pending | _Failed | object] = asyncio.Queue()
        self._job_ids = itertools.count()
        logged_id = (call_id_logging or CallIdLogging())(settings.call_id)
        self.log = structlog.get_logger("callshield.session").bind(
            call_id=logged_id, stream_id=stream_id)

    @property
    def audio_seconds(self) -> float:
        return max((w.total for w in self.windowers.values()), default=0) / self.model_rate

    def _windower(self, speaker: str) -> Windower:
        """The speaker's windower; one that appears mid-call starts at the current call time."""
        if speaker not in self.windowers:
            self.windowers[speaker] = Windower(
                self.model_rate, self.settings.window_seconds, self.settings.hop_seconds,
                FIRST_WINDOW_SECONDS, start_sample=self._attributed)
            self.aggregator.track(speaker)
        return self.windowers[speaker]

    async def _attribute(self, channels: Sequence[np.ndarray] | None) -> list[tuple[str, Window]]:
        """Windows completed by one chunk (``None``: the end of the stream)."""
        a = self.attributor
        if channels is None:
            parts = await asyncio.to_thread(a.flush) if a.blocking else a.flush()
        elif a.blocking:
            parts = await asyncio.to_thread(a.attribute, channels)
        else:
            parts = a.attribute(channels)
        windows = []
        length = 0
        for speaker, audio in parts:
            length = audio.shape[0]
            if speaker:
                windows += [(speaker, w) for w in self._windower(speaker).push(audio)]
        self._attributed += length
        for speaker, windower in self.windowers.items():  # silent in this chunk: keep time
            if windower.total < self._attributed:
                gap = np.zeros(self._attributed - windower.total, np.float32)
                windows += [(speaker, w) for w in windower.push(gap)]
        return windows

    async def run(
        self, source: AsyncIterator[Sequence[np.ndarray]]
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Responses for ``source`` (model-rate audio per channel), then the summary."""
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
            summary = self.aggregator.summary(self.settings.call_id, self.audio_seconds)
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

    async def _read(self, source: AsyncIterator[Sequence[np.ndarray]]) -> None:
        try:
            async for channels in source:
                received = time.perf_counter()
                for speaker, window in await self._attribute(channels):
                    await self._submit(speaker, window, received)
            received = time.perf_counter()
            for speaker, window in await self._attribute(None):
                await self._submit(speaker, window, received)
            for speaker, windower in self.windowers.items():
                for window in windower.flush():
                    await self._submit(speaker, window, received)
            self._pending.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the response side, which owns the status
            self._pending.put_nowait(_Failed(exc))

    async def _submit(self, speaker: str, window: Window, received: float) -> None:
        if not window.has_speech:
            return
        await self._slots.acquire()
        job = WindowJob(f"{self.stream_id}:{next(self._job_ids)}", self.stream_id, window.audio)
        task = asyncio.create_task(self.queue.submit(job))
        self._pending.put_nowait(_Pending(speaker, window, task, received))

    def _events(self, item: _Pending, score: WindowScore) -> list[pb.StreamDetectResponse]:
        metrics.WINDOWS_SCORED.inc()
        w = item.window
        track = self.aggregator.track(item.speaker)
        changed, alert = track.update(score.spoof_probability, w.start, w.end, w.speech_total)
        events = []
        if self.settings.interim_results:
            events.append(pb.StreamDetectResponse(window=pb.WindowResult(
                start_seconds=w.start, end_seconds=w.end, speaker=item.speaker,
                spoof_probability=score.spoof_probability, model=score.model)))
        if self.settings.interim_results or changed:
            events.append(pb.StreamDetectResponse(verdict=track.verdict()))
        if alert is not None:
            metrics.ALERTS.inc()
            self.log.warning("spoof alert", speaker=alert.speaker,
                             start=alert.start_seconds, end=alert.end_seconds,
                             spoof_probability=round(alert.spoof_probability, 3))
            events.append(pb.StreamDetectResponse(alert=alert))
        return events
