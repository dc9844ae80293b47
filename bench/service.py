"""Service latency and capacity over real gRPC: ``python -m bench.service`` (``make bench``).

Writes ``bench/results/service.json`` and ``bench/results/service.md``.

What a call center sees is the headline, so everything is measured at the client, through the
real server on 127.0.0.1, for both backends in the same run:

* ``inprocess``: ``python -m server --queue inprocess`` (the embedded default);
* ``redis``: a private ``redis-server`` on a free port, ``--workers`` real
  ``python -m server.worker`` processes and ``python -m server --queue redis``.

The server runs as its own process, as in production: a load generator inside the server's
event loop (or behind its GIL) would slow the very thing it measures. Each stream is a cut of
a real call (``../shared/calls``, else ``examples/``), sent with the asyncio SDK
(:class:`client.AsyncDetectionClient`) as 100 ms LINEAR16 chunks at real-time pace via
``StreamDetect`` with interim results on; streams start at staggered phases within one hop,
as independent calls do. Measured:

* per-window latency: from the moment the client sends the chunk that completes a window (the
  first chunk whose end reaches the window's end time) to the moment its ``WindowResult``
  arrives at the client; p50/p95/p99/max at 1, 10 and 50 concurrent streams. Beside it, the
  server's own ``callshield_window_latency_seconds`` histogram (chunk arriving -> result going
  out), scraped from its metrics port before and after each run: the difference is the
  client and the loopback;
* Redis minus in-process p50 at 1 stream (target <= 5 ms);
* time to first verdict after speech starts: the first ``WindowResult``/``SpeakerVerdict``
  arriving, minus the send time of the first chunk that holds speech (the server's own energy
  gate, :func:`server.windowing.speech_seconds`);
* capacity: the largest number of concurrent real-time streams for which at most 1 % of the
  windows arrive later than one hop after their completing chunk was due (real time), with no
  failed stream: grown from the measured counts, then bisected, within a time budget.

"Due" rather than "sent" decides lateness: a server that stops reading (flow control) delays
the sends themselves, which a send-based latency would hide. The client shares the machine
with the server, so its event-loop lag is reported too, as is the load average before each
run: on a busy machine the figures are upper bounds.

A secondary, queue-level section (``--queue-level``) submits windows straight to
``InferenceQueue.submit`` against the same backends: what the queue and inference cost
without gRPC, decoding, windowing and the client, so the gap to the headline is the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from callshield.v1 import detection_pb2 as pb
from client import AsyncDetectionClient
from client.audio import CHUNK_SECONDS, read_audio
from server.devstack import SHARED, Stack, free_port
from server.queue.base import InferenceQueue, WindowJob
from server.windowing import SPEECH_FRAME_SECONDS, speech_seconds

if TYPE_CHECKING:  # torch loads only where a detector is really built
    from models.inference import Detector

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_CALLS = SHARED / "calls"
EXAMPLES = ROOT / "examples"
HOP_S = 1.0  # the server's default hop: "falling behind" means later than this
LATE_FRACTION = 0.01  # more late windows than this and a stream count does not keep up
# A stream's cut starts 0.2 to 1.2 s before a turn (spread over one hop by a golden-ratio
# sequence): the time to first verdict depends on where speech starts against the 1 s window
# grid, so a fixed lead-in would measure one lucky (or unlucky) phase only.
LEAD_IN_MIN_S = 0.2
DETAIL_MAX_STREAMS = 10  # runs up to this size keep every window's latency in the JSON
_T0 = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr, stamped with the seconds since start (for the run-time budget)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class StreamAudio:
    """One stream's audio, pre-cut into the chunks the client sends."""

    source: str
    offset_s: float
    sample_rate: int
    chunks: tuple[bytes, ...]
    chunk_ends: tuple[float, ...]  # seconds from stream start at which each chunk ends
    speech_chunk: int  # index of the first chunk with speech; -1 if none

    def completing_chunk(self, end_s: float) -> int:
        """Index of the first chunk whose end reaches ``end_s``: the one completing a window."""
        i = int(np.searchsorted(self.chunk_ends, end_s - 1e-6))
        return min(i, len(self.chunks) - 1)


