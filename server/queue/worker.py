"""The Redis inference worker: the consumer side of :mod:`server.queue.redis_protocol` (its
command line, ``python -m server.worker``, is :mod:`server.worker`).

Runs anywhere that reaches the Redis server, as many copies as there are GPUs or cores to fill.
A :class:`Worker` consumes one job stream with one :class:`JobHandler`: a detector scoring
windows (:class:`ScoreWindows`), or one of the streaming diarizer's model passes
(:class:`RunPass`); ``python -m server.worker`` runs one Worker per stream it serves, in one
process that loads each model once. Each loop it takes up to ``max_batch`` jobs from its
stream (consumer group ``workers``), waiting at most ``max_wait_ms`` after the first one for
more to arrive (Triton's ``max_queue_delay``), runs them in ONE pass (for windows
:func:`server.queue.batching.score_jobs`, the code the in-process queue runs too), publishes
every result to the stream of the server that owns it, and only then acknowledges the jobs, in
the same MULTI. A worker that dies between reading and acknowledging leaves its jobs pending;
live workers take them over with ``XAUTOCLAIM`` once they have been idle ``claim_idle_ms`` and
retry them up to ``max_attempts`` deliveries, after which the server gets an error result
instead of waiting forever.

Liveness: ``worker:{model}:{id}`` is SET with a TTL every third of it; the server's health check
counts the keys still alive. The heartbeat is refreshed only while the read loop is working (its
last Redis round trip succeeded), so a worker stuck on an error stops counting as alive instead
of keeping health SERVING. SIGTERM or SIGINT: finish the batch in hand, acknowledge, exit.

Redis faults: a restarted Redis (no persistence) has lost the job stream and the consumer group;
``XREADGROUP`` then answers ``NOGROUP``, and the worker recreates both (``XGROUP CREATE ...
MKSTREAM``) at once rather than retrying the read forever. Connection errors are retried by the
loop itself with a backoff capped at ``MAX_BACKOFF_S``, not by redis-py (whose default retries
take seconds each), so a worker is back within about a second of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
import structlog
import torch
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from models.inference import Detector
from server import metrics
from server.queue import redis_protocol as wire
from server.queue.base import WindowJob
from server.queue.batching import score_jobs

log = structlog.get_logger("callshield.worker")

# Batch sizes and forward durations go to server.metrics' histograms, shared with the
# in-process backend, so dashboards read the same names whichever queue runs.
JOBS = Counter("callshield_worker_jobs_total", "Windows a Redis worker answered", ["outcome"])
RECLAIMED = Counter("callshield_worker_reclaimed_total", "Jobs taken over from dead workers")

Entry = tuple[bytes, wire.Fields]  # (stream entry id, fields)
MAX_BACKOFF_S = 1.0  # longest wait between two attempts while Redis is unreachable


@dataclass
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: str = "default"
    device: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0  # top-up wait after the first job of a batch
    block_ms: int = 1000  # idle wait for the first job (bounds SIGTERM latency too)
    claim_idle_ms: int = 5000  # a pending job idle this long belongs to a dead worker
    max_attempts: int = 3  # deliveries before a job is answered with an error
    heartbeat_ttl: float = 5.0
    results_maxlen: int = 10_000
    results_ttl: int = 3600  # a results stream outlives its server by at most this
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    prefix: str = "callshield"


class JobHandler(Protocol):
    """What a worker runs over one batch of decoded jobs, in a worker thread: one answer per
    job, in order (a score, an array, or an error)."""

    name: str  # for logs: the model or the pass
    device: str

    def answer(self, jobs: Sequence[tuple[wire.JobMessage, np.ndarray]],
               worker: str) -> list[wire.ResultMessage]: ...


class ScoreWindows:
    """A detector scoring windows in one forward (:func:`score_jobs`, as in-process)."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.name = detector.name
        self.device = str(detector.device)

    async def reload(self, path: str, half: bool = False) -> bool:
        """SIGHUP (``server.worker``): load ``path`` again, checked as the server checks a
        reload (``server/reload.py``), in a thread; the batch being scored finishes on the
        old model, the next one uses the new. A file that cannot serve is logged and the
        old model goes on; returns whether the model changed."""
        from server.reload import ReloadRefused, load_checked

        old = self.detector
        try:
            new = await asyncio.to_thread(load_checked, path, self.device, half, old)
        except ReloadRefused as exc:
            log.warning("worker model reload refused", path=path, reason=str(exc),
                        serving=f"{old.name} {old.version}")
            return False
        self.detector = new
        log.info("worker model reloaded", path=path, model=new.name, version=new.version,
                 previous=f"{old.name} {old.version}")
        return True

    def answer(self, jobs: Sequence[tuple[wire.JobMessage, np.ndarray]],
               worker: str) -> list[wire.ResultMessage]:
        detector = self.detector  # one model per batch, whatever a reload does meanwhile
        scores = score_jobs(detector, [WindowJob(m.job_id, m.stream_id, audio)
                                       for m, audio in jobs])
        return [m.scored(s, len(jobs), worker) for (m, _), s in zip(jobs, scores, strict=True)]


