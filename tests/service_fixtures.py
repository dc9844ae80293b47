"""Fixtures for the gRPC service tests: a real server on a free 127.0.0.1 port, and synthetic
call audio. ``server``/``stub`` use the in-process queue; ``backend_server``/``backend_stub``
run a test once per queue backend, in-process and Redis (``redis_backend`` in conftest.py: the
session's redis-server, with one real ``python -m server.worker`` shared by the session).
Import the fixtures into a test module with ``from tests.service_fixtures import *`` (pytest
finds them there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from devstack import SHARED
from devstack import noise_pcm as noise_pcm
from devstack import serving as serving
from models.inference import Detector, load_detector
from server.app import SERVICE_NAME, RunningServer
from server.config import DIARIZATION_CLI_DEFAULT
from tests.conftest import RedisBackend

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_CALLS = SHARED / "calls"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="session")
def detector() -> Detector:
    return load_detector("default")


@pytest.fixture
async def server(detector: Detector) -> AsyncIterator[RunningServer]:
    async with serving(detector) as running:
        yield running


@pytest.fixture
async def shipped_server(detector: Detector) -> AsyncIterator[RunningServer]:
    """The server as ``make run`` / ``python -m server`` starts it: diarization ``auto``
    (on, with the committed models), in-process queue, default model."""
    async with serving(detector, diarization=DIARIZATION_CLI_DEFAULT) as running:
        assert running.servicer.diarization is not None  # what a user gets
        yield running


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.DetectionServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.DetectionServiceStub(channel)


@pytest.fixture(params=["inprocess", "redis"])
def backend(request: pytest.FixtureRequest) -> RedisBackend | None:
    """Runs a test once per queue backend: None for the in-process queue."""
    return request.getfixturevalue("redis_backend") if request.param == "redis" else None


@pytest.fixture
async def backend_server(
    detector: Detector, backend: RedisBackend | None
) -> AsyncIterator[RunningServer]:
    """``server``, on each queue backend in turn."""
    context = (serving(detector, backend.queue(), queue="redis", redis_url=backend.url)
               if backend else serving(detector))
    async with context as running:
        yield running


@pytest.fixture
async def backend_stub(
    backend_server: RunningServer,
) -> AsyncIterator[pb_grpc.DetectionServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{backend_server.port}") as channel:
        yield pb_grpc.DetectionServiceStub(channel)


async def health_status(port: int) -> int:
    """The health service's status for the detection service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        return response.status


async def wait_health(port: int, status: int, within: float) -> None:
    """Until health reports ``status`` (the server polls its queue once a second)."""
    deadline = time.monotonic() + within
    while (now := await health_status(port)) != status:
        assert time.monotonic() < deadline, (
            f"health still {health_pb2.HealthCheckResponse.ServingStatus.Name(now)} "
            f"after {within:g} s")
        await asyncio.sleep(0.1)


async def wait_until(condition: Any, what: str, within: float = 30.0) -> None:
    """Poll ``condition()`` (sync or async) until it is true; fail naming ``what`` after
    ``within`` seconds. Deadlines are generous: a loaded 2-core CI machine is slow, and a
    test must never pass because the state it needs was not reached in time."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"not reached within {within:g} s: {what}"
        await asyncio.sleep(0.02)


async def refuses_new_calls(channel: grpc.aio.Channel, metadata: Any = ()) -> bool:
    """True once a server in shutdown answers a new RPC with UNAVAILABLE."""
    try:
        await pb_grpc.DetectionServiceStub(channel).GetModel(pb.GetModelRequest(), timeout=5,
                                                             metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


def linear16_chunks(pcm: np.ndarray, rate: int = 8000, seconds: float = 0.1) -> list[bytes]:
    step = int(rate * seconds)
    return [pcm[i : i + step].astype("<i2").tobytes() for i in range(0, pcm.shape[0], step)]


def stream_config(**fields: Any) -> pb.StreamConfig:
    base: dict[str, Any] = dict(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=8000,
                                channels=1, call_id="test-call", interim_results=True)
    return pb.StreamConfig(**(base | fields))


def requests(config: pb.StreamConfig | None, chunks: list[bytes]) -> list[pb.StreamDetectRequest]:
    first = [pb.StreamDetectRequest(config=config)] if config is not None else []
    return first + [pb.StreamDetectRequest(audio=c) for c in chunks]


async def collect(
    stub: pb_grpc.DetectionServiceStub, reqs: list[pb.StreamDetectRequest]
) -> list[pb.StreamDetectResponse]:
    return [r async for r in stub.StreamDetect(iter(reqs))]