def _cut(pcm: np.ndarray, rate: int, source: str, offset_s: float,
         seconds: float) -> StreamAudio:
    start = int(offset_s * rate)
    need = int(seconds * rate)
    mono = pcm[start:]
    if mono.shape[0] < need:  # a short file: loop it rather than send less
        mono = np.tile(pcm, math.ceil(need / pcm.shape[0]) + 1)[:need]
    mono = mono[:need]
    step = int(round(CHUNK_SECONDS * rate))
    chunks, ends, speech = [], [], -1
    for i, s in enumerate(range(0, mono.shape[0], step)):
        part = mono[s : s + step]
        chunks.append(part.astype("<i2").tobytes())
        ends.append((s + part.shape[0]) / rate)
        if speech < 0 and speech_seconds(part.astype(np.float32) / 32768, rate) >= (
                SPEECH_FRAME_SECONDS - 1e-9):
            speech = i
    return StreamAudio(source, offset_s, rate, tuple(chunks), tuple(ends), speech)


def _turn_starts(path: Path) -> list[float]:
    """Start times of the call's turns (its ``.json`` beside it), or just 0."""
    meta = path.with_suffix(".json")
    if not meta.exists():
        return [0.0]
    return [float(t["start"]) for t in json.loads(meta.read_text()).get("turns", [])] or [0.0]


def lead_in(k: int) -> float:
    return LEAD_IN_MIN_S + (k * 0.6180339887) % 1.0