class RunPass:
    """One model pass of the streaming diarizer (``DiarizationModels.passes``): inputs of one
    shape go through ``run`` together, each job answered with its own output row. The pass is
    the function the server would call in-process, so a Redis worker's rows are the ones the
    server would compute itself."""

    def __init__(self, name: str, run: Callable[[list[torch.Tensor]], torch.Tensor],
                 device: torch.device | str = "cpu") -> None:
        self.name = name
        self.run = run
        self.device = str(device)

    def answer(self, jobs: Sequence[tuple[wire.JobMessage, np.ndarray]],
               worker: str) -> list[wire.ResultMessage]:
        answers: list[wire.ResultMessage | None] = [None] * len(jobs)
        for shape in {a.shape for _, a in jobs}:
            rows = [i for i, (_, a) in enumerate(jobs) if a.shape == shape]
            out = self.run([torch.from_numpy(jobs[i][1]).to(self.device) for i in rows])
            out = out.float().cpu().numpy()
            for r, i in enumerate(rows):
                answers[i] = jobs[i][0].answered(out[r], len(rows), worker)
        return [a for a in answers if a is not None]


@dataclass(frozen=True)
class _Job:
    """A job read off the stream: its message, and the entry id that acknowledges it."""

    entry_id: bytes
    message: wire.JobMessage


