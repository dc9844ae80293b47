"""The gRPC service on the Redis Streams backend, with real ``python -m server.worker``
processes: health follows the worker pool, and a worker killed mid-stream loses no window.
Everything else runs on both backends through ``backend_server`` (service_fixtures.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from server.queue.redis_queue import GROUP
from tests.conftest import RedisBackend, start_worker, stop_process, wait_ready
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    NOT_SERVING,
    SERVING,
    collect,
    health_status,
    linear16_chunks,
    noise_pcm,
    requests,
    serving,
    stream_config,
    wait_health,
)

pytestmark = pytest.mark.timeout(180)


async def test_health_follows_the_workers(detector: Detector, redis_server: str) -> None:
    """NOT_SERVING while no worker is alive, SERVING once one is, NOT_SERVING again once its
    heartbeat expires after a SIGKILL (``--heartbeat-ttl 2``)."""
    backend = RedisBackend(redis_server, f"h{uuid.uuid4().hex[:8]}")  # no worker here yet
    async with serving(detector, backend.queue(), queue="redis", redis_url=redis_server) as running:
        assert await health_status(running.port) == NOT_SERVING
        worker = start_worker(redis_server, backend.prefix, "w1", "--log-level", "warning")
        try:
            await wait_health(running.port, SERVING, 90)  # it loads the model first
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.DetectionServiceStub(channel)
                reqs = requests(stream_config(), linear16_chunks(noise_pcm(2.0)))
                assert (await collect(stub, reqs))[-1].summary.windows_scored == 2
            worker.kill()
            await asyncio.to_thread(worker.wait)
            await wait_health(running.port, NOT_SERVING, 10)
        finally:
            stop_process(worker)


async def _paced(reqs: list[pb.StreamDetectRequest]) -> AsyncIterator[pb.StreamDetectRequest]:
    """0.1 s chunks every 20 ms: 5x real time, so that the streams are still open when the
    worker dies."""
    for request in reqs:
        yield request
        await asyncio.sleep(0.02)


def _windows(responses: list[pb.StreamDetectResponse]) -> list[tuple[str, float, float]]:
    return sorted((r.window.speaker, r.window.start_seconds, r.window.end_seconds)
                  for r in responses if r.HasField("window"))


async def test_worker_killed_mid_stream_every_window_is_answered(
    detector: Detector, redis_backend: RedisBackend
) -> None:
    """Two workers: the session's and a victim that holds each batch 300 ms before scoring it
    (``--max-wait-ms``). Once results flow, the victim is SIGKILLed while it holds windows;
    the other worker takes them over after ``--claim-idle-ms`` (1 s), and every stream ends
    with the same windows as on the in-process backend, and no error."""
    streams = [requests(stream_config(call_id=f"k{i}"), linear16_chunks(noise_pcm(8.0, seed=i)))
               for i in range(3)]
    async with serving(detector) as inprocess, \
            grpc.aio.insecure_channel(f"127.0.0.1:{inprocess.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        expected = await asyncio.gather(*(collect(stub, reqs) for reqs in streams))

    url, prefix = redis_backend.url, redis_backend.prefix
    victim = start_worker(url, prefix, "victim", "--max-wait-ms", "300", "--log-level", "warning")
    client = aioredis.Redis.from_url(url)
    got: list[list[pb.StreamDetectResponse]] = [[] for _ in streams]
    try:
        await asyncio.to_thread(wait_ready, url, prefix, "victim", victim)
        queue = redis_backend.queue()
        async with serving(detector, queue, queue="redis", redis_url=url) as running, \
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.DetectionServiceStub(channel)

            async def stream(i: int) -> None:
                async for response in stub.StreamDetect(_paced(streams[i])):
                    got[i].append(response)

            tasks = [asyncio.create_task(stream(i)) for i in range(len(streams))]
            try:
                deadline = time.monotonic() + 30
                while not any(r.HasField("window") for responses in got for r in responses):
                    assert time.monotonic() < deadline, "no window result within 30 s"
                    await asyncio.sleep(0.005)
                while not await client.xpending_range(queue.keys.jobs, GROUP, "-", "+", 100,
                                                      consumername="victim"):
                    assert not all(t.done() for t in tasks), "the victim never held a window"
                    assert time.monotonic() < deadline, "the victim never held a window"
                    await asyncio.sleep(0.005)
                victim.kill()
                await asyncio.to_thread(victim.wait)
                await asyncio.wait_for(asyncio.gather(*tasks), 60)  # raises on a stream error
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        assert (await client.xpending(queue.keys.jobs, GROUP))["pending"] == 0
    finally:
        stop_process(victim)
        await client.aclose()
    for i, (responses, reference) in enumerate(zip(got, expected, strict=True)):
        summary = responses[-1].summary
        assert summary.call_id == f"k{i}"
        assert summary.windows_scored == reference[-1].summary.windows_scored == 8
        assert _windows(responses) == _windows(reference)
