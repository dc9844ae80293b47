"""Redis inference worker: ``python -m server.worker --redis URL --model default --device auto``.

Runs anywhere that reaches the Redis server, as many copies as there are GPUs or cores to fill.
Each loop it takes up to ``max_batch`` windows from the model's job stream (consumer group
``workers``), waiting at most ``max_wait_ms`` after the first one for more to arrive (Triton's
``max_queue_delay``), scores them in ONE forward (:func:`server.batching.score_jobs`, the code
the in-process queue runs too), publishes every result to the stream of the server that owns it,
and only then acknowledges the jobs, in the same MULTI. A worker that dies between reading and
acknowledging leaves its jobs pending; live workers take them over with ``XAUTOCLAIM`` once they
have been idle ``claim_idle_ms`` and retry them up to ``max_attempts`` deliveries, after which
the server gets an error result instead of waiting forever.

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

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from models.inference import Detector, load_detector
from server import metrics
from server.batching import score_jobs
from server.logs import configure
from server.queue.base import WindowJob, WindowScore
from server.queue.redis_queue import (
    GROUP,
    RedisKeys,
    _safe_url,
    _text,
    decode_audio,
    ensure_group,
)

log = structlog.get_logger("callshield.worker")

# Batch sizes and forward durations go to server.metrics' histograms, shared with the
# in-process backend, so dashboards read the same names whichever queue runs.
JOBS = Counter("callshield_worker_jobs_total", "Windows a Redis worker answered", ["outcome"])
RECLAIMED = Counter("callshield_worker_reclaimed_total", "Jobs taken over from dead workers")

Entry = tuple[bytes, dict[bytes, bytes]]
MAX_BACKOFF_S = 1.0  # longest wait between two attempts while Redis is unreachable


def is_nogroup(exc: BaseException) -> bool:
    """Redis lost the stream or its consumer group (a restart without persistence, a FLUSHALL,
    an XGROUP DESTROY): recreate them rather than retry."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


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


