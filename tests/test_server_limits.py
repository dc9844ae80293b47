"""Bounded work per request over real gRPC: a ``Detect`` recording longer than
``--max-detect-seconds`` is refused from its header, decoding runs off the event loop (a
stream is served meanwhile) and stops when the client cancels; streams that send no config or
go silent are closed, and hold a slot until then; one client address cannot take every slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
from prometheus_client import REGISTRY

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from server.config import ServerConfig
from server.service import peer_address
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


def _blocking_stream(port: int, reqs: list[pb.StreamDetectRequest]) -> list[object]:
    """A stream with the blocking client, for calls that the server refuses at once: the
    asyncio client may report such a refusal as INTERNAL when a write races the server's
    trailers (grpc/grpc#36066, see test_server_errors.py)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(pb_grpc.DetectionServiceStub(channel).StreamDetect(iter(reqs)))


async def test_stream_without_config_holds_a_slot_until_the_config_timeout(
    detector: Detector,
) -> None:
    """``--max-streams 1``: a stream that never sends its config holds the only slot (another
    call is refused) until ``--config-timeout-seconds`` closes it with DEADLINE_EXCEEDED;
    then the slot is free again."""
    async with serving(detector, max_streams=1, config_timeout_seconds=1.0) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        silent = stub.StreamDetect()
        await wait_until(lambda: running.servicer.admitted == 1, "the silent stream admitted")
        reqs = requests(stream_config(), linear16_chunks(noise_pcm(1.0)))
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(_blocking_stream, running.port, reqs)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(silent.read(), 60)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "no StreamConfig within 1 s of opening the stream"
        await wait_until(lambda: running.servicer.admitted == 0, "the slot released")
        assert (await collect(stub, reqs))[-1].summary.windows_scored == 1


async def test_idle_stream_is_closed_after_its_windows(detector: Detector) -> None:
    """A client that sent a config and audio, then nothing (and never half-closes), gets the
    results of the audio it sent, then DEADLINE_EXCEEDED after ``--idle-timeout-seconds``."""
    async with serving(detector, idle_timeout_seconds=1.0) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = pb_grpc.DetectionServiceStub(channel).StreamDetect()
        await call.write(pb.StreamDetectRequest(config=stream_config()))
        (chunk,) = linear16_chunks(noise_pcm(2.5), seconds=2.5)
        await call.write(pb.StreamDetectRequest(audio=chunk))
        windows = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (response := await asyncio.wait_for(call.read(), 60)) != grpc.aio.EOF:
                if response.HasField("window"):
                    windows.append((response.window.start_seconds, response.window.end_seconds))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details().startswith("no audio for 1 s")
        assert windows == [(0, 1), (0, 2)]  # the third window needs the end of the stream
        await wait_until(lambda: running.servicer.admitted == 0 and not running.servicer.sessions,
                         "the idle stream's slot and session released")


@asynccontextmanager
async def relay_from(source_host: str, target_port: int) -> AsyncIterator[int]:
    """A TCP relay on a free 127.0.0.1 port whose connections reach ``target_port`` from
    ``source_host`` (another loopback address): a second client address on one machine."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", target_port, local_addr=(source_host, 0))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)

    relay = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield relay.sockets[0].getsockname()[1]
    finally:
        relay.close()


async def test_one_client_address_cannot_take_every_slot(detector: Detector) -> None:
    """``--max-streams 3 --max-streams-per-peer 2``: a client at 127.0.0.1 holding two streams
    is refused a third, while a client at 127.0.0.2 still gets the free slot."""
    async with serving(detector, max_streams=3, max_streams_per_peer=2) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        held = [stub.StreamDetect() for _ in range(2)]
        for call in held:
            await call.write(pb.StreamDetectRequest(config=stream_config()))
        await wait_until(lambda: running.servicer.admitted == 2, "two streams admitted")
        assert running.servicer.admitted_by_peer == {"ipv4:127.0.0.1": 2}
        reqs = requests(stream_config(), linear16_chunks(noise_pcm(1.0)))
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(_blocking_stream, running.port, reqs)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "per-client limit" in info.value.details()  # type: ignore[attr-defined]
        async with relay_from("127.0.0.2", running.port) as port, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as other:
            responses = await asyncio.wait_for(
                collect(pb_grpc.DetectionServiceStub(other), reqs), 60)
        assert responses[-1].summary.windows_scored == 1
        for call in held:
            await call.done_writing()
            assert (await asyncio.wait_for(call.read(), 60)).HasField("summary")


def test_peer_limit_and_address() -> None:
    assert ServerConfig().peer_limit == 100  # half of the 200 slots by default
    assert ServerConfig(max_streams=1).peer_limit == 1
    assert ServerConfig(max_streams_per_peer=7).peer_limit == 7
    assert peer_address("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_address("ipv6:%5B::1%5D:51234") == "ipv6:%5B::1%5D"
    assert peer_address("unix:/run/callshield.sock") == "unix:/run/callshield.sock"
