"""Bounded work per request over real gRPC: a ``Detect`` recording longer than
``--max-detect-seconds`` is refused from its header, decoding runs off the event loop (a
stream is served meanwhile) and stops when the client cancels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
from prometheus_client import REGISTRY

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    collect,
    linear16_chunks,
    noise_pcm,
    requests,
    serving,
    stream_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

LONG_MINUTES = 61  # over the default one-hour limit


@pytest.fixture(scope="module")
def long_silence_flac(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """61 minutes of 48 kHz silence as FLAC: about 0.5 MB on the wire, 175 M samples (0.7 GB
    as float32) once decoded, the decompression bomb of the issue."""
    path: Path = tmp_path_factory.mktemp("bomb") / "silence.flac"
    zeros = np.zeros(48000 * 60, np.int16)
    with soundfile.SoundFile(path, "w", 48000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(LONG_MINUTES):
            f.write(zeros)
    data = path.read_bytes()
    assert len(data) < 2 * 1024 * 1024
    return data


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_detect_over_the_duration_limit_is_refused_before_decoding(
    detector: Detector, long_silence_flac: bytes
) -> None:
    """Default limit (one hour): refused with INVALID_ARGUMENT from the FLAC header, without
    decoding a single block; a stream running at the same time gets all its results."""
    decodes = _sample("callshield_detect_decode_seconds_count")
    async with serving(detector) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        stream = asyncio.create_task(
            collect(stub, requests(stream_config(), linear16_chunks(noise_pcm(3.0)))))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Detect(pb.DetectRequest(audio=long_silence_flac), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            f"audio lasts {LONG_MINUTES * 60} s, over the 3600 s limit of Detect; send longer "
            "recordings with StreamDetect")
        assert (await asyncio.wait_for(stream, 60))[-1].summary.windows_scored == 3
    assert _sample("callshield_detect_decode_seconds_count") == decodes  # nothing decoded


async def test_raw_detect_over_the_limit_is_refused(detector: Detector) -> None:
    """Raw samples: the duration follows from the byte count (``--max-detect-seconds 5``)."""
    async with serving(detector, max_detect_seconds=5.0) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        audio = noise_pcm(6.0).astype("<i2").tobytes()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Detect(pb.DetectRequest(audio=audio, config=stream_config()), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the 5 s limit" in info.value.details()
        ok = await stub.Detect(pb.DetectRequest(audio=audio[: 5 * 16000], config=stream_config()),
                               timeout=60)
        assert ok.summary.windows_scored == 5


async def test_detect_decodes_off_the_event_loop_and_stops_when_cancelled(
    detector: Detector, long_silence_flac: bytes
) -> None:
    """With a two-hour limit the same recording is admitted: while it is being decoded (a
    worker thread, several seconds of CPU), a stream is served start to end; cancelling the
    Detect stops the decoding at its next block instead of finishing it."""
    cancelled = _sample("callshield_detect_cancelled_total", stage="decode")
    async with serving(detector, max_detect_seconds=7200.0) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        call = stub.Detect(pb.DetectRequest(audio=long_silence_flac))
        await wait_until(lambda: _sample("callshield_detect_decoding") == 1, "decoding started")
        responses = await asyncio.wait_for(
            collect(stub, requests(stream_config(), linear16_chunks(noise_pcm(2.0)))), 60)
        assert responses[-1].summary.windows_scored == 2
        assert _sample("callshield_detect_decoding") == 1  # still decoding meanwhile
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: _sample("callshield_detect_decoding") == 0,
                         "decoding stopped after the cancel", within=60)
    assert _sample("callshield_detect_cancelled_total", stage="decode") == cancelled + 1