@dataclass
class _Job:
    entry_id: bytes
    token: str
    job_id: str
    stream_id: str
    reply: str
    audio_key: str
    fmt: str
    samples: int
    deadline: float

    @classmethod
    def parse(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> _Job:
        return cls(
            entry_id=entry_id, token=_text(fields[b"token"]), job_id=_text(fields[b"job"]),
            stream_id=_text(fields[b"stream"]), reply=_text(fields[b"reply"]),
            audio_key=_text(fields[b"audio"]), fmt=_text(fields[b"fmt"]),
            samples=int(fields[b"n"]), deadline=float(fields.get(b"deadline", b"inf")),
        )


class Worker:
    """One consumer of one model's job stream."""

    def __init__(self, config: WorkerConfig, detector: Detector) -> None:
        self.config = config
        self.detector = detector
        self.keys = RedisKeys(config.model, config.prefix)
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
                 model=self.detector.name, device=str(self.detector.device),
                 dtype=str(self.detector.dtype), max_batch=self.config.max_batch)
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    entries = await self._reclaim()
                    if not entries:
                        entries = await self._read_batch()
                    self._loop_ok = True
                    if entries:
                        await self._process(entries)
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    self._loop_ok = False
                    if is_nogroup(exc):
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
        if await ensure_group(self.redis, self.keys.jobs):
            self.groups_created += 1
            log.info("consumer_group_created", jobs=self.keys.jobs, group=GROUP)

    async def _heartbeat(self) -> None:
        key = self.keys.heartbeat(self.config.consumer)
        ttl_ms = int(self.config.heartbeat_ttl * 1000)
        while True:
            info = json.dumps({"worker": self.config.consumer, "host": socket.gethostname(),
                               "pid": os.getpid(), "device": str(self.detector.device),
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
        names = sorted(_text(m) for m in members)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.keys.heartbeat(name))
            alive = await pipe.execute()
        dead = [name for name, ok in zip(names, alive, strict=True) if not ok]
        if dead:
            await self.redis.srem(self.keys.workers, *dead)

    async def _read_batch(self) -> list[Entry]:
        """Block for the first job, then top up for at most ``max_wait_ms``.

        The top-up is a sleep and a non-blocking read, not a short ``BLOCK``: Redis checks
        blocked clients' timeouts on its ``hz`` timer (100 ms at the default hz 10), so a
        ``BLOCK 4`` can take a hundred times longer than asked.
        """
        cfg = self.config
        entries = await self._xreadgroup(cfg.max_batch, cfg.block_ms)
        if not entries or cfg.max_wait_ms <= 0 or len(entries) >= cfg.max_batch:
            return entries
        await asyncio.sleep(cfg.max_wait_ms / 1000)
        entries.extend(await self._xreadgroup(cfg.max_batch - len(entries), None))
        return entries

    async def _xreadgroup(self, count: int, block_ms: int | None) -> list[Entry]:
        response = await self.redis.xreadgroup(
            GROUP, self.config.consumer, {self.keys.jobs: ">"}, count=count, block=block_ms)
        return [entry for _stream, entries in response or [] for entry in entries]

    async def _reclaim(self) -> list[Entry]:
        """Take over jobs left pending by a dead worker; error out those retried too often."""
        cfg = self.config
        now = time.monotonic()
        if now - self._last_claim < cfg.claim_idle_ms / 2000:
            return []
        self._last_claim = now
        response = await self.redis.xautoclaim(
            self.keys.jobs, GROUP, cfg.consumer, min_idle_time=cfg.claim_idle_ms,
            start_id=self._claim_cursor, count=cfg.max_batch)
        self._claim_cursor = response[0]
        if len(response) > 2 and response[2]:
            log.warning("jobs_trimmed_before_scoring", entry_ids=[_text(i) for i in response[2]])
        claimed: list[Entry] = [(i, f) for i, f in response[1] if f]
        if not claimed:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(self.keys.jobs, GROUP, min=entry_id, max=entry_id, count=1)
            pending = await pipe.execute()
        retry: list[Entry] = []
        exhausted: list[_Job] = []
        for (entry_id, fields), info in zip(claimed, pending, strict=True):
            deliveries = info[0]["times_delivered"] if info else 1
            if deliveries > cfg.max_attempts:
                exhausted.append(_Job.parse(entry_id, fields))
            else:
                retry.append((entry_id, fields))
        RECLAIMED.inc(len(claimed))
        log.warning("jobs_reclaimed", worker=cfg.consumer, retried=len(retry),
                    exhausted=len(exhausted),
                    job_ids=[_text(f.get(b"job")) for _, f in claimed])
        if exhausted:
            await self._publish([], {j.token: f"failed after {cfg.max_attempts} attempts"
                                     for j in exhausted}, exhausted, batch=0)
        return retry

    async def _process(self, entries: list[Entry]) -> None:
        jobs: list[_Job] = []
        errors: dict[str, str] = {}
        bad_ids: list[bytes] = []
        for entry_id, fields in entries:
            try:
                jobs.append(_Job.parse(entry_id, fields))
            except (KeyError, ValueError) as exc:
                log.error("malformed_job", entry_id=_text(entry_id), error=str(exc))
                bad_ids.append(entry_id)
        if bad_ids:  # nobody to answer: drop them so they are not reclaimed forever
            await self.redis.xack(self.keys.jobs, GROUP, *bad_ids)
        if not jobs:
            return
        payloads = await self.redis.mget([j.audio_key for j in jobs])
        now = time.time()
        window_jobs: list[WindowJob] = []
        for job, payload in zip(jobs, payloads, strict=True):
            if now > job.deadline:
                errors[job.token] = "expired before scoring (server gave up)"
            elif payload is None:
                errors[job.token] = "audio payload expired"
            else:
                try:
                    audio = decode_audio(payload, job.fmt, job.samples)
                    window_jobs.append(WindowJob(job.token, job.stream_id, audio))
                except ValueError as exc:
                    errors[job.token] = f"bad payload: {exc}"
        scores: list[WindowScore] = []
        if window_jobs:
            started = time.perf_counter()
            try:
                scores = await asyncio.to_thread(score_jobs, self.detector, window_jobs)
            except Exception as exc:  # a model failure answers the batch, never hangs it
                log.exception("batch_failed", job_ids=[j.job_id for j in jobs])
                errors.update({wj.job_id: f"inference failed: {exc}" for wj in window_jobs})
            elapsed = time.perf_counter() - started
            metrics.observe_batch(len(window_jobs), elapsed)
            log.debug("batch_scored", batch=len(window_jobs), seconds=round(elapsed, 4),
                      job_ids=[j.job_id for j in jobs])
        await self._publish(scores, errors, jobs, batch=len(window_jobs))

    async def _publish(self, scores: list[WindowScore], errors: dict[str, str],
                       jobs: list[_Job], batch: int) -> None:
        """Results to each owner's stream, then XACK + XDEL + payload DEL, in one MULTI: a
        job is acknowledged only together with its published result."""
        cfg = self.config
        by_token = {j.token: j for j in jobs}
        replies: set[str] = set()
        async with self.redis.pipeline(transaction=True) as pipe:
            for s in scores:
                job = by_token[s.job_id]
                pipe.xadd(job.reply, {"token": job.token, "job": job.job_id, "score": repr(s.score),
                                      "p": repr(s.spoof_probability), "model": s.model,
                                      "batch": batch, "worker": cfg.consumer},
                          maxlen=cfg.results_maxlen, approximate=True)
                replies.add(job.reply)
            for token, error in errors.items():
                job = by_token[token]
                pipe.xadd(job.reply, {"token": token, "job": job.job_id, "error": error,
                                      "worker": cfg.consumer},
                          maxlen=cfg.results_maxlen, approximate=True)
                replies.add(job.reply)
                log.warning("job_failed", job_id=job.job_id, stream_id=job.stream_id,
                            error=error)
            for reply in replies:
                pipe.expire(reply, cfg.results_ttl)
            ids = [j.entry_id for j in jobs]
            pipe.xack(self.keys.jobs, GROUP, *ids)
            pipe.xdel(self.keys.jobs, *ids)
            pipe.delete(*(j.audio_key for j in jobs))
            await pipe.execute()
        self.batches += 1
        self.jobs_done += len(jobs)
        JOBS.labels("scored").inc(len(scores))
        if errors:
            JOBS.labels("failed").inc(len(errors))


def _env(name: str, default: object) -> str:
    return os.environ.get(f"CALLSHIELD_{name.upper()}", str(default))


def parse_args(argv: Sequence[str] | None = None) -> tuple[WorkerConfig, argparse.Namespace]:
    d = WorkerConfig()
    p = argparse.ArgumentParser(
        prog="python -m server.worker",
        description="callshield Redis inference worker (flags also read from CALLSHIELD_<FLAG>)")
    p.add_argument("--redis", "--redis-url", dest="redis_url",
                   default=_env("redis_url", d.redis_url))
    p.add_argument("--model", default=_env("model", d.model), help="model name or path")
    p.add_argument("--device", default=_env("worker_device", d.device),
                   help="auto (CUDA fp16 if present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--max-batch", type=int, default=int(_env("max_batch", d.max_batch)))
    p.add_argument("--max-wait-ms", type=float, default=float(_env("max_wait_ms", d.max_wait_ms)))
    p.add_argument("--block-ms", type=int, default=d.block_ms)
    p.add_argument("--claim-idle-ms", type=int,
                   default=int(_env("claim_idle_ms", d.claim_idle_ms)))
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--heartbeat-ttl", type=float, default=d.heartbeat_ttl)
    p.add_argument("--consumer", default=d.consumer, help="worker id (default host-pid)")
    p.add_argument("--prefix", default=_env("redis_prefix", d.prefix),
                   help="key prefix (several deployments can share one Redis)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--metrics-port", type=int, default=int(_env("worker_metrics_port", 0)))
    p.add_argument("--log-level", default=_env("log_level", "info"))
    args = p.parse_args(argv)
    config = WorkerConfig(
        redis_url=args.redis_url, model=args.model, device=args.device,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, block_ms=args.block_ms,
        claim_idle_ms=args.claim_idle_ms, max_attempts=args.max_attempts,
        heartbeat_ttl=args.heartbeat_ttl, consumer=args.consumer, prefix=args.prefix)
    return config, args


async def _amain(config: WorkerConfig, detector: Detector) -> None:
    worker = Worker(config, detector)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    configure(args.log_level)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from models.inference import resolve_device

    device = resolve_device(config.device)
    detector = load_detector(config.model, device=str(device), half=device.type == "cuda")
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    log.info("worker_model_loaded", model=detector.name, version=detector.version,
             device=str(device), redis=_safe_url(config.redis_url))
    asyncio.run(_amain(config, detector))


if __name__ == "__main__":
    main()
