"""The gRPC service on the Redis Streams backend, with real ``python -m server.worker``
processes: health follows the worker pool, a worker killed mid-stream loses no window, and the
service recovers from a Redis restart without persistence. Everything else runs on both backends
through ``backend_server`` (service_fixtures.py)."""

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
from server.queue.redis_protocol import GROUP
from tests.conftest import (
    RedisBackend,
    free_port,
    start_redis,
    start_worker,
    stop_process,
    wait_ready,
)
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
    wait_until,
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


async def test_redis_restart_without_persistence(detector: Detector) -> None:
    """A private redis-server (no persistence) is SIGKILLed and started again on the same port
    while a server and a worker run. The call in flight ends UNAVAILABLE; health is never
    SERVING while Redis is down nor after it is back until windows can be scored again (the
    stream and consumer group are gone and must be recreated, the worker must be reading);
    a call started right after the restart and one started once health is SERVING both
    succeed."""
    port = free_port()
    redis_proc, url = start_redis(port)
    prefix = f"r{uuid.uuid4().hex[:8]}"
    worker = start_worker(url, prefix, "w1", "--log-level", "warning")
    samples: list[tuple[str, str, int]] = []  # (phase at request, phase at answer, status)
    phase = ["up"]

    async def monitor(port: int) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from server.app import SERVICE_NAME

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                before = phase[0]
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
                samples.append((before, phase[0], answer.status))
                await asyncio.sleep(0.02)

    def seen(wanted: str) -> int:
        return sum(1 for before, after, _ in samples if before == after == wanted)

    reqs = requests(stream_config(), linear16_chunks(noise_pcm(2.0)))
    try:
        await asyncio.to_thread(wait_ready, url, prefix, "w1", worker)
        queue = RedisBackend(url, prefix).queue()
        async with serving(detector, queue, queue="redis", redis_url=url) as running, \
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.DetectionServiceStub(channel)
            await wait_health(running.port, SERVING, 30)
            assert (await collect(stub, reqs))[-1].summary.windows_scored == 2
            watcher = asyncio.create_task(monitor(running.port))
            try:
                # a call in flight: its first window is back when Redis dies
                call = stub.StreamDetect()
                await call.write(pb.StreamDetectRequest(config=stream_config(call_id="inflight")))
                (chunk,) = linear16_chunks(noise_pcm(1.5), seconds=1.5)
                await call.write(pb.StreamDetectRequest(audio=chunk))
                assert (await asyncio.wait_for(call.read(), 30)).HasField("window")

                redis_proc.kill()
                await asyncio.to_thread(redis_proc.wait)
                await wait_health(running.port, NOT_SERVING, 15)
                phase[0] = "down"
                inflight: list[pb.StreamDetectResponse] = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.write(pb.StreamDetectRequest(audio=chunk))
                    await call.done_writing()
                    while (response := await asyncio.wait_for(call.read(), 30)) != grpc.aio.EOF:
                        inflight.append(response)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                # ...with its summary first: what was scored before Redis died is not lost,
                # and the windows that never were are counted (it used to end bare)
                summaries = [r.summary for r in inflight if r.HasField("summary")]
                assert [s.call_id for s in summaries] == ["inflight"], inflight
                assert summaries[0].windows_scored >= 1
                assert summaries[0].windows_scored + summaries[0].windows_unscored >= 2
                await wait_until(lambda: seen("down") >= 20, "health sampled while Redis is down")

                phase[0] = "restarting"
                redis_proc, _ = await asyncio.to_thread(start_redis, port)
                phase[0] = "back"
                # started at once, before the worker or the server has recreated the group
                early = asyncio.create_task(collect(stub, reqs))
                await wait_until(lambda: any(s == SERVING for b, a, s in samples if b == "back"),
                                 "health SERVING again after the restart", within=60)
                phase[0] = "serving"
                # SERVING means windows can be scored: a new call succeeds now
                late = await asyncio.wait_for(collect(stub, reqs), 30)
                assert late[-1].summary.windows_scored == 2
                assert (await asyncio.wait_for(early, 60))[-1].summary.windows_scored == 2
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        assert all(status == NOT_SERVING for b, a, status in samples
                   if b == a and b in ("down", "restarting")), samples
        client = aioredis.Redis.from_url(url)
        try:
            groups = await client.xinfo_groups(queue.keys.jobs)
        finally:
            await client.aclose()
        assert [g["name"] for g in groups] == [GROUP.encode()]
    finally:
        stop_process(worker)
        stop_process(redis_proc)