class AudioPool:
    """Real call audio for any number of streams: stream ``k`` takes call ``k % n``, cut
    from just before one of its turns, so that streams differ and speech starts after a
    short silence, as a call's does."""

    def __init__(self, seconds: float) -> None:
        files = sorted(p for p in SHARED_CALLS.glob("*.flac") if "stereo" not in p.name)
        if not files:
            files = sorted(p for p in EXAMPLES.glob("*.wav") if "stereo" not in p.name)
        if not files:
            raise FileNotFoundError(f"no call audio in {SHARED_CALLS} or {EXAMPLES}")
        self.seconds = seconds
        self.calls: list[tuple[str, np.ndarray, int, list[float]]] = []
        for path in files:
            audio = read_audio(path)
            pcm = audio.pcm.mean(axis=1).astype(np.int16) if audio.channels > 1 else audio.pcm[:, 0]
            fits = [t for t in _turn_starts(path)
                    if t - LEAD_IN_MIN_S + seconds <= audio.seconds] or [0.0]
            self.calls.append((str(path.relative_to(ROOT.parent)), pcm, audio.sample_rate, fits))
        self._cache: dict[tuple[int, float], StreamAudio] = {}

    @property
    def sources(self) -> list[str]:
        return [name for name, *_ in self.calls]

    def get(self, k: int, seconds: float) -> StreamAudio:
        """Stream ``k``'s first ``seconds`` (at most the pool's length)."""
        key = (k, min(seconds, self.seconds))
        if key not in self._cache:
            name, pcm, rate, turns = self.calls[k % len(self.calls)]
            offset = max(0.0, turns[(k // len(self.calls)) % len(turns)] - lead_in(k))
            self._cache[key] = _cut(pcm, rate, name, offset, key[1])
        return self._cache[key]


# --------------------------------------------------------------------------- processes


def make_stack(backend: str, args: argparse.Namespace, max_streams: int) -> Stack:
    """The processes behind ``backend`` (:class:`server.devstack.Stack`), on CPU, without
    diarization, logging to files; the server's metrics port is scraped around each run."""
    batching = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    return Stack(
        queue=backend, model=args.model, workers=args.workers, metrics_port=free_port(),
        server_args=["--device", "cpu", "--diarization", "off", "--log-level", "warning",
                     "--max-streams", str(max_streams), *batching, "--grace-seconds", "0"],
        worker_args=["--device", "cpu", *batching, "--log-level", "warning"],
        consumer_prefix="bench", logs=True)


# --------------------------------------------------------------------------- metrics


def _scrape(url: str) -> dict[str, float]:
    """Cumulative buckets, ``count`` and ``sum`` of the server's window-latency histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "callshield_window_latency_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
    return out


def _histogram_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """p50 (interpolated within buckets, as PromQL's histogram_quantile) and mean, in ms, of
    the observations between two scrapes."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    if count <= 0:
        return {"server_windows": 0.0, "server_p50_ms": math.nan, "server_mean_ms": math.nan}
    bounds = sorted((float(le), after[le] - before.get(le, 0.0))
                    for le in after if le not in ("count", "sum"))
    rank, lower, prev, p50 = 0.5 * count, 0.0, 0.0, math.nan
    for upper, cumulative in bounds:
        if cumulative >= rank:
            p50 = lower if math.isinf(upper) else (
                lower + (upper - lower) * (rank - prev) / max(cumulative - prev, 1e-12))
            break
        lower, prev = upper, cumulative
    mean = (after.get("sum", 0.0) - before.get("sum", 0.0)) / count
    return {"server_windows": count, "server_p50_ms": p50 * 1000, "server_mean_ms": mean * 1000}


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


# --------------------------------------------------------------------------- gRPC runs


@dataclass
class StreamRecord:
    latencies: list[float] = field(default_factory=list)  # arrival - send of completing chunk
    ends: list[float] = field(default_factory=list)  # the windows' end times, seconds
    behind: list[float] = field(default_factory=list)  # arrival - due time of that chunk
    first_verdict: float = math.nan  # first window/verdict arrival - send of first speech chunk
    send_lag_max: float = 0.0  # worst (send - due) over the stream's chunks
    windows_scored: int = -1  # from the StreamSummary
    error: str | None = None


@dataclass
class Run:
    """One measurement: ``streams`` concurrent real-time streams of ``seconds`` each."""

    backend: str
    purpose: str  # "latency" (the table) or "capacity" (a search trial)
    streams: int
    seconds: float
    loadavg_1m: float
    windows: int
    missing_windows: int  # scored per the summaries but never received
    errors: int
    error_codes: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    late_windows: int  # arrived more than one hop after their completing chunk was due
    late_fraction: float
    max_send_lag_ms: float  # a chunk sent this long after it was due (flow control, client)
    first_verdict_p50_s: float
    first_verdict_p95_s: float
    first_verdict_max_s: float
    server_windows: int
    server_p50_ms: float
    server_mean_ms: float
    client_lag_p99_ms: float
    client_lag_max_ms: float
    wall_s: float
    # (stream, window end s, latency ms) of every window, for runs of at most
    # DETAIL_MAX_STREAMS streams: where a median hides a pattern (the first windows, one
    # slow stream), the JSON still shows it
    window_detail: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def keeps_up(self) -> bool:
        return self.errors == 0 and self.windows > 0 and self.late_fraction <= LATE_FRACTION


def _pct(values: Sequence[float], q: float, scale: float = 1.0) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.percentile(finite, q) * scale) if finite else math.nan


async def _one_stream(client: AsyncDetectionClient, audio: StreamAudio, start_at: float,
                      call_id: str, deadline: float) -> StreamRecord:
    """Stream ``audio`` at real-time pace from ``start_at``; time every window and verdict.

    ``deadline`` (loop time) bounds the whole stream, so an overloaded server that drains
    slowly fails the run instead of hanging the benchmark."""
    loop = asyncio.get_running_loop()
    rec = StreamRecord()
    n = len(audio.chunks)
    due = [start_at + i * CHUNK_SECONDS for i in range(n)]
    sent = [math.nan] * n
    config = pb.StreamConfig(
        encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=audio.sample_rate, channels=1,
        channel_mode=pb.CHANNEL_MODE_MIXED, call_id=call_id, interim_results=True)

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
            async for response in client.stream(config, source()):
                now = loop.time()
                kind = response.WhichOneof("event")
                if kind in ("window", "verdict") and math.isnan(rec.first_verdict) and (
                        audio.speech_chunk >= 0):
                    rec.first_verdict = now - sent[audio.speech_chunk]
                if kind == "window":
                    i = audio.completing_chunk(response.window.end_seconds)
                    rec.latencies.append(now - sent[i])
                    rec.ends.append(response.window.end_seconds)
                    rec.behind.append(now - due[i])
                elif kind == "summary":
                    rec.windows_scored = response.summary.windows_scored
    except grpc.aio.AioRpcError as exc:
        rec.error = exc.code().name
    except TimeoutError:
        rec.error = "BENCH_TIMEOUT"
    lags = [s - d for s, d in zip(sent, due, strict=True) if not math.isnan(s)]
    rec.send_lag_max = max(lags, default=0.0)
    return rec


async def drive(client: AsyncDetectionClient, pool: AudioPool, backend: str, purpose: str,
                streams: int, seconds: float, metrics_url: str | None) -> Run:
    """``streams`` concurrent real-time streams through the server; one row of the table."""
    loop = asyncio.get_running_loop()
    loadavg = os.getloadavg()[0]
    before = await asyncio.to_thread(_scrape, metrics_url) if metrics_url else {}
    started = time.monotonic()
    t0 = loop.time() + 0.3
    deadline = t0 + HOP_S + 3 * seconds + 30
    with LoopLag() as lag:
        records = await asyncio.gather(*(
            _one_stream(client, pool.get(k, seconds), t0 + HOP_S * k / streams,
                        f"bench-{purpose}-{k}", deadline)
            for k in range(streams)))
    wall = time.monotonic() - started
    after = await asyncio.to_thread(_scrape, metrics_url) if metrics_url else {}
    server = _histogram_stats(before, after)
    lat = [x for r in records for x in r.latencies]
    behind = np.array([x for r in records for x in r.behind])
    fv = [r.first_verdict for r in records]
    codes: dict[str, int] = {}
    for r in records:
        if r.error:
            codes[r.error] = codes.get(r.error, 0) + 1
    late = int((behind > HOP_S).sum())
    run = Run(
        backend=backend, purpose=purpose, streams=streams, seconds=seconds,
        loadavg_1m=round(loadavg, 2), windows=len(lat),
        missing_windows=sum(max(0, r.windows_scored - len(r.latencies))
                            for r in records if r.windows_scored >= 0),
        errors=sum(codes.values()), error_codes=codes,
        p50_ms=_pct(lat, 50, 1000), p95_ms=_pct(lat, 95, 1000), p99_ms=_pct(lat, 99, 1000),
        max_ms=max(lat, default=math.nan) * 1000, late_windows=late,
        late_fraction=late / len(lat) if lat else 1.0,
        max_send_lag_ms=max(r.send_lag_max for r in records) * 1000,
        first_verdict_p50_s=_pct(fv, 50), first_verdict_p95_s=_pct(fv, 95),
        first_verdict_max_s=_pct(fv, 100),
        server_windows=int(server["server_windows"]), server_p50_ms=server["server_p50_ms"],
        server_mean_ms=server["server_mean_ms"],
        client_lag_p99_ms=_pct(lag.lags, 99, 1000), client_lag_max_ms=_pct(lag.lags, 100, 1000),
        wall_s=round(wall, 1))
    if streams <= DETAIL_MAX_STREAMS:
        run.window_detail = [(k, round(e, 3), round(x * 1000, 2)) for k, r in enumerate(records)
                             for e, x in zip(r.ends, r.latencies, strict=True)]
    say(f"{backend:9s} {purpose:8s} {streams:4d} streams: p50 {run.p50_ms:7.1f} ms  p99 "
        f"{run.p99_ms:7.1f} ms  late {late}/{len(lat)}  first verdict p50 "
        f"{run.first_verdict_p50_s:.2f} s  errors {run.errors}  server p50 "
        f"{run.server_p50_ms:.1f} ms  load {loadavg:.1f}")
    return run


async def warm_up(client: AsyncDetectionClient, pool: AudioPool, streams: int = 2) -> None:
    """A few seconds of audio per stream as fast as the server takes it, not measured: the
    first forward of each window length, the connection and the server's imports are paid
    here rather than by the first row of the table."""

    async def one(k: int) -> None:
        audio = pool.get(k, 5.0)
        config = pb.StreamConfig(
            encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=audio.sample_rate,
            channels=1, call_id=f"bench-warmup-{k}", interim_results=True)
        async for _ in client.stream(config, audio.chunks):
            pass

    await asyncio.gather(*(one(k) for k in range(streams)))


@dataclass
class Capacity:
    streams: int  # the largest count measured that keeps up
    first_failing: int | None  # the smallest count measured above it that fell behind
    trials: list[int]

    @property
    def text(self) -> str:
        if self.first_failing is None:
            return f">= {self.streams} (no failing count found within the time budget)"
        return f"{self.streams} ({self.first_failing} fell behind)"

    def verdict(self, target: int) -> str:
        """A lower bound below the target decides nothing: the search stopped too early."""
        if self.streams >= target:
            return "met"
        return "MISSED" if self.first_failing is not None else "undecided"


async def find_capacity(measure: Callable[[int], Awaitable[Run]], runs: Sequence[Run],
                        args: argparse.Namespace) -> Capacity:
    """Grow by half from the largest count that kept up until one falls behind, then bisect
    to within 10 % (at least ``--capacity-resolution`` streams); stop when the time budget
    or the trial count runs out, reporting the bracket honestly."""
    ok = max((r.streams for r in runs if r.keeps_up), default=0)
    bad = min((r.streams for r in runs if not r.keeps_up and r.streams > ok), default=None)
    trials: list[int] = []
    deadline = time.monotonic() + args.capacity_budget
    while ok > 0 and len(trials) < args.capacity_steps and time.monotonic() < deadline:
        if bad is None:
            trial = min(ok + max(args.capacity_resolution, ok // 2), args.capacity_max)
            if trial <= ok:
                break
        elif bad - ok <= max(args.capacity_resolution, ok // 10):
            break
        else:
            trial = (ok + bad) // 2
        trials.append(trial)
        run = await measure(trial)
        if run.keeps_up:
            ok = trial
        else:
            bad = trial
    return Capacity(ok, bad, trials)


# --------------------------------------------------------------------------- queue level


@dataclass
class QueueRun:
    backend: str
    streams: int
    seconds: float
    windows: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def _schedule(seconds: float, window: float) -> list[tuple[float, float]]:
    """(end, length) of a stream's windows as the server cuts them: 1, 2, 3 s, then full."""
    out = [(e, e) for e in (1.0, 2.0, 3.0) if e < window and e <= seconds]
    end = window
    while end <= seconds + 1e-9:
        out.append((end, window))
        end += HOP_S
    return out


async def queue_level(queue: InferenceQueue, backend: str, streams: int, seconds: float,
                      pool: AudioPool, model_rate: int, window_s: float) -> QueueRun:
    """Windows submitted straight to ``InferenceQueue.submit`` when real time makes them
    complete; latency = that due time -> the score."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    t0 = loop.time() + 0.2

    def window_audio(k: int, end: float, length: float) -> np.ndarray:
        a = pool.get(k, seconds)
        pcm = np.frombuffer(b"".join(a.chunks), "<i2").astype(np.float32) / 32768
        x = pcm[int((end - length) * a.sample_rate): int(end * a.sample_rate)]
        n = int(length * model_rate)  # the model's rate: resample by interpolation
        return np.interp(np.linspace(0, x.shape[0] - 1, n), np.arange(x.shape[0]), x).astype(
            np.float32)

    async def one(sid: int, j: int, due: float, audio: np.ndarray) -> None:
        nonlocal errors
        try:
            await queue.submit(WindowJob(f"q{sid}-{j}", f"q{sid}", audio))
        except Exception:
            errors += 1
            return
        latencies.append(loop.time() - due)

    async def stream(sid: int) -> None:
        start = t0 + HOP_S * sid / streams
        tasks = []
        for j, (end, length) in enumerate(_schedule(seconds, window_s)):
            audio = window_audio(sid, end, length)
            await asyncio.sleep(max(0.0, start + end - loop.time()))
            tasks.append(asyncio.create_task(one(sid, j, start + end, audio)))
        await asyncio.gather(*tasks)

    await asyncio.gather(*(stream(i) for i in range(streams)))
    run = QueueRun(backend, streams, seconds, len(latencies), errors,
                   _pct(latencies, 50, 1000), _pct(latencies, 95, 1000),
                   _pct(latencies, 99, 1000), _pct(latencies, 100, 1000))
    say(f"{backend:9s} queue    {streams:4d} streams: p50 {run.p50_ms:7.1f} ms  p99 "
        f"{run.p99_ms:7.1f} ms  errors {errors}")
    return run


async def warm_up_queue(queue: InferenceQueue, model_rate: int, window_s: float) -> None:
    """One window of each length a stream produces, twice, unmeasured: a fresh queue (and,
    in process, a fresh model) pays its first-call costs here."""
    rng = np.random.default_rng(0)
    for i, (_end, length) in enumerate(2 * _schedule(window_s, window_s)):
        audio = (0.1 * rng.standard_normal(int(length * model_rate))).astype(np.float32)
        await queue.submit(WindowJob(f"warm-{i}", "warm", audio))


@asynccontextmanager
async def _bench_queue(backend: str, stack: Stack, args: argparse.Namespace,
                       detector: Detector) -> AsyncIterator[InferenceQueue]:
    """A queue of ``backend`` in this process, beside the server: for redis a second client
    of the same workers, for inprocess its own inference thread (the server idles meanwhile)."""
    from server.queue.inprocess import InProcessQueue
    from server.queue.redis_queue import RedisQueue

    queue: InferenceQueue
    if backend == "redis":
        queue = RedisQueue(stack.redis_url, args.model, job_timeout=30.0)
    else:
        queue = InProcessQueue(detector, max_batch=args.max_batch,
                               max_wait_s=args.max_wait_ms / 1000)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


# --------------------------------------------------------------------------- orchestration


@dataclass
class BackendResult:
    runs: list[Run]
    capacity: Capacity | None
    queue_runs: list[QueueRun]


async def bench_backend(backend: str, args: argparse.Namespace, pool: AudioPool,
                        detector: Detector | None) -> BackendResult:
    """Start ``backend``'s processes, measure through gRPC (table, then capacity), then at
    the queue level; the processes stop whatever happens."""
    say(f"{backend}: starting the stack")
    stack = make_stack(backend, args, max_streams=max(1000, args.capacity_max * 2))
    try:
        await asyncio.to_thread(stack.start)
        say(f"{backend}: serving on {stack.target}")
        async with AsyncDetectionClient(stack.target) as client:

            async def measure(streams: int, seconds: float, purpose: str) -> Run:
                run = await drive(client, pool, backend, purpose, streams, seconds,
                                  stack.metrics_url)
                await asyncio.sleep(1.0)  # let late results and queue state settle
                return run

            await warm_up(client, pool)
            runs = [await measure(n, args.seconds, "latency") for n in args.streams]
            capacity = None
            if args.capacity:
                trial_runs: list[Run] = []

                async def trial(n: int) -> Run:
                    trial_runs.append(await measure(n, args.capacity_seconds, "capacity"))
                    return trial_runs[-1]

                capacity = await find_capacity(trial, runs, args)
                runs += trial_runs
        queue_runs: list[QueueRun] = []
        if args.queue_level and detector is not None:
            async with _bench_queue(backend, stack, args, detector) as queue:
                await warm_up_queue(queue, detector.sample_rate, detector.window_seconds)
                for n in args.queue_streams:
                    queue_runs.append(await queue_level(
                        queue, backend, n, args.queue_seconds, pool, detector.sample_rate,
                        detector.window_seconds))
    finally:
        await asyncio.to_thread(stack.stop)
    return BackendResult(runs, capacity, queue_runs)


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model and count, GPU if any, the load."""
    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = "none"
    if shutil.which("nvidia-smi"):
        with suppress(OSError, subprocess.SubprocessError):
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10,
                                 check=True).stdout.strip() or "none"
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "grpcio": grpc.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_results(results: dict[str, BackendResult], args: argparse.Namespace,
                  meta: dict[str, Any]) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = [r for res in results.values() for r in res.runs]
    one = {b: next((r for r in res.runs if r.purpose == "latency" and r.streams == 1), None)
           for b, res in results.items()}
    ri, rr = one.get("inprocess"), one.get("redis")
    redis_extra = rr.p50_ms - ri.p50_ms if ri and rr else None
    fv = {b: [r.first_verdict_p50_s for r in res.runs if r.purpose == "latency"]
          for b, res in results.items()}
    fv_worst = {b: max((r.first_verdict_p95_s for r in res.runs
                        if r.purpose == "latency" and r.keeps_up), default=math.nan)
                for b, res in results.items()}
    summary = {
        "redis_minus_inprocess_p50_ms_1_stream": redis_extra,
        "redis_overhead_target_ms": 5.0,
        "first_verdict_p95_s_worst_keeping_up": fv_worst,
        "first_verdict_target_s": 2.0,
        "capacity_streams": {b: (asdict(res.capacity) if res.capacity else None)
                             for b, res in results.items()},
        "capacity_target_streams": 50,
    }
    payload = {
        "meta": meta,
        "config": {k: v for k, v in vars(args).items()},
        "summary": summary,
        "runs": [asdict(r) | {"keeps_up": r.keeps_up} for r in runs],
        "queue_level": [asdict(q) for res in results.values() for q in res.queue_runs],
    }
    (RESULTS / "service.json").write_text(json.dumps(payload, indent=2) + "\n")

    m = meta["machine"]
    lines = [
        "# Service latency and capacity (gRPC end to end)", "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, GPU {m['gpu']}; load average at start "
        f"{m['loadavg_at_start']} (1, 5, 15 min). Server `python -m server` on 127.0.0.1, "
        f"model `{args.model}` on CPU, diarization off, max batch {args.max_batch}, "
        f"max wait {args.max_wait_ms:g} ms; Redis: a private redis-server and "
        f"{args.workers} `server.worker` process(es). Each stream: {args.seconds:g} s of a "
        "real call, 100 ms LINEAR16 chunks at real-time pace, interim results on, "
        "staggered starts within one hop; the client (asyncio SDK, one channel) runs in the "
        "benchmark process on the same machine.", "",
        "Columns: *windows*: WindowResults received; *p50/p95/p99/max*: client-side latency "
        "from sending the chunk that completes a window to its WindowResult arriving; "
        f"*late*: windows arriving more than one hop ({HOP_S:g} s) after that chunk was due "
        "in real time; *server p50 / mean*: the server's own histogram (chunk arriving -> "
        "result going out; p50 interpolated within its buckets); *first verdict*: first "
        "WindowResult after the first chunk holding speech was sent, over the streams; "
        "*send lag*: worst delay of a chunk behind its real-time due time (flow control or a "
        "busy client); *client lag*: p99 of the client's event-loop wake-up delay; *load*: "
        "1-minute load average before the run.", "",
        "| backend | streams | windows | p50 ms | p95 ms | p99 ms | max ms | late > 1 hop "
        "| server p50 ms | server mean ms | first verdict p50 s | p95 s | send lag ms "
        "| client lag p99 ms | errors | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in runs if r.purpose == "latency"):
        lines.append(
            f"| {r.backend} | {r.streams} | {r.windows} | {_fmt(r.p50_ms)} | {_fmt(r.p95_ms)} "
            f"| {_fmt(r.p99_ms)} | {_fmt(r.max_ms)} | {r.late_windows} "
            f"| {_fmt(r.server_p50_ms)} | {_fmt(r.server_mean_ms)} "
            f"| {_fmt(r.first_verdict_p50_s, 2)} | {_fmt(r.first_verdict_p95_s, 2)} "
            f"| {_fmt(r.max_send_lag_ms, 0)} | {_fmt(r.client_lag_p99_ms)} | {r.errors} "
            f"| {r.loadavg_1m:.1f} |")
    lines += ["", "## Targets", ""]
    if redis_extra is not None:
        verdict = "met" if redis_extra <= 5.0 else "MISSED"
        q1 = {q.backend: q.p50_ms for res in results.values() for q in res.queue_runs
              if q.streams == 1}
        queue_extra = (f"; at the queue level {q1['redis'] - q1['inprocess']:+.1f} ms"
                       if {"redis", "inprocess"} <= q1.keys() else "")
        lines.append(f"- Redis minus in-process p50 at 1 stream, end to end: "
                     f"{redis_extra:+.1f} ms (target <= 5 ms: {verdict}){queue_extra}. "
                     f"Each is a median of {ri.windows if ri else 0} and "
                     f"{rr.windows if rr else 0} windows on a shared machine: differences "
                     "of a few ms are within run-to-run noise.")
    for b in results:
        worst = fv_worst[b]
        verdict = "met" if worst <= 2.0 else "MISSED"
        lines.append(f"- First verdict after speech, {b}: p50 "
                     f"{', '.join(_fmt(x, 2) for x in fv[b])} s by stream count; worst p95 "
                     f"over the counts that keep up {_fmt(worst, 2)} s (target <= 2 s: "
                     f"{verdict if not math.isnan(worst) else 'not measured'}).")
    for b, res in results.items():
        if res.capacity is None:
            lines.append(f"- Capacity, {b}: not measured (--no-capacity).")
            continue
        c = res.capacity
        verdict = c.verdict(50)
        lines.append(f"- Capacity, {b}: {c.text} concurrent real-time streams keep up "
                     f"(<= {LATE_FRACTION:.0%} of windows later than one hop, no errors; "
                     f"target >= 50: {verdict}).")
    trials = [r for r in runs if r.purpose == "capacity"]
    if trials:
        lines += ["", "Capacity search trials "
                  f"({args.capacity_seconds:g} s streams):", "",
                  "| backend | streams | windows | p50 ms | p99 ms | late | late % | errors "
                  "| keeps up | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in trials:
            lines.append(f"| {r.backend} | {r.streams} | {r.windows} | {_fmt(r.p50_ms)} "
                         f"| {_fmt(r.p99_ms)} | {r.late_windows} | {r.late_fraction:.1%} "
                         f"| {r.errors} | {'yes' if r.keeps_up else 'no'} "
                         f"| {r.loadavg_1m:.1f} |")
    queue_runs = [q for res in results.values() for q in res.queue_runs]
    if queue_runs:
        lines += ["", "## Queue level (secondary)", "",
                  "Windows submitted straight to `InferenceQueue.submit` (no gRPC, decoding, "
                  "windowing or client) against the same backends, when real time completes "
                  f"them ({args.queue_seconds:g} s streams); latency = due time -> score. "
                  "The gap to the table above is what the rest of the service adds.", "",
                  "| backend | streams | windows | p50 ms | p95 ms | p99 ms | max ms | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for q in queue_runs:
            lines.append(f"| {q.backend} | {q.streams} | {q.windows} | {_fmt(q.p50_ms)} "
                         f"| {_fmt(q.p95_ms)} | {_fmt(q.p99_ms)} | {_fmt(q.max_ms)} "
                         f"| {q.errors} |")
    lines += ["", f"Audio: {', '.join(meta['audio_sources'])}."]
    (RESULTS / "service.md").write_text("\n".join(lines) + "\n")
    return payload


def _ints(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.service",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of about a minute: 1 and 5 streams of 5 s, one capacity "
                        "trial, a short queue-level check")
    p.add_argument("--backends", default="inprocess,redis", help="comma-separated")
    p.add_argument("--streams", default="1,10,50", help="concurrent stream counts for the table")
    p.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    p.add_argument("--workers", type=int, default=1,
                   help="Redis worker processes (1 matches the in-process single inference "
                        "thread on a 2-core machine)")
    p.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=True,
                   help="search the largest stream count that keeps up (--no-capacity: skip)")
    p.add_argument("--capacity-seconds", type=float, default=8.0, help="audio per trial stream")
    p.add_argument("--capacity-steps", type=int, default=4, help="trials per backend at most")
    p.add_argument("--capacity-budget", type=float, default=45.0,
                   help="seconds per backend after which no new trial starts")
    p.add_argument("--capacity-resolution", type=int, default=5,
                   help="stop bisecting when the bracket is this narrow (or 10 %%)")
    p.add_argument("--capacity-max", type=int, default=400)
    p.add_argument("--queue-level", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the queues without gRPC (secondary table)")
    p.add_argument("--queue-streams", default="1,10")
    p.add_argument("--queue-seconds", type=float, default=8.0)
    p.add_argument("--model", default="default")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.seconds = "1,5", 5.0
        args.capacity_seconds, args.capacity_steps = 4.0, 1
        args.queue_streams, args.queue_seconds = "1", 4.0
    args.streams = _ints(args.streams)
    args.queue_streams = _ints(args.queue_streams)
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b not in ("inprocess", "redis"):
            p.error(f"unknown backend {b!r}: use inprocess and/or redis")
    if not args.streams or min(args.streams) < 1:
        p.error("--streams needs positive counts")
    return args


async def amain(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM: unwind through every finally, stopping the children
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    meta: dict[str, Any] = {"machine": machine(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "mode": "grpc-end-to-end"}
    say(f"load average at start: {meta['machine']['loadavg_at_start']}")
    pool = AudioPool(max(args.seconds, args.capacity_seconds, args.queue_seconds, 4.0))
    meta["audio_sources"] = pool.sources
    detector = None
    if args.queue_level:  # the in-process queue needs it; both need its rate and window
        from models.inference import load_detector

        detector = await asyncio.to_thread(load_detector, args.model)
    results: dict[str, BackendResult] = {}
    for backend in args.backends:
        results[backend] = await bench_backend(backend, args, pool, detector)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(results, args, meta)
    print((RESULTS / "service.md").read_text())


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    from server.logs import configure

    configure("warning")
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
