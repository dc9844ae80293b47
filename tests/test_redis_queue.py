"""The Redis queue end to end: a real redis-server (``redis_server`` fixture), real worker
processes (``python -m server.worker``), the real default model. Each test uses its own key
prefix, so workers of one test never see another test's jobs."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from models.inference import Detector, load_detector
from server.queue.base import QueueUnavailable, WindowJob, WindowScore
from server.queue.batching import score_jobs
from server.queue.redis_protocol import GROUP
from server.queue.redis_queue import RedisQueue
from tests.conftest import free_port, start_redis, start_worker, stop_process, wait_ready
from tests.service_fixtures import wait_until

SR = 8000

pytestmark = pytest.mark.timeout(180)


def window(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def jobs(n: int, seconds: float = 4.0, start: int = 0) -> list[WindowJob]:
    return [WindowJob(f"w{i}", f"s{i % 5}", window(i, seconds)) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return load_detector("default")


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(redis_server: str, prefix: str) -> Iterator[subprocess.Popen[bytes]]:
    """The survivor: one worker for the whole module (it also reclaims the victim's jobs)."""
    proc = start_worker(redis_server, prefix, "survivor", "--max-batch", "16")
    try:
        wait_ready(redis_server, prefix, "survivor", proc)
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture
async def queue(redis_server: str, prefix: str) -> AsyncIterator[RedisQueue]:
    q = RedisQueue(redis_server, "default", prefix=prefix, job_timeout=30.0)
    await q.start()
    yield q
    await q.close()


async def test_unhealthy_without_worker_and_payloads_expire(redis_server: str) -> None:
    q = RedisQueue(redis_server, "default", prefix=f"t{uuid.uuid4().hex[:8]}",
                   job_timeout=1.5, audio_ttl=2)
    await q.start()
    client = aioredis.Redis.from_url(redis_server)
    try:
        assert await q.healthy() is False
        task = asyncio.create_task(q.submit(jobs(1)[0]))
        pattern = f"{q.keys.prefix}:audio:*"
        keys: list[bytes] = []

        async def payload_stored() -> bool:
            keys[:] = [k async for k in client.scan_iter(match=pattern)]
            return bool(keys)

        await wait_until(payload_stored, "the job's audio stored", within=10)
        assert len(keys) == 1
        # PTTL in ms: TTL rounds to whole seconds, which made "0 < TTL" fail when slow.
        assert 0 < await client.pttl(keys[0]) <= 2000
        assert q.depth() == 1
        with pytest.raises(QueueUnavailable, match="not scored within"):
            await task  # nobody scores it: a clean error, not a hang
        assert q.depth() == 0

        async def expired() -> bool:
            return await client.exists(keys[0]) == 0

        await wait_until(expired, "the audio payload expired", within=10)
    finally:
        await client.aclose()
        await q.close()


async def test_unavailable_quickly_when_redis_is_down() -> None:
    q = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", "default", job_timeout=30.0)
    await q.start()
    started = time.monotonic()
    with pytest.raises(QueueUnavailable):
        await q.submit(jobs(1)[0])
    assert time.monotonic() - started < 1.0
    assert await q.healthy() is False
    await q.close()

    # Redis dying under a started queue: the outstanding window fails, the next one too.
    proc, url = start_redis()
    q = RedisQueue(url, "default", job_timeout=30.0)
    await q.start()
    try:
        pending = asyncio.create_task(q.submit(jobs(1)[0]))
        await asyncio.sleep(0.2)
        proc.kill()
        proc.wait()
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            await pending
        with pytest.raises(QueueUnavailable):
            await q.submit(jobs(1)[0])
        assert time.monotonic() - started < 3.0
        assert await q.healthy() is False
    finally:
        stop_process(proc)
        await q.close()


async def test_scores_match_direct_scoring(
    worker: subprocess.Popen[bytes], queue: RedisQueue, detector: Detector
) -> None:
    assert await queue.healthy() is True
    # Early windows of a stream are 1, 2 and 3 s long: lengths mix within a batch.
    batch = jobs(3, 4.0) + jobs(2, 1.0, start=10) + jobs(1, 2.5, start=20)
    got = await asyncio.gather(*(queue.submit(j) for j in batch))
    expected = score_jobs(detector, batch)
    for g, e in zip(got, expected, strict=True):
        assert isinstance(g, WindowScore)
        assert g.job_id == e.job_id and g.model == e.model
        assert g.score == pytest.approx(e.score, abs=1e-4)
        assert g.spoof_probability == pytest.approx(e.spoof_probability, abs=1e-3)
    assert queue.depth() == 0


async def test_concurrent_windows_are_batched(
    worker: subprocess.Popen[bytes], queue: RedisQueue
) -> None:
    results = await asyncio.gather(*(queue.submit(j) for j in jobs(24)))
    assert [r.job_id for r in results] == [f"w{i}" for i in range(24)]
    assert sum(queue.batch_sizes.values()) == 24
    assert max(queue.batch_sizes) > 1, queue.batch_sizes


async def test_killed_worker_jobs_are_reclaimed(
    worker: subprocess.Popen[bytes], queue: RedisQueue, redis_server: str, prefix: str
) -> None:
    victim = start_worker(redis_server, prefix, "victim", "--max-batch", "8")
    client = aioredis.Redis.from_url(redis_server)
    try:
        await asyncio.to_thread(wait_ready, redis_server, prefix, "victim", victim)
        submitted = [asyncio.create_task(queue.submit(j)) for j in jobs(40)]
        deadline = time.monotonic() + 30
        while True:  # until the victim holds unacknowledged jobs, i.e. is mid-batch
            held = await client.xpending_range(queue.keys.jobs, GROUP, "-", "+", 100,
                                               consumername="victim")
            if held:
                break
            assert time.monotonic() < deadline, "the victim never took a job"
            await asyncio.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        results = await asyncio.gather(*submitted)
        assert sorted(r.job_id for r in results) == sorted(f"w{i}" for i in range(40))
        pending = await client.xpending(queue.keys.jobs, GROUP)
        assert pending["pending"] == 0
    finally:
        stop_process(victim)
        await client.aclose()


async def test_sigterm_finishes_the_batch_in_hand(
    worker: subprocess.Popen[bytes], queue: RedisQueue, redis_server: str
) -> None:
    """Runs last: it stops the module's worker. Every job it had read is answered and
    acknowledged before it exits; health goes False once it has gone."""
    client = aioredis.Redis.from_url(redis_server)
    submitted = [asyncio.create_task(queue.submit(j)) for j in jobs(8, start=100)]
    try:
        deadline = time.monotonic() + 30
        while True:  # until it is mid-batch
            held = await client.xpending_range(queue.keys.jobs, GROUP, "-", "+", 100,
                                               consumername="survivor")
            if held:
                break
            assert time.monotonic() < deadline, "the worker never took a job"
            await asyncio.sleep(0.002)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 30) == 0

        def answered() -> list[asyncio.Task]:
            return [t for t in submitted if t.done() and not t.exception()]

        # The worker published every held job's result before exiting; the reader
        # delivers them shortly after.
        await wait_until(lambda: len(answered()) >= len(held), "held jobs answered", 10)
        assert (await client.xpending(queue.keys.jobs, GROUP))["pending"] == 0
        assert await queue.healthy() is False
    finally:
        for task in submitted:
            task.cancel()
        await asyncio.gather(*submitted, return_exceptions=True)
        await client.aclose()


