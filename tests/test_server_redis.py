"""The same gRPC service with the Redis Streams backend and a real worker process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    ROOT,
    collect,
    linear16_chunks,
    noise_pcm,
    requests,
    serving,
    stream_config,
)


@pytest.fixture
def worker(redis_server: str) -> Iterator[subprocess.Popen[bytes]]:
    env = os.environ | {"PYANNOTE_METRICS_ENABLED": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.worker", "--redis", redis_server, "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_streams_over_redis(
    detector: Detector, redis_server: str, worker: subprocess.Popen[bytes]
) -> None:
    async with serving(detector, queue="redis", redis_url=redis_server) as running:
        for _ in range(300):  # the worker loads its model, then health turns SERVING
            if await running.queue.healthy():
                break
            await asyncio.sleep(0.1)
        assert await running.queue.healthy()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.DetectionServiceStub(channel)
            streams = [requests(stream_config(call_id=f"r{i}"),
                                linear16_chunks(noise_pcm(5.0, seed=i))) for i in range(5)]
            results = await asyncio.gather(*(collect(stub, reqs) for reqs in streams))
    for i, responses in enumerate(results):
        assert (responses[-1].summary.call_id, responses[-1].summary.windows_scored) == (
            f"r{i}", 5)
