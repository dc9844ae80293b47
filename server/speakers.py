"""Routing a stream's audio to speakers: every attributor lives here (a channel per party for
SPLIT calls, diarization for MIXED calls, see ``diarization/``).

Attribution rule (the same live and offline): every sample goes to the one speaker that the
diarizer says holds it, and to nobody when nobody speaks or when two speakers overlap, since
an overlapped stretch would mix a genuine and a fake voice into one spoof score. An attributor
hands out the chunk once with a sample mask per speaker (:class:`SpeakerAudio`); the speaker's
lane zeroes what its mask leaves out, so each speaker has its own audio track and its own
scoring windows (``server.lanes``); a window is scored
only when its speaker's speech fills at least ``server.windowing.MIN_SPEECH_FRACTION`` of it,
so windows that are mostly silence, overlap or the other party are skipped, and each scored
window belongs to the speaker who holds most of its speech by construction.

Live, labels come from :class:`diarization.stream.StreamingDiarizer` (``A``, ``B``, ... in order
of first speech, one step of latency); for ``Detect`` the whole recording is diarized first by
pyannote's offline pipeline and its turns drive the same per-speaker tracks. SPLIT streams
never come here: each channel is a party.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib.util
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import structlog

from diarization import MODEL_RATE as DIARIZATION_RATE
from server.memory import trim_heap

log = structlog.get_logger("callshield.speakers")


class SpeakerAudio(NamedTuple):
    """One speaker's share of an attributed chunk.

    ``mask`` marks the samples of ``audio`` the speaker holds (``None``: all of them, a
    channel per party); the speakers of a diarized chunk share one ``audio`` array, so a call
    with many labels costs one copy of its audio, not one per label. ``speaker`` ``""``
    carries call time that no speaker holds yet.
    """

    speaker: str
    audio: np.ndarray
    mask: np.ndarray | None = None


class SpeakerAttributor(Protocol):
    """Who speaks in the decoded audio: the seam where diarization plugs in for MIXED calls.

    Given one chunk per decoded channel (at the model's rate), returns the audio of each
    speaker it names, at that rate. Every call returns the same length for all of them, and
    the lengths add up to call time, so that window times stay call times; a diarizer may lag
    (return less now, the rest later and in ``flush``) and may name new speakers as the call
    goes on (``speakers`` grows). ``blocking`` attributors (model inference) run in a worker
    thread. An attributor that listens to the audio at another rate than the model's names it
    in ``mono_rate``, and gets the same stretch downmixed at that rate as ``mono``.
    """

    speakers: Sequence[str]
    blocking: bool
    mono_rate: int | None

    def attribute(self, channels: Sequence[np.ndarray],
                  mono: np.ndarray | None = None) -> list[SpeakerAudio]: ...

    def flush(self) -> list[SpeakerAudio]: ...


class ChannelAttributor:
    """One speaker per channel: SPLIT calls, and MIXED calls with diarization off."""

    blocking = False
    mono_rate = None

    def __init__(self, speakers: Sequence[str]) -> None:
        self.speakers = tuple(speakers)

    def attribute(self, channels: Sequence[np.ndarray],
                  mono: np.ndarray | None = None) -> list[SpeakerAudio]:
        return [SpeakerAudio(name, audio)
                for name, audio in zip(self.speakers, channels, strict=True)]

    def flush(self) -> list[SpeakerAudio]:
        return []


def _mono(channels: Sequence[np.ndarray]) -> np.ndarray:
    if len(channels) == 1:
        return channels[0]
    return np.mean(np.stack(channels), axis=0).astype(np.float32)


def _split(audio: np.ndarray, labels: np.ndarray,
           speakers: Sequence[str]) -> list[SpeakerAudio]:
    """``audio`` for each speaker, masked to the samples labelled with its index."""
    if not speakers:
        return [SpeakerAudio("", audio)]
    return [SpeakerAudio(name, audio, labels == k) for k, name in enumerate(speakers)]


class DiarizingAttributor:
    """Live diarization of one MIXED stream: the diarizer hears ``mono`` at its input rate
    (the client's own, ``mono_rate``) and labels the model-rate channels the lanes get."""

    blocking = True

    def __init__(self, diarizer: Any, record: bool = False) -> None:
        """``record``: keep every sample's label (``labels``), for benchmarks that score the
        diarization of the very run whose windows they score."""
        self.diarizer = diarizer
        self.labels: list[np.ndarray] | None = [] if record else None
        self.mono_rate: int | None = diarizer.input_rate

    @property
    def speakers(self) -> Sequence[str]:
        return tuple(self.diarizer.speakers)

    def _join(self, steps: list[tuple[np.ndarray, np.ndarray]]) -> list[SpeakerAudio]:
        if not steps:
            return []
        audio = np.concatenate([a for a, _ in steps])
        labels = np.concatenate([lab for _, lab in steps])
        if self.labels is not None:
            self.labels.append(labels)
        return _split(audio, labels, self.diarizer.speakers)

    def attribute(self, channels: Sequence[np.ndarray],
                  mono: np.ndarray | None = None) -> list[SpeakerAudio]:
        """``mono``: the chunk at the diarizer's input rate; ``None``: the channels are at
        that rate already (a diarizer whose input and output rates are one)."""
        audio = _mono(channels)
        if mono is None:
            return self._join(self.diarizer.push(audio))
        return self._join(self.diarizer.push(mono, audio))

    def blocks_for(self, samples: int) -> bool:
        """Whether attributing ``samples`` more samples (at ``mono_rate``) may run the models.
        Nine chunks in ten only resample and copy: cheaper on the event loop than a hop to a
        worker thread and back (50 MIXED calls: 450 hops a second)."""
        return self.diarizer.step_due(samples)

    def flush(self) -> list[SpeakerAudio]:
        return self._join(self.diarizer.flush())


class TurnsAttributor:
    """Attribution by known speech turns (offline diarization of a whole recording)."""

    blocking = False
    mono_rate = None

    def __init__(self, turns: Sequence[tuple[float, float, str]], sample_rate: int) -> None:
        self.speakers = tuple(dict.fromkeys(label for _, _, label in turns))
        self.sample_rate = sample_rate
        self._turns = [(int(a * sample_rate), int(b * sample_rate), self.speakers.index(lab))
                       for a, b, lab in turns]
        self._position = 0

    def attribute(self, channels: Sequence[np.ndarray],
                  mono: np.ndarray | None = None) -> list[SpeakerAudio]:
        audio = _mono(channels)
        n = audio.shape[0]
        start, end = self._position, self._position + n
        count = np.zeros(n, np.int32)
        labels = np.full(n, -1)
        for a, b, k in self._turns:
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                count[lo - start : hi - start] += 1
                labels[lo - start : hi - start] = k
        labels[count != 1] = -1  # silence and overlap belong to nobody
        self._position = end
        return _split(audio, labels, self.speakers)

    def flush(self) -> list[SpeakerAudio]:
        return []


def diarization_available() -> bool:
    """pyannote.audio and resemblyzer installed (checked without importing either)."""
    return all(importlib.util.find_spec(m) is not None for m in ("pyannote.audio", "resemblyzer"))


class PipelinePool:
    """Offline diarization pipelines for ``Detect``, at most ``size`` of them, built on demand.

    A pyannote pipeline object is not re-entrant, and one shared pipeline behind a lock made a
    30 s recording wait for a long one diarized before it (25 to 78 s for a 2.2 s job). Each
    recording being diarized holds a pipeline of its own, so recordings run side by side (the
    pipelines' models are small, MBs; a long recording's working set is what ``size`` bounds).
    When every pipeline is busy, the next one freed goes to the shortest recording waiting, so
    a normal call is not queued behind hour-long ones. Lives on the event loop; only building
    and running a pipeline happen in worker threads.
    """

    def __init__(self, size: int, source: str = "") -> None:
        if size < 1:
            raise ValueError("an offline diarization pool needs at least one pipeline")
        self.size = size
        self.source = source  # official pipeline directory; "" = the project's
        self.built = 0  # pipelines built or being built
        self.busy = 0  # recordings holding a pipeline now (tests, metrics)
        self._idle: list[Any] = []
        # (samples, arrival, future): the future gets a pipeline, or None for "build one"
        self._waiting: list[tuple[int, int, asyncio.Future[Any]]] = []
        self._arrivals = itertools.count()

    async def _checkout(self, samples: int) -> Any:
        """A pipeline, or None when the caller is to build one (a slot is its now)."""
        if self._idle:
            return self._idle.pop()
        if self.built < self.size:
            self.built += 1
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (samples, next(self._arrivals), future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed over as we were cancelled
                self._checkin(future.result())
            raise

    def _checkin(self, pipeline: Any) -> None:
        """``pipeline`` to the shortest recording waiting, else to the idle ones; ``None``
        (a build failed) hands the slot on."""
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():  # skip the callers that went away
                future.set_result(pipeline)
                return
        if pipeline is None:
            self.built -= 1
        else:
            self._idle.append(pipeline)

    async def turns(self, audio: np.ndarray) -> list[tuple[float, float, str]]:
        """Speech turns of mono ``audio`` at :data:`DIARIZATION_RATE`. A caller that goes away
        (cancel, deadline, drain) stops its thread within one inference batch; the pipeline
        goes back to the pool only once that thread is done with it."""
        from diarization.offline import diarize, load_pipeline

        pipeline = await self._checkout(audio.shape[0])
        cancel = threading.Event()

        def run(pipeline: Any) -> tuple[Any, list[tuple[float, float, str]]]:
            if pipeline is None:
                pipeline = load_pipeline(self.source or None)
            if cancel.is_set():
                return pipeline, []
            try:
                return pipeline, diarize(pipeline, audio, DIARIZATION_RATE, cancel)
            except Exception:
                if cancel.is_set():  # stopped for a caller that is gone: the pipeline is fine
                    return pipeline, []
                raise
            finally:
                trim_heap()  # the pipeline's arrays for a long recording: see server/memory.py

        self.busy += 1
        job = asyncio.ensure_future(asyncio.to_thread(run, pipeline))
        job.add_done_callback(self._returned)
        try:
            _, turns = await asyncio.shield(job)
        finally:
            cancel.set()
        return turns

    def _returned(self, job: asyncio.Future[tuple[Any, list[tuple[float, float, str]]]]) -> None:
        self.busy -= 1
        if job.cancelled() or job.exception() is not None:
            self._checkin(None)  # a pipeline that failed may be broken: the next one is new
        else:
            self._checkin(job.result()[0])


@dataclass
class Diarization:
    """Models shared by every MIXED stream of the server, loaded once at start-up, and the
    pool of offline pipelines of ``Detect``."""

    models: Any  # diarization.models.DiarizationModels
    model_rate: int
    step_seconds: float = 1.0
    pipeline_source: str = ""  # official pipeline directory for Detect; "" = project's
    offline_pipelines: int = 2  # MIXED Detect recordings diarized at once
    pool: PipelinePool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = PipelinePool(self.offline_pipelines, self.pipeline_source)

    def stream_attributor(self, client_rate: int) -> DiarizingAttributor:
        """The diarizer hears the client's audio at ``client_rate`` (resampled once, to the
        diarization models' 16 kHz) and labels the model-rate audio that the lanes score."""
        from diarization.stream import StreamingDiarizer, StreamingDiarizerConfig

        return DiarizingAttributor(StreamingDiarizer(
            self.models, client_rate, StreamingDiarizerConfig(step_seconds=self.step_seconds),
            output_rate=self.model_rate))

    async def offline_attributor(self, audio: np.ndarray) -> TurnsAttributor:
        """The turns of a recording's mono ``audio`` at :data:`DIARIZATION_RATE` (decoded from the
        client's samples straight to that rate, so the diarizer hears the client's band, not
        the spoof model's); the turns are in seconds, so they attribute the model-rate audio."""
        return TurnsAttributor(await self.pool.turns(audio), self.model_rate)


def load_diarization(mode: str, segmentation: str, pipeline: str, step_seconds: float,
                     model_rate: int, precision: str = "auto",
                     offline_pipelines: int = 2) -> Diarization | None:
    """``mode``: ``off``; ``on`` (fail when the models cannot load); ``auto`` (on when the
    checkpoint and the packages are there, else off with a log line). ``precision``: of the
    speaker embeddings (``diarization.models.DiarizationModels``); ``offline_pipelines``:
    MIXED ``Detect`` recordings diarized at once (:class:`PipelinePool`)."""
    if mode == "off":
        return None
    from diarization.paths import SEGMENTATION_CHECKPOINT

    checkpoint = Path(segmentation) if segmentation else SEGMENTATION_CHECKPOINT
    if mode == "auto" and not (checkpoint.exists() and diarization_available()):
        log.info("diarization off", reason="no checkpoint or packages", checkpoint=str(checkpoint))
        return None
    from diarization.models import DiarizationModels

    models = DiarizationModels(checkpoint, precision=precision)
    log.info("diarization on", segmentation=str(checkpoint), step_seconds=step_seconds,
             embedding_precision=models.precision, offline_pipeline=pipeline or "project",
             offline_pipelines=offline_pipelines)
    return Diarization(models, model_rate, step_seconds, pipeline, offline_pipelines)
