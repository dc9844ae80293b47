"""Redis Streams backend of :class:`InferenceQueue`: the server side.

Why Redis Streams directly rather than arq, rq or celery: those poll every 0.5 to 1 s and hand
a worker one job at a time, while a window must be scored within a few ms of arriving and GPU
workers only pay off when they batch windows from many calls in one forward. A stream per model
with a consumer group gives both: ``XREADGROUP COUNT n BLOCK ms`` is a dynamic batcher, and the
pending-entries list (``XAUTOCLAIM``) gives at-least-once delivery when a worker dies.

The wire format (keys, fields, audio encodings) is :mod:`server.queue.redis_protocol`'s alone:
this module and the worker (:mod:`server.queue.worker`) only build and read its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import structlog
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.logs import safe_url
from server.queue.base import InferenceQueue, QueueUnavailable, WindowJob, WindowScore
from server.queue.redis_protocol import (
    AUDIO_FORMATS,
    GROUP,
    ArrayMessage,
    ErrorMessage,
    Fields,
    JobMessage,
    MalformedMessage,
    RedisKeys,
    as_text,
    encode_audio,
    ensure_group,
    result_from_fields,
)

log = structlog.get_logger("callshield.queue.redis")


class JobFailed(QueueUnavailable):
    """A worker gave up on a window (bad payload, expired audio, too many retries)."""


class RedisQueue(InferenceQueue):
    """Submit windows to Redis workers and await their scores.

    One background task per server XREADs this server's results stream and resolves the
    future of each submitted window; ``submit`` never polls. Every Redis error, and a window
    with no answer within ``job_timeout`` seconds, surfaces as :class:`QueueUnavailable`, so
    a stream never hangs on a dead broker or a dead worker pool.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        model: str = "default",
        *,
        server_id: str | None = None,
        job_timeout: float = 15.0,
        audio_ttl: int = 60,
        audio_format: str = "f32",
        jobs_maxlen: int = 100_000,
        op_timeout: float = 2.0,
        prefix: str = "callshield",
    ) -> None:
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}")
        self.url = url
        self.model = model
        self.keys = RedisKeys(model, prefix)
        self.server_id = server_id or uuid.uuid4().hex[:12]
        self.results_key = self.keys.results(self.server_id)
        self.job_timeout = job_timeout
        self.audio_ttl = audio_ttl
        self.audio_format = audio_format
        self.jobs_maxlen = jobs_maxlen
        self.op_timeout = op_timeout
        #: batch sizes the workers reported with each result (metrics, tests)
        self.batch_sizes: Counter[int] = Counter()
        # token -> (future of a WindowScore, or of an array for model passes; job id)
        self._pending: dict[str, tuple[asyncio.Future[Any], str]] = {}
        self._redis: aioredis.Redis | None = None
        self._reader_redis: aioredis.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._read_block_ms = 1000
        self._closing = False

    def _client(self, socket_timeout: float) -> aioredis.Redis:
        # No retries: a dead broker must fail the window now, not after 7 s of backoff.
        return aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.op_timeout, socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )

    async def start(self) -> None:
        """Connect and start the results reader. An unreachable Redis is logged, not raised:
        the server still starts and reports NOT_SERVING until Redis answers."""
        self._redis = self._client(self.op_timeout)
        self._reader_redis = self._client(self._read_block_ms / 1000 + self.op_timeout)
        self._reader = asyncio.create_task(self._read_results(), name="redis-results-reader")
        try:
            await self._redis.ping()
        except RedisError as exc:
            log.warning("redis_unreachable", url=safe_url(self.url), error=str(exc))
        log.info("redis_queue_started", server_id=self.server_id, jobs=self.keys.jobs,
                 results=self.results_key)

    async def close(self) -> None:
        """Stop the reader, fail every outstanding window, drop this server's results."""
        self._closing = True
        if self._reader is not None:
            # Closing the reader's socket ends its blocked XREAD at once; a bare cancel() can
            # leave redis-py waiting inside the read (seen with redis-py 7.1), so it is only
            # the fallback.
            if self._reader_redis is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._reader_redis.connection_pool.disconnect()
            done, _ = await asyncio.wait({self._reader}, timeout=self.op_timeout)
            if not done:
                self._reader.cancel()
                await asyncio.wait({self._reader}, timeout=self.op_timeout)
            self._reader = None
        self._fail_all(QueueUnavailable("queue closed"))
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(self.results_key)
            await self._redis.aclose()
            self._redis = None
        if self._reader_redis is not None:
            await self._reader_redis.aclose()
            self._reader_redis = None

    def sibling(self, model: str) -> RedisQueue:
        """A queue on the same broker, key prefix and settings for another job stream
        (``model``: a detector, or one of the diarizer's model passes)."""
        return RedisQueue(self.url, model, job_timeout=self.job_timeout,
                          audio_ttl=self.audio_ttl, jobs_maxlen=self.jobs_maxlen,
                          op_timeout=self.op_timeout, prefix=self.keys.prefix)

    async def submit(self, job: WindowJob) -> WindowScore:
        result = await self._submit(job.job_id, job.stream_id, job.audio, (), self.audio_format)
        assert isinstance(result, WindowScore)
        return result

    async def run_pass(self, job_id: str, stream_id: str, array: np.ndarray) -> np.ndarray:
        """One input of a model pass (this queue's ``model`` is the pass) -> its output row.
        Always float32 on the wire: the rows must be those the server would compute itself.
        Raises :class:`QueueUnavailable` as ``submit`` does."""
        result = await self._submit(job_id, stream_id, array, tuple(array.shape), "f32")
        assert isinstance(result, np.ndarray)
        return result

    async def _submit(self, job_id: str, stream_id: str, array: np.ndarray,
                      shape: tuple[int, ...], fmt: str) -> WindowScore | np.ndarray:
        if self._redis is None:
            raise QueueUnavailable("redis queue is not started")
        token = uuid.uuid4().hex
        audio_key = self.keys.audio(token)
        now = time.time()
        message = JobMessage(
            token=token, job_id=job_id, stream_id=stream_id, reply=self.results_key,
            enqueued_at=now, deadline=now + self.job_timeout, audio_key=audio_key,
            audio_format=fmt, samples=int(array.size), shape=shape)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[token] = (future, job_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(audio_key, encode_audio(array.reshape(-1), fmt), ex=self.audio_ttl)
                pipe.xadd(self.keys.jobs, message.to_fields(), maxlen=self.jobs_maxlen,
                          approximate=True)
                await pipe.execute()
            return await asyncio.wait_for(future, self.job_timeout)
        except RedisError as exc:
            log.warning("submit_failed", job_id=job_id, stream_id=stream_id, error=str(exc))
            raise QueueUnavailable(f"redis: {exc}") from exc
        except TimeoutError as exc:
            log.warning("job_timeout", job_id=job_id, stream_id=stream_id, jobs=self.keys.jobs,
                        timeout_s=self.job_timeout)
            what = f"{self.model} job {job_id} not answered" if shape else \
                f"window {job_id} not scored"
            raise QueueUnavailable(
                f"{what} within {self.job_timeout:g} s (no live worker?)") from exc
        finally:
            self._pending.pop(token, None)

    async def live_workers(self) -> int:
        """Workers whose heartbeat key has not expired. Raises RedisError."""
        assert self._redis is not None
        members = await self._redis.smembers(self.keys.workers)
        if not members:
            return 0
        return int(await self._redis.exists(*(self.keys.heartbeat(as_text(m)) for m in members)))

    async def healthy(self) -> bool:
        """Windows can be scored: Redis answers, the job stream has its consumer group (it is
        recreated here when Redis lost it, e.g. restarted without persistence) and at least one
        worker's heartbeat is alive (workers refresh it only while their read loop works)."""
        if self._redis is None:
            return False
        try:
            await self._redis.ping()
            if await ensure_group(self._redis, self.keys.jobs):
                log.info("consumer_group_created", jobs=self.keys.jobs, group=GROUP)
            return await self.live_workers() > 0
        except (RedisError, OSError):
            return False

    def depth(self) -> int:
        return len(self._pending)

    async def _read_results(self) -> None:
        """The one reader per server: XREAD BLOCK on our results stream, resolve futures."""
        assert self._reader_redis is not None
        last_id: bytes | str = "0-0"
        backoff = 0.05
        while not self._closing:
            try:
                response = await self._reader_redis.xread(
                    {self.results_key: last_id}, count=1000, block=self._read_block_ms)
                backoff = 0.05
            except RedisTimeoutError:
                # A stalled event loop, not a dead broker: results wait in the stream and
                # the next XREAD resumes after ``last_id``.
                continue
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                if self._pending:
                    log.warning("results_reader_lost_redis", error=str(exc),
                                failed=len(self._pending))
                self._fail_all(QueueUnavailable(f"lost redis: {exc}"))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._resolve(fields)

    def _resolve(self, fields: Fields) -> None:
        try:
            message = result_from_fields(fields)
        except MalformedMessage as exc:  # its window times out; the reader must go on
            log.error("malformed_result", error=str(exc))
            return
        pending = self._pending.get(message.token)
        if pending is None:  # a duplicate after a reclaim, or a window that timed out
            return
        future, job_id = pending
        if future.done():
            return
        if isinstance(message, ErrorMessage):
            future.set_exception(JobFailed(f"window {job_id}: {message.error}"))
            return
        self.batch_sizes[message.batch] += 1
        if isinstance(message, ArrayMessage):
            future.set_result(message.array)
            return
        future.set_result(WindowScore(
            job_id=job_id, score=message.score,
            spoof_probability=message.spoof_probability, model=message.model))

    def _fail_all(self, exc: QueueUnavailable) -> None:
        for future, _job_id in list(self._pending.values()):
            if not future.done():
                future.set_exception(exc)


class RedisPass:
    """A model pass of the streaming diarizer run by Redis workers, for the diarizer's
    thread: ``DiarizationModels.use(segmentation=..., embedding=...)`` takes it where the
    in-process :class:`~diarization.batching.ConcurrentBatcher` would be. Each input is a job
    of its own, so workers batch inputs from every call's step as they batch windows; the
    calling thread waits for its rows, the event loop does not.

    Why no batching here: the worker's ``XREADGROUP COUNT n`` already gathers what the calls
    submitted meanwhile, and a lead caller waiting on a round trip would hold the others."""

    def __init__(self, queue: RedisQueue, loop: asyncio.AbstractEventLoop) -> None:
        self.queue = queue
        self.loop = loop
        self.passes = 0

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if not inputs:
            raise ValueError("a model pass needs at least one input")
        future = asyncio.run_coroutine_threadsafe(self._run(inputs), self.loop)
        return torch.from_numpy(np.stack(future.result()))

    async def _run(self, inputs: list[torch.Tensor]) -> list[np.ndarray]:
        self.passes += 1
        stream = f"{self.queue.model}-{self.passes}"
        return list(await asyncio.gather(*(
            self.queue.run_pass(f"{stream}:{i}", stream, x.detach().cpu().numpy())
            for i, x in enumerate(inputs))))
