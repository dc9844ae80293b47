"""The gRPC servicer: admission (stream limits), request validation and status codes.

Everything about audio and scoring lives in :mod:`server.session`; this module only turns
requests into sessions. Problems are raised as :mod:`server.errors`, whose one table gives
the documented gRPC status of each; every RPC body runs inside ``grpc_statuses``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from server import metrics
from server.audio import (
    Decoded,
    Recording,
    StreamDecoder,
    check_header_duration,
    container_info,
    decode_container,
    decode_raw,
)
from server.config import ServerConfig
from server.errors import (
    ClientTimeout,
    DecodeCancelled,
    Draining,
    InvalidArgument,
    InvalidAudio,
    Overloaded,
    grpc_statuses,
)
from server.events import EventBus, watch_calls
from server.logs import CallIdLogging
from server.memory import trim_heap
from server.queue.base import InferenceQueue, QueueUnavailable
from server.session import Session
from server.settings import parse_settings
from server.speakers import DIARIZATION_RATE, Diarization, SpeakerAttributor

DETECT_FEED_SECONDS = 1.0  # Detect feeds a recording to its session in slices this long
log = structlog.get_logger("callshield.service")


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``: a client's slots are counted per address,
    whatever the number of connections or ports it opens."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


class DetectionServicer(pb_grpc.DetectionServiceServicer):
    def __init__(self, detector: Detector, queue: InferenceQueue, config: ServerConfig,
                 diarization: Diarization | None = None):
        self.detector = detector
        self.queue = queue
        self.config = config
        self.diarization = diarization  # None: MIXED streams are one speaker
        self.sessions: dict[str, Session] = {}
        #: calls holding a slot: streams from their first message on (a config or not), and
        #: Detect calls from their arrival, in total and per client address
        self.admitted = 0
        self.admitted_by_peer: Counter[str] = Counter()
        self.idle = asyncio.Event()  # set while no call holds a slot (what a drain awaits)
        self.idle.set()
        #: the client side of each open stream, by stream id (a drain ends them)
        self.inputs: dict[str, StreamInput] = {}
        self.draining = False  # set by a drain: new calls get UNAVAILABLE
        #: Detect calls in progress (a drain whose grace is over cancels them), and those it
        #: cancelled (they answer UNAVAILABLE rather than the client's CANCELLED)
        self.detects: set[asyncio.Task[Any]] = set()
        self._drained: set[asyncio.Task[Any]] = set()
        self.call_id_logging = CallIdLogging.from_flags(config.log_call_ids, config.log_hash_key)
        #: the admin feed (WatchCalls): every call's events, published by _serve
        self.events = EventBus(f"{detector.name} {detector.version}".strip(),
                               flagged_audio_seconds=config.feed_flagged_audio)

    def end_calls(self) -> None:
        """A drain's grace is over. Every open stream's input ends as if its client had
        half-closed: each gets the results of the audio it sent and its summary, then
        UNAVAILABLE. Every Detect still running is cancelled (its decoding or diarization
        thread stops within one block or batch) and answers UNAVAILABLE: a recording has no
        partial result to give, and a client retries it elsewhere at once rather than after
        the listener closes under it."""
        for source in self.inputs.values():
            source.end()
        for task in self.detects:
            self._drained.add(task)
            task.cancel()

    def _refuse(self, reason: str, rpc: str) -> None:
        """Count and log a call refused at admission (the reason is the metric's label)."""
        metrics.STREAMS_REJECTED.labels(reason).inc()
        log.info("call refused", reason=reason, rpc=rpc)

    def _refuse_while_draining(self, rpc: str) -> None:
        if self.draining:
            self._refuse("draining", rpc)
            raise Draining("server shutting down; retry on another instance")

    @asynccontextmanager
    async def _admit(self, context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
        """Hold one slot for the whole call, or raise :class:`Overloaded`. A slot is taken
        before the config is read, so streams that never send one count against the limits
        (and are closed by ``--config-timeout-seconds``)."""
        self._refuse_while_draining(rpc)
        peer = peer_address(context.peer())
        if self.admitted >= self.config.max_streams:
            self._refuse("max_streams", rpc)
            raise Overloaded(f"server at its limit of {self.config.max_streams} open streams")
        if self.admitted_by_peer[peer] >= self.config.peer_limit:
            self._refuse("max_streams_per_peer", rpc)
            raise Overloaded(
                f"this client address holds {self.admitted_by_peer[peer]} open calls, the "
                "per-client limit; close one first")
        if self.queue.depth() > self.config.max_queue_depth:
            self._refuse("queue_depth", rpc)
            raise Overloaded("inference queue over capacity; retry later")
        self.admitted += 1
        self.admitted_by_peer[peer] += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.admitted -= 1
            self.admitted_by_peer[peer] -= 1
            if not self.admitted_by_peer[peer]:
                del self.admitted_by_peer[peer]
            if not self.admitted:
                self.idle.set()

    def _session(self, config: pb.StreamConfig,
                 attributor: SpeakerAttributor | None = None,
                 stream_id: str | None = None) -> Session:
        """A session; MIXED streams are diarized live when diarization is on, unless
        ``attributor`` (offline turns, for Detect) is given."""
        settings = parse_settings(config, self.detector.window_seconds)
        if attributor is None and not settings.split and self.diarization is not None:
            attributor = self.diarization.stream_attributor(settings.sample_rate)
        return Session(settings, self.queue, self.detector.sample_rate,
                       stream_id or uuid.uuid4().hex[:16],
                       max_inflight=self.config.max_inflight_per_stream, attributor=attributor,
                       call_id_logging=self.call_id_logging,
                       verdict_rule=self.config.verdict_rule)

    async def _serve(
        self, session: Session, source: AsyncIterator[Decoded],
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        """Run a session, registered for limits and metrics; errors are logged here and
        become statuses in ``grpc_statuses``."""
        self.sessions[session.stream_id] = session
        metrics.STREAMS_OPEN.inc()
        session.log.info("stream open", speakers=list(session.attributor.speakers))
        try:
            rpc = "StreamDetect" if session.stream_id in self.inputs else "Detect"
            async with (aclosing(session.run(source)) as run,
                        aclosing(self.events.relay(session, rpc, run)) as responses):
                async for response in responses:
                    yield response
        except InvalidArgument as exc:
            session.log.info("stream rejected", reason=str(exc))
            raise
        except QueueUnavailable as exc:
            session.log.warning("queue unavailable", reason=str(exc))
            raise
        except ClientTimeout as exc:
            session.log.info("stream timed out", reason=str(exc))
            raise
        finally:
            del self.sessions[session.stream_id]
            metrics.STREAMS_OPEN.dec()
            session.log.info("stream closed")

    async def StreamDetect(
        self, request_iterator: AsyncIterator[pb.StreamDetectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamDetectResponse]:
        async with grpc_statuses(context), self._admit(context, "StreamDetect"):
            requests = aiter(request_iterator)
            wait = self.config.config_timeout_seconds
            try:
                async with asyncio.timeout(wait):
                    first = await anext(requests, None)
            except TimeoutError:
                metrics.STREAMS_TIMED_OUT.labels("config").inc()
                raise ClientTimeout(
                    f"no StreamConfig within {wait:g} s of opening the stream") from None
            if first is None:
                raise InvalidArgument("empty stream: the first request must carry a StreamConfig")
            if first.WhichOneof("streaming_request") != "config":
                raise InvalidArgument(
                    "the first request must carry a StreamConfig (audio came first)")
            session = self._session(first.config)
            # the attributor may listen at another rate than the model's (a diarizer hears the
            # client's own): the decoder hands it that mono beside the model-rate channels
            decoder = StreamDecoder(session.settings.encoding, session.settings.sample_rate,
                                    session.settings.channels, session.settings.split,
                                    self.detector.sample_rate, session.attributor.mono_rate)
            source = StreamInput(requests, decoder, self.config.idle_timeout_seconds)
            self.inputs[session.stream_id] = source
            try:
                async for response in self._serve(session, source.chunks()):
                    yield response
            finally:
                del self.inputs[session.stream_id]
            if source.ended_by_server:  # the summary is out; say why the stream ended early
                raise Draining(
                    "server shutting down: the stream was ended early, with its summary; "
                    "continue on another instance")

    async def Detect(
        self, request: pb.DetectRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetectResponse:
        """A whole recording. Its duration is checked from the header (or the byte count)
        before decoding, decoding and resampling run block by block in a worker thread (the
        event loop keeps serving streams), and a client that cancels or whose deadline passes
        stops the decoding within one block (grpc.aio cancels this coroutine); so does a
        drain whose grace is over (:meth:`end_calls`), answered UNAVAILABLE."""
        task = asyncio.current_task()
        assert task is not None
        progress = _DetectProgress(log)
        self.detects.add(task)
        try:
            async with grpc_statuses(context), self._admit(context, "Detect"):
                try:
                    return await self._detect(request, progress)
                except asyncio.CancelledError:
                    drained = task in self._drained
                    reason = "draining" if drained else _cancel_reason(context)
                    progress.log.info("detect cancelled", reason=reason, stage=progress.stage)
                    if progress.stage != "decode":  # decoding counts its own (_decoding)
                        metrics.DETECT_CANCELLED.labels(progress.stage).inc()
                    if not drained:
                        raise
                    task.uncancel()
                    raise Draining(
                        "server shutting down: the recording was not finished; retry on "
                        "another instance") from None
        finally:  # the decoded recording is garbage now: give its pages back (memory.py)
            self.detects.discard(task)
            self._drained.discard(task)
            asyncio.get_running_loop().run_in_executor(None, trim_heap)

    async def _detect(self, request: pb.DetectRequest,
                      progress: _DetectProgress) -> pb.DetectResponse:
        config = pb.StreamConfig()
        config.CopyFrom(request.config)
        config.interim_results = True  # Detect returns every window
        max_seconds = self.config.max_detect_seconds
        rate = self.detector.sample_rate
        cancel = threading.Event()
        # a MIXED recording is diarized offline first: decoded, from the same blocks, to the
        # diarizer's rate too, so it hears the client's band rather than the model's
        diarized = self.diarization is not None and config.channel_mode != pb.CHANNEL_MODE_SPLIT
        mono_rate = DIARIZATION_RATE if diarized else None
        stream_id = uuid.uuid4().hex[:16]
        progress.log = log.bind(call_id=self.call_id_logging(config.call_id),
                                stream_id=stream_id)
        try:
            if config.encoding == pb.AUDIO_ENCODING_UNSPECIFIED:
                info = container_info(request.audio)
                check_header_duration(info.frames, info.sample_rate, max_seconds)
                config.encoding = pb.AUDIO_ENCODING_LINEAR16
                config.sample_rate_hz, config.channels = info.sample_rate, info.channels
                if info.channels > 2 and config.channel_mode != pb.CHANNEL_MODE_SPLIT:
                    config.channels = 1  # downmixed while decoding
                settings = parse_settings(config, self.detector.window_seconds)
                recording = await asyncio.to_thread(
                    _decoding, decode_container, request.audio, rate, settings.split,
                    max_seconds, cancel, mono_rate)
            else:
                settings = parse_settings(config, self.detector.window_seconds)
                if not request.audio:
                    raise InvalidAudio("empty audio")
                recording = await asyncio.to_thread(
                    _decoding, decode_raw, request.audio, config.encoding, settings.sample_rate,
                    settings.channels, rate, settings.split, max_seconds, cancel, mono_rate)
        finally:
            cancel.set()  # the caller is gone (or done): a decoding thread stops at its block
        # the decoded duration, whatever the recording holds (silence included)
        progress.log.info("detect decoded", audio_seconds=round(recording.audio.shape[0] / rate, 2),
                          diarize=recording.mono is not None)
        attributor = None
        if self.diarization is not None and recording.mono is not None:
            # a whole recording: diarize it offline first, then score per speaker
            progress.stage = "diarize"
            attributor = await self.diarization.offline_attributor(recording.mono)
            recording = recording._replace(mono=None)  # the turns are all it leaves
        progress.stage = "score"
        session = self._session(config, attributor, stream_id)
        response = pb.DetectResponse()
        async for event in self._serve(session, _slices(recording.audio, rate)):
            if event.HasField("window"):
                response.windows.append(event.window)
            elif event.HasField("summary"):
                response.summary.CopyFrom(event.summary)
        return response

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        async with grpc_statuses(context):
            self._refuse_while_draining("GetModel")
        d = self.detector
        return pb.GetModelResponse(
            name=d.name, version=d.version, architecture=d.architecture,
            sample_rate_hz=d.sample_rate, window_seconds=d.window_seconds,
            calibration=pb.Calibration(scale=d.calibration.scale, bias=d.calibration.bias),
        )

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        """Admin: a new model (or the same file again) without dropping calls
        (server/reload.py), for the admin token only."""
        from server.reload import reload_rpc

        return await reload_rpc(self, request, context)

    async def WatchCalls(
        self, request: pb.WatchCallsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchCallsResponse]:
        """The admin feed (server/events.py), for the admin token only."""
        async for event in watch_calls(self.events, self.config.admin_token, request, context):
            yield event


@dataclass
class _DetectProgress:
    """How far a Detect got, for the line logged when it is cancelled."""

    log: Any
    stage: str = "decode"  # then diarize (MIXED, diarization on), then score


class StreamInput:
    """The client's side of a stream, decoded chunk by chunk (:meth:`chunks`).

    Only the wait for the client counts towards ``idle_seconds``: while the session holds its
    reads back (flow control), no time runs. :meth:`end` (a drain whose grace is over) stops
    reading as if the client had half-closed, so the stream still ends with its summary.
    """

    def __init__(self, requests: AsyncIterator[pb.StreamDetectRequest], decoder: StreamDecoder,
                 idle_seconds: float) -> None:
        self.requests = requests
        self.decoder = decoder
        self.idle_seconds = idle_seconds
        self.ended_by_server = False
        self._waiting: asyncio.Timeout | None = None  # the wait for the client, if one runs

    def end(self) -> None:
        self.ended_by_server = True
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())  # fire it now

    async def chunks(self) -> AsyncIterator[Decoded]:
        while not self.ended_by_server:
            try:
                async with asyncio.timeout(self.idle_seconds) as self._waiting:
                    request = await anext(self.requests, None)
            except TimeoutError:
                if self.ended_by_server:
                    break
                metrics.STREAMS_TIMED_OUT.labels("idle").inc()
                raise ClientTimeout(
                    f"no audio for {self.idle_seconds:g} s: send audio, or half-close the "
                    "stream to end it with its summary") from None
            finally:
                self._waiting = None
            if request is None:
                break
            kind = request.WhichOneof("streaming_request")
            if kind == "config":
                raise InvalidArgument(
                    "a second StreamConfig: only the first request carries one")
            if kind is None:
                raise InvalidArgument("a request with neither config nor audio")
            yield self.decoder.decode(request.audio)
        yield self.decoder.flush()


def _cancel_reason(context: grpc.aio.ServicerContext) -> str:
    """Why grpc.aio cancelled a call: its deadline passed, or its client cancelled it (or
    went away)."""
    remaining = context.time_remaining()
    return "deadline" if remaining is not None and remaining <= 0.01 else "client cancelled"


def _decoding(decode: Callable[..., Recording], *args: Any) -> Recording:
    """Run ``decode`` (in a worker thread), accounted in the Detect decoding metrics."""
    metrics.DETECT_DECODING.inc()
    started = time.perf_counter()
    try:
        return decode(*args)
    except DecodeCancelled:
        metrics.DETECT_CANCELLED.labels("decode").inc()
        raise
    finally:
        metrics.DETECT_DECODE_SECONDS.observe(time.perf_counter() - started)
        metrics.DETECT_DECODING.dec()


async def _slices(audio: np.ndarray, rate: int) -> AsyncIterator[Decoded]:
    step = int(DETECT_FEED_SECONDS * rate)
    for start in range(0, audio.shape[0], step):
        chunk = audio[start : start + step]
        yield Decoded([np.ascontiguousarray(chunk[:, ch]) for ch in range(chunk.shape[1])])
        # silence submits no window, so nothing else would yield: let streams run between
        # the slices of a long recording
        await asyncio.sleep(0)
