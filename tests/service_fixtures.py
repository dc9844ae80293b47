"""Fixtures for the gRPC service tests: a real server on a free 127.0.0.1 port with the
in-process queue, and synthetic call audio. Import the fixtures into a test module with
``from tests.service_fixtures import *`` (pytest finds them there)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector, load_detector
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.queue.base import InferenceQueue

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_CALLS = ROOT.parent / "shared" / "calls"


@pytest.fixture(scope="session")
def detector() -> Detector:
    return load_detector("default")


@asynccontextmanager
async def serving(
    detector: Detector, inference_queue: InferenceQueue | None = None, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A server on a free port (``overrides``: ServerConfig fields; ``inference_queue``
    replaces the configured backend); stopped, with open streams cancelled at once, on exit."""
    config = replace(ServerConfig(listen="127.0.0.1:0"), **overrides)
    running = await start_server(config, detector=detector, queue=inference_queue)
    try:
        yield running
    finally:
        await running.stop(0)


@pytest.fixture
async def server(detector: Detector) -> AsyncIterator[RunningServer]:
    async with serving(detector) as running:
        yield running


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.DetectionServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.DetectionServiceStub(channel)


def noise_pcm(seconds: float, rate: int = 8000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """int16 ``(frames, channels)`` noise at about -20 dBFS: loud enough to count as speech."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, (int(seconds * rate), channels))
    return np.clip(x * 32768, -32768, 32767).astype(np.int16)


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