class Worker:
    """One consumer of one job stream (``config.model``'s): a detector's windows, or a model
    pass of the diarizer (``handler``, a :class:`JobHandler`)."""

    def __init__(self, config: WorkerConfig, handler: Detector | JobHandler) -> None:
        self.config = config
        self.handler: JobHandler = (ScoreWindows(handler) if isinstance(handler, Detector)
                                    else handler)
        self.keys = wire.RedisKeys(config.model, config.prefix)
        # No redis-py retries: the loop below retries with its own short backoff.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            config.redis_url, socket_connect_timeout=2.0,
            socket_timeout=config.block_ms / 1000 + 5.0, retry=Retry(NoBackoff(), 0))
        self.batches = 0
        self.jobs_done = 0
        self.groups_created = 0
        # False from a failed Redis round trip of the read loop until the next success: the
        # heartbeat is not refreshed meanwhile (health must not count a worker that cannot read)
        self._loop_ok = True
        self._stopping = asyncio.Event()
        self._claim_cursor: bytes | str = "0-0"
        self._last_claim = 0.0

    def stop(self) -> None:
        log.info("worker_stopping", worker=self.config.consumer)
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._ensure_group()
        except (RedisError, OSError) as exc:  # the loop retries; NOGROUP recreates it later
            log.warning("redis_unreachable", error=str(exc))
            self._loop_ok = False
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        log.info("worker_started", worker=self.config.consumer, jobs=self.keys.jobs,
                 model=self.handler.name, device=self.handler.device,
                 max_batch=self.config.max_batch)
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    jobs = await self._reclaim()
                    if not jobs:
                        jobs = await self._read_batch()
                    self._loop_ok = True
                    if jobs:
                        await self._process(jobs)
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    self._loop_ok = False
                    if wire.is_nogroup(exc):
                        log.warning("consumer_group_missing", error=str(exc))
                        with contextlib.suppress(RedisError, OSError):
                            await self._ensure_group()
                            continue
                    log.warning("redis_error", error=str(exc), retry_in_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            heartbeat.cancel()
            await asyncio.wait({heartbeat}, timeout=2.0)  # never hang the exit on it
            try:
                await self.redis.delete(self.keys.heartbeat(self.config.consumer))
                await self.redis.srem(self.keys.workers, self.config.consumer)
            except (RedisError, OSError):
                pass
            await self.redis.aclose()
            log.info("worker_stopped", worker=self.config.consumer, batches=self.batches,
                     jobs=self.jobs_done)

    async def _ensure_group(self) -> None:
        """Create the job stream and consumer group unless they exist (at start, and whenever
        Redis lost them). From id 0: windows queued before the group existed are scored, not
        skipped."""
        if await wire.ensure_group(self.redis, self.keys.jobs):
            self.groups_created += 1
            log.info("consumer_group_created", jobs=self.keys.jobs, group=wire.GROUP)

    async def _heartbeat(self) -> None:
        key = self.keys.heartbeat(self.config.consumer)
        ttl_ms = int(self.config.heartbeat_ttl * 1000)
        while True:
            info = json.dumps({"worker": self.config.consumer, "host": socket.gethostname(),
                               "pid": os.getpid(), "device": self.handler.device,
                               "batches": self.batches, "jobs": self.jobs_done})
            if not self._loop_ok:  # the read loop is failing: let the key expire
                await asyncio.sleep(self.config.heartbeat_ttl / 3)
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, info, px=ttl_ms)
                    pipe.sadd(self.keys.workers, self.config.consumer)
                    pipe.smembers(self.keys.workers)
                    *_, members = await pipe.execute()
                await self._prune_workers(members)
            except (RedisError, OSError) as exc:
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.config.heartbeat_ttl / 3)

    async def _prune_workers(self, members: set[bytes]) -> None:
        """Drop the ids of workers whose heartbeat expired (killed without a goodbye)."""
        names = sorted(wire.as_text(m) for m in members)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.keys.heartbeat(name))
            alive = await pipe.execute()
        dead = [name for name, ok in zip(names, alive, strict=True) if not ok]
        if dead:
            await self.redis.srem(self.keys.workers, *dead)

    async def _read_batch(self) -> list[_Job]:
        """Block for the first job, then top up for at most ``max_wait_ms``.

        The top-up is a sleep and a non-blocking read, not a short ``BLOCK``: Redis checks
        blocked clients' timeouts on its ``hz`` timer (100 ms at the default hz 10), so a
        ``BLOCK 4`` can take a hundred times longer than asked.
        """
        cfg = self.config
        entries = await self._xreadgroup(cfg.max_batch, cfg.block_ms)
        if entries and cfg.max_wait_ms > 0 and len(entries) < cfg.max_batch:
            await asyncio.sleep(cfg.max_wait_ms / 1000)
            entries.extend(await self._xreadgroup(cfg.max_batch - len(entries), None))
        return await self._parse(entries)

    async def _xreadgroup(self, count: int, block_ms: int | None) -> list[Entry]:
        response = await self.redis.xreadgroup(
            wire.GROUP, self.config.consumer, {self.keys.jobs: ">"}, count=count, block=block_ms)
        return [entry for _stream, entries in response or [] for entry in entries]

    async def _reclaim(self) -> list[_Job]:
        """Take over jobs left pending by a dead worker; error out those retried too often."""
        cfg = self.config
        now = time.monotonic()
        if now - self._last_claim < cfg.claim_idle_ms / 2000:
            return []
        self._last_claim = now
        response = await self.redis.xautoclaim(
            self.keys.jobs, wire.GROUP, cfg.consumer, min_idle_time=cfg.claim_idle_ms,
            start_id=self._claim_cursor, count=cfg.max_batch)
        self._claim_cursor = response[0]
        if len(response) > 2 and response[2]:
            log.warning("jobs_trimmed_before_scoring",
                        entry_ids=[wire.as_text(i) for i in response[2]])
        claimed = await self._parse([(i, f) for i, f in response[1] if f])
        if not claimed:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in claimed:
                pipe.xpending_range(self.keys.jobs, wire.GROUP, min=job.entry_id, max=job.entry_id,
                                    count=1)
            pending = await pipe.execute()
        retry: list[_Job] = []
        exhausted: list[_Job] = []
        for job, info in zip(claimed, pending, strict=True):
            deliveries = info[0]["times_delivered"] if info else 1
            (exhausted if deliveries > cfg.max_attempts else retry).append(job)
        RECLAIMED.inc(len(claimed))
        log.warning("jobs_reclaimed", worker=cfg.consumer, retried=len(retry),
                    exhausted=len(exhausted), job_ids=[j.message.job_id for j in claimed])
        if exhausted:
            error = f"failed after {cfg.max_attempts} attempts"
            await self._publish([(j, j.message.failed(error, cfg.consumer)) for j in exhausted])
        return retry

    async def _parse(self, entries: list[Entry]) -> list[_Job]:
        """The jobs among ``entries``. Malformed entries are acknowledged and dropped: there is
        nobody to answer, and left pending they would be reclaimed forever."""
        jobs: list[_Job] = []
        bad_ids: list[bytes] = []
        for entry_id, fields in entries:
            try:
                jobs.append(_Job(entry_id, wire.JobMessage.from_fields(fields)))
            except wire.MalformedMessage as exc:
                log.error("malformed_job", entry_id=wire.as_text(entry_id), error=str(exc))
                bad_ids.append(entry_id)
        if bad_ids:
            await self.redis.xack(self.keys.jobs, wire.GROUP, *bad_ids)
        return jobs

    async def _process(self, jobs: list[_Job]) -> None:
        """Run ``jobs`` in one pass and answer every one of them, result or error."""
        consumer = self.config.consumer
        payloads = await self.redis.mget([j.message.audio_key for j in jobs])
        now = time.time()
        answers: list[tuple[_Job, wire.ResultMessage]] = []
        runnable: list[tuple[_Job, np.ndarray]] = []
        for job, payload in zip(jobs, payloads, strict=True):
            m = job.message
            if now > m.deadline:
                answers.append((job, m.failed("expired before scoring (server gave up)",
                                              consumer)))
            elif payload is None:
                answers.append((job, m.failed("audio payload expired", consumer)))
            else:
                try:
                    runnable.append((job, wire.decode_payload(payload, m)))
                except ValueError as exc:
                    answers.append((job, m.failed(f"bad payload: {exc}", consumer)))
        if runnable:
            batch = len(runnable)
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(
                    self.handler.answer, [(job.message, x) for job, x in runnable], consumer)
                answers += [(job, r) for (job, _), r in zip(runnable, results, strict=True)]
            except Exception as exc:  # a model failure answers the batch, never hangs it
                log.exception("batch_failed", job_ids=[j.message.job_id for j in jobs])
                answers += [(job, job.message.failed(f"inference failed: {exc}", consumer))
                            for job, _ in runnable]
            elapsed = time.perf_counter() - started
            if isinstance(self.handler, ScoreWindows):  # the histograms count windows
                metrics.observe_batch(batch, elapsed)
            log.debug("batch_done", batch=batch, seconds=round(elapsed, 4),
                      job_ids=[j.message.job_id for j in jobs])
        await self._publish(answers)

    async def _publish(self, answers: list[tuple[_Job, wire.ResultMessage]]) -> None:
        """Results to each owner's stream, then XACK + XDEL + payload DEL, in one MULTI: a
        job is acknowledged only together with its published result."""
        cfg = self.config
        replies: set[str] = set()
        failed = 0
        async with self.redis.pipeline(transaction=True) as pipe:
            for job, answer in answers:
                pipe.xadd(job.message.reply, answer.to_fields(), maxlen=cfg.results_maxlen,
                          approximate=True)
                replies.add(job.message.reply)
                if isinstance(answer, wire.ErrorMessage):
                    failed += 1
                    log.warning("job_failed", job_id=job.message.job_id,
                                stream_id=job.message.stream_id, error=answer.error)
            for reply in replies:
                pipe.expire(reply, cfg.results_ttl)
            ids = [job.entry_id for job, _ in answers]
            pipe.xack(self.keys.jobs, wire.GROUP, *ids)
            pipe.xdel(self.keys.jobs, *ids)
            pipe.delete(*(job.message.audio_key for job, _ in answers))
            await pipe.execute()
        self.batches += 1
        self.jobs_done += len(answers)
        JOBS.labels("scored").inc(len(answers) - failed)
        if failed:
            JOBS.labels("failed").inc(failed)