async def test_model_passes_from_a_thread_come_back_row_for_row(redis_server: str) -> None:
    """The diarizer's model passes over Redis (``RedisPass`` on the server, ``RunPass`` in a
    worker): inputs of several shapes from concurrent threads, each caller gets the rows of
    its own inputs, exactly, and the worker ran same-shape inputs in one pass. The pass is a
    stand-in (row sums and a tag of the input's shape) since the transport is what is tested
    here; tests/test_diarization.py runs the real ones through a real worker process."""
    import dataclasses
    import threading

    import torch

    from server.queue.redis_queue import RedisPass
    from server.queue.worker import RunPass, Worker, WorkerConfig

    calls: list[list[tuple[int, ...]]] = []  # the input shapes of each pass the worker ran

    def rows(inputs: list[torch.Tensor]) -> torch.Tensor:
        calls.append([tuple(x.shape) for x in inputs])
        return torch.stack([torch.stack([x.sum(), torch.tensor(float(x.shape[0]))])
                            for x in inputs])

    prefix = f"p{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(redis_url=redis_server, model="diarization-embedding", prefix=prefix,
                          max_wait_ms=50.0)
    worker = Worker(dataclasses.replace(config, consumer="inproc"),
                    RunPass("diarization-embedding", rows))
    running = asyncio.create_task(worker.run())
    queue = RedisQueue(redis_server, "default", prefix=prefix).sibling("diarization-embedding")
    await queue.start()
    bridge = RedisPass(queue, asyncio.get_running_loop())
    rng = np.random.default_rng(0)
    batches = [[torch.from_numpy(rng.standard_normal((n, 3)).astype(np.float32))
                for n in (2, 2, 5)] for _ in range(4)]
    got: dict[int, torch.Tensor] = {}

    def caller(i: int) -> None:
        got[i] = bridge(batches[i])

    try:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join(30) for t in threads])
    finally:
        await queue.close()
        worker.stop()
        await running
    passes = list(calls)
    for i, inputs in enumerate(batches):
        assert torch.equal(got[i], rows(inputs)), i
    # 12 inputs of 2 shapes: fewer passes than inputs, none mixing shapes
    assert sum(len(p) for p in passes) == 12 and len(passes) < 12
    assert all(len(set(p)) == 1 for p in passes), passes
    assert sum(queue.batch_sizes.values()) == 12
