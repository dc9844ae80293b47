"""The load: real-time streams through the real server, one latency record per window.

A trial opens ``streams`` concurrent ``StreamDetect`` calls with the asyncio SDK
(:class:`client.AsyncDetectionClient`), each sending 100 ms LINEAR16 chunks of a real call at
real-time pace with interim results on, starting at staggered phases within one hop, as
independent calls do. The calls go over one gRPC channel each (``per-call``) or are spread
round-robin over a few shared channels (``shared-4``): a telephony plugin or an SDK user
multiplexes. Each channel is its own TCP connection (a local subchannel pool: by default gRPC
would let channels with equal arguments share one connection), which the trial checks by
counting the server's established connections.

Latency of a window: from the moment real time *due* the chunk that completes it to the
moment its ``WindowResult`` arrives at the client. "Due" rather than "sent": a server that
stops reading (flow control) delays the sends themselves, which a send-based latency would
hide. A diarized MIXED window can only be scored once the diarizer has decided its last
second, ``lookahead`` seconds later (the diarizer's right context, a design constant of
``diarization.stream``); its latency is counted from the chunk that completes that later
time, and the raw figure (from the window's own end) is kept beside it.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import grpc
import numpy as np

from bench.service.audio import AudioPool, StreamAudio
from callshield.v1 import detection_pb2 as pb
from client import AsyncDetectionClient
from client.audio import CHUNK_SECONDS

HOP_S = 1.0  # the server's default hop
P99_LIMIT_S = 1.0  # a stream count is held when window p99 stays within this (no errors)
DRAIN_SLACK_S = 10.0  # after its audio, a trial waits this long for results, then cancels
DETAIL_MAX_STREAMS = 10  # trials up to this size keep every window's latency in the JSON
MODES = ("mixed", "split")


@dataclass(frozen=True)
class Pattern:
    """How calls map onto gRPC channels (each its own TCP connection)."""

    name: str
    channels: int  # 0: one per call

    def count(self, streams: int) -> int:
        return streams if self.channels == 0 else min(self.channels, streams)


PATTERNS = {"per-call": Pattern("per-call", 0), "shared-4": Pattern("shared-4", 4)}


def server_connections(port: int) -> int:
    """TCP connections established to ``port`` on this host (the server's side of them)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]  # noqa: SIM115 (read at once)
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class LoopLag:
    """How late the client's event loop wakes up: when this is large, client-side latency
    includes the client's own queueing, not only the service's."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.lags.append(loop.time() - t - self.period)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class StreamRecord:
    latencies: list[float] = field(default_factory=list)  # arrival - due (judged chunk)
    raw: list[float] = field(default_factory=list)  # arrival - due of the window's own end
    ends: list[float] = field(default_factory=list)  # the windows' end times, seconds
    speakers: set[str] = field(default_factory=set)
    first_verdict: float = math.nan  # first window/verdict arrival - send of first speech chunk
    send_lag_max: float = 0.0  # worst (send - due) over the stream's chunks
    windows_scored: int = -1  # from the StreamSummary
    error: str | None = None


def pct(values: Sequence[float], q: float, scale: float = 1.0) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.percentile(finite, q) * scale) if finite else math.nan


@dataclass
class Run:
    """One trial: ``streams`` concurrent real-time calls of ``seconds`` each."""

    backend: str
    mode: str  # mixed or split
    pattern: str
    streams: int
    seconds: float
    connections: int  # TCP connections the server held during the trial
    lookahead_s: float  # added to a window's end before its latency is counted
    diarized_streams: int  # MIXED streams whose windows named more than one speaker
    loadavg_1m: float
    windows: int
    missing_windows: int  # scored per the summaries but never received
    errors: int
    error_codes: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    raw_p50_ms: float
    raw_p99_ms: float
    max_send_lag_ms: float  # a chunk sent this long after it was due (flow control, client)
    first_verdict_p50_s: float
    first_verdict_p95_s: float
    client_lag_p99_ms: float
    wall_s: float
    server: dict[str, float] = field(default_factory=dict)  # the server's own histogram
    # (stream, window end s, latency ms) of every window, for small trials
    window_detail: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def held(self) -> bool:
        """Real time held: p99 within the limit, every window back, no error."""
        return (self.errors == 0 and self.windows > 0 and self.missing_windows == 0
                and self.p99_ms <= P99_LIMIT_S * 1000)


def stream_config(audio: StreamAudio, mode: str, call_id: str) -> pb.StreamConfig:
    return pb.StreamConfig(
        encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=audio.sample_rate,
        channels=audio.channels,
        channel_mode=pb.CHANNEL_MODE_SPLIT if mode == "split" else pb.CHANNEL_MODE_MIXED,
        call_id=call_id, interim_results=True)


async def one_stream(client: AsyncDetectionClient, audio: StreamAudio, mode: str,
                     lookahead: float, start_at: float, call_id: str,
                     deadline: float) -> StreamRecord:
    """Stream ``audio`` at real-time pace from ``start_at`` (loop time); time every window.
    ``deadline`` bounds the whole stream, so that an overloaded server fails the trial
    instead of holding the benchmark while it drains."""
    loop = asyncio.get_running_loop()
    rec = StreamRecord()
    n = len(audio.chunks)
    due = [start_at + i * CHUNK_SECONDS for i in range(n)]
    sent = [math.nan] * n

    async def source() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(audio.chunks):
            delay = due[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[i] = loop.time()  # the SDK writes it as soon as this generator yields
            yield chunk

    await asyncio.sleep(max(0.0, start_at - loop.time()))
    try:
        async with asyncio.timeout_at(deadline):
            async for response in client.stream(stream_config(audio, mode, call_id), source()):
                now = loop.time()
                kind = response.WhichOneof("event")
                if kind in ("window", "verdict") and math.isnan(rec.first_verdict) and (
                        audio.speech_chunk >= 0):
                    rec.first_verdict = now - sent[audio.speech_chunk]
                if kind == "window":
                    end = response.window.end_seconds
                    rec.latencies.append(now - due[audio.completing_chunk(end + lookahead)])
                    rec.raw.append(now - due[audio.completing_chunk(end)])
                    rec.ends.append(end)
                    rec.speakers.add(response.window.speaker)
                elif kind == "summary":
                    rec.windows_scored = response.summary.windows_scored
    except grpc.aio.AioRpcError as exc:
        rec.error = exc.code().name
    except TimeoutError:
        rec.error = "BENCH_TIMEOUT"
    lags = [s - d for s, d in zip(sent, due, strict=True) if not math.isnan(s)]
    rec.send_lag_max = max(lags, default=0.0)
    return rec


async def trial(target: str, port: int, pool: AudioPool, *, backend: str, mode: str,
                pattern: Pattern, streams: int, seconds: float, lookahead: float) -> Run:
    """``streams`` concurrent real-time calls of ``mode`` over ``pattern``'s channels."""
    loop = asyncio.get_running_loop()
    loadavg = os.getloadavg()[0]
    async with AsyncExitStack() as channels:
        clients = [await channels.enter_async_context(AsyncDetectionClient(
            target, channel_options=[("grpc.use_local_subchannel_pool", 1)]))
            for _ in range(pattern.count(streams))]
        await asyncio.gather(*(c.wait_ready(10.0) for c in clients))
        connections = server_connections(port)
        started = time.monotonic()
        t0 = loop.time() + 0.3
        deadline = t0 + HOP_S + seconds + DRAIN_SLACK_S
        with LoopLag() as lag:
            records = await asyncio.gather(*(
                one_stream(clients[k % len(clients)], pool.get(k, seconds, mode), mode,
                           lookahead, t0 + HOP_S * k / streams, f"bench-{mode}-{k}", deadline)
                for k in range(streams)))
        wall = time.monotonic() - started
    lat = [x for r in records for x in r.latencies]
    raw = [x for r in records for x in r.raw]
    fv = [r.first_verdict for r in records]
    codes: dict[str, int] = {}
    for r in records:
        if r.error:
            codes[r.error] = codes.get(r.error, 0) + 1
    run = Run(
        backend=backend, mode=mode, pattern=pattern.name, streams=streams, seconds=seconds,
        connections=connections, lookahead_s=lookahead,
        diarized_streams=sum(len(r.speakers) > 1 for r in records) if mode == "mixed" else 0,
        loadavg_1m=round(loadavg, 2), windows=len(lat),
        missing_windows=sum(max(0, r.windows_scored - len(r.latencies))
                            for r in records if r.windows_scored >= 0),
        errors=sum(codes.values()), error_codes=codes,
        p50_ms=pct(lat, 50, 1000), p95_ms=pct(lat, 95, 1000), p99_ms=pct(lat, 99, 1000),
        max_ms=pct(lat, 100, 1000), raw_p50_ms=pct(raw, 50, 1000), raw_p99_ms=pct(raw, 99, 1000),
        max_send_lag_ms=max(r.send_lag_max for r in records) * 1000,
        first_verdict_p50_s=pct(fv, 50), first_verdict_p95_s=pct(fv, 95),
        client_lag_p99_ms=pct(lag.lags, 99, 1000), wall_s=round(wall, 1))
    if streams <= DETAIL_MAX_STREAMS:
        run.window_detail = [(k, round(e, 3), round(x * 1000, 2)) for k, r in enumerate(records)
                             for e, x in zip(r.ends, r.latencies, strict=True)]
    return run


async def warm_up(target: str, pool: AudioPool, streams: int = 2) -> None:
    """A few seconds per stream and mode as fast as the server takes them, not measured:
    the first forward of each window length, the diarizer's first steps, the connection and
    the server's lazy imports are paid here rather than by the first trial."""
    async with AsyncDetectionClient(target) as client:

        async def one(k: int, mode: str) -> None:
            audio = pool.get(k, 6.0, mode)
            async for _ in client.stream(stream_config(audio, mode, f"warm-{mode}-{k}"),
                                         audio.chunks):
                pass

        await asyncio.gather(*(one(k, m) for k in range(streams) for m in MODES))


@dataclass
class Capacity:
    """The search's answer for one (mode, pattern): the largest count held, the smallest
    count above it that was not, and the counts tried in order."""

    streams: int
    first_failing: int | None
    trials: list[int]

    @property
    def text(self) -> str:
        if self.first_failing is None:
            return f">= {self.streams}"
        return f"{self.streams} ({self.first_failing} not held)"


async def find_capacity(measure: Callable[[int], Awaitable[Run]], ladder: Sequence[int],
                        budget_s: float, resolution: int) -> Capacity:
    """Climb ``ladder`` (e.g. 1, 5, 10, 20, 50, 100) while each count is held, then bisect
    once between the last count held and the first not held (when they are more than
    ``resolution`` apart): a coarse answer that fits a time budget, reported as a bracket.
    No new trial starts after ``budget_s``."""
    ok, bad, trials = 0, None, []
    deadline = time.monotonic() + budget_s
    for n in ladder:
        if time.monotonic() > deadline:
            break
        trials.append(n)
        if (await measure(n)).held:
            ok = n
        else:
            bad = n
            break
    if bad is not None and bad - ok > resolution and time.monotonic() < deadline:
        mid = (ok + bad) // 2 if ok else max(1, bad // 2)
        if mid not in trials and mid > ok:
            trials.append(mid)
            if (await measure(mid)).held:
                ok = mid
            else:
                bad = mid
    return Capacity(ok, bad, trials)
